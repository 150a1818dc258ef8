"""DRAM traffic and copy-bandwidth share of the headline losses, one forward + backward each.

The one-pass claim of the design says a fused loss moves, forward and backward together, the
ideal bytes ``2 * (logits + target) + gradient`` (:func:`bench.workloads.bytes_moved`, mode
"full"). Two measurements check it on a GPU:

* ``time``: the median time of one forward + backward per case and backend, and the median
  time of ``dst.copy_(src)`` moving the same number of bytes (``ideal / 2`` read, ``ideal / 2``
  written). ``copy_fraction = t_copy / t_loss`` is the share of copy bandwidth the loss reaches.
* ``profile`` + ``summarize``: ``profile`` runs one warm forward + backward between
  ``cudaProfilerStart`` / ``cudaProfilerStop``, for Nsight Compute started with
  ``--profile-from-start off``; ``summarize`` sums ``dram__bytes_read.sum``,
  ``dram__bytes_write.sum`` and ``gpu__time_duration.sum`` over the kernels of each case and
  sets the bytes against the ideal (``dram_over_ideal``: 1.0 is one pass).

``scripts/gpu_check.sh`` runs all three. ``--small`` shrinks the cases (a CPU plumbing check).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import measure
from .workloads import WORKLOADS, bytes_moved, logits_shape, make_inputs

METRICS = ("dram__bytes_read.sum", "dram__bytes_write.sum", "gpu__time_duration.sum")
BACKENDS = ("triton", "cuda")


@dataclass(frozen=True)
class Case:
    workload: str
    size: int  # cube edge (dense) or rows
    small: int  # the same layout, tiny: for --small
    classes: int
    dtype: torch.dtype


CASES = {
    "ufl_bf16_u8_192": Case("ufl_asym", 192, 8, 4, torch.bfloat16),
    "lmf_rows_bf16_1M": Case("lmf_rows", 1 << 20, 1024, 8, torch.bfloat16),
}


def _inputs(case: Case, small: bool, device: torch.device):
    workload = WORKLOADS[case.workload]
    shape = logits_shape(workload, case.small if small else case.size, case.classes)
    return workload, make_inputs(workload, shape, case.dtype, "labels", device)


def _step(workload, x, t, backend: str):
    def run():
        x.grad = None
        workload.call(x, t, backend=backend).backward()

    return run


def _copy(nbytes: int, device: torch.device):
    src = torch.ones(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def _median_s(fn, device: torch.device) -> float:
    if device.type == "cuda":
        return measure.time_cuda(fn, [], warmup=2, min_reps=5, budget_s=0.3)[0]
    return measure.time_cpu(lambda i: fn(), 1, warmup=1, min_reps=2, max_reps=5, budget_s=0.2)[0]


def _write_json(path: Path, data) -> None:
    # Renamed over the old file: a run stopped by a time limit keeps the rows written before.
    partial = path.with_name(path.name + ".part")
    partial.write_text(json.dumps(data, indent=1))
    os.replace(partial, path)


def time_cases(device: torch.device, backends: tuple[str, ...], small: bool, out: Path) -> list[dict]:
    rows: list[dict] = []
    for name, case in CASES.items():
        for backend in backends:
            row = {"case": name, "backend": backend, "device": str(device)}
            try:
                workload, (x, t) = _inputs(case, small, device)
                ideal = bytes_moved("full", x, t)
                t_loss = _median_s(_step(workload, x, t, backend), device)
                t_copy = _median_s(_copy(ideal, device), device)
                row |= {"shape": list(x.shape), "ideal_bytes": ideal, "loss_ms": t_loss * 1e3,
                        "copy_ms": t_copy * 1e3, "copy_fraction": t_copy / t_loss}  # fmt: skip
            except Exception as error:  # noqa: BLE001 - a backend missing or failing must not end the others
                row["error"] = repr(error)
            rows.append(row)
            print(json.dumps(row), flush=True)
            _write_json(out, rows)
    return rows


def profile(name: str, backend: str, small: bool, device: torch.device) -> None:
    """One warm forward + backward (or a copy of its ideal bytes) inside the profiler's range."""
    workload, (x, t) = _inputs(CASES[name], small, device)
    run = _copy(bytes_moved("full", x, t), device) if backend == "copy" else _step(workload, x, t, backend)
    run()  # compilation and first-call allocations stay outside the profiled range
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()


