"""``SegmentationDataModule``: built-in synthetic data by default, a dataset folder when ``root`` is given."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from unetseg.data.synthetic import CLASS_NAMES, SPLITS, SyntheticSegmentation, spatial_shape

DEFAULT_SPATIAL_SIZE: dict[int, int] = {2: 96, 3: 48}
STAGE_SPLITS: dict[str | None, tuple[str, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
    None: tuple(SPLITS),
}


class SegmentationDataModule(L.LightningDataModule):
    """Loaders of ``{"image": (B, C, *spatial) float32, "label": (B, *spatial) int64}`` batches.

    With ``root=None`` the data is ``SyntheticSegmentation`` (classes ``CLASS_NAMES``, one input channel):
    ``num_train``/``num_val``/``num_test`` samples of ``spatial_size`` drawn from disjoint seeded streams.
    ``num_classes``, ``in_channels``, ``class_names`` and ``spatial_dims`` are available right after
    construction (the CLI links them into the model); datasets are built in ``setup``.

    Example:
        >>> dm = SegmentationDataModule(spatial_dims=2, spatial_size=64, batch_size=4)
        >>> dm.num_classes, dm.in_channels
        (4, 1)
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> batch["image"].shape, batch["label"].shape
        (torch.Size([4, 1, 64, 64]), torch.Size([4, 64, 64]))

    Args:
        root: dataset folder; ``None`` uses the built-in synthetic data.
        spatial_dims: 2 or 3.
        spatial_size: image size, an int for every axis or one per axis; ``None`` gives 96 (2D) or 48 (3D).
        num_train, num_val, num_test: number of synthetic samples per split.
        batch_size, num_workers, pin_memory, persistent_workers: ``DataLoader`` options;
            ``persistent_workers`` only applies when ``num_workers > 0``.
        seed: seeds the synthetic data and the training shuffle order.
    """

    def __init__(
        self,
        root: str | None = None,
        spatial_dims: int = 2,
        spatial_size: int | tuple[int, ...] | None = None,
        num_train: int = 256,
        num_val: int = 64,
        num_test: int = 64,
        batch_size: int = 16,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        default_size = DEFAULT_SPATIAL_SIZE.get(spatial_dims, 0)  # an unknown spatial_dims is reported below
        size = spatial_shape(default_size if spatial_size is None else spatial_size, spatial_dims)
        for name, value, low in (
            ("num_train", num_train, 1), ("num_val", num_val, 1), ("num_test", num_test, 1),
            ("batch_size", batch_size, 1), ("num_workers", num_workers, 0), ("seed", seed, 0),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r}: expected an int >= {low}")
        self.save_hyperparameters()
        self.root = root
        self.spatial_dims = spatial_dims
        self.spatial_size: tuple[int, ...] = size
        self.num_samples = {"train": num_train, "val": num_val, "test": num_test}
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.seed = seed
        self.datasets: dict[str, Dataset] = {}

    @property
    def class_names(self) -> list[str]:
        """Class names, index 0 the background."""
        if self.root is not None:
            self._unsupported_root()
        return list(CLASS_NAMES)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        if self.root is not None:
            self._unsupported_root()
        return 1

    def setup(self, stage: str | None = None) -> None:
        if stage not in STAGE_SPLITS:
            raise ValueError(f"stage={stage!r}: expected one of {list(STAGE_SPLITS)}")
        missing = [split for split in STAGE_SPLITS[stage] if split not in self.datasets]
        self.datasets.update(self._build_datasets(missing))

    def _build_datasets(self, splits: Sequence[str]) -> dict[str, Dataset]:
        """Datasets of ``splits`` (keys of ``SPLITS``): synthetic without ``root``, else read from it."""
        if self.root is not None:
            self._unsupported_root()
        return {
            split: SyntheticSegmentation(
                self.num_samples[split], self.spatial_size, self.spatial_dims, seed=self.seed, split=split
            )
            for split in splits
        }

    def _unsupported_root(self) -> NoReturn:
        """Placeholder for on-disk formats (``unetseg.data.formats``): checks the folder, then refuses."""
        if not Path(self.root).is_dir():
            raise ValueError(f"data.root={self.root!r}: no such directory")
        raise NotImplementedError(
            f"data.root={self.root!r}: reading datasets from disk is not wired in yet; "
            "use data.root=null for the built-in synthetic data"
        )

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        """Loader over the ``split`` dataset; a shuffled one draws its order from a ``seed``-ed generator."""
        if split not in self.datasets:
            raise RuntimeError(f"the {split!r} dataset is not built: call setup() first")
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
