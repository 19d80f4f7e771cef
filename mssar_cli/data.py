"""Datasets and loaders (SPEC.md §4 and §6): cifar10, cifar100, fashion-mnist, synthetic, imagenet.

``build_loaders(spec, device=..., seed=..., rank=..., world_size=...)`` returns a train loader, a
test loader and a ``DatasetInfo``. Every loader yields ``(images, labels)`` batches already on
``device`` (images float32, normalised, NCHW; labels int64), has ``len()`` (batches per epoch for
this rank), ``num_samples`` (images this rank sees per epoch) and ``set_epoch(epoch)``.

Reproducibility: the training order and every augmentation draw of epoch ``e`` come from a
``torch.Generator`` seeded with ``seed * 1_000_003 + e`` and nothing else, so resuming at epoch
``e`` replays exactly the batches an uninterrupted run would have seen. The global RNG is never
touched (the ImageNet workers seed a forked RNG per image and restore it).

Small images (CIFAR, Fashion-MNIST, synthetic) use a device-resident loader, the airbench idea:
the whole split lives on ``device`` as one uint8 tensor and the paper's augmentation (pad 4, random
32x32 crop, horizontal flip with p = 0.5) runs on whole batches there, as one indexing operation.
No worker processes, no per-image Python, no host-to-device copy per batch.

ImageNet uses torchvision's ``ImageFolder`` and a ``DataLoader`` with the SENet-style augmentation.

On-disk formats are the ones users already have (SPEC.md §6):

- CIFAR: torchvision's layout ``ROOT/cifar-10-batches-py`` / ``ROOT/cifar-100-python``. The pickles
  are read here exactly as ``torchvision.datasets.CIFAR10/100`` reads them (same files, keys
  ``data`` and ``labels`` / ``fine_labels``) but without torchvision's md5 check of every file on
  every load, which would also reject any file that is not the original release. With
  ``data.download=true`` torchvision downloads, verifies (md5) and extracts them first.
- Fashion-MNIST: the four original gzip IDX files, searched in ``ROOT``, ``ROOT/fashion-mnist``,
  ``ROOT/FashionMNIST/raw`` (torchvision's download layout) and
  ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``). The 28x28 images
  are zero-padded to 32x32 so the CIFAR networks run unchanged.
- ImageNet: ``ROOT/train/<wnid>/*.JPEG`` and ``ROOT/val/<wnid>/*.JPEG``.
- synthetic: generated in memory, no files (a small learnable task for smoke tests and demos).
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mssar_cli.errors import MssarError

DATASETS = ("cifar10", "cifar100", "imagenet", "fashion-mnist", "synthetic")

# Per-channel mean and standard deviation of the training pixels, in units of [0, 1] intensity.
NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    # measured on the unpadded 28x28 images (the border of zeros added to reach 32x32 then
    # reads as -0.81, and a padded image's mean is about -0.19 in these units)
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

CROP_PADDING = 4  # pixels of zero padding on each side before the random 32x32 crop (paper §4.1)
SUBSET_SEED = 0  # data.subset draws from this, not the run seed: every seed sees the same images
EPOCH_SEED_STRIDE = 1_000_003  # generator seed of an epoch = seed * stride + epoch (a prime)

CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
CIFAR_FILES = {  # (train files, test files), as torchvision's CIFAR10/CIFAR100 list them
    "cifar10": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
    "cifar100": (["train"], ["test"]),
}
CIFAR_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}

FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 2051, 2049  # big-endian uint32 at offset 0 of an IDX file

SYNTHETIC_TRAIN_SIZE, SYNTHETIC_TEST_SIZE = 2048, 512
SYNTHETIC_CLASSES = 10
SYNTHETIC_TEMPLATE_SEED = 20180908  # constant: the task is the same for every run seed
SYNTHETIC_MAX_SHIFT = 4  # pixels: each image is its class template moved by up to this much
SYNTHETIC_CONTRAST = 24.0  # grey levels: standard deviation of the class pattern
SYNTHETIC_NOISE = 64.0  # grey levels: standard deviation of the per-pixel noise of each image

IMAGENET_SIZE = 224  # training crop and test centre crop, pixels
IMAGENET_RESIZE = 256  # test images are resized (shorter side) to this before the centre crop
IMAGENET_ROTATION = 10  # degrees, the "slight rotation" of SENet's augmentation
IMAGENET_JITTER = 0.4  # brightness, contrast and saturation jitter (pixel jitter)


@dataclass(frozen=True)
class DataSpec:
    """The recipe's ``data:`` section."""

    dataset: str
    root: str = "data"  # dataset root directory; a relative path is relative to the CWD
    batch_size: int = 128
    eval_batch_size: int = 512
    augment: bool = True  # the paper's training augmentation (never applied at test time)
    subset: int | None = None  # use only this many training images (fixed by SUBSET_SEED)
    test_subset: int | None = None  # use only this many test images (fixed by SUBSET_SEED)
    workers: int = 4  # DataLoader worker processes (ImageNet only)
    download: bool = False  # CIFAR: let torchvision download the archive into ROOT

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise MssarError(
                f"unknown dataset {self.dataset!r}; known datasets: {', '.join(DATASETS)}"
            )
        for name in ("batch_size", "eval_batch_size"):
            _check_positive_int(f"data.{name}", getattr(self, name))
        for name in ("subset", "test_subset"):
            if getattr(self, name) is not None:
                _check_positive_int(f"data.{name}", getattr(self, name))
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise MssarError(f"data.workers must be an integer >= 0, got {self.workers!r}")


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

    def set_epoch(self, epoch: int) -> None: ...


