"""Two-process DDP on CPU (gloo): the same masks and drift on both ranks, telemetry logged once."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import QUIET, run_train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def test_ddp_cpu_two_ranks_prune_alike_and_log_once(tmp_path: Path) -> None:
    result = run_train(
        "trainer=ddp_cpu", "data=synthetic", "data.num_train=2000", "trainer.max_epochs=2", "mask=weight",
        "mask.at_epoch=1", "mask.log_every_n_steps=1", "model.activation=silu", f"hydra.run.dir={tmp_path}", *QUIET,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    fingerprints = metrics["mask/rank_fingerprints"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    checksum, drift = fingerprints[0]
    assert checksum > 0 and drift > 0  # something was pruned, and under SiLU it drifted — identically
    accumulator = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    accumulator.Reload()
    steps = [event.step for event in accumulator.Scalars("drift/producer_l2")]
    assert steps and len(steps) == len(set(steps))  # rank 0 alone logs telemetry
