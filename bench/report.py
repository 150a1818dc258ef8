"""Results: progress bar, terminal table, CSV / JSON / markdown files and PNG plots."""

from __future__ import annotations

import csv
import datetime
import io
import json
import math
import os
import platform
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path

import torch

import lmfloss_kernels

from . import measure, overhead_stage

RESULTS_DIR = Path(__file__).resolve().parent / "results"

COLUMNS = (
    "loss",
    "shape",
    "voxels",
    "classes",
    "dtype",
    "target",
    "mode",
    "provider",
    "path",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "reps",
    "input_copies",
    "peak_extra_mb",
    "grad_mb",
    "peak_over_grad",
    "peak_below_floor",
    "bytes_moved",
    "bandwidth_gbs",
    "bandwidth_frac",
    "vs_eager",
    "vs_compile",
    "vs_library",
)


def progress(items: list, desc: str) -> Iterable:
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit="case", dynamic_ncols=True)


# --------------------------------------------------------------------------------------------
# Metadata


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def metadata(device: torch.device, copy_bw: float, seconds: float, argv: list[str]) -> dict:
    return {
        "device": _device_name(device),
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        # Other processes on the machine distort CPU timings: the 1-minute load average at the end says how busy it was.
        "load_average": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "monai": _version("monai"),
        "lmfloss_kernels": lmfloss_kernels.__version__,
        "git_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_bandwidth_gbs": copy_bw / 1e9,
        "memory_floor_mb": measure.memory_floor_bytes(device) / 2**20,
        "run_seconds": round(seconds, 1),
        "command": " ".join(["python -m bench", *argv[1:]] if argv and argv[0].endswith(".py") else argv),
        "method": {
            "time": "median and 20%/80% quantiles; CUDA: triton.testing.do_bench (CUDA events, L2 flushed); "
            "CPU: synchronous wall clock, warm-up excluded, inputs rotated when smaller than 64 MiB",
            "memory": "CUDA: max_memory_allocated during one call minus allocated before it; CPU: peak resident "
            "set (VmHWM after /proc/self/clear_refs) minus resident set before one call, large blocks mmapped",
            "bandwidth": "bytes that must move / median time, as a fraction of dst.copy_(src) bandwidth measured in "
            "the same run; forward and no-grad: logits + target read once; backward: logits + target read once, "
            "gradient written once; fwd+bwd: logits + target read twice, gradient written once",
        },
    }


# --------------------------------------------------------------------------------------------
# Table

_HEADER = (
    ("loss", "loss", "{}"),
    ("shape", "shape", "{}"),
    ("dtype", "dtype", "{}"),
    ("target", "target", "{}"),
    ("mode", "mode", "{}"),
    ("provider", "provider", "{}"),
    ("median_ms", "median ms", "ms"),
    ("p20_ms", "p20", "ms"),
    ("p80_ms", "p80", "ms"),
    ("peak_extra_mb", "extra MiB", "{:.1f}"),
    ("peak_over_grad", "x grad", "{:.2f}"),
    ("bandwidth_frac", "BW frac", "{:.3f}"),
    ("vs_eager", "vs eager", "{:.2f}x"),
    ("vs_compile", "vs compile", "{:.2f}x"),
    ("vs_library", "vs lib", "{:.2f}x"),
)

MODE_TITLES = {"forward": "forward", "backward": "backward", "full": "fwd+bwd", "nograd": "no-grad fwd"}


def _memory_bound(row: dict, key: str, floor_mb: float) -> float:
    """Upper bound of a peak-memory figure that is below the method's resolution."""
    return floor_mb if key == "peak_extra_mb" else floor_mb / row["grad_mb"]


def _below_floor(row: dict, key: str) -> bool:
    return key in ("peak_extra_mb", "peak_over_grad") and bool(row.get("peak_below_floor"))


def provider_label(row: dict) -> str:
    """The provider, marked when our class handed the call to the library's code (not ours)."""
    return f"{row['provider']} [delegated]" if row.get("path") == "delegated" else row["provider"]


def _cell(row: dict, key: str, fmt: str, floor_mb: float) -> str:
    value = row.get(key)
    if key == "mode":
        return MODE_TITLES[value]
    if key == "provider":
        return provider_label(row)
    if _below_floor(row, key):
        return f"< {_memory_bound(row, key, floor_mb):.2f}"
    if isinstance(value, float) and not math.isfinite(value):
        return "-"
    if fmt == "ms":  # three significant digits without switching to exponent notation
        return f"{value:.0f}" if value >= 100 else f"{value:.3g}"
    return fmt.format(value)


