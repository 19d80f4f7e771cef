#!/usr/bin/env bash
# The GPU check (`make gpu-check`): everything mssar can only show on a CUDA GPU, in one command
# sized for about ten minutes on one H100-class GPU, every part's output under results/.
#
#   bash benchmarks/gpu_check.sh             the whole check (on a machine without a CUDA GPU it
#                                            runs what it can: the cuda tests skip, and it says so)
#   bash benchmarks/gpu_check.sh --prepare   here, with network: Fashion-MNIST into
#                                            data/fashion-mnist and the wheels the GPU machine's
#                                            image lacks into data/wheels (carry `data` there)
#
# Parts, in this order (GPU_CHECK_PARTS=tests,bench,grid chooses some):
#   tests  pytest -m cuda: tests/test_cuda.py (module forms against a float64 CPU oracle, bf16,
#          channels-last, torch.compile, the device loader, DDP over NCCL, resume equality)
#   bench  benchmarks.module_step (ResNet-56, plain / SE / MS-SAR, compiled; goal: MS-SAR's step
#          <= 1.05x plain) and benchmarks.pipeline (device pipeline vs DataLoader; goal >= 5x)
#   grid   Fashion-MNIST, plain / SE / MS-SAR x 3 seeds on all 60,000 + 10,000 images
#          (recipes/fashion_mnist/gpu_short/, three runs at a time on the GPU), then the report
#
# Logs: results/gpu_check/*.log (summary.log: the device, each part's status and seconds).
# The grid gets the time left before GPU_CHECK_SECONDS (default 570) and is stopped cleanly at
# that point: its runs keep their checkpoints, and running the grid part again finishes them.
# Where $OUT names a folder (the device tool's), the results are also packed into it:
# gpu_check_results.tar.gz (results/ files, no checkpoints) and summary.log.
# PY chooses the interpreter (default, or where PY is not there: .venv/bin/python if present,
# else python3).

set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
if [ -z "${PY:-}" ] || ! command -v "$PY" >/dev/null; then  # no venv on the GPU machine
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
PARTS=",${GPU_CHECK_PARTS:-tests,bench,grid},"
DEADLINE=${GPU_CHECK_SECONDS:-570}
FMNIST_FILES="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"
# the packages of pyproject.toml that the GPU machine's image does not have
WHEELS="ptflops==0.7.5 submitit==1.5.4"
GRID_RECIPE=recipes/fashion_mnist/gpu_short/resnet20_mssar.yaml
GRID_EXPERIMENT=resnet20_gpu_short

find_fashion_mnist() {
    for dir in data/fashion-mnist /usr/share/datasets/fashion-mnist; do
        local found=1
        for f in $FMNIST_FILES; do [ -f "$dir/$f" ] || found=0; done
        if [ $found = 1 ]; then echo "$dir"; return 0; fi
    done
    return 1
}

if [ "${1:-}" = "--prepare" ]; then
    mkdir -p data/fashion-mnist data/wheels
    if dir=$(find_fashion_mnist) && [ "$dir" != data/fashion-mnist ]; then
        for f in $FMNIST_FILES; do cp "$dir/$f" data/fashion-mnist/; done
    fi
    find_fashion_mnist >/dev/null || echo "Fashion-MNIST not found: run 'make data' first" >&2
    # the GPU machine runs CPython 3.12 and reaches no package index: pure-Python wheels
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp -d data/wheels $WHEELS || exit 1
    echo "prepared: $(du -sh data | cut -f1) in data/ (data/fashion-mnist, data/wheels);"
    echo "on the GPU machine, carry 'data' and run: bash benchmarks/gpu_check.sh"
    exit 0
fi

# logs go to results/ once a GPU is found; until then (and on a machine without one) to /tmp
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
START=$SECONDS
STATUS=0
say() { echo "[gpu-check $((SECONDS - START))s] $*" | tee -a "$LOGS/summary.log"; }

