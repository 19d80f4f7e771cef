"""mssar report: run directories → tables and figures (fake run directories in the exact format
that `mssar train` writes: recipe.yaml, epochs.csv, summary.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import typer
import yaml
from scipy import stats
from typer.testing import CliRunner

from mssar_cli import paper, recalibration, recipe
from mssar_cli.errors import MssarError
from mssar_cli.report import NONE, build_report, collect_runs, read_csv_blocks, render
from mssar_cli.report.significance import welch
from mssar_cli.report.stats import Stat

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(
    root: Path,
    dataset: str,
    experiment: str,
    seed: int,
    *,
    model: str = "resnet20",
    recalibration: str = "none",
    scales: list[int] | None = None,
    strategy: str | None = None,
    reduction: float | None = None,
    stage: str | None = None,
    epochs: int = 4,
    done: int | None = None,
    final_err: float = 10.0,
    subset: int | None = None,
    batch_size: int = 128,
    milestones: list[int] | None = None,
    params: int = 272_474,
    flops: int | None = 40_810_000,
    top5: bool | None = None,
) -> Path:
    """A run directory as `mssar train` leaves it; ``done < epochs`` leaves it unfinished."""
    done = epochs if done is None else done
    top5 = dataset in ("cifar100", "imagenet") if top5 is None else top5
    run_dir = root / dataset.replace("-", "_") / experiment / f"seed{seed}"
    run_dir.mkdir(parents=True)
    recipe = {
        "experiment": experiment,
        "model": {
            "name": model,
            "recalibration": recalibration,
            "scales": scales,
            "strategy": strategy,
            "reduction": reduction,
            "stage": stage,
        },
        "data": {
            "dataset": dataset,
            "root": "data",
            "batch_size": batch_size,
            "eval_batch_size": 512,
            "augment": True,
            "subset": subset,
            "test_subset": None,
            "workers": 4,
            "download": False,
        },
        "optim": {
            "lr": 0.1,
            "momentum": 0.9,
            "nesterov": True,
            "weight_decay": 1e-4,
            "epochs": epochs,
            "milestones": milestones if milestones is not None else [max(1, epochs // 2)],
            "gamma": 0.1,
        },
        "run": {
            "seed": seed,
            "device": "cpu",
            "precision": "auto",
            "channels_last": False,
            "compile": False,
            "output": str(root),
            "checkpoint_every": 1,
            "threads": None,
        },
    }
    (run_dir / "recipe.yaml").write_text(
        yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None)
    )
    rows = []
    for epoch in range(1, done + 1):
        t = epoch / epochs
        test_err = final_err + (80 - final_err) * (1 - t) ** 2
        row = {
            "epoch": epoch,
            "lr": 0.1,
            "train_loss": 2.3 * (1 - t) + 0.1,
            "train_err": max(0.0, test_err - 3),
            "test_loss": 2.3 * (1 - t) + 0.3,
            "test_err": test_err,
        }
        if top5:
            row["test_top5_err"] = test_err / 3
        rows.append(row | {"epoch_seconds": 1.0, "images_per_s": 1000.0})
    if rows:
        pd.DataFrame(rows).to_csv(run_dir / "epochs.csv", index=False)
    if done == epochs:
        final = {
            k: v for k, v in rows[-1].items() if k not in ("lr", "epoch_seconds", "images_per_s")
        }
        summary = {
            "status": "finished",
            "experiment": experiment,
            "dataset": dataset,
            "model": model,
            "recalibration": recalibration,
            "seed": seed,
            "epochs": epochs,
            "final": final,
            "best_epoch_not_reported": {"epoch": 1, "test_err": 0.0},
            "params": params,
        }
        if flops is not None:
            summary["flops"] = flops
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def table(tables, start: str):
    matches = [t for t in tables if t.title.startswith(start)]
    assert matches, f"no table {start!r} in {[t.title for t in tables]}"
    return matches[0]


def row_of(frame: pd.DataFrame, **where) -> pd.Series:
    mask = pd.Series(True, index=frame.index)
    for key, value in where.items():
        mask &= frame[key] == value
    assert mask.sum() == 1, f"{where}: {mask.sum()} rows in\n{frame}"
    return frame[mask].iloc[0]


@pytest.fixture
def cifar(tmp_path: Path) -> Path:
    """RN-20 plain (3 seeds) and MS-SAR (3 finished + 1 unfinished) on CIFAR-10; RN-20 plain on
    CIFAR-100 with one seed; RN-20 plain on CIFAR-10 under a shorter protocol."""
    for seed, err in enumerate((8.0, 8.5, 9.0)):
        write_run(tmp_path, "cifar10", "resnet20_plain", seed, final_err=err)
    for seed, err in enumerate((7.0, 7.2, 7.7)):
        write_run(
            tmp_path,
            "cifar10",
            "resnet20_mssar",
            seed,
            recalibration="mssar",
            scales=[1, 2, 4],
            strategy="regional",
            final_err=err,
            params=279_000,
            flops=40_900_000,
        )
    # unfinished, and its module options null (= the defaults)
    write_run(
        tmp_path, "cifar10", "resnet20_mssar", 3, recalibration="mssar", done=2, final_err=1.0
    )
    write_run(tmp_path, "cifar100", "resnet20_plain", 0, final_err=33.0)
    write_run(tmp_path, "cifar10", "resnet20_plain_short", 0, epochs=2, subset=600, final_err=40.0)
    return tmp_path


def test_collect_runs_one_row_per_run_directory(cifar: Path) -> None:
    (cifar / "cifar10" / "logs").mkdir()
    (cifar / "cifar10" / "logs" / "x-seed0.log").write_text("log")
    runs = collect_runs(cifar)
    assert len(runs) == 9
    mssar = runs[runs["experiment"] == "resnet20_mssar"]
    assert set(mssar["scales"]) == {"{1,2,4}"} and set(mssar["strategy"]) == {"regional"}
    assert set(mssar["reduction"]) == {"3"}  # the CIFAR ResNet default, made explicit
    assert sorted(mssar["status"]) == ["finished"] * 3 + ["unfinished"]
    unfinished = mssar[mssar["status"] == "unfinished"].iloc[0]
    assert (unfinished["epochs_done"], unfinished["epochs_planned"]) == (2, 4)
    plain = runs[(runs["experiment"] == "resnet20_plain") & (runs["dataset"] == "cifar10")]
    assert set(plain["scales"]) == {NONE} and set(plain["protocol"]) == {"4 ep"}
    assert plain["test_err"].tolist() == pytest.approx([8.0, 8.5, 9.0])
    assert set(runs.loc[runs["experiment"] == "resnet20_plain_short", "protocol"]) == {
        "2 ep, 600 imgs"
    }


def test_table2_means_stds_paper_and_unfinished(cifar: Path) -> None:
    tables = build_report(cifar)
    t2 = table(tables, "Table 2").frame
    plain = row_of(t2, network="RN-20", protocol="4 ep")
    assert plain["C10 ours"] == "8.50 ± 0.50 (n=3)"
    assert plain["C10 paper"] == "8.61" and plain["C10 Δ"] == "-0.11"
    assert plain["C100 ours"] == "33.00 (n=1)"  # one seed: no std
    assert plain["C100 Δ"] == f"{33.0 - 31.87:+.2f}"
    star = row_of(t2, network="RN-20*", protocol="4 ep")
    mean = (7.0 + 7.2 + 7.7) / 3  # the unfinished seed (at 1.0 %) is not averaged in
    std = pd.Series([7.0, 7.2, 7.7]).std()
    assert star["C10 ours"] == f"{mean:.2f} ± {std:.2f} (n=3; +1 unfinished)"
    # missing cell, paper still shown
    assert star["C100 ours"] == NONE and star["C100 paper"] == "31.09"
    assert (
        star["C10 drop ours / paper"]
        == f"{100 * (8.5 - mean) / 8.5:.1f}% / {100 * (8.61 - 7.61) / 8.61:.1f}%"
    )
    assert star["params"] == "0.279M" and star["FLOPs"] == "40.90M"
    # networks nobody ran: one row each, ours "—", the paper's value beside
    dn = row_of(t2, network="DN-190*")
    assert dn["C10 ours"] == NONE and dn["C10 paper"] == "3.32" and dn["C10 Δ"] == NONE
    unfinished = table(tables, "Unfinished runs").frame
    assert unfinished["run"].tolist() == ["cifar10/resnet20_mssar/seed3"]
    assert unfinished["epochs done"].tolist() == ["2/4"]


def test_protocols_are_never_pooled(cifar: Path) -> None:
    t2 = table(build_report(cifar), "Table 2").frame
    short = row_of(t2, network="RN-20", protocol="2 ep, 600 imgs")
    assert short["C10 ours"] == "40.00 (n=1)"
    assert row_of(t2, network="RN-20*", protocol="2 ep, 600 imgs")["C10 ours"] == NONE
    assert row_of(t2, network="RN-20", protocol="4 ep")["C10 ours"].endswith("(n=3)")


def test_same_epochs_different_batch_are_separate_and_labelled(tmp_path: Path) -> None:
    write_run(tmp_path, "synthetic", "a", 0, final_err=5.0)
    write_run(tmp_path, "synthetic", "b", 0, final_err=50.0, batch_size=64)
    runs = collect_runs(tmp_path)
    assert sorted(runs["protocol"]) == ["4 ep, batch 128", "4 ep, batch 64"]
    frame = table(build_report(tmp_path), "synthetic").frame
    assert sorted(frame["test error"]) == ["5.00 (n=1)", "50.00 (n=1)"]


def test_paper_protocol_is_marked(tmp_path: Path) -> None:
    write_run(
        tmp_path, "cifar10", "resnet20_plain", 0, epochs=160, milestones=[80, 120], final_err=8.3
    )
    t2 = table(build_report(tmp_path), "Table 2").frame
    assert row_of(t2, network="RN-20")["protocol"] == "160 ep (paper)"


def test_other_dataset_table_delta_and_spread(tmp_path: Path) -> None:
    for seed, (a, b, c) in enumerate(((10.0, 9.0, 7.0), (10.2, 9.4, 7.2), (9.8, 9.2, 7.1))):
        write_run(tmp_path, "fashion-mnist", "resnet20_plain", seed, final_err=a)
        write_run(
            tmp_path,
            "fashion-mnist",
            "resnet20_se",
            seed,
            recalibration="se",
            reduction=3,
            final_err=b,
        )
        write_run(
            tmp_path, "fashion-mnist", "resnet20_mssar", seed, recalibration="mssar", final_err=c
        )
    write_run(
        tmp_path,
        "fashion-mnist",
        "resnet56_mssar",
        0,
        model="resnet56",
        recalibration="mssar",
        final_err=6.0,
    )
    tables = build_report(tmp_path)
    assert [t.title for t in tables] == [
        "Fashion-MNIST: test error by configuration",
        "Fashion-MNIST: modules at equal protocol (4 ep)",
    ]
    frame = tables[0].frame
    assert list(frame.columns[-3:]) == ["Δ vs plain", "95% CI of Δ (Welch)", "p (Welch)"]
    plain = row_of(frame, network="RN-20", recalibration="plain")
    assert plain["test error"] == "10.00 ± 0.20 (n=3)" and plain["Δ vs plain"] == "(baseline)"
    assert plain["95% CI of Δ (Welch)"] == plain["p (Welch)"] == ""
    mssar = row_of(frame, network="RN-20", recalibration="MS-SAR")
    assert mssar["scales"] == "{1,2,4}" and mssar["strategy"] == "regional"
    assert mssar["Δ vs plain"] == "-2.90 (-29.0%)"
    # scipy's Welch test on the seeds themselves gives the cells
    plain_errs = [10.0, 10.2, 9.8]
    for name, errs, p_text in (
        ("MS-SAR", [7.0, 7.2, 7.1], "< 0.001"),  # p = 0.00022: three decimals say 0.000
        ("SE", [9.0, 9.4, 9.2], "0.008"),
    ):
        result = stats.ttest_ind(errs, plain_errs, equal_var=False)
        low, high = result.confidence_interval(0.95)
        row = row_of(frame, network="RN-20", recalibration=name)
        assert row["95% CI of Δ (Welch)"] == f"[{low:+.2f}, {high:+.2f}]"
        assert row["p (Welch)"] == f"{p_text} (df {result.df:.1f}; n=3 vs 3)"
    assert row_of(frame, network="RN-20", recalibration="SE")["Δ vs plain"] == "-0.80 (-8.0%)"
    lone = row_of(frame, network="RN-56")
    assert lone["Δ vs plain"] == "— (no plain run)" and lone["test error"] == "6.00 (n=1)"
    assert lone["95% CI of Δ (Welch)"] == lone["p (Welch)"] == NONE
    # LaTeX: "<" would print as "¡" in text mode
    assert r"\textless{} 0.001" in render(tables, "latex")


def test_table3_from_an_ablation_layout(tmp_path: Path) -> None:
    cells = {"none": None, "1": [1], "1_2": [1, 2], "1_2_4": [1, 2, 4]}
    errs = {"none": 7.0, "1": 6.8, "1_2": 6.4, "1_2_4": 6.0}
    for label, scales in cells.items():
        for seed in range(2):
            recal = "none" if scales is None else "mssar"
            write_run(
                tmp_path,
                "cifar10",
                f"resnet56_mssar--scales-{label}",
                seed,
                model="resnet56",
                recalibration=recal,
                scales=scales,
                strategy=None if scales is None else "regional",
                final_err=errs[label] + 0.2 * seed,
            )
    (tmp_path / "cifar10" / "logs").mkdir()
    tables = build_report(tmp_path)
    t3 = table(tables, "Table 3")
    rn = t3.frame[t3.frame["network"] == "RN-56"]
    assert rn["scales"].tolist() == [
        "none",
        "{1}",
        "{2}",
        "{4}",
        "{1,2}",
        "{1,4}",
        "{2,4}",
        "{1,2,4}",
    ]
    assert row_of(rn, scales="{1,2}")["C10 ours"] == "6.50 ± 0.14 (n=2)"
    assert row_of(rn, scales="{1,2}")["C10 paper"] == "6.38 ± 0.07 (n=3)"
    assert row_of(rn, scales="{2}")["C10 ours"] == NONE
    assert row_of(t3.frame, network="DN-100", scales="{1,2,4}")["C10 paper"] == "4.06 (n=1)"
    assert (
        "29.07" in t3.caption
        and "29.41" in t3.caption
        and "4.16" in t3.caption
        and "4.06" in t3.caption
    )
    # the baseline of the ablation is Table 2's plain RN-56 as well
    assert (
        row_of(table(tables, "Table 2").frame, network="RN-56")["C10 ours"] == "7.10 ± 0.14 (n=2)"
    )
    assert not [t for t in tables if "other configurations" in t.title]
    # the scale ablation is Table 3's; the modules table holds each module at its defaults
    modules = table(tables, "CIFAR-10: modules at equal protocol").frame
    assert modules["module"].tolist() == ["plain", "MS-SAR"]
    assert modules["settings"].tolist() == [NONE, "L={1,2,4}, regional, r=3"]


def test_table5_strategy_and_stage(tmp_path: Path) -> None:
    for recal, err in (("none", 30.0), ("se", 29.5), ("mssar", 29.0)):
        write_run(
            tmp_path,
            "imagenet",
            f"resnet18_{recal}",
            0,
            model="resnet18",
            recalibration=recal,
            final_err=err,
        )
    for strategy, err in (("regional", 30.0), ("sliding", 30.3)):
        write_run(
            tmp_path,
            "cifar100",
            f"resnet20_{strategy}",
            0,
            recalibration="mssar",
            strategy=strategy,
            final_err=err,
        )
    for stage, err in (("single", 22.0), ("multi", 21.5)):
        write_run(
            tmp_path,
            "cifar100",
            f"dn_{stage}",
            0,
            model="densenet100",
            recalibration="mssar",
            stage=stage,
            final_err=err,
        )
    tables = build_report(tmp_path)
    titles = [t.title for t in tables]
    assert titles.index("Ablation: regional vs sliding") > titles.index(
        table(tables, "Table 5").title
    )
    t5 = table(tables, "Table 5").frame
    se = row_of(t5, network="ResNet-18+SE")
    assert (
        se["top-1 ours"] == "29.50 (n=1)"
        and se["top-1 paper"] == "29.78"
        and se["top-5 ours"] == f"{29.5 / 3:.2f} (n=1)"
    )
    assert row_of(t5, network="ResNeXt-50")["top-1 ours"] == NONE
    strategy = table(tables, "Ablation: regional vs sliding").frame.iloc[0]
    assert strategy["sliding − regional"] == "+0.30" and strategy["paper"].startswith("+0.2")
    stage = table(tables, "Ablation: DenseNet single").frame.iloc[0]
    assert stage["single paper"] == f"{paper.STAGE_ABLATION['single']['cifar100']:.2f}"
    assert stage["single − multi ours"] == "+0.50"


def test_every_format(cifar: Path) -> None:
    tables = build_report(cifar)
    blocks = read_csv_blocks(render(tables, "csv"))
    assert len(blocks) == len(tables)
    for block, t in zip(blocks, tables):
        assert list(block.columns) == list(t.frame.columns) and len(block) == len(t.frame)
    markdown = render(tables, "markdown")
    for t in tables:
        assert f"### {t.title}" in markdown
    assert "| network |" in markdown and "RN-20\\*" in markdown
    latex = render(tables, "latex")
    assert latex.count(r"\begin{tabular}") == len(tables)
    assert r"\{1,2,4\}" in latex and r"$\Delta$" in latex and "\x01" not in latex
    with pytest.raises(MssarError):
        render(tables, "html")


def test_errors_for_missing_and_empty(tmp_path: Path) -> None:
    with pytest.raises(MssarError, match="no such directory"):
        build_report(tmp_path / "nope")
    with pytest.raises(MssarError, match="no run directories found"):
        build_report(tmp_path)


@pytest.fixture
def realistic(tmp_path: Path) -> Path:
    rng = [0.0, 0.3, -0.2]
    for model, flops, base in (("resnet20", 40_810_000, 9.0), ("resnet32", 69_100_000, 8.0)):
        for recal, gain, extra in (("none", 0.0, 0), ("se", 0.6, 5_000), ("mssar", 1.0, 80_000)):
            for seed in range(3):
                write_run(
                    tmp_path,
                    "cifar10",
                    f"{model}_{recal}",
                    seed,
                    model=model,
                    recalibration=recal,
                    epochs=12,
                    final_err=base - gain + rng[seed],
                    flops=flops + extra,
                )
    return tmp_path


def test_figures_written(realistic: Path, tmp_path: Path) -> None:
    """The figures read the runs frame the tables are built from (one reading of the runs)."""
    from mssar_cli.report import write_figures

    runs = collect_runs(realistic)
    assert render(build_report(runs), "csv") == render(build_report(realistic), "csv")
    paths = write_figures(runs, tmp_path / "figs")
    names = sorted(p.name for p in paths)
    assert names == [
        "curves_cifar10_resnet20_12_ep.png",
        "curves_cifar10_resnet32_12_ep.png",
        "error_vs_extra_flops_cifar10_resnet20_12_ep.png",
        "error_vs_extra_flops_cifar10_resnet32_12_ep.png",
        "error_vs_flops_cifar10_12_ep.png",
    ]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 20_000


def test_cli_report(cifar: Path, tmp_path: Path) -> None:
    from mssar_cli.cli import user_errors
    from mssar_cli.report.command import report

    app = typer.Typer()
    app.command(name="report")(user_errors(report))
    app.command(name="noop")(lambda: None)  # two commands: `report` stays a subcommand
    runner = CliRunner()
    result = runner.invoke(app, ["report", str(cifar)])
    assert result.exit_code == 0, result.output
    assert "Table 2" in result.output and "8.61" in result.output
    out = tmp_path / "out" / "report.md"
    result = runner.invoke(
        app, ["report", str(cifar), "--output", str(out), "--figures", str(tmp_path / "figs")]
    )
    assert result.exit_code == 0, result.output
    assert out.read_text().startswith("### Table 2") and str(out) in result.output
    result = runner.invoke(app, ["report", str(cifar), "--format", "csv"])
    assert result.exit_code == 0 and len(read_csv_blocks(result.stdout)) >= 3
    result = runner.invoke(app, ["report", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "no such directory" in result.output
    result = runner.invoke(app, ["report", str(cifar), "--format", "html"])
    assert result.exit_code == 2 and "--format" in result.output


def test_unreadable_runs_are_listed_as_skipped(tmp_path: Path) -> None:
    """A recipe the schema refuses, or a run file that cannot be parsed, puts its folder in the
    "Skipped directories" table with one line saying why; the other runs are reported."""
    write_run(tmp_path, "synthetic", "good", 0, final_err=5.0)
    bad_key = write_run(tmp_path, "synthetic", "bad_key", 0)
    raw = yaml.safe_load((bad_key / "recipe.yaml").read_text())
    raw["model"]["colour"] = "red"
    (bad_key / "recipe.yaml").write_text(yaml.safe_dump(raw))
    bad_model = write_run(tmp_path, "synthetic", "bad_model", 0)
    text = (bad_model / "recipe.yaml").read_text()
    (bad_model / "recipe.yaml").write_text(text.replace("name: resnet20", "name: resnet21"))
    bad_yaml = write_run(tmp_path, "synthetic", "bad_yaml", 0)
    (bad_yaml / "recipe.yaml").write_text("model: [unclosed\n")
    bad_summary = write_run(tmp_path, "synthetic", "bad_summary", 0)
    (bad_summary / "summary.json").write_text("{not json")
    runs = collect_runs(tmp_path)
    assert runs["experiment"].tolist() == ["good"]
    skipped = runs.attrs["skipped"]
    assert len(skipped) == 4 and all("\n" not in line for line in skipped)
    by_folder = {
        folder.parent.name: line
        for folder in (bad_key, bad_model, bad_yaml, bad_summary)
        for line in skipped
        if line.startswith(str(folder))
    }
    assert (
        by_folder["bad_key"].startswith(str(bad_key / "recipe.yaml"))
        and "model.colour" in by_folder["bad_key"]
    )
    assert "unknown network 'resnet21'" in by_folder["bad_model"]
    assert "YAML" in by_folder["bad_yaml"]
    assert "JSONDecodeError" in by_folder["bad_summary"]
    tables = build_report(tmp_path)
    assert [t.title for t in tables] == [
        "synthetic: test error by configuration",
        "Skipped directories",
    ]
    assert tables[-1].frame["directory: problem"].tolist() == skipped
    with pytest.raises(MssarError, match="no run directories found"):
        build_report(tmp_path / "synthetic" / "bad_key")  # nothing readable at all


def test_recipe_defaults_are_explicit(tmp_path: Path) -> None:
    """A recipe is read through the schema: sections and keys it leaves out take their defaults,
    so it is the same configuration and protocol as a recipe that spells them out."""
    write_run(tmp_path, "synthetic", "full", 0, recalibration="se", final_err=5.0)
    short = write_run(tmp_path, "synthetic", "short", 1, recalibration="se", final_err=7.0)
    (short / "recipe.yaml").write_text(
        "experiment: short\nmodel: {name: resnet20, recalibration: se}\n"
        "data: {dataset: synthetic}\noptim: {epochs: 4, milestones: [2], weight_decay: 1e-4}\n"
        "run: {seed: 1}\n"
    )
    runs = collect_runs(tmp_path)
    assert runs["reduction"].tolist() == ["3", "3"] and runs["seed"].tolist() == [0, 1]
    assert set(json.loads(runs["protocol_key"].iloc[1])) == set(recipe.protocol_keys())
    assert runs["protocol_key"].nunique() == 1 and set(runs["protocol"]) == {"4 ep"}
    frame = table(build_report(tmp_path), "synthetic").frame
    assert frame["test error"].tolist() == ["6.00 ± 1.41 (n=2)"]


def test_a_registered_module_is_reported_without_editing_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Labels, option columns, row order, colours and markers come from the registry."""
    from mssar_cli.report import collect, figures

    entry = recalibration.Recalibration(
        "eca", "ECA", "a later paper", {"kernel": 3, "reduction": None}, build=lambda *a, **k: None
    )
    monkeypatch.setitem(recalibration.RECALIBRATIONS, "eca", entry)
    assert collect.module_columns("resnet20", "eca") == {
        "scales": NONE,
        "strategy": NONE,
        "stage": NONE,
        "reduction": "3",
        "options": "kernel=3",
    }
    assert collect.module_columns("densenet100", "eca", {"kernel": 5})["stage"] == "multi"
    assert collect.module_columns("resnet20", "mssar", {"scales": [4, 1]}) == {
        "scales": "{1,4}",
        "strategy": "regional",
        "stage": NONE,
        "reduction": "3",
        "options": "",
    }
    assert [figures.module_color(r) for r in ("none", "se", "mssar", "eca")] == [
        "#4d4d4d",
        "#1f77b4",
        "#d62728",
        "#2ca02c",
    ]
    assert [figures.module_marker(r) for r in ("none", "se", "mssar", "eca")] == [
        "o",
        "s",
        "^",
        "D",
    ]
    for seed, (plain_err, eca_err) in enumerate(((10.0, 9.0), (10.4, 9.2))):
        write_run(tmp_path, "synthetic", "plain", seed, final_err=plain_err)
        write_run(tmp_path, "synthetic", "eca", seed, recalibration="se", final_err=eca_err)
    runs = collect_runs(tmp_path)  # the schema knows no "eca" yet: relabel the SE runs
    eca = runs["experiment"] == "eca"
    runs.loc[eca, ["recalibration", "options"]] = ["eca", "kernel=3"]
    frame = table(build_report(runs), "synthetic").frame
    assert frame["recalibration"].tolist() == ["plain", "ECA"]
    assert frame["options"].tolist() == [NONE, "kernel=3"]
    assert row_of(frame, recalibration="ECA")["Δ vs plain"] == "-1.10 (-10.8%)"
    modules = table(build_report(runs), "synthetic: modules at equal protocol").frame
    assert modules["module"].tolist() == ["plain", "ECA"]
    assert modules["settings"].tolist() == [NONE, "r=3, kernel=3"]
    assert modules["p (Welch)"].iloc[1].endswith("; n=2 vs 2)")


