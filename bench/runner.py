"""The benchmark runner: every provider side by side, per loss, size, dtype, target and mode.

``python -m bench`` runs the default plan for the device present (CUDA if there is one, else
the CPU), shows a progress bar, prints the table and writes CSV, JSON, a markdown table and PNG
plots under ``bench/results/``. ``python -m bench --help`` lists the flags.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

import lmfloss_kernels
from lmfloss_kernels import available_backends

from . import measure, overhead_stage, report
from .dropin import DELEGATED, call_path
from .dropin import FUSED as FUSED_PATH
from .workloads import (
    TARGET_KINDS,
    WORKLOADS,
    Workload,
    bytes_moved,
    compiled_reference,
    logits_shape,
    make_inputs,
    monai_loss,
    target_label,
    voxels,
)

MODES = ("forward", "backward", "full", "nograd")
BASELINES = ("eager", "compile", "monai", "nnunet")
FUSED = ("triton", "cuda", "cpu")
PROVIDERS = (*BASELINES, *FUSED)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# What a row's provider ran ("path" column); fused backends of a drop-in class may have delegated.
PATHS = {"eager": "reference", "compile": "compiled", "monai": "library", "nnunet": "library"}


@dataclass(frozen=True)
class Spec:
    """A block of the plan: the cartesian product of its fields is benchmarked."""

    loss: str
    sizes: tuple[int, ...]  # cube edge for dense workloads, N for rows
    classes: tuple[int, ...] = (4,)
    dtypes: tuple[str, ...] = ("fp32",)
    targets: tuple[str, ...] = ("labels",)
    modes: tuple[str, ...] = ("full",)


def dropin_plan(sizes: tuple[int, ...], dtypes: tuple[str, ...]) -> list[Spec]:
    """The drop-in criteria (:mod:`.dropin`): BraTS-like volumes, 4 classes for the softmax
    criteria (label maps), 3 overlapping regions for the sigmoid ones (multi-hot targets)."""
    specs = []
    for name, workload in WORKLOADS.items():
        if workload.dropin is not None:
            kind = workload.dropin.target_kind
            classes = (3,) if kind == "multihot" else (4,)
            specs.append(Spec(name, sizes, classes=classes, dtypes=dtypes, targets=(kind,)))
    return specs


def default_plan(device: torch.device) -> list[Spec]:
    """Sizes chosen to finish in about 7 minutes on a 2-core CPU, or a few minutes on one GPU.

    On the CPU most rows stop at the 1 s timing budget, so a case costs about 1 s per provider
    (more for the eager rows at 128^3 and 1M rows), and every new graph (loss, dtype, target
    kind or grad mode) adds a torch.compile of 5-10 s: hence bf16 and one-hot at one size each.
    From the per-row medians of the committed CPU results, this plan takes about 4 minutes there,
    plus about 2 minutes for the drop-in criteria, which come last (the headline losses first).
    """
    if device.type == "cuda":
        edges = (64, 96, 128, 160, 192)
        rows = (4096, 65536, 262144, 1 << 20)
        return [
            Spec("ufl_asym", edges, dtypes=("bf16", "fp32"), modes=MODES),
            Spec("ufl_asym", (128, 192), dtypes=("bf16",), targets=("onehot",)),
            Spec("ufl_sym", edges, dtypes=("bf16",)),
            Spec("mixed_focal", edges, dtypes=("bf16",)),
            Spec("dense_lmf", (64, 128, 192), classes=(2, 4, 14), dtypes=("bf16",)),
            Spec("lmf_rows", rows, classes=(4, 8), dtypes=("bf16", "fp32"), modes=MODES),
            *dropin_plan((96, 128), ("bf16",)),
        ]
    return [
        Spec("ufl_asym", (32, 64, 128)),  # 2x4x128^3 fp32 fwd+bwd: the CPU target of the design
        Spec("ufl_asym", (64,), modes=MODES),
        Spec("ufl_asym", (64,), dtypes=("bf16",)),
        Spec("ufl_asym", (64,), targets=("onehot",)),
        Spec("ufl_sym", (32, 64)),
        Spec("mixed_focal", (32, 64)),
        Spec("dense_lmf", (32, 64), classes=(2, 4, 14)),
        Spec("lmf_rows", (4096, 65536, 1 << 20), classes=(4, 8)),
        Spec("lmf_rows", (65536,), classes=(8,), modes=MODES),
        Spec("lmf_rows", (65536,), classes=(8,), dtypes=("bf16",)),
        *dropin_plan((32, 64), ("fp32",)),
    ]


def quick_plan() -> list[Spec]:
    """Tiny sizes that still exercise every workload, target kind, dtype and mode."""
    return [
        Spec("ufl_asym", (16,), modes=MODES),
        Spec("ufl_asym", (12,)),  # a second size, so that the plots are drawn
        Spec("ufl_asym", (16,), targets=("onehot",)),
        Spec("ufl_sym", (16,)),
        Spec("mixed_focal", (16,)),
        Spec("dense_lmf", (16,)),
        Spec("lmf_rows", (4096,), dtypes=("fp32", "bf16")),
        *dropin_plan((12,), ("fp32",)),
    ]


def apply_overrides(plan: list[Spec], args: argparse.Namespace) -> list[Spec]:
    """Restrict the plan to the chosen losses and replace the fields the flags set."""
    out = []
    for spec in plan:
        if args.losses and spec.loss not in args.losses:
            continue
        dense = WORKLOADS[spec.loss].dense
        changes: dict[str, tuple] = {}
        if dense and args.sizes:
            changes["sizes"] = tuple(args.sizes)
        if not dense and args.rows:
            changes["sizes"] = tuple(args.rows)
        for name in ("classes", "dtypes", "modes"):
            if getattr(args, name):
                changes[name] = tuple(getattr(args, name))
        if args.targets:
            targets = tuple(t for t in args.targets if t in WORKLOADS[spec.loss].target_kinds)
            if not targets:
                continue
            changes["targets"] = targets
        out.append(replace(spec, **changes))
    return out


@dataclass(frozen=True)
class Case:
    loss: str
    size: int
    classes: int
    dtype: str
    target: str
    modes: tuple[str, ...]


def expand(plan: list[Spec]) -> list[Case]:
    # Blocks can overlap (overrides make that common): each case runs once with the union of modes.
    merged: dict[tuple, list[str]] = {}
    for spec in plan:
        for size in spec.sizes:
            for classes in spec.classes:
                for dtype in spec.dtypes:
                    for target in spec.targets:
                        modes = merged.setdefault((spec.loss, size, classes, dtype, target), [])
                        modes.extend(m for m in spec.modes if m not in modes)
    return [Case(*key, tuple(m for m in MODES if m in modes)) for key, modes in merged.items()]


# --------------------------------------------------------------------------------------------
# Providers


@dataclass
class Settings:
    device: torch.device
    providers: tuple[str, ...]
    warmup: int = 1
    min_reps: int = 3
    max_reps: int = 50
    budget_s: float = 1.0
    skipped: list[dict] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)
    paths: dict[tuple, str] = field(default_factory=dict)  # (case, provider) -> path of a drop-in class of ours
    delegated: dict[str, str] = field(default_factory=dict)  # "loss provider" -> why it delegated


def provider_fn(name: str, workload: Workload, case: Case, inputs, settings: Settings) -> Callable | str | None:
    """``fn(logits, target) -> loss`` for a provider, a string saying why it cannot run, or None
    where the provider does not apply (nnU-Net's class for a MONAI criterion, and so on)."""
    if workload.dropin is not None:
        return _dropin_fn(name, workload, case, inputs, settings)
    if name == "nnunet":
        return None
    x, t = inputs[0]
    if name == "eager":
        return lambda a, b: workload.call(a, b, backend="reference")
    if name == "compile":
        return compiled_reference(workload, x, t)
    if name == "monai":
        fn = monai_loss(workload, case.classes, case.target)
        if fn is None:
            return "MONAI is not installed (pip install monai)"
        settings.notes[workload.name] = workload.monai_note
        return fn
    reason = _backend_missing(name, settings.device, x.dtype)
    if reason is not None:
        return reason
    return lambda a, b: workload.call(a, b, backend=name)


def _backend_missing(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    if name == "triton" and device.type != "cuda":
        return "Triton runs on the CPU only under TRITON_INTERPRET, which is not a benchmark"
    if name not in available_backends(device, dtype):
        return f"backend {name!r} is not available for {device.type} {dtype}"
    return None


def _dropin_fn(name: str, workload: Workload, case: Case, inputs, settings: Settings) -> Callable | str | None:
    """Providers of a drop-in class: the library's class (``monai`` / ``nnunet``) and its
    ``torch.compile`` (``compile``); ours with the reference backend (``eager``) or a fused backend.

    Ours is called once first to see which path it takes (:func:`.dropin.call_path`): a call that
    ran the library's code is recorded as delegated, and one that needs the absent library is not run.
    """
    dropin = workload.dropin
    x, t = inputs[0]
    if name in ("monai", "nnunet") and name != dropin.provider:
        return None
    if name in ("monai", "nnunet", "compile"):
        theirs = dropin.theirs()
        if theirs is None:
            return f"{dropin.library} is not installed: no library baseline for the drop-in rows"
        theirs = theirs.to(settings.device)
        return torch.compile(theirs, dynamic=True) if name == "compile" else theirs
    if name != "eager":
        reason = _backend_missing(name, settings.device, x.dtype)
        if reason is not None:
            return reason
    ours = dropin.ours("reference" if name == "eager" else name).to(settings.device)
    try:
        path, why = call_path(ours, x, t)
    except ImportError as error:
        return f"{workload.name} delegates to {dropin.library} here, which is not installed ({error})"
    # Not delegated: the reference backend's row stays "reference", a fused backend's "fused".
    settings.paths[(case, name)] = path if path == DELEGATED else PATHS.get(name, path)
    if path == DELEGATED:
        settings.delegated[f"{workload.name} {name}"] = why
    return ours


def mode_runner(mode: str, fn: Callable, inputs) -> tuple[Callable[[int], object], Callable[[int], object] | None]:
    """``(run, setup)``: ``run(i)`` is one call of ``fn`` in ``mode`` on input copy ``i``; ``setup(i)``
    prepares it outside the timed region (the backward mode's forward pass) or is None."""
    if mode == "full":

        def run(i):
            x, t = inputs[i]
            x.grad = None
            fn(x, t).backward()

        return run, None
    if mode == "forward":
        return lambda i: fn(*inputs[i]), None
    if mode == "nograd":

        def run(i):
            with torch.no_grad():
                fn(*inputs[i])

        return run, None

    # backward: a fresh forward graph per call (compiled backwards free their buffers, so a
    # retained graph cannot be replayed), built in setup and consumed by the timed backward.
    pending: dict[int, torch.Tensor] = {}

    def setup(i):
        x, t = inputs[i]
        x.grad = None
        pending[i] = fn(x, t)

    def run(i):
        pending.pop(i).backward()

    return run, setup


# --------------------------------------------------------------------------------------------
# Running


def run_case(
    case: Case, settings: Settings, copy_bw: float, on_row: Callable[[dict], None] | None = None
) -> list[dict]:
    """The rows of one case, sorted by mode and provider; ``on_row(row)`` sees each as soon as it is measured."""
    workload = WORKLOADS[case.loss]
    device = settings.device
    dtype = DTYPES[case.dtype]
    shape = logits_shape(workload, case.size, case.classes)
    probe = make_inputs(workload, shape, dtype, case.target, device)
    input_bytes = sum(t.numel() * t.element_size() for t in probe)
    copies = measure.rotation_count(device, input_bytes)
    inputs = [probe] + [make_inputs(workload, shape, dtype, case.target, device) for _ in range(copies - 1)]
    grad_bytes = probe[0].numel() * probe[0].element_size()
    rows = []
    for provider in settings.providers:
        fn = provider_fn(provider, workload, case, inputs, settings)
        if fn is None:
            continue
        if isinstance(fn, str):
            settings.skipped.append({"provider": provider, "loss": case.loss, "dtype": case.dtype, "reason": fn})
            continue
        for mode in case.modes:
            try:
                run, setup = mode_runner(mode, fn, inputs)
                median, p20, p80, reps = _time(run, setup, inputs, provider, settings)
                for x, _ in inputs:
                    x.grad = None
                gc.collect()
                if setup is not None:
                    setup(0)
                peak = measure.peak_extra_bytes(lambda run=run: run(0), device)
            except Exception as error:  # noqa: BLE001 - one failing provider must not end the run
                settings.skipped.append(
                    {"provider": provider, "loss": case.loss, "dtype": case.dtype, "mode": mode, "reason": repr(error)}
                )
                continue
            finally:
                for x, _ in inputs:
                    x.grad = None
                run = setup = None
            moved = bytes_moved(mode, *probe)
            rows.append(
                {
                    "loss": case.loss,
                    "shape": "x".join(map(str, shape)),
                    "voxels": voxels(shape),
                    "classes": case.classes,
                    "dtype": case.dtype,
                    "target": target_label(workload, probe[1]),
                    "mode": mode,
                    "provider": provider,
                    "path": settings.paths.get((case, provider), PATHS.get(provider, FUSED_PATH)),
                    "median_ms": median * 1e3,
                    "p20_ms": p20 * 1e3,
                    "p80_ms": p80 * 1e3,
                    "reps": reps,
                    "input_copies": len(inputs),
                    **memory_figures(peak, grad_bytes, device),
                    "bytes_moved": moved,
                    "bandwidth_gbs": moved / median / 1e9,
                    "bandwidth_frac": moved / median / copy_bw,
                }
            )
            if on_row is not None:
                on_row(rows[-1])
    order = {name: index for index, name in enumerate(settings.providers)}
    return sorted(rows, key=lambda row: (MODES.index(row["mode"]), order[row["provider"]]))


def memory_figures(peak: float, grad_bytes: int, device: torch.device) -> dict:
    """A row's memory columns: peak extra MiB, gradient MiB, and peak / gradient size.

    A peak below the method's resolution (:func:`measure.memory_floor_bytes`, 64 KiB on the
    CPU) is no measurement of zero: both peak figures become NaN with ``peak_below_floor`` set,
    and the report prints them as upper bounds ("< 0.06" MiB). An unmeasurable peak (NaN) stays
    NaN without the flag.
    """
    below = peak < measure.memory_floor_bytes(device)
    return {
        "peak_extra_mb": math.nan if below else peak / 2**20,
        "grad_mb": grad_bytes / 2**20,
        "peak_over_grad": math.nan if below else peak / grad_bytes,
        "peak_below_floor": below,
    }


def _time(run, setup, inputs, provider: str, settings: Settings):
    # Compilation (and Dynamo's re-specialisation on the second call) belongs to the warm-up.
    warmup = settings.warmup + (1 if provider == "compile" else 0)
    if settings.device.type == "cuda":
        return measure.time_cuda(
            lambda: run(0),
            [inputs[0][0]],
            warmup=warmup,
            min_reps=settings.min_reps,
            budget_s=settings.budget_s,
            setup=None if setup is None else lambda: setup(0),
        )
    return measure.time_cpu(
        run,
        len(inputs),
        warmup=warmup,
        min_reps=settings.min_reps,
        max_reps=settings.max_reps,
        budget_s=settings.budget_s,
        setup=setup,
    )


def add_speedups(rows: list[dict]) -> None:
    """Speed-up of every row over the eager and the compiled reference of the same case, and for
    the drop-in criteria over the library's own class (``vs_library``).

    For a drop-in criterion, ``eager`` is our class on the reference backend and ``compile`` is
    ``torch.compile`` of the library's class. A row whose call was delegated to the library's code
    gets no speed-up: it is not our computation.
    """
    key = ("loss", "shape", "dtype", "target", "mode")
    base: dict[tuple, dict[str, float]] = {}
    for row in rows:
        if row["provider"] in ("eager", "compile") or row["path"] == "library" and _is_dropin(row):
            kind = "library" if row["path"] == "library" else row["provider"]
            base.setdefault(tuple(row[k] for k in key), {})[kind] = row["median_ms"]
    for row in rows:
        ref = base.get(tuple(row[k] for k in key), {})
        for kind in ("eager", "compile", "library"):
            ok = kind in ref and row["path"] != DELEGATED
            row[f"vs_{kind}"] = ref[kind] / row["median_ms"] if ok else math.nan


def _is_dropin(row: dict) -> bool:
    workload = WORKLOADS.get(row["loss"])
    return workload is not None and workload.dropin is not None


# --------------------------------------------------------------------------------------------
# Command line


def _csv(kind: Callable, choices=None):
    def parse(text: str):
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        if choices is not None:
            bad = [v for v in values if v not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {list(choices)}")
        return values

    return parse


def _size(text: str) -> int:
    # Accept 4k / 1M shorthands for row counts.
    scale = {"k": 1 << 10, "m": 1 << 20}.get(text[-1:].lower(), 1)
    return int(text[:-1] if scale > 1 else text) * scale


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark every loss provider (eager reference, torch.compile of it, MONAI, fused backends) "
        "for time, peak extra memory and bandwidth; prints a table and writes CSV/JSON/markdown/PNG results.",
        epilog="The plan is the device's default (bench/README.md, 'Plans') or, with --quick, tiny sizes. --losses, "
        "--targets and --providers restrict it; --sizes (dense losses), --rows, --classes, --dtypes and --modes "
        "replace that field in every block of it.",
    )
    parser.add_argument("--losses", type=_csv(str, WORKLOADS), help=f"subset of {list(WORKLOADS)}")
    parser.add_argument("--sizes", type=_csv(_size), help="cube edges of dense volumes, e.g. 32,64,128")
    parser.add_argument("--rows", type=_csv(_size), help="row counts N of lmf_rows, e.g. 4k,64k,1M")
    parser.add_argument("--classes", type=_csv(int), help="class counts C, e.g. 2,4,14")
    parser.add_argument("--providers", type=_csv(str, PROVIDERS), help=f"subset of {list(PROVIDERS)}")
    parser.add_argument("--modes", type=_csv(str, MODES), help=f"subset of {list(MODES)} (full = fwd+bwd)")
    parser.add_argument("--dtypes", type=_csv(str, DTYPES), help=f"subset of {list(DTYPES)}")
    parser.add_argument(
        "--targets", type=_csv(str, TARGET_KINDS), help=f"subset of {list(TARGET_KINDS)} (onehot: region losses only)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repetitions (a smoke test)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if available)")
    parser.add_argument("--budget", type=float, default=None, help="seconds of timing per row (default 1, quick 0.05)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--out", default=None, help="results directory (default: bench/results)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument(
        "--no-overhead", action="store_true", help="skip the per-call overhead stage (bench/overhead.py, run last)"
    )
    parser.add_argument(
        "--overhead-calls",
        type=int,
        default=None,
        help="calls per repeat of the overhead stage (default 200; quick 50)",
    )
    args = parser.parse_args(argv)
    if args.classes and any(c < 2 for c in args.classes):
        parser.error("--classes must all be >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if os.environ.get("TRITON_INTERPRET") == "1" and device.type == "cuda":
        print("TRITON_INTERPRET=1 is set: Triton timings would be the interpreter's", file=sys.stderr)
    cases = expand(apply_overrides(quick_plan() if args.quick else default_plan(device), args))
    if not cases:
        print("nothing to run: the flags filtered out every case", file=sys.stderr)
        return 2
    budget = args.budget if args.budget is not None else (0.05 if args.quick else 1.0)
    settings = Settings(
        device=device,
        providers=tuple(args.providers or PROVIDERS),
        min_reps=2 if args.quick else 3,
        budget_s=budget,
    )
    measure.prepare_rss()
    # The imported modules (torch, MONAI, inductor) make every full collection slow; frozen, they
    # are skipped by the collections that precede each memory measurement.
    gc.freeze()
    torch.manual_seed(0)
    started = time.time()
    copy_bw = measure.copy_bandwidth(device)
    command = sys.argv if argv is None else argv
    # The files are named after the start, and rewritten (atomically) after every measured row with
    # complete=False: a run stopped by a time limit keeps every row it finished.
    meta = report.metadata(device, copy_bw, 0.0, command)
    rows: list[dict] = []  # the finished cases
    pending: list[dict] = []  # the rows of the case being measured

    def record(row: dict) -> None:
        pending.append(row)
        partial = rows + pending
        add_speedups(partial)
        partial_meta = {**meta, "run_seconds": round(time.time() - started, 1), "complete": False}
        report.write(
            partial, partial_meta, settings.notes, settings.skipped, args.out, plots=False, delegated=settings.delegated
        )

    with lmfloss_kernels.options(check_backend=False):
        for case in report.progress(cases, desc="bench"):
            rows.extend(run_case(case, settings, copy_bw, on_row=record))
            pending.clear()
    add_speedups(rows)
    overhead = None
    if not args.no_overhead:
        # Last, after every row is written: a time limit that stops it loses no row.
        calls = args.overhead_calls or (50 if args.quick else 200)
        print(f"per-call overhead stage (bench/overhead.py, {calls} calls per repeat)", file=sys.stderr)
        overhead = overhead_stage.measure(calls, device, args.threads)
    meta = {**report.metadata(device, copy_bw, time.time() - started, command), "date": meta["date"], "complete": True}
    context = dict(delegated=settings.delegated, overhead=overhead)
    print(report.format_table(rows, settings.notes, settings.skipped, meta, **context))
    paths = report.write(rows, meta, settings.notes, settings.skipped, args.out, plots=not args.no_plots, **context)
    for path in paths:
        print(f"wrote {path}")
    return 0 if rows else 1
