"""What several test files share: where the repository and the real data lie, how to run the real entry
point and compose the real configs in-process, a probe that measures a guarantee from outside the
mechanism that provides it, and small networks with one channel pattern each (``DenseLayers``: norms
after concatenations; ``GroupedBottleneck``: a grouped conv in a residual block).

``ConsumerInputProbe`` reads what the *consumers* of pruned channels receive — the input slice of the
next conv, or the linear layer's feature block after a flatten — through a forward pre-hook on each
consumer. It sees every op between the channel point and the consumer, so a mask hook that runs in the
wrong order, a mask placed before the BatchNorm, a compiled graph that skipped the mask or an in-place
op after the channel point all show as a non-zero reading, where the telemetry's leak probe (which
reads the tensor the mask hook has just written) would still say 0.

Use it as a Lightning callback beside ``ChannelPruning`` (in a test's ``Trainer``, or in a ``train.py``
run with ``+callbacks.consumer_probe._target_=helpers.ConsumerInputProbe`` and ``tests/`` on
``PYTHONPATH``); its ``final_metrics`` land in ``metrics.json``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from pruneflow import ChannelPruning
from pruneflow.experiment import compose_config
from pruneflow.graph import Consumer
from pruneflow.graph.layers import input_weight

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
# CI and developers keep the read-only real data sets beside the checkout, in ../shared/data.
SHARED_DATA = Path(os.environ.get("PRUNEFLOW_TEST_DATA", REPO.parent / "shared" / "data")).resolve()

QUIET = ("trainer.enable_progress_bar=false", "trainer.enable_model_summary=false")
PROBE = "+callbacks.consumer_probe._target_=helpers.ConsumerInputProbe"  # what consumers receive, into metrics.json


def with_tests_on_the_path() -> dict[str, str]:
    """This environment with tests/ on PYTHONPATH (Slurm jobs inherit it): a run can then name test-only
    callbacks, e.g. +callbacks.probe._target_=helpers.ConsumerInputProbe."""
    python_path = os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": python_path}


def run_train(
    *overrides: str, cwd: Path = REPO, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python train.py <overrides>`` as a user would (with ``env`` added to the environment); never
    downloads (no PRUNEFLOW_DATA fallback)."""
    env = {**with_tests_on_the_path(), **(env or {}), "PYTHONUNBUFFERED": "1"}
    env.pop("PRUNEFLOW_DATA", None)
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


RUN_TRAIN_PY = """
# Not runpy: it would set sys.argv[0] to train.py, and Lightning would start other ranks without this script.
script = os.environ["PRUNEFLOW_TEST_ENTRY_POINT"]
with open(script) as source:
    exec(compile(source.read(), script, "exec"), {"__name__": "__main__", "__file__": script})
"""


