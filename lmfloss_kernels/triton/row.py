r"""LMF family on Triton: ``alpha * LDAM + beta * focal`` over rows ``(N, C)`` or voxels of ``(B, C, *S)``.

One pass computes the loss and, when a gradient is wanted, a gradient into a fresh buffer
(never into the user's logits). For row ``i`` with label ``t``, validity ``v_i``, class weights
``w^L`` (LDAM) and ``w^F`` (focal), ``q = softmax(s (z_i - m_t e_t))``, ``p = softmax(z_i)``,
``u = 1 - p_t`` and ``G = u^gamma (1 - gamma p_t log(p_t) / u)`` (losses.md 0.2, 1.5), the
buffer holds

.. math::

    g_{ij} = \alpha\, k_L\, v_i w^L_t\, s\,(q_{ij} - \delta_{jt})
        + \beta\, k_F\, v_i w^F_t\, G\,(p_{ij} - \delta_{jt})
    \qquad \frac{\partial L}{\partial z_{ij}} = c\, g_{ij}

with ``k_L = n / W``, ``k_F = 1`` and ``c = 1 / n`` for ``"mean"`` (``W = sum_i v_i w^L_{t_i}``,
``n = sum_i v_i``: label-only sums computed on the device by :func:`_label_sums_kernel`, no host
sync), ``k = c = 1`` otherwise. So for ``"mean"`` the buffer is ``n`` times the gradient of the
mean loss, of order 1 whatever ``N``: the gradient itself, ``~ w G / N`` per entry, falls below
float16's normal range (6.1e-5) from ``N ~ 10^4`` on and would be flushed before a GradScaler's
``grad_output = 2^16`` is applied. Backward multiplies ``g`` by ``grad_output * c`` (per row for
``"none"``) in float32 from a device scalar and rounds once into the logits' dtype. float16
holds ``g`` while ``alpha s max_t w^L_t / (W / n) < 65504``, i.e. for LDAM weights whose
largest is below ~2000 times their mean over the valid rows at ``s = 30``. The entries
``q_t - 1`` and ``p_t - 1`` are written as ``-(1 - q_t)``, ``-u`` from the other classes' mass,
so they do not cancel when the row is confident.

Non-finite logits: the loss of a row (ignored or not) with a NaN or infinite logit is NaN, and
so is the sum / mean, through :func:`._common.nonfinite_probe` added to the row's loss and to
the partial sums; the gradient is left as the softmax makes it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRETED,
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


@triton.jit
def _select(onehot, values):
    """Per voxel, the entry of ``values`` (a [BLOCK_C, BLOCK_V] tile or a [BLOCK_C, 1] column) at the label."""
    return tl.sum(tl.where(onehot, values, 0.0), axis=0)


@triton.jit
def _load_labels(label_ptr, b, v, vmask, cls, cmask, slb, slv, ignore_index):
    label = tl.load(label_ptr + b * slb + v * slv, mask=vmask, other=0).to(tl.int64)
    valid = vmask & (label != ignore_index)
    onehot = (cls[:, None] == label[None, :]) & valid[None, :] & cmask[:, None]
    return valid, onehot


@triton.jit
def _label_sums_kernel(
    label_ptr,
    weight_ptr,
    partial_ptr,
    C,
    V,
    slb,
    slv,
    ignore_index,
    BLOCK_C: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Per program: ``sum v_i w_{t_i}`` and ``sum v_i`` over its voxels, into ``partial[b, pid, 0:2]``."""
    pid, b, v = tile_position(V, BLOCK_V)
    cls = tl.arange(0, BLOCK_C)
    cmask = cls < C
    valid, onehot = _load_labels(label_ptr, b, v, v < V, cls, cmask, slb, slv, ignore_index)
    weight = tl.load(weight_ptr + cls, mask=cmask, other=0.0)
    out = partial_ptr + pid * 2
    tl.store(out, tl.sum(_select(onehot, weight[:, None]), axis=0))
    tl.store(out + 1, tl.sum(valid.to(tl.float32), axis=0))


