"""Recurrent layers: ``nn.LSTM`` reading a channels-last stream (its input columns) and writing hidden units of its own
(a space, each unit's four gate rows in both directions), and Sequencer2D's vertical and horizontal LSTMs, their
outputs concatenated and read by ``fc``; small (seconds): half of every prunable space masked by L1 with
``activation`` and cut, the cut network equal to the masked one."""

from __future__ import annotations

import copy

import pytest
import torch
from test_window_attention import half_by_l1, masked_and_cut
from torch import nn

from pruneflow.compaction import compact
from pruneflow.compaction.cut import apply_sizes
from pruneflow.compaction.while_training import swap_in
from pruneflow.errors import ConfigError
from pruneflow.graph import ChannelSpace, trace_channel_graph
from pruneflow.graph.layers import kernel_row_mask
from pruneflow.pruning.strategies import make_strategy, zero_optimizer_state
from pruneflow.pruning.telemetry import DriftTelemetry


class Recurrent(nn.Module):
    """A stream (``embed``) read by an LSTM along its tokens, the LSTM's hidden units read by ``head``."""

    def __init__(self, bidirectional: bool = True, layers: int = 1) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 10)
        self.rnn = nn.LSTM(10, 7, layers, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(14 if bidirectional else 7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.flatten(2).transpose(1, 2))  # (B, H·W, 6) → (B, H·W, 10)
        hidden, _ = self.rnn(tokens)
        return self.head(hidden).mean(1)


def space_of(model: nn.Module, name: str) -> ChannelSpace:
    return next(space for space in trace_channel_graph(model).spaces if name in space.names)


def assert_cut_computes_masked(model: nn.Module, images: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    masked, compaction = masked_and_cut(model.eval(), images)
    with torch.no_grad():
        cut = compaction.model(images)
    assert compaction.channels[1] < compaction.channels[0]
    assert torch.allclose(cut, masked, rtol=1e-4, atol=1e-5 * masked.abs().max().item()), (cut - masked).abs().max()
    return compaction


@pytest.mark.parametrize("bidirectional", [True, False])
def test_an_lstm_reads_its_input_columns_and_its_hidden_units_are_cut(bidirectional: bool) -> None:
    torch.manual_seed(0)
    model = Recurrent(bidirectional)
    units = space_of(model, "rnn")
    assert units.prunable and units.width == 7, units.refusals
    directions = [0, 7] if bidirectional else [0]
    assert [(c.name, c.offset) for c in units.consumers] == [("head", offset) for offset in directions]
    stream = space_of(model, "embed")
    assert stream.prunable and [c.name for c in stream.consumers] == ["rnn"], stream.refusals
    images = torch.randn(2, 6, 3, 3)
    compaction = assert_cut_computes_masked(model, images)
    rnn = compaction.model.rnn
    assert (rnn.hidden_size, rnn.input_size) == (4, 5)  # 7 units and 10 channels, half of each cut
    assert rnn.weight_hh_l0.shape == (16, 4) and compaction.model.head.in_features == (8 if bidirectional else 4)


def test_an_lstm_masked_at_its_units_computes_them_as_zero_and_its_others_as_the_cut_one() -> None:
    """A unit's output masked alone would still feed the others through ``weight_hh``: the ``activation`` strategy
    computes the LSTM again with the unit's four gate rows times 0, so its h stays exactly 0 at every step."""
    torch.manual_seed(0)
    model = Recurrent().eval()
    images = torch.randn(2, 6, 3, 3)
    masked_and_cut(model, images)
    with torch.no_grad():
        hidden, _ = model.rnn(model.embed(images.flatten(2).transpose(1, 2)))
    pruned = hidden.abs().amax((0, 1)) == 0
    assert pruned.view(2, 7).all(0).sum() == 3 and torch.equal(pruned[:7], pruned[7:])


@pytest.mark.parametrize(("strategy", "leaks"), [("activation", False), ("control", True)])
def test_the_telemetry_measures_an_lstms_pruned_units_as_its_output_carries_them(strategy: str, leaks: bool) -> None:
    """Seen red: it measured them as an attention's q/k/v rows (``qkv_tensors``) and failed on the LSTM."""
    torch.manual_seed(0)
    model, masking = Recurrent(), make_strategy(strategy)
    layer = next(layer for layer in trace_channel_graph(model).layers if layer.name == "rnn")
    masking.prepare(layer)
    telemetry = DriftTelemetry([layer], masking, dict(model.named_modules()))
    mask = torch.arange(7) % 2 == 0
    masking.apply(layer, mask)
    telemetry.on_pruned(layer, mask)
    telemetry.arm(True)
    model(torch.randn(2, 6, 3, 3))
    leak = telemetry.measure()["leak/activation_abs_mean"]
    assert leak > 0 if leaks else leak == 0


def gate_rows(lstm: nn.LSTM, units: torch.Tensor) -> torch.Tensor:
    return torch.cat([units + gate * lstm.hidden_size for gate in range(4)])


@pytest.mark.parametrize("strategy", ["weight", "hard", "activation"])
def test_strategies_that_zero_kernels_zero_an_lstms_own_gate_rows_and_its_units_output_zero(strategy: str) -> None:
    """A pruned unit's four gate rows (both directions, input and hidden weights, biases) are the LSTM's own tensors'
    rows: zeroed, the unit's gates are σ(0) and tanh(0), its cell and output stay 0 (seen red: the strategies zeroed
    ``LSTMUnits.weight``, a copy, and the unit lived on)."""
    torch.manual_seed(0)
    model, masking = Recurrent(), make_strategy(strategy)
    layer = next(layer for layer in trace_channel_graph(model).layers if layer.name == "rnn")
    masking.prepare(layer)
    mask = torch.arange(7) % 3 == 0
    masking.apply(layer, mask)
    rows = gate_rows(model.rnn, mask.nonzero().flatten())
    for name in model.rnn._flat_weights_names:
        assert getattr(model.rnn, name)[rows].abs().max() == 0, name
    masking.remove(layer)  # the kernels alone keep the units at zero
    with torch.no_grad():
        hidden, _ = model.rnn(model.embed(torch.randn(2, 9, 6)))
    assert hidden[..., torch.cat([mask, mask])].abs().max() == 0


def test_the_gradient_strategy_and_the_optimizer_reset_reach_an_lstms_own_gate_rows() -> None:
    """Seen red: the gradient mask and the optimizer-state reset reached a copy of the rows (no ``.grad``, no
    state)."""
    torch.manual_seed(0)
    model, masking = Recurrent(), make_strategy("gradient")
    layer = next(layer for layer in trace_channel_graph(model).layers if layer.name == "rnn")
    mask = torch.arange(7) % 3 == 0
    masking.prepare(layer)
    masking.apply(layer, mask)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 6, 3, 3)).square().sum().backward()
    optimizer.step()  # momentum of every row, the pruned ones' too
    masking.before_optimizer_step(layer, mask)
    zero_optimizer_state(optimizer, masking.trainable_tensors(layer), kernel_row_mask(layer.producer, mask))
    rows = gate_rows(model.rnn, mask.nonzero().flatten())
    for name in model.rnn._flat_weights_names:
        tensor = getattr(model.rnn, name)
        assert tensor.grad[rows].abs().max() == 0 < tensor.grad.abs().max(), name
        assert optimizer.state[tensor]["momentum_buffer"][rows].abs().max() == 0, name


