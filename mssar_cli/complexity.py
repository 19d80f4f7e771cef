"""Parameters and FLOPs of a network, counted as the paper counts them (SPEC.md §3).

FLOPs are multiply-accumulates of convolutions and linear layers for one image, from ptflops'
``aten`` backend (it gives exactly 40.81 M for ResNet-20 and 125.75 M for ResNet-56); its default
``pytorch`` backend also counts BN, ReLU and pooling and does not match the paper.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import torch
from ptflops import get_model_complexity_info
from torch import nn

from mssar_cli.models import create_model, model_spec
from mssar_cli.recalibration import PLAIN
from mssar_cli.recalibration import get as get_recalibration


@dataclass(frozen=True)
class Complexity:
    params: int
    flops: int  # multiply-accumulates for one image


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_for_counting(
    name: str,
    recalibration: str = PLAIN,
    num_classes: int | None = None,
    *,
    in_channels: int = 3,
    stage: str | None = None,
    **options,
) -> nn.Module:
    """``create_model(name, ...)`` built the way it is counted: every module that has several
    implementations in its direct one (paper §3.5's MLPs on the pooled positions; the registry
    entry lists ``implementation`` among its internal options). The other forms compute the same
    function, but the fused one pools and spreads with block-matrix products, data movement that
    ptflops would count as multiply-accumulates. ``num_classes`` defaults to the family's
    dataset: 1000 for the ImageNet networks, 10 otherwise."""
    spec = model_spec(name)
    if num_classes is None:
        num_classes = 1000 if spec.family == "imagenet-resnet" else 10
    if "implementation" in get_recalibration(recalibration).internal:
        options["implementation"] = "direct"
    return create_model(
        name,
        num_classes=num_classes,
        recalibration=recalibration,
        in_channels=in_channels,
        stage=stage,
        **options,
    )


def count_flops(model: nn.Module, input_size: int, in_channels: int = 3) -> int:
    """MACs of one forward pass on a (1, C, S, S) input, eval mode (ptflops, aten backend).

    Counts what the model runs: build it with :func:`build_for_counting` (or use
    :func:`measure`) so that recalibration modules run their direct form.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            macs, _ = get_model_complexity_info(
                model,
                (in_channels, input_size, input_size),
                as_strings=False,
                print_per_layer_stat=False,
                backend="aten",
            )
    finally:
        model.train(was_training)
    if macs is None:
        raise RuntimeError("ptflops could not count the model's FLOPs")
    return int(macs)


def measure(
    name: str,
    recalibration: str = PLAIN,
    num_classes: int | None = None,
    *,
    in_channels: int = 3,
    input_size: int | None = None,
    stage: str | None = None,
    **options,
) -> Complexity:
    """Params and FLOPs of network ``name`` with ``recalibration`` and its ``options``, counted
    on a model built for counting (:func:`build_for_counting`), at ``input_size`` (default: the
    family's, 32 or 224) with ``in_channels`` channels."""
    model = build_for_counting(
        name, recalibration, num_classes, in_channels=in_channels, stage=stage, **options
    )
    size = model_spec(name).input_size if input_size is None else input_size
    return Complexity(count_parameters(model), count_flops(model, size, in_channels))


def transition_flops(model: nn.Module, input_size: int, in_channels: int = 3) -> int:
    """MACs of a DenseNet's transition convolutions (zero for other networks).

    The paper's DenseNet FLOPs (252.5 M, 7.95 G) are exactly ours less these: its counter left
    the transitions out. ``mssar count`` shows both so the two accountings can be compared.
    """
    from mssar_cli.models.densenet import Transition

    total = 0

    def hook(conv: nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        total += conv.in_channels * conv.out_channels * output.shape[2] * output.shape[3]

    handles = [
        m.conv.register_forward_hook(hook) for m in model.modules() if isinstance(m, Transition)
    ]
    if not handles:
        return 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_channels, input_size, input_size))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total


def projection_params(model: nn.Module) -> int:
    """Parameters of a CIFAR ResNet's projection shortcuts (1x1 conv + BN; zero elsewhere).

    The paper's ResNet params (0.27 / 0.46 / 0.85 M) are He et al.'s counts with parameter-free
    identity shortcuts, while its FLOPs (40.8 / 69.1 / 125.7 M) include the projections: its
    params column is ours less these 2,752 parameters.
    """
    from mssar_cli.models.cifar_resnet import CifarResNet

    if not isinstance(model, CifarResNet):
        return 0
    return sum(p.numel() for name, p in model.named_parameters() if ".downsample." in name)


