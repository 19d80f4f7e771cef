"""The GPU configuration, checked on the CPU: ``run.compile``, ``run.channels_last`` and
``run.precision=bf16`` together through the real ``train`` / checkpoint / resume /
``evaluate_saved`` path; no torch or Dynamo warning on the way; the compiling first batch timed on
its own; and every gradient in its parameter's layout (what DDP's buckets expect).

The compiled runs train a network made of the CIFAR ResNets' own parts (stem, one recalibrated
basic block with its BN recomputation, the registry's MS-SAR, classifier; :class:`TinyNet`): the
code ``torch.compile`` traces is the networks' code, and the inductor's C++ kernels for it build
within the default test run, where ResNet-20's take minutes on two cores. The full-size run is the
``slow`` test at the end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mssar_cli import engine, partition, training
from mssar_cli import recipe as recipes
from mssar_cli.distributed import World
from mssar_cli.evaluation import evaluate_saved
from mssar_cli.models import create_model
from mssar_cli.models.blocks import RecalibratedBasicBlock, with_recalibration
from mssar_cli.recalibration import recalibration_factory
from mssar_cli.recalibration.mssar import MSSAR
from mssar_cli.recalibration.se import SqueezeExcitation

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "recipes" / "smoke.yaml"
GPU_SETTINGS = ["run.compile=true", "run.channels_last=true", "run.precision=bf16"]
# one batch shape for training and evaluation: a second shape would recompile the model with a
# symbolic batch size (a third graph); one thread keeps the CPU runs bitwise repeatable
TINY_RUN = [
    *GPU_SETTINGS,
    "run.device=cpu",
    "run.threads=1",
    "data.subset=64",
    "data.test_subset=32",
    "data.batch_size=32",
    "data.eval_batch_size=32",
]


class TinyNet(nn.Module):
    """Stem, one recalibrated basic block of the CIFAR ResNets and the classifier."""

    def __init__(self, num_classes: int, make_recalibration, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.block = with_recalibration(RecalibratedBasicBlock, make_recalibration)(16, 16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(F.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def build_tiny(recipe, info) -> nn.Module:
    """``engine.build_model`` for the compiled runs: the recipe's recalibration in a TinyNet."""
    factory = recalibration_factory(recipe.model.recalibration, recipe.module_options(), 3)
    return TinyNet(info.num_classes, factory, info.in_channels)


class Interrupted(Exception):
    """Raised by a reporter after an epoch's line: the run ends as a crash would, after the
    epoch's checkpoint is written."""


class Recorder:
    """A reporter that keeps what it is told (``interrupt_after``: raise after that epoch)."""

    def __init__(self, interrupt_after: int | None = None) -> None:
        self.interrupt_after = interrupt_after
        self.compiled_seconds: list[float] = []
        self.rows: list[dict] = []
        self.notes: list[str] = []

    def start(self, run_dir, session, first_epoch) -> None:
        self.first_epoch = first_epoch

    def batch(self, epoch, done, total, loss, err, images_per_s) -> None:
        pass

    def compiled(self, seconds: float) -> None:
        self.compiled_seconds.append(seconds)

    def epoch(self, row: dict) -> None:
        self.rows.append(row)
        if row["epoch"] == self.interrupt_after:
            raise Interrupted

    def finish(self, summary: dict) -> None:
        self.summary = summary

    def note(self, text: str) -> None:
        self.notes.append(text)


