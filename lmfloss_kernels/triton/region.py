r"""Region family on Triton: per-voxel focal cross-entropy plus per-(b, c) focal Tversky terms.

Three steps (losses.md 0.4, 2.6), carrying only ``O(B C)`` numbers between them:

1. **Statistics pass** (:func:`_region_kernel` with ``BACKWARD=False``): one read of logits and
   target. Each program writes, for its voxels of image ``b``, the focal sum
   ``sum_i sum_c a_c y_ic (1 - q_ic)^{gamma_c} (-log q_ic)`` (plus the non-finite probe
   ``sum_i sum_c 0 * z_ic`` over all its voxels, ignored ones included: NaN when a logit is NaN
   or +-inf, which the finalize adds to the image's loss with or without a focal term; the
   non-finite logits policy of functional.py without a second read), the valid-voxel count and the
   per-class ``TP = sum y q``, ``FN = sum y (1 - q)``, ``FP = sum (1 - y) q`` into its own row of a
   ``[B, programs, 2 + 3C]`` buffer (no atomics). FN and FP are accumulated directly, never as
   ``Y - TP`` or ``P - TP``.
2. **Finalize**: a fixed-order ``sum`` over programs gives the per-image statistics
   ``[B, 2 + 3C]`` (deterministic), then :func:`_finalize_kernel` (one program, no host sync)
   the loss of :func:`lmfloss_kernels.reference.region_loss`; in backward, from the statistics
   and ``grad_output``, the per-image focal coefficient and the per-(b, c) ``A``, ``E`` below.
   One kernel instead of some twenty tiny torch ops, whose launches would cost as much as a
   pass over a 2x4x192^3 volume.
3. **Gradient pass** (``BACKWARD=True``): one read of logits and target, one write of the
   gradient.

Gradient. With ``W_b`` the weight of image ``b``'s loss in the output (``grad_output / B``
for ``"mean"``), ``n_b`` its valid voxels, ``den = TP + delta FN + (1 - delta) FP + s_dr``,
``o = 1 - TI`` (formed as in the reference), ``TI = (TP + s_nr) / den`` and
``g_{bc} = w_FT W_b e_c o^{e_c - 1} / C`` (summed over images when ``batch``):

.. math::

    h_{ic} &= \mathrm{mask}_{ic}\Big[-\frac{w_F W_b}{n_b} a_c y_{ic} G_c(p_{ic})
              + p_{ic} v_i \big(A_{bc} y_{ic} + E_{bc}\big)\Big],\qquad
    A_{bc} = -\frac{g_{bc}}{den},\ E_{bc} = \frac{g_{bc} (1 - \delta) TI}{den} \\
    \frac{\partial L}{\partial z_{ij}} &= h_{ij} - p_{ij} \sum_c h_{ic}

where ``h_c = p_c dL/dp_c``, ``G_c(p) = (1-p)^{gamma_c} (1 - gamma_c p log(p) / (1-p))``
(losses.md 0.2, finite for ``gamma < 1`` and at ``p = 1``), ``mask = [eps <= p <= 1 - eps]``
with ``clip`` (torch.clamp's gradient, the authors' dead zone) and 1 without. For the voxel's
arg-max class the last line is evaluated as ``(1 - p_j) h_j - p_j sum_{c != j} h_c`` with the
accurate ``1 - p_j``, so confident voxels keep a float32-accurate gradient (the float32
reference loses about 1e-7 / (1 - p) there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    class_view,
    empty,
    finish_gradient,
    focal_gradient_factor,
    fp32,
    gradient_buffer,
    label_view,
    launch_config,
    nonfinite_probe,
    power,
    softmax_columns,
    tile_position,
)

# Smallest normal float32: the reference clamps 1 - TI to it before the power.
_TINY = tl.constexpr(1.1754943508222875e-38)
_NONE = tl.constexpr(0)
_MEAN = tl.constexpr(2)
_REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}


@triton.jit
def _region_tile(
    logit_ptr, target_ptr, b, v, cls, C, V, szb, szc, szv, stb, stc, stv, ignore_index,
    SOFT: tl.constexpr, HAS_IGNORE: tl.constexpr,
):  # fmt: skip
    """Softmax and target of one ``[BLOCK_C, BLOCK_V]`` tile: ``(p, log p, 1 - p, is_top, y, valid, probe)``
    with the per-voxel :func:`._common.nonfinite_probe` of the raw logits."""
    cls64 = cls.to(tl.int64)
    vmask = v < V
    cmask = cls < C
    tile_mask = cmask[:, None] & vmask[None, :]
    z = tl.load(logit_ptr + b * szb + cls64[:, None] * szc + v[None, :] * szv, mask=tile_mask, other=0.0)
    z = z.to(tl.float32)
    probe = nonfinite_probe(z)
    z = tl.where(cmask[:, None], z, float("-inf"))
    if SOFT:
        t_offsets = b * stb + cls64[:, None] * stc + v[None, :] * stv
        y = tl.load(target_ptr + t_offsets, mask=tile_mask, other=0.0).to(tl.float32)
        valid = vmask
    else:
        label = tl.load(target_ptr + b * stb + v * stv, mask=vmask, other=0).to(tl.int64)
        valid = vmask
        if HAS_IGNORE:
            valid = valid & (label != ignore_index)
        y = ((cls[:, None] == label[None, :]) & valid[None, :]).to(tl.float32)
    p, log_p, one_minus_p, is_top = softmax_columns(z, cls, cmask)
    return p, log_p, one_minus_p, is_top, y, valid, probe


@triton.jit
def _region_kernel(
    logit_ptr,
    target_ptr,
    focal_weight_ptr,
    focal_gamma_ptr,
    partial_ptr,
    focal_coef_ptr,
    a_ptr,
    e_ptr,
    grad_ptr,
    C,
    V,
    szb,
    szc,
    szv,
    stb,
    stc,
    stv,
    sgb,
    sgc,
    sgv,
    eps,
    ignore_index,
    SOFT: tl.constexpr,
    HAS_IGNORE: tl.constexpr,
    CLIP: tl.constexpr,
    HAS_FOCAL: tl.constexpr,
    HAS_TVERSKY: tl.constexpr,
    BACKWARD: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid, b, v = tile_position(V, BLOCK_V)
    cls = tl.arange(0, BLOCK_C)
    cmask = cls < C
    p, log_p, one_minus_p, is_top, y, valid, probe = _region_tile(
        logit_ptr, target_ptr, b, v, cls, C, V, szb, szc, szv, stb, stc, stv, ignore_index, SOFT, HAS_IGNORE
    )
    valid_f = valid.to(tl.float32)
    if CLIP:
        inside = (p >= eps) & (p <= 1.0 - eps)
        q = tl.minimum(tl.maximum(p, eps), 1.0 - eps)
        one_minus_q = tl.minimum(tl.maximum(one_minus_p, eps), 1.0 - eps)
        # log is monotone, so log(clip(p)) = clip(log p): no second log per element.
        log_q = tl.minimum(tl.maximum(log_p, tl.log(eps)), tl.log(1.0 - eps))
    else:
        q = p
        one_minus_q = one_minus_p
        log_q = log_p
    if HAS_FOCAL:
        alpha = tl.load(focal_weight_ptr + cls, mask=cmask, other=0.0)[:, None]
        gamma = tl.load(focal_gamma_ptr + cls, mask=cmask, other=0.0)[:, None]

    if BACKWARD:
        h = tl.zeros([BLOCK_C, BLOCK_V], dtype=tl.float32)
        if HAS_FOCAL:
            # Inside the clip mask q = p, so G is evaluated on the unclipped, accurate p.
            factor = focal_gradient_factor(p, log_p, one_minus_p, power(one_minus_p, gamma), gamma)
            h -= tl.load(focal_coef_ptr + b) * alpha * y * factor
        if HAS_TVERSKY:
            coef_a = tl.load(a_ptr + b * C + cls, mask=cmask, other=0.0)[:, None]
            coef_e = tl.load(e_ptr + b * C + cls, mask=cmask, other=0.0)[:, None]
            h += p * valid_f[None, :] * (coef_a * y + coef_e)
        if CLIP:
            h = tl.where(inside, h, 0.0)
        h = tl.where(cmask[:, None], h, 0.0)
        # h_j - p_j sum_c h_c cancels for a confident class (p_j -> 1); there it is written as
        # (1 - p_j) h_j - p_j sum_{c != j} h_c from the accurate 1 - p.
        rest = tl.sum(tl.where(is_top, 0.0, h), axis=0)[None, :]
        grad = tl.where(is_top, one_minus_p * h - p * rest, h - p * tl.sum(h, axis=0)[None, :])
        g_offsets = b * sgb + cls.to(tl.int64)[:, None] * sgc + v[None, :] * sgv
        tile_mask = cmask[:, None] & (v < V)[None, :]
        tl.store(grad_ptr + g_offsets, grad.to(grad_ptr.dtype.element_ty), mask=tile_mask)
    else:
        out = partial_ptr + pid * (2 + 3 * C)
        # The focal column carries the non-finite probe of every voxel of the image (ignored
        # ones too); the finalize adds it to the image's loss even without a focal term, and
        # backward never reads the column, so the gradient stays as the softmax makes it.
        focal = tl.sum(probe, axis=0)
        if HAS_FOCAL:
            term = tl.where(cmask[:, None], alpha * y * power(one_minus_q, gamma) * (-log_q), 0.0)
            focal += tl.sum(tl.sum(term, axis=1), axis=0)
        tl.store(out, focal)
        tl.store(out + 1, tl.sum(valid_f, axis=0))
        live = cmask[:, None] & valid[None, :]
        if HAS_TVERSKY:
            tp = tl.sum(tl.where(live, y * q, 0.0), axis=1)
            fn = tl.sum(tl.where(live, y * one_minus_q, 0.0), axis=1)
            fp = tl.sum(tl.where(live, (1.0 - y) * q, 0.0), axis=1)
        else:
            tp = tl.zeros([BLOCK_C], dtype=tl.float32)
            fn = tp
            fp = tp
        tl.store(out + 2 + cls, tp, mask=cmask)
        tl.store(out + 2 + C + cls, fn, mask=cmask)
        tl.store(out + 2 + 2 * C + cls, fp, mask=cmask)


@triton.jit
def _tversky_index(stats_ptr, rows, cls, mask, C, K, delta, smooth_nr, smooth_dr):
    """``(den, 1 - TI, TI)`` from the statistics rows ``rows`` (a [BLOCK_B, BLOCK_C] tile)."""
    at = stats_ptr + rows[:, None] * K + 2 + cls[None, :]
    tp = tl.load(at, mask=mask, other=0.0)
    fn = tl.load(at + C, mask=mask, other=0.0)
    fp = tl.load(at + 2 * C, mask=mask, other=0.0)
    return _index_from_sums(tp, fn, fp, delta, smooth_nr, smooth_dr)


@triton.jit
def _index_from_sums(tp, fn, fp, delta, smooth_nr, smooth_dr):
    weighted = delta * fn + (1.0 - delta) * fp
    den = tp + weighted + smooth_dr
    return den, (weighted + (smooth_dr - smooth_nr)) / den, (tp + smooth_nr) / den


@triton.jit
def _finalize_kernel(
    stats_ptr,
    exponent_ptr,
    grad_loss_ptr,
    loss_ptr,
    focal_coef_ptr,
    a_ptr,
    e_ptr,
    B,
    C,
    delta,
    smooth_nr,
    smooth_dr,
    focal_coef,
    tversky_coef,
    BATCH: tl.constexpr,
    HAS_FOCAL: tl.constexpr,
    HAS_TVERSKY: tl.constexpr,
    REDUCTION: tl.constexpr,
    BACKWARD: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One program. Forward: statistics -> loss. Backward: statistics, grad_output -> coefficients.

    With ``R_b = (1/C) sum_c (1 - TI_bc)^{e_c}`` (clamped at the smallest normal, as the
    reference), ``L_b = w_F F_b + w_FT R_b``; backward writes ``w_F W_b / n_b`` and, with
    ``g = w_FT W e_c (1 - TI)^{e_c - 1} / C`` (``W = sum_b W_b`` when ``BATCH``),
    ``A = -g / den`` and ``E = g (1 - delta) TI / den``.
    """
    K = 2 + 3 * C
    cls = tl.arange(0, BLOCK_C)
    cmask = cls < C
    exponent = tl.load(exponent_ptr + cls, mask=cmask, other=0.0)
    # Weight of one image's loss in the output, per unit of grad_output.
    if REDUCTION == _MEAN:
        scale = 1.0 / B
    else:
        scale = 1.0
    # With BATCH, the Tversky sums run over every image first: one index per class.
    if HAS_TVERSKY and BATCH:
        tp = tl.zeros([BLOCK_C], dtype=tl.float32)
        fn = tl.zeros([BLOCK_C], dtype=tl.float32)
        fp = tl.zeros([BLOCK_C], dtype=tl.float32)
        image_weight_sum = 0.0
        for start in range(0, B, BLOCK_B):
            rows = start + tl.arange(0, BLOCK_B)
            mask = (rows < B)[:, None] & cmask[None, :]
            at = stats_ptr + rows[:, None] * K + 2 + cls[None, :]
            tp += tl.sum(tl.load(at, mask=mask, other=0.0), axis=0)
            fn += tl.sum(tl.load(at + C, mask=mask, other=0.0), axis=0)
            fp += tl.sum(tl.load(at + 2 * C, mask=mask, other=0.0), axis=0)
            if BACKWARD:
                if REDUCTION == _NONE:
                    image_weight_sum += tl.sum(tl.load(grad_loss_ptr + rows, mask=rows < B, other=0.0), axis=0)
        den_c, index_c, ti_c = _index_from_sums(tp, fn, fp, delta, smooth_nr, smooth_dr)
        clamped_c = tl.maximum(index_c, _TINY)
        shared_region = tl.sum(tl.where(cmask, power(clamped_c, exponent), 0.0), axis=0) / C
        if BACKWARD:
            if REDUCTION != _NONE:
                image_weight_sum = tl.load(grad_loss_ptr) * scale * B
            slope_c = exponent * power(clamped_c, exponent - 1.0) * (index_c >= _TINY).to(tl.float32)
            g_c = tversky_coef * image_weight_sum * slope_c / C
            a_c = -g_c / den_c
            e_c = g_c * (1.0 - delta) * ti_c / den_c

    total = 0.0
    for start in range(0, B, BLOCK_B):
        rows = start + tl.arange(0, BLOCK_B)
        bmask = rows < B
        mask = bmask[:, None] & cmask[None, :]
        focal_sum = tl.load(stats_ptr + rows * K, mask=bmask, other=0.0)
        valid = tl.maximum(tl.load(stats_ptr + rows * K + 1, mask=bmask, other=1.0), 1.0)
        if BACKWARD:
            if REDUCTION == _NONE:
                image_weight = tl.load(grad_loss_ptr + rows, mask=bmask, other=0.0)
            else:
                image_weight = tl.zeros([BLOCK_B], dtype=tl.float32) + tl.load(grad_loss_ptr) * scale
            tl.store(focal_coef_ptr + rows, focal_coef * image_weight / valid, mask=bmask)
            if HAS_TVERSKY:
                at = rows[:, None] * C + cls[None, :]
                if BATCH:
                    coef_a = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32) + a_c[None, :]
                    coef_e = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32) + e_c[None, :]
                else:
                    den, index, ti = _tversky_index(stats_ptr, rows, cls, mask, C, K, delta, smooth_nr, smooth_dr)
                    clamped = tl.maximum(index, _TINY)
                    slope = exponent[None, :] * power(clamped, exponent[None, :] - 1.0)
                    g = tversky_coef * image_weight[:, None] * slope * (index >= _TINY).to(tl.float32) / C
                    coef_a = -g / den
                    coef_e = g * (1.0 - delta) * ti / den
                tl.store(a_ptr + at, coef_a, mask=mask)
                tl.store(e_ptr + at, coef_e, mask=mask)
        else:
            loss = tl.zeros([BLOCK_B], dtype=tl.float32)
            if HAS_FOCAL:
                loss += focal_coef * focal_sum / valid
            else:
                loss += 0.0 * focal_sum  # the non-finite probe alone: 0 or NaN
            if HAS_TVERSKY:
                if BATCH:
                    loss += tversky_coef * shared_region
                else:
                    _, index, _ = _tversky_index(stats_ptr, rows, cls, mask, C, K, delta, smooth_nr, smooth_dr)
                    terms = tl.where(mask, power(tl.maximum(index, _TINY), exponent[None, :]), 0.0)
                    loss += tversky_coef * tl.sum(terms, axis=1) / C
            if REDUCTION == _NONE:
                tl.store(loss_ptr + rows, loss, mask=bmask)
            else:
                total += tl.sum(tl.where(bmask, loss, 0.0), axis=0)
    if not BACKWARD:
        if REDUCTION != _NONE:
            tl.store(loss_ptr, total * scale)


