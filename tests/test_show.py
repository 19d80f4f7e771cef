"""``mssar show``: the gates it records are the modules' own, its files, and its bad input.

Run directories here are written directly (a recipe and a checkpoint of a freshly built network
on the synthetic task), not trained: what is tested is what ``show`` reads and draws.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import assert_one_line_error
from typer.testing import CliRunner

from mssar_cli import runs
from mssar_cli.cli import app
from mssar_cli.gates import GATE, MEAN_OVER_SCALES, record_gates, spatial_asymmetry
from mssar_cli.models import create_model
from mssar_cli.recalibration import RECALIBRATIONS
from mssar_cli.recalibration.mssar import MSSAR
from mssar_cli.recalibration.zoo import ZooModule
from mssar_cli.recipe import from_dict, save
from mssar_cli.show import show

pytestmark = pytest.mark.usefixtures("one_thread")


def write_run(
    folder: Path,
    recalibration: str,
    model: str = "resnet20",
    dataset: str = "synthetic",
    **options,
) -> Path:
    """A run directory with a recipe and a checkpoint of an untrained network (seeded)."""
    raw = {
        "experiment": f"show_{recalibration}",
        "model": {"name": model, "recalibration": recalibration, **options},
        "data": {"dataset": dataset, "subset": 64, "test_subset": 16, "batch_size": 8},
        "optim": {"epochs": 1, "milestones": []},
    }
    recipe = from_dict(raw, "test")
    torch.manual_seed(0)
    network = create_model(model, num_classes=10, recalibration=recalibration, **options)
    folder.mkdir(parents=True)
    save(recipe, folder / runs.RECIPE)
    runs.save_checkpoint(
        folder, {"epoch": 1, "model": network.state_dict(), "recipe": recipe.to_dict()}
    )
    return folder


def invoke(*args):
    return CliRunner().invoke(app, ["show", *map(str, args)])


def randomised(module: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BN statistics and affine parameters, so the gates vary over positions."""
    generator = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.5, generator=generator)
            m.running_var.uniform_(0.5, 2, generator=generator)
            m.weight.data.normal_(1, 0.5, generator=generator)
    return module.eval()


# --- the gates are what the modules multiply by ---------------------------------------------


@pytest.mark.parametrize("strategy", ["regional", "sliding"])
@pytest.mark.parametrize("source_channels", [None, 24])
def test_mssar_scale_weights_average_to_the_weights_it_applies(strategy, source_channels):
    module = MSSAR(12, (1, 2, 4), strategy, source_channels=source_channels, hidden_channels=4)
    module = randomised(module)
    x = torch.randn(3, 12, 9, 10)
    source = None if source_channels is None else torch.randn(3, source_channels, 9, 10)
    per_scale = module.scale_weights(x if source is None else source)
    assert [tuple(z.shape) for z in per_scale] == [(3, 12, 9, 10)] * 3
    torch.testing.assert_close(x * (sum(per_scale) / 3), module(x, source))
    # K = 1 gives every position one weight: no spatial asymmetry, by construction
    assert spatial_asymmetry(per_scale[0]) < 1e-6
    assert spatial_asymmetry(per_scale[2]) > 0


@pytest.mark.parametrize("name", ["cbam", "coord", "ge"])
def test_zoo_spatial_gate_is_what_the_module_multiplies_by(name):
    network = randomised(create_model("resnet20", recalibration=name))
    module = next(m for m in network.modules() if isinstance(m, ZooModule))
    x = torch.randn(2, module.channels, 16, 16)
    gate = module.spatial_gate(x)
    # CBAM's spatial gate multiplies the channel-refined map (channel attention first, Eq. 1)
    gated = module.body.channel(x) if name == "cbam" else x
    torch.testing.assert_close(gated * gate, module(x))
    assert gate.shape[0] == 2 and gate.shape[2:] == (16, 16)


def test_registry_spatial_flag_matches_the_modules():
    for name, entry in RECALIBRATIONS.items():
        if name == "none":
            continue
        options = {k: 4 if k == "reduction" and v is None else v for k, v in entry.options.items()}
        module = entry.build(16, **options)
        has_gate = isinstance(module, MSSAR) or (
            isinstance(module, ZooModule)
            and type(module).spatial_gate is not ZooModule.spatial_gate
        )
        assert has_gate == entry.spatial, name


