"""Install support: ``python -m unetseg.compat.torchvision_cpu_shim install`` makes PyPI's CUDA torchvision
import next to the CPU build of torch. Imports nothing from the rest of ``unetseg`` (nor torch at import)."""
