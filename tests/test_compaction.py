"""Compaction: masked models cut to smaller ones that compute the same function, refusals, export, entry points.

Models get random BatchNorm statistics and affine parameters first, so a masked channel's β is not
zero: masks then change the output, and a compaction that dropped the wrong rows or columns would too.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from helpers import QUIET, run_train
from test_train import scalar_tags
from torch import Tensor, nn

from pruneflow.compaction import (
    CompactionError,
    compact,
    compact_and_verify,
    export_compact,
    load_compact,
    load_exported,
)
from pruneflow.compaction.verify import randomize_norms, verify
from pruneflow.graph import PrunableLayer, find_prunable_layers
from pruneflow.models import VGG, ConvNet, ResNet
from pruneflow.pruning.selection import select_layers
from pruneflow.pruning.strategies import make_strategy

TOLERANCE = 1e-5


def random_masks(layers: list[PrunableLayer], seed: int = 0) -> dict[str, Tensor]:
    """About half of each layer's channels, never none and never all."""
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for layer in layers:
        mask = torch.rand(layer.num_channels, generator=generator) < 0.5
        mask[0], mask[-1] = True, False
        masks[layer.name] = mask
    return masks


def mask_with(strategy: str, model: nn.Module, masks: dict[str, Tensor]) -> None:
    by_name = {layer.name: layer for layer in find_prunable_layers(model)}
    masking = make_strategy(strategy)
    for name, mask in masks.items():
        masking.apply(by_name[name], mask)


def kept(masks: dict[str, Tensor], name: str) -> int:
    return int((~masks[name]).sum())


