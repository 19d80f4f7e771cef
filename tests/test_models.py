"""Model registry and networks (SPEC.md §2-3): every network with every recalibration trains
(forward and backward), the ImageNet baselines *are* torchvision's, options reach the modules, and
bad input fails with a ModelError that names the valid choices.

Oracles: torchvision's own networks. Everything runs on batches of 2 and small inputs; where the
modules sit, their widths and the cost accounting are in test_model_structure.py.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from helpers import (
    CIFAR_RESNETS,
    DENSENETS,
    IMAGENET,
    NUM_CLASSES,
    UNITS,
    any_recalibration,
    build_meta,
    n_params,
    recalibration_modules,
)
from torch import nn

from mssar_cli.errors import ModelError, MssarError
from mssar_cli.models import MODELS, create_model, list_models, model_spec
from mssar_cli.recalibration import RECALIBRATIONS, option_names
from mssar_cli.recalibration.mssar import ScaleBranch

RECALS = ["none", "se", "mssar"]
ZOO = ["eca", "cbam", "ge", "coord", "gc"]  # the modules that came after MS-SAR (SPEC.md §7)
TORCHVISION = {
    "resnet18": (torchvision.models.resnet18, 11_689_512),
    "resnet34": (torchvision.models.resnet34, 21_797_672),
    "resnet50": (torchvision.models.resnet50, 25_557_032),
    "resnext50": (torchvision.models.resnext50_32x4d, 25_028_904),
}
IMAGENET_SIZE = 64  # layer4 is 2x2 here: MS-SAR's K = 4 is clamped to 2 x 2 regions


pytestmark = pytest.mark.usefixtures("one_thread")


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
        "resnet50",
        "resnext50",
    ]
    assert list(RECALIBRATIONS) == [*RECALS, *ZOO]
    # the shared lists (tests/helpers.py) cover every 224x224 network of the registry
    assert IMAGENET == [name for name, spec in MODELS.items() if spec.family == "imagenet-resnet"]
    assert list(UNITS) == [*CIFAR_RESNETS, *DENSENETS, *IMAGENET]
    assert model_spec("resnet50").label == "ResNet-50"
    assert model_spec("resnet50").default_reduction == 16  # SENet's, as every ImageNet net
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
@pytest.mark.parametrize("name", ["resnet20", "densenet100", "resnet50", "resnext50"])
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


@pytest.mark.filterwarnings("ignore:for .*num_batches_tracked:UserWarning")  # torch, meta BN
@pytest.mark.parametrize("recalibration", ZOO)
def test_torchvision_resnet50_checkpoint_loads_under_every_later_module(recalibration):
    """The recipes' ResNet-50 with ECA, CBAM, GE, CA or GC: torchvision's backbone, one module
    per block as the only new keys (SE's placement, SPEC.md §7)."""
    with torch.device("meta"):
        ours = create_model("resnet50", num_classes=1000, recalibration=recalibration)
        theirs = torchvision.models.resnet50(weights=None)
    result = ours.load_state_dict(theirs.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys
    assert all(".recalibration." in key for key in result.missing_keys)
    assert len({key.split(".recalibration.")[0] for key in result.missing_keys}) == 16


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_plain_network_computes_what_torchvision_computes(name):
    torch.manual_seed(1)
    theirs = TORCHVISION[name][0](weights=None).eval()
    ours = create_model(name, num_classes=1000).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, IMAGENET_SIZE, IMAGENET_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


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
