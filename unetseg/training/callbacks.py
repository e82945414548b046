"""Callbacks the CLI adds to Lightning's Trainer for speed and for scale-out runs.

- ``Performance``: memory layout (``channels_last``) and ``torch.compile`` of the net, as config options
  (``--performance.memory_format channels_last --performance.compile true``).
- ``UnpaddedDistributedEval``: under DDP, validation and test see every sample exactly once, so Dice/IoU equal
  the single-process values (Lightning's default ``DistributedSampler`` pads by repeating samples).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSamplerWrapper
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.data import _update_dataloader, has_iterable_dataset
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

MEMORY_FORMATS: dict[str, torch.memory_format] = {
    "contiguous": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "channels_last_3d": torch.channels_last_3d,
}
CHANNELS_LAST_BY_RANK: dict[int, torch.memory_format] = {4: torch.channels_last, 5: torch.channels_last_3d}


def _input_to_format(memory_format: torch.memory_format, rank: int, module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: lay the image tensor(s) out in ``memory_format``."""
    return tuple(
        a.contiguous(memory_format=memory_format) if isinstance(a, torch.Tensor) and a.dim() == rank else a
        for a in args
    )


def _tensor_rank(net: nn.Module) -> int:
    """Rank of the net's image tensors: ``spatial_dims + 2`` (from the attribute, else the conv weights)."""
    spatial_dims = getattr(net, "spatial_dims", None)
    if spatial_dims is not None:
        return int(spatial_dims) + 2
    ranks = {p.dim() for p in net.parameters() if p.dim() in (4, 5)}
    return max(ranks, default=4)


class Performance(Callback):
    """Memory layout and ``torch.compile`` for the model's net, applied in ``setup`` before fitting/testing.

    ``memory_format="channels_last"`` stores the conv weights and the input images channels-last (NHWC; for a
    3D net NDHWC, i.e. ``torch.channels_last_3d``): oneDNN on CPU and cuDNN tensor cores on GPU are faster in
    that layout, most of all combined with ``bf16-mixed``/``16-mixed`` precision. ``compile=True`` calls
    ``nn.Module.compile`` on the net: in place, so checkpoint keys do not change and checkpoints load into an
    uncompiled model. Compilation happens on the first step (seconds to minutes) and needs a C++ compiler on
    CPU. The defaults change nothing.

    >>> from unetseg import UNet
    >>> net = UNet(spatial_dims=2, channels=(4, 8))
    >>> Performance("channels_last").apply(net) is net
    True
    >>> net(torch.rand(1, 1, 16, 16)).is_contiguous(memory_format=torch.channels_last)
    True

    Args:
        memory_format: ``"contiguous"``, ``"channels_last"`` (channels-last for the net's dimensionality) or
            ``"channels_last_3d"`` (3D nets only).
        compile: compile the net with ``torch.compile``.
        compile_mode: ``torch.compile`` mode (``None``, ``"default"``, ``"reduce-overhead"``,
            ``"max-autotune"``).
        compile_backend: ``torch.compile`` backend (``"inductor"``; ``"aot_eager"`` or ``"eager"`` to debug).
    """

    def __init__(
        self,
        memory_format: str = "contiguous",
        compile: bool = False,
        compile_mode: str | None = None,
        compile_backend: str = "inductor",
    ) -> None:
        if memory_format not in MEMORY_FORMATS:
            raise ValueError(f"memory_format={memory_format!r} is not one of {list(MEMORY_FORMATS)}")
        self.memory_format = memory_format
        self.compile = compile
        self.compile_mode = compile_mode
        self.compile_backend = compile_backend

    def layout(self, net: nn.Module) -> torch.memory_format:
        """The ``torch.memory_format`` this callback gives ``net``."""
        rank = _tensor_rank(net)
        if self.memory_format == "channels_last":
            return CHANNELS_LAST_BY_RANK[rank]
        if self.memory_format == "channels_last_3d" and rank != 5:
            raise ValueError(
                f"memory_format='channels_last_3d' needs a 3D net, got a {rank - 2}D one: "
                "use 'channels_last' (it picks the layout for the net's dimensionality)"
            )
        return MEMORY_FORMATS[self.memory_format]

    def apply(self, net: nn.Module) -> nn.Module:
        """Lay ``net`` and its inputs out in the memory format and compile it; idempotent; returns ``net``."""
        memory_format = self.layout(net)
        if memory_format != torch.contiguous_format and getattr(net, "_unetseg_memory_format", None) is None:
            net.to(memory_format=memory_format)
            net.register_forward_pre_hook(
                functools.partial(_input_to_format, memory_format, _tensor_rank(net))
            )
            net._unetseg_memory_format = memory_format
        if self.compile and not getattr(net, "_unetseg_compiled", False):
            net.compile(mode=self.compile_mode, backend=self.compile_backend)
            net._unetseg_compiled = True
        return net

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.apply(getattr(pl_module, "net", pl_module))


