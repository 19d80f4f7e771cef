"""Datasets: tiny files in the real on-disk formats (CIFAR pickles, Fashion-MNIST gzip IDX,
ImageNet ImageFolder JPEGs) read through ``build_loaders`` against torchvision's readers and the
written pixels, and the messages for missing or malformed data. The loaders' subsets,
determinism, sharding and augmentation are in test_loaders.py."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CPU, as_chw, collect, loaders, normalise, pickle_to, spec, write_cifar10

from mssar_cli import data
from mssar_cli.data import (
    FASHION_FILES,
    FASHION_SYSTEM_DIR,
    NORMALISATION,
    FolderLoader,
)
from mssar_cli.errors import MssarError

# --------------------------------------------------------------------------------------------
# Writers for the real formats
# --------------------------------------------------------------------------------------------


def write_cifar100(root: Path, train: int = 12, test: int = 7, seed: int = 1):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    out = []
    for name, n in (("train", train), ("test", test)):
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(20, 100, n).tolist()  # >= 20: never a coarse label (0..19)
        coarse = rng.integers(0, 20, n).tolist()
        pickle_to(
            folder / name,
            {
                "filenames": [],
                "batch_label": name,
                "fine_labels": fine,
                "coarse_labels": coarse,
                "data": x,
            },
        )
        out.append((as_chw(x), torch.tensor(fine)))
    pickle_to(
        folder / "meta",
        {
            "fine_label_names": [f"f{i}" for i in range(100)],
            "coarse_label_names": [f"c{i}" for i in range(20)],
        },
    )
    return out[0], out[1]


def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fashion(folder: Path, train: int = 20, test: int = 9, seed: int = 2):
    """The four gzip IDX files (magic 2051 images / 2049 labels, big-endian dims)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", train), ("test", test)):
        x = rng.integers(1, 256, (n, 28, 28), dtype=np.uint8)  # never 0: the border is the pad
        y = rng.integers(0, 10, n, dtype=np.uint8)
        with gzip.open(folder / FASHION_FILES[f"{split}_images"], "wb") as handle:
            handle.write(_idx_bytes(x, 2051))
        with gzip.open(folder / FASHION_FILES[f"{split}_labels"], "wb") as handle:
            handle.write(_idx_bytes(y, 2049))
        out[split] = (torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))
    return out["train"], out["test"]


WNIDS = ("n01440764", "n01443537", "n01484850")
COLOURS = ((200, 30, 60), (20, 180, 90), (90, 60, 220))  # one flat colour per class


def write_imagenet(root: Path, train: int = 4, val: int = 2) -> None:
    from PIL import Image

    for split, n in (("train", train), ("val", val)):
        for wnid, colour in zip(WNIDS, COLOURS):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(n):
                size = (40 + 8 * i, 48)  # not square, smaller than 224: resize and crop do work
                Image.new("RGB", size, colour).save(folder / f"{wnid}_{i}.JPEG", "JPEG", quality=95)


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100
# --------------------------------------------------------------------------------------------