def dataset_info(spec: DataSpec) -> DatasetInfo:
    """Classes, input shape and split sizes of ``spec`` (reads the files' headers or labels)."""
    name = spec.dataset
    if name == "imagenet":
        train, test = _imagenet_folders(spec)
        sizes = (len(train), len(test))
        num_classes = len(train.classes)
    elif name == "fashion-mnist":
        folder = _find_fashion_mnist(spec)
        sizes = (
            _idx_count(folder / FASHION_FILES["train_labels"]),
            _idx_count(folder / FASHION_FILES["test_labels"]),
        )
        num_classes = 10
    elif name == "synthetic":
        sizes = (SYNTHETIC_TRAIN_SIZE, SYNTHETIC_TEST_SIZE)
        num_classes = SYNTHETIC_CLASSES
    else:
        (train_x, _), (test_x, _) = _load_cifar(spec)
        sizes = (len(train_x), len(test_x))
        num_classes = 10 if name == "cifar10" else 100
    return _info(spec, num_classes, sizes)


def build_loaders(
    spec: DataSpec,
    *,
    device: torch.device | str,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[Loader, Loader, DatasetInfo]:
    """The train loader, the test loader and the dataset's description, for this rank."""
    device = torch.device(device)
    if world_size < 1 or not 0 <= rank < world_size:
        raise MssarError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    if spec.dataset == "imagenet":
        return _imagenet_loaders(spec, device, seed, rank, world_size)

    (train_x, train_y), (test_x, test_y), num_classes = _load_small_images(spec)
    info = _info(spec, num_classes, (len(train_x), len(test_x)))
    train_keep = _subset_indices(len(train_x), spec.subset)
    test_keep = _subset_indices(len(test_x), spec.test_subset)
    mean, std = NORMALISATION[spec.dataset]
    common = dict(mean=mean, std=std, seed=seed, rank=rank, world_size=world_size, device=device)
    train = DeviceLoader(
        train_x[train_keep], train_y[train_keep], batch_size=spec.batch_size,
        train=True, augment=spec.augment, **common,
    )
    test = DeviceLoader(
        test_x[test_keep], test_y[test_keep], batch_size=spec.eval_batch_size,
        train=False, augment=False, **common,
    )
    _check_not_empty(spec, train, world_size)
    return train, test, info


# --------------------------------------------------------------------------------------------
# Small-image datasets: read into (N, C, 32, 32) uint8 and (N,) int64 CPU tensors
# --------------------------------------------------------------------------------------------

Split = tuple[Tensor, Tensor]  # (images uint8 N x C x H x W, labels int64 N)


def _load_small_images(spec: DataSpec) -> tuple[Split, Split, int]:
    if spec.dataset == "synthetic":
        return synthetic_split(train=True), synthetic_split(train=False), SYNTHETIC_CLASSES
    if spec.dataset == "fashion-mnist":
        train, test = _load_fashion_mnist(spec)
        num_classes = 10
    else:
        train, test = _load_cifar(spec)
        num_classes = 10 if spec.dataset == "cifar10" else 100
    for split, which in ((train, "training"), (test, "test")):
        labels = split[1]
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise MssarError(
                f"{spec.dataset} {which} labels must be in [0, {num_classes}), found "
                f"{int(labels.min())}..{int(labels.max())}; the files under {spec.root} are corrupt"
            )
    return train, test, num_classes


def _load_cifar(spec: DataSpec) -> tuple[Split, Split]:
    """CIFAR-10/100 from torchvision's on-disk layout (the python-pickle release)."""
    name = spec.dataset
    root = _root(spec)
    folder = root / CIFAR_FOLDERS[name]
    train_files, test_files = CIFAR_FILES[name]
    if spec.download:
        _download_cifar(name, root)
    missing = [f for f in train_files + test_files if not (folder / f).is_file()]
    if missing:
        raise MssarError(
            f"data.root: {name} data not found: searched {folder} (missing {', '.join(missing)}); pass "
            f"--set data.download=true on a machine with internet, or put {CIFAR_FOLDERS[name]} "
            f"(extracted from {CIFAR_URLS[name]}) under {root}"
        )
    return _read_cifar_pickles(folder, train_files), _read_cifar_pickles(folder, test_files)


def _read_cifar_pickles(folder: Path, files: Sequence[str]) -> Split:
    """Read batches the way torchvision's CIFAR10 does: ``data`` (N x 3072 uint8, CHW order)."""
    images, labels = [], []
    for file in files:
        path = folder / file
        try:
            with open(path, "rb") as handle:
                entry = pickle.load(handle, encoding="latin1")
            entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
            data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            targets = entry["labels"] if "labels" in entry else entry["fine_labels"]
        except (OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError, AttributeError) as err:
            raise MssarError(f"could not read CIFAR batch {path}: {type(err).__name__}: {err}") from None
        if len(targets) != len(data):
            raise MssarError(f"CIFAR batch {path} has {len(data)} images but {len(targets)} labels")
        images.append(data)
        labels.extend(targets)
    return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64)