def table_lines(rows: list[dict], markdown: bool, floor_mb: float) -> list[str]:
    """Aligned text or markdown; peaks below the memory resolution ``floor_mb`` show as "< bound"."""
    cells = [[title for _, title, _ in _HEADER]] + [[_cell(r, k, f, floor_mb) for k, _, f in _HEADER] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(_HEADER)]
        return lines + ["| " + " | ".join(c) + " |" for c in cells[1:]]
    widths = [max(len(c[i]) for c in cells) for i in range(len(_HEADER))]
    lines = []
    previous = None
    for index, c in enumerate(cells):
        group = tuple(c[:5])
        if index > 1 and group != previous:
            lines.append("")
        previous = group
        pairs = enumerate(zip(c, widths, strict=True))
        aligned = (text.rjust(w) if i >= 6 else text.ljust(w) for i, (text, w) in pairs)
        lines.append("  ".join(aligned))
    return lines


def headline_rows(rows: list[dict]) -> list[dict]:
    """fwd+bwd at the largest size of every (loss, dtype, target, C): the README's table."""

    def key(row):
        return row["loss"], row["dtype"], row["target"], row["classes"]

    full = [row for row in rows if row["mode"] == "full"]
    largest: dict[tuple, int] = {}
    for row in full:
        largest[key(row)] = max(largest.get(key(row), 0), row["voxels"])
    return [row for row in full if row["voxels"] == largest[key(row)]]


def _context_lines(notes: dict[str, str], skipped: list[dict], meta: dict, delegated: dict[str, str]) -> list[str]:
    lines = [
        f"device: {meta['device']} ({meta['device_type']}, {meta['cpu_threads']} CPU threads, load average "
        f"{meta['load_average']}); torch {meta['torch']}, "
        f"triton {meta['triton']}, CUDA {meta['cuda']}, MONAI {meta['monai']}, lmfloss_kernels "
        f"{meta['lmfloss_kernels']} @ {meta['git_commit'][:12]}; {meta['date']}",
        f"copy bandwidth (same run): {meta['copy_bandwidth_gbs']:.1f} GB/s; run took {meta['run_seconds']} s",
    ]
    if meta["memory_floor_mb"] > 0:
        lines.append(
            f"extra MiB / x grad '< v': a peak below the memory method's resolution "
            f"({meta['memory_floor_mb'] * 1024:.0f} KiB); v is the upper bound"
        )
    if notes:
        lines.append("How MONAI's function differs from ours, per loss:")
        lines += [f"  {loss}: {note}" for loss, note in sorted(notes.items())]
    if delegated:
        lines.append(
            "Delegated: our drop-in class handed these calls to the library's code (or eager PyTorch), so the "
            "rows marked [delegated] time that code, not our kernels, and get no speed-up:"
        )
        lines += [f"  {key}: {reason}" for key, reason in sorted(delegated.items())]
    reasons = sorted({f"{s['provider']}: {s['reason']}" for s in skipped})
    if reasons:
        lines.append("Not run:")
        lines += [f"  {reason}" for reason in reasons]
    return lines


def format_table(
    rows: list[dict],
    notes: dict[str, str],
    skipped: list[dict],
    meta: dict,
    delegated: dict[str, str] | None = None,
    overhead: dict | None = None,
) -> str:
    table = table_lines(rows, markdown=False, floor_mb=meta["memory_floor_mb"])
    extra = ["", *overhead_stage.lines(overhead)] if overhead is not None else []
    return "\n".join(["", *table, "", *_context_lines(notes, skipped, meta, delegated or {}), *extra])


# --------------------------------------------------------------------------------------------
# Files


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40]


