"""The activation mask's guarantee on each findings family (issue 30), measured from outside the mask.

For a tiny network of each family — CIFAR ResNet (residual additions: coupled groups), MobileNetV2 (inverted
residuals: projection + BatchNorm with no activation, ReLU6, depthwise), MobileNetV3 (hard-swish,
squeeze-and-excitation gates whose hard-sigmoid is 0.5 at 0), ConvNeXt (depthwise 7×7, LayerNorm across the
channels, GELU, layer scale) and ViT (LayerNorm, GELU MLP) — half of every prunable space is pruned, groups
included, after a few steps of training; then every consumer of a pruned channel receives exactly 0, every
producer's pruned rows get exactly 0 gradient, and with the optimizer state reset the pruned kernels stay
exactly 0 under SGD with momentum and AdamW.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import PROBE_TAG, QUIET, ConsumerInputProbe, run_train
from test_channel_graph import check_masked_and_cut
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pruneflow import ChannelPruning, ClassifierModule
from pruneflow.models import ResNet, convnext, mobilenet_v2, mobilenet_v3, vit
from pruneflow.pruning import trace_channel_graph

SHAPE = (3, 16, 16)
PRUNE_AT, STEPS = 3, 8

# Tiny members of each family, each with every kind of block the family's config has.
MOBILENET_V2_ROWS = [[1, 8, 1, 1], [4, 8, 2, 2]]
MOBILENET_V3_ROWS = [[8, 3, 8, 8, True, "RE", 2], [8, 3, 24, 8, False, "RE", 1], [8, 5, 24, 16, True, "HS", 2]]
FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "resnet": lambda: ResNet(SHAPE, 4, depth=8, width=4),
    "mobilenet_v2": lambda: mobilenet_v2(SHAPE, 4, inverted_residual_setting=MOBILENET_V2_ROWS, last_channel=16),
    "mobilenet_v3": lambda: mobilenet_v3(SHAPE, 4, MOBILENET_V3_ROWS, last_channel=16),
    "convnext": lambda: convnext(SHAPE, 4, [[8, 16, 1], [16, None, 2]], layer_scale=0.5),
    "vit": lambda: vit(SHAPE, 4, patch_size=4, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16),
}
# What the channel graph prunes in each (a space the graph cannot follow is left alone, and said so).
PRUNABLE_KINDS = {
    "resnet": "block-internal and residual-stream groups",
    "mobilenet_v2": "expansions and the projection streams",
    "mobilenet_v3": "expansions, SE hidden widths, SE-gated groups",
    "convnext": "MLP hidden widths and the LayerNorm'd streams",
    "vit": "the embedding width (with its attentions' q, k, v rows) and MLP hidden widths",
}
OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2),
}


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(STEPS * 8, *SHAPE, generator=generator)
    labels = torch.randint(0, 4, (STEPS * 8,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=8)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_traces_into_prunable_spaces(family: str) -> None:
    graph = trace_channel_graph(FAMILIES[family]())
    assert graph.prunable, f"{family}: nothing prunable ({PRUNABLE_KINDS[family]} expected)"
    assert any(space.coupled for space in graph.prunable), f"{family}: no coupled group"


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_channels_reach_no_consumer_and_the_cut_network_computes_the_masked_one(family: str) -> None:
    check_masked_and_cut(FAMILIES[family](), SHAPE, "activation")


# Each mask with the optimizer that tests it hardest: SGD's momentum moves unreset kernels; AdamW's moments and
# its decoupled decay act on every stored weight, so a reset that missed one would show.
@pytest.mark.parametrize(("reset", "optimizer"), [(False, "sgd"), (True, "adamw")],
                         ids=["activation", "activation_reset"])  # fmt: skip
@pytest.mark.parametrize("family", FAMILIES)
def test_activation_mask_never_leaks_and_with_reset_never_drifts(family: str, reset: bool, optimizer: str) -> None:
    torch.manual_seed(0)
    model = FAMILIES[family]()
    pruning = ChannelPruning(strategy="activation", amount=0.5, groups=True, at_step=PRUNE_AT, log_every_n_steps=1,
                             reset_optimizer_state=reset)  # fmt: skip
    probe = ConsumerInputProbe()
    trainer = L.Trainer(
        max_epochs=1, callbacks=[pruning, probe], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(ClassifierModule(model, OPTIMIZERS[optimizer], num_classes=4), train_dataloaders=loader())
    metrics = pruning.final_metrics()
    assert probe.forwards_after_pruning == STEPS - PRUNE_AT
    assert probe.final_metrics()[PROBE_TAG] == 0.0, probe.received()  # what the consumers actually read
    assert metrics["leak/activation_abs_mean/max"] == 0.0
    assert metrics["grad/pruned_l2/max"] == 0.0
    if reset:
        assert metrics["drift/producer_l2/max"] == 0.0
        assert metrics["drift/zero_fraction/final"] == 1.0
    else:  # without the reset, SGD's momentum and Adam's moments from before pruning move the kernels
        assert metrics["drift/producer_l2/final"] > 0.0


@pytest.mark.slow  # one tiny run per family through train.py: about 20 s each on two cores
@pytest.mark.parametrize("family", ["resnet20", "mobilenet_v2", "mobilenet_v3", "convnext", "vit"])
def test_each_family_experiment_runs_prunes_and_compacts_to_the_masked_network(family: str, tmp_path: Path) -> None:
    result = run_train(
        f"experiment=findings_{family}", "data=synthetic", "~data.verify", "data.input_shape=[3,32,32]",
        "data.num_train=300", "data.num_test=100", "data.batch_size=32", "trainer.max_epochs=2",
        "mask=activation_reset", "optimizer=adamw", f"hydra.run.dir={tmp_path}", *QUIET,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["complete"] is True and metrics["drift/producer_l2/max"] == 0.0
    # the eval-mode leak: the training leak is read at log_every_n_steps multiples, past these 18 steps
    assert metrics["leak/eval_activation_abs_mean/max"] == 0.0
    assert metrics["compact/max_rel_diff"] <= 1e-4  # the cut network computes the masked one


def test_vit_embedding_width_is_one_prunable_coupled_space() -> None:
    graph = trace_channel_graph(FAMILIES["vit"]())
    stream = [space for space in graph.spaces if "conv_proj" in space.names]
    assert stream and stream[0].prunable and stream[0].coupled, stream and stream[0].refusals
