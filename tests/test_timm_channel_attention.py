"""timm's attentions kept whole where their insides defeat the op-by-op walk: SwiftFormer's additive attention
(an L2 normalisation over the channels, a learned ``w_g``) and MViTv2's pooling attention (q, k, v pooled per head,
whole heads cut), each traced on a tiny network, half of every space masked by ``activation`` and cut, and the
cut network compared with the masked one; DaViT's channel attention (a softmax across a head's channels), cut
inside its heads with its stream."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import FakeImages
from test_graph_cnn_rules import OUTPUT, conv_bn, head, refusals
from test_graph_defects import assert_cut_equals_masked
from test_window_attention import masked_and_cut
from torch import Tensor, nn

from pruneflow import ChannelPruning, ClassifierModule
from pruneflow.compaction.cut import apply_sizes
from pruneflow.compaction.verify import randomize_norms
from pruneflow.graph import trace_channel_graph

swiftformer = pytest.importorskip("timm.models.swiftformer")
mvitv2 = pytest.importorskip("timm.models.mvitv2")
import pruneflow.graph.handlers.timm_layers  # noqa: E402, F401  (timm is imported: its rules register at trace)


class AdditiveBlock(nn.Module):
    """A conv stem, SwiftFormer's additive attention added to the stream, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.attn, self.head = conv_bn(3, 8), swiftformer.EfficientAdditiveAttention(8, 8), head(8)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        return self.head(x + self.attn(x))


def test_the_additive_attentions_query_key_and_proj_rows_are_one_space_cut_exactly() -> None:
    graph = trace_channel_graph(AdditiveBlock())
    rows = next(space for space in graph.spaces if "attn.to_query" in space.names)
    assert rows.prunable and set(rows.names) == {"attn.to_query", "attn.to_key", "attn.proj"}
    assert {consumer.name for consumer in rows.consumers} == {"attn.proj", "attn.final"}
    assert [(scale.name, scale.dim) for scale in rows.scales] == [("attn.w_g", 0)]
    assert refusals(AdditiveBlock()) == [OUTPUT]
    assert_cut_equals_masked(AdditiveBlock())


def test_a_tiny_swiftformer_masked_and_cut_computes_the_masked_network() -> None:
    torch.manual_seed(0)
    model = swiftformer.SwiftFormer(layers=[1, 1, 1, 1], embed_dims=[8, 16, 24, 32], num_classes=10,
                                    layer_scale_init_value=1.0)  # fmt: skip
    unpruned = [space.refusals for space in trace_channel_graph(randomize_norms(model)).spaces if not space.prunable]
    assert unpruned == [OUTPUT]
    assert_cut_equals_masked(model)


def tiny_mvitv2() -> nn.Module:
    """Two stages of one block, 2 and 4 heads of 8 positions (16 and 32 wide), q pooled by 2 in the second, 32 px."""
    torch.manual_seed(0)
    config = mvitv2.MultiScaleVitCfg(depths=(1, 1), embed_dim=16, num_heads=2)
    return randomize_norms(mvitv2.MultiScaleVit(config, img_size=(32, 32), num_classes=10)).eval()


def test_mvitv2s_pooling_attention_is_cut_in_whole_heads_its_stream_with_it_as_the_masked_network_computes() -> None:
    model = tiny_mvitv2()
    graph = trace_channel_graph(model)
    heads = [space for space in graph.spaces if space.heads_of is not None]
    assert [(space.heads_of, space.heads, space.prunable) for space in heads] == [
        ("stages.0.blocks.0.attn", 2, True), ("stages.1.blocks.0.attn", 4, True)]  # fmt: skip
    # each stage's stream too, through the shortcut's Linear and max pooling where the stage widens and pools
    assert [space.refusals for space in graph.spaces if not space.prunable] == [OUTPUT]
    images = torch.randn(2, 3, 32, 32)
    masked, compaction = masked_and_cut(model, images)
    with torch.no_grad():
        cut = compaction.model(images)
    attention = compaction.model.stages[1].blocks[0].attn
    assert (attention.num_heads, attention.dim_out, attention.proj.in_features) == (2, 16, 16)
    assert compaction.model.stages[1].blocks[0].shortcut_proj_attn.out_features == 16
    assert torch.allclose(cut, masked, rtol=1e-4, atol=1e-5 * masked.abs().max().item()), (cut - masked).abs().max()
    rebuilt = apply_sizes(tiny_mvitv2(), compaction.sizes).eval()  # a checkpoint of the cut network loads into it
    rebuilt.load_state_dict(compaction.model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(images), cut)


def test_a_one_head_pooling_attention_is_refused_in_one_line() -> None:
    torch.manual_seed(0)
    config = mvitv2.MultiScaleVitCfg(depths=(1,), embed_dim=16, num_heads=1, stride_q=((1, 1),))
    graph = trace_channel_graph(mvitv2.MultiScaleVit(config, img_size=(32, 32), num_classes=10))
    (heads,) = [space for space in graph.spaces if space.heads_of is not None]
    assert heads.refusals[0] == ("pooling attention stages.0.blocks.0.attn has one head, and whole heads are all it "
                                 "can lose")  # fmt: skip


class ChannelAttentionBlock(nn.Module):
    """A conv stem turned into tokens, DaViT's channel attention added to them, a mean over the tokens, a head."""

    def __init__(self) -> None:
        super().__init__()
        from timm.models.davit import ChannelAttention

        self.stem, self.attn, self.head = conv_bn(3, 8), ChannelAttention(8, num_heads=2), nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x).flatten(2).transpose(1, 2)
        return self.head((x + self.attn(x)).mean(1))


def test_davits_channel_attention_is_cut_inside_its_heads_with_the_stream_exactly() -> None:
    """Its softmax runs across a head's channels: the ``activation`` mask takes a pruned position out of it, so a
    head loses the same positions from q, k and v, the stream as many per head (``timm_davit``)."""
    graph = trace_channel_graph(ChannelAttentionBlock())
    rows, stream = (next(s for s in graph.spaces if name in s.names) for name in ("attn.qkv", "stem.0"))
    assert not rows.whole_heads and rows.groups == 3 and rows.tied_to is stream and stream.multiple == 2
    assert refusals(ChannelAttentionBlock()) == [OUTPUT]
    assert_cut_equals_masked(ChannelAttentionBlock())


def test_a_tiny_mvitv2_trains_pruned_through_a_lightning_trainer_and_is_cut(tmp_path) -> None:
    """The attention's recomputed forward returns its (output, pooled size) pair through training, telemetry
    and the cut at a step."""
    pruning = ChannelPruning("activation", amount=0.5, cut_at_step=2)
    trainer = L.Trainer(max_steps=3, callbacks=[pruning], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        accelerator="cpu")  # fmt: skip
    module = ClassifierModule(tiny_mvitv2(), lambda parameters: torch.optim.SGD(parameters, lr=0.01), num_classes=10)
    trainer.fit(module, datamodule=FakeImages())
    assert [stage.blocks[0].attn.num_heads for stage in module.model.stages] == [1, 2]
