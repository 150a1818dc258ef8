r"""Hardware approximate transcendentals for the Triton kernels, with an interpreter path.

On a GPU, ``tl.log`` / ``tl.log2`` compile to libdevice's precise ``logf`` / ``log2f``: 30-40
instructions each, most of a memory-bound kernel's instruction budget. ``tl.exp`` / ``tl.exp2``
already compile to the MUFU ``ex2.approx`` instruction. :func:`fast_log2` uses the MUFU
``lg2.approx.f32`` instruction instead (one instruction plus a few for subnormal inputs): its
absolute error is at most ``2^-22.6`` (about 1.6e-7) for inputs in ``[0.5, 2]`` and its relative
error at most ``2^-22`` elsewhere (PTX ISA, ``lg2``). Callers use it where an absolute error of
that size is harmless, e.g. ``log s`` of a softmax sum ``s >= 1``, never for ``log(1 + x)`` of a
small ``x`` (see :func:`._common.log1p`).

Under the Triton interpreter (``TRITON_INTERPRET=1``, the CPU tests) inline PTX cannot run, so
the same functions fall back to the precise ``tl.log2``; the switch is a constexpr fixed at import.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Fixed when the kernels are decorated: triton.jit reads TRITON_INTERPRET at import.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_APPROX = tl.constexpr(not INTERPRETED)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def fast_log2(x):
    """``log2(x)`` of a float32 ``x``: ``lg2.approx.f32`` on a GPU, ``tl.log2`` under the interpreter."""
    if _APPROX:
        return tl.inline_asm_elementwise(
            "lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.log2(x)


@triton.jit
def fast_log(x):
    """``log(x) = ln 2 * log2(x)`` through :func:`fast_log2` (absolute error about 1.1e-7 near 1)."""
    return fast_log2(x) * _LN2
