"""Recipes: every bad input is one line, defaults and --set, round trips, one schema (the
shipped files: tests/test_recipes_shipped.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mssar_cli import recipe
from mssar_cli.errors import MssarError
from mssar_cli.recipe import RecipeError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


# --- bad input: one line naming the file and the key --------------------------------------------


def write(tmp_path: Path, text: str, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error(path: Path, overrides=(), *must: str) -> str:
    with pytest.raises(RecipeError) as info:
        recipe.load(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(f"{path}: "), message
    for part in must:
        assert part in message, (part, message)
    return message


BASE = "model:\n  name: resnet20\n  recalibration: mssar\n"


@pytest.mark.parametrize(
    ("text", "must"),
    [
        # unknown keys and sections, with a suggestion
        ("optim:\n  lrr: 0.1\n", ("optim.lrr", "unknown key", "did you mean 'lr'")),
        ("model:\n  scalez: [1, 2]\n", ("model.scalez", "did you mean 'scales'")),
        ("modle:\n  name: resnet20\n", ("modle", "unknown key", "did you mean 'model'")),
        ("data:\n  workerz: 2\n  batch_size: 1\n", ("data.workerz", "'workers'")),
        # wrong types
        ("optim:\n  epochs: ten\n", ("optim.epochs", "expected an integer", "'ten'")),
        ("optim:\n  epochs: 160.0\n", ("optim.epochs", "expected an integer")),
        ("optim:\n  lr: true\n", ("optim.lr", "expected a number", "True")),
        ("data:\n  batch_size: [128]\n", ("data.batch_size", "expected an integer", "[128]")),
        ("optim:\n  milestones: [80, x]\n", ("optim.milestones", "a list of integers", "'x'")),
        ("optim:\n  milestones: 80\n", ("optim.milestones", "a list of integers")),
        ("model:\n  scales: [1, two]\n", ("model.scales", "a list of integers", "'two'")),
        ("data:\n  augment: 1\n", ("data.augment", "true or false")),
        ("optim:\n  lr: null\n", ("optim.lr", "got null")),
        ("optim:\n  lr: .nan\n", ("optim.lr", "finite")),
        ("model:\n  name: 20\n", ("model.name", "expected a string")),
        ("model: []\n", ("model", "expected a mapping")),
        ("optim: 0\n", ("optim", "expected a mapping")),
        ("experiment: a/b\n", ("experiment", "'a/b'")),
        ("experiment: 7\n", ("experiment",)),
        # out of range
        ("optim:\n  lr: -0.1\n", ("optim.lr", "> 0", "-0.1")),
        ("optim:\n  epochs: 0\n", ("optim.epochs", "> 0")),
        ("data:\n  batch_size: 0\n", ("data.batch_size", "> 0")),
        ("optim:\n  momentum: -0.5\n", ("optim.momentum", ">= 0")),
        ("data:\n  workers: -1\n", ("data.workers", ">= 0")),
        ("run:\n  threads: 0\n", ("run.threads", "> 0")),
        # invalid choices
        ("model:\n  recalibration: foo\n", ("model.recalibration", "none | se | mssar", "'foo'")),
        ("data:\n  dataset: mnist\n", ("data.dataset", "fashion-mnist", "'mnist'")),
        ("run:\n  precision: fp16\n", ("run.precision", "bf16", "'fp16'")),
        ("model:\n  strategy: global\n", ("model.strategy", "regional | sliding")),
        ("run:\n  device: gpu\n", ("run.device", "'gpu'")),
        # the learning-rate schedule
        ("optim:\n  milestones: [120, 80]\n", ("optim.milestones", "increasing", "[120, 80]")),
        ("optim:\n  milestones: [80, 80]\n", ("optim.milestones", "increasing")),
        ("optim:\n  milestones: [0, 80]\n", ("optim.milestones", "positive")),
        (
            "optim:\n  epochs: 160\n  milestones: [80, 160]\n",
            ("optim.milestones", "< optim.epochs (160)"),
        ),
        (
            "optim:\n  epochs: 10\n",
            ("optim.milestones", "< optim.epochs (10)"),
        ),  # default [80, 120]
        # options that do not apply
        (
            "model:\n  recalibration: none\n  scales: [1, 2, 4]\n",
            ("model.scales", "only to recalibration mssar", "none"),
        ),
        (
            "model:\n  recalibration: se\n  strategy: regional\n",
            ("model.strategy", "only to recalibration mssar"),
        ),
        (
            "model:\n  recalibration: none\n  reduction: 3\n",
            ("model.reduction", "applies only to recalibration se, mssar, "),
        ),
        (
            "model:\n  name: resnet56\n  stage: multi\n",
            ("model.stage", "only to DenseNets", "resnet56"),
        ),
        ("model:\n  scales: []\n", ("model.scales", "non-empty")),
        ("model:\n  scales: [1, 1]\n", ("model.scales", "distinct")),
        ("model:\n  scales: [0, 2]\n", ("model.scales", "positive")),
        # the network
        ("model:\n  name: resnet101\n", ("model.name", "'resnet101'", "did you mean", "resnet20")),
        ("model:\n  name: resnet50\n", ("model.name", "ImageNet network", "CIFAR network")),
        ("model:\n  name: resnet20\ndata:\n  dataset: imagenet\n", ("model.name", "imagenet")),
        ("model:\n  name: resnet18\ndata:\n  dataset: cifar10\n", ("model.name", "cifar10")),
        # a key given twice (PyYAML would silently keep the last)
        ("optim:\n  lr: 0.1\n  lr: 0.2\n", ("optim.lr", "twice", "lines 2 and 3")),
        (
            "optim:\n  lr: 0.1\nmodel: {}\noptim:\n  epochs: 3\n",
            ("optim", "twice", "lines 1 and 4"),
        ),
    ],
)
def test_bad_value_is_one_line_naming_file_and_key(tmp_path, text, must):
    error(write(tmp_path, text), (), *must)


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, BASE + "optim:\n  lr: 0.1\n   epochs: 3\n")
    error(path, (), "YAML syntax error", "line 6")
    path = write(tmp_path, "model:\n  name: resnet20\n  scales: [1, 2\n")
    error(path, (), "YAML syntax error", "line ")
    path = write(tmp_path, "optim:\n\tlr: 0.1\n")
    error(path, (), "YAML syntax error", "line 2")


def test_unsafe_yaml_tag_is_refused(tmp_path):
    error(write(tmp_path, "optim: !!python/object/apply:os.system ['true']\n"), (), "line 1")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    error(path, (), "no such recipe file")


def test_empty_file(tmp_path):
    error(write(tmp_path, ""), (), "empty")
    error(write(tmp_path, "# only a comment\n", "comment.yaml"), (), "empty")


def test_file_that_is_a_yaml_list(tmp_path):
    error(write(tmp_path, "- model\n- optim\n"), (), "expected a mapping", "list")
    error(write(tmp_path, "resnet20\n", "scalar.yaml"), (), "expected a mapping", "str")


def test_directory(tmp_path):
    folder = tmp_path / "dir.yaml"
    folder.mkdir()
    error(folder, (), "directory")


def test_from_dict_rejects_a_non_mapping():
    with pytest.raises(RecipeError, match=r"^src: expected a mapping.*list"):
        recipe.from_dict(["model"], "src")


def test_recipe_error_is_a_user_error():
    assert issubclass(RecipeError, MssarError)
    assert RecipeError.exit_code == 2


# --- defaults, numbers and --set ----------------------------------------------------------------


def test_defaults_fill_what_the_file_leaves_out(tmp_path):
    r = recipe.load(write(tmp_path, "model:\ndata:\n  dataset: cifar10\n", "tiny.yaml"))
    assert r.experiment == "tiny"
    assert r.model == recipe.ModelSection()
    assert r.optim == recipe.OptimSection()
    assert r.data.dataset == "cifar10" and r.data.batch_size == 128


def test_exponent_numbers_are_numbers(tmp_path):
    # PyYAML's YAML 1.1 rules read `1e-4` as a string; recipes read it as the number
    r = recipe.load(write(tmp_path, BASE + "optim:\n  weight_decay: 1e-4\n  lr: 5E-2\n"))
    assert r.optim.weight_decay == 1e-4 and r.optim.lr == 0.05


def test_recipe_is_frozen(tmp_path):
    r = recipe.load(RECIPES / "smoke.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.optim.lr = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.experiment = "x"  # type: ignore[misc]


def test_set_overrides(tmp_path):
    path = write(tmp_path, BASE + "optim:\n  lr: 0.1\n", "base.yaml")
    r = recipe.load(
        path, ["optim.lr=0.05", "model.scales=[1,2]", "run.compile=true", "experiment=name"]
    )
    assert r.optim.lr == 0.05 and isinstance(r.optim.lr, float)
    assert r.model.scales == [1, 2]
    assert r.run.compile is True
    assert r.experiment == "name"
    assert r.run_dir() == Path("results/synthetic/name/seed0")
    # the file itself is untouched, later --set wins, exponents and integer-for-float work
    assert recipe.load(path).optim.lr == 0.1
    r = recipe.load(
        path, ["optim.lr=0.2", "optim.lr=0.3", "optim.weight_decay=5e-4", "model.reduction=2"]
    )
    assert (r.optim.lr, r.optim.weight_decay, r.model.reduction) == (0.3, 5e-4, 2.0)
    # a section the file does not have, and null back to the default
    r = recipe.load(path, ["run.seed=2", "run.threads=null", "model.scales=null"])
    assert r.run.seed == 2 and r.run.threads is None and r.model.scales is None
    # string keys keep the text even when it looks like a number
    r = recipe.load(path, ["experiment=2024", "run.output=1"])
    assert r.experiment == "2024" and r.run.output == "1"


@pytest.mark.parametrize(
    ("item", "must"),
    [
        ("optim.lrr=0.1", ("optim.lrr", "unknown key", "did you mean 'lr'")),
        ("model.scalez=[1]", ("model.scalez", "did you mean 'scales'")),
        ("optm.lr=0.1", ("optm", "did you mean 'optim'")),
        ("foo", ("--set 'foo'", "KEY.SUB=VALUE")),
        ("optim.lr", ("--set 'optim.lr'", "KEY.SUB=VALUE")),
        ("lr=0.1", ("--set lr", "SECTION.KEY")),
        ("optim.lr.x=0.1", ("--set optim.lr.x", "SECTION.KEY")),
        ("optim.lr=[1", ("--set optim.lr", "cannot parse")),
        ("optim.epochs=ten", ("optim.epochs", "expected an integer")),
        ("optim.lr=", ("optim.lr", "got null")),
        (
            "model.recalibration=none",
            ("model.scales", "only to recalibration mssar"),
        ),  # the file sets scales
        ("experiment=", ("experiment",)),
    ],
)
def test_bad_set_is_one_line(tmp_path, item, must):
    path = write(tmp_path, BASE + "  scales: [1, 2, 4]\n", "base.yaml")
    error(path, [item], *must)


def test_set_into_a_section_that_is_not_a_mapping(tmp_path):
    error(write(tmp_path, "optim: 3\n"), ["optim.lr=0.1"], "optim", "expected a mapping")


# --- round trip and run directory ---------------------------------------------------------------


def test_save_then_load_round_trips(tmp_path):
    r = recipe.load(
        RECIPES / "quickstart.yaml",
        ["model.scales=[2, 4]", "optim.weight_decay=5e-4", "experiment=x1"],
    )
    out = tmp_path / "saved.yaml"
    recipe.save(r, out)
    again = recipe.load(out)
    assert again.experiment == "x1"  # the stored name, not the file stem
    assert dataclasses.replace(again, source=r.source) == r


def test_run_dir(tmp_path):
    r = recipe.load(RECIPES / "fashion_mnist" / "resnet20_mssar.yaml")
    assert r.dataset_dir == "fashion_mnist"
    assert r.run_dir() == Path("results/fashion_mnist/resnet20_mssar/seed0")
    assert r.run_dir(2) == Path("results/fashion_mnist/resnet20_mssar/seed2")
    r = recipe.load(
        RECIPES / "cifar100" / "densenet100_plain.yaml", ["run.seed=1", "run.output=out"]
    )
    assert r.run_dir() == Path("out/cifar100/densenet100_plain/seed1")
    r = recipe.load(RECIPES / "imagenet" / "resnext50_se.yaml", ["experiment=try"])
    assert r.run_dir() == Path("results/imagenet/try/seed0")


# --- one schema: every consumer reads it -------------------------------------------------------


def test_every_module_option_of_the_registry_is_a_recipe_key():
    from mssar_cli.recalibration import RECALIBRATIONS

    assert recipe.choices("model.recalibration") == tuple(RECALIBRATIONS)
    assert set(recipe.MODULE_KEYS) == {"scales", "strategy", "reduction"}
    # every other option of a module is set under model.options, checked against its entry
    for name, entry in RECALIBRATIONS.items():
        others = {k: v for k, v in entry.options.items() if k not in recipe.MODULE_KEYS}
        raw = {"experiment": "x", "model": {"recalibration": name, "options": others}}
        assert recipe.from_dict(raw).module_options().items() >= others.items()


def test_protocol_and_local_keys_come_from_the_schema():
    assert recipe.local_keys() == (
        "data.root",
        "data.workers",
        "data.download",
        "run.device",
        "run.output",
        "run.threads",
    )
    protocol = recipe.protocol_keys()
    assert {k for k in protocol if k.startswith("optim.")} == {
        f"optim.{f.name}" for f in dataclasses.fields(recipe.OptimSection)
    }
    assert not set(protocol) & set(recipe.local_keys())
    assert "data.dataset" not in protocol and "data.eval_batch_size" not in protocol


def test_field_reference_is_generated_from_the_schema():
    readme = (ROOT / "docs" / "recipes.md").read_text()
    from mssar_cli import recipe_reference as reference

    assert reference.REFERENCE_START in readme and reference.REFERENCE_END in readme
    assert reference.with_field_reference(readme) == readme, "run `make fields` to regenerate it"
    for section, cls in recipe.SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"`{section}.{f.name}`" in readme


def test_with_overrides_revalidates_like_load(tmp_path: Path):
    path = write(tmp_path, BASE + "  scales: [1, 2]\noptim:\n  weight_decay: 1e-4\n", "r.yaml")
    base = recipe.load(path)
    assert base.optim.weight_decay == 1e-4
    same = recipe.with_overrides(base, ["optim.lr=0.05"])
    assert same.optim.lr == 0.05 and same.optim.weight_decay == 1e-4
    assert recipe.with_overrides(base, []) == base
    with pytest.raises(RecipeError, match=r"model.scales: applies only to recalibration mssar"):
        recipe.with_overrides(base, ["model.recalibration=se"])


def test_ablate_accepts_what_train_accepts(tmp_path: Path):
    """YAML 1.2 numbers (``1e-4``) once trained but were refused by ``mssar ablate``, which read
    the file again with another YAML loader: every command now reads recipes through one loader."""
    from mssar_cli import ablation

    path = write(tmp_path, BASE + "optim:\n  weight_decay: 1e-4\n  lr: 5e-2\n", "r.yaml")
    planned = ablation.plan("scales", str(path), [], [], 1)
    assert {run.recipe.optim.weight_decay for run in planned} == {1e-4}
    assert {run.recipe.optim.lr for run in planned} == {5e-2}


@pytest.mark.parametrize("name", ["se", "none"])
def test_module_options_that_a_module_does_not_take_name_module_and_key(tmp_path, name):
    path = write(tmp_path, f"model:\n  recalibration: {name}\n  strategy: sliding\n")
    error(path, (), "model.strategy", "applies only to recalibration mssar", f"has {name}")


def test_model_options_set_what_a_module_takes(tmp_path: Path):
    path = write(tmp_path, "model:\n  recalibration: ge\n  options: {extent: 4, mlp: false}\n")
    loaded = recipe.load(path)
    assert loaded.module_options()["extent"] == 4 and loaded.module_options()["mlp"] is False
    for text, must in [
        ("  options: {scales: 1}\n", ("model.options.scales", "set it as model.scales")),
        ("  options: {extnt: 4}\n", ("model.options.extnt", "ge does not take 'extnt'")),
        ("  options: [4]\n", ("model.options", "expected a mapping")),
        ("  options: {extent: [4]}\n", ("model.options.extent", "expected a number")),
        ("  scales: [1, 2]\n", ("model.scales", "applies only to recalibration mssar", "has ge")),
    ]:
        bad = write(tmp_path, "model:\n  recalibration: ge\n" + text, "bad.yaml")
        error(bad, (), *must)


def test_modules_that_gate_their_own_map_are_single_stage_in_densenets(tmp_path: Path):
    base = "model:\n  name: densenet100\n  recalibration: cbam\n"
    assert recipe.load(write(tmp_path, base, "ok.yaml")).model.stage is None
    error(write(tmp_path, base + "  stage: multi\n"), (), "model.stage", "stage: single")
