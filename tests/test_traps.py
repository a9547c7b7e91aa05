"""The trap probe (``pruneflow.experiment.traps``) and the findings report's reading of it, on run folders of each
network family written here: a tiny member of the family, composed from the real configs on synthetic data,
trained for a few steps with the mask pruning half of every space at step 2, checkpointed as a run is.

What must hold: under ``activation`` the SE gate at a pruned channel is hard-sigmoid(0) = 0.5 and the gated
product there 0, the skip path and every reader carry exactly 0, the producers get exactly 0 gradient; under
``control`` the skip path carries the pruned channels as it carries the kept ones. A probe that read the wrong
channels, or the tensor the mask just wrote instead of what the next layer receives, would fail these.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import QUIET
from hydra.utils import instantiate
from omegaconf import OmegaConf

from pruneflow import ClassifierModule, compaction
from pruneflow.experiment import compose_config, report, trap_findings, traps
from pruneflow.graph import find_prunable_layers
from pruneflow.pruning.criteria import L1
from pruneflow.pruning.strategies import KEEP_BUFFER, make_strategy

FAMILIES = {
    "resnet": ["model=resnet", "model.depth=8", "model.width=4"],
    "mobilenet_v3": ["model=mobilenet_v3", "model.last_channel=16",
                     "model.inverted_residual_setting=[[8,3,8,8,true,RE,2],[8,3,24,8,false,RE,1],[8,5,24,16,true,HS,2]]"],
    "convnext": ["model=convnext", "model.block_setting=[[8,16,1],[16,null,2]]", "model.layer_scale=0.5"],
    "vit": ["model=vit", "model.num_layers=2", "model.num_heads=2", "model.hidden_dim=8", "model.mlp_dim=16"],
}  # fmt: skip
TINY = ("data=synthetic", "data.input_shape=[3,16,16]", "data.num_train=72", "data.num_test=32", "data.batch_size=16",
        "data.eval_batch_size=32", "mask.amount=0.5", "mask.groups=true", "mask.at_step=2", "mask.burst_steps=0",
        *QUIET)  # fmt: skip


def write_run(folder: Path, family: str, mask: str, seed: int = 0) -> Path:
    """A finished run folder as ``train.py`` leaves one (config.yaml, checkpoints/last.ckpt, metrics.json), trained
    in-process for 5 steps."""
    cfg = compose_config([*FAMILIES[family], *TINY, f"mask={mask}", f"seed={seed}"])
    L.seed_everything(seed, verbose=False)
    datamodule = instantiate(cfg.data)
    network = instantiate(cfg.model, input_shape=list(datamodule.input_shape), num_classes=datamodule.num_classes)
    pruning = instantiate(cfg.mask)
    module = ClassifierModule(network, instantiate(cfg.optimizer), num_classes=datamodule.num_classes)
    trainer = L.Trainer(max_epochs=1, callbacks=[pruning], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        limit_val_batches=0)  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    folder.mkdir(parents=True)
    trainer.save_checkpoint(folder / "checkpoints" / "last.ckpt")
    OmegaConf.save(cfg, folder / "config.yaml")
    metrics = {key: value for key, value in pruning.final_metrics().items() if not isinstance(value, dict)}
    (folder / "metrics.json").write_text(json.dumps({**metrics, "test/acc": 0.5}))
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """One run per (family, mask) the tests read, written once: ``<root>/<family>/mask=<mask>,seed=0``."""
    root = tmp_path_factory.mktemp("families")
    chosen = [("resnet", "control"), ("resnet", "activation"), ("mobilenet_v3", "control"),
              ("mobilenet_v3", "activation"), ("convnext", "control"), ("convnext", "activation")]  # fmt: skip
    return {(family, mask): write_run(root / family / f"mask={mask},seed=0", family, mask) for family, mask in chosen}


@pytest.fixture(scope="module")
def readings(runs: dict[tuple[str, str], Path]) -> dict[tuple[str, str], dict[str, float]]:
    """Each run's trap readings, measured once (and cached in its folder, as the report does)."""
    return {key: traps.cached_traps(run) for key, run in runs.items()}


