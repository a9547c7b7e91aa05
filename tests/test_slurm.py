"""Runs that stop and go on: a requeued Slurm job (preempted, or out of time) and ``resume=true`` continue
from the run's last checkpoint, with one continuous set of TensorBoard curves; sweeps, DDP and a failing
job on a running Slurm cluster.

The tests marked ``slurm`` submit real jobs through ``hydra/launcher=submitit_slurm`` and skip, saying
why, where ``sbatch`` is absent or no cluster answers (``scripts/slurm_local.sh up`` starts one on this
machine; ``.ci/run`` does so as root). ``PRUNEFLOW_SLURM_PARTITION`` picks the partition (default: the
cluster's default one).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import QUIET, REPO, run_train, with_tests_on_the_path
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

# Three epochs of 57 steps (batch 16), pruning at step 20 of epoch 0, telemetry every 5 steps: a stop
# during epoch 1 leaves logged steps past the epoch-0 checkpoint that the continued run logs again.
RUN = (
    "data=synthetic", "data.num_train=1000", "data.batch_size=16", "trainer.max_epochs=3", "deterministic=true",
    "mask=weight", "mask.at_step=20", "mask.log_every_n_steps=5", "trainer.log_every_n_steps=5", *QUIET,
)  # fmt: skip
STEPS_PER_EPOCH = 57  # 900 training images after the 10 % validation split, batch 16
# A run stopped during epoch 1 is paced there (50 ms a step, first start only): the 47 steps between the
# moment a test sees epoch 1 under way and the epoch's end then take over 2 s on any machine.
PACED = ("+callbacks.pace._target_=helpers.PaceFirstStart", "+callbacks.pace.seconds=0.05")
# Scalars whose values are measured times, not computed figures: compared by step only.
TIMED = ("perf/", "seconds")


def slurm_partition() -> str | None:
    """The partition the tests submit to, or None where no Slurm cluster answers."""
    if shutil.which("sbatch") is None:
        return None
    try:
        sinfo = subprocess.run(["sinfo", "-h", "-o", "%P %a"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    partitions = [line.split()[0] for line in sinfo.stdout.splitlines() if line.endswith(" up")]
    if sinfo.returncode != 0 or not partitions:
        return None
    default = next((name.rstrip("*") for name in partitions if name.endswith("*")), partitions[0])
    return os.environ.get("PRUNEFLOW_SLURM_PARTITION", default)


PARTITION = slurm_partition()
needs_slurm = pytest.mark.skipif(
    PARTITION is None,
    reason="no Slurm cluster: sbatch is absent or sinfo shows no partition up (start one on this machine "
    "with `sudo scripts/slurm_local.sh up`)",
)


def on_slurm(*overrides: str) -> tuple[str, ...]:
    return ("hydra/launcher=submitit_slurm", f"hydra.launcher.partition={PARTITION}", *overrides)


def history(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag's ``(step, value)`` list as TensorBoard shows it (purged steps dropped), and every
    histogram tag's steps (value 0)."""
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    accumulator.Reload()
    curves = {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}
    for tag in accumulator.Tags()["histograms"]:
        curves[f"histogram:{tag}"] = [(e.step, 0.0) for e in accumulator.Histograms(tag)]
    return curves


def assert_one_continuous_history(run_dir: Path, reference_dir: Path) -> None:
    """Each tag logged each step once, the same steps and values as the run that was never stopped."""
    run, reference = history(run_dir), history(reference_dir)
    assert run.keys() == reference.keys()
    for tag, points in run.items():
        if any(word in tag for word in TIMED):
            points, reference[tag] = [step for step, _ in points], [step for step, _ in reference[tag]]
        # (Lightning logs ``epoch`` beside each logging call, so a step may carry it twice in both runs.)
        assert points == reference[tag], f"{tag}: {points} != {reference[tag]}"


