"""The shipped recipes (recipes/): every file loads and builds its network, follows its
protocol (the paper's, the shortened ones, the later modules' defaults) and says so in its
header."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest
import yaml

from mssar_cli import recipe
from mssar_cli.models import MODELS, create_model, list_models
from mssar_cli.recalibration import RECALIBRATIONS, resolve_options
from mssar_cli.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
SHIPPED = sorted(RECIPES.glob("**/*.yaml"))

CIFAR_NETS = ("resnet20", "resnet32", "resnet56", "densenet100", "densenet190")
ZOO = ("eca", "cbam", "ge", "coord", "gc")  # the modules that came after MS-SAR (SPEC.md §7)
EXPECTED = (
    {
        f"{ds}/{net}_{v}.yaml"
        for ds in ("cifar10", "cifar100")
        for net in CIFAR_NETS
        for v in ("plain", "mssar")
    }
    # every other module on ResNet-56, at SE's placement (SPEC.md §7)
    | {f"{ds}/resnet56_{v}.yaml" for ds in ("cifar10", "cifar100") for v in ("se", *ZOO)}
    | {
        f"imagenet/{net}_{v}.yaml"
        for net in ("resnet18", "resnet34", "resnext50")
        for v in ("plain", "se", "mssar")
    }
    # ResNet-50, not in the paper: the network of the later modules' published ImageNet numbers
    | {f"imagenet/resnet50_{v}.yaml" for v in ("plain", "se", "mssar", *ZOO)}
    | {
        f"fashion_mnist/{net}_{v}.yaml"
        for net in ("resnet20", "resnet56")
        for v in ("plain", "se", "mssar")
    }
    | {f"fashion_mnist/resnet20_{v}.yaml" for v in ZOO}
    | {f"fashion_mnist/cpu_short/resnet20_{v}.yaml" for v in ("plain", "se", "mssar")}
    | {f"fashion_mnist/gpu_short/resnet20_{v}.yaml" for v in ("plain", "se", "mssar")}
    | {"quickstart.yaml", "smoke.yaml"}
)
CPU_SHORT = RECIPES / "fashion_mnist" / "cpu_short"
GPU_SHORT = RECIPES / "fashion_mnist" / "gpu_short"
SHORTENED = (CPU_SHORT, GPU_SHORT)
RECALIBRATION_OF_SUFFIX = {"plain": "none"} | {n: n for n in RECALIBRATIONS if n != "none"}
# the recipes added with the later modules and ResNet-50 name the command that runs them
WITH_COMMAND = {p for p in EXPECTED if p.split("_")[-1][:-5] in ZOO or "resnet50" in p} | {
    f"{ds}/resnet56_se.yaml" for ds in ("cifar10", "cifar100")
}


def rel(path: Path) -> str:
    return path.relative_to(RECIPES).as_posix()


@functools.cache
def shipped(path: Path) -> Recipe:
    """A shipped recipe, loaded once (a frozen Recipe, safe to share between tests)."""
    return recipe.load(path)


# --- the shipped recipes ------------------------------------------------------------------------


def test_the_expected_recipes_are_shipped():
    assert {rel(p) for p in SHIPPED} == EXPECTED
    assert len(SHIPPED) == 68 and len(WITH_COMMAND) == 25  # 25 added with the later modules


@pytest.mark.parametrize("path", SHIPPED, ids=rel)
def test_shipped_recipe_loads_and_names_a_model(path: Path):
    r = shipped(path)  # recipe.load: also runs the cross-field checks
    assert isinstance(r, Recipe)
    assert r.source == str(path)
    assert r.model.name in list_models()
    raw = yaml.safe_load(path.read_text())
    if path.parent in SHORTENED:  # named apart from the full-protocol runs of the same network
        net, suffix = path.stem.rsplit("_", 1)
        assert r.experiment == raw["experiment"] == f"{net}_{path.parent.name}_{suffix}"
    else:
        assert r.experiment == path.stem  # the key is omitted: the name is the file stem
        assert "experiment" not in raw
    # a header comment naming the paper section and the protocol
    header = path.read_text().splitlines()[0]
    assert header.startswith("# ")
    head = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    assert "§" in head and ("protocol" in head.lower() or "smoke" in head.lower())
    if rel(path) in WITH_COMMAND:  # the recipes added with the later modules and ResNet-50
        assert f"train recipes/{rel(path)}" in head
    if r.model.name == "resnet50":
        assert "PUBLISHED_RESNET50" in head and "Not in the paper" in head


@pytest.mark.parametrize("path", sorted(CPU_SHORT.glob("*.yaml")), ids=rel)
def test_cpu_short_recipe_is_the_shortened_cifar_protocol(path: Path):
    """The committed Fashion-MNIST results' protocol: the CIFAR ResNet recipe on fixed subsets,
    8 epochs with the lr steps at the same fractions (1/2, 3/4) as 80/120 of 160."""
    r = shipped(path)
    o, d, m = r.optim, r.data, r.model
    assert (m.name, m.recalibration) == (
        "resnet20",
        RECALIBRATION_OF_SUFFIX[path.stem.rsplit("_", 1)[1]],
    )
    assert (d.dataset, d.subset, d.test_subset, d.batch_size, d.augment) == (
        "fashion-mnist",
        6000,
        2000,
        128,
        True,
    )
    assert (o.lr, o.momentum, o.nesterov, o.weight_decay, o.gamma) == (0.1, 0.9, True, 1e-4, 0.1)
    assert (o.epochs, o.milestones) == (8, [4, 6])
    if m.recalibration != "none":
        assert m.reduction == 3
    head = path.read_text()
    assert "SHORTENED" in head and "not comparable" in head


@pytest.mark.parametrize("path", sorted(GPU_SHORT.glob("*.yaml")), ids=rel)
def test_gpu_short_recipe_is_the_shortened_cifar_protocol_on_all_images(path: Path):
    """The grid of `make gpu-check`: the CIFAR ResNet recipe on the whole of Fashion-MNIST,
    8 epochs with the lr steps at the same fractions (1/2, 3/4) as 80/120 of 160, compiled."""
    r = shipped(path)
    o, d, m = r.optim, r.data, r.model
    assert (m.name, m.recalibration) == (
        "resnet20",
        RECALIBRATION_OF_SUFFIX[path.stem.rsplit("_", 1)[1]],
    )
    assert (d.dataset, d.subset, d.test_subset, d.batch_size, d.augment) == (
        "fashion-mnist",
        None,
        None,
        128,
        True,
    )
    assert (o.lr, o.momentum, o.nesterov, o.weight_decay, o.gamma) == (0.1, 0.9, True, 1e-4, 0.1)
    assert (o.epochs, o.milestones) == (8, [4, 6])
    assert (r.run.compile, r.run.channels_last, r.run.precision) == (True, True, "auto")
    if m.recalibration != "none":
        assert m.reduction == 3
    head = path.read_text()
    assert "SHORTENED" in head and "not comparable" in head


@pytest.mark.parametrize(
    "path", [p for p in SHIPPED if p.parent not in (RECIPES, *SHORTENED)], ids=rel
)
def test_paper_recipe_follows_its_protocol(path: Path):
    r = shipped(path)
    o, d, m = r.optim, r.data, r.model
    family = MODELS[m.name].family
    folder = path.parent.name
    net, suffix = path.stem.rsplit("_", 1)
    assert m.name == net
    assert m.recalibration == RECALIBRATION_OF_SUFFIX[suffix]
    assert (o.momentum, o.nesterov, o.weight_decay, o.gamma) == (0.9, True, 1e-4, 0.1)
    assert d.augment is True
    assert d.subset is None and d.test_subset is None  # the full data sets
    if folder == "imagenet":
        assert d.dataset == "imagenet" and family == "imagenet-resnet"
        assert (o.epochs, o.milestones, d.batch_size, o.lr) == (100, [30, 60, 90], 1024, 0.6)
        assert d.root == "data/imagenet" and d.workers == 8
        assert r.run.channels_last is True and r.run.precision == "auto"
        if m.recalibration != "none":
            assert m.reduction in (None, 16)  # SENet's ratio, the family default
        return
    assert d.root == "data"
    assert {"cifar10": "cifar10", "cifar100": "cifar100", "fashion_mnist": "fashion-mnist"}[
        folder
    ] == d.dataset
    assert o.lr == 0.1
    if family == "cifar-densenet":
        assert folder != "fashion_mnist"
        assert (o.epochs, o.milestones, d.batch_size) == (300, [150, 225], 64)
        if m.recalibration == "mssar":
            assert m.stage in (None, "multi")  # None is the family default, multi
    else:
        assert family == "cifar-resnet"
        assert (o.epochs, o.milestones, d.batch_size) == (160, [80, 120], 128)
        if m.recalibration != "none":
            assert m.reduction in (None, 3)  # D/3 (paper §4.1); SE the same total width
    if folder == "fashion_mnist" and m.recalibration == "se":
        assert m.reduction == 3


@pytest.mark.parametrize(
    "path", [p for p in SHIPPED if p.stem.endswith("mssar") or p.parent == RECIPES], ids=rel
)
def test_mssar_recipes_use_the_papers_scales_and_strategy(path: Path):
    m = shipped(path).model
    assert m.recalibration == "mssar"
    assert (m.scales or [1, 2, 4]) == [1, 2, 4]  # None: the family default, L = {1, 2, 4}
    assert (m.strategy or "regional") == "regional"


@pytest.mark.parametrize(
    "path", [p for p in SHIPPED if not p.stem.endswith("mssar") and p.parent != RECIPES], ids=rel
)
def test_non_mssar_recipes_carry_no_mssar_options(path: Path):
    m = shipped(path).model
    assert m.recalibration != "mssar"
    assert m.scales is None and m.strategy is None


# the classes of each dataset, without reading it
CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000, "fashion-mnist": 10}


@pytest.mark.filterwarnings("ignore:for .*num_batches_tracked:UserWarning")  # torch, meta BN
@pytest.mark.parametrize("path", SHIPPED, ids=rel)
def test_shipped_recipe_builds_its_network(path: Path):
    """What `mssar train` builds (engine.build_model): create_model with the recipe's module
    options, on the meta device (structure only), with the dataset's classes and channels."""
    import torch

    from mssar_cli.data import SYNTHETIC_CLASSES

    r = shipped(path)
    classes = CLASSES.get(r.data.dataset, SYNTHETIC_CLASSES)
    channels = 1 if r.data.dataset == "fashion-mnist" else 3
    with torch.device("meta"):
        model = create_model(r.model.name, classes, r.model.recalibration, channels,
                             **r.module_options())  # fmt: skip
    named = [m for m in model.modules() if getattr(m, "name", None) == r.model.recalibration]
    if r.model.recalibration in ZOO:  # one module per residual block, SE's placement
        assert len(named) == {"resnet20": 9, "resnet56": 27, "resnet50": 16}[r.model.name]
    head = model.fc if hasattr(model, "fc") else model.classifier
    assert head.out_features == classes