# --- Welch's t-test, the modules table and its figure ------------------------------------------


def test_welch_by_hand(tmp_path: Path) -> None:
    """Δ, t, Welch–Satterthwaite df, p and the 95% CI of two small samples, worked by hand.

    module: 10, 11, 12 -> mean 11, s² = 1, n = 3; s²/n = 1/3
    plain:  12, 14, 16, 18 -> mean 15, s² = (9 + 1 + 1 + 9) / 3 = 20/3, n = 4; s²/n = 5/3
    Δ = 11 − 15 = −4; se = sqrt(1/3 + 5/3) = sqrt(2); t = −4 / sqrt(2) = −2 sqrt(2)
    df = (1/3 + 5/3)² / ((1/3)² / 2 + (5/3)² / 3) = 4 / (1/18 + 25/27) = 4 / (53/54) = 216/53
    p = 2 sf(2 sqrt(2), 216/53); CI = −4 ± t_0.975(216/53) · sqrt(2)
    """
    module, plain = [10.0, 11.0, 12.0], [12.0, 14.0, 16.0, 18.0]
    df = 216 / 53
    t = -2 * 2**0.5
    p = 2 * stats.t.sf(2 * 2**0.5, df)
    half = stats.t.ppf(0.975, df) * 2**0.5
    assert 0.046 < p < 0.047 and 3.89 < half < 3.90  # t_0.975(4.08) ≈ 2.756

    result = welch(Stat(11.0, 1.0, 3), Stat(15.0, (20 / 3) ** 0.5, 4))
    assert result is not None
    assert (result.delta, result.t, result.df) == pytest.approx((-4.0, t, df))
    assert (result.p, result.low, result.high) == pytest.approx((p, -4 - half, -4 + half))
    assert (result.n_a, result.n_b) == (3, 4)
    # scipy on the samples: the same test
    scipy_result = stats.ttest_ind(module, plain, equal_var=False)
    assert (scipy_result.statistic, scipy_result.df, scipy_result.pvalue) == pytest.approx(
        (t, df, p)
    )
    assert tuple(scipy_result.confidence_interval(0.95)) == pytest.approx((-4 - half, -4 + half))

    # and the cells of the report, from run directories with those final errors
    root = tmp_path
    for seed, err in enumerate(plain):
        write_run(root, "synthetic", "plain", seed, final_err=err)
    for seed, err in enumerate(module):
        write_run(root, "synthetic", "se", seed, recalibration="se", final_err=err)
    frame = table(build_report(root), "synthetic: test error").frame
    se = row_of(frame, recalibration="SE")
    assert se["test error"] == "11.00 ± 1.00 (n=3)" and se["Δ vs plain"] == "-4.00 (-26.7%)"
    assert se["95% CI of Δ (Welch)"] == f"[{-4 - half:+.2f}, {-4 + half:+.2f}]" == "[-7.90, -0.10]"
    assert se["p (Welch)"] == f"{p:.3f} (df {df:.1f}; n=3 vs 4)" == "0.046 (df 4.1; n=3 vs 4)"


