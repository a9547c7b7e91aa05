"""Compact a finished run: cut its pruned channels out, verify against the masked model, measure, export.

    pruneflow-compact outputs/runs/<time>                  # checkpoints/last.ckpt → <run>/compact/
    pruneflow-compact <run> --checkpoint <run>/checkpoints/best-epoch002.ckpt --data-root ../shared/data
    pruneflow-compact <run> --latency-batch-sizes 1,64 --memory-format contiguous --threads 2

(``pruneflow-compact`` is installed with the package; ``python -m pruneflow.experiment.compact`` is the same.)

The network is rebuilt from the run's ``config.yaml`` with the checkpoint's weights and masks (see
``pruneflow.compaction.from_checkpoint``). The exported model goes to ``<run>/compact/`` (or ``--out``),
the ``compact/*`` figures are merged into the run's ``metrics.json`` and printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from pruneflow.atomic_io import write_json_atomic
from pruneflow.compaction import compact_and_verify, load_trained_run, test_batches
from pruneflow.compaction.cost import MEMORY_FORMATS
from pruneflow.experiment.user_errors import user_error_message

log = logging.getLogger("pruneflow.compact")

# The reloaded masked model must reproduce the run's own test accuracy (same weights, same masks).
ACC_TOLERANCE = 1e-3


def batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes like 1,256, got {text!r}") from None
    if any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be positive, got {text!r}")
    return sizes


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run folder (holds config.yaml and checkpoints/)")
    parser.add_argument("--checkpoint", type=Path, help="default: <run_dir>/checkpoints/last.ckpt")
    parser.add_argument("--data-root", type=Path, help="replaces the run's data.root (if the data moved)")
    parser.add_argument("--out", type=Path, help="export folder; default: <run_dir>/compact")
    parser.add_argument("--device", default="cpu", help="where to verify (latency is always measured on CPU)")
    parser.add_argument("--latency-batch-sizes", type=batch_sizes, default=[1, 256], help="'' skips latency")
    parser.add_argument("--rounds", type=int, default=7, help="latency rounds (the median is reported)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads while timing latency")
    parser.add_argument("--memory-format", choices=sorted(MEMORY_FORMATS), default="channels_last")
    args = parser.parse_args(argv)

    run = load_trained_run(args.run_dir, args.checkpoint, args.data_root)
    run.network.to(args.device)
    run.datamodule.setup("test")
    _, metrics = compact_and_verify(
        run.network,
        run.pruned,
        test_batches(run.datamodule, args.device),
        export_dir=args.out or args.run_dir / "compact",
        model_config=run.model_config,
        latency_batch_sizes=args.latency_batch_sizes,
        latency_rounds=args.rounds,
        latency_threads=args.threads,
        latency_memory_format=args.memory_format,
    )
    run_acc = run.metrics.get("test/acc")
    if run_acc is not None and abs(run_acc - metrics["compact/acc_masked"]) > ACC_TOLERANCE:
        log.warning(
            "the reloaded masked model scores %.4f on the test set, the run reported test/acc %.4f: %s is "
            "not the run's final model, or its masks were not restored",
            metrics["compact/acc_masked"], run_acc, run.checkpoint,
        )  # fmt: skip
    write_json_atomic(args.run_dir / "metrics.json", {**run.metrics, **metrics})
    print(json.dumps(metrics, indent=2))
    return metrics


def cli() -> None:
    """The ``pruneflow-compact`` command: ``main`` with the user's errors as one line (a traceback with
    ``PRUNEFLOW_DEBUG=1``)."""
    logging.basicConfig(level=logging.INFO, format="[%(name)s][%(levelname)s] - %(message)s")
    try:
        main()
    except Exception as exc:
        message = user_error_message(exc)
        if message is None or os.environ.get("PRUNEFLOW_DEBUG"):
            raise
        sys.exit(f"pruneflow: error: {message}")


if __name__ == "__main__":
    cli()
