"""Command-line checks that run before Hydra composes a config, so a typo costs one clear line.

Hydra's own messages for a misspelt option or key span several lines, and for a key given without its group
(``amount=0.5``) advise ``+amount=0.5``, which adds a key nothing reads. These checks read the YAML files of
``conf/`` (no composing, no imports) and name the nearest option or key instead.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from pruneflow.experiment.trainer_arguments import trainer_arguments

# Experiment files are ``# @package _global_`` overlays: their keys are the root config's.
GLOBAL_PACKAGE_GROUPS = ("experiment",)


def group_options(conf_dir: Path, group: str) -> list[str]:
    return sorted(path.stem for path in (conf_dir / group).glob("*.yaml") if not path.stem.startswith("_"))


def config_groups(conf_dir: Path) -> list[str]:
    return sorted(path.name for path in conf_dir.iterdir() if path.is_dir())


def _top_level(path: Path) -> dict[str, Any]:
    loaded = yaml.safe_load(path.read_text())
    return loaded if isinstance(loaded, dict) else {}


def known_keys(conf_dir: Path) -> dict[str, set[str]]:
    """The keys a command line may set without ``+``: ``""`` maps to the root's keys (``train.yaml``'s, the
    groups, and whatever an experiment sets at the root), each group to the union of its options' keys
    (shared ``_*.yaml`` files included), ``trainer`` to every ``Trainer`` argument (its schema)."""
    keys: dict[str, set[str]] = {group: set() for group in config_groups(conf_dir)}
    keys[""] = set(_top_level(conf_dir / "train.yaml")) | set(keys) | {"hydra"}
    for group in keys.keys() - {""}:
        for path in (conf_dir / group).glob("*.yaml"):
            content = _top_level(path)
            if group in GLOBAL_PACKAGE_GROUPS:
                keys[""] |= set(content)
                for name, value in content.items():
                    if name in keys and isinstance(value, dict):
                        keys[name] |= set(value)
            else:
                keys[group] |= set(content)
    keys["trainer"] |= set(trainer_arguments())
    for names in keys.values():
        names.discard("defaults")
    return keys


def _nearest(name: str, candidates: Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(name, sorted(candidates), n=1)
    return matches[0] if matches else None


def _assignments(argv: list[str]) -> Iterable[tuple[str, str, str]]:
    """``(argument, key, value)`` of every plain ``key=value`` override (not ``+key``, ``~key``, ``hydra...``)."""
    for argument in argv:
        if argument.startswith(("-", "+", "~")) or "=" not in argument:
            continue
        key, _, value = argument.partition("=")
        if "/" in key or key == "hydra" or key.startswith("hydra."):
            continue
        yield argument, key, value


def check_group_choices(argv: list[str], conf_dir: Path) -> str | None:
    """The error for the first ``group=option`` override naming an option ``conf_dir`` does not have, with the
    nearest option; sweeps (``a,b``) are checked option by option. Returns ``None`` when every choice exists."""
    groups = set(config_groups(conf_dir))
    for argument in argv:
        if argument.startswith("-") or "=" not in argument:
            continue
        key, _, value = argument.partition("=")
        group = key.lstrip("+~")
        if group not in groups:
            continue
        available = group_options(conf_dir, group)
        for option in value.strip("[]").split(","):  # a, b or [a, b] (several options of one group)
            option = option.strip()
            if option in ("", "null") or "(" in option or "$" in option:
                continue
            if option not in available:
                nearest = _nearest(option, available)
                choices = ", ".join(available)
                if nearest:
                    return f"unknown {group} {option!r}; did you mean {nearest}? (choose one of: {choices})"
                return f"unknown {group} {option!r}; choose one of: {choices}"
    return None


def check_keys(argv: list[str], conf_dir: Path) -> str | None:
    """The error for the first ``key=value`` override whose key the config does not have, naming what was meant:
    a group's key given without its group (``amount=0.5``: ``mask.amount=0.5``), or the nearest key
    (``mask.amout``: ``mask.amount``; ``maks.amount``: ``mask.amount``). ``trainer.<key>`` is
    ``check_trainer_arguments``'s. Returns ``None`` when every key exists."""
    keys = known_keys(conf_dir)
    root = keys[""]
    for argument, key, value in _assignments(argv):
        head, _, rest = key.partition(".")
        if head in root:
            if not rest or head not in keys or head == "trainer" or not keys[head]:
                continue
            name = rest.split(".")[0]
            if name in keys[head]:
                continue
            nearest = _nearest(name, keys[head])
            hint = (f"did you mean {head}.{nearest}?" if nearest
                    else f"{head} has: {', '.join(sorted(keys[head]))} (add a new key with +{key}=)")  # fmt: skip
            return f"unknown key {key!r} in {argument!r}; {hint}"
        owners = sorted(group for group, names in keys.items() if group and head in names)
        if owners:
            meant = " or ".join(f"{group}.{key}={value}" for group in owners)
            return f"unknown key {head!r} in {argument!r}; did you mean {meant}?"
        nearest = _nearest(head, root)
        if nearest:
            return f"unknown key {head!r} in {argument!r}; did you mean {nearest}{key[len(head) :]}={value}?"
        return f"unknown key {head!r} in {argument!r}; the config's keys are: {', '.join(sorted(root))}"
    return None
