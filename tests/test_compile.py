"""compile=true: every mask strategy gives the eager network's masked outputs, and pruning a compiled
network neither breaks nor recompiles its graph (masks are buffers read by the graph)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import PROBE_TAG, ConsumerInputProbe
from torch._dynamo.utils import counters

from pruneflow import STRATEGIES, ChannelPruning, ClassifierModule
from pruneflow.data import SyntheticDataModule
from pruneflow.models import ConvNet

PRUNE_AT_STEP = 3
STEPS = 8


def holds_compiled_module(module: torch.nn.Module) -> bool:
    """Whether ``module`` or a submodule is compiled (``nn.Module.compile()`` or a ``torch.compile`` wrapper)."""
    from torch._dynamo.eval_frame import OptimizedModule

    return any(
        isinstance(m, OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None for m in module.modules()
    )


class GraphCount(L.Callback):
    """Compiled graphs just before pruning and at the end of training."""

    def __init__(self) -> None:
        self.before_pruning = self.at_end = -1

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == PRUNE_AT_STEP:
            self.before_pruning = counters["stats"]["unique_graphs"]

    def on_train_end(self, *args: object) -> None:
        self.at_end = counters["stats"]["unique_graphs"]


def train(
    strategy: str, compile: bool, compile_mode: str = "default"
) -> tuple[ClassifierModule, ChannelPruning, GraphCount, torch.Tensor, ConsumerInputProbe]:
    torch.manual_seed(0)
    data = SyntheticDataModule(num_train=1200, num_test=64, input_shape=(1, 16, 16), batch_size=64, val_size=0)
    data.setup()
    model = ConvNet(input_shape=(1, 16, 16), num_classes=10, channels=(8, 16))
    module = ClassifierModule(
        model, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), num_classes=10, compile=compile,
        compile_mode=compile_mode,
    )
    pruning = ChannelPruning(strategy=strategy, amount=0.5, at_step=PRUNE_AT_STEP, log_every_n_steps=1)
    graphs = GraphCount()
    probe = ConsumerInputProbe()  # its hooks run inside the compiled graph, on what the consumers receive
    trainer = L.Trainer(
        max_steps=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[pruning, probe, graphs],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    module.eval()
    with torch.no_grad():
        images, _ = data.transform_batch((data.test_images, data.test_labels), train=False)
        logits = module(images)
    return module, pruning, graphs, logits, probe


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_compiled_network_matches_eager_and_pruning_does_not_recompile(strategy: str) -> None:
    torch._dynamo.reset()
    counters.clear()
    eager_module, eager_pruning, _, eager_logits, eager_probe = train(strategy, compile=False)
    module, pruning, graphs, logits, probe = train(strategy, compile=True)

    assert holds_compiled_module(module) and not holds_compiled_module(eager_module)
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    assert graphs.before_pruning > 0, "the network never ran compiled"
    assert graphs.at_end == graphs.before_pruning, "pruning recompiled the graph"
    # The same channels, and the same masked outputs up to float reassociation by the compiler.
    masks = {name: mask.tolist() for name, mask in pruning.pruned.items()}
    assert masks == {name: mask.tolist() for name, mask in eager_pruning.pruned.items()}
    torch.testing.assert_close(logits, eager_logits, rtol=1e-3, atol=1e-3)
    for tag in ("drift/producer_l2", "leak/activation_abs_mean", "grad/pruned_l2"):
        eager, compiled = eager_pruning.history[tag], pruning.history[tag]
        assert len(eager) == len(compiled) == STEPS - PRUNE_AT_STEP
        torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-3, atol=1e-5)
    assert probe.forwards_after_pruning == eager_probe.forwards_after_pruning == STEPS - PRUNE_AT_STEP
    received, eager_received = probe.final_metrics()[PROBE_TAG], eager_probe.final_metrics()[PROBE_TAG]
    assert received == pytest.approx(eager_received, rel=1e-3, abs=1e-5)
    if strategy in ("parametrize", "hard"):
        assert max(pruning.history["drift/producer_l2"]) == 0.0
    if strategy == "activation":
        # Masked in the compiled graph: pruned channels are exactly dead, and their kernels get no gradient.
        assert max(pruning.history["leak/activation_abs_mean"]) == 0.0
        assert max(pruning.history["grad/pruned_l2"]) == 0.0
        assert received == 0.0  # the consumers read zeros from the compiled graph, not just the telemetry
    else:
        assert received > 0.0  # every other strategy lets something (β at least) reach the consumers


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_compile_mode_reaches_torch_compile(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, object]] = []
    monkeypatch.setattr(torch, "compile", lambda function, **kwargs: seen.append(kwargs) or function)
    ClassifierModule(ConvNet((1, 16, 16), 10, channels=(4,)), torch.optim.SGD, 10, compile=True, compile_mode=mode)
    assert seen == [{"mode": mode}]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["activation", "parametrize"])
def test_reduce_overhead_sees_new_masks_mid_run_without_recompiling(strategy: str) -> None:
    """``compile_mode=reduce-overhead`` (CUDA graphs on a GPU: replays read buffers in place) with a pruning event
    mid-run: the consumers receive the masked channels as zeros (activation) and nothing recompiles."""
    torch._dynamo.reset()
    counters.clear()
    module, pruning, graphs, _, probe = train(strategy, compile=True, compile_mode="reduce-overhead")
    assert holds_compiled_module(module) and graphs.before_pruning > 0
    assert graphs.at_end == graphs.before_pruning, "pruning recompiled the graph"
    assert probe.forwards_after_pruning == STEPS - PRUNE_AT_STEP
    if strategy == "activation":
        assert probe.final_metrics()[PROBE_TAG] == 0.0
    else:
        assert max(pruning.history["drift/producer_l2"]) == 0.0
