"""MS-SAR's three implementations against oracles (SPEC.md §1): brute-force Python loops over
positions for the regional partition and the sliding window, and the ``implementation="direct"``
module (same parameters) for the fast and autograd implementations: forward, every gradient and
the BN running statistics, scales larger than the map and batches of one included; SE for MS-SAR
with one global scale.

Everything runs on small maps and small batches.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import (
    CHANNELS,
    SCALE_SETS,
    SOURCE_CHANNELS,
    STRATEGIES,
    flat,
    forward_backward,
    make_inputs,
    randomize_bn,
    rel_err,
    scale_id,
    size_id,
)
from torch import nn

from mssar_cli.partition import grid_plan, region_bounds, region_of_index, regions_along
from mssar_cli.recalibration.mssar import IMPLEMENTATIONS, MSSAR, sliding_radius
from mssar_cli.recalibration.se import SqueezeExcitation

# 32, 16: BandLayout; 14, 8, 7, 9x13: MatrixLayout; 18x17: the autograd composition (non-uniform)
EQUIV_SIZES = [(32, 32), (16, 16), (14, 14), (8, 8), (7, 7), (9, 13), (18, 17)]


# --- regional partition: brute force ----------------------------------------------------------


def brute_force_regional(m: MSSAR, source: torch.Tensor) -> torch.Tensor:
    """Gates of the regional strategy, position by position, with the module's own branch MLPs."""
    n, _, height, width = source.shape
    total = torch.zeros(n, m.channels, height, width, dtype=source.dtype)
    for idx, k in enumerate(m.scales):
        kh, kw = min(k, height), min(k, width)  # a scale larger than an axis is clamped to it
        members = {}
        for i in range(height):
            for j in range(width):
                region = (math.floor(i * kh / height), math.floor(j * kw / width))
                members.setdefault(region, []).append((i, j))
        assert len(members) == kh * kw
        pooled = {}
        for region, positions in members.items():
            acc = torch.zeros(n, source.shape[1], dtype=source.dtype)
            for i, j in positions:
                acc += source[:, :, i, j]
            pooled[region] = acc / len(positions)
        regions = sorted(pooled)
        z = m.branches[idx](torch.cat([pooled[r] for r in regions]))  # rows: region-major
        z = z.view(len(regions), n, m.channels)
        for r, region in enumerate(regions):
            for i, j in members[region]:
                total[:, :, i, j] += z[r]
    return total / len(m.scales)


REGIONAL_CASES = [
    ((1, 2, 4), (32, 32)),
    ((1, 2, 4), (8, 8)),
    ((1, 2, 4), (7, 7)),
    ((4,), (7, 7)),
    ((4,), (9, 13)),
    ((1, 3), (9, 13)),
    ((2, 4), (14, 14)),
    ((3,), (7, 10)),
    # scales larger than an axis: clamped, rows and columns separately
    ((4,), (3, 3)),
    ((1, 2, 4), (2, 2)),
    ((5,), (4, 9)),
    ((1, 3), (9, 2)),
    ((2, 4), (1, 6)),
]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("with_source", [False, True], ids=["self", "source"])
@pytest.mark.parametrize(
    "scales,size", REGIONAL_CASES, ids=[f"{scale_id(s)}-{size_id(z)}" for s, z in REGIONAL_CASES]
)
def test_regional_matches_brute_force(scales, size, with_source, implementation):
    torch.manual_seed(3)
    source_channels = SOURCE_CHANNELS if with_source else None
    m = MSSAR(CHANNELS, scales, "regional", source_channels=source_channels)
    m = randomize_bn(m).double().eval()
    m.implementation = implementation
    x, source = make_inputs(
        2, CHANNELS, *size, source_channels=source_channels, dtype=torch.float64
    )
    with torch.no_grad():
        expected = brute_force_regional(m, x if source is None else source)
        out = m(x, source)
    torch.testing.assert_close(out, x * expected, rtol=1e-12, atol=1e-12)


