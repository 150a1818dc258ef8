"""The examples (examples/*.py) run in --quick mode and write well-formed results.

Each example runs once, as a user would run it (a subprocess, output into a temporary folder,
never examples/results), and its files are checked for shape: the CSV columns and row counts
that the example's own configuration implies, finite numbers in range, a markdown table with one
line per CSV row and a PNG. The numbers themselves are not checked (the committed full runs and
the README report them).
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Each example trains for a while even in --quick mode.
pytestmark = pytest.mark.slow


def run_quick(script: str, out: Path) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("TRITON_INTERPRET", None)  # the examples use the C++ CPU backend, not Triton
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def check_numbers(rows: list[dict], columns: list[str], low: float = -math.inf, high: float = math.inf) -> None:
    for row in rows:
        for column in columns:
            value = float(row[column])
            assert math.isfinite(value) and low <= value <= high, f"{column} = {row[column]} in {row}"


def table_rows(markdown: str) -> int:
    """Data rows of the markdown tables: table lines that are neither a header nor a separator."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    separators = [i for i, line in enumerate(lines) if set(line) <= set("|-")]
    return len(lines) - 2 * len(separators)


def check_common(out: Path, name: str, summary_rows: int, stdout: str) -> tuple[list[dict], list[dict], str]:
    summary, runs = read_csv(out / f"{name}.csv"), read_csv(out / f"{name}_runs.csv")
    assert len(summary) == summary_rows
    markdown = (out / f"{name}.md").read_text()
    assert markdown in stdout, "the example must print the markdown it writes"
    png = (out / f"{name}.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    for row in summary:
        for column in row:
            if column.endswith("_sd"):
                assert float(row[column]) >= 0.0
    return summary, runs, markdown


@pytest.fixture(scope="module")
def classification(tmp_path_factory):
    out = tmp_path_factory.mktemp("classification")
    return out, run_quick("classification_digits.py", out)


def test_classification_quick(classification):
    import classification_digits as example

    out, stdout = classification
    configurations = len(example.RATIOS) * 2 * len(example.RECIPES)  # ratios x (MLP, CNN) x recipes
    summary, runs, markdown = check_common(out, "classification", configurations, stdout)
    seeds = int(summary[0]["seeds"])
    assert seeds >= 2 and len(runs) == configurations * seeds
    metrics = ["balanced_acc", "macro_f1"] + [f"f1_rarest{p}" for p in range(1, example.RAREST + 1)]
    assert list(summary[0]) == ["model", "ratio", "loss", "seeds"] + [
        f"{m}_{s}" for m in metrics for s in ("mean", "sd")
    ]
    check_numbers(summary, [c for c in summary[0] if c.endswith(("_mean", "_sd"))], 0.0, 1.0)
    check_numbers(runs, metrics, 0.0, 1.0)
    assert {r["loss"] for r in summary} == {r.name for r in example.RECIPES}
    assert {(r["model"], int(r["ratio"])) for r in summary} == {(m, q) for m in ("MLP", "CNN") for q in example.RATIOS}
    assert table_rows(markdown) == configurations


@pytest.fixture(scope="module")
def segmentation(tmp_path_factory):
    out = tmp_path_factory.mktemp("segmentation")
    return out, run_quick("segmentation_3d.py", out)


def test_segmentation_quick(segmentation):
    import segmentation_3d as example

    out, stdout = segmentation
    losses = list(example.make_losses("reference"))
    summary, runs, markdown = check_common(out, "segmentation", len(losses), stdout)
    assert [r["loss"] for r in summary] == losses
    assert len(runs) == len(losses) * int(summary[0]["seeds"])
    dice = [f"dice_{k}_{s}" for k in ("large", "small", "mean") for s in ("mean", "sd")]
    times = [f"{k}_ms_{b}" for k in ("loss", "step") for b in ("fused", "eager")]
    assert set(summary[0]) == {"loss", "seeds", *dice, *times}
    check_numbers(summary, dice, 0.0, 1.0)
    check_numbers(summary, times, 0.0)
    assert all(float(r[t]) > 0 for r in summary for t in times)
    check_numbers(runs, ["dice_large", "dice_small", "dice_mean"], 0.0, 1.0)
    assert table_rows(markdown) == len(losses)


@pytest.fixture(scope="module")
def calf(tmp_path_factory):
    out = tmp_path_factory.mktemp("calf")
    return out, run_quick("calf_selection.py", out)


def test_calf_quick(calf):
    import calf_selection as example

    out, stdout = calf
    candidates = [name for name, _, _ in example.CANDIDATES]
    summary, runs, markdown = check_common(out, "calf", len(example.DATASETS) * len(candidates), stdout)
    statistics = read_csv(out / "calf_statistics.csv")
    assert [r["dataset"] for r in statistics] == list(example.DATASETS)
    check_numbers(statistics, ["images", "size_mean", "size_sd", "skewness", "kurtosis", "rule"])
    assert all(r["picked"] in candidates for r in statistics)
    for stats in statistics:  # exactly the picked loss is marked in the outcome table
        rows = [r for r in summary if r["dataset"] == stats["dataset"]]
        assert [r["loss"] for r in rows] == candidates
        assert [r["loss"] for r in rows if r["picked_by_calf"] == "True"] == [stats["picked"]]
    check_numbers(summary, [c for c in summary[0] if c.endswith(("_mean", "_sd"))], 0.0, 1.0)
    assert len(runs) == len(summary) * int(summary[0]["seeds"])
    assert table_rows(markdown) == len(statistics) + len(summary)
