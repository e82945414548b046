"""``SegmentationDataModule``: built-in synthetic data by default, a dataset folder when ``root`` is given."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from unetseg.data.formats import DatasetSpec, detect_layout, validate
from unetseg.data.formats.layout import Case
from unetseg.data.normalize import build_normalization, check_normalization
from unetseg.data.splits import Splits, make_splits
from unetseg.data.synthetic import CLASS_NAMES, SPLITS, SyntheticSegmentation, spatial_shape
from unetseg.data.transforms import AugSpec, Transform, build_transform
from unetseg.data.volume import (
    CACHE_MODES,
    CaseLoader,
    PatchDataset,
    SliceDataset2D,
    VolumeDataset,
    WorkerRandom,
    extract_window,
    make_sample,
    window_starts,
)

logger = logging.getLogger(__name__)

DEFAULT_SPATIAL_SIZE: dict[int, int] = {2: 96, 3: 48}
STAGE_SPLITS: dict[str | None, tuple[str, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
    None: tuple(SPLITS),
}
NormSpec = str | dict[str, Any] | list[str | dict[str, Any]] | None


class SyntheticSplit(WorkerRandom, Dataset):
    """A ``SyntheticSegmentation`` split with the keys of the real datasets, cropped/augmented when training.

    Items are ``{"image", "label", "case_id": "<split>_<index>", "spacing": ones (spatial_dims,)}``; with
    ``patch_size`` each image is padded/cropped to a random window of that size, then ``transform`` runs.
    """

    def __init__(
        self,
        data: SyntheticSegmentation,
        patch_size: Sequence[int] | None = None,
        transform: Transform | None = None,
    ) -> None:
        self.data = data
        self.patch_size = None if patch_size is None else tuple(patch_size)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.data[index]
        image, label = item["image"].numpy(), item["label"].numpy()
        if self.patch_size is not None or self.transform is not None:
            rng = self.rng()
            if self.patch_size is not None:
                starts = window_starts(label.shape, self.patch_size, "random", rng)
                image = extract_window(image, starts, self.patch_size)
                label = extract_window(label, starts, self.patch_size)
            if self.transform is not None:
                image, label = self.transform(image, label, rng)
        case_id = f"{self.data.split}_{index % len(self.data):05d}"
        return make_sample(image, label, case_id, (1.0,) * self.data.spatial_dims)


def _size(value: int | Sequence[int] | None, spatial_dims: int, name: str) -> tuple[int, ...] | None:
    """``None``, or a checked ``spatial_dims``-tuple of positive ints from an int or a sequence."""
    if value is None:
        return None
    size = (value,) * spatial_dims if isinstance(value, int) else tuple(value)
    if len(size) != spatial_dims or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size
    ):
        raise ValueError(f"{name}={value!r}: expected a positive int or {spatial_dims} positive ints")
    return size


class SegmentationDataModule(L.LightningDataModule):
    """Loaders of ``{"image": (B, C, *spatial) float32, "label": (B, *spatial) int64, ...}`` batches.

    With ``root=None`` the data is ``SyntheticSegmentation`` (classes ``CLASS_NAMES``, one input channel):
    ``num_train``/``num_val``/``num_test`` samples of ``spatial_size`` drawn from disjoint seeded streams.
    With ``root`` a dataset folder is read (MSD, nnU-Net v2 raw or 2D ``images/`` + ``masks/``, detected from
    the folder, see ``unetseg.data.formats``); ``spatial_size`` and ``num_train``/``num_val``/``num_test`` are
    then ignored. ``num_classes``, ``in_channels``, ``class_names`` and ``spatial_dims`` are available right
    after construction (the CLI links them into the model): with ``root`` the first access reads
    ``dataset.json`` and the file headers (``spec``, cached; a bad folder raises there, naming the file);
    the voxel data are checked (``check_data``) and the datasets built in ``setup``.

    Batch keys: ``image`` (B, C, *spatial) float32; ``label`` (B, *spatial) int64 (absent in the predict
    batches of unlabelled test cases); ``case_id`` list of B str; ``spacing`` (B, spatial_dims) float32, the
    voxel size along the batch's spatial axes (mm for NIfTI, 1.0 for rasters and synthetic data); 2D batches
    of a real dataset also ``slice_index`` (B,) int64 (index along ``slice_axis``; 0 for 2D images) and
    ``slice_spacing`` (B,) float32 (the spacing along ``slice_axis``; 1.0 for 2D images).

    Sizes: ``patch_size`` is the size of a training sample for any data (a random window, padded with image 0
    and background where the image is smaller; ``None`` = whole images: the largest training image/slice/
    volume, smaller ones padded). Validation and test samples are whole slices (2D, padded to the largest)
    or whole volumes (3D, batch size 1) unless ``val_crop_size`` asks for a central crop/pad.
    Sliding-window inference on whole volumes is ``unetseg.inference.inferer`` (issue 6), not this module.

    Example:
        >>> dm = SegmentationDataModule(spatial_dims=2, spatial_size=64, batch_size=4)
        >>> dm.num_classes, dm.in_channels
        (4, 1)
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> batch["image"].shape, batch["label"].shape, batch["spacing"].shape
        (torch.Size([4, 1, 64, 64]), torch.Size([4, 64, 64]), torch.Size([4, 2]))

    Args:
        root: dataset folder; ``None`` uses the built-in synthetic data.
        spatial_dims: 2 or 3. With a volume dataset, 2 trains on slices along ``slice_axis`` and 3 on patches;
            a 2D dataset (PNG/TIFF/...) needs 2.
        spatial_size: synthetic image size, an int for every axis or one per axis; ``None`` gives 96 (2D) or
            48 (3D). Ignored with ``root``.
        num_train, num_val, num_test: number of synthetic samples per split. Ignored with ``root``.
        batch_size, num_workers, pin_memory, persistent_workers: ``DataLoader`` options;
            ``persistent_workers`` only applies when ``num_workers > 0``. 3D validation/test on whole volumes
            (``val_crop_size=None``) always uses batch size 1.
        seed: seeds the synthetic data, the training shuffle order and (with ``foreground_fraction``) the
            choice of background slices; patch positions and augmentation follow torch's seed per worker.
        patch_size: training sample size (int or one per axis), see above; ``None`` = whole images.
        slice_axis: axis (0, 1 or 2, storage order of the NIfTI) along which 2D mode slices volumes.
        foreground_only: 2D training uses only slices/images whose label has foreground.
        foreground_fraction: 2D training keeps all foreground slices plus enough random background slices
            for foreground to be this fraction (0 < f <= 1); exclusive with ``foreground_only``.
        oversample_foreground: 3D, share of patches centred on a random foreground voxel (nnU-Net: 1/3).
        samples_per_case: 3D, random patches per training case and epoch.
        val_crop_size: validation/test size (int or one per axis): a central crop/pad; ``None`` = whole
            slices (2D, padded to the largest) or whole volumes (3D, batch size 1).
        resize: 2D ``root`` data only, resize every image/slice to this (H, W) first (linear image, nearest
            label); for 2D folders with images of different sizes.
        fold: validation fold of the k-fold split of the training cases (0..num_folds-1); ``None`` uses the
            dataset's own ``val/`` folder if it has one, else fold 0.
        num_folds: number of folds (>= 2).
        split_file: JSON ``{"train": [ids], "val": [ids], "test": [ids]}`` (or nnU-Net ``splits_final.json``);
            overrides ``fold``/``num_folds``.
        test_ids: training case ids held out as test cases (with the dataset's labelled ``imagesTs``).
        split_seed: seed of the k-fold permutation (kept apart from ``seed`` so that folds stay fixed).
        normalization: intensity normalization, a name (``zscore``, ``ct``, ``percentile``, ``minmax``,
            ``rgb``, ``none``), a dict (``{name: ct, window: [-100, 300]}``) or one per channel; ``None``
            takes the dataset's default (CT -> ``ct``, 8-bit images -> ``rgb``, else ``zscore``).
        augmentation: training augmentation as a list of ``{Name: {arg: value}}``: albumentations transforms
            in 2D, ``RandomFlip``/``RandomRot90``/``RandomIntensity`` in 3D (``unetseg.data.transforms``);
            ``None`` = none. Validation and test are never augmented.
        target_spacing: resample every case to this voxel spacing (one value per axis of the files, or one
            for all) before slicing/cropping; ``None`` (default) keeps the native spacing.
        cache: ``none`` (lazy: read each case when used, memory flat), ``memory`` (all cases preloaded in
            ``setup``) or ``disk`` (preprocessed ``.npy`` in ``cache_dir``, memory-mapped).
        cache_dir: folder for ``cache="disk"``.
        check_data: in ``setup``, read every case once and check its voxel data (integer labels within the
            declared classes, readable, finite) before training; file presence, shapes and affines are
            always checked (headers, when ``spec`` is first read).
        skip_bad_cases: drop bad cases (each listed in the log as a warning) instead of raising.
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
        patch_size: int | tuple[int, ...] | None = None,
        slice_axis: int = 2,
        foreground_only: bool = False,
        foreground_fraction: float | None = None,
        oversample_foreground: float = 1 / 3,
        samples_per_case: int = 1,
        val_crop_size: int | tuple[int, ...] | None = None,
        resize: int | tuple[int, int] | None = None,
        fold: int | None = None,
        num_folds: int = 5,
        split_file: str | None = None,
        test_ids: list[str] | None = None,
        split_seed: int = 0,
        normalization: NormSpec = None,
        augmentation: list[str | dict[str, Any]] | None = None,
        target_spacing: float | tuple[float, ...] | None = None,
        cache: str = "none",
        cache_dir: str | None = None,
        check_data: bool = True,
        skip_bad_cases: bool = False,
    ) -> None:
        super().__init__()
        default_size = DEFAULT_SPATIAL_SIZE.get(spatial_dims, 0)  # an unknown spatial_dims is reported below
        size = spatial_shape(default_size if spatial_size is None else spatial_size, spatial_dims)
        for name, value, low in (
            ("num_train", num_train, 1),
            ("num_val", num_val, 1),
            ("num_test", num_test, 1),
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("seed", seed, 0),
            ("slice_axis", slice_axis, 0),
            ("samples_per_case", samples_per_case, 1),
            ("num_folds", num_folds, 2),
            ("split_seed", split_seed, 0),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r}: expected an int >= {low}")
        if slice_axis > 2:
            raise ValueError(f"slice_axis={slice_axis!r}: expected 0, 1 or 2")
        if fold is not None and not (isinstance(fold, int) and 0 <= fold < num_folds):
            raise ValueError(f"fold={fold!r}: expected None or an int in 0..{num_folds - 1} (num_folds)")
        if foreground_only and foreground_fraction is not None:
            raise ValueError("foreground_only=True and foreground_fraction are exclusive; set one of them")
        if foreground_fraction is not None and not 0 < foreground_fraction <= 1:
            raise ValueError(f"foreground_fraction={foreground_fraction!r}: expected a float in (0, 1]")
        if not 0 <= oversample_foreground <= 1:
            raise ValueError(f"oversample_foreground={oversample_foreground!r}: expected a float in [0, 1]")
        if resize is not None and spatial_dims != 2:
            raise ValueError(f"resize={resize!r}: only for spatial_dims=2 (2D images or slices)")
        if cache not in CACHE_MODES:
            raise ValueError(f"cache={cache!r}: expected one of {list(CACHE_MODES)}")
        if cache == "disk" and cache_dir is None:
            raise ValueError("cache='disk' needs cache_dir (a writable folder for the preprocessed arrays)")
        spacing = (target_spacing,) if isinstance(target_spacing, int | float) else target_spacing
        if spacing is not None and not all(isinstance(s, int | float) and s > 0 for s in spacing):
            raise ValueError(f"target_spacing={target_spacing!r}: expected positive numbers (mm)")
        if augmentation is not None and not isinstance(augmentation, list | tuple):
            raise ValueError(
                f"augmentation={augmentation!r}: expected a list of {{Name: {{arg: value}}}} entries"
            )
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
        self.patch_size = _size(patch_size, spatial_dims, "patch_size")
        self.val_crop_size = _size(val_crop_size, spatial_dims, "val_crop_size")
        self.resize = _size(resize, 2, "resize")
        self.slice_axis = slice_axis
        self.foreground_only = foreground_only
        self.foreground_fraction = foreground_fraction
        self.oversample_foreground = oversample_foreground
        self.samples_per_case = samples_per_case
        self.fold, self.num_folds, self.split_seed = fold, num_folds, split_seed
        self.split_file = split_file
        self.test_ids = list(test_ids or [])
        self.normalization = normalization
        self.augmentation: AugSpec = augmentation
        self.transform: Transform | None = build_transform(augmentation, spatial_dims)  # bad names raise now
        self.target_spacing = None if spacing is None else tuple(float(s) for s in spacing)
        self.cache, self.cache_dir = cache, cache_dir
        self.check_data, self.skip_bad_cases = check_data, skip_bad_cases
        self.datasets: dict[str, Dataset] = {}
        self.splits: Splits | None = None
        self.loader: CaseLoader | None = None
        self._spec: DatasetSpec | None = None
        self._data_checked = False

    # ------------------------------------------------------------------------------ dataset description

    @property
    def spec(self) -> DatasetSpec:
        """The dataset under ``root`` (layout, classes, channels, cases), read on first access and cached.

        The first access detects the layout, checks every case's files and headers (``validate`` without
        voxel data), the fit of the dataset to ``spatial_dims`` / ``target_spacing`` / ``normalization`` and
        the split arguments; each problem raises naming the file or argument.
        """
        if self.root is None:
            raise RuntimeError("spec: data.root is None (built-in synthetic data, no dataset folder)")
        if self._spec is None:
            root = Path(self.root).expanduser()
            if not root.exists():
                raise ValueError(f"data.root={self.root!r}: dataset root does not exist: {root}")
            spec = validate(detect_layout(root), check_data=False, skip_bad_cases=self.skip_bad_cases)
            self._check_fits(spec)
            make_splits(spec, self.fold, self.num_folds, self.split_seed, self.split_file, self.test_ids)
            self._spec = spec
            logger.info(
                "dataset %s (%s layout, %dD): %d training, %d validation, %d test cases; classes %s; "
                "%d input channel(s) %s",
                spec.root,
                spec.layout,
                spec.spatial_dims,
                len(spec.cases_train),
                len(spec.cases_val),
                len(spec.cases_test),
                spec.class_names,
                spec.in_channels,
                spec.channel_names,
            )
        return self._spec

    def _check_fits(self, spec: DatasetSpec) -> None:
        """Raise if the arguments do not fit the dataset (dimensions, spacing, normalization)."""
        if spec.spatial_dims == 2 and self.spatial_dims == 3:
            raise ValueError(
                f"data.spatial_dims=3 but dataset {spec.root} holds 2D images ({spec.layout}, "
                f"{spec.file_ending}); use spatial_dims=2"
            )
        if self.target_spacing is not None:
            if len(self.target_spacing) == 1:
                self.target_spacing = self.target_spacing * spec.spatial_dims
            if len(self.target_spacing) != spec.spatial_dims:
                raise ValueError(
                    f"target_spacing={list(self.target_spacing)}: expected {spec.spatial_dims} values "
                    f"(one per axis of the dataset's {spec.spatial_dims}D files)"
                )
        if self.normalization is not None:
            check_normalization(self.normalization, spec.in_channels, spec.channel_names)

    @property
    def class_names(self) -> list[str]:
        """Class names, index 0 the background (from ``dataset.json`` or the masks with ``root``)."""
        if self.root is not None:
            return list(self.spec.class_names)
        return list(CLASS_NAMES)

    @property
    def num_classes(self) -> int:
        """Number of classes including the background."""
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        """Number of input channels (modalities, or 3 for RGB images)."""
        if self.root is not None:
            return self.spec.in_channels
        return 1

    # ------------------------------------------------------------------------------------------- setup

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets of ``stage``; with ``root``, first check the data and split the cases."""
        if stage not in STAGE_SPLITS:
            raise ValueError(f"stage={stage!r}: expected one of {list(STAGE_SPLITS)}")
        missing = [split for split in STAGE_SPLITS[stage] if split not in self.datasets]
        if self.root is not None and stage in ("predict", None) and "predict" not in self.datasets:
            missing.append("predict")
        self.datasets.update(self._build_datasets(missing))

    def _build_datasets(self, splits: Sequence[str]) -> dict[str, Dataset]:
        """Datasets of ``splits`` (``train``, ``val``, ``test``; ``predict`` with ``root``)."""
        if self.root is None:
            return {
                split: SyntheticSplit(
                    SyntheticSegmentation(
                        self.num_samples[split], self.spatial_size, self.spatial_dims, self.seed, split
                    ),
                    patch_size=self.patch_size if split == "train" else None,
                    transform=self.transform if split == "train" else None,
                )
                for split in splits
            }
        if not splits:
            return {}
        self._prepare()
        return {split: self._real_dataset(split) for split in splits}

    def _prepare(self) -> None:
        """Check the voxel data (once), split the cases, build the normalization and the case loader."""
        if self.loader is not None:
            return
        spec = self.spec
        if self.check_data and not self._data_checked:
            spec = validate(spec, check_data=True, skip_bad_cases=self.skip_bad_cases)
            self._spec, self._data_checked = spec, True
        self.splits = make_splits(
            spec, self.fold, self.num_folds, self.split_seed, self.split_file, self.test_ids
        )
        normalizer = build_normalization(self.normalization, spec, cases=self.splits.train)
        self.loader = CaseLoader(spec, normalizer, self.target_spacing, self.cache, self.cache_dir)
        if self.cache == "memory":  # before the DataLoader forks its workers, so that they share the arrays
            self.loader.preload([*self.splits.train, *self.splits.val, *self.splits.test])
        unlabelled = [c.case_id for c in self.splits.test if c.label is None]
        logger.info(
            "split (fold %s of %d, split_file %s): %d train, %d val, %d test cases (%d without labels: "
            "predict only); normalization %s",
            self.fold,
            self.num_folds,
            self.split_file,
            len(self.splits.train),
            len(self.splits.val),
            len(self.splits.test),
            len(unlabelled),
            normalizer,
        )

    def _largest(self, cases: Sequence[Case]) -> tuple[int, ...] | None:
        """Per-axis maximum sample shape over ``cases`` (in-plane for 2D slicing), from the file headers."""
        assert self.loader is not None
        if self.spatial_dims == 2 and self.resize is not None:
            return self.resize
        shapes = [self.loader.spatial_shape(case) for case in cases]
        if not shapes:
            return None
        if self.spatial_dims == 2 and len(shapes[0]) == 3:
            shapes = [tuple(n for a, n in enumerate(shape) if a != self.slice_axis) for shape in shapes]
        return tuple(int(max(axis)) for axis in zip(*shapes, strict=True))

    def _real_dataset(self, split: str) -> Dataset:
        """The dataset of one split of ``root``: training samples or whole/cropped evaluation samples."""
        assert self.splits is not None and self.loader is not None
        if split == "predict":
            cases = list(self.splits.test)
        elif split == "test":
            cases = [c for c in self.splits.test if c.label is not None]
            if not cases:
                logger.warning(
                    "no labelled test cases in %s: the test stage has nothing to evaluate (hold cases out "
                    "with data.test_ids or a split file, or add labelsTs/)",
                    self.spec.root,
                )
        else:
            cases = list(getattr(self.splits, split))
        if split == "train":
            size = self.patch_size or self._largest(cases)
            if self.spatial_dims == 3:
                return PatchDataset(
                    cases,
                    self.loader,
                    size,
                    self.samples_per_case,
                    self.oversample_foreground,
                    transform=self.transform,
                )
            return SliceDataset2D(
                cases,
                self.loader,
                axis=self.slice_axis,
                patch_size=size,
                foreground_only=self.foreground_only,
                foreground_fraction=self.foreground_fraction,
                transform=self.transform,
                crop="random",
                resize=self.resize,
                seed=self.seed,
            )
        if self.spatial_dims == 3:
            return VolumeDataset(cases, self.loader, crop_size=self.val_crop_size)
        size = self.val_crop_size or self._largest(cases)
        return SliceDataset2D(
            cases, self.loader, axis=self.slice_axis, patch_size=size, crop="center", resize=self.resize
        )

    # --------------------------------------------------------------------------------------- loaders

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        """Loader over the ``split`` dataset; a shuffled one draws its order from a ``seed``-ed generator."""
        if split not in self.datasets:
            raise RuntimeError(f"the {split!r} dataset is not built: call setup() first")
        dataset = self.datasets[split]
        whole_volumes = isinstance(dataset, VolumeDataset) and dataset.crop_size is None
        return DataLoader(
            dataset,
            batch_size=1 if whole_volumes else self.batch_size,
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
        """Test cases for inference: with ``root`` also the unlabelled ones (batches without ``label``)."""
        return self._loader("predict" if "predict" in self.datasets else "test")


def case_ids(dataset: Dataset) -> list[str]:
    """Case ids of a real dataset's samples, in sample order (no voxel data read)."""
    if isinstance(dataset, SliceDataset2D):
        return [dataset.cases[int(i)].case_id for i in dataset.case_index]
    if isinstance(dataset, PatchDataset):
        return [dataset.cases[i % len(dataset.cases)].case_id for i in range(len(dataset))]
    if isinstance(dataset, VolumeDataset):
        return [c.case_id for c in dataset.cases]
    raise TypeError(f"case_ids: not a dataset of cases: {type(dataset).__name__}")
