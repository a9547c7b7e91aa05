"""Sweeps as users run them: ``python train.py -m ...`` through the joblib launcher, the experiment that
encodes the headline comparison, the Slurm launcher's config, and the report over a sweep folder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import QUIET, REPO, compose_train, run_train, run_train_after
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata

from pruneflow.experiment import report
from pruneflow.experiment.cpu_share import parallel_jobs, threads_per_job

RUNS = [
    f"data=synthetic,mask={mask},optimizer=adam,seed={seed},trainer.max_epochs=1"
    for mask in ("activation", "weight")
    for seed in (0, 1)
]
DRIFT_TAGS = ("drift/producer_l2", "drift/zero_fraction", "drift/consumer_l2", "leak/activation_abs_mean")


@pytest.fixture(scope="module")
def joblib_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four tiny runs, two at a time: two strategies × two seeds."""
    sweep = tmp_path_factory.mktemp("sweep")
    result = run_train(
        "-m", "data=synthetic", "trainer.max_epochs=1", "mask=weight,activation", "optimizer=adam", "seed=0,1",
        "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}", *QUIET,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep


@pytest.mark.slow
def test_joblib_sweep_gives_each_run_its_folder_and_a_share_of_the_cores(joblib_sweep: Path) -> None:
    from joblib import cpu_count

    assert sorted(path.parent.name for path in joblib_sweep.glob("*/metrics.json")) == RUNS
    threads = max(1, cpu_count() // 2)
    for run in RUNS:
        assert f"{threads} CPU threads for this job" in (joblib_sweep / run / "train.log").read_text(), run


@pytest.mark.slow
def test_sweep_runs_log_drift_tags_pictures_layout_and_hparams(joblib_sweep: Path) -> None:
    for run in RUNS:
        accumulator = EventAccumulator(str(joblib_sweep / run), size_guidance={"scalars": 0, "histograms": 0,
                                                                                "images": 0})  # fmt: skip
        accumulator.Reload()
        tags = accumulator.Tags()
        assert set(DRIFT_TAGS) <= set(tags["scalars"]), run
        assert "hparams/drift/producer_l2/final" in tags["scalars"]
        assert "pruned_kernels/features.0" in tags["histograms"]
        # Kernels at every telemetry step; the mask image once, since it was pruned once.
        assert len(accumulator.Histograms("pruned_kernels/features.0")) > 1
        assert len(accumulator.Images("channel_mask/features.0")) == 1
        assert accumulator.PluginTagToContent("custom_scalars")
        hparams = accumulator.PluginTagToContent("hparams")
        experiment = metadata.parse_experiment_plugin_data(hparams[metadata.EXPERIMENT_TAG])
        columns = {info.name for info in experiment.hparam_infos}
        assert {"strategy", "optimizer", "criterion", "amount", "pruning_step", "activation", "seed"} <= columns
        metrics = {info.name.tag: info.display_name for info in experiment.metric_infos}
        assert metrics["test/acc"] == "test accuracy" and "compact/acc_gap" in metrics
        start = metadata.parse_session_start_info_plugin_data(hparams[metadata.SESSION_START_INFO_TAG])
        values = {name: getattr(value, value.WhichOneof("kind")) for name, value in start.hparams.items()}
        assert f"mask={values['strategy']}," in run and f"seed={values['seed']:.0f}," in run
        assert values["optimizer"] == "adam" and values["pruning_step"] == "0" and values["activation"] == "relu"


@pytest.mark.slow
def test_report_writes_table_and_figures_and_lists_unfinished_runs(joblib_sweep: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    shutil.copytree(joblib_sweep, sweep, ignore=shutil.ignore_patterns("checkpoints"))
    # A run killed mid-way: config and events written, no metrics.json.
    killed = sweep / RUNS[0].replace("seed=0", "seed=2")
    shutil.copytree(sweep / RUNS[0], killed)
    (killed / "metrics.json").unlink()
    result = subprocess.run([sys.executable, "-m", "pruneflow.experiment.report", str(sweep)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    text = (sweep / "report.md").read_text()
    assert "4 finished runs, 1 unfinished or failed" in text
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert [row.split(" | ")[:2] for row in rows] == [
        ["| `data=synthetic,mask=activation,optimizer=adam,trainer.max_epochs=1`", "2"],
        ["| `data=synthetic,mask=weight,optimizer=adam,trainer.max_epochs=1`", "2"],
    ]
    assert " ± " in rows[0]  # mean ± std over the two seeds
    assert f"- `{killed.name}`" in text
    for figure in ("drift_producer_l2.png", "leak_activation_abs_mean.png"):
        assert f"]({figure})" in text
        assert (sweep / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_strategy_sweep_experiment_is_the_headline_grid() -> None:
    cfg = compose_train("experiment=strategy_sweep", with_hydra=True)
    assert dict(cfg.hydra.sweeper.params) == {
        "mask": "control,weight,activation,gradient,parametrize,hard",
        "optimizer": "sgd,adam",
        "seed": "0,1,2",
    }
    assert cfg.data._target_ == "pruneflow.data.FashionMNISTDataModule"
    assert cfg.mask.at_epoch == 1 and cfg.trainer.max_epochs > cfg.mask.at_epoch  # pruning after pre-training
    assert "experiment" in cfg.hydra.job.config.override_dirname.exclude_keys


def test_strategy_sweep_runs_as_a_sweep_and_command_line_choices_win(tmp_path: Path) -> None:
    result = run_train(
        "-m", "experiment=strategy_sweep", "data=synthetic", "data.num_train=400", "trainer.max_epochs=2",
        "mask=weight", "optimizer=sgd", "seed=0", f"hydra.sweep.dir={tmp_path}", *QUIET,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [path.parent.name for path in tmp_path.glob("*/metrics.json")]
    assert runs == ["data.num_train=400,data=synthetic,mask=weight,optimizer=sgd,seed=0,trainer.max_epochs=2"]
    metrics = json.loads((tmp_path / runs[0] / "metrics.json").read_text())
    assert metrics["mask/pruning_steps"] == [3]  # after one epoch of pre-training (360 images: 3 steps)
    assert metrics["mask/pruned_channels"] == {"features.0": 12}


# Runs train.py with submitit's submission replaced: the launcher builds its real Slurm executor from our
# config, and instead of calling sbatch we write the sbatch script it would submit, with the job count.
SBATCH_CAPTURE = """
import json, os
import submitit

def capture(self, fn, *iterables):
    script = self._executor._make_submission_file_text("python -u train.py", "0")
    with open(os.environ["SBATCH_CAPTURE"], "w") as out:
        json.dump({"script": script, "jobs": len(iterables[0]), "folder": str(self._executor.folder)}, out)
    raise SystemExit(0)

submitit.AutoExecutor.map_array = capture
"""


def test_submitit_slurm_launcher_submits_one_job_per_run_with_the_resources_asked_for(tmp_path: Path) -> None:
    captured = tmp_path / "sbatch.json"
    sweep = tmp_path / "sweep"
    result = run_train_after(
        SBATCH_CAPTURE, "-m", "data=synthetic", "mask=weight,activation",
         "hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=60",
         "hydra.launcher.cpus_per_task=8", "hydra.launcher.gpus_per_node=1", "hydra.launcher.mem_gb=16",
         f"hydra.sweep.dir={sweep}",
        folder=tmp_path, env={"SBATCH_CAPTURE": str(captured)}, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    submission = json.loads(captured.read_text())
    assert submission["jobs"] == 2  # one Slurm job per run of the sweep
    assert Path(submission["folder"]) == sweep / ".submitit" / "%j"  # submitit's logs inside the sweep folder
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=60", "#SBATCH --cpus-per-task=8",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --mem=16GB"):  # fmt: skip
        assert line in submission["script"].splitlines(), line


@pytest.mark.parametrize(
    ("n_jobs", "cores", "jobs", "threads"),
    [(2, 2, 2, 1), (4, 16, 4, 4), (-1, 16, 16, 1), (-2, 16, 15, 1), (3, 16, 3, 5), (8, 2, 8, 1), (None, 8, 1, 8)],
)
def test_joblib_jobs_split_the_cores(n_jobs: int | None, cores: int, jobs: int, threads: int) -> None:
    assert parallel_jobs(n_jobs, cores) == jobs
    assert threads_per_job(n_jobs, cores) == threads


def test_report_splits_run_names_at_top_level_commas_only() -> None:
    name = "mask=weight,mask.layers=[features.0,features.4],optimizer=adam,seed=1"
    assert report.override_parts(name) == [
        "mask=weight",
        "mask.layers=[features.0,features.4]",
        "optimizer=adam",
        "seed=1",
    ]
    assert report.configuration(name) == "mask=weight,mask.layers=[features.0,features.4],optimizer=adam"
    assert report.without(name, ["mask", "seed"]) == "mask.layers=[features.0,features.4],optimizer=adam"


def test_report_means_and_standard_deviations_are_those_of_the_runs(tmp_path: Path) -> None:
    # Hand-made runs with known figures: mean and sample std over seeds, computed here by hand.
    figures = {
        "mask=weight": {"test/acc": [0.90, 0.92, 0.97], "drift/producer_l2/final": [6.0, 2.0, 1.0]},
        "mask=activation": {"test/acc": [0.91, 0.93, 0.95], "drift/producer_l2/final": [0.0, 0.0, 0.0]},
    }
    for configuration, columns in figures.items():
        for seed in range(3):
            run = tmp_path / f"{configuration},seed={seed}"
            run.mkdir()
            (run / "config.yaml").write_text("seed: 0\n")
            (run / "metrics.json").write_text(json.dumps({tag: values[seed] for tag, values in columns.items()}))
    text = report.write_report(tmp_path, ["test/acc", "drift/producer_l2/final"], curve_tags=())
    rows = {line.split(" | ")[0]: line.split(" | ")[1:] for line in text.splitlines() if line.startswith("| `")}
    # weight: acc mean 0.93, std sqrt(((-.03)² + (-.01)² + .04²)/2) = sqrt(0.0013) = 0.036;
    #         drift mean 3, std sqrt((9 + 1 + 4)/2) = sqrt(7) = 2.6
    assert rows["| `mask=weight`"] == ["3", "0.93 ± 0.036", "3 ± 2.6 |"]
    # activation: acc mean 0.93, std sqrt((.02² + 0 + .02²)/2) = 0.02; drift exactly 0 on every seed
    assert rows["| `mask=activation`"] == ["3", "0.93 ± 0.02", "0 ± 0 |"]