# part NAME LIMIT_S COMMAND...: runs it under `timeout`, its output in $LOGS/NAME.log
part() {
    local name=$1 limit=$2 begin=$SECONDS code
    shift 2
    say "$name: $*"
    timeout --signal=TERM --kill-after=90 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    code=${PIPESTATUS[0]}
    if [ "$code" = 0 ]; then
        say "$name: ok ($((SECONDS - begin)) s)"
    elif [ "$code" = 124 ]; then
        say "$name: STOPPED after its $limit s ($((SECONDS - begin)) s)"
        STATUS=1
    else
        say "$name: FAILED, exit code $code ($((SECONDS - begin)) s); see $LOGS/$name.log"
        STATUS=1
    fi
    return "$code"
}

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}

GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
say "device: ${GPU:-none (nvidia-smi found no GPU)}"
TORCH_INFO=$("$PY" -c 'import sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA: {torch.cuda.is_available()}")
sys.exit(0 if torch.cuda.is_available() else 3)' 2>&1)
CUDA_FOUND=$?
say "$TORCH_INFO"
if [ "$CUDA_FOUND" != 0 ]; then
    part tests 300 "$PY" -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider
    say "no CUDA GPU available: the cuda tests skip; benchmarks and grid need one (nothing else to check)"
    exit "$STATUS"
fi
mkdir -p results/gpu_check
cp "$LOGS/summary.log" results/gpu_check/summary.log
LOGS=results/gpu_check

if ! "$PY" -c "import ptflops, submitit" 2>/dev/null && ls data/wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --target /tmp/gpu_check_site \
        data/wheels/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site"
fi

if [[ $PARTS == *,tests,* ]]; then
    part tests 240 "$PY" -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider -ra
fi

if [[ $PARTS == *,bench,* ]]; then
    part module_step 300 "$PY" -m benchmarks.module_step --device cuda --compile \
        --models resnet56 --variants plain,se,mssar --quiet \
        --markdown results/bench/module_step_gpu.md
    part pipeline 180 "$PY" -m benchmarks.pipeline --device cuda \
        --markdown results/bench/pipeline_gpu.md
fi

if [[ $PARTS == *,grid,* ]]; then
    left=$((DEADLINE - (SECONDS - START) - 60))  # the report's minute kept
    if ! find_fashion_mnist >/dev/null; then
        say "grid: SKIPPED, Fashion-MNIST not found (data/fashion-mnist or /usr/share/datasets/fashion-mnist; see --prepare)"
        STATUS=1
    elif ! "$PY" -c "import ptflops, submitit" 2>/dev/null; then
        say "grid: SKIPPED, ptflops or submitit missing (bash benchmarks/gpu_check.sh --prepare here, carry data)"
        STATUS=1
    elif [ "$left" -lt 120 ]; then
        say "grid: SKIPPED, $left s left before GPU_CHECK_SECONDS=$DEADLINE (run GPU_CHECK_PARTS=grid)"
        STATUS=1
    else
        part grid "$left" "$PY" -m mssar_cli ablate recalibration "$GRID_RECIPE" \
            --modules se,mssar --seeds 3 --runs-per-gpu 3 --launcher local \
            --set "experiment=$GRID_EXPERIMENT"
        part report 120 "$PY" -m mssar_cli report results \
            --figures results/fashion_mnist/figures_gpu --output results/fashion_mnist/report_gpu.md
    fi
fi

say "done in $((SECONDS - START)) s on ${GPU:-this machine}: $([ "$STATUS" = 0 ] && echo 'every part ok' || echo 'see above')"

OUT_DIR=${GPU_CHECK_OUT:-${OUT:-}}
if [ -n "$OUT_DIR" ] && [ -d "$OUT_DIR" ]; then
    cp "$LOGS/summary.log" "$OUT_DIR/summary.log"
    # results/ as it can be committed: logs, tables, figures, run directories without checkpoints
    paths=$(ls -d "$LOGS" results/bench/*_gpu.md results/bench/*.csv \
        results/fashion_mnist/report_gpu.md results/fashion_mnist/figures_gpu \
        results/fashion_mnist/"$GRID_EXPERIMENT"--* \
        results/fashion_mnist/logs/"$GRID_EXPERIMENT"--* 2>/dev/null)
    # shellcheck disable=SC2086  # one path a word
    tar -czf "$OUT_DIR/gpu_check_results.tar.gz" --exclude='checkpoint*' --exclude='lock.json' \
        $paths && say "packed into $OUT_DIR/gpu_check_results.tar.gz (tar -xzf it in the repository)"
fi
exit "$STATUS"
