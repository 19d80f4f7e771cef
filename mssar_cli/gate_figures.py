"""The pictures of ``mssar show`` (matplotlib's object API, Agg, no pyplot state).

* :func:`stage_figure`: one grid per stage, a row per test image: the image, then the chosen
  block's gate maps upsampled to the image (nearest, so a region's weight covers exactly its
  pixels): per scale (Z_K, Eq. 1) and their mean (Z, Eq. 2) for MS-SAR (paper §3.2; each the
  mean over channels), the gate for the other spatial modules, then the channels that vary most
  over positions. The channel-mean columns (each scale and their mean) share one colour scale,
  so rows and scales compare; each channel column has its own (read its bar).
* :func:`asymmetry_figure`: the spatial asymmetry of every stage (:mod:`mssar_cli.gates`), one
  bar per scale and their mean (MS-SAR) or one bar (the others): the paper's argument in one
  number per stage.
"""

from __future__ import annotations

import io

import torch
from matplotlib.figure import Figure

from mssar_cli.gates import Stage

GATE_COLOURMAP = "viridis"


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _image_array(image: torch.Tensor):
    """(C, H, W) in [0, 1] -> what ``imshow`` takes: (H, W) for one channel, (H, W, 3) else."""
    image = image.clamp(0, 1)
    return image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()


def stage_figure(
    stage: Stage,
    block: int,
    images: torch.Tensor,
    captions: list[str],
    title: str,
) -> bytes:
    """The grid of one stage's block ``block`` (an index into the stage's modules) as a PNG.

    ``images``: (N, C, H, W) in [0, 1], as the network saw them before normalisation.
    """
    gates = stage.modules[block]
    columns = [(label, maps) for label, maps in gates.panels.items()]
    columns += [(f"channel {c}", gates.channel_maps[:, i]) for i, c in enumerate(gates.channels)]
    rows = images.shape[0]
    height, width = images.shape[2:]
    extent = (0, width, height, 0)  # every map covers the whole image, whatever its own size
    figure = Figure(figsize=(1.55 * (len(columns) + 1), 1.55 * rows + 1.2), layout="constrained")
    axes = figure.subplots(rows, len(columns) + 1, squeeze=False)
    for row in range(rows):
        axis = axes[row, 0]
        axis.imshow(_image_array(images[row]), cmap="gray", vmin=0, vmax=1, extent=extent)
        axis.set_ylabel(captions[row], fontsize=7)
    # The channel means (each scale, their mean) share one colour scale, so that a scale whose
    # weights barely differ looks flat beside one whose weights differ; each channel has its own.
    means = torch.stack(list(gates.panels.values()))
    for col, (label, maps) in enumerate(columns, start=1):
        scaled = means if label in gates.panels else maps
        low, high = scaled.min().item(), scaled.max().item()
        for row in range(rows):
            shown = axes[row, col].imshow(
                maps[row].numpy(),
                cmap=GATE_COLOURMAP,
                vmin=low,
                vmax=high if high > low else low + 1e-6,
                interpolation="nearest",
                extent=extent,
            )
        axes[0, col].set_title(label, fontsize=8)
        bar = figure.colorbar(shown, ax=axes[:, col], location="bottom", shrink=0.9, aspect=12)
        bar.ax.tick_params(labelsize=6, rotation=45)
    axes[0, 0].set_title("image", fontsize=8)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    position = f"block {block % len(stage.modules) + 1} of {len(stage.modules)}"
    figure.suptitle(
        f"{title}\nstage {stage.index} ({stage.size[0]}x{stage.size[1]} maps), {position}: "
        f"{gates.name}",
        fontsize=9,
    )
    return _png(figure)


def asymmetry_figure(stages: list[Stage], title: str) -> bytes:
    """Bars of each stage's spatial asymmetry per label (scale, mean over scales or gate)."""
    labels = list(stages[0].asymmetry())
    figure = Figure(figsize=(1.6 + 1.3 * len(stages) * max(1, len(labels) / 2), 3.4))
    axis = figure.subplots()
    bar_width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        heights = [stage.asymmetry()[label] for stage in stages]
        positions = [s + (i - (len(labels) - 1) / 2) * bar_width for s in range(len(stages))]
        bars = axis.bar(positions, heights, bar_width, label=label)
        axis.bar_label(bars, fmt="%.3f", fontsize=6, padding=1)
    axis.set_xticks(
        range(len(stages)),
        [f"stage {s.index}\n{s.size[0]}x{s.size[1]}, {len(s.modules)} blocks" for s in stages],
        fontsize=8,
    )
    axis.set_ylabel("std of a weight over positions\n(mean over channels, images, blocks)")
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=8, frameon=False)
    axis.spines[["top", "right"]].set_visible(False)
    figure.tight_layout()
    return _png(figure)
