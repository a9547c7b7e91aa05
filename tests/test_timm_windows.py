"""timm's window attentions (issue 31): Swin, SwinV2, SwinV2-CR and SAM-ViT, tiny configs of each, and the shape ops
of their windows on small modules.

Their stream is channels last from the patch embedding on: padded to whole windows, cut into windows and put back by
reshapes whose last size is the stream's width read from its shape, merged 2 × 2 into 4 copies side by side. The
stream is one space, coupled through every residual, the attentions' q/k/v rows tied to it (Swin's) or cut in whole
heads (SAM's), the MLPs' hidden widths spaces of their own. Measured from outside: the cut network's logits against
the masked network's, on weights large enough that a masked channel changes them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_channel_graph import check_masked_and_cut
from test_timm_attention_classes import assert_same, mask_half
from torch import Tensor, nn

from pruneflow.compaction import compact
from pruneflow.compaction.cost import count_flops
from pruneflow.graph import ChannelSpace, trace_channel_graph

timm = pytest.importorskip("timm")

# 8 × 8 tokens in windows of 4: the second block of each stage shifts them, so its attention is given a mask
SWINS = {
    "swin_tiny_patch4_window7_224": "layers",
    "swinv2_tiny_window16_256": "layers",
    "swinv2_cr_tiny_224": "stages",
}


def tiny(name: str, **settings: object) -> nn.Module:
    """A 2-stage, 2-block model of ``name`` at 32 px, every parameter drawn at a scale where each one shows."""
    torch.manual_seed(0)
    if name.startswith("samvit"):
        shape = {"embed_dim": 32, "depth": 2, "num_heads": 4, "img_size": 48, "window_size": 2}
        model = timm.create_model(name, num_classes=10, global_attn_indexes=[1], **shape, **settings)
    else:
        shape = {"embed_dim": 16, "depths": (2, 2), "num_heads": (2, 2), "img_size": 32, "window_size": 4}
        model = timm.create_model(name, num_classes=10, **shape, **settings)
    for parameter in model.parameters():
        nn.init.normal_(parameter, std=0.2)
    return model.eval()


def space_of(spaces: list[ChannelSpace], name: str) -> ChannelSpace:
    return next(space for space in spaces if name in space.names)


def masked_and_cut(model: nn.Module, size: int) -> tuple[Tensor, Tensor, nn.Module]:
    """Half of every prunable space masked with ``activation``: the masked and the cut network's logits, the cut."""
    _, masks = mask_half(model)
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        masked = model(images)
        cut = compact(model, masks).model
        return cut(images), masked, cut


@pytest.mark.parametrize("name", SWINS)
def test_a_swin_stream_is_one_space_its_heads_tied_to_it_and_merged_four_times(name: str) -> None:
    layers = SWINS[name]
    graph = trace_channel_graph(tiny(name))
    assert [space.name for space in graph.spaces if not space.prunable] == ["head.fc"]
    stream = space_of(graph.spaces, "patch_embed.proj")  # every attention's proj and MLP's fc2 of the first stage
    assert stream.coupled and {f"{layers}.0.blocks.1.attn.proj", f"{layers}.0.blocks.1.mlp.fc2"} <= set(stream.names)
    heads = space_of(graph.spaces, f"{layers}.0.blocks.1.attn.qkv")
    assert heads.heads == 2 and heads.tied_to is stream
    # the patch merging's reduction reads the stream 4 times over, side by side
    merging = [reader.offset for reader in stream.consumers if reader.name == f"{layers}.1.downsample.reduction"]
    assert merging == [0, 16, 32, 48]


@pytest.mark.parametrize("name", SWINS)
def test_a_cut_swin_computes_the_masked_one(name: str) -> None:
    model = tiny(name)
    cut, masked, compacted = masked_and_cut(model, 32)
    assert_same(cut, masked)
    attention = compacted.get_submodule(f"{SWINS[name]}.0.blocks.1.attn")
    assert (attention.num_heads, attention.qkv.out_features, attention.proj.in_features) == (2, 24, 8)
    # the stream and the MLPs' hidden widths halved (SwinV2-CR's FLOPs at 32 px are mostly its position MLP's)
    mlp = compacted.get_submodule(f"{SWINS[name]}.1.blocks.0.mlp.fc1")
    assert (compacted.patch_embed.proj.out_channels, mlp.in_features, mlp.out_features) == (8, 16, 64)
    images = torch.randn(1, 3, 32, 32)
    assert count_flops(compacted, images) < count_flops(model, images)


def test_swin_with_its_fused_path_cuts_to_the_masked_one_at_the_scale_it_was_built_with() -> None:
    """The fused path divides the logits by √(head width) read from q: the cut keeps it, the full width's scale
    folded into its q rows (and ``scale``, for the other path)."""
    model = tiny("swin_tiny_patch4_window7_224")
    for attention in (m for m in model.modules() if type(m).__name__ == "WindowAttention"):
        attention.fused_attn = True
    cut, masked, compacted = masked_and_cut(model, 32)
    assert_same(cut, masked)
    assert compacted.layers[0].blocks[0].attn.fused_attn


