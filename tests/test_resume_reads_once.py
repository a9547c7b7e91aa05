"""A resume reads its checkpoint once: the model check, the mask restore and Lightning's restore share one read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import QUIET, compose_train

from pruneflow.experiment.run import train


@pytest.mark.parametrize("mask", ["parametrize", "disabled"])
def test_a_resume_reads_the_checkpoint_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mask: str) -> None:
    settings = ("data=synthetic", f"mask={mask}", "mask.at_epoch=0", *QUIET)
    train(compose_train(*settings, "trainer.max_epochs=1"), tmp_path)
    reads = []
    real_load = torch.load

    def counting_load(f, *args, **kwargs):
        reads.append(getattr(f, "name", f))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    train(compose_train(*settings, "trainer.max_epochs=2", "resume=true"), tmp_path)
    # One read (a fresh run would read none; before, the model check, the masks and fit read it three times).
    assert [str(Path(read).name) for read in reads] == ["last.ckpt"], reads
