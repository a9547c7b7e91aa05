"""Callbacks cost Lightning's loop nothing on a training step for the hooks they do not use.

Lightning calls every hook of every callback on every step, the base class's empty ones included, each
through its profiler context (about fifteen Python calls a hook: six per-step hooks make a callback cost
~2 % of a small network's step before it does anything). It skips a hook whose attribute is not callable,
so a callback that sets the per-step hooks it does not override to ``None`` on its instance is skipped
for them; ``python -m benchmarks host-overhead`` measures the difference and ``tests/test_host_overhead.py``
counts it. A callback that needs a hook on some steps only shows it for those (``show_step_hooks``): Lightning
reads the attribute again on every call.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback

STEP_HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward",
              "on_before_optimizer_step", "on_before_zero_grad")  # fmt: skip


def hide_unused_step_hooks(callback: Callback) -> Callback:
    """Set each per-step hook that ``callback``'s class inherits unchanged from ``Callback`` to None on the
    instance, so Lightning's loop skips it; returns ``callback``."""
    for hook in STEP_HOOKS:
        if getattr(type(callback), hook, None) is getattr(Callback, hook):
            setattr(callback, hook, None)
    return callback


def show_step_hooks(callback: Callback, hooks: tuple[str, ...], shown: bool) -> None:
    """Show ``hooks`` (the class's methods) or hide them (None on the instance) for the steps to come."""
    for hook in hooks:
        if shown:
            callback.__dict__.pop(hook, None)
        else:
            setattr(callback, hook, None)
