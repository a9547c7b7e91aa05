"""One training run from a composed config: build data, model, module, callbacks and trainer; fit; test; report.

``train(cfg)`` is what ``train.py`` calls for every Hydra job. It owns the run folder's layout:

    <run dir>/config.yaml          the resolved config
    <run dir>/events.out.tfevents.* TensorBoard scalars (``tensorboard --logdir outputs``; conf/logger/)
    <run dir>/checkpoints/         last.ckpt and best-*.ckpt (conf/callbacks/checkpoints.yaml)
    <run dir>/metrics.json         final figures, written atomically; ``"complete": true`` once the run's last
                                   step (testing, or compaction when asked for) has written its figures

With ``resume=auto`` (a sweep that is rerun after being stopped) a run whose folder holds a complete
``metrics.json`` is skipped, one with a ``last.ckpt`` continues from it, and any other starts over.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from omegaconf import DictConfig, ListConfig, OmegaConf

from pruneflow.atomic_io import write_json_atomic, write_text_atomic
from pruneflow.callbacks.checkpoint_io import AtomicCheckpointIO, check_checkpoint_matches
from pruneflow.callbacks.step_hooks import hide_unused_step_hooks
from pruneflow.errors import ConfigError
from pruneflow.experiment.console import quiet_lightning
from pruneflow.experiment.cpu_share import share_cpu_cores
from pruneflow.experiment.device_defaults import (
    resolve_fast_defaults,
    speed_rule,
    training_batch_gflops,
    trains_on_cuda,
)
from pruneflow.experiment.hparams import log_hparams
from pruneflow.experiment.startup import StartupPhases
from pruneflow.experiment.trainer_arguments import set_arguments
from pruneflow.module import ClassifierModule
from pruneflow.pruning import STRATEGIES, ChannelPruning

log = logging.getLogger(__name__)

# false: a fresh run; true: continue the run folder's last.ckpt (refused without one); auto: skip a complete run,
# continue one with a last.ckpt, start any other (what a rerun of a stopped sweep needs)
RESUME_CHOICES = (False, True, "auto")


def validate_config(cfg: DictConfig) -> None:
    """Reject values that would only fail (or silently misbehave) after data loading and model building."""
    max_epochs = cfg.trainer.get("max_epochs")
    if not isinstance(max_epochs, int) or isinstance(max_epochs, bool) or max_epochs < 1:
        raise ConfigError(f"trainer.max_epochs must be a positive integer, got {max_epochs!r}")
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool) or cfg.seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {cfg.seed!r}")
    compact = cfg.get("compact", False)
    if not isinstance(compact, bool):
        raise ConfigError(f"compact must be true or false, got {compact!r}")
    resume = cfg.get("resume", False)
    if resume not in RESUME_CHOICES:
        raise ConfigError(f"resume must be one of {', '.join(map(str, RESUME_CHOICES))}, got {resume!r}")
    if compact and not (cfg.get("mask") and cfg.mask.get("_target_")):
        raise ConfigError("compact=true needs mask=<strategy> (activation, weight, ...): without masks nothing is cut")


def check_mask_settings_have_a_strategy(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Refuse ``mask.<key>=...`` on the command line of a run that prunes nothing (``mask=disabled``): the
    settings would be silently ignored. Only a single run's overrides are passed here: in a sweep
    (``-m mask=disabled,weight mask.amount=0.3``) the disabled job's settings are meant for the other jobs."""
    mask = cfg.get("mask")
    if mask is not None and mask.get("_target_"):
        return
    given = [override.lstrip("+") for override in overrides if override.lstrip("+").startswith("mask.")]
    if given:
        others = ", ".join(name for name in STRATEGIES if name != "activation")
        raise ConfigError(
            f"pruning settings given without a strategy ({' '.join(given)} with mask=disabled): add mask=activation "
            f"(or {others}), or drop them"
        )


