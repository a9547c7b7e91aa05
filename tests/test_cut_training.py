"""Cutting while training (``mask.cut_at_step`` / ``cut_at_epoch``): the cut network trains on exactly as the
masked one would have, its checkpoints resume with plain Lightning, and cuts that would change the function
are refused."""

from __future__ import annotations

import functools
import gc
import json
import weakref
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from helpers import QUIET, DenseLayers, GroupedBottleneck, run_train
from lightning.pytorch.callbacks import ModelCheckpoint, StochasticWeightAveraging
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models.convnext import CNBlock, LayerNorm2d
from torchvision.ops import StochasticDepth

from pruneflow import ChannelPruning, ClassifierModule
from pruneflow.compaction import export_compact, load_compact, load_trained_run
from pruneflow.compaction.cut import compact
from pruneflow.errors import ConfigError
from pruneflow.lr_schedule import cosine
from pruneflow.models.convnet import ConvNet
from pruneflow.models.resnet import ResNet

STEPS_PER_EPOCH = 6
EPOCHS = 3
PRUNE_AT, CUT_AT = 2, 4  # steps

OPTIMIZERS = {
    "sgd": functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "adam": functools.partial(torch.optim.Adam, lr=1e-2, weight_decay=1e-4),
    "adamw": functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=1e-2, amsgrad=True),
}


def images_and_labels(count: int, seed: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(count, 1, 12, 12, generator=generator)
    labels = (images[:, :, :6].mean((1, 2, 3)) > 0).long() + (images[:, 0, 6, 6] > 0.5).long()
    return images, labels


def train_loader() -> DataLoader:
    return DataLoader(TensorDataset(*images_and_labels(STEPS_PER_EPOCH * 16, seed=0)), batch_size=16)


TEST_IMAGES, _ = images_and_labels(64, seed=1)


def make_run(optimizer: str, **mask: object) -> tuple[ClassifierModule, ChannelPruning]:
    torch.manual_seed(0)
    network = ConvNet(input_shape=(1, 12, 12), num_classes=3, channels=(8, 12))
    module = ClassifierModule(network, OPTIMIZERS[optimizer], num_classes=3, scheduler=cosine)
    pruning = ChannelPruning(
        strategy="activation", amount=0.5, at_step=PRUNE_AT, reset_optimizer_state=True, log_every_n_steps=1, **mask
    )
    return module, pruning


def fit(
    module: ClassifierModule, pruning: ChannelPruning, *, epochs: int = EPOCHS, ckpt_dir: Path | None = None,
    ckpt_path: Path | None = None, clip: float | None = None,
) -> L.Trainer:  # fmt: skip
    callbacks: list[L.Callback] = [pruning]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}", save_top_k=-1))
    trainer = L.Trainer(
        max_epochs=epochs, callbacks=callbacks, logger=False, enable_checkpointing=ckpt_dir is not None,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", deterministic=True,
        gradient_clip_val=clip,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=train_loader(), ckpt_path=ckpt_path, weights_only=True)
    return trainer


@torch.no_grad()
def logits(module: ClassifierModule) -> Tensor:
    module.eval()
    return module(TEST_IMAGES)


