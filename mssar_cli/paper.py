"""The paper's published numbers, as data (SPEC.md §5): errors in %, FLOPs in MACs, params.

Where the paper disagrees with itself both values are kept: the ResNet-56 CIFAR-100 baseline is
29.07 in Table 2 and 29.41 in Table 3; DenseNet-100* CIFAR-10 is 4.16 in Table 2 and 4.06 in
Table 3 and the text.

:data:`PUBLISHED_RESNET50` is not from the paper: the ImageNet ResNet-50 numbers that the papers
of the other modules publish (SPEC.md §7), one row per registered module, with the source each
number was read in and the ResNet-50 baseline that same source reports (each paper trained its
own). A module without a verified number has a row with no number and says why.
"""

from __future__ import annotations

from dataclasses import dataclass

M, G = 1e6, 1e9


@dataclass(frozen=True)
class CostRow:
    """One row of a paper table: a network, its recalibration, its errors and its cost columns."""

    table: str
    label: str  # the paper's name for the row
    model: str  # mssar's model name
    recalibration: str  # "none" | "se" | "mssar"
    errors: dict[str, float]  # metric -> error %, e.g. {"cifar10": 8.61} or {"top1": 30.5}
    flops: float
    params: float
    scales: tuple[int, ...] | None = None


def _cifar(label, model, recal, c10, c100, flops, params) -> CostRow:
    return CostRow("2", label, model, recal, {"cifar10": c10, "cifar100": c100}, flops, params)


TABLE2 = (
    _cifar("RN-20", "resnet20", "none", 8.61, 31.87, 40.8 * M, 0.27 * M),
    _cifar("RN-20*", "resnet20", "mssar", 7.61, 31.09, 40.9 * M, 0.28 * M),
    _cifar("RN-32", "resnet32", "none", 7.51, 30.63, 69.1 * M, 0.46 * M),
    _cifar("RN-32*", "resnet32", "mssar", 6.68, 29.41, 69.3 * M, 0.48 * M),
    _cifar("RN-56", "resnet56", "none", 6.97, 29.07, 125.7 * M, 0.85 * M),
    _cifar("RN-56*", "resnet56", "mssar", 6.04, 27.71, 126.0 * M, 0.89 * M),
    _cifar("DN-100", "densenet100", "none", 4.67, 22.45, 252.5 * M, 0.80 * M),
    _cifar("DN-100*", "densenet100", "mssar", 4.16, 21.13, 253.3 * M, 0.99 * M),
    _cifar("DN-190", "densenet190", "none", 3.46, 17.34, 7.95 * G, 25.8 * M),
    _cifar("DN-190*", "densenet190", "mssar", 3.32, 16.92, 7.98 * G, 32.7 * M),
)


def _imagenet(label, model, recal, top1, top5, flops, params) -> CostRow:
    return CostRow("5", label, model, recal, {"top1": top1, "top5": top5}, flops, params)


TABLE5 = (
    _imagenet("ResNet-18", "resnet18", "none", 30.50, 11.07, 1.81 * G, 10.9 * M),
    _imagenet("ResNet-18+SE", "resnet18", "se", 29.78, 10.27, 1.81 * G, 13.8 * M),
    _imagenet("ResNet-18+MS-SAR", "resnet18", "mssar", 29.43, 10.19, 1.81 * G, 13.8 * M),
    _imagenet("ResNet-34", "resnet34", "none", 27.02, 8.77, 3.66 * G, 21.7 * M),
    _imagenet("ResNet-34+SE", "resnet34", "se", 26.67, 8.43, 3.66 * G, 27.3 * M),
    _imagenet("ResNet-34+MS-SAR", "resnet34", "mssar", 26.15, 8.35, 3.67 * G, 27.4 * M),
    _imagenet("ResNeXt-50", "resnext50", "none", 22.20, 6.12, 3.86 * G, 25.0 * M),
    _imagenet("ResNeXt-50+SE", "resnext50", "se", 21.95, 5.93, 3.87 * G, 27.5 * M),
    _imagenet("ResNeXt-50+MS-SAR", "resnext50", "mssar", 21.64, 5.78, 3.89 * G, 27.6 * M),
)


@dataclass(frozen=True)
class ScaleAblationRow:
    """Table 3: ResNet-56 (mean, std of 3 runs) and DenseNet-100 (1 run) for a scale set."""

    scales: tuple[int, ...]  # () is the baseline without MS-SAR
    resnet56_cifar10: tuple[float, float]
    resnet56_cifar100: tuple[float, float]
    resnet56_flops: float
    densenet100_cifar10: float
    densenet100_cifar100: float
    densenet100_flops: float
    densenet100_params: float


