"""mssar ablate --launcher local | slurm | submitit-local: bad options refused before anything is
written, the sbatch script submitit writes for a grid (a fake sbatch on the PATH, no Slurm), the
state of each run (--dry-run), GPU placement on a multi-GPU box (GPU count injected), DDP from a
Slurm task's environment, the requeue of a run stopped by submitit, and (slow) a grid run end to
end through submitit's LocalExecutor beside the same grid run by --launcher local."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mssar_cli import ablation, distributed, launch, runs
from mssar_cli.cli import app
from mssar_cli.launch import job, local, state
from mssar_cli.launch.job import MARK, TrainRun

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "recipes" / "smoke.yaml"
TINY = ["--set", "data.subset=64", "--set", "data.test_subset=32", "--set", "run.device=cpu"]
TINY += ["--set", "run.threads=1", "--set", "optim.epochs=1", "--set", "optim.milestones=[]"]
SLURM_24 = [
    *("ablate", "scales", "smoke.yaml", "--seeds", "3", "--launcher", "slurm", "--jobs", "6"),
    *("--partition", "gpu", "--time", "240", "--gpus-per-run", "1", "--cpus-per-run", "8"),
    *("--slurm", "account=vision", "--slurm", "qos=high", "--slurm", "constraint=a100"),
    *("--slurm", "mem=64G"),
]


def _script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.fixture
def fake_slurm(tmp_path_factory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``sbatch`` that records its arguments and the script, then says ``Submitted batch job
    1234``; ``srun`` (submitit looks for it); nothing else of Slurm (no squeue)."""
    bin_dir = tmp_path_factory.mktemp("bin")  # outside the working directory
    _script(
        bin_dir / "sbatch",
        '#!/bin/sh\necho "$@" >> "$(dirname "$0")/sbatch.calls"\n'
        'cp "$1" "$(dirname "$0")/sbatch.script"\necho "Submitted batch job 1234"\n',
    )
    _script(bin_dir / "srun", "#!/bin/sh\nexit 0\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def _invoke(args: list[str]):
    return CliRunner().invoke(app, args)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --- bad input: one line, exit 2, nothing submitted, nothing written ------------------------------


@pytest.mark.parametrize(
    ("args", "gpus", "message"),
    [
        (["--launcher", "kubernetes"], 0, "--launcher must be one of local, slurm, submitit-local"),
        (
            ["--launcher", "slurm", "--time", "60", "--slurm", "acount=vision"],
            0,
            "did you mean account",
        ),
        (["--launcher", "slurm", "--time", "60", "--slurm", "nodes"], 0, "expected KEY=VALUE"),
        (["--launcher", "slurm", "--time", "60", "--slurm", "time=5"], 0, "use --time"),
        (["--launcher", "slurm"], 0, "needs --time MINUTES"),
        (
            ["--launcher", "slurm", "--time", "60", "--runs-per-gpu", "2"],
            0,
            "--runs-per-gpu is for",
        ),
        (
            ["--launcher", "slurm", "--time", "9", "--gpus-per-run", "4", "--cpus-per-run", "6"],
            0,
            "not a multiple of --gpus-per-run 4",
        ),
        (["--runs-per-gpu", "2"], 0, "this machine has no GPU"),
        (["--runs-per-gpu", "0"], 2, "--runs-per-gpu: expected at least 1"),
        (["--gpus-per-run", "2"], 2, "--gpus-per-run is for --launcher slurm"),
        (["--launcher", "submitit-local", "--gpus-per-run", "2"], 2, "--gpus-per-run is for"),
        (["--partition", "gpu"], 0, "--partition is for --launcher slurm, not local"),
        (["--slurm", "account=x"], 0, "--slurm is for --launcher slurm"),
        (["--time", "60"], 0, "--time is for --launcher slurm, not local"),
        (["--jobs", "0"], 0, "--jobs: expected at least 1, got 0"),
    ],
)
def test_bad_launch_options_are_one_line_exit_2(
    smoke: Path, fake_slurm: Path, monkeypatch, args: list[str], gpus: int, message: str
) -> None:
    monkeypatch.setattr(launch, "gpu_count", lambda: gpus)
    result = _invoke(["ablate", "recalibration", "smoke.yaml", *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mssar: error: "), result.output
    assert message in lines[0], lines[0]
    assert result.stdout == "" and "Traceback" not in result.output
    assert _files(smoke.parent) == ["smoke.yaml"]
    assert not (fake_slurm / "sbatch.calls").exists()


def test_unknown_slurm_key_lists_the_known_ones(smoke: Path) -> None:
    result = _invoke(
        [
            "ablate",
            "scales",
            "smoke.yaml",
            "--launcher",
            "slurm",
            "--time",
            "60",
            "--slurm",
            "gpu_type=a100",
            "--dry-run",
        ]
    )
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert line.startswith("mssar: error: --slurm gpu_type: unknown Slurm parameter")
    for known in ("account", "qos", "constraint", "mem", "exclude"):
        assert known in line
    assert "array_parallelism" not in line  # set by --jobs, not offered


def test_slurm_without_sbatch_on_the_path(smoke: Path, tmp_path_factory, monkeypatch) -> None:
    empty = tmp_path_factory.mktemp("empty")
    monkeypatch.setenv("PATH", str(empty))
    result = _invoke(["ablate", "scales", "smoke.yaml", "--launcher", "slurm", "--time", "60"])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip() == (
        "mssar: error: --launcher slurm: sbatch and srun not on the PATH (not a Slurm login "
        "node?); use --launcher local or submitit-local on this machine"
    )
    assert _files(smoke.parent) == ["smoke.yaml"]
    # the plan of a Slurm grid can still be looked at here
    result = _invoke(
        ["ablate", "scales", "smoke.yaml", "--launcher", "slurm", "--time", "60", "--dry-run"]
    )
    assert result.exit_code == 0 and "8 runs: 0 finished" in result.stdout


# --- the sbatch script of a 24-run grid -----------------------------------------------------------


def test_slurm_array_of_24_runs_sbatch_script(smoke: Path, fake_slurm: Path) -> None:
    """Table 3's grid with 3 seeds: one job array, 6 tasks at once, every option in the script,
    each task's pickle a TrainRun of its run; the submission is recorded, so a second submission
    submits nothing and --dry-run shows the runs queued."""
    work = smoke.parent
    result = _invoke(SLURM_24)
    assert result.exit_code == 0, result.output
    assert "24 runs: 0 finished (skipped), 0 interrupted (resumed), 24 to start" in result.stdout
    assert "submitted 24 runs as Slurm job 1234 (1234_0 ... 1234_23, 6 at once)" in result.stdout
    assert "training logs: results/synthetic/logs/<experiment>-seed<k>.log" in result.stdout
    folder = work / "results" / "synthetic" / "logs" / "submitit"
    calls = (fake_slurm / "sbatch.calls").read_text().splitlines()
    assert len(calls) == 1 and calls[0].startswith(str(folder))
    script = (folder / "1234_submission.sh").read_text()
    assert script == (fake_slurm / "sbatch.script").read_text()
    lines = script.splitlines()
    for expected in (
        "#SBATCH --array=0-23%6",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=240",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --account=vision",
        "#SBATCH --qos=high",
        "#SBATCH --constraint=a100",
        "#SBATCH --mem=64G",
        "#SBATCH --job-name=mssar-scales",
        "#SBATCH --signal=USR2@120",
        f"#SBATCH --output={folder}/%A_%a_0_log.out",
        f"#SBATCH --error={folder}/%A_%a_0_log.err",
    ):
        assert expected in lines, f"{expected} not in\n{script}"
    assert "#SBATCH --ntasks-per-node" not in script  # one task per run on one GPU
    assert lines[-1].endswith(f"-u -m submitit.core._submit {folder}")
    # each array task runs one planned run: mssar train --resume with that run's overrides
    planned = ablation.plan("scales", "smoke.yaml", [], [], 3)
    for index, run in enumerate(planned):
        with open(folder / f"1234_{index}_submitted.pkl", "rb") as handle:
            delayed = pickle.load(handle)
        assert isinstance(delayed.function, TrainRun)
        command = delayed.function.command
        assert command[2:7] == ["mssar_cli", "train", "smoke.yaml", "--resume", "--quiet"]
        assert f"experiment={run.recipe.experiment}" in command
        assert f"run.seed={run.seed}" in command and "run.threads=8" in command
        assert delayed.function.log_path == str(run.log_path.resolve())
        assert delayed.function.cwd == str(work)
    record = json.loads((folder.parent / "submitted.json").read_text())
    assert sorted(entry["job"] for entry in record.values()) == sorted(
        f"1234_{i}" for i in range(24)
    )

    result = _invoke(["ablate", "scales", "smoke.yaml", "--seeds", "3", "--dry-run"])
    assert "24 runs: 0 finished (skipped), 24 queued (skipped), 0 interrupted" in result.stdout
    assert "  queued      results/synthetic/smoke--scales-none/seed0  Slurm job 1234_0" in (
        result.stdout
    )
    result = _invoke(SLURM_24)  # nothing left to submit: not submitted twice
    assert result.exit_code == 0 and "nothing to submit" in result.stdout
    assert len((fake_slurm / "sbatch.calls").read_text().splitlines()) == 1


def test_squeue_tells_which_submitted_runs_still_wait(smoke: Path, fake_slurm: Path) -> None:
    paper = ["--modules", "se,mssar"]
    _invoke(
        ["ablate", "recalibration", "smoke.yaml", *paper, "--launcher", "slurm", "--time", "60"]
    )
    _script(fake_slurm / "squeue", "#!/bin/sh\necho 1234_2\n")  # the others left the queue
    result = _invoke(["ablate", "recalibration", "smoke.yaml", *paper, "--dry-run"])
    assert (
        "3 runs: 0 finished (skipped), 1 queued (skipped), 0 interrupted (resumed), 2 to start"
        in (result.stdout)
    )


def test_multi_gpu_run_is_one_task_per_gpu(smoke: Path, fake_slurm: Path) -> None:
    result = _invoke(
        [
            "ablate",
            "recalibration",
            "smoke.yaml",
            "--modules",
            "se,mssar",
            "--launcher",
            "slurm",
            "--time",
            "2880",
            "--gpus-per-run",
            "4",
            "--cpus-per-run",
            "32",
            "--slurm",
            "exclusive=true",
            "--slurm",
            "setup=[module load cuda]",
        ]
    )
    assert result.exit_code == 0, result.output
    script = (fake_slurm / "sbatch.script").read_text().splitlines()
    for expected in (
        "#SBATCH --array=0-2%3",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --exclusive",
        "module load cuda",
    ):
        assert expected in script, expected


# --- the state of each run (--dry-run) ------------------------------------------------------------


def _make_states(planned: list[ablation.PlannedRun]) -> None:
    """finished, running, queued, failed, interrupted, missing: in this order."""
    finished, running, queued, failed, interrupted, _ = planned
    finished.run_dir.mkdir(parents=True)
    runs.write_json(
        finished.run_dir / runs.SUMMARY, {"status": "finished", "final": {"test_err": 9}}
    )
    running.run_dir.mkdir(parents=True)
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-01-01T00:00:00"}
    runs.write_json(running.run_dir / runs.LOCK, holder)
    failed.log_path.parent.mkdir(parents=True, exist_ok=True)
    failed.log_path.write_text(
        f"{MARK} start 2026-01-01 on box: mssar train\nepoch   1/2  ...\n"
        "Traceback (most recent call last):\n  File ...\nRuntimeError: CUDA out of memory\n"
        f"{MARK} exit code 1 after 3 s\n"
    )
    interrupted.run_dir.mkdir(parents=True)
    (interrupted.run_dir / runs.CHECKPOINT).write_bytes(b"")
    interrupted.log_path.write_text(f"{MARK} start x: y\nepoch 1\n{MARK} exit code 130 after 1 s\n")
    state.record_submissions([(queued, "77_3")])


def test_dry_run_shows_each_state(smoke: Path) -> None:
    grid = ["--grid", "optim.lr=0.1,0.2,0.3,0.4,0.5,0.6"]
    planned = ablation.plan("grid", "smoke.yaml", [], grid[1:], 1)
    _make_states(planned)
    result = _invoke(["ablate", "grid", "smoke.yaml", *grid, "--dry-run"])
    assert result.exit_code == 0, result.output
    out = result.stdout.splitlines()
    assert out[0] == (
        "6 runs: 1 finished (skipped), 1 running (skipped), 1 queued (skipped), "
        "1 failed (run again), 1 interrupted (resumed), 1 to start"
    )
    rows = [line.split()[:2] for line in out[1:] if not line.startswith("      |")]
    assert rows == [[s, str(r.run_dir)] for s, r in zip(state.STATES, planned)]
    assert f"pid {os.getpid()} on {socket.gethostname()}" in out[2]
    assert "Slurm job 77_3, submitted" in out[3]
    assert out[4].endswith(str(planned[3].log_path))
    assert out[5:] == [
        "      | epoch   1/2  ...",
        "      | Traceback (most recent call last):",
        "      |   File ...",
        "      | RuntimeError: CUDA out of memory",
        "      | (exit code 1)",
        f"  interrupted {planned[4].run_dir}",
        f"  missing     {planned[5].run_dir}",
    ]


def test_local_skips_finished_running_and_queued_runs(smoke: Path, monkeypatch) -> None:
    grid = ["--grid", "optim.lr=0.1,0.2,0.3,0.4,0.5,0.6"]
    planned = ablation.plan("grid", "smoke.yaml", [], grid[1:], 1)
    _make_states(planned)
    started = []

    def fake_run(command, log_path, cwd=None, env=None) -> int:
        started.append(Path(log_path).name)
        return 0

    monkeypatch.setattr(local, "run_logged", fake_run)
    result = _invoke(["ablate", "grid", "smoke.yaml", *grid, "--jobs", "2"])
    assert result.exit_code == 0, result.output
    assert sorted(started) == sorted(r.log_path.name for r in planned[3:])


def test_a_run_started_again_is_not_failed_and_requeue_stops_are_not_failures(tmp_path) -> None:
    log = tmp_path / "run.log"
    log.write_text(
        f"{MARK} start a: b\nTraceback (most recent call last):\nError\n"
        f"{MARK} exit code 1 after 1 s\n{MARK} start c: d\nepoch 1\n"
    )
    assert state.failure_tail(log) is None  # running again since
    log.write_text(
        f"{MARK} start a: b\nepoch 1\n{MARK} stopped (requeued), exit code 143 after 1 s\n"
    )
    assert state.failure_tail(log) is None
    log.write_text(f"{MARK} start a: b\nKilled\n{MARK} exit code -9 after 1 s\n")
    assert state.failure_tail(log) == ["Killed", "(exit code -9)"]


# --- a multi-GPU box: placement (GPU count injected) ----------------------------------------------


def test_gpu_slots_round_robin() -> None:
    slots = local.GpuSlots(3)
    assert [slots.acquire() for _ in range(5)] == ["0", "1", "2", "0", "1"]
    slots.release("1")
    assert slots.acquire() == "1"
    visible = local.GpuSlots(2, visible="4,6", per_gpu=1)  # this process sees physical 4 and 6
    assert [visible.acquire(), visible.acquire()] == ["4", "6"] and visible.full()


def test_local_places_runs_round_robin_on_the_gpus(smoke: Path, monkeypatch) -> None:
    """2 GPUs, --runs-per-gpu 2: 4 runs at once (the default --jobs), two per GPU, each process
    with its CUDA_VISIBLE_DEVICES; a run on the CPU gets none."""
    monkeypatch.setattr(launch, "gpu_count", lambda: 2)
    lock = threading.Lock()
    busy: dict[str, int] = {}
    seen: list[tuple[str, str | None, int]] = []

    def fake_run(command, log_path, cwd=None, env=None) -> int:
        gpu = (env or {}).get("CUDA_VISIBLE_DEVICES")
        with lock:
            busy[gpu] = busy.get(gpu, 0) + 1
            seen.append((Path(log_path).name, gpu, busy[gpu]))
        time.sleep(0.5)
        with lock:
            busy[gpu] -= 1
        return 0

    monkeypatch.setattr(local, "run_logged", fake_run)
    args = ["ablate", "scales", "smoke.yaml", "--runs-per-gpu", "2"]
    result = _invoke(args)
    assert result.exit_code == 0, result.output
    assert sorted(gpu for _, gpu, _ in seen[:4]) == ["0", "0", "1", "1"]
    assert len(seen) == 8 and max(n for _, _, n in seen) == 2
    assert {name for name, _, n in seen if n == 2} and "on GPU 1 in" in result.stdout
    seen.clear()
    result = _invoke([*args, "--set", "run.device=cpu", "--set", "experiment=cpu"])
    assert result.exit_code == 0 and {gpu for _, gpu, _ in seen} == {None}


# --- DDP from a Slurm task's environment ----------------------------------------------------------


def test_slurm_rendezvous_is_what_torchrun_would_set() -> None:
    env = {
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "3",
        "SLURM_NTASKS": "4",
        "SLURM_LOCALID": "3",
        "SLURM_JOB_NODELIST": "gpu[07-09,12]",
        "SLURM_JOB_ID": "4242",
    }
    rdv = distributed.slurm_rendezvous(env)
    assert (rdv.rank, rdv.world_size, rdv.local_rank) == (3, 4, 3)
    assert (rdv.master_addr, rdv.master_port) == ("gpu07", 24242)
    assert distributed.slurm_rendezvous(env | {"MASTER_PORT": "1234"}).master_port == 1234
    assert distributed.slurm_rendezvous(env | {"SLURM_NTASKS": "1"}) is None  # one GPU
    assert (
        distributed.slurm_rendezvous({k: v for k, v in env.items() if k != "SLURM_STEP_ID"}) is None
    )
    assert distributed.first_host("a-[1-2]-ib,b") == "a-1-ib"
    assert distributed.first_host("node5,node6") == "node5"


def test_torchrun_path_unchanged(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")  # torchrun's variables win
    assert distributed.init_from_environment("cpu") == distributed.World()


DDP_TASK = """
import torch
from mssar_cli import distributed
world = distributed.init_from_environment("cpu")
total = distributed.all_reduce_sum(torch.tensor([world.rank + 1.0]), world)
print(world.rank, world.world_size, world.local_rank, int(total.item()))
distributed.shutdown(world)
"""


@pytest.mark.slow
def test_two_slurm_tasks_form_one_ddp_group() -> None:
    """Two processes with the environment srun gives two tasks join one gloo group."""
    procs = []
    for rank in range(2):
        env = os.environ | {
            "SLURM_STEP_ID": "0",
            "SLURM_PROCID": str(rank),
            "SLURM_NTASKS": "2",
            "SLURM_LOCALID": str(rank),
            "SLURM_JOB_NODELIST": "localhost",
            "SLURM_JOB_ID": str(os.getpid()),
        }
        env.pop("WORLD_SIZE", None)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", DDP_TASK],
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    outputs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert outputs == ["0 2 0 3", "1 2 1 3"], outputs


# --- submitit's requeue ---------------------------------------------------------------------------

FAKE_TRAIN = """
import pathlib, signal, sys, time
record = pathlib.Path(sys.argv[1])
starts = record.read_text().count("start") if record.exists() else 0
ignored = signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN
with record.open("a") as f:
    f.write(f"start {starts + 1} usr2 ignored {ignored}\\n")
def checkpoint(*_):
    with record.open("a") as f:
        f.write("checkpoint\\n")
    sys.exit(143)
signal.signal(signal.SIGTERM, checkpoint)
print("training", flush=True)
if starts == 0:
    time.sleep(300)
"""


def test_checkpoint_stops_training_and_returns_the_same_run(tmp_path: Path) -> None:
    record = tmp_path / "record"
    run = TrainRun(
        [sys.executable, "-c", FAKE_TRAIN, str(record)],
        str(tmp_path / "r.log"),
        str(tmp_path),
        "fake seed 0",
    )
    run._process = job.LoggedProcess(run.command, Path(run.log_path), run.cwd)
    run._process.start()
    deadline = time.monotonic() + 60
    while "training" not in Path(run.log_path).read_text().splitlines():
        assert time.monotonic() < deadline, "the fake training did not start"
        time.sleep(0.05)
    again = run.checkpoint()
    assert record.read_text().splitlines() == ["start 1 usr2 ignored False", "checkpoint"]
    assert isinstance(again.function, TrainRun) and again.function is not run
    same = ("command", "log_path", "cwd", "label")
    assert [getattr(again.function, k) for k in same] == [getattr(run, k) for k in same]
    restored = pickle.loads(pickle.dumps(again))
    assert restored.function.command == run.command and restored.function._process is None
    last = Path(run.log_path).read_text().splitlines()[-1]
    assert last.startswith(f"{MARK} stopped (requeued by submitit), exit code 143")


@pytest.mark.slow
def test_submitit_requeues_a_run_stopped_at_its_time_limit(tmp_path: Path) -> None:
    """submitit's LocalExecutor signals the job 22 s before its 30 s limit: the job stops
    training (which checkpoints), requeues itself, and the second start finishes."""
    import submitit

    record = tmp_path / "record"
    executor = submitit.LocalExecutor(folder=tmp_path / "jobs")
    executor.update_parameters(timeout_min=0.5, signal_delay_s=22)
    submitted = executor.submit(
        TrainRun(
            [sys.executable, "-c", FAKE_TRAIN, str(record)],
            str(tmp_path / "r.log"),
            str(tmp_path),
            "fake seed 0",
        )
    )
    assert submitted.result() == 0
    assert record.read_text().splitlines() == [
        "start 1 usr2 ignored True",
        "checkpoint",
        "start 2 usr2 ignored True",
    ]
    marks = [line for line in (tmp_path / "r.log").read_text().splitlines() if MARK in line]
    assert [re.sub(r" (\d{4}-|after ).*", "", mark) for mark in marks] == [
        f"{MARK} start",
        f"{MARK} stopped (requeued by submitit), exit code 143",
        f"{MARK} start",
        f"{MARK} exit code 0",
    ]


# --- end to end: the same grid through submitit-local and local -----------------------------------


def _finished_dirs(results: Path) -> dict[str, dict]:
    out = {}
    for summary in sorted(results.glob("*/*/seed*/summary.json")):
        data = json.loads(summary.read_text())
        out[str(summary.parent.relative_to(results))] = {
            k: data[k] for k in ("status", "experiment", "recalibration", "epochs", "final")
        }
    return out


@pytest.mark.slow
def test_submitit_local_grid_ends_like_local(smoke: Path) -> None:
    """`ablate recalibration --launcher submitit-local --jobs 2`: the same finished run
    directories (and, on the CPU with one thread, the same errors) as --launcher local."""
    work = smoke.parent
    args = ["ablate", "recalibration", "smoke.yaml", "--modules", "se,mssar", "--jobs", "2", *TINY]
    result = _invoke([*args, "--launcher", "submitit-local"])
    assert result.exit_code == 0, result.output
    assert result.stdout.count("  done smoke--recalibration-") == 3
    through_submitit = _finished_dirs(work / "results")
    assert len(through_submitit) == 3
    assert (
        len(
            list(
                (work / "results" / "synthetic" / "logs" / "submitit-local").glob("*_0_result.pkl")
            )
        )
        == 3
    )
    again = _invoke([*args, "--launcher", "submitit-local"])
    assert "3 runs: 3 finished (skipped)" in again.stdout and " done " not in again.stdout
    shutil.move(work / "results", work / "results-submitit")
    result = _invoke(args)
    assert result.exit_code == 0, result.output
    assert _finished_dirs(work / "results") == through_submitit
