"""Which errors reach the user as one line (our ``ConfigError``) and which keep their traceback (bugs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import QUIET, run_train
from hydra.errors import InstantiationException

from pruneflow.callbacks import NonFiniteLossError
from pruneflow.compaction import CompactionError
from pruneflow.data import DatasetCorruptError, DatasetNotFoundError
from pruneflow.errors import ConfigError
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
