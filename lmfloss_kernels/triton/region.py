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
with ``clip`` (torch.clamp's gradient, the authors' dead zone) and 1 without. For one class
``j`` per voxel the last line is evaluated as ``(1 - p_j) h_j - p_j sum_{c != j} h_c`` with an
accurate ``1 - p_j``, so confident voxels keep a float32-accurate gradient (the float32
reference loses about 1e-7 / (1 - p) there): the labelled class ``t`` for label maps, the
arg-max class (when it holds more than 2/3 of the mass) for soft targets.

Targets (constexpr ``DENSE``): an integer label map ``(B, *S)``, or a dense map ``(B, C, *S)``,
float (soft / one-hot) or uint8 0/1 (bool is read as uint8), loaded in its own dtype and converted
in registers: a uint8 map moves a quarter of a float32 one.

Sigmoid (multi-label) mode (constexpr ``SIGMOID``, same kernels, tiling and statistics layout):
every class is an independent binary problem, ``p = sigmoid(z)``, focal weight and gamma are
``(2, C)`` (row 0 the positive side ``y``, row 1 the negative side ``1 - y``), and the focal sum is
``sum_i sum_c a+_c y (1-q)^{g+_c} (-log q) + a-_c (1-y) q^{g-_c} (-log(1-q))`` (TP, FN, FP as
above). Per element (``._common.sigmoid_parts``) one ``ex2``, one ``rcp`` and one ``lg2``:
``e = exp(-|z|)``, ``log p = min(z, 0) - log1p(e)``, ``log(1-p) = -max(z, 0) - log1p(e)``, ``p``
and ``1 - p`` from ``1 / (1 + e)`` and ``e / (1 + e)``; the powers come from those logarithms
(one ``ex2`` each). ``clip`` clips ``z`` to ``+-log((1-eps)/eps)`` (the same as clipping ``q``,
``1 - q`` and both logarithms; ``|z|`` beyond it is the dead zone of the gradient). For a 0/1
target (label maps, uint8 maps: constexpr ``BINARY``) only one side of a class is non-zero, and
one power is evaluated instead of two. Gradient, channels independent (``dq/dz = p (1-p)``):

.. math::

    \frac{\partial L}{\partial z_{ic}} = \mathrm{mask}_{ic}\Big[\frac{w_F W_b}{n_b}\big(
        a^+_c y (1-p)^{g^+_c} (g^+_c p \log p - (1 - p))
        + a^-_c (1-y) p^{g^-_c} (p - g^-_c (1-p) \log(1-p))\big)
        + p (1 - p) (A_{bc} y_{ic} + E_{bc})\Big]

Memory-bound design (an H100 moves 3 TB/s; the instruction budget is some 25 instructions per
logit element forward, 47 backward, for bf16 logits and uint8 labels):

* **Tiles** ``[BLOCK_C, ROWS, VEC]`` (``._common.voxel_tiling``): every class of ``VEC``
  consecutive voxels in one thread's registers, ``VEC`` = one 128-bit load per class (8 bf16,
  4 fp32) and one 128-bit store of the gradient, a 64-bit load of 8 uint8 labels; rows over the
  lanes and warps. Sums over classes are in-thread adds; per-voxel values keep the tile's 3-D
  shape (``[1, ROWS, VEC]``) and per-class vectors are built from scalar loads, so that Triton
  gives everything one layout (no conversion through shared memory). Strided and channels-last
  views use the same code with scalar accesses.
* **Several tiles per program** (``tiles_per_program``, about 1000 programs in all): the set-up
  and, forward, the cross-thread sums of the statistics (kept per thread row across the loop)
  are paid once per program.
