"""A real Lightning Trainer for tests that read metrics and outputs directly rather than logs or files."""

from __future__ import annotations

from typing import Any

import lightning as L


def quiet_trainer(**kwargs: Any) -> L.Trainer:
    """``L.Trainer`` without logger, checkpoints, progress bar or model summary; ``kwargs`` add to or override
    those settings."""
    quiet = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return L.Trainer(**{**quiet, **kwargs})