def test_cifar10_reads_the_release_format_like_torchvision(cifar10, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    root, ((train_x, train_y), (test_x, test_y)) = cifar10
    # torchvision reads the same files (its md5 check would reject our tiny ones: switched off)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    for train, x, y in ((True, train_x, train_y), (False, test_x, test_y)):
        reference = tv_cifar.CIFAR10(str(root), train=train)
        assert torch.equal(torch.from_numpy(reference.data).permute(0, 3, 1, 2), x)
        assert reference.targets == y.tolist()

    train, test, info = loaders(
        spec("cifar10", root, batch_size=8, augment=False), device=CPU, seed=0
    )
    assert (info.num_classes, info.in_channels, info.image_size) == (10, 3, 32)
    assert (info.train_size, info.test_size) == (30, 5)
    assert (train.num_samples, len(train), test.num_samples, len(test)) == (30, 4, 5, 1)

    images, labels = next(iter(train))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and images.device.type == "cpu"

    # test split: fixed order, no augmentation, exactly (x / 255 - mean) / std
    images, labels = collect(test)
    torch.testing.assert_close(images, normalise(test_x, "cifar10"), rtol=0, atol=1e-5)
    assert torch.equal(labels, test_y)

    # train split without augmentation: the epoch's permutation of exactly the written images
    order = train.epoch_plan()[0]
    assert sorted(order.tolist()) == list(range(30))
    images, labels = collect(train)
    torch.testing.assert_close(images, normalise(train_x[order], "cifar10"), rtol=0, atol=1e-5)
    assert torch.equal(labels, train_y[order])


def test_cifar10_normalisation_is_roughly_standard(cifar10):
    root, _ = cifar10
    train, _, _ = loaders(spec("cifar10", root, batch_size=30, augment=False), device=CPU, seed=0)
    images, _ = collect(train)
    # uniform random pixels: mean 127.5 / 255 and std 73.9 / 255 per channel
    mean, std = NORMALISATION["cifar10"]
    expected_mean = (0.5 - torch.tensor(mean)) / torch.tensor(std)
    expected_std = (73.9 / 255) / torch.tensor(std)
    torch.testing.assert_close(images.mean(dim=(0, 2, 3)), expected_mean, rtol=0, atol=0.05)
    torch.testing.assert_close(images.std(dim=(0, 2, 3)), expected_std, rtol=0.05, atol=0)
    assert images.mean().abs() < 0.2 and 0.8 < images.std() < 1.4


def test_cifar100_uses_fine_labels(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    (_, train_y), (test_x, test_y) = write_cifar100(tmp_path)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    reference = tv_cifar.CIFAR100(str(tmp_path), train=True)
    assert reference.targets == train_y.tolist()

    train, test, info = loaders(spec("cifar100", tmp_path, batch_size=4), device=CPU, seed=3)
    assert (info.num_classes, info.in_channels, info.train_size, info.test_size) == (100, 3, 12, 7)
    images, labels = collect(test)
    torch.testing.assert_close(images, normalise(test_x, "cifar100"), rtol=0, atol=1e-5)
    assert torch.equal(labels, test_y)
    _, labels = collect(train)
    assert sorted(labels.tolist()) == sorted(train_y.tolist())
    assert labels.min() >= 20  # fine labels, not the coarse ones


def test_cifar_labels_out_of_range_are_a_user_error(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(tmp_path)
    pickle_to(folder / "test_batch", {"labels": [0, 10], "data": np.zeros((2, 3072), np.uint8)})
    with pytest.raises(MssarError, match=r"labels must be in \[0, 10\)"):
        loaders(spec("cifar10", tmp_path), device=CPU, seed=0)


def test_unreadable_cifar_batch_is_a_user_error(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(MssarError, match="data_batch_2"):
        loaders(spec("cifar10", tmp_path), device=CPU, seed=0)


# --------------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["", "fashion-mnist", "FashionMNIST/raw"])
def test_fashion_mnist_idx_files_are_padded_to_32(tmp_path, layout):
    (train_x, train_y), (test_x, test_y) = write_fashion(tmp_path / layout)
    train, test, info = loaders(
        spec("fashion-mnist", tmp_path, batch_size=8, augment=False), device=CPU, seed=0
    )
    # found our files, not the system copy
    assert (info.num_classes, info.in_channels, info.image_size) == (10, 1, 32)
    assert (info.train_size, info.test_size) == (20, 9)

    images, labels = collect(test)
    assert images.shape == (9, 1, 32, 32) and images.dtype == torch.float32
    assert torch.equal(labels, test_y) and labels.dtype == torch.int64
    # the 28x28 image in the middle, a 2-pixel border of black (grey level 0) around it
    torch.testing.assert_close(
        images[:, :, 2:30, 2:30], normalise(test_x[:, None], "fashion-mnist"), rtol=0, atol=1e-5
    )
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    mean, std = NORMALISATION["fashion-mnist"]
    torch.testing.assert_close(
        images[:, 0, border], torch.full((9, int(border.sum())), -mean[0] / std[0])
    )

    order = train.epoch_plan()[0]
    images, labels = collect(train)
    assert images.shape == (20, 1, 32, 32)
    torch.testing.assert_close(
        images[:, :, 2:30, 2:30],
        normalise(train_x[order][:, None], "fashion-mnist"),
        rtol=0,
        atol=1e-5,
    )
    assert torch.equal(labels, train_y[order])


def test_fashion_mnist_bad_magic_is_a_user_error(tmp_path):
    write_fashion(tmp_path)
    with gzip.open(tmp_path / FASHION_FILES["test_labels"], "wb") as handle:
        handle.write(_idx_bytes(np.zeros(9, np.uint8), 2051))  # an images magic on a labels file
    with pytest.raises(MssarError, match="magic 2049"):
        loaders(spec("fashion-mnist", tmp_path), device=CPU, seed=0)


@pytest.mark.skipif(
    not all((FASHION_SYSTEM_DIR / f).is_file() for f in FASHION_FILES.values()),
    reason=f"no Fashion-MNIST in {FASHION_SYSTEM_DIR} (apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_system_copy_loads(tmp_path):
    # an empty root: the search falls through to the Debian package's directory
    train, test, info = loaders(
        spec("fashion-mnist", tmp_path, batch_size=1000, eval_batch_size=10_000, augment=False),
        device=CPU,
        seed=0,
    )
    assert (info.train_size, info.test_size, info.num_classes, info.in_channels) == (
        60000,
        10000,
        10,
        1,
    )
    assert (train.num_samples, test.num_samples) == (60000, 10000)
    images, labels = next(iter(test))
    assert images.shape == (10000, 1, 32, 32)
    assert torch.equal(torch.bincount(labels, minlength=10), torch.full((10,), 1000))
    # the constants are the real data's: the unpadded 28x28 pixels standardise to ~0 / ~1
    inner = images[:, :, 2:30, 2:30]
    assert abs(inner.mean().item()) < 0.02 and abs(inner.std().item() - 1) < 0.02
    mean, std = NORMALISATION["fashion-mnist"]
    torch.testing.assert_close(
        images[:, :, :2, :], torch.full_like(images[:, :, :2, :], -mean[0] / std[0])
    )
    # the training labels: 6000 of each class
    assert torch.equal(torch.bincount(train.labels, minlength=10), torch.full((10,), 6000))


# --------------------------------------------------------------------------------------------
# ImageNet (ImageFolder)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def imagenet(tmp_path):
    write_imagenet(tmp_path)
    return tmp_path


def test_imagenet_folders_load(imagenet):
    s = spec("imagenet", imagenet, batch_size=4, eval_batch_size=4, workers=0)
    train, test, info = loaders(s, device=CPU, seed=0)
    assert isinstance(train, FolderLoader) and isinstance(test, FolderLoader)
    assert (info.num_classes, info.in_channels, info.image_size) == (3, 3, 224)
    assert (info.train_size, info.test_size) == (12, 6)
    assert (train.num_samples, len(train), test.num_samples, len(test)) == (12, 3, 6, 2)

    images, labels = next(iter(train))
    assert images.shape == (4, 3, 224, 224) and images.dtype == torch.float32
    assert labels.dtype == torch.int64
    _, labels = collect(train)
    assert sorted(labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4

    # test: fixed order (classes sorted by wnid), resize + centre crop of a flat colour
    images, labels = collect(test)
    assert images.shape == (6, 3, 224, 224)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    mean, std = NORMALISATION["imagenet"]
    for image, label in zip(images, labels):
        expected = (torch.tensor(COLOURS[label]) / 255 - torch.tensor(mean)) / torch.tensor(std)
        # RGB order and the ImageNet constants; JPEG moves a flat colour by a few grey levels
        torch.testing.assert_close(image.mean(dim=(1, 2)), expected, rtol=0, atol=0.06)
        assert (image - expected[:, None, None]).abs().max() < 0.15


def test_imagenet_subset_seeding_and_ranks(imagenet):
    s = spec(
        "imagenet", imagenet, batch_size=2, eval_batch_size=4, workers=0, subset=8, test_subset=3
    )
    train, test, info = loaders(s, device=CPU, seed=1)
    assert (info.train_size, info.test_size, train.num_samples, test.num_samples) == (8, 3, 8, 3)
    again, _, _ = loaders(s, device=CPU, seed=1)
    state = torch.get_rng_state()
    train.set_epoch(1)
    again.set_epoch(1)
    a, b = collect(train), collect(again)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(state, torch.get_rng_state())  # augmentation under a forked RNG
    again.set_epoch(2)
    assert not torch.equal(a[0], collect(again)[0])

    keys = []
    for r in (0, 1):
        shard, _, _ = loaders(s, device=CPU, seed=1, rank=r, world_size=2)
        shard.set_epoch(1)
        keys.append(shard.epoch_keys())
        assert shard.num_samples == 4 and sum(len(batch[1]) for batch in shard) == 4
    assert len(keys[0]) == len(keys[1]) == 4
    assert not {i for i, _ in keys[0]} & {i for i, _ in keys[1]}
    assert sorted(keys[0] + keys[1]) == sorted(train.epoch_keys())


def test_imagenet_class_folders_must_match(imagenet):
    (imagenet / "val" / "n09999999").mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32)).save(imagenet / "val" / "n09999999" / "x.JPEG")
    with pytest.raises(MssarError, match="class folders differ"):
        loaders(spec("imagenet", imagenet, workers=0), device=CPU, seed=0)


# --------------------------------------------------------------------------------------------
# Missing data: one MssarError naming every place searched
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "fashion-mnist", "imagenet"])
def test_missing_dataset_names_every_searched_path(tmp_path, monkeypatch, dataset):
    root = tmp_path / "empty"
    root.mkdir()
    nowhere = tmp_path / "no-system-copy"
    monkeypatch.setattr(data.formats, "FASHION_SYSTEM_DIR", nowhere)
    searched = {
        "cifar10": [root / "cifar-10-batches-py"],
        "cifar100": [root / "cifar-100-python"],
        "fashion-mnist": [root, root / "fashion-mnist", root / "FashionMNIST" / "raw", nowhere],
        "imagenet": [root / "train"],
    }[dataset]
    with pytest.raises(MssarError) as caught:
        loaders(spec(dataset, root, workers=0), device=CPU, seed=0)
    message = str(caught.value)
    assert "\n" not in message
    assert "not found" in message
    for path in searched:
        assert str(path) in message
    with pytest.raises(MssarError):
        data.dataset_info(spec(dataset, root, workers=0))


def test_missing_imagenet_val_is_named(imagenet):
    import shutil

    shutil.rmtree(imagenet / "val")
    with pytest.raises(MssarError, match=str(imagenet / "val")):
        loaders(spec("imagenet", imagenet, workers=0), device=CPU, seed=0)


def test_partial_cifar_names_the_missing_files(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(MssarError, match="missing data_batch_4, test_batch"):
        loaders(spec("cifar10", tmp_path), device=CPU, seed=0)