* **One logarithm per voxel.** ``d = z - max z``, ``e = exp2(d log2 e)``, ``s = sum e``;
  ``log p_c = d_c - log s``. With labels only the labelled class ``t`` needs ``log p``,
  ``1 - p`` and a power: ``m_t = sum_{c != t} e_c`` (the others' mass, a sum of positive terms)
  gives ``1 - p_t = m_t / s`` accurately, and ``log p_t = -log1p(m_t)`` from its series when
  ``m_t < 1/16`` (then ``t`` is the arg-max and ``e_t = 1``), where ``log s`` near 0 would lose
  its digits. ``(1 - q_t)^gamma_t = exp2(gamma_t log2(1 - q_t))``, ``log eps`` and
  ``log(1 - eps)`` come from the host. Ignored voxels and voxels past the image get ``1 / s = 0``
  (so ``p = q = 0``) and select no class, which keeps them out of every sum without more masks.
* **Hardware approximations** (``._fastmath``: ``ex2`` / ``lg2`` / ``rcp.approx.ftz``; the
  interpreter runs the precise functions). Their error, measured by ``bench/approx_error.py``
  (the kernels run with each approximation at the edge of its documented bound, biased up and
  down, against the float64 reference; UFL and Dice, labels, one-hot and soft targets, random,
  confident and confidently wrong voxels, clip on and off): softmax at most 1.4e-7 on the loss
  and 3.7e-7 on the gradient (norm-wise relative), against 0.9e-7 / 3.3e-7 with precise
  functions and 9e-7 / 2.8e-4 for the float32 reference on confident voxels; sigmoid mode
  (Unified Focal on overlapping uint8 channels and on labels, Dice + BCE) at most 2.1e-7 /
  4.5e-7, against 0.9e-7 / 2.9e-7 with precise functions.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (
    class_view,
    empty,
    fast_power,
    finish_gradient,
    focal_gradient_factor,
    fp32,
    gradient_buffer,
    label_view,
    log_softmax_sum,
    log_top_probability,
    power,
    power_of_log,
    shifted_exponentials,
    sigmoid_parts,
    voxel_tiling,
)
from ._fastmath import fast_exp2, fast_rcp

# Smallest normal float32: the reference clamps 1 - TI to it before the power (clamp_min, which
# keeps a NaN index NaN: hence propagate_nan=ALL in the clamps below).
_TINY = tl.constexpr(1.1754943508222875e-38)
_NONE = tl.constexpr(0)
_MEAN = tl.constexpr(2)
_REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}
_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _class_column(ptr, cls3, C: tl.constexpr):
    """``ptr[c]`` as a ``[BLOCK_C, 1, 1]`` column (0 on padded classes), from C scalar loads.

    A tensor load of the column would get a layout of its own, and every use of it in the tile
    a layout conversion through shared memory; scalars take the tile's layout for free.
    """
    column = tl.zeros(cls3.shape, dtype=tl.float32)
    for c in tl.static_range(C):
        column = tl.where(cls3 == c, tl.load(ptr + c), column)
    return column


@triton.jit
def _label_entry(label, ptr, C: tl.constexpr):
    """``ptr[label]`` per voxel, 0 where the label selects no class: a chain of C selects on scalars."""
    entry = tl.zeros(label.shape, dtype=tl.float32)
    for c in tl.static_range(C):
        entry = tl.where(label == c, tl.load(ptr + c), entry)
    return entry


@triton.jit
def _class_sum(x):
    """Sum over the class axis of a ``[BLOCK_C, ROWS, VEC]`` tile, kept as ``[1, ROWS, VEC]`` (in-thread adds)."""
    return tl.sum(x, axis=0, keep_dims=True)


@triton.jit
def _clip(x, low, high):
    return tl.minimum(tl.maximum(x, low), high)