@pytest.mark.parametrize(
    "path", [p for p in SHIPPED if shipped(p).model.recalibration in ZOO], ids=rel
)
def test_later_module_recipes_take_their_papers_defaults_and_mssars_width(path: Path):
    """SPEC.md §7: each later module with its paper's defaults (the registry's), the total hidden
    width D / reduction of the network family (3 CIFAR, 16 ImageNet) where it has one; no
    model.options: the defaults are the registry's, written in the header as comments."""
    from mssar_cli import ablation

    r = shipped(path)
    m, spec, entry = r.model, MODELS[r.model.name], RECALIBRATIONS[r.model.recalibration]
    options = {k: v for k, v in r.module_options().items() if k != "stage"}
    defaults = resolve_options(m.recalibration, {}, spec.default_reduction)
    assert resolve_options(m.recalibration, options, spec.default_reduction) == defaults
    assert m.options == {}
    if "reduction" in entry.options:
        assert m.reduction == spec.default_reduction == (16 if spec.input_size == 224 else 3)
    else:
        assert m.reduction is None
    head = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    assert "sits where SE sits" in head and "its paper's defaults" in head
    assert entry.reference.split(",")[0].split()[0] in head  # the first author's name
    planned = ablation.plan("recalibration", str(path), [], [], 1)
    assert [run.recipe.model.recalibration for run in planned] == list(RECALIBRATIONS)


