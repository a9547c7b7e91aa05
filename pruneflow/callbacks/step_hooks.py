"""Callbacks cost Lightning's loop nothing on a training step for the hooks they do not use.

Lightning calls every hook of every callback on every step, the base class's empty ones included, each
through its profiler context (about fifteen Python calls a hook: six per-step hooks make a callback cost
~2 % of a small network's step before it does anything). It skips a hook whose attribute is not callable,
so a callback that sets the per-step hooks it does not override to ``None`` on its instance is skipped
for them; ``python -m benchmarks host-overhead`` measures the difference and ``tests/test_host_overhead.py``
counts it. A callback that needs a hook on some steps only shows it for those (``show_step_hooks``): Lightning
reads the attribute again on every call.

Skipping a non-callable hook is a detail of Lightning's private ``trainer.call._call_callback_hooks``, not a
documented API; ``check_hooks_can_hide`` tries it once on a stub trainer and raises ``UnsupportedLightningError``
(naming the version) where a Lightning release no longer skips them, instead of calling ``None`` mid-training or
running a hidden hook on every step.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.trainer import call

from pruneflow.errors import UnsupportedLightningError, lightning_internal, lightning_version

STEP_HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward",
              "on_before_optimizer_step", "on_before_zero_grad")  # fmt: skip


class _HiddenHookProbe(Callback):
    calls = 0

    def on_before_zero_grad(self, *args: Any, **kwargs: Any) -> None:
        type(self).calls += 1


@functools.cache
def check_hooks_can_hide() -> None:
    """Raise ``UnsupportedLightningError`` unless Lightning's hook calling skips a hook set to None on the
    instance (and does not call the class's method instead); checked once per process."""
    call_hooks = lightning_internal(call, "_call_callback_hooks", "hiding a callback's unused per-step hooks")
    probe = _HiddenHookProbe()
    probe.on_before_zero_grad = None
    stub_trainer = SimpleNamespace(callbacks=[probe], lightning_module=None, profiler=PassThroughProfiler())
    _HiddenHookProbe.calls = 0
    try:
        call_hooks(stub_trainer, "on_before_zero_grad", None)
        skipped = _HiddenHookProbe.calls == 0
    except TypeError:  # it called the None
        skipped = False
    if not skipped:
        raise UnsupportedLightningError(
            f"hiding a callback's unused per-step hooks relies on Lightning skipping a hook set to None, which the "
            f"Lightning {lightning_version()} found does not; pruneflow supports lightning>=2.6,<3 "
            "(pip install 'lightning>=2.6,<3')"
        )


def hide_unused_step_hooks(callback: Callback) -> Callback:
    """Set each per-step hook that ``callback``'s class inherits unchanged from ``Callback`` to None on the
    instance, so Lightning's loop skips it; returns ``callback``."""
    check_hooks_can_hide()
    for hook in STEP_HOOKS:
        if getattr(type(callback), hook, None) is getattr(Callback, hook):
            setattr(callback, hook, None)
    return callback


def show_step_hooks(callback: Callback, hooks: tuple[str, ...], shown: bool) -> None:
    """Show ``hooks`` (the class's methods) or hide them (None on the instance) for the steps to come."""
    check_hooks_can_hide()
    for hook in hooks:
        if shown:
            callback.__dict__.pop(hook, None)
        else:
            setattr(callback, hook, None)
