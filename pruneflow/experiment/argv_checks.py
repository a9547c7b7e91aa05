"""Command-line checks that run before Hydra composes a config, so a typo costs one clear line."""

from __future__ import annotations

from pathlib import Path


def group_options(conf_dir: Path, group: str) -> list[str]:
    return sorted(path.stem for path in (conf_dir / group).glob("*.yaml") if not path.stem.startswith("_"))


def check_group_choices(argv: list[str], conf_dir: Path) -> str | None:
    """The error for the first ``group=option`` override naming an option ``conf_dir`` does not have.

    Hydra's own message for this spans several lines and a stack trace; sweeps (``a,b``) are checked
    option by option. Returns ``None`` when every choice exists.
    """
    for argument in argv:
        if argument.startswith("-") or "=" not in argument:
            continue
        key, _, value = argument.partition("=")
        group = key.lstrip("+~")
        if "." in group or not (conf_dir / group).is_dir() or group.startswith("hydra"):
            continue
        available = group_options(conf_dir, group)
        for option in value.strip("[]").split(","):  # a, b or [a, b] (several options of one group)
            option = option.strip()
            if option in ("", "null") or "(" in option or "$" in option:
                continue
            if option not in available:
                return f"unknown {group} {option!r}; choose one of: {', '.join(available)}"
    return None