def test_regional_is_not_adaptive_avg_pool_on_7x7():
    """F.adaptive_avg_pool2d(7x7, 4) overlaps its windows; the exact partition differs from it."""
    torch.manual_seed(4)
    m = randomize_bn(MSSAR(CHANNELS, (4,), "regional")).double().eval()
    x, _ = make_inputs(1, CHANNELS, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        pooled = nn.functional.adaptive_avg_pool2d(x, 4)
        z = m.branches[0](pooled.permute(0, 2, 3, 1).reshape(-1, CHANNELS)).view(1, 4, 4, CHANNELS)
        wrong_region_00 = z[0, 0, 0]  # weight of region (0, 0) from overlapping windows
        gates = m(torch.ones_like(x), x)
    # exact regions: rows/cols [0,2) [2,4) [4,6) [6,7); adaptive pooling's windows: [0,2) [1,4)
    # [3,6) [5,7). Region (0, 0) is the same in both, region (1, 1) is not.
    wrong_region_11 = z[0, 1, 1]
    torch.testing.assert_close(gates[0, :, 0, 0], wrong_region_00)
    assert (gates[0, :, 2, 2] - wrong_region_11).abs().max() > 1e-6


# --- sliding window: brute force --------------------------------------------------------------


def brute_force_sliding(m: MSSAR, source: torch.Tensor) -> torch.Tensor:
    n, channels, height, width = source.shape
    total = torch.zeros(n, m.channels, height, width, dtype=source.dtype)
    for idx, k in enumerate(m.scales):
        radius = math.floor(math.sqrt(height * width) / k)
        pooled = torch.zeros(n, height, width, channels, dtype=source.dtype)
        for i in range(height):
            for j in range(width):
                count = 0
                acc = torch.zeros(n, channels, dtype=source.dtype)
                for a in range(height):
                    for b in range(width):
                        if max(abs(a - i), abs(b - j)) <= radius:
                            acc += source[:, :, a, b]
                            count += 1
                pooled[:, i, j] = acc / count
        z = m.branches[idx](pooled.reshape(-1, channels)).view(n, height, width, m.channels)
        total += z.permute(0, 3, 1, 2)
    return total / len(m.scales)


SLIDING_CASES = [
    ((1, 2, 4), (8, 8)),
    ((1, 2, 4), (7, 7)),
    ((1, 3), (9, 13)),
    ((4,), (9, 13)),
    ((2,), (12, 12)),
    ((1,), (5, 11)),
    ((8,), (3, 5)),  # radius floor(sqrt(15) / 8) = 0: each position alone
    ((1, 2, 4), (2, 2)),
]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("with_source", [False, True], ids=["self", "source"])
@pytest.mark.parametrize(
    "scales,size", SLIDING_CASES, ids=[f"{scale_id(s)}-{size_id(z)}" for s, z in SLIDING_CASES]
)
def test_sliding_matches_brute_force(scales, size, with_source, implementation):
    torch.manual_seed(5)
    source_channels = 5 if with_source else None
    m = MSSAR(4, scales, "sliding", source_channels=source_channels)
    m = randomize_bn(m).double().eval()
    m.implementation = implementation
    x, source = make_inputs(2, 4, *size, source_channels=source_channels, dtype=torch.float64)
    with torch.no_grad():
        expected = brute_force_sliding(m, x if source is None else source)
        out = m(x, source)
    torch.testing.assert_close(out, x * expected, rtol=1e-12, atol=1e-12)


def test_sliding_radius_formula():
    assert sliding_radius(32, 32, 1) == 32
    assert sliding_radius(32, 32, 2) == 16
    assert sliding_radius(32, 32, 4) == 8
    assert sliding_radius(7, 7, 4) == 1
    assert sliding_radius(7, 7, 2) == 3
    assert sliding_radius(9, 13, 1) == 10  # sqrt(117) = 10.8
    assert sliding_radius(9, 13, 3) == 3
    assert sliding_radius(8, 8, 3) == 2
    for h in range(1, 20):
        for w in range(1, 20):
            for k in range(1, 6):
                assert sliding_radius(h, w, k) == math.floor(math.sqrt(h * w) / k)


# --- fast == direct, forward and backward -----------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("size", EQUIV_SIZES, ids=size_id)
@pytest.mark.parametrize("scales", SCALE_SETS, ids=scale_id)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fast_equals_direct(strategy, scales, size, dtype):
    torch.manual_seed(6)
    fast = randomize_bn(MSSAR(CHANNELS, scales, strategy, source_channels=SOURCE_CHANNELS))
    fast = fast.to(dtype).train()
    direct = copy.deepcopy(fast)
    direct.implementation = "direct"
    assert fast.implementation == "fast"
    x, source = make_inputs(8, CHANNELS, *size, source_channels=SOURCE_CHANNELS, dtype=dtype)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=dtype)
    got = forward_backward(fast, x, source, upstream)
    want = forward_backward(direct, x, source, upstream)
    assert got.keys() == want.keys()
    for key in want:
        if key.startswith("buffer:"):
            continue  # running statistics: test_fast_direct_running_stats
        if dtype == torch.float64:
            torch.testing.assert_close(got[key], want[key], rtol=1e-10, atol=1e-10, msg=key)
        elif not key.startswith("param:"):
            assert rel_err(got[key], want[key]) <= 1e-5, key
    if dtype == torch.float32:
        # The parameter gradient as the optimizer sees it: one vector. Single entries such as a
        # width-1 BN bias are sums with heavy cancellation, so their own relative error in fp32
        # says nothing about the implementation (it is ~2e-5 for either one against float64).
        params = [key for key in want if key.startswith("param:")]
        assert rel_err(flat(got, params), flat(want, params)) <= 1e-5


