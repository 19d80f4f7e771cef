"""Images/s of ResNet-20 MS-SAR training: the device-resident pipeline against a DataLoader.

    python -m benchmarks.pipeline.py [--quick] [--device auto|cpu|cuda] [--compile]
        [--dataset synthetic|fashion-mnist|cifar10|cifar100] [--batches N] [--epochs E]
        [--repeats R] [--workers N] [--csv PATH | --no-csv] [--markdown PATH]

The performance issue's goals for the training pipeline: on a GPU the device-resident pipeline
trains at least 5x as many images/s as a plain torchvision DataLoader with an eager fp32 loop;
on a CPU it is not slower (ratio >= 1.0).

Both pipelines train the same network (ResNet-20 with MS-SAR, the same initial weights, SGD with
Nesterov momentum as in the recipes, batch 128) on the same training images, in one process:

- ``device``: what ``mssar train`` runs. ``build_loaders`` gives a ``DeviceLoader`` (the whole
  split as one uint8 tensor on the device; pad-4 random crop, flip and normalisation on whole
  batches there) and the engine's own ``train_one_epoch`` trains: bf16 autocast and channels_last
  on GPU (``--compile``: torch.compile), fp32 on CPU.
- ``dataloader``: the usual recipe. A ``torchvision.datasets``-style Dataset over the same uint8
  images (a PIL image per item; RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor,
  Normalize with the same mean and std), a ``DataLoader`` (shuffle, ``--workers`` processes kept
  alive across epochs, pin_memory on GPU), batches copied with ``non_blocking``, eager fp32
  forward / backward / SGD step, and the engine's on-device loss and error sums. It never syncs
  the device before the end of a run (the engine syncs every 10 batches), so any doubt favours it.

Timing: one untimed warm-up epoch per pipeline (worker start-up, allocator, cuDNN, compilation),
then ``--repeats`` timed runs of each, alternated (device, dataloader, device, ...) so that load
from other processes hits both alike. A timed run is ``--epochs`` epochs and ends with a device
sync; an epoch is the whole training split or, with ``--batches N``, a fixed subset of N x batch
images (``data.subset``, the same images for both pipelines). Reported: median images/s of each
pipeline, the ratio of the medians device / dataloader and the median of the per-repeat ratios.

Rows are appended to ``results/bench/pipeline.csv`` (``--csv``; not with ``--quick`` unless
``--csv`` is given), with the machine, torch version, device and settings; ``--markdown PATH``
also writes the summary as Markdown (e.g. ``results/bench/pipeline.md``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.common import (
    RESULTS,
    ROOT,
    append_csv,
    machine_name,
    markdown_table,
    resolve_device,
    write_markdown,
)
from mssar_cli.data import CROP_PADDING, NORMALISATION, DeviceLoader
from mssar_cli.distributed import World
from mssar_cli.engine import Session, build_model, build_session, train_one_epoch
from mssar_cli.errors import MssarError
from mssar_cli.recipe import from_dict

CSV_PATH = RESULTS / "pipeline.csv"
CSV_COLUMNS = (
    "date",
    "machine",
    "torch",
    "device",
    "threads",
    "dataset",
    "model",
    "recalibration",
    "batch",
    "pipeline",
    "precision",
    "channels_last",
    "compile",
    "workers",
    "images_per_run",
    "batches_per_run",
    "epochs_per_run",
    "warmup_epochs",
    "repeats",
    "images_per_s",
    "images_per_s_min",
    "images_per_s_max",
    "ratio",
    "paired_ratio",
    "goal",
    "goal_met",
)
MODEL, RECALIBRATION = "resnet20", "mssar"
DATASETS = ("synthetic", "fashion-mnist", "cifar10", "cifar100")
GOALS = {"cuda": 5.0, "cpu": 1.0}  # minimum ratio device / dataloader (the goals)
SEED = 0


@dataclass(frozen=True)
class Defaults:
    batches: int | None  # batches per epoch (None: the whole split)
    epochs: int  # epochs per timed run
    repeats: int  # timed runs per pipeline


def defaults(device: torch.device, dataset: str, quick: bool) -> Defaults:
    if quick:
        return Defaults(batches=2, epochs=1, repeats=2)
    if device.type == "cuda":  # synthetic has 2,048 images: 10 epochs make a run of 160 batches
        return Defaults(None, 10, 5) if dataset == "synthetic" else Defaults(None, 1, 5)
    return Defaults(None, 1, 3) if dataset == "synthetic" else Defaults(30, 1, 3)


@dataclass
class Pipeline:
    name: str
    describe: str
    run: Callable[[int], int]  # trains `epochs` epochs, returns the images trained
    images_per_s: list[float] = field(default_factory=list)


class UInt8Images(torch.utils.data.Dataset):
    """Like ``torchvision.datasets.CIFAR10`` / ``FashionMNIST``: uint8 images, PIL per item."""

    def __init__(self, images: Tensor, labels: Tensor, transform) -> None:
        data = images.permute(0, 2, 3, 1).contiguous().numpy()  # N x H x W x C, as CIFAR10.data
        self.data = data[..., 0] if data.shape[-1] == 1 else data  # grey: N x H x W, mode "L"
        self.targets = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.data[index])), self.targets[index]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_session(args: argparse.Namespace, device: torch.device) -> Session:
    """The engine's session for ResNet-20 MS-SAR, built as ``mssar train`` builds it."""
    recipe = from_dict(
        {
            "experiment": "bench-pipeline",
            "model": {"name": MODEL, "recalibration": RECALIBRATION},
            "data": {
                "dataset": args.dataset,
                "root": args.root,
                "batch_size": args.batch,
                "subset": args.batches * args.batch if args.batches else None,
                "test_subset": 1,
                "augment": True,
            },
            "run": {
                "device": device.type,
                "precision": "auto",
                "channels_last": device.type == "cuda",
                "compile": args.compile,
                "threads": args.threads,
            },
        }
    )
    return build_session(recipe, SEED, device, World())