TABLE3 = (
    ScaleAblationRow((), (6.97, 0.05), (29.41, 0.14), 125.7 * M, 4.67, 22.45, 252.5 * M, 0.80 * M),
    ScaleAblationRow(
        (1,), (6.80, 0.06), (28.99, 0.15), 125.7 * M, 4.45, 21.83, 252.6 * M, 0.99 * M
    ),
    ScaleAblationRow(
        (2,), (6.55, 0.05), (28.31, 0.17), 125.8 * M, 4.35, 21.33, 253.0 * M, 0.99 * M
    ),
    ScaleAblationRow(
        (4,), (6.48, 0.06), (28.74, 0.18), 126.3 * M, 4.39, 21.79, 254.3 * M, 0.99 * M
    ),
    ScaleAblationRow(
        (1, 2), (6.38, 0.07), (28.28, 0.19), 125.8 * M, 4.29, 21.42, 252.8 * M, 0.99 * M
    ),
    ScaleAblationRow(
        (1, 4), (6.11, 0.14), (28.05, 0.22), 126.0 * M, 4.32, 21.27, 253.5 * M, 0.99 * M
    ),
    ScaleAblationRow(
        (2, 4), (6.35, 0.09), (28.87, 0.27), 126.1 * M, 4.33, 21.23, 253.7 * M, 0.99 * M
    ),
    ScaleAblationRow(
        (1, 2, 4), (6.04, 0.11), (27.71, 0.21), 126.0 * M, 4.06, 21.13, 253.3 * M, 0.99 * M
    ),
)

# §4.2: DenseNet-100 on CIFAR-10 / CIFAR-100, multi- vs single-stage recalibration.
STAGE_ABLATION = {
    "multi": {"cifar10": 4.06, "cifar100": 21.13},
    "single": {"cifar10": 4.45, "cifar100": 21.83},
}
# §4.2: "the regional strategy outperforms the sliding strategy by ~0.2%" on CIFAR-100 (no table).
STRATEGY_ABLATION_GAP_CIFAR100 = 0.2

PAPER_COST_ROWS = TABLE2 + TABLE5


def cost_row(model: str, recalibration: str) -> CostRow | None:
    """The Table 2 or 5 row of a network and recalibration, if the paper has one."""
    for row in PAPER_COST_ROWS:
        if row.model == model and row.recalibration == recalibration:
            return row
    return None


# --- not from the paper: published ImageNet ResNet-50 numbers of the other modules (SPEC.md §7) --


@dataclass(frozen=True)
class PublishedRow:
    """One module's published ILSVRC2012 validation error with a ResNet-50 backbone (single 224
    centre crop), in % like the rest of this file; ``None`` where no number was verified.

    ``baseline_*`` is the plain ResNet-50 of the same table, the one the module's gain is measured
    against in that source (``None`` when the source quotes the number from elsewhere and the
    original baseline could not be read). ``source`` is where the number comes from, ``read_in``
    the document it was verified in, ``printed`` how that document prints it.
    """

    recalibration: str  # registry name
    label: str  # the source's name for the network
    top1: float | None
    top5: float | None
    baseline_top1: float | None
    baseline_top5: float | None
    source: str
    url: str
    read_in: str
    printed: str
    note: str


def _error(accuracy: float) -> float:
    """100 − an accuracy printed in %, at the printed precision (77.48 -> 22.52)."""
    return round(100 - accuracy, 2)


_SE_PAPER = (
    "Hu, Shen, Sun, Squeeze-and-Excitation Networks, CVPR 2018 (extended with Albanie and Wu, "
    "arXiv:1709.01507), Table 2: ResNet-50 're-implementation' and 'SENet' columns"
)
_ECA_PAPER = (
    "Wang, Wu, Zhu, Li, Zuo, Hu, ECA-Net: Efficient Channel Attention for Deep Convolutional "
    "Neural Networks, CVPR 2020, Table 3 (ResNet-50 rows)"
)

