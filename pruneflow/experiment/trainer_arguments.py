"""The ``trainer`` config group's schema: every argument of the installed ``lightning.pytorch.Trainer``.

Hydra composes configs in struct mode, so a key that no YAML file sets (``trainer.max_steps``) would be
refused as "not in struct" and a user would have to guess ``+trainer.max_steps``. The schema, derived from
``Trainer.__init__``'s signature, declares every argument at the Trainer's own default: ``trainer.<arg>=v``
works as written for any argument of the Lightning version installed, ``config.yaml`` records every
argument the Trainer received, and a misspelt key is still refused (``check_trainer_arguments`` names the
nearest argument before Hydra runs). The Trainer is given only the arguments whose value differs from its own
default (``set_arguments``): Lightning's ``PL_TRAINER_<ARG>`` environment defaults apply to the others, as
they do to a plain ``Trainer()``.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

SCHEMA_NAME = "_lightning_trainer"  # conf/trainer/*.yaml put it first in their defaults list
TARGET = "lightning.pytorch.Trainer"


def trainer_arguments() -> dict[str, Any]:
    """``{argument: default}`` of the installed ``lightning.pytorch.Trainer``."""
    from lightning.pytorch import Trainer

    named = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    parameters = inspect.signature(Trainer.__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.kind in named and p.name != "self"}


def set_arguments(trainer_cfg: DictConfig) -> dict[str, Any]:
    """``trainer_cfg`` (the ``trainer`` group, resolved) without the arguments left at the Trainer's own default.
    Lightning's ``PL_TRAINER_*`` variables are defaults for the arguments a Trainer is not given; the schema
    gives every argument a value, so one at its default counts as not set (compared with its type: a
    ``devices: 1`` is not the default ``"auto"``, a ``False`` not a ``None``)."""
    defaults = trainer_arguments()
    resolved = OmegaConf.to_container(trainer_cfg, resolve=True)
    assert isinstance(resolved, dict)
    return {
        key: value
        for key, value in resolved.items()
        if key not in defaults or type(value) is not type(defaults[key]) or value != defaults[key]
    }


def register_trainer_schema() -> None:
    """Store the schema as ``trainer/_lightning_trainer`` (a config group option Hydra can put in a defaults list)."""
    fields = [("_target_", str, dataclasses.field(default=TARGET))]
    fields += [(name, Any, dataclasses.field(default=default)) for name, default in trainer_arguments().items()]
    schema = dataclasses.make_dataclass("LightningTrainerConfig", fields)
    ConfigStore.instance().store(group="trainer", name=SCHEMA_NAME, node=schema)


def check_trainer_arguments(argv: list[str]) -> str | None:
    """The error for the first ``trainer.<key>=`` override whose key is not a Trainer argument, naming the
    nearest one; ``None`` when every such key is an argument. ``+trainer.<arg>`` is refused too: the key
    exists already (Hydra's "could not append" would say so in a traceback)."""
    arguments = trainer_arguments()
    for argument in argv:
        if argument.startswith("-") or "=" not in argument:
            continue
        key = argument.partition("=")[0]
        prefix = key[: len(key) - len(key.lstrip("+~"))]
        parts = key[len(prefix) :].split(".")
        if len(parts) < 2 or parts[0] != "trainer":
            continue
        name = parts[1]
        if name not in arguments:
            nearest = difflib.get_close_matches(name, list(arguments), n=1)
            hint = f"; did you mean trainer.{nearest[0]}?" if nearest else ""
            accepted = "any lightning.pytorch.Trainer argument is accepted"
            return f"unknown Trainer argument {name!r} in {argument!r}{hint} ({accepted})"
        if prefix == "+" and len(parts) == 2:
            return f"trainer.{name} is already in the config: write {argument[1:]!r} (no '+')"
    return None