def assert_same_final_state(run_dir: Path, reference_dir: Path) -> None:
    """Bit-identical weights, masks and pruning history, and the same figures in metrics.json."""
    last, reference = (
        torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        for folder in (run_dir, reference_dir)
    )
    assert last["global_step"] == reference["global_step"] == 3 * STEPS_PER_EPOCH
    assert last["state_dict"].keys() == reference["state_dict"].keys()
    for key, value in last["state_dict"].items():
        assert torch.equal(value, reference["state_dict"][key]), key
    pruning = next(key for key in reference["callbacks"] if "ChannelPruning" in key)
    assert_equal_nested(last["callbacks"][pruning], reference["callbacks"][pruning], pruning)
    metrics, reference_metrics = (
        json.loads((folder / "metrics.json").read_text()) for folder in (run_dir, reference_dir)
    )
    assert metrics["mask/pruning_steps"] == reference_metrics["mask/pruning_steps"] == [20]
    figures = {key for key in reference_metrics if not key.startswith("perf/") and "seconds" not in key}
    assert {key: metrics[key] for key in figures} == {key: reference_metrics[key] for key in figures}


def assert_equal_nested(value: object, reference: object, where: str) -> None:
    if isinstance(reference, torch.Tensor):
        assert isinstance(value, torch.Tensor) and torch.equal(value, reference), where
    elif isinstance(reference, dict):
        assert isinstance(value, dict) and value.keys() == reference.keys(), where
        for key in reference:
            assert_equal_nested(value[key], reference[key], f"{where}.{key}")
    elif isinstance(reference, (list, tuple)):
        assert isinstance(value, (list, tuple)) and len(value) == len(reference), where
        for index, (item, reference_item) in enumerate(zip(value, reference, strict=True)):
            assert_equal_nested(item, reference_item, f"{where}[{index}]")
    else:
        assert value == reference, where


def logged_steps(run_dir: Path) -> int:
    """The largest step of any scalar the run has written to its event files so far (-1: none)."""
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    steps = [e.step for tag in accumulator.Tags()["scalars"] for e in accumulator.Scalars(tag)]
    return max(steps, default=-1)


def wait_until_past_first_checkpoint(run_dir: Path, running: Callable[[], bool], timeout: float = 400) -> None:
    """Return once the run has checkpointed epoch 0 and logged steps of epoch 1 after it."""
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert running(), "the run ended before it could be stopped during epoch 1"
        if last.exists() and logged_steps(run_dir) >= STEPS_PER_EPOCH + 10:
            return
        time.sleep(0.3)
    raise AssertionError(f"{run_dir} did not reach epoch 1 in {timeout} s")


def assert_stopped_during_epoch_1(run_dir: Path, killed: bool = True) -> None:
    """The stopped run's state: epoch 0 checkpointed, not finished; a run killed at once (SIGKILL) has
    logged steps past its checkpoint. Without this the continuous-history checks could pass on a run
    that was never really stopped mid-training. (Slurm stops a job with SIGTERM, KillWait seconds before
    SIGKILL; Lightning then ends the epoch it is in, so that run may also have checkpointed epoch 1.)"""
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] in ((STEPS_PER_EPOCH,) if killed else (STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH))
    if killed:
        assert logged_steps(run_dir) > STEPS_PER_EPOCH
    assert not (run_dir / "metrics.json").exists()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = run_train(*RUN, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_resume_true_continues_the_curves_without_logging_a_step_twice(tmp_path: Path, uninterrupted: Path) -> None:
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *RUN, *PACED, f"hydra.run.dir={run_dir}"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=with_tests_on_the_path(),
    )  # fmt: skip
    try:
        wait_until_past_first_checkpoint(run_dir, lambda: process.poll() is None)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert_stopped_during_epoch_1(run_dir)
    resumed = run_train(*RUN, f"hydra.run.dir={run_dir}", "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_one_continuous_history(run_dir, uninterrupted)
    assert_same_final_state(run_dir, uninterrupted)


def test_a_failed_run_is_listed_in_the_report_with_its_error_line(tmp_path: Path) -> None:
    # A sweep's job keeps its folder when it fails (a single run that fails before training leaves none).
    sweep = tmp_path / "sweep"
    result = run_train("-m", "data=synthetic", "mask=weight", "mask.amount=1.5", f"hydra.sweep.dir={sweep}", *QUIET)
    assert result.returncode != 0
    report = subprocess.run(
        [sys.executable, "-m", "pruneflow.experiment.report", str(sweep)], cwd=REPO, capture_output=True, text=True
    )
    assert report.returncode == 0, report.stderr
    line = "pruneflow: error: mask.amount must be a fraction in [0, 1), got 1.5"
    assert f"- `data=synthetic,mask.amount=1.5,mask=weight`: {line}\n" in report.stdout
    assert result.stderr.count(line) == 1 and line not in result.stdout  # shown once on the console


# --- on a running Slurm cluster ---------------------------------------------------------------------------


def start_sweep(sweep: Path, *overrides: str) -> subprocess.Popen[str]:
    """``python train.py -m <overrides>`` into ``sweep``, in the background (it waits for its Slurm jobs)."""
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), "-m", *overrides, f"hydra.sweep.dir={sweep}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=with_tests_on_the_path(),
    )  # fmt: skip


