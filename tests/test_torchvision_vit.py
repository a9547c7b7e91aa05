"""torchvision's ViT (issues 30 and 31): its embedding width is one space from the patch embedding to the head,
through ``nn.MultiheadAttention`` (kept whole: its packed ``in_proj`` reads the stream, its q, k, v rows tied to
it, its ``out_proj`` writes it), its class token and position embedding sources of the stream, and the reshape of
its patches by ``hidden_dim``, an attribute the cut sets."""

from __future__ import annotations

import copy

import lightning as L
import numpy as np
import pytest
import torch
from helpers import FakeImages
from test_budget import cut_costs, graph_spaces
from test_channel_graph import check_masked_and_cut, space_of
from test_window_attention import masked_half
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models import VisionTransformer

from pruneflow import ClassifierModule
from pruneflow.compaction import compact
from pruneflow.compaction.cost import count_flops
from pruneflow.compaction.cut import apply_sizes
from pruneflow.compaction.verify import randomize_norms
from pruneflow.errors import ConfigError
from pruneflow.graph import ChannelSpace, trace_channel_graph
from pruneflow.models.small_torchvision import vit
from pruneflow.pruning.budget import CostModel
from pruneflow.pruning.callback import ChannelPruning
from pruneflow.pruning.strategies import make_strategy


def randomized(network: nn.Module) -> nn.Module:
    """``network`` with random norms and a random head: torchvision's ViT starts its head at zero, whose logits
    would be 0 whatever the network before it computes, and hide any difference."""
    with torch.no_grad():
        network.heads.head.weight.normal_()
        network.heads.head.bias.normal_()
    return randomize_norms(network)


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    network = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                                num_classes=10)  # fmt: skip
    return randomized(network)


def small_vit() -> nn.Module:
    torch.manual_seed(0)
    return randomized(vit(num_layers=2, hidden_dim=32, mlp_dim=64))


MODELS = {"tiny": tiny_vit, "small_torchvision": small_vit}


