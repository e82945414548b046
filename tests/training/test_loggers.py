"""``--logging.log_model``: the checkpoints of a run become W&B ``model`` artifacts, offline too (read back
from the offline run's ``.wandb`` log and the staged files); bad values exit 2 naming key and choices."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests import _wandb
from unetseg.training.cli import main
from unetseg.training.loggers import RunLogging, check_log_model


def model_artifacts(run_dir: Path) -> list[dict]:
    """Every ``model`` artifact version logged by the offline run: aliases, metadata and its one file."""
    (path,) = run_dir.glob("run-*.wandb")
    out = []
    for record in _wandb._records(path):
        if record.WhichOneof("record_type") == "artifact" and record.artifact.type == "model":
            art = record.artifact
            (entry,) = art.manifest.contents
            out.append(
                {
                    "name": art.name,
                    "aliases": list(art.aliases),
                    "metadata": json.loads(art.metadata),
                    "path": entry.path,
                    "staged": Path(entry.local_path),
                }
            )
    return out


@pytest.mark.parametrize(("log_model", "last_versions"), [("false", 0), ("true", 1), ("all", 2)])
def test_log_model_logs_the_checkpoints_as_artifacts_of_the_offline_run(
    log_model, last_versions, tmp_path, run_args, monkeypatch
):
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))  # W&B stages artifact files here
    args = ["--config", "debug", "--logging.wandb", "true", "--trainer.max_epochs", "2"]
    result = main([*args, "--logging.log_model", log_model, *run_args])
    run_dir = _wandb.offline_run(tmp_path / "runs")
    artifacts = model_artifacts(run_dir)
    last = [a for a in artifacts if a["metadata"]["original_filename"] == "last.ckpt"]
    assert len(last) == last_versions  # true: once at the end of the fit; all: after each of the 2 epochs
    if log_model == "false":
        assert artifacts == []
        return
    run_id = run_dir.name.rsplit("-", 1)[-1]
    assert {a["name"] for a in artifacts} == {f"model-{run_id}"} and {a["path"] for a in artifacts} == {
        "model.ckpt"
    }
    best_path = Path(result.best_model_path)
    (best,) = [a for a in artifacts if "best" in a["aliases"]]  # last.ckpt never takes the alias
    assert best["metadata"]["original_filename"] == best_path.name
    assert best["metadata"]["score"] == pytest.approx(
        result.trainer.checkpoint_callback.best_model_score.item()
    )
    # what W&B staged for upload (under WANDB_DATA_DIR) is the checkpoint itself, bytes for bytes
    assert all(a["staged"].is_relative_to(tmp_path / "wandb-data") for a in artifacts)
    assert best["staged"].read_bytes() == best_path.read_bytes()
    assert last[-1]["staged"].read_bytes() == (best_path.parent / "last.ckpt").read_bytes()
    state = torch.load(best["staged"], map_location="cpu", weights_only=False)
    assert state["state_dict"].keys() == result.model.state_dict().keys()


def test_log_model_bad_value_exits_2_naming_the_key_and_the_choices(run_args, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--config", "debug", "--logging.log_model", "every", *run_args])
    assert exit_.value.code == 2
    assert re.search(
        r"logging\.log_model='every' is not one of \[False, True, 'all'\]", capsys.readouterr().err
    )


def test_log_model_is_checked_by_the_constructor():
    assert RunLogging(log_model="all").log_model == "all" and check_log_model(False) is False
    with pytest.raises(ValueError, match=r"logging\.log_model='best'"):
        RunLogging(log_model="best")
