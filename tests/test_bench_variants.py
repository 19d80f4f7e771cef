"""The module-step benchmark's variants (benchmarks/step_variants.py): every registered module,
its command line, a small run of zoo variants, and the report reading their rows
(mssar_cli/report/bench.py)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from benchmarks.stats import others_summary, summaries
from benchmarks.step_variants import (
    DEFAULT_VARIANTS,
    VARIANTS,
    clocked,
    label,
    module_label,
    parse_variants,
)
from mssar_cli.recalibration import PLAIN, RECALIBRATIONS
from mssar_cli.report.bench import read_bench

ZOO = [name for name in RECALIBRATIONS if name not in (PLAIN, "se", "mssar")]


def test_every_registered_module_is_a_variant_of_its_name():
    for name in RECALIBRATIONS:
        variant = "plain" if name == PLAIN else name
        assert VARIANTS[variant] == {"recalibration": name}
    assert ZOO == ["eca", "cbam", "ge", "coord", "gc"]
    assert VARIANTS["mssar-direct"] == {"recalibration": "mssar", "implementation": "direct"}


def test_the_default_is_what_the_benchmark_timed_before():
    assert DEFAULT_VARIANTS == ("plain", "se", "mssar", "mssar-direct", "mssar-autograd")


def test_parse_variants_keeps_the_order_reads_none_as_plain_and_drops_repeats():
    assert parse_variants("none, se,eca,,gc,se") == ["plain", "se", "eca", "gc"]
    assert parse_variants(",".join(VARIANTS)) == list(VARIANTS)


def test_parse_variants_names_every_unknown_one_and_lists_the_known():
    with pytest.raises(ValueError) as error:
        parse_variants("plain,foo,Se")
    message = str(error.value)
    assert message.startswith("unknown variants 'foo', 'Se'; choose from plain (or none), se,")
    assert all(name in message for name in [*ZOO, "mssar-direct", "mssar-autograd"])
    with pytest.raises(ValueError, match="no variant given"):
        parse_variants(" , ")


def test_the_command_line_refuses_an_unknown_variant(capsys):
    from benchmarks.module_step import main

    with pytest.raises(SystemExit) as exit_:
        main(["--quick", "--no-csv", "--variants", "plain,eca,sk"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "error: unknown variant 'sk'; choose from plain (or none), se, mssar, eca," in err
    assert err.count("error:") == 1


def test_labels():
    assert [label(v) for v in ("plain", "se", "coord", "mssar-autograd")] == [
        "plain",
        "SE",
        "CA",
        "mssar-autograd",
    ]
    assert module_label("mssar-direct") == "MS-SAR"


def test_which_variants_are_clocked():
    """Every variant with a module but mssar-direct, when SE (the reference) and another are
    there; none otherwise."""
    assert clocked(list(DEFAULT_VARIANTS)) == ["se", "mssar", "mssar-autograd"]
    assert clocked(["plain", "se", "eca", "mssar-direct", "gc"]) == ["se", "eca", "gc"]
    assert clocked(["plain", "eca", "gc"]) == []
    assert clocked(["plain", "se", "mssar-direct"]) == []


def test_others_summary_gives_each_module_over_se():
    times = {
        "se": [(0.05, 0.13)] * 6,
        "mssar": [(0.10, 0.15)] * 6,
        "eca": [(0.02, 0.07)] * 6,
        "gc": [(0.1, 0.26)] * 6,
    }
    line = others_summary(times)
    assert line.startswith(
        "Inside the modules (6 more interleaved steps, hooks), per step and x SE"
    )
    assert line.endswith(
        "SE 180.0 ms; ECA 90.0 ms, 0.50 (0.50-0.50); GC 360.0 ms, 2.00 (2.00-2.00)"
    )
    # fewer than 5 rounds: the median of the ratios without an interval
    assert others_summary({k: v[:3] for k, v in times.items()}).endswith(
        "ECA 90.0 ms, 0.50; GC 360.0 ms, 2.00"
    )
    assert others_summary({"se": times["se"], "mssar": times["mssar"]}) is None
    assert others_summary({"eca": times["eca"], "gc": times["gc"]}) is None
    # mssar-autograd is handwritten_summary's when mssar is there, this line's otherwise
    autograd = {"se": times["se"], "mssar-autograd": times["mssar"]}
    assert "mssar-autograd 250.0 ms, 1.39" in others_summary(autograd)
    assert others_summary({**autograd, "mssar": times["mssar"]}) is None


def test_summaries_without_mssar_have_no_overhead_line():
    times = {"se": [(0.05, 0.13)] * 6, "eca": [(0.02, 0.07)] * 6}
    rows = [
        {"variant": v, "ratio_to_plain": r, "module_times": times, "step_totals": {}}
        for v, r in (("plain", 1.0), ("se", 1.1), ("eca", 1.05))
    ]
    lines = summaries(rows)
    assert len(lines) == 1 and lines[0].startswith("Inside the modules")


def test_a_small_run_of_zoo_variants_writes_rows_the_report_reads(tmp_path: Path, capsys):
    """plain (as none), SE, ECA and GC on ResNet-56 at batch 2: every variant gets a row, the
    modules are clocked relative to SE, and report/bench.py finds the rows by registry name."""
    import torch

    from benchmarks.module_step import CSV_COLUMNS, main

    path, markdown = tmp_path / "bench" / "module_step.csv", tmp_path / "zoo.md"
    threads = torch.get_num_threads()
    try:
        main(
            [
                "--quick",
                "--device=cpu",
                "--models=resnet56",
                "--variants=none,se,eca,gc",
                "--batch=2",
                "--warmup=0",
                "--repeats=2",
                "--threads=1",
                "--quiet",
                f"--csv={path}",
                f"--markdown={markdown}",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert [r["variant"] for r in rows] == ["plain", "se", "eca", "gc"]
    assert {r["model"] for r in rows} == {"resnet56"} and {r["batch"] for r in rows} == {"2"}
    assert rows[0]["paired_ratio"] == "1.0000" and all(float(r["step_ms"]) > 0 for r in rows)
    text = markdown.read_text()
    assert text.startswith("# Training step: plain / SE / ECA / GC\n")
    assert "Inside the modules (2 more interleaved steps, hooks)" in text and "; GC " in text
    assert "MS-SAR overhead" not in text
    bench = read_bench(path)
    assert bench.ratio("resnet56", PLAIN).ratio == 1.0
    for name in ("se", "eca", "gc"):
        assert bench.ratio("resnet56", name).ratio == float(
            rows[[r["variant"] for r in rows].index(name)]["paired_ratio"]
        )
    assert bench.ratio("resnet56", "cbam") is None
    assert "--quick" in capsys.readouterr().out


def test_the_report_reads_the_newest_cpu_row_of_every_zoo_module(tmp_path: Path):
    header = "date,machine,torch,device,threads,precision,compile,model,batch,variant,paired_ratio"
    old, new = "2026-12-01T10:00:00+00:00", "2026-12-04T10:00:00+00:00"
    rows = [f"{old},box,2.14,cpu,2,fp32,False,resnet56,128,{v},1.9" for v in ["plain", *ZOO]]
    rows += [
        f"{new},box,2.14,cpu,2,fp32,False,resnet56,128,{v},{1 + i / 10:.4f}"
        for i, v in enumerate(["plain", *ZOO])
    ]
    rows.append(f"{new},gpu,2.14,cuda,0,bf16,False,resnet56,128,gc,0.5")  # not CPU: ignored
    path = tmp_path / "module_step.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    bench = read_bench(path)
    assert bench.ratio("resnet56", PLAIN).ratio == 1.0
    assert [bench.ratio("resnet56", name).ratio for name in ZOO] == [1.1, 1.2, 1.3, 1.4, 1.5]
    assert bench.ratio("resnet20", "eca") is None
    source = bench.source([("resnet56", name) for name in (PLAIN, *ZOO)])
    assert f"{new}, box, 2 threads, batch 128" in source and old not in source