def convnet_shapes(masks: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
    a, b, c = (kept(masks, f"features.{i}") for i in (0, 4, 8))
    return {
        "features.0.weight": (a, 1, 3, 3), "features.1.running_var": (a,), "features.4.weight": (b, a, 3, 3),
        "features.5.bias": (b,), "features.8.weight": (c, b, 3, 3), "classifier.2.weight": (10, c * 3 * 3),
    }  # fmt: skip


def vgg_shapes(masks: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
    a, b, c = (kept(masks, f"features.{i}") for i in (0, 4, 8))
    return {"features.0.weight": (a, 3, 3, 3), "features.4.weight": (b, a, 3, 3), "features.8.weight": (c, b, 3, 3),
            "features.9.running_mean": (c,), "classifier.2.weight": (10, c)}  # fmt: skip


def resnet_shapes(masks: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for stage, width in ((1, 4), (2, 8), (3, 16)):
        for block in range(3):
            name = f"layer{stage}.{block}"
            inner = kept(masks, f"{name}.conv1")
            in_channels = width // 2 if stage > 1 and block == 0 else width
            shapes[f"{name}.conv1.weight"] = (inner, in_channels, 3, 3)
            shapes[f"{name}.bn1.weight"] = (inner,)
            shapes[f"{name}.conv2.weight"] = (width, inner, 3, 3)
    return shapes


FAMILIES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], Callable[..., dict[str, tuple[int, ...]]]]] = {
    "convnet": (lambda: ConvNet(channels=(6, 8, 12)), (1, 28, 28), convnet_shapes),
    "vgg": (lambda: VGG(layers=[8, "M", 12, "M", 16]), (3, 32, 32), vgg_shapes),
    "resnet20": (lambda: ResNet(depth=20, width=4), (3, 32, 32), resnet_shapes),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_activation_masked_model_compacts_to_the_same_function(family: str) -> None:
    build, input_shape, expected_shapes = FAMILIES[family]
    torch.manual_seed(0)
    model = randomize_norms(build())
    images = torch.randn(8, *input_shape)
    dense = model(images)
    masks = random_masks(select_layers(find_prunable_layers(model), None))  # ResNet: block-internal convs
    mask_with("activation", model, masks)
    masked = model(images)
    assert (masked - dense).abs().max() > 1e-2  # β ≠ 0: the masks matter

    compaction = compact(model, masks)

    assert (compaction.model(images) - masked).abs().max() <= TOLERANCE
    assert torch.equal(model(images), masked)  # the masked network is left as it was
    shapes = {name: tuple(tensor.shape) for name, tensor in compaction.model.state_dict().items()}
    assert {name: shapes[name] for name in expected_shapes(masks)} == expected_shapes(masks)
    assert compaction.removed == {name: mask.nonzero().flatten().tolist() for name, mask in masks.items()}
    assert not any(module._forward_hooks for module in compaction.model.modules())


def test_channel_on_one_branch_of_a_residual_addition_is_refused_naming_the_layer() -> None:
    model = randomize_norms(ResNet(depth=20, width=4))
    mask_with("activation", model, {"layer1.1.conv2": torch.tensor([True, False, False, False])})
    with pytest.raises(CompactionError, match=r"\[0\] of layer1\.1\.conv2: its channel space is also written by conv1"):
        compact(model, {"layer1.1.conv2": [0]})


def test_residual_channel_pruned_by_its_whole_coupled_group_is_cut() -> None:
    model = randomize_norms(ResNet(depth=20, width=4))
    stage1 = ["conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"]
    stage2 = ["layer2.0.shortcut.0", "layer2.0.conv2", "layer2.1.conv2", "layer2.2.conv2"]
    masks = {name: torch.tensor([False, True, False, True]) for name in stage1}
    masks |= {name: torch.arange(8) % 4 == 0 for name in stage2}
    mask_with("activation", model, masks)
    images = torch.randn(4, 3, 32, 32)
    masked = model(images)

    compaction = compact(model, masks)

    assert (compaction.model(images) - masked).abs().max() <= TOLERANCE
    shapes = {name: tuple(tensor.shape) for name, tensor in compaction.model.state_dict().items()}
    assert shapes["conv1.weight"] == (2, 3, 3, 3) and shapes["bn1.running_mean"] == (2,)
    assert shapes["layer1.2.conv1.weight"] == (4, 2, 3, 3) and shapes["layer1.2.conv2.weight"] == (2, 4, 3, 3)
    assert shapes["layer2.0.conv1.weight"] == (8, 2, 3, 3) and shapes["layer2.0.shortcut.0.weight"] == (6, 2, 1, 1)
    assert shapes["layer3.0.conv1.weight"] == (16, 6, 3, 3) and shapes["layer3.0.shortcut.0.weight"] == (16, 6, 1, 1)


class PlainConvs(nn.Module):
    """Convs with biases and no BatchNorm: the channel point is the conv output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.act(self.conv2(self.act(self.conv1(x)))))
        return self.fc(torch.flatten(x, 1))


@pytest.mark.parametrize("strategy", ["activation", "parametrize"])
def test_conv_without_norm_compacts_exactly(strategy: str) -> None:
    torch.manual_seed(0)
    model = PlainConvs().eval()
    masks = {"conv1": torch.tensor([1, 0, 0, 1, 0, 0], dtype=torch.bool), "conv2": torch.arange(8) >= 5}
    mask_with(strategy, model, masks)
    images = torch.randn(4, 1, 8, 8)
    masked = model(images)

    compaction = compact(model, masks)

    assert (compaction.model(images) - masked).abs().max() <= TOLERANCE
    state = compaction.model.state_dict()
    assert tuple(state["conv1.bias"].shape) == (4,) and tuple(state["conv2.weight"].shape) == (5, 4, 3, 3)
    assert tuple(state["fc.weight"].shape) == (3, 5 * 16)
    assert torch.equal(model(images), masked)  # the parametrized original still works after the copy


class ScaledLogits(nn.Module):
    """A network whose logits are ``scale`` times another's (inception_v3's random-weight logits reach 2e5)."""

    def __init__(self, network: nn.Module, scale: float) -> None:
        super().__init__()
        self.network, self.scale = network, scale

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x) * self.scale


class FixedLogits(nn.Module):
    """Logits given in advance, one row per image whatever the image: a comparison with a known difference."""

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.logits[: len(x)]


@pytest.mark.parametrize(
    ("scale", "relative_gap", "exact"),
    [
        (2e5, 1e-6, True),  # |Δ| = 0.2 at logits of 2e5 (an ulp there is 0.016): rounding, not a different function
        (2e5, 1e-3, False),  # |Δ| = 200 there: a different function
        (0.5, 1e-5, True),  # logits below 1 are held to an absolute 1e-4
        (0.5, 1e-3, False),
    ],
)
def test_exactness_is_judged_relative_to_the_logits_scale(scale: float, relative_gap: float, exact: bool) -> None:
    """``verify`` fed two outputs that differ by a known amount: exact or not by that amount over the largest
    |logit| (at least 1), not by the absolute difference, which rounding at a large scale alone makes exceed 1e-4."""
    logits = torch.randn(50, 10, generator=torch.Generator().manual_seed(0))
    logits = logits / logits.abs().max() * scale  # the largest |logit| is the scale
    gap = torch.zeros_like(logits)
    gap[7, 3] = relative_gap * max(scale, 1.0)
    batches = [(torch.zeros(50, 1), torch.zeros(50, dtype=torch.long))]

    checked = verify(FixedLogits(logits), FixedLogits(logits + gap), batches)

    assert checked.max_rel_diff == pytest.approx(relative_gap, rel=0.1)  # float32 holds the gap to half an ulp: 4 %
    assert checked.exact is exact


def test_the_pipeline_warns_only_where_the_cut_changed_the_function(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = ScaledLogits(randomize_norms(ConvNet(channels=(6, 8, 12))), 2e5)
    masks = random_masks(select_layers(find_prunable_layers(model), None))
    mask_with("activation", model, masks)
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(50, 1, 28, 28, generator=generator), torch.zeros(50, dtype=torch.long))]

    with caplog.at_level(logging.WARNING, logger="pruneflow.compaction.pipeline"):
        compact_and_verify(model, masks, batches, latency_batch_sizes=())
    assert "differs from the masked one" not in caplog.text  # exact: rounding at 2e5 is no difference
    model = ScaledLogits(randomize_norms(ConvNet(channels=(6, 8, 12))), 2e5)
    mask_with("weight", model, masks)  # kernels zeroed, β alive: a real difference still warns
    with caplog.at_level(logging.WARNING, logger="pruneflow.compaction.pipeline"):
        _, metrics = compact_and_verify(model, masks, batches, latency_batch_sizes=())
    assert metrics["compact/max_rel_diff"] > 1e-3 and "differs from the masked one" in caplog.text


def test_weight_mask_leaves_channels_alive_and_the_gap_is_reported() -> None:
    torch.manual_seed(0)
    model = randomize_norms(ConvNet(channels=(6, 8, 12)))
    masks = random_masks(select_layers(find_prunable_layers(model), None))
    mask_with("weight", model, masks)  # kernels zeroed, β still flows through the activation
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(50, 1, 28, 28, generator=generator), torch.randint(0, 10, (50,), generator=generator))]

    compaction, metrics = compact_and_verify(model, masks, batches, latency_batch_sizes=())

    # The figures, computed here from the two models' own outputs on the same images.
    ((images, labels),) = batches
    with torch.no_grad():
        masked, cut = model(images), compaction.model(images)
    assert metrics["compact/max_abs_diff"] == pytest.approx((masked - cut).abs().max().item(), rel=1e-6)
    assert metrics["compact/max_abs_diff"] > 1e-2
    assert metrics["compact/acc_masked"] == pytest.approx(int((masked.argmax(1) == labels).sum()) / 50)
    assert metrics["compact/acc"] == pytest.approx(int((cut.argmax(1) == labels).sum()) / 50)
    assert metrics["compact/agreement"] == pytest.approx(int((masked.argmax(1) == cut.argmax(1)).sum()) / 50)
    assert metrics["compact/agreement"] < 1
    assert metrics["compact/test_images"] == 50
    assert metrics["compact/params_after"] < metrics["compact/params_before"]
    pruned = sum(int(mask.sum()) for mask in masks.values())
    assert metrics["compact/flops_ratio"] > 1.5 and metrics["compact/channels_after"] == 26 - pruned


def test_latency_is_measured_in_the_requested_layout_and_threads_are_restored() -> None:
    model = ConvNet(channels=(6, 8, 12)).eval()
    masks = random_masks(select_layers(find_prunable_layers(model), None))
    threads = torch.get_num_threads()
    batches = [(torch.randn(4, 1, 28, 28), torch.zeros(4, dtype=torch.long))]

    _, metrics = compact_and_verify(
        model, masks, batches, latency_batch_sizes=(2,), latency_rounds=1, latency_memory_format="contiguous"
    )

    assert metrics["compact/latency_memory_format"] == "contiguous" and metrics["compact/latency_threads"] == 1
    before, after = metrics["compact/latency_b2_before_ms"], metrics["compact/latency_b2_after_ms"]
    assert before > 0 and after > 0 and metrics["compact/latency_b2_speedup"] == pytest.approx(before / after)
    assert torch.get_num_threads() == threads
    # The keys name the device the latency was measured on (the earlier names stay for CPU).
    assert metrics["compact/latency_device"] == "cpu" and metrics["compact/latency_precision"] == "32-true"
    assert metrics["compact/latency_cpu_b2_before_ms"] == before and metrics["compact/latency_cpu_b2_after_ms"] == after


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_latency_on_cuda_is_timed_on_the_gpu_in_the_runs_precision() -> None:
    model = ConvNet(channels=(6, 8, 12)).eval()
    masks = random_masks(select_layers(find_prunable_layers(model), None))
    batches = [(torch.randn(4, 1, 28, 28), torch.zeros(4, dtype=torch.long))]
    _, metrics = compact_and_verify(model, masks, batches, latency_batch_sizes=(1, 256), latency_rounds=2,
                                    latency_device="cuda", latency_precision="bf16-mixed")  # fmt: skip
    assert metrics["compact/latency_device"] == "cuda" and metrics["compact/latency_precision"] == "bf16-mixed"
    assert metrics["compact/latency_cuda_b256_before_ms"] > 0 and "compact/latency_b256_before_ms" not in metrics


class Scaled(nn.Module):
    """A conv whose output is scaled by a parameter: one entry per channel (``(1, 4, 1, 1)``) is cut with the
    channels; any other shape (``(1, 1, 1, 5)``, along the width) compaction does not know what it does to them."""

    def __init__(self, gate_shape: tuple[int, ...] = (1, 1, 1, 5)) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.gate = nn.Parameter(torch.rand(gate_shape) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.bn1(self.conv1(x)) * self.gate)


class SharedConsumer(nn.Module):
    """One conv applied twice: slicing its input for the first call would break the second."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv2(self.bn1(self.conv1(x))))


