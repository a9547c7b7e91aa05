"""What several test files share: where the repository and the real data lie, how to run the real entry
point, and how to compose the real configs in-process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import pruneflow.experiment  # noqa: F401  (registers the resolvers conf/ uses)

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
# CI and developers keep the read-only real data sets beside the checkout, in ../shared/data.
SHARED_DATA = Path(os.environ.get("PRUNEFLOW_TEST_DATA", REPO.parent / "shared" / "data")).resolve()

QUIET = ("trainer.enable_progress_bar=false", "trainer.enable_model_summary=false")


def run_train(*overrides: str, cwd: Path = REPO, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run ``python train.py <overrides>`` as a user would; never downloads (no PRUNEFLOW_DATA fallback)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PRUNEFLOW_DATA", None)
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def compose_train(*overrides: str, with_hydra: bool = False) -> DictConfig:
    """``conf/train.yaml`` composed with ``overrides`` as ``train.py`` would, without running anything;
    ``with_hydra``: with the ``hydra`` node (sweeper, launcher, output folders)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=with_hydra)
