"""``mssar count`` (and the top-level help) through Typer's CliRunner: the tables it prints in
each format, the paper's Tables 2 and 5 beside ours, and one-line errors with exit code 2.

Oracles: the paper's numbers (``mssar_cli.paper``), the closed-form MS-SAR parameter count of
SPEC.md §1 and torchvision's parameter counts.
"""

from __future__ import annotations

import io
import re

import pandas as pd
import pytest
from helpers import assert_one_line_error
from typer.testing import CliRunner

from mssar_cli import paper
from mssar_cli.cli import app
from mssar_cli.errors import ModelError
from mssar_cli.models import list_models, model_spec

ANSI = re.compile(r"\x1b\[[0-9;]*m")
RESNET20_PARAMS, RESNET20_FLOPS = 272_474, 40_813_194
PROJECTION_PARAMS = 2_752  # CIFAR ResNets' 1x1 projection shortcuts, not in the paper's params
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnext50": 25_028_904,
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, *args: str):
    return runner.invoke(app, list(args))


def plain(text: str) -> str:
    return ANSI.sub("", text)


def csv_frame(text: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(text), keep_default_na=False)


def mssar_extra_params(channels_per_block: list[int], num_scales: int, reduction: int = 3) -> int:
    """2·L·D·D' + L·(2D' + D) per block, D' = max(1, D // (reduction · L)) (SPEC.md §1)."""
    total = 0
    for d in channels_per_block:
        hidden = max(1, d // (reduction * num_scales))
        total += 2 * num_scales * d * hidden + num_scales * (2 * hidden + d)
    return total


RESNET20_BLOCKS = [16] * 3 + [32] * 3 + [64] * 3


# --- success paths ------------------------------------------------------------------------------


def test_help_lists_the_commands(runner):
    result = invoke(runner, "--help")
    assert result.exit_code == 0
    text = plain(result.stdout)
    for command in ("train", "eval", "ablate", "count", "report"):
        assert re.search(rf"\b{command}\b", text), command


def test_count_rich_table(runner):
    result = invoke(runner, "count", "resnet20")  # default recalibration: mssar
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    text = plain(result.stdout)
    assert "resnet20: parameters and FLOPs" in text
    for column in ("model", "recalibration", "params", "flops", "extra_params_pct"):
        assert column in text
    rows = [line for line in text.splitlines() if "resnet20 " in line and "│" in line]
    assert len(rows) == 2
    none_row, mssar_row = rows
    assert " none " in none_row and "0.272M" in none_row and "40.81M" in none_row
    assert " mssar " in mssar_row
    extra = mssar_extra_params(RESNET20_BLOCKS, 3)
    assert f"{(RESNET20_PARAMS + extra) / 1e6:.3f}M" in mssar_row  # 0.284M


def test_count_csv_with_options(runner):
    result = invoke(
        runner, "count", "resnet20", "--recalibration", "mssar", "--scales", "1,2",
        "--strategy", "sliding", "--format", "csv",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    frame = csv_frame(result.stdout)
    assert {"model", "recalibration", "params", "flops"} <= set(frame.columns)
    assert len(frame) == 2
    assert list(frame["model"]) == ["resnet20", "resnet20"]
    assert list(frame["recalibration"]) == ["none", "mssar"]
    base, ours = frame.iloc[0], frame.iloc[1]
    assert base["params"] == RESNET20_PARAMS and base["flops"] == RESNET20_FLOPS
    assert ours["params"] == RESNET20_PARAMS + mssar_extra_params(RESNET20_BLOCKS, 2)
    assert ours["params"] > base["params"]
    assert "scales={1,2}" in ours["options"] and "strategy=sliding" in ours["options"]
    # sliding, counted in the direct form (paper §3.5: 2 L W H D D'): every scale's MLP, K = 1's
    # too, at every position of every block's map, plus b2 (D per position)
    maps = ((16, 32 * 32), (32, 16 * 16), (64, 8 * 8))
    extra = sum(3 * 2 * hw * (2 * d * max(1, d // 6) + d) for d, hw in maps)
    assert ours["flops"] - base["flops"] == extra
    assert ours["extra_params_pct"] == pytest.approx(
        100 * (ours["params"] - base["params"]) / base["params"], abs=0.01
    )
    assert base["extra_params_pct"] == 0 and base["extra_flops_pct"] == 0


def test_count_markdown(runner):
    result = invoke(runner, "count", "resnet20", "--recalibration", "se", "--format", "markdown")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 4
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[:5] == ["model", "recalibration", "options", "params", "flops"]
    assert lines[1] == "|" + "|".join(["---"] * len(header)) + "|"
    none_row, se_row = ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])
    assert none_row[:2] == ["resnet20", "none"] and none_row[3:5] == ["0.272M", "40.81M"]
    assert se_row[:2] == ["resnet20", "se"]
    assert float(se_row[3].rstrip("M")) > 0.272


def test_count_list(runner):
    result = invoke(runner, "count", "--list")
    assert result.exit_code == 0, result.output
    lines = plain(result.stdout).strip().splitlines()
    assert [line.split()[0] for line in lines] == list_models()
    for line, name in zip(lines, list_models()):
        spec = model_spec(name)
        assert spec.label in line and f"{spec.input_size}x{spec.input_size}" in line


def test_count_resnet50_with_a_later_module(runner):
    """ResNet-50 (not in the paper) counts as torchvision's metadata says (parameters, 4.089 G
    MACs); SE at reduction 16 adds 2·C·C/16 + C/16 + C per bottleneck."""
    from torchvision.models import ResNet50_Weights

    meta = ResNet50_Weights.IMAGENET1K_V1.meta
    result = invoke(runner, "count", "resnet50", "--recalibration", "se", "--format", "csv")
    assert result.exit_code == 0, result.output
    frame = csv_frame(result.stdout)
    assert list(frame["recalibration"]) == ["none", "se"]
    base, se = frame.iloc[0], frame.iloc[1]
    assert base["params"] == meta["num_params"] == TORCHVISION_PARAMS["resnet50"]
    assert round(base["flops"] / 1e9, 3) == meta["_ops"]  # 4.089 GFLOPS (multiply-adds)
    widths = [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3
    assert se["params"] - base["params"] == sum(2 * c * c // 16 + c // 16 + c for c in widths)
    assert se["params"] == 28_088_024 and 0 < se["extra_flops_pct"] < 0.1


# --- the paper's Tables 2 and 5 -----------------------------------------------------------------


@pytest.fixture(scope="module")
def paper_frame(runner) -> pd.DataFrame:
    result = invoke(runner, "count", "--paper", "--format", "csv")
    assert result.exit_code == 0, result.output
    return csv_frame(result.stdout)


def test_paper_every_row_present(paper_frame):
    rows = paper.PAPER_COST_ROWS
    assert len(paper_frame) == len(rows) == 19
    assert list(paper_frame["network"]) == [row.label for row in rows]
    assert list(paper_frame["table"].astype(str)) == [row.table for row in rows]
    assert list(paper_frame["params_paper"]) == [int(row.params) for row in rows]
    assert list(paper_frame["flops_paper"]) == [int(row.flops) for row in rows]
    for column in ("params", "params_acc", "params_match", "flops", "flops_acc", "flops_match"):
        assert column in paper_frame.columns


def test_paper_cifar_resnets_match(paper_frame):
    cifar = paper_frame[paper_frame["network"].str.startswith("RN-")]
    assert len(cifar) == 6
    for _, row in cifar.iterrows():
        assert row["params_acc"] == row["params"] - PROJECTION_PARAMS
        assert round(row["params_acc"] / 1e6, 2) == round(row["params_paper"] / 1e6, 2), row[
            "network"
        ]
        assert abs(row["flops_acc"] - row["flops_paper"]) <= 0.005 * row["flops_paper"], row[
            "network"
        ]
        assert row["flops_acc"] == row["flops"]
        assert str(row["params_match"]) == "True"
        assert str(row["flops_match"]) == "True"
    rn20 = cifar[cifar["network"] == "RN-20"].iloc[0]
    assert rn20["params"] == RESNET20_PARAMS and rn20["flops"] == RESNET20_FLOPS


def test_paper_costs_are_consistent(paper_frame):
    by_label = paper_frame.set_index("network")
    for row in paper.PAPER_COST_ROWS:
        ours = by_label.loc[row.label]
        if row.recalibration == "none":
            assert ours["extra_params_pct"] == 0 and ours["extra_flops_pct"] == 0
        else:
            assert ours["extra_params_pct"] > 0 and ours["extra_flops_pct"] > 0
    # DenseNet FLOPs counted as the paper counts (no transition convs) are within 0.5 %
    for label in ("DN-100", "DN-100*", "DN-190", "DN-190*"):
        ours = by_label.loc[label]
        assert ours["flops_acc"] < ours["flops"]
        assert abs(ours["flops_acc"] - ours["flops_paper"]) <= 0.005 * ours["flops_paper"]
    for label, name in (
        ("ResNet-18", "resnet18"),
        ("ResNet-34", "resnet34"),
        ("ResNeXt-50", "resnext50"),
    ):
        assert by_label.loc[label, "params"] == TORCHVISION_PARAMS[name]


# --- errors: one line on stderr, exit code 2 ----------------------------------------------------


def test_unknown_model(runner):
    result = invoke(runner, "count", "resnet21")
    assert_one_line_error(result, "resnet21", *list_models())


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--scales", "0"], ["positive"]),
        (["--scales", "a,b"], ["--scales", "a,b"]),
        (["--scales", "1,1"], ["distinct"]),
        (["--format", "html"], ["html", "rich", "csv", "markdown", "latex"]),
        (["--strategy", "diagonal"], ["regional", "sliding"]),
        (["--recalibration", "cbma"], ["none", "se", "mssar", "did you mean 'cbam'?"]),
        (["--recalibration", "none", "--scales", "1,2"], ["'none'", "'scales'"]),
        (["--recalibration", "se", "--scales", "1,2"], ["'se'", "'scales'", "reduction"]),
        (["--recalibration", "se", "--strategy", "sliding"], ["'se'", "'strategy'"]),
        (["--reduction", "0"], ["reduction", "positive"]),
        (["--reduction", "nan"], ["reduction", "positive"]),
        (["--stage", "single"], ["DenseNets"]),
        (["--stage", "triple"], ["DenseNets"]),
    ],
)
def test_bad_options(runner, args, fragments):
    result = invoke(runner, "count", "resnet20", *args)
    assert_one_line_error(result, *fragments)


def test_missing_model(runner):
    assert_one_line_error(invoke(runner, "count"), "--paper", "--list")


def test_debug_shows_the_exception(runner):
    result = invoke(runner, "--debug", "count", "resnet21")
    assert isinstance(result.exception, ModelError)
    assert "resnet21" in str(result.exception)
    # and the flag does not stick to the next invocation
    assert_one_line_error(invoke(runner, "count", "resnet21"))
