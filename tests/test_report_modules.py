"""mssar report beyond the paper's tables: Welch's t-test against the plain network, the table of
the modules at equal protocol (with the step-time benchmark beside the runs), the figures, a module
added to the registry reported without editing the report, and no torch import (fake run
directories in the exact format that `mssar train` writes, from ``helpers.write_run``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import row_of, table, write_run
from scipy import stats

from mssar_cli import recalibration
from mssar_cli.report import NONE, build_report, collect_runs, render
from mssar_cli.report.significance import welch
from mssar_cli.report.stats import Stat

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- a module added to the registry -----------------------------------------------------------


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


# --- figures ----------------------------------------------------------------------------------


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


# --- ImageNet ResNet-50: the published numbers of the later modules beside ours ------------------

R50_COSTS = {  # `mssar count resnet50 --recalibration X`: parameters, MACs
    "none": (25_557_032, 4_089_185_256),
    "se": (28_088_024, 4_091_716_248),
    "eca": (25_557_118, 4_089_273_064),
    "coord": (29_361_544, 4_143_776_744),
}


@pytest.fixture
def resnet50_root(tmp_path: Path) -> Path:
    """ImageNet ResNet-50 plain, SE, ECA and Coordinate Attention (2 seeds each), ResNet-18 plain
    and SE (1 seed each), in the format `mssar train` writes."""
    for seed in range(2):
        for recal, err in (("none", 24.0), ("se", 23.0), ("eca", 22.8), ("coord", 23.4)):
            params, flops = R50_COSTS[recal]
            write_run(
                tmp_path,
                "imagenet",
                f"resnet50_{recal}",
                seed,
                model="resnet50",
                recalibration=recal,
                final_err=err + 0.2 * seed,
                params=params,
                flops=flops,
            )
    for recal, err in (("none", 30.0), ("se", 29.0)):
        write_run(tmp_path, "imagenet", f"resnet18_{recal}", 0, model="resnet18",
                  recalibration=recal, final_err=err)  # fmt: skip
    return tmp_path


def test_resnet50_rows_of_the_modules_table_show_the_published_number(
    resnet50_root: Path,
) -> None:
    """The module's published top-1 error and the baseline of the same source, footnoted; "—"
    for the plain network, for other networks and for a module that has no published number."""
    from mssar_cli import paper

    result = table(build_report(resnet50_root), "ImageNet: modules at equal protocol")
    frame = result.frame
    assert list(frame.columns[3:6]) == ["test error", "published top-1", "source's plain top-1"]
    assert list(zip(frame["network"], frame["module"])) == [
        ("ResNet-18", "plain"), ("ResNet-18", "SE"), ("ResNet-50", "plain"), ("ResNet-50", "SE"),
        ("ResNet-50", "ECA"), ("ResNet-50", "CA"),
    ]  # fmt: skip
    se, eca = paper.published_resnet50("se"), paper.published_resnet50("eca")
    assert (se.top1, se.baseline_top1, eca.top1, eca.baseline_top1) == (23.29, 24.80, 22.52, 24.80)
    assert frame["published top-1"].tolist() == [
        NONE,
        NONE,
        NONE,
        "23.29 [1]",
        "22.52 [2]",
        "— [3]",
    ]
    assert frame["source's plain top-1"].tolist() == [
        NONE, NONE, NONE, "24.80 [1]", "24.80 [2]", "— [3]",
    ]  # fmt: skip
    assert row_of(frame, network="ResNet-50", module="SE")["test error"] == "23.10 ± 0.14 (n=2)"
    caption = result.caption
    assert "[1] SE: Hu, Shen, Sun, Squeeze-and-Excitation Networks, CVPR 2018" in caption
    assert "[2] ECA: Wang, Wu, Zhu, Li, Zuo, Hu, ECA-Net" in caption and "Table 3" in caption
    assert "[3] CA: Hou, Zhou, Feng" in caption and "No ResNet-50 ImageNet number" in caption
    assert "https://arxiv.org/abs/1910.03151" in caption and "[4]" not in caption
    assert "each source trained its own ResNet-50" in caption


def test_modules_tables_without_imagenet_resnet50_have_no_published_columns(
    modules_root: Path, tmp_path: Path
) -> None:
    """Published numbers exist for ImageNet ResNet-50 only: other tables keep their columns, and
    no ResNet-50 table appears without a ResNet-50 ImageNet run."""
    tables = build_report(modules_root)
    assert not [t for t in tables if t.title.startswith("ImageNet ResNet-50")]
    frame = table(tables, "synthetic: modules at equal protocol").frame
    assert "published top-1" not in frame.columns
    for recal, err in (("none", 30.0), ("se", 29.0)):
        for seed in range(2):
            write_run(tmp_path, "imagenet", f"r18_{recal}", seed, model="resnet18",
                      recalibration=recal, final_err=err + seed)  # fmt: skip
    tables = build_report(tmp_path)
    assert "published top-1" not in table(tables, "ImageNet: modules at equal").frame.columns
    assert not [t for t in tables if t.title.startswith("ImageNet ResNet-50")]


def test_resnet50_table_sets_every_module_beside_its_published_number(
    resnet50_root: Path,
) -> None:
    """One row per registered module in registry order (— where not run), the published top-1
    and top-5 errors, Δ = ours − published, the source's own baseline and the drops."""
    from mssar_cli import paper

    tables = build_report(resnet50_root)
    titles = [t.title for t in tables]
    ours = "ImageNet ResNet-50: every module, ours vs published"
    assert titles.index(ours) < titles.index("ImageNet: modules at equal protocol (4 ep)")
    result = table(tables, ours)
    frame = result.frame
    labels = ["", "+SE", "+MS-SAR", "+ECA", "+CBAM", "+GE", "+CA", "+GC"]
    assert frame["network"].tolist() == [f"ResNet-50{label}" for label in labels]
    assert set(frame["protocol"]) == {"4 ep"}
    expected = {row.recalibration: row for row in paper.PUBLISHED_RESNET50}
    marks = {}  # the footnote of each module's source, numbered in the table's order
    for label, name in zip(frame["network"], ["none", *expected]):
        cell = row_of(frame, network=label)["top-1 published"]
        if name == "none":
            assert cell == NONE
            continue
        number, mark = cell.split(" ")
        marks[name] = mark
        top1 = expected[name].top1
        assert number == (NONE if top1 is None else f"{top1:.2f}")
    assert list(marks.values()) == [f"[{i}]" for i in range(1, 8)]
    se = row_of(frame, network="ResNet-50+SE")
    assert se["top-1 ours"] == "23.10 ± 0.14 (n=2)" and se["top-1 Δ"] == "-0.19"
    assert se["top-1 source's plain"] == "24.80 [1]" and se["top-5 published"] == "6.62 [1]"
    # ours: (24.10 − 23.10) / 24.10; the SE paper's: (24.80 − 23.29) / 24.80
    assert se["top-1 drop ours / published"] == "4.1% / 6.1%"
    assert se["params"] == "28.09M" and se["FLOPs"] == "4.092G"
    eca = row_of(frame, network="ResNet-50+ECA")
    assert eca["top-1 published"] == "22.52 [3]" and eca["top-1 Δ"] == f"{22.9 - 22.52:+.2f}"
    assert eca["top-5 published"] == "6.32 [3]"
    cbam = row_of(frame, network="ResNet-50+CBAM")  # not run; its source's baseline not read
    assert cbam["top-1 ours"] == NONE and cbam["top-1 published"] == "22.66 [4]"
    assert (
        cbam["top-1 source's plain"] == "— [4]" and cbam["top-1 drop ours / published"] == "— / —"
    )
    coord = row_of(frame, network="ResNet-50+CA")
    assert coord["top-1 published"] == "— [6]" and coord["top-1 Δ"] == NONE
    assert row_of(frame, network="ResNet-50")["top-1 ours"] == "24.10 ± 0.14 (n=2)"
    for row in expected.values():
        assert row.source.split(",")[0] in result.caption
    assert "ECA-Net's 75.20 beside it is SE's" in result.caption
    assert "ResNet-18" not in frame["network"].tolist()
