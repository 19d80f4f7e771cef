"""Datasets and loaders (SPEC.md §4 and §6): cifar10, cifar100, fashion-mnist, synthetic, imagenet.

``build_loaders(recipe.data, batch_size=..., device=..., seed=..., rank=..., world_size=...)``
returns a train loader, a test loader and a ``DatasetInfo``; ``data`` is the recipe's ``data:``
section (:class:`mssar_cli.recipe.DataSection`, which also validates it) and the other
arguments are what the recipe does not hold: this rank's training batch, the device, the run
seed and the process group. Every loader yields ``(images, labels)`` batches already on
``device`` (images float32, normalised, NCHW; labels int64), has ``len()`` (batches per epoch for
this rank), ``num_samples`` (images this rank sees per epoch) and ``set_epoch(epoch)``.

Reproducibility: the training order and every augmentation draw of epoch ``e`` come from a
``torch.Generator`` seeded with ``seed * 1_000_003 + e`` and nothing else, so resuming at epoch
``e`` replays exactly the batches an uninterrupted run would have seen. The global RNG is never
touched (the ImageNet workers seed a forked RNG per image and restore it).

The modules:

- ``formats``: the on-disk formats users already have (SPEC.md §6): CIFAR's python pickles in
  torchvision's layout (and torchvision's download), Fashion-MNIST's gzip IDX files (28x28,
  zero-padded to 32x32 so the CIFAR networks run unchanged), the normalisation constants.
- ``synthetic``: generated in memory, no files (a small learnable task for smoke tests and demos).
- ``device_loader``: small images (CIFAR, Fashion-MNIST, synthetic) as one uint8 tensor on the
  device, the paper's augmentation (pad 4, random 32x32 crop, flip; §4.1) on whole batches there.
- ``imagenet``: ``ROOT/train/<wnid>/*.JPEG`` and ``ROOT/val/<wnid>/*.JPEG`` through torchvision's
  ``ImageFolder`` and a ``DataLoader`` with the SENet-style augmentation.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from mssar_cli.data.device_loader import CROP_PADDING, DeviceLoader, subset_indices
from mssar_cli.data.formats import (
    FASHION_FILES,
    FASHION_SYSTEM_DIR,
    NORMALISATION,
    Split,
    find_fashion_mnist,
    idx_count,
    load_cifar,
    load_fashion_mnist,
)
from mssar_cli.data.imagenet import IMAGENET_SIZE, FolderLoader, imagenet_folders, imagenet_loaders
from mssar_cli.data.synthetic import (
    SYNTHETIC_CLASSES,
    SYNTHETIC_TEST_SIZE,
    SYNTHETIC_TRAIN_SIZE,
    synthetic_split,
)
from mssar_cli.errors import MssarError

if TYPE_CHECKING:
    from torch import Tensor

    from mssar_cli.recipe import DataSection

__all__ = [
    "CROP_PADDING",
    "FASHION_FILES",
    "FASHION_SYSTEM_DIR",
    "NORMALISATION",
    "DatasetInfo",
    "DeviceLoader",
    "FolderLoader",
    "Loader",
    "build_loaders",
    "build_test_loader",
    "dataset_info",
]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    in_channels: int
    image_size: int  # side of the square network input, pixels
    train_size: int  # training images used (after data.subset), over all ranks
    test_size: int  # test images used (after data.test_subset), over all ranks


@runtime_checkable
class Loader(Protocol):
    """What the engine iterates: batches on the device, a length and a seedable epoch."""

    num_samples: int  # images this rank sees per epoch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate epoch ``epoch`` (its seeded order) from batch ``start_batch`` on: a run
        stopped inside an epoch resumes with exactly the batches it had not trained on."""
        ...


def dataset_info(data: DataSection) -> DatasetInfo:
    """Classes, input shape and split sizes of ``data`` (reads the files' headers or labels)."""
    name = data.dataset
    if name == "imagenet":
        train, test = imagenet_folders(data)
        sizes = (len(train), len(test))
        num_classes = len(train.classes)
    elif name == "fashion-mnist":
        folder = find_fashion_mnist(data)
        sizes = (
            idx_count(folder / FASHION_FILES["train_labels"]),
            idx_count(folder / FASHION_FILES["test_labels"]),
        )
        num_classes = 10
    elif name == "synthetic":
        sizes = (SYNTHETIC_TRAIN_SIZE, SYNTHETIC_TEST_SIZE)
        num_classes = SYNTHETIC_CLASSES
    else:
        (train_x, _), (test_x, _) = load_cifar(data)
        sizes = (len(train_x), len(test_x))
        num_classes = 10 if name == "cifar10" else 100
    return _info(data, num_classes, sizes)