class _Records(logging.Handler):
    """Keeps the records a logger lets through (its filters applied)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclasses.dataclass
class CompiledRuns:
    """What :func:`run_compiled` saw: the reporters, the re-evaluation, and the warnings, graph
    breaks and toolkit notices of all three runs."""

    cwd: Path
    interrupted: Recorder
    resumed: Recorder
    whole: Recorder
    evaluated: dict
    caught: list
    graph_breaks: dict
    toolkit_notices: list
    seconds: float


def _forget_dynamo_warnings() -> None:
    """Dynamo warns once per process (``warn_once``): forget earlier tests' warnings so that
    a warning of these runs is seen."""
    cache = getattr(torch._dynamo.utils, "warn_once_cache", None)
    if cache is not None:
        cache.clear()


def run_compiled(cwd: Path, sets: list[str], build_model=None, **inductor) -> CompiledRuns:
    """Three compiled runs of one recipe (the smoke recipe with ``sets``, 2 epochs): B stopped
    after epoch 1 then resumed, A uninterrupted; A re-evaluated from its run directory.
    Warnings, graph breaks and the toolkit notice are recorded throughout; ``build_model``
    replaces the engine's, ``inductor`` patches the inductor's configuration."""
    toolkit = _Records()
    toolkit_logger = logging.getLogger("torch.utils.cpp_extension")
    toolkit_logger.addHandler(toolkit)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    _forget_dynamo_warnings()
    threads = torch.get_num_threads()  # run.threads sets the process's count: given back below
    start = time.perf_counter()
    try:
        with (
            pytest.MonkeyPatch.context() as mp,
            warnings.catch_warnings(record=True) as caught,
            torch._inductor.config.patch(inductor),
        ):
            warnings.simplefilter("always")
            mp.chdir(cwd)
            if build_model is not None:
                mp.setattr(engine, "build_model", build_model)
            b = recipes.load(SMOKE, [*sets, "experiment=compiled_b"])
            a = recipes.load(SMOKE, [*sets, "experiment=compiled_a"])
            interrupted, resumed, whole = Recorder(interrupt_after=1), Recorder(), Recorder()
            with pytest.raises(Interrupted):
                training.train(b, reporter=interrupted)
            training.train(b, resume=True, reporter=resumed)
            training.train(a, reporter=whole)
            evaluated = evaluate_saved(a.run_dir(), [])
    finally:
        toolkit_logger.removeHandler(toolkit)
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    graph_breaks = dict(torch._dynamo.utils.counters["graph_break"])
    torch._dynamo.reset()
    return CompiledRuns(
        cwd,
        interrupted,
        resumed,
        whole,
        evaluated,
        list(caught),
        graph_breaks,
        [r.getMessage() for r in toolkit.records],
        seconds,
    )


@pytest.fixture(scope="module")
def compiled_runs(tmp_path_factory) -> CompiledRuns:
    """The compiled runs of TinyNet with MS-SAR on synthetic data, 2 batches an epoch."""
    # scalar C++ kernels: the vectorised ones take longer to build, and the kernels' code is
    # torch's concern here, what is traced into them ours
    return run_compiled(
        tmp_path_factory.mktemp("compiled"), TINY_RUN, build_tiny, **{"cpp.vec_isa_ok": False}
    )


def _final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)


def check_trains_resumes_and_evaluates(runs: CompiledRuns, test_images: int) -> None:
    a_dir = runs.cwd / "results" / "synthetic" / "compiled_a" / "seed0"
    b_dir = runs.cwd / "results" / "synthetic" / "compiled_b" / "seed0"
    assert runs.resumed.first_epoch == 1 and len(runs.resumed.rows) == 1
    state_a, state_b = _final_state(a_dir), _final_state(b_dir)
    assert state_a["epoch"] == state_b["epoch"] == 2
    model_a, model_b = state_a["model"], state_b["model"]
    assert list(model_a) == list(model_b)
    different = [k for k in model_a if not torch.equal(model_a[k], model_b[k])]
    assert not different, f"the resumed run differs from the uninterrupted one in {different[:5]}"
    momenta_a = [s["momentum_buffer"] for s in state_a["optimizer"]["state"].values()]
    momenta_b = [s["momentum_buffer"] for s in state_b["optimizer"]["state"].values()]
    assert len(momenta_a) == len(momenta_b) > 0
    assert all(torch.equal(x, y) for x, y in zip(momenta_a, momenta_b))
    for key in ("train_loss", "train_err", "test_loss", "test_err"):
        resumed = [r[key] for r in runs.interrupted.rows + runs.resumed.rows]
        assert resumed == [r[key] for r in runs.whole.rows], key
    summary = json.loads((a_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs"] == 2
    run = state_a["recipe"]["run"]
    assert (run["compile"], run["channels_last"], run["precision"]) == (True, True, "bf16")
    # re-evaluated without compiling, in bf16 and channels-last too: the compiled evaluation's
    # fused kernels round differently
    last = runs.whole.rows[-1]
    assert runs.evaluated["logged"]["test_err"] == last["test_err"]
    assert abs(runs.evaluated["test_err"] - last["test_err"]) <= 100 / test_images  # one image
    assert runs.evaluated["test_loss"] == pytest.approx(last["test_loss"], rel=2e-2)


def check_one_graph_and_no_warning(runs: CompiledRuns) -> None:
    assert not runs.graph_breaks, f"graph breaks under torch.compile: {runs.graph_breaks}"
    shown = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in runs.caught]
    assert not shown, "\n".join(shown)
    assert not [m for m in runs.toolkit_notices if m.startswith("No CUDA runtime")]


def check_compilation_reported_apart(runs: CompiledRuns, train_images: int) -> None:
    for recorder in (runs.interrupted, runs.resumed, runs.whole):
        assert len(recorder.compiled_seconds) == 1 and recorder.compiled_seconds[0] > 0
    first = runs.whole.rows[0]
    assert first["images_per_s"] > train_images / first["epoch_seconds"]


def test_compiled_run_trains_checkpoints_resumes_and_evaluates(compiled_runs):
    check_trains_resumes_and_evaluates(compiled_runs, test_images=32)


def test_compiled_run_is_one_graph_and_warns_nothing(compiled_runs):
    check_one_graph_and_no_warning(compiled_runs)


def test_compilation_is_reported_as_its_own_line(compiled_runs):
    """Every training session compiles once, in its first batch (the resumed one too); that
    batch is left out of its epoch's images/s. Needs ``training._run_epochs`` to hand the
    reporter's ``compiled`` to ``train_one_epoch`` (``on_compiled``)."""
    check_compilation_reported_apart(compiled_runs, train_images=64)