def test_welch_needs_two_seeds_each_side(tmp_path: Path) -> None:
    """n/a when either side has fewer than two finished seeds (an unfinished one does not
    count), and when neither side varies at all."""
    assert welch(Stat(1.0, float("nan"), 1), Stat(2.0, 0.5, 3)) is None
    assert welch(Stat(1.0, 0.5, 3), Stat(2.0, float("nan"), 1)) is None
    assert welch(Stat(), Stat(2.0, 0.5, 3)) is None
    write_run(tmp_path, "synthetic", "plain", 0, final_err=10.0)  # one plain seed
    write_run(tmp_path, "synthetic", "plain", 1, final_err=9.0, done=2)  # unfinished
    for seed in range(3):
        write_run(tmp_path, "synthetic", "se", seed, recalibration="se", final_err=8 + seed)
    write_run(tmp_path, "synthetic", "mssar", 0, recalibration="mssar", final_err=7.0)
    for seed in range(2):  # another protocol: no spread on either side
        write_run(tmp_path, "synthetic", "plain_b", seed, batch_size=64, final_err=10.0)
        write_run(
            tmp_path, "synthetic", "se_b", seed, batch_size=64, recalibration="se", final_err=9.0
        )
    tables = build_report(tmp_path)
    frame = table(tables, "synthetic: test error").frame
    se = row_of(frame, recalibration="SE", protocol="4 ep, batch 128")
    assert se["Δ vs plain"] == "-1.00 (-10.0%)"
    assert se["95% CI of Δ (Welch)"] == "n/a"
    assert se["p (Welch)"] == "n/a (n=3 vs 1; needs ≥ 2 seeds each)"
    mssar = row_of(frame, recalibration="MS-SAR")
    assert mssar["p (Welch)"] == "n/a (n=1 vs 1; needs ≥ 2 seeds each)"
    flat = row_of(frame, recalibration="SE", protocol="4 ep, batch 64")
    assert flat["Δ vs plain"] == "-1.00 (-10.0%)" and flat["95% CI of Δ (Welch)"] == "n/a"
    assert flat["p (Welch)"] == "n/a (no seed-to-seed spread; n=2 vs 2)"
    modules = table(tables, "synthetic: modules at equal protocol (4 ep, batch 128)").frame
    assert modules["module"].tolist() == ["plain", "SE", "MS-SAR"]
    assert modules["p (Welch)"].tolist()[1:] == [se["p (Welch)"], mssar["p (Welch)"]]
    assert r"$\geq$" in render(tables, "latex")