def assert_same_kept_weights(cut: nn.Module, masked: nn.Module, pruned: dict[str, Tensor]) -> None:
    """Every tensor of the cut network equals the masked network's kept entries (cut by ``compact``)."""
    expected = compact(masked, pruned).model.state_dict()
    actual = cut.state_dict()
    assert actual.keys() == expected.keys()
    for key, tensor in actual.items():
        reference = expected[key]
        assert tensor.shape == reference.shape, key
        if tensor.is_floating_point():
            scale = reference.abs().max().clamp_min(1e-12)
            assert (tensor - reference).abs().max() / scale <= 1e-5, key


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_a_run_cut_at_step_n_trains_on_as_the_masked_run(optimizer: str) -> None:
    masked, masked_pruning = make_run(optimizer)
    fit(masked, masked_pruning)
    cut, cut_pruning = make_run(optimizer, cut_at_step=CUT_AT)
    fit(cut, cut_pruning, clip=1e6)  # a clip that never binds: clipping reads the re-pointed parameter groups

    convs = [(name, module) for name, module in cut.model.named_modules() if isinstance(module, nn.Conv2d)]
    widths = {name: module.weight.shape[0] for name, module in convs}
    assert widths == {"features.0": 4, "features.4": 6}  # physically smaller
    assert cut_pruning.cut is not None and cut_pruning.cut["cut/step"] == CUT_AT
    assert cut_pruning.cut["cut/params_after"] < cut_pruning.cut["cut/params_before"]
    assert cut_pruning.cut["cut/flops_after"] < cut_pruning.cut["cut/flops_before"]
    assert cut_pruning.cut["cut/batch_max_abs_diff"] <= 1e-5 and cut_pruning.cut["cut/batch_top1_agreement"] == 1.0
    # Training went on after the cut (the masked run's kernels moved too), and on the same path.
    assert (logits(cut) - logits(masked)).abs().max() <= 1e-4
    assert_same_kept_weights(cut.model, masked.model, masked_pruning.pruned)


class DroppingConvNet(nn.Module):
    """Two conv → BatchNorm → ReLU blocks with stochastic depth between them (whole samples dropped, as Swin's and
    MaxViT's blocks do): which samples depends on the random generator, not on the width."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), StochasticDepth(0.3, "row"),
            nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        )  # fmt: skip
        self.fc = nn.Linear(12, 3)

    def forward(self, images: Tensor) -> Tensor:
        return self.fc(self.features(images).mean((2, 3)))


def test_a_cut_draws_nothing_from_the_random_generator_so_stochastic_depth_trains_on_as_in_the_masked_run() -> None:
    runs = []
    for cut_at_step in (None, CUT_AT):
        torch.manual_seed(0)
        module = ClassifierModule(DroppingConvNet(), OPTIMIZERS["sgd"], num_classes=3)
        pruning = ChannelPruning(strategy="activation", amount=0.5, at_step=PRUNE_AT, cut_at_step=cut_at_step)
        fit(module, pruning)
        runs.append(logits(module))
    masked, cut = runs
    assert (cut - masked).abs().max() <= 1e-4  # the cut's new modules drew no weights: the same samples dropped


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_residual_groups_cut_while_training_train_on_as_the_masked_run(optimizer: str) -> None:
    # Coupled groups: a residual channel space is cut out of every conv that writes it (stem, each block's
    # conv2, the shortcut convs), every BatchNorm over it and every conv and the linear layer that read it.
    def resnet_run(**mask: object) -> tuple[ClassifierModule, ChannelPruning]:
        torch.manual_seed(0)
        network = ResNet(input_shape=(1, 12, 12), num_classes=3, depth=8, width=8)
        module = ClassifierModule(network, OPTIMIZERS[optimizer], num_classes=3, scheduler=cosine)
        pruning = ChannelPruning(
            strategy="activation", amount=0.5, at_step=PRUNE_AT, reset_optimizer_state=True, groups=True, **mask
        )
        return module, pruning

    masked, masked_pruning = resnet_run()
    fit(masked, masked_pruning)
    cut, cut_pruning = resnet_run(cut_at_step=CUT_AT)
    fit(cut, cut_pruning)
    # the spaces both runs chose (the cut run's callback lets go of them at the cut)
    coupled = [space for space in masked_pruning.spaces if len(space.producers) > 1]
    assert coupled, "no residual group was selected"
    widths = {name: module.out_channels for name, module in cut.model.named_modules() if isinstance(module, nn.Conv2d)}
    full = {name: module.out_channels for name, module in masked.model.named_modules() if isinstance(module, nn.Conv2d)}
    for space in coupled:
        for producer in space.producers:
            # every writer of the group lost half its channels
            assert widths[producer.name] == full[producer.name] // 2, producer.name
    assert cut_pruning.cut is not None and cut_pruning.cut["cut/batch_max_abs_diff"] <= 1e-5
    assert (logits(cut) - logits(masked)).abs().max() <= 1e-4
    assert_same_kept_weights(cut.model, masked.model, masked_pruning.pruned)


def tiny_convnext() -> nn.Module:
    """ConvNeXt's residual stream: a stem conv with its LayerNorm2d, two blocks (LayerNorm and ``layer_scale`` in
    each), the head's LayerNorm2d; the stream and each block's hidden width pruned as groups."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 2, stride=2), LayerNorm2d(8), CNBlock(8, 1.0, 0.0), CNBlock(8, 1.0, 0.0),
        nn.AdaptiveAvgPool2d(1), LayerNorm2d(8), nn.Flatten(1), nn.Linear(8, 3),
    )  # fmt: skip