def _launch(logits, target, focal_weight, focal_gamma, *, clip, eps, ignore_index, has_focal, has_tversky, **buffers):
    """Run :func:`_region_kernel` in the mode given by ``buffers``: the partials, or the gradient."""
    z = class_view(logits)
    soft = target.is_floating_point()
    t = class_view(target) if soft else label_view(target)
    t_strides = t.stride() if soft else (t.stride(0), 0, t.stride(1))
    batch, num_classes, num_voxels = z.shape
    config = launch_config(num_classes, num_voxels)
    blocks = triton.cdiv(num_voxels, config["BLOCK_V"])
    backward = "coef_a" in buffers
    dummy = focal_weight  # stands in for the pointers a constexpr branch never touches
    if backward:
        grad, grad_view = gradient_buffer(logits)
        result = grad
        args = (dummy, buffers["focal_coef"], buffers["coef_a"], buffers["coef_e"], grad_view)
        grad_strides = grad_view.stride()
    else:
        result = empty((batch, blocks, 2 + 3 * num_classes), dtype=torch.float32, device=logits.device)
        args = (result, dummy, dummy, dummy, dummy)
        grad_strides = (0, 0, 0)
    _region_kernel[(batch * blocks,)](
        z, t, focal_weight, focal_gamma, *args,
        num_classes, num_voxels, *z.stride(), *t_strides, *grad_strides,
        fp32(eps), 0 if ignore_index is None else ignore_index,
        SOFT=soft, HAS_IGNORE=ignore_index is not None, CLIP=clip,
        HAS_FOCAL=has_focal, HAS_TVERSKY=has_tversky, BACKWARD=backward, **config,
    )  # fmt: skip
    if backward:
        return finish_gradient(grad, grad_view)
    return result


