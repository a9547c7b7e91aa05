"""An ordinary training step — one that neither logs nor refreshes the progress bar — reads nothing back from
the device, for every strategy, with the telemetry, the accuracy metric and every default callback on.

Counted on CPU (``pruneflow.callbacks.host_sync.HostSyncCheck``: the profiler's sync ops and the Python calls
that copy to the host on a GPU), over a window of steps after pruning where no interval falls. Counting, not
timing: the result does not depend on the machine's speed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import compose_train

from pruneflow import STRATEGIES
from pruneflow.callbacks.host_sync import HostSyncCheck, PythonReads
from pruneflow.experiment.run import train

WINDOW = ("+callbacks.sync._target_=pruneflow.callbacks.host_sync.HostSyncCheck", "+callbacks.sync.start=4",
          "+callbacks.sync.steps=16")  # fmt: skip
# Every interval beyond the window: what is left is what every step pays.
NO_INTERVAL_IN_WINDOW = ("trainer.log_every_n_steps=1000", "mask.log_every_n_steps=1000", "mask.burst_steps=0",
                         "callbacks.non_finite_loss.check_every_n_steps=1000",
                         "progress_bar_refresh_rate=1000")  # fmt: skip
TINY = ("data=synthetic", "data.num_train=400", "data.num_test=32", "data.batch_size=16", "data.eval_batch_size=64",
        "model.channels=[4,8]", "trainer.max_epochs=1", "trainer.enable_model_summary=false", "~logger",
        "callbacks=[default,accuracy_curve]", "+callbacks.accuracy_curve.every_n_steps=1000")  # fmt: skip


@pytest.mark.parametrize("strategy", ["disabled", *STRATEGIES, "activation+tqdm"])
def test_ordinary_steps_read_nothing_back(strategy: str, tmp_path: Path) -> None:
    strategy, _, bar = strategy.partition("+")
    # +tqdm: the terminal's TQDM bar rather than the log file's epoch lines (it reads the loss when it refreshes)
    tqdm = ("callbacks.progress._target_=pruneflow.callbacks.progress.TQDMBar",) if bar else ()
    cfg = compose_train(*TINY, *NO_INTERVAL_IN_WINDOW, *WINDOW, *tqdm, f"mask={strategy}")
    metrics = train(cfg, tmp_path)
    assert metrics["perf/ordinary_steps_watched"] == 16
    assert metrics["perf/ordinary_step_sync_ops"] == {}, f"{strategy}: host reads on ordinary steps"


def test_the_check_sees_each_kind_of_read() -> None:
    """The counters are not blind: every way of reading a value back is seen on a CPU tensor."""
    check = HostSyncCheck()
    values = torch.arange(4.0)
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    with profiler, PythonReads() as reads:
        values.sum().item(), float(values[0]), bool(values[1]), values.nonzero(), values[values > 1]
        values.tolist(), values.cpu(), values.numpy()
    ops = {event.key: event.count for event in profiler.key_averages()}
    assert ops.get("aten::_local_scalar_dense", 0) >= 3 and ops.get("aten::nonzero", 0) >= 2
    assert set(reads.counts) >= {"item", "__float__", "__bool__", "nonzero", "boolean index", "tolist", "cpu", "numpy"}
    assert check.reads == 0


@pytest.mark.parametrize("strategy", ["activation", "parametrize"])
def test_a_measured_telemetry_step_reads_one_tensor_back(strategy: str, tmp_path: Path) -> None:
    """Burst steps after pruning measure every step: one device→host transfer each (``.cpu()`` then
    ``.tolist()`` of one table), no ``nonzero`` and no boolean-mask indexing of the pruned rows."""
    burst = tuple(item.replace("mask.burst_steps=0", "mask.burst_steps=100") for item in NO_INTERVAL_IN_WINDOW)
    cfg = compose_train(*TINY, *burst, *WINDOW, f"mask={strategy}")
    ops = train(cfg, tmp_path)["perf/ordinary_step_sync_ops"]
    assert ops.get("cpu") == ops.get("tolist") == 16, ops
    assert not {"aten::nonzero", "nonzero", "boolean index", "aten::_local_scalar_dense"} & set(ops), ops
