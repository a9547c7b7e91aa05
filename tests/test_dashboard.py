"""A real TensorBoard server over a sweep: the runs, their drift tags, the custom-scalars layout and the
HParams table, asked for through its HTTP data API as the browser asks for them."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from helpers import QUIET, REPO, run_train

SCRIPT = REPO / "scripts" / "screenshot_tensorboard.py"
spec = importlib.util.spec_from_file_location("screenshot_tensorboard", SCRIPT)
assert spec is not None and spec.loader is not None
screenshot_tensorboard = importlib.util.module_from_spec(spec)
spec.loader.exec_module(screenshot_tensorboard)

RUNS = {f"data=synthetic,mask={mask},seed=0,trainer.max_epochs=1" for mask in ("activation", "weight")}
DRIFT_TAGS = {"drift/producer_l2", "drift/zero_fraction", "drift/consumer_l2", "leak/activation_abs_mean"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sweep")
    result = run_train(
        "-m", "data=synthetic", "trainer.max_epochs=1", "mask=weight,activation", "seed=0",
        f"hydra.sweep.dir={folder}", *QUIET,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


@pytest.mark.slow
def test_tensorboard_serves_every_run_with_its_drift_tags_layout_and_hparams(sweep: Path) -> None:
    if screenshot_tensorboard.tensorboard_command() is None:
        pytest.skip("the tensorboard executable is not installed (pip install tensorboard)")
    wait_for, get_json = screenshot_tensorboard.wait_for, screenshot_tensorboard.get_json
    with screenshot_tensorboard.serve_tensorboard(sweep, timeout=60) as url:
        assert set(wait_for(f"{url}/data/runs", lambda runs: set(runs) >= RUNS)) == RUNS
        tags = wait_for(
            f"{url}/data/plugin/scalars/tags",
            lambda tags: all(set(tags.get(run, {})) >= DRIFT_TAGS for run in RUNS),
        )
        for run in RUNS:
            assert DRIFT_TAGS | {"test/acc", "drift/producer_l2/features.0"} <= set(tags[run]), run

        plugins = get_json(f"{url}/data/plugins_listing")
        for plugin in ("scalars", "custom_scalars", "hparams", "histograms", "images"):
            assert plugins[plugin]["enabled"], plugin
        layout = get_json(f"{url}/data/plugin/custom_scalars/layout")
        charts = {chart["title"] for category in layout["category"] for chart in category["chart"]}
        assert "drift/producer_l2" in charts

        groups = get_json(
            f"{url}/data/plugin/hparams/session_groups",
            {"experimentName": "", "allowedStatuses": ["STATUS_SUCCESS"], "startIndex": 0, "sliceSize": 10},
        )["sessionGroups"]
        assert {group["name"] for group in groups} == RUNS
        for group in groups:
            assert f"mask={group['hparams']['strategy']}," in group["name"]
            served = {value["name"]["tag"]: value["value"] for value in group["metricValues"]}
            # What the HParams table shows is the run's metrics.json, metric by metric.
            written = json.loads((sweep / group["name"] / "metrics.json").read_text())
            assert "hparams/drift/producer_l2/final" in served
            for tag, value in served.items():
                assert value == pytest.approx(written[tag.removeprefix("hparams/")], rel=1e-6), (group["name"], tag)
