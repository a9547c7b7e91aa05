"""Recurrent layers: ``nn.LSTM`` (Sequencer2D's vertical and horizontal LSTMs), kept whole.

An LSTM reads its input's channels along its last dim (``input_size``, the columns of every direction's
``weight_ih``): a consumer of the spaces they carry. Its hidden units are a space of its own: unit j owns rows j,
H + j, 2H + j and 3H + j (input, forget, cell and output gates) of ``weight_ih``, ``weight_hh`` and both biases,
and column j of ``weight_hh`` (``LSTMUnits`` records them as a producer's rows). The output is ``[forward H,
reverse H]``: unit j of both directions is one channel, read at j and H + j — an ``nn.LSTM`` has one
``hidden_size`` for both, so a cut must keep as many units in each, and tying them keeps it an ``nn.LSTM``.

Why the mask acts inside the LSTM: a unit's output masked after the LSTM would still feed every other unit through
``weight_hh`` at the next step, so the masked network would not be the cut one. With its four gate rows (weights
and biases) times 0 its gates are σ(0) = ½ and tanh(0) = 0, so its cell state stays ½ · 0 + ½ · 0 = 0 and its
output ½ · tanh(0) = 0 at every step from the zero initial state: it feeds nothing through ``weight_hh``, and
every kept unit computes what the cut LSTM computes. The ``activation`` strategy computes the LSTM again with those
rows times its keep-vector (``ROWS_MASKED_FORWARDS``), as it does for the attentions that read their q/k/v rows
themselves. Refused in one line: several layers, a projection (``proj_size``), an initial state given by the model
(a masked unit's h0 would feed the others), a call on several inputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.fx
from torch import _VF, Tensor, nn

from pruneflow.graph.handlers.producers import read
from pruneflow.graph.layers import LSTMUnits
from pruneflow.graph.nodes import argument
from pruneflow.graph.records import PrunableLayer
from pruneflow.graph.registry import ROWS_MASKED_FORWARDS, register_module_handler
from pruneflow.graph.values import Parts, Value

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer


def unhandled_lstm(node: torch.fx.Node, module: nn.LSTM) -> str | None:
    """Why ``module``'s hidden units cannot be cut as one layer's (None: they can)."""
    name = str(node.target)
    if module.num_layers != 1:
        return f"LSTM {name} has {module.num_layers} layers; the graph cuts one layer's hidden units only"
    if module.proj_size:
        return f"LSTM {name} projects its hidden units (proj_size={module.proj_size}); the graph cuts unprojected ones"
    if argument(node, 1, "hx", None) is not None:
        return f"LSTM {name} is given an initial state by the model, which a masked unit would feed the others"
    return None


def lstm(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Any:
    """An LSTM: a consumer of its input's spaces, and the producer of its hidden units, read once per direction;
    (output, (h, c)): the final states carry no space the graph follows."""
    name = str(node.target)
    layer = PrunableLayer(name, LSTMUnits(module), unit_name=name, unit=module, rows_inside_unit=True)
    index = tracer.new_space(layer)
    reason = unhandled_lstm(node, module) or tracer.reused(name)
    if reason is not None:
        tracer.spaces[index].refuse(reason)
        tracer.refuse(value, reason)
    else:
        read(tracer, name, layer.producer, value)
    if value is not None:  # its output keeps its input's positions (a reshape by them back to a map)
        tracer.same_positions.append((index, frozenset(space for space, _ in value.segments)))
    width = tracer.width(layer)
    directions = 2 if module.bidirectional else 1
    segments = tuple((index, width * direction) for direction in range(directions))
    ndim = value.ndim if value is not None else None
    return Parts((Value(segments, width * directions, ndim=ndim, channels_last=True), None))


def forward_with_units(module: nn.Module, inputs: tuple[Any, ...], keywords: dict[str, Any], keep: Tensor) -> Any:
    """``module`` (an ``nn.LSTM`` of one layer, on its input alone) computed with the gate rows of its units times
    ``keep``: a unit kept 0 stays 0 at every step (the module docstring). ``_VF.lstm`` is what ``nn.LSTM.forward``
    calls; calling the module itself would run this hook again."""
    x = inputs[0] if inputs else keywords["input"]
    unbatched = x.dim() == 2
    batch_dim = 0 if module.batch_first else 1
    if unbatched:
        x = x.unsqueeze(batch_dim)
    rows = keep.flatten().repeat(4)  # unit j's rows j, H + j, 2H + j, 3H + j
    weights = [w * rows.to(w.dtype).view(-1, *([1] * (w.dim() - 1))) for w in module._flat_weights]
    zeros = x.new_zeros(2 if module.bidirectional else 1, x.shape[batch_dim], module.hidden_size)
    output, h, c = _VF.lstm(x, (zeros, zeros), weights, module.bias, module.num_layers, module.dropout,
                            module.training, module.bidirectional, module.batch_first)  # fmt: skip
    if unbatched:
        return output.squeeze(batch_dim), (h.squeeze(1), c.squeeze(1))
    return output, (h, c)


register_module_handler(nn.LSTM, lstm)
ROWS_MASKED_FORWARDS[nn.LSTM] = forward_with_units