_UNITS = {"byte": 1, "kbyte": 1e3, "mbyte": 1e6, "gbyte": 1e9, "nsecond": 1e-9, "usecond": 1e-6, "msecond": 1e-3,
          "second": 1, "ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1}  # fmt: skip


def parse_ncu_csv(text: str) -> list[dict]:
    """Per kernel launch: name and the METRICS in bytes and seconds, from ``ncu --csv`` output."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        return []
    kernels: dict[str, dict] = {}
    for rec in csv.DictReader(lines[start:]):
        if rec.get("Metric Name") not in METRICS:
            continue
        scale = _UNITS.get((rec.get("Metric Unit") or "").strip().lower(), 1)
        value = float(rec["Metric Value"].replace(",", "")) * scale
        kernel = kernels.setdefault(rec["ID"], {"kernel": rec.get("Kernel Name", "")})
        kernel[rec["Metric Name"]] = value
    return list(kernels.values())


def summarize(ncu_dir: Path, small: bool, out: Path) -> list[dict]:
    rows = []
    for name, case in CASES.items():
        workload = WORKLOADS[case.workload]
        shape = logits_shape(workload, case.small if small else case.size, case.classes)
        numel = torch.Size(shape).numel()
        target_bytes = numel // case.classes * (1 if workload.dense else 8)
        ideal = 3 * numel * case.dtype.itemsize + 2 * target_bytes
        copy_time = None
        for backend in ("copy", *BACKENDS):
            path = ncu_dir / f"ncu_{name}_{backend}.csv"
            if not path.exists():
                continue
            kernels = parse_ncu_csv(path.read_text(errors="replace"))
            read = sum(k.get(METRICS[0], 0.0) for k in kernels)
            write = sum(k.get(METRICS[1], 0.0) for k in kernels)
            seconds = sum(k.get(METRICS[2], 0.0) for k in kernels)
            if backend == "copy":
                copy_time = seconds
            rows.append(
                {
                    "case": name,
                    "backend": backend,
                    "kernels": [k["kernel"][:80] for k in kernels],
                    "ideal_bytes": ideal,
                    "dram_read_bytes": read,
                    "dram_write_bytes": write,
                    "dram_over_ideal": (read + write) / ideal if kernels else None,
                    "kernel_time_us": seconds * 1e6,
                    "copy_fraction": copy_time / seconds if copy_time and seconds else None,
                }
            )
    _write_json(out, rows)
    for row in rows:
        ratio = row["dram_over_ideal"]
        print(
            f"{row['case']:18} {row['backend']:7} kernels {len(row['kernels']):2}"
            f"  read {row['dram_read_bytes'] / 1e6:9.1f} MB  write {row['dram_write_bytes'] / 1e6:9.1f} MB"
            f"  x ideal {ratio if ratio is None else round(ratio, 3)}  {row['kernel_time_us']:9.1f} us"
            f"  copy share {row['copy_fraction']}"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.traffic", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("time", "profile", "summarize", "cases"))
    parser.add_argument("case", nargs="?", choices=tuple(CASES), help="profile: the case")
    parser.add_argument("backend", nargs="?", help=f"profile: a backend ({', '.join(BACKENDS)}, ...) or copy")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="time: comma-separated backends")
    parser.add_argument("--small", action="store_true", help="tiny shapes of the same layouts (plumbing check)")
    parser.add_argument("--ncu-dir", type=Path, help="summarize: folder of ncu_<case>_<backend>.csv files")
    parser.add_argument("--out", type=Path, help="time / summarize: JSON file written after every row")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.command == "cases":
        print(" ".join(CASES))
    elif args.command == "time":
        time_cases(device, tuple(args.backends.split(",")), args.small, args.out)
    elif args.command == "profile":
        if not (args.case and args.backend):
            parser.error("profile needs a case and a backend")
        profile(args.case, args.backend, args.small, device)
    else:
        summarize(args.ncu_dir, args.small, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