def the_run(sweep: Path, timeout: float = 120) -> Path:
    """The one run folder of a one-job sweep, once its job has started writing it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logs = list(sweep.glob("*/train.log"))
        if logs and "Slurm job" in logs[0].read_text():
            return logs[0].parent
        time.sleep(0.3)
    raise AssertionError(f"no job of {sweep} started in {timeout} s")


def job_ids(run_dir: Path) -> list[str]:
    """The Slurm job ids the run's train.log names, one per start of the job (and per task)."""
    return [
        line.split("Slurm job ", 1)[1].split()[0]
        for line in (run_dir / "train.log").read_text().splitlines()
        if "] - Slurm job " in line
    ]


# sacct states of a job run or step that has not ended yet (the rest are final: COMPLETED, FAILED, REQUEUED, ...).
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "RESIZING", "REQUEUE_HOLD", "STOPPED"}


def sacct_once_ended(job: str, timeout: float = 120) -> str:
    """sacct's table of a job and its steps once all of them have ended, printed (pytest shows it on a failure).

    A sweep returns as soon as submitit has read each job's result, which the job writes before its process
    exits; the job's end then reaches the accounting database seconds later on a loaded machine. So this waits
    until no run or step of the job is still active in sacct before anything reads its states.
    """
    deadline = time.monotonic() + timeout
    while True:
        states = subprocess.run(["sacct", "-D", "-n", "-P", "-j", job, "-o", "State"], capture_output=True, text=True)
        active = [state for state in states.stdout.split("\n") if state.split(" ")[0] in ACTIVE_STATES]
        if states.stdout.strip() and not active:
            break
        if time.monotonic() > deadline:
            break  # the table printed below shows what is still active; the assertions that follow fail on it
        time.sleep(1)
    fields = "JobID%14,JobName%8,State,ExitCode,NTasks,Start,End,Elapsed"
    text = subprocess.run(["sacct", "-D", "-j", job, "-o", fields], capture_output=True, text=True).stdout
    print(text)
    return text


def sacct_rows(job: str, fields: str) -> list[list[str]]:
    """sacct's ``fields`` of the job (first row) and its steps, one list per row."""
    text = subprocess.run(["sacct", "-n", "-P", "-j", job, "-o", fields], capture_output=True, text=True).stdout
    return [line.split("|") for line in text.splitlines() if line]


def job_states(job: str) -> list[str]:
    """The state of each of the job's runs (one per start), oldest first."""
    text = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-j", job, "-o", "State"], capture_output=True, text=True)
    return text.stdout.split()


def queue_state(job: str) -> tuple[str, int]:
    """(squeue's state, seconds the current run has been running) of a queued job."""
    state, elapsed = subprocess.run(
        ["squeue", "-h", "-j", job, "-o", "%T %M"], capture_output=True, text=True, check=True
    ).stdout.split()
    seconds = 0
    for part in elapsed.replace("-", ":").split(":"):
        seconds = seconds * 60 + int(part)
    return state, seconds


