"""Entry point: ``python train.py --config unet_skip.yaml``. See ``unetseg.training.cli``."""

from unetseg.training.cli import main

if __name__ == "__main__":
    main()