@pytest.mark.parametrize("strategy", ["activation", "weight"])
def test_swinv2_masks_exactly_and_recomputes_its_biased_attention_with_its_window_mask(strategy: str) -> None:
    """SwinV2's q and v biases are read through ``F.linear``: its attention is computed again, with ``mask=``.
    Traced in training mode, as the callback traces it, with stochastic depth (timm's ``DropPath``, kept whole)."""
    model = tiny("swinv2_tiny_window16_256", drop_path_rate=0.1)
    assert model.layers[0].blocks[1].attn_mask is not None  # the shifted block's mask reaches the recomputation
    graph = check_masked_and_cut(model, (3, 32, 32), strategy)
    heads = space_of(graph.spaces, "layers.0.blocks.1.attn.qkv")
    assert heads.prunable and heads.producers[0].unit_name == "layers.0.blocks.1.attn"


def test_samvit_is_cut_in_whole_heads_through_padded_windows() -> None:
    """3 × 3 tokens in windows of 2: padded; its decomposed relative positions are per position of a head."""
    model = tiny("samvit_base_patch16_224")
    graph = trace_channel_graph(model)
    assert [space.name for space in graph.spaces if not space.prunable] == ["head.fc"]
    heads = space_of(graph.spaces, "blocks.0.attn.qkv")
    assert heads.whole_heads and heads.heads == 4 and heads.tied_to is None
    cut, masked, compacted = masked_and_cut(model, 48)
    assert_same(cut, masked)
    assert compacted.blocks[0].attn.num_heads == 2 and compacted.blocks[0].attn.rel_pos_h.shape[1] == 8


def test_hiera_is_cut_in_whole_heads_through_its_unrolled_mask_units() -> None:
    """Hiera's unroll flattens strides into the batch, its q pooling takes a max over positions, its attention is cut
    in whole heads held in ``heads`` and ``dim_out``; its forward's ``mask=None`` is traced as None, as called."""
    torch.manual_seed(0)
    model = timm.create_model(
        "hiera_tiny_224", num_classes=10, embed_dim=16, num_heads=2, stages=(1, 1, 1, 1), img_size=64
    )
    for parameter in model.parameters():
        nn.init.normal_(parameter, std=0.2)
    graph = trace_channel_graph(model.eval())
    assert [space.name for space in graph.spaces if not space.prunable] == ["head.fc"]
    assert space_of(graph.spaces, "blocks.1.attn.qkv").head_attributes == ("heads", "dim_out")
    cut, masked, compacted = masked_and_cut(model, 64)
    assert_same(cut, masked)
    attention = compacted.blocks[1].attn  # 4 heads of 8 at 32 channels: 2 kept
    assert (attention.heads, attention.dim_out, attention.proj.in_features) == (2, 16, 16)


def test_an_attention_of_one_head_is_not_cut_in_whole_heads() -> None:
    """Hiera's first stage has 1 head (``num_heads=1``): pruning it would leave none; its stream is cut."""
    torch.manual_seed(0)
    model = timm.create_model("hiera_tiny_224", num_classes=10, embed_dim=16, num_heads=1, stages=(1, 1, 1, 1),
                              img_size=64).eval()  # fmt: skip
    graph = trace_channel_graph(model)
    single = space_of(graph.spaces, "blocks.0.attn.qkv")
    assert not single.prunable and "single head" in single.refusals[0]
    assert space_of(graph.spaces, "patch_embed.proj").prunable
    cut, masked, _ = masked_and_cut(model, 64)
    assert_same(cut, masked)


class Windows(nn.Module):
    """A conv's channels, last, cut into windows of 2 and put back by its width read from its shape, or by one
    written as a number (``constant``), which a cut would not follow."""

    def __init__(self, constant: bool = False, pad: tuple[int, ...] = (0, 0, 0, 1, 0, 1), dims: int = 1) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 4)
        self.constant, self.pad, self.dims = constant, pad, dims

    def forward(self, x: Tensor) -> Tensor:
        x = torch.roll(self.conv(x).permute(0, 2, 3, 1), 1, dims=self.dims)
        x = F.pad(x, self.pad)
        B, H, W, C = x.shape
        C = 8 if self.constant else C
        x = x.view(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4, C)
        return self.fc(x).mean((0, 1))


def test_windows_by_the_width_read_from_the_shape_keep_the_channels_last_and_cut_exactly() -> None:
    torch.manual_seed(0)
    model = Windows().eval()
    assert space_of(trace_channel_graph(model).spaces, "conv").prunable
    cut, masked, _ = masked_and_cut(model, 9)  # 7 × 7 after the conv, padded to 8 × 8
    assert_same(cut, masked)


@pytest.mark.parametrize(
    ("settings", "why"),
    [
        ({"constant": True}, "is not understood"),  # a width written as a number: the cut would not follow it
        ({"pad": (0, 1)}, "is not understood"),  # padding of the channels
        ({"dims": 3}, "is not understood"),  # a roll along the channels
    ],
)
def test_window_ops_that_reach_the_channels_are_refused(settings: dict[str, object], why: str) -> None:
    space = space_of(trace_channel_graph(Windows(**settings)).spaces, "conv")
    assert not space.prunable and any(why in reason for reason in space.refusals)
