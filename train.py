"""Entry point: ``python train.py [group=option ...] [key=value ...]`` (add ``-m`` for a sweep).

A thin Hydra wrapper around ``pruneflow.experiment.run.train``; configuration lives in ``conf/``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pruneflow.experiment.argv_checks import check_group_choices
from pruneflow.experiment.run import train
from pruneflow.experiment.trainer_arguments import check_trainer_arguments
from pruneflow.experiment.user_errors import record_in_run_log, user_error_message

CONF_DIR = Path(__file__).resolve().parent / "conf"


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg, HydraConfig.get().runtime.output_dir)
    except Exception as exc:
        message = user_error_message(exc)
        record_in_run_log(exc, message)
        if message is None or os.environ.get("PRUNEFLOW_DEBUG"):
            raise
        raise SystemExit(f"pruneflow: error: {message}") from None
    return metrics.get("test/acc")


if __name__ == "__main__":
    problem = check_group_choices(sys.argv[1:], CONF_DIR) or check_trainer_arguments(sys.argv[1:])
    if problem:
        raise SystemExit(f"pruneflow: error: {problem}")
    main()
