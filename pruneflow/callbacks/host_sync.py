"""HostSyncCheck: proof that an ordinary training step reads nothing back from the device.

A step that neither logs nor refreshes the progress bar should only queue work: any value read back
(``.item()``, ``float(t)``, ``bool(t)``, ``nonzero``, boolean-mask indexing, a copy to the host) makes the
host wait for the device, and the GPU idles while Python prepares the next step. This callback watches
a window of training steps ``[start, start + steps)`` — chosen by the caller to hold only ordinary steps:

- on CUDA it runs them under ``torch.cuda.set_sync_debug_mode("error")``, so the first synchronising
  call raises with its traceback (``python -m benchmarks gpu`` uses this);
- on any device it counts, with the PyTorch profiler, the ops that read back a value
  (``SYNC_OPS``: on CPU they cost nothing, but they are the same calls that block on a GPU), and, with a
  ``TorchFunctionMode``, the Python calls that would copy to the host on a GPU but are free no-ops on a CPU
  tensor, which the profiler cannot see there (``.cpu()``, ``.tolist()``, ``.numpy()``, indexing by a
  boolean mask: ``READ_CALLS``), so a CPU test guards the property (``tests/test_host_sync.py``).

The window spans from this callback's ``on_train_batch_start`` of the first step to its
``on_train_batch_start`` of the step after the last: every hook, the forward, backward and optimizer
step in between. List it first among the callbacks so the others' ``on_train_batch_start`` are inside.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.overrides import TorchFunctionMode

from pruneflow.errors import ConfigError

log = logging.getLogger(__name__)

# Ops that hand a tensor's value to Python: each one waits for the device on a GPU.
SYNC_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero", "aten::nonzero_static",
            "aten::masked_select", "aten::unique", "aten::_unique2", "aten::equal", "aten::allclose")  # fmt: skip

READ_CALLS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "nonzero")


class PythonReads(TorchFunctionMode):
    """Counts the tensor calls of ``READ_CALLS``, and ``t[mask]`` with a boolean mask, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in READ_CALLS:
            self.counts[name] += 1
        elif name == "__getitem__" and any(isinstance(index, torch.Tensor) and index.dtype == torch.bool
                                           for index in (args[1] if isinstance(args[1], tuple) else (args[1],))):
            self.counts["boolean index"] += 1  # fmt: skip
        return func(*args, **(kwargs or {}))


@contextmanager
def cuda_sync_errors(device: torch.device) -> Iterator[None]:
    """Raise on any synchronising CUDA call inside the block (a no-op off CUDA)."""
    if device.type != "cuda":
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


class HostSyncCheck(Callback):
    """Counts the host reads of training steps ``[start, start + steps)``; on CUDA any read raises."""

    def __init__(self, start: int = 5, steps: int = 20, raise_on_cuda: bool = True) -> None:
        if not isinstance(start, int) or start < 0 or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"HostSyncCheck needs start >= 0 and steps >= 1, got start={start!r}, steps={steps!r}")
        self.start, self.steps, self.raise_on_cuda = start, steps, raise_on_cuda
        self.counts: Counter[str] = Counter()
        self.steps_watched = 0
        self.python_counts: Counter[str] = Counter()
        self._profiler: torch.profiler.profile | None = None
        self._python_reads: PythonReads | None = None
        self._cuda_mode: Any = None
        self._first = start

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self._profiler is not None and step >= self.start + self.steps:
            self._stop()
        elif self._profiler is None and self.start <= step < self.start + self.steps and not self.steps_watched:
            self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self._profiler.start()
            self._python_reads = PythonReads()
            self._python_reads.__enter__()
            if self.raise_on_cuda:
                self._cuda_mode = cuda_sync_errors(pl_module.device)
                self._cuda_mode.__enter__()
            self._first = step
        if self._profiler is not None:
            self.steps_watched = step - self._first + 1

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._profiler is not None:
            self.steps_watched = trainer.global_step - self._first
            self._stop()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._profiler is not None:
            self._stop()

    def _stop(self) -> None:
        assert self._profiler is not None and self._python_reads is not None
        if self._cuda_mode is not None:
            self._cuda_mode.__exit__(None, None, None)
            self._cuda_mode = None
        self._python_reads.__exit__(None, None, None)
        self.python_counts, self._python_reads = self._python_reads.counts, None
        self._profiler.stop()
        self.counts = Counter({event.key: event.count for event in self._profiler.key_averages()
                               if event.key in SYNC_OPS})  # fmt: skip
        self._profiler = None
        log.info("host reads over %d ordinary steps: %s %s", self.steps_watched, dict(self.counts) or "no sync ops,",
                 dict(self.python_counts) or "no read calls")  # fmt: skip

    @property
    def reads(self) -> int:
        """Host reads over the window: sync ops (``item``'s ``_local_scalar_dense`` counted once) and read calls."""
        ops = sum(count for op, count in self.counts.items() if op not in ("aten::item", "aten::is_nonzero"))
        calls = sum(count for call, count in self.python_counts.items() if call not in ("item", "__bool__",
                    "__float__", "__int__", "__index__", "nonzero"))  # fmt: skip
        return ops + calls

    def final_metrics(self) -> dict[str, Any]:
        return {"perf/ordinary_steps_watched": self.steps_watched, "perf/ordinary_step_host_reads": self.reads,
                "perf/ordinary_step_sync_ops": dict(self.counts) | dict(self.python_counts)}  # fmt: skip
