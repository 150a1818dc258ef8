r"""Region family on Triton: per-voxel focal cross-entropy plus per-(b, c) focal Tversky terms.

Three steps (losses.md 0.4, 2.6), carrying only ``O(B C)`` numbers between them:

1. **Statistics pass** (:func:`_region_kernel` with ``BACKWARD=False``): one read of logits and
   target. Each program writes, for its voxels of image ``b``, the focal sum
   ``sum_i sum_c a_c y_ic (1 - q_ic)^{gamma_c} (-log q_ic)``, the valid-voxel count and the
   per-class ``TP = sum y q``, ``FN = sum y (1 - q)``, ``FP = sum (1 - y) q`` into its own row of a
   ``[B, programs, 2 + 3C]`` buffer; a fixed-order ``sum`` over programs gives the per-image
   statistics (deterministic, no atomics). FN and FP are accumulated directly, never as
   ``Y - TP`` or ``P - TP``.
2. **Finalize** (:func:`_tversky_terms`, plain torch on ``(B, C)`` tensors, no host sync): the
   loss of :func:`lmfloss_kernels.reference.region_loss` and, in backward, the coefficients
   below.
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
    power,
    softmax_columns,
    tile_position,
)

_TINY = torch.finfo(torch.float32).tiny


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
    cls64 = cls.to(tl.int64)
    vmask = v < V
    cmask = cls < C
    tile_mask = cmask[:, None] & vmask[None, :]

    z = tl.load(logit_ptr + b * szb + cls64[:, None] * szc + v[None, :] * szv, mask=tile_mask, other=0.0)
    z = tl.where(cmask[:, None], z.to(tl.float32), float("-inf"))
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
    valid_f = valid.to(tl.float32)

    p, log_p, one_minus_p, is_top = softmax_columns(z, cls, cmask)
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
            modulation = power(one_minus_p, gamma)
            factor = focal_gradient_factor(p, log_p, one_minus_p, modulation, gamma)
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
        g_offsets = b * sgb + cls64[:, None] * sgc + v[None, :] * sgv
        tl.store(grad_ptr + g_offsets, grad.to(grad_ptr.dtype.element_ty), mask=tile_mask)
    else:
        out = partial_ptr + pid * (2 + 3 * C)
        focal = 0.0
        if HAS_FOCAL:
            term = tl.where(cmask[:, None], alpha * y * power(one_minus_q, gamma) * (-log_q), 0.0)
            focal = tl.sum(tl.sum(term, axis=1), axis=0)
        tl.store(out, focal)
        tl.store(out + 1, tl.sum(valid_f, axis=0))
        live = tile_mask & valid[None, :]
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


def _launch(logits, target, focal_weight, focal_gamma, *, clip, eps, ignore_index, has_focal, has_tversky, **buffers):
    """Run :func:`_region_kernel` in the mode given by ``buffers`` (statistics or gradient)."""
    z = class_view(logits)
    soft = target.is_floating_point()
    t = class_view(target) if soft else label_view(target)
    t_strides = t.stride() if soft else (t.stride(0), 0, t.stride(1))
    batch, num_classes, num_voxels = z.shape
    config = launch_config(num_classes, num_voxels)
    blocks = triton.cdiv(num_voxels, config["BLOCK_V"])
    grid = (batch * blocks,)
    backward = "grad" in buffers
    dummy = focal_weight  # stands in for the pointers a constexpr branch never touches
    if backward:
        grad, grad_view = gradient_buffer(logits)
        partial = dummy
        args = (dummy, buffers["focal_coef"], buffers["coef_a"], buffers["coef_e"], grad_view)
        grad_strides = grad_view.stride()
    else:
        partial = empty((batch, blocks, 2 + 3 * num_classes), dtype=torch.float32, device=logits.device)
        args = (partial, dummy, dummy, dummy, dummy)
        grad_strides = (0, 0, 0)
    _region_kernel[grid](
        z, t, focal_weight, focal_gamma, *args,
        num_classes, num_voxels, *z.stride(), *t_strides, *grad_strides,
        fp32(eps), 0 if ignore_index is None else ignore_index,
        SOFT=soft, HAS_IGNORE=ignore_index is not None, CLIP=clip,
        HAS_FOCAL=has_focal, HAS_TVERSKY=has_tversky, BACKWARD=backward,
        BLOCK_C=config["BLOCK_C"], BLOCK_V=config["BLOCK_V"], num_warps=config["num_warps"],
    )  # fmt: skip
    if backward:
        return finish_gradient(grad, grad_view)
    return partial.sum(1)


def _tversky_terms(stats, num_classes, *, delta, smooth_nr, smooth_dr, batch):
    """``(TP, den, 1 - TI)`` per image and class (per class, summed over images, with ``batch``)."""
    tp, fn, fp = stats[:, 2:].unflatten(1, (3, num_classes)).unbind(1)
    if batch:
        tp, fn, fp = (x.sum(0, keepdim=True) for x in (tp, fn, fp))
    weighted = delta * fn + (1.0 - delta) * fp
    den = tp + weighted + smooth_dr
    return tp, den, (weighted + (smooth_dr - smooth_nr)) / den


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
    stats = _launch(
        logits, target, focal_weight, focal_gamma, clip=clip, eps=eps, ignore_index=ignore_index,
        has_focal=focal_coef != 0.0, has_tversky=tversky_coef != 0.0,
    )  # fmt: skip
    num_classes = logits.shape[1]
    loss = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
    if focal_coef != 0.0:
        loss = loss + focal_coef * stats[:, 0] / stats[:, 1].clamp_min(1.0)
    if tversky_coef != 0.0:
        _, _, one_minus_ti = _tversky_terms(
            stats, num_classes, delta=delta, smooth_nr=smooth_nr, smooth_dr=smooth_dr, batch=batch
        )
        loss = loss + tversky_coef * one_minus_ti.clamp_min(_TINY).pow(tversky_exponent).mean(1)
    if reduction == "none":
        return loss, stats
    return (loss.sum() if reduction == "sum" else loss.mean()), stats


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
    image_weight = grad_loss.to(torch.float32).expand(num_images)
    if reduction == "mean":
        image_weight = image_weight / num_images
    focal = (focal_coef * image_weight / stats[:, 1].clamp_min(1.0)).contiguous()
    coef_a = coef_e = focal  # unused when the Tversky term is off
    if tversky_coef != 0.0:
        tp, den, one_minus_ti = _tversky_terms(
            stats, num_classes, delta=delta, smooth_nr=smooth_nr, smooth_dr=smooth_dr, batch=batch
        )
        region_weight = tversky_coef * (image_weight.sum(0, keepdim=True) if batch else image_weight)
        slope = tversky_exponent * one_minus_ti.clamp_min(_TINY).pow(tversky_exponent - 1.0)
        # torch.clamp_min passes the gradient only where 1 - TI >= tiny, as in the reference.
        g = region_weight[:, None] * slope * (one_minus_ti >= _TINY) / num_classes
        coef_a = (-g / den).expand(num_images, num_classes).contiguous()
        coef_e = (g * (1.0 - delta) * ((tp + smooth_nr) / den) / den).expand(num_images, num_classes).contiguous()
    return _launch(
        logits, target, focal_weight, focal_gamma, clip=clip, eps=eps, ignore_index=ignore_index,
        has_focal=focal_coef != 0.0, has_tversky=tversky_coef != 0.0,
        grad=True, focal_coef=focal, coef_a=coef_a, coef_e=coef_e,
    )  # fmt: skip
