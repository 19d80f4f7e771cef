"""The GPU path on a CUDA GPU (``pytest -m cuda``, run by ``make gpu-check``): every test here
skips itself where torch sees no CUDA GPU.

MS-SAR's fast, autograd and direct forms on the GPU against the direct form in float64 on the CPU
(the oracle): in fp32, under bf16 autocast, on channels-last maps and compiled; the device loader
on the GPU against the same loader on the CPU; DDP over NCCL in a one-process group; a compiled
run through the real training path; and resume equality on the GPU with deterministic kernels.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import flat, forward_backward, make_inputs, randomize_bn, rel_err
from test_gpu_path import (
    SMOKE,
    TINY_RUN,
    Interrupted,
    Recorder,
    build_tiny,
    check_compilation_reported_apart,
    check_one_graph_and_no_warning,
    run_compiled,
)

from mssar_cli import recipe as recipes
from mssar_cli import training
from mssar_cli.data import build_loaders
from mssar_cli.models import create_model
from mssar_cli.recalibration.mssar import MSSAR
from mssar_cli.recipe import DataSection

# cuBLAS reads it when it creates its first handle (deterministic products): set at collection,
# before any test touches the GPU
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
]

CUDA = torch.device("cuda")
# 32, 16: band layout; 14, 8, 7: matrices (7 and 14 cut unevenly by K = 4); 18x17: the autograd
# composition's general partition
SIZES = [(32, 32), (16, 16), (14, 14), (8, 8), (7, 7), (18, 17)]
CHANNELS, SOURCE_CHANNELS, BATCH = 8, 12, 4


@pytest.fixture
def exact_fp32():
    """fp32 products and convolutions without TF32 (cuDNN allows it by default), so an fp32
    result is compared with the float64 oracle at fp32's own precision."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _oracle(strategy: str, size, source_channels=None, x_dtype=torch.float64):
    """The direct form in float64 on the CPU, its inputs, and its outputs and gradients."""
    torch.manual_seed(0)
    oracle = MSSAR(
        CHANNELS,
        strategy=strategy,
        source_channels=source_channels,
        implementation="direct",
    )
    randomize_bn(oracle).double().train()
    x, source = make_inputs(BATCH, CHANNELS, *size, source_channels, dtype=torch.float64)
    upstream = torch.randn(BATCH, CHANNELS, *size, dtype=torch.float64)
    if x_dtype != torch.float64:  # the oracle sees the inputs the GPU module sees, rounded

        def rounded(t):
            return None if t is None else t.to(x_dtype).double()

        x, source, upstream = rounded(x), rounded(source), rounded(upstream)
    state = {k: v.clone() for k, v in oracle.state_dict().items()}
    return state, x, source, upstream, forward_backward(oracle, x, source, upstream)


def _on_cuda(
    implementation, strategy, state, x, source, upstream, *, dtype=torch.float32, layout=None
):
    module = MSSAR(
        CHANNELS,
        strategy=strategy,
        source_channels=None if source is None else source.shape[1],
        implementation=implementation,
    )
    module.load_state_dict(state)
    module = module.to(CUDA).train()

    def place(t):
        if t is None:
            return None
        t = t.to(CUDA, dtype)
        return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t

    return module, place(x), place(source), place(upstream)


def _compare(got: dict, want: dict, tolerance: float, params_together: bool = False) -> None:
    """Relative errors (norm-wise) of every output, gradient and buffer. ``params_together``:
    the parameters' gradients as one vector, the step the optimizer takes; in bf16 a single
    small gradient (a BN shift's sum that nearly cancels) has no relative precision of its own."""
    assert got.keys() == want.keys()
    keys = [k for k in want if want[k].is_floating_point()]
    params = [k for k in keys if k.startswith("param:")] if params_together else []
    errors = {k: rel_err(got[k].cpu(), want[k]) for k in keys if k not in params}
    if params:
        errors["parameters"] = rel_err(
            flat({k: got[k].cpu() for k in params}, params), flat(want, params)
        )
    bad = {key: err for key, err in errors.items() if not err <= tolerance}
    assert not bad, f"relative errors above {tolerance}: {bad}"
    for key in want:
        if not want[key].is_floating_point():  # num_batches_tracked
            assert torch.equal(got[key].cpu(), want[key]), key


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize(
    "implementation, strategy",
    [
        ("fast", "regional"),
        ("autograd", "regional"),
        ("direct", "regional"),
        ("autograd", "sliding"),
        ("direct", "sliding"),
    ],
)
def test_forms_on_cuda_match_the_float64_oracle(implementation, strategy, size, exact_fp32):
    state, x, source, upstream, want = _oracle(strategy, size)
    module, x, source, upstream = _on_cuda(implementation, strategy, state, x, source, upstream)
    _compare(forward_backward(module, x, source, upstream), want, 1e-4)