def write(
    rows: list[dict],
    meta: dict,
    notes: dict[str, str],
    skipped: list[dict],
    out: str | None,
    plots: bool,
    delegated: dict[str, str] | None = None,
    overhead: dict | None = None,
) -> list[Path]:
    """CSV, JSON and markdown (and PNG plots) named after the device and the date; the per-call
    overhead stage (:mod:`.overhead_stage`), when given, goes into the JSON and the markdown."""
    delegated = delegated or {}
    directory = Path(out) if out else RESULTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    stamp = meta["date"][:19].replace(":", "").replace("-", "")
    stem = directory / f"{meta['device_type']}_{_slug(meta['device'])}_{stamp}"
    paths = [stem.with_suffix(".csv"), stem.with_suffix(".json"), stem.with_suffix(".md")]
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=[*COLUMNS, *[k for k in meta if k != "method"]], extrasaction="ignore")
    writer.writeheader()
    flat_meta = {k: v for k, v in meta.items() if k != "method"}
    for row in rows:
        # Below the memory resolution, the CSV cell says so ("<0.0625") instead of a number.
        bounds = {
            key: f"<{_memory_bound(row, key, meta['memory_floor_mb']):.4g}"
            for key in ("peak_extra_mb", "peak_over_grad")
            if _below_floor(row, key)
        }
        writer.writerow({**row, **bounds, **flat_meta})
    _replace(paths[0], table.getvalue())
    _replace(paths[1], _json(meta, notes, skipped, rows, delegated, overhead))
    sections = [
        "## Headline: fwd+bwd at the largest size of each case",
        "",
        *table_lines(headline_rows(rows), markdown=True, floor_mb=meta["memory_floor_mb"]),
        "",
        *_context_lines(notes, skipped, meta, delegated),
        "",
        "## All rows",
        "",
        *table_lines(rows, markdown=True, floor_mb=meta["memory_floor_mb"]),
        "",
    ]
    if overhead is not None:
        sections += ["## Per-call overhead", "", *overhead_stage.lines(overhead), ""]
    _replace(paths[2], "\n".join(sections))
    if plots:
        paths += plot(rows, stem, meta["memory_floor_mb"])
    return paths


def _replace(path: Path, text: str) -> None:
    # Written beside and renamed over: a run killed mid-write (a time limit) leaves the previous
    # complete file, never a truncated one.
    partial = path.with_name(path.name + ".part")
    partial.write_text(text, newline="" if path.suffix == ".csv" else None)
    os.replace(partial, path)


def _json(meta, notes, skipped, rows, delegated, overhead) -> str:
    # JSON has no NaN: missing figures (no compile baseline, memory not measurable or below the
    # resolution, which peak_below_floor and meta's memory_floor_mb tell apart) become null.
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value

    data = {
        "meta": meta,
        "monai_notes": notes,
        "not_run": skipped,
        "delegated": delegated,
        "rows": [{k: clean(v) for k, v in row.items()} for row in rows],
    }
    if overhead is not None:
        data["overhead"] = {k: v for k, v in overhead.items() if k != "table"}
    return json.dumps(data, indent=1)


def plot(rows: list[dict], stem: Path, floor_mb: float) -> list[Path]:
    """Per loss/dtype/target/C: fwd+bwd time and peak extra memory against size, one line per provider.

    Peaks below the memory resolution ``floor_mb`` are not drawn; a dotted line marks the floor.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["mode"] == "full":
            groups.setdefault((row["loss"], row["dtype"], row["target"], row["classes"]), []).append(row)
    paths = []
    for (loss, dtype, target, classes), group in sorted(groups.items()):
        if len({r["voxels"] for r in group}) < 2:
            continue
        fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
        for provider in dict.fromkeys(provider_label(r) for r in group):
            pts = sorted(
                (r["voxels"], r["median_ms"], r["p20_ms"], r["p80_ms"], r["peak_extra_mb"])
                for r in group
                if provider_label(r) == provider
            )
            xs = [p[0] for p in pts]
            ax_time.errorbar(
                xs,
                [p[1] for p in pts],
                yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                marker="o",
                capsize=3,
                label=provider,
            )
            ax_mem.plot(xs, [p[4] for p in pts], marker="o", label=provider)
        # The design's memory target is stated in gradients: draw 1x the gradient for reference.
        sizes = sorted({(r["voxels"], r["grad_mb"]) for r in group})
        ax_mem.plot([v for v, _ in sizes], [g for _, g in sizes], "k--", linewidth=1, label="1x gradient")
        if floor_mb > 0:
            ax_mem.axhline(floor_mb, color="grey", linestyle=":", linewidth=1, label="resolution (below: not drawn)")
        ax_mem.legend()
        xlabel = "rows N" if loss == "lmf_rows" else "voxels per image (B = 2)"
        for ax, ylabel in ((ax_time, "fwd+bwd time, median (ms)"), (ax_mem, "peak extra memory (MiB)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_time.legend()
        fig.suptitle(f"{loss}, C={classes}, {dtype} logits, {target}")
        fig.tight_layout()
        path = Path(f"{stem}_{loss}_{dtype}_{_slug(target)}_c{classes}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