def test_parametrize_refuses_an_lstms_units_in_one_line_before_training() -> None:
    """Seen red: torch's own error on a record with no ``weight`` parameter."""
    layer = next(layer for layer in trace_channel_graph(Recurrent()).layers if layer.name == "rnn")
    with pytest.raises(ConfigError, match=r"^mask=parametrize cannot mask rnn: its rows are not dim 0 of its "):
        make_strategy("parametrize").prepare(layer)


def test_an_lstm_of_several_layers_is_refused_in_one_line() -> None:
    units = space_of(Recurrent(layers=2), "rnn")
    assert units.refusals[0] == "LSTM rnn has 2 layers; the graph cuts one layer's hidden units only", units.refusals
    assert not space_of(Recurrent(layers=2), "embed").prunable


def test_an_lstm_cut_while_training_carries_its_optimizer_state_and_trains_on_as_the_masked_one() -> None:
    """Adam's state of an LSTM's tensors is cut as the tensors are (seen red: cut as a linear layer's rows and
    columns, it did not fit them)."""
    images, target, runs = torch.randn(4, 6, 3, 3), torch.randn(4, 3), []
    for cut in (False, True):
        torch.manual_seed(0)
        model, masking = Recurrent(), make_strategy("activation")
        masks, layers = half_by_l1(model), {layer.name: layer for layer in trace_channel_graph(model).layers}
        for name, mask in masks.items():
            masking.prepare(layers[name])
            masking.apply(layers[name], mask)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for step in range(6):
            if cut and step == 3:
                compaction = compact(model, masks)
                for layer in layers.values():
                    masking.remove(layer)
                swap_in(model, compaction, [optimizer])
            optimizer.zero_grad()
            (model(images) - target).square().mean().backward()
            optimizer.step()
        with torch.no_grad():
            runs.append(model(images))
    assert model.rnn.hidden_size == 4
    assert torch.allclose(runs[1], runs[0], rtol=1e-4, atol=1e-5 * runs[0].abs().max().item())


timm = pytest.importorskip("timm")


def tiny_sequencer() -> nn.Module:
    from timm.models.sequencer import Sequencer2d

    return Sequencer2d(num_classes=5, img_size=16, layers=(1, 1), patch_sizes=(4, 2), embed_dims=(12, 16),
                       hidden_sizes=(6, 8), mlp_ratios=(2.0, 2.0))  # fmt: skip


def test_sequencer_vertical_and_horizontal_lstms_are_cut_and_read_by_fc() -> None:
    """Sequencer2D's LSTMs were not understood (sequencer2d_s 1.70x): each writes its own units, read twice by
    ``fc`` through the concatenation of the vertical and horizontal directions."""
    torch.manual_seed(0)
    model = tiny_sequencer()
    vertical = space_of(model, "stages.0.blocks.0.rnn_tokens.rnn_v")
    horizontal = space_of(model, "stages.0.blocks.0.rnn_tokens.rnn_h")
    assert vertical.prunable and horizontal.prunable, (vertical.refusals, horizontal.refusals)
    fc = "stages.0.blocks.0.rnn_tokens.fc"
    assert [(c.name, c.offset) for c in vertical.consumers] == [(fc, 0), (fc, 6)]
    assert [(c.name, c.offset) for c in horizontal.consumers] == [(fc, 12), (fc, 18)]
    assert space_of(model, "stem.proj").prunable
    images = torch.randn(2, 3, 16, 16)
    compaction = assert_cut_computes_masked(model, images)
    block = compaction.model.stages[1].blocks[0].rnn_tokens
    assert block.rnn_v.hidden_size == block.rnn_h.hidden_size == 4 and block.rnn_v.input_size == 8
    fresh = copy.deepcopy(model).eval()
    apply_sizes(fresh, compaction.sizes).load_state_dict(compaction.model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(images), compaction.model(images))