@pytest.mark.parametrize("implementation", ["fast", "autograd", "direct"])
def test_a_separate_source_on_cuda_matches_the_oracle(implementation, exact_fp32):
    """The multi-stage DenseNet form: weights from another tensor than the one they scale."""
    state, x, source, upstream, want = _oracle("regional", (8, 8), SOURCE_CHANNELS)
    module, x, source, upstream = _on_cuda(implementation, "regional", state, x, source, upstream)
    _compare(forward_backward(module, x, source, upstream), want, 1e-4)


@pytest.mark.parametrize("size", [(32, 32), (16, 16), (8, 8), (7, 7)], ids=str)
@pytest.mark.parametrize("implementation", ["fast", "autograd"])
def test_bf16_autocast_on_cuda_stays_near_the_oracle(implementation, size):
    """As in a network under autocast: the map arrives in bf16; the module's MLPs run in fp32
    (its BN and small products), the map's product in bf16."""
    state, x, source, upstream, want = _oracle("regional", size, x_dtype=torch.bfloat16)
    module, x, source, upstream = _on_cuda(
        implementation, "regional", state, x, source, upstream, dtype=torch.bfloat16
    )
    with torch.autocast("cuda", torch.bfloat16):
        got = forward_backward(module, x, source, upstream)
    assert got["out"].dtype == torch.bfloat16
    _compare(got, want, 5e-2, params_together=True)
    assert rel_err(got["out"].cpu(), want["out"]) <= 1e-2  # bf16's rounding of the product


@pytest.mark.parametrize("size", [(32, 32), (16, 16), (7, 7)], ids=str)
@pytest.mark.parametrize("implementation", ["fast", "autograd"])
def test_channels_last_on_cuda_matches_the_oracle(implementation, size, exact_fp32):
    state, x, source, upstream, want = _oracle("regional", size)
    module, x, source, upstream = _on_cuda(
        implementation, "regional", state, x, source, upstream, layout="channels_last"
    )
    _compare(forward_backward(module, x, source, upstream), want, 1e-4)


@pytest.mark.parametrize("size", [(32, 32), (7, 7)], ids=str)
@pytest.mark.parametrize("implementation", ["fast", "autograd"])
def test_compiled_module_on_cuda_matches_the_oracle(implementation, size, exact_fp32):
    """``torch.compile`` (inductor, Triton kernels) as one graph, without a warning."""
    state, x, source, upstream, want = _oracle("regional", size)
    module, x, source, upstream = _on_cuda(implementation, "regional", state, x, source, upstream)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(module, fullgraph=True)
        got = forward_backward(compiled, x, source, upstream)
    torch._dynamo.reset()
    assert not [str(w.message) for w in caught]
    # forward_backward names the parameters of what it is given: the compiled wrapper's
    got = {key.replace("_orig_mod.", ""): value for key, value in got.items()}
    _compare(got, want, 1e-4)


# --- the device loader ----------------------------------------------------------------------------


@pytest.mark.parametrize("augment", [True, False])
def test_device_loader_on_cuda_gives_the_cpu_batches(augment):
    """The order and the augmentation come from CPU generators: the GPU loader yields the CPU
    loader's batches (the same uint8 gather, the same fp32 scale and shift)."""
    section = DataSection(
        "synthetic", subset=300, test_subset=100, eval_batch_size=32, augment=augment
    )
    on_cpu = build_loaders(section, batch_size=64, device="cpu", seed=3)
    on_gpu = build_loaders(section, batch_size=64, device=CUDA, seed=3)
    for split in (0, 1):  # training, test
        cpu_loader, cuda_loader = on_cpu[split], on_gpu[split]
        for epoch in (0, 1):
            cpu_loader.set_epoch(epoch)
            cuda_loader.set_epoch(epoch)
            batches = list(zip(cpu_loader, cuda_loader, strict=True))
            assert len(batches) == len(cpu_loader) > 1
            for (x_cpu, y_cpu), (x_gpu, y_gpu) in batches:
                assert x_gpu.device.type == y_gpu.device.type == CUDA.type
                assert torch.equal(y_gpu.cpu(), y_cpu)
                assert torch.equal(x_gpu.cpu(), x_cpu)


