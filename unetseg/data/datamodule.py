"""``SegmentationDataModule``: built-in synthetic data by default, a dataset folder when ``root`` is given."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from unetseg.data.cases import CaseLoader, check_cache, check_target_spacing
from unetseg.data.datasets import (
    PatchDataset,
    SliceDataset2D,
    SyntheticSplit,
    TrainingSlices2D,
    VolumeDataset,
)
from unetseg.data.formats import DatasetSpec, detect_layout, validate
from unetseg.data.formats.layout import Case
from unetseg.data.normalize import build_normalization, check_normalization
from unetseg.data.sampling import check_fraction
from unetseg.data.splits import Splits, make_splits
from unetseg.data.synthetic import CLASS_NAMES, SPLITS, SyntheticSegmentation, spatial_shape
from unetseg.data.transforms import AugSpec, Transform, build_transform

logger = logging.getLogger(__name__)

DEFAULT_SPATIAL_SIZE: dict[int, int] = {2: 96, 3: 48}
STAGE_SPLITS: dict[str | None, tuple[str, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
    None: tuple(SPLITS),
}
# constructor arguments that are ints with a lower bound
INT_MINIMUM: dict[str, int] = {
    "num_train": 1,
    "num_val": 1,
    "num_test": 1,
    "batch_size": 1,
    "num_workers": 0,
    "seed": 0,
    "slice_axis": 0,
    "samples_per_case": 1,
    "num_folds": 2,
    "split_seed": 0,
}
NormSpec = str | dict[str, Any] | list[str | dict[str, Any]] | None


def check_arguments(args: Mapping[str, Any]) -> None:
    """Raise a ``ValueError`` naming the first ``SegmentationDataModule`` argument out of range."""
    for name, low in INT_MINIMUM.items():
        if not isinstance(args[name], int) or args[name] < low:
            raise ValueError(f"{name}={args[name]!r}: expected an int >= {low}")
    if args["slice_axis"] > 2:
        raise ValueError(f"slice_axis={args['slice_axis']!r}: expected 0, 1 or 2")
    fold, num_folds = args["fold"], args["num_folds"]
    if fold is not None and not (isinstance(fold, int) and 0 <= fold < num_folds):
        raise ValueError(f"fold={fold!r}: expected None or an int in 0..{num_folds - 1} (num_folds)")
    check_fraction(args["oversample"])
    epoch = args["batches_per_epoch"]
    if epoch is not None and not (isinstance(epoch, int) and epoch >= 1):
        raise ValueError(f"batches_per_epoch={epoch!r}: expected None or an int >= 1")
    if args["resize"] is not None and args["spatial_dims"] != 2:
        raise ValueError(f"resize={args['resize']!r}: only for spatial_dims=2 (2D images or slices)")
    check_cache(args["cache"], args["cache_dir"])
    check_target_spacing(args["target_spacing"])
    if args["augmentation"] is not None and not isinstance(args["augmentation"], list | tuple):
        raise ValueError(
            f"augmentation={args['augmentation']!r}: expected a list of {{Name: {{arg: value}}}} entries"
        )


def _size(value: int | Sequence[int] | None, spatial_dims: int, name: str) -> tuple[int, ...] | None:
    """``None``, or a checked ``spatial_dims``-tuple of positive ints from an int or a sequence."""
    return None if value is None else spatial_shape(value, spatial_dims, name)


def case_ids(dataset: Dataset) -> list[str]:
    """Case ids of a real dataset's samples, in sample order (no voxel data read)."""
    if not hasattr(dataset, "case_ids"):
        raise TypeError(f"case_ids: not a dataset of cases: {type(dataset).__name__}")
    return dataset.case_ids()


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

    Training on a real dataset draws its samples (``unetseg.data.sampling``): the last
    ``ceil(oversample * batch_size)`` samples of every batch show a foreground class drawn uniformly among
    the classes of the training cases, the others are random slices (2D, one epoch = one sample per slice)
    or patches (3D, ``samples_per_case`` per case). ``patch_size`` is the size of a training sample for any
    data (a random window, padded with image 0 and background where the image is smaller; ``None`` = whole
    images: the largest training image/slice/volume, smaller ones padded). Validation and test samples are
    whole slices (2D, padded to the largest) or whole volumes (3D, batch size 1) unless ``val_crop_size``
    asks for a central crop/pad. Sliding-window inference on whole volumes is ``unetseg.inference``.

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
        seed: seeds the synthetic data and its shuffle order, and the training draws of a real dataset
            (with torch's seed per worker: ``seed_everything``).
        patch_size: training sample size (int or one per axis), see above; ``None`` = whole images.
        slice_axis: axis (0, 1 or 2, storage order of the NIfTI) along which 2D mode slices volumes.
        oversample: share of every training batch forced onto a foreground class (the last
            ``ceil(oversample * batch_size)`` samples; 0.33 as nnU-Net, 0 = uniformly random samples).
            Real datasets only: every synthetic image shows every class.
        batches_per_epoch: training batches per epoch (the training samples are drawn, so an epoch can be
            any length, as nnU-Net's 250 iterations); ``None`` = one pass: one sample per training slice (2D),
            ``samples_per_case`` per case (3D) or ``num_train`` synthetic images.
        samples_per_case: 3D, training patches per case and epoch (when ``batches_per_epoch`` is ``None``).
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
            in 2D, MONAI dictionary transforms in 3D (``TRANSFORMS_3D`` in ``unetseg.data.transforms``);
            ``None`` = none. Validation and test are never augmented.
        target_spacing: resample every case to this voxel spacing (one value per axis of the files, or one
            for all) before slicing/cropping; ``None`` (default) keeps the native spacing.
        cache: ``none`` (lazy: read each case when used, memory flat), ``memory`` (all cases preloaded in
            ``setup``) or ``disk`` (preprocessed ``.npy`` in ``cache_dir``, memory-mapped).
        cache_dir: folder for ``cache="disk"``.
        check_data: in ``setup``, read every case once and check its voxel data (integer labels within the
            declared classes, readable, finite, not blank) before training; file presence, shapes and affines
            are always checked (headers, when ``spec`` is first read).
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
        oversample: float = 0.33,
        batches_per_epoch: int | None = None,
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
        default_size = DEFAULT_SPATIAL_SIZE.get(spatial_dims, 0)  # an unknown spatial_dims is reported here
        size = default_size if spatial_size is None else spatial_size
        self.spatial_size: tuple[int, ...] = spatial_shape(size, spatial_dims)
        self.save_hyperparameters()
        check_arguments(self.hparams)
        self.root, self.spatial_dims, self.seed = root, spatial_dims, seed
        self.num_samples = {"train": num_train, "val": num_val, "test": num_test}
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.patch_size = _size(patch_size, spatial_dims, "patch_size")
        self.val_crop_size = _size(val_crop_size, spatial_dims, "val_crop_size")
        self.resize = _size(resize, 2, "resize")
        self.slice_axis, self.oversample, self.samples_per_case = slice_axis, oversample, samples_per_case
        self.batches_per_epoch = batches_per_epoch
        self.fold, self.num_folds, self.split_seed = fold, num_folds, split_seed
        self.split_file, self.test_ids = split_file, list(test_ids or [])
        self.normalization = normalization
        self.augmentation: AugSpec = augmentation
        self.transform: Transform | None = build_transform(augmentation, spatial_dims)  # bad names raise now
        self.target_spacing = check_target_spacing(target_spacing)
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
            self._make_splits(spec)
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
        self.target_spacing = check_target_spacing(self.target_spacing, spec.spatial_dims)
        if self.normalization is not None:
            check_normalization(self.normalization, spec.in_channels, spec.channel_names)

    def _make_splits(self, spec: DatasetSpec) -> Splits:
        """The train/val/test cases of ``spec`` by the split arguments (``unetseg.data.splits``)."""
        return make_splits(spec, self.fold, self.num_folds, self.split_seed, self.split_file, self.test_ids)

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
            return {split: self._synthetic_dataset(split) for split in splits}
        if not splits:
            return {}
        self._prepare()
        return {split: self._real_dataset(split) for split in splits}

    def _synthetic_dataset(self, split: str) -> SyntheticSplit:
        """A split of the built-in data; training samples are cropped to ``patch_size`` and augmented."""
        size, dims = self.spatial_size, self.spatial_dims
        data = SyntheticSegmentation(self.num_samples[split], size, dims, self.seed, split)
        if split != "train":
            return SyntheticSplit(data)
        return SyntheticSplit(data, patch_size=self.patch_size, transform=self.transform)

    def _prepare(self) -> None:
        """Check the voxel data (once), split the cases, build the normalization and the case loader."""
        if self.loader is not None:
            return
        spec = self.spec
        if self.check_data and not self._data_checked:
            spec = validate(spec, check_data=True, skip_bad_cases=self.skip_bad_cases)
            self._spec, self._data_checked = spec, True
        self.splits = self._make_splits(spec)
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

    def _cases(self, split: str) -> list[Case]:
        """Cases of ``split``: ``predict`` is every test case, ``test`` only the labelled ones."""
        assert self.splits is not None
        if split == "predict":
            return list(self.splits.test)
        if split != "test":
            return list(getattr(self.splits, split))
        cases = [c for c in self.splits.test if c.label is not None]
        if not cases:
            logger.warning(
                "no labelled test cases in %s: the test stage has nothing to evaluate (hold cases out "
                "with data.test_ids or a split file, or add labelsTs/)",
                self.spec.root,
            )
        return cases

    def _real_dataset(self, split: str) -> Dataset:
        """The dataset of one split of ``root``: drawn training samples or ordered evaluation samples."""
        assert self.loader is not None
        cases = self._cases(split)
        if split == "train":
            size = self.patch_size or self._largest(cases)
            sampling = {"oversample": self.oversample, "batch_size": self.batch_size, "seed": self.seed,
                        "length": self._epoch_samples()}
            if self.spatial_dims == 3:
                return PatchDataset(
                    cases, self.loader, size, self.samples_per_case, transform=self.transform, **sampling
                )
            return TrainingSlices2D(
                cases, self.loader, **sampling, axis=self.slice_axis, patch_size=size, resize=self.resize,
                transform=self.transform,
            )
        if self.spatial_dims == 3:
            return VolumeDataset(cases, self.loader, crop_size=self.val_crop_size)
        size = self.val_crop_size or self._largest(cases)
        return SliceDataset2D(cases, self.loader, self.slice_axis, size, crop="center", resize=self.resize)

    # --------------------------------------------------------------------------------------- loaders

    def _loader(self, split: str) -> DataLoader:
        """Loader over the ``split`` dataset; only the synthetic training split is shuffled (seeded)."""
        if split not in self.datasets:
            raise RuntimeError(f"the {split!r} dataset is not built: call setup() first")
        dataset = self.datasets[split]
        whole_volumes = isinstance(dataset, VolumeDataset) and dataset.crop_size is None
        shuffled = split == "train" and isinstance(dataset, SyntheticSplit)
        generator = torch.Generator().manual_seed(self.seed) if split == "train" else None
        return DataLoader(
            dataset,
            batch_size=1 if whole_volumes else self.batch_size,
            sampler=RandomSampler(dataset, num_samples=self._epoch_samples(), generator=generator)
            if shuffled else None,
            generator=generator,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            drop_last=False,
        )

    def _epoch_samples(self) -> int | None:
        """Training samples per epoch: ``batches_per_epoch`` batches, or ``None`` for one pass."""
        return None if self.batches_per_epoch is None else self.batches_per_epoch * self.batch_size

    def train_dataloader(self) -> DataLoader:
        """Training batches; a real dataset draws them itself (not shuffled), counting positions per rank."""
        sampler = getattr(self.datasets.get("train"), "class_sampler", None)
        if sampler is not None:
            sampler.set_stride(self._ranks())
        return self._loader("train")

    def _ranks(self) -> int:
        """Processes that split the training items (Lightning's ``DistributedSampler``); 1 without trainer."""
        if self.trainer is None or not self.trainer._accelerator_connector.use_distributed_sampler:
            return 1
        return self.trainer.world_size

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        """Test cases for inference: with ``root`` also the unlabelled ones (batches without ``label``)."""
        return self._loader("predict" if "predict" in self.datasets else "test")