def stream_of(model: nn.Module) -> ChannelSpace:
    return next(space for space in trace_channel_graph(model).spaces if "conv_proj" in space.names)


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a − b| at its largest, over the largest |a|: a tolerance that scales with the values compared."""
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("build", MODELS.values(), ids=MODELS)
def test_the_embedding_width_is_one_prunable_space_through_each_attention(build) -> None:
    model = build()
    layers = len(model.encoder.layers)
    stream = stream_of(model)
    assert stream.prunable, stream.refusals
    blocks = [f"encoder.layers.encoder_layer_{i}" for i in range(layers)]
    writers = {f"{block}.{layer}" for block in blocks for layer in ("self_attention.out_proj", "mlp.3")}
    assert set(stream.names) == {"conv_proj"} | writers
    sources = sorted((source.name, source.dim) for source in stream.sources)
    assert sources == [("class_token", 2), ("encoder.pos_embedding", 2)]
    assert stream.held_by == [("", "hidden_dim")]
    assert {consumer.name for consumer in stream.consumers} == {"heads.head"} | {
        f"{b}.{layer}" for b in blocks for layer in ("self_attention", "mlp.0")
    }
    heads = stream.tied
    assert [space.name for space in heads] == [f"{b}.self_attention" for b in blocks]
    assert all(space.prunable and space.heads == model.encoder.layers[0].num_heads for space in heads)



@pytest.mark.parametrize("build", MODELS.values(), ids=MODELS)
def test_the_cut_vit_computes_the_masked_function_with_fewer_flops(build) -> None:
    model = build().eval()
    masks = masked_half(model)
    assert masks["conv_proj"].sum() == 16
    images = torch.randn(2, 3, 32, 32)
    compaction = compact(model, masks)
    cut = compaction.model.eval()
    with torch.no_grad():
        masked_logits, cut_logits = model(images), cut(images)
    assert relative_gap(masked_logits, cut_logits) < 1e-4
    assert cut.hidden_dim == 16 and tuple(cut.class_token.shape) == (1, 1, 16)
    for block in cut.encoder.layers:
        attention = block.self_attention
        assert (attention.embed_dim, attention.num_heads, attention.head_dim) == (16, 4, 4)
        assert tuple(attention.in_proj_weight.shape) == (48, 16) and tuple(attention.in_proj_bias.shape) == (48,)
        assert (attention.out_proj.in_features, attention.out_proj.out_features) == (16, 16)
    assert count_flops(cut, images[:1]) < 0.5 * count_flops(model, images[:1])
    # torch's fast path (inference, batch_first, an even head count) computes what its slow path does
    with torch.inference_mode():
        fast = cut(images)
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            slow = cut(images)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    assert relative_gap(slow, fast) < 1e-4 and relative_gap(masked_logits, fast) < 1e-4
    rebuilt = apply_sizes(build(), compaction.sizes)
    rebuilt.load_state_dict(cut.state_dict())
    assert rebuilt.hidden_dim == 16 and rebuilt.encoder.layers[0].self_attention.embed_dim == 16


def test_a_pruned_channel_of_the_stream_stays_zero_while_training_with_adamw() -> None:
    model = tiny_vit().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)

    def steps(count: int) -> None:
        for _ in range(count):
            optimizer.zero_grad()
            model(torch.randn(4, 3, 32, 32)).square().mean().backward()
            optimizer.step()

    steps(2)  # moments of their own in every row and entry, which would move a pruned one on
    pruned = masked_half(model)["conv_proj"]
    seen: list[torch.Tensor] = []
    for block in model.encoder.layers:  # the stream as each block, and the final norm, reads it
        block.ln_1.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach()))
    model.encoder.ln.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach()))
    steps(3)
    assert len(seen) == 9 and all(tokens[..., pruned].abs().max() == 0 for tokens in seen)
    assert model.class_token[..., pruned].abs().max() == 0 and model.encoder.pos_embedding[..., pruned].abs().max() == 0


class Tokens(nn.Module):
    """A linear embedding, one self-attention block with its residual, a linear head: tokens (L, N, C), or (N, L, C)
    with ``batch_first``."""

    def __init__(self, batch_first: bool, **attention: object) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.attention = nn.MultiheadAttention(16, 4, batch_first=batch_first, **attention)
        self.head = nn.Linear(16, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        attended, _ = self.attention(x, x, x, need_weights=False)
        return self.head(x + attended)


@pytest.mark.parametrize("batch_first", [True, False])
def test_an_attention_batch_first_or_not_is_masked_and_cut_exactly(batch_first: bool) -> None:
    torch.manual_seed(0)
    model = Tokens(batch_first).eval()
    masks = masked_half(model)
    tokens = torch.randn(2, 5, 8)
    cut = compact(model, masks).model.eval()
    with torch.no_grad():
        assert relative_gap(model(tokens), cut(tokens)) < 1e-4
    attention = cut.attention
    assert (attention.embed_dim, attention.head_dim, tuple(attention.in_proj_weight.shape)) == (8, 2, (24, 8))


class CrossAttention(Tokens):
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        attended, _ = self.attention(x, x.flip(1), x.flip(1), need_weights=False)
        return self.head(x + attended)


class MaskedAttention(Tokens):
    def __init__(self, batch_first: bool) -> None:
        super().__init__(batch_first)
        self.register_buffer("causal", torch.ones(5, 5, dtype=torch.bool).triu(1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        attended, _ = self.attention(x, x, x, need_weights=False, attn_mask=self.causal)
        return self.head(x + attended)


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (Tokens(True, kdim=12, vdim=12), "reads keys and values of other widths (kdim=12, vdim=12)"),
        (Tokens(True, add_bias_kv=True), "adds keys and values of its own (add_bias_kv or add_zero_attn)"),
        (Tokens(True, add_zero_attn=True), "adds keys and values of its own (add_bias_kv or add_zero_attn)"),
        (CrossAttention(True), "reads keys and values from another input than its query"),
        (MaskedAttention(True), "is given an attention mask by the model"),
    ],
    ids=["kdim", "add_bias_kv", "add_zero_attn", "cross", "attn_mask"],
)
def test_an_attention_the_cut_cannot_follow_refuses_its_input_in_one_line(model: nn.Module, reason: str) -> None:
    embedding = next(space for space in trace_channel_graph(model).spaces if "embed" in space.names)
    assert not embedding.prunable
    assert f"attention attention {reason}" in embedding.refusals


def test_whole_heads_with_a_cut_are_refused_before_training_the_head_width_follows_the_stream() -> None:
    pruning = ChannelPruning(heads=True, amount=0.5, cut_at_epoch=1)
    refusal = r"^mask.heads=true cannot cut the whole heads of encoder.layers.encoder_layer_0.self_attention: "
    refusal += r".*nn.MultiheadAttention"
    with pytest.raises(ConfigError, match=refusal) as no:
        pruning.plan.choose_spaces(tiny_vit())
    assert "\n" not in str(no.value)


@pytest.mark.parametrize("strategy", ["activation", "weight", "gradient", "hard", "parametrize", "control"])
def test_every_strategy_masks_the_vit_and_cuts_it(strategy: str) -> None:
    # ``activation``: what each consumer receives and each producer's pruned rows' gradient, measured from outside
    graph = check_masked_and_cut(tiny_vit(), (3, 32, 32), strategy)
    assert space_of(graph, "encoder.layers.encoder_layer_1.self_attention").tied_to is space_of(graph, "conv_proj")


def test_flops_count_the_attention_which_its_fast_path_would_hide() -> None:
    # in inference torch runs nn.MultiheadAttention as one fused op the FLOP counter has no formula for
    model, image = tiny_vit().eval(), torch.randn(1, 3, 32, 32)
    with FlopCounterMode(display=False) as op_by_op:  # gradients on: the op-by-op path, as when training
        model(image)
    assert count_flops(model, image) == op_by_op.get_total_flops()


def test_the_cost_model_of_a_target_predicts_the_cut_vits_flops_and_params_exactly() -> None:
    network, image = tiny_vit().eval(), torch.randn(1, 3, 32, 32)
    spaces = graph_spaces(network)
    model = CostModel(network, spaces, image)
    flops_ratio, params_ratio = cut_costs(network, spaces, {space.name: 0.5 for space in spaces}, image)
    counts = np.array([space.width // 2 for space in spaces], dtype=np.float64)
    assert model.measured_flops / model.flops(counts) == pytest.approx(flops_ratio, rel=1e-9)
    assert model.measured_params / model.params(counts) == pytest.approx(params_ratio, rel=1e-9)


def test_whole_heads_masked_compute_the_attention_without_them() -> None:
    # mask.heads=true without a cut: a masked head's q, k and v rows are 0, its output 0, the other heads untouched
    model = tiny_vit().eval()
    reference = copy.deepcopy(model)
    attention = "encoder.layers.encoder_layer_0.self_attention"
    layer = next(layer for layer in trace_channel_graph(model).layers if layer.name == attention)
    pruned = torch.tensor([True, False, False, True]).view(1, 4, 1).expand(3, 4, 8).flatten()
    masking = make_strategy("activation")
    masking.prepare(layer)
    masking.apply(layer, pruned)
    with torch.no_grad():
        reference.get_submodule(attention).in_proj_weight[pruned] = 0
        reference.get_submodule(attention).in_proj_bias[pruned] = 0
        images = torch.randn(2, 3, 32, 32)
        assert relative_gap(reference(images), model(images)) < 1e-5


def test_a_cut_while_training_carries_the_attentions_optimizer_state_and_trains_on() -> None:
    model = tiny_vit()
    pruning = ChannelPruning("activation", amount=0.5, groups=True, cut_at_step=1)
    trainer = L.Trainer(max_steps=3, callbacks=[pruning], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")  # fmt: skip
    module = ClassifierModule(model, lambda parameters: torch.optim.AdamW(parameters, lr=0.01), num_classes=10)
    trainer.fit(module, datamodule=FakeImages())
    cut = module.model
    assert cut.hidden_dim == 16 and tuple(cut.encoder.pos_embedding.shape) == (1, 17, 16)
    attention = cut.encoder.layers[1].self_attention
    assert (attention.embed_dim, attention.num_heads, attention.head_dim) == (16, 4, 4)
    state = trainer.optimizers[0].state[attention.in_proj_weight]
    assert state["exp_avg"].shape == attention.in_proj_weight.shape == (48, 16)
