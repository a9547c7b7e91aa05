"""Two-process DDP on CPU (gloo): the same masks and drift on both ranks, telemetry logged once, and a cut
inside training that DDP goes on reducing.

The ranks' scores are made to differ on purpose (a rank-dependent criterion registered by a small
launcher script): only rank 0's broadcast keeps their masks alike, so a missing broadcast fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import QUIET, run_train, run_train_after
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pruneflow.compaction import load_trained_run
from pruneflow.compaction.cut import compact

# Runs train.py after registering `rank_skewed`: L1 on rank 0, −L1 elsewhere (the other ranks would prune the
# largest kernels). Lightning starts the other rank by re-running this script, so every rank registers it.
LAUNCHER = """
import os
import torch
from pruneflow.pruning import criteria

class RankSkewed(criteria.L1):
    name = "rank_skewed"

    def scores(self, space):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        scores = super().scores(space)
        return scores if rank == 0 else -scores

criteria.CRITERIA["rank_skewed"] = RankSkewed
criteria.CRITERION_NAMES = (*criteria.CRITERION_NAMES, "rank_skewed")
"""


def test_ddp_cpu_two_ranks_prune_alike_and_log_once(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [
        "trainer=ddp_cpu", "data=synthetic", "data.num_train=2000", "trainer.max_epochs=2", "mask=weight",
        "mask.criterion=rank_skewed", "mask.at_epoch=1", "mask.log_every_n_steps=1", "model.activation=silu",
        f"hydra.run.dir={run_dir}", *QUIET,
    ]  # fmt: skip
    result = run_train_after(LAUNCHER, *overrides, folder=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    fingerprints = metrics["mask/rank_fingerprints"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    checksum, drift = fingerprints[0]
    assert checksum > 0 and drift > 0  # something was pruned, and under SiLU it drifted — identically
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    steps = [event.step for event in accumulator.Scalars("drift/producer_l2")]
    assert steps and len(steps) == len(set(steps))  # rank 0 alone logs telemetry


def test_ddp_cut_while_training_trains_on_as_the_masked_run(tmp_path: Path) -> None:
    # Without wrapping the cut network anew, DDP would wait for gradients of the replaced parameters and
    # leave the new ones unreduced: the ranks (each on its own half of the data) would part ways.
    common = [
        "trainer=ddp_cpu", "data=synthetic", "data.num_train=800", "trainer.max_epochs=2", "mask=activation",
        "mask.at_step=1", "mask.reset_optimizer_state=true", "deterministic=true", *QUIET,
    ]  # fmt: skip
    for name, extra in (("masked", []), ("cut", ["mask.cut_at_epoch=1"])):
        result = run_train(*common, *extra, f"hydra.run.dir={tmp_path / name}")
        assert result.returncode == 0, result.stderr[-3000:]
    cut_metrics = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    masked_metrics = json.loads((tmp_path / "masked" / "metrics.json").read_text())
    assert cut_metrics["cut/step"] == cut_metrics["global_step"] // 2 > 1  # cut at the start of epoch 1
    assert "wrapped anew in DistributedDataParallel" in (tmp_path / "cut" / "train.log").read_text()
    assert cut_metrics["test/loss"] == pytest.approx(masked_metrics["test/loss"], rel=1e-4)
    masked = load_trained_run(tmp_path / "masked")
    expected = compact(masked.network, masked.pruned).model.state_dict()
    actual = load_trained_run(tmp_path / "cut").network.state_dict()
    assert actual.keys() == expected.keys()
    # Not bit-identical: after the cut the gradients travel in other buckets, and gloo's sums round
    # differently (~1e-7 a step, grown over an epoch of training to ~1e-4 of a tensor's largest entry).
    for key, tensor in actual.items():
        assert tensor.shape == expected[key].shape, key
        if tensor.is_floating_point():
            scale = expected[key].abs().max().clamp_min(1e-12)
            assert (tensor - expected[key]).abs().max() / scale <= 1e-3, key


def test_ddp_run_resumed_after_its_cut_ends_as_the_uninterrupted_one(tmp_path: Path) -> None:
    # The resumed run rebuilds the cut widths from the checkpoint (the load-state-dict pre-hook) before
    # Lightning wraps the network in DDP, so DDP reduces the cut network's parameters from the first step.
    # scheduler=none: the learning rate does not depend on max_epochs, so 2 epochs + 1 resumed = 3 epochs.
    common = [
        "trainer=ddp_cpu", "data=synthetic", "data.num_train=800", "mask=activation", "mask.at_step=1",
        "mask.reset_optimizer_state=true", "mask.cut_at_epoch=1", "scheduler=none", "deterministic=true", *QUIET,
    ]  # fmt: skip
    whole = run_train(*common, "trainer.max_epochs=3", f"hydra.run.dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = run_train(*common, "trainer.max_epochs=2", f"hydra.run.dir={tmp_path / 'resumed'}")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_train(*common, "trainer.max_epochs=3", "resume=true", f"hydra.run.dir={tmp_path / 'resumed'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    reference = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert metrics["global_step"] == reference["global_step"] and metrics["cut/step"] == reference["cut/step"]
    log = (tmp_path / "resumed" / "train.log").read_text()
    assert "resuming from" in log
    assert log.count("channels out of the network") == 1  # cut in the first start; the resumed one takes its shape
    expected = load_trained_run(tmp_path / "whole").network.state_dict()
    actual = load_trained_run(tmp_path / "resumed").network.state_dict()
    assert actual.keys() == expected.keys()
    different = [key for key, tensor in actual.items() if not torch.equal(tensor, expected[key])]
    assert not different, different
