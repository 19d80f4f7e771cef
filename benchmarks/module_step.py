"""Training-step time and memory of networks with each recalibration module, and without one.

    .venv/bin/python -m benchmarks.module_step [--quick] [--device auto|cpu|cuda] [--compile]
        [--models resnet56,resnet18] [--variants plain,se,mssar,...] [--csv PATH | --no-csv]
        [--markdown PATH] [--no-module-clock]

For each model (ResNet-56 on 32x32, batch 128; ResNet-18 on 224x224, batch 64) it builds the
variants (:mod:`benchmarks.step_variants`: ``plain``, every registered module by its registry
name, ``mssar-direct`` and ``mssar-autograd``; by default plain, se, mssar, mssar-direct and
mssar-autograd) with ``create_model(name, num_classes, recalibration=..., implementation=...)``
and times full SGD training steps, split into forward (the loss computation), backward
(``loss.backward()``) and optimizer step (``optimizer.step()`` + ``zero_grad``). After warm-up
steps, the repeats are interleaved round-robin across the variants in one process (v1, v2, v3,
v4, v1, v2, ...) so that load from other processes hits every variant alike; the table reports
medians and ratios to the plain network, and, with plain, SE and MS-SAR among the variants, the
*overhead ratio* (MS-SAR's step overhead over plain divided by SE's).

Time inside the modules: when SE and another module are among the variants, after the timed
repeats as many more interleaved steps of the variants with a module (but ``mssar-direct``) run
with :class:`ModuleClock` hooks on every recalibration module, which time each module's forward
and backward within the step; the ratios to SE (per round, median and bootstrap interval) leave
out the noise of the rest of the network that the whole-step differences carry. Not with
``--compile`` (hooks would split the compiled graph) nor ``--no-module-clock``.

Peak memory (:mod:`benchmarks.step_memory`): on CUDA, the peak of
``torch.cuda.max_memory_allocated`` during one training step of the variant; on CPU, the peak of
the allocator's running total during one training step, from ``torch.profiler``'s memory
records; both plus the variant's parameter and optimizer-state bytes.

Rows are appended to ``results/bench/module_step.csv`` (``--csv``), with the machine, torch
version, device, threads and precision; ``--markdown PATH`` also writes the summary tables as
Markdown (e.g. ``results/bench/module_step.md``). On CUDA (the default when a GPU is present) the
forward runs under bf16 autocast with channels_last tensors; ``--compile`` wraps each model in
``torch.compile``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import (
    RESULTS,
    ROOT,
    append_csv,
    machine_name,
    markdown_table,
    resolve_device,
    write_markdown,
)
from benchmarks.module_clock import ModuleClock, sync
from benchmarks.stats import median_ms, overhead_interval, summaries
from benchmarks.step_memory import measure_memory
from benchmarks.step_variants import (
    DEFAULT_VARIANTS,
    VARIANTS,
    clocked,
    known_variants,
    module_label,
    parse_variants,
)
from mssar_cli.models import create_model

CSV_PATH = RESULTS / "module_step.csv"
CSV_COLUMNS = (
    "date",
    "machine",
    "torch",
    "device",
    "threads",
    "precision",
    "compile",
    "model",
    "batch",
    "variant",
    "fwd_ms",
    "bwd_ms",
    "step_ms",
    "ratio_to_plain",
    "paired_ratio",
    "peak_mem_mb",
    "mem_ratio_to_plain",
    "warmup",
    "repeats",
)


@dataclass(frozen=True)
class Workload:
    num_classes: int
    size: int
    batch: int
    # (warm-up steps, timed repeats) per variant: (cpu full, cpu quick, cuda full, cuda quick)
    cpu: tuple[int, int]
    cpu_quick: tuple[int, int]
    cuda: tuple[int, int]
    cuda_quick: tuple[int, int]


WORKLOADS: dict[str, Workload] = {
    # the network of the Fashion-MNIST comparison (results/fashion_mnist/), on 3-channel inputs
    "resnet20": Workload(
        10, 32, 128, cpu=(3, 21), cpu_quick=(1, 3), cuda=(10, 50), cuda_quick=(3, 5)
    ),
    "resnet56": Workload(
        10, 32, 128, cpu=(3, 21), cpu_quick=(1, 3), cuda=(10, 50), cuda_quick=(3, 5)
    ),
    "resnet18": Workload(
        1000, 224, 64, cpu=(1, 5), cpu_quick=(1, 1), cuda=(10, 30), cuda_quick=(3, 5)
    ),
}


@dataclass
class Runner:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    fwd: list[float] = field(default_factory=list)
    bwd: list[float] = field(default_factory=list)
    opt: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    peak_bytes: int = 0


def build(
    model_name: str, work: Workload, variant: str, device: torch.device, compile_: bool
) -> Runner:
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=work.num_classes, **VARIANTS[variant])
    model = model.to(device).train()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4
    )
    if compile_:
        model = torch.compile(model)
    return Runner(variant, model, optimizer)


def step(
    runner: Runner, x: torch.Tensor, y: torch.Tensor, device: torch.device
) -> tuple[float, float, float]:
    """One training step; returns (forward, backward, optimizer) seconds."""
    sync(device)
    t0 = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = nn.functional.cross_entropy(runner.model(x), y)
    sync(device)
    t1 = time.perf_counter()
    loss.backward()
    sync(device)
    t2 = time.perf_counter()
    runner.optimizer.step()
    runner.optimizer.zero_grad(set_to_none=True)
    sync(device)
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def module_times(
    runners: list[Runner], x: torch.Tensor, y: torch.Tensor, device: torch.device, rounds: int
) -> dict[str, list[tuple[float, float]]]:
    """(forward, backward) seconds per step inside the recalibration modules of the runners
    :func:`~benchmarks.step_variants.clocked` picks, over ``rounds`` more interleaved steps with
    :class:`ModuleClock` attached (none when it picks none)."""
    names = clocked([r.name for r in runners])
    runners = [r for r in runners if r.name in names]
    clocks = {r.name: ModuleClock(r.model, device) for r in runners}
    times: dict[str, list[tuple[float, float]]] = {r.name: [] for r in runners}
    try:
        for _ in range(rounds):
            for runner in runners:
                clock = clocks[runner.name]
                clock.reset()
                step(runner, x, y, device)
                times[runner.name].append((clock.forward, clock.backward))
    finally:
        for clock in clocks.values():
            clock.remove()
    return times


def run_model(model_name: str, args: argparse.Namespace, device: torch.device) -> list[dict]:
    work = WORKLOADS[model_name]
    batch = args.batch or work.batch
    if device.type == "cuda":
        warmup, repeats = work.cuda_quick if args.quick else work.cuda
    else:
        warmup, repeats = work.cpu_quick if args.quick else work.cpu
    warmup = args.warmup if args.warmup is not None else warmup
    repeats = args.repeats or repeats

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, work.size, work.size, generator=gen).to(device)
    y = torch.randint(0, work.num_classes, (batch,), generator=gen).to(device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)

    runners = [build(model_name, work, v, device, args.compile) for v in args.variants]
    print(
        f"{model_name}: batch {batch}, {work.size}x{work.size}, {warmup} warm-up + {repeats} "
        f"interleaved repeats per variant ({', '.join(args.variants)})",
        flush=True,
    )
    for runner in runners:  # warm-up (and compilation)
        for _ in range(warmup):
            step(runner, x, y, device)
    for runner in runners:
        runner.peak_bytes = measure_memory(
            runner.model, runner.optimizer, lambda r=runner: step(r, x, y, device), device
        )
    for i in range(repeats):  # round-robin: v1, v2, v3, v4, v1, v2, ...
        for runner in runners:
            f, b, o = step(runner, x, y, device)
            runner.fwd.append(f)
            runner.bwd.append(b)
            runner.opt.append(o)
            runner.total.append(f + b + o)
        if not args.quiet:
            print(
                f"  repeat {i + 1}/{repeats}: "
                + "  ".join(f"{r.name} {1000 * r.total[-1]:.0f}ms" for r in runners),
                flush=True,
            )

    by_name = {r.name: r for r in runners}
    times = {}
    if not (args.compile or args.no_module_clock):  # hooks would split the compiled graph
        times = module_times(runners, x, y, device, repeats)
    base = by_name.get("plain")
    rows = []
    for r in runners:
        step_ms = median_ms(r.total)
        rows.append(
            {
                "model": model_name,
                "batch": batch,
                "variant": r.name,
                "fwd_ms": median_ms(r.fwd),
                "bwd_ms": median_ms(r.bwd),
                "step_ms": step_ms,
                "ratio_to_plain": step_ms / median_ms(base.total) if base else float("nan"),
                "peak_mem_mb": r.peak_bytes / 2**20,
                "mem_ratio_to_plain": r.peak_bytes / base.peak_bytes if base else float("nan"),
                "paired_ratio": float("nan"),
                "warmup": warmup,
                "repeats": repeats,
            }
        )
    # paired per-repeat ratios are less sensitive to slow drifts in load than ratios of medians
    if base:
        for row, r in zip(rows, runners):
            row["paired_ratio"] = statistics.median(t / p for t, p in zip(r.total, base.total))
    if {"plain", "se", "mssar"} <= by_name.keys():
        interval = overhead_interval(
            by_name["plain"].total, by_name["se"].total, by_name["mssar"].total
        )
        for row in rows:
            row["overhead_interval"] = interval
    for row in rows:
        row["module_times"] = times
        row["step_totals"] = {r.name: list(r.total) for r in runners}
    del runners
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def print_table(model_name: str, rows: list[dict], header: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text fallback
        print(header)
        for row in rows:
            print(row)
        return
    table = Table(title=f"{model_name} training step ({header})")
    for col in (
        "variant",
        "fwd ms",
        "bwd ms",
        "step ms",
        "x plain",
        "paired x plain",
        "peak MB",
        "mem x plain",
    ):
        table.add_column(
            col, justify="left" if col == "variant" else "right", no_wrap=col == "variant"
        )
    for row in rows:
        table.add_row(
            row["variant"],
            f"{row['fwd_ms']:.1f}",
            f"{row['bwd_ms']:.1f}",
            f"{row['step_ms']:.1f}",
            f"{row['ratio_to_plain']:.3f}",
            f"{row['paired_ratio']:.3f}",
            f"{row['peak_mem_mb']:.1f}",
            f"{row['mem_ratio_to_plain']:.3f}",
        )
    console = Console()
    console.print(table)
    for summary in summaries(rows):
        console.print(summary)


def csv_rows(rows: list[dict], common: dict) -> list[dict]:
    out = []
    for row in rows:
        row = {**common, **row}
        for key in ("fwd_ms", "bwd_ms", "step_ms", "peak_mem_mb"):
            row[key] = f"{row[key]:.2f}"
        for key in ("ratio_to_plain", "paired_ratio", "mem_ratio_to_plain"):
            row[key] = f"{row[key]:.4f}"
        out.append(row)
    return out


def markdown(model_name: str, rows: list[dict]) -> str:
    """The summary table of one model, as Markdown."""
    batch = rows[0]["batch"] if rows else "?"
    headers = (
        "variant",
        "fwd ms",
        "bwd ms",
        "step ms",
        "x plain",
        "paired x plain",
        "peak MB",
        "mem x plain",
    )
    cells = [
        (
            r["variant"],
            f"{r['fwd_ms']:.1f}",
            f"{r['bwd_ms']:.1f}",
            f"{r['step_ms']:.1f}",
            f"{r['ratio_to_plain']:.3f}",
            f"{r['paired_ratio']:.3f}",
            f"{r['peak_mem_mb']:.1f}",
            f"{r['mem_ratio_to_plain']:.3f}",
        )
        for r in rows
    ]
    repeats = rows[0]["repeats"] if rows else 0
    text = f"**{model_name}**, batch {batch}, medians of {repeats} repeats\n\n"
    text += markdown_table(headers, cells, [False] + [True] * 7)
    for summary in summaries(rows):
        text += f"\n\n{summary}"
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats, for smoke use")
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: cuda when a GPU is present, else cpu",
    )
    parser.add_argument("--compile", action="store_true", help="apply torch.compile to each model")
    parser.add_argument(
        "--models",
        default="resnet56,resnet18",
        help=f"comma-separated subset of {','.join(WORKLOADS)}",
    )
    parser.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated, in the order timed within a round, from: {known_variants()} "
        f"(default {','.join(DEFAULT_VARIANTS)})",
    )
    parser.add_argument(
        "--repeats", type=int, help="timed steps per variant (overrides the default)"
    )
    parser.add_argument(
        "--warmup", type=int, help="warm-up steps per variant (overrides the default)"
    )
    parser.add_argument("--batch", type=int, help="batch size (overrides the model's default)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (CPU)")
    parser.add_argument(
        "--csv",
        type=Path,
        help=f"CSV to append rows to (default {CSV_PATH.relative_to(ROOT)}; none with --quick)",
    )
    parser.add_argument("--no-csv", action="store_true", help="do not append to the CSV")
    parser.add_argument(
        "--markdown", type=Path, help="also write the summary tables to this Markdown file"
    )
    parser.add_argument("--quiet", action="store_true", help="no per-repeat lines")
    parser.add_argument(
        "--no-module-clock",
        action="store_true",
        help="skip the extra steps that time the inside of the modules (nearly half the run time)",
    )
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in args.models:
        if m not in WORKLOADS:
            parser.error(f"unknown model {m!r}; choose from {', '.join(WORKLOADS)}")
    try:
        args.variants = parse_variants(args.variants)
    except ValueError as error:
        parser.error(str(error))
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")

    if args.csv is None and not args.quick:
        args.csv = CSV_PATH
    args.no_csv = args.no_csv or args.csv is None

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    common = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_name(device),
        "torch": torch.__version__,
        "device": device.type,
        "threads": torch.get_num_threads(),
        "precision": "bf16-autocast" if device.type == "cuda" else "fp32",
        "compile": args.compile,
    }
    header = (
        f"{common['machine']}, torch {common['torch']}, {device.type}"
        + (
            f", {args.threads} threads"
            if device.type == "cpu"
            else ", bf16 autocast, channels_last"
        )
        + (", torch.compile" if args.compile else "")
        + (" [--quick: smoke settings, not a measurement]" if args.quick else "")
    )
    print(header, flush=True)
    title = " / ".join(dict.fromkeys(module_label(v) for v in args.variants))
    sections = [f"# Training step: {title}\n\n{common['date']}: {header}"]
    for model_name in args.models:
        rows = run_model(model_name, args, device)
        print_table(model_name, rows, header)
        sections.append(markdown(model_name, rows))
        if not args.no_csv:
            append_csv(args.csv, CSV_COLUMNS, csv_rows(rows, common))
    print("\n" + "\n\n".join(sections[1:]))
    if not args.no_csv:
        print(f"appended to {args.csv}")
    elif args.quick:
        print("--quick: no CSV written (pass --csv PATH to write one)")
    if args.markdown:
        write_markdown(args.markdown, "\n\n".join(sections))
        print(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()
