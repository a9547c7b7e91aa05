"""Where a cut module's output rows and input columns lie in its tensors, for the modules whose rows are not dim 0
and columns dim 1 of every tensor, and an ``nn.LSTM``'s constructor widths.

- ``nn.LSTM`` (one layer, no projection: the graph refuses the others, ``handlers.recurrent``): its rows are hidden
  units, unit j rows j, H + j, 2H + j and 3H + j (its four gates) of every direction's ``weight_ih``, ``weight_hh``
  and biases; ``weight_hh``'s columns are the units again, ``weight_ih``'s the input's channels.
- a dense ``nn.ConvTranspose2d`` (LowFormer's fused upsampling): its weight is (in, out, k, k), rows along dim 1.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from pruneflow.graph.layers import is_depthwise


def lstm_args(lstm: nn.LSTM) -> dict[str, Any]:
    return {"input_size": lstm.input_size, "hidden_size": lstm.hidden_size, "num_layers": lstm.num_layers,
            "bias": lstm.bias, "batch_first": lstm.batch_first, "dropout": lstm.dropout,
            "bidirectional": lstm.bidirectional, "proj_size": lstm.proj_size}  # fmt: skip


def lstm_widths(lstm: nn.LSTM, units: Tensor | None, columns: Tensor | None) -> dict[str, int]:
    """The LSTM's widths keeping ``units`` and input ``columns`` (None: all)."""
    return {"hidden_size": lstm.hidden_size if units is None else len(units),
            "input_size": lstm.input_size if columns is None else len(columns)}  # fmt: skip


def tensor_keep(
    module: nn.Module, tensor_name: str, rows: Tensor | None, columns: Tensor | None
) -> tuple[Tensor | None, Tensor | None]:
    """The (dim 0, dim 1) entries of ``module``'s tensor ``tensor_name`` that a cut keeping its output ``rows`` and
    input ``columns`` keeps (None: all): those, except in a dense transposed conv's weight (the other way round) and
    in an LSTM, whose ``rows`` are units: their four gate rows, and ``weight_hh``'s columns the units again."""
    if isinstance(module, nn.ConvTranspose2d) and not is_depthwise(module) and tensor_name == "weight":
        return columns, rows
    if not isinstance(module, nn.LSTM):
        return rows, columns
    gates = None if rows is None else torch.cat([rows + gate * module.hidden_size for gate in range(4)])
    read = columns if tensor_name.startswith("weight_ih") else rows if tensor_name.startswith("weight_hh") else None
    return gates, read
