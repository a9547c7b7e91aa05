"""Lightning's noise filters: the model summary loses its FLOPs column only where no FLOPs were counted."""

from __future__ import annotations

import logging

from pruneflow.experiment.console import MODEL_SUMMARY_LOGGER, DropUncountedFlops

# Lightning's model summary as it logs it (lightning.pytorch.utilities.model_summary._format_summary_table).
TABLE = """
  | Name    | Type             | Params | Mode  | FLOPs
------------------------------------------------------------
0 | model   | ConvNet          | 61.0 K | train | {flops}
1 | loss_fn | CrossEntropyLoss | 0      | train | 0{pad}
------------------------------------------------------------
61.0 K    Trainable params
21        Modules in train mode
{flops}{gap}Total Flops"""


def filtered(table: str) -> str:
    record = logging.LogRecord(MODEL_SUMMARY_LOGGER, logging.INFO, __file__, 0, table, None, None)
    assert DropUncountedFlops().filter(record)
    return str(record.msg)


def test_uncounted_flops_leave_the_summary() -> None:
    text = filtered(TABLE.format(flops="0", pad="", gap=" " * 9))
    assert "FLOPs" not in text and "Total Flops" not in text
    lines = text.split("\n")
    assert lines[1] == "  | Name    | Type             | Params | Mode "
    assert lines[2] == "-" * len(lines[1]) and lines[3] == "0 | model   | ConvNet          | 61.0 K | train"
    assert "61.0 K    Trainable params" in lines


def test_counted_flops_stay() -> None:
    table = TABLE.format(flops="1.1 M", pad="    ", gap=" " * 5)
    assert filtered(table) == table