# --- the warm-up batch, without a compiler ------------------------------------------------------


class SlowFirstCall(nn.Module):
    """A model whose first forward takes ``delay`` seconds longer, as a compiled one does."""

    def __init__(self, module: nn.Module, delay: float) -> None:
        super().__init__()
        self.module, self.delay, self.calls = module, delay, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 1:
            time.sleep(self.delay)
        return self.module(x)


def _session() -> engine.Session:
    """A smoke-recipe session of 4 batches of 16 (its run.threads=1 is the one_thread fixture's
    count, which that fixture gives back)."""
    recipe = recipes.load(
        SMOKE,
        ["run.device=cpu", "run.threads=1", "data.subset=64", "data.batch_size=16"],
    )
    return engine.build_session(recipe, 0, torch.device("cpu"), World())


def test_the_compiling_batch_is_timed_apart_and_changes_no_number(one_thread):
    """The first batch of a compiled session is timed apart and left out of images/s; the run
    trains exactly the batches, and computes exactly the numbers, of one that does not compile."""
    delay = 0.6
    plain, marked = _session(), _session()
    # the warm-up applies to a session whose recipe compiles; its model here only pretends to
    marked = dataclasses.replace(
        marked,
        recipe=dataclasses.replace(
            marked.recipe, run=dataclasses.replace(marked.recipe.run, compile=True)
        ),
        model=SlowFirstCall(marked.module, delay),
    )
    compiled, rates = [], []
    rows_plain = [engine.train_one_epoch(plain, e) for e in range(2)]
    rows_marked = [
        engine.train_one_epoch(
            marked, e, lambda *a: rates.append(a[-1]), on_compiled=compiled.append
        )
        for e in range(2)
    ]
    assert len(compiled) == 1 and compiled[0] >= delay
    assert marked.warm and marked.model.calls == 2 * 4  # no extra step: 4 batches an epoch
    for key in ("train_loss", "train_err"):
        assert [r[key] for r in rows_marked] == [r[key] for r in rows_plain]
    for (name, p), q in zip(plain.module.named_parameters(), marked.module.parameters()):
        assert torch.equal(p, q), name
    for b_plain, b_marked in zip(plain.module.buffers(), marked.module.buffers()):
        assert torch.equal(b_plain, b_marked)  # BN statistics saw the same batches
    first = rows_marked[0]
    assert first["epoch_seconds"] >= delay  # the epoch's wall time keeps it
    # images/s counts the 3 batches after the warm-up, over the time after it
    assert first["images_per_s"] > 48 / (first["epoch_seconds"] - compiled[0]) * 0.99
    assert first["images_per_s"] > 64 / first["epoch_seconds"]
    assert rates[0] > 64 / first["epoch_seconds"]  # the progress bar's, at the epoch's end


