"""Analysis: what the skip connections buy. The ablation workflow (grid, runs, report), gradient flow per
layer and loss landscapes.

These tools sit on top: they run ordinary training runs through ``unetseg.training.cli`` and read what the
runs wrote. ``GradientFlow`` is a Lightning callback beside the gradient-flow logic it records.
"""

from unetseg.analysis.gradflow import GradientFlow

__all__ = ["GradientFlow"]
