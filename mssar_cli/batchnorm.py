"""Batch normalisation through ``torch.native_batch_norm``, with the statistics it used.

:mod:`mssar_cli.models.bn_recompute` and :mod:`mssar_cli.fused_gate` compute BN outside
``nn.BatchNorm`` (to rebuild its output or to differentiate it by hand) and need the batch mean
and ``1 / sigma`` of the forward pass. :func:`batch_norm_with_statistics` reproduces
``nn.BatchNorm*.forward`` exactly (the same kernel, the same running-statistics update and
``num_batches_tracked`` count), so outputs and buffers are bitwise the module's.
"""

from __future__ import annotations

import torch
from torch import nn


def uses_batch_statistics(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    """Whether ``bn`` normalises with the batch's statistics (as ``nn.BatchNorm`` decides)."""
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def momentum_factor(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """The running-average factor of one training forward; counts the batch as nn.BatchNorm does."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            factor = 1.0 / float(bn.num_batches_tracked)
    return factor


def batch_norm_with_statistics(
    bn: nn.modules.batchnorm._BatchNorm,
    input: torch.Tensor,
    affine: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``bn(input)`` with the mean and 1/sigma it normalised with (empty in evaluation mode).

    ``affine``: (γ, β) to use for ``bn``'s own weight and bias, when the caller already holds
    them (a parametrized weight is then computed once, and the caller differentiates the very
    tensors BN used). Raises the ValueError ``nn.BatchNorm`` raises for a single value per
    channel in training.
    """
    weight, bias = (bn.weight, bn.bias) if affine is None else affine
    batch = uses_batch_statistics(bn)
    if batch and input.numel() == input.shape[1]:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {input.size()}"
        )
    factor = momentum_factor(bn)
    keep = not bn.training or bn.track_running_stats
    running_mean = bn.running_mean if keep else None
    running_var = bn.running_var if keep else None
    return torch.native_batch_norm(
        input, weight, bias, running_mean, running_var, batch, factor, bn.eps
    )
