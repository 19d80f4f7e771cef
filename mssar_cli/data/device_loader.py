"""The device-resident loader of the small-image datasets (CIFAR, Fashion-MNIST, synthetic).

The airbench idea: the whole split lives on ``device`` as one uint8 tensor and the paper's
augmentation (pad 4, random 32x32 crop, horizontal flip with p = 0.5; paper §4.1) runs on whole
batches there, as one indexing operation. No worker processes, no per-image Python, no
host-to-device copy per batch.

Reproducibility: the training order and every augmentation draw of epoch ``e`` come from a
``torch.Generator`` seeded with ``seed * 1_000_003 + e`` and nothing else
(:func:`epoch_generator`, shared with the ImageNet loader), so resuming at epoch ``e`` replays
exactly the batches an uninterrupted run would have seen. The global RNG is never touched.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

CROP_PADDING = 4  # pixels of zero padding on each side before the random 32x32 crop (paper §4.1)
SUBSET_SEED = 0  # data.subset draws from this, not the run seed: every seed sees the same images
EPOCH_SEED_STRIDE = 1_000_003  # generator seed of an epoch = seed * stride + epoch (a prime)


class DeviceLoader:
    """A whole split as one uint8 tensor on ``device``, augmented there in batches.

    Train (``train=True``): each epoch a seeded permutation; with ``augment`` every image gets
    zero padding of 4 pixels, a random 32x32 crop and a horizontal flip with p = 0.5 (paper §4.1),
    all drawn at once per epoch from a CPU generator (the same numbers on any device). Rank ``r``
    of ``world_size`` takes ``perm[r::world_size]``, truncated so all ranks see equally many
    images; a last batch of exactly one image is dropped (BatchNorm cannot train on it).

    Test (``train=False``): fixed order, no augmentation; rank ``r`` evaluates ``r::world_size``
    (shards may differ by one image; the engine all-reduces sums).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        augment: bool,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        device = torch.device(device)
        self.device = device
        self.batch_size = batch_size
        self.train = train
        self.augment = augment and train
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0
        self.image_size = images.shape[-1]
        self.total = len(images)  # images in the split, all ranks together
        # Stored padded when augmenting, so selection + crop + flip is one gather per batch.
        if self.augment:
            images = F.pad(images, (CROP_PADDING,) * 4)
        self.images = images.to(device).contiguous()
        self.labels = labels.to(device=device, dtype=torch.int64)
        # x_normalised = x_uint8 * scale + shift, with x_uint8 in grey levels 0..255
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._scale = (1.0 / (255.0 * std_t)).to(device)
        self._shift = (-mean_t / std_t).to(device)
        self.num_samples = samples_per_rank(
            self.total, batch_size, train=train, rank=rank, world_size=world_size
        )

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def epoch_plan(self) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """This rank's image indices, crop offsets (pixels, 0..8) and flips for the epoch (CPU)."""
        if not self.train:
            return torch.arange(self.rank, self.total, self.world_size), None, None
        rng = epoch_generator(self.seed, self.epoch)
        order = torch.randperm(self.total, generator=rng)
        # Drawn for the whole split, then sharded: the same draws whatever the world size.
        offsets = torch.randint(0, 2 * CROP_PADDING + 1, (self.total, 2), generator=rng)
        flips = torch.rand(self.total, generator=rng) < 0.5
        mine = slice(self.rank, self.rank + self.world_size * self.num_samples, self.world_size)
        if not self.augment:
            return order[mine], None, None
        return order[mine], offsets[mine], flips[mine]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order, offsets, flips = (
            None if t is None else t.to(self.device, non_blocking=True) for t in self.epoch_plan()
        )
        # the whole epoch's plan is drawn even when resuming inside it: the same draws either way
        first = self.start_batch * self.batch_size
        for start in range(first, self.num_samples, self.batch_size):
            index = order[start : start + self.batch_size]
            if self.augment:
                batch = crop_flip(
                    self.images,
                    index,
                    offsets[start : start + self.batch_size, 0],
                    offsets[start : start + self.batch_size, 1],
                    flips[start : start + self.batch_size],
                    self.image_size,
                )
            else:
                batch = self.images[index]
            batch = batch.to(torch.float32).mul_(self._scale).add_(self._shift)
            yield batch, self.labels[index]


def crop_flip(
    padded: Tensor, index: Tensor, dy: Tensor, dx: Tensor, flip: Tensor, size: int
) -> Tensor:
    """``size`` x ``size`` crops of ``padded[index]`` at offsets (dy, dx), mirrored where ``flip``.

    One advanced-indexing gather builds the whole batch: row i of crop b is padded row
    dy[b] + i, column j is padded column dx[b] + j (or dx[b] + size - 1 - j when flipped).
    """
    steps = torch.arange(size, device=padded.device)
    rows = dy[:, None] + steps  # (B, size)
    cols = dx[:, None] + torch.where(flip[:, None], steps.flip(0), steps)  # (B, size)
    channels = torch.arange(padded.shape[1], device=padded.device)
    return padded[
        index[:, None, None, None],
        channels[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def samples_per_rank(
    total: int, batch_size: int, *, train: bool, rank: int, world_size: int
) -> int:
    """Images rank ``rank`` sees per epoch of a ``total``-image split (this loader's and
    ``FolderLoader``'s contract). Train: ``total // world_size`` on every rank, one less when
    that leaves a last batch of a single image. Test: ``rank::world_size``."""
    if not train:
        return len(range(rank, total, world_size))
    per_rank = total // world_size
    if per_rank % batch_size == 1:  # a lone last image would break BatchNorm's statistics
        per_rank -= 1
    return per_rank


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator behind epoch ``epoch`` of run seed ``seed`` (order and augmentation)."""
    return torch.Generator().manual_seed(seed * EPOCH_SEED_STRIDE + epoch)


def subset_indices(size: int, subset: int | None) -> Tensor:
    """Sorted indices of a fixed random subset (SUBSET_SEED, whatever the run seed); all if None."""
    if subset is None:
        return torch.arange(size)
    rng = torch.Generator().manual_seed(SUBSET_SEED)
    return torch.randperm(size, generator=rng)[:subset].sort().values