def test_quickstart_is_a_short_cpu_run_on_fashion_mnist():
    path = RECIPES / "quickstart.yaml"
    r = recipe.load(path)
    assert (r.data.dataset, r.model.name, r.model.recalibration) == (
        "fashion-mnist",
        "resnet20",
        "mssar",
    )
    assert (r.data.subset, r.data.test_subset, r.data.batch_size) == (6000, 2000, 128)
    assert r.optim.epochs <= 5 and r.optim.milestones and r.optim.milestones[-1] < r.optim.epochs
    assert r.run.threads is None and r.run.device == "auto"
    comments = " ".join(
        line for line in path.read_text().splitlines() if line.startswith("#")
    ).lower()
    assert "not the paper" in comments and "shortened" in comments
    assert "90%" in comments and "chance" in comments
    assert r.run_dir() == Path("results/fashion_mnist/quickstart/seed0")


def test_smoke_is_tiny_and_synthetic():
    r = recipe.load(RECIPES / "smoke.yaml")
    assert (r.data.dataset, r.model.name, r.model.recalibration) == (
        "synthetic",
        "resnet20",
        "mssar",
    )
    assert (r.data.subset, r.data.test_subset, r.data.batch_size, r.data.eval_batch_size) == (
        256,
        128,
        64,
        128,
    )
    assert (r.optim.epochs, r.optim.milestones) == (2, [1])


@pytest.mark.parametrize("path", SHIPPED, ids=rel)
def test_dump_round_trips(path: Path):
    r = shipped(path)
    again = recipe.from_dict(yaml.safe_load(recipe.dump(r)), "dumped")
    assert again.source == "dumped"
    assert dataclasses.replace(again, source=r.source) == r