def _unpadded(loader: Any, num_replicas: int, rank: int) -> Any:
    """``loader`` with an unrepeated distributed sampler (each sample once over the ranks) if it has none."""
    if (
        not isinstance(loader, DataLoader)
        or isinstance(loader.sampler, DistributedSampler)
        or has_iterable_dataset(loader)
    ):
        return loader
    if len(loader.dataset) < num_replicas:  # type: ignore[arg-type]
        raise ValueError(
            f"an evaluation set of {len(loader.dataset)} samples cannot be split over "  # type: ignore[arg-type]
            f"{num_replicas} processes: every process needs at least one sample"
        )
    sampler = UnrepeatedDistributedSamplerWrapper(
        loader.sampler, num_replicas=num_replicas, rank=rank, shuffle=False
    )
    # Private, as Lightning has no public way to rebuild a DataLoader (any subclass, all its arguments) with
    # another sampler; its own data connector uses this for the same purpose.
    return _update_dataloader(loader, sampler, mode=RunningStage.VALIDATING)


def _unpadded_hook(hook: Callable[[], Any], trainer: L.Trainer) -> Callable[[], Any]:
    """Wrap a datamodule's ``val_dataloader``/``test_dataloader`` so its loaders are unpadded."""

    @functools.wraps(hook)
    def wrapped() -> Any:
        loaders = hook()
        kwargs = trainer.distributed_sampler_kwargs or {}
        num_replicas, rank = kwargs.get("num_replicas", 1), kwargs.get("rank", 0)
        if isinstance(loaders, (list, tuple)):
            return type(loaders)(_unpadded(loader, num_replicas, rank) for loader in loaders)
        if isinstance(loaders, dict):
            return {key: _unpadded(loader, num_replicas, rank) for key, loader in loaders.items()}
        return _unpadded(loaders, num_replicas, rank)

    wrapped._unetseg_unpadded = True  # type: ignore[attr-defined]
    return wrapped


class UnpaddedDistributedEval(Callback):
    """Under DDP, split the validation and test sets over the ranks without repeating samples.

    Lightning's ``use_distributed_sampler`` gives every loader a ``DistributedSampler``, which pads the
    dataset to a multiple of the world size by repeating its first samples: with 5 validation images on
    2 GPUs one image counts twice and Dice/IoU differ from a single-GPU evaluation. This callback gives the
    datamodule's ``val_dataloader``/``test_dataloader`` Lightning's ``UnrepeatedDistributedSamplerWrapper``
    (each rank gets ``ceil`` or ``floor`` of ``N / world_size`` samples, every sample once); Lightning leaves
    loaders that already have a ``DistributedSampler`` alone. The Dice/IoU states are per-sample counts
    gathered over the ranks (torchmetrics), so the values equal the single-process ones exactly. Needs at
    least one sample per rank. Training keeps the padded ``DistributedSampler`` (DDP needs the same number
    of steps on every rank). Does nothing on one process, with ``use_distributed_sampler=False``, or
    without a datamodule.

    >>> UnpaddedDistributedEval().hooks
    ('val_dataloader', 'test_dataloader')
    """

    hooks = ("val_dataloader", "test_dataloader")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        # Private, as the Trainer keeps its use_distributed_sampler argument only there (no public property).
        use_distributed_sampler = trainer._accelerator_connector.use_distributed_sampler
        if datamodule is None or trainer.world_size < 2 or not use_distributed_sampler:
            return
        for name in self.hooks:
            hook = getattr(datamodule, name, None)
            if callable(hook) and not getattr(hook, "_unetseg_unpadded", False):
                setattr(datamodule, name, _unpadded_hook(hook, trainer))
