"""``batches_per_epoch``: an epoch of drawn training batches of any length, the same order for one pass."""

from __future__ import annotations

import pytest

from tests._datafiles import make_msd
from unetseg.data import SegmentationDataModule


def _ids(dm: SegmentationDataModule) -> list[list[str]]:
    dm.setup("fit")
    return [list(batch["case_id"]) for batch in dm.train_dataloader()]


def test_synthetic_epoch_of_one_pass_is_unchanged_and_shorter_epochs_are_its_prefix():
    common = {"batch_size": 8, "spatial_size": 32, "num_train": 64}
    one_pass = _ids(SegmentationDataModule(**common))
    assert _ids(SegmentationDataModule(**common, batches_per_epoch=8)) == one_pass
    assert _ids(SegmentationDataModule(**common, batches_per_epoch=3)) == one_pass[:3]
    longer = _ids(SegmentationDataModule(**common, batches_per_epoch=12))
    assert len(longer) == 12 and longer[:8] == one_pass  # a second pass follows the first
    assert sorted(sum(longer[8:], [])) != sum(longer[8:], [])  # still shuffled


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_real_dataset_epoch_has_the_asked_number_of_batches(tmp_path, spatial_dims):
    root = make_msd(tmp_path / "msd", n_cases=3)
    common = {"root": str(root), "spatial_dims": spatial_dims, "batch_size": 2, "num_folds": 3}
    if spatial_dims == 3:
        common["patch_size"] = 8
    natural = len(_ids(SegmentationDataModule(**common)))
    batches = _ids(SegmentationDataModule(**common, batches_per_epoch=natural + 5))
    assert len(batches) == natural + 5 and all(len(b) == 2 for b in batches)


def test_bad_epoch_length_is_refused():
    with pytest.raises(ValueError, match="batches_per_epoch=0: expected None or an int >= 1"):
        SegmentationDataModule(batches_per_epoch=0)
