"""Recalibrate a BN output without keeping that output for backward (issue 5: training memory).

In a residual block the recalibration multiplies the last BN's output ``y = bn(c)``, so autograd
keeps ``y`` (for the gradient of the weights) beside ``c`` (which BN keeps for its own backward):
one more full-size tensor per block, as large as the block's own activations, so a large share
of a ResNet's training memory for SE and MS-SAR alike. Here every tensor the recalibration saves
that is ``y`` or a view of it is stored as a recipe instead, ``y = c * a + b`` with BN's
per-channel batch scale ``a = gamma / sigma`` and shift ``b = beta - mean * a``, and rebuilt
from ``c`` when backward needs it. The forward pass is BN's
own kernel (``torch.native_batch_norm``, which also returns the batch statistics), so outputs and
running statistics are bitwise those of ``nn.BatchNorm2d``; gradients differ from it only by the
rounding of the rebuilt ``y`` (about 1e-7 relative).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mssar_cli.batchnorm import batch_norm_with_statistics


@dataclass(frozen=True)
class _Rebuild:
    """How to rebuild a saved view of ``bn(c)`` from ``c`` (see the module docstring)."""

    pre: torch.Tensor  # c, already kept alive by BN's own backward
    scale: torch.Tensor  # a, (C,)
    shift: torch.Tensor  # b, (C,)
    dtype: torch.dtype
    base_stride: tuple[int, ...]  # of bn(c) itself
    size: torch.Size  # of the saved view
    stride: tuple[int, ...]
    offset: int  # storage offset of the saved view relative to bn(c)'s

    def tensor(self) -> torch.Tensor:
        shape = (1, -1) + (1,) * (self.pre.dim() - 2)
        full = torch.addcmul(self.shift.view(shape), self.pre, self.scale.view(shape))
        full = full.to(self.dtype)
        if full.stride() != self.base_stride:  # the saved view's strides refer to bn(c)'s layout
            full = torch.empty_strided(
                self.pre.size(), self.base_stride, dtype=self.dtype, device=self.pre.device
            ).copy_(full)
        return full.as_strided(self.size, self.stride, self.offset)


def recalibrate_bn_output(
    bn: nn.BatchNorm2d, pre: torch.Tensor, recalibration: nn.Module
) -> torch.Tensor:
    """``recalibration(bn(pre))``, keeping ``pre`` rather than ``bn(pre)`` for backward.

    Falls back to the plain composition where the recipe does not apply: no autograd, BN in
    evaluation mode, a BN subclass (SyncBatchNorm) or one without affine parameters or running
    statistics, or a module whose backward needs its input bitwise (``needs_exact_input``: a max
    pooling's backward finds the maximum by comparing the saved input with it, and a rebuilt input
    that differs by rounding matches no position, so amax's backward divides by zero).
    """
    if not (
        torch.is_grad_enabled()
        and not torch.compiler.is_compiling()  # inductor decides itself what backward keeps
        and bn.training
        and type(bn) is nn.BatchNorm2d
        and bn.affine
        and bn.track_running_stats
        and pre.dim() == 4
        and not getattr(recalibration, "needs_exact_input", False)
    ):
        return recalibration(bn(pre))
    out, mean, invstd = batch_norm_with_statistics(bn, pre)
    with torch.no_grad():
        scale = bn.weight * invstd
        shift = bn.bias - mean * scale
    # The hooks must not hold ``out`` itself (a closure over it would keep it alive): only where
    # it lives. While ``out`` is alive no other tensor shares its storage, so a match is ``out`` or
    # a view of it.
    storage, dtype, base_offset = out.untyped_storage().data_ptr(), out.dtype, out.storage_offset()
    base_stride = out.stride()

    def pack(t: torch.Tensor):
        if t.untyped_storage().data_ptr() == storage and t.dtype == dtype:
            offset = t.storage_offset() - base_offset
            return _Rebuild(pre, scale, shift, dtype, base_stride, t.size(), t.stride(), offset)
        return t

    def unpack(packed):
        return packed.tensor() if isinstance(packed, _Rebuild) else packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return recalibration(out)