# --- DDP over NCCL --------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "channels-last-bf16"])
def test_ddp_over_nccl_in_a_one_process_group(layout, tmp_path):
    """The engine's wrapping (``DistributedDataParallel(module, device_ids=[i])``) over NCCL: the
    same gradients as the bare model, each in its parameter's layout, and no "Grad strides do not
    match bucket view strides" warning."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not dist.is_nccl_available():
        pytest.skip("torch was built without NCCL")
    assert not dist.is_initialized()
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        cast = layout != "contiguous"
        memory_format = torch.channels_last if cast else torch.contiguous_format
        models = []
        for _ in range(2):  # converted before DDP makes its buckets, as the engine does
            torch.manual_seed(0)
            models.append(
                create_model("resnet20", 10, "mssar").to(CUDA, memory_format=memory_format)
            )
        bare, wrapped = models[0], DDP(models[1], device_ids=[CUDA.index or 0])
        x = torch.randn(8, 3, 32, 32, device=CUDA).contiguous(memory_format=memory_format)
        y = torch.randint(0, 10, (8,), device=CUDA)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for model in (bare, wrapped):
                with torch.autocast("cuda", torch.bfloat16, enabled=cast):
                    loss = F.cross_entropy(model(x), y)
                loss.backward()
        torch.cuda.synchronize()
    finally:
        dist.destroy_process_group()
    assert not [str(w.message) for w in caught if "stride" in str(w.message).lower()]
    # the two backward passes may sum in different orders (atomic adds), bf16 more visibly
    rtol, atol = (2e-2, 1e-4) if cast else (1e-4, 1e-6)
    for (name, p), q in zip(bare.named_parameters(), wrapped.module.parameters()):
        assert q.grad.stride() == q.stride(), name
        torch.testing.assert_close(q.grad, p.grad, rtol=rtol, atol=atol, msg=name)


# --- training runs on the GPU ---------------------------------------------------------------------


@pytest.fixture
def deterministic():
    """Deterministic kernels where torch has them (a warning names any that is not)."""
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.benchmark = before[1]


def test_resumed_run_on_cuda_equals_the_uninterrupted_one(tmp_path, monkeypatch, deterministic):
    """The smoke recipe on the GPU in bf16 (MS-SAR's fused gate): stopped after its first epoch
    and resumed, it ends bitwise where the uninterrupted run ends."""
    monkeypatch.chdir(tmp_path)
    sets = ["run.device=cuda", "run.precision=bf16"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b = recipes.load(SMOKE, [*sets, "experiment=cuda_b"])
        a = recipes.load(SMOKE, [*sets, "experiment=cuda_a"])
        with pytest.raises(Interrupted):
            training.train(b, reporter=Recorder(interrupt_after=1))
        training.train(b, resume=True, reporter=Recorder())
        training.train(a, reporter=Recorder())
    nondeterministic = sorted({str(w.message).splitlines()[0] for w in caught})
    state_a = torch.load(a.run_dir() / "checkpoint.pt", map_location="cpu", weights_only=False)
    state_b = torch.load(b.run_dir() / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert state_a["epoch"] == state_b["epoch"] == 2
    different = [
        k for k in state_a["model"] if not torch.equal(state_a["model"][k], state_b["model"][k])
    ]
    assert not different, f"differ: {different[:5]}; warnings: {nondeterministic}"
    assert [r["train_loss"] for r in state_a["history"]] == [
        r["train_loss"] for r in state_b["history"]
    ]


def test_compiled_run_on_cuda(tmp_path_factory):
    """The compiled runs of ``test_gpu_path`` on the GPU (Triton kernels): one graph, no warning,
    the compilation reported apart, the resumed run close to the uninterrupted one (Triton's
    reductions may differ in the last bits between two compilations' kernels), the saved run
    re-evaluated."""
    sets = [s if s != "run.device=cpu" else "run.device=cuda" for s in TINY_RUN]
    runs = run_compiled(tmp_path_factory.mktemp("compiled_cuda"), sets, build_tiny)
    check_one_graph_and_no_warning(runs)
    check_compilation_reported_apart(runs, train_images=64)
    a = runs.cwd / "results" / "synthetic" / "compiled_a" / "seed0" / "checkpoint.pt"
    b = runs.cwd / "results" / "synthetic" / "compiled_b" / "seed0" / "checkpoint.pt"
    state_a = torch.load(a, map_location="cpu", weights_only=False)["model"]
    state_b = torch.load(b, map_location="cpu", weights_only=False)["model"]
    for key in state_a:
        torch.testing.assert_close(state_b[key], state_a[key], rtol=1e-3, atol=1e-4, msg=key)
    last = runs.whole.rows[-1]
    assert abs(runs.evaluated["test_err"] - last["test_err"]) <= 100 / 32
