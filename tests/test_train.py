"""The real entry point, run as a user runs it: ``python train.py ...`` on synthetic (fast) and real (slow) data."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import PROBE, PROBE_TAG, QUIET, run_train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def scalar_tags(run_dir: Path) -> set[str]:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return set(accumulator.Tags()["scalars"])


def test_run_writes_config_events_checkpoints_and_metrics(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_train("data=synthetic", "trainer.max_epochs=2", f"hydra.run.dir={run_dir}", *QUIET)
    assert result.returncode == 0, result.stderr[-3000:]
    config = (run_dir / "config.yaml").read_text()
    assert "${" not in config and "pruneflow.data.SyntheticDataModule" in config
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "checkpoints").glob("best-*.ckpt"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("test/acc", "test/loss", "val/acc", "epochs", "wall_seconds"):
        assert key in metrics, key
    assert metrics["epochs"] == 2
    assert metrics["test/acc"] > 0.5  # synthetic classes are separable: training must learn
    assert {"train/loss_epoch", "train/acc", "val/acc", "test/acc"} <= scalar_tags(run_dir)
    # The default job prunes (mask=activation, half of every channel space) and says so in its last line.
    assert metrics["mask/strategy"] == "activation" and metrics["mask/sparsity"] == 0.5
    assert metrics["drift/producer_l2/max"] == 0.0 and metrics["leak/activation_abs_mean/max"] == 0.0
    last_line = result.stdout.strip().splitlines()[-1]
    for said in (
        f"run {run_dir} finished in ",
        "; mask=activation pruned 84/168 channels (50%) in 3 channel spaces",
        "; pruned kernels' drift max 0 (producer L2), leak max 0 (activation |mean|); test accuracy ",
    ):
        assert said in last_line, last_line


def test_any_lightning_trainer_argument_works_as_written(tmp_path: Path) -> None:
    """``trainer.max_steps`` is in no YAML file: the trainer group's schema declares every Trainer argument."""
    run_dir = tmp_path / "run"
    result = run_train(
        "data=synthetic", "trainer.max_steps=5", "trainer.limit_val_batches=2", f"hydra.run.dir={run_dir}", *QUIET
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 5
    config = (run_dir / "config.yaml").read_text()
    assert "max_steps: 5" in config and "limit_val_batches: 2" in config


def test_lightnings_environment_defaults_apply_where_no_config_sets_the_argument(tmp_path: Path) -> None:
    """``PL_TRAINER_<ARG>`` is Lightning's default for an argument the Trainer is not given: the config must pass
    only what it sets. ``max_epochs`` is set by conf/trainer/default.yaml, so its variable does not apply."""
    run_dir = tmp_path / "run"
    lightning_defaults = {"PL_TRAINER_MAX_STEPS": "3", "PL_TRAINER_MAX_EPOCHS": "7"}
    result = run_train("data=synthetic", f"hydra.run.dir={run_dir}", *QUIET, env=lightning_defaults)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 3


def test_console_shows_no_lightning_noise_and_keeps_the_warnings_about_the_run(tmp_path: Path) -> None:
    result = run_train("data=synthetic", "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stdout + result.stderr
    for noise in ("litlogger", "💡", "LeafSpec", "Total Flops", "| FLOPs"):
        assert noise not in console, noise
    assert "Trainable params" in console  # the model summary itself stays
    assert "smaller than the logging interval" in console  # a warning about this run's settings stays


def test_masked_run_logs_drift_telemetry_to_tensorboard_and_metrics(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_train(
        "data=synthetic", "trainer.max_epochs=2", "mask=weight", "mask.at_epoch=1", "mask.log_every_n_steps=2",
        "model.activation=silu", f"hydra.run.dir={run_dir}", *QUIET,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    tags = scalar_tags(run_dir)
    for tag in ("drift/producer_l2", "drift/zero_fraction", "drift/consumer_l2", "grad/pruned_l2",
                "leak/activation_abs_mean", "bn/beta_abs", "drift/producer_l2/features.0"):  # fmt: skip
        assert tag in tags, tag
    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    assert accumulator.PluginTagToContent("custom_scalars")  # the overlay dashboard layout
    assert accumulator.PluginTagToContent("hparams")  # hyperparameters with final metrics
    metrics = json.loads((run_dir / "metrics.json").read_text())
    columns = ["test/acc", *(tag for tag in tags if tag.startswith("hparams/"))]  # the HParams row's metrics
    assert "hparams/drift/producer_l2/final" in columns and "hparams/leak/activation_abs_mean/max" in columns
    for tag in columns:
        (event,) = accumulator.Scalars(tag)
        assert event.value == pytest.approx(metrics[tag.removeprefix("hparams/")], rel=1e-6), tag
    assert metrics["mask/strategy"] == "weight" and metrics["mask/pruning_steps"] == [8]
    assert metrics["drift/producer_l2/final"] > 0  # SiLU after pre-training: the zeroed kernels move again


def test_deterministic_cpu_runs_are_bit_reproducible(tmp_path: Path) -> None:
    finals, weights = [], []
    for name in ("a", "b"):
        result = run_train(
            "data=synthetic", "trainer.max_epochs=1", "deterministic=true", "mask=gradient", "mask.log_every_n_steps=1",
            f"hydra.run.dir={tmp_path / name}", *QUIET,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        finals.append({k: v for k, v in metrics.items() if "seconds" not in k and not k.startswith("perf/")})
        checkpoint = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        weights.append(checkpoint["state_dict"])
    assert finals[0] == finals[1]
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


def test_activation_run_consumers_receive_zeros_from_pruned_channels(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_train(
        "data=synthetic", "trainer.max_epochs=2", "mask=activation", "mask.at_epoch=1", "mask.log_every_n_steps=2",
        "model.activation=silu",
        PROBE, f"hydra.run.dir={run_dir}", *QUIET,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["probe/forwards_after_pruning"] == metrics["global_step"] - metrics["mask/pruning_steps"][0]
    assert metrics[PROBE_TAG] == 0.0 and metrics["leak/activation_abs_mean/max"] == 0.0


def test_sweep_gives_each_run_a_folder_named_by_its_overrides(tmp_path: Path) -> None:
    result = run_train(
        "-m", "data=synthetic", "trainer.max_epochs=1", "mask=weight,activation", "seed=0",
        f"hydra.sweep.dir={tmp_path}", *QUIET,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(path.parent.name for path in tmp_path.glob("*/metrics.json"))
    assert runs == [
        "data=synthetic,mask=activation,seed=0,trainer.max_epochs=1",
        "data=synthetic,mask=weight,seed=0,trainer.max_epochs=1",
    ]
    # One process ran both jobs: the second imported nothing, and the first job's time is not its start-up.
    imports = [json.loads(path.read_text())["perf/startup/imports_seconds"] for path in tmp_path.glob("*/metrics.json")]
    assert sorted(imports)[0] == 0.0 and sorted(imports)[1] > 0.0


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (("data=imagenet",), "unknown data 'imagenet'; choose one of: cifar10, fashion_mnist, mnist, synthetic"),
        (("model=transformer",), "unknown model 'transformer'; choose one of: convnet, convnext, mobilenet_v2, "
                                 "mobilenet_v3, resnet, timm, torchvision, vgg, vit"),
        (("mask=magic",), "unknown mask 'magic'; choose one of:"),
        (("data=synthetic", "trainer.max_epochs=-3"), "trainer.max_epochs must be a positive integer, got -3"),
        (("data=synthetic", "model.activation=tanh"), "unknown activation 'tanh'; choose one of: gelu, leaky_relu"),
        (("data=synthetic", "mask=weight", "mask.amount=1.5"), "mask.amount must be a fraction in [0, 1), got 1.5"),
        (("data=synthetic", "mask=weight", "mask.criterion=magnitude"), "unknown mask.criterion 'magnitude'"),
        (("data=synthetic", "mask=weight", "mask.layers=[conv9]"), "pattern 'conv9' matches no conv or linear layer"),
        (
            ("data=synthetic", "mask=activation", "mask.target=flops:2", "mask.amount=0.3"),
            "set mask.target or mask.amount, not both",
        ),
        (("data=synthetic", "mask=activation", "mask.target=flop:2"), "names an unknown metric 'flop'"),
        (("data=synthetic", "mask=activation", "mask.target=flops:100"), "largest reachable target is flops:"),
        (("data=synthetic", "trainer.max_step=5"), "'max_step' in 'trainer.max_step=5'; did you mean"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path: Path, overrides: tuple[str, ...], expected: str) -> None:
    result = run_train(*overrides, f"hydra.run.dir={tmp_path / 'run'}", *QUIET)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("pruneflow: error: ") and expected in last_line, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_missing_data_names_folder_files_and_both_fixes(tmp_path: Path) -> None:
    result = run_train("data=mnist", f"data.root={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}", *QUIET)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("pruneflow: error: ")
    for fragment in (str(tmp_path), "train-images-idx3-ubyte", "data.download=true", "data.root="):
        assert fragment in last_line, last_line


@pytest.mark.slow
def test_mnist_default_job_prunes_half_its_channels_and_still_reaches_98_5_percent(
    tmp_path: Path, shared_data: Path
) -> None:
    # The default job masks half of every conv's channels from its first step (mask=activation) and measured
    # 99.0 % after two epochs; 98.5 % leaves room for another machine's rounding and thread count.
    run_dir = tmp_path / "run"
    result = run_train(f"data.root={shared_data}", "trainer.max_epochs=2", f"hydra.run.dir={run_dir}", *QUIET)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test/acc"] >= 0.985, metrics
    assert metrics["mask/sparsity"] == pytest.approx(0.5, abs=0.01) and metrics["leak/activation_abs_mean/final"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("model", ["vgg model.layers=[16,M,32,M,64,M]", "resnet"])
def test_cifar10_subset_trains_vgg_and_resnet(tmp_path: Path, shared_data: Path, model: str) -> None:
    run_dir = tmp_path / "run"
    result = run_train(
        "data=cifar10", f"data.root={shared_data / 'CIFAR10-subset'}", "data.verify=false", "data.limit_train=1000",
        *f"model={model}".split(), "mask=activation", "trainer.max_epochs=1", PROBE, f"hydra.run.dir={run_dir}", *QUIET,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test/acc"] > 0.1 and metrics["leak/activation_abs_mean/final"] == 0.0
    assert metrics["probe/forwards_after_pruning"] > 0 and metrics[PROBE_TAG] == 0.0


@pytest.fixture
def read_only_folder(tmp_path: Path):
    """A read-only file system (tmpfs mounted ro) where we may mount; else /proc, where nobody can create files."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    yield folder if mounted.returncode == 0 else Path("/proc")
    if mounted.returncode == 0:
        subprocess.run(["umount", str(folder)], check=False)


def test_read_only_output_folder_is_one_clear_line(read_only_folder: Path) -> None:
    run_dir = read_only_folder / "run"
    result = run_train("data=synthetic", f"hydra.run.dir={run_dir}", *QUIET)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"pruneflow: error: cannot write the output folder {run_dir} (")
    assert last_line.endswith("choose another with hydra.run.dir=") and "Traceback" not in result.stderr


def test_truncated_data_file_is_one_clear_line(tmp_path: Path, shared_data: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for source in (shared_data / "MNIST" / "raw").iterdir():
        (raw / source.name).write_bytes(source.read_bytes()[: 10_000 if "train-images" in source.name else None])
    result = run_train("data=mnist", f"data.root={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}", *QUIET)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"pruneflow: error: cannot read {raw / 'train-images-idx3-ubyte'}")
    assert "truncated or corrupt" in last_line and "Traceback" not in result.stderr


def test_mask_settings_sweep_alongside_strategies(tmp_path: Path) -> None:
    result = run_train(
        "-m", "data=synthetic", "data.num_train=300", "trainer.max_epochs=1", "mask=weight,activation",
        "mask.amount=0.25", f"hydra.sweep.dir={tmp_path}", *QUIET,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    pruned = [json.loads(path.read_text())["mask/pruned_channels"] for path in sorted(tmp_path.glob("*/metrics.json"))]
    # the default ConvNet's convs have 24, 48 and 96 channels: a quarter of each is cut, in both runs
    assert pruned == [{"features.0": 6, "features.4": 12, "features.8": 24}] * 2