def refused_setting(group: str, settings: DictConfig, exc: Exception) -> str:
    """One line for ``exc``, raised by ``group``'s target on ``settings``: the setting it names (by key or by
    value) as ``group.key=value``, else all of them."""
    said = " ".join(str(exc).split())
    words = set(re.findall(r"[-\w.]+", said))
    values = {key: value for key, value in settings.items() if not str(key).startswith("_")}

    def named(key: str, value: Any) -> bool:
        return key in words or any(str(item) in words for item in (value if isinstance(value, ListConfig) else [value]))

    named_keys = [key for key, value in values.items() if named(key, value)]
    target = settings.get("_target_", group)
    if len(named_keys) == 1:
        return f"{group}.{named_keys[0]}={values[named_keys[0]]} is refused by {target}: {said}"
    listed = ", ".join(f"{group}.{key}={value}" for key, value in values.items())
    return f"{target} refuses its settings ({listed}): {said}"


def check_optimizer_arguments(cfg: DictConfig) -> None:
    """Build the optimizer, and the schedule on it, once on a stand-in parameter: an argument they refuse
    (``optimizer.lr=-0.1``: PyTorch's "Invalid learning rate") is then one line naming the key before the run
    starts, where it would otherwise be a traceback from inside ``fit``."""
    try:
        optimizer = instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(1))])
    except ConfigError:
        raise  # ours: names the setting already
    except (ValueError, TypeError) as exc:
        raise ConfigError(refused_setting("optimizer", cfg.optimizer, exc)) from exc
    if cfg.get("scheduler"):
        try:
            instantiate(cfg.scheduler)(optimizer, total_steps=1)
        except ConfigError:
            raise  # ours: names the setting already
        except (ValueError, TypeError) as exc:
            raise ConfigError(refused_setting("scheduler", cfg.scheduler, exc)) from exc


def model_gflops_if_needed(cfg: DictConfig, model: torch.nn.Module, datamodule: Any) -> float:
    """Forward GFLOPs of a training batch where an ``auto`` speed setting depends on it, else inf (on a CPU
    without AVX-512 every ``auto`` is fp32 NCHW whatever the size: not worth a counted forward)."""
    autos = cfg.trainer.get("precision") == "auto" or cfg.get("channels_last") == "auto"
    rule = speed_rule(trains_on_cuda(cfg.trainer))
    if not (autos and math.isfinite(min(rule.bf16_from_gflops, rule.channels_last_from_gflops))):
        return float("inf")
    return training_batch_gflops(model, datamodule.input_shape, datamodule.batch_size)


def build_callbacks(cfg: DictConfig) -> list[Callback]:
    """The ``callbacks`` group's callbacks (conf/callbacks/: checkpoints, non-finite guard, throughput,
    progress, and any a user adds), then the mask's ``ChannelPruning``."""
    callbacks: list[Callback] = []
    for name, callback_cfg in (cfg.get("callbacks") or {}).items():
        if callback_cfg is None:
            continue
        callback = instantiate(callback_cfg)
        if not isinstance(callback, Callback):
            raise ConfigError(f"callbacks.{name} must build a lightning Callback, got {type(callback).__name__}")
        if isinstance(callback, ProgressBar) and not cfg.trainer.get("enable_progress_bar", True):
            continue  # Lightning refuses a progress bar callback beside enable_progress_bar=false
        callbacks.append(callback)
    mask_cfg = cfg.get("mask")
    if mask_cfg is not None and mask_cfg.get("_target_"):
        pruning = instantiate(mask_cfg)
        if isinstance(pruning, ChannelPruning):  # it refuses at setup what a cut after fitting could not take out
            pruning.plan.compacts = bool(cfg.get("compact"))
        callbacks.append(pruning)
    return [hide_unused_step_hooks(callback) for callback in callbacks]


def build_logger(cfg: DictConfig, run_dir: Path, purge_step: int | None = None) -> Logger | None:
    """The ``logger`` group's logger (conf/logger/), writing into the run folder unless told where; None
    with ``~logger``. A TensorBoard logger of a resumed run gets ``purge_step``: TensorBoard drops the
    earlier event files' values from that step on, so the steps a stopped run logged after its last
    checkpoint (and trains again now) show once."""
    logger_cfg = cfg.get("logger")
    if not logger_cfg:
        return None
    overrides: dict[str, Any] = {} if logger_cfg.get("save_dir") else {"save_dir": str(run_dir)}
    if purge_step is not None and logger_cfg.get("_target_", "").endswith("TensorBoardLogger"):
        overrides["purge_step"] = purge_step
    logger = instantiate(logger_cfg, **overrides)
    if not isinstance(logger, Logger):
        raise ConfigError(f"logger must build a lightning Logger, got {type(logger).__name__}")
    return logger


