"""Loaders: subsets, determinism, sharding between ranks and the paper's augmentation against a
per-image reference, on the device-resident loader (tiny CIFAR-10 files from the ``cifar10``
fixture, and the synthetic task); the loader contract, and the recipe's data section as the
loaders' only schema."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import CPU, collect, loaders, normalise, spec

from mssar_cli import data
from mssar_cli.data import DeviceLoader, build_loaders, build_test_loader
from mssar_cli.engine import per_rank_batch_size
from mssar_cli.errors import MssarError
from mssar_cli.recipe import DataSection, RecipeError, from_dict

# --------------------------------------------------------------------------------------------
# Subsets, determinism, sharding, augmentation (the device-resident loader)
# --------------------------------------------------------------------------------------------


def test_subset_and_test_subset_sizes(cifar10):
    root, _ = cifar10
    s = spec("cifar10", root, batch_size=8, subset=17, test_subset=3)
    train, test, info = loaders(s, device=CPU, seed=0)
    assert (info.train_size, info.test_size) == (17, 3)
    # 17 = 2 x 8 + 1: a last batch of one image is dropped (BatchNorm cannot train on it)
    assert (train.num_samples, len(train)) == (16, 2)
    assert (test.num_samples, len(test)) == (3, 1)
    assert sum(len(b[1]) for b in train) == 16 and sum(len(b[1]) for b in test) == 3
    # the subset is fixed by its own seed: the same images for every run seed
    other, _, _ = loaders(s, device=CPU, seed=5)
    assert torch.equal(train.images, other.images)
    full, _, _ = loaders(spec("cifar10", root, batch_size=8, subset=18), device=CPU, seed=0)
    assert (full.num_samples, len(full)) == (18, 3)
    with pytest.raises(MssarError, match="only 30 images"):
        loaders(spec("cifar10", root, subset=31), device=CPU, seed=0)
    test_only, info = build_test_loader(spec("cifar10", root, test_subset=4), device=CPU)
    assert test_only.num_samples == 4 and info.test_size == 4


def test_same_seed_and_epoch_give_the_same_batches(cifar10):
    root, _ = cifar10
    s = spec("cifar10", root, batch_size=8)
    first, _, _ = loaders(s, device=CPU, seed=1)
    second, _, _ = loaders(s, device=CPU, seed=1)
    for epoch in range(3):  # `first` has lived through epochs 0 and 1; `second` jumps to 2
        first.set_epoch(epoch)
        a = collect(first)
    second.set_epoch(2)
    b = collect(second)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

    second.set_epoch(3)
    c = collect(second)
    assert not torch.equal(a[0], c[0])
    other_seed, _, _ = loaders(s, device=CPU, seed=2)
    other_seed.set_epoch(2)
    assert not torch.equal(a[0], collect(other_seed)[0])


def test_loaders_do_not_touch_the_global_rng(cifar10):
    root, _ = cifar10
    train, test, _ = loaders(spec("cifar10", root, batch_size=8), device=CPU, seed=0)
    state = torch.get_rng_state()
    collect(train)
    collect(test)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize(("subset", "per_rank"), [(30, 15), (27, 12)])  # 13 = 3 x 4 + 1: drop one
def test_two_ranks_partition_the_training_epoch(cifar10, subset, per_rank):
    root, _ = cifar10
    s = spec("cifar10", root, batch_size=4, subset=subset)
    single, single_test, _ = loaders(s, device=CPU, seed=7)
    ranks = [loaders(s, device=CPU, seed=7, rank=r, world_size=2) for r in (0, 1)]
    for epoch in (0, 4):
        single.set_epoch(epoch)
        plans = []
        for train, _, _ in ranks:
            train.set_epoch(epoch)
            plans.append(train.epoch_plan())
        order0, order1 = plans[0][0], plans[1][0]
        assert (
            len(order0)
            == len(order1)
            == ranks[0][0].num_samples
            == ranks[1][0].num_samples
            == per_rank
        )
        assert not set(order0.tolist()) & set(order1.tolist())  # disjoint
        # the same draws as the single process, dealt out r::2
        s_order, s_offsets, s_flips = single.epoch_plan()
        for r, (order, offsets, flips) in enumerate(plans):
            n = len(order)
            assert torch.equal(order, s_order[r : r + 2 * n : 2])
            assert torch.equal(offsets, s_offsets[r : r + 2 * n : 2])
            assert torch.equal(flips, s_flips[r : r + 2 * n : 2])
        # and the images actually yielded are the planned ones, disjoint between ranks
        labels = [collect(train)[1] for train, _, _ in ranks]
        assert len(labels[0]) == len(labels[1]) == per_rank
    # test shards: r::2, together every test image once
    shards = [collect(test)[1] for _, test, _ in ranks]
    assert len(shards[0]) + len(shards[1]) == single_test.num_samples == 5
    assert torch.equal(torch.cat(shards).sort().values, collect(single_test)[1].sort().values)
    with pytest.raises(MssarError, match="rank"):
        loaders(s, device=CPU, seed=0, rank=2, world_size=2)


def test_augmentation_is_pad4_crop_and_flip_per_image(cifar10):
    root, ((train_x, train_y), _) = cifar10
    train, _, _ = loaders(spec("cifar10", root, batch_size=8, augment=True), device=CPU, seed=4)
    train.set_epoch(2)
    order, offsets, flips = train.epoch_plan()
    images, labels = collect(train)
    assert images.shape == (30, 3, 32, 32)
    # the draws exercise every case
    assert flips.any() and (~flips).any()
    assert (offsets != 4).any()  # some crops off centre
    assert offsets.min() >= 0 and offsets.max() <= 8
    for i in range(30):
        padded = F.pad(train_x[order[i]], (4, 4, 4, 4))
        dy, dx = offsets[i].tolist()
        crop = padded[:, dy : dy + 32, dx : dx + 32]
        if flips[i]:
            crop = crop.flip(-1)
        torch.testing.assert_close(
            images[i], normalise(crop[None], "cifar10")[0], rtol=0, atol=1e-5
        )
        assert labels[i] == train_y[order[i]]


def test_augmentation_draws_are_uniform_crops_and_fair_flips():
    loader, _, _ = loaders(DataSection("synthetic", batch_size=64), device=CPU, seed=0)
    counts_flip, counts_offset = [], torch.zeros(9)
    for epoch in range(4):
        loader.set_epoch(epoch)
        _, offsets, flips = loader.epoch_plan()
        counts_flip.append(flips.float().mean().item())
        counts_offset += torch.bincount(offsets.flatten(), minlength=9)
    assert all(0.45 < f < 0.55 for f in counts_flip)
    share = counts_offset / counts_offset.sum()
    assert share.min() > 0.09 and share.max() < 0.13  # 1/9 each


def test_no_augmentation_at_test_time_or_when_off(cifar10):
    root, (_, (test_x, _)) = cifar10
    train, test, _ = loaders(spec("cifar10", root, batch_size=8, augment=False), device=CPU, seed=0)
    _, offsets, flips = train.epoch_plan()
    assert offsets is None and flips is None
    test.set_epoch(3)
    torch.testing.assert_close(collect(test)[0], normalise(test_x, "cifar10"), rtol=0, atol=1e-5)


def test_synthetic_task_is_the_same_for_every_seed():
    s = DataSection("synthetic", subset=64, test_subset=32)
    a, at, info = loaders(s, device=CPU, seed=0)
    b, bt, _ = loaders(s, device=CPU, seed=9)
    assert (info.num_classes, info.in_channels, info.train_size, info.test_size) == (10, 3, 64, 32)
    assert torch.equal(a.images, b.images) and torch.equal(collect(at)[0], collect(bt)[0])
    images = collect(at)[0]
    assert abs(images.mean().item()) < 0.2 and 0.7 < images.std().item() < 1.3


def test_device_loader_contract():
    loader, _, _ = loaders(DataSection("synthetic", subset=100, batch_size=32), device=CPU, seed=0)
    assert isinstance(loader, DeviceLoader) and isinstance(loader, data.Loader)
    assert (loader.num_samples, len(loader)) == (100, 4)
    assert [len(b[1]) for b in loader] == [32, 32, 32, 4]


# --------------------------------------------------------------------------------------------
# The recipe's data section is the only schema: its loader refuses what the data never sees
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("dataset", "mnist", "data.dataset: expected one of cifar10 | cifar100 | imagenet"),
        ("batch_size", 0, "data.batch_size: expected a value > 0, got 0"),
        ("batch_size", True, "data.batch_size: expected an integer, got True"),
        ("eval_batch_size", -8, "data.eval_batch_size: expected a value > 0, got -8"),
        ("subset", 0, "data.subset: expected a value > 0, got 0"),
        ("test_subset", 2.5, "data.test_subset: expected an integer or null, got 2.5"),
        ("workers", -1, "data.workers: expected a value >= 0, got -1"),
        ("workers", False, "data.workers: expected an integer, got False"),
    ],
)
def test_recipe_refuses_bad_data_values_in_one_line(key, value, expected):
    with pytest.raises(RecipeError) as caught:
        from_dict({"experiment": "bad", "data": {key: value}}, "bad.yaml")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"bad.yaml: {expected}")


def test_the_engine_gives_each_rank_its_share_of_the_batch():
    recipe = from_dict({"experiment": "x", "data": {"batch_size": 12, "subset": 96}}, "x.yaml")
    assert [per_rank_batch_size(recipe, n) for n in (1, 2, 3, 4)] == [12, 6, 4, 3]
    with pytest.raises(
        MssarError, match=r"^x\.yaml: data\.batch_size: 12 is not divisible by the 5 processes$"
    ):
        per_rank_batch_size(recipe, 5)
    # the loaders take the per-rank batch, not the recipe's global one
    train, test, _ = build_loaders(
        recipe.data, batch_size=6, device=CPU, seed=0, rank=1, world_size=2
    )
    assert (train.batch_size, train.num_samples, len(train)) == (6, 48, 8)
    assert test.batch_size == recipe.data.eval_batch_size
