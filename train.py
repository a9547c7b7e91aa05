"""Entry point: ``python train.py [group=option ...] [key=value ...]`` (add ``-m`` for a sweep).

A thin Hydra wrapper around ``pruneflow.experiment.run``; configuration lives in ``conf/``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from pruneflow.experiment.argv_checks import check_group_choices, check_keys
from pruneflow.experiment.console import quiet_hydra
from pruneflow.experiment.run import prepare, skipped_as_complete
from pruneflow.experiment.run_folder import created_by_this_start, discarded_if_it_fails
from pruneflow.experiment.trainer_arguments import check_trainer_arguments
from pruneflow.experiment.user_errors import record_in_run_log, user_error_message

CONF_DIR = Path(__file__).resolve().parent / "conf"


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    single_run = hydra_cfg.mode == RunMode.RUN
    if (done := skipped_as_complete(cfg, run_dir)) is not None:
        return done.get("test/acc")
    try:
        # A single run that fails before training leaves no folder (a sweep's job keeps its, with the error in
        # its log, for pruneflow-report to list); a folder that existed before this start is kept.
        with discarded_if_it_fails(run_dir, single_run and created_by_this_start(run_dir)):
            run = prepare(cfg, run_dir, overrides=list(hydra_cfg.overrides.task) if single_run else ())
        metrics = run.fit_and_test()
    except Exception as exc:
        message = user_error_message(exc)
        record_in_run_log(exc, message)
        if message is None or os.environ.get("PRUNEFLOW_DEBUG"):
            raise
        raise SystemExit(f"pruneflow: error: {message}") from None
    return metrics.get("test/acc")


if __name__ == "__main__":
    quiet_hydra()
    argv = sys.argv[1:]
    problem = check_group_choices(argv, CONF_DIR) or check_trainer_arguments(argv) or check_keys(argv, CONF_DIR)
    if problem:
        raise SystemExit(f"pruneflow: error: {problem}")
    main()
