"""What the three examples share: command line, reproducible set-up, tables (markdown + CSV), statistics.

Each example writes, into its output folder (default ``examples/results``):

* ``<name>_runs.csv``: one row per (configuration, seed), the raw numbers;
* ``<name>.csv`` and ``<name>.md``: the summary, mean and sample standard deviation over seeds;
* ``<name>.png``: a plot of the summary.

and prints the markdown table, so the committed files can be compared with a run.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import random
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer seeds, epochs and configurations")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"output folder (default {RESULTS})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (results are reproducible at 1)")
    return parser.parse_args()


def set_up(threads: int) -> None:
    """Fixed thread count and deterministic kernels, so a rerun gives the same numbers."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0


def pm(values: Sequence[float], digits: int = 3) -> str:
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def markdown_table(rows: list[dict]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[k]) for k in header) + " |" for row in rows]
    return "\n".join(lines)


def write_markdown(path: Path, title: str, sections: list[tuple[str, str]], notes: Sequence[str] = ()) -> str:
    """``# title``, then each (heading, table) pair, then notes; returns the text (also printed by callers)."""
    parts = [f"# {title}", ""]
    for heading, table in sections:
        parts += [f"## {heading}", "", table, ""] if heading else [table, ""]
    parts += [f"- {note}" for note in notes]
    text = "\n".join(parts).rstrip() + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    )


class Stopwatch:
    """Wall time since construction, for the 'ran in ... s' note."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start


def train_segmenter(make_model, criterion, inputs, targets, seed: int, steps: int, batch_size: int, lr: float):
    """A model from ``make_model()`` (built after seeding) trained with Adam for ``steps`` steps of
    ``batch_size`` samples, in a seeded order that walks through shuffled passes of the data."""
    seed_everything(seed)
    model = make_model()
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    passes = steps * batch_size // len(targets) + 1
    order = torch.cat([torch.randperm(len(targets), generator=generator) for _ in range(passes)])
    for step in range(steps):
        batch = order[batch_size * step : batch_size * step + batch_size]
        loss = criterion(model(inputs[batch]), targets[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model


def median_ms(function, repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``function()`` in milliseconds (after ``warmup`` untimed calls)."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def finite(value: float) -> float:
    if not math.isfinite(value):
        raise FloatingPointError(f"non-finite result {value}")
    return value


def quiet_matplotlib():
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