def _download_cifar(name: str, root: Path) -> None:
    import torchvision

    dataset_class = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        dataset_class(str(root), train=True, download=True)
    except Exception as err:  # no network, disk full, bad archive: all end the same way for the user
        message = " ".join(str(err).split()) or type(err).__name__
        raise MssarError(
            f"downloading {name} from {CIFAR_URLS[name]} into {root} failed ({message}); "
            f"download it on a machine with internet and put {CIFAR_FOLDERS[name]} under {root}"
        ) from None


def _fashion_mnist_dirs(spec: DataSpec) -> list[Path]:
    root = _root(spec)
    return [root, root / "fashion-mnist", root / "FashionMNIST" / "raw", FASHION_SYSTEM_DIR]


def _find_fashion_mnist(spec: DataSpec) -> Path:
    searched = _fashion_mnist_dirs(spec)
    for folder in searched:
        if all((folder / file).is_file() for file in FASHION_FILES.values()):
            return folder
    raise MssarError(
        f"data.root: fashion-mnist data not found: searched {', '.join(map(str, searched))} for "
        f"{', '.join(FASHION_FILES.values())}; apt-get install dataset-fashion-mnist, or put the "
        f"four .gz files in {_root(spec)}"
    )


def _load_fashion_mnist(spec: DataSpec) -> tuple[Split, Split]:
    folder = _find_fashion_mnist(spec)
    splits = []
    for split in ("train", "test"):
        images = _read_idx(folder / FASHION_FILES[f"{split}_images"], IDX_IMAGES_MAGIC)
        labels = _read_idx(folder / FASHION_FILES[f"{split}_labels"], IDX_LABELS_MAGIC)
        if len(images) != len(labels):
            raise MssarError(f"{folder}: {split} has {len(images)} images but {len(labels)} labels")
        # 28x28 -> 32x32 with a 2-pixel black border (the images' own background is 0)
        images = F.pad(images.unsqueeze(1), (2, 2, 2, 2))
        splits.append((images, labels.to(torch.int64)))
    return splits[0], splits[1]