def test_record_gates_groups_a_resnet_into_its_three_stages():
    network = randomised(create_model("resnet20", recalibration="mssar"))
    stages, logits = record_gates(network, torch.randn(4, 3, 32, 32), channels=2)
    assert logits.shape == (4, 10)
    assert [(s.index, s.size, len(s.modules)) for s in stages] == [
        (1, (32, 32), 3),
        (2, (16, 16), 3),
        (3, (8, 8), 3),
    ]
    gates = stages[2].modules[-1]
    assert gates.name == "layer3.2.recalibration"
    assert list(gates.panels) == ["K=1", "K=2", "K=4", MEAN_OVER_SCALES]
    assert gates.panels["K=2"].shape == (4, 8, 8) and gates.channel_maps.shape == (4, 2, 8, 8)
    assert stages[0].asymmetry()["K=1"] == 0 and stages[0].asymmetry()["K=4"] > 0
    # the hooks are gone afterwards
    assert not any(m._forward_pre_hooks for m in network.modules())


def test_record_gates_in_a_multi_stage_densenet_uses_the_layer_input():
    network = randomised(create_model("densenet100", recalibration="mssar"))
    stages, _ = record_gates(network, torch.randn(2, 3, 32, 32))
    assert [len(s.modules) for s in stages] == [16, 16, 16]
    assert stages[0].modules[0].panels[MEAN_OVER_SCALES].shape == (2, 32, 32)


# --- the command -----------------------------------------------------------------------------


def test_show_writes_a_grid_per_stage_and_the_asymmetry_summary(tmp_path):
    run = write_run(tmp_path / "run", "mssar")
    result = invoke(run, "--images", 3, "--channels", 2)
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in (run / "show").iterdir())
    assert files == ["asymmetry.csv", "asymmetry.png", "stage1.png", "stage2.png", "stage3.png"]
    for name in files:
        if name.endswith(".png"):
            assert (run / "show" / name).read_bytes()[:4] == b"\x89PNG"
    table = pd.read_csv(run / "show" / "asymmetry.csv")
    assert list(table.columns) == ["stage", "map", "blocks", "gate", "asymmetry"]
    assert set(table.gate) == {"K=1", "K=2", "K=4", MEAN_OVER_SCALES}
    assert (table[table.gate == "K=1"].asymmetry == 0).all()
    assert "spatial asymmetry" in result.stdout and "stage3.png" in result.stdout


def test_show_draws_a_zoo_module_gate_into_output(tmp_path):
    run = write_run(tmp_path / "run", "cbam")
    out = tmp_path / "pictures" / "cbam"
    result = invoke(run, "--images", 2, "--output", out, "--block", 0)
    assert result.exit_code == 0, result.output
    assert (out / "stage1.png").exists() and not (run / "show").exists()
    assert set(pd.read_csv(out / "asymmetry.csv").gate) == {GATE}


@pytest.mark.parametrize("name", ["se", "eca", "gc"])
def test_show_on_a_spatially_constant_gate_says_so_and_writes_nothing(tmp_path, name):
    run = write_run(tmp_path / "run", name)
    result = invoke(run)
    assert result.exit_code == 0, result.output
    assert "spatially constant" in result.stdout and "nothing written" in result.stdout
    assert not (run / "show").exists()


def test_show_of_a_plain_network_is_one_line(tmp_path):
    run = write_run(tmp_path / "run", "none")
    assert_one_line_error(invoke(run), "plain resnet20", "no gates")
    assert not (run / "show").exists()


def test_show_without_a_checkpoint_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(invoke(tmp_path / "empty"), "has no checkpoint.pt")
    assert list((tmp_path / "empty").iterdir()) == []


def test_show_with_a_checkpoint_of_another_network_is_one_line(tmp_path):
    run = write_run(tmp_path / "run", "mssar")
    other = write_run(tmp_path / "other", "mssar", model="resnet32")
    line = assert_one_line_error(
        invoke(run, "--checkpoint", other / runs.CHECKPOINT), "not a checkpoint of", "resnet32"
    )
    assert "model.name" in line
    assert not (run / "show").exists() and not (other / "show").exists()


def test_show_with_a_block_a_stage_lacks_is_one_line_and_writes_nothing(tmp_path):
    run = write_run(tmp_path / "run", "mssar")
    assert_one_line_error(invoke(run, "--block", 3), "--block 3", "stage 1 has 3 blocks")
    assert not (run / "show").exists()


def test_show_with_more_images_than_the_test_split_is_one_line(tmp_path):
    run = write_run(tmp_path / "run", "mssar")
    assert_one_line_error(invoke(run, "--images", 17), "--images 17", "16 images")
    assert not (run / "show").exists()


def test_show_refuses_an_output_that_is_a_file(tmp_path):
    run = write_run(tmp_path / "run", "mssar")
    (tmp_path / "taken").write_text("x")
    assert_one_line_error(invoke(run, "--images", 1, "--output", tmp_path / "taken"), "is a file")
    assert (tmp_path / "taken").read_text() == "x"


