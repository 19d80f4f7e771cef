"""ImageNet: ``ROOT/train/<wnid>/*.JPEG`` and ``ROOT/val/<wnid>/*.JPEG`` through torchvision's
``ImageFolder`` and a ``DataLoader``, with the SENet-style augmentation (SPEC.md §4).

The loader keeps the device-resident loader's contract (seeded per-epoch order, sharded
``perm[r::world_size]``, batches on the device). Workers never use the global RNG for the
augmentation: each image's transform runs under a forked RNG seeded from the epoch's generator,
restored afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mssar_cli.data.device_loader import epoch_generator, samples_per_rank, subset_indices
from mssar_cli.data.formats import NORMALISATION, data_root
from mssar_cli.errors import MssarError

if TYPE_CHECKING:
    from mssar_cli.recipe import DataSection

IMAGENET_SIZE = 224  # training crop and test centre crop, pixels
IMAGENET_RESIZE = 256  # test images are resized (shorter side) to this before the centre crop
IMAGENET_ROTATION = 10  # degrees, the "slight rotation" of SENet's augmentation
IMAGENET_JITTER = 0.4  # brightness, contrast and saturation jitter (pixel jitter)


def imagenet_folders(data: DataSection):
    """The ``train`` and ``val`` ImageFolders under ``data.root``; their classes must agree."""
    from torchvision.datasets import ImageFolder

    root = data_root(data)
    hint = f"expected {root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG"
    folders = []
    for split in ("train", "val"):
        path = root / split
        if not path.is_dir():
            raise MssarError(
                f"data.root: imagenet data not found: searched {path} (no such directory); {hint}"
            )
        try:
            folders.append(ImageFolder(str(path)))
        except (FileNotFoundError, OSError) as err:
            message = " ".join(str(err).split())
            raise MssarError(
                f"imagenet data under {path} is unusable ({message}); {hint}"
            ) from None
    train, val = folders
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))[:3]
        only_val = sorted(set(val.classes) - set(train.classes))[:3]
        raise MssarError(
            f"imagenet class folders differ between {root / 'train'} ({len(train.classes)}) and "
            f"{root / 'val'} ({len(val.classes)}), e.g. only in train {only_train}, only in val "
            f"{only_val}; the validation images must be sorted into <wnid> folders too"
        )
    return train, val


def imagenet_transforms():
    """(train, test) transforms. Train as SENet: random-size crop with aspect-ratio change to 224,
    flip, slight rotation, pixel (colour) jitter; test: resize 256, centre crop 224."""
    from torchvision import transforms as T

    normalise = T.Normalize(*NORMALISATION["imagenet"])
    train = T.Compose(
        [
            T.RandomResizedCrop(IMAGENET_SIZE),  # scale 0.08..1, aspect ratio 3/4..4/3
            T.RandomHorizontalFlip(),
            T.RandomRotation(IMAGENET_ROTATION),
            T.ColorJitter(IMAGENET_JITTER, IMAGENET_JITTER, IMAGENET_JITTER),
            T.ToTensor(),
            normalise,
        ]
    )
    test = T.Compose(
        [T.Resize(IMAGENET_RESIZE), T.CenterCrop(IMAGENET_SIZE), T.ToTensor(), normalise]
    )
    return train, test


def imagenet_loaders(
    train_folder,
    val_folder,
    data: DataSection,
    *,
    batch_size: int,
    device: torch.device,
    seed: int,
    rank: int,
    world_size: int,
) -> tuple[FolderLoader, FolderLoader]:
    """Train and test loaders of the folders of :func:`imagenet_folders`, after ``data.subset``
    and ``data.test_subset``; ``batch_size`` is this rank's training batch."""
    train_folder = _Subset(train_folder, subset_indices(len(train_folder), data.subset))
    val_folder = _Subset(val_folder, subset_indices(len(val_folder), data.test_subset))
    train_transform, test_transform = imagenet_transforms()
    if not data.augment:
        train_transform = test_transform
    common = {
        "seed": seed,
        "rank": rank,
        "world_size": world_size,
        "workers": data.workers,
        "device": device,
    }
    train = FolderLoader(
        _SeededImages(train_folder, train_transform), batch_size=batch_size, train=True, **common
    )
    test = FolderLoader(
        _SeededImages(val_folder, test_transform),
        batch_size=data.eval_batch_size,
        train=False,
        **common,
    )
    return train, test


class _SeededImages(torch.utils.data.Dataset):
    """ImageFolder samples keyed by ``(index, image_seed)``.

    With a seed, the transform runs under a forked, freshly seeded RNG (restored afterwards), so
    an image's augmentation depends only on (run seed, epoch, position): not on the number of
    workers, which worker took the batch, or anything else that touched the global RNG.
    """

    def __init__(self, folder, transform) -> None:
        self.samples = folder.samples
        self.loader = folder.loader
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int | None]) -> tuple[Tensor, int]:
        index, image_seed = key
        path, label = self.samples[index]
        image = self.loader(path)
        if image_seed is None:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(image_seed)
            return self.transform(image), label


class _EpochBatches:
    """The batch sampler of a FolderLoader: lists of (index, image_seed) for the current epoch."""

    def __init__(self, owner: FolderLoader) -> None:
        self.owner = owner

    def __iter__(self) -> Iterator[list[tuple[int, int | None]]]:
        keys = self.owner.epoch_keys()
        size = self.owner.batch_size
        first = self.owner.start_batch * size
        return (keys[i : i + size] for i in range(first, len(keys), size))

    def __len__(self) -> int:
        return len(self.owner)


class FolderLoader:
    """ImageFolder images through a DataLoader, batches moved to ``device``.

    Same contract as ``DeviceLoader``: seeded per-epoch order sharded ``perm[r::world_size]`` with
    equal shards (train), fixed order ``r::world_size`` (test), a last batch of one dropped (train).
    """

    def __init__(
        self,
        dataset: _SeededImages,
        *,
        batch_size: int,
        train: bool,
        seed: int,
        rank: int,
        world_size: int,
        workers: int,
        device: torch.device,
    ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.device = device
        self.epoch, self.start_batch = 0, 0
        self.total = len(dataset)
        self.num_samples = samples_per_rank(
            self.total, batch_size, train=train, rank=rank, world_size=world_size
        )
        self._loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=_EpochBatches(self),
            num_workers=workers,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
            # DataLoader draws its workers' base seed from this, not from the global RNG
            generator=torch.Generator().manual_seed(seed),
        )

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def epoch_keys(self) -> list[tuple[int, int | None]]:
        if not self.train:
            return [(i, None) for i in range(self.rank, self.total, self.world_size)]
        rng = epoch_generator(self.seed, self.epoch)
        order = torch.randperm(self.total, generator=rng)
        image_seeds = torch.randint(0, 2**62, (self.total,), generator=rng)
        mine = slice(self.rank, self.rank + self.world_size * self.num_samples, self.world_size)
        return list(zip(order[mine].tolist(), image_seeds[mine].tolist()))

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for images, labels in self._loader:
            yield (
                images.to(self.device, non_blocking=True),
                labels.to(self.device, non_blocking=True),
            )


class _Subset:
    """An ImageFolder restricted to some of its samples (for data.subset / data.test_subset)."""

    def __init__(self, folder, keep: Tensor) -> None:
        self.samples = [folder.samples[i] for i in keep.tolist()]
        self.loader = folder.loader
        self.classes = folder.classes
