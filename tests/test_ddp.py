"""Two-process DDP on CPU (gloo): the same masks and drift on both ranks, telemetry logged once.

The ranks' scores are made to differ on purpose (a rank-dependent criterion registered by a small
launcher script): only rank 0's broadcast keeps their masks alike, so a missing broadcast fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

from helpers import QUIET, run_train_after
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

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
