"""TensorBoard's HParams tab: each run's hyperparameters, named in the field's words, beside its final figures.

The tab answers the comparative question of a sweep — which strategy, under which optimizer, keeps
pruned kernels at zero, at what accuracy — as one sortable, filterable table with a row per run:

    strategy  optimizer  criterion  amount  pruning_step  activation  seed | test accuracy  drift  leak  ...

The metric columns carry the transient (steps to half the final drift, drift after the burst) and the
optimizer's share of the pruned rows (update, momentum, Adam moment, weight decay's pull).

Every run declares the same columns, so the table lines up runs of any strategy (an unpruned run has
empty drift cells; a run without ``compact=true`` an empty compaction cell). A metric's value is the
last scalar of its tag in the run's event file: ``test/acc`` comes from the test loop,
``compact/acc_gap`` from compaction (logged after this summary), and the ``hparams/<metrics.json key>``
tags are written here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

from pruneflow.pruning.event_amounts import DEFAULT_AMOUNT

SUMMARY_PREFIX = "hparams/"

# (tag, display name): the HParams tab's metric columns, in order.
METRICS = (
    ("test/acc", "test accuracy"),
    ("hparams/drift/producer_l2/final", "drift final (L2 of pruned kernels)"),
    ("hparams/drift/producer_l2/max", "drift max"),
    ("hparams/drift/stored_l2/final", "stored-weight drift final"),
    ("hparams/drift/zero_fraction/final", "pruned kernels at zero (fraction)"),
    ("hparams/leak/activation_abs_mean/final", "leak final (mean |activation|)"),
    ("hparams/leak/activation_abs_mean/max", "leak max"),
    ("hparams/leak/eval_activation_abs_mean/final", "eval-mode leak final (fixed validation batch)"),
    ("hparams/bn/pruned_running_var/final", "BatchNorm running variance of pruned channels"),
    ("hparams/burst/steps_to_half_drift", "steps after pruning to half the final drift"),
    ("hparams/burst/drift_after_burst", "drift after the burst"),
    ("hparams/optim/pruned_update_l2/final", "optimizer update of pruned rows (L2)"),
    ("hparams/optim/pruned_momentum_l2/final", "SGD momentum of pruned rows (L2)"),
    ("hparams/optim/pruned_exp_avg_l2/final", "Adam first moment of pruned rows (L2)"),
    ("hparams/optim/pruned_decay_l2/final", "weight decay pull on pruned rows (L2)"),
    ("compact/acc_gap", "accuracy gap after compaction"),
)

HPARAM_TYPES = {
    str: api_pb2.DATA_TYPE_STRING, int: api_pb2.DATA_TYPE_FLOAT64, float: api_pb2.DATA_TYPE_FLOAT64,
    bool: api_pb2.DATA_TYPE_BOOL,
}  # fmt: skip


def run_hparams(cfg: DictConfig, metrics: Mapping[str, Any]) -> dict[str, str | int | float | bool]:
    """The run's hyperparameters as the HParams tab shows them (the full config is in ``config.yaml``)."""
    mask = cfg.get("mask") or {}
    # mask=disabled carries the shared mask keys (criterion, amount) but builds no callback: unpruned.
    pruned = bool(mask.get("_target_"))
    pruning_steps = metrics.get("mask/pruning_steps") or []
    return {
        "strategy": str(metrics.get("mask/strategy") or mask.get("strategy")) if pruned else "unpruned",
        "optimizer": _choice(cfg, "optimizer"),
        "criterion": str(mask.get("criterion")) if pruned else "none",
        "amount": _amount(mask) if pruned else 0.0,
        "pruning_step": ",".join(str(step) for step in pruning_steps) or "never",
        "activation": str(cfg.model.get("activation", "n/a")),
        "seed": int(cfg.seed),
        "reset_optimizer_state": pruned and bool(mask.get("reset_optimizer_state", False)),
        "data": _choice(cfg, "data"),
        "model": _choice(cfg, "model"),
    }


def _amount(mask: Mapping[str, Any]) -> float:
    """The uniform amount a run pruned with: its ``mask.amount``, the callback's default when unset, and 0 under a
    ``mask.target`` (each space has its own; ``metrics.json`` lists them)."""
    amount = mask.get("amount")
    if amount is None:
        return 0.0 if mask.get("target") else DEFAULT_AMOUNT
    return float(amount)


def log_hparams(logger: TensorBoardLogger, cfg: DictConfig, metrics: Mapping[str, Any], step: int) -> None:
    """Write the run's HParams row: its hyperparameters, and the ``hparams/*`` scalars of its final figures."""
    hparams = run_hparams(cfg, metrics)
    summary_scalars = {
        tag: float(metrics[tag.removeprefix(SUMMARY_PREFIX)])
        for tag, _ in METRICS
        if tag.startswith(SUMMARY_PREFIX) and _finite(metrics.get(tag.removeprefix(SUMMARY_PREFIX)))
    }
    logger.log_metrics(summary_scalars, step=step)
    now = time.time()
    experiment = api_pb2.Experiment(
        time_created_secs=now,
        hparam_infos=[
            api_pb2.HParamInfo(name=name, display_name=name.replace("_", " "), type=HPARAM_TYPES[type(value)])
            for name, value in hparams.items()
        ],
        metric_infos=[
            api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), display_name=display_name)
            for tag, display_name in METRICS
        ],
    )
    start = plugin_data_pb2.SessionStartInfo(start_time_secs=now)
    for name, value in hparams.items():
        if isinstance(value, bool):
            start.hparams[name].bool_value = value
        elif isinstance(value, (int, float)):
            start.hparams[name].number_value = value
        else:
            start.hparams[name].string_value = value
    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS, end_time_secs=now)
    writer = logger.experiment._get_file_writer()
    for tag, content in (
        (metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment)),
        (metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=start)),
        (metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end)),
    ):
        writer.add_summary(Summary(value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(content))]))
    logger.experiment.flush()


def _choice(cfg: DictConfig, group: str) -> str:
    """The option picked for a config group (``optimizer=adam`` → ``adam``); outside Hydra, the class built."""
    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get(group)
        if choice:
            return str(choice)
    target = (cfg.get(group) or {}).get("_target_", "n/a")
    return str(target).rsplit(".", 1)[-1]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