def _read_idx(path: Path, magic: int) -> Tensor:
    """An IDX file (LeCun's MNIST format): uint32 magic, uint32 dims (big-endian), uint8 data."""
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as err:
        raise MssarError(f"could not read {path}: {err}") from None
    ndim = magic - 2048
    header = 4 + 4 * ndim
    found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if found != magic or len(raw) < header:
        raise MssarError(f"{path} is not an IDX file with magic {magic} (found {found})")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) - header != math.prod(dims):
        raise MssarError(f"{path}: header says {dims} but holds {len(raw) - header} bytes of data")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(dims)


def _idx_count(path: Path) -> int:
    """The first dimension of an IDX file, from its header only."""
    try:
        with gzip.open(path, "rb") as handle:
            header = handle.read(8)
    except (OSError, EOFError) as err:
        raise MssarError(f"could not read {path}: {err}") from None
    return int.from_bytes(header[4:8], "big")


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
    patterns = _crop_flip(
        templates, labels, shifts[:, 0], shifts[:, 1], torch.zeros(size, dtype=torch.bool), 32
    )
    noise = torch.randn(size, 3, 32, 32, generator=rng)
    images = 128.0 + SYNTHETIC_CONTRAST * patterns + SYNTHETIC_NOISE * noise
    return images.round().clamp(0, 255).to(torch.uint8), labels.to(torch.int64)


# --------------------------------------------------------------------------------------------
# The device-resident loader
# --------------------------------------------------------------------------------------------


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
        self.epoch = 0
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

        if train:
            per_rank = self.total // world_size
            if per_rank % batch_size == 1:  # a lone last image would break BatchNorm's statistics
                per_rank -= 1
            self.num_samples = per_rank
        else:
            self.num_samples = len(range(rank, self.total, world_size))

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

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
        for start in range(0, self.num_samples, self.batch_size):
            index = order[start : start + self.batch_size]
            if self.augment:
                batch = _crop_flip(
                    self.images, index, offsets[start : start + self.batch_size, 0],
                    offsets[start : start + self.batch_size, 1],
                    flips[start : start + self.batch_size], self.image_size,
                )
            else:
                batch = self.images[index]
            batch = batch.to(torch.float32).mul_(self._scale).add_(self._shift)
            yield batch, self.labels[index]


