"""Every GPU figure of issue 22 in one call: ``python -m benchmarks gpu --suite --json gpu.json``.

On a GPU machine, with the data sets in a local folder and the JSON written to an output folder::

    python -m benchmarks gpu --suite --root <data folder> --json <output folder>/gpu.json

and on CPU, tiny, to prove it runs end to end (``--tiny`` shrinks every section to seconds)::

    python -m benchmarks gpu --suite --device cpu --tiny --root ../shared/data --json gpu.json

Sections (``--sections``, all by default; each is timed, and one that fails records its error and the
suite goes on; the JSON is rewritten after every section, so a run cut short keeps what it measured):

- ``sync``: for every strategy, steps 4–20 of a tiny run under ``HostSyncCheck`` — on CUDA inside
  ``torch.cuda.set_sync_debug_mode("error")``, so any host read fails the arm with its traceback;
- ``overhead``: ``train.py`` (``mask=activation``) against a hand-written loop, MNIST, training steps
  only, in fp32 NCHW and in bf16 channels-last (both arms in the same setting), alternated in this process;
- ``host``: ``benchmarks.host_overhead``'s arms (plain Lightning, ClassifierModule, pruneflow) on the device;
- ``compile``: eager against ``compile=true compile_mode=reduce-overhead`` (CUDA graphs on a GPU),
  ``mask=activation`` pruned mid-run, samples/s of each;
- ``startup``: one ``python train.py`` process's ``perf/startup/*`` phases and ``python -c "import torch,
  lightning"``'s wall time (median of 3): the ratio first step / imports;
- ``latency``: compaction of a half-pruned small VGG measured on the device, fp32 and bf16, batch 1 and 256;
- ``cut``: fine-tuning samples/s masked against cut while training (``mask.cut_at_epoch=1``) for VGG11,
  ResNet-56 and torchvision resnet18 (CIFAR stem) at batch 512 on 3×32×32 synthetic images;
- ``defaults``: ``benchmarks.defaults``' precision × memory-format ladder, and the CUDA thresholds it suggests
  for ``pruneflow.experiment.device_defaults.SPEED_RULES``.

``python -m benchmarks gpu-section gpu.json`` turns the JSON into the GPU section of docs/measurements.md.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

SECTIONS = ("sync", "overhead", "host", "compile", "startup", "latency", "cut", "defaults")
STRATEGY_NAMES = ["disabled", "control", "weight", "activation", "gradient", "parametrize", "hard"]
TINY_RUN = ["data=synthetic", "data.num_train=400", "data.num_test=32", "data.batch_size=16", "data.eval_batch_size=64",
            "model.channels=[4,8]", "trainer.max_epochs=1", "trainer.enable_model_summary=false", "~logger",
            "trainer.log_every_n_steps=1000", "mask.log_every_n_steps=1000", "mask.burst_steps=0",
            "callbacks.non_finite_loss.check_every_n_steps=1000", "progress_bar_refresh_rate=1000",
            "+callbacks.sync._target_=pruneflow.callbacks.host_sync.HostSyncCheck", "+callbacks.sync.start=4",
            "+callbacks.sync.steps=16"]  # fmt: skip
CUT_MODELS = {
    "vgg11": ["model=vgg"],
    "resnet56": ["model=resnet", "model.depth=56", "mask.groups=true"],
    "resnet18": ["model=torchvision", "model.name=resnet18", "model.cifar_stem=true", "mask.groups=true"],
}


def compose(*overrides: str) -> Any:
    from pruneflow.experiment import compose_config

    return compose_config(overrides)


def train_in_process(scratch: Path, name: str, *overrides: str) -> dict[str, Any]:
    from pruneflow.experiment.run import train

    return train(compose(*overrides), scratch / name)


def accelerator(args: Any) -> str:
    return f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}"


def section_sync(args: Any, scratch: Path) -> dict[str, Any]:
    results = {}
    for strategy in STRATEGY_NAMES:
        try:
            metrics = train_in_process(scratch, f"sync-{strategy}", *TINY_RUN, f"mask={strategy}", accelerator(args))
            results[strategy] = {"steps": metrics["perf/ordinary_steps_watched"],
                                 "host_reads": metrics["perf/ordinary_step_host_reads"],
                                 "ops": metrics["perf/ordinary_step_sync_ops"]}  # fmt: skip
        except Exception as error:  # a sync under CUDA's debug mode raises here, with where it happened
            results[strategy] = {"error": first_lines(error)}
        print(f"sync {strategy}: {results[strategy]}", flush=True)
    return results


def section_overhead(args: Any, scratch: Path) -> dict[str, Any]:
    from benchmarks import overhead as bench_overhead

    limit = 4000 if args.tiny else 30000  # 234 steps a run: 214 timed after the warm-up, the suite in 8 minutes
    settings = {"fp32_nchw": ("32-true", False), "bf16_channels_last": ("bf16-mixed", True)}
    result: dict[str, Any] = {}
    for setting, (precision, channels_last) in settings.items():
        extra = (f"trainer.precision={precision}", f"channels_last={str(channels_last).lower()}",
                 *([f"data.limit_train={limit}"] if limit else []))  # fmt: skip
        ratios, arms = [], {"pruneflow": [], "bare_loop": []}
        for repeat in range(args.repeats):
            figures = {}
            for arm in ("pruneflow", "bare_loop") if repeat % 2 == 0 else ("bare_loop", "pruneflow"):
                if arm == "pruneflow":
                    figures[arm] = bench_overhead.pruneflow_in_process(args.root, 1, args.device,
                                                                       scratch / f"overhead-{setting}-{repeat}", extra)
                else:
                    figures[arm] = bench_overhead.bare_loop(args.root, 1, args.device, precision, channels_last, limit)
                arms[arm].append(figures[arm]["samples"] / figures[arm]["seconds"])
            bench_overhead.check_equivalent(figures["pruneflow"], figures["bare_loop"])  # the same samples timed
            ratios.append(arms["pruneflow"][-1] / arms["bare_loop"][-1])
        result[setting] = {"samples_per_s": arms, "ratio_median": statistics.median(ratios), "ratios": ratios}
        print(f"overhead {setting}: pruneflow / hand-written loop {result[setting]['ratio_median']:.3f}", flush=True)
    return result


def section_host(args: Any, scratch: Path) -> dict[str, Any]:
    from benchmarks import host_overhead as host

    steps, warmup = (60, 20) if args.tiny else (300, 50)
    runs: dict[str, list[float]] = {arm: [] for arm in host.ARMS}
    for repeat in range(args.repeats):
        for arm in host.ARMS if repeat % 2 == 0 else host.ARMS[::-1]:
            clock = host.StepClock(warmup, steps)
            host.fit(arm, steps + 1, args.device, [clock])
            runs[arm].append(clock.wall * 1e3)
    medians = {arm: statistics.median(values) for arm, values in runs.items()}
    result = {"ms_per_step": runs, "median_ms": medians,
              "ratio_pruneflow_vs_lightning": medians["pruneflow"] / medians["lightning"]}  # fmt: skip
    print(f"host: pruneflow / plain Lightning {result['ratio_pruneflow_vs_lightning']:.3f}", flush=True)
    return result


def section_compile(args: Any, scratch: Path) -> dict[str, Any]:
    base = [f"data.root={args.root}", "mask=activation", f"mask.at_step={8 if args.tiny else 50}",
            "trainer.max_epochs=1", "data.drop_last=true", "data.limit_train=" + ("2000" if args.tiny else "12000"),
            f"callbacks.throughput.warmup_steps={5 if args.tiny else 20}", accelerator(args),
            "trainer.enable_model_summary=false", "~logger"]  # fmt: skip
    arms = {"eager": ["compile=false"], "reduce_overhead": ["compile=true", "compile_mode=reduce-overhead"]}
    result: dict[str, Any] = {}
    for arm, overrides in arms.items():
        started = time.perf_counter()
        metrics = train_in_process(scratch, f"compile-{arm}", *base, *overrides)
        result[arm] = {"samples_per_s": metrics.get("perf/train_samples_per_s"), "test_acc": metrics["test/acc"],
                       "wall_seconds": time.perf_counter() - started}  # fmt: skip
    result["ratio"] = result["reduce_overhead"]["samples_per_s"] / result["eager"]["samples_per_s"]
    print(f"compile reduce-overhead / eager: {result['ratio']:.3f}", flush=True)
    return result


def section_startup(args: Any, scratch: Path) -> dict[str, Any]:
    from benchmarks import startup as bench_startup

    result = bench_startup.measure(args.root, args.device, 1 if args.tiny else 2)
    print(f"startup: first step at {result['phases']['perf/startup_seconds']:.2f} s, "
          f"{result['ratio_first_step_vs_imports']:.2f}x the imports", flush=True)  # fmt: skip
    return result


def section_latency(args: Any, scratch: Path) -> dict[str, Any]:
    import torch

    from pruneflow.compaction.pipeline import compact_and_verify
    from pruneflow.models import VGG
    from pruneflow.pruning import find_prunable_layers

    torch.manual_seed(0)
    model = VGG((3, 32, 32), 10, layers=[32, "M", 64, "M", 128, 128, "M", 256, 256, "M"]).to(args.device).eval()
    masks = {}
    for layer in find_prunable_layers(model):
        mask = torch.zeros(layer.num_channels, dtype=torch.bool)
        mask[torch.randperm(layer.num_channels)[: layer.num_channels // 2]] = True
        masks[layer.name] = mask.to(args.device)
    batches = [(torch.randn(8, 3, 32, 32, device=args.device), torch.zeros(8, dtype=torch.long, device=args.device))]
    result = {}
    for precision in ("32-true", "bf16-mixed"):
        _, metrics = compact_and_verify(model, masks, batches, latency_batch_sizes=(1, 256),
                                        latency_rounds=3 if args.tiny else 7, latency_device=args.device,
                                        latency_precision=precision,
                                        latency_memory_format="channels_last")  # fmt: skip
        result[precision] = {key: value for key, value in metrics.items() if key.startswith("compact/latency")}
        print(f"latency {precision}: {result[precision]}", flush=True)
    return result


def section_cut(args: Any, scratch: Path) -> dict[str, Any]:
    batch = 64 if args.tiny else 512
    steps_per_epoch = 4 if args.tiny else 24
    models = {"vgg11": CUT_MODELS["vgg11"]} if args.tiny else CUT_MODELS
    base = ["data=synthetic", "data.input_shape=[3,32,32]", f"data.num_train={batch * steps_per_epoch}",
            "data.val_size=0", "data.num_test=256", f"data.batch_size={batch}", "trainer.max_epochs=3",
            "mask=activation", "mask.reset_optimizer_state=true", "mask.at_epoch=1", accelerator(args),
            "trainer.enable_model_summary=false", "~logger", "~callbacks.checkpoint_best", "~callbacks.checkpoint_last",
            "+callbacks.finetune._target_=pruneflow.callbacks.TrainingThroughput",
            f"+callbacks.finetune.warmup_steps={steps_per_epoch + 2}"]  # fmt: skip
    result: dict[str, Any] = {}
    for name, model in models.items():
        figures = {}
        for arm, extra in (("masked", []), ("cut", ["mask.cut_at_epoch=1"])):
            metrics = train_in_process(scratch, f"cut-{name}-{arm}", *base, *model, *extra)
            figures[arm] = {"finetune_samples_per_s": metrics.get("perf/train_samples_per_s"),
                            "flops_ratio": metrics.get("cut/flops_ratio")}  # fmt: skip
        figures["speedup"] = figures["cut"]["finetune_samples_per_s"] / figures["masked"]["finetune_samples_per_s"]
        result[name] = figures
        print(f"cut {name}: fine-tuning x{figures['speedup']:.2f} (FLOPs x{figures['cut']['flops_ratio']})", flush=True)
    return result


def section_defaults(args: Any, scratch: Path) -> dict[str, Any]:
    import torch

    from benchmarks import defaults as bench_defaults

    rows = bench_defaults.measure(torch.device(args.device), 3, 3 if args.tiny else 10, args.tiny, 0.05)
    return {"rows": rows, "suggested": suggest_thresholds(rows)}


def suggest_thresholds(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """The smallest GFLOPs a batch from which a setting is faster than fp32 NCHW by 5 % for every larger model."""
    suggested: dict[str, float | None] = {}
    for key, setting in (("bf16_from_gflops", "bf16/cl"), ("channels_last_from_gflops", "bf16/cl")):
        ordered = sorted(rows, key=lambda row: row["gflops_per_batch"])
        threshold = None
        for index, row in enumerate(ordered):
            if all(later["speedup"][setting] >= 1.05 for later in ordered[index:]):
                threshold = row["gflops_per_batch"]
                break
        suggested[key] = threshold
    return suggested


def first_lines(error: BaseException) -> str:
    lines = traceback.format_exception(error)
    return "".join(lines[-6:])[-2000:]


RUNNERS: dict[str, Callable[[Any, Path], dict[str, Any]]] = {
    "sync": section_sync, "overhead": section_overhead, "host": section_host, "compile": section_compile,
    "startup": section_startup, "latency": section_latency, "cut": section_cut, "defaults": section_defaults,
}  # fmt: skip


def run_suite(args: Any) -> dict[str, Any]:
    import torch

    sections = args.sections.split(",") if args.sections else list(SECTIONS)
    unknown = [name for name in sections if name not in RUNNERS]
    if unknown:
        raise SystemExit(f"benchmarks gpu: error: unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
    import lightning

    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "lightning": lightning.__version__, "python": sys.version.split()[0]},
        "tiny": args.tiny, "load_average_at_start": os.getloadavg(), "sections": {},
    }  # fmt: skip
    suite_started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        for name in sections:
            started = time.perf_counter()
            print(f"--- {name}", flush=True)
            try:
                figures = RUNNERS[name](args, Path(scratch))
            except Exception as error:  # one section's failure must not cost the others' figures
                figures = {"error": first_lines(error)}
                print(f"{name} failed:\n{figures['error']}", flush=True)
            report["sections"][name] = {**figures, "seconds": round(time.perf_counter() - started, 1)}
            report["seconds"] = round(time.perf_counter() - suite_started, 1)
            if args.json:
                args.json.write_text(json.dumps(report, indent=2, default=str))
    print(f"suite finished in {report['seconds']:.0f} s", flush=True)
    return report
