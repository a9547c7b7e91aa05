"""What the channel graph can prune in torchvision's models, and what cutting half of it buys.

For each model: the channel spaces, how many are prunable and how many of those are coupled groups;
then 50 % of every prunable space (coupled groups included) is selected by summed L1 and masked with
``activation``, the network is compacted, and the compacted model is compared with the masked one
on random images (top-1 agreement, max |Δ logit|), with the share of all channels cut, FLOPs ratio
and CPU latency speedup (medians of ``--rounds``, before and after measured side by side by
``compaction.cost``; ``--batch-sizes ""`` skips latency). The networks are
freshly initialised with random BatchNorm statistics (β ≠ 0, so a leaking mask would show): the
structure, not the accuracy, is what is measured here.

    python scripts/bench_channel_graph.py --models resnet18,mobilenet_v2 --json graph.json

``cifar_resnetN`` names pruneflow's own CIFAR ResNet of depth N (``model=resnet model.depth=N``), e.g.
``--models cifar_resnet56 --rounds 15`` for the ResNet-56 latency figure.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from pruneflow.compaction import compact_and_verify
from pruneflow.compaction.verify import randomize_norms
from pruneflow.models import ResNet, torchvision_classifier
from pruneflow.pruning.channels import trace_channel_graph
from pruneflow.pruning.criteria import L1
from pruneflow.pruning.strategies import make_strategy

MODELS = "resnet18,resnet50,mobilenet_v2,mobilenet_v3_small,densenet121,vgg11_bn,shufflenet_v2_x0_5"


def build(name: str, size: int) -> torch.nn.Module:
    """torchvision's ``name``, or pruneflow's CIFAR ResNet for ``cifar_resnet<depth>``."""
    cifar_resnet = re.fullmatch(r"cifar_resnet(\d+)", name)
    if cifar_resnet:
        return ResNet(input_shape=(3, size, size), num_classes=10, depth=int(cifar_resnet.group(1)))
    return torchvision_classifier(name, input_shape=(3, size, size), num_classes=10)


def measure(name: str, size: int, batch_sizes: tuple[int, ...], rounds: int) -> dict[str, object]:
    torch.manual_seed(0)
    network = randomize_norms(build(name, size), beta_scale=0.1)
    graph = trace_channel_graph(network)
    strategy, criterion = make_strategy("activation"), L1()
    masks = {}
    for space in graph.prunable:
        mask = criterion.select(space, 0.5, torch.zeros(space.width, dtype=torch.bool))
        for layer in space.producers:
            masks[layer.name] = mask
            strategy.apply(layer, mask)
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(64, 3, size, size, generator=generator), torch.zeros(64, dtype=torch.long))] * 2
    _, metrics = compact_and_verify(network, masks, batches, latency_batch_sizes=batch_sizes, latency_rounds=rounds)
    row: dict[str, object] = {
        "model": name,
        "spaces": len(graph.spaces),
        "prunable": len(graph.prunable),
        "coupled": sum(space.coupled for space in graph.prunable),
        # of every channel the model's producers write, prunable or not
        "channels_cut": (metrics["compact/channels_before"] - metrics["compact/channels_after"])
        / sum(space.width for space in graph.spaces),
        "agreement": metrics["compact/agreement"],
        "max_abs_diff": metrics["compact/max_abs_diff"],
        "flops_ratio": metrics["compact/flops_ratio"],
        "params_before": metrics["compact/params_before"],
        "params_after": metrics["compact/params_after"],
    }
    for b in batch_sizes:
        row[f"speedup_b{b}"] = metrics[f"compact/latency_b{b}_speedup"]
        row[f"ms_b{b}"] = [metrics[f"compact/latency_b{b}_before_ms"], metrics[f"compact/latency_b{b}_after_ms"]]
    return row


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default=MODELS, help="comma-separated torchvision model names, or cifar_resnet<depth>"
    )
    parser.add_argument("--size", type=int, default=32, help="square input size")
    parser.add_argument("--batch-sizes", default="1,256", help="latency batch sizes")
    parser.add_argument("--rounds", type=int, default=5, help="latency repeats (median)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    batch_sizes = tuple(int(b) for b in args.batch_sizes.split(",") if b)
    rows = []
    print("| model | spaces | prunable | coupled | channels cut | agreement | max abs diff | FLOPs ratio | params | "
          + " | ".join(f"speedup b{b}" for b in batch_sizes) + " |")  # fmt: skip
    for name in args.models.split(","):
        row = measure(name, args.size, batch_sizes, args.rounds)
        rows.append(row)
        speedups = " | ".join(f"{row[f'speedup_b{b}']:.2f}" for b in batch_sizes)
        print(f"| {name} | {row['spaces']} | {row['prunable']} | {row['coupled']} | {row['channels_cut']:.1%} | "
              f"{row['agreement']:.3f} | "
              f"{row['max_abs_diff']:.1e} | {row['flops_ratio']:.2f} | {row['params_before']:,} → "
              f"{row['params_after']:,} | {speedups} |", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