PUBLISHED_RESNET50 = (
    PublishedRow(
        "se",
        "SE-ResNet-50",
        23.29,
        6.62,
        24.80,
        7.48,
        _SE_PAPER,
        "https://arxiv.org/abs/1709.01507",
        "ECA-Net Table 3, which copies ResNet-50 and SE-ResNet-50 from the SE paper (its §4.2.2); "
        "the SE paper itself was not read here. Its table number: github.com/hujie-frank/SENet "
        "issue #65, which cites 24.8 and 23.29 'in Table 2' of the journal extension, answered "
        "by an author who refers to 'the table 2'",
        "top-1 / top-5 error 23.29 / 6.62 (ECA-Net: accuracy 76.71 / 93.38); ResNet-50 "
        "24.80 / 7.48 (75.20 / 92.52)",
        "Trained with batch 1024 and lr 0.6, as MS-SAR trains (SENet README). The released "
        "Caffe SE-ResNet-50 (github.com/hujie-frank/SENet, README Table 1) reaches 22.37 / 6.36 "
        "after re-training with batch 256, lr 0.1 and more epochs: not the paper's protocol.",
    ),
    PublishedRow(
        "mssar",
        "ResNet-50+MS-SAR",
        None,
        None,
        None,
        None,
        "Multi-Scale Spatially-Asymmetric Recalibration for Image Classification, ECCV 2018",
        "",
        "its Table 5",
        "",
        "No ResNet-50 number: the paper's Table 5 has ResNet-18/34 and ResNeXt-50 (TABLE5).",
    ),
    PublishedRow(
        "eca",
        "ECA-Net50",
        _error(77.48),
        _error(93.68),
        _error(75.20),
        _error(92.52),
        _ECA_PAPER,
        "https://arxiv.org/abs/1910.03151",
        "the paper's text (Table 3) and github.com/BangguWu/ECANet README (77.48 / 93.68)",
        "top-1 / top-5 accuracy 77.48 / 93.68; ResNet-50 75.20 / 92.52",
        "Its ResNet-50 row is SE's re-implementation copied from the SE paper, not retrained "
        "(its Table 2 prints that row's top-5 as 92.25); ECA-Net trained with batch 256, lr 0.1, "
        "100 epochs (its §4.1), not MS-SAR's protocol. Its ResNet-50 used kernels 3, 5, 5, 7 per "
        "stage (80 parameters, abstract; README 'k3557'); mssar's adaptive rule gives 5, 5, 5, 7.",
    ),
    PublishedRow(
        "cbam",
        "ResNet50 + CBAM",
        _error(77.34),
        _error(93.69),
        None,
        None,
        "Woo, Park, Lee, Kweon, CBAM: Convolutional Block Attention Module, ECCV 2018, its "
        "ImageNet-1K classification table (its number not checked), as reproduced in " + _ECA_PAPER,
        "https://arxiv.org/abs/1807.06521",
        "ECA-Net Table 3, which reports other methods from their own papers (its §4.2.2); the "
        "CBAM paper itself was not read here (no copy of its tables could be found: the stored "
        "arXiv, ar5iv and ECCV pages give the abstract only, the authors' repository "
        "github.com/Jongchan/attention-module has no table)",
        "ECA-Net: top-1 / top-5 accuracy 77.34 / 93.69",
        "CBAM's own ResNet-50 baseline is not recorded (not read here); ECA-Net's 75.20 beside it "
        "is SE's, not CBAM's. The authors' released checkpoint (github.com/Jongchan/"
        "attention-module README, 100 epochs) scores ACC@1 77.622 / ACC@5 93.948: another run, "
        "not the paper's number.",
    ),
    PublishedRow(
        "ge",
        "GE-θ+ ResNet-50",
        None,
        None,
        None,
        None,
        "Hu, Shen, Albanie, Sun, Vedaldi, Gather-Excite: Exploiting Feature Context in "
        "Convolutional Neural Networks, NeurIPS 2018",
        "https://arxiv.org/abs/1810.12348",
        "",
        "",
        "No number recorded: neither the paper's tables nor a release (github.com/hujie-frank/"
        "GENet: no numbers, trained models 'coming soon') could be read here; the stored arXiv "
        "and NeurIPS pages give the abstract only. Numbers a secondary summary attributes to the "
        "paper (GE-θ+ with a global extent) are not recorded: unchecked against the paper. Its "
        "variants differ in extent; check which one a number is for before comparing with "
        "mssar's GE-θ+ (extent 8).",
    ),
    PublishedRow(
        "coord",
        "ResNet-50 + CA",
        None,
        None,
        None,
        None,
        "Hou, Zhou, Feng, Coordinate Attention for Efficient Mobile Network Design, CVPR 2021",
        "https://arxiv.org/abs/2103.02907",
        "its abstract and github.com/houqb/CoordAttention README (its ImageNet tables list "
        "MobileNetV2 and MobileNeXt only and defer 'specific numbers' to the paper); the paper's "
        "own tables were not read here",
        "",
        "No ResNet-50 ImageNet number: its ImageNet results are for mobile networks (MobileNetV2, "
        "MobileNeXt, EfficientNet); the README lists MobileNetV2 + CA 74.3 and MobileNeXt + CA "
        "75.2 top-1 accuracy, trained 200 epochs with a cosine schedule.",
    ),
    PublishedRow(
        "gc",
        "GCNet (ResNet-50)",
        _error(77.70),
        _error(93.66),
        None,
        None,
        "Cao, Xu, Lin, Wei, Hu, GCNet: Non-local Networks Meet Squeeze-Excitation Networks and "
        "Beyond, ICCV Workshops 2019, ImageNet result, as reproduced in " + _ECA_PAPER,
        "https://arxiv.org/abs/1904.11492",
        "ECA-Net Table 3 (28.08 M parameters, 3.87 GFLOPs there); the GCNet paper itself was not "
        "read here (the stored arXiv pages give the abstract only; the authors' repository "
        "github.com/xvjiarui/GCNet reports COCO results only)",
        "ECA-Net: top-1 / top-5 accuracy 77.70 / 93.66",
        "GCNet's own ResNet-50 baseline and GC configuration (ratio, stages) are not recorded "
        "(not read here); ECA-Net's 75.20 beside it is SE's, not GCNet's.",
    ),
)


def published_resnet50(recalibration: str) -> PublishedRow | None:
    """The :data:`PUBLISHED_RESNET50` row of a module (``None`` for the plain network or a module
    with no row)."""
    for row in PUBLISHED_RESNET50:
        if row.recalibration == recalibration:
            return row
    return None
