"""Benchmark: framework overhead — ``python train.py`` training against a bare PyTorch loop.

    python -m benchmarks overhead --root ../shared/data --repeats 5

Both arms train the default ConvNet on MNIST with batch 128 for ``--epochs`` epochs, each in a fresh
process, alternating (A B, B A, ...) so that a noisy machine slows both alike. Both arms time the same
thing: **training steps only**, from step 20 (a warm-up) to the end, without validation, checkpointing
and test (which only the pruneflow arm does):

- ``pruneflow``: ``python train.py data.root=<root> mask=activation trainer.max_epochs=<epochs>``,
  everything else at its default (progress bar, telemetry every 50 steps, validation, checkpoints);
  its seconds and samples are ``perf/train_seconds_measured`` and ``perf/train_samples_measured`` from
  the run's ``metrics.json`` (``pruneflow.callbacks.TrainingThroughput``);
- ``bare_loop``: this script with ``--bare-loop``: the same model, optimizer (SGD, Nesterov,
  weight decay) and cosine schedule, the same in-memory uint8 tensors, shuffling and on-device
  normalisation, in a plain ``for`` loop, timed over the same steps.

Before any speed is reported each arm is checked: the pruneflow arm pruned channels, both losses are
finite, and both arms timed the same number of samples. Prints the median samples/s of each arm and
their ratio (target: pruneflow ≥ 0.95 × the bare loop). A ratio above 1.05 — pruneflow, which does the
bare loop's work plus masks and telemetry, faster than it — says the arms were not equivalent (noise or
a difference in what they ran), not a gain: it is flagged and the script exits with status 1. ``--json``
writes every repetition.

``--in-process`` runs both arms alternately in this one process instead (``pruneflow.experiment.run.train``
with the config ``train.py`` composes, and the bare loop as a function). On this shared 2-core
machine a fresh process's speed varies by ±15 % from one process to the next (where its threads
land), for either arm; in one process that variance is gone and the ratio is steadier.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, ArmError, check_arm, run_train

WARMUP_STEPS = 20  # as pruneflow.callbacks.TrainingThroughput's default
NOT_EQUIVALENT_ABOVE = 1.05
TIMED = ("perf/train_seconds_measured", "perf/train_samples_measured")


def bare_loop(root: str, epochs: int, device: str, precision: str = "32-true", channels_last: bool = False,
              limit_train: int | None = None) -> dict[str, float]:  # fmt: skip
    """Seconds and samples of a hand-written training loop's steps after the warm-up, and its last loss.

    ``precision`` (``32-true`` or ``bf16-mixed``: bf16 autocast) and ``channels_last`` as pruneflow's arm runs."""
    from contextlib import nullcontext

    import torch
    import torch.nn.functional as F

    from pruneflow.data import MNISTDataModule
    from pruneflow.data.base import TensorBatches
    from pruneflow.data.transforms import normalize
    from pruneflow.lr_schedule import cosine
    from pruneflow.models import ConvNet

    torch.manual_seed(0)
    data = MNISTDataModule(root=root, batch_size=128, limit_train=limit_train)
    data.setup()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = ConvNet(input_shape=data.input_shape, num_classes=data.num_classes).to(device, memory_format=layout)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if precision == "bf16-mixed" \
        else nullcontext()  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, nesterov=True, weight_decay=5e-4)
    mean = torch.tensor(data.mean, device=device)
    std = torch.tensor(data.std, device=device)
    images, labels = data.train_images.to(device), data.train_labels.to(device)
    step, samples, started = 0, 0, 0.0
    for epoch in range(epochs):
        batches = TensorBatches(images, labels, 128, shuffle=True, seed=0, epoch=lambda epoch=epoch: epoch)
        if epoch == 0:
            scheduler = cosine(optimizer, total_steps=epochs * len(batches))
        for batch_images, batch_labels in batches:
            if step == WARMUP_STEPS:
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                started = time.perf_counter()
            with autocast:
                inputs = normalize(batch_images, mean, std).contiguous(memory_format=layout)
                loss = F.cross_entropy(model(inputs), batch_labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step > WARMUP_STEPS:
                samples += len(batch_labels)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - started, "samples": samples, "loss": float(loss)}


def overrides_for(root: str, epochs: int, device: str, extra: tuple[str, ...] = ()) -> list[str]:
    accelerator = "gpu" if device.startswith("cuda") else "cpu"
    return [
        f"data.root={root}",
        "mask=activation",
        f"trainer.max_epochs={epochs}",
        f"trainer.accelerator={accelerator}",
        *extra,
    ]


