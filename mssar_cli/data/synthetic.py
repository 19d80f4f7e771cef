"""The synthetic dataset: a small learnable 10-class task generated in memory, with no files.

For smoke tests and demos (SPEC.md §6): it runs the whole pipeline (the device-resident loader,
the paper's augmentation, training and evaluation) on any machine without a download, and a
network has to learn something to get it right.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from mssar_cli.data.device_loader import crop_flip

if TYPE_CHECKING:
    from mssar_cli.data.formats import Split

SYNTHETIC_TRAIN_SIZE, SYNTHETIC_TEST_SIZE = 2048, 512
SYNTHETIC_CLASSES = 10
SYNTHETIC_TEMPLATE_SEED = 20180908  # constant: the task is the same for every run seed
SYNTHETIC_MAX_SHIFT = 4  # pixels: each image is its class template moved by up to this much
SYNTHETIC_CONTRAST = 24.0  # grey levels: standard deviation of the class pattern
SYNTHETIC_NOISE = 64.0  # grey levels: standard deviation of the per-pixel noise of each image


def synthetic_split(train: bool) -> Split:
    """A small learnable 10-class task with no files: the same images on every call.

    Each class is a smooth random colour pattern (zero mean, so no class is told apart by its
    average colour). An image is its class pattern shifted by up to 4 pixels, plus strong
    per-pixel Gaussian noise, around mid-grey. Everything comes from constant seeds, never the
    run seed, so every run and every rank sees the same task.
    """
    templates_rng = torch.Generator().manual_seed(SYNTHETIC_TEMPLATE_SEED)
    side = 32 + 2 * SYNTHETIC_MAX_SHIFT
    coarse = torch.randn(SYNTHETIC_CLASSES, 3, 5, 5, generator=templates_rng)
    templates = F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False)
    templates = templates - templates.mean(dim=(1, 2, 3), keepdim=True)
    templates = templates / templates.std(dim=(1, 2, 3), keepdim=True)

    size = SYNTHETIC_TRAIN_SIZE if train else SYNTHETIC_TEST_SIZE
    rng = torch.Generator().manual_seed(SYNTHETIC_TEMPLATE_SEED + (1 if train else 2))
    labels = torch.arange(size) % SYNTHETIC_CLASSES  # balanced classes...
    labels = labels[torch.randperm(size, generator=rng)]  # ...in random order
    shifts = torch.randint(0, 2 * SYNTHETIC_MAX_SHIFT + 1, (size, 2), generator=rng)
    patterns = crop_flip(
        templates, labels, shifts[:, 0], shifts[:, 1], torch.zeros(size, dtype=torch.bool), 32
    )
    noise = torch.randn(size, 3, 32, 32, generator=rng)
    images = 128.0 + SYNTHETIC_CONTRAST * patterns + SYNTHETIC_NOISE * noise
    return images.round().clamp(0, 255).to(torch.uint8), labels.to(torch.int64)