def final_metrics(
    trainer: L.Trainer, fit_metrics: dict[str, float], test_results: list[dict[str, float]]
) -> dict[str, Any]:
    """The figures of the final model: last validation, test, and every callback's ``final_metrics()``."""
    metrics: dict[str, Any] = {key: value for key, value in fit_metrics.items() if key.startswith("val/")}
    for result in test_results:
        metrics.update({key: float(value) for key, value in result.items()})
    for callback in trainer.callbacks:
        report = getattr(callback, "final_metrics", None)
        if callable(report):
            metrics.update(report())
    return metrics


def channel_sparsity(trainer: L.Trainer) -> dict[str, Any]:
    """The pruned fraction of the pruned channel spaces' channels (``mask/sparsity``) and their widths
    (``mask/channels``); nothing without a ``ChannelPruning`` callback."""
    for callback in trainer.callbacks:
        if isinstance(callback, ChannelPruning) and callback.pruned:
            widths = {name: int(mask.numel()) for name, mask in callback.pruned.items()}
            pruned = sum(int(mask.sum()) for mask in callback.pruned.values())
            return {"mask/channels": widths, "mask/sparsity": pruned / max(sum(widths.values()), 1)}
    return {}


def summary_line(run_dir: Path, metrics: dict[str, Any]) -> str:
    """The run's one closing line: where it was written, what was pruned, how far the pruned kernels drifted
    and leaked (the largest value since pruning), and the test accuracy."""
    try:
        where = run_dir.relative_to(Path.cwd())
    except ValueError:
        where = run_dir
    parts = [f"run {where} finished in {metrics['wall_seconds']:.1f} s"]
    if "mask/channels" in metrics:
        pruned, widths = metrics["mask/pruned_channels"], metrics["mask/channels"]
        parts.append(
            f"mask={metrics['mask/strategy']} pruned {sum(pruned.values())}/{sum(widths.values())} channels "
            f"({metrics['mask/sparsity']:.0%}) in {len(widths)} channel spaces ({', '.join(widths)})"
        )
        parts.append(
            f"pruned kernels' drift max {metrics.get('drift/producer_l2/max', float('nan')):.3g} (producer L2), "
            f"leak max {metrics.get('leak/activation_abs_mean/max', float('nan')):.3g} (activation |mean|)"
        )
    else:
        parts.append("nothing pruned (mask=disabled)")
    if "test/acc" in metrics:
        parts.append(f"test accuracy {metrics['test/acc']:.2%}")
    return "; ".join(parts)


def checkpoint_to_resume(cfg: DictConfig, run_dir: Path) -> Path | None:
    """``ckpt_path=<file>``, or with ``resume=true`` the run folder's ``last.ckpt`` (written atomically,
    so it is complete even after a SIGKILL), or that ``last.ckpt`` for a Slurm job that was requeued;
    None for a fresh run. ``resume=true`` without a ``last.ckpt`` is a ConfigError naming the folder
    (except in a requeued Slurm job that was stopped before its first checkpoint: it starts over)."""
    if cfg.get("ckpt_path"):
        return Path(cfg.ckpt_path)
    last = run_dir / "checkpoints" / "last.ckpt"
    if cfg.get("resume") == "auto":
        return last if last.is_file() else None
    if cfg.get("resume"):
        if last.is_file():
            return last
        if not requeued_job():
            # Refused rather than started over: a wrong hydra.run.dir would otherwise silently retrain from scratch.
            raise ConfigError(
                f"resume=true but {last.parent} holds no last.ckpt to resume from; point hydra.run.dir= at the run's "
                "folder, or drop resume=true to start a new run"
            )
    return requeued_checkpoint(last)


def complete_metrics(run_dir: Path) -> dict[str, Any] | None:
    """The run folder's metrics when they are complete (``"complete": true``, written by a run's last step),
    else None: no metrics.json yet (stopped while training or testing), or one written before compaction."""
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):  # absent; never half-written (atomic), but a hand-edited file may not parse
        return None
    return metrics if isinstance(metrics, dict) and metrics.get("complete") is True else None