def _crop_flip(
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


# --------------------------------------------------------------------------------------------
# ImageNet: ImageFolder + DataLoader, SENet-style augmentation
# --------------------------------------------------------------------------------------------


def _imagenet_folders(spec: DataSpec):
    from torchvision.datasets import ImageFolder

    root = _root(spec)
    hint = f"expected {root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG"
    folders = []
    for split in ("train", "val"):
        path = root / split
        if not path.is_dir():
            raise MssarError(f"data.root: imagenet data not found: searched {path} (no such directory); {hint}")
        try:
            folders.append(ImageFolder(str(path)))
        except (FileNotFoundError, OSError) as err:
            message = " ".join(str(err).split())
            raise MssarError(f"imagenet data under {path} is unusable ({message}); {hint}") from None
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
    train = T.Compose([
        T.RandomResizedCrop(IMAGENET_SIZE),  # scale 0.08..1, aspect ratio 3/4..4/3
        T.RandomHorizontalFlip(),
        T.RandomRotation(IMAGENET_ROTATION),
        T.ColorJitter(IMAGENET_JITTER, IMAGENET_JITTER, IMAGENET_JITTER),
        T.ToTensor(),
        normalise,
    ])
    test = T.Compose([
        T.Resize(IMAGENET_RESIZE), T.CenterCrop(IMAGENET_SIZE), T.ToTensor(), normalise,
    ])
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
        return (keys[i : i + size] for i in range(0, len(keys), size))

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
        self.epoch = 0
        self.total = len(dataset)
        if train:
            per_rank = self.total // world_size
            if per_rank % batch_size == 1:
                per_rank -= 1
            self.num_samples = per_rank
        else:
            self.num_samples = len(range(rank, self.total, world_size))
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

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

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


def _imagenet_loaders(spec, device, seed, rank, world_size):
    train_folder, val_folder = _imagenet_folders(spec)
    info = _info(spec, len(train_folder.classes), (len(train_folder), len(val_folder)))
    train_folder = _Subset(train_folder, _subset_indices(len(train_folder), spec.subset))
    val_folder = _Subset(val_folder, _subset_indices(len(val_folder), spec.test_subset))
    train_transform, test_transform = imagenet_transforms()
    if not spec.augment:
        train_transform = test_transform
    common = dict(seed=seed, rank=rank, world_size=world_size, workers=spec.workers, device=device)
    train = FolderLoader(
        _SeededImages(train_folder, train_transform), batch_size=spec.batch_size, train=True,
        **common,
    )
    test = FolderLoader(
        _SeededImages(val_folder, test_transform), batch_size=spec.eval_batch_size, train=False,
        **common,
    )
    _check_not_empty(spec, train, world_size)
    return train, test, info


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator behind epoch ``epoch`` of run seed ``seed`` (order and augmentation)."""
    return torch.Generator().manual_seed(seed * EPOCH_SEED_STRIDE + epoch)


def _subset_indices(size: int, subset: int | None) -> Tensor:
    """Sorted indices of a fixed random subset (SUBSET_SEED, whatever the run seed); all if None."""
    if subset is None:
        return torch.arange(size)
    rng = torch.Generator().manual_seed(SUBSET_SEED)
    return torch.randperm(size, generator=rng)[:subset].sort().values


def _info(spec: DataSpec, num_classes: int, sizes: tuple[int, int]) -> DatasetInfo:
    """DatasetInfo of ``spec`` given the full split sizes; checks the subsets fit."""
    used = []
    for size, subset, option, split in (
        (sizes[0], spec.subset, "subset", "training"),
        (sizes[1], spec.test_subset, "test_subset", "test"),
    ):
        if subset is not None and subset > size:
            raise MssarError(
                f"data.{option}={subset} but the {spec.dataset} {split} split has only {size} images"
            )
        used.append(size if subset is None else subset)
    channels = 1 if spec.dataset == "fashion-mnist" else 3
    image_size = IMAGENET_SIZE if spec.dataset == "imagenet" else 32
    return DatasetInfo(spec.dataset, num_classes, channels, image_size, used[0], used[1])


def _check_not_empty(spec: DataSpec, train, world_size: int) -> None:
    if len(train) == 0:
        raise MssarError(
            f"no training batch: {train.total} {spec.dataset} training images over {world_size} "
            f"rank(s) leave fewer than 2 per rank; raise data.subset"
        )


def _root(spec: DataSpec) -> Path:
    return Path(os.path.expanduser(os.fspath(spec.root))).absolute()


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MssarError(f"{name} must be a positive integer, got {value!r}")


def build_test_loader(spec: DataSpec, *, device: torch.device | str) -> tuple[Loader, DatasetInfo]:
    """The test loader alone (for ``mssar eval``): fixed order, no augmentation, one process."""
    _, test, info = build_loaders(spec, device=device, seed=0)
    return test, info