def pruneflow_figures(metrics: dict) -> dict[str, float]:
    check_arm("pruneflow", metrics, pruned=True, figures=TIMED)
    return {"seconds": metrics[TIMED[0]], "samples": metrics[TIMED[1]], "loss": metrics["test/loss"]}


def pruneflow_run(root: str, epochs: int, device: str, run_dir: Path) -> dict[str, float]:
    metrics, _ = run_train(overrides_for(root, epochs, device), run_dir, progress_bar=True)
    return pruneflow_figures(metrics)


def pruneflow_in_process(root: str, epochs: int, device: str, run_dir: Path, extra: tuple[str, ...] = ()
                         ) -> dict[str, float]:  # fmt: skip
    """``pruneflow.experiment.run.train`` on the config ``python train.py`` composes from the same overrides."""
    from pruneflow.experiment import compose_config
    from pruneflow.experiment.run import train

    cfg = compose_config(overrides_for(root, epochs, device, extra))
    return pruneflow_figures(train(cfg, run_dir))


def bare_loop_run(root: str, epochs: int, device: str) -> dict[str, float]:
    command = [sys.executable, "-m", "benchmarks", "overhead", "--bare-loop", "--root", root, "--epochs", str(epochs),
               "--device", device]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def check_equivalent(pruneflow: dict[str, float], bare: dict[str, float]) -> None:
    """Raise ``ArmError`` unless both arms timed the same samples and ended with a finite loss."""
    if not math.isfinite(bare["loss"]):
        raise ArmError(f"bare_loop: final training loss is {bare['loss']}")
    if pruneflow["samples"] != bare["samples"]:
        raise ArmError(
            f"the arms timed different work: pruneflow {pruneflow['samples']} samples, bare loop {bare['samples']}"
        )


def verdict(ratio: float) -> str:
    if ratio > NOT_EQUIVALENT_ABOVE:
        return f"arms not equivalent (ratio {ratio:.3f} > {NOT_EQUIVALENT_ABOVE}: pruneflow cannot beat the bare loop)"
    return "ok" if ratio >= 0.95 else f"below target ({ratio:.3f} < 0.95)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default="../shared/data", help="folder holding MNIST/raw")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--in-process", action="store_true", help="both arms in this process, alternately")
    parser.add_argument("--bare-loop", action="store_true", help="(internal) run the bare loop once, print JSON")


def run(args: argparse.Namespace) -> None:
    root = str(Path(args.root).resolve())
    if args.bare_loop:
        print(json.dumps(bare_loop(root, args.epochs, args.device)))
        return

    runs: dict[str, list[dict[str, float]]] = {"pruneflow": [], "bare_loop": []}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            order = ["pruneflow", "bare_loop"] if repeat % 2 == 0 else ["bare_loop", "pruneflow"]
            for arm in order:
                run_dir = Path(scratch) / f"run{repeat}"
                if arm == "pruneflow" and args.in_process:
                    figures = pruneflow_in_process(root, args.epochs, args.device, run_dir)
                elif arm == "pruneflow":
                    figures = pruneflow_run(root, args.epochs, args.device, run_dir)
                elif args.in_process:
                    figures = bare_loop(root, args.epochs, args.device)
                else:
                    figures = bare_loop_run(root, args.epochs, args.device)
                figures["samples_per_s"] = figures["samples"] / figures["seconds"]
                runs[arm].append(figures)
                print(
                    f"repeat {repeat}: {arm:<10} {figures['samples_per_s']:8.0f} samples/s "
                    f"({figures['samples']} samples in {figures['seconds']:.1f} s of training steps)",
                    flush=True,
                )
            check_equivalent(runs["pruneflow"][-1], runs["bare_loop"][-1])
    medians = {arm: statistics.median(run["samples_per_s"] for run in values) for arm, values in runs.items()}
    ratio = medians["pruneflow"] / medians["bare_loop"]
    outcome = verdict(ratio)
    print(f"\n{'arm':<12}{'samples/s, training steps only (median of ' + str(args.repeats) + ')':>50}")
    for arm, median in medians.items():
        print(f"{arm:<12}{median:>50.0f}")
    print(f"pruneflow / bare loop: {ratio:.3f} (target >= 0.95): {outcome}")
    if args.json:
        report = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs, "medians": medians,
                  "ratio": ratio, "verdict": outcome}  # fmt: skip
        args.json.write_text(json.dumps(report, indent=2))
    if ratio > NOT_EQUIVALENT_ABOVE:
        raise SystemExit(1)