def test_se_gate_is_one_half_and_the_gated_product_zero_at_pruned_channels_under_activation(readings: dict) -> None:
    readings = readings["mobilenet_v3", "activation"]
    assert readings["se/spaces"] >= 1
    for mode in traps.MODES:
        # hard-sigmoid(0) = relu6(3) / 6: exactly one half where the mask left the squeezed channel at 0
        assert readings[f"se/gate_pruned_mean/{mode}"] == 0.5
        assert readings[f"se/product_pruned_abs_mean/{mode}"] == 0.0
        assert readings[f"se/product_kept_abs_mean/{mode}"] > 0.0
        assert readings[f"reader/pruned_abs_max/{mode}"] == 0.0
    assert readings["guarantee/grad_pruned_abs_max"] == 0.0


def test_without_a_mask_the_gated_product_carries_the_pruned_channels(readings: dict) -> None:
    readings = readings["mobilenet_v3", "control"]
    kept = readings["se/product_kept_abs_mean/eval"]
    assert readings["se/product_pruned_abs_mean/eval"] > 0.05 * kept > 0


def test_the_skip_path_carries_pruned_channels_under_control_and_nothing_under_activation(readings: dict) -> None:
    control = readings["resnet", "control"]
    assert control["residual/spaces"] >= 1
    kept = control["residual/skip_kept_abs_mean/eval"]
    # selected channels keep working unmasked: the skip brings them in at the size of the kept ones
    assert control["residual/skip_pruned_abs_mean/eval"] > 0.1 * kept > 0
    assert control["residual/norm_pruned_abs_mean/train"] > 0
    masked = readings["resnet", "activation"]
    assert masked["residual/skip_kept_abs_mean/eval"] > 0
    for mode in traps.MODES:
        assert masked[f"residual/skip_pruned_abs_mean/{mode}"] == 0.0
        assert masked[f"residual/norm_pruned_abs_mean/{mode}"] == 0.0
    assert masked["guarantee/grad_pruned_abs_max"] == 0.0


def test_layer_norm_and_layer_scale_are_read_at_pruned_channels(readings: dict) -> None:
    control, masked = readings["convnext", "control"], readings["convnext", "activation"]
    for readings in (control, masked):
        assert readings["layer_scale/pruned_abs_mean"] > 0  # a scale keeps a zero channel at zero: not the leak
        assert readings["layernorm/input_var_kept/eval"] > 0
    # Unmasked, the LayerNorm writes the pruned channels as it writes the kept ones; masked, exactly 0
    assert control["layernorm/output_pruned_abs_mean/eval"] > 0.1 * control["layernorm/output_kept_abs_mean/eval"]
    assert masked["layernorm/output_pruned_abs_mean/eval"] == 0.0
    assert masked["layernorm/output_kept_abs_mean/eval"] > 0
    assert masked["reader/pruned_abs_max/train"] == 0.0


def test_the_probe_sees_a_pruned_channel_the_mask_no_longer_holds(runs: dict) -> None:
    # The mask lifted from one producer of the residual stream after loading (its keep-vector all ones): the probe
    # reads what the next layers receive, so what that producer writes into the pruned channels must show.
    run = compaction.load_trained_run(runs["resnet", "activation"])
    layer = next(layer for layer in run.layers if layer.coupled and bool(run.pruned[layer.name].any()))
    getattr(layer.channel_point, KEEP_BUFFER).fill_(1.0)
    run.datamodule.setup("test")
    images, labels = next(iter(compaction.test_batches(run.datamodule)))
    readings = traps.measure_traps(run.network, run.layers, run.pruned, images, labels, run.strategy)
    assert readings["residual/skip_pruned_abs_mean/eval"] > 0
    assert readings["reader/pruned_abs_max/eval"] > 0
    assert readings["guarantee/grad_pruned_abs_max"] > 0


