"""Per-call host overhead of every criterion against ``F.cross_entropy`` on small inputs.

``python -m bench.overhead [--calls N] [--out DIR]`` (``bash scripts/bench.sh`` runs it after the
main suite). On tiny inputs a loss is all overhead: argument checks, backend choice, the custom-op
call, the autograd node. This measures that host work, per call, as the **CPU time of the calling
thread** (``time.thread_time``: what other processes do on a loaded machine does not count, and
neither do idle waits), best of 5 repeats of the mean over ``--calls`` calls, the criterion's repeats
alternating with ``F.cross_entropy``'s on the same tensors (so both see the same machine load), in
two modes:

* ``train``: forward + ``backward()`` of a logits tensor that requires grad (a training step);
* ``no_grad``: forward under ``torch.no_grad()`` (a validation step).

Inputs: rows ``32 x 10`` with int64 labels for the row losses, ``2 x 4 x 8 x 8`` with int64 labels
for the segmentation losses, float32. ``F.cross_entropy`` on the same tensors is the yardstick
(the issue's goal: at most 2x its host time).

Paths:

* ``cpu``: the C++ CPU extension, kernels included (they take ~10 us at this size);
* ``triton (launch stubbed)``: the host path of the Triton backend up to the launch, which is what
  a GPU call costs on the host besides Triton's own launcher. Without a GPU, Triton runs in its
  interpreter, so the four kernel wrappers (``row_forward``, ``row_backward``, ``region_forward``,
  ``region_backward``) are replaced by the custom ops' fake implementations, which allocate the
  outputs and launch nothing. (Until 2026-12-04 ``row_backward`` was left out, so the row losses'
  train rows timed the interpreted backward kernel, some 20 ms, instead of its launch path.) The
  tensors are CPU tensors, so the target's value checks (the label range read on the host) run as
  for the ``cpu`` path; GPU tensors skip them unless the ``check_labels`` option is on, so a real
  GPU call costs a few microseconds less than this row.
  With a GPU the real kernels are launched (asynchronously: only the host time counts).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # The Triton backend serves CPU tensors only in interpreter mode, set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as TF  # noqa: E402

import lmfloss_kernels as lk  # noqa: E402

COUNTS = [500, 300, 120, 80, 40, 20, 10, 6, 3, 2]
ROW_LOSSES = {
    "LMFLoss": lambda b: lk.LMFLoss(COUNTS, backend=b),
    "LDAMLoss": lambda b: lk.LDAMLoss(COUNTS, backend=b),
    "FocalLoss": lambda b: lk.FocalLoss(backend=b),
}
DENSE_LOSSES = {
    "UnifiedFocalLoss": lambda b: lk.UnifiedFocalLoss(backend=b),
    "FocalTverskyLoss": lambda b: lk.FocalTverskyLoss(backend=b),
    "SymmetricFocalLoss": lambda b: lk.SymmetricFocalLoss(backend=b),
    "AsymmetricFocalLoss": lambda b: lk.AsymmetricFocalLoss(backend=b),
    "MixedFocalLoss": lambda b: lk.MixedFocalLoss(backend=b),
    "TverskyLoss": lambda b: lk.TverskyLoss(backend=b),
    "DiceLoss": lambda b: lk.DiceLoss(backend=b),
}
CONSTRUCTED = {
    "LMFLoss": lambda: lk.LMFLoss(COUNTS),
    "UnifiedFocalLoss": lambda: lk.UnifiedFocalLoss(),
    "MixedFocalLoss": lambda: lk.MixedFocalLoss(alpha=[0.5, 1.0, 1.0, 2.0]),
}


def per_call_us(fn, calls: int) -> float:
    """Best of 5 repeats of the mean thread CPU time of ``fn()`` over ``calls`` calls, in microseconds."""
    return side_by_side_us([fn], calls)[0]


def side_by_side_us(fns, calls: int) -> list[float]:
    """:func:`per_call_us` of each of ``fns``, their repeats interleaved.

    On a shared machine the cost of the same call drifts with the load over a run; timing the
    criterion and ``F.cross_entropy`` in alternating repeats exposes both to the same load, so
    their ratio holds even when the absolute numbers move.
    """
    for fn in fns:
        for _ in range(max(10, calls // 10)):
            fn()
    best = [float("inf")] * len(fns)
    for _ in range(5):
        for index, fn in enumerate(fns):
            start = time.thread_time_ns()
            for _ in range(calls):
                fn()
            best[index] = min(best[index], (time.thread_time_ns() - start) / calls / 1e3)
    return best


def step(criterion, logits: torch.Tensor, target: torch.Tensor, mode: str):
    if mode == "no_grad":

        def call():
            with torch.no_grad():
                criterion(logits, target)

        return call
    leaf = logits.detach().requires_grad_(True)

    def call():
        leaf.grad = None
        criterion(leaf, target).backward()

    return call


@contextlib.contextmanager
def stubbed_triton_launches():
    """Replace the Triton kernel wrappers by the custom ops' fake implementations (outputs, no launch)."""
    from lmfloss_kernels.triton import ops, region, row

    saved = (row.row_forward, row.row_backward, region.region_forward, region.region_backward)
    row.row_forward = ops.row_loss_op._abstract_fn
    row.row_backward = ops.row_backward_op._abstract_fn
    region.region_forward = ops.region_forward_op._abstract_fn
    region.region_backward = ops.region_backward_op._abstract_fn
    try:
        yield
    finally:
        row.row_forward, row.row_backward, region.region_forward, region.region_backward = saved


