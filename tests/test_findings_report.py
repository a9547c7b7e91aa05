"""``pruneflow-report --findings``: the findings report of a sweep, checked on a sweep written here with
known numbers (configs, metrics.json, event files and Hydra's multirun.yaml as a real sweep lays them out),
and the ``experiment=findings`` grid as Hydra composes it."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from helpers import REPO
from omegaconf import OmegaConf
from torch.utils.tensorboard import SummaryWriter

from pruneflow.experiment import compose_config, report

EVENT = 10  # the pruning step of every fake run
COMMAND = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "experiment=findings", "data.root=../shared/data"]


def fake_run(sweep: Path, name: str, strategy: str, optimizer: str, seed: int, drift: float, **metrics) -> None:
    """A finished run: its config, metrics.json, and a drift curve rising to ``drift`` after step EVENT."""
    run = sweep / name
    run.mkdir(parents=True)
    target = {"sgd": "torch.optim.SGD", "adam": "torch.optim.Adam"}[optimizer]
    config = {
        "seed": seed, "data": {"_target_": "pruneflow.data.FashionMNISTDataModule"},
        "model": {"_target_": "pruneflow.models.ConvNet", "activation": "relu"},
        "optimizer": {"_target_": target}, "mask": {"strategy": strategy, "at_epoch": 1, "at_step": None},
    }  # fmt: skip
    OmegaConf.save(OmegaConf.create(config), run / "config.yaml")
    zero = 1.0 if drift == 0 else 0.0
    (run / "metrics.json").write_text(json.dumps({
        "mask/strategy": strategy, "mask/reset_optimizer_state": strategy == "activation",
        "mask/pruning_steps": [EVENT], "drift/producer_l2/final": drift, "drift/zero_fraction/final": zero,
        "wall_seconds": 60.0, **metrics,
    }))  # fmt: skip
    with SummaryWriter(str(run)) as writer:
        for step in range(EVENT + 1, EVENT + 30):
            writer.add_scalar("drift/producer_l2", drift * min(1.0, (step - EVENT) / 5), step)


@pytest.fixture()
def sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "sweep"
    for optimizer in ("sgd", "adam"):
        for seed, drift in enumerate((2.0, 4.0)):
            fake_run(sweep, f"mask=weight,optimizer={optimizer},seed={seed}", "weight", optimizer, seed, drift,
                     **{"test/acc": 0.8 + 0.1 * seed, "burst/steps_to_half_drift": 3 + seed})  # fmt: skip
            fake_run(sweep, f"mask=activation_reset,optimizer={optimizer},seed={seed}", "activation", optimizer,
                     seed, 0.0, **{"test/acc": 0.85})  # fmt: skip
    (sweep / "multirun.yaml").write_text(
        OmegaConf.to_yaml(
            {"hydra": {"overrides": {"hydra": [*COMMAND[:2], "hydra.mode=MULTIRUN"], "task": COMMAND[2:]}}}
        )
    )
    killed = sweep / "mask=weight,optimizer=sgd,seed=2"
    killed.mkdir()
    OmegaConf.save(OmegaConf.create({"seed": 2}), killed / "config.yaml")
    return sweep


def test_findings_report_states_the_command_tables_figures_and_numbers(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "docs" / "FINDINGS.md"
    result = subprocess.run([sys.executable, "-m", "pruneflow.experiment.report", str(sweep), "--findings", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert "python train.py -m " + " ".join(COMMAND) in text  # the exact sweep command, at the top
    assert text.index("```bash") < text.index("## Findings")
    assert "8 finished runs, 1 unfinished or failed" in text and "`mask=weight,optimizer=sgd,seed=2`" in text
    # soft filter pruning's regrowth, checked on the weight runs pruned after pre-training (their drift)
    regrowth = next(line for line in text.splitlines() if "arXiv:1808.06866" in line)
    assert text.index("## Against the published claims") < text.index(regrowth)
    assert "`weight` after pre-training: L2 3 ± 1.2, 4 runs" in regrowth and "Differs" not in regrowth
    # mean ± std over the two seeds, in the weight row of each optimizer's table
    drift = f"{statistics.fmean([2.0, 4.0]):.4g} ± {statistics.stdev([2.0, 4.0]):.2g}"
    rows = [line for line in text.splitlines() if line.startswith("| after 1 epoch | relu | `weight` |")]
    assert len(rows) == 2 and all(f"| {drift} |" in row for row in rows)
    assert all("| 3.5 ± 0.71 |" in row for row in rows)  # steps to half the final drift
    # plain sentences with the numbers
    assert "`activation+reset` kept every pruned kernel at exactly zero in all 4 of their runs" in text
    assert f"SGD: `weight`-pruned kernels came back to L2 = {drift} by the end (2 runs)" in text
    # the transient figure, one per data set and pruning time, beside the report
    figures = sorted(out.parent.glob("findings_transient_*.png"))
    assert [f.name for f in figures] == ["findings_transient_fashionmnist_convnet_after_1_epoch.png"]
    assert f"]({figures[0].name})" in text and figures[0].stat().st_size > 10_000


def test_findings_report_names_no_absolute_path_of_the_machine_it_ran_on(sweep: Path, tmp_path: Path) -> None:
    # A report is committed (docs/FINDINGS.md): the sweep folder, the output and a data root given as absolute
    # paths are written relative to the folder the report was made from, as a user would type them there.
    data = tmp_path / "data"
    command = [*COMMAND[:3], f"data.root={data}"]
    (sweep / "multirun.yaml").write_text(
        OmegaConf.to_yaml({"hydra": {"overrides": {"hydra": command[:2], "task": command[2:]}}})
    )
    checkout = tmp_path / "checkout"
    out = checkout / "docs" / "FINDINGS.md"
    out.parent.mkdir(parents=True)
    result = subprocess.run([sys.executable, "-m", "pruneflow.experiment.report", str(sweep), "--findings", str(out)],
                            cwd=checkout,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert "Generated by `pruneflow-report ../sweep --findings docs/FINDINGS.md`" in text
    assert "python train.py -m " + " ".join([*COMMAND[:3], "data.root=../data"]) in text
    assert str(tmp_path) not in text


def test_findings_grid_composes_the_issue_grid() -> None:
    cfg = compose_config(["experiment=findings", "mask=activation_reset"], with_hydra=True)
    params = cfg.hydra.sweeper.params
    grid = [len(str(params[key]).split(",")) for key in ("mask", "optimizer", "model.activation",
                                                         "mask.at_epoch", "seed")]  # fmt: skip
    assert grid == [7, 3, 2, 2, 3]
    assert cfg.mask.strategy == "activation" and cfg.mask.reset_optimizer_state
    assert cfg.data._target_.endswith("FashionMNISTDataModule") and cfg.compact
    cifar = compose_config(["experiment=findings_cifar"], with_hydra=True)
    assert cifar.model._target_.endswith("VGG") and cifar.data._target_.endswith("CIFAR10DataModule")
    assert str(cifar.hydra.sweeper.params["optimizer"]) == "sgd,adam"


def test_findings_name_the_cells_where_a_strategy_held_and_why() -> None:
    # `weight` at exactly zero only where pruned at initialisation under ReLU (β = 0, ReLU's zero gradient),
    # drifting in the three other cells: the sentences must say where it held, not average it away.
    runs = []
    for timing in ("at initialisation", "after 1 epoch"):
        for activation in ("relu", "silu"):
            for seed in range(2):
                held = timing == "at initialisation" and activation == "relu"
                drift = 0.0 if held else 2.0 + seed
                metrics = {
                    "drift/producer_l2/final": drift, "drift/zero_fraction/final": 1.0 if held else 0.0,
                    "bn/beta_abs/final": 0.0 if held else 0.5, "optim/pruned_momentum_l2/max": 3.0,
                }  # fmt: skip
                runs.append(report.Run(f"{timing},{activation},{seed}", "FashionMNIST / ConvNet", "SGD", activation,
                                       timing, "weight", seed, metrics))  # fmt: skip
    text = "\n".join(report.findings_sentences(runs))
    assert "`weight` kept its pruned kernels at exactly zero only when pruned at initialisation, relu (2 runs" in text
    assert "elsewhere 6 of its 6 runs ended with them off zero" in text
    assert "SiLU passes half of it at 0 and the same kernels came back to L2 = 2.5 ± 0.71" in text
    assert (
        "by cell: after 1 epoch, relu 2.5 ± 0.71; after 1 epoch, silu 2.5 ± 0.71; at initialisation, relu 0 ± 0" in text
    )
    assert "SGD's momentum buffer at up to 3 ± 0" in text


def load_report() -> ModuleType:
    return report


@pytest.mark.parametrize("panels", [1, 3])
def test_figure_titles_fit_the_figure_and_the_legend_covers_no_title(
    panels: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = load_report()
    monkeypatch.setattr(report.plt, "close", lambda figure: None)  # keep the figure to measure it
    figure, axes = report.plt.subplots(1, panels, figsize=(5 * panels, 4.6), squeeze=False, layout="constrained")
    handles = []
    for index, axis in enumerate(axes.flat):
        handles += axis.plot([0, 1], [0, index], label=f"strategy{index}")
        report.set_panel_title(axis, "optimizer=adam,model.activation=relu,trainer.max_epochs=3", width_inches=5)
    handles += [report.plt.Line2D([], [], label=name) for name in ("control", "weight", "activation", "gradient")]
    title = "drift/producer_l2 by strategy (" + ", ".join(f"override{i}=value{i}" for i in range(12)) + ")"
    report.save_figure(figure, handles, title, tmp_path / "figure.png")
    renderer = figure.canvas.get_renderer()
    whole = figure.bbox
    titles = [figure._suptitle, *(axis.title for axis in axes.flat)]
    legend = figure.legends[0].get_window_extent(renderer)
    for box in [legend, *(text.get_window_extent(renderer) for text in titles)]:
        assert whole.x0 <= box.x0 and box.x1 <= whole.x1 and whole.y0 <= box.y0 and box.y1 <= whole.y1
    assert not any(legend.overlaps(text.get_window_extent(renderer)) for text in titles)
    report.plt.close(figure)
