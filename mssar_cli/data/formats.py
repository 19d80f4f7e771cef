"""On-disk formats of the small-image datasets (SPEC.md §6), read into CPU tensors.

The formats are the ones users already have:

- CIFAR: torchvision's layout ``ROOT/cifar-10-batches-py`` / ``ROOT/cifar-100-python``. The pickles
  are read here exactly as ``torchvision.datasets.CIFAR10/100`` reads them (same files, keys
  ``data`` and ``labels`` / ``fine_labels``) but without torchvision's md5 check of every file on
  every load, which would also reject any file that is not the original release. With
  ``data.download=true`` torchvision downloads, verifies (md5) and extracts them first.
- Fashion-MNIST: the four original gzip IDX files, searched in ``ROOT``, ``ROOT/fashion-mnist``,
  ``ROOT/FashionMNIST/raw`` (torchvision's download layout) and
  ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``). The 28x28 images
  are zero-padded to 32x32 so the CIFAR networks run unchanged.

Each split comes back as a :data:`Split`: ``(N, C, 32, 32)`` uint8 images and ``(N,)`` int64
labels. ``NORMALISATION`` holds every dataset's per-channel constants, ImageNet's and the
synthetic task's included, so that the table is in one place.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mssar_cli.errors import MssarError

if TYPE_CHECKING:
    from mssar_cli.recipe import DataSection

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

Split = tuple[Tensor, Tensor]  # (images uint8 N x C x H x W, labels int64 N)


def data_root(data: DataSection) -> Path:
    """``data.root`` as an absolute path (``~`` expanded, relative to the current directory)."""
    return Path(os.path.expanduser(os.fspath(data.root))).absolute()


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100: python pickles
# --------------------------------------------------------------------------------------------


def load_cifar(data: DataSection) -> tuple[Split, Split]:
    """CIFAR-10/100 from torchvision's on-disk layout (the python-pickle release)."""
    name = data.dataset
    root = data_root(data)
    folder = root / CIFAR_FOLDERS[name]
    train_files, test_files = CIFAR_FILES[name]
    if data.download:
        download_cifar(name, root)
    missing = [f for f in train_files + test_files if not (folder / f).is_file()]
    if missing:
        raise MssarError(
            f"data.root: {name} data not found: searched {folder} (missing {', '.join(missing)}); "
            f"pass --set data.download=true on a machine with internet, or put "
            f"{CIFAR_FOLDERS[name]} (extracted from {CIFAR_URLS[name]}) under {root}"
        )
    return read_cifar_pickles(folder, train_files), read_cifar_pickles(folder, test_files)


def read_cifar_pickles(folder: Path, files: Sequence[str]) -> Split:
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
        except (
            OSError,
            pickle.UnpicklingError,
            EOFError,
            KeyError,
            ValueError,
            AttributeError,
        ) as err:
            raise MssarError(
                f"could not read CIFAR batch {path}: {type(err).__name__}: {err}"
            ) from None
        if len(targets) != len(data):
            raise MssarError(f"CIFAR batch {path} has {len(data)} images but {len(targets)} labels")
        images.append(data)
        labels.extend(targets)
    return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64)


def download_cifar(name: str, root: Path) -> None:
    """torchvision's download into ``root``: fetch, md5 check, extract."""
    import torchvision

    datasets = torchvision.datasets
    dataset_class = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        dataset_class(str(root), train=True, download=True)
    except Exception as err:  # no network, disk full, bad archive: all end alike for the user
        message = " ".join(str(err).split()) or type(err).__name__
        raise MssarError(
            f"downloading {name} from {CIFAR_URLS[name]} into {root} failed ({message}); "
            f"download it on a machine with internet and put {CIFAR_FOLDERS[name]} under {root}"
        ) from None


# --------------------------------------------------------------------------------------------
# Fashion-MNIST: gzip IDX files
# --------------------------------------------------------------------------------------------


def fashion_mnist_dirs(data: DataSection) -> list[Path]:
    """Where the four files are looked for, in this order."""
    root = data_root(data)
    return [root, root / "fashion-mnist", root / "FashionMNIST" / "raw", FASHION_SYSTEM_DIR]


def find_fashion_mnist(data: DataSection) -> Path:
    """The first folder of :func:`fashion_mnist_dirs` that holds all four files."""
    searched = fashion_mnist_dirs(data)
    for folder in searched:
        if all((folder / file).is_file() for file in FASHION_FILES.values()):
            return folder
    raise MssarError(
        f"data.root: fashion-mnist data not found: searched {', '.join(map(str, searched))} for "
        f"{', '.join(FASHION_FILES.values())}; apt-get install dataset-fashion-mnist, or put the "
        f"four .gz files in {data_root(data)}"
    )


def load_fashion_mnist(data: DataSection) -> tuple[Split, Split]:
    folder = find_fashion_mnist(data)
    splits = []
    for split in ("train", "test"):
        images = read_idx(folder / FASHION_FILES[f"{split}_images"], IDX_IMAGES_MAGIC)
        labels = read_idx(folder / FASHION_FILES[f"{split}_labels"], IDX_LABELS_MAGIC)
        if len(images) != len(labels):
            raise MssarError(f"{folder}: {split} has {len(images)} images but {len(labels)} labels")
        # 28x28 -> 32x32 with a 2-pixel black border (the images' own background is 0)
        images = F.pad(images.unsqueeze(1), (2, 2, 2, 2))
        splits.append((images, labels.to(torch.int64)))
    return splits[0], splits[1]


def read_idx(path: Path, magic: int) -> Tensor:
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


def idx_count(path: Path) -> int:
    """The first dimension of an IDX file, from its header only."""
    try:
        with gzip.open(path, "rb") as handle:
            header = handle.read(8)
    except (OSError, EOFError) as err:
        raise MssarError(f"could not read {path}: {err}") from None
    return int.from_bytes(header[4:8], "big")
