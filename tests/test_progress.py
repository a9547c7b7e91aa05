"""Progress reporting: TQDM's bar on a terminal; where stdout is a file, one plain line per epoch,
validation and test, with the figures the run reports."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import REPO
from lightning.pytorch.callbacks import TQDMProgressBar
from torch.utils.data import DataLoader, TensorDataset

from pruneflow import ClassifierModule
from pruneflow.callbacks.progress import EpochLines, progress_for_stdout
from pruneflow.errors import ConfigError


def test_train_py_writes_plain_epoch_lines_into_a_log_file(tmp_path: Path) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    with log.open("w") as stdout:  # `python train.py ... > run.log`
        result = subprocess.run(
            [sys.executable, str(REPO / "train.py"), "data=synthetic", "trainer.max_epochs=2",
             f"hydra.run.dir={run_dir}", "trainer.enable_model_summary=false"],
            cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=stdout, stderr=subprocess.PIPE,
            text=True, timeout=600,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    text = log.read_text()
    assert "\r" not in text and "it/s" not in text, text[-2000:]
    lines = text.splitlines()
    epochs = [line for line in lines if line.startswith("epoch ")]
    tests = [line for line in lines if line.startswith("test: ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"], text[-2000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # The last epoch's line carries the final validation figures, the test line the test figures.
    assert f"val/acc={metrics['val/acc']:.4g} " in epochs[1] and "train/loss_epoch=" in epochs[1]
    assert f"({metrics['global_step']} steps, " in epochs[1]
    assert len(tests) == 1 and f"test/acc={metrics['test/acc']:.4g}" in tests[0]


def test_a_terminal_gets_the_bar_a_file_gets_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    bar = progress_for_stdout(refresh_rate=7)
    assert isinstance(bar, TQDMProgressBar) and bar.refresh_rate == 7
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    assert isinstance(progress_for_stdout(), EpochLines)
    with pytest.raises(ConfigError, match="progress_bar_refresh_rate must be a positive integer, got True"):
        progress_for_stdout(refresh_rate=True)


def test_validate_and_test_outside_fit_get_a_line_each() -> None:
    data = TensorDataset(torch.randn(32, 1, 8, 8), torch.randint(0, 2, (32,)))
    network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    module = ClassifierModule(network, lambda params: torch.optim.SGD(params, lr=0.1), num_classes=2)
    stream = io.StringIO()
    trainer = L.Trainer(
        max_epochs=1, callbacks=[EpochLines(stream)], logger=False, enable_checkpointing=False,
        enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.validate(module, DataLoader(data, batch_size=16), verbose=False)
    trainer.test(module, DataLoader(data, batch_size=16), verbose=False)
    lines = stream.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["validation", "test"], lines
    assert "val/acc=" in lines[0] and "test/acc=" in lines[1]