def test_the_reporter_prints_the_compilation_line():
    from rich.console import Console

    from mssar_cli.progress import PlainReporter, RichReporter

    for cls in (PlainReporter, RichReporter):
        console = Console(record=True, width=120)
        cls(console).compiled(241.26)
        assert (
            console.export_text().strip() == "compiling the model (first training batch): 241.3 s"
        )


# --- no warning from the traced MS-SAR ---------------------------------------------------------


@pytest.mark.parametrize("implementation", ["fast", "autograd"])
@pytest.mark.parametrize("size", [(32, 32), (7, 7)], ids=["uniform", "non-uniform"])
def test_traced_mssar_warns_nothing_and_matches_eager(implementation, size, one_thread):
    """Under Dynamo the partition plans are built by the uncached functions (a cached one is
    traced with a warning); the traced module computes what the eager one does."""
    torch.manual_seed(0)
    module = MSSAR(8, implementation=implementation).train()
    x = torch.randn(2, 8, *size)
    torch._dynamo.reset()
    _forget_dynamo_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.compile(module, backend="eager", fullgraph=True)
        out = traced(x)
    torch._dynamo.reset()
    assert not [str(w.message) for w in caught]
    eager = MSSAR(8, implementation=implementation).train()
    eager.load_state_dict(module.state_dict())
    torch.testing.assert_close(out, eager(x))


def test_partition_plans_are_built_once_per_shape_outside_compile():
    partition._cached_grid_plan.cache_clear()
    partition._cached_axis_plan.cache_clear()
    module = MSSAR(8, implementation="autograd").train()
    for size in [(32, 32), (32, 32), (16, 16), (32, 32)]:
        module(torch.randn(2, 8, *size))
    grid = partition._cached_grid_plan.cache_info()
    assert (grid.misses, grid.hits) == (2, 2)
    assert partition._cached_axis_plan.cache_info().misses == 2  # lengths 32 and 16
    assert partition.grid_plan(32, 32, (1, 2, 4), torch.device("cpu"), torch.float32) is (
        partition.grid_plan(32, 32, (1, 2, 4), torch.device("cpu"), torch.float32)
    )


def test_the_cpu_toolkit_notice_alone_is_dropped():
    """Where a CUDA toolkit is installed but no GPU, torch logs "No CUDA runtime is found" when
    inductor's C++ builder loads; a compiled run drops that record (and no other)."""
    engine.quiet_cpu_toolkit_notice()
    engine.quiet_cpu_toolkit_notice()  # once is enough, twice adds nothing
    logger = logging.getLogger("torch.utils.cpp_extension")
    assert sum(isinstance(f, engine._NoCudaRuntimeNotice) for f in logger.filters) == 1
    records = _Records()
    logger.addHandler(records)
    try:
        logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        logger.warning("Error checking compiler version for %s", "c++")
        from torch.utils.cpp_extension import _find_cuda_home

        _find_cuda_home()  # logs the notice itself on such a machine
    finally:
        logger.removeHandler(records)
    assert [r.getMessage() for r in records.records] == ["Error checking compiler version for c++"]