def paths(device: torch.device) -> list[tuple[str, str, contextlib.AbstractContextManager]]:
    found = []
    available = lk.available_backends(device)
    if device.type == "cpu":
        if "cpu" in available:
            found.append(("cpu", "cpu", contextlib.nullcontext()))
        if "triton" in available:
            found.append(("triton (launch stubbed)", "triton", stubbed_triton_launches()))
    else:
        found += [(name, name, contextlib.nullcontext()) for name in ("triton", "cuda") if name in available]
    return found


def run(calls: int, device: torch.device) -> tuple[list[dict], list[tuple[str, float]]]:
    torch.manual_seed(0)
    rows_x = torch.randn(32, 10, device=device)
    rows_y = torch.randint(0, 10, (32,), device=device)
    dense_x = torch.randn(2, 4, 8, 8, device=device)
    dense_y = torch.randint(0, 4, (2, 8, 8), device=device)
    results = []
    for label, backend, context in paths(device):
        with context:
            for kind, losses, x, y in (("rows", ROW_LOSSES, rows_x, rows_y), ("dense", DENSE_LOSSES, dense_x, dense_y)):
                for name, make in losses.items():
                    criterion = make(backend)
                    for mode in ("train", "no_grad"):
                        pair = [step(criterion, x, y, mode), step(TF.cross_entropy, x, y, mode)]
                        ours, ce = side_by_side_us(pair, calls)
                        results.append(
                            dict(loss=name, path=label, mode=mode, input=kind, us=ours, ce_us=ce, ratio=ours / ce)
                        )
    construction = [(name, per_call_us(make, max(20, calls // 20))) for name, make in CONSTRUCTED.items()]
    return results, construction


def table(results: list[dict], construction: list[tuple[str, float]], device: torch.device, threads: int) -> str:
    lines = [
        f"# Per-call host overhead vs F.cross_entropy ({device.type}, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {threads} thread(s))",
        "",
        "Thread CPU time per call, best of 5 repeats, each row's criterion and cross_entropy timed in "
        "alternating repeats; rows 32x10, dense 2x4x8x8, float32, int64 labels (method: `bench/overhead.py`).",
        "",
        "| loss | path | mode | ours us | cross_entropy us | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['loss']} | {r['path']} | {r['mode']} | {r['us']:.1f} | {r['ce_us']:.1f} | {r['ratio']:.2f}x |"
        )
    lines += ["", "| criterion construction | us |", "|---|---|"]
    lines += [f"| {name}() | {us:.0f} |" for name, us in construction]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per repeat (default 200)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--out", default="bench/results", help="directory of the markdown table ('' to skip)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results, construction = run(args.calls, device)
    text = table(results, construction, device, torch.get_num_threads())
    sys.stdout.write(text)
    if args.out:
        path = Path(args.out) / f"overhead_{device.type}_{time.strftime('%Y%m%dT%H%M%S')}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
