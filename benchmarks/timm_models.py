"""What the channel graph can prune in timm's models: the smallest model of each timm architecture module.

Each model is built as a new user would (``timm.create_model(name, num_classes=10)``, random weights, random
BatchNorm statistics), at a small input size it accepts (64 px where its input size is not fixed and a
forward runs there, else its ``pretrained_cfg`` size). Then, as ``channel-graph`` does for torchvision: the
channel graph is traced, 50 % of every prunable space selected by summed L1 and masked with ``activation``,
the network cut and the cut network compared with the masked one on random images (top-1 agreement,
scale-relative max |Δ logit|), FLOPs before and after counted by ``torch.utils.flop_counter``. Where
``torch_pruning`` is importable (``pip install -e ".[bench]"``; never a dependency of pruneflow), Torch-Pruning
1.6.1 prunes the same freshly seeded model side by side (``MetaPruner``, L1 importance, ``pruning_ratio=0.5``,
the classifier kept; its "cut" means its pruned model's forward ran, its outputs are not checked).

    python -m benchmarks timm --json timm.json --out timm.md            # the smallest model of each module
    python -m benchmarks timm --models test_resnet,test_vit --time-limit 0
    python -m benchmarks timm --all --json timm_all.json                # every model of timm.list_models()

Each model and each tool runs in a fresh process under ``--time-limit`` seconds (0: in this process, no
limit), so one that hangs or dies cannot stop the list; ``--jobs`` models at a time. Every outcome is one of
``>=3x``, ``2-3x``, ``<2x`` (an exact cut's FLOPs reduction), ``refused entirely`` (no prunable space),
``inexact cut`` (agreement < 1 or a max relative difference over ``EXACT_TOLERANCE``), ``crash`` (an exception
anywhere, with its one line) and ``over time``. Each refused space's reason is sorted into a cause
(``CAUSES``). The JSON and the Markdown report are rewritten after every model, so a run stopped midway keeps
what it measured; ``--resume`` skips the models the JSON already holds; ``--torch-pruning-from`` takes
Torch-Pruning's figures from an earlier run's JSON (they do not depend on pruneflow: the same seeded model).

The smallest model of a module is chosen by parameter count, counted on the meta device (nothing allocated)
for the ``--candidates`` names of each module that look smallest by name; models over ``--max-params`` are
left out.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.channel_graph import measure_network
from benchmarks.common import isolated
from pruneflow.compaction.cost import count_flops
from pruneflow.compaction.verify import EXACT_TOLERANCE, randomize_norms, randomize_zero_weights

OUTCOMES = (">=3x", "2-3x", "<2x", "refused entirely", "inexact cut", "crash", "over time")
SMALL_SIZE = 64  # px, where the model's input size is not fixed
IMAGES = 8  # random images the cut is verified on (twice, as channel-graph does)

# Why a space is refused, by pruneflow's message: (cause, pattern), the first match wins.
CAUSES = (
    ("fx-untraceable", r"torch\.fx cannot trace"),
    ("op not understood", r"whose effect on channels is not understood"),
    ("combined with tensor outside graph", r"with a tensor outside the channel graph"),
    ("depthwise conv reads non-whole space", r"depthwise conv .* (not one whole channel space|with other channels)"),
    ("network output (expected: the classifier)", r"reaches the network's output"),
    ("module/reader called >1 times", r"is called \d+ times"),
    ("cat after unknown width", r"after a tensor of unknown width"),
    ("read along another dim", r"along another dimension"),
    ("split/chunk/shuffle by position", r"by position"),
    ("tied or shared parameters", r"tied|is also read by"),
    ("grouped conv reads other channels", r"grouped conv .* reads them with other channels"),
    ("normalises across channels", r"normalises across channels"),
    ("softmax across a head's positions", r"softmax across each head's positions"),
    ("width read from a shape sizes another tensor",
     r"sizes a tensor by their width|by its input's width|by another tensor's width"),
    ("single-head attention cut in whole heads", r"has one head, and whole heads"),
    ("attention variant not cut in whole heads", r"gates its heads|scale_norm=True"),
    ("parts of a layer's rows joined (a gate)", r"joins channels that do not line up"),
    ("rotary position embedding (rope)", r"rotary position embedding"),
)

# Name parts that mark a small variant, smallest first: the candidates whose parameters are counted.
SMALL_WORDS = ("test", "atto", "zepto", "femto", "pico", "nano", "xxxs", "xxs", "xx", "xs", "xsmall", "x", "mini",
               "micro", "ti", "tiny", "t", "lite0", "b0", "small", "s", "lite", "light", "m", "medium", "base",
               "b")  # fmt: skip


def families() -> dict[str, list[str]]:
    """timm's models by architecture module (``timm.models.<module>``), from timm's registry."""
    import timm
    from timm.models import _registry

    grouped: dict[str, list[str]] = {}
    for name in timm.list_models():
        grouped.setdefault(_registry._model_to_module.get(name, "?"), []).append(name)
    return grouped


def looks_small(name: str) -> tuple[int, int, int, str]:
    """A sort key: names with a smaller-variant word first, then the smaller first number, then shorter."""
    words = re.split(r"[_\-.]", name.lower())
    rank = min((SMALL_WORDS.index(w) for w in words if w in SMALL_WORDS), default=len(SMALL_WORDS))
    for word in words:  # ``edgenext_xx_small``, ``cait_xxs24_224``: a word with digits after its size
        prefix = re.match(r"[a-z]+", word)
        if prefix and prefix.group() in SMALL_WORDS and prefix.group() != word:
            rank = min(rank, SMALL_WORDS.index(prefix.group()))
    numbers = [int(n) for n in re.findall(r"\d+", name)]
    return rank, numbers[0] if numbers else 0, len(name), name


def parameter_count(name: str) -> int | None:
    """Parameters of ``name`` with 10 classes, built on the meta device; None where it cannot be built there."""
    import timm

    try:
        with torch.device("meta"):
            model = timm.create_model(name, num_classes=10)
    except Exception:  # some builders compute on tensors while building; they are counted last
        return None
    return sum(p.numel() for p in model.parameters())


def smallest_models(candidates: int) -> Iterator[dict[str, Any]]:
    """The smallest model of each module, ``{"family", "model", "params"}``, one module at a time (a long list
    measures the first while the next is chosen)."""
    for family, names in sorted(families().items()):
        counted = [(parameter_count(name), name) for name in sorted(names, key=looks_small)[:candidates]]
        known = [(params, name) for params, name in counted if params is not None]
        params, name = min(known) if known else (None, counted[0][1])
        yield {"family": family, "model": name, "params": params}


def build(name: str, size: int | None = None) -> tuple[nn.Module, int]:
    """``name`` with the same random weights and BatchNorm statistics in every process and for both tools, and
    the input size it is measured at (``size``, or the smallest of 64 px and its own that a forward accepts). A
    layer timm builds at zero (Hiera's head) gets random weights: at zero, every logit would be its bias and any cut
    would agree with the masked network."""
    import timm

    torch.manual_seed(0)
    network = randomize_zero_weights(randomize_norms(timm.create_model(name, num_classes=10), beta_scale=0.1))
    if size is None:
        config = network.pretrained_cfg
        size = config["input_size"][-1]
        if not config.get("fixed_input_size", False) and size > SMALL_SIZE:
            try:
                with torch.no_grad():
                    network(torch.randn(1, 3, SMALL_SIZE, SMALL_SIZE))
                size = SMALL_SIZE
            except Exception:  # too small for its strides or windows: its own size then
                pass
    return network, size


def measure_pruneflow(name: str, size: int | None = None) -> dict[str, Any]:
    network, size = build(name, size)
    return measure_network(network, name, size, images=IMAGES)


def measure_torch_pruning(name: str, size: int | None = None) -> dict[str, Any]:
    """Torch-Pruning 1.6.1 on the same model: ``MetaPruner``, L1, ratio 0.5, the classifier kept."""
    import torch_pruning as tp

    network, size = build(name, size)
    example = torch.randn(1, 3, size, size)
    before = count_flops(network, example), sum(p.numel() for p in network.parameters())
    classifier = network.get_classifier() if hasattr(network, "get_classifier") else None
    ignored = [m for m in (classifier if isinstance(classifier, tuple) else (classifier,)) if isinstance(m, nn.Module)]
    # timm's attention keeps q, k, v in one ``qkv`` linear layer: its heads are told to Torch-Pruning, as its own
    # timm example does, and each attention reads its head width again afterwards
    attentions = [m for m in network.modules()
                  if isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int)]
    pruner = tp.pruner.MetaPruner(network, example, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=0.5, ignored_layers=ignored,
                                  num_heads={m.qkv: m.num_heads for m in attentions})  # fmt: skip
    pruner.step()
    for attention in attentions:
        if hasattr(attention, "head_dim"):
            attention.head_dim = attention.qkv.out_features // (3 * attention.num_heads)
    flops = count_flops(network, example)  # also checks the pruned model still runs
    params = sum(p.numel() for p in network.parameters())
    return {"tp_handled": "yes", "tp_flops_ratio": before[0] / flops, "tp_params_ratio": before[1] / params}


def measure(name: str, limit: float, torch_pruning: bool, earlier: dict[str, Any] | None = None) -> dict[str, Any]:
    """One model's row: pruneflow's outcome and figures, and Torch-Pruning's beside them (``earlier``: its figures
    from an earlier run on the same model, taken instead of measuring them again)."""
    started = time.monotonic()
    kind, result = isolated(measure_pruneflow, (name,), limit)
    row: dict[str, Any] = {"model": name}
    if kind == "row":
        row |= result
    else:
        row |= {"handled": kind, "reason": result}
    row["outcome"] = outcome(row)
    row["seconds"] = time.monotonic() - started
    if torch_pruning and earlier:
        row |= earlier
    elif torch_pruning:
        kind, result = isolated(measure_torch_pruning, (name, row.get("size")), limit)
        row |= result if kind == "row" else {"tp_handled": kind, "tp_reason": result}
        row["tp_outcome"] = tp_outcome(row)
    return row


def ratio_bin(ratio: float) -> str:
    return ">=3x" if ratio >= 3 else "2-3x" if ratio >= 2 else "<2x"


def outcome(row: dict[str, Any]) -> str:
    """pruneflow's outcome on a model: its FLOPs bin where the cut is exact, else why not."""
    handled = row.get("handled")
    if handled == "error":
        return "crash"
    if handled == "timeout":
        return "over time"
    if handled == "refused-all":
        return "refused entirely"
    if row["agreement"] < 1.0 or not row["max_rel_diff"] <= EXACT_TOLERANCE:
        return "inexact cut"
    return ratio_bin(row["flops_ratio"])