def _finalize(stats, exponent, grad_loss, outputs, *, batch, delta, focal_coef, tversky_coef, smooth_nr, smooth_dr,
              reduction):  # fmt: skip
    """Launch :func:`_finalize_kernel`: the loss when ``grad_loss`` is None, else the backward coefficients."""
    num_images, num_classes = stats.shape[0], exponent.shape[0]
    _finalize_kernel[(1,)](
        stats, exponent, exponent if grad_loss is None else grad_loss, *outputs,
        num_images, num_classes, fp32(delta), fp32(smooth_nr), fp32(smooth_dr), fp32(focal_coef), fp32(tversky_coef),
        BATCH=batch, HAS_FOCAL=focal_coef != 0.0, HAS_TVERSKY=tversky_coef != 0.0,
        REDUCTION=_REDUCTIONS[reduction], BACKWARD=grad_loss is not None,
        BLOCK_B=min(triton.next_power_of_2(num_images), 16), BLOCK_C=triton.next_power_of_2(num_classes), num_warps=4,
    )  # fmt: skip


def region_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    focal_weight: torch.Tensor,
    focal_gamma: torch.Tensor,
    tversky_exponent: torch.Tensor,
    delta: float,
    focal_coef: float,
    tversky_coef: float,
    smooth_nr: float,
    smooth_dr: float,
    eps: float,
    clip: bool,
    batch: bool,
    ignore_index: int | None,
    reduction: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss (float32) and the per-image statistics ``[focal sum, valid count, TP, FN, FP]``."""
    partial = _launch(
        logits, target, focal_weight, focal_gamma, clip=clip, eps=eps, ignore_index=ignore_index,
        has_focal=focal_coef != 0.0, has_tversky=tversky_coef != 0.0,
    )  # fmt: skip
    stats = partial.sum(1)  # a fixed-order reduction over programs: deterministic
    loss = empty((logits.shape[0],) if reduction == "none" else (), dtype=torch.float32, device=logits.device)
    _finalize(
        stats, tversky_exponent, None, (loss, stats, stats, stats), batch=batch, delta=delta, focal_coef=focal_coef,
        tversky_coef=tversky_coef, smooth_nr=smooth_nr, smooth_dr=smooth_dr, reduction=reduction,
    )  # fmt: skip
    return loss, stats


def region_backward(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    stats: torch.Tensor,
    focal_weight: torch.Tensor,
    focal_gamma: torch.Tensor,
    tversky_exponent: torch.Tensor,
    delta: float,
    focal_coef: float,
    tversky_coef: float,
    smooth_nr: float,
    smooth_dr: float,
    eps: float,
    clip: bool,
    batch: bool,
    ignore_index: int | None,
    reduction: str,
) -> torch.Tensor:
    """Gradient w.r.t. the logits, in their dtype, for upstream ``grad_loss`` (shape of the loss)."""
    num_images, num_classes = logits.shape[:2]
    device = logits.device
    focal = empty((num_images,), dtype=torch.float32, device=device)
    if tversky_coef != 0.0:
        coef_a = empty((num_images, num_classes), dtype=torch.float32, device=device)
        coef_e = empty((num_images, num_classes), dtype=torch.float32, device=device)
    else:
        coef_a = coef_e = focal  # never read: the Tversky branch is compiled out
    _finalize(
        stats, tversky_exponent, grad_loss.to(torch.float32).contiguous(), (focal, focal, coef_a, coef_e),
        batch=batch, delta=delta, focal_coef=focal_coef, tversky_coef=tversky_coef, smooth_nr=smooth_nr,
        smooth_dr=smooth_dr, reduction=reduction,
    )  # fmt: skip
    return _launch(
        logits, target, focal_weight, focal_gamma, clip=clip, eps=eps, ignore_index=ignore_index,
        has_focal=focal_coef != 0.0, has_tversky=tversky_coef != 0.0,
        focal_coef=focal, coef_a=coef_a, coef_e=coef_e,
    )  # fmt: skip
