"""Lightning's console lines that say nothing about the user's run, kept off ``train.py``'s console.

- Lightning's advertisements (``💡 Tip: ... litlogger``), logged at INFO by ``rank_zero_info``.
- The ``FutureWarning`` Lightning's own code triggers in torch's pytree (``isinstance(treespec, LeafSpec)``):
  about Lightning's code, not the run, and nothing a user can change.
- The model summary's FLOPs column and ``Total Flops 0`` line where no FLOPs were counted (Lightning counts
  them only for a module with an ``example_input_array``): a zero that reads as a measurement.

Warnings about the run's own settings (a logging interval longer than an epoch, data loader workers) stay.
"""

from __future__ import annotations

import logging
import re
import warnings

# Where Lightning logs what these filters look at.
RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"
MODEL_SUMMARY_LOGGER = "lightning.pytorch.callbacks.model_summary"
ADVERT_PREFIX = "💡 Tip:"
UNCOUNTED_FLOPS = re.compile(r"^0\s+Total Flops$", re.MULTILINE)


class DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(ADVERT_PREFIX)


class DropUncountedFlops(logging.Filter):
    """Rewrites the summary table without its FLOPs column and total where the total is 0."""

    def filter(self, record: logging.LogRecord) -> bool:
        table = str(record.msg)
        if UNCOUNTED_FLOPS.search(table):
            record.msg = without_flops(table)
        return True


def without_flops(table: str) -> str:
    """``table`` (Lightning's model summary) without the ``FLOPs`` column and the ``Total Flops`` line."""
    lines = [line for line in table.split("\n") if not UNCOUNTED_FLOPS.match(line)]
    header = next((line for line in lines if " | " in line and "FLOPs" in line.split(" | ")), None)
    if header is None:
        return "\n".join(lines)
    column = [cell.strip() for cell in header.split(" | ")].index("FLOPs")
    rows = []
    for line in lines:
        cells = line.split(" | ")
        if len(cells) > column and " | " in line:
            line = " | ".join(cells[:column] + cells[column + 1 :])
        rows.append(line)
    width = max((len(row) for row in rows if " | " in row), default=0)
    return "\n".join("-" * width if row and set(row) == {"-"} else row for row in rows)


def quiet_lightning() -> None:
    """Install the filters (once per process; calling again changes nothing)."""
    for name, noise_filter in ((RANK_ZERO_LOGGER, DropAdverts), (MODEL_SUMMARY_LOGGER, DropUncountedFlops)):
        logger = logging.getLogger(name)
        if not any(isinstance(installed, noise_filter) for installed in logger.filters):
            logger.addFilter(noise_filter())
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning,
        module=r"lightning\.",
    )  # fmt: skip


def quiet_hydra() -> None:
    """Hydra's warnings about its own code, not about the run: at its floor (1.3.0) it warns once per resolver it
    registers (``register_new_resolver() is deprecated``) and about its own version bookkeeping under a newer
    OmegaConf (a FutureWarning raised in ``hydra._internal``) — 20 lines before any one-line error."""
    warnings.filterwarnings(
        "ignore", message=r"register_new_resolver\(\) is deprecated", category=UserWarning, module=r"hydra\.",
    )  # fmt: skip
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"hydra\._internal\.")