class ConvHead(nn.Module):
    """A fully convolutional net: the last conv's channels are the output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.head = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.bn1(self.conv1(x))))


def test_unsupported_structures_are_refused_naming_the_layer() -> None:
    with pytest.raises(CompactionError, match=r"of conv1: mul\(\) at mul combines them with a tensor outside"):
        compact(Scaled(), {"conv1": [0]})
    per_channel = Scaled((1, 4, 1, 1))
    compaction = compact(per_channel, {"conv1": [0]})
    assert torch.equal(compaction.model.gate, per_channel.gate[:, 1:])
    assert compaction.sizes["gate"] == {"channels": 3, "dim": 1}
    with pytest.raises(CompactionError, match="of conv1: conv2 is called 2 times on different channel spaces"):
        compact(SharedConsumer(), {"conv1": [0]})
    with pytest.raises(CompactionError, match="cannot cut channels of head: reaches the network's output"):
        compact(ConvHead(), {"head": [0]})
    assert compact(ConvHead(), {"conv1": [0]}).sizes["head"] == {"out_channels": 3, "in_channels": 3}


@pytest.mark.parametrize(
    ("masks", "message"),
    [
        ({"features.3": [0]}, "'features.3', which is not a conv or linear layer of ConvNet; its layers: features.0"),
        ({"features.0": [True, False]}, "the mask of features.0 has 2 entries; features.0 has 6 output channels"),
        ({"features.0": [0, 6]}, r"the mask of features.0 names channels \[6\] outside 0..5"),
        ({"features.0": list(range(6))}, "cannot cut all 6 channels of features.0"),
    ],
)
def test_bad_masks_are_one_clear_error(masks: dict[str, list], message: str) -> None:
    with pytest.raises(CompactionError, match=message):
        compact(ConvNet(channels=(6, 8, 12)), masks)


def test_export_round_trip_loads_with_and_without_pruneflow(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = randomize_norms(VGG(layers=[8, "M", 12, "M", 16]))
    masks = random_masks(select_layers(find_prunable_layers(model), None))
    mask_with("activation", model, masks)
    compaction = compact(model, masks)
    config = {"_target_": "pruneflow.models.VGG", "layers": [8, "M", 12, "M", 16], "input_shape": [3, 32, 32]}
    paths = export_compact(compaction, (3, 32, 32), tmp_path, config)
    images = torch.randn(5, 3, 32, 32)
    expected = compaction.model(images)

    assert torch.allclose(load_compact(paths["state"])(images), expected, atol=TOLERANCE, rtol=0)
    assert torch.allclose(load_exported(paths["program"])(images), expected, atol=TOLERANCE, rtol=0)
    torch.save({"images": images, "expected": expected.detach()}, tmp_path / "io.pt")
    standalone = (
        "import sys, torch\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        f"model = torch.export.load({str(paths['program'])!r}).module()\n"
        "assert (model(io['images']) - io['expected']).abs().max() <= 1e-5\n"
        "assert model(io['images'][:1]).shape == (1, 10)\n"
        "assert not any(name.startswith('pruneflow') for name in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", standalone], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def compact_script() -> ModuleType:
    """``pruneflow-compact``'s module, to run its ``main`` in this process."""
    from pruneflow.experiment import compact

    return compact