def test_readings_are_cached_in_the_run_folder_and_measured_again_for_another_version(
    runs: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = shutil.copytree(runs["resnet", "control"], tmp_path / "run")
    first = traps.cached_traps(run)
    assert json.loads((run / traps.TRAPS_FILE).read_text()) == pytest.approx(first)
    monkeypatch.setattr(traps, "probe_run", lambda *args: pytest.fail("measured again, though cached"))
    assert traps.cached_traps(run) == pytest.approx(first)
    (run / traps.TRAPS_FILE).write_text(json.dumps({**first, "traps/version": traps.TRAPS_VERSION - 1}))
    monkeypatch.setattr(traps, "probe_run", lambda *args: {"traps/version": traps.TRAPS_VERSION, "again": 1.0})
    assert traps.cached_traps(run)["again"] == 1.0
    assert json.loads((run / traps.TRAPS_FILE).read_text())["again"] == 1.0


def test_findings_report_of_families_states_traps_causes_and_each_family_against_the_convnet_findings(
    runs: dict, readings: dict, tmp_path: Path
) -> None:
    families = next(iter(runs.values())).parents[1]
    grid = {"hydra": {"overrides": {"hydra": [], "task": ["experiment=findings_resnet20"]},
                      "sweeper": {"params": {"mask": "control,activation", "seed": "0,1"}}}}  # fmt: skip
    for family in ("resnet", "mobilenet_v3", "convnext"):
        (families / family / "multirun.yaml").write_text(OmegaConf.to_yaml(grid))
    out = tmp_path / "docs" / "FINDINGS.md"
    text = report.write_findings(families, out)
    assert "## Findings across the networks" in text and "## The traps at the pruned channels" in text
    guarantee = next(line for line in text.splitlines() if line.startswith("- `activation` leaks nothing"))
    assert "Holds on" in guarantee and "defect" not in guarantee
    assert all(family in guarantee for family in ("ResNet", "mobilenet_v3", "convnext"))
    assert "the SE gate is 0.5 at pruned channels" in text
    assert "2 of 4 runs finished" in text  # each family's sweep, partly finished
    header = next(line for line in text.splitlines() if line.startswith("| pruned |") and "SE gate" in line)
    assert header.rstrip(" |").endswith("cause")
    assert "every reader gets exactly 0" in text and "the skip path carries" in text
    assert all((run / traps.TRAPS_FILE).is_file() for run in runs.values())
    # the same from the command line with each family's sweep folder named, the cached readings reused
    two = tmp_path / "two" / "FINDINGS.md"
    report.main([str(families / "resnet"), str(families / "mobilenet_v3"), "--findings", str(two)])
    text = two.read_text()
    named = " ".join(report.relative(families / family) for family in ("resnet", "mobilenet_v3"))
    assert f"pruneflow-report {named} --findings" in text
    assert "### Synthetic / ResNet, SGD" in text and "### Synthetic / mobilenet_v3, SGD" in text
    assert "convnext" not in text


def test_torchvision_vit_stream_is_read_as_a_residual_and_layernorm_trap_held_at_zero_by_activation() -> None:
    # torchvision's ViT: the embedding width is one space through every residual, LayerNorm and attention, beside
    # each MLP's hidden width: the probe reads the stream's skip path and its LayerNorms, and under `activation`
    # every one of them is exactly 0 at the pruned channels while the kept ones carry signal.
    torch.manual_seed(0)
    cfg = compose_config([*FAMILIES["vit"], *TINY, "mask=activation"])
    network = instantiate(cfg.model, input_shape=[3, 16, 16], num_classes=10)
    layers = find_prunable_layers(network)
    pruned = {layer.name: torch.arange(layer.num_channels) % 2 == 0 for layer in layers}
    strategy = make_strategy("activation")
    for layer in layers:
        strategy.apply(layer, pruned[layer.name])
    readings = traps.measure_traps(network, layers, pruned, torch.randn(4, 3, 16, 16), torch.arange(4), "activation")
    assert readings["residual/spaces"] >= 1 and readings["traps/pruned_spaces"] > readings["plain/spaces"]
    for mode in ("eval", "train"):
        assert readings[f"residual/skip_kept_abs_mean/{mode}"] > 0 and readings[f"layernorm/input_var_kept/{mode}"] > 0
        assert readings[f"residual/skip_pruned_abs_mean/{mode}"] == 0.0
        assert readings[f"layernorm/output_pruned_abs_mean/{mode}"] == 0.0
        assert readings[f"reader/pruned_abs_max/{mode}"] == 0.0
    assert readings["guarantee/grad_pruned_abs_max"] == 0.0


def timm_vit_pruned(strategy: str) -> dict[str, float]:
    """timm's tiny ViT (its stream, heads and LayerNorms all prunable), half of every space pruned by L1 before any
    training (LayerNorms' β = 0), read by the probe on random images."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    network = timm.create_model("test_vit", num_classes=10, img_size=32)
    layers = find_prunable_layers(network)
    mask = make_strategy(strategy)
    pruned = {}
    for space in {id(layer.space): layer.space for layer in layers}.values():
        chosen = L1().select(space, 0.5, torch.zeros(space.width, dtype=torch.bool))
        for layer in space.producers:
            pruned[layer.name] = chosen
            mask.prepare(layer)
            mask.apply(layer, chosen)
    return traps.measure_traps(network, layers, pruned, torch.randn(4, 3, 32, 32), torch.arange(4), strategy)


def test_attention_heads_and_the_stream_layer_norms_of_a_timm_vit_at_pruned_channels() -> None:
    control, weight, masked = (timm_vit_pruned(strategy) for strategy in ("control", "weight", "activation"))
    assert control["heads/spaces"] >= 1 and control["residual/spaces"] >= 1
    assert control["heads/read_pruned_abs_mean/eval"] > 0.1 * control["heads/read_kept_abs_mean/eval"] > 0
    assert masked["heads/read_pruned_abs_mean/eval"] == 0.0 and masked["heads/read_kept_abs_mean/eval"] > 0
    assert masked["layernorm/output_pruned_abs_mean/eval"] == 0.0 and masked["guarantee/grad_pruned_abs_max"] == 0.0
    # `weight` zeroes the stream's producers and β is still 0, yet the LayerNorm writes the pruned channels again:
    # it subtracts the mean over every channel, kept ones included, from their zeros
    assert weight["layernorm/beta_pruned_abs_mean"] == 0.0 and weight["layernorm/input_var_pruned/eval"] == 0.0
    assert weight["layernorm/output_pruned_abs_mean/eval"] > 0.01 * weight["layernorm/output_kept_abs_mean/eval"]


def test_a_network_contradicting_a_convnet_finding_is_named_and_a_leaking_activation_mask_called_a_defect() -> None:
    def run(data: str, label: str, **metrics: float) -> report.Run:
        return report.Run(f"{data},{label}", data, "SGD", "n/a", "after 1 epoch", label, 0, metrics)

    runs = [
        run("CIFAR10 / ResNet", "activation", **{"trap/reader/pruned_abs_max/eval": 0.0,
                                                 "trap/guarantee/grad_pruned_abs_max": 0.0}),
        run("CIFAR10 / convnext", "activation", **{"trap/reader/pruned_abs_max/eval": 0.25,
                                                   "trap/guarantee/grad_pruned_abs_max": 0.0}),
        run("CIFAR10 / ResNet", "weight", **{"drift/producer_l2/final": 3.0}),
        run("CIFAR10 / convnext", "weight", **{"drift/producer_l2/final": 0.0}),
    ]  # fmt: skip
    lines = trap_findings.general_findings(runs)
    guarantee = next(line for line in lines if line.startswith("`activation` leaks nothing"))
    assert guarantee.index("Holds on CIFAR10 / ResNet") < guarantee.index("**a defect of the mask, not a finding:**")
    assert "CIFAR10 / convnext (1 runs: reader/pruned_abs_max/eval max 0.25" in guarantee
    weight = next(line for line in lines if "`weight`'s kernels come back" in line)
    assert "Holds on CIFAR10 / ResNet (1 runs, L2 3)" in weight and "**contradicted by** CIFAR10 / convnext" in weight
