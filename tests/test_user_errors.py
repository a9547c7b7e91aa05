"""Which errors reach the user as one line (our ``ConfigError``) and which keep their traceback (bugs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import CONF_DIR, QUIET, compose_train, run_train
from hydra.errors import InstantiationException

from pruneflow.callbacks import NonFiniteLossError
from pruneflow.compaction import CompactionError
from pruneflow.data import DatasetCorruptError, DatasetNotFoundError
from pruneflow.errors import ConfigError
from pruneflow.experiment.argv_checks import check_group_choices, check_keys, config_groups, group_options
from pruneflow.experiment.run import check_mask_settings_have_a_strategy
from pruneflow.experiment.user_errors import user_error_message
from pruneflow.pruning import ChannelPruning
from pruneflow.pruning.sparsity_schedule import PruningSchedule


def raised(error: BaseException, cause: BaseException | None = None) -> BaseException:
    """``error`` as Python leaves it after ``raise error from cause``."""
    try:
        raise error from cause
    except BaseException as caught:
        return caught


@pytest.mark.parametrize(
    "error",
    [
        ConfigError("mask.amount must be a fraction\n in [0, 1)"),
        DatasetNotFoundError("no MNIST files"),
        DatasetCorruptError("cannot read a file"),
        NonFiniteLossError("training loss became non-finite at step 3"),
        CompactionError("cannot cut channels of conv1"),
        raised(InstantiationException("Error in call to target"), ConfigError("unknown activation 'tanh'")),
    ],
)
def test_config_errors_are_one_line(error: BaseException) -> None:
    message = user_error_message(error)
    assert message is not None and "\n" not in message


def zip_mismatch() -> BaseException:
    try:
        list(zip([1, 2], [1], strict=True))
    except ValueError as caught:
        return caught
    raise AssertionError("zip(strict=True) accepted lists of different lengths")


def zero_division() -> BaseException:
    try:
        return ZeroDivisionError(str(1 / 0))
    except ZeroDivisionError as caught:
        return caught


def bug_while_handling_a_config_error() -> BaseException:
    try:
        try:
            raise ConfigError("bad value")
        except ConfigError:
            return IndexError(str([][0]))
    except IndexError as caught:
        return caught


@pytest.mark.parametrize(
    "error",
    [
        zero_division(),
        zip_mismatch(),
        ValueError("a plain ValueError from PyTorch"),
        FileNotFoundError("a file the library expected to have written"),
        raised(InstantiationException("Error in call to target"), ZeroDivisionError("division by zero")),
        # a bug raised while a ConfigError was being handled is still a bug
        bug_while_handling_a_config_error(),
    ],
)
def test_bugs_keep_their_traceback(error: BaseException) -> None:
    assert user_error_message(error) is None


def test_a_bug_inside_a_run_prints_its_traceback(tmp_path: Path) -> None:
    # A callback whose construction divides by zero: a bug, not bad input.
    result = run_train(
        "data=synthetic", "+callbacks.bug._target_=operator.truediv", "+callbacks.bug._args_=[1,0]",
        f"hydra.run.dir={tmp_path / 'run'}", *QUIET,
    )  # fmt: skip
    assert result.returncode != 0
    # Hydra's report of a failed job (its traceback with HYDRA_FULL_ERROR=1), not our one-line user error.
    assert "Error executing job" in result.stderr and "ZeroDivisionError" in result.stderr, result.stderr[-2000:]
    assert "pruneflow: error:" not in result.stderr


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ({"amount": True}, "mask.amount must be a fraction in [0, 1), got True"),
        ({"log_every_n_steps": True}, "mask.log_every_n_steps must be a positive integer, got True"),
        ({"taylor_batches": True}, "mask.taylor_batches must be a positive integer, got True"),
        ({"seed": True}, "mask.seed must be a non-negative integer, got True"),
        ({"at_epoch": True}, "mask.at_epoch must be a non-negative integer or null, got True"),
        ({"schedule": "gradual", "start_epoch": False, "end_epoch": 2}, "mask.start_epoch must be a non-negative"),
        ({"reset_optimizer_state": 1}, "mask.reset_optimizer_state must be true or false, got 1"),
    ],
)
def test_a_bool_is_not_a_number_nor_a_number_a_bool(setting: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)):
        ChannelPruning(strategy="weight", **setting)


def test_pruning_schedule_rejects_a_bool_amount() -> None:
    with pytest.raises(ConfigError, match=r"amount must be a fraction in \[0, 1\], got True"):
        PruningSchedule(True)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (("optimizer.lr=-0.1",), "optimizer.lr=-0.1 is refused by torch.optim.SGD: Invalid learning rate: -0.1"),
        (("optimizer=adam", "optimizer.weight_decay=-1"), "optimizer.weight_decay=-1 is refused by torch.optim.Adam"),
        (("scheduler.warmup_steps=-2",), "scheduler.warmup_steps must be >= 0"),
        (("amount=0.5",), "unknown key 'amount' in 'amount=0.5'; did you mean mask.amount=0.5?"),
        (("max_steps=3",), "did you mean trainer.max_steps=3?"),
        (("mask=activatoin",), "unknown mask 'activatoin'; did you mean activation? (choose one of: activation,"),
        (("maks=weight",), "unknown key 'maks' in 'maks=weight'; did you mean mask=weight?"),
        (("mask.amout=0.3",), "unknown key 'mask.amout' in 'mask.amout=0.3'; did you mean mask.amount?"),
        (("mask=disabled", "mask.amount=0.3"), "pruning settings given without a strategy (mask.amount=0.3 with"),
    ],
)
def test_a_refused_start_is_one_line_and_leaves_no_run_folder(
    tmp_path: Path, overrides: tuple[str, ...], expected: str
) -> None:
    # The default run folder (outputs/runs/<time>, under the working directory), as a user gets it.
    result = run_train("data=synthetic", *overrides, *QUIET, cwd=tmp_path)
    assert result.returncode != 0
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pruneflow: error: ") and expected in lines[0], lines[-20:]
    assert not [path for path in tmp_path.rglob("*") if path.is_file()], "a refused start left files behind"


def test_a_refused_start_keeps_a_folder_that_held_a_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"a run's checkpoint")
    result = run_train("data=synthetic", "optimizer.lr=-0.1", f"hydra.run.dir={run_dir}", *QUIET)
    assert result.returncode != 0 and "optimizer.lr=-0.1" in result.stderr
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == b"a run's checkpoint"
    assert "pruneflow: error: optimizer.lr=-0.1" in (run_dir / "train.log").read_text()  # why this start failed


def test_a_sweep_with_mask_settings_runs_its_disabled_job() -> None:
    # In a sweep, settings given beside mask=disabled are meant for the sweep's other strategies.
    check_mask_settings_have_a_strategy(compose_train("mask=disabled", "mask.amount=0.3"), overrides=())
    with pytest.raises(ConfigError, match=re.escape("pruning settings given without a strategy (mask.amount=0.3")):
        check_mask_settings_have_a_strategy(compose_train("mask=disabled"), overrides=["mask.amount=0.3"])
    check_mask_settings_have_a_strategy(compose_train("mask=weight"), overrides=["mask=weight", "mask.amount=0.3"])


@pytest.mark.parametrize("group", config_groups(CONF_DIR))
def test_every_groups_misspelt_option_names_the_nearest(group: str) -> None:
    option = max(group_options(CONF_DIR, group), key=len)
    misspelt = option[:2] + option[3:]  # its third letter left out
    problem = check_group_choices([f"{group}={misspelt}"], CONF_DIR)
    assert problem is not None and f"did you mean {option}?" in problem, problem


KNOWN_KEYS = [
    "mask.amount=0.3",
    "data.root=x",
    "seed=1",
    "callbacks.throughput.warmup_steps=0",
    "+mask.extra=1",
    "hydra.run.dir=x",
    "trainer.max_steps=5",
    "optimizer.lr=0.1",
    "model.width=4",
    "compact=true",
]


@pytest.mark.parametrize("argument", KNOWN_KEYS)
def test_keys_the_config_has_pass_the_key_check(argument: str) -> None:
    assert check_keys([argument], CONF_DIR) is None
