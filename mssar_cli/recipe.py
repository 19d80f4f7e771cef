"""YAML recipes: load, override with ``--set a.b=c``, validate strictly, freeze, save.

A recipe has four sections whose keys are the same names used in the code and on the command
line (``model``, ``data``, ``optim``, ``run``) and an optional ``experiment`` name (default: the
file's stem). Every problem becomes one :class:`RecipeError` line naming the file and the key,
raised before anything is written to disk.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mssar_cli import yaml12
from mssar_cli.errors import MssarError
from mssar_cli.models import MODELS
from mssar_cli.recalibration import RECALIBRATIONS, option_names

DATASETS = ("cifar10", "cifar100", "imagenet", "fashion-mnist", "synthetic")


class RecipeError(MssarError):
    """A recipe problem: ``<file>: <key>: <what is expected> (got ...)``."""


def _opt(
    default: Any,
    help: str,
    *,
    choices: tuple | None = None,
    min: float | None = None,
    positive: bool = False,
    protocol: bool = False,
    local: bool = False,
):
    """A recipe field. ``protocol``: part of the training protocol (the report never averages
    runs that differ in one). ``local``: where things are on this machine, not what is computed
    (may differ when a run is resumed or read elsewhere)."""
    meta = {
        "help": help,
        "choices": choices,
        "min": min,
        "positive": positive,
        "protocol": protocol,
        "local": local,
    }
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelSection:
    name: str = _opt("resnet20", "network, see `mssar count --list`")
    recalibration: str = _opt("mssar", " | ".join(RECALIBRATIONS), choices=tuple(RECALIBRATIONS))
    scales: list[int] | None = _opt(None, "MS-SAR scale set L (default [1, 2, 4])")
    strategy: str | None = _opt(
        None, "regional | sliding (MS-SAR)", choices=("regional", "sliding", None)
    )
    reduction: float | None = _opt(
        None, "total MLP width is D / reduction (family default)", positive=True
    )
    stage: str | None = _opt(
        None, "single | multi (DenseNets; default multi)", choices=("single", "multi", None)
    )
    options: dict = _opt({}, "the module's other options, e.g. {extent: 4} for ge (docs/usage.md)")


# The model section's keys that are options of a recalibration module (the registry's).
MODULE_KEYS = tuple(f.name for f in dataclasses.fields(ModelSection) if f.name in option_names())


@dataclass(frozen=True)
class DataSection:
    dataset: str = _opt("synthetic", " | ".join(DATASETS), choices=DATASETS)
    root: str = _opt("data", "dataset root (relative to the current directory)", local=True)
    batch_size: int = _opt(128, "global mini-batch size", positive=True, protocol=True)
    eval_batch_size: int = _opt(512, "test batch size", positive=True)
    augment: bool = _opt(True, "the paper's training augmentation", protocol=True)
    subset: int | None = _opt(
        None, "train on this many images (null: all)", positive=True, protocol=True
    )
    test_subset: int | None = _opt(
        None, "test on this many images (null: all)", positive=True, protocol=True
    )
    workers: int = _opt(4, "DataLoader workers (ImageNet)", min=0, local=True)
    download: bool = _opt(False, "download CIFAR with torchvision", local=True)


@dataclass(frozen=True)
class OptimSection:
    lr: float = _opt(0.1, "base learning rate", positive=True, protocol=True)
    momentum: float = _opt(0.9, "SGD momentum", min=0, protocol=True)
    nesterov: bool = _opt(True, "Nesterov momentum", protocol=True)
    weight_decay: float = _opt(1e-4, "L2 weight decay", min=0, protocol=True)
    epochs: int = _opt(160, "number of epochs", positive=True, protocol=True)
    milestones: list[int] = _opt(
        [80, 120], "epochs at which the lr is multiplied by gamma", protocol=True
    )
    gamma: float = _opt(0.1, "lr factor at each milestone", positive=True, protocol=True)


@dataclass(frozen=True)
class RunSection:
    seed: int = _opt(0, "random seed", min=0)
    device: str = _opt("auto", "auto | cpu | cuda | cuda:N | mps", local=True)
    precision: str = _opt(
        "auto", "auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16", choices=("auto", "fp32", "bf16")
    )
    channels_last: bool = _opt(False, "channels-last memory format")
    compile: bool = _opt(False, "torch.compile the model")
    output: str = _opt(
        "results", "results root; runs go to OUTPUT/<dataset>/<experiment>/seed<k>", local=True
    )
    checkpoint_every: int = _opt(
        1, "write a checkpoint every N epochs (and at the end)", positive=True
    )
    threads: int | None = _opt(
        None, "CPU threads (null: torch's default)", positive=True, local=True
    )


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "data": DataSection,
    "optim": OptimSection,
    "run": RunSection,
}


def _keys_where(flag: str) -> tuple[str, ...]:
    return tuple(
        f"{section}.{f.name}"
        for section, cls in SECTIONS.items()
        for f in dataclasses.fields(cls)
        if f.metadata.get(flag)
    )


def choices(key: str) -> tuple:
    """The values field ``key`` (``section.name``) accepts, without null."""
    section, name = key.split(".")
    field_ = {f.name: f for f in dataclasses.fields(SECTIONS[section])}[name]
    return tuple(c for c in field_.metadata["choices"] or () if c is not None)


def protocol_keys() -> tuple[str, ...]:
    """Dotted keys of the training protocol: runs that differ in one are never averaged."""
    return _keys_where("protocol")


def local_keys() -> tuple[str, ...]:
    """Dotted keys that say where things are on a machine, not what is computed: they may differ
    when a run is resumed, and the report ignores them."""
    return _keys_where("local")


@dataclass(frozen=True)
class Recipe:
    experiment: str
    model: ModelSection
    data: DataSection
    optim: OptimSection
    run: RunSection
    source: str = "<recipe>"  # the file it came from, for messages

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"experiment": self.experiment}
        for name in SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        return out

    def module_options(self) -> dict[str, Any]:
        """The keyword arguments of ``create_model`` beside the name and recalibration: the
        module's options (``None``: its default) and the DenseNet ``stage``."""
        options = {key: getattr(self.model, key) for key in MODULE_KEYS}
        if options.get("scales") is not None:
            options["scales"] = tuple(options["scales"])
        return options | dict(self.model.options) | {"stage": self.model.stage}

    @property
    def dataset_dir(self) -> str:
        return self.data.dataset.replace("-", "_")

    def run_dir(self, seed: int | None = None) -> Path:
        seed = self.run.seed if seed is None else seed
        return Path(self.run.output) / self.dataset_dir / self.experiment / f"seed{seed}"


