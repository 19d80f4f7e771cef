"""Model registry and networks (SPEC.md §2-3): every network with every recalibration trains
(forward and backward), the ImageNet baselines *are* torchvision's, the modules sit where the
paper puts them with the widths of SPEC.md §1, options reach the modules, bad input fails with
a ModelError that names the valid choices, and the paper's cost accounting of ResNet-20 holds.

Oracles: torchvision's own networks, closed-form parameter counts (MS-SAR, SE, DenseNet-BC) and
hand-counted convolution MACs. Everything runs on batches of 2 and small inputs.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from mssar_cli import complexity
from mssar_cli.errors import ModelError, MssarError
from mssar_cli.models import MODELS, create_model, list_models, model_spec
from mssar_cli.models.blocks import (
    RecalibratedBasicBlock,
    RecalibratedBottleneck,
    with_recalibration,
)
from mssar_cli.models.densenet import DenseLayer
from mssar_cli.recalibration import RECALIBRATIONS, option_names
from mssar_cli.recalibration.mssar import MSSAR, ScaleBranch
from mssar_cli.recalibration.se import SqueezeExcitation

NUM_CLASSES = 7  # not a default of any family, so the classifier width is really passed through
CIFAR_RESNETS = ["resnet20", "resnet32", "resnet56"]
IMAGENET = ["resnet18", "resnet34", "resnext50"]
DENSENETS = ["densenet100", "densenet190"]
RECALS = ["none", "se", "mssar"]
ZOO = ["eca", "cbam", "ge", "coord", "gc"]  # the modules that came after MS-SAR (SPEC.md §7)
TORCHVISION = {
    "resnet18": (torchvision.models.resnet18, 11_689_512),
    "resnet34": (torchvision.models.resnet34, 21_797_672),
    "resnext50": (torchvision.models.resnext50_32x4d, 25_028_904),
}
# residual blocks / dense layers: one recalibration module each (SPEC.md §2)
UNITS = {
    "resnet20": 9,
    "resnet32": 15,
    "resnet56": 27,
    "densenet100": 48,
    "densenet190": 93,
    "resnet18": 8,
    "resnet34": 16,
    "resnext50": 16,
}
IMAGENET_SIZE = 64  # layer4 is 2x2 here: MS-SAR's K = 4 is clamped to 2 x 2 regions


pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def recalibration_modules(model: nn.Module, kind: str) -> list[nn.Module]:
    cls = {"se": SqueezeExcitation, "mssar": MSSAR}[kind]
    return [m for m in model.modules() if isinstance(m, cls)]


def any_recalibration(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (MSSAR, SqueezeExcitation, ScaleBranch))]


def build_meta(name: str, recalibration: str = "none", **options) -> nn.Module:
    """Structure only: parameters on the meta device (no memory, no initialisation cost).

    Cached, since several tests inspect the same network: callers must not modify it."""
    return _build_meta(name, recalibration, tuple(sorted(options.items())))


@functools.cache
def _build_meta(name: str, recalibration: str, options: tuple) -> nn.Module:
    with torch.device("meta"):
        return create_model(
            name, num_classes=NUM_CLASSES, recalibration=recalibration, **dict(options)
        )


def check_trains(model: nn.Module, size: int, num_classes: int = NUM_CLASSES) -> None:
    """One training-mode forward/backward on a batch of 2: output shape, finite values, and a
    finite gradient on every parameter (none left out of the graph), non-zero on every
    recalibration module."""
    torch.manual_seed(0)
    model.train()
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without a gradient: {missing[:5]}"
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad[:5]}"
    for module in any_recalibration(model):
        if isinstance(module, ScaleBranch):
            continue
        total = sum(p.grad.abs().sum() for p in module.parameters())
        assert total > 0, f"recalibration module {module} gets no gradient"


# --- registry -----------------------------------------------------------------------------------


def test_registry_lists_the_papers_networks():
    assert list_models() == [
        "resnet20",
        "resnet32",
        "resnet56",
        "densenet100",
        "densenet190",
        "resnet18",
        "resnet34",
        "resnext50",
    ]
    assert list(RECALIBRATIONS) == [*RECALS, *ZOO]
    for name in list_models():
        spec = model_spec(name)
        assert spec.input_size == (224 if name in IMAGENET else 32)
        assert spec.is_densenet == (name in DENSENETS)


# --- forward and backward -----------------------------------------------------------------------


@pytest.mark.parametrize("recalibration", RECALS)
@pytest.mark.parametrize("name", CIFAR_RESNETS)
def test_cifar_resnet_trains(name, recalibration):
    model = create_model(name, num_classes=NUM_CLASSES, recalibration=recalibration)
    check_trains(model, 32)


@pytest.mark.parametrize(
    "recalibration, stage",
    [("none", None), ("se", "single"), ("se", "multi"), ("mssar", "single"), ("mssar", "multi")],
)
def test_densenet100_trains(recalibration, stage):
    model = create_model(
        "densenet100", num_classes=NUM_CLASSES, recalibration=recalibration, stage=stage
    )
    check_trains(model, 32)


@pytest.mark.parametrize("recalibration", RECALS)
@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_network_trains(name, recalibration):
    """At 64x64, with the default scales {1, 2, 4} on a 2x2 last stage."""
    model = create_model(name, num_classes=NUM_CLASSES, recalibration=recalibration)
    check_trains(model, IMAGENET_SIZE)


@pytest.mark.parametrize("recalibration", ZOO)
@pytest.mark.parametrize("name", ["resnet20", "densenet100", "resnext50"])
def test_the_later_modules_train_in_every_family(name, recalibration):
    """At SE's placement (residual branch after its last BN; DenseNet layers on the new maps,
    single-stage: these modules gate the map they are given); ImageNet networks at 64x64."""
    model = create_model(name, num_classes=NUM_CLASSES, recalibration=recalibration)
    modules = [m for m in model.modules() if getattr(m, "name", None) == recalibration]
    assert len(modules) == (48 if name == "densenet100" else 9 if name == "resnet20" else 16)
    check_trains(model, IMAGENET_SIZE if name in IMAGENET else 32)


def test_mssar_sliding_direct_network_trains():
    model = create_model(
        "resnet20",
        recalibration="mssar",
        scales=(1, 2),
        strategy="sliding",
        implementation="direct",
    )
    check_trains(model, 32, num_classes=10)


@pytest.mark.parametrize("implementation", ["fast", "autograd", "direct"])
def test_scale_larger_than_feature_map_is_clamped(implementation):
    """layer3 of ResNet-20 is 8x8 and layer2 16x16: K = 16 is clamped there, and every
    implementation computes the same network."""
    model = create_model(
        "resnet20", recalibration="mssar", scales=(1, 16), implementation=implementation
    )
    check_trains(model, 32, num_classes=10)
    torch.manual_seed(2)
    reference = create_model(
        "resnet20", recalibration="mssar", scales=(1, 16), implementation="direct"
    )
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference.eval()(x), rtol=1e-4, atol=1e-5)


# --- DenseNet-BC parameter counts (closed form) -------------------------------------------------


def densenet_params(depth: int, recalibration: str, stage: str, num_classes: int) -> int:
    """DenseNet-BC (k = 12 / 40, compression 0.5) counted by hand, plus one module per layer:
    MS-SAR with L = 3 and D' = k // 3 (reduction 1), SE with hidden width k (reduction 1)."""
    k = {100: 12, 190: 40}[depth]
    n = (depth - 4) // 6
    channels = 2 * k
    total = 3 * channels * 9  # stem
    for block in range(3):
        for i in range(n):
            c = channels + i * k
            total += 2 * c + c * 4 * k + 2 * 4 * k + 4 * k * k * 9
            source = c if stage == "multi" else k
            if recalibration == "mssar":
                hidden = k // 3
                total += 3 * (source * hidden + 2 * hidden + hidden * k + k)
            elif recalibration == "se":
                total += source * k + k + k * k + k
        channels += n * k
        if block < 2:
            total += 2 * channels + channels * (channels // 2)
            channels //= 2
    return total + 2 * channels + channels * num_classes + num_classes


@pytest.mark.parametrize(
    "recalibration, stage",
    [("none", "multi"), ("se", "single"), ("se", "multi"), ("mssar", "single"), ("mssar", "multi")],
)
@pytest.mark.parametrize("name", DENSENETS)
def test_densenet_parameter_count(name, recalibration, stage):
    options = {} if recalibration == "none" else {"stage": stage}
    model = build_meta(name, recalibration, **options)
    depth = model_spec(name).depth
    assert n_params(model) == densenet_params(depth, recalibration, stage, NUM_CLASSES)


def test_densenet_baseline_sizes_match_the_paper_family():
    # Huang et al.: DenseNet-BC k=12 depth 100 has 0.8 M parameters, k=40 depth 190 25.6 M.
    assert round(n_params(build_meta("densenet100")) / 1e6, 2) == 0.77
    assert round(n_params(build_meta("densenet190")) / 1e6, 1) == 25.6


# --- torchvision parity -------------------------------------------------------------------------


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_baseline_is_torchvision(name):
    builder, expected = TORCHVISION[name]
    with torch.device("meta"):
        ours = create_model(name, num_classes=1000)
        theirs = builder(weights=None)
    assert n_params(ours) == n_params(theirs) == expected
    assert type(ours) is torchvision.models.ResNet
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())


