"""What the channel graph can prune in torchvision's models, and what cutting half of it buys.

For each model: the channel spaces, how many are prunable and how many of those are coupled groups;
then 50 % of every prunable space (coupled groups included) is selected by summed L1 and masked with
``activation``, the network is compacted, and the compacted model is compared with the masked one
on random images (top-1 agreement, max |Δ logit|), with the share of all channels cut, FLOPs ratio
and CPU latency speedup (medians of ``--rounds``, before and after measured side by side by
``compaction.cost``; ``--batch-sizes ""`` skips latency). The networks are
freshly initialised with random BatchNorm statistics (β ≠ 0, so a leaking mask would show): the
structure, not the accuracy, is what is measured here.

    python -m benchmarks channel-graph --models resnet18,mobilenet_v2 --json graph.json

``cifar_resnetN`` names pruneflow's own CIFAR ResNet of depth N (``model=resnet model.depth=N``), e.g.
``--models cifar_resnet56 --rounds 15`` for the ResNet-56 latency figure.

``--models torch_pruning_list`` runs Torch-Pruning's own torchvision list (issue 23), each model in a
fresh process under ``--time-limit`` seconds, at 64 px (224 for ViT/Swin/MaxViT, 75 for Inception-v3,
its smallest input), and reports each model as handled / refused-all / error / timeout. Where
``torch_pruning`` is importable (optional: ``pip install torch-pruning==1.6.1``; never a dependency of
pruneflow), the same freshly seeded model is pruned by Torch-Pruning too (50 % L1 of every group it
accepts, the classifier kept) and both FLOPs ratios are compared:

    python -m benchmarks channel-graph --models torch_pruning_list --batch-sizes "" --json zoo.json

A list run in chunks (``--models a,b,c --size 0 --time-limit 300 --json chunk1.json``, ...) is put
together with ``--merge chunk1.json chunk2.json --json zoo.json``.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import re
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import isolated as run_isolated
from pruneflow.compaction import compact_and_verify
from pruneflow.compaction.cost import count_flops
from pruneflow.compaction.verify import randomize_norms, randomize_zero_weights
from pruneflow.graph import trace_channel_graph
from pruneflow.models import ResNet, torchvision_classifier
from pruneflow.pruning.criteria import L1
from pruneflow.pruning.strategies import make_strategy

MODELS = "resnet18,resnet50,mobilenet_v2,mobilenet_v3_small,densenet121,vgg11_bn,shufflenet_v2_x0_5"

# Torch-Pruning 1.6.1's examples/torchvision_models/torchvision_pruning.py: its 68 torchvision
# classification imports (those it prunes and those it lists as failure cases: Swin, ShuffleNet), with
# maxvit_t, which makes the 69 of issue 23. Its detection, segmentation and optical-flow models are left out.
TORCH_PRUNING_LIST = (
    "alexnet",
    "vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14",
    "convnext_tiny", "convnext_small", "convnext_base", "convnext_large",
    "densenet121", "densenet169", "densenet201", "densenet161",
    "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "efficientnet_b4",
    "efficientnet_b5", "efficientnet_b6", "efficientnet_b7", "efficientnet_v2_s", "efficientnet_v2_m",
    "efficientnet_v2_l",
    "googlenet", "inception_v3",
    "mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3",
    "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small",
    "regnet_y_400mf", "regnet_y_800mf", "regnet_y_1_6gf", "regnet_y_3_2gf", "regnet_y_8gf", "regnet_y_16gf",
    "regnet_y_32gf", "regnet_y_128gf",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
    "wide_resnet50_2", "wide_resnet101_2",
    "squeezenet1_0", "squeezenet1_1",
    "vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn",
    "swin_t", "swin_s", "swin_b",
    "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0",
    "maxvit_t",
)  # fmt: skip


def list_size(name: str) -> int:
    """The input size the list is run at: 224 where the model's patches/windows need it, else 64."""
    if name.startswith(("vit", "swin", "maxvit")):
        return 224
    return 75 if name == "inception_v3" else 64  # Inception-v3's smallest input


def build(name: str, size: int) -> torch.nn.Module:
    """torchvision's ``name``, or pruneflow's CIFAR ResNet for ``cifar_resnet<depth>``."""
    cifar_resnet = re.fullmatch(r"cifar_resnet(\d+)", name)
    if cifar_resnet:
        return ResNet(input_shape=(3, size, size), num_classes=10, depth=int(cifar_resnet.group(1)))
    return torchvision_classifier(name, input_shape=(3, size, size), num_classes=10)


def fresh(name: str, size: int) -> torch.nn.Module:
    """``name`` with the same random weights and BatchNorm statistics in every process and for both tools (a layer
    built at zero, torchvision's ViT head, given random weights: else every logit is its bias, whatever the cut)."""
    torch.manual_seed(0)
    return randomize_zero_weights(randomize_norms(build(name, size), beta_scale=0.1))