BENCH_HEADER = (
    "date,machine,torch,device,threads,precision,compile,model,batch,variant,paired_ratio"
)


@pytest.fixture
def modules_root(tmp_path: Path) -> Path:
    """RN-20 plain, SE, MS-SAR (3 seeds each) and an MS-SAR scale ablation; RN-32 plain and SE
    (2 seeds each); RN-56 MS-SAR without a plain run; a CPU step benchmark beside the runs."""
    root = tmp_path / "results"
    costs = {
        "none": (272_474, 40_810_000),
        "se": (283_402, 40_821_000),
        "mssar": (283_800, 40_890_000),
    }
    for recal, errs in (
        ("none", (9.0, 9.4, 9.2)),
        ("se", (8.6, 8.9, 9.1)),
        ("mssar", (8.0, 8.3, 8.1)),
    ):
        for seed, err in enumerate(errs):
            params, flops = costs[recal]
            write_run(
                root,
                "synthetic",
                recal,
                seed,
                recalibration=recal,
                final_err=err,
                params=params,
                flops=flops,
            )
    for seed in range(2):
        write_run(
            root, "synthetic", "mssar_l1", seed, recalibration="mssar", scales=[1], final_err=8.5
        )
        for recal, err in (("none", 8.0), ("se", 7.5)):
            write_run(
                root,
                "synthetic",
                f"rn32_{recal}",
                seed,
                model="resnet32",
                recalibration=recal,
                final_err=err + 0.1 * seed,
                params=466_906,
                flops=69_120_000,
            )
    write_run(root, "synthetic", "rn56", 0, model="resnet56", recalibration="mssar")
    write_run(root, "synthetic", "short", 0, epochs=2, final_err=40.0)  # plain only: no table
    bench = root / "bench"
    bench.mkdir()
    machine = '"AMD EPYC (2 cores), Linux x86_64"'
    rows = [
        # the newest CPU row wins, compared as times: 23:30 UTC is after 01:00+02:00
        f"2026-02-01T01:00:00+02:00,{machine},2.14,cpu,2,fp32,False,resnet20,128,se,1.5000",
        "2026-01-31T23:30:00+00:00,box B,2.14,cpu,1,fp32,False,resnet20,128,se,1.1000",
        "2026-01-31T23:30:00+00:00,box B,2.14,cpu,1,fp32,False,resnet20,128,plain,1.0000",
        "2026-01-01T00:00:00+00:00,box A,2.14,cpu,2,fp32,False,resnet20,128,mssar,1.2500",
        "2026-03-01T00:00:00+00:00,gpu box,2.14,cuda,0,bf16,False,resnet20,128,se,0.9000",
        "2026-03-01T00:00:00+00:00,box B,2.14,cpu,1,fp32,False,resnet20,128,mssar-direct,2.0",
    ]
    (bench / "module_step.csv").write_text("\n".join([BENCH_HEADER, *rows]) + "\n")
    return root