@pytest.mark.filterwarnings("ignore:for .*num_batches_tracked:UserWarning")  # torch, meta BN
@pytest.mark.parametrize("recalibration", ["se", "mssar"])
@pytest.mark.parametrize("name", IMAGENET)
def test_torchvision_checkpoint_loads_into_recalibrated_backbone(name, recalibration):
    builder, _ = TORCHVISION[name]
    with torch.device("meta"):
        ours = create_model(name, num_classes=1000, recalibration=recalibration)
        theirs = builder(weights=None)
    result = ours.load_state_dict(theirs.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys
    assert all(".recalibration." in key for key in result.missing_keys)
    per_block = {key.split(".recalibration.")[0] for key in result.missing_keys}
    assert len(per_block) == UNITS[name]


def test_resnet18_computes_what_torchvision_computes():
    torch.manual_seed(1)
    theirs = torchvision.models.resnet18(weights=None).eval()
    ours = create_model("resnet18", num_classes=1000).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, IMAGENET_SIZE, IMAGENET_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


# --- where the modules are ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_plain_networks_have_no_recalibration(name):
    assert any_recalibration(build_meta(name)) == []


@pytest.mark.parametrize("recalibration", ["se", "mssar"])
@pytest.mark.parametrize("name", CIFAR_RESNETS + IMAGENET)
def test_one_module_per_residual_block(name, recalibration):
    model = build_meta(name, recalibration)
    other = "se" if recalibration == "mssar" else "mssar"
    assert len(recalibration_modules(model, recalibration)) == UNITS[name]
    assert recalibration_modules(model, other) == []
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert len(blocks) == UNITS[name]
    for block in blocks:
        last_bn = block.bn3 if isinstance(block, Bottleneck) else block.bn2
        module = block.recalibration
        assert isinstance(module, SqueezeExcitation if recalibration == "se" else MSSAR)
        assert module.channels == last_bn.num_features
        assert module.source_channels == last_bn.num_features


@pytest.mark.parametrize("stage", ["single", "multi"])
@pytest.mark.parametrize("recalibration", ["se", "mssar"])
@pytest.mark.parametrize("name", DENSENETS)
def test_one_module_per_dense_layer(name, recalibration, stage):
    model = build_meta(name, recalibration, stage=stage)
    k = {"densenet100": 12, "densenet190": 40}[name]
    layers = [m for m in model.modules() if isinstance(m, DenseLayer)]
    assert len(layers) == UNITS[name]
    assert len(recalibration_modules(model, recalibration)) == UNITS[name]
    for layer in layers:
        module = layer.recalibration
        assert module.channels == k
        expected_source = layer.norm1.num_features if stage == "multi" else k
        assert module.source_channels == expected_source
    # the multi-stage source grows with the layer's input; single-stage stays k
    sources = {layer.recalibration.source_channels for layer in layers}
    assert (len(sources) > 1) == (stage == "multi")


class Spy(nn.Module):
    """A stand-in recalibration that records what it is given and doubles ``x``."""

    def __init__(self, channels: int, source_channels: int | None = None) -> None:
        super().__init__()
        self.channels, self.source_channels = channels, source_channels
        self.seen: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def forward(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        self.seen.append((x, source))
        return 2 * x


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_module_sits_after_the_last_bn_before_the_addition(kind):
    """SPEC.md §2: on the residual branch after its last BN, before the shortcut is added."""
    torch.manual_seed(0)
    base = RecalibratedBasicBlock if kind == "basic" else RecalibratedBottleneck
    inplanes, planes = (8, 8) if kind == "basic" else (16, 4)  # bottleneck: 4 * 4 = 16 out
    block = with_recalibration(base, Spy)(inplanes, planes).eval()
    x = torch.randn(2, inplanes, 6, 6)
    with torch.no_grad():
        out = block(x)
        branch = block.relu(block.bn1(block.conv1(x)))
        if kind == "basic":
            branch = block.bn2(block.conv2(branch))
        else:
            branch = block.bn3(block.conv3(block.relu(block.bn2(block.conv2(branch)))))
    assert isinstance(block.recalibration, Spy) and block.recalibration.channels == inplanes
    ((seen, source),) = block.recalibration.seen
    torch.testing.assert_close(seen, branch)
    assert source is None
    torch.testing.assert_close(out, torch.relu(2 * branch + x))


@pytest.mark.parametrize("stage", ["single", "multi"])
def test_dense_layer_recalibrates_the_new_maps(stage):
    """SPEC.md §2: the k new maps, before the concatenation; weights from the layer's input
    (multi-stage) or from the new maps themselves (single-stage)."""
    torch.manual_seed(0)
    layer = DenseLayer(20, 6, stage, Spy).eval()
    assert layer.recalibration.source_channels == (20 if stage == "multi" else 6)
    features = torch.randn(2, 20, 5, 5)
    with torch.no_grad():
        out = layer(features)
        new = layer.conv2(layer.relu2(layer.norm2(layer.conv1(layer.relu1(layer.norm1(features))))))
    ((seen, source),) = layer.recalibration.seen
    torch.testing.assert_close(seen, new)
    torch.testing.assert_close(source, features if stage == "multi" else new)
    torch.testing.assert_close(out, 2 * new)


def test_densenet_default_stage_is_multi():
    model = build_meta("densenet100", "mssar")
    layer = next(m for m in model.modules() if isinstance(m, DenseLayer))
    assert layer.multi_stage
    assert layer.recalibration.source_channels == layer.norm1.num_features == 24


# --- options reach the modules ------------------------------------------------------------------


def test_mssar_defaults_cifar_resnet():
    for module in recalibration_modules(build_meta("resnet20", "mssar"), "mssar"):
        assert module.scales == (1, 2, 4)
        assert module.strategy == "regional"
        assert module.implementation == "fast"
        # total width D / 3 split over 3 scales: 16 -> 1, 32 -> 3, 64 -> 7
        assert module.hidden_channels == {16: 1, 32: 3, 64: 7}[module.channels]


def test_none_options_take_the_family_defaults():
    explicit_none = dict.fromkeys([*option_names(), "stage"])  # every option None
    a = build_meta("resnet20", "mssar", **explicit_none)
    b = build_meta("resnet20", "mssar")
    assert n_params(a) == n_params(b)
    assert [repr(m) for m in recalibration_modules(a, "mssar")] == [
        repr(m) for m in recalibration_modules(b, "mssar")
    ]
    assert n_params(build_meta("resnet20", "none", **explicit_none)) == n_params(
        build_meta("resnet20")
    )


def test_mssar_options_pass_through():
    model = build_meta(
        "resnet20", "mssar", scales=(1, 2), strategy="sliding", reduction=2, implementation="direct"
    )
    modules = recalibration_modules(model, "mssar")
    assert len(modules) == 9
    for module in modules:
        assert module.scales == (1, 2)
        assert module.strategy == "sliding"
        assert module.implementation == "direct"
        assert module.hidden_channels == module.channels // 4  # D / 2 split over 2 scales
        assert len(module.branches) == 2


@pytest.mark.parametrize("strategy", ["regional", "sliding"])
def test_fast_and_direct_networks_agree(strategy):
    options = {"recalibration": "mssar", "scales": (1, 2, 4), "strategy": strategy}
    torch.manual_seed(0)
    fast = create_model("resnet20", implementation="fast", **options)
    direct = create_model("resnet20", implementation="direct", **options)
    direct.load_state_dict(fast.state_dict(), strict=True)
    fast.eval()
    direct.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), direct(x), rtol=1e-4, atol=1e-5)