def measure(name: str, size: int, batch_sizes: tuple[int, ...] = (), rounds: int = 5) -> dict[str, object]:
    return measure_network(fresh(name, size), name, size, batch_sizes, rounds)


def measure_network(
    network: torch.nn.Module, name: str, size: int, batch_sizes: tuple[int, ...] = (), rounds: int = 5,
    images: int = 64,
) -> dict[str, object]:
    """Half of every prunable space of ``network`` (summed L1) masked by ``activation``, cut, and the cut network
    compared with the masked one on ``images`` random images of ``size`` px; ``refusals``: each refused space's
    first reason (the timm benchmark sorts them into causes)."""
    graph = trace_channel_graph(network)
    refusals = [space.refusals[0] for space in graph.spaces if not space.prunable]
    if not graph.prunable:
        return {"model": name, "size": size, "handled": "refused-all", "spaces": len(graph.spaces), "prunable": 0,
                "refusals": refusals}  # fmt: skip
    strategy, criterion = make_strategy("activation"), L1()
    masks = {}
    for space in graph.prunable:
        mask = criterion.select(space, 0.5, torch.zeros(space.width, dtype=torch.bool))
        for layer in space.producers:
            masks[layer.name] = mask
            strategy.apply(layer, mask)
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(images, 3, size, size, generator=generator), torch.zeros(images, dtype=torch.long))] * 2
    _, metrics = compact_and_verify(network, masks, batches, latency_batch_sizes=batch_sizes, latency_rounds=rounds)
    row: dict[str, object] = {
        "model": name,
        "size": size,
        "handled": "yes",
        "spaces": len(graph.spaces),
        "prunable": len(graph.prunable),
        "coupled": sum(space.coupled for space in graph.prunable),
        # of every channel the model's producers write, prunable or not
        "channels_cut": (metrics["compact/channels_before"] - metrics["compact/channels_after"])
        / sum(space.width for space in graph.spaces),
        "agreement": metrics["compact/agreement"],
        "max_abs_diff": metrics["compact/max_abs_diff"],
        "max_rel_diff": metrics["compact/max_rel_diff"],
        "flops_ratio": metrics["compact/flops_ratio"],
        "params_before": metrics["compact/params_before"],
        "params_after": metrics["compact/params_after"],
        "params_ratio": metrics["compact/params_ratio"],
        "refusals": refusals,
    }
    for b in batch_sizes:
        row[f"speedup_b{b}"] = metrics[f"compact/latency_b{b}_speedup"]
        row[f"ms_b{b}"] = [metrics[f"compact/latency_b{b}_before_ms"], metrics[f"compact/latency_b{b}_after_ms"]]
    return row


def measure_torch_pruning(name: str, size: int) -> dict[str, object]:
    """Torch-Pruning 1.6.1 on the same model: 50 % L1 of every group it accepts, the classifier kept."""
    import torch_pruning as tp

    network = fresh(name, size).eval()
    example = torch.randn(1, 3, size, size)
    before = count_flops(network, example), sum(p.numel() for p in network.parameters())
    outputs = [m for m in network.modules() if getattr(m, "out_features", getattr(m, "out_channels", 0)) == 10]
    heads = {m: m.num_heads for m in network.modules() if isinstance(m, torch.nn.MultiheadAttention)}
    pruner = tp.pruner.MagnitudePruner(network, example, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=0.5, ignored_layers=outputs, num_heads=heads)  # fmt: skip
    pruner.step()
    if hasattr(network, "conv_proj"):  # torchvision's ViT reads its width from hidden_dim (TP's example does this)
        network.hidden_dim = network.conv_proj.out_channels
    flops = count_flops(network, example)  # also checks the pruned model still runs
    params = sum(p.numel() for p in network.parameters())
    return {"tp_handled": "yes", "tp_flops_ratio": before[0] / flops, "tp_params_ratio": before[1] / params}


def isolated(task: Callable[[str, int], dict[str, object]], name: str, size: int, limit: float) -> dict[str, object]:
    """``task(name, size)`` in a fresh process, stopped after ``limit`` seconds: its row, or an error or timeout
    row (an exception is a result here, not a crash of the whole list)."""
    key = "tp_handled" if task is measure_torch_pruning else "handled"
    kind, result = run_isolated(task, (name, size), limit)
    return result if kind == "row" else {key: kind, key.replace("handled", "reason"): result}


def summary(rows: list[dict[str, object]]) -> dict[str, object]:
    """Models handled by each tool, median FLOPs ratios where both handled, and where pruneflow ≥ 0.95 × TP."""
    both = [row for row in rows if row.get("handled") == "yes" and row.get("tp_handled") == "yes"]
    return {
        "models": len(rows),
        "handled_pruneflow": sum(row.get("handled") == "yes" for row in rows),
        "handled_torch_pruning": sum(row.get("tp_handled") == "yes" for row in rows),
        "handled_both": len(both),
        "median_flops_ratio_pruneflow": statistics.median(row["flops_ratio"] for row in both) if both else None,
        "median_flops_ratio_torch_pruning": statistics.median(row["tp_flops_ratio"] for row in both) if both else None,
        "pruneflow_at_least_0.95_tp": sum(row["flops_ratio"] >= 0.95 * row["tp_flops_ratio"] for row in both),
    }


