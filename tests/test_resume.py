"""Runs you can trust: exact resume, SIGKILL at any moment, refused mismatches, non-finite losses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import QUIET, REPO, run_train
from lightning.pytorch.callbacks import ModelCheckpoint
from test_strategies import TinyNet, toy_loader

from pruneflow import ChannelPruning, ClassifierModule
from pruneflow.callbacks.checkpoint_io import AtomicCheckpointIO
from pruneflow.callbacks.non_finite_loss import NonFiniteLossError, NonFiniteLossGuard

# ~40 steps per epoch: long enough to stop a run between its checkpoints, short enough for CI.
RUN = (
    "data=synthetic", "data.num_train=6000", "trainer.max_epochs=3", "deterministic=true",
    "mask=parametrize", "mask.at_epoch=1", "mask.log_every_n_steps=5", "model.activation=silu", *QUIET,
)  # fmt: skip


def final_state(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    drift = {key: value for key, value in metrics.items() if key.startswith(("drift/", "grad/", "leak/", "bn/"))}
    return checkpoint["state_dict"], drift


STEPS_PER_EPOCH = 43  # 5,400 training images (6,000 less the 10 % validation split) in batches of 128
TOTAL_STEPS = 3 * STEPS_PER_EPOCH
# A run that only has to leave a checkpoint with its mask state (what a refusal or a load reads): two short epochs.
SHORT_RUN = (*RUN, "data.num_train=1000", "trainer.max_epochs=2")
SHORT_STEPS_PER_EPOCH = 8  # 900 training images in batches of 128, the last one partial


def start_run(run_dir: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *RUN, f"hydra.run.dir={run_dir}", *extra],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def checkpoint_version(path: Path) -> tuple[int, int] | None:
    """Identifies one write of ``path`` (each atomic save renames a new file into place), None before the first."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


@dataclass(frozen=True)
class Reference:
    """The uninterrupted run: its final weights and telemetry, and how long it trained after its first
    checkpoint until its last (the window a kill must land in, measured on this machine, today)."""

    weights: dict[str, torch.Tensor]
    drift: dict
    seconds_between_first_and_last_checkpoint: float


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    process = start_run(run_dir)
    last, writes, seen = run_dir / "checkpoints" / "last.ckpt", [], None
    while process.poll() is None:
        version = checkpoint_version(last)
        if version is not None and version != seen:
            seen = version
            writes.append(time.monotonic())
        time.sleep(0.01)
    _, stderr = process.communicate()
    assert process.returncode == 0, stderr[-3000:]
    assert len(writes) >= 2, f"saw {len(writes)} checkpoint writes; the run saves one per epoch"
    weights, drift = final_state(run_dir)
    return Reference(weights, drift, writes[-1] - writes[0])