SMALL = ("data=synthetic", "data.num_train=200", "trainer.max_epochs=1", *QUIET)


@pytest.mark.slurm
@needs_slurm
def test_two_run_sweep_runs_as_two_slurm_jobs_and_reports(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_train("-m", "mask=weight,activation", *on_slurm(*SMALL), f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = sorted(path.parent for path in sweep.glob("*/metrics.json"))
    assert [run.name for run in runs] == [
        "data.num_train=200,data=synthetic,mask=activation,trainer.max_epochs=1",
        "data.num_train=200,data=synthetic,mask=weight,trainer.max_epochs=1",
    ]
    jobs = [job_ids(run) for run in runs]
    assert all(len(ids) == 1 for ids in jobs) and jobs[0] != jobs[1]  # one job each, not one job for both
    for (job,) in jobs:
        sacct_once_ended(job)
        assert sacct_rows(job, "State")[0] == ["COMPLETED"]
        assert (sweep / ".submitit" / job).is_dir()  # submitit's logs of that job
    report = subprocess.run(
        [sys.executable, "-m", "pruneflow.experiment.report", str(sweep)], cwd=REPO, capture_output=True, text=True
    )
    assert report.returncode == 0, report.stderr
    assert "2 finished runs" in report.stdout and "unfinished" not in report.stdout
    assert "| `data.num_train=200,data=synthetic,mask=weight,trainer.max_epochs=1` | 1 |" in report.stdout


@pytest.mark.slurm
@needs_slurm
def test_a_failing_job_is_a_failed_run_in_the_report_and_the_others_finish(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_train("-m", "mask=weight", "mask.amount=1.5,0.5", *on_slurm(*SMALL), f"hydra.sweep.dir={sweep}")
    assert result.returncode != 0  # the sweep says one of its jobs failed
    assert "mask.amount must be a fraction in [0, 1), got 1.5" in result.stdout + result.stderr
    failed = sweep / "data.num_train=200,data=synthetic,mask.amount=1.5,mask=weight,trainer.max_epochs=1"
    finished = sweep / "data.num_train=200,data=synthetic,mask.amount=0.5,mask=weight,trainer.max_epochs=1"
    sacct_once_ended(job_ids(failed)[0]), sacct_once_ended(job_ids(finished)[0])  # the sweep did not wait for both
    assert (finished / "metrics.json").is_file() and not (failed / "metrics.json").exists()
    assert sacct_rows(job_ids(failed)[0], "State")[0] == ["FAILED"]
    assert sacct_rows(job_ids(finished)[0], "State")[0] == ["COMPLETED"]
    report = subprocess.run(
        [sys.executable, "-m", "pruneflow.experiment.report", str(sweep)], cwd=REPO, capture_output=True, text=True
    )
    assert report.returncode == 0, report.stderr
    assert "1 finished runs, 1 unfinished or failed" in report.stdout
    assert f"- `{failed.name}`: pruneflow: error: mask.amount must be a fraction in [0, 1), got 1.5" in report.stdout


@pytest.mark.slurm
@needs_slurm
def test_requeued_slurm_job_continues_from_its_last_checkpoint(tmp_path: Path, uninterrupted: Path) -> None:
    sweep = tmp_path / "sweep"
    sweep_process = start_sweep(sweep, *on_slurm(*RUN, *PACED))
    try:
        run_dir = the_run(sweep)
        (job,) = job_ids(run_dir)
        wait_until_past_first_checkpoint(run_dir, lambda: sweep_process.poll() is None)
        # What a preemption does: stop the job and put it back in the queue.
        subprocess.run(["scontrol", "requeue", job], check=True)
        while "restart 1" not in (run_dir / "train.log").read_text():  # the job's second start
            assert_stopped_during_epoch_1(run_dir, killed=False)  # until then the run stays as the requeue left it
            time.sleep(0.3)
        output, _ = sweep_process.communicate(timeout=400)
    finally:
        sweep_process.kill()
    assert sweep_process.returncode == 0, output[-3000:]
    log = (run_dir / "train.log").read_text()
    assert f"Slurm restart 1 of job {job}: continuing from {run_dir / 'checkpoints' / 'last.ckpt'}" in log
    assert log.count("] - step 20: pruned") == 1  # not pruned again after the restart
    sacct_once_ended(job)
    assert job_states(job) == ["REQUEUED", "COMPLETED"]
    assert_one_continuous_history(run_dir, uninterrupted)
    assert_same_final_state(run_dir, uninterrupted)


@pytest.mark.slurm
@needs_slurm
def test_ddp_job_trains_with_two_ranks_placed_by_slurm(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_train(
        "-m", "trainer=ddp_cpu", "mask=weight", *on_slurm("hydra.launcher.tasks_per_node=2", *SMALL),
        f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run_dir,) = (path.parent for path in sweep.glob("*/metrics.json"))
    log = (run_dir / "train.log").read_text()
    # srun started both ranks (Lightning's SLURMEnvironment takes them as they are; a rank it spawned
    # itself would say task 0 of 1)
    assert "task 0 of 2)" in log and "task 1 of 2)" in log
    fingerprints = json.loads((run_dir / "metrics.json").read_text())["mask/rank_fingerprints"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    sacct_once_ended(job_ids(run_dir)[0])
    assert ["2"] in sacct_rows(job_ids(run_dir)[0], "NTasks")  # the training step ran as two Slurm tasks


@pytest.mark.slurm
@needs_slurm
def test_job_at_its_time_limit_is_requeued_and_finishes(tmp_path: Path, uninterrupted: Path) -> None:
    sweep = tmp_path / "sweep"
    # signal_delay_s above any time left once the limit is cut below: Slurm signals at its next check
    launcher = ("hydra.launcher.timeout_min=10", "hydra.launcher.signal_delay_s=150")
    launcher += ("hydra.launcher.max_num_timeout=1",)  # requeue once after a time-out
    # Paced (1 s a step from epoch 1 on, first start only) so the job is still running when Slurm signals.
    pace = "+callbacks.pace._target_=helpers.PaceFirstStart"
    sweep_process = start_sweep(sweep, *on_slurm(*launcher, *RUN, pace))
    try:
        run_dir = the_run(sweep)
        (job,) = job_ids(run_dir)
        wait_until_past_first_checkpoint(run_dir, lambda: sweep_process.poll() is None)
        # The job runs out of time now: a limit 1-2 minutes past what it has run. Slurm sends submitit's
        # signal (USR2, signal_delay_s before the limit); submitit requeues the job.
        _, elapsed = queue_state(job)
        subprocess.run(["scontrol", "update", f"JobId={job}", f"TimeLimit={elapsed // 60 + 2}"], check=True)
        while queue_state(job)[0] != "PENDING":
            assert sweep_process.poll() is None
            time.sleep(0.3)
        assert_stopped_during_epoch_1(run_dir, killed=False)
        # The second run of the job gets a limit it can finish in, whatever this machine's speed.
        subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=10"], check=True)
        output, _ = sweep_process.communicate(timeout=400)
    finally:
        sweep_process.kill()
    assert sweep_process.returncode == 0, output[-3000:]
    submitit_log = "".join(path.read_text() for path in (sweep / ".submitit" / job).glob("*_log.*"))
    assert "this job is timed-out" in submitit_log
    assert f"Requeued job {job} (0 remaining timeouts)" in submitit_log
    log = (run_dir / "train.log").read_text()
    assert f"Slurm restart 1 of job {job}: continuing from {run_dir / 'checkpoints' / 'last.ckpt'}" in log
    sacct_once_ended(job)
    assert job_states(job) == ["REQUEUED", "COMPLETED"]
    assert_one_continuous_history(run_dir, uninterrupted)
    assert_same_final_state(run_dir, uninterrupted)