def test_compact_true_run_writes_figures_and_export_and_the_script_recompacts_its_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    result = run_train(
        "data=synthetic", "trainer.max_epochs=1", "mask=activation", "compact=true", f"hydra.run.dir={run_dir}", *QUIET
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["compact/agreement"] == 1.0 and metrics["compact/max_abs_diff"] <= TOLERANCE
    assert metrics["compact/acc"] == metrics["compact/acc_masked"] == pytest.approx(metrics["test/acc"])
    assert metrics["compact/flops_ratio"] > 2
    speedup = metrics["compact/latency_b256_before_ms"] / metrics["compact/latency_b256_after_ms"]
    assert metrics["compact/latency_b256_speedup"] == pytest.approx(speedup, rel=1e-3)
    assert (run_dir / "compact" / "model.pt2").is_file() and (run_dir / "compact" / "compact_state.pt").is_file()
    assert {"compact/agreement", "compact/max_abs_diff", "compact/acc_gap"} <= scalar_tags(run_dir)

    (run_dir / "compact" / "model.pt2").unlink()
    with caplog.at_level(logging.WARNING):
        compact_script().main([str(run_dir), "--latency-batch-sizes", ""])
    assert "the run reported test/acc" not in caplog.text  # masks and weights restored from the checkpoint
    again = json.loads((run_dir / "metrics.json").read_text())
    assert again["compact/agreement"] == 1.0 and again["compact/acc_masked"] == metrics["compact/acc_masked"]
    assert again["test/acc"] == metrics["test/acc"] and (run_dir / "compact" / "model.pt2").is_file()


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_parametrize_checkpoint_written_before_pruning_compacts(tmp_path: Path, compile: bool) -> None:
    run_dir = tmp_path / "run"
    result = run_train(
        "data=synthetic", "trainer.max_epochs=1", "mask=parametrize", "mask.at_epoch=1",
        f"compile={str(compile).lower()}", f"hydra.run.dir={run_dir}", *QUIET,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    early = run_dir / "checkpoints" / "best-epoch000.ckpt"
    saved = torch.load(early, weights_only=True)
    assert not saved["callbacks"]["ChannelPruning"]["pruned"]  # written before any layer was pruned
    assert "model.features.0.parametrizations.weight.original" in saved["state_dict"]
    metrics = compact_script().main([str(run_dir), "--checkpoint", str(early), "--latency-batch-sizes", ""])
    assert metrics["compact/agreement"] == 1.0 and metrics["compact/max_abs_diff"] <= TOLERANCE
    assert metrics["compact/flops_ratio"] == 1.0  # nothing was pruned yet: nothing is cut


def test_compact_without_a_mask_is_one_clear_line(tmp_path: Path) -> None:
    result = run_train("data=synthetic", "mask=disabled", "compact=true", f"hydra.run.dir={tmp_path / 'run'}", *QUIET)
    assert result.returncode != 0
    assert "pruneflow: error: compact=true needs mask=<strategy>" in result.stderr


@pytest.mark.slow
def test_mnist_activation_masks_after_pretraining_compact_exactly(tmp_path: Path, shared_data: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_train(
        f"data.root={shared_data}", "data.limit_train=20000", "mask=activation", "mask.at_epoch=1",
        "trainer.max_epochs=2", "compact=true", f"hydra.run.dir={run_dir}", *QUIET,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["compact/agreement"] == 1.0 and metrics["compact/max_abs_diff"] <= 1e-4
    assert metrics["compact/flops_ratio"] > 3
