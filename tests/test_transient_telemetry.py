"""The transient after pruning and what moved the pruned kernels, checked against values computed here.

- the burst: exactly ``burst_steps`` consecutive measured steps after each pruning event (a gradual
  schedule has one per event), the regular interval otherwise;
- the optimizer's shares (``optim/*``) of the pruned rows equal the optimizer's own update rule
  (SGD with momentum and coupled weight decay; Adam; AdamW's decoupled decay), worked out in the test
  from the state the optimizer held before the step, the gradient it was given and its hyperparameters;
- BatchNorm's running variance and the eval-mode leak of a dead channel: γ·(0 − μ)/√(σ² + ε) + β.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import QUIET, run_train
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import metadata
from test_strategies import STEPS, TinyNet, toy_loader

from pruneflow import ChannelPruning, ClassifierModule
from pruneflow.pruning.telemetry import AGGREGATE_TAGS
from pruneflow.pruning.telemetry_writer import transient_figures

PRUNED = [1, 4]  # features.0's pruned channels (explicit)
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4
BETAS, EPS = (0.9, 0.999), 1e-8


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call as ``step → metrics``."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: dict[int, dict[str, float]] = {}

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.setdefault(int(step or 0), {}).update(metrics)

    def steps_with(self, tag: str) -> list[int]:
        return sorted(step for step, metrics in self.logged.items() if tag in metrics)


def fit(pruning: ChannelPruning, optimizer: Any, epochs: int = 1, extra: list[L.Callback] = (), val: bool = False):
    torch.manual_seed(0)
    model = TinyNet("relu")
    module = ClassifierModule(model, optimizer, num_classes=3)
    logger = RecordingLogger()
    trainer = L.Trainer(
        max_epochs=epochs, callbacks=[pruning, *extra], logger=logger, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=2,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=toy_loader(), val_dataloaders=toy_loader(seed=1) if val else None)
    return logger, model


# -- the burst ---------------------------------------------------------------------------------------
def test_gradual_schedule_logs_exactly_burst_steps_consecutive_steps_after_each_event() -> None:
    pruning = ChannelPruning(
        strategy="weight", schedule="gradual", start_epoch=0, end_epoch=3, burst_steps=5, log_every_n_steps=1000
    )
    logger, _ = fit(pruning, lambda p: torch.optim.SGD(p, lr=LR, momentum=MOMENTUM), epochs=4)
    events = pruning.pruning_steps
    assert events == [STEPS, 2 * STEPS, 3 * STEPS]  # epochs 1, 2, 3 (epoch 0's target is 0)
    # A value logged at step s describes the step taken at s − 1: the steps taken at p … p + 4.
    burst = {event + k for event in events for k in range(1, 6)}
    final = 4 * STEPS  # measured once more at the end of training
    assert logger.steps_with("drift/producer_l2") == sorted(burst | {final})
    # Burst steps carry the kernels and the optimizer's share; the slow quantities stay on the interval.
    assert "optim/pruned_update_l2" in logger.logged[events[0] + 1]
    assert logger.steps_with("drift/consumer_l2") == logger.steps_with("bn/beta_abs") == [final]
    # The transient figures read that trace: the drift 5 steps after each event.
    drift = {step: logger.logged[step]["drift/producer_l2"] for step in logger.steps_with("drift/producer_l2")}
    figures = pruning.final_metrics()
    assert figures["burst/drift_after_burst_per_event"] == [drift[event + 5] for event in events]
    assert figures["burst/drift_after_burst"] == drift[events[0] + 5]


def test_burst_off_falls_back_to_the_regular_interval() -> None:
    pruning = ChannelPruning(strategy="weight", at_step=3, burst_steps=0, log_every_n_steps=4)
    logger, _ = fit(pruning, lambda p: torch.optim.SGD(p, lr=LR, momentum=MOMENTUM))
    assert logger.steps_with("drift/producer_l2") == [5, 9, 13, STEPS]


def test_transient_figures_from_a_trace() -> None:
    trace = [(11, 0.5), (12, 2.0), (13, 3.0), (14, 3.9), (20, 4.0)]
    figures = transient_figures(trace, events=[10], burst_steps=4)
    assert figures["burst/steps_to_half_drift"] == 2  # 2.0 ≥ 4.0 / 2 first at step 12
    assert figures["burst/drift_after_burst"] == 3.9
    assert "burst/steps_to_half_drift" not in transient_figures([(11, 0.0), (12, 0.0)], [10], 4)


def test_burst_steps_must_be_a_non_negative_integer() -> None:
    with pytest.raises(ValueError, match=r"mask\.burst_steps must be a non-negative integer"):
        ChannelPruning(burst_steps=-1)


# -- the optimizer's shares ----------------------------------------------------------------------------
class OptimizerWitness(L.Callback):
    """Records, for features.0's pruned rows, the state before each step, the gradient the optimizer was
    given (after the strategy's gradient mask) and the weights after the step — read from outside the
    telemetry, straight from the parameter and the optimizer."""

    def __init__(self) -> None:
        self.steps: dict[int, dict[str, torch.Tensor]] = {}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        weight = pl_module.model.features[0].weight
        state = {key: value.clone() for key, value in optimizer.state.get(weight, {}).items() if torch.is_tensor(value)}
        self.steps[trainer.global_step] = {"w": weight.detach().clone(), "g": weight.grad.clone(), **state}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.steps[trainer.global_step - 1]["w_after"] = pl_module.model.features[0].weight.detach().clone()


def l2(tensor: torch.Tensor) -> float:
    return float(tensor[PRUNED].double().norm())


def shares_run(optimizer: Any, strategy: str = "weight") -> tuple[RecordingLogger, OptimizerWitness]:
    witness = OptimizerWitness()
    pruning = ChannelPruning(
        strategy=strategy, criterion="explicit", channels={"features.0": PRUNED}, at_step=4, burst_steps=3,
        log_every_n_steps=5,
    )  # fmt: skip
    logger, _ = fit(pruning, optimizer, extra=[witness])
    return logger, witness


@pytest.mark.parametrize("strategy", ["weight", "gradient"])
def test_sgd_momentum_and_weight_decay_shares_match_the_update_rule(strategy: str) -> None:
    logger, witness = shares_run(
        lambda p: torch.optim.SGD(p, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY), strategy
    )
    measured = logger.steps_with("optim/pruned_update_l2/features.0")
    assert measured == [5, 6, 7, 11, 16]  # the steps taken at 4, 5, 6 (the burst), then at 10 and 15
    for step in measured:
        taken = witness.steps[step - 1]
        w, g, buffer = taken["w"], taken["g"], taken["momentum_buffer"]
        # torch.optim.SGD: d = g + wd·w; buffer ← μ·buffer + d; w ← w − lr·buffer
        expected_buffer = MOMENTUM * buffer + g + WEIGHT_DECAY * w
        logged = logger.logged[step]
        assert logged["optim/pruned_momentum_l2/features.0"] == pytest.approx(l2(expected_buffer), rel=1e-5)
        assert logged["optim/pruned_decay_l2/features.0"] == pytest.approx(l2(WEIGHT_DECAY * w), rel=1e-5, abs=1e-12)
        assert logged["optim/pruned_update_l2/features.0"] == pytest.approx(l2(LR * expected_buffer), rel=1e-5)
        assert logged["optim/pruned_update_l2/features.0"] == pytest.approx(l2(taken["w_after"] - w), rel=1e-5)
        assert "optim/pruned_exp_avg_l2" not in logged
    # gradient: the gradient given to the optimizer is zero, yet momentum gathered before pruning moves the rows.
    if strategy == "gradient":
        first = logger.logged[5]
        assert l2(witness.steps[4]["g"]) == 0
        assert first["optim/pruned_update_l2/features.0"] > 0


@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_moment_shares_match_the_update_rule(decoupled: bool) -> None:
    weight_decay = 1e-2
    make = torch.optim.AdamW if decoupled else torch.optim.Adam
    logger, witness = shares_run(lambda p: make(p, lr=1e-2, betas=BETAS, eps=EPS, weight_decay=weight_decay))
    beta1, beta2 = BETAS
    measured = logger.steps_with("optim/pruned_update_l2/features.0")
    assert measured == [5, 6, 7, 11, 16]  # the steps taken at 4, 5, 6 (the burst), then at 10 and 15
    for step in measured:
        taken = witness.steps[step - 1]
        w, g = taken["w"], taken["g"]
        t = float(taken["step"]) + 1
        if not decoupled:
            g = g + weight_decay * w  # Adam's coupled decay enters the gradient
        exp_avg = beta1 * taken["exp_avg"] + (1 - beta1) * g
        exp_avg_sq = beta2 * taken["exp_avg_sq"] + (1 - beta2) * g * g
        start = w * (1 - 1e-2 * weight_decay) if decoupled else w
        update = -1e-2 * (exp_avg / (1 - beta1**t)) / ((exp_avg_sq / (1 - beta2**t)).sqrt() + EPS)
        logged = logger.logged[step]
        assert logged["optim/pruned_exp_avg_l2/features.0"] == pytest.approx(l2(exp_avg), rel=1e-5)
        assert logged["optim/pruned_exp_avg_sq_mean/features.0"] == pytest.approx(
            float(exp_avg_sq[PRUNED].double().mean()), rel=1e-5
        )
        assert logged["optim/pruned_decay_l2/features.0"] == pytest.approx(l2(weight_decay * w), rel=1e-5)
        assert logged["optim/pruned_update_l2/features.0"] == pytest.approx(l2(start + update - w), rel=1e-4)
        assert "optim/pruned_momentum_l2" not in logged


def test_aggregate_optimizer_shares_add_in_quadrature_over_layers() -> None:
    pruning = ChannelPruning(strategy="weight", at_step=2, burst_steps=2, log_every_n_steps=100)
    logger, _ = fit(pruning, lambda p: torch.optim.SGD(p, lr=LR, momentum=MOMENTUM))
    logged = logger.logged[3]
    per_layer = [logged[f"optim/pruned_momentum_l2/{name}"] for name in ("features.0", "features.3")]
    assert logged["optim/pruned_momentum_l2"] == pytest.approx(math.hypot(*per_layer), rel=1e-6)


# -- BatchNorm and the eval-mode leak -------------------------------------------------------------------
def test_dead_channel_eval_leak_is_batchnorm_of_zero_and_running_variance_is_reported() -> None:
    # gradient + reset: the pruned kernels stay exactly 0, so the conv outputs 0 on those channels.
    pruning = ChannelPruning(
        strategy="gradient", criterion="explicit", channels={"features.0": PRUNED}, at_step=4,
        reset_optimizer_state=True, log_every_n_steps=1,
    )  # fmt: skip
    logger, model = fit(pruning, lambda p: torch.optim.SGD(p, lr=LR, momentum=MOMENTUM), epochs=2, val=True)
    eval_steps = logger.steps_with("leak/eval_activation_abs_mean")
    assert eval_steps == [STEPS, 2 * STEPS]  # one per validation epoch, not the sanity check
    norm = model.features[1]
    mean, var = norm.running_mean[PRUNED], norm.running_var[PRUNED]
    gamma, beta = norm.weight.detach()[PRUNED], norm.bias.detach()[PRUNED]
    dead = gamma * (0 - mean) / (var + norm.eps).sqrt() + beta  # eval mode, constant over the batch
    final = pruning.final_metrics()
    assert final["leak/eval_activation_abs_mean/final"] == pytest.approx(float(dead.abs().mean()), rel=1e-5)
    # Train mode: batch statistics of an all-zero channel are 0, so the channel outputs β — the β of the
    # forward, i.e. the one measured after the previous step.
    for step in range(6, 2 * STEPS + 1):
        leak = logger.logged[step]["leak/activation_abs_mean/features.0"]
        assert leak == pytest.approx(logger.logged[step - 1]["bn/beta_abs/features.0"], rel=1e-5)
    assert final["bn/pruned_running_var/final"] == pytest.approx(float(var.mean()), rel=1e-6)
    assert final["bn/pruned_eval_gain/final"] == pytest.approx(
        float((gamma.abs() / (var + norm.eps).sqrt()).mean()), rel=1e-5
    )


# -- through train.py: the config key, the event file, the dashboard layout and the HParams row ----------
def test_train_py_logs_the_burst_and_shares_and_the_dashboard_carries_the_new_tags(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_train(
        "data=synthetic", "trainer.max_epochs=2", "mask=weight", "mask.at_epoch=1", "mask.burst_steps=7",
        "mask.log_every_n_steps=50", "optimizer=sgd", f"hydra.run.dir={run_dir}", *QUIET,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    event = metrics["mask/pruning_steps"][0]
    assert metrics["burst/steps"] == 7 and metrics["burst/drift_after_burst"] > 0
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    steps = [e.step for e in accumulator.Scalars("drift/producer_l2")]
    assert [s for s in steps if event < s <= event + 7] == list(range(event + 1, event + 8))
    assert [e.step for e in accumulator.Scalars("optim/pruned_update_l2")][:7] == list(range(event + 1, event + 8))
    assert {"optim/pruned_momentum_l2", "optim/pruned_decay_l2", "bn/pruned_running_var",
            "leak/eval_activation_abs_mean"} <= set(accumulator.Tags()["scalars"])  # fmt: skip
    # The Custom Scalars layout is the string value of the tensor summary TensorBoard's plugin reads.
    config = accumulator.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    layout = layout_pb2.Layout.FromString(config)
    charts = {chart.title for category in layout.category for chart in category.chart}
    assert set(AGGREGATE_TAGS) <= charts
    hparams = accumulator.PluginTagToContent("hparams")
    experiment = metadata.parse_experiment_plugin_data(hparams[metadata.EXPERIMENT_TAG])
    columns = {info.name.tag for info in experiment.metric_infos}
    assert {"hparams/burst/steps_to_half_drift", "hparams/optim/pruned_momentum_l2/final",
            "hparams/leak/eval_activation_abs_mean/final"} <= columns  # fmt: skip
    assert "hparams/optim/pruned_update_l2/final" in accumulator.Tags()["scalars"]


# -- gradient accumulation: one measurement per optimizer step, with its whole gradient ---------------------
class GradientWitness(L.Callback):
    """features.0's gradient as the optimizer receives it: once per optimizer step, accumulation complete."""

    def __init__(self) -> None:
        self.grads: dict[int, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.grads[trainer.global_step] = pl_module.model.features[0].weight.grad.clone()


class CallCountingLogger(RecordingLogger):
    def __init__(self) -> None:
        super().__init__()
        self.drift_calls: list[int] = []

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        super().log_metrics(metrics, step)
        if "drift/producer_l2" in metrics:
            self.drift_calls.append(int(step or 0))


def test_with_gradient_accumulation_each_optimizer_step_is_measured_once_with_its_whole_gradient() -> None:
    torch.manual_seed(0)
    witness, logger = GradientWitness(), CallCountingLogger()
    pruning = ChannelPruning(
        strategy="weight", criterion="explicit", channels={"features.0": PRUNED}, at_step=1, burst_steps=0,
        log_every_n_steps=1,
    )  # fmt: skip
    module = ClassifierModule(TinyNet("relu"), lambda p: torch.optim.SGD(p, lr=LR), num_classes=3)
    trainer = L.Trainer(
        max_epochs=1, callbacks=[pruning, witness], logger=logger, enable_checkpointing=False,
        accumulate_grad_batches=2, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=toy_loader())
    assert trainer.global_step == STEPS // 2
    assert logger.drift_calls == list(range(2, STEPS // 2 + 1))  # once per optimizer step, from the one taken at 1
    for step in logger.drift_calls:
        logged = logger.logged[step]["grad/pruned_l2/features.0"]
        assert logged == pytest.approx(l2(witness.grads[step - 1]), rel=1e-5)


def test_a_run_ending_inside_the_burst_writes_one_point_per_step_on_every_tag(tmp_path: Path) -> None:
    """The last burst step and the final full measurement fall on the same step: one point each, not two."""
    pruning = ChannelPruning(strategy="weight", at_step=STEPS - 6, burst_steps=20, log_every_n_steps=1000)
    torch.manual_seed(0)
    module = ClassifierModule(TinyNet("relu"), lambda p: torch.optim.SGD(p, lr=LR, momentum=MOMENTUM), num_classes=3)
    trainer = L.Trainer(
        max_epochs=1, callbacks=[pruning], logger=TensorBoardLogger(tmp_path, name="run", version=0),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=toy_loader())
    accumulator = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance={"scalars": 0})
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    assert {"drift/producer_l2", "optim/pruned_update_l2", "drift/consumer_l2"} <= set(tags)
    assert [e.step for e in accumulator.Scalars("drift/producer_l2")] == list(range(STEPS - 5, STEPS + 1))
    steps = {tag: [event.step for event in accumulator.Scalars(tag)] for tag in tags}
    assert {tag: points for tag, points in steps.items() if len(points) != len(set(points))} == {}
