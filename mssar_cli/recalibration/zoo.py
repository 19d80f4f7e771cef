"""The recalibration modules that came after MS-SAR (SPEC.md §7), for the comparison.

ECA, CBAM, Coordinate Attention and Global Context are timm's ``timm.layers`` modules, wrapped
so that each takes mssar's calling convention and widths; Gather-Excite is
:mod:`mssar_cli.recalibration.gather_excite` (timm's raises ``TypeError`` for its θ+ form in
releases 1.0.21 to 1.0.31). timm is imported when a module is built, not with this file.

Every module here is ``Module(channels, source_channels=None, **options)`` called as
``module(x)`` or ``module(x, x)``. They compute their gate from the map they recalibrate, so
``source_channels`` must equal ``channels``: in DenseNets they work single-stage only (MS-SAR §3.4).
A hidden width is mssar's rule for SE and MS-SAR, ``bottleneck_width(channels, 1, reduction)``,
not timm's (whose SE-style modules round it up to a multiple of 8, and Coordinate Attention
multiplies the ratio by 2/3). Options are checked here: an unknown one, or a value the module
cannot take, is a one-line :class:`~mssar_cli.errors.ModelError` naming the module.
"""

from __future__ import annotations

import importlib
import inspect
import math
from typing import Any, ClassVar

import torch
from torch import nn

from mssar_cli.errors import ModelError
from mssar_cli.recalibration.width import bottleneck_width, check_width

TIMM_REQUIREMENT = "timm>=1.0.23"  # the first release with CoordAttn


def timm_layer(module: str, name: str):
    """Class ``name`` of ``timm.layers.<module>`` (CBAM and Coordinate Attention are not
    re-exported by ``timm.layers`` itself), or a ModelError saying how to install timm."""
    try:
        layers = importlib.import_module(f"timm.layers.{module}")
    except ImportError as error:
        raise ModelError(
            f"this recalibration module is timm's: install {TIMM_REQUIREMENT} ({error})"
        ) from None
    return getattr(layers, name)


