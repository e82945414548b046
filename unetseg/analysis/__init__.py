"""Analysis: what the skip connections buy. The ablation workflow, gradient flow per layer, loss landscapes,
and the cross-validation of a configuration.

The ablation is split by job: ``grid`` (the grid file: parsing, validation, variants x seeds), ``matching``
(parameter counts, widths matched to a baseline's parameters), ``plan`` (run ids, each run's arguments,
``plan.json``, result markers, worker commands), ``runner`` (running and resuming runs, in process or as
subprocesses), ``report`` (tables, paired tests, figures) and ``ablate`` (the command line); ``gradflow``
and ``landscape`` are the per-layer and loss-surface analyses, ``plotting`` their headless matplotlib.
``crossval`` (the command line) trains the K folds of a dataset with the same ``plan`` and ``runner``, and
``oof`` evaluates the out-of-fold predictions and decides the postprocessing. This subpackage sits on top: it
may import ``training``, ``data``, ``nets``, ``inference`` and ``evaluation``, and nothing in ``unetseg``
imports it. It runs ordinary training runs through ``unetseg.training.cli`` and reads what they
wrote; ``GradientFlow`` is a Lightning callback beside the gradient-flow logic it records.
"""

from unetseg.analysis.gradflow import GradientFlow

__all__ = ["GradientFlow"]
