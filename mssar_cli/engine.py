"""Training and evaluation loops (paper §4.1, §4.3): they return numbers and print nothing.

SGD with Nesterov momentum, step learning-rate schedule per epoch, cross-entropy; bf16 autocast
on GPU, optional channels-last and ``torch.compile``. Progress reaches the caller through
``on_batch`` once every few batches (a device sync), so the GPU is not stalled every step. A
compiled model compiles in its first training batch: that batch is timed on its own and reported
through ``on_compiled``, and left out of the epoch's images/s.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mssar_cli.data import DatasetInfo, build_loaders
from mssar_cli.distributed import World, all_reduce_sum
from mssar_cli.errors import MssarError
from mssar_cli.models import create_model
from mssar_cli.recipe import Recipe

SYNC_EVERY = 10  # batches between progress updates (each one syncs the device)


class TrainingDiverged(MssarError):
    exit_code = 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MssarError(
            f"run.device: {name!r} asked for, but no CUDA GPU is available (use auto or cpu)"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise MssarError(
            f"run.device: {name!r} asked for, but MPS is not available (use auto or cpu)"
        )
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if precision == "bf16" else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class Session:
    """Everything one training run needs, built from a recipe."""

    recipe: Recipe
    device: torch.device
    world: World
    model: nn.Module  # what runs forward (maybe DDP-wrapped and compiled)
    module: nn.Module  # the plain model, for state_dicts
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: object
    test_loader: object
    info: DatasetInfo
    amp_dtype: torch.dtype | None
    seed: int
    warm: bool = False  # the model has run a training step (a compiled one has compiled)


def per_rank_batch_size(recipe: Recipe, world_size: int = 1) -> int:
    """``data.batch_size`` is the global mini-batch: each of the ``world_size`` processes trains
    on an equal share of it."""
    d = recipe.data
    if d.batch_size % world_size:
        raise MssarError(
            f"{recipe.source}: data.batch_size: {d.batch_size} is not divisible by the "
            f"{world_size} processes"
        )
    return d.batch_size // world_size


def build_model(recipe: Recipe, info: DatasetInfo) -> nn.Module:
    return create_model(
        recipe.model.name,
        num_classes=info.num_classes,
        recalibration=recipe.model.recalibration,
        in_channels=info.in_channels,
        **recipe.module_options(),
    )


def build_session(recipe: Recipe, seed: int, device: torch.device, world: World) -> Session:
    """Data first (a missing dataset fails before anything else happens), then model and
    optimizer."""
    if recipe.run.threads:
        torch.set_num_threads(recipe.run.threads)
    train_loader, test_loader, info = build_loaders(
        recipe.data,
        batch_size=per_rank_batch_size(recipe, world.world_size),
        device=device,
        seed=seed,
        rank=world.rank,
        world_size=world.world_size,
    )
    torch.manual_seed(seed)
    module = build_model(recipe, info).to(device)
    if recipe.run.channels_last:
        module = module.to(memory_format=torch.channels_last)
    o = recipe.optim
    optimizer = torch.optim.SGD(
        module.parameters(),
        lr=o.lr,
        momentum=o.momentum,
        nesterov=o.nesterov and o.momentum > 0,
        weight_decay=o.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(o.milestones), gamma=o.gamma)
    model = module
    if world.distributed:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(module, device_ids=ids)
    if recipe.run.compile:
        quiet_cpu_toolkit_notice()
        model = torch.compile(model)
    return Session(
        recipe,
        device,
        world,
        model,
        module,
        optimizer,
        scheduler,
        train_loader,
        test_loader,
        info,
        resolve_precision(recipe.run.precision, device),
        seed,
    )


class _NoCudaRuntimeNotice(logging.Filter):
    """Drops torch's "No CUDA runtime is found, using CUDA_HOME=..." record, and only it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


def quiet_cpu_toolkit_notice() -> None:
    """Keep torch's CUDA-toolkit notice off a CPU-only run's terminal.

    Inductor's C++ code generation imports ``torch.utils.cpp_extension``, which looks for a CUDA
    toolkit (``CUDA_HOME``, else ``nvcc`` on the PATH) and, when it finds one but no GPU, logs a
    warning that it will use it. A CPU kernel never does, so on such a machine every compiled run
    printed that line. Only that record of that logger is dropped; where a GPU is present torch
    does not log it at all.
    """
    logger = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _NoCudaRuntimeNotice) for f in logger.filters):
        logger.addFilter(_NoCudaRuntimeNotice())


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so a clock around it is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


BatchCallback = Callable[[int, int, float, float, float], None]  # done, total, loss, err%, img/s


@dataclass(frozen=True)
class EpochProgress:
    """How far a stopped epoch got: the checkpoint keeps it, and the resumed run trains exactly
    the remaining batches of the same seeded order, with these running sums."""

    epoch: int  # 0-based, as train_one_epoch takes it
    batches: int  # batches trained
    totals: tuple[float, float, float]  # loss sum, errors, images (summed over ranks)
    seconds: float  # spent on this epoch so far


class Stopped(Exception):
    """Training stopped inside an epoch on request (a signal); carries where it stopped."""

    def __init__(self, progress: EpochProgress) -> None:
        super().__init__(f"stopped in epoch {progress.epoch + 1} at batch {progress.batches}")
        self.progress = progress