PATTERN_NETWORKS = {  # name → (network, optimizer)
    "convnext": (tiny_convnext, "adamw"),  # the layer scales' AdamW state is cut with them
    # DenseNet's: BatchNorms reading concatenations, each cut at every space's offset. SGD: their convs' biases,
    # followed by a BatchNorm in training, get a gradient that is zero up to rounding, which Adam would scale up
    # to full steps in directions that differ between two equal networks of different widths.
    "norms_after_concatenations": (functools.partial(DenseLayers, in_channels=1, num_classes=3), "sgd"),
    # ResNeXt's: a grouped conv cut at the same positions in every group, inside a residual group
    "grouped_conv": (functools.partial(GroupedBottleneck, in_channels=1, num_classes=3), "sgd"),
}


def pattern_run(pattern: str, **mask: object) -> tuple[ClassifierModule, ChannelPruning]:
    torch.manual_seed(0)
    network, optimizer = PATTERN_NETWORKS[pattern]
    module = ClassifierModule(network(), OPTIMIZERS[optimizer], num_classes=3, scheduler=cosine)
    pruning = ChannelPruning(
        strategy="activation", amount=0.5, at_step=PRUNE_AT, reset_optimizer_state=True, groups=True, **mask
    )
    return module, pruning


@pytest.mark.parametrize("pattern", list(PATTERN_NETWORKS))
def test_each_kind_of_space_cut_while_training_trains_on_and_resumes_exactly(pattern: str, tmp_path: Path) -> None:
    """A cut inside training, of each kind of space the graph knows beyond plain conv chains, trains on as the
    masked run does (the optimizer's state cut alike), and a checkpoint written after it resumes bit-identically in a
    fresh network, which takes the cut widths (norm entries, grouped columns, layer scales) before loading."""
    masked, masked_pruning = pattern_run(pattern)
    fit(masked, masked_pruning)
    cut, cut_pruning = pattern_run(pattern, cut_at_step=CUT_AT)
    fit(cut, cut_pruning, ckpt_dir=tmp_path)
    if pattern == "convnext":
        assert cut.model[2].layer_scale.shape == (4, 1, 1) and cut.model[5].normalized_shape == (4,)
    assert cut_pruning.cut is not None and cut_pruning.cut["cut/batch_max_abs_diff"] <= 1e-5
    assert cut_pruning.cut["cut/channels_after"] < cut_pruning.cut["cut/channels_before"]
    assert (logits(cut) - logits(masked)).abs().max() <= 1e-4
    assert_same_kept_weights(cut.model, masked.model, masked_pruning.pruned)
    resumed, resumed_pruning = pattern_run(pattern, cut_at_step=CUT_AT)
    fit(resumed, resumed_pruning, ckpt_path=tmp_path / "epoch=0.ckpt")  # a fresh network takes the cut widths
    assert resumed_pruning.cut == cut_pruning.cut
    final, reference = resumed.state_dict(), cut.state_dict()
    assert final.keys() == reference.keys()
    for key, tensor in final.items():
        assert torch.equal(tensor, reference[key]), key


