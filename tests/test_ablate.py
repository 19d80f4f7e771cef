"""mssar ablate: the paper's grids (Table 3 scales, regional/sliding, single/multi-stage,
none/SE/MS-SAR, --grid), the CLI, and the end-to-end property the command exists for: kill an
ablation midway, run it again, and only what is missing runs; then `mssar report` reads it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import write_cifar10
from typer.testing import CliRunner

from mssar_cli import ablation, runs
from mssar_cli.errors import MssarError
from mssar_cli.launch import local
from mssar_cli.launch.job import train_command
from mssar_cli.recalibration import RECALIBRATIONS
from mssar_cli.recipe import dump

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "recipes" / "smoke.yaml"
FMNIST_SHORT = REPO / "recipes" / "fashion_mnist" / "cpu_short" / "resnet20_mssar.yaml"
SCALE_LABELS = ["none", "1", "2", "4", "1_2", "1_4", "2_4", "1_2_4"]
TABLE3_SCALES = ["none", "{1}", "{2}", "{4}", "{1,2}", "{1,4}", "{2,4}", "{1,2,4}"]


def plan(kind: str, recipe: Path, overrides=(), grid=(), seeds: int = 1, modules=None):
    return ablation.plan(kind, str(recipe), list(overrides), list(grid), seeds, modules)


# --- planning -------------------------------------------------------------------------------------


def test_scales_is_table3_seven_scale_sets_and_the_baseline(smoke: Path) -> None:
    planned = plan("scales", smoke)
    assert [r.cell.label for r in planned] == SCALE_LABELS
    assert [r.recipe.experiment for r in planned] == [
        f"smoke--scales-{label}" for label in SCALE_LABELS
    ]
    base = planned[0].recipe.model
    assert (base.recalibration, base.scales, base.strategy, base.reduction) == (
        "none",
        None,
        None,
        None,
    )
    sets = [tuple(r.recipe.model.scales) for r in planned[1:]]
    assert sets == [(1,), (2,), (4,), (1, 2), (1, 4), (2, 4), (1, 2, 4)]
    assert all(r.recipe.model.recalibration == "mssar" for r in planned[1:])
    assert len({r.run_dir for r in planned}) == 8
    assert all(r.status == "missing" for r in planned)
    assert not (smoke.parent / "results").exists()  # planning writes nothing


def test_seeds_run_from_the_recipe_seed(smoke: Path) -> None:
    planned = plan("scales", smoke, ["run.seed=5"], seeds=3)
    assert len(planned) == 24
    assert [r.seed for r in planned[:6]] == [5, 6, 7, 5, 6, 7]
    assert all(r.recipe.run.seed == r.seed for r in planned)
    assert all(r.run_dir.name == f"seed{r.seed}" for r in planned)
    assert len({r.run_dir for r in planned}) == 24
    assert len({r.recipe.experiment for r in planned}) == 8
    assert all(f"run.seed={r.seed}" in r.overrides for r in planned)
    with pytest.raises(MssarError, match="--seeds"):
        plan("scales", smoke, seeds=0)


def test_strategy_regional_vs_sliding(smoke: Path) -> None:
    planned = plan("strategy", smoke, seeds=2)
    assert [(r.cell.label, r.seed) for r in planned] == [
        ("regional", 0),
        ("regional", 1),
        ("sliding", 0),
        ("sliding", 1),
    ]
    assert [r.recipe.model.strategy for r in planned] == [
        "regional",
        "regional",
        "sliding",
        "sliding",
    ]
    assert {r.recipe.model.recalibration for r in planned} == {"mssar"}
    assert {r.recipe.experiment for r in planned} == {
        "smoke--strategy-regional",
        "smoke--strategy-sliding",
    }


def test_stage_needs_a_densenet(smoke: Path) -> None:
    with pytest.raises(MssarError, match="needs a DenseNet"):
        plan("stage", smoke)  # smoke is a ResNet-20
    planned = plan("stage", smoke, ["model.name=densenet100"])
    assert [r.cell.label for r in planned] == ["single", "multi"]
    assert [r.recipe.model.stage for r in planned] == ["single", "multi"]
    assert {r.recipe.model.recalibration for r in planned} == {"mssar"}
    # a plain base recipe is ablated with MS-SAR; an SE one keeps SE
    plain = plan("stage", smoke, ["model.name=densenet100", "model.recalibration=none"])
    assert {r.recipe.model.recalibration for r in plain} == {"mssar"}
    se = plan("stage", smoke, ["model.name=densenet100", "model.recalibration=se"])
    assert {r.recipe.model.recalibration for r in se} == {"se"}


def test_recalibration_none_se_mssar(smoke: Path) -> None:
    everything = plan("recalibration", smoke)
    assert [r.cell.label for r in everything] == list(RECALIBRATIONS)  # every registered module
    planned = plan(
        "recalibration",
        smoke,
        ["model.scales=[1,2]", "model.strategy=sliding", "model.reduction=6"],
        modules=["mssar", "se"],
    )
    assert [r.cell.label for r in planned] == ["none", "se", "mssar"]
    none, se, mssar = (r.recipe.model for r in planned)
    assert (none.recalibration, none.scales, none.strategy, none.reduction) == (
        "none",
        None,
        None,
        None,
    )
    assert (se.recalibration, se.scales, se.strategy, se.reduction) == (
        "se",
        None,
        None,
        6,
    )  # MS-SAR-only keys unset
    assert (mssar.recalibration, mssar.scales, mssar.strategy, mssar.reduction) == (
        "mssar",
        [1, 2],
        "sliding",
        6,
    )


def test_recalibration_keeps_only_the_options_each_module_takes(smoke: Path) -> None:
    ge = smoke.parent / "ge.yaml"
    text = smoke.read_text().replace("recalibration: mssar", "recalibration: ge")
    ge.write_text(text.replace("data:", "  reduction: 6\n  options: {extent: 4}\ndata:", 1))
    planned = plan("recalibration", ge)  # a dry run: plans and validates every cell
    models = {r.cell.label: r.recipe.model for r in planned}
    assert list(models) == list(RECALIBRATIONS)
    assert models["ge"].options == {"extent": 4}
    assert {k: m.options for k, m in models.items() if k != "ge"} == {
        k: {} for k in RECALIBRATIONS if k != "ge"
    }
    assert [models[k].reduction for k in ("se", "eca", "none")] == [6, None, None]
    assert {r.recipe.model.options.get("extent") for r in plan("scales", ge)} == {None}


def test_grid_axes(smoke: Path) -> None:
    planned = plan("grid", smoke, grid=["optim.lr=0.1,0.05"])
    assert [r.recipe.experiment for r in planned] == ["smoke--grid-lr_0.1", "smoke--grid-lr_0.05"]
    assert [r.recipe.optim.lr for r in planned] == [0.1, 0.05]
    # lists: commas inside brackets do not split
    planned = plan("grid", smoke, grid=["model.scales=[1,2],[4]"])
    assert [r.recipe.model.scales for r in planned] == [[1, 2], [4]]
    assert len({r.recipe.experiment for r in planned}) == 2
    # a kind's cells times every --grid axis, names all distinct
    planned = plan("scales", smoke, grid=["optim.lr=0.1,0.05", "data.batch_size=32,64"], seeds=2)
    assert len(planned) == 8 * 2 * 2 * 2
    assert len({r.recipe.experiment for r in planned}) == 32
    assert len({r.run_dir for r in planned}) == 64
    assert "smoke--scales-1_2_4-lr_0.05-batch_size_32" in {r.recipe.experiment for r in planned}


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ([], "needs at least one --grid"),
        (["optim.lr"], "expected KEY=V1,V2"),
        (["optim.lr="], "at least one value"),
        (["optim.nope=1,2"], "nope"),
        (["nosection.lr=1,2"], "nosection"),
        (["optim.epochs=2,0"], "optim.epochs"),  # a bad cell fails before anything runs
    ],
)
def test_grid_errors(smoke: Path, grid: list[str], message: str) -> None:
    with pytest.raises(MssarError, match=re.escape(message)):
        plan("grid", smoke, grid=grid)


def test_unknown_kind_and_bad_recipe(smoke: Path) -> None:
    with pytest.raises(MssarError, match="ablation kind must be one of"):
        plan("depth", smoke)
    with pytest.raises(MssarError, match="no such recipe"):
        plan("scales", smoke.parent / "missing.yaml")
    with pytest.raises(MssarError, match="--jobs"):
        local.execute(plan("scales", smoke), str(smoke), 0, lambda outcome: None)


def test_status_and_train_command(smoke: Path) -> None:
    first, second, *_ = plan("scales", smoke, ["data.subset=64"])
    first.run_dir.mkdir(parents=True)
    (first.run_dir / runs.SUMMARY).write_text(
        json.dumps({"status": "finished", "final": {"test_err": 50.0}})
    )
    second.run_dir.mkdir(parents=True)
    (second.run_dir / runs.CHECKPOINT).write_bytes(b"")
    assert (first.status, second.status) == ("finished", "interrupted")
    command = train_command(str(smoke), second.overrides, threads=1)
    assert command[:6] == [sys.executable, "-m", "mssar_cli", "train", str(smoke), "--resume"]
    sets = [command[i + 1] for i, part in enumerate(command) if part == "--set"]
    assert sets == [*second.overrides, "run.threads=1"] and sets[0] == "data.subset=64"
    assert "experiment=smoke--scales-1" in sets and "run.seed=0" in sets


# --- the CLI --------------------------------------------------------------------------------------


def test_cli_dry_run_lists_and_creates_nothing(smoke: Path) -> None:
    from mssar_cli.cli import app

    result = CliRunner().invoke(
        app, ["ablate", "scales", "smoke.yaml", "--dry-run", "--seeds", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "16 runs: 0 finished (skipped), 0 interrupted (resumed), 16 to start" in result.output
    listed = [line.split() for line in result.output.splitlines() if line.startswith("  ")]
    assert len(listed) == 16 and {state for state, _ in listed} == {"missing"}
    assert {Path(path).parent.name for _, path in listed} == {
        f"smoke--scales-{label}" for label in SCALE_LABELS
    }
    assert sorted(p.name for p in smoke.parent.iterdir()) == ["smoke.yaml"]

    result = CliRunner().invoke(app, ["ablate", "scales", "smoke.yaml", "--dry-run"])
    assert result.exit_code == 0 and "8 runs: 0 finished" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ablate", "depth", "smoke.yaml", "--dry-run"], "ablation kind must be one of"),
        (["ablate", "stage", "smoke.yaml", "--dry-run"], "needs a DenseNet"),
        (["ablate", "grid", "smoke.yaml", "--grid", "optim.nope=1,2", "--dry-run"], "nope"),
        (["ablate", "scales", "smoke.yaml", "--seeds", "0"], "--seeds"),
        (["ablate", "scales", "smoke.yaml", "--jobs", "0"], "--jobs"),
    ],
)
def test_cli_errors_are_one_line_exit_2(smoke: Path, args: list[str], message: str) -> None:
    from mssar_cli.cli import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mssar: error: ") and message in lines[0], (
        result.output
    )
    assert "Traceback" not in result.output
    assert not (smoke.parent / "results").exists()


# --- the report of an ablation (recipes exactly as the planner makes them) ------------------------


def _fake_finished_run(run: ablation.PlannedRun, final_err: float, epochs: int = 3) -> None:
    """What `mssar train` leaves: the resolved recipe, epochs.csv, a finished summary.json."""
    run.run_dir.mkdir(parents=True)
    (run.run_dir / runs.RECIPE).write_text(dump(run.recipe))
    rows = [
        {
            "epoch": e,
            "lr": 0.1,
            "train_loss": 1.0 / e,
            "train_err": final_err + 10 / e - 3,
            "test_loss": 1.2 / e,
            "test_err": final_err + 10 * (epochs - e) / epochs,
        }
        for e in range(1, epochs + 1)
    ]
    pd.DataFrame(rows).to_csv(run.run_dir / runs.CSV, index=False)
    final = {k: v for k, v in rows[-1].items() if k != "lr"}
    summary = {
        "status": "finished",
        "experiment": run.recipe.experiment,
        "seed": run.seed,
        "epochs": epochs,
        "final": final,
        "params": 272_474 if run.cell.label == "none" else 279_000,
        "flops": 40_810_000 if run.cell.label == "none" else 40_900_000,
    }
    (run.run_dir / runs.SUMMARY).write_text(json.dumps(summary))


def test_recalibration_ablation_reports_plain_se_mssar_rows_and_three_curves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Fashion-MNIST ablation of the README (experiment resnet20_cpu_short--recalibration-*,
    seeds 0-2): one row each for plain, SE and MS-SAR, n = 3, and SE drawn as a third curve."""
    from mssar_cli.report import build_report, figures, render

    monkeypatch.chdir(tmp_path)
    planned = plan(
        "recalibration",
        FMNIST_SHORT,
        ["experiment=resnet20_cpu_short"],
        seeds=3,
        modules=["se", "mssar"],
    )
    assert sorted({r.recipe.experiment for r in planned}) == [
        f"resnet20_cpu_short--recalibration-{c}" for c in ("mssar", "none", "se")
    ]
    errs = {"none": 9.0, "se": 8.5, "mssar": 8.0}
    for run in planned:
        _fake_finished_run(run, errs[run.cell.label] + 0.1 * run.seed)
    assert all(r.status == "finished" for r in planned)
    tables = build_report(tmp_path / "results")
    assert [t.title for t in tables] == [
        "Fashion-MNIST: test error by configuration",
        "Fashion-MNIST: modules at equal protocol (8 ep, 6000 imgs, 2000 test imgs)",
    ]
    frame = tables[0].frame
    assert frame["recalibration"].tolist() == ["plain", "SE", "MS-SAR"]
    assert frame["test error"].tolist() == [
        "9.10 ± 0.10 (n=3)",
        "8.60 ± 0.10 (n=3)",
        "8.10 ± 0.10 (n=3)",
    ]
    assert frame["Δ vs plain"].tolist() == ["(baseline)", "-0.50 (-5.5%)", "-1.00 (-11.0%)"]
    assert set(frame["protocol"]) == {"8 ep, 6000 imgs, 2000 test imgs"}
    # markdown: every header and row has one cell per column; latex: Δ and % escaped
    header, rule, *body = render(tables, "markdown").split("\n\n")[1].splitlines()
    pipes = [len(re.findall(r"(?<!\\)\|", line)) for line in (header, rule, body[0])]
    assert pipes == [len(frame.columns) + 1] * 3
    latex = render(tables, "latex")
    assert r"95\% CI of $\Delta$ (Welch) & p (Welch)" in latex

    drawn = []
    original = figures._curves_figure

    def spy(all_runs, group, path):
        drawn.append(sorted(group["recalibration"]))
        return original(all_runs, group, path)

    monkeypatch.setattr(figures, "_curves_figure", spy)
    paths = figures.write_figures(tmp_path / "results", tmp_path / "figs")
    assert drawn == [["mssar", "none", "se"]]
    assert sorted(p.name for p in paths) == [
        "curves_fashion_mnist_resnet20_8_ep_6000_imgs_2000_test_imgs.png",
        "error_vs_flops_fashion_mnist_8_ep_6000_imgs_2000_test_imgs.png",
    ]