def build_loaders(
    data: DataSection,
    *,
    batch_size: int,
    device: torch.device | str,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[Loader, Loader, DatasetInfo]:
    """The train loader, the test loader and the dataset's description, for this rank.

    ``batch_size`` is this rank's training batch (``data.batch_size`` is the global one: the
    engine divides it by the world size); the test loader uses ``data.eval_batch_size``.
    """
    device = torch.device(device)
    if world_size < 1 or not 0 <= rank < world_size:
        raise MssarError(
            f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}"
        )
    if data.dataset == "imagenet":
        train_folder, val_folder = imagenet_folders(data)
        info = _info(data, len(train_folder.classes), (len(train_folder), len(val_folder)))
        train, test = imagenet_loaders(
            train_folder,
            val_folder,
            data,
            batch_size=batch_size,
            device=device,
            seed=seed,
            rank=rank,
            world_size=world_size,
        )
        _check_not_empty(data, train, world_size)
        return train, test, info

    (train_x, train_y), (test_x, test_y), num_classes = _load_small_images(data)
    info = _info(data, num_classes, (len(train_x), len(test_x)))
    train_keep = subset_indices(len(train_x), data.subset)
    test_keep = subset_indices(len(test_x), data.test_subset)
    mean, std = NORMALISATION[data.dataset]
    common = {
        "mean": mean,
        "std": std,
        "seed": seed,
        "rank": rank,
        "world_size": world_size,
        "device": device,
    }
    train = DeviceLoader(
        train_x[train_keep],
        train_y[train_keep],
        batch_size=batch_size,
        train=True,
        augment=data.augment,
        **common,
    )
    test = DeviceLoader(
        test_x[test_keep],
        test_y[test_keep],
        batch_size=data.eval_batch_size,
        train=False,
        augment=False,
        **common,
    )
    _check_not_empty(data, train, world_size)
    return train, test, info


def build_test_loader(
    data: DataSection, *, device: torch.device | str
) -> tuple[Loader, DatasetInfo]:
    """The test loader alone (for ``mssar eval``): fixed order, no augmentation, one process."""
    _, test, info = build_loaders(data, batch_size=data.batch_size, device=device, seed=0)
    return test, info


def _load_small_images(data: DataSection) -> tuple[Split, Split, int]:
    """CIFAR, Fashion-MNIST or synthetic as (N, C, 32, 32) uint8 and (N,) int64 CPU tensors."""
    if data.dataset == "synthetic":
        return synthetic_split(train=True), synthetic_split(train=False), SYNTHETIC_CLASSES
    if data.dataset == "fashion-mnist":
        train, test = load_fashion_mnist(data)
        num_classes = 10
    else:
        train, test = load_cifar(data)
        num_classes = 10 if data.dataset == "cifar10" else 100
    for split, which in ((train, "training"), (test, "test")):
        labels = split[1]
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise MssarError(
                f"{data.dataset} {which} labels must be in [0, {num_classes}), found "
                f"{int(labels.min())}..{int(labels.max())}; the files under {data.root} are corrupt"
            )
    return train, test, num_classes


def _info(data: DataSection, num_classes: int, sizes: tuple[int, int]) -> DatasetInfo:
    """DatasetInfo of ``data`` given the full split sizes; checks the subsets fit."""
    used = []
    for size, subset, option, split in (
        (sizes[0], data.subset, "subset", "training"),
        (sizes[1], data.test_subset, "test_subset", "test"),
    ):
        if subset is not None and subset > size:
            raise MssarError(
                f"data.{option}={subset} but the {data.dataset} {split} split has only "
                f"{size} images"
            )
        used.append(size if subset is None else subset)
    channels = 1 if data.dataset == "fashion-mnist" else 3
    image_size = IMAGENET_SIZE if data.dataset == "imagenet" else 32
    return DatasetInfo(data.dataset, num_classes, channels, image_size, used[0], used[1])


def _check_not_empty(
    data: DataSection, train: DeviceLoader | FolderLoader, world_size: int
) -> None:
    if len(train) == 0:
        raise MssarError(
            f"no training batch: {train.total} {data.dataset} training images over {world_size} "
            f"rank(s) leave fewer than 2 per rank; raise data.subset"
        )