def test_se_reduction_passes_through():
    for reduction, widths in [(None, {16: 5, 32: 10, 64: 21}), (4, {16: 4, 32: 8, 64: 16})]:
        model = build_meta("resnet20", "se", reduction=reduction)
        modules = recalibration_modules(model, "se")
        assert len(modules) == 9
        for module in modules:
            assert module.fc1.out_channels == widths[module.channels]
            assert module.fc2.out_channels == module.channels


def test_densenet_options_pass_through():
    model = build_meta("densenet100", "mssar", scales=(2,), reduction=2, stage="single")
    for module in recalibration_modules(model, "mssar"):
        assert module.scales == (2,)
        assert module.hidden_channels == 6  # k / 2 over one scale
        assert module.source_channels == 12
    default = build_meta("densenet100", "mssar")
    assert {m.hidden_channels for m in recalibration_modules(default, "mssar")} == {4}  # k / L


def test_imagenet_default_reduction_is_senets():
    mssar = build_meta("resnet18", "mssar")
    for module in recalibration_modules(mssar, "mssar"):
        assert module.hidden_channels == max(1, module.channels // 48)  # D / 16 over 3 scales
    se = build_meta("resnet18", "se")
    for module in recalibration_modules(se, "se"):
        assert module.fc1.out_channels == module.channels // 16


# --- errors -------------------------------------------------------------------------------------


def test_unknown_model_lists_the_known_ones():
    for call in (lambda: create_model("resnet21"), lambda: model_spec("resnet21")):
        with pytest.raises(ModelError) as info:
            call()
        message = str(info.value)
        assert "resnet21" in message
        assert all(name in message for name in list_models())


def test_unknown_recalibration_lists_the_known_ones():
    with pytest.raises(ModelError) as info:
        create_model("resnet20", recalibration="cbma")
    assert all(kind in str(info.value) for kind in [*RECALS, *ZOO])
    assert "did you mean 'cbam'?" in str(info.value)


@pytest.mark.parametrize("recalibration", RECALS)
def test_unknown_option_lists_the_known_ones(recalibration):
    with pytest.raises(ModelError) as info:
        create_model("resnet20", recalibration=recalibration, width=3)
    message = str(info.value)
    assert f"{recalibration!r} does not take 'width'" in message
    assert all(option in message for option in RECALIBRATIONS[recalibration].options)


@pytest.mark.parametrize(
    "name, recalibration, options, expected",
    [
        ("resnet20", "mssar", {"scales": (0,)}, "positive"),
        ("resnet20", "mssar", {"scales": ()}, "non-empty"),
        ("resnet20", "mssar", {"scales": (1, 1)}, "distinct"),
        ("resnet20", "mssar", {"scales": (1.5,)}, "integers"),
        ("resnet20", "mssar", {"scales": 2}, "sequence"),
        ("resnet20", "mssar", {"strategy": "diagonal"}, "regional.*sliding"),
        ("resnet20", "mssar", {"implementation": "slow"}, "fast.*direct"),
        ("resnet20", "mssar", {"reduction": 0}, "positive"),
        ("resnet20", "se", {"reduction": -2}, "positive"),
        ("densenet100", "mssar", {"stage": "triple"}, "single.*multi"),
        ("densenet100", "none", {"stage": "both"}, "single.*multi"),
        ("resnet20", "mssar", {"stage": "single"}, "only to DenseNets"),
        ("resnet18", "none", {"stage": "multi"}, "only to DenseNets"),
        ("resnet20", "se", {"scales": (1, 2)}, "'se' does not take 'scales'.*reduction"),
        ("resnet20", "se", {"strategy": "sliding"}, "'se' does not take 'strategy'"),
        ("resnet20", "se", {"implementation": "direct"}, "'se' does not take 'implementation'"),
        ("resnet20", "none", {"scales": (1, 2)}, "'none' does not take 'scales'"),
        ("resnet20", "none", {"reduction": 3}, "'none' does not take 'reduction'"),
        ("resnet20", "mssar", {"reduction": "3"}, "reduction must be a positive number"),
        ("resnet18", "none", {"in_channels": 1}, "3-channel"),
        ("resnet20", "none", {"in_channels": 0}, "in_channels must be a positive integer"),
    ],
)
def test_bad_option_values(name, recalibration, options, expected):
    with pytest.raises(ModelError, match=expected) as info:
        build_meta(name, recalibration, **options)
    assert isinstance(info.value, MssarError)  # one line at the CLI, no traceback


# --- MS-SAR parameter formula (SPEC.md §1) ------------------------------------------------------


def width(channels: int, num_scales: int, reduction: int) -> int:
    return max(1, channels // (reduction * num_scales))


@pytest.mark.parametrize("reduction", [1, 3, 16])
@pytest.mark.parametrize("scales", [(1,), (2,), (1, 2), (1, 4), (1, 2, 4)], ids=str)
@pytest.mark.parametrize("channels", [12, 16, 40, 64, 512])
def test_mssar_parameter_formula(channels, scales, reduction):
    module = MSSAR(channels, scales, reduction=reduction)
    L, D, Dh = len(scales), channels, width(channels, len(scales), reduction)
    assert module.hidden_channels == Dh
    assert n_params(module) == 2 * L * D * Dh + L * (2 * Dh + D)
    assert len(module.branches) == L
    for branch in module.branches:  # reduce D -> D' (no bias), BN(D'), expand D' -> D (+bias)
        assert branch.reduce.weight.shape == (Dh, D) and branch.reduce.bias is None
        assert branch.bn.weight.shape == branch.bn.bias.shape == (Dh,)
        assert branch.expand.weight.shape == (D, Dh) and branch.expand.bias.shape == (D,)


@pytest.mark.parametrize("scales", [(1,), (1, 2, 4)], ids=str)
def test_mssar_parameter_formula_with_source_and_hidden(scales):
    L, D, Dsrc, Dh = len(scales), 12, 108, 5
    module = MSSAR(D, scales, source_channels=Dsrc, hidden_channels=Dh)
    assert n_params(module) == L * (Dsrc * Dh + 2 * Dh + Dh * D + D)


def test_resnet20_mssar_extra_parameters_follow_the_formula():
    extra = n_params(build_meta("resnet20", "mssar")) - n_params(build_meta("resnet20"))
    per_block = {D: 2 * 3 * D * width(D, 3, 3) + 3 * (2 * width(D, 3, 3) + D) for D in (16, 32, 64)}
    assert extra == 3 * sum(per_block.values()) == 11_286


# --- complexity accounting (paper Table 2) ------------------------------------------------------


def resnet20_macs() -> int:
    """Convolution and classifier MACs of ResNet-20 on one 32x32 image, counted by hand."""
    stem = 3 * 16 * 9 * 32 * 32
    stage1 = 6 * 16 * 16 * 9 * 32 * 32
    stage2 = 16 * 32 * 9 * 16 * 16 + 5 * 32 * 32 * 9 * 16 * 16 + 16 * 32 * 16 * 16
    stage3 = 32 * 64 * 9 * 8 * 8 + 5 * 64 * 64 * 9 * 8 * 8 + 32 * 64 * 8 * 8
    return stem + stage1 + stage2 + stage3 + 64 * 10


def test_resnet20_cost_matches_paper_accounting():
    model = create_model("resnet20", num_classes=10)
    params = complexity.count_parameters(model)
    assert params == n_params(model) == 272_474
    assert complexity.projection_params(model) == 2_752
    # the paper's 0.27 M: He et al.'s identity-shortcut count, i.e. ours less the projections
    assert round((params - complexity.projection_params(model)) / 1e6, 2) == 0.27
    flops = complexity.count_flops(model, 32)
    assert abs(flops - resnet20_macs()) <= 10  # the classifier's bias adds at most 10
    assert abs(flops - 40.8e6) <= 0.005 * 40.8e6
    assert round(flops / 1e6, 2) == 40.81
    assert model.training  # count_flops restores the mode
    assert complexity.measure("resnet20") == complexity.Complexity(params, flops)


def test_measure_counts_the_direct_form_at_any_input_size():
    """FLOPs are counted on a model built in the direct form (paper §3.5: the MLPs on the pooled
    positions): the same parameters as the default build, and every module direct."""
    counted = complexity.build_for_counting("resnet20", "mssar")
    modules = recalibration_modules(counted, "mssar")
    assert modules and all(m.implementation == "direct" for m in modules)
    default = create_model("resnet20", recalibration="mssar")
    assert {m.implementation for m in recalibration_modules(default, "mssar")} == {"fast"}
    measured = complexity.measure("resnet20", "mssar")
    assert measured.params == n_params(default)
    assert measured.flops == complexity.count_flops(counted, 32)
    # paper §3.5: 2 D D' sum_l K_l^2 extra MACs per module, and b2 (D per region) as counted
    plain = complexity.measure("resnet20")
    extra = sum(
        3 * (d * width(d, 3, 3) * (1 + 4 + 16) * 2 + d * (1 + 4 + 16)) for d in (16, 32, 64)
    )
    assert measured.flops - plain.flops == extra
    # sliding: 2 L W H D D' (every scale's MLP at every position, K = 1's global window too)
    sliding = complexity.measure("resnet20", "mssar", strategy="sliding")
    maps = ((16, 32 * 32), (32, 16 * 16), (64, 8 * 8))
    extra = sum(3 * 3 * positions * (2 * d * width(d, 3, 3) + d) for d, positions in maps)
    assert sliding.flops - plain.flops == extra
    # an explicit input size and channel count (a 2x2 last stage: K = 4 clamped)
    small = complexity.measure("resnet18", "mssar", num_classes=10, input_size=64)
    assert small.params == n_params(build_meta("resnet18", "mssar")) + (10 - NUM_CLASSES) * 513
    gray = complexity.measure("resnet20", in_channels=1)
    assert gray.params == plain.params - 2 * 16 * 9
    single = complexity.measure("densenet100", "mssar", stage="single")
    assert single.params < complexity.measure("densenet100", "mssar").params


def test_projection_params_only_for_cifar_resnets():
    assert complexity.projection_params(build_meta("resnet18")) == 0
    assert complexity.projection_params(build_meta("densenet100")) == 0
    assert complexity.projection_params(build_meta("resnet56")) == 2_752
