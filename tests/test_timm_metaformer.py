"""timm's MetaFormer pieces (PoolFormerV2, ConvFormer, CAFormer) on tiny networks written here: StarReLU
(``s · relu(x)² + b``, one s and one b for every channel) straight after an MLP's first layer is that layer's
channel point, masked after its bias; the no-bias LayerNorms over the channels are norms; a ``Scale`` is a layer
scale cut with its channels. Each is traced, half of every space masked and cut, the cut network equal to the
masked one."""

from __future__ import annotations

import pytest
from test_graph_cnn_rules import OUTPUT, conv_bn, head, refusals
from test_graph_defects import assert_cut_equals_masked
from torch import Tensor, nn

from pruneflow.graph import trace_channel_graph

metaformer = pytest.importorskip("timm.models.metaformer")
import pruneflow.graph.handlers.timm_layers  # noqa: E402, F401  (timm is imported: its rules register at trace)


class StarMlp(nn.Module):
    """A conv stem, a MetaFormer MLP whose StarReLU has a bias ≠ 0 (a mask before it would leak), a residual."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers import Mlp

        act = lambda: metaformer.StarReLU(scale_value=1.5, bias_value=0.3)  # noqa: E731
        self.stem, self.mlp, self.head = conv_bn(3, 8), Mlp(8, 16, act_layer=act, use_conv=True), head(8)
        self.scale = metaformer.Scale(8, init_value=0.5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        return self.head(x + self.scale(self.mlp(x)))


class NoBiasNorms(nn.Module):
    """PoolFormerV2's downsampling (a LayerNorm2d without bias, then a conv) and a channels-last one without bias."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.down = metaformer.Downsampling(8, 12, 3, padding=1, norm_layer=metaformer.LayerNorm2dNoBias)
        self.norm, self.linear = metaformer.LayerNormNoBias(12), nn.Linear(12, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.norm(self.down(self.stem(x)).permute(0, 2, 3, 1)).mean((1, 2)))


def test_star_relu_after_an_mlp_layer_is_its_channel_point_and_cuts_exactly() -> None:
    assert refusals(StarMlp()) == [OUTPUT]
    fc1 = next(layer for layer in trace_channel_graph(StarMlp()).layers if layer.name == "mlp.fc1")
    assert fc1.channel_point_name == "mlp.act"
    assert_cut_equals_masked(StarMlp())


class StarOnSum(nn.Module):
    """StarReLU reading a residual sum: no single producer's, so its bias revives the masked channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.act, self.c, self.head = conv_bn(3, 8), conv_bn(3, 8), \
            metaformer.StarReLU(bias_value=0.3), conv_bn(8, 8), head(8)  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.c(self.act(self.a(x) + self.b(x))))


def test_star_relu_on_a_sum_revives_the_channels_it_carries() -> None:
    (reason,) = refusals(StarOnSum())[0]
    assert "act turns a masked channel's 0 into f(0) ≠ 0 before c.0 reads it" in reason


def test_metaformer_no_bias_layer_norms_are_norms_and_cut_exactly() -> None:
    assert refusals(NoBiasNorms()) == [OUTPUT]
    assert_cut_equals_masked(NoBiasNorms())


class PoolFormerV2Blocks(nn.Module):
    """Two of PoolFormerV2's blocks on a conv stem: GroupNorms of one group (one without β, one with), the
    ``pool(x) - x`` mixer, an MLP with StarReLU, residual scales."""

    def __init__(self) -> None:
        super().__init__()
        block = metaformer.MetaFormerBlock
        self.stem, self.head = conv_bn(3, 8), head(8)
        self.blocks = nn.Sequential(
            block(8, norm_layer=metaformer.GroupNorm1NoBias, res_scale_init_value=0.7),
            block(8, norm_layer=metaformer.GroupNorm1, layer_scale_init_value=0.5),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


def test_a_group_norm_of_one_group_is_a_norm_of_the_stream_and_cuts_exactly() -> None:
    """Its statistics span every channel and position of a sample: under ``activation`` recomputed over the kept
    channels, as the cut norm computes them; it refused PoolFormerV2's stream."""
    assert refusals(PoolFormerV2Blocks()) == [OUTPUT]
    assert_cut_equals_masked(PoolFormerV2Blocks())