def table_line(row: dict[str, object], batch_sizes: tuple[int, ...], compare: bool) -> str:
    handled = row["handled"] if row["handled"] != "error" else f"error: {row['reason']}"
    cells = [row["model"], row["size"], handled]
    if row["handled"] == "yes":
        cells += [f"{row['prunable']} / {row['spaces']}", row["coupled"], f"{row['channels_cut']:.1%}",
                  f"{row['agreement']:.3f}", f"{row['max_rel_diff']:.1e}", f"{row['flops_ratio']:.2f}",
                  f"{row['params_ratio']:.2f}"]  # fmt: skip
    else:
        cells += ["–"] * 7
    if compare:
        tp_handled = row.get("tp_handled", "–")
        if tp_handled == "yes":
            cells.append(f"{row['tp_flops_ratio']:.2f}")
            cells.append(f"{row['flops_ratio'] / row['tp_flops_ratio']:.2f}" if row["handled"] == "yes" else "–")
        else:
            cells += [tp_handled if tp_handled != "error" else f"error: {row['tp_reason']}", "–"]
    cells += [f"{row[f'speedup_b{b}']:.2f}" if f"speedup_b{b}" in row else "–" for b in batch_sizes]
    return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"


def table_header(batch_sizes: tuple[int, ...], compare: bool) -> str:
    columns = ["model", "px", "handled", "prunable / spaces", "coupled", "channels cut", "agreement", "max rel diff",
               "FLOPs ratio", "params ratio", *(["TP FLOPs ratio", "pruneflow / TP"] if compare else []),
               *(f"speedup b{b}" for b in batch_sizes)]  # fmt: skip
    return "| " + " | ".join(columns) + " |\n" + "| --- " * len(columns) + "|"


def merge(reports: list[Path], into: Path | None) -> list[dict[str, object]]:
    """The rows of several ``--json`` reports (a list run in chunks) in the list's order, with one summary; a model
    measured again in a later report (a rerun with a longer ``--time-limit``, or after a change) replaces its row."""
    latest = {row["model"]: row for report in reports for row in json.loads(report.read_text())["rows"]}
    rows = list(latest.values())
    order = {name: index for index, name in enumerate(TORCH_PRUNING_LIST)}
    rows.sort(key=lambda row: order.get(row["model"], len(order)))
    print(table_header((), compare=True))
    print("\n".join(table_line(row, (), compare=True) for row in rows))
    print(json.dumps(summary(rows)))
    if into:
        into.write_text(json.dumps({"rows": rows, "summary": summary(rows)}, indent=2))
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models", default=MODELS, help="comma-separated torchvision names, cifar_resnet<depth>, or torch_pruning_list"
    )
    parser.add_argument(
        "--size", type=int, default=32, help="square input size; 0: the list's (64; 224 ViT/Swin/MaxViT; 75 Inception)"
    )
    parser.add_argument("--batch-sizes", default="1,256", help="latency batch sizes")
    parser.add_argument("--rounds", type=int, default=5, help="latency repeats (median)")
    parser.add_argument("--time-limit", type=float, default=0,
                        help="seconds per model and tool, each in a fresh process (0: all in this process, no limit; "
                             "the list defaults to 600)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the rows (and the list's summary) here")
    parser.add_argument("--merge", type=Path, nargs="+", help="measure nothing: one table of these --json reports")


def run(args: argparse.Namespace) -> list[dict[str, object]]:
    if args.merge:
        return merge(args.merge, args.json)
    batch_sizes = tuple(int(b) for b in args.batch_sizes.split(",") if b)
    whole_list = args.models == "torch_pruning_list"
    names = TORCH_PRUNING_LIST if whole_list else tuple(args.models.split(","))
    limit = args.time_limit or (600 if whole_list else 0)
    compare = importlib.util.find_spec("torch_pruning") is not None and (whole_list or limit > 0)
    rows = []
    print(table_header(batch_sizes, compare))
    for name in names:
        size = list_size(name) if whole_list or not args.size else args.size
        row: dict[str, object] = {"model": name, "size": size}
        if limit:
            row |= isolated(functools.partial(measure, batch_sizes=batch_sizes, rounds=args.rounds), name, size, limit)
            if compare:
                row |= isolated(measure_torch_pruning, name, size, limit)
        else:
            row |= measure(name, size, batch_sizes, args.rounds)
        rows.append(row)
        print(table_line(row, batch_sizes, compare), flush=True)
        if args.json:  # after every model: a long list killed midway keeps what it measured
            args.json.write_text(json.dumps({"rows": rows, "summary": summary(rows)}, indent=2))
    if compare:
        print(json.dumps(summary(rows)))
    return rows



