"""Compaction of recurrent layers: an ``nn.LSTM``'s constructor widths and its tensors at the units and input
columns a cut keeps (one layer, no projection: the graph refuses the others, ``handlers.recurrent``).

Unit j's rows are j, H + j, 2H + j and 3H + j (its four gates) of every direction's ``weight_ih``, ``weight_hh``
and biases; ``weight_hh``'s columns are the units again, ``weight_ih``'s the input's channels."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def lstm_args(lstm: nn.LSTM) -> dict[str, Any]:
    return {"input_size": lstm.input_size, "hidden_size": lstm.hidden_size, "num_layers": lstm.num_layers,
            "bias": lstm.bias, "batch_first": lstm.batch_first, "dropout": lstm.dropout,
            "bidirectional": lstm.bidirectional, "proj_size": lstm.proj_size}  # fmt: skip


def gate_rows(units: Tensor, hidden_size: int) -> Tensor:
    """The rows of ``units``' four gates, gate by gate, as the cut LSTM lays them out."""
    return torch.cat([units + gate * hidden_size for gate in range(4)])


def lstm_state(lstm: nn.LSTM, units: Tensor | None, columns: Tensor | None) -> dict[str, Tensor]:
    """``lstm``'s state dict keeping ``units`` (hidden units; None: all) and input ``columns`` (None: all)."""
    units = torch.arange(lstm.hidden_size) if units is None else units
    rows = gate_rows(units, lstm.hidden_size)
    state = {}
    for key, tensor in lstm.state_dict().items():
        tensor = tensor.index_select(0, rows.to(tensor.device))
        read = columns if key.startswith("weight_ih") else units if key.startswith("weight_hh") else None
        state[key] = tensor if read is None else tensor.index_select(1, read.to(tensor.device))
    return state
