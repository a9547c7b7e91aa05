"""``python -m benchmarks timm``: its rows on timm's tiny ``test_*`` models, how an outcome is classified and a
refusal sorted into a cause, and that a model which hangs or kills its process is a row, not the end of the list."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
from torch import nn

from benchmarks import common, timm_models
from benchmarks import main as benchmarks_main


def test_timm_benchmark_rows_on_timms_tiny_models(tmp_path: Path) -> None:
    pytest.importorskip("timm", reason="timm is an optional extra")
    report, out = tmp_path / "timm.json", tmp_path / "timm.md"
    rows = benchmarks_main(["timm", "--models", "test_resnet,test_vit", "--time-limit", "0", "--json", str(report),
                            "--out", str(out)])  # fmt: skip
    resnet, vit = rows
    assert (resnet["family"], resnet["model"], vit["family"], vit["model"]) == (
        "resnet", "test_resnet", "vision_transformer", "test_vit",
    )  # fmt: skip
    # test_resnet's input size is not fixed: measured at 64 px; test_vit's is, at its own 160 px
    assert resnet["size"] == 64 and vit["size"] == 160
    # a ResNet is cut exactly, and half of every space is at least a 3x FLOPs reduction
    assert resnet["outcome"] == ">=3x" and resnet["agreement"] == 1.0 and resnet["flops_ratio"] >= 3
    for row in rows:
        assert row["outcome"] in timm_models.OUTCOMES
        assert row["outcome"] == timm_models.outcome(row)
        assert row["outcome"] != "crash", row["reason"]  # any exception from the tracer or the cut is a failure
        assert len(row["refusals"]) == row["spaces"] - row["prunable"]  # one reason per refused space
    saved = json.loads(report.read_text())
    assert [row["model"] for row in saved["rows"]] == ["test_resnet", "test_vit"]
    assert sum(saved["summary"]["pruneflow"].values()) == 2
    assert sum(entry["spaces"] for entry in saved["causes"]) == sum(len(row["refusals"]) for row in rows)
    text = out.read_text()
    assert "| resnet | test_resnet | 64 | >=3x | " in text and "| vision_transformer | test_vit | 160 | " in text
    if "tp_outcome" in resnet:  # Torch-Pruning installed: its figures beside pruneflow's, on the same model
        assert resnet["tp_outcome"] in timm_models.OUTCOMES and vit["tp_outcome"] in timm_models.OUTCOMES
        assert "Torch-Pruning 1.6.1" in text


def test_torch_prunings_figures_are_taken_from_an_earlier_run_where_it_holds_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    earlier = tmp_path / "earlier.json"
    kept = {"tp_handled": "yes", "tp_flops_ratio": 2.5, "tp_params_ratio": 2.0, "tp_outcome": "2-3x"}
    earlier.write_text(json.dumps({"rows": [{"model": "a", "flops_ratio": 9.0, **kept}]}))
    measured = {"tp_handled": "yes", "tp_flops_ratio": 3.5, "tp_params_ratio": 3.0}
    monkeypatch.setattr(timm_models, "models_to_run", lambda args: [{"family": "f", "model": m} for m in "ab"])
    refused = {"handled": "refused-all", "refusals": ["x"]}
    monkeypatch.setattr(timm_models, "measure_pruneflow", lambda name, size=None: refused)
    monkeypatch.setattr(timm_models, "measure_torch_pruning", lambda name, size=None: measured)
    find_spec = importlib.util.find_spec  # neither timm nor Torch-Pruning is needed: nothing is built

    def installed(name: str, *args: object) -> object:
        return object() if name in ("timm", "torch_pruning") else find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", installed)
    rows = benchmarks_main(["timm", "--time-limit", "0", "--torch-pruning", "--torch-pruning-from", str(earlier)])
    assert {key: rows[0][key] for key in kept} == kept  # taken, pruneflow's own figures measured again
    assert rows[0]["outcome"] == "refused entirely" and rows[1]["tp_flops_ratio"] == 3.5 and "tp_outcome" in rows[1]
    with pytest.raises(SystemExit, match=r"--torch-pruning-from .*missing\.json: no such file"):
        benchmarks_main(["timm", "--time-limit", "0", "--torch-pruning-from", str(tmp_path / "missing.json")])


def test_outcome_of_a_row() -> None:
    exact = {"handled": "yes", "agreement": 1.0, "max_rel_diff": 1e-7}
    assert timm_models.outcome({**exact, "flops_ratio": 3.0}) == ">=3x"
    assert timm_models.outcome({**exact, "flops_ratio": 2.5}) == "2-3x"
    assert timm_models.outcome({**exact, "flops_ratio": 1.2}) == "<2x"
    assert timm_models.outcome({**exact, "agreement": 0.5, "flops_ratio": 4.0}) == "inexact cut"
    assert timm_models.outcome({**exact, "max_rel_diff": 0.36, "flops_ratio": 4.0}) == "inexact cut"
    assert timm_models.outcome({**exact, "max_rel_diff": float("nan"), "flops_ratio": 4.0}) == "inexact cut"
    assert timm_models.outcome({"handled": "refused-all"}) == "refused entirely"
    assert timm_models.outcome({"handled": "error", "reason": "IndexError: x"}) == "crash"
    assert timm_models.outcome({"handled": "timeout"}) == "over time"


def test_refusals_are_sorted_into_causes_with_an_example() -> None:
    rows = [
        {"model": "a", "refusals": ["reaches cat() at cat, whose effect on channels is not understood",
                                    "reaches the network's output, whose shape would change"]},
        {"model": "b", "refusals": ["reaches add() at add, whose effect on channels is not understood",
                                    "something new"]},
    ]  # fmt: skip
    assert timm_models.causes(rows) == [
        {"cause": "op not understood", "spaces": 2, "families": 2,
         "example": "reaches cat() at cat, whose effect on channels is not understood"},
        {"cause": "network output (expected: the classifier)", "spaces": 1, "families": 1,
         "example": "reaches the network's output, whose shape would change"},
        {"cause": "other", "spaces": 1, "families": 1, "example": "something new"},
    ]  # fmt: skip



def test_the_attentions_that_cannot_be_cut_have_causes_of_their_own() -> None:
    softmax = "channel attention a takes a softmax across each head's positions (a masked one still counts) and " \
              "reshapes its heads by its input's width"
    assert timm_models.cause(softmax) == "softmax across a head's positions"
    assert timm_models.cause("pooling attention a has one head, and whole heads are all it can lose") == (
        "single-head attention cut in whole heads")

def test_the_smallest_looking_names_come_first() -> None:
    assert sorted(["convit_base", "convit_small", "convit_tiny"], key=timm_models.looks_small)[0] == "convit_tiny"
    assert sorted(["cait_s24_224", "cait_xxs36_224", "cait_xxs24_224"], key=timm_models.looks_small)[0] == (
        "cait_xxs24_224"
    )
    assert sorted(["resnet50", "resnet18", "test_resnet"], key=timm_models.looks_small) == [
        "test_resnet", "resnet18", "resnet50",
    ]  # fmt: skip


def test_a_model_that_hangs_or_kills_its_process_is_a_row() -> None:
    assert common.isolated(time.sleep, (600,), limit=1) == ("timeout", "over 1 s")
    assert common.isolated(os._exit, (3,), limit=600) == ("error", "the process died (exit code 3)")
    kind, line = common.isolated(int, ("x",), limit=0)
    assert kind == "error" and line.startswith("ValueError: invalid literal for int() with base 10: 'x' (at common.py:")


def test_a_layer_timm_builds_at_zero_gets_random_weights_so_a_cut_that_changed_the_logits_shows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    timm = pytest.importorskip("timm", reason="timm is an optional extra")
    head = nn.Linear(8, 10)
    nn.init.zeros_(head.weight)  # as timm builds Hiera's head: every logit would be its bias whatever the cut did
    monkeypatch.setattr(timm, "create_model", lambda name, num_classes: nn.Sequential(nn.Conv2d(3, 8, 1), head))
    network, size = timm_models.build("zero_head", size=32)
    assert size == 32 and network[1].weight.any() and network[0].weight.any()