def dataloader_pipeline(
    session: Session, args: argparse.Namespace, device: torch.device
) -> tuple[Pipeline, int]:
    """The reference: torchvision transforms + DataLoader + eager fp32, on the same images."""
    from torchvision import transforms as T

    loader: DeviceLoader = session.train_loader
    # the exact uint8 images and labels the device path trains on (stored zero-padded there)
    pad = CROP_PADDING if loader.augment else 0
    images = loader.images[
        ..., pad : loader.images.shape[-2] - pad, pad : loader.images.shape[-1] - pad
    ]
    images, labels = images.cpu(), loader.labels.cpu()
    assert images.shape[-1] == loader.image_size == 32, images.shape
    mean, std = NORMALISATION[args.dataset]
    transform = T.Compose(
        [
            T.RandomCrop(32, padding=CROP_PADDING),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
    data = torch.utils.data.DataLoader(
        UInt8Images(images, labels, transform),
        batch_size=args.batch,
        shuffle=True,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0,
        generator=torch.Generator().manual_seed(SEED),
    )
    torch.manual_seed(SEED)  # the device path's initial weights (build_session seeds the same way)
    model = build_model(session.recipe, session.info).to(device)
    opt = session.optimizer.defaults
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=opt["lr"],
        momentum=opt["momentum"],
        nesterov=opt["nesterov"],
        weight_decay=opt["weight_decay"],
    )

    def run(epochs: int) -> int:
        model.train()
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, errors, images
        for _ in range(epochs):
            for x, y in data:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    totals += torch.stack(
                        [
                            loss.detach().double() * y.numel(),
                            (logits.argmax(1) != y).sum().double(),
                            torch.tensor(float(y.numel()), dtype=torch.float64, device=device),
                        ]
                    )
        return int(totals.tolist()[2])  # syncs the device

    describe = f"DataLoader ({args.workers} workers) + torchvision transforms, eager fp32"
    return Pipeline("dataloader", describe, run), len(data.dataset)


def device_pipeline(session: Session, device: torch.device, args: argparse.Namespace) -> Pipeline:
    epoch = 0

    def run(epochs: int) -> int:
        nonlocal epoch
        seen = 0
        for _ in range(epochs):
            train_one_epoch(session, epoch)  # ends with a device sync
            seen += session.train_loader.num_samples
            epoch += 1
        return seen

    mode = "bf16 autocast, channels_last" if device.type == "cuda" else "fp32"
    describe = f"DeviceLoader + engine.train_one_epoch, {mode}" + (
        ", compiled" if args.compile else ""
    )
    return Pipeline("device", describe, run)


def time_run(pipeline: Pipeline, epochs: int, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    images = pipeline.run(epochs)
    sync(device)
    return images / (time.perf_counter() - start)


def summarise(pipelines: list[Pipeline], device: torch.device) -> dict:
    dev, ref = pipelines
    goal = GOALS[device.type]
    ratio = statistics.median(dev.images_per_s) / statistics.median(ref.images_per_s)
    paired = statistics.median(d / r for d, r in zip(dev.images_per_s, ref.images_per_s))
    return {"ratio": ratio, "paired": paired, "goal": goal, "met": ratio >= goal}


def goal_line(s: dict, device: torch.device) -> str:
    where = (
        "GPU goal: device >= 5x dataloader"
        if device.type == "cuda"
        else ("CPU goal: device not slower than dataloader (>= 1.0x)")
    )
    verdict = "met" if s["met"] else "NOT met"
    return (
        f"device / dataloader: {s['ratio']:.2f}x (medians), {s['paired']:.2f}x (paired); "
        f"{where}: {verdict}"
    )


def table_cells(pipelines: list[Pipeline]) -> list[tuple[str, ...]]:
    ref = statistics.median(pipelines[1].images_per_s)
    return [
        (
            p.name,
            p.describe,
            f"{statistics.median(p.images_per_s):,.0f}",
            f"{min(p.images_per_s):,.0f}-{max(p.images_per_s):,.0f}",
            f"{statistics.median(p.images_per_s) / ref:.2f}x",
        )
        for p in pipelines
    ]


HEADERS = ("pipeline", "what", "images/s (median)", "range", "x dataloader")


def print_table(pipelines: list[Pipeline], title: str, s: dict, device: torch.device) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        for cells in table_cells(pipelines):
            print("  ".join(cells))
        print(goal_line(s, device))
        return
    table = Table(title=title)
    for i, col in enumerate(HEADERS):
        if i != 1:  # "what" goes below the table, where it has room
            table.add_column(col, justify="left" if i == 0 else "right", no_wrap=True)
    for cells in table_cells(pipelines):
        table.add_row(*cells[:1], *cells[2:])
    console = Console()
    console.print(table)
    for cells in table_cells(pipelines):
        console.print(f"  {cells[0]}: {cells[1]}")
    console.print(goal_line(s, device))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 batches, 2 repeats: a smoke run")
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: cuda when a GPU is present, else cpu",
    )
    parser.add_argument("--dataset", choices=DATASETS, default="synthetic")
    parser.add_argument("--root", default="data", help="dataset root (as data.root in a recipe)")
    parser.add_argument("--batch", type=int, default=128, help="batch size")
    parser.add_argument(
        "--batches",
        type=int,
        help="batches per epoch: train on a fixed subset of BATCHES x batch images "
        "(default: the whole split; 30 for real data on CPU)",
    )
    parser.add_argument("--epochs", type=int, help="epochs per timed run")
    parser.add_argument("--repeats", type=int, help="timed runs per pipeline")
    parser.add_argument("--warmup", type=int, default=1, help="untimed epochs per pipeline first")
    parser.add_argument(
        "--workers", type=int, help="DataLoader worker processes (default: 8 on GPU, 2 on CPU)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the device pipeline's model (the engine's run.compile)",
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--csv",
        type=Path,
        help=f"CSV to append to (default {CSV_PATH.relative_to(ROOT)}; none with --quick)",
    )
    parser.add_argument("--no-csv", action="store_true", help="do not append to a CSV")
    parser.add_argument(
        "--markdown", type=Path, help="also write the summary to this Markdown file"
    )
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    d = defaults(device, args.dataset, args.quick)
    args.batches = args.batches if args.batches is not None else d.batches
    args.epochs = args.epochs or d.epochs
    args.repeats = args.repeats or d.repeats
    args.workers = args.workers if args.workers is not None else (8 if device.type == "cuda" else 2)
    for name in ("batch", "batches", "epochs", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1")
    if args.warmup < 0 or args.workers < 0:
        parser.error("--warmup and --workers must be >= 0")
    csv_path = None if args.no_csv else args.csv or (None if args.quick else CSV_PATH)

    try:  # a missing dataset or a --batches beyond the split ends here, with the reason
        session = device_session(args, device)  # sets the thread count when --threads is given
    except MssarError as err:
        parser.exit(2, f"pipeline.py: {err}\n")
    pipelines = [device_pipeline(session, device, args)]
    reference, ref_images = dataloader_pipeline(session, args, device)
    pipelines.append(reference)
    per_epoch = session.train_loader.num_samples
    if ref_images != per_epoch:  # the DeviceLoader drops a lone last image (BatchNorm)
        print(f"note: device epochs train {per_epoch} images, dataloader epochs {ref_images}")

    date = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    machine = machine_name(device)
    batches = len(session.train_loader)
    title = (
        f"{MODEL} {RECALIBRATION} training, {args.dataset}, batch {args.batch}: {machine}, "
        f"torch {torch.__version__}, {device.type}"
        + (f", {torch.get_num_threads()} threads" if device.type == "cpu" else "")
        + (" [--quick: smoke settings, not a measurement]" if args.quick else "")
    )
    print(title, flush=True)
    print(
        f"{args.warmup} warm-up epoch(s), then {args.repeats} alternated timed runs per pipeline "
        "of "
        f"{args.epochs} epoch(s) x {batches} batches ({per_epoch} images per epoch)",
        flush=True,
    )
    for p in pipelines:
        if args.warmup:
            start = time.perf_counter()
            p.run(args.warmup)
            sync(device)
            print(f"  warm-up {p.name}: {time.perf_counter() - start:.1f}s", flush=True)
    for i in range(args.repeats):
        for p in pipelines:
            p.images_per_s.append(time_run(p, args.epochs, device))
        print(
            f"  run {i + 1}/{args.repeats}: "
            + "  ".join(f"{p.name} {p.images_per_s[-1]:,.0f} img/s" for p in pipelines),
            flush=True,
        )

    s = summarise(pipelines, device)
    print_table(pipelines, title, s, device)
    markdown = (
        f"# Training pipeline: device-resident vs DataLoader\n\n{date}: {title}. "
        f"{args.repeats} alternated runs per pipeline of {args.epochs} epoch(s) x {batches} "
        f"batches, after {args.warmup} warm-up epoch(s).\n\n"
        + markdown_table(HEADERS, table_cells(pipelines), [False, False, True, True, True])
        + f"\n\n{goal_line(s, device)}"
    )
    print("\n" + markdown)

    if csv_path:
        ref = statistics.median(pipelines[1].images_per_s)
        common = {
            "date": date,
            "machine": machine,
            "torch": torch.__version__,
            "device": device.type,
            "threads": torch.get_num_threads(),
            "dataset": args.dataset,
            "model": MODEL,
            "recalibration": RECALIBRATION,
            "batch": args.batch,
            "batches_per_run": args.epochs * batches,
            "epochs_per_run": args.epochs,
            "warmup_epochs": args.warmup,
            "repeats": args.repeats,
            "goal": s["goal"],
            "goal_met": s["met"],
        }
        rows = []
        for p, is_device in zip(pipelines, (True, False)):
            median = statistics.median(p.images_per_s)
            rows.append(
                {
                    **common,
                    "pipeline": p.name,
                    "precision": "bf16-autocast" if is_device and device.type == "cuda" else "fp32",
                    "channels_last": is_device and device.type == "cuda",
                    "compile": is_device and args.compile,
                    "workers": 0 if is_device else args.workers,
                    "images_per_run": args.epochs * (per_epoch if is_device else ref_images),
                    "images_per_s": f"{median:.1f}",
                    "images_per_s_min": f"{min(p.images_per_s):.1f}",
                    "images_per_s_max": f"{max(p.images_per_s):.1f}",
                    "ratio": f"{median / ref:.4f}",
                    "paired_ratio": f"{s['paired']:.4f}" if is_device else "1.0000",
                }
            )
        append_csv(csv_path, CSV_COLUMNS, rows)
        print(f"appended to {csv_path}")
    elif args.quick and not args.no_csv:
        print("--quick: no CSV written (pass --csv PATH to write one)")
    if args.markdown:
        write_markdown(args.markdown, markdown)
        print(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()
