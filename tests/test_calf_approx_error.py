"""Error of the CALF kernels' per-voxel math with the GPU's approximate instructions, against float64.

On a GPU, ``tl.exp2`` is ``ex2.approx.ftz.f32`` (relative error at most 2^-22.5, subnormal results
flushed to 0) and ``tl.math.rsqrt`` is ``rsqrt.approx.ftz.f32`` (at most 2^-22.9); the interpreter
computes both exactly. Here the interpreter's two instructions are replaced by their worst case (the
exact value moved by the full error bound, in either direction, rounded to fp32, ``ex2`` flushed to
zero below 2^-126), and the kernels' own ``voxel_term`` runs on a dense grid of logits through the whole
range, the clip ends included. Every other operation rounds to fp32 after each step (no FMA), which
is slightly pessimistic. The bounds asserted are those the ``_voxel_math`` docstring states.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter

from lmfloss_kernels.calf._definitions import TRANSFORMS, clip_limit
from lmfloss_kernels.calf._voxel_math import voxel_term

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="emulates the GPU's instructions in the interpreter")

EPS = 1e-7
EX2_ERROR = 2.0**-22.5
RSQRT_ERROR = 2.0**-22.9


@triton.jit
def _terms_kernel(
    z_ptr, y_ptr, term_ptr, slope_ptr, n, limit, TRANSFORM: tl.constexpr, SOFT: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < n
    z = tl.load(z_ptr + offs, mask=keep, other=0.0)
    y = tl.load(y_ptr + offs, mask=keep, other=0.0)
    term, slope = voxel_term(z, y, y == 1.0, limit, TRANSFORM, SOFT)
    tl.store(term_ptr + offs, term, mask=keep)
    tl.store(slope_ptr + offs, slope, mask=keep)


def _worst_case(monkeypatch, sign_ex2: float, sign_rsqrt: float) -> None:
    def ex2(self, arg):
        exact = np.exp2(arg.data.astype(np.float64)) * (1.0 + sign_ex2 * EX2_ERROR)
        value = exact.astype(np.float32)
        return interpreter.TensorHandle(np.where(value < np.float32(2.0**-126), np.float32(0), value), arg.dtype.scalar)

    def rsqrt(self, arg):
        exact = (1.0 / np.sqrt(arg.data.astype(np.float64))) * (1.0 + sign_rsqrt * RSQRT_ERROR)
        return interpreter.TensorHandle(exact.astype(np.float32), arg.dtype.scalar)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_exp2", ex2)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_rsqrt", rsqrt)


def _exact(z: np.ndarray, y: np.ndarray, transform: str):
    """float64 term and derivative, each as (value, scale): |value - got| / scale is the relative error.

    Written from p and q = 1 - p (no softplus), with log1p of sums of positive terms so that float64
    keeps its relative accuracy everywhere: ln ``-[y ln p + (1 - y) ln q]``; fisher's term is
    ``ℓ / (-½) = 2 [y artanh p + (1 - y) artanh q]`` with ``2 artanh p = ln((1 + p)/q)`` and
    ``(1 + p)/q - 1 = p + e^z + p e^z``. The scale is the sum of the two classes' absolute parts.
    """
    if transform == "fisher":
        limit = clip_limit(EPS)
        inside = np.abs(z) <= np.float32(limit)
        z = np.clip(z, -limit, limit)
    ez, emz = np.exp(z), np.exp(-z)
    p, q = 1.0 / (1.0 + emz), 1.0 / (1.0 + ez)
    if transform == "fisher":
        parts = y * np.log1p(p + ez + p * ez), (1.0 - y) * np.log1p(q + emz + q * emz)
        slopes = 2.0 * y * p / (1.0 + p) * inside, -2.0 * (1.0 - y) * q / (1.0 + q) * inside
    else:
        parts = y * np.log1p(emz), (1.0 - y) * np.log1p(ez)
        slopes = -y * q, (1.0 - y) * p
    term = (parts[0] + parts[1], np.abs(parts[0]) + np.abs(parts[1]))
    slope = (slopes[0] + slopes[1], np.abs(slopes[0]) + np.abs(slopes[1]))
    return term, slope


def _relative_error(got: np.ndarray, exact: tuple[np.ndarray, np.ndarray]) -> float:
    """Largest relative error where the exact value is above 1e-30; below, where ``e^{-|a|}`` nears fp32's
    subnormal range and is flushed to 0, the absolute error must stay below 1e-37."""
    value, scale = exact
    error = np.abs(got - value)
    tiny = scale <= 1e-30
    assert np.all(error[tiny] <= 2.0**-126 + 1e-5 * scale[tiny]), float(error[tiny].max())
    return float(np.max(error[~tiny] / scale[~tiny]))


@pytest.mark.parametrize("transform", ["ln", "log10", "fisher"])
@pytest.mark.parametrize("soft", [False, True], ids=["labels", "soft"])
@pytest.mark.parametrize("signs", [(1.0, 1.0), (1.0, -1.0), (-1.0, 1.0), (-1.0, -1.0)])
def test_voxel_math_error_with_approximate_instructions(monkeypatch, transform, soft, signs):
    _worst_case(monkeypatch, *signs)
    limit = np.float32(clip_limit(EPS))
    grid = np.concatenate([np.linspace(-100, 100, 20001), [limit, -limit], np.geomspace(1e-8, 1.0, 200)])
    z = np.concatenate([grid, -grid]).astype(np.float32)
    targets = [0.0, 1.0] + ([0.3, 0.9] if soft else [])
    z = np.repeat(z, len(targets))
    y = np.resize(np.array(targets, dtype=np.float32), z.size)
    n = z.size
    term, slope = torch.empty(n), torch.empty(n)
    block = 4096
    limit_arg = float(limit) if transform == "fisher" else 0.0
    code = TRANSFORMS.index(transform)
    _terms_kernel[(triton.cdiv(n, block),)](
        torch.from_numpy(z), torch.from_numpy(y), term, slope, n, limit_arg, TRANSFORM=code, SOFT=soft, BLOCK=block
    )
    # voxel_term's term and derivative of log10 are those of ln (its 1/ln 10 is applied per image).
    exact_term, exact_slope = _exact(z.astype(np.float64), y.astype(np.float64), transform)
    term_error = _relative_error(term.double().numpy(), exact_term)
    slope_error = _relative_error(slope.double().numpy(), exact_slope)
    near = np.abs(z) <= 20
    near_term, near_slope = (
        _relative_error(got.double().numpy()[near], (exact[0][near], exact[1][near]))
        for got, exact in ((term, exact_term), (slope, exact_slope))
    )
    # The bounds of the _voxel_math docstring, inside the package's 2e-5 budget. Measured (worst of the four
    # sign pairs): 3.6e-6 / 4.0e-6 over |z| <= 100, 1.34e-6 / 1.80e-6 over |z| <= 20.
    assert term_error < 5e-6 and slope_error < 5e-6, (term_error, slope_error)
    assert near_term < 2e-6 and near_slope < 2e-6, (near_term, near_slope)
