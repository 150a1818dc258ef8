"""The per-call overhead table (:mod:`bench.overhead`) as the last stage of ``python -m bench``.

:mod:`bench.overhead` measures, on small inputs, each criterion's host time per call against
``F.cross_entropy``. Here it runs in a child process: its module sets ``TRITON_INTERPRET`` before
Triton is imported (to reach the Triton backend's host path without a GPU), which must not change
the suite's own process, and the suite's allocator settings and frozen heap must not change its
timings. The child uses :func:`bench.overhead.run` and :func:`bench.overhead.table` unchanged and
hands back their results as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
GOAL = 2.0  # issue 13: at most 2x cross-entropy's host time per call

_CHILD = """
import json, sys, torch
calls, device, threads = int(sys.argv[1]), torch.device(sys.argv[2]), int(sys.argv[3])
if threads:
    torch.set_num_threads(threads)
from bench import overhead
results, construction = overhead.run(calls, device)
text = overhead.table(results, construction, device, torch.get_num_threads())
print(json.dumps({"rows": results, "construction": construction, "table": text}))
"""


def measure(calls: int, device: torch.device, threads: int | None, timeout_s: float = 900) -> dict:
    """``{"calls", "rows", "construction", "table", "summary"}``, or ``{"calls", "error"}`` if the child failed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-c", _CHILD, str(calls), str(device), str(threads or 0)]
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"calls": calls, "error": f"timed out after {timeout_s:.0f} s"}
    if done.returncode != 0:
        return {"calls": calls, "error": f"exit {done.returncode}: {done.stderr.strip()[-1500:]}"}
    try:  # bench.overhead may change under us: an output of another form is a note, not a crash
        data = json.loads(done.stdout.strip().splitlines()[-1])
        return {"calls": calls, **data, "summary": summary(data["rows"])}
    except (ValueError, KeyError, IndexError, TypeError) as error:
        return {"calls": calls, "error": f"unreadable output of bench.overhead ({error!r})"}


def summary(rows: list[dict]) -> list[dict]:
    """The worst ratio to cross-entropy per path and mode: the overhead row(s) of the report."""
    worst: dict[tuple[str, str], dict] = {}
    for row in rows:
        key = (row["path"], row["mode"])
        if key not in worst or row["ratio"] > worst[key]["ratio"]:
            worst[key] = row
    return [
        {
            "path": path,
            "mode": mode,
            "worst_loss": row["loss"],
            "us": row["us"],
            "ce_us": row["ce_us"],
            "ratio": row["ratio"],
            "meets_goal": row["ratio"] <= GOAL,
        }
        for (path, mode), row in worst.items()
    ]


def lines(stage: dict) -> list[str]:
    """Markdown of the stage: the summary rows, then bench.overhead's own table."""
    if "error" in stage:
        return [f"Per-call overhead: not measured ({stage['error']})"]
    out = [
        f"Per-call overhead (`bench/overhead.py`, {stage['calls']} calls per repeat): the worst criterion of "
        f"each path and mode against `F.cross_entropy` on the same small inputs (goal: <= {GOAL:g}x)",
        "",
        "| path | mode | worst loss | ours us | cross_entropy us | ratio | <= goal |",
        "|---|---|---|---|---|---|---|",
    ]
    out += [
        f"| {s['path']} | {s['mode']} | {s['worst_loss']} | {s['us']:.1f} | {s['ce_us']:.1f} | {s['ratio']:.2f}x "
        f"| {'yes' if s['meets_goal'] else 'no'} |"
        for s in stage["summary"]
    ]
    table = stage["table"].splitlines()
    # bench.overhead's title becomes a sub-heading of the results file.
    return [*out, "", *("#" + line if line.startswith("# ") else line for line in table)]
