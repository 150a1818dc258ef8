r"""LMF family on Triton: ``alpha * LDAM + beta * focal`` over rows ``(N, C)`` or voxels of ``(B, C, *S)``.

Two streaming passes that move exactly the ideal bytes: the forward reads logits and labels once
and writes only the loss (plus ``O(programs)`` partial sums); the backward reads them once more,
recomputes the row and writes the final gradient. Nothing gradient-sized is stored between them,
so a forward without autograd pays for no gradient at all.

For row ``i`` with label ``t``, validity ``v_i``, class weights ``w^L`` (LDAM), ``w^F`` (focal),
margins ``m``, ``q = softmax(s (z_i - m_t e_t))``, ``p = softmax(z_i)``, ``u = 1 - p_t`` and
``G = u^gamma (1 - gamma p_t log(p_t) / u)`` (losses.md 0.2, 1.5):

.. math::

    \frac{\partial L}{\partial z_{ij}} = g_o\Big(\alpha\, \frac{v_i w^L_t}{W}\, s\,(q_{ij} - \delta_{jt})
        + \beta\, \frac{v_i w^F_t}{n}\, G\,(p_{ij} - \delta_{jt})\Big)

with ``W = sum_i v_i w^L_{t_i}`` and ``n = sum_i v_i`` for ``"mean"`` (label-only sums that the
forward accumulates next to the loss, per program, and keeps on the device: no host sync) and
``W = n = 1`` otherwise; ``g_o`` is ``grad_output`` (per row for ``"none"``), read by the kernel
from device memory. The product is formed in float32 and rounded once into the logits' dtype, so
float16 keeps a mean gradient that a GradScaler scales back into its normal range.

Per row, both softmaxes come from the same differences ``d_j = z_j - M`` (``M`` the row's max,
``d_t = -inf`` at the target, so that the other classes' exponentials sum to ``(1 - p_t) S``
without a cancelling difference) and one logarithm each: ``log p_t = (z_t - M) - log S``,
``S = sum_j e^{d_j}``, ``log S = log1p(S - 1)`` with ``S - 1`` taken as the other classes' sum
when ``t`` is the arg-max (confident rows keep their small loss). LDAM's shifted logits are
handled relative to ``M`` too (``a = (z_t - M) - m_t``), never as ``z_t - m_t``, whose rounding
at the logits' magnitude ``s`` would multiply. A row costs two exponentials per class and
one logarithm per softmax.

Accuracy. On a GPU the logarithms and ``u^gamma`` use the MUFU approximations of
:mod:`._fastmath` (``lg2.approx``: at most ``2^-22.6`` absolute on ``[0.5, 2]``, ``2^-22``
relative elsewhere; exponentials are ``ex2.approx`` as for ``tl.exp``), and :func:`_log1p` keeps a
series below ``x = 1/16``. Measured against float64 (the reference on the same float32 logits,
rows of C = 8 and 14 at logit scales 3-12, s = 30, gamma = 1.5) with that worst-case ``lg2``
error injected in either direction (``tests/test_triton_rows.py::test_fast_log_error_within_budget``):
per-row losses within 4.8e-6 relative (1.3e-6 with the precise logarithm; the float32 reference
itself is off by up to 9e-2 on small row losses), the mean within 1.4e-7, gradients within
1.7e-7 of their norm and 3.4e-7 of their largest entry: inside the 2e-5 budget of float32 results.
Under the interpreter the logarithms are the precise ``tl.log2``.

Layout. A program owns one tile of ``BLOCK_C x BLOCK_V`` (classes x rows) of one image, with
every class of a row in one thread's registers wherever a 128-bit vector allows it (see
:func:`launch_config`), so the class reductions are register operations. Rows of ``C``
contiguous classes, ``C`` a power of two (``(N, C)`` row-major and channels-last maps,
``CLASS_LAST``), are addressed as ``(b V + v) C + c`` with ``C`` a constexpr:
the compiler then knows each row starts on a multiple of ``C`` elements and loads / stores a
bf16 row of 8 classes with one 128-bit access. Dense ``(B, C, V)`` maps vectorise along the
voxels instead. Per-class constants are gathered by label from a ``[BLOCK_C]`` vector the program
loads once (a shared-memory lookup per row, not a global read).

Non-finite logits: the loss of a row (ignored or not) with a NaN or infinite logit is NaN, and
so is the sum / mean: the row's probe ``0 * (min_j z_j + M + S)`` (NaN exactly when a logit is
NaN or infinite) is added to its loss and to the partial sums; the gradient is left as the
softmax makes it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRETED,
    class_view,
    empty,
    fast_power,
    finish_gradient,
    focal_gradient_factor,
    fp32,
    gradient_buffer,
    label_view,
    log1p_series,
    tile_position,
)
from ._fastmath import fast_log

_LOG2E = tl.constexpr(1.4426950408889634)

# Registers: a thread holds all BLOCK_C classes of its rows and, in backward, two exponentials
# of each. Class-last rows: 32 logits per thread (bf16 C = 8: 70 / 114 registers forward /
# backward on sm_90, 4 rows in flight per thread); 64 cost 168 / 221 registers for 6% fewer
# instructions. A dense map needs its 128-bit voxel vector of every class in one thread: 64
# (float32 C = 14: 105 / 148 registers, no spills).
_ROW_ELEMENTS_PER_THREAD = 32
_DENSE_ELEMENTS_PER_THREAD = 64
# ... and at most 8 voxels per thread (one bf16 / two float32 vectors): with few classes the
# per-voxel state dominates (float32 C = 4 at 16 voxels: 255 registers and spills in backward;
# at 8: 128 / 168 registers).
_DENSE_VOXELS_PER_THREAD = 8
_NUM_WARPS = 4
# The interpreter costs about 1 ms per program whatever its size: big tiles.
_INTERPRETER_TILE = 1 << 16


def launch_config(num_classes: int, num_voxels: int, class_last: bool) -> dict[str, int]:
    """``BLOCK_C`` (classes padded to a power of two), ``BLOCK_V`` rows / voxels per program, warps.

    A tile holds ``32 x warps x E`` logits (``E`` the per-thread budget above, fewer for a dense
    map with few classes). Triton lays it out
    from its loads: 128 bits along the contiguous axis per thread, then the threads and warps
    along that axis, then along the other. So the classes of a row stay in one thread when the
    tile's rows / voxels cover every thread: class-last rows whose classes fit in one 128-bit
    vector (bf16 C <= 8, float32 C <= 4), dense maps whose 128-bit voxel vector of every class
    fits in ``E`` (float32 C <= 16, bf16 C <= 8 at E = 64). Beyond that Triton spreads a row's
    classes over threads (shuffles or shared memory: correct, slower) and the tile keeps its
    size, so registers stay bounded for any C. One tile per program: the per-program work
    (per-class vectors, partial sums) is amortised over the 16-64 logits of each thread.
    """
    block_c = triton.next_power_of_2(num_classes)
    if INTERPRETED:
        block_v = max(16, min(_INTERPRETER_TILE // block_c, triton.next_power_of_2(num_voxels)))
        return {"BLOCK_C": block_c, "BLOCK_V": block_v, "num_warps": 1}
    threads = 32 * _NUM_WARPS
    if class_last:
        block_v = max(1, threads * _ROW_ELEMENTS_PER_THREAD // block_c)
    else:
        block_v = max(1, min(threads * _DENSE_ELEMENTS_PER_THREAD // block_c, threads * _DENSE_VOXELS_PER_THREAD))
    block_v = min(block_v, max(threads, triton.next_power_of_2(num_voxels)))
    return {"BLOCK_C": block_c, "BLOCK_V": block_v, "num_warps": _NUM_WARPS}


@triton.jit
def _log1p(x):
    """``log(1 + x)`` for ``x >= 0`` with one fast logarithm: a series ``x - x^2/2 + ... + x^5/5``
    below ``1/16`` (truncation below 2e-7 relative), ``fast_log(1 + x)`` above (its ~1.7e-7
    absolute error is below 3e-6 relative there)."""
    small = x < 0.0625
    return tl.where(small, log1p_series(tl.where(small, x, 0.0)), fast_log(1.0 + x))


@triton.jit
def _softmax_sums(d, shift, d_t, scale):
    """One softmax of ``scale * (x - top)`` given ``d = z - M`` (``-inf`` at the target and padding),
    ``shift = M - top`` (per row; ``top`` the max of the row ``x``, which equals ``z`` off the target)
    and ``d_t = x_t - top``.

    Returns the tile ``e_j = exp(scale (d_j + shift))`` (0 at the target), ``rest = sum_j e_j =
    (1 - p_t) S``, ``e_t``, ``S`` and ``log S``; ``e_t = 1`` exactly when
    the target is the arg-max (``d_t = 0``). ``shift`` enters through the FMA
    ``d scale' + shift scale'`` (``scale' = scale log2 e``): ``d`` is exact and ``shift`` at most a
    margin, so the exponent keeps its absolute accuracy whatever the logits' magnitude.
    """
    e = tl.exp2(d * (scale * _LOG2E) + (shift * (scale * _LOG2E))[None, :])
    rest = tl.sum(e, axis=0)
    e_t = tl.exp2(d_t * (scale * _LOG2E))
    total = rest + e_t
    log_total = _log1p(tl.where(d_t == 0.0, rest, total - 1.0))
    return e, rest, e_t, total, log_total


@triton.jit
def _offsets(b, v, cls, V, stride_b, stride_c, stride_v, C: tl.constexpr, CLASS_LAST: tl.constexpr):
    """int64 offsets of a ``[BLOCK_C, BLOCK_V]`` tile; ``CLASS_LAST``: rows of ``C`` contiguous classes."""
    if CLASS_LAST:
        return (b * V + v)[None, :] * C + cls[:, None]
    else:
        return b * stride_b + cls[:, None] * stride_c + v[None, :] * stride_v


@triton.jit
def _row_tile(
    logit_ptr, label_ptr, b, v, V, szb, szc, szv, slb, slv, ignore_index, margins, ldam_weights, focal_weights,
    s, gamma,
    C: tl.constexpr, CLASS_LAST: tl.constexpr, HAS_LDAM: tl.constexpr, HAS_FOCAL: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Everything forward and backward need of a tile of rows (see the module docstring).

    Returns ``(valid, probe, w_t, a_t, ldam, focal, e, scale_e, e_q, scale_q, onehot)`` where
    ``ldam = -log q_t``, ``focal = -u^gamma log p_t``, and the gradient of row ``i`` is
    ``cL_i * (q - y) + cF_i * G (p - y)``, assembled by the backward kernel from ``e`` / ``e_q``
    (the exponentials of the non-target classes) and the per-row factors here: ``q_j = e_q / S_q``
    (``scale_q = 1 / S_q``), ``1 - q_t = rest_q / S_q``, likewise for ``p`` (``G`` folded into
    ``scale_e``, ``G (1 - p_t)`` into ``rest_e``).
    """
    cls = tl.arange(0, BLOCK_C)
    vmask = v < V
    cmask = cls < C
    # Class-last rows hold one row per thread and register: a label load vectorised over
    # consecutive rows would need a layout conversion through shared memory, so the label stride
    # is not specialised there (one load per row, still coalesced over the warp).
    if CLASS_LAST:
        label_offsets = b * slb + v * slv
    else:
        label_offsets = b * slb + v
    label = tl.load(label_ptr + label_offsets, mask=vmask, other=ignore_index).to(tl.int64)
    valid = vmask & (label != ignore_index)
    # int32 per element: the int64 label only decides validity (ignore_index may exceed int32).
    target = tl.where(valid, label, -1).to(tl.int32)
    onehot = cls[:, None] == target[None, :]
    index = tl.minimum(tl.maximum(target, 0), C - 1)

    z = tl.load(logit_ptr + _offsets(b, v, cls, V, szb, szc, szv, C, CLASS_LAST),
                mask=cmask[:, None] & vmask[None, :], other=0.0).to(tl.float32)  # fmt: skip
    z_t = tl.sum(tl.where(onehot, z, 0.0), axis=0)
    z_rest = tl.where(onehot | ~cmask[:, None], float("-inf"), z)
    top_rest = tl.max(z_rest, axis=0)
    top = tl.maximum(top_rest, tl.where(valid, z_t, float("-inf")))
    d = z_rest - top[None, :]
    zero = tl.zeros_like(top)
    d_t = tl.where(valid, z_t - top, float("-inf"))
    e, rest, e_t, total, log_total = _softmax_sums(d, zero, d_t, 1.0)
    probe = (tl.min(tl.where(cmask[:, None], z, 0.0), axis=0) + top + total) * 0.0

    w_t = zero
    a_t = zero
    ldam = zero
    focal = zero
    e_q = e
    scale_q = zero
    rest_q = zero
    scale_e = zero
    rest_e = zero
    if HAS_LDAM:
        m_t = tl.gather(margins, index, 0)
        w_t = tl.where(valid, tl.gather(ldam_weights, index, 0), 0.0)
        # Everything relative to M: the margin-shifted target logit is M + a, the max of the
        # shifted row M + top_q. Forming z_t - m_t itself would round at the logits' magnitude
        # (1e-6 at |z| ~ 30), an error that s = 30 multiplies in every exponential; a, d and
        # top_q carry only the rounding of differences of nearby values.
        a = d_t - m_t
        top_q = tl.maximum(a, top_rest - top)
        e_q, rest_q, _, total_q, log_total_q = _softmax_sums(d, -top_q, a - top_q, s)
        ldam = tl.where(valid, s * (top_q - a) + log_total_q, 0.0)
        scale_q = tl.fdiv(1.0, total_q)
        rest_q = rest_q * scale_q
    if HAS_FOCAL:
        a_t = tl.where(valid, tl.gather(focal_weights, index, 0), 0.0)
        inv_total = tl.fdiv(1.0, total)
        u = rest * inv_total
        log_pt = d_t - log_total
        modulation = fast_power(u, gamma)
        focal = tl.where(valid, -modulation * log_pt, 0.0)
        # 0 on ignored rows (log p_t = -inf there), so that their gradient is 0 * finite.
        factor = tl.where(valid, focal_gradient_factor(e_t * inv_total, log_pt, u, modulation, gamma, FAST=True), 0.0)
        scale_e = factor * inv_total
        rest_e = factor * u
    return valid, probe, w_t, a_t, ldam, focal, onehot, e, scale_e, rest_e, e_q, scale_q, rest_q


@triton.jit
def _class_constants(margin_ptr, ldam_weight_ptr, focal_weight_ptr, C: tl.constexpr, BLOCK_C: tl.constexpr):
    """The per-class vectors, loaded once per program (padded classes 0)."""
    cls = tl.arange(0, BLOCK_C)
    cmask = cls < C
    margins = tl.load(margin_ptr + cls, mask=cmask, other=0.0)
    ldam_weights = tl.load(ldam_weight_ptr + cls, mask=cmask, other=0.0)
    focal_weights = tl.load(focal_weight_ptr + cls, mask=cmask, other=0.0)
    return margins, ldam_weights, focal_weights


@triton.jit(do_not_specialize=["slv"])
def _row_forward_kernel(
    logit_ptr, label_ptr, margin_ptr, ldam_weight_ptr, focal_weight_ptr, row_loss_ptr, partial_ptr,
    V, szb, szc, szv, slb, slv, alpha, beta, gamma, s, ignore_index,
    C: tl.constexpr, CLASS_LAST: tl.constexpr, HAS_LDAM: tl.constexpr, HAS_FOCAL: tl.constexpr,
    PER_ROW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """Per-row losses (``PER_ROW``) or the program's partial sums ``[sum w_t ldam, sum a_t focal, W, n]``."""
    pid, b, v = tile_position(V, BLOCK_V)
    margins, ldam_weights, focal_weights = _class_constants(margin_ptr, ldam_weight_ptr, focal_weight_ptr, C, BLOCK_C)
    valid, probe, w_t, a_t, ldam, focal, _, _, _, _, _, _, _ = _row_tile(
        logit_ptr, label_ptr, b, v, V, szb, szc, szv, slb, slv, ignore_index, margins, ldam_weights,
        focal_weights, s, gamma, C, CLASS_LAST, HAS_LDAM, HAS_FOCAL, BLOCK_C,
    )  # fmt: skip
    if PER_ROW:
        tl.store(row_loss_ptr + b * V + v, alpha * w_t * ldam + beta * a_t * focal + probe, mask=v < V)
    else:
        # The probe (0, or NaN for a row with a non-finite logit) goes into both sums: the total
        # leaves out a term whose coefficient is 0.
        out = partial_ptr + pid * 4
        tl.store(out, tl.sum(w_t * ldam + probe, axis=0))
        tl.store(out + 1, tl.sum(a_t * focal + probe, axis=0))
        tl.store(out + 2, tl.sum(w_t, axis=0))
        tl.store(out + 3, tl.sum(valid.to(tl.float32), axis=0))


@triton.jit
def _row_total_kernel(
    partial_ptr, loss_ptr, norm_ptr, P, alpha, beta,
    HAS_LDAM: tl.constexpr, HAS_FOCAL: tl.constexpr, MEAN: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """One program: the loss ``alpha * sum(ldam) [/ W] + beta * sum(focal) [/ n]`` from the ``[P, 4]``
    partials, and for ``MEAN`` the normalisers ``[W, n]`` for backward.

    A fixed-order sum (deterministic); a term whose coefficient is 0 is left out, not multiplied
    by 0, since its normaliser may be 0.
    """
    column = tl.arange(0, 4)
    acc = tl.zeros([BLOCK_P, 4], dtype=tl.float32)
    for start in range(0, P, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        acc += tl.load(
            partial_ptr + rows[:, None].to(tl.int64) * 4 + column[None, :], mask=(rows < P)[:, None], other=0.0
        )
    sums = tl.sum(acc, axis=0)
    ldam = tl.sum(tl.where(column == 0, sums, 0.0), axis=0)
    focal = tl.sum(tl.where(column == 1, sums, 0.0), axis=0)
    if MEAN:
        weight = tl.sum(tl.where(column == 2, sums, 0.0), axis=0)
        count = tl.sum(tl.where(column == 3, sums, 0.0), axis=0)
        ldam = ldam / weight
        focal = focal / count
        tl.store(norm_ptr, weight)
        tl.store(norm_ptr + 1, count)
    loss = 0.0
    if HAS_LDAM:
        loss += alpha * ldam
    if HAS_FOCAL:
        loss += beta * focal
    tl.store(loss_ptr, loss)


@triton.jit(do_not_specialize=["slv"])
def _row_backward_kernel(
    grad_out_ptr, logit_ptr, label_ptr, norm_ptr, margin_ptr, ldam_weight_ptr, focal_weight_ptr, grad_ptr,
    V, szb, szc, szv, slb, slv, sgb, sgc, sgv, sob, sov, alpha, beta, gamma, s, ignore_index,
    C: tl.constexpr, CLASS_LAST: tl.constexpr, HAS_LDAM: tl.constexpr, HAS_FOCAL: tl.constexpr,
    MEAN: tl.constexpr, PER_ROW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """The final gradient of the module docstring, in float32, rounded once into the gradient's dtype."""
    _, b, v = tile_position(V, BLOCK_V)
    vmask = v < V
    margins, ldam_weights, focal_weights = _class_constants(margin_ptr, ldam_weight_ptr, focal_weight_ptr, C, BLOCK_C)
    cls = tl.arange(0, BLOCK_C)
    coef_ldam = alpha * s
    coef_focal = beta
    if MEAN:
        # 1 / W and 1 / n in float32 from the device (inf for an empty batch: the NaN gradient
        # of the reference, through 0 * inf below).
        coef_ldam = coef_ldam / tl.load(norm_ptr)
        coef_focal = coef_focal / tl.load(norm_ptr + 1)
    if not PER_ROW:
        grad_output = tl.load(grad_out_ptr)
        coef_ldam = coef_ldam * grad_output
        coef_focal = coef_focal * grad_output
    _, _, w_t, a_t, _, _, onehot, e, scale_e, rest_e, e_q, scale_q, rest_q = _row_tile(
        logit_ptr, label_ptr, b, v, V, szb, szc, szv, slb, slv, ignore_index, margins, ldam_weights,
        focal_weights, s, gamma, C, CLASS_LAST, HAS_LDAM, HAS_FOCAL, BLOCK_C,
    )  # fmt: skip
    c_ldam = coef_ldam * w_t
    c_focal = coef_focal * a_t
    if PER_ROW:
        grad_output = tl.load(grad_out_ptr + b * sob + v * sov, mask=vmask, other=0.0)
        c_ldam = c_ldam * grad_output
        c_focal = c_focal * grad_output
    if HAS_LDAM:
        g = (c_ldam * scale_q)[None, :] * e_q
        g_t = c_ldam * rest_q
        if HAS_FOCAL:
            g += (c_focal * scale_e)[None, :] * e
            g_t += c_focal * rest_e
    else:
        g = (c_focal * scale_e)[None, :] * e
        g_t = c_focal * rest_e
    g = tl.where(onehot, -g_t[None, :], g)
    offsets = _offsets(b, v, cls, V, sgb, sgc, sgv, C, CLASS_LAST)
    tl.store(grad_ptr + offsets, g.to(grad_ptr.dtype.element_ty), mask=(cls < C)[:, None] & vmask[None, :])


def _layout(logits: torch.Tensor, grad_view: torch.Tensor | None):
    """``(z, class_last)``: the ``(B, C, V)`` view and whether logits (and gradient) are rows of
    ``C`` contiguous classes, addressed as ``(b V + v) C + c``.

    Only for ``C`` a power of two: a row then spans whole vectors (or a whole number of rows one
    vector). With another ``C`` rows are not aligned, the loads are scalar either way, and the
    class-last addressing made ptxas spill (bf16 C = 5: 255 registers); the strided path does not.
    """
    z = class_view(logits)
    batch, num_classes, num_voxels = z.shape

    def packed(t: torch.Tensor) -> bool:
        rows = t.stride(1) == 1 and t.stride(2) == num_classes
        return rows and (batch == 1 or t.stride(0) == num_classes * num_voxels)

    power_of_two = num_classes == triton.next_power_of_2(num_classes)
    return z, power_of_two and packed(z) and (grad_view is None or packed(grad_view))


def _labels(labels: torch.Tensor, class_last: bool) -> torch.Tensor:
    """The ``(B, V)`` labels; a dense map's kernel reads them with voxel stride 1 (copied if not)."""
    lab = label_view(labels)
    return lab if class_last or lab.stride(1) == 1 else lab.contiguous()


def _grid(batch: int, num_voxels: int, config: dict[str, int]) -> tuple[int]:
    return (batch * triton.cdiv(num_voxels, config["BLOCK_V"]),)


def _vectors(device, *vectors):
    return tuple(t.to(device=device, dtype=torch.float32) for t in vectors)


def row_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    margins: torch.Tensor,
    ldam_weight: torch.Tensor,
    focal_weight: torch.Tensor,
    alpha: float,
    beta: float,
    gamma: float,
    s: float,
    ignore_index: int,
    reduction: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, norms)``: the loss (float32; per row in the labels' shape for ``"none"``) and for
    ``"mean"`` the normalisers ``[W, n]`` (float32 on the device; empty otherwise)."""
    z, class_last = _layout(logits, None)
    lab = _labels(labels, class_last)
    batch, num_classes, num_voxels = z.shape
    device = logits.device
    config = launch_config(num_classes, num_voxels, class_last)
    grid = _grid(batch, num_voxels, config)
    margins, ldam_weight, focal_weight = _vectors(device, margins, ldam_weight, focal_weight)
    mean = reduction == "mean"
    per_row = reduction == "none"
    rows = empty((batch, num_voxels), dtype=torch.float32, device=device) if per_row else None
    partial = None if per_row else empty((grid[0], 4), dtype=torch.float32, device=device)
    dummy = margins  # stands in for the pointers a constexpr branch never touches
    _row_forward_kernel[grid](
        z, lab, margins, ldam_weight, focal_weight,
        dummy if rows is None else rows, dummy if partial is None else partial,
        num_voxels, *z.stride(), *lab.stride(), fp32(alpha), fp32(beta), fp32(gamma), fp32(s), ignore_index,
        C=num_classes, CLASS_LAST=class_last, HAS_LDAM=alpha != 0.0, HAS_FOCAL=beta != 0.0, PER_ROW=per_row,
        BLOCK_C=config["BLOCK_C"], BLOCK_V=config["BLOCK_V"], num_warps=config["num_warps"],
    )  # fmt: skip
    norms = empty((2,) if mean else (0,), dtype=torch.float32, device=device)
    if per_row:
        return rows.view(labels.shape), norms
    loss = empty((), dtype=torch.float32, device=device)
    _row_total_kernel[(1,)](
        partial, loss, norms if mean else dummy, grid[0], fp32(alpha), fp32(beta),
        HAS_LDAM=alpha != 0.0, HAS_FOCAL=beta != 0.0, MEAN=mean,
        BLOCK_P=min(triton.next_power_of_2(grid[0]), 1024 if INTERPRETED else 256), num_warps=4,
    )  # fmt: skip
    return loss, norms


def row_backward(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    norms: torch.Tensor,
    margins: torch.Tensor,
    ldam_weight: torch.Tensor,
    focal_weight: torch.Tensor,
    alpha: float,
    beta: float,
    gamma: float,
    s: float,
    ignore_index: int,
    reduction: str,
) -> torch.Tensor:
    """The gradient of the loss for ``grad_loss`` (a float32 scalar, or per row for ``"none"``),
    in the logits' dtype and layout, from one read of logits and labels."""
    grad, grad_view = gradient_buffer(logits)
    z, class_last = _layout(logits, grad_view)
    lab = _labels(labels, class_last)
    batch, num_classes, num_voxels = z.shape
    device = logits.device
    config = launch_config(num_classes, num_voxels, class_last)
    grid = _grid(batch, num_voxels, config)
    margins, ldam_weight, focal_weight = _vectors(device, margins, ldam_weight, focal_weight)
    per_row = reduction == "none"
    grad_loss = grad_loss.to(torch.float32)
    if per_row:
        grad_loss = grad_loss.reshape(batch, num_voxels)  # a view, also of an expanded grad_output
    out_strides = grad_loss.stride() if per_row else (0, 0)
    _row_backward_kernel[grid](
        grad_loss, z, lab, norms if reduction == "mean" else margins, margins, ldam_weight, focal_weight, grad_view,
        num_voxels, *z.stride(), *lab.stride(), *grad_view.stride(), *out_strides,
        fp32(alpha), fp32(beta), fp32(gamma), fp32(s), ignore_index,
        C=num_classes, CLASS_LAST=class_last, HAS_LDAM=alpha != 0.0, HAS_FOCAL=beta != 0.0, MEAN=reduction == "mean",
        PER_ROW=per_row, BLOCK_C=config["BLOCK_C"], BLOCK_V=config["BLOCK_V"],
        num_warps=config["num_warps"],
    )  # fmt: skip
    return finish_gradient(grad, grad_view)