class ZooModule(nn.Module):
    """mssar's calling convention around a module that gates the map it is given.

    A subclass sets :attr:`name` (its registry name) and defines ``build(self, *, option=default,
    ...)``, which returns the module computing ``x * gate(x)``; its keyword-only parameters are
    the options the module takes, with their defaults (the paper's).
    """

    name: ClassVar[str] = ""
    # Whether its backward needs the map it is given bitwise (max pooling compares the saved input
    # with its maximum): the residual blocks then keep the BN output instead of rebuilding it
    # (:mod:`mssar_cli.models.bn_recompute`).
    needs_exact_input: ClassVar[bool] = False

    def __init__(self, channels: int, source_channels: int | None = None, **options) -> None:
        super().__init__()
        self.channels = check_width("channels", channels)
        if source_channels is not None:
            source_channels = check_width("source_channels", source_channels)
            if source_channels != self.channels:
                raise ModelError(
                    f"recalibration {self.name!r} computes its gate from the map it recalibrates "
                    f"({self.channels} channels), not from a {source_channels}-channel source: "
                    "in DenseNets it works single-stage only (stage: single)"
                )
        self.source_channels = self.channels
        defaults = self.option_defaults()
        for key in options:
            if key not in defaults:
                takes = ", ".join(defaults) or "no options"
                raise ModelError(
                    f"recalibration {self.name!r} does not take {key!r} (it takes: {takes})"
                )
        self.options = {**defaults, **options}
        try:
            self.body = self.build(**self.options)
        except TypeError as error:  # an option the wrapped constructor refuses
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ModelError(
                f"recalibration {self.name!r} cannot be built with {self.options}: {message}"
            ) from None

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        """The options ``build`` takes, with their defaults."""
        parameters = inspect.signature(cls.build).parameters.values()
        return {p.name: p.default for p in parameters if p.kind is p.KEYWORD_ONLY}

    def build(self) -> nn.Module:
        raise NotImplementedError

    def hidden_width(self, reduction: float) -> int:
        """The MLP's hidden width: total width D / reduction (SPEC.md §1), at least 1."""
        try:
            return bottleneck_width(self.channels, 1, reduction)
        except ModelError as error:
            raise ModelError(f"{self.name}: {error}") from None

    def forward(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        if source is not None and source is not x:
            raise ModelError(
                f"recalibration {self.name!r} computes its gate from the map it recalibrates: "
                "it takes no separate source (in DenseNets, stage: single)"
            )
        return self.body(x)

    def init_after_network(self) -> None:
        """Re-apply what its paper's initialisation specifies beyond the network's own (which
        initialises every convolution He-normal after building, :mod:`mssar_cli.models`)."""

    def spatial_gate(self, x: torch.Tensor) -> torch.Tensor | None:
        """The module's gate at every position of ``x`` for ``mssar show``: (N, C, H, W) or
        (N, 1, H, W), or None for a module whose gate is the same at every position."""
        return None

    # --- option checks ------------------------------------------------------------------------

    def odd_kernel(self, option: str, value) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % 2 == 0:
            raise ModelError(
                f"{self.name}: {option} must be an odd positive integer, got {value!r}"
            )
        return value

    def number(self, option: str, value, positive: bool = False) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (ok and math.isfinite(value) and (value > 0 or not positive)):
            kind = "a positive number" if positive else "a number"
            raise ModelError(f"{self.name}: {option} must be {kind}, got {value!r}")
        return value

    def flag(self, option: str, value) -> bool:
        if not isinstance(value, bool):
            raise ModelError(f"{self.name}: {option} must be true or false, got {value!r}")
        return value

    def choice(self, option: str, value, choices: tuple[str, ...]) -> str:
        if value not in choices:
            known = " | ".join(choices)
            raise ModelError(f"{self.name}: {option} must be one of {known}, got {value!r}")
        return value


def eca_kernel_size(channels: int, gamma: float = 2, beta: float = 1) -> int:
    """ECA-Net's adaptive kernel size (Eq. 12): k = |log2(C) / γ + b / γ|_odd.

    ``|t|_odd`` is read as the authors' code reads it: ``int(t)``, plus one when even (k = 3 for
    C = 16, 32, 64; 5 for 256 to 1024; 7 for 2048). No lower bound: C < 8 gives k = 1 (timm's
    ``EcaModule(channels)`` raises it to 3).
    """
    t = int(abs((math.log2(channels) + beta) / gamma))
    return t if t % 2 else t + 1


class EfficientChannelAttention(ZooModule):
    """ECA (Wang et al., "ECA-Net: Efficient Channel Attention for Deep Convolutional Neural
    Networks", CVPR 2020): global average pooling, a 1-D convolution of kernel k across the
    channels (no bias), sigmoid, multiply: ω = σ(C1D_k(y)) (§3.2). No dimensionality reduction.

    Options: ``gamma`` = 2 and ``beta`` = 1 of the adaptive kernel k = |log2(C)/γ + b/γ|_odd
    (Eq. 12, :func:`eca_kernel_size`); ``kernel_size``: a fixed odd k instead (None: adaptive).
    Parameters: k. timm's ``EcaModule``.
    """

    name = "eca"

    def build(self, *, gamma: float = 2, beta: float = 1, kernel_size: int | None = None):
        gamma = self.number("gamma", gamma, positive=True)
        beta = self.number("beta", beta)
        if kernel_size is None:
            kernel_size = eca_kernel_size(self.channels, gamma, beta)
        self.kernel_size = self.odd_kernel("kernel_size", kernel_size)
        return timm_layer("eca", "EcaModule")(channels=None, kernel_size=self.kernel_size)


class ConvolutionalBlockAttention(ZooModule):
    """CBAM (Woo et al., "CBAM: Convolutional Block Attention Module", ECCV 2018), channel then
    spatial attention, applied in sequence (§3, Eq. 1):

    * channel (Eq. 2): σ(MLP(AvgPool(F)) + MLP(MaxPool(F))), one MLP C -> C' -> C with a ReLU,
      shared by the two pooled vectors;
    * spatial (Eq. 3): σ(f7x7([mean over channels; max over channels])) of the channel-refined
      map.

    As in the authors' code (and timm's module), the MLP has biases and the 7x7 convolution is
    followed by a BN of its single channel (no conv bias). C' = D / reduction (mssar's rule; the
    paper's r = 16). Options: ``reduction`` (16), ``spatial_kernel_size`` (7, the paper's
    choice, §4.1). Parameters: 2·C·C' + C' + C + 2·k² + 2. timm's ``CbamModule``.
    """

    name = "cbam"
    needs_exact_input = True  # its channel and spatial max poolings

    def build(self, *, reduction: float = 16, spatial_kernel_size: int = 7):
        self.hidden_channels = self.hidden_width(reduction)
        kernel = self.odd_kernel("spatial_kernel_size", spatial_kernel_size)
        return timm_layer("cbam", "CbamModule")(
            self.channels,
            rd_channels=self.hidden_channels,
            spatial_kernel_size=kernel,
            mlp_bias=True,
        )

    def spatial_gate(self, x: torch.Tensor) -> torch.Tensor:
        """The spatial attention map M_s of Eq. 3, (N, 1, H, W), on the channel-refined map
        (timm's ``SpatialAttn.forward`` without its final multiplication)."""
        refined = self.body.channel(x)
        spatial = self.body.spatial
        pooled = torch.cat([refined.mean(1, keepdim=True), refined.amax(1, keepdim=True)], 1)
        return spatial.gate(spatial.conv(pooled))


class CoordinateAttention(ZooModule):
    """Coordinate Attention (Hou et al., "Coordinate Attention for Efficient Mobile Network
    Design", CVPR 2021), §3.2: average-pool along W (one vector per row) and along H (one per
    column), concatenate, a shared 1x1 conv C -> C' + BN + h-swish (Eq. 4), split, one 1x1 conv
    C' -> C and a sigmoid per direction (Eqs. 5-6); y = x · g^h · g^w (Eq. 7): a gate per row
    times a gate per column.

    C' = D / reduction (mssar's rule; the paper's r = 32 and its code's floor of 8 hidden units
    are not used). The two gate convolutions have biases, as in the authors' code (timm's
    default has none); the shared one has none (the authors' has one, which the BN after it
    cancels). Option: ``reduction`` (32). Parameters: 3·C·C' + 2·C' + 2·C. timm's ``CoordAttn``.
    """

    name = "coord"

    def build(self, *, reduction: float = 32):
        self.hidden_channels = self.hidden_width(reduction)
        body = timm_layer("coord_attn", "CoordAttn")(
            self.channels, rd_channels=self.hidden_channels, bias=True
        )
        body.conv1.register_parameter("bias", None)  # BN follows it: a bias would be cancelled
        return body

    def spatial_gate(self, x: torch.Tensor) -> torch.Tensor:
        """g^h · g^w of Eq. 7, (N, C, H, W) (timm's ``CoordAttn.forward`` up to the product)."""
        body, height = self.body, x.shape[2]
        pooled = torch.cat([x.mean(3, keepdim=True), x.mean(2, keepdim=True).transpose(2, 3)], 2)
        shared = body.act(body.bn1(body.conv1(pooled)))
        rows, cols = torch.split(shared, [height, x.shape[3]], dim=2)
        return body.gate(body.conv_h(rows)) * body.gate(body.conv_w(cols.transpose(2, 3)))


class GlobalContextBlock(ZooModule):
    """Global Context (Cao et al., "GCNet: Non-local Networks Meet Squeeze-Excitation Networks
    and Beyond", ICCV-W 2019), the GC block of §4.2: context modelling by attention pooling
    (a 1x1 conv C -> 1, softmax over positions, the weighted sum of the positions), a bottleneck
    transform 1x1 conv C -> C' + LayerNorm + ReLU + 1x1 conv C' -> C, fused with every position
    by addition (the paper's default; ``fusion="scale"`` multiplies by its sigmoid instead).

    C' = D / reduction (mssar's rule; the paper's r = 16). The attention logits' convolution has
    no bias (the authors' code and timm's have one, which the softmax cancels). With addition,
    the last convolution's weight starts at zero (timm, as the authors' code), so the block
    starts as the identity. Options: ``reduction`` (16), ``fusion`` (add | scale). Parameters:
    2·C·C' + 3·C' + 2·C. timm's ``GlobalContext``.
    """

    name = "gc"

    def build(self, *, reduction: float = 16, fusion: str = "add"):
        self.hidden_channels = self.hidden_width(reduction)
        self.fusion = self.choice("fusion", fusion, ("add", "scale"))
        body = timm_layer("global_context", "GlobalContext")(
            self.channels,
            rd_channels=self.hidden_channels,
            fuse_add=self.fusion == "add",
            fuse_scale=self.fusion == "scale",
        )
        body.conv_attn.register_parameter("bias", None)  # the softmax cancels it
        return body

    def init_after_network(self) -> None:
        """With addition the block starts as the identity (plus the last bias): the network's
        He-normal pass must not undo the zero last convolution."""
        if self.fusion == "add":
            nn.init.zeros_(self.body.mlp_add.fc2.weight)