@pytest.mark.parametrize("size", EQUIV_SIZES, ids=size_id)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fast_equals_direct_without_source(strategy, size):
    torch.manual_seed(8)
    fast = randomize_bn(MSSAR(CHANNELS, (1, 2, 4), strategy)).double().train()
    direct = copy.deepcopy(fast)
    direct.implementation = "direct"
    x, _ = make_inputs(4, CHANNELS, *size, dtype=torch.float64)
    upstream = torch.randn_like(x)
    got = forward_backward(fast, x, None, upstream)
    want = forward_backward(direct, x, None, upstream)
    for key in want:
        if not key.startswith("buffer:"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-10, atol=1e-10, msg=key)


@pytest.mark.parametrize("size", [(32, 32), (8, 8), (7, 7), (18, 17)], ids=size_id)
def test_fast_equals_direct_without_autograd(size):
    torch.manual_seed(13)
    fast = randomize_bn(MSSAR(CHANNELS, (1, 2, 4))).double().train()
    direct = copy.deepcopy(fast)
    direct.implementation = "direct"
    x, _ = make_inputs(4, CHANNELS, *size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), direct(x), rtol=1e-10, atol=1e-10)
    for (name, got), want in zip(fast.named_buffers(), direct.buffers()):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)


RUNNING_STATS_CASES = [
    pytest.param(strategy, scales, size, id=f"{strategy}-{scale_id(scales)}-{size_id(size)}")
    for strategy in STRATEGIES
    for scales in [(1,), (2, 4), (1, 2, 4), (1, 3)]
    for size in [(32, 32), (7, 7), (9, 13)]
]


