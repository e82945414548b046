"""Entry point: ``python train.py --config unet_skip.yaml``. See ``unetseg.cli``."""

from unetseg.cli import main

if __name__ == "__main__":
    main()