@triton.jit
def _row_kernel(
    logit_ptr,
    label_ptr,
    margin_ptr,
    ldam_weight_ptr,
    focal_weight_ptr,
    norm_ptr,
    row_loss_ptr,
    partial_ptr,
    grad_ptr,
    C,
    V,
    szb,
    szc,
    szv,
    slb,
    slv,
    sgb,
    sgc,
    sgv,
    alpha,
    beta,
    gamma,
    s,
    ignore_index,
    HAS_LDAM: tl.constexpr,
    HAS_FOCAL: tl.constexpr,
    MEAN: tl.constexpr,
    PER_ROW: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid, b, v = tile_position(V, BLOCK_V)
    cls = tl.arange(0, BLOCK_C)
    vmask = v < V
    cmask = cls < C
    tile_mask = cmask[:, None] & vmask[None, :]
    valid, onehot = _load_labels(label_ptr, b, v, vmask, cls, cmask, slb, slv, ignore_index)
    valid_f = valid.to(tl.float32)
    cls64 = cls.to(tl.int64)
    z = tl.load(logit_ptr + b * szb + cls64[:, None] * szc + v[None, :] * szv, mask=tile_mask, other=0.0)
    z = z.to(tl.float32)
    probe = nonfinite_probe(z)
    z = tl.where(cmask[:, None], z, float("-inf"))

    # k_L of the module docstring (k_F = 1): the gradient of n * loss for "mean", order 1.
    if MEAN:
        scale_ldam = tl.load(norm_ptr + 1) / tl.load(norm_ptr)
    else:
        scale_ldam = 1.0

    ldam = tl.zeros([BLOCK_V], dtype=tl.float32)
    focal = tl.zeros([BLOCK_V], dtype=tl.float32)
    grad = tl.zeros([BLOCK_C, BLOCK_V], dtype=tl.float32)
    if HAS_LDAM:
        margin = tl.load(margin_ptr + cls, mask=cmask, other=0.0)
        w_t = _select(onehot, tl.load(ldam_weight_ptr + cls, mask=cmask, other=0.0)[:, None]) * valid_f
        shifted = s * (z - tl.where(onehot, margin[:, None], 0.0))
        q, log_q, one_minus_q, _ = softmax_columns(shifted, cls, cmask)
        ldam = -w_t * _select(onehot, log_q)
        if HAS_GRAD:
            q_minus_y = tl.where(onehot, -_select(onehot, one_minus_q)[None, :], q)
            grad += (alpha * s * scale_ldam * w_t)[None, :] * q_minus_y
    if HAS_FOCAL:
        p, log_p, one_minus_p, _ = softmax_columns(z, cls, cmask)
        a_t = _select(onehot, tl.load(focal_weight_ptr + cls, mask=cmask, other=0.0)[:, None]) * valid_f
        log_pt = _select(onehot, log_p)
        u = _select(onehot, one_minus_p)
        modulation = power(u, gamma)
        focal = -a_t * modulation * log_pt
        if HAS_GRAD:
            factor = focal_gradient_factor(_select(onehot, p), log_pt, u, modulation, gamma)
            p_minus_y = tl.where(onehot, -u[None, :], p)
            grad += (beta * a_t * factor)[None, :] * p_minus_y

    # The probe (0, or NaN for a row with a non-finite logit) goes into the row's loss, and into
    # both partial sums since the total leaves out a term whose coefficient is 0.
    if PER_ROW:
        tl.store(row_loss_ptr + b * V + v, alpha * ldam + beta * focal + probe, mask=vmask)
    else:
        out = partial_ptr + pid * 2
        tile_probe = tl.sum(probe, axis=0)
        tl.store(out, tl.sum(ldam, axis=0) + tile_probe)
        tl.store(out + 1, tl.sum(focal, axis=0) + tile_probe)
    if HAS_GRAD:
        g_offsets = b * sgb + cls64[:, None] * sgc + v[None, :] * sgv
        tl.store(grad_ptr + g_offsets, grad.to(grad_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _row_total_kernel(
    partial_ptr,
    norm_ptr,
    loss_ptr,
    P,
    alpha,
    beta,
    HAS_LDAM: tl.constexpr,
    HAS_FOCAL: tl.constexpr,
    MEAN: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """One program: ``alpha * sum(ldam) [/ W] + beta * sum(focal) [/ N]`` from the ``[P, 2]`` partials.

    A fixed-order sum (deterministic); a term whose coefficient is 0 is left out, not multiplied
    by 0, since its normaliser may be 0.
    """
    pair = tl.arange(0, 2)
    acc = tl.zeros([BLOCK_P, 2], dtype=tl.float32)
    for start in range(0, P, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        acc += tl.load(
            partial_ptr + rows[:, None].to(tl.int64) * 2 + pair[None, :], mask=(rows < P)[:, None], other=0.0
        )
    sums = tl.sum(acc, axis=0)
    if MEAN:
        sums = sums / tl.load(norm_ptr + pair)
    coefficients = tl.where(pair == 0, alpha, beta)
    keep = ((pair == 0) & HAS_LDAM) | ((pair == 1) & HAS_FOCAL)
    tl.store(loss_ptr, tl.sum(tl.where(keep, coefficients * sums, 0.0), axis=0))


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
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, g, norms)``: the loss (float32; per row in the labels' shape for ``"none"``), if
    asked the buffer ``g`` of the module docstring in the logits' dtype (else an empty tensor),
    and for ``"mean"`` the normalisers ``[W, n]`` (float32; empty otherwise): the gradient for
    ``grad_output`` is ``g * grad_output / n`` for ``"mean"``."""
    z = class_view(logits)
    lab = label_view(labels)
    batch, num_classes, num_voxels = z.shape
    device = logits.device
    config = launch_config(num_classes, num_voxels)
    blocks = triton.cdiv(num_voxels, config["BLOCK_V"])
    grid = (batch * blocks,)
    margins, ldam_weight, focal_weight = (
        t.to(device=device, dtype=torch.float32) for t in (margins, ldam_weight, focal_weight)
    )
    mean = reduction == "mean"
    per_row = reduction == "none"

    norm = partial_norm = None
    if mean:
        partial_norm = empty((batch, blocks, 2), dtype=torch.float32, device=device)
        _label_sums_kernel[grid](
            lab, ldam_weight, partial_norm, num_classes, num_voxels, *lab.stride(), ignore_index,
            BLOCK_C=config["BLOCK_C"], BLOCK_V=config["BLOCK_V"], num_warps=config["num_warps"],
        )  # fmt: skip
        norm = partial_norm.sum((0, 1))
    rows = empty((batch, num_voxels), dtype=torch.float32, device=device) if per_row else None
    partial = None if per_row else empty((batch, blocks, 2), dtype=torch.float32, device=device)
    if compute_grad:
        grad, grad_view = gradient_buffer(logits)
        grad_strides = grad_view.stride()
    else:
        grad = grad_view = logits.new_empty(0)
        grad_strides = (0, 0, 0)
    dummy = margins  # stands in for the pointers a constexpr branch never touches
    _row_kernel[grid](
        z, lab, margins, ldam_weight, focal_weight,
        dummy if norm is None else norm,
        dummy if rows is None else rows,
        dummy if partial is None else partial,
        grad_view if compute_grad else dummy,
        num_classes, num_voxels, *z.stride(), *lab.stride(), *grad_strides,
        fp32(alpha), fp32(beta), fp32(gamma), fp32(s), ignore_index,
        HAS_LDAM=alpha != 0.0, HAS_FOCAL=beta != 0.0, MEAN=mean, PER_ROW=per_row, HAS_GRAD=compute_grad,
        BLOCK_C=config["BLOCK_C"], BLOCK_V=config["BLOCK_V"], num_warps=config["num_warps"],
    )  # fmt: skip
    if compute_grad:
        grad = finish_gradient(grad, grad_view)
    norms = norm if mean else logits.new_empty(0, dtype=torch.float32)
    if per_row:
        return rows.view(labels.shape), grad, norms
    loss = empty((), dtype=torch.float32, device=device)
    _row_total_kernel[(1,)](
        partial, dummy if norm is None else norm, loss, batch * blocks, fp32(alpha), fp32(beta),
        HAS_LDAM=alpha != 0.0, HAS_FOCAL=beta != 0.0, MEAN=mean,
        BLOCK_P=min(triton.next_power_of_2(batch * blocks), 1024 if INTERPRETED else 256), num_warps=4,
    )  # fmt: skip
    return loss, grad, norms
