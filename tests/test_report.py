"""mssar report: run directories → the paper's tables (collecting the runs, Tables 2, 3 and 5, the
other datasets' tables, protocols never pooled, unreadable runs skipped), every output format and
the command line (fake run directories in the exact format that `mssar train` writes: recipe.yaml,
epochs.csv, summary.json; ``helpers.write_run``)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import typer
import yaml
from helpers import row_of, table, write_run
from scipy import stats
from typer.testing import CliRunner

from mssar_cli import paper, recipe
from mssar_cli.errors import MssarError
from mssar_cli.report import NONE, build_report, collect_runs, read_csv_blocks, render


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
    assert not [t for t in titles if t.startswith("ImageNet ResNet-50")]  # no ResNet-50 run
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


# --- not from the paper: the published ImageNet ResNet-50 numbers of the other modules ----------


def test_published_resnet50_numbers_are_data_with_sources() -> None:
    """One row per registered module (the plain network aside), in registry order: top-1 / top-5
    error in % (accuracies converted at their printed precision), the baseline of the same source
    or none, a citation with its table, where it was read, and a note; modules without a verified
    number say why instead of carrying one."""
    from mssar_cli.recalibration import RECALIBRATIONS

    rows = paper.PUBLISHED_RESNET50
    assert [r.recalibration for r in rows] == [n for n in RECALIBRATIONS if n != "none"]
    values = {r.recalibration: (r.top1, r.top5, r.baseline_top1, r.baseline_top5) for r in rows}
    assert values == {
        "se": (23.29, 6.62, 24.80, 7.48),  # SE paper, Table 2
        "mssar": (None, None, None, None),  # Table 5: ResNet-18/34, ResNeXt-50 only
        "eca": (22.52, 6.32, 24.80, 7.48),  # ECA-Net Table 3: 77.48 / 93.68, 75.20 / 92.52
        "cbam": (22.66, 6.31, None, None),  # 77.34 / 93.69, as ECA-Net Table 3 quotes it
        "ge": (None, None, None, None),  # not verified
        "coord": (None, None, None, None),  # no ResNet-50 ImageNet number published
        "gc": (22.30, 6.34, None, None),  # 77.70 / 93.66, as ECA-Net Table 3 quotes it
    }
    for row in rows:
        assert row.source and row.note and row.label
        if row.top1 is None:
            assert row.top5 is None and row.baseline_top1 is None
            assert "No " in row.note  # says why there is no number
            continue
        assert "Table" in row.source and row.url.startswith("https://arxiv.org/abs/")
        assert row.read_in and row.printed
        assert 0 < row.top5 < row.top1 < 100
        if row.baseline_top1 is not None:
            assert row.top1 < row.baseline_top1  # every source reports a gain
        else:  # quoted by another paper: the original baseline was not read
            assert "not read here" in row.read_in and "75.20 beside it is SE's" in row.note
    # ECA-Net's baseline is SE's re-implementation, copied: one number in two sources
    eca, se = paper.published_resnet50("eca"), paper.published_resnet50("se")
    assert (eca.baseline_top1, eca.baseline_top5) == (se.baseline_top1, se.baseline_top5)
    assert "copied from the SE paper" in eca.note
    assert paper.published_resnet50("none") is None
    assert paper.cost_row("resnet50", "se") is None  # not one of the paper's rows


def test_the_resnet50_table_renders_in_every_format(tmp_path: Path) -> None:
    for recal, err in (("none", 24.0), ("eca", 22.9)):
        write_run(tmp_path, "imagenet", f"r50_{recal}", 0, model="resnet50",
                  recalibration=recal, final_err=err)  # fmt: skip
    tables = build_report(tmp_path)
    published = table(tables, "ImageNet ResNet-50: every module, ours vs published")
    blocks = read_csv_blocks(render(tables, "csv"))
    frame = blocks[tables.index(published)]
    assert row_of(frame, network="ResNet-50+ECA")["top-1 published"] == "22.52 [3]"
    assert "22.52 [3]" in render(tables, "markdown")
    latex = render(tables, "latex")
    assert "22.52 [3]" in latex and "-- [2]" in latex  # MS-SAR: none published, footnote 2