@triton.jit
def _sigmoid_focal_term(y, pos, log_q, log_one_minus_q, alpha, alpha_neg, gamma, gamma_neg, BINARY: tl.constexpr):
    """Sigmoid focal term per element: ``a+ y (1-q)^g+ (-log q) + a- (1-y) q^g- (-log(1-q))``.

    A 0/1 target (``BINARY``, ``pos = y != 0``) has one side per element: one power, not two.
    """
    if BINARY:
        own = tl.where(pos, log_q, log_one_minus_q)
        other = tl.where(pos, log_one_minus_q, log_q)
        return tl.where(pos, alpha, alpha_neg) * power_of_log(other, tl.where(pos, gamma, gamma_neg)) * (-own)
    else:
        positive = alpha * power_of_log(log_one_minus_q, gamma) * (-log_q)
        negative = alpha_neg * power_of_log(log_q, gamma_neg) * (-log_one_minus_q)
        return y * positive + (1.0 - y) * negative


@triton.jit
def _sigmoid_focal_gradient(y, pos, p, one_minus_p, log_p, log_one_minus_p, alpha, alpha_neg, gamma, gamma_neg,
                            BINARY: tl.constexpr):  # fmt: skip
    """``d/dz`` of :func:`_sigmoid_focal_term` on the unclipped ``p`` (the spec's closed form):
    ``a+ y (1-p)^g+ (g+ p log p - (1-p)) + a- (1-y) p^g- (p - g- (1-p) log(1-p))``.

    The negative side is the positive one at ``-z`` (``p`` and ``1 - p`` swapped), sign flipped.
    """
    if BINARY:
        gamma_side = tl.where(pos, gamma, gamma_neg)
        modulation = power_of_log(tl.where(pos, log_one_minus_p, log_p), gamma_side)
        own_p = tl.where(pos, p, one_minus_p)
        slope = gamma_side * own_p * tl.where(pos, log_p, log_one_minus_p) - tl.where(pos, one_minus_p, p)
        side = tl.where(pos, alpha, alpha_neg) * modulation * slope
        return tl.where(pos, side, -side)
    else:
        positive = alpha * power_of_log(log_one_minus_p, gamma) * (gamma * p * log_p - one_minus_p)
        negative = alpha_neg * power_of_log(log_p, gamma_neg) * (p - gamma_neg * one_minus_p * log_one_minus_p)
        return y * positive + (1.0 - y) * negative


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
    V,
    tiles_per_program,
    programs_per_image,
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
    one_minus_eps,
    log_eps,
    log_one_minus_eps,
    ignore_index,
    C: tl.constexpr,
    DENSE: tl.constexpr,
    SIGMOID: tl.constexpr,
    BINARY: tl.constexpr,
    HAS_IGNORE: tl.constexpr,
    CLIP: tl.constexpr,
    HAS_FOCAL: tl.constexpr,
    HAS_TVERSKY: tl.constexpr,
    BACKWARD: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ROWS: tl.constexpr,
    VEC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // programs_per_image
    first_tile = (pid - b * programs_per_image) * tiles_per_program
    cls = tl.arange(0, BLOCK_C)
    cmask = cls < C
    cls3 = cls[:, None, None]
    cmask3 = cmask[:, None, None]
    # Voxel offsets of a tile, [1, ROWS, VEC]: VEC consecutive voxels per row, one row per thread.
    # Per-voxel values keep this 3-D shape (sums over classes keep their axis), so that they share
    # the layout of the class tile and never need a conversion.
    voxel = (tl.arange(0, ROWS)[:, None] * VEC + tl.arange(0, VEC)[None, :])[None, :, :]
    voxel64 = voxel.to(tl.int64)
    logit_base = logit_ptr + b * szb + cls3.to(tl.int64) * szc
    target_base = target_ptr + b * stb + cls3.to(tl.int64) * stc
    grad_base = grad_ptr + b * sgb + cls3.to(tl.int64) * sgc
    if HAS_FOCAL and (DENSE or SIGMOID):
        # Sigmoid: row 0 of the (2, C) constants is the positive side, row 1 the negative one.
        alpha = _class_column(focal_weight_ptr, cls3, C)
        gamma = _class_column(focal_gamma_ptr, cls3, C)
        if SIGMOID:
            alpha_neg = _class_column(focal_weight_ptr + C, cls3, C)
            gamma_neg = _class_column(focal_gamma_ptr + C, cls3, C)
    if SIGMOID and CLIP:
        # clip(sigmoid(z), eps, 1 - eps) = sigmoid(clip(z, -bound, bound)), bound = log((1 - eps) / eps):
        # one clip of z clips q, 1 - q and both logarithms (and |z| <= bound is the clip's dead zone).
        logit_bound = log_one_minus_eps - log_eps
    if BACKWARD:
        if HAS_FOCAL:
            focal_scale = tl.load(focal_coef_ptr + b)
        if HAS_TVERSKY:
            coef_a = _class_column(a_ptr + b * C, cls3, C)
            coef_e = _class_column(e_ptr + b * C, cls3, C)
    else:
        focal_acc = tl.zeros([1, ROWS], dtype=tl.float32)
        valid_acc = tl.zeros([1, ROWS], dtype=tl.float32)
        tp_acc = tl.zeros([BLOCK_C, ROWS], dtype=tl.float32)
        fn_acc = tl.zeros([BLOCK_C, ROWS], dtype=tl.float32)
        fp_acc = tl.zeros([BLOCK_C, ROWS], dtype=tl.float32)

    for it in range(tiles_per_program):
        start = (first_tile + it) * (ROWS * VEC)
        # A 32-bit compare per voxel: the voxels left in the image, clamped to the tile.
        vmask = voxel < tl.minimum(V - start, ROWS * VEC).to(tl.int32)
        v = start + voxel64
        tile_mask = cmask3 & vmask
        z = tl.load(logit_base + v * szv, mask=tile_mask, other=0.0).to(tl.float32)
        if not BACKWARD:
            # Non-finite probe (._common.nonfinite_probe): 0, or NaN for a NaN / infinite logit.
            focal_acc += tl.sum(_class_sum(z * 0.0), axis=2)
        if not SIGMOID:
            d, e = shifted_exponentials(tl.where(cmask3, z, float("-inf")))
        if DENSE:
            # Float soft / one-hot maps and uint8 0/1 maps alike: converted to float32 in registers.
            y = tl.load(target_base + v * stv, mask=tile_mask, other=0).to(tl.float32)
            valid = vmask
        else:
            label = tl.load(target_ptr + b * stb + v * stv, mask=vmask, other=0)
            if label.dtype != tl.int64:
                label = label.to(tl.int32)  # uint8 / int8 / bool / int32, compared in 32 bits
            valid = vmask
            if HAS_IGNORE:
                valid = valid & (label != ignore_index)
            # A label outside [0, C) selects no class (an ignored voxel neither, but is not counted).
            label = tl.where(valid & (label >= 0) & (label < C), label, -1).to(tl.int32)
            y = (cls3 == label) & cmask3
        if SIGMOID:
            # Every class on its own: p = q = 0 on ignored voxels and outside the image, as below.
            if DENSE:
                pos = y != 0.0
            else:
                pos = y
            if CLIP:
                if BACKWARD:
                    inside = tl.abs(z) <= logit_bound
                else:
                    z = _clip(z, -logit_bound, logit_bound)
            p, one_minus_p, log_p, log_one_minus_p = sigmoid_parts(z, valid)
        elif DENSE:
            total = _class_sum(e)
            # The arg-max class (d = 0 exactly) of a voxel whose other classes weigh less than half
            # of it (total < 1.5, so it is the only one): its 1 - p and log p come from the others'
            # mass, not from a difference close to 1. Below, 1 - p >= 1/3 is accurate as it is.
            top = (d == 0.0) & (total < 1.5)
            mass = _class_sum(tl.where(top, 0.0, e))
            # rcp = 0 outside the image: p = 0 there, and so are the clipped q (low bound 0).
            rcp = tl.where(valid, fast_rcp(total), 0.0)
            p = e * rcp
            one_minus_p = tl.where(top, mass, total - e) * rcp
            log_sum = log_softmax_sum(total)
            log_p = tl.where(top, log_top_probability(mass, d, log_sum), d - log_sum)
        else:
            # What the labelled class t needs is one number per voxel: its d, and the others'
            # mass, from which 1 - p_t and (t being the arg-max) log p_t stay accurate.
            mass = _class_sum(tl.where(y, 0.0, e))
            d_t = _class_sum(tl.where(y, d, 0.0))
            e_t = tl.where(label >= 0, fast_exp2(d_t * _LOG2E), 0.0)
            total = mass + e_t
            # rcp = 0 for ignored voxels and outside the image: p = 0 there, and so are the
            # clipped q (low bound 0); no class is selected, so nothing else is counted.
            rcp = tl.where(valid, fast_rcp(total), 0.0)
            p = e * rcp
            p_t = e_t * rcp
            one_minus_p_t = mass * rcp
            log_p_t = log_top_probability(mass, d_t, log_softmax_sum(total))
            if HAS_FOCAL:
                alpha_t = _label_entry(label, focal_weight_ptr, C)
                gamma_t = _label_entry(label, focal_gamma_ptr, C)

        if BACKWARD:
            if SIGMOID:
                # Channels are independent: dL/dz = dL/dq dq/dz with dq/dz = p (1 - p), no coupling.
                # Ignored voxels get 0 without a mask: p = 1 - p = 0 there.
                grad = tl.zeros([BLOCK_C, ROWS, VEC], dtype=tl.float32)
                if HAS_TVERSKY:
                    if DENSE:
                        grad += p * one_minus_p * (coef_a * y + coef_e)
                    else:
                        grad += p * one_minus_p * tl.where(y, coef_a + coef_e, coef_e)
                if HAS_FOCAL:
                    grad += focal_scale * _sigmoid_focal_gradient(
                        y, pos, p, one_minus_p, log_p, log_one_minus_p, alpha, alpha_neg, gamma, gamma_neg, BINARY
                    )
                if CLIP:
                    grad = tl.where(inside, grad, 0.0)
            else:
                if CLIP:
                    inside = (p >= eps) & (p <= one_minus_eps)
                if DENSE:
                    h = tl.zeros([BLOCK_C, ROWS, VEC], dtype=tl.float32)
                    if HAS_FOCAL:
                        modulation = fast_power(one_minus_p, gamma)
                        factor = focal_gradient_factor(p, log_p, one_minus_p, modulation, gamma, True)
                        h -= focal_scale * alpha * y * factor
                    if HAS_TVERSKY:
                        h += p * (coef_a * y + coef_e)
                    if CLIP:
                        h = tl.where(inside, h, 0.0)
                    h = tl.where(cmask3, h, 0.0)
                    # Softmax backward dL/dz_j = h_j - p_j sum_c h_c; for the confident arg-max class
                    # it is (1 - p_j) h_j - p_j sum_{c != j} h_c with the accurate 1 - p_j.
                    others = _class_sum(tl.where(top, 0.0, h))
                    grad = tl.where(top, one_minus_p * h - p * others, h - p * _class_sum(h))
                else:
                    if HAS_TVERSKY:
                        h = p * tl.where(y, coef_a + coef_e, coef_e)
                    else:
                        h = tl.zeros([BLOCK_C, ROWS, VEC], dtype=tl.float32)
                    if HAS_FOCAL:
                        # G_t on the unclipped, accurate p_t (q = p inside the clip mask).
                        modulation = fast_power(one_minus_p_t, gamma_t)
                        factor = focal_gradient_factor(p_t, log_p_t, one_minus_p_t, modulation, gamma_t, True)
                        h += tl.where(y, -focal_scale * alpha_t * factor, 0.0)
                    if CLIP:
                        h = tl.where(inside, h, 0.0)
                    # As above with the labelled class t in the role of the arg-max: its 1 - p_t is
                    # always accurate, and a confident voxel is (nearly always) a correct one.
                    others = _class_sum(tl.where(y, 0.0, h))
                    grad = tl.where(y, one_minus_p_t * h - p * others, h - p * _class_sum(h))
            tl.store(grad_base + v * sgv, grad.to(grad_ptr.dtype.element_ty), mask=tile_mask)
        else:
            if HAS_IGNORE and not DENSE:
                valid_acc += tl.sum(valid.to(tl.float32), axis=2)
            # Sigmoid: clipped already, through z.
            if CLIP and not SIGMOID:
                low = tl.where(valid, eps, 0.0)
                q = _clip(p, low, one_minus_eps)
            else:
                q = p
            # One minus q: of every class (sigmoid, dense softmax), of the labelled one (label softmax).
            if SIGMOID or DENSE:
                if CLIP and not SIGMOID:
                    one_minus_q = _clip(one_minus_p, eps, one_minus_eps)
                    log_q = _clip(log_p, log_eps, log_one_minus_eps)
                else:
                    one_minus_q = one_minus_p
                    log_q = log_p
                if HAS_FOCAL:
                    if SIGMOID:
                        term = _sigmoid_focal_term(
                            y, pos, log_q, log_one_minus_p, alpha, alpha_neg, gamma, gamma_neg, BINARY
                        )
                        term = tl.where(cmask3 & valid, term, 0.0)
                    else:
                        term = tl.where(cmask3, alpha * y * fast_power(one_minus_q, gamma) * (-log_q), 0.0)
                    focal_acc += tl.sum(_class_sum(term), axis=2)
            else:
                if CLIP:
                    one_minus_q = _clip(one_minus_p_t, eps, one_minus_eps)
                    log_q_t = _clip(log_p_t, log_eps, log_one_minus_eps)
                else:
                    one_minus_q = one_minus_p_t
                    log_q_t = log_p_t
                if HAS_FOCAL:
                    focal_acc += tl.sum(alpha_t * fast_power(one_minus_q, gamma_t) * (-log_q_t), axis=2)
            if HAS_TVERSKY:
                if DENSE:
                    tp_acc += tl.sum(y * q, axis=2)
                    fn_acc += tl.sum(y * one_minus_q, axis=2)
                    fp_acc += tl.sum((1.0 - y) * q, axis=2)
                else:
                    tp_acc += tl.sum(tl.where(y, q, 0.0), axis=2)
                    fn_acc += tl.sum(tl.where(y, one_minus_q, 0.0), axis=2)
                    fp_acc += tl.sum(tl.where(y, 0.0, q), axis=2)

    if not BACKWARD:
        # The focal column carries the non-finite probe of every voxel of the image (ignored
        # ones too); the finalize adds it to the image's loss even without a focal term, and
        # backward never reads the column, so the gradient stays as the softmax makes it.
        out = partial_ptr + pid * (2 + 3 * C)
        tl.store(out, tl.sum(tl.sum(focal_acc, axis=1), axis=0))
        if HAS_IGNORE and not DENSE:
            valid_count = tl.sum(tl.sum(valid_acc, axis=1), axis=0)
        else:  # the program's voxels inside the image
            first = first_tile * (ROWS * VEC)
            valid_count = tl.maximum(tl.minimum(first + tiles_per_program * (ROWS * VEC), V) - first, 0).to(tl.float32)
        tl.store(out + 1, valid_count)
        tl.store(out + 2 + cls, tl.sum(tp_acc, axis=1), mask=cmask)
        tl.store(out + 2 + C + cls, tl.sum(fn_acc, axis=1), mask=cmask)
        tl.store(out + 2 + 2 * C + cls, tl.sum(fp_acc, axis=1), mask=cmask)


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
        clamped_c = tl.maximum(index_c, _TINY, propagate_nan=tl.PropagateNan.ALL)
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
                    clamped = tl.maximum(index, _TINY, propagate_nan=tl.PropagateNan.ALL)
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
                    clamped = tl.maximum(index, _TINY, propagate_nan=tl.PropagateNan.ALL)
                    terms = tl.where(mask, power(clamped, exponent[None, :]), 0.0)
                    loss += tversky_coef * tl.sum(terms, axis=1) / C
            if REDUCTION == _NONE:
                tl.store(loss_ptr + rows, loss, mask=bmask)
            else:
                total += tl.sum(tl.where(bmask, loss, 0.0), axis=0)
    if not BACKWARD:
        if REDUCTION != _NONE:
            tl.store(loss_ptr, total * scale)


