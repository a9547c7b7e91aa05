"""``mask=disabled`` (no callback) and ``mask=control`` (select and measure, apply nothing) are told apart
everywhere a run is described; the control's former name ``none`` still works for one release, with a warning."""

from __future__ import annotations

import warnings

import pytest
from helpers import compose_train
from hydra.utils import instantiate

from pruneflow import ChannelPruning
from pruneflow.experiment.hparams import run_hparams
from pruneflow.pruning.strategies import make_strategy


def test_hparams_row_of_an_unpruned_run_is_not_the_controls() -> None:
    unpruned = run_hparams(compose_train("mask=disabled"), {})
    control = run_hparams(compose_train("mask=control"), {"mask/strategy": "control"})
    assert (unpruned["strategy"], unpruned["criterion"], unpruned["amount"]) == ("unpruned", "none", 0.0)
    assert (control["strategy"], control["criterion"], control["amount"]) == ("control", "l1", 0.5)
    assert not unpruned["reset_optimizer_state"]


def test_mask_none_is_the_control_under_its_former_name_with_a_future_warning() -> None:
    with pytest.warns(FutureWarning, match=r"mask strategy 'none' is now called 'control' \(mask=control\)"):
        pruning = instantiate(compose_train("mask=none").mask)
    assert isinstance(pruning, ChannelPruning) and pruning.strategy_name == "control"
    with pytest.warns(FutureWarning, match="'none' is now called 'control'"):
        assert make_strategy("none").name == "control"
    assert run_hparams(compose_train("mask=none"), {"mask/strategy": pruning.strategy_name})["strategy"] == "control"


def test_the_control_selects_without_warning() -> None:
    cfg = compose_train("mask=control")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ChannelPruning(strategy="control").strategy_name == "control"
        assert instantiate(cfg.mask).strategy_name == "control"
    assert not [warning for warning in caught if "is now called" in str(warning.message)]