def test_show_with_a_checkpoint_of_another_dataset_is_one_line(tmp_path):
    # same layers, but another task: its input channels, classes and gates are not the run's
    run = write_run(tmp_path / "run", "mssar")
    other = write_run(tmp_path / "other", "mssar", dataset="cifar10")
    line = assert_one_line_error(
        invoke(run, "--checkpoint", other / runs.CHECKPOINT), "not a checkpoint of"
    )
    assert "data.dataset" in line
    assert not (run / "show").exists() and not (other / "show").exists()


def test_show_with_checkpoint_writes_into_the_run_directory(tmp_path):
    # --output's default is RUN_DIR/show, as its help says, not the other checkpoint's folder
    run = write_run(tmp_path / "run", "mssar")
    other = write_run(tmp_path / "other", "mssar")
    result = invoke(run, "--images", 1, "--checkpoint", other / runs.CHECKPOINT)
    assert result.exit_code == 0, result.output
    assert (run / "show" / "stage1.png").exists() and not (other / "show").exists()


def test_show_with_weights_of_another_layout_names_the_keys(tmp_path):
    # a state_dict saved from a wrapper (DDP's "module." prefix) does not fit: say which keys
    run = write_run(tmp_path / "run", "mssar")
    state = runs.load_checkpoint(run / runs.CHECKPOINT)
    state["model"] = {f"module.{k}": v for k, v in state["model"].items()}
    runs.save_checkpoint(run, state)
    line = assert_one_line_error(invoke(run, "--images", 1), "do not fit", "Missing key(s)")
    assert "conv1.weight" in line
    assert not (run / "show").exists()


def test_show_into_an_output_under_a_file_is_one_line_before_any_work(tmp_path, monkeypatch):
    run = write_run(tmp_path / "run", "mssar")
    (tmp_path / "taken").write_text("x")

    def no_data(*args, **kwargs):
        raise AssertionError("the test split was loaded before --output was checked")

    monkeypatch.setattr("mssar_cli.data.build_test_loader", no_data)
    out = tmp_path / "taken" / "figures"
    assert_one_line_error(invoke(run, "--output", out), "--output", "is a file")
    assert (tmp_path / "taken").read_text() == "x"


def test_show_that_cannot_write_every_file_leaves_the_previous_ones(tmp_path, monkeypatch):
    # a full disk at the third file: the first two are not replaced, no temporary file is left
    run = write_run(tmp_path / "run", "mssar")
    out = tmp_path / "figures"
    out.mkdir()
    (out / "stage1.png").write_bytes(b"old")
    synced = []
    fsync = os.fsync

    def full_disk(fd):
        synced.append(fd)
        if len(synced) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    assert_one_line_error(invoke(run, "--images", 1, "--output", out), "--output", "No space left")
    assert [p.name for p in out.iterdir()] == ["stage1.png"]
    assert (out / "stage1.png").read_bytes() == b"old"


def test_show_that_cannot_write_removes_the_folders_it_made(tmp_path, monkeypatch):
    run = write_run(tmp_path / "run", "mssar")

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(os, "replace", refused)
    out = tmp_path / "new" / "figures"
    assert_one_line_error(invoke(run, "--images", 1, "--output", out), "Permission denied")
    assert not (tmp_path / "new").exists()


def test_show_gathers_more_images_than_one_test_batch(tmp_path):
    run = write_run(tmp_path / "run", "mssar")
    batched = show(run, images=6, output=tmp_path / "a", overrides=["data.eval_batch_size=4"])
    whole = show(run, images=6, output=tmp_path / "b")
    for ours, theirs in zip(batched.stages, whole.stages):
        gates = ours.modules[-1].panels[MEAN_OVER_SCALES]
        assert gates.shape == (6, *ours.size)
        torch.testing.assert_close(gates, theirs.modules[-1].panels[MEAN_OVER_SCALES])


def test_show_title_says_a_stopped_run_trained_part_of_an_epoch(tmp_path):
    run = write_run(tmp_path / "run", "se")  # SE: the title without rendering anything
    state = runs.load_checkpoint(run / runs.CHECKPOINT)
    state["partial"] = {"epoch": 1, "batches": 5, "totals": (0.0, 0.0, 0.0), "seconds": 1.0}
    runs.save_checkpoint(run, state)
    assert show(run).title.endswith("epoch 1 and 5 batches")


def test_show_checks_its_options_also_where_there_is_nothing_to_draw(tmp_path):
    run = write_run(tmp_path / "run", "se")
    assert_one_line_error(invoke(run, "--images", 0), "--images must be at least 1")
