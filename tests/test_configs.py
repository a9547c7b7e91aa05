"""Every option of every config group in ``conf/`` composes and builds what its ``_target_`` names (on tiny
settings, nothing trained); the callbacks and the logger are options a user adds or removes; the sweep
folder names leave out the same keys in every experiment."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from helpers import CONF_DIR, QUIET, compose_train
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

from pruneflow import ChannelPruning
from pruneflow.errors import ConfigError
from pruneflow.experiment import compose_config
from pruneflow.experiment.argv_checks import group_options
from pruneflow.experiment.device_defaults import resolve_fast_defaults
from pruneflow.experiment.run import train

GROUPS = sorted(path.name for path in CONF_DIR.iterdir() if path.is_dir())
OPTIONS = [(group, option) for group in GROUPS for option in group_options(CONF_DIR, group)]


def build(cfg: DictConfig, tmp_path: Path) -> None:
    """What ``run.train`` builds from ``cfg``, without data loading or training."""
    resolve_fast_defaults(cfg)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model, input_shape=list(datamodule.input_shape), num_classes=datamodule.num_classes)
    optimizer = instantiate(cfg.optimizer)(model.parameters())
    assert isinstance(optimizer, torch.optim.Optimizer)
    if cfg.get("scheduler"):
        assert isinstance(instantiate(cfg.scheduler)(optimizer, total_steps=10), torch.optim.lr_scheduler.LRScheduler)
    for name, callback_cfg in (cfg.get("callbacks") or {}).items():
        assert isinstance(instantiate(callback_cfg), Callback), name
    if cfg.get("logger"):
        assert isinstance(instantiate(cfg.logger, save_dir=str(tmp_path)), Logger)
    if cfg.mask.get("_target_"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # mask=none, the control's former name
            assert isinstance(instantiate(cfg.mask), ChannelPruning)
    instantiate(cfg.trainer, logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path))


def test_every_group_is_tested() -> None:
    assert {"callbacks", "data", "experiment", "logger", "mask", "model", "optimizer", "scheduler", "trainer"} <= set(
        GROUPS
    )


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{group}={option}" for group, option in OPTIONS])
def test_every_option_composes_and_builds(group: str, option: str, tmp_path: Path) -> None:
    if (group, option) == ("model", "timm"):
        pytest.importorskip("timm")  # an optional extra: model=timm says so in one line where it is missing
    build(compose_train(f"{group}={option}", "model.width=4" if option == "resnet" else "seed=0"), tmp_path)


def test_callbacks_and_logger_are_removed_from_the_command_line(tmp_path: Path) -> None:
    cfg = compose_train("~callbacks.throughput", "~logger", "callbacks=[default,accuracy_curve]")
    assert set(cfg.callbacks) == {"checkpoint_best", "checkpoint_last", "non_finite_loss", "progress", "accuracy_curve"}
    assert cfg.get("logger") is None


def test_a_run_without_throughput_meter_and_logger_still_checkpoints_and_reports(tmp_path: Path) -> None:
    tiny = ("data=synthetic", "data.num_train=300", "trainer.max_epochs=1", *QUIET)
    metrics = train(compose_train(*tiny, "~callbacks.throughput", "~logger"), tmp_path / "bare")
    assert "perf/train_samples_per_s" not in metrics and "test/acc" in metrics
    assert (tmp_path / "bare" / "checkpoints" / "last.ckpt").is_file()
    assert not list((tmp_path / "bare").glob("events.out.tfevents.*"))
    metrics = train(compose_train(*tiny, "callbacks.throughput.warmup_steps=0"), tmp_path / "full")
    assert json.loads((tmp_path / "full" / "metrics.json").read_text())["perf/train_samples_per_s"] > 0
    assert list((tmp_path / "full").glob("events.out.tfevents.*"))


def test_every_experiment_keeps_train_yamls_keys_out_of_run_folder_names() -> None:
    shared = list(compose_train(with_hydra=True).hydra.job.config.override_dirname.exclude_keys)
    assert "progress_bar_refresh_rate" in shared  # a display setting must not rename run folders
    # One list: a key added to train.yaml's run_name_excludes reaches every experiment, and an experiment only
    # extends it (a copy of the list would pass a subset check today and miss the next key added).
    extended = [*shared, "trainer.max_epochs"]
    for experiment in group_options(CONF_DIR, "experiment"):
        cfg = compose_train(f"experiment={experiment}", f"run_name_excludes=[{','.join(extended)}]", with_hydra=True)
        excluded = list(cfg.hydra.job.config.override_dirname.exclude_keys)
        assert excluded[: len(extended)] == extended, experiment
        assert set(excluded[len(extended) :]) <= {"experiment"}, experiment


def test_compose_config_is_what_train_py_composes(tmp_path: Path) -> None:
    cfg = compose_config(["mask=weight", "mask.amount=0.25"], with_hydra=True)
    assert cfg.mask.strategy == "weight" and cfg.mask.amount == 0.25 and "sweeper" in cfg.hydra
    with pytest.raises(ConfigError, match=f"no train.yaml in {tmp_path}; pass conf_dir="):
        compose_config(conf_dir=tmp_path)


def test_model_timm_without_timm_installed_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from pruneflow.errors import ConfigError
    from pruneflow.models import timm_classifier

    monkeypatch.setitem(sys.modules, "timm", None)  # as where the extra is not installed
    with pytest.raises(ConfigError, match=r"model=timm needs timm, which is not installed: pip install -e"):
        timm_classifier("resnet18")
