"""Rebuilding a net from its class path and constructor arguments, as checkpoints record it.

>>> net = build_net({"class_path": "unetseg.nets.unet.UNet", "init_args": {"channels": [4, 8]}})
>>> type(net).__name__
'UNet'
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from torch import nn


def build_net(config: dict[str, Any], source: str = "config") -> nn.Module:
    """The net of ``{"class_path", "init_args"}``; only classes of ``unetseg`` or of already imported modules.

    ``source`` names where the config comes from (``"checkpoint runs/x/last.ckpt"``) in the errors.
    """
    class_path = str(config.get("class_path", ""))
    module_name, _, name = class_path.rpartition(".")
    if not module_name or not (module_name.split(".")[0] == "unetseg" or module_name in sys.modules):
        raise ValueError(
            f"{source}: net class {class_path!r} is neither in unetseg nor in an imported module "
            "(import the module that defines it first)"
        )
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{source}: cannot import the net class {class_path!r}: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{source}: {class_path!r} is not a torch.nn.Module class")
    try:
        return cls(**dict(config.get("init_args") or {}))
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{source}: cannot build {class_path} from {config.get('init_args')}: {err}"
        ) from err