def test_the_telemetry_stops_at_the_cut_and_metrics_record_it() -> None:
    module, pruning = make_run("sgd", cut_at_step=CUT_AT)
    fit(module, pruning)
    steps = pruning.history["drift/producer_l2"]
    assert len(steps) == CUT_AT - PRUNE_AT  # measured every step from pruning until the cut, not after
    metrics = pruning.final_metrics()
    assert metrics["cut/step"] == CUT_AT
    assert metrics["cut/channels_before"] == 20 and metrics["cut/channels_after"] == 10
    assert metrics["cut/flops_ratio"] > 1.5


def full_size_producers(module: ClassifierModule) -> list[weakref.ref]:
    return [weakref.ref(conv) for conv in module.model.modules() if isinstance(conv, nn.Conv2d)]


def test_after_the_cut_nothing_holds_the_full_size_modules(tmp_path: Path) -> None:
    """The cut replaces the producers and their norms; the callback keeps their widths, not the modules,
    so the full-size weights are freed (in training and after a resume from a post-cut checkpoint)."""
    module, pruning = make_run("sgd", cut_at_step=CUT_AT)
    replaced = full_size_producers(module)
    fit(module, pruning, ckpt_dir=tmp_path)
    gc.collect()
    assert replaced and not [ref for ref in replaced if ref() is not None]
    assert pruning.layers == [] and pruning.layer_widths == {"features.0": 8, "features.4": 12}
    resumed, resumed_pruning = make_run("sgd", cut_at_step=CUT_AT)
    replaced = full_size_producers(resumed)
    fit(resumed, resumed_pruning, ckpt_path=tmp_path / "epoch=0.ckpt")
    gc.collect()
    assert not [ref for ref in replaced if ref() is not None]
    assert resumed_pruning.layer_widths == pruning.layer_widths


def test_a_checkpoint_written_after_the_cut_resumes_exactly_with_plain_lightning(tmp_path: Path) -> None:
    whole, pruning = make_run("adamw", cut_at_step=CUT_AT)
    fit(whole, pruning, ckpt_dir=tmp_path)  # epoch 0 ends at step 6, after the cut at step 4
    resumed, resumed_pruning = make_run("adamw", cut_at_step=CUT_AT)
    fit(resumed, resumed_pruning, ckpt_path=tmp_path / "epoch=0.ckpt")
    assert resumed_pruning.cut == pruning.cut
    # The burst figures read the measured steps before the cut: a resume after it keeps them.
    assert resumed_pruning.drift_trace and resumed_pruning.drift_trace == pruning.drift_trace
    assert resumed_pruning.final_metrics() == pruning.final_metrics()
    final, reference = resumed.state_dict(), whole.state_dict()
    assert final.keys() == reference.keys()
    for key, tensor in final.items():
        assert torch.equal(tensor, reference[key]), key


@pytest.mark.parametrize("strategy", ["weight", "none", "gradient", "hard", "parametrize"])
def test_cutting_a_strategy_that_leaves_channels_alive_is_refused_unless_asked(strategy: str) -> None:
    with pytest.raises(ConfigError, match=r"would change the network's outputs.*cut_changes_outputs=true"):
        ChannelPruning(strategy=strategy, cut_at_epoch=1)
    ChannelPruning(strategy=strategy, cut_at_epoch=1, cut_changes_outputs=True)