@dataclass(frozen=True)
class CostEntry:
    """Cost of one configuration next to its baseline (same network, no recalibration)."""

    model: str
    recalibration: str
    options: str  # the module options, as text
    params: int
    flops: int
    baseline_params: int
    baseline_flops: int
    transition_flops: int  # DenseNet transition convs, left out of the paper's FLOPs
    projection_params: int  # CIFAR ResNet projection shortcuts, left out of the paper's params

    @property
    def extra_params_pct(self) -> float:
        return 100.0 * (self.params - self.baseline_params) / self.baseline_params

    @property
    def extra_flops_pct(self) -> float:
        return 100.0 * (self.flops - self.baseline_flops) / self.baseline_flops


def cost_entry(
    name: str, recalibration: str = PLAIN, num_classes: int | None = None, **options
) -> CostEntry:
    """The cost of ``name`` with ``recalibration`` and ``options`` (``stage`` among them for
    DenseNets) beside the plain network's, at the family's input size."""
    spec = model_spec(name)
    model = build_for_counting(name, recalibration, num_classes, **options)
    params, flops = count_parameters(model), count_flops(model, spec.input_size)
    if recalibration == PLAIN:
        baseline = Complexity(params, flops)
    else:
        baseline = measure(name, num_classes=num_classes)
    shown = ", ".join(f"{k}={_format_option(v)}" for k, v in options.items() if v is not None)
    return CostEntry(
        name,
        recalibration,
        shown,
        params,
        flops,
        baseline.params,
        baseline.flops,
        transition_flops(model, spec.input_size),
        projection_params(model),
    )


def _format_option(value) -> str:
    if isinstance(value, (tuple, list)):
        return "{" + ",".join(str(v) for v in value) + "}"
    return str(value)


PAPER_ACCOUNTING = (
    "params_acc / flops_acc: counted as the paper counts; CIFAR ResNets without their projection "
    "shortcuts' 2,752 params (the paper copies He et al.'s identity-shortcut params), DenseNets "
    "without their two transition convs' FLOPs. match: params equal at the paper's printed "
    "precision, FLOPs within 0.5%."
)


def entries_frame(entries: list[CostEntry], paper_rows: list | None = None, human: bool = True):
    """One row per entry; with ``paper_rows`` (a parallel list of ``paper.CostRow``) the paper's
    params and FLOPs beside ours, counted both ways (see ``PAPER_ACCOUNTING``)."""
    import pandas as pd

    from mssar_cli.report.render import human_count

    records = []
    for i, e in enumerate(entries):
        rec = {"model": e.model, "recalibration": e.recalibration, "options": e.options}
        if paper_rows is not None:
            row = paper_rows[i]
            params_acc = e.params - e.projection_params
            flops_acc = e.flops - e.transition_flops
            digits = 2 if row.params < 1e6 else 1
            rec = {
                "table": row.table,
                "network": row.label,
                "params": e.params,
                "params_acc": params_acc,
                "params_paper": int(row.params),
                "params_match": round(params_acc / 1e6, digits) == round(row.params / 1e6, digits),
                "flops": e.flops,
                "flops_acc": flops_acc,
                "flops_paper": int(row.flops),
                "flops_diff_pct": round(100.0 * (flops_acc - row.flops) / row.flops, 2),
                "flops_match": abs(flops_acc - row.flops) <= 0.005 * row.flops,
            }
        else:
            rec.update(params=e.params, flops=e.flops)
        rec["extra_params_pct"] = round(e.extra_params_pct, 2)
        rec["extra_flops_pct"] = round(e.extra_flops_pct, 3)
        records.append(rec)
    frame = pd.DataFrame.from_records(records)
    if not human:
        return frame
    for column in ("params", "flops", "params_acc", "flops_acc", "params_paper", "flops_paper"):
        if column in frame:
            frame[column] = frame[column].map(human_count)
    for column in ("params_match", "flops_match"):
        if column in frame:
            frame[column] = frame[column].map({True: "yes", False: "no"})
    return frame
