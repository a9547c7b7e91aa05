"""When to prune and how much: one-shot at an epoch or step, or gradual (cubic, Zhu & Gupta 2017)."""

from __future__ import annotations

from dataclasses import dataclass

from pruneflow.errors import ConfigError, is_count

SCHEDULES = ("one_shot", "gradual")


@dataclass(frozen=True)
class PruningSchedule:
    """Target fraction of each pruned layer's channels at a given (epoch, step).

    ``one_shot``: 0 before ``at_epoch`` / ``at_step`` (whichever is set; default: the first step),
    ``amount`` from then on. ``gradual``: at the start of each epoch e in [start_epoch, end_epoch],
    ``amount · (1 − (1 − (e − start) / (end − start))³)``, reaching ``amount`` at ``end_epoch``.
    """

    amount: float
    kind: str = "one_shot"
    at_epoch: int | None = None
    at_step: int | None = None
    start_epoch: int = 0
    end_epoch: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.amount, bool) or not isinstance(self.amount, (int, float)) or not 0 <= self.amount <= 1:
            raise ConfigError(f"the pruning schedule's amount must be a fraction in [0, 1], got {self.amount!r}")
        if self.kind not in SCHEDULES:
            raise ConfigError(f"unknown mask.schedule {self.kind!r}; choose one of: {', '.join(SCHEDULES)}")
        if self.at_epoch is not None and self.at_step is not None:
            raise ConfigError(
                f"set mask.at_epoch or mask.at_step, not both (got at_epoch={self.at_epoch}, at_step={self.at_step})"
            )
        for name in ("at_epoch", "at_step"):
            value = getattr(self, name)
            if value is not None and (not is_count(value) or value < 0):
                raise ConfigError(f"mask.{name} must be a non-negative integer or null, got {value!r}")
        if self.kind == "gradual" and not 0 <= self.start_epoch < self.end_epoch:
            raise ConfigError(
                f"mask.schedule=gradual needs 0 <= mask.start_epoch < mask.end_epoch, "
                f"got start_epoch={self.start_epoch}, end_epoch={self.end_epoch}"
            )
        for name in ("start_epoch", "end_epoch"):
            value = getattr(self, name)
            if not is_count(value) or value < 0:
                raise ConfigError(f"mask.{name} must be a non-negative integer, got {value!r}")

    def target(self, epoch: int, step: int) -> float:
        if self.kind == "gradual":
            if epoch < self.start_epoch:
                return 0.0
            progress = min((epoch - self.start_epoch) / (self.end_epoch - self.start_epoch), 1.0)
            return self.amount * (1.0 - (1.0 - progress) ** 3)
        if self.at_step is not None:
            return self.amount if step >= self.at_step else 0.0
        return self.amount if epoch >= (self.at_epoch or 0) else 0.0