def tp_outcome(row: dict[str, Any]) -> str:
    handled = row.get("tp_handled")
    if handled == "yes":
        return ratio_bin(row["tp_flops_ratio"])
    return "over time" if handled == "timeout" else "crash"


def cause(reason: str) -> str:
    return next((name for name, pattern in CAUSES if re.search(pattern, reason)), "other")


def causes(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Refused spaces by cause over all rows: spaces, families (timm modules; a model without one counts as its
    own), and pruneflow's first message as the example; most spaces first."""
    table: dict[str, dict[str, Any]] = {}
    for row in rows:
        for reason in row.get("refusals", []):
            entry = table.setdefault(cause(reason), {"spaces": 0, "families": set(), "example": reason})
            entry["spaces"] += 1
            entry["families"].add(row.get("family", row["model"]))  # with --all, a family counts once
    return [{"cause": name, "spaces": entry["spaces"], "families": len(entry["families"]), "example": entry["example"]}
            for name, entry in sorted(table.items(), key=lambda item: -item[1]["spaces"])]  # fmt: skip


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Outcomes counted per tool, and the FLOPs reductions where both cut."""
    exact = [row for row in rows if row["outcome"] in (">=3x", "2-3x", "<2x")]
    both = [row for row in exact if row.get("tp_handled") == "yes"]
    return {
        "models": len(rows),
        "pruneflow": {name: sum(row["outcome"] == name for row in rows) for name in OUTCOMES},
        "torch_pruning": {name: sum(row.get("tp_outcome") == name for row in rows) for name in OUTCOMES},
        "cut_exactly": len(exact),
        "median_flops_ratio_exact": statistics.median(row["flops_ratio"] for row in exact) if exact else None,
        "both_cut": len(both),
        "median_flops_ratio_both_pruneflow": statistics.median(r["flops_ratio"] for r in both) if both else None,
        "median_flops_ratio_both_torch_pruning": statistics.median(r["tp_flops_ratio"] for r in both) if both else None,
        "pruneflow_at_least_0.95_tp": sum(r["flops_ratio"] >= 0.95 * r["tp_flops_ratio"] for r in both),
    }


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def table_line(row: dict[str, Any], torch_pruning: bool) -> str:
    exact_or_inexact = row["outcome"] in (">=3x", "2-3x", "<2x", "inexact cut")
    cells = [row.get("family", ""), row["model"], row.get("size", "–"), row["outcome"],
             f"{row['prunable']} / {row['spaces']}" if "spaces" in row else "–",
             f"{row['agreement']:.3f}" if exact_or_inexact else "–",
             f"{row['max_rel_diff']:.1e}" if exact_or_inexact else "–",
             f"{row['flops_ratio']:.2f}" if exact_or_inexact else "–"]  # fmt: skip
    if torch_pruning:
        tp = row.get("tp_outcome", "–")
        cells += [tp, f"{row['tp_flops_ratio']:.2f}" if row.get("tp_handled") == "yes" else "–"]
    reason = row.get("reason") or (cause(row["refusals"][0]) if row["outcome"] == "refused entirely" else "")
    cells.append(reason)
    return "| " + " | ".join(_cell(cell) for cell in cells) + " |"


def table_header(torch_pruning: bool) -> str:
    columns = ["module", "model", "px", "pruneflow", "prunable / spaces", "agreement", "max rel diff", "FLOPs ratio",
               *(["Torch-Pruning", "TP FLOPs ratio"] if torch_pruning else []), "crash / refusal"]  # fmt: skip
    return "| " + " | ".join(columns) + " |\n" + "| --- " * len(columns) + "|"


def markdown(rows: list[dict[str, Any]], left_out: list[dict[str, Any]], torch_pruning: bool, command: str) -> str:
    """The report: the summary like issue 31's, the refusal causes, crashes, and one row per model."""
    totals = summary(rows)
    lines = [f"Measured by `{command}` (timm, 10 classes, random weights, 50 % L1 of every prunable space, "
             "activation masks, the cut verified against the masked network).", ""]  # fmt: skip
    lines += [f"| outcome on {len(rows)} models ({len(left_out)} over the size limit left out) | pruneflow"
              + (" | Torch-Pruning 1.6.1 |" if torch_pruning else " |"),
              "| --- | --- |" + (" --- |" if torch_pruning else "")]  # fmt: skip
    for name in OUTCOMES:
        tp = f" {totals['torch_pruning'][name]} |" if torch_pruning else ""
        lines.append(f"| {name} | {totals['pruneflow'][name]} |{tp}")
    lines.append("")
    if totals["median_flops_ratio_exact"] is not None:
        lines.append(f"pruneflow median FLOPs reduction over the {totals['cut_exactly']} models it cut exactly: "
                     f"{totals['median_flops_ratio_exact']:.2f}x")  # fmt: skip
    if torch_pruning and totals["both_cut"]:
        lines.append(f"On the {totals['both_cut']} models both cut: median FLOPs reduction pruneflow "
                     f"{totals['median_flops_ratio_both_pruneflow']:.2f}x, Torch-Pruning "
                     f"{totals['median_flops_ratio_both_torch_pruning']:.2f}x; pruneflow >= 0.95x Torch-Pruning on "
                     f"{totals['pruneflow_at_least_0.95_tp']}.")  # fmt: skip
    lines += ["", "| cause (pruneflow's message) | spaces | families | example |", "| --- | --- | --- | --- |"]
    lines += [f"| {c['cause']} | {c['spaces']} | {c['families']} | {_cell(c['example'][:160])} |" for c in causes(rows)]
    crashes = [f"{row['model']}: {row.get('reason', '')}" for row in rows if row["outcome"] in ("crash", "over time")]
    inexact = [f"{row['model']}: max rel diff {row['max_rel_diff']:.1e}, agreement {row['agreement']:.3f}"
               for row in rows if row["outcome"] == "inexact cut"]  # fmt: skip
    lines += ["", "Crashes, over time and inexact cuts: " + ("; ".join(crashes + inexact) or "none")]
    if torch_pruning:
        failed = [f"{row['model']}: {row.get('tp_reason', '')}" for row in rows
                  if row.get("tp_outcome") in ("crash", "over time")]  # fmt: skip
        lines += ["", "Torch-Pruning's crashes and over time: " + ("; ".join(failed) or "none")]
    lines.append("")
    lines += [table_header(torch_pruning), *(table_line(row, torch_pruning) for row in rows)]
    if left_out:
        big = ", ".join(f"{entry['model']} ({entry['params'] / 1e6:.0f} M)" for entry in left_out)
        lines += ["", f"Left out (parameters): {big}"]
    return "\n".join(lines) + "\n"


def models_to_run(args: argparse.Namespace) -> Iterable[dict[str, Any]]:
    if args.models:
        module = {name: family for family, names in families().items() for name in names}
        unknown = [name for name in args.models.split(",") if name not in module]
        if unknown:
            raise SystemExit(f"benchmarks timm: error: {unknown[0]!r} is not a timm model (timm.list_models())")
        return [{"family": module[name], "model": name} for name in args.models.split(",")]
    if args.all:
        return [{"family": family, "model": name} for family, names in sorted(families().items()) for name in names]
    return smallest_models(args.candidates)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("--models", help="comma-separated timm names instead of the smallest of each module")
    chosen.add_argument("--all", action="store_true", help="every model of timm.list_models()")
    parser.add_argument("--time-limit", type=float, default=600,
                        help="seconds per model and tool, each in a fresh process (0: in this process)")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=1, help="models measured at a time (each in its processes)")
    parser.add_argument("--max-params", type=float, default=150e6, help="leave out smallest models bigger than this")
    parser.add_argument("--candidates", type=int, default=8, help="names per module whose parameters are counted")
    parser.add_argument("--torch-pruning", action=argparse.BooleanOptionalAction, default=None,
                        help="Torch-Pruning side by side (default: where torch_pruning is importable)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the rows, causes and summary here (after every model)")
    parser.add_argument("--out", type=Path, help="write the Markdown report here (after every model)")
    parser.add_argument("--resume", action="store_true", help="keep the rows --json already holds; measure the rest")
    parser.add_argument("--torch-pruning-from", type=Path, metavar="JSON",
                        help="take Torch-Pruning's figures from an earlier run's --json where it holds the model (they "
                        "do not depend on pruneflow's code: the same seeded model); measure the others")  # fmt: skip


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import importlib.util

    if args.jobs < 1 or args.time_limit < 0:
        raise SystemExit(f"benchmarks timm: error: --jobs must be >= 1 and --time-limit >= 0, got {args.jobs} and "
                         f"{args.time_limit}")  # fmt: skip
    if importlib.util.find_spec("timm") is None:
        raise SystemExit('benchmarks timm: error: timm is not installed; pip install -e ".[timm]"')
    available = importlib.util.find_spec("torch_pruning") is not None
    if args.torch_pruning and not available:
        raise SystemExit(
            'benchmarks timm: error: --torch-pruning but torch_pruning is not installed; pip install -e ".[bench]"'
        )
    torch_pruning = available if args.torch_pruning is None else args.torch_pruning
    command = args.command
    done: dict[str, dict[str, Any]] = {}
    if args.resume and args.json and args.json.exists():
        done = {row["model"]: row for row in json.loads(args.json.read_text())["rows"]}
    earlier: dict[str, dict[str, Any]] = {}
    if args.torch_pruning_from:
        if not args.torch_pruning_from.is_file():
            raise SystemExit(f"benchmarks timm: error: --torch-pruning-from {args.torch_pruning_from}: no such file; "
                             "give the --json of an earlier run")  # fmt: skip
        earlier_rows = json.loads(args.torch_pruning_from.read_text())["rows"]
        earlier = {row["model"]: {key: value for key, value in row.items() if key.startswith("tp_")}
                   for row in earlier_rows if "tp_outcome" in row}  # fmt: skip
    rows: list[dict[str, Any]] = []
    left_out: list[dict[str, Any]] = []
    print(table_header(torch_pruning), flush=True)

    def record(entry: dict[str, Any], row: dict[str, Any]) -> None:
        rows.append({"family": entry["family"], **row, "params": entry.get("params")})
        print(table_line(rows[-1], torch_pruning), flush=True)
        write(rows, left_out, torch_pruning, command, args)

    with ThreadPoolExecutor(args.jobs) as pool:  # each job waits on its own child processes
        running: list[tuple[dict[str, Any], Future[dict[str, Any]]]] = []
        for entry in models_to_run(args):
            if entry.get("params") is not None and entry["params"] > args.max_params:
                left_out.append(entry)
            elif entry["model"] in done:
                record(entry, done[entry["model"]])
            else:
                running.append((entry, pool.submit(measure, entry["model"], args.time_limit, torch_pruning,
                                                        earlier.get(entry["model"]))))
            while len(running) >= args.jobs:  # the next module is chosen while this many are measured
                record(*_result(running.pop(0)))
        for job in running:
            record(*_result(job))
    print(markdown(rows, left_out, torch_pruning, command).split("\n| module |")[0])
    return rows


def _result(job: tuple[dict[str, Any], Future[dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, Any]]:
    return job[0], job[1].result()


def write(rows: list[dict[str, Any]], left_out: list[dict[str, Any]], torch_pruning: bool, command: str,
          args: argparse.Namespace) -> None:
    """The JSON and the Markdown report as they stand (after every model: a run stopped midway keeps them)."""
    if args.json:
        report = {"command": command, "rows": rows, "left_out": left_out, "causes": causes(rows),
                  "summary": summary(rows)}  # fmt: skip
        args.json.write_text(json.dumps(report, indent=2, default=str))
    if args.out:
        args.out.write_text(markdown(rows, left_out, torch_pruning, command))
