"""Train/val/test splits by case (patient), never by slice or patch; seeded and reproducible.

Priority in ``make_splits``:

1. ``split_file``: JSON ``{"train": [...], "val": [...], "test": [...]}`` of case ids (``test`` optional), or
   nnU-Net's ``splits_final.json`` (a list of one ``{"train", "val"}`` object per fold, indexed by ``fold``);
2. a predefined ``val/`` subset of the dataset (2D folders) when ``fold`` is ``None``;
3. k-fold over the training case ids: sorted, permuted with ``seed``, cut into ``num_folds`` near-equal folds;
   fold ``fold`` (default 0) is the validation set.

The test split is the dataset's own (``imagesTs``/``labelsTs``, ``test/``) plus any held-out ids (``test_ids``
or the split file's ``test``), which are removed from the train/val pool first.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from unetseg.data.formats.layout import Case, DatasetSpec, read_json

SPLIT_KEYS: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class Splits:
    """Cases of each split; no case id appears in two of them.

    >>> splits = make_splits(spec, fold=0, num_folds=5, seed=0)  # doctest: +SKIP
    >>> len(splits.train), len(splits.val), len(splits.test)  # doctest: +SKIP
    (208, 52, 130)
    """

    train: list[Case]
    val: list[Case]
    test: list[Case] = field(default_factory=list)

    def ids(self) -> dict[str, list[str]]:
        """Case ids per split, e.g. to save as a split file."""
        return {
            "train": [c.case_id for c in self.train],
            "val": [c.case_id for c in self.val],
            "test": [c.case_id for c in self.test],
        }


def kfold_split(
    case_ids: Sequence[str], num_folds: int, fold: int, seed: int = 0
) -> tuple[list[str], list[str]]:
    """``(train_ids, val_ids)`` (each sorted) of fold ``fold`` of ``num_folds``; the folds partition the ids.

    >>> train, val = kfold_split(["a", "b", "c", "d"], num_folds=2, fold=0, seed=0)
    >>> len(train), len(val), sorted(train + val)
    (2, 2, ['a', 'b', 'c', 'd'])
    """
    if num_folds < 2:
        raise ValueError(f"num_folds must be >= 2, got {num_folds}")
    if not 0 <= fold < num_folds:
        raise ValueError(f"fold must be in 0..{num_folds - 1} for num_folds={num_folds}, got {fold}")
    ids = sorted(set(case_ids))
    if len(ids) != len(case_ids):
        raise ValueError(
            f"duplicate case ids: {sorted({c for c in case_ids if list(case_ids).count(c) > 1})}"
        )
    if len(ids) < num_folds:
        raise ValueError(
            f"fewer cases ({len(ids)}) than folds ({num_folds}): cannot split {ids[:10]} into "
            f"{num_folds} folds; lower num_folds or use a split file"
        )
    order = np.random.default_rng(seed).permutation(len(ids))
    folds = np.array_split(order, num_folds)
    val = sorted(ids[i] for i in folds[fold])
    val_set = set(val)
    return [i for i in ids if i not in val_set], val


def read_split_file(
    path: str | Path, known_ids: Iterable[str], fold: int | None = None
) -> dict[str, list[str]]:
    """Case ids per split from a JSON split file; unknown, duplicated or overlapping ids raise naming them."""
    path = Path(path)
    data = read_json(path, f"split file not found: {path}")
    if isinstance(data, list):  # nnU-Net splits_final.json: one {"train", "val"} per fold
        index = 0 if fold is None else fold
        if not 0 <= index < len(data):
            raise ValueError(f"{path} holds {len(data)} folds; fold {index} does not exist")
        data = data[index]
    if not isinstance(data, dict) or "train" not in data or "val" not in data:
        raise ValueError(
            f"{path}: expected an object with keys 'train' and 'val' (and optionally 'test') "
            f"of case ids, got {type(data).__name__} with keys {list(data)[:10]}"
        )
    unknown_keys = sorted(set(data) - set(SPLIT_KEYS))
    if unknown_keys:
        raise ValueError(f"{path}: unknown key(s) {unknown_keys}; expected {list(SPLIT_KEYS)}")
    known = set(known_ids)
    splits: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for key in SPLIT_KEYS:
        ids = data.get(key, [])
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ValueError(f"{path}: '{key}' must be a list of case id strings")
        unknown = sorted(set(ids) - known)
        if unknown:
            raise ValueError(
                f"{path}: unknown case id(s) in '{key}': {unknown[:20]} "
                f"(the dataset has {len(known)} cases, e.g. {sorted(known)[:3]})"
            )
        for case_id in ids:
            if case_id in seen:
                raise ValueError(
                    f"{path}: case id '{case_id}' appears in both '{seen[case_id]}' and '{key}'"
                    if seen[case_id] != key
                    else f"{path}: case id '{case_id}' repeated in '{key}'"
                )
            seen[case_id] = key
        splits[key] = list(ids)
    return splits


def make_splits(
    spec: DatasetSpec,
    fold: int | None = 0,
    num_folds: int = 5,
    seed: int = 0,
    split_file: str | Path | None = None,
    test_ids: Sequence[str] = (),
) -> Splits:
    """Train/val/test cases of ``spec`` (see the module docstring for the order of precedence)."""
    pool = [*spec.cases_train, *spec.cases_val]
    by_id = {c.case_id: c for c in [*pool, *spec.cases_test]}
    if split_file is not None:
        ids = read_split_file(split_file, by_id, fold)
        test = [by_id[i] for i in ids["test"]]
        listed = set(ids["test"])
        test += [c for c in spec.cases_test if c.case_id not in listed]
        return Splits([by_id[i] for i in ids["train"]], [by_id[i] for i in ids["val"]], test)
    unknown = sorted(set(test_ids) - set(by_id))
    if unknown:
        raise ValueError(f"unknown held-out test case id(s) {unknown[:20]}; not in dataset {spec.root}")
    held = set(test_ids)
    test = [c for c in pool if c.case_id in held] + list(spec.cases_test)
    if fold is None and spec.cases_val:
        return Splits(
            [c for c in spec.cases_train if c.case_id not in held],
            [c for c in spec.cases_val if c.case_id not in held],
            test,
        )
    candidates = [c for c in pool if c.case_id not in held]
    train_ids, val_ids = kfold_split(
        [c.case_id for c in candidates], num_folds, 0 if fold is None else fold, seed
    )
    return Splits([by_id[i] for i in train_ids], [by_id[i] for i in val_ids], test)
