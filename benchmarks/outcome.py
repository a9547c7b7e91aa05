"""Benchmark: the outcome at a budget — ResNet-56 on CIFAR-10 cut to 2.0× fewer FLOPs by pruneflow and by
Torch-Pruning 1.6.1 from the same pre-trained weights, fine-tuned alike; test accuracy, measured FLOPs and params.

    python -m benchmarks outcome --root ../shared/data/CIFAR10-subset --seeds 0,1,2 --json outcome.json
    python -m benchmarks outcome --full --device cuda --root <CIFAR-10 folder> --json outcome.json  # published length

Per seed: ResNet-56 (CIFAR stem, ``pruneflow.models.ResNet``) is pre-trained once (SGD lr 0.1, momentum 0.9,
weight decay 5e-4, batch 128, lr ×0.1 at 60/75/90 % of the epochs: Torch-Pruning's 120/150/180 of 200). From
those same weights two arms each run sparse training, prune to 2.0× fewer FLOPs and fine-tune; both phases use
lr 0.01 with ×0.1 at 60/80 % of the phase (Torch-Pruning's 60/80 of 100), the same epochs in both arms:

- **pruneflow**: what a user gets from ``pruneflow.ChannelPruning`` in a Lightning ``Trainer``: ``group_lasso``
  sparse training on every coupled group (residual groups included, strength ``--reg``) for the sparse epochs,
  then ``mask.target=flops:2.0`` — one global ranking of every channel by its group's L2 norm (summed over every
  producer, norm and consumer of the group), by importance alone (``--cost-weight 0``; ``--cost-weight 1`` ranks per
  unit of cost, which lost 5 points of accuracy at the same FLOPs here, see docs/measurements.md) — activation
  masks, and the channels cut out inside the same fit (optimizer state carried over) before fine-tuning.
- **torch-pruning**: its ``benchmarks/main.py`` recipe ``--method group_sl --global-pruning --reg 5e-4``:
  ``GroupNormPruner`` (DepGraph's group regulariser, ``regularize`` after each backward) with
  ``GroupNormImportance(p=2, normalizer='max')`` (``GroupMagnitudeImportance`` in 1.6), global pruning, the
  classifier ignored, 400 iterative steps taken until ``tp.utils.count_ops_and_params`` reports 2.0× fewer
  FLOPs, then fine-tuning (a fresh optimizer, as its recipe). Every fit starts in train mode (Torch-Pruning's
  tracing and counting leave the network in eval mode, which Lightning would keep).

Both final networks are measured with the same counter (``torch.utils.flop_counter`` on the cut network, one
32×32 image; parameters counted), tested on the whole test split. A markdown table (accuracy mean ± std per arm,
FLOPs ratio, params) is printed and everything goes to ``--json``.

Scaled, and why. The published recipe is 200 pre-training, 100 sparse-training and 100 fine-tuning epochs on
the 50,000 CIFAR-10 images: days on a CPU. The default is sized for about one hour per full comparison (3 seeds)
on a 2-core CPU on the 4,000-image subset: 15 pre-training, 3 sparse, 6 fine-tuning epochs (each arm 9 epochs
after the shared 15: 3 × (15 + 2 × 9) ≈ 100 epochs). Timed with the three seeds side by side (one process and one
thread each) on a busy 2-core machine: 32 minutes of pre-training and 7 to 8 minutes per arm for each seed, so
about an hour on a quiet one. The ratios
between the phases, the learning rates, milestones (as fractions), batch size, regulariser strength and the 2.0×
target are those of the recipe; only the lengths shrink, so absolute accuracies are far below the paper's 93 %,
and what compares is the two arms at equal FLOPs.
``--full`` restores the published lengths (meant for a GPU, ``--device cuda``).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from pruneflow import ChannelPruning, ClassifierModule
from pruneflow.compaction.cost import count_flops, count_parameters
from pruneflow.models import ResNet

log = logging.getLogger(__name__)

ARMS = ("pruneflow", "torch-pruning")
SPEED_UP = 2.0  # FLOPs of the dense network / FLOPs of the cut one
PRETRAIN_MILESTONES = (0.6, 0.75, 0.9)  # Torch-Pruning's 120/150/180 of 200 epochs
PHASE_MILESTONES = (0.6, 0.8)  # its 60/80 of 100, for sparse training and for fine-tuning
TP_ITERATIVE_STEPS = 400  # its --iterative-steps default: the ratio grows in 1/400 steps until the target is met
FULL = {"pretrain_epochs": 200, "sparse_epochs": 100, "finetune_epochs": 100}
SCALED = {"pretrain_epochs": 15, "sparse_epochs": 3, "finetune_epochs": 6}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default="../shared/data/CIFAR10-subset", help="folder holding cifar-10-batches-py/")
    parser.add_argument("--data", choices=("cifar10", "synthetic"), default="cifar10",
                        help="synthetic: CIFAR-shaped random tensors (a smoke test without the data)")  # fmt: skip
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--full", action="store_true", help=f"the published lengths: {FULL}")
    for name, value in SCALED.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"default {value}")
    parser.add_argument("--reg", type=float, default=5e-4, help="regulariser strength of both arms' sparse training")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--limit-batches", type=int, default=None, help="batches per epoch and per test (smoke runs)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--json", type=Path, help="the report, rewritten after every seed")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the seeds --json holds and the pre-trained networks beside it (same settings)",
    )
    parser.add_argument("--arms", default=",".join(ARMS), help=f"which arms run, comma-separated: {', '.join(ARMS)}")
    parser.add_argument("--cost-weight", type=float, default=0.0,
                        help="the pruneflow arm's mask.cost_weight (0: by importance alone)")  # fmt: skip


def lengths(args: argparse.Namespace) -> dict[str, int]:
    """Epochs of each phase: the preset (``--full`` or the scaled default), each overridable by its flag."""
    preset = FULL if args.full else SCALED
    chosen = {name: preset[name] if getattr(args, name) is None else getattr(args, name) for name in preset}
    for name, value in chosen.items():
        least = 0 if name == "sparse_epochs" else 1
        if value < least:
            flag = f"--{name.replace('_', '-')}"
            raise SystemExit(f"benchmarks outcome: error: {flag}={value}: must be an int >= {least}")
    return chosen


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(seed) for seed in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or any(seed < 0 for seed in seeds):
        raise SystemExit(f"benchmarks outcome: error: --seeds={text!r}: write comma-separated ints >= 0, e.g. 0,1,2")
    return seeds


def phased_multistep(phases: Sequence[tuple[int, Sequence[float]]], gamma: float = 0.1) -> Callable[..., Any]:
    """A scheduler factory ``(optimizer, total_steps)`` for ``ClassifierModule``: consecutive phases of
    ``epochs`` each, the lr restarting at its base at each phase and multiplied by ``gamma`` at each milestone
    (a fraction of the phase). One phase is a plain multi-step schedule; two let the pruneflow arm run sparse
    training and fine-tuning in one fit with the learning rates Torch-Pruning's two separate runs have."""
    total_epochs = sum(epochs for epochs, _ in phases)

    def factory(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
        steps_per_epoch = max(int(total_steps), 1) / total_epochs

        def factor(step: int) -> float:
            epoch = step / steps_per_epoch
            for index, (epochs, milestones) in enumerate(phases):
                if epoch < epochs or index == len(phases) - 1:
                    return gamma ** sum(epoch >= fraction * epochs for fraction in milestones)
                epoch -= epochs
            raise AssertionError("the last phase returns")

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    return factory


def sgd(lr: float) -> Callable[..., torch.optim.Optimizer]:
    return partial(torch.optim.SGD, lr=lr, momentum=0.9, weight_decay=5e-4)


def make_data(args: argparse.Namespace, seed: int) -> L.LightningDataModule:
    """CIFAR-10 through pruneflow's own data module (``verify=false``: whichever batches the folder holds), or
    CIFAR-shaped synthetic tensors; every image is trained on (no validation split: the recipe has none)."""
    common = {"batch_size": args.batch_size, "seed": seed, "val_size": 0}
    if args.data == "synthetic":
        from pruneflow.data import SyntheticDataModule

        return SyntheticDataModule(input_shape=(3, 32, 32), num_train=512, num_test=256, **common)
    from pruneflow.data import CIFAR10DataModule

    return CIFAR10DataModule(root=args.root, verify=False, **common)


def fit(args: argparse.Namespace, module: ClassifierModule, data: L.LightningDataModule, epochs: int,
        callbacks: Sequence[L.Callback] = ()) -> ClassifierModule:  # fmt: skip
    trainer = L.Trainer(
        max_epochs=epochs, accelerator=args.device, devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        limit_train_batches=args.limit_batches, callbacks=list(callbacks),
    )  # fmt: skip
    # Lightning keeps each module's mode, and Torch-Pruning's tracing and counting leave the network in eval mode:
    # BatchNorm trained on its running statistics would be another recipe
    module.model.train()
    trainer.fit(module, datamodule=data)
    return module


def test_accuracy(args: argparse.Namespace, network: nn.Module, data: L.LightningDataModule) -> float:
    module = ClassifierModule(network, optimizer=sgd(0.0), num_classes=10)
    trainer = L.Trainer(accelerator=args.device, devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_test_batches=args.limit_batches)  # fmt: skip
    (results,) = trainer.test(module, datamodule=data, verbose=False)
    return float(results["test/acc"])


def measured(network: nn.Module) -> dict[str, int]:
    """FLOPs (``torch.utils.flop_counter``, one 32×32 image) and parameters, counted the same way for both arms."""
    network = network.cpu()
    return {"flops": count_flops(network, torch.zeros(1, 3, 32, 32)), "params": count_parameters(network)}


def pretrain(args: argparse.Namespace, data: L.LightningDataModule, epochs: int) -> nn.Module:
    network = ResNet(depth=56)
    schedule = phased_multistep([(epochs, PRETRAIN_MILESTONES)])
    fit(args, ClassifierModule(network, optimizer=sgd(0.1), num_classes=10, scheduler=schedule), data, epochs)
    return network


def prune_with_pruneflow(args: argparse.Namespace, network: nn.Module, data: L.LightningDataModule,
                         sparse_epochs: int, finetune_epochs: int) -> tuple[nn.Module, dict[str, Any]]:  # fmt: skip
    """Sparse training, the cut at ``flops:2.0`` and fine-tuning in one fit through ``ChannelPruning``."""
    pruning = ChannelPruning(
        strategy="activation", criterion="l2", group_reduction="sum", groups=True, target=f"flops:{SPEED_UP}",
        cost_weight=args.cost_weight,
        regularizer="group_lasso" if sparse_epochs else None, regularizer_strength=args.reg,
        regularizer_epochs=sparse_epochs or None, at_epoch=sparse_epochs, cut_at_epoch=sparse_epochs,
        log_every_n_steps=10**9, burst_steps=0,
    )  # fmt: skip
    phases = [(sparse_epochs, PHASE_MILESTONES), (finetune_epochs, PHASE_MILESTONES)]
    schedule = phased_multistep([phase for phase in phases if phase[0]])
    module = ClassifierModule(network, optimizer=sgd(0.01), num_classes=10, scheduler=schedule)
    fit(args, module, data, sparse_epochs + finetune_epochs, [pruning])
    return module.model, {"target": f"flops:{SPEED_UP}"}


class GroupRegulariser(L.Callback):
    """Torch-Pruning's sparse learning: ``pruner.regularize(model)`` after each backward (its ``train_model``)."""

    def __init__(self, pruner: Any) -> None:
        self.pruner = pruner

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.pruner.regularize(pl_module.model)


def prune_with_torch_pruning(args: argparse.Namespace, network: nn.Module, data: L.LightningDataModule,
                             sparse_epochs: int, finetune_epochs: int) -> tuple[nn.Module, dict[str, Any]]:  # fmt: skip
    """Torch-Pruning 1.6.1's ``group_sl`` recipe: group-regulariser sparse learning, global pruning in steps until
    2.0× fewer FLOPs (its ``progressive_pruning``), fine-tuning with a fresh optimizer."""
    import torch_pruning as tp  # only the benchmark needs it (the optional extra ``bench``)

    example = torch.zeros(1, 3, 32, 32)
    network = network.cpu()
    pruner = tp.pruner.GroupNormPruner(
        network, example, importance=tp.importance.GroupMagnitudeImportance(p=2, normalizer="max"), reg=args.reg,
        global_pruning=True, pruning_ratio=1.0, max_pruning_ratio=1.0, iterative_steps=TP_ITERATIVE_STEPS,
        ignored_layers=[module for module in network.modules() if isinstance(module, nn.Linear)],
    )  # fmt: skip
    if sparse_epochs:
        module = ClassifierModule(network, optimizer=sgd(0.01), num_classes=10,
                                  scheduler=phased_multistep([(sparse_epochs, PHASE_MILESTONES)]))  # fmt: skip
        fit(args, module, data, sparse_epochs, [GroupRegulariser(pruner)])
    network = network.cpu().eval()  # its progressive_pruning counts in eval mode
    dense_flops, _ = tp.utils.count_ops_and_params(network, example_inputs=example)
    speed_up = 1.0
    while speed_up < SPEED_UP and pruner.current_step < pruner.iterative_steps:
        pruner.step()
        flops, _ = tp.utils.count_ops_and_params(network, example_inputs=example)
        speed_up = dense_flops / flops
    schedule = phased_multistep([(finetune_epochs, PHASE_MILESTONES)])
    fit(args, ClassifierModule(network, optimizer=sgd(0.01), num_classes=10, scheduler=schedule), data,
        finetune_epochs)  # fmt: skip
    return network, {"speed_up_by_its_counter": speed_up}


PRUNERS = {"pruneflow": prune_with_pruneflow, "torch-pruning": prune_with_torch_pruning}


def pretrained(
    args: argparse.Namespace, data: L.LightningDataModule, epochs: int, seed: int
) -> tuple[nn.Module, float]:
    """The seed's pre-trained network and the seconds its pre-training took: kept beside ``--json``
    (``<json>.seed<N>.pt``) once trained, so a comparison stopped midway and run again with ``--resume`` does not
    train it again."""
    kept = args.json.with_suffix(f".seed{seed}.pt") if args.json else None
    if args.resume and kept is not None and kept.is_file():
        saved = torch.load(kept, map_location="cpu", weights_only=True)
        if pretraining_settings(saved["settings"]) == pretraining_settings(settings(args, lengths(args))):
            network = ResNet(depth=56)
            network.load_state_dict(saved["state_dict"])
            return network.to(args.device) if args.device != "cpu" else network, float(saved["seconds"])
    started = time.perf_counter()
    network = pretrain(args, data, epochs)
    seconds = time.perf_counter() - started
    if kept is not None:
        state = {"state_dict": network.state_dict(), "seconds": seconds, "settings": settings(args, lengths(args))}
        torch.save(state, kept)
    return network, seconds


def chosen_arms(args: argparse.Namespace) -> list[str]:
    arms = [arm.strip() for arm in args.arms.split(",") if arm.strip()]
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown or not arms:
        raise SystemExit(f"benchmarks outcome: error: --arms={args.arms}: choose among {', '.join(ARMS)}")
    return arms


def pretraining_settings(settings_of_a_run: dict[str, Any]) -> dict[str, Any]:
    """What a pre-trained network depends on: a kept one is reused by any run that agrees on these."""
    kept = {key: settings_of_a_run.get(key) for key in ("device", "data", "root", "limit_batches", "batch_size")}
    return {**kept, "pretrain_epochs": settings_of_a_run["epochs"]["pretrain_epochs"]}


def run_seed(args: argparse.Namespace, seed: int, epochs: dict[str, int]) -> dict[str, Any]:
    """One seed: pre-train, then each arm from a copy of the same weights; the arms' figures and the dense ones."""
    L.seed_everything(seed, verbose=False)
    data = make_data(args, seed)
    dense, seconds = pretrained(args, data, epochs["pretrain_epochs"], seed)
    row: dict[str, Any] = {"seed": seed, "dense": {**measured(dense), "test_acc": test_accuracy(args, dense, data),
                                                   "seconds": seconds}}  # fmt: skip
    for arm in chosen_arms(args):
        prune = PRUNERS[arm]
        L.seed_everything(seed, verbose=False)
        started = time.perf_counter()
        network, notes = prune(args, copy.deepcopy(dense).train(), data, epochs["sparse_epochs"],
                               epochs["finetune_epochs"])  # fmt: skip
        figures = measured(network)
        row[arm] = {**notes, **figures, "test_acc": test_accuracy(args, network, data),
                    "flops_ratio": row["dense"]["flops"] / figures["flops"],
                    "params_ratio": row["dense"]["params"] / figures["params"],
                    "seconds": time.perf_counter() - started}  # fmt: skip
        print(f"seed {seed} {arm}: test acc {row[arm]['test_acc']:.4f}, {row[arm]['flops_ratio']:.3f}x fewer FLOPs, "
              f"{figures['params']:,} params", flush=True)  # fmt: skip
    return row


def summary(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per arm (and the dense network): accuracy mean and std over the seeds, mean FLOPs ratio, FLOPs, params."""
    result = {}
    for arm in [arm for arm in ("dense", *ARMS) if all(arm in row for row in rows)]:
        accuracies = [row[arm]["test_acc"] for row in rows]
        result[arm] = {
            "acc_mean": statistics.fmean(accuracies),
            "acc_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "flops_ratio": statistics.fmean(row[arm].get("flops_ratio", 1.0) for row in rows),
            "flops": statistics.fmean(row[arm]["flops"] for row in rows),
            "params": statistics.fmean(row[arm]["params"] for row in rows),
        }
    return result


def markdown(table: dict[str, dict[str, float]], seeds: Sequence[int]) -> str:
    lines = [f"| arm | test accuracy (mean ± std, seeds {','.join(map(str, seeds))}) | FLOPs ratio | MFLOPs | params |",
             "|---|---|---|---|---|"]  # fmt: skip
    for arm, figures in table.items():
        lines.append(f"| {arm} | {figures['acc_mean']:.4f} ± {figures['acc_std']:.4f} | {figures['flops_ratio']:.3f}x"
                     f" | {figures['flops'] / 1e6:.1f} | {figures['params']:,.0f} |")  # fmt: skip
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    epochs, seeds = lengths(args), parse_seeds(args.seeds)  # bad flags are refused before anything trains
    chosen_arms(args)
    if args.data == "cifar10" and not (Path(args.root) / "cifar-10-batches-py").is_dir():
        raise SystemExit(f"benchmarks outcome: error: --root={args.root} holds no cifar-10-batches-py/; "
                         "give the CIFAR-10 folder, or --data synthetic for a smoke run")  # fmt: skip
    if importlib.util.find_spec("torch_pruning") is None:
        raise SystemExit("benchmarks outcome: error: Torch-Pruning is not installed; pip install -e '.[bench]'")
    rows = finished_rows(args, epochs, seeds)
    for seed in seeds:
        if all(row["seed"] != seed for row in rows):
            rows.append(run_seed(args, seed, epochs))
            report = write_report(args, epochs, rows)  # after every seed: a stopped run keeps what it measured
    report = write_report(args, epochs, rows)
    print("\n" + report["markdown"])
    return report


def settings(args: argparse.Namespace, epochs: dict[str, int]) -> dict[str, Any]:
    """What a measured row depends on: rows of a run with other settings are never resumed."""
    return {"epochs": epochs, "device": args.device, "data": args.data, "root": args.root,
            "limit_batches": args.limit_batches, "reg": args.reg, "speed_up": SPEED_UP,
            "batch_size": args.batch_size, "arms": chosen_arms(args), "cost_weight": args.cost_weight}  # fmt: skip


def finished_rows(args: argparse.Namespace, epochs: dict[str, int], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """With ``--resume``: the rows ``--json`` holds for these seeds, measured with the same settings."""
    if not (args.resume and args.json and args.json.is_file()):
        return []
    report = json.loads(args.json.read_text())
    if report.get("settings") != settings(args, epochs):
        raise SystemExit(f"benchmarks outcome: error: --resume: {args.json} was measured with other settings "
                         f"({report.get('settings')}); give another --json, or the same flags")  # fmt: skip
    return [row for row in report["rows"] if row["seed"] in seeds]


def write_report(args: argparse.Namespace, epochs: dict[str, int], rows: list[dict[str, Any]]) -> dict[str, Any]:
    rows = sorted(rows, key=lambda row: row["seed"])
    seeds = [row["seed"] for row in rows]
    table = summary(rows) if rows else {}
    report = {"command": args.command, "settings": settings(args, epochs), "epochs": epochs, "seeds": seeds,
              "device": args.device, "data": args.data, "root": args.root, "limit_batches": args.limit_batches,
              "reg": args.reg, "speed_up": SPEED_UP, "rows": rows, "summary": table,
              "markdown": markdown(table, seeds)}  # fmt: skip
    if args.json:
        partial = args.json.with_suffix(args.json.suffix + ".partial")
        partial.write_text(json.dumps(report, indent=2))
        partial.replace(args.json)  # never a half-written report
    return report
