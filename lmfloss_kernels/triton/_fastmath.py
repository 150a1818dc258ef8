r"""Hardware approximate transcendentals for the Triton kernels, with an interpreter path.

On a GPU, ``tl.log`` / ``tl.log2`` compile to libdevice's precise ``logf`` / ``log2f`` (30-40
instructions each), ``tl.exp2`` to ``ex2.approx.f32`` wrapped in a subnormal range fix (4
instructions) and a float32 ``x / y`` to a full-range division (about 8). The functions here are
the bare MUFU instructions, one SASS instruction each, with flush-to-zero (``.ftz``) semantics:
subnormal inputs read as 0 and subnormal results are returned as 0.

================  ===========================  ==============================================
function          PTX instruction              documented error (PTX ISA)
================  ===========================  ==============================================
``fast_log2``     ``lg2.approx.ftz.f32``       absolute ``2^-22.6`` (1.6e-7) for ``x`` in
                                               ``[0.5, 2]``, relative ``2^-22`` elsewhere
``fast_exp2``     ``ex2.approx.ftz.f32``       relative ``2^-22`` (2.4e-7)
``fast_rcp``      ``rcp.approx.ftz.f32``       relative ``2^-23`` (1 ulp)
================  ===========================  ==============================================

Callers use them where an error of that size is harmless: ``log2`` of a softmax sum ``s >= 1``
(never for ``log(1 + x)`` of a small ``x``: its absolute error would be all of the result), the
exponentials and the reciprocal of a softmax. The region kernels measure what this does to
their results (``region.py``'s docstring, ``bench/approx_error.py``).

Under the Triton interpreter (``TRITON_INTERPRET=1``, the CPU tests, and any replay of a compiled
launch under the interpreter) inline PTX cannot run, so the same functions fall back to the
precise ``tl.log2``, ``tl.exp2`` and ``1 / x``: the switch :data:`_APPROX` is a constexpr that
Triton's compiler reads as true and Python's ``if``, which runs the body under the interpreter,
as false.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Fixed when the kernels are decorated: triton.jit reads TRITON_INTERPRET at import.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


class _CompiledOnly(tl.constexpr):
    """A constexpr whose value (what Triton's code generator reads) is true, but whose Python truth is false.

    The compiler unwraps constexprs to their ``value``; the interpreter executes a kernel's body as
    Python, where ``if _APPROX:`` calls ``__bool__``. So the inline-PTX branch is compiled for a
    GPU and never taken when interpreted, whatever ``TRITON_INTERPRET`` was at import.
    """

    def __bool__(self) -> bool:
        return False


_APPROX = _CompiledOnly(True)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def fast_log2(x):
    """``log2(x)`` of a float32 ``x``: ``lg2.approx.ftz.f32`` on a GPU, ``tl.log2`` under the interpreter."""
    if _APPROX:
        return tl.inline_asm_elementwise(
            "lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.log2(x)


@triton.jit
def fast_log(x):
    """``log(x) = ln 2 * log2(x)`` through :func:`fast_log2` (absolute error about 1.1e-7 near 1)."""
    return fast_log2(x) * _LN2


@triton.jit
def fast_exp2(x):
    """``2^x`` of a float32 ``x``: ``ex2.approx.ftz.f32`` on a GPU (0 below ``2^-126``), else ``tl.exp2``."""
    if _APPROX:
        return tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.exp2(x)


@triton.jit
def fast_rcp(x):
    """``1 / x`` of a float32 ``x``: ``rcp.approx.ftz.f32`` on a GPU, a division under the interpreter."""
    if _APPROX:
        return tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return 1.0 / x
