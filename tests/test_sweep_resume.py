"""A stopped sweep goes on where it stopped (``resume=auto``): complete runs are skipped, a run stopped before
its compaction continues from its last checkpoint, a run stopped before its first checkpoint starts over."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import QUIET, compose_train, run_train
from omegaconf import OmegaConf

from pruneflow.errors import ConfigError
from pruneflow.experiment.run import checkpoint_to_resume, complete_metrics, validate_config

SWEEP = (
    "data=synthetic", "data.num_train=256", "trainer.max_epochs=1", "mask=activation", "mask.at_epoch=0",
    "optimizer=adam", "compact=true", "resume=auto", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
)  # fmt: skip
RUNS = ("seed=0", "seed=1", "seed=2")


def test_complete_metrics_are_those_marked_complete(tmp_path: Path) -> None:
    assert complete_metrics(tmp_path) is None  # no metrics.json: stopped while training or testing
    (tmp_path / "metrics.json").write_text(json.dumps({"test/acc": 0.5, "complete": False}))
    assert complete_metrics(tmp_path) is None  # written before compaction
    (tmp_path / "metrics.json").write_text("{")
    assert complete_metrics(tmp_path) is None
    (tmp_path / "metrics.json").write_text(json.dumps({"test/acc": 0.5, "complete": True}))
    assert complete_metrics(tmp_path) == {"test/acc": 0.5, "complete": True}


def test_auto_resume_continues_a_checkpoint_if_there_is_one_and_otherwise_starts(tmp_path: Path) -> None:
    cfg = OmegaConf.create({"resume": "auto", "ckpt_path": None})
    assert checkpoint_to_resume(cfg, tmp_path) is None  # unlike resume=true, no checkpoint is not an error
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"")
    assert checkpoint_to_resume(cfg, tmp_path) == last


def test_a_bad_resume_value_is_one_line_naming_it() -> None:
    cfg = compose_train("resume=sometimes")
    with pytest.raises(ConfigError, match=r"^resume must be one of False, True, auto, got 'sometimes'$"):
        validate_config(cfg)


def test_resume_stays_out_of_run_folder_names() -> None:
    cfg = compose_train("experiment=findings_resnet20", with_hydra=True)
    assert "resume" in cfg.hydra.job.config.override_dirname.exclude_keys


@pytest.mark.slow  # two sweeps of three tiny runs: about a minute on two cores
def test_a_stopped_sweep_rerun_skips_complete_runs_and_redoes_the_others(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    first = run_train("-m", *SWEEP, f"seed={','.join(run.split('=')[1] for run in RUNS)}", f"hydra.sweep.dir={sweep}",
                      *QUIET)  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    folders = {run: next(sweep.glob(f"*{run}*")) for run in RUNS}
    for folder in folders.values():
        assert complete_metrics(folder) is not None, folder
    done, in_compaction, in_training = (folders[run] for run in RUNS)
    finished = (done / "metrics.json").read_bytes(), (done / "metrics.json").stat().st_mtime_ns
    # Stopped while compacting: metrics.json written before compaction, last.ckpt at the end of training.
    metrics = json.loads((in_compaction / "metrics.json").read_text())
    partial = {key: value for key, value in metrics.items() if not key.startswith("compact/")}
    (in_compaction / "metrics.json").write_text(json.dumps({**partial, "complete": False}))
    shutil.rmtree(in_compaction / "compact")
    # Stopped in its first epoch: no checkpoint, no metrics, its event files left behind.
    (in_training / "metrics.json").unlink()
    shutil.rmtree(in_training / "checkpoints")

    second = run_train("-m", *SWEEP, f"seed={','.join(run.split('=')[1] for run in RUNS)}", f"hydra.sweep.dir={sweep}",
                       *QUIET)  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
    assert ((done / "metrics.json").read_bytes(), (done / "metrics.json").stat().st_mtime_ns) == finished
    assert "already holds complete metrics, skipped" in (done / "train.log").read_text()
    log = (in_compaction / "train.log").read_text()
    assert "resuming from" in log and "last.ckpt" in log
    for folder in (in_compaction, in_training):
        redone = complete_metrics(folder)
        assert redone is not None and "compact/acc_gap" in redone, folder
        assert (folder / "compact").is_dir()
    assert json.loads(finished[0])["test/acc"] == complete_metrics(done)["test/acc"]