def test_modules_at_equal_protocol(modules_root: Path) -> None:
    """One row per module at its defaults, in registry order, plain first, per network; Welch;
    extra params and FLOPs in % of plain; the newest CPU step-time ratio and where it is from."""
    tables = build_report(modules_root / "synthetic")  # the benchmark is one level up
    titles = [t.title for t in tables]
    assert [t for t in titles if "modules at equal protocol" in t] == [
        "synthetic: modules at equal protocol (4 ep)"
    ]
    result = table(tables, "synthetic: modules at equal protocol")
    frame = result.frame
    assert list(frame.columns) == [
        "network",
        "module",
        "settings",
        "test error",
        "Δ vs plain",
        "95% CI of Δ (Welch)",
        "p (Welch)",
        "extra params (% of plain)",
        "extra FLOPs (% of plain)",
        "CPU step time × plain",
    ]
    assert list(zip(frame["network"], frame["module"])) == [
        ("RN-20", "plain"),
        ("RN-20", "SE"),
        ("RN-20", "MS-SAR"),
        ("RN-32", "plain"),
        ("RN-32", "SE"),
    ]
    assert frame["settings"].tolist() == [NONE, "r=3", "L={1,2,4}, regional, r=3", NONE, "r=3"]
    mssar = row_of(frame, network="RN-20", module="MS-SAR")
    test = stats.ttest_ind([8.0, 8.3, 8.1], [9.0, 9.4, 9.2], equal_var=False)
    low, high = test.confidence_interval(0.95)
    assert mssar["test error"] == "8.13 ± 0.15 (n=3)" and mssar["Δ vs plain"] == "-1.07"
    assert mssar["95% CI of Δ (Welch)"] == f"[{low:+.2f}, {high:+.2f}]"
    assert mssar["p (Welch)"] == f"{test.pvalue:.3f} (df {test.df:.1f}; n=3 vs 3)"
    assert mssar["extra params (% of plain)"] == f"{100 * (283_800 / 272_474 - 1):+.2f}%"
    assert mssar["extra FLOPs (% of plain)"] == f"{100 * (40_890_000 / 40_810_000 - 1):+.2f}%"
    plain = row_of(frame, network="RN-20", module="plain")
    assert plain["extra params (% of plain)"] == "(0.272M)" and plain["Δ vs plain"] == "(baseline)"
    # newest CPU rows: plain and SE from box B (not the newer CUDA row), MS-SAR from box A
    assert frame["CPU step time × plain"].tolist() == ["1.00", "1.10", "1.25", NONE, NONE]
    caption = result.caption
    assert "Welch" in caption and "here 3 each" not in caption and "here 2–3" in caption
    assert (
        "4 ep (batch 128, lr 0.1, milestones [2], wd 0.0001; not the paper's protocol)" in caption
    )
    assert str(modules_root / "bench" / "module_step.csv") in caption
    assert "RN-20: 2026-01-01T00:00:00+00:00, box A, 2 threads, batch 128" in caption
    assert "RN-20: 2026-01-31T23:30:00+00:00, box B, 1 threads, batch 128" in caption
    assert "2026-02-01" not in caption and "gpu box" not in caption
    # no benchmark beside the results: "—" and the caption says so
    (modules_root / "bench" / "module_step.csv").unlink()
    again = table(build_report(modules_root), "synthetic: modules at equal protocol")
    assert set(again.frame["CPU step time × plain"]) == {NONE}
    assert "no bench/module_step.csv beside the results" in again.caption


def test_error_vs_extra_flops_figure(modules_root: Path, tmp_path: Path) -> None:
    """One figure per network with the plain network and at least two modules."""
    from mssar_cli.report import write_figures

    paths = write_figures(collect_runs(modules_root), tmp_path / "figs")
    extra = [p.name for p in paths if p.name.startswith("error_vs_extra_flops")]
    assert extra == ["error_vs_extra_flops_synthetic_resnet20_4_ep.png"]  # RN-32: one module
    data = (tmp_path / "figs" / extra[0]).read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 20_000


def test_report_imports_no_torch(modules_root: Path) -> None:
    """Reading results, tables and the significance test import no torch (scipy is fine)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from mssar_cli.report import build_report, render\n"
        f"render(build_report({str(modules_root)!r}), 'csv')\n"
        "assert 'scipy.stats' in sys.modules, 'no test was made'\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
