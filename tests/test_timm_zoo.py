"""model=timm: any timm model by name, sized by the data, refused in one line where it cannot run; pruned,
cut and verified through train.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import QUIET, run_train

from pruneflow.errors import ConfigError
from pruneflow.models import timm_classifier

pytest.importorskip("timm")


def test_a_timm_model_takes_the_data_s_channels_and_classes() -> None:
    network = timm_classifier("test_resnet", input_shape=(1, 28, 28), num_classes=7)
    assert network(torch.zeros(2, 1, 28, 28)).shape == (2, 7)


def test_a_model_that_takes_an_image_size_is_built_for_the_data_s() -> None:
    network = timm_classifier("test_vit", input_shape=(3, 32, 32), num_classes=10, patch_size=8)
    assert network(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_a_misspelt_name_names_the_nearest() -> None:
    with pytest.raises(ConfigError, match=r"model.name='resnet1t' is not a timm model; did you mean .*resnet10t"):
        timm_classifier("resnet1t")


def test_a_model_that_cannot_run_on_the_data_s_images_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError) as error:
        timm_classifier("test_vit", input_shape=(1, 28, 28))  # patch size 16 does not divide 28
    assert "\n" not in str(error.value) and "cannot run on 1×28×28 images" in str(error.value)


def test_train_py_prunes_and_cuts_a_timm_model_exactly(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = run_train("model=timm", "model.name=test_resnet", "data=synthetic", "mask=activation", "compact=true",
                       "trainer.max_steps=4", "mask.at_step=1", "data.num_train=256", "data.num_test=64",
                       f"hydra.run.dir={run}", *QUIET)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["compact/agreement"] == 1.0 and metrics["compact/max_rel_diff"] <= 1e-4
    assert metrics["compact/params_after"] < metrics["compact/params_before"]


def test_weights_come_from_a_local_file_and_a_file_that_does_not_fit_is_one_line(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = timm_classifier("test_resnet", input_shape=(3, 32, 32), num_classes=4)
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    torch.manual_seed(1)
    loaded = timm_classifier("test_resnet", input_shape=(3, 32, 32), num_classes=4, weights=tmp_path / "weights.pt")
    expected, got = source.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[key], got[key]) for key in expected)
    with pytest.raises(ConfigError, match=r"model.weights=.* does not fit test_resnet with 7 classes") as error:
        timm_classifier("test_resnet", input_shape=(3, 32, 32), num_classes=7, weights=tmp_path / "weights.pt")
    assert "\n" not in str(error.value)


def test_train_py_cuts_whole_heads_of_a_timm_vit_with_mask_heads_and_compact(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = run_train("model=timm", "model.name=test_vit", "data=synthetic", "data.input_shape=[3,32,32]",
                       "mask=activation", "mask.heads=true", "mask.layers=[*.attn.qkv]", "compact=true",
                       "trainer.max_steps=4", "mask.at_step=1", "data.num_train=256", "data.num_test=64",
                       f"hydra.run.dir={run}", *QUIET)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["compact/agreement"] == 1.0 and metrics["compact/max_rel_diff"] <= 1e-4
    sizes = torch.load(run / "compact" / "compact_state.pt", weights_only=False)["sizes"]
    assert {sizes[name]["num_heads"] for name in sizes if name.endswith(".attn")} == {1}  # 2 heads each, half cut
