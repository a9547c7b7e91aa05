"""The config ``train.py`` runs, composed in-process: for tests, benchmarks and notebooks that call
``pruneflow.experiment.run.train`` without a command line."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from pruneflow.errors import ConfigError

# conf/ beside the package in a checkout (an installed wheel carries no conf/: pass conf_dir).
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def compose_config(
    overrides: Sequence[str] = (), *, with_hydra: bool = False, conf_dir: Path | None = None
) -> DictConfig:
    """``train.yaml`` composed with ``overrides`` (``["mask=weight", "trainer.max_epochs=1"]``) as
    ``python train.py <overrides>`` composes it, without running anything; ``with_hydra``: with the ``hydra``
    node (sweeper, launcher, output folders). ``conf_dir``: another ``conf/`` folder."""
    folder = conf_dir or CONF_DIR
    if not (folder / "train.yaml").is_file():
        raise ConfigError(f"no train.yaml in {folder}; pass conf_dir= the folder that holds pruneflow's conf/")
    with initialize_config_dir(config_dir=str(folder.resolve()), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=with_hydra)