# --- end to end: kill an ablation midway, run it again --------------------------------------------

TINY = ["--set", "data.subset=32", "--set", "data.test_subset=32", "--set", "data.batch_size=32"]


def _finished(results: Path) -> dict[Path, tuple[int, bytes]]:
    """Every finished run directory under ``results``: summary.json's mtime and bytes."""
    out = {}
    for summary in results.glob("*/*/seed*/summary.json"):
        if runs.is_finished(summary.parent):
            out[summary.parent] = (summary.stat().st_mtime_ns, summary.read_bytes())
    return out


def _start_and_kill(
    args: list[str], cwd: Path, at_least: int, fewer_than: int, deadline_s: float = 300
) -> dict:
    """Start `python -m mssar_cli ARGS` in its own process group; once ``at_least`` runs have
    finished (and fewer than ``fewer_than``), SIGKILL the whole group (the ablation and its
    `mssar train` children). Returns the finished runs as they were after the kill."""
    with open(cwd / "killed-ablate.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "mssar_cli", *args],
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            end = time.monotonic() + deadline_s
            while len(_finished(cwd / "results")) < at_least:
                log = (cwd / "killed-ablate.log").read_text()
                assert process.poll() is None, f"the ablation ended before the kill:\n{log}"
                assert time.monotonic() < end, "no run finished in time"
                time.sleep(0.2)
        finally:
            with contextlib.suppress(ProcessLookupError):  # the group may be gone already
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    time.sleep(0.5)  # let the killed children go
    finished = _finished(cwd / "results")
    assert at_least <= len(finished) < fewer_than, f"{len(finished)} finished at the kill"
    return finished


def _rerun(args: list[str]) -> str:
    """The same ablation again, in this process (its `mssar train` runs are still subprocesses)."""
    from mssar_cli.cli import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.stdout


def _check_resumed(output: str, total: int, before: dict, dataset_dir: Path) -> None:
    """The re-run skipped the runs finished before the kill and finished all the others."""
    skipped = len(before)
    assert re.search(
        rf"^{total} runs: {skipped} finished \(skipped\), "
        r"\d+ interrupted \(resumed\), \d+ to start$",
        output,
        re.MULTILINE,
    ), output
    done_lines = re.findall(r"^\s*done (\S+) seed (\d+) in \d+ s$", output, re.MULTILINE)
    assert len(done_lines) == total - skipped, output
    ran = {dataset_dir / exp / f"seed{seed}" for exp, seed in done_lines}
    assert len(ran) == total - skipped and not ran & set(before), (
        "a run finished before the kill ran again"
    )
    after = _finished(dataset_dir.parent)
    assert len(after) == total
    for run_dir, (mtime, data) in before.items():
        assert after[run_dir] == (mtime, data), f"{run_dir}: summary.json was rewritten"
    assert "FAILED" not in output


@pytest.mark.slow
def test_ablate_scales_killed_midway_resumes_then_reports_table3(smoke: Path) -> None:
    """The issue's test: `mssar ablate scales` with 2 seeds and 2 jobs (16 runs) on CIFAR-10 files,
    killed once 2+ runs finished; the re-run skips those, finishes the rest, and `mssar report`
    shows Table 3 with every RN-56 cell at n = 2. About 2-3 minutes on a busy 2-core CPU."""
    from mssar_cli.cli import app
    from mssar_cli.report import build_report

    cwd = smoke.parent
    write_cifar10(cwd / "data", per_batch=16, test=32)
    args = [
        "ablate",
        "scales",
        "smoke.yaml",
        "--seeds",
        "2",
        "--jobs",
        "2",
        "--set",
        "data.dataset=cifar10",
        "--set",
        "model.name=resnet56",
        *TINY,
    ]
    before = _start_and_kill(args, cwd, at_least=2, fewer_than=16)
    output = _rerun(args)
    _check_resumed(output, 16, before, cwd / "results" / "cifar10")
    # every run has both epochs in its CSV, including those interrupted and resumed
    for run_dir in _finished(cwd / "results"):
        assert len(pd.read_csv(run_dir / runs.CSV)) == 2
    # the ablation's own summary: every cell 2/2
    assert output.count("2/2") == 8, output

    result = CliRunner().invoke(app, ["report", "results", "--format", "markdown"])
    assert result.exit_code == 0, result.output
    assert "### Table 3: scale ablation, ResNet-56 and DenseNet-100 on CIFAR" in result.output
    assert "Unfinished runs" not in result.output
    tables = build_report(cwd / "results")
    t3 = next(t for t in tables if t.title.startswith("Table 3")).frame
    rn = t3[t3["network"] == "RN-56"]
    assert rn["scales"].tolist() == TABLE3_SCALES
    assert set(rn["protocol"]) == {"2 ep, 32 imgs, 32 test imgs"}
    assert all(cell.endswith("(n=2)") and "±" in cell for cell in rn["C10 ours"]), rn[
        "C10 ours"
    ].tolist()
    assert rn["C10 paper"].tolist()[0] == "6.97 ± 0.05 (n=3)"
    assert set(rn["C100 ours"]) == {"—"} and "—" not in set(rn["C100 paper"])
    assert set(t3.loc[t3["network"] == "DN-100", "C10 ours"]) == {"—"}
    t2 = next(t for t in tables if t.title.startswith("Table 2")).frame
    assert t2.loc[t2["network"] == "RN-56", "C10 ours"].iloc[0].endswith("(n=2)")
    assert t2.loc[t2["network"] == "RN-56*", "C10 ours"].iloc[0].endswith("(n=2)")


def test_ablate_grid_killed_after_first_run_resumes(smoke: Path) -> None:
    """The fast variant: 2 cells x 1 seed, one job, killed once the first run finished."""
    from mssar_cli.cli import app

    cwd = smoke.parent
    args = [
        "ablate",
        "grid",
        "smoke.yaml",
        "--grid",
        "model.scales=[1],[2]",
        "--jobs",
        "1",
        "--set",
        "optim.epochs=1",
        "--set",
        "optim.milestones=[]",
        *TINY,
    ]
    before = _start_and_kill(args, cwd, at_least=1, fewer_than=2)
    assert [p.parent.name for p in before] == ["smoke--grid-scales_1"]
    output = _rerun(args)
    _check_resumed(output, 2, before, cwd / "results" / "synthetic")
    assert "  done smoke--grid-scales_2 seed 0" in output

    again = _rerun(args)  # nothing left to do
    assert (
        "2 runs: 2 finished (skipped), 0 interrupted (resumed), 0 to start" in again
        and " done " not in again
    )

    result = CliRunner().invoke(app, ["report", "results", "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("# synthetic: test error by configuration")
    assert result.output.count("(n=1)") >= 2