def train_one_epoch(
    s: Session,
    epoch: int,
    on_batch: BatchCallback | None = None,
    *,
    resume: EpochProgress | None = None,
    stop: Callable[[], bool] | None = None,
    on_compiled: Callable[[float], None] | None = None,
) -> dict[str, float]:
    """One pass over the training split; returns loss and top-1 error (%) summed over ranks.

    ``resume`` continues a stopped pass. ``stop`` is asked after every batch (every
    ``SYNC_EVERY`` batches, agreed by all ranks, when distributed); when it answers True before
    the last batch, :class:`Stopped` is raised with the progress to save.

    With ``run.compile``, the session's first training batch is where ``torch.compile`` compiles
    the model: that batch (the same step as any other) is timed between two device syncs and its
    seconds go to ``on_compiled``; the images/s (``on_batch``'s and the returned one) count from
    the end of that batch, while ``epoch_seconds`` stays the epoch's wall time.
    """
    s.model.train()
    first = resume.batches if resume else 0
    s.train_loader.set_epoch(epoch, first)
    totals = torch.zeros(3, dtype=torch.float64, device=s.device)  # loss sum, errors, images
    if resume and s.world.is_main:  # the saved sums are over all ranks: count them once
        totals += torch.tensor(resume.totals, dtype=torch.float64, device=s.device)
    earlier = resume.seconds if resume else 0.0
    start = time.perf_counter()
    # images/s from here: moved past the compiling batch, if this epoch has it
    rate_start, seen_before, warm_images = start, float(totals[2]), 0.0
    num_batches = len(s.train_loader)
    for index, (images, labels) in enumerate(s.train_loader, start=first):
        compiling = s.recipe.run.compile and not s.warm
        if compiling:
            synchronize(s.device)
            compile_start = time.perf_counter()
        if s.recipe.run.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(s.device, s.amp_dtype):
            logits = s.model(images)
            loss = F.cross_entropy(logits, labels)
        s.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        s.optimizer.step()
        with torch.no_grad():
            batch = torch.stack(
                [
                    loss.detach().double() * labels.numel(),
                    (logits.argmax(1) != labels).sum().double(),
                    torch.tensor(float(labels.numel()), dtype=torch.float64, device=s.device),
                ]
            )
            totals += batch
        s.warm = True
        if compiling:
            synchronize(s.device)
            rate_start = time.perf_counter()
            if on_compiled:
                on_compiled(rate_start - compile_start)
            seen_before = float(totals[2])
            warm_images = labels.numel() * s.world.world_size
        done = index + 1
        synced = done % SYNC_EVERY == 0 or done == num_batches
        if synced:
            loss_sum, errors, seen = totals.tolist()
            if not math.isfinite(loss_sum):
                raise TrainingDiverged(
                    f"the training loss became {loss_sum} in epoch {epoch + 1} (batch {done}); "
                    "stopped, the last good checkpoint is kept (lower optim.lr?)"
                )
            if on_batch:
                elapsed = time.perf_counter() - rate_start
                trained = (seen - seen_before) * s.world.world_size
                on_batch(
                    done,
                    num_batches,
                    loss_sum / seen,
                    100 * errors / seen,
                    trained / elapsed if trained else 0.0,
                )
        if stop is not None and done < num_batches and _stop_agreed(stop, synced, s):
            progress = totals.clone()
            all_reduce_sum(progress, s.world)
            seconds = earlier + time.perf_counter() - start
            raise Stopped(EpochProgress(epoch, done, tuple(progress.tolist()), seconds))
    all_reduce_sum(totals, s.world)
    loss_sum, errors, seen = totals.tolist()
    if not math.isfinite(loss_sum):
        raise TrainingDiverged(
            f"the training loss became {loss_sum} in epoch {epoch + 1}; stopped, the last good "
            "checkpoint is kept"
        )
    end = time.perf_counter()
    seconds = earlier + end - start
    images_per_s = seen / seconds
    if warm_images and seen > warm_images:  # the compiling batch left out
        images_per_s = (seen - warm_images) / (seconds - (rate_start - start))
    return {
        "train_loss": loss_sum / seen,
        "train_err": 100 * errors / seen,
        "epoch_seconds": seconds,
        "images_per_s": images_per_s,
    }


def _stop_agreed(stop: Callable[[], bool], synced: bool, s: Session) -> bool:
    """Whether to stop after this batch: at once alone; at a sync point, by any rank's request,
    when distributed (every rank must stop at the same batch)."""
    if not s.world.distributed:
        return stop()
    if not synced:
        return False
    flag = torch.tensor([1.0 if stop() else 0.0], device=s.device)
    return all_reduce_sum(flag, s.world).item() > 0


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    world: World | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """Test loss and top-1 / top-5 error (%) over the whole split (summed over ranks)."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top1 err, top5 err, n
    for images, labels in loader:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        correct_k = (top == labels[:, None]).any(dim=1)
        totals += torch.stack(
            [
                F.cross_entropy(logits, labels, reduction="sum").double(),
                (top[:, 0] != labels).sum().double(),
                (~correct_k).sum().double(),
                torch.tensor(float(labels.numel()), dtype=torch.float64, device=device),
            ]
        )
    if world is not None:
        all_reduce_sum(totals, world)
    loss_sum, top1, top5, seen = totals.tolist()
    return {
        "test_loss": loss_sum / seen,
        "test_err": 100 * top1 / seen,
        "test_top5_err": 100 * top5 / seen,
    }
