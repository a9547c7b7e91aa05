"""A ViT's token stream (issue 31): the embedding width is one space from the patch embedding to the head, its
class token and position embedding sources of its channels (masked by the ``activation`` strategy, cut with them),
and the tokens taken for the head keep the channels where they are."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import FakeImages
from test_window_attention import masked_half
from torch import nn

from pruneflow import ChannelPruning, ClassifierModule
from pruneflow.compaction import compact
from pruneflow.compaction.cost import count_flops
from pruneflow.compaction.cut import apply_sizes
from pruneflow.compaction.verify import randomize_norms, verify
from pruneflow.graph import ChannelSpace, trace_channel_graph

timm = pytest.importorskip("timm")


def tiny_vit(name: str = "test_vit", **settings: object) -> nn.Module:
    torch.manual_seed(0)
    settings = {"img_size": 32, **settings} if name.startswith("test_") else settings
    settings = {key: value for key, value in settings.items() if value is not None}  # None: the model's own
    return randomize_norms(timm.create_model(name, num_classes=10, **settings)).eval()


def stream_of(model: nn.Module) -> ChannelSpace:
    return next(space for space in trace_channel_graph(model).spaces if "patch_embed.proj" in space.names)


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_the_embedding_width_is_one_space_with_its_token_and_position_embedding_as_sources(pool: str) -> None:
    model = tiny_vit(global_pool=pool)
    stream = stream_of(model)
    assert stream.prunable, stream.refusals
    blocks = len(model.blocks)
    assert set(stream.names) == {"patch_embed.proj"} | {f"blocks.{i}.{layer}" for i in range(blocks)
                                                         for layer in ("attn.proj", "mlp.fc2")}  # fmt: skip
    assert sorted((source.name, source.dim) for source in stream.sources) == [("cls_token", 2), ("pos_embed", 2)]
    assert {consumer.name for consumer in stream.consumers} >= {"head", "blocks.0.attn.qkv", "blocks.0.mlp.fc1"}



@pytest.mark.parametrize("name", ["test_vit", "vit_tiny_patch16_224"])
def test_a_vit_masked_and_cut_computes_the_masked_function_with_fewer_flops(name: str) -> None:
    model = tiny_vit(name, **({"img_size": 32} if name.startswith("vit_") else {}))
    masks = masked_half(model)
    images = torch.randn(2, 3, 32, 32)
    compaction = compact(model, masks)
    report = verify(model, compaction.model, [(images, torch.zeros(2, dtype=torch.long))])
    assert report.agreement == 1.0 and report.exact, report.metrics()
    assert tuple(compaction.model.pos_embed.shape) == (1, model.pos_embed.shape[1], model.embed_dim // 2)
    assert tuple(compaction.model.cls_token.shape) == (1, 1, model.embed_dim // 2)
    assert count_flops(compaction.model, images[:1]) < 0.5 * count_flops(model, images[:1])
    rebuilt = apply_sizes(tiny_vit(name, **({"img_size": 32} if name.startswith("vit_") else {})), compaction.sizes)
    rebuilt.load_state_dict(compaction.model.state_dict())


def test_a_pruned_channel_of_the_stream_stays_zero_with_no_gradient_while_training() -> None:
    model = tiny_vit().train()
    masks = masked_half(model)
    pruned = masks["patch_embed.proj"]
    seen: list[torch.Tensor] = []
    model.blocks[0].norm1.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.0)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 3, 32, 32)).square().mean().backward()
        optimizer.step()
    # measured at the stream itself (what the first block reads: patch tokens, class token, position embedding)
    assert all(tokens[..., pruned].abs().max() == 0 for tokens in seen)
    assert model.pos_embed[..., pruned].abs().max() == 0 and model.cls_token[..., pruned].abs().max() == 0
    original = model.parametrizations.pos_embed.original
    assert original.grad is None or original.grad[..., pruned].abs().max() == 0


def test_mask_heads_with_a_cut_prunes_whole_heads_of_a_vit_through_a_lightning_trainer(tmp_path) -> None:
    model = tiny_vit("test_vit")
    pruning = ChannelPruning("activation", amount=0.5, heads=True, cut_at_step=1, layers=["*.attn.qkv"])
    trainer = L.Trainer(max_steps=3, callbacks=[pruning], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        accelerator="cpu")  # fmt: skip
    module = ClassifierModule(model, lambda parameters: torch.optim.SGD(parameters, lr=0.01), num_classes=10)
    trainer.fit(module, datamodule=FakeImages())
    heads = [block.attn.num_heads for block in module.model.blocks]
    assert heads == [1] * len(heads)  # 2 heads each, half pruned, cut
    assert all(block.attn.qkv.out_features == 3 * block.attn.head_dim for block in module.model.blocks)


def test_a_width_read_from_a_shape_that_sizes_another_tensor_refuses_the_stream() -> None:
    # an attention traced into (a subclass of timm's relative-position attention, which no rule keeps whole):
    # ``x.transpose(1, 2).reshape(B, N, C)`` sizes its heads' output by the stream's width C, which a cut of the
    # stream would change and its heads would not
    from timm.models.vision_transformer_relpos import RelPosAttention

    class TracedAttention(RelPosAttention):
        pass

    model = tiny_vit("test_vit_relpos", img_size=None)
    for block in model.blocks:
        block.attn.__class__ = TracedAttention
    stream = stream_of(model)
    assert not stream.prunable
    assert any(reason.endswith("sizes a tensor by their width, read from a shape, which a cut would not follow")
               for reason in stream.refusals)  # fmt: skip