@pytest.mark.parametrize("strategy,scales,size", RUNNING_STATS_CASES)
def test_fast_direct_running_stats(strategy, scales, size):
    """After a training step both implementations hold the same BN running statistics."""
    torch.manual_seed(9)
    fast = MSSAR(CHANNELS, scales, strategy, source_channels=SOURCE_CHANNELS).double().train()
    direct = copy.deepcopy(fast)
    direct.implementation = "direct"
    x, source = make_inputs(
        4, CHANNELS, *size, source_channels=SOURCE_CHANNELS, dtype=torch.float64
    )
    with torch.no_grad():
        fast(x, source)
        direct(x, source)
    for (name, got), (_, want) in zip(fast.named_buffers(), direct.named_buffers()):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("size", EQUIV_SIZES, ids=size_id)
@pytest.mark.parametrize("scales", SCALE_SETS, ids=scale_id)
def test_autograd_equals_direct(scales, size):
    """The autograd composition (what the fast form runs where the fused gate does not apply)
    on its own, regional strategy: forward, every gradient and the running statistics."""
    torch.manual_seed(6)
    module = randomize_bn(MSSAR(CHANNELS, scales, source_channels=SOURCE_CHANNELS))
    module = module.double().train()
    module.implementation = "autograd"
    direct = copy.deepcopy(module)
    direct.implementation = "direct"
    x, source = make_inputs(
        8, CHANNELS, *size, source_channels=SOURCE_CHANNELS, dtype=torch.float64
    )
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=x.dtype)
    got = forward_backward(module, x, source, upstream)
    want = forward_backward(direct, x, source, upstream)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-10, atol=1e-10, msg=key)


CLAMP_CASES = [
    ((4,), (3, 3)),
    ((1, 2, 4), (2, 2)),
    ((5,), (4, 9)),
    ((1, 3), (9, 2)),
    ((2, 4), (1, 6)),
    ((1, 2, 4), (2, 64)),  # the fused gate's bands, one row each
    ((4,), (3, 90)),  # non-uniform and too large for the gate's matrices: the composition
]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(
    "scales,size", CLAMP_CASES, ids=[f"{scale_id(s)}-{size_id(z)}" for s, z in CLAMP_CASES]
)
def test_scales_larger_than_the_map_agree_with_the_direct_oracle(
    scales, size, strategy, dtype, implementation
):
    """A scale larger than an axis is clamped to it, rows and columns separately, in every
    implementation: each equals the float64 direct form in training, forward and backward."""
    torch.manual_seed(14)
    module = randomize_bn(MSSAR(CHANNELS, scales, strategy, source_channels=SOURCE_CHANNELS))
    module = module.train()
    oracle = copy.deepcopy(module).double()
    oracle.implementation = "direct"
    module = module.to(dtype)
    module.implementation = implementation
    x, source = make_inputs(
        4, CHANNELS, *size, source_channels=SOURCE_CHANNELS, dtype=torch.float64
    )
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    want = forward_backward(oracle, x, source, upstream)
    got = forward_backward(module, x.to(dtype), source.to(dtype), upstream.to(dtype))
    assert got.keys() == want.keys()
    if dtype == torch.float64:
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-10, atol=1e-10, msg=key)
        return
    for key in want:
        if not key.startswith("param:"):
            assert rel_err(got[key], want[key]) <= 1e-5, key
    params = [key for key in want if key.startswith("param:")]
    assert rel_err(flat(got, params), flat(want, params)) <= 1e-5


def test_clamped_regions_are_rows_and_columns():
    """On a 3 x 9 map, K = 4 cuts 3 x 4 regions: each row its own, columns as usual."""
    assert regions_along(3, 4) == 3 and regions_along(9, 4) == 4 and regions_along(4, 4) == 4
    assert region_bounds(3, 4) == [0, 1, 2, 3] and region_bounds(9, 4) == [0, 3, 5, 7, 9]
    assert region_of_index(2, 5) == [0, 1]
    plan = grid_plan(3, 9, (1, 4), torch.device("cpu"), torch.float64)
    assert plan.regions(4) == (3, 4) and plan.regions(1) == (1, 1)
    torch.manual_seed(15)
    module = randomize_bn(MSSAR(CHANNELS, (4,))).double().eval()
    x, _ = make_inputs(2, CHANNELS, 3, 9, dtype=torch.float64)
    with torch.no_grad():
        gates = module(torch.ones_like(x), x)
    for i, j in [(0, 0), (1, 5), (2, 8)]:  # region (i, col region of j)
        cols = {0: slice(0, 3), 5: slice(5, 7), 8: slice(7, 9)}[j]
        pooled = x[:, :, i, cols].mean(2)
        torch.testing.assert_close(gates[:, :, i, j], module.branches[0](pooled))


