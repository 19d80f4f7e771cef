"""What ``mssar train`` shows while it runs: a Rich progress bar, or one plain line per epoch."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def epoch_line(row: dict, epochs: int) -> str:
    top5 = f" top5 {row['test_top5_err']:5.2f}%" if "test_top5_err" in row else ""
    return (
        f"epoch {row['epoch']:>3}/{epochs}  lr {row['lr']:.4g}  "
        f"train loss {row['train_loss']:.4f} err {row['train_err']:5.2f}%  "
        f"test loss {row['test_loss']:.4f} err {row['test_err']:5.2f}%{top5}  "
        f"{row['epoch_seconds']:.1f}s  {row['images_per_s']:.0f} img/s"
    )


class PlainReporter:
    """One line per epoch (``--quiet`` or output that is not a terminal)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.epochs = 0

    def start(self, run_dir: Path, session, first_epoch: int) -> None:
        self.epochs = session.recipe.optim.epochs
        info = session.info
        resumed = f", resuming after epoch {first_epoch}" if first_epoch else ""
        self.console.print(
            f"{session.recipe.experiment} seed {session.seed}: {session.recipe.model.name} "
            f"({session.recipe.model.recalibration}) on {info.name} "
            f"({session.train_loader.num_samples * session.world.world_size} train / "
            f"{info.test_size} test images), "
            f"{session.device}{resumed} -> {run_dir}",
            markup=False,
            highlight=False,
        )

    def batch(self, epoch, done, total, loss, err, images_per_s) -> None:
        pass

    def compiled(self, seconds: float) -> None:
        """The first training batch of a compiled model, which is where it compiles: its own
        line, since its seconds are left out of the epoch's images/s."""
        self.console.print(
            f"compiling the model (first training batch): {seconds:.1f} s",
            markup=False,
            highlight=False,
        )

    def epoch(self, row: dict) -> None:
        self.console.print(epoch_line(row, self.epochs), markup=False, highlight=False)

    def finish(self, summary: dict) -> None:
        final = summary["final"]
        top5 = f", top-5 {final['test_top5_err']:.2f}%" if "test_top5_err" in final else ""
        self.console.print(
            f"finished: final test error {final['test_err']:.2f}%{top5} after "
            f"{summary['epochs']} epochs "
            f"({summary['total_epoch_seconds']:.0f} s of training)",
            markup=False,
            highlight=False,
        )

    def note(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)


class RichReporter(PlainReporter):
    """A live bar for the current epoch (loss, error, images/s) above the finished epochs' lines."""

    def __init__(self, console: Console) -> None:
        super().__init__(console)
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "loss {task.fields[loss]:.4f}  err {task.fields[err]:5.2f}%  "
                "{task.fields[ips]:.0f} img/s"
            ),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self.task = None

    def start(self, run_dir, session, first_epoch) -> None:
        super().start(run_dir, session, first_epoch)
        self.progress.start()

    def batch(self, epoch, done, total, loss, err, images_per_s) -> None:
        fields = dict(epoch=epoch + 1, epochs=self.epochs, loss=loss, err=err, ips=images_per_s)
        if self.task is None:
            self.task = self.progress.add_task("train", total=total, **fields)
        self.progress.update(self.task, completed=done, total=total, **fields)

    def epoch(self, row: dict) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None
        self.progress.console.print(epoch_line(row, self.epochs), markup=False, highlight=False)

    def finish(self, summary: dict) -> None:
        self.progress.stop()
        super().finish(summary)

    def close(self) -> None:
        self.progress.stop()
