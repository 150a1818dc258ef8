r"""Eager PyTorch definitions of every loss: the executable specification.

Every named loss of the package (LMF, LDAM, focal, Unified Focal, focal Tversky, Mixed Focal,
Tversky, Dice) is one of two *loss families*, each defined here once, in plain differentiable
PyTorch, from logits:

* :func:`row_loss` — per-row softmax losses on ``(N, C)`` rows or dense ``(B, C, *S)`` maps
  where every voxel is a row (LMF = alpha * LDAM + beta * focal and its two components).
* :func:`region_loss` — segmentation losses that combine a per-voxel focal cross-entropy with a
  per-image, per-class Tversky index (Unified Focal, focal Tversky, Mixed Focal, Tversky, Dice).

:mod:`lmfloss_kernels.functional` maps each named loss's keywords onto these families, so the
reference and every fused backend are checked against exactly the same definitions. Gradients
come from autograd; the fused backends implement the closed forms of ``losses.md`` instead.

Precision: half-precision logits are upcast to float32 (``upcast=True``, the default, matching
the fused kernels); float64 stays float64 so :func:`torch.autograd.gradcheck` works.
``upcast=False`` computes in the input dtype, which is the "reference in the same dtype" of the
Cut Cross-Entropy tolerance rule.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _distributed

__all__ = ["drw_weights", "ldam_margins", "region_loss", "row_loss"]


def ldam_margins(class_counts: torch.Tensor, max_m: float = 0.5) -> torch.Tensor:
    r"""LDAM per-class margins ``m_j = max_m * (n_min / n_j) ** (1/4)``.

    As in ``get_mlist`` of the LMF authors (Adnan-Sadi/LMFLOSS ``utils.py``) and ``LDAMLoss`` of
    Cao et al. (kaidic/LDAM-DRW): the rarest class gets ``max_m``, the others less.
    ``class_counts``: a 1-D tensor or a sequence of positive numbers. Computed in float64; returns
    float32 (float64 if the counts are a float64 tensor) on the counts' device.
    """
    class_counts = torch.as_tensor(class_counts)
    m = class_counts.to(torch.float64).pow(-0.25)
    m = m * (max_m / m.max())
    return m.to(torch.float64 if class_counts.dtype == torch.float64 else torch.float32)


def drw_weights(class_counts: torch.Tensor, beta: float = 0.9999) -> torch.Tensor:
    r"""Deferred re-weighting class weights ``w_j ∝ (1 - beta) / (1 - beta ** n_j)``, summing to C.

    The "effective number of samples" weights that kaidic/LDAM-DRW switches on late in training
    (``--train_rule DRW``, ``beta = 0.9999``). ``beta = 0`` gives all ones. ``class_counts`` as in
    :func:`ldam_margins`.
    """
    class_counts = torch.as_tensor(class_counts)
    counts = class_counts.to(torch.float64)
    w = (1.0 - beta) / (1.0 - torch.pow(torch.full_like(counts, beta), counts))
    w = w / w.sum() * counts.numel()
    return w.to(torch.float64 if class_counts.dtype == torch.float64 else torch.float32)


def _math_dtype(logits: torch.Tensor, upcast: bool) -> torch.Tensor:
    if upcast and logits.dtype in (torch.float16, torch.bfloat16):
        return logits.float()
    return logits


def _focal_modulation(one_minus_p: torch.Tensor, gamma: torch.Tensor | float) -> torch.Tensor:
    # (1 - p) ** gamma with a finite derivative at p = 1: there the term it multiplies (-log p)
    # is 0 too, so clamping to the smallest normal number changes no value and avoids 0 * inf.
    tiny = torch.finfo(one_minus_p.dtype).tiny
    return one_minus_p.clamp_min(tiny).pow(gamma)


def row_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    margins: torch.Tensor,
    ldam_weight: torch.Tensor,
    focal_weight: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    gamma: float,
    s: float,
    ignore_index: int,
    reduction: str,
    upcast: bool = True,
) -> torch.Tensor:
    r"""LMF family: ``alpha * LDAM + beta * focal`` over rows.

    Rows are ``logits`` of shape ``(N, C)`` with ``labels`` ``(N,)``, or every voxel of
    ``(B, C, *S)`` with labels ``(B, *S)``. With ``t`` the label of row ``i``,
    ``v_i = [t_i != ignore_index]``, ``p = softmax(z_i)``:

    .. math::

        \ell^{LDAM}_i &= -\log \mathrm{softmax}\big(s\,(z_i - m_{t} e_{t})\big)_{t} \\
        \ell^{F}_i &= -(1 - p_{t})^{\gamma} \log p_{t} \\
        \text{mean} &= \alpha \frac{\sum_i v_i w^{L}_{t} \ell^{LDAM}_i}{\sum_i v_i w^{L}_{t}}
                     + \beta \frac{\sum_i v_i w^{F}_{t} \ell^{F}_i}{\sum_i v_i}

    ``"none"`` returns ``alpha * w^L_t * l^LDAM_i + beta * w^F_t * l^F_i`` per row (0 for
    ignored rows) in the labels' shape; ``"sum"`` is its sum. As with
    :func:`torch.nn.functional.cross_entropy`, ``"mean"`` divides the weighted LDAM sum by the
    sum of weights, not by N, and is NaN when every row is ignored (the kernels' contract too; the
    public functions turn that case into 0 with a zero gradient, see
    :func:`lmfloss_kernels.functional._row_family`). A term whose coefficient is 0 is not evaluated.
    """
    z = _math_dtype(logits, upcast)
    num_classes = z.shape[1]
    rows = z.movedim(1, -1).reshape(-1, num_classes)
    target = labels.reshape(-1).long()
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    valid_f = valid.to(rows.dtype)
    column = safe_target.unsqueeze(1)

    per_row = torch.zeros_like(valid_f)
    ldam_sum = rows.new_zeros(())
    focal_sum = rows.new_zeros(())
    if alpha != 0.0:
        margin = margins.to(rows.dtype)[safe_target].unsqueeze(1)
        shifted = rows - margin * F.one_hot(safe_target, num_classes).to(rows.dtype)
        ce = -F.log_softmax(s * shifted, dim=1).gather(1, column).squeeze(1)
        weighted = ldam_weight.to(rows.dtype)[safe_target] * valid_f * ce
        per_row = per_row + alpha * weighted
        ldam_sum = weighted.sum() / (ldam_weight.to(rows.dtype)[safe_target] * valid_f).sum()
    if beta != 0.0:
        log_pt = F.log_softmax(rows, dim=1).gather(1, column).squeeze(1)
        modulation = _focal_modulation(-torch.expm1(log_pt), gamma)
        weighted = focal_weight.to(rows.dtype)[safe_target] * valid_f * modulation * (-log_pt)
        per_row = per_row + beta * weighted
        focal_sum = weighted.sum() / valid_f.sum()

    if reduction == "none":
        return per_row.reshape(labels.shape)
    if reduction == "sum":
        return per_row.sum()
    return alpha * ldam_sum + beta * focal_sum


def region_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    focal_weight: torch.Tensor,
    focal_gamma: torch.Tensor,
    tversky_exponent: torch.Tensor,
    *,
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
    upcast: bool = True,
    sync: _distributed.DistSync | None = None,
    sigmoid: bool = False,
) -> torch.Tensor:
    r"""Region family: per-voxel focal cross-entropy plus per-class focal Tversky terms.

    ``logits`` ``(B, C, *S)``; ``target`` an integer label map ``(B, *S)`` (one-hot is implied,
    voxels equal to ``ignore_index`` are dropped from every sum) or a float one-hot / soft map
    ``(B, C, *S)``. ``p = softmax(z)`` per voxel; ``q = clip(p, eps, 1 - eps)`` when
    ``clip`` (the authors' Keras semantics: the gradient is zero where ``p`` lies outside
    ``[eps, 1 - eps]``) else ``q = p`` with ``log q`` taken in log space. For image ``b``
    with ``V_b`` valid voxels and class ``c``:

    .. math::

        F_b &= \frac{1}{V_b}\sum_{i} \sum_c a_c\, y_{ic} (1 - q_{ic})^{\gamma_c} (-\log q_{ic}) \\
        TP_{bc} &= \sum_i y q,\quad FN_{bc} = \sum_i y (1 - q),\quad FP_{bc} = \sum_i (1 - y) q \\
        TI_{bc} &= \frac{TP + s_{nr}}{TP + \delta FN + (1 - \delta) FP + s_{dr}} \\
        R_b &= \frac{1}{C}\sum_c (1 - TI_{bc})^{e_c} \\
        L_b &= w_{FT} R_b + w_F F_b

    ``a = focal_weight``, ``gamma_c = focal_gamma``, ``e_c = tversky_exponent``,
    ``w_F = focal_coef``, ``w_FT = tversky_coef`` (a term with coefficient 0 is skipped).
    ``1 - TI`` is formed as ``(delta FN + (1 - delta) FP + s_dr - s_nr) / den`` from sums of
    non-negative terms, never as a difference of nearly equal numbers (losses.md 6.2).
    ``batch=True`` sums TP, FN, FP over the batch first, so every image shares one ``R``.

    Reductions: ``"none"`` returns ``L_b`` of shape ``(B,)``; ``"mean"`` its mean (the authors'
    value, with all voxels valid); ``"sum"`` its sum.

    ``sync`` (``dist_sync=True`` of the functional API): the loss of the batch concatenated over
    the ranks of a process group, from one all-reduce of ``[sum_b P_b, B, TP, FN, FP]``, where
    ``P_b`` is the part of ``L_b`` private to image ``b``; the other ranks' numbers are
    constants, so each rank's gradient is its slice of the global one
    (:mod:`lmfloss_kernels._distributed`).

    ``sigmoid=True`` (multi-label): ``p_c = sigmoid(z_c)``, every channel an independent binary
    problem, and ``target`` a multi-hot map ``(B, C, *S)`` (float in ``[0, 1]``, bool or uint8;
    channels may overlap) or an integer label map (one-hot implied, as above). ``focal_weight``
    and ``focal_gamma`` then have shape ``(2, C)``: row 0 for the positive side ``y``, row 1 for
    the negative side ``1 - y``, and the focal sum becomes

    .. math::

        F_b = \frac{1}{V_b}\sum_i \sum_c a^+_c\, y\, (1 - q)^{\gamma^+_c} (-\log q)
              + a^-_c (1 - y)\, q^{\gamma^-_c} (-\log (1 - q))

    (binary cross-entropy for ``a = 1, gamma = 0``; the two-channel softmax focal term of logits
    ``(0, z)`` for ``a^- = a_0, gamma^- = gamma_0, a^+ = a_1, gamma^+ = gamma_1``). ``q`` and
    ``1 - q`` are clipped to ``[eps, 1 - eps]`` when ``clip``, and ``log q = logsigmoid(z)``,
    ``log(1 - q) = logsigmoid(-z)`` are taken in log space. TP, FN, FP and the Tversky terms are
    those above, per channel, on ``q``.
    """
    z = _math_dtype(logits, upcast)
    batch_size, num_classes = z.shape[:2]
    z = z.reshape(batch_size, num_classes, -1)
    log_p = F.logsigmoid(z) if sigmoid else F.log_softmax(z, dim=1)
    p = log_p.exp()

    if target.dim() == logits.dim():  # one-hot / soft / multi-hot map
        y = target.reshape(batch_size, num_classes, -1).to(z.dtype)
        valid = torch.ones_like(z[:, :1])
    else:
        label = target.reshape(batch_size, 1, -1).long()
        keep = torch.ones_like(label, dtype=torch.bool) if ignore_index is None else label != ignore_index
        safe_label = torch.where(keep, label, torch.zeros_like(label))
        valid = keep.to(z.dtype)
        y = F.one_hot(safe_label.squeeze(1), num_classes).movedim(-1, 1).to(z.dtype) * valid

    if clip:
        # Same clip masks as clamping p (in exact arithmetic), but 1 - q and log q are formed from
        # log p: in float32, 1 - clamp(p, eps, 1 - eps) rounds to 1.19e-7 instead of eps.
        q = p.clamp(eps, 1.0 - eps)
        one_minus_q = (-torch.expm1(log_p)).clamp(eps, 1.0 - eps)
        log_q = log_p.clamp(math.log(eps), math.log1p(-eps))
    else:
        q = p
        one_minus_q = -torch.expm1(log_p)
        log_q = log_p
    if sigmoid:
        log_one_minus_q = F.logsigmoid(-z)
        if clip:
            log_one_minus_q = log_one_minus_q.clamp(math.log(eps), math.log1p(-eps))

    private = z.new_zeros(batch_size)
    shared = None
    if focal_coef != 0.0:
        weight = focal_weight.to(z.dtype).view(-1, 1, num_classes, 1)
        gamma = focal_gamma.to(z.dtype).view(-1, 1, num_classes, 1)
        terms = weight[0] * y * _focal_modulation(one_minus_q, gamma[0]) * (-log_q)
        if sigmoid:
            terms = terms + weight[1] * (1.0 - y) * _focal_modulation(q, gamma[1]) * (-log_one_minus_q)
        voxel = terms.sum(1) * valid[:, 0]
        private = private + focal_coef * voxel.sum(1) / valid.sum((1, 2)).clamp_min(1.0)
    if tversky_coef != 0.0:
        tp = (y * q * valid).sum(-1)
        fn = (y * one_minus_q * valid).sum(-1)
        fp = ((1.0 - y) * q * valid).sum(-1)
        if batch:
            tp, fn, fp = (t.sum(0, keepdim=True) for t in (tp, fn, fp))
    totals = None
    if sync is not None:
        # One all-reduce of [sum_b P_b, B, TP, FN, FP]; the other ranks' numbers are constants.
        sums = [tp, fn, fp] if tversky_coef != 0.0 and batch else []
        if not batch and tversky_coef != 0.0:
            private = private + tversky_coef * _tversky_term(
                tp, fn, fp, tversky_exponent, z.dtype, delta, smooth_nr, smooth_dr
            )
        local = torch.cat(
            [private.sum().reshape(1), private.new_full((1,), float(batch_size)), *(t.reshape(-1) for t in sums)]
        )
        totals = sync.all_reduce(local)
        if sums:
            tp, fn, fp = (
                t + (g.view_as(t) - t).detach() for t, g in zip(sums, totals[2:].to(z.dtype).chunk(3), strict=True)
            )
    if tversky_coef != 0.0 and (sync is None or batch):
        shared = tversky_coef * _tversky_term(tp, fn, fp, tversky_exponent, z.dtype, delta, smooth_nr, smooth_dr)
    if totals is not None:
        return _distributed.combine(private, None if shared is None else shared[0], totals[:2], reduction)

    loss = private if shared is None else private + shared
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.mean()


def _tversky_term(tp, fn, fp, tversky_exponent, dtype, delta, smooth_nr, smooth_dr) -> torch.Tensor:
    den = tp + delta * fn + (1.0 - delta) * fp + smooth_dr
    one_minus_ti = (delta * fn + (1.0 - delta) * fp + (smooth_dr - smooth_nr)) / den
    exponent = tversky_exponent.to(dtype).view(1, -1)
    return one_minus_ti.clamp_min(torch.finfo(dtype).tiny).pow(exponent).mean(1)