def stale_event_files(run_dir: Path) -> bool:
    """Whether a run that starts over in ``run_dir`` finds TensorBoard event files of a stopped earlier start."""
    return any(run_dir.glob("events.out.tfevents.*"))


def requeued_checkpoint(last: Path) -> Path | None:
    """``last`` when this is a requeued Slurm job (preempted, or out of time and requeued by submitit) that
    checkpointed before it was stopped. The requeued job runs the same command in the same run folder
    (Hydra's sweep folder and its override-named subfolder are fixed at submission), so continuing from
    the folder's last checkpoint is what the user asked for when they submitted it."""
    if not requeued_job():
        return None
    restarts = os.environ["SLURM_RESTART_COUNT"]
    if not last.is_file():
        log.info("Slurm restart %s of job %s: no checkpoint yet, starting from scratch", restarts, slurm_job_id())
        return None
    log.info("Slurm restart %s of job %s: continuing from %s", restarts, slurm_job_id(), last)
    return last


def requeued_job() -> bool:
    """Whether this process is a Slurm job restarted after a requeue (``SLURM_RESTART_COUNT`` > 0)."""
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    return restarts.isdigit() and int(restarts) > 0


def slurm_job_id() -> str | None:
    """This process's Slurm job as ``sacct`` and ``squeue`` name it: ``<array job>_<task>`` for a job of an
    array (submitit submits a sweep as one array), else the job id; None outside Slurm."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def write_config(cfg: DictConfig, run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    except OSError as exc:
        raise ConfigError(
            f"cannot write to the output folder {run_dir} ({exc.strerror or exc}); "
            "choose a writable one with hydra.run.dir="
        ) from exc


@dataclass
class Run:
    """A run built and checked but not yet trained: every check that can refuse its configuration has passed.
    ``prepare`` returns it; ``fit_and_test`` trains. ``train.py`` tells the two apart: a run that fails before
    training leaves no run folder."""

    cfg: DictConfig
    run_dir: Path
    datamodule: Any
    module: ClassifierModule
    trainer: L.Trainer
    logger: Logger | None
    resume: Path | None

    def fit_and_test(self) -> dict[str, Any]:
        """Fit and test, write ``metrics.json`` (and compact with ``compact=true``); returns the final metrics."""
        cfg, run_dir, trainer, module, datamodule = self.cfg, self.run_dir, self.trainer, self.module, self.datamodule
        started = time.perf_counter()
        trainer.fit(module, datamodule=datamodule, ckpt_path=self.resume, weights_only=True)
        fit_seconds = time.perf_counter() - started
        fit_metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
        test_results = trainer.test(module, datamodule=datamodule, verbose=False)
        wall_seconds = time.perf_counter() - started

        metrics = final_metrics(trainer, fit_metrics, test_results)
        metrics.update(channel_sparsity(trainer))
        metrics.update(
            epochs=trainer.current_epoch,
            global_step=trainer.global_step,
            fit_seconds=round(fit_seconds, 3),
            wall_seconds=round(wall_seconds, 3),
        )
        if trainer.is_global_zero:
            if isinstance(self.logger, TensorBoardLogger):
                log_hparams(self.logger, cfg, metrics, step=trainer.global_step)
            write_json_atomic(run_dir / "metrics.json", {**metrics, "complete": not cfg.get("compact")})
        if cfg.get("compact") and trainer.is_global_zero:
            from pruneflow.compaction import compact_trained_module  # only runs that compact pay for its imports

            # After metrics.json is written: a model that cannot be compacted must not lose the run's figures.
            metrics.update(compact_trained_module(trainer, module, datamodule, run_dir / "compact", cfg.model))
            write_json_atomic(run_dir / "metrics.json", {**metrics, "complete": True})
        if trainer.is_global_zero:
            log.info(summary_line(run_dir, metrics))
        return metrics


def prepare(cfg: DictConfig, run_dir: str | Path, overrides: Sequence[str] = ()) -> Run:
    """Check ``cfg`` and build everything one run needs, writing ``config.yaml`` into ``run_dir``; trains nothing.
    ``overrides``: a single run's command line (``check_mask_settings_have_a_strategy``)."""
    run_dir = Path(run_dir)
    phases = StartupPhases()
    phases.mark("imports")
    quiet_lightning()
    validate_config(cfg)
    check_mask_settings_have_a_strategy(cfg, overrides)
    check_optimizer_arguments(cfg)
    share_cpu_cores()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model, input_shape=list(datamodule.input_shape), num_classes=datamodule.num_classes)
    # `auto` speed settings depend on the size of the work (device_defaults.SPEED_RULES); resolved before the
    # config is written, so config.yaml records what ran.
    resolve_fast_defaults(cfg, gflops=model_gflops_if_needed(cfg, model, datamodule))
    write_config(cfg, run_dir)
    phases.mark("config")
    if cfg.get("matmul_precision"):
        torch.set_float32_matmul_precision(cfg.matmul_precision)
    if not getattr(datamodule, "download", False):
        datamodule.setup("fit")  # read now, so the start-up log shows it; Lightning's own setup finds it read
    phases.mark("data")

    module = ClassifierModule(
        model=model,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        num_classes=datamodule.num_classes,
        channels_last=cfg.get("channels_last", False),
        compile=cfg.get("compile", False),
        compile_mode=cfg.get("compile_mode", "default"),
    )
    if slurm_job_id():
        log.info("Slurm job %s (SLURM_JOB_ID=%s, restart %s, task %s of %s)", slurm_job_id(),
                 os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_RESTART_COUNT", "0"),
                 os.environ.get("SLURM_PROCID", "0"), os.environ.get("SLURM_NTASKS", "1"))  # fmt: skip
    resume = checkpoint_to_resume(cfg, run_dir)
    checkpoint_io = AtomicCheckpointIO()
    # Read once: the checks use this dict, and fit's restore gets it from checkpoint_io.
    checkpoint = None if resume is None else check_checkpoint_matches(module, resume, checkpoint_io)
    # A resumed run purges what was logged after its checkpoint (steps > its global_step: Lightning and the
    # telemetry log at the step count after the optimizer step), so each tag shows one continuous curve.
    # A run that starts over where a stopped start logged (resume=auto, stopped before its first checkpoint)
    # purges all of that (step 0 on).
    purge_step = None if checkpoint is None else int(checkpoint["global_step"]) + 1
    if purge_step is None and cfg.get("resume") == "auto" and stale_event_files(run_dir):
        purge_step = 0
    logger = build_logger(cfg, run_dir, purge_step=purge_step)
    callbacks = [*build_callbacks(cfg), phases]
    phases.mark("model")
    # default_root_dir: where checkpoints go (<run dir>/checkpoints) also with ~logger.
    trainer: L.Trainer = instantiate(
        set_arguments(cfg.trainer),
        callbacks=callbacks,
        logger=logger or False,
        plugins=[checkpoint_io],
        default_root_dir=str(run_dir),
    )
    if resume is not None and checkpoint is not None:
        for callback in callbacks:
            if isinstance(callback, ChannelPruning):
                callback.check_checkpoint(checkpoint, str(resume))
        log.info("resuming from %s (saved at epoch %s, global step %s)", resume, checkpoint.get("epoch"),
                 checkpoint.get("global_step"))  # fmt: skip
        del checkpoint
    phases.mark("trainer")
    return Run(cfg, run_dir, datamodule, module, trainer, logger, resume)


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Fit and test one configuration, writing everything into ``run_dir``; returns the final metrics. With
    ``resume=auto``, a run folder that already holds complete metrics is not trained again (a rerun sweep)."""
    if (done := skipped_as_complete(cfg, run_dir)) is not None:
        return done
    return prepare(cfg, run_dir).fit_and_test()


def skipped_as_complete(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any] | None:
    """With ``resume=auto``, the metrics of a run folder that already holds complete ones (a rerun sweep skips
    that run); else None."""
    if cfg.get("resume") != "auto" or (done := complete_metrics(Path(run_dir))) is None:
        return None
    log.info("resume=auto: %s already holds complete metrics, skipped", run_dir)
    return done