# --- loading ------------------------------------------------------------------------------------


def read_raw(path: str | Path) -> dict:
    """The mapping a recipe file holds (``experiment`` defaulting to the file's stem), not yet
    validated. Raises :class:`RecipeError` naming the file for anything unreadable."""
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise RecipeError(f"{source}: no such recipe file")
    if path.is_dir():
        raise RecipeError(f"{source}: is a directory, expected a YAML recipe file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"{source}: cannot read: {error}") from None
    try:
        raw = yaml12.parse(text)
    except yaml12.DuplicateKeyError as error:
        line = error.problem_mark.line + 1
        raise RecipeError(
            f"{source}: {error.key}: key given twice (lines {error.first_line} and {line}); "
            "keep one"
        ) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise RecipeError(f"{source}: YAML syntax error at {where}{problem}") from None
    if raw is None:
        raise RecipeError(
            f"{source}: the recipe is empty; expected sections model, data, optim, run"
        )
    if not isinstance(raw, dict):
        raise RecipeError(
            f"{source}: expected a mapping of sections (model, data, optim, run), "
            f"got {type(raw).__name__}"
        )
    raw.setdefault("experiment", path.stem)
    return raw


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override (``--set``) and validate a recipe file: the one way every command reads a
    recipe. Raises :class:`RecipeError` on any problem."""
    raw = read_raw(path)
    for item in overrides:
        apply_override(raw, item, str(path))
    return from_dict(raw, str(path))


def with_overrides(
    recipe: Recipe, overrides: list[str] | tuple[str, ...], source: str | None = None
) -> Recipe:
    """``recipe`` with ``--set`` style overrides applied, validated again."""
    raw = recipe.to_dict()
    source = recipe.source if source is None else source
    for item in overrides:
        apply_override(raw, item, source)
    return from_dict(raw, source)


def apply_override(raw: dict, item: str, source: str) -> None:
    """``key.sub=value``: value parsed as YAML (``0.05``, ``[1,2]``, ``true``, ``null``)."""
    if "=" not in item:
        raise RecipeError(f"{source}: --set {item!r}: expected KEY.SUB=VALUE, e.g. optim.lr=0.05")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    try:
        value = yaml12.parse(text) if text.strip() else None
    except yaml.YAMLError:
        raise RecipeError(f"{source}: --set {key}: cannot parse {text!r} as a value") from None
    if isinstance(value, (bool, int, float)) and _is_string_key(parts):
        value = text.strip()  # --set experiment=2024 or run.output=1: the text, not a number
    if parts == ["experiment"]:
        raw["experiment"] = value
        return
    if len(parts) != 2:
        raise RecipeError(
            f"{source}: --set {key}: expected SECTION.KEY such as optim.lr "
            f"(sections: {', '.join(SECTIONS)})"
        )
    section, name = parts
    _check_known(section, list(SECTIONS), source, "section")
    _check_known(name, [f.name for f in dataclasses.fields(SECTIONS[section])], source, section)
    target = raw.get(section)
    if target is None:
        target = raw[section] = {}
    if not isinstance(target, dict):
        raise RecipeError(f"{source}: {section}: expected a mapping, got {type(target).__name__}")
    target[name] = value


def _is_string_key(parts: list[str]) -> bool:
    if parts == ["experiment"]:
        return True
    if len(parts) != 2 or parts[0] not in SECTIONS:
        return False
    hints = typing.get_type_hints(SECTIONS[parts[0]])
    return hints.get(parts[1]) in (str, str | None)


def from_dict(raw: dict, source: str = "<recipe>") -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError(
            f"{source}: expected a mapping of sections (model, data, optim, run), "
            f"got {type(raw).__name__}"
        )
    _check_keys(raw, ["experiment", *SECTIONS], source, "")
    experiment = raw.get("experiment")
    if (
        not isinstance(experiment, str)
        or not experiment
        or "/" in experiment
        or experiment.startswith(".")
    ):
        raise RecipeError(
            f"{source}: experiment: expected a non-empty name without '/', got {experiment!r}"
        )
    sections = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name)
        if values is None:  # absent, or an empty `model:` line: all defaults
            values = {}
        if not isinstance(values, dict):
            raise RecipeError(
                f"{source}: {name}: expected a mapping of keys, got {type(values).__name__}"
            )
        sections[name] = _build_section(cls, values, source, name)
    recipe = Recipe(experiment=experiment, source=source, **sections)
    _check_consistency(recipe, source)
    return recipe


def save(recipe: Recipe, path: Path) -> None:
    path.write_text(dump(recipe))


def dump(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=None)


# --- validation ---------------------------------------------------------------------------------


def _check_known(name: str, known: list[str], source: str, where: str) -> None:
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        prefix = f"{where}." if where and where != "section" else ""
        raise RecipeError(
            f"{source}: {prefix}{name}: unknown key{hint} (known: {', '.join(known)})"
        )


def _check_keys(values: dict, known: list[str], source: str, where: str) -> None:
    for key in values:
        if not isinstance(key, str):
            raise RecipeError(f"{source}: {where or 'top level'}: keys must be names, got {key!r}")
        _check_known(key, known, source, where)


def _build_section(cls: type, values: dict, source: str, section: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _check_keys(values, list(fields), source, section)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        key = f"{section}.{name}"
        kwargs[name] = _check_value(value, hints[name], fields[name].metadata, source, key)
    return cls(**kwargs)


def type_name(annotation) -> str:
    args = typing.get_args(annotation)
    if _is_optional(annotation):
        inner = [a for a in args if a is not type(None)][0]
        return f"{type_name(inner)} or null"
    if annotation is dict:
        return "a mapping of option names to values"
    if typing.get_origin(annotation) is list:
        plural = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}
        return f"a list of {plural.get(args[0], str(args[0]))}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        annotation, str(annotation)
    )


def _is_optional(annotation) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(
        None
    ) in typing.get_args(annotation)


def _check_value(value, annotation, meta, source: str, key: str):
    expected = type_name(annotation)
    if value is None:
        if _is_optional(annotation):
            return None
        raise RecipeError(f"{source}: {key}: expected {expected}, got null")
    if _is_optional(annotation):
        annotation = [a for a in typing.get_args(annotation) if a is not type(None)][0]
    if annotation is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{source}: {key}: expected {expected}, got {value!r}")
        for name, item in value.items():
            if not isinstance(name, str):
                raise RecipeError(f"{source}: {key}: option names must be names, got {name!r}")
            if item is not None and not isinstance(item, (bool, int, float, str)):
                raise RecipeError(
                    f"{source}: {key}.{name}: expected a number, true or false, a string or null, "
                    f"got {item!r}"
                )
        return dict(value)
    if typing.get_origin(annotation) is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise RecipeError(f"{source}: {key}: expected {expected}, got {value!r}")
        checked = []
        for item in value:
            try:
                checked.append(_check_scalar(item, item_type, meta, source, key, expected))
            except RecipeError as error:
                raise RecipeError(f"{error} in {value!r}") from None
        return checked
    return _check_scalar(value, annotation, meta, source, key, expected)


def _check_scalar(value, kind, meta, source, key, expected):
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[kind]
    if not ok:
        raise RecipeError(f"{source}: {key}: expected {expected}, got {value!r}")
    if kind is float:
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise RecipeError(f"{source}: {key}: expected a finite number, got {value!r}")
    choices = meta.get("choices")
    if choices and value not in choices:
        shown = " | ".join(c for c in choices if c is not None)
        raise RecipeError(f"{source}: {key}: expected one of {shown}, got {value!r}")
    if meta.get("positive") and value <= 0:
        raise RecipeError(f"{source}: {key}: expected a value > 0, got {value!r}")
    if meta.get("min") is not None and value < meta["min"]:
        raise RecipeError(f"{source}: {key}: expected a value >= {meta['min']}, got {value!r}")
    return value


def _check_consistency(recipe: Recipe, source: str) -> None:
    """Rules that involve several keys, or the network and module registries."""
    m, o, r = recipe.model, recipe.optim, recipe.run
    if m.name not in MODELS:
        close = difflib.get_close_matches(m.name, list(MODELS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise RecipeError(
            f"{source}: model.name: unknown network {m.name!r}{hint} (known: {', '.join(MODELS)})"
        )
    takes = RECALIBRATIONS[m.recalibration].options
    for name in MODULE_KEYS:
        if getattr(m, name) is not None and name not in takes:
            users = [k for k, entry in RECALIBRATIONS.items() if name in entry.options]
            raise RecipeError(
                f"{source}: model.{name}: applies only to recalibration {_either(users)} "
                f"(this recipe has {m.recalibration}); remove it"
            )
    entry = RECALIBRATIONS[m.recalibration]
    for name in m.options:
        if name in MODULE_KEYS:
            raise RecipeError(
                f"{source}: model.options.{name}: set it as model.{name}, not under options"
            )
        if name not in entry.options:
            takes = [k for k in entry.options if k not in MODULE_KEYS]
            known = ", ".join(takes) if takes else "none besides its own keys"
            raise RecipeError(
                f"{source}: model.options.{name}: recalibration {m.recalibration} does not take "
                f"{name!r} (its options: {known})"
            )
    if m.stage == "multi" and not entry.takes_source:
        raise RecipeError(
            f"{source}: model.stage: recalibration {m.recalibration} computes its gate from the "
            "maps it recalibrates; DenseNets need stage: single with it"
        )
    if m.stage is not None and not MODELS[m.name].is_densenet:
        raise RecipeError(f"{source}: model.stage: applies only to DenseNets, not {m.name}")
    if m.scales is not None:
        if not m.scales or any(k <= 0 for k in m.scales) or len(set(m.scales)) != len(m.scales):
            raise RecipeError(
                f"{source}: model.scales: expected a non-empty list of distinct positive "
                f"integers, got {m.scales}"
            )
    if list(o.milestones) != sorted(set(o.milestones)) or any(e <= 0 for e in o.milestones):
        raise RecipeError(
            f"{source}: optim.milestones: expected increasing positive epochs, got {o.milestones}"
        )
    if o.milestones and o.milestones[-1] >= o.epochs:
        raise RecipeError(
            f"{source}: optim.milestones: every milestone must be < optim.epochs ({o.epochs}), "
            f"got {o.milestones}"
        )
    device = r.device
    if not (
        device in ("auto", "cpu", "cuda", "mps")
        or (device.startswith("cuda:") and device[5:].isdigit())
    ):
        raise RecipeError(
            f"{source}: run.device: expected auto | cpu | cuda | cuda:N | mps, got {device!r}"
        )
    imagenet_network = MODELS[m.name].input_size == 224
    if recipe.data.dataset == "imagenet" and not imagenet_network:
        raise RecipeError(
            f"{source}: model.name: {m.name} is a 32x32 network; imagenet needs "
            + _either([k for k, spec in MODELS.items() if spec.input_size == 224])
        )
    if recipe.data.dataset != "imagenet" and imagenet_network:
        raise RecipeError(
            f"{source}: model.name: {m.name} is an ImageNet network; "
            f"{recipe.data.dataset} needs a CIFAR network"
        )


def _either(names: list[str]) -> str:
    """``a, b or c``."""
    return " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