def kill_and_resume(run_dir: Path, seconds_after_first_checkpoint: float) -> bool:
    """SIGKILL the run ``seconds_after_first_checkpoint`` after its first epoch's checkpoint, then resume it.

    Returns False, having resumed nothing, where the kill came too late (the run had already ended, saved
    its final checkpoint or written metrics.json): the caller tries again, sooner. Otherwise asserts that
    the kill landed mid-run (exit −9, no metrics.json, a last.ckpt from a completed epoch that is not the
    last) and that the resumed run says it resumed from that checkpoint, so the test never compares two
    fresh runs (killed too early) or an unkilled one (killed too late).
    """
    process = start_run(run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while process.poll() is None and not last.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(seconds_after_first_checkpoint)
    if process.poll() is not None:
        assert process.returncode == 0, process.communicate()[1][-3000:]
        return False
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    saved = torch.load(last, map_location="cpu", weights_only=True)
    epoch, step = saved["epoch"], saved["global_step"]
    if (run_dir / "metrics.json").exists() or step == TOTAL_STEPS:
        return False
    assert step == (epoch + 1) * STEPS_PER_EPOCH and step < TOTAL_STEPS, (epoch, step)
    resumed = run_train(*RUN, f"hydra.run.dir={run_dir}", "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    said = f"resuming from {last} (saved at epoch {epoch}, global step {step})"
    assert said in (run_dir / "train.log").read_text(), "the resumed run does not say where it resumed from"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == TOTAL_STEPS
    return True


def assert_same(run: tuple[dict, dict], reference: Reference, drift_rel: float = 0.0) -> None:
    weights, drift = run
    assert weights.keys() == reference.weights.keys()
    for key, value in weights.items():
        assert torch.equal(value, reference.weights[key]), key
    assert drift == (pytest.approx(reference.drift, rel=drift_rel) if drift_rel else reference.drift)


def test_killed_after_an_epoch_and_resumed_ends_bit_identical(tmp_path: Path, uninterrupted: Reference) -> None:
    assert kill_and_resume(tmp_path / "run", 0.0), "the run ended before it could be killed after its first epoch"
    assert_same(final_state(tmp_path / "run"), uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("fraction", [0.15, 0.45, 0.8])
def test_sigkill_at_any_moment_then_resume_never_fails_or_loses_an_epoch(
    tmp_path: Path, uninterrupted: Reference, fraction: float
) -> None:
    """The kill lands ``fraction`` of the way from the first checkpoint to the last, as timed on the
    uninterrupted run: in seconds that would depend on this machine's speed. A kill that still comes too
    late (a faster moment than the reference's) is tried again, sooner; it never passes unkilled."""
    delay = fraction * uninterrupted.seconds_between_first_and_last_checkpoint
    for attempt in range(4):
        run_dir = tmp_path / f"run{attempt}"
        if kill_and_resume(run_dir, delay):
            break
        delay /= 2
    else:
        pytest.fail(f"four kills, the last {delay * 2:.2f} s after the first checkpoint, all came after the run ended")
    # Weights must be bit-identical. Telemetry summaries are compared to 1e-4 relative: a kill during
    # epoch 2 shifted drift/consumer_l2/features.8 by 2e-5 relative while the weights stayed identical
    # (open question, see the stop-8 note); the epoch-boundary test above compares them exactly.
    assert_same(final_state(run_dir), uninterrupted, drift_rel=1e-4)


def test_resume_without_a_checkpoint_is_refused_naming_the_folder(tmp_path: Path) -> None:
    result = run_train(*RUN, "resume=true", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f"pruneflow: error: resume=true but {tmp_path}/checkpoints holds no last.ckpt to resume from; point "
        "hydra.run.dir= at the run's folder, or drop resume=true to start a new run"
    )
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "checkpoints").exists()


def test_checkpoints_load_as_plain_tensors_with_the_mask_state(tmp_path: Path) -> None:
    result = run_train(*SHORT_RUN, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    state = checkpoint["callbacks"]["ChannelPruning"]
    assert state["strategy"] == "parametrize" and state["pruning_steps"] == [SHORT_STEPS_PER_EPOCH]
    assert all(mask.dtype == torch.bool for mask in state["pruned"].values())
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temporaries behind


def test_resuming_with_another_strategy_is_refused(tmp_path: Path) -> None:
    first = run_train(*SHORT_RUN, f"hydra.run.dir={tmp_path}")
    assert first.returncode == 0, first.stderr[-3000:]
    result = run_train(*SHORT_RUN, "mask=weight", "resume=true", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f"pruneflow: error: {tmp_path}/checkpoints/last.ckpt was pruned with mask=parametrize but this run has "
        "mask=weight; resume with mask=parametrize or start a new run"
    )


def test_checkpoint_from_another_model_is_refused(tmp_path: Path) -> None:
    first = run_train("data=synthetic", "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'a'}", *QUIET)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    result = run_train(
        "data=synthetic", "model.channels=[8,16]", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'b'}", *QUIET
    )
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"pruneflow: error: checkpoint {ckpt} comes from another model: ")


class DivergingModule(ClassifierModule):
    """Returns a NaN loss from step ``bad_step`` on."""

    bad_step = 20

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step >= self.bad_step else loss


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = DivergingModule(TinyNet("relu"), lambda p: torch.optim.SGD(p, lr=0.05), num_classes=3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = L.Trainer(
        max_epochs=4, callbacks=[checkpoint, NonFiniteLossGuard(check_every_n_steps=50), ChannelPruning("activation")],
        plugins=[AtomicCheckpointIO()], logger=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with pytest.raises(NonFiniteLossError, match="training loss became non-finite at step 20 "):
        trainer.fit(module, train_dataloaders=toy_loader())  # 16 steps per epoch: step 20 is in epoch 1
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["epoch"] == 0 and saved["global_step"] == 16
    assert all(torch.isfinite(value).all() for value in saved["state_dict"].values() if value.is_floating_point())


def test_non_finite_loss_guard_names_the_first_bad_micro_batch_step_and_reads_nothing_between_checks() -> None:
    """Four micro-batches a step (gradient accumulation): the guard keeps every loss, reads none back before a
    check, and names the step of the first non-finite one even when later ones are finite again."""
    guard = NonFiniteLossGuard(check_every_n_steps=3)
    trainer = types.SimpleNamespace(global_step=0, current_epoch=0, accumulate_grad_batches=4, num_training_batches=12)
    losses = {(1, 2): float("inf"), (2, 0): float("nan")}  # (step, micro-batch) → a non-finite loss
    with pytest.raises(NonFiniteLossError, match="non-finite at step 1 "):
        for step in range(3):
            for micro_batch in range(4):
                trainer.global_step = step + (micro_batch == 3)  # Lightning counts the step after its last one
                loss = torch.tensor(losses.get((step, micro_batch), 0.5))
                guard.on_train_batch_end(trainer, None, {"loss": loss}, None, 4 * step + micro_batch)  # type: ignore[arg-type]
                assert trainer.global_step == 3 or len(guard._losses) == 4 * step + micro_batch + 1
    assert guard._losses == []  # the checked window is dropped: the next check starts afresh
    guard.on_train_batch_end(trainer, None, torch.tensor(1.0), None, 12)  # type: ignore[arg-type]
    guard.check(trainer)  # a finite window passes