def run_train_after(
    prelude: str, *overrides: str, folder: Path, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run ``train.py <overrides>`` in a script that first executes ``prelude`` (Python that patches or
    registers something, e.g. a test-only criterion); processes Lightning starts re-run the same script.
    The script is written into ``folder``."""
    launcher = folder / "launch_train.py"
    launcher.write_text("import os\n" + prelude + RUN_TRAIN_PY)
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    entry_point = str(REPO / "train.py")
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": python_path, "PRUNEFLOW_TEST_ENTRY_POINT": entry_point}
    return subprocess.run(
        [sys.executable, str(launcher), *overrides], cwd=REPO, env=full_env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def compose_train(*overrides: str, with_hydra: bool = False) -> DictConfig:
    """``conf/train.yaml`` composed with ``overrides`` as ``train.py`` would, without running anything;
    ``with_hydra``: with the ``hydra`` node (sweeper, launcher, output folders)."""
    return compose_config(overrides, with_hydra=with_hydra)


# Buffers on each probed consumer module. Buffers, not Python state: a compiled graph reads and updates
# them without a graph break, and rewriting their values at a pruning event does not recompile it.
COLUMNS_BUFFER = "probe_pruned_columns"
RECEIVED_BUFFER = "probe_received_abs_max"

PROBE_TAG = "probe/consumer_input_abs_max"


def input_positions(consumer: Consumer, channels: Tensor) -> Tensor:
    """Where a space's ``channels`` lie in ``consumer``'s input. The weight's columns for a conv or a linear
    layer; a grouped conv's columns are positions within one group (``c mod block``), its input holds the
    whole space (after ``offset``), so the probe reads the channels themselves there."""
    return channels + consumer.offset if consumer.kind == "grouped" else consumer.columns(channels)


def _receive(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
    """Forward pre-hook: running max of |input| over the input columns that read pruned channels."""
    received = inputs[0].detach()
    columns = getattr(module, COLUMNS_BUFFER)
    # a linear layer (or an attention's in_proj) reads its features on the last dim (ConvNeXt's channels-last MLP, a
    # ViT's tokens); a conv on dim 1
    if isinstance(module, (nn.Linear, nn.MultiheadAttention)):
        weights = columns.view(*([1] * (received.ndim - 1)), -1)
    else:
        weights = columns.view(1, -1, *([1] * (received.ndim - 2)))
    value = (received.float().abs() * weights).amax()
    received_max = getattr(module, RECEIVED_BUFFER)
    received_max.copy_(torch.maximum(received_max, value))


class ConsumerInputProbe(Callback):
    """Largest |value| any consumer of a pruned channel received in a forward pass after pruning.

    ``forwards_after_pruning`` counts training steps run with a pruned channel, so a reading of 0 can be
    told apart from "never measured".
    """

    def __init__(self) -> None:
        self.pruning: ChannelPruning | None = None
        self.consumers: dict[str, nn.Module] = {}
        self.handles: list[RemovableHandle] = []
        self.forwards_after_pruning = 0
        self._masks_seen: dict[str, list[bool]] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pruning = [callback for callback in trainer.callbacks if isinstance(callback, ChannelPruning)]
        assert len(pruning) == 1, "ConsumerInputProbe needs exactly one ChannelPruning callback"
        self.pruning = pruning[0]
        # Read the masks after ChannelPruning has pruned in its own on_train_batch_start (a train.py run
        # lists config callbacks before the mask callback). A new list: Lightning is iterating the old one.
        ordered = [callback for callback in trainer.callbacks if callback is not self]
        ordered.insert(ordered.index(self.pruning) + 1, self)
        trainer.callbacks = ordered
        modules = dict(self.pruning.network(pl_module).named_modules())
        for layer in self.pruning.layers:
            assert layer.consumers_complete and layer.consumers, f"{layer.name}: consumers unknown, cannot probe"
            for consumer in layer.consumers:
                module = modules[consumer.name]
                if consumer.name not in self.consumers:
                    weight = input_weight(module)
                    device = weight.device
                    width = getattr(module, "in_channels", weight.shape[1])  # a grouped conv's whole input
                    module.register_buffer(COLUMNS_BUFFER, torch.zeros(width, device=device), False)
                    module.register_buffer(RECEIVED_BUFFER, torch.zeros((), device=device), False)
                    self.handles.append(module.register_forward_pre_hook(_receive))
                    self.consumers[consumer.name] = module

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        assert self.pruning is not None
        masks = {name: mask.tolist() for name, mask in self.pruning.pruned.items()}
        if masks != self._masks_seen:
            self._refresh_columns()
            self._masks_seen = masks
        if any(any(mask) for mask in masks.values()):
            self.forwards_after_pruning += 1

    @torch.no_grad()
    def _refresh_columns(self) -> None:
        assert self.pruning is not None
        for module in self.consumers.values():
            getattr(module, COLUMNS_BUFFER).zero_()
        for layer in self.pruning.layers:
            mask = self.pruning.pruned.get(layer.name)
            if mask is None:
                continue
            channels = mask.nonzero().flatten().cpu()
            for consumer in layer.consumers:
                columns = getattr(self.consumers[consumer.name], COLUMNS_BUFFER)
                columns[input_positions(consumer, channels).to(columns.device)] = 1.0

    def received(self) -> dict[str, float]:
        """Per consumer module: the largest |input| it received on a pruned channel's columns."""
        return {name: float(getattr(module, RECEIVED_BUFFER)) for name, module in self.consumers.items()}

    def final_metrics(self) -> dict[str, Any]:
        return {
            PROBE_TAG: max(self.received().values(), default=0.0),
            "probe/forwards_after_pruning": self.forwards_after_pruning,
        }

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class PaceFirstStart(Callback):
    """Sleeps ``seconds`` after every training step from epoch ``from_epoch`` on, in a run's first start only:
    not in a fit that resumed from a checkpoint (``resume=true``, a requeued Slurm job) nor in a Slurm job's
    restart (``SLURM_RESTART_COUNT`` above 0). A tiny run finishes in about two seconds on this machine, less
    on a faster one: too quickly for Slurm's half-minute time-limit checks or for a test to stop it during
    an epoch it can see. The weights do not depend on the pace
    (``train.py ... +callbacks.pace._target_=helpers.PaceFirstStart``)."""

    def __init__(self, seconds: float = 1.0, from_epoch: int = 1) -> None:
        self.seconds = seconds
        self.from_epoch = from_epoch

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        first_start = trainer.ckpt_path is None and os.environ.get("SLURM_RESTART_COUNT", "0") == "0"
        if trainer.current_epoch >= self.from_epoch and first_start:
            time.sleep(self.seconds)


# -- small networks with one pattern each, shared by the channel-graph and cut-while-training tests --
class DenseLayers(nn.Module):
    """DenseNet's pattern: each layer reads the concatenation of all before it through its own BatchNorm."""

    def __init__(self, in_channels: int = 3, num_classes: int = 5) -> None:
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(in_channels, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.norm1, self.conv1 = nn.BatchNorm2d(4), nn.Conv2d(4, 3, 3, padding=1)
        self.norm2, self.conv2 = nn.BatchNorm2d(7), nn.Conv2d(7, 3, 3, padding=1)
        self.norm3, self.fc = nn.BatchNorm2d(10), nn.Linear(10, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        features = [x, self.conv1(torch.relu(self.norm1(x)))]
        features.append(self.conv2(torch.relu(self.norm2(torch.cat(features, 1)))))
        x = torch.relu(self.norm3(torch.cat(features, 1)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class GroupedBottleneck(nn.Module):
    """ResNeXt's and RegNet's bottleneck: a dense 1×1 conv, a grouped 3×3 conv (4 groups, 8 → 12 channels),
    a dense 1×1 conv, and a residual addition."""

    def __init__(self, in_channels: int = 3, num_classes: int = 5) -> None:
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(in_channels, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.a, self.a_bn = nn.Conv2d(6, 8, 1), nn.BatchNorm2d(8)
        self.b, self.b_bn = nn.Conv2d(8, 12, 3, padding=1, groups=4), nn.BatchNorm2d(12)
        self.c, self.c_bn = nn.Conv2d(12, 6, 1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        branch = torch.relu(self.b_bn(self.b(torch.relu(self.a_bn(self.a(x))))))
        x = torch.relu(x + self.c_bn(self.c(branch)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class FakeImages(L.LightningDataModule):
    """16 random 32-px RGB images of 10 classes, in batches of 8: a Lightning run's data where values do not matter."""

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        data = torch.utils.data.TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))
        return torch.utils.data.DataLoader(data, batch_size=8)