def _clip_bounds(eps: float) -> tuple[float, float, float, float]:
    """``eps``, ``1 - eps`` and their logarithms as float32 (the clip of losses.md 0), computed once on the host."""
    low = fp32(eps)
    high = fp32(1.0 - low)
    return low, high, fp32(math.log(low)) if low > 0 else -math.inf, fp32(math.log(high)) if high > 0 else -math.inf


def _launch(logits, target, focal_weight, focal_gamma, *, clip, eps, ignore_index, has_focal, has_tversky, sigmoid,
            **buffers):  # fmt: skip
    """Run :func:`_region_kernel` in the mode given by ``buffers``: the partials, or the gradient."""
    z = class_view(logits)
    dense = target.dim() == logits.dim()  # a (B, C, *S) map: float, or uint8 0/1 (bool read as uint8)
    if dense and target.dtype == torch.bool:
        target = target.view(torch.uint8)
    t = class_view(target) if dense else label_view(target)
    t_strides = t.stride() if dense else (t.stride(0), 0, t.stride(1))
    batch, num_classes, num_voxels = z.shape
    config = voxel_tiling(batch, num_classes, num_voxels, logits.element_size())
    tiles_per_program = config.pop("tiles_per_program")
    programs_per_image = config.pop("programs_per_image")
    backward = "coef_a" in buffers
    dummy = focal_weight  # stands in for the pointers a constexpr branch never touches
    if backward:
        grad, grad_view = gradient_buffer(logits)
        result = grad
        args = (dummy, buffers["focal_coef"], buffers["coef_a"], buffers["coef_e"], grad_view)
        grad_strides = grad_view.stride()
    else:
        result = empty((batch, programs_per_image, 2 + 3 * num_classes), dtype=torch.float32, device=logits.device)
        args = (result, dummy, dummy, dummy, dummy)
        grad_strides = (0, 0, 0)
    _region_kernel[(batch * programs_per_image,)](
        z, t, focal_weight, focal_gamma, *args,
        num_voxels, tiles_per_program, programs_per_image, *z.stride(), *t_strides, *grad_strides,
        *_clip_bounds(eps), 0 if ignore_index is None else ignore_index,
        C=num_classes, DENSE=dense, SIGMOID=sigmoid, BINARY=sigmoid and not (dense and target.is_floating_point()),
        HAS_IGNORE=ignore_index is not None, CLIP=clip,
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
    sigmoid: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss (float32) and the per-image statistics ``[focal sum, valid count, TP, FN, FP]``."""
    partial = _launch(
        logits, target, focal_weight, focal_gamma, clip=clip, eps=eps, ignore_index=ignore_index,
        has_focal=focal_coef != 0.0, has_tversky=tversky_coef != 0.0, sigmoid=sigmoid,
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
    sigmoid: bool = False,
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
        has_focal=focal_coef != 0.0, has_tversky=tversky_coef != 0.0, sigmoid=sigmoid,
        focal_coef=focal, coef_a=coef_a, coef_e=coef_e,
    )  # fmt: skip
