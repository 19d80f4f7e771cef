"""Batch normalisation through ``torch.native_batch_norm``, with the statistics it used.

:mod:`mssar_cli.models.bn_recompute` and :mod:`mssar_cli.fused_gate` compute BN outside
``nn.BatchNorm`` (to rebuild its output or to differentiate it by hand) and need the batch mean
and ``1 / sigma`` of the forward pass. :func:`batch_norm_with_statistics` reproduces
``nn.BatchNorm*.forward`` exactly (the same kernel, the same running-statistics update and
``num_batches_tracked`` count), so outputs and buffers are bitwise the module's.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn


def uses_batch_statistics(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    """Whether ``bn`` normalises with the batch's statistics (as ``nn.BatchNorm`` decides)."""
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def momentum_factor(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """The running-average factor of one training forward; counts the batch, as nn.BatchNorm does."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            factor = 1.0 / float(bn.num_batches_tracked)
    return factor


def batch_norm_with_statistics(
    bn: nn.modules.batchnorm._BatchNorm, input: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``bn(input)`` with the mean and 1/sigma it normalised with (empty in evaluation mode).

    Raises the ValueError ``nn.BatchNorm`` raises for a single value per channel in training.
    """
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
        input, bn.weight, bn.bias, running_mean, running_var, batch, factor, bn.eps
    )


# Storages of tensors made for one backward use (keyed by id; an entry dies with its storage).
_DISPOSABLE: weakref.WeakValueDictionary[int, torch.UntypedStorage] = weakref.WeakValueDictionary()


def mark_disposable(t: torch.Tensor) -> torch.Tensor:
    """Mark ``t`` as a private copy made for one backward use (a rebuilt BN output, see
    :mod:`mssar_cli.models.bn_recompute`): its one consumer may overwrite it.

    The mark is on the storage: autograd hands the consumer a new tensor object over it.
    """
    storage = t.untyped_storage()
    _DISPOSABLE[id(storage)] = storage
    return t


def is_disposable(t: torch.Tensor) -> bool:
    """Whether ``t``'s storage was marked by :func:`mark_disposable` (and not yet taken)."""
    storage = t.untyped_storage()
    return _DISPOSABLE.get(id(storage)) is storage


def take_disposable(t: torch.Tensor) -> bool:
    """Claim ``t``'s storage for overwriting: True once for a marked storage, then the mark is gone
    (the storage may live on in a result handed to others, which must not be overwritten again)."""
    if not is_disposable(t):
        return False
    del _DISPOSABLE[id(t.untyped_storage())]
    return True
