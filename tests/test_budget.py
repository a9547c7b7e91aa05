"""Pruning to a budget (``mask.target``): the cost model against the cut network's measured cost, the global ranking,
the search's caps, fixed amounts and rounding, and the refusals before training."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torchvision
from test_selection import fit, tiny_module
from test_strategies import toy_loader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pruneflow import ChannelPruning, ClassifierModule
from pruneflow.compaction.cost import count_flops, count_parameters
from pruneflow.compaction.cut import compact
from pruneflow.errors import ConfigError
from pruneflow.graph import ChannelSpace, trace_channel_graph
from pruneflow.models import ResNet
from pruneflow.pruning.budget import TOLERANCE, Allocation, Budget, CostModel, allocate_budget, allowed_counts
from pruneflow.pruning.criteria import L1
from pruneflow.pruning.selection import select_spaces


def graph_spaces(network: nn.Module, groups: bool = True) -> list[ChannelSpace]:
    return select_spaces(trace_channel_graph(network).spaces, None, groups)


def cut_costs(network: nn.Module, spaces: list[ChannelSpace], amounts: dict[str, float], image: torch.Tensor):
    """(FLOPs ratio, params ratio) of the network cut at ``amounts``, measured as compaction measures them."""
    masks = {}
    for space in spaces:
        mask = L1().select(space, amounts[space.name], torch.zeros(space.width, dtype=torch.bool))
        masks.update((layer.name, mask) for layer in space.producers)
    cut = compact(network, masks).model
    flops = count_flops(network, image) / count_flops(cut, image)
    return flops, count_parameters(network) / count_parameters(cut)


def allocate(network: nn.Module, target: str, image: torch.Tensor, **settings) -> Allocation:
    return allocate_budget(network, target, image, L1(), **settings)


def cifar_resnet() -> nn.Module:
    torch.manual_seed(0)
    return ResNet(depth=20).eval()


def mobilenet() -> nn.Module:  # depthwise convs carrying a space, a linear classifier
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v2(num_classes=10).eval()


def timm_vit() -> nn.Module:  # an attention whose matrix products the FLOP counter counts from torch 2.15 on CPU
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=4
    ).eval()


@pytest.mark.parametrize("make", [cifar_resnet, mobilenet, timm_vit])
def test_the_cost_model_predicts_the_cut_networks_flops_and_params_exactly(make) -> None:
    network, image = make(), torch.randn(1, 3, 32, 32)
    spaces = graph_spaces(network)
    model = CostModel(network, spaces, image)
    amounts, pruned = {}, []
    for j, space in enumerate(spaces):  # a different amount per space, each one the space can take
        allowed = allowed_counts(space, 0.9, 1)
        count = int(allowed[(j * 7) % len(allowed)])
        amounts[space.name] = count / space.width
        pruned.append(count)
    flops_ratio, params_ratio = cut_costs(network, spaces, amounts, image)
    counts = torch.tensor(pruned, dtype=torch.float64).numpy()
    assert model.measured_flops / model.flops(counts) == pytest.approx(flops_ratio, rel=1e-9)
    assert model.measured_params / model.params(counts) == pytest.approx(params_ratio, rel=1e-9)


@pytest.mark.parametrize("metric", ["flops", "params"])
def test_a_target_is_met_by_the_cut_network_with_amounts_that_differ_per_space(metric: str) -> None:
    network, image = cifar_resnet(), torch.randn(1, 3, 32, 32)
    allocation = allocate(network, f"{metric}:2.0", image)
    flops, params = cut_costs(network, graph_spaces(network), allocation.amounts, image)
    measured = {"flops": flops, "params": params}
    assert abs(measured[metric] / 2.0 - 1) <= TOLERANCE, measured
    assert measured[metric] == pytest.approx(allocation.predicted_ratio, rel=1e-9)
    assert len({round(amount, 6) for amount in allocation.amounts.values()}) > 1
    assert max(allocation.amounts.values()) <= 0.9


class TwoCosts(nn.Module):
    """Three conv spaces of equal width whose channels cost differently to keep: ``b`` (full-resolution input,
    half-resolution output read by ``c``) costs most per channel, and is neither first nor last in the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.b = nn.Conv2d(8, 8, 3, padding=1, stride=2, bias=False)
        self.c = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.head = nn.Linear(8, 2)
        for conv in (self.a, self.b, self.c):
            nn.init.constant_(conv.weight, 1.0)  # every channel of every space equally important

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x))))))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("cost_weight", [0.0, 1.0])
def test_at_equal_importance_the_channels_more_expensive_to_keep_go_first(cost_weight: float) -> None:
    network, image = TwoCosts(), torch.randn(1, 1, 16, 16)
    spaces = graph_spaces(network)
    model = CostModel(network, spaces, image)
    saved = {}
    for j, space in enumerate(spaces):  # what one channel of each space saves, from the model's own figures
        one = torch.zeros(len(spaces), dtype=torch.float64).numpy()
        one[j] = 1
        saved[space.name] = model.measured_flops - model.flops(one)
    assert max(saved, key=saved.get) == "b" and len(set(saved.values())) == 3
    allocation = allocate(network, "flops:2.0", image, cost_weight=cost_weight)
    assert allocation.pruned["b"] > 0 and allocation.pruned["a"] == allocation.pruned["c"] == 0, allocation


