"""What the recalibration gates of a network compute on a batch of images (``mssar show``).

MS-SAR's argument (paper §1, §3.2) is that one weight per channel, the same at every position
(SE), is too coarse: its scales K > 1 give the regions of a map different weights. This module
measures that on a trained network. Every recalibration module whose gate varies over positions
(the registry's ``spatial`` flag: MS-SAR, CBAM, Gather-Excite, Coordinate Attention) is hooked;
one forward pass in evaluation mode records, per module:

* the gate at full size: for MS-SAR each scale's weights Z_K (Eq. 1, :meth:`MSSAR.scale_weights`)
  and their mean Z (Eq. 2); for the others their ``spatial_gate``;
* maps to draw, each the mean over channels: per scale and the mean over scales (MS-SAR) or the
  gate (the others), and the few channels of the final gate that vary most over positions;
* the **spatial asymmetry** of each of them: the standard deviation of a channel's weight over
  the positions of the map, averaged over channels and images. It is 0 for a gate that is the
  same at every position (SE, MS-SAR's K = 1) and grows as regions are weighted differently.

Modules are grouped into stages by the size of the map they see, in forward order (a stage of a
ResNet or a dense block of a DenseNet).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mssar_cli.recalibration.mssar import MSSAR
from mssar_cli.recalibration.zoo import ZooModule

MEAN_OVER_SCALES = "mean over scales"
GATE = "gate"


@dataclass
class GateMaps:
    """One module's gates on a batch (tensors on the CPU, float32)."""

    name: str  # the module's path in the network, e.g. "layer2.2.recalibration"
    size: tuple[int, int]  # H x W of the map it recalibrates
    panels: dict[str, torch.Tensor]  # label -> (N, H, W): the mean over channels
    channels: list[int]  # the channels of the final gate that vary most over positions
    channel_maps: torch.Tensor  # (N, len(channels), H, W): those channels' weights
    asymmetry: dict[str, float]  # label -> mean over channels and images of the std over positions


@dataclass
class Stage:
    """The modules working on maps of one size, in forward order."""

    index: int  # 1-based
    size: tuple[int, int]
    modules: list[GateMaps] = field(default_factory=list)

    def asymmetry(self) -> dict[str, float]:
        """Each label's asymmetry averaged over the stage's modules."""
        labels = self.modules[0].asymmetry
        return {k: sum(m.asymmetry[k] for m in self.modules) / len(self.modules) for k in labels}


def spatial_asymmetry(gate: torch.Tensor) -> float:
    """Mean over images and channels of the std over positions of a (N, C, H, W) gate."""
    return gate.flatten(2).std(2, unbiased=False).mean().item()


def _varying_channels(gate: torch.Tensor, count: int) -> list[int]:
    """The ``count`` channels whose weights vary most over positions (mean std over images)."""
    if gate.shape[1] == 1:
        return []
    spread = gate.flatten(2).std(2, unbiased=False).mean(0)
    return spread.topk(min(count, gate.shape[1])).indices.tolist()


def is_spatial(module: nn.Module) -> bool:
    """Whether ``module`` is a recalibration module whose gate can vary over positions."""
    return isinstance(module, MSSAR) or (
        isinstance(module, ZooModule) and type(module).spatial_gate is not ZooModule.spatial_gate
    )


def module_gates(
    module: nn.Module, name: str, x: torch.Tensor, source: torch.Tensor | None, count: int
) -> GateMaps:
    """The gates ``module`` applies to ``x`` (computed from ``source`` for multi-stage MS-SAR)."""
    if isinstance(module, MSSAR):
        per_scale = module.scale_weights(x if source is None else source)
        gate = sum(per_scale) / len(per_scale)
        gates = {f"K={k}": z for k, z in zip(module.scales, per_scale)}
        gates[MEAN_OVER_SCALES] = gate
    else:
        gate = module.spatial_gate(x).expand(-1, -1, *x.shape[2:])
        gates = {GATE: gate}
    channels = _varying_channels(gate, count)
    return GateMaps(
        name=name,
        size=tuple(x.shape[2:]),
        panels={k: g.mean(1).float().cpu() for k, g in gates.items()},
        channels=channels,
        channel_maps=gate[:, channels].float().cpu(),
        asymmetry={k: spatial_asymmetry(g.float()) for k, g in gates.items()},
    )


@torch.no_grad()
def record_gates(
    model: nn.Module, images: torch.Tensor, channels: int = 3
) -> tuple[list[Stage], torch.Tensor]:
    """Run ``model`` (in evaluation mode) on ``images``; the gates of every spatial module,
    grouped into stages, and the logits."""
    recorded: list[GateMaps] = []

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            x, source = args[0], args[1] if len(args) > 1 else None
            recorded.append(module_gates(module, name, x, source, channels))

        return record

    handles = [
        module.register_forward_pre_hook(hook(name))
        for name, module in model.named_modules()
        if is_spatial(module)
    ]
    was_training = model.training
    try:
        model.eval()
        logits = model(images)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return group_stages(recorded), logits


def group_stages(modules: list[GateMaps]) -> list[Stage]:
    """Consecutive modules on maps of one size form a stage."""
    stages: list[Stage] = []
    for gates in modules:
        if not stages or stages[-1].size != gates.size:
            stages.append(Stage(len(stages) + 1, gates.size))
        stages[-1].modules.append(gates)
    return stages