# --- gradients in their parameters' layout -------------------------------------------------------

GRADIENT_CASES = {
    "mssar-fast": ("resnet20", "mssar", {}),
    "mssar-autograd": ("resnet20", "mssar", {"implementation": "autograd"}),
    "mssar-direct": ("resnet20", "mssar", {"implementation": "direct"}),
    "se": ("resnet20", "se", {}),
    "se-one-unit": ("resnet20", "se", {"reduction": 16}),
    "mssar-densenet-multistage": ("densenet100", "mssar", {}),
}


@pytest.mark.parametrize("layout", ["contiguous", "channels-last-bf16"])
@pytest.mark.parametrize("case", list(GRADIENT_CASES))
def test_every_gradient_has_its_parameters_strides(case, layout, one_thread):
    """DDP copies each gradient into a bucket view laid out as the parameter, and warns when the
    strides differ ("Grad strides do not match bucket view strides"). MS-SAR's fused backward
    made Ω2's gradient a transposed block: for D' = 1 a (D, 1) tensor with strides (1, D)."""
    name, recalibration, options = GRADIENT_CASES[case]
    torch.manual_seed(0)
    model = create_model(name, 10, recalibration, **options)
    if case == "mssar-fast":  # D' = 1 in the first stage, more in the others
        widths = {m.hidden_channels for m in model.modules() if isinstance(m, MSSAR)}
        assert 1 in widths and max(widths) > 1
    if case == "se-one-unit":
        assert any(
            m.fc1.out_channels == 1 for m in model.modules() if isinstance(m, SqueezeExcitation)
        )
    x = torch.randn(2, 3, 32, 32)
    if layout == "channels-last-bf16":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", torch.bfloat16, enabled=layout != "contiguous"):
        loss = F.cross_entropy(model(x), torch.tensor([1, 2]))
    loss.backward()
    wrong = [
        f"{n}: shape {tuple(p.shape)} strides {p.stride()}, gradient {p.grad.stride()}"
        for n, p in model.named_parameters()
        if p.grad is not None and p.grad.stride() != p.stride()
    ]
    assert not wrong, "\n".join(wrong)
    assert all(p.grad is not None for p in model.parameters())


# --- the full-size compiled run ------------------------------------------------------------------


FULL_RUN = [
    *GPU_SETTINGS,
    "run.device=cpu",
    "run.threads=1",
    "data.subset=128",
    "data.test_subset=64",
]


@pytest.mark.slow
def test_full_size_compiled_run(tmp_path):
    """The same checks on the smoke recipe's own network (ResNet-20 with MS-SAR, batches of
    64 for training and evaluation), compiled as users compile it; then ``mssar train`` and
    ``mssar eval`` as processes: nothing on stderr, the compilation on its own line."""
    (tmp_path / "in-process").mkdir()
    runs = run_compiled(tmp_path / "in-process", FULL_RUN)
    check_trains_resumes_and_evaluates(runs, test_images=64)
    check_one_graph_and_no_warning(runs)
    check_compilation_reported_apart(runs, train_images=128)

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # this tree's mssar_cli, whatever is installed
    env |= {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    cwd = tmp_path / "processes"
    cwd.mkdir()

    def mssar(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "mssar_cli", *args]
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)

    sets = [arg for item in FULL_RUN for arg in ("--set", item)]
    trained = mssar("train", str(SMOKE), "--quiet", *sets)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert trained.stderr == ""
    assert trained.stdout.count("compiling the model (first training batch): ") == 1
    evaluated = mssar("eval", str(cwd / "results" / "synthetic" / "smoke" / "seed0"))
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    assert evaluated.stderr == ""