def test_kept_widths_are_multiples_of_round_to() -> None:
    network, image = cifar_resnet(), torch.randn(1, 3, 32, 32)
    allocation = allocate(network, "flops:2.0", image, round_to=8)
    spaces = {space.name: space for space in graph_spaces(network)}
    kept = {name: spaces[name].width - count for name, count in allocation.pruned.items()}
    assert all(width % 8 == 0 for width in kept.values()), kept
    assert any(allocation.pruned.values())
    assert abs(allocation.predicted_ratio / 2.0 - 1) <= TOLERANCE


def test_fixed_amounts_are_kept_and_no_space_passes_the_cap() -> None:
    network, image = cifar_resnet(), torch.randn(1, 3, 32, 32)
    allocation = allocate(network, "flops:1.8", image, max_amount=0.6, amounts={"layer1.*": 0.25})
    fixed = {name: amount for name, amount in allocation.amounts.items() if name.startswith("layer1.")}
    assert fixed and set(fixed.values()) == {0.25}
    assert max(allocation.amounts.values()) <= 0.6
    assert abs(allocation.predicted_ratio / 1.8 - 1) <= TOLERANCE


def test_every_space_of_a_resnet50_is_ranked_and_the_target_met() -> None:
    torch.manual_seed(0)
    network = torchvision.models.resnet50().eval()
    allocation = allocate(network, "flops:2.0", torch.randn(1, 3, 64, 64))
    assert len(allocation.amounts) == len(graph_spaces(network))
    assert abs(allocation.predicted_ratio / 2.0 - 1) <= TOLERANCE
    assert max(allocation.amounts.values()) <= 0.9


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": "flop:2"}, "mask.target='flop:2' names an unknown metric 'flop'; write <metric>:<ratio>"),
        ({"target": "flops:1.0"}, r"mask.target='flops:1.0': the ratio must be a number above 1"),
        ({"target": "params:two"}, r"mask.target='params:two': the ratio must be a number above 1"),
        ({"target": "flops:2", "amount": 0.3}, "set mask.target or mask.amount, not both"),
        ({"target": "flops:2", "amounts": {"layer1.*": 0.95}}, r"mask.amounts\[layer1.\*\]=0.95 is above mask.max"),
        ({"target": "flops:2", "max_amount": 1.0}, r"mask.max_amount must be a fraction in \(0, 1\), got 1.0"),
        ({"target": "flops:2", "round_to": 0}, "mask.round_to must be a positive integer"),
    ],
)
def test_bad_budget_settings_are_refused_in_one_line_before_training(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        ChannelPruning("activation", **kwargs)
    assert "\n" not in str(raised.value)


def test_an_unreachable_target_names_the_largest_reachable_one_before_any_step() -> None:
    module = tiny_module()
    before = {name: value.clone() for name, value in module.state_dict().items()}
    trainer = L.Trainer(max_epochs=1, callbacks=[ChannelPruning("activation", target="flops:100")], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu")  # fmt: skip
    with pytest.raises(ConfigError, match=r"mask.target=flops:100 cannot be reached.*largest reachable target is "
                                          r"flops:\d"):  # fmt: skip
        trainer.fit(module, train_dataloaders=toy_loader())
    assert trainer.global_step == 0
    assert all(torch.equal(value, module.state_dict()[name]) for name, value in before.items())


class MaskWitness(L.Callback):
    """Copies of the masks after each pruning event (it runs after ``ChannelPruning`` in the callback list)."""

    def __init__(self, pruning: ChannelPruning) -> None:
        self.pruning, self.events = pruning, []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if len(self.pruning.pruning_steps) > len(self.events):
            assert self.pruning.budget.last is not None
            masks = {name: mask.clone() for name, mask in self.pruning.pruned.items()}
            self.events.append((masks, self.pruning.budget.last.predicted_ratio))


def test_a_gradual_schedule_reaches_the_target_over_its_steps_keeping_earlier_choices() -> None:
    torch.manual_seed(0)
    module = ClassifierModule(ResNet(input_shape=(3, 8, 8), depth=8), lambda p: torch.optim.SGD(p, lr=0.01),
                              num_classes=10)  # fmt: skip
    pruning = ChannelPruning("activation", target="flops:2.0", schedule="gradual", start_epoch=0, end_epoch=2,
                             groups=True)  # fmt: skip
    witness = MaskWitness(pruning)
    trainer = L.Trainer(max_epochs=3, callbacks=[pruning, witness], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(32, 3, 8, 8, generator=generator), torch.randint(0, 10, (32,), generator=generator)
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(images, labels), batch_size=16))
    (first, first_ratio), (last, last_ratio) = witness.events  # epochs 1 and 2: 87.5 % and all of the way
    assert abs(first_ratio / (1 / (1 - 0.875 * 0.5)) - 1) <= TOLERANCE
    assert all(bool((last[name] | ~mask).all()) for name, mask in first.items())  # earlier choices kept
    assert any(int(last[name].sum()) > int(mask.sum()) for name, mask in first.items())
    image = torch.randn(1, 3, 8, 8)
    network = module.model
    measured = count_flops(network, image) / count_flops(compact(network, last).model, image)
    assert abs(measured / 2.0 - 1) <= TOLERANCE, (measured, last_ratio)


def test_a_latency_target_is_found_from_a_few_timed_cuts(monkeypatch: pytest.MonkeyPatch) -> None:
    # A device whose latency is not proportional to FLOPs: 30 % fixed, 70 % FLOPs. Latency 2x needs FLOPs 3.5x.
    def device_latency_ms(models, batch, **settings):
        return {name: 0.3 * dense_flops + 0.7 * count_flops(model, batch[:1]) for name, model in models.items()}

    monkeypatch.setattr("pruneflow.compaction.cost.device_latency_ms", device_latency_ms)
    network, image = cifar_resnet(), torch.randn(1, 3, 32, 32)
    dense_flops = count_flops(network, image)
    spaces = graph_spaces(network)
    budget = Budget("latency:2.0")
    budget.prepare(network, spaces, image)
    allocation = budget.calibrate_latency(network, L1(), spaces, {}, 1.0, {"device": "cpu"})
    flops_ratio, _ = cut_costs(network, spaces, allocation.amounts, image)
    latency_ratio = 1 / (0.3 + 0.7 / flops_ratio)
    assert abs(latency_ratio / 2.0 - 1) <= TOLERANCE, (flops_ratio, latency_ratio)


def test_the_amounts_go_to_tensorboard_and_the_final_metrics(tmp_path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pruning = ChannelPruning("activation", target="flops:1.5")
    trainer = L.Trainer(max_epochs=1, callbacks=[pruning], logger=TensorBoardLogger(tmp_path, name="run"),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu")  # fmt: skip
    trainer.fit(tiny_module(), train_dataloaders=toy_loader())
    report = pruning.final_metrics()
    assert report["mask/target"] == "flops:1.5" and set(report["mask/amounts"]) == {"features.0", "features.3"}
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert {"mask/amount/features.0", "mask/amount/features.3", "mask/predicted_ratio"} <= set(events.Tags()["scalars"])
    assert "mask/amounts/text_summary" in events.Tags()["tensors"]


def test_amounts_fixed_by_hand_replace_the_uniform_amount_where_they_match() -> None:
    pruning = ChannelPruning("activation", amount=0.5, amounts={"features.3": 0.25})
    fit(tiny_module(), pruning)
    assert {name: int(mask.sum()) for name, mask in pruning.pruned.items()} == {"features.0": 3, "features.3": 2}
