"""The seed example (examples/seed_example.py): the effect pruneflow exists to make visible."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "seed_example.py"
spec = importlib.util.spec_from_file_location("seed_example", SCRIPT)
assert spec is not None and spec.loader is not None
seed_example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(seed_example)


@pytest.mark.parametrize("input_value", [2.0, -0.5])
def test_scalar_chain_gradient_lands_on_the_zeroed_weight(input_value: float) -> None:
    assert seed_example.scalar_chain(input_value) == {"dx3/dw1": 0.0, "dx3/dw2": input_value, "dx3/dw3": 0.0}


def test_weight_mask_leaves_a_gradient_on_the_pruned_kernel() -> None:
    row = seed_example.two_conv_example("weight")
    assert row["conv1 pruned kernel |w|"] == 0.0
    assert row["conv1 pruned kernel |grad|"] > 1e-3


def test_activation_mask_gives_an_exactly_zero_gradient() -> None:
    row = seed_example.two_conv_example("activation")
    assert row["conv1 pruned kernel |grad|"] == 0.0
    assert row["conv1 kept kernels |grad|"] > 0.0


@pytest.mark.parametrize("strategy", ["weight", "activation"])
def test_conv2_input_slice_for_the_pruned_channel_is_zero_either_way(strategy: str) -> None:
    row = seed_example.two_conv_example(strategy)
    assert row["conv2 input at channel, max|x|"] == 0.0
    assert row["conv2 input-slice |grad|"] == 0.0


def test_script_prints_both_tables() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, check=True).stdout
    assert "dx3/dw2 = 2" in out and "activation" in out and "conv1 pruned kernel |grad|" in out