def single_value(strategy, scales, size) -> bool:
    """Whether one image gives some scale a single pooled vector (BN sees one value)."""
    if strategy == "sliding":
        return any(sliding_radius(*size, k) >= max(size) - 1 for k in scales)
    return any(regions_along(size[0], k) * regions_along(size[1], k) == 1 for k in scales)


BATCH_ONE_CASES = [
    ((1,), (8, 8)),
    ((1, 2, 4), (8, 8)),
    ((2, 4), (8, 8)),
    ((1, 3), (9, 13)),  # sliding K = 1 is not global on this map
    ((2,), (32, 32)),
    ((4,), (1, 1)),  # every scale clamps to one region
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(
    "scales,size", BATCH_ONE_CASES, ids=[f"{scale_id(s)}-{size_id(z)}" for s, z in BATCH_ONE_CASES]
)
def test_batch_of_one_has_the_same_outcome_in_every_implementation(
    scales, size, strategy, training
):
    """One image: in training, a scale that pools it into one vector per channel leaves its BN
    a single value, which every implementation refuses with nn.BatchNorm1d's ValueError; every
    other case gives every implementation the direct form's result."""
    torch.manual_seed(16)
    module = randomize_bn(MSSAR(CHANNELS, scales, strategy)).double().train(training)
    x, _ = make_inputs(1, CHANNELS, *size, dtype=torch.float64)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=x.dtype)
    outcomes = {}
    for implementation in IMPLEMENTATIONS:
        m = copy.deepcopy(module)
        m.implementation = implementation
        try:
            outcomes[implementation] = forward_backward(m, x, None, upstream)
        except ValueError as error:
            outcomes[implementation] = str(error)
    refused = training and single_value(strategy, scales, size)
    for implementation, outcome in outcomes.items():
        if refused:
            assert isinstance(outcome, str), implementation
            assert "more than 1 value per channel" in outcome
            assert outcome == outcomes["direct"]
        else:
            assert isinstance(outcome, dict), (implementation, outcome)
            for key, want in outcomes["direct"].items():
                got = outcome[key]
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=key)


# --- one global scale: SE with a BN -----------------------------------------------------------


def test_mssar_single_scale_is_se_with_bn():
    """SPEC.md §1: MS-SAR with L = {1} differs from SE only by the BN in σ1."""
    torch.manual_seed(11)
    channels, hidden = 16, 4
    m = MSSAR(channels, (1,), hidden_channels=hidden).double().eval()
    se = SqueezeExcitation(channels, hidden_channels=hidden).double().eval()
    branch = m.branches[0]
    with torch.no_grad():
        # make the eval-mode BN the identity: (y - 0) / sqrt(1 - eps + eps) * 1 + 0
        branch.bn.running_mean.zero_()
        branch.bn.running_var.fill_(1 - branch.bn.eps)
        branch.bn.weight.fill_(1)
        branch.bn.bias.zero_()
        se.fc1.weight.copy_(branch.reduce.weight[:, :, None, None])
        se.fc1.bias.zero_()
        se.fc2.weight.copy_(branch.expand.weight[:, :, None, None])
        se.fc2.bias.copy_(branch.expand.bias)
        x, _ = make_inputs(2, channels, 6, 6, dtype=torch.float64)
        torch.testing.assert_close(m(x), se(x), rtol=1e-12, atol=1e-12)