def test_an_allowed_cut_that_changes_outputs_reports_the_gap() -> None:
    torch.manual_seed(0)
    network = ConvNet(input_shape=(1, 12, 12), num_classes=3, channels=(8, 12))
    module = ClassifierModule(network, OPTIMIZERS["sgd"], num_classes=3)
    pruning = ChannelPruning(strategy="weight", at_step=PRUNE_AT, cut_at_step=CUT_AT, cut_changes_outputs=True)
    fit(module, pruning, epochs=1)
    assert pruning.cut is not None and pruning.cut["cut/batch_max_abs_diff"] > 1e-3  # the kernels had moved


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"cut_at_epoch": 1, "cut_at_step": 3}, "not both"),
        ({"cut_at_step": -1}, "non-negative integer"),
        ({"cut_at_epoch": True}, "non-negative integer"),
        ({"cut_at_epoch": 1, "at_epoch": 2}, "before the last pruning epoch 2"),
        ({"cut_at_step": 1, "at_step": 5}, "before mask.at_step=5"),
        ({"cut_at_epoch": 2, "schedule": "gradual", "end_epoch": 3}, "before the last pruning epoch 3"),
        ({"cut_at_epoch": 2, "cut_changes_outputs": "yes"}, "true or false"),
        # Taylor selects taylor_batches optimizer steps after the schedule's pruning step.
        ({"criterion": "taylor", "at_step": 2, "cut_at_step": 2}, r"before the last pruning step 10 \(mask.at_step=2"),
        ({"criterion": "taylor", "at_epoch": 1, "cut_at_epoch": 1}, "taylor selects 8 optimizer steps into epoch 1"),
        ({"criterion": "taylor", "cut_at_step": 5}, r"before the last pruning step 8 \(the first step"),
        ({"at_step": 2, "cut_at_epoch": 0}, r"mask.cut_at_epoch=0 \(step 0\) comes before mask.at_step=2"),
    ],
)
def test_bad_cut_settings_are_one_line_config_errors(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        ChannelPruning(strategy="activation", **settings)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("settings", "message"),
    [  # a step and an epoch: compared once the epoch's length (6 optimizer steps) is known, before the first step
        ({"at_epoch": 1, "cut_at_step": 3}, r"mask.cut_at_step=3 comes before the last pruning step 6 \(epoch 1"),
        ({"at_step": 8, "cut_at_epoch": 1}, r"mask.cut_at_epoch=1 \(step 6\) comes before mask.at_step=8"),
        ({"criterion": "taylor", "taylor_batches": 7, "at_epoch": 1, "cut_at_epoch": 2},
         r"mask.cut_at_epoch=2 \(step 12\) comes before the last pruning step 13"),
    ],
)  # fmt: skip
def test_a_cut_before_the_real_pruning_step_is_refused_before_training(settings: dict, message: str) -> None:
    torch.manual_seed(0)
    network = ConvNet(input_shape=(1, 12, 12), num_classes=3, channels=(8, 12))
    module = ClassifierModule(network, OPTIMIZERS["sgd"], num_classes=3)
    pruning = ChannelPruning(strategy="activation", **settings)
    with pytest.raises(ConfigError, match=message):
        fit(module, pruning)
    assert module.trainer.global_step == 0 and not pruning.pruning_steps


def test_adafactor_state_is_sliced_along_every_dim_that_follows_its_parameter() -> None:
    # Adafactor keeps factored second moments: row_var (O, I, kh, 1), col_var (O, I, 1, kw) for a conv,
    # (O, 1) and (1, I) for a linear layer: not shaped like the parameter, yet following it in O and I.
    OPTIMIZERS["adafactor"] = functools.partial(torch.optim.Adafactor, lr=1e-2)
    try:
        module, pruning = make_run("adafactor", cut_at_step=CUT_AT)
        fit(module, pruning, epochs=1)
    finally:
        del OPTIMIZERS["adafactor"]
    assert pruning.cut is not None and module.trainer.global_step == STEPS_PER_EPOCH
    optimizer = module.trainer.optimizers[0]
    for parameter in module.model.parameters():
        for value in optimizer.state[parameter].values():
            if value.ndim:
                assert all(size in (1, full) for size, full in zip(value.shape, parameter.shape, strict=True))


def test_an_optimizer_whose_state_cannot_be_cut_is_refused_by_name_before_training() -> None:
    torch.manual_seed(0)
    network = ConvNet(input_shape=(1, 12, 12), num_classes=3, channels=(8, 12))
    module = ClassifierModule(network, lambda p: torch.optim.LBFGS(p, lr=0.1), num_classes=3)
    pruning = ChannelPruning(strategy="activation", at_step=PRUNE_AT, cut_at_step=CUT_AT)
    with pytest.raises(ConfigError, match="cannot carry LBFGS's state across the cut") as error:
        fit(module, pruning)
    assert module.trainer.global_step == 0 and "\n" not in str(error.value)


class LoadsATenClassHead(ClassifierModule):
    """A user's ``setup`` that loads weights of another shape into the network: PyTorch's error, not a resize."""

    def setup(self, stage: str) -> None:
        other = ConvNet(input_shape=(1, 12, 12), num_classes=10, channels=(8, 12))
        self.model.load_state_dict(other.state_dict())


def test_a_shape_mismatch_that_no_cut_wrote_raises_pytorchs_own_error() -> None:
    torch.manual_seed(0)
    network = ConvNet(input_shape=(1, 12, 12), num_classes=3, channels=(8, 12))
    module = LoadsATenClassHead(network, OPTIMIZERS["sgd"], num_classes=3)
    pruning = ChannelPruning(strategy="activation", at_step=PRUNE_AT, cut_at_step=CUT_AT)
    with pytest.raises(RuntimeError, match=r"size mismatch for classifier\.\d+\.weight"):
        fit(module, pruning)
    assert isinstance(network.classifier[-1], nn.Linear) and network.classifier[-1].out_features == 3


def test_train_py_cuts_compacts_and_resumes_after_the_cut(tmp_path: Path) -> None:
    common = (
        "data=synthetic", "data.num_train=400", "mask=activation", "mask.at_step=1", "mask.cut_at_epoch=1",
        "mask.reset_optimizer_state=true", "deterministic=true", f"hydra.run.dir={tmp_path}", *QUIET,
    )  # fmt: skip
    result = run_train(*common, "trainer.max_epochs=2", "compact=true")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["cut/step"] == metrics["global_step"] // 2  # the start of epoch 1
    assert metrics["cut/flops_ratio"] > 1.5 and metrics["cut/params_ratio"] > 1.5
    assert metrics["compact/max_abs_diff"] == 0.0  # already cut: compact=true exports the network as it is
    result = run_train(*common, "trainer.max_epochs=3", "resume=true")
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = json.loads((tmp_path / "metrics.json").read_text())
    assert resumed["epochs"] == 3 and resumed["cut/step"] == metrics["cut/step"]
    trained = load_trained_run(tmp_path)  # what pruneflow-compact reads: the cut network, no masks
    assert trained.pruned == {} and trained.network.features[0].out_channels == 12  # ConvNet's 24, halved


# In the quick suite once, so the floor's CI run has it: up to torch 2.11, counting the cut's FLOPs through the
# compiled network's __call__ made torch.compile skip it ever after (the cut network trained uncompiled).
@pytest.mark.parametrize(
    "mode", ["default", pytest.param("reduce-overhead", marks=pytest.mark.slow)]  # reduce-overhead: CUDA graphs
)
def test_a_compiled_network_recompiles_once_at_the_cut_and_trains_as_the_eager_one(mode: str) -> None:
    from torch._dynamo.utils import counters

    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        network = ConvNet(input_shape=(1, 12, 12), num_classes=3, channels=(8, 12))
        module = ClassifierModule(network, OPTIMIZERS["sgd"], num_classes=3, scheduler=cosine, compile=compiled,
                                  compile_mode=mode)  # fmt: skip
        pruning = ChannelPruning(
            strategy="activation", at_step=PRUNE_AT, reset_optimizer_state=True, cut_at_step=CUT_AT
        )
        torch._dynamo.reset()
        counters.clear()
        fit(module, pruning)
        runs.append(module)
    assert counters["stats"]["unique_graphs"] == 2  # the network before the cut, and after it
    assert (logits(runs[0]) - logits(runs[1])).abs().max() <= 1e-4


def test_cutting_under_a_multi_process_strategy_other_than_ddp_is_refused_in_one_line() -> None:
    module, pruning = make_run("sgd", cut_at_step=CUT_AT)
    several_processes = SimpleNamespace(world_size=2, strategy=SimpleNamespace())
    with pytest.raises(ConfigError, match="cannot cut under SimpleNamespace with 2 processes") as error:
        pruning.setup(several_processes, module, "fit")  # type: ignore[arg-type]
    assert "\n" not in str(error.value)


def frozen_stem_convnet(**arguments: object) -> ConvNet:
    """A ConvNet whose first conv the user froze and tagged: the conv whose channels the cut takes."""
    network = ConvNet(**arguments)
    for parameter in network.features[0].parameters():
        parameter.requires_grad_(False)
        parameter.user_tag = "frozen stem"  # an attribute of the user's own, which a rebuild must carry too
    return network


def frozen_stem_run() -> tuple[ClassifierModule, ChannelPruning]:
    module, pruning = make_run("sgd", cut_at_step=CUT_AT)
    torch.manual_seed(0)
    module.model = frozen_stem_convnet(input_shape=(1, 12, 12), num_classes=3, channels=(8, 12))
    return module, pruning


def stem_state(module: ClassifierModule) -> dict[str, tuple[bool, str | None, Tensor]]:
    return {
        name: (parameter.requires_grad, getattr(parameter, "user_tag", None), parameter.detach().clone())
        for name, parameter in module.model.features[0].named_parameters()
    }


def test_a_frozen_layer_cut_while_training_stays_frozen_after_a_resume(tmp_path: Path) -> None:
    """Resuming from a checkpoint written after the cut rebuilds the cut modules: a frozen one must stay frozen
    (and keep the attributes the user set on its parameters), so it neither trains nor changes."""
    whole, pruning = frozen_stem_run()
    fit(whole, pruning, epochs=1, ckpt_dir=tmp_path)  # epoch 0 ends at step 6, after the cut at step 4
    assert pruning.cut is not None and whole.model.features[0].out_channels == 4
    at_checkpoint = stem_state(whole)
    assert {flags[:2] for flags in at_checkpoint.values()} == {(False, "frozen stem")}  # the cut itself kept them
    resumed, resumed_pruning = frozen_stem_run()
    fit(resumed, resumed_pruning, epochs=2, ckpt_path=tmp_path / "epoch=0.ckpt")
    after = stem_state(resumed)
    assert after.keys() == at_checkpoint.keys()
    for name, (requires_grad, tag, tensor) in after.items():
        assert (requires_grad, tag) == (False, "frozen stem"), name
        assert torch.equal(tensor, at_checkpoint[name][2]), name  # it did not train after the resume


def test_load_compact_keeps_the_frozen_layers_of_the_model_it_rebuilds(tmp_path: Path) -> None:
    arguments = {"input_shape": [1, 12, 12], "num_classes": 3, "channels": [8, 12]}
    model = frozen_stem_convnet(**arguments)
    compaction = compact(model, {"features.0": [0, 1, 2, 3]})
    config = {"_target_": f"{__name__}.frozen_stem_convnet", **arguments}
    rebuilt = load_compact(export_compact(compaction, (1, 12, 12), tmp_path, config)["state"])
    assert rebuilt.features[0].out_channels == 4
    for name, parameter in rebuilt.features[0].named_parameters():
        assert (parameter.requires_grad, getattr(parameter, "user_tag", None)) == (False, "frozen stem"), name


def test_a_cut_with_stochastic_weight_averaging_is_refused_in_one_line_before_training() -> None:
    """SWA averages a copy of the network made at setup, at the full widths, which no cut can take; refused
    before the first step rather than crashing at the SWA start epoch."""
    module, pruning = make_run("sgd", cut_at_step=CUT_AT)
    averaging = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)
    trainer = L.Trainer(
        max_epochs=2, callbacks=[pruning, averaging], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    refusal = r"cut_at_step cannot cut under StochasticWeightAveraging.*compact=true"
    with pytest.raises(ConfigError, match=refusal) as error:
        trainer.fit(module, train_dataloaders=train_loader())
    assert "\n" not in str(error.value)
    assert trainer.global_step == 0
