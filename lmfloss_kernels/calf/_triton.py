r"""Fused Triton kernels of CALF: the per-voxel transformation losses and per-image class counts.

Transformation loss (formulas in :mod:`lmfloss_kernels.calf.transforms`, per-voxel math in
:mod:`lmfloss_kernels.calf._voxel_math`), in two streaming passes over logits and target:

1. forward: ``_calf_voxel_kernel`` runs ``P`` programs per image; each loops over a contiguous run
   of tiles of ``BLOCK`` voxels, keeps per-lane fp32 sums in registers, and writes at its end five
   float64 partial sums ``(Σ t, V, TP or FG, FP or R, FN)`` (``t`` the per-voxel term,
   ``ℓ_T = s_T t``; hard labels sum the foreground count ``FG``, ``R = Σ r`` and ``FN = Σ_fg r`` of
   the wrong-class probability ``r``, and get ``TP = FG - FN``, ``FP = R - FN``: one sigmoid per
   voxel, shared with the BCE term). ``_finalize_kernel`` (one program) sums them per image in
   float64 (deterministic, no atomics) and writes the ``(B, 5)`` statistics
   ``(Σ ℓ_T, V, TP, FP, FN)`` and ``L_b = w_T Σ ℓ_T / max(V, 1) + w_D D_b``. Non-finite logits
   (the package's policy): ``Σ t`` also gets ``0 · z`` of every logit (ignored voxels included),
   NaN exactly when one is NaN or ``±inf``, so such a logit makes ``L_b`` NaN without a second read;
   with ``w_T = 0`` (``HAS_TRANSFORM`` off) the transform is not evaluated and the sum is this probe;
2. backward: the same kernel (``BACKWARD`` constexpr) re-reads logits and target and writes

   .. math:: \partial L / \partial z_i = c_b\, t'(z_i, y_i) + (A_b y_i + E_b)\, p_i (1 - p_i)

   for valid voxels (0 for ignored ones), where ``c_b = g_b w_T s_T / V_b`` and
   ``A_b = -2 G_b / den_b``, ``E_b = G_b (2 TP_b + s_nr) / den_b^2`` are the Dice coefficients
   (``G_b = g_b w_D``, or ``Σ_b g_b w_D`` with ``batch=True``), ``g_b`` the upstream gradient.
   Each program computes its image's coefficients in float64 from the statistics and ``g`` (a
   few scalar loads), so the backward is one launch and no host-side arithmetic.

The gradient is recomputed in backward rather than stored in forward: a stored gradient would
cost the same bytes (a write in forward, a read-scale-write in backward instead of one more read
of logits and labels) and memory and time in inference-only calls.

Memory-bound by construction (sm_90, ``gpu_model``): unit-stride voxels are read as vectors, 128-bit
for bf16 logits (the stride-1 specialisation; other voxel strides are read element-wise), no
logarithm instruction (``_voxel_math``), one exponential per voxel for ln / fisher with hard
labels, about ``2 × SMs`` programs in all, each looping over many tiles, so the per-program
reductions and the float64 coefficient set-up are paid once per program.

Each pass is a ``torch.library.custom_op`` (``lmfloss::calf_transform_loss`` /
``lmfloss::calf_transform_backward``, ``lmfloss::calf_foreground_sizes``) with ``register_fake``;
the loss op has ``register_autograd``. All math is fp32 (float64 for the per-image sums and
coefficients), offsets int64.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._backends import refuse_double_backward
from ..triton._fastmath import INTERPRETED
from ._definitions import CLIPPED_TRANSFORMS, TRANSFORM_SCALE, TRANSFORMS, clip_limit
from ._voxel_math import sigmoid_pair, voxel_term, wrong_class_probability

__all__ = ["calf_foreground_sizes", "calf_transform_backward", "calf_transform_loss"]

# Voxels per tile at most. The interpreter pays per tile, not per voxel, but small tiles let the CPU tests
# loop over several.
_MAX_BLOCK = 1024 if INTERPRETED else 4096
_NUM_WARPS = 8
# Programs per SM of the voxel kernel: enough resident warps to keep loads in flight, few enough that
# each program loops over many tiles. Under the interpreter: a few programs in all.
_PROGRAMS_PER_SM = 2
_INTERPRETER_PROGRAMS = 4
_DEFAULT_SMS = 132  # H100 SXM; used where no CUDA device can be asked (ahead-of-time compilation)
_NUM_STATS = 5  # Σ ℓ_T, V, TP, FP, FN
_TRANSFORM_CODE = {name: code for code, name in enumerate(TRANSFORMS)}  # ln, log10, fisher, logit, arcsine


@triton.jit
def _load_voxels(z_row, y_row, offs, in_range, z_stride, y_stride, ignore_index, SOFT_TARGET, HAS_IGNORE, MASKED):
    """fp32 logits, fp32 target, foreground mask and valid mask of the voxels ``offs`` of one image."""
    if MASKED:
        z = tl.load(z_row + offs * z_stride, mask=in_range, other=0.0).to(tl.float32)
    else:
        z = tl.load(z_row + offs * z_stride).to(tl.float32)
    if SOFT_TARGET:
        if MASKED:
            y = tl.load(y_row + offs * y_stride, mask=in_range, other=0.0).to(tl.float32)
        else:
            y = tl.load(y_row + offs * y_stride).to(tl.float32)
        fg = y == 1.0
        valid = in_range
    else:
        if MASKED:
            label = tl.load(y_row + offs * y_stride, mask=in_range, other=0)
        else:
            label = tl.load(y_row + offs * y_stride)
        fg = label == 1
        y = fg.to(tl.float32)
        valid = in_range
        if HAS_IGNORE:
            valid = valid & (label.to(tl.int32) != ignore_index)
    return z, y, fg, valid


@triton.jit
def _image_coefficients(
    stats_ptr, g_ptr, b, g_stride, num_images, transform_coef, loss_scale, dice_coef, smooth_nr, smooth_dr,
    HAS_DICE: tl.constexpr, BATCH: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    """float64 ``(c_b, A_b, E_b)`` of image ``b`` from the ``(B, 5)`` statistics and the upstream gradient."""
    g = tl.load(g_ptr + b * g_stride).to(tl.float64)
    count = tl.load(stats_ptr + b * 5 + 1)
    c = g * (transform_coef * loss_scale) / tl.maximum(count, 1.0)
    if HAS_DICE:
        if BATCH:  # Dice over the batch's sums; its weight is the sum of the upstream gradients
            tp = tl.zeros([BLOCK_B], dtype=tl.float64)
            fp = tl.zeros([BLOCK_B], dtype=tl.float64)
            fn = tl.zeros([BLOCK_B], dtype=tl.float64)
            weight = tl.zeros([BLOCK_B], dtype=tl.float64)
            for first in range(0, num_images, BLOCK_B):
                images = first + tl.arange(0, BLOCK_B).to(tl.int64)
                keep = images < num_images
                tp += tl.load(stats_ptr + images * 5 + 2, mask=keep, other=0.0)
                fp += tl.load(stats_ptr + images * 5 + 3, mask=keep, other=0.0)
                fn += tl.load(stats_ptr + images * 5 + 4, mask=keep, other=0.0)
                weight += tl.load(g_ptr + images * g_stride, mask=keep, other=0.0).to(tl.float64)
            tp_sum = tl.sum(tp, axis=0)
            den = 2.0 * tp_sum + tl.sum(fp, axis=0) + tl.sum(fn, axis=0) + smooth_dr
            weight_sum = dice_coef * tl.sum(weight, axis=0)
        else:
            tp_sum = tl.load(stats_ptr + b * 5 + 2)
            den = 2.0 * tp_sum + tl.load(stats_ptr + b * 5 + 3) + tl.load(stats_ptr + b * 5 + 4) + smooth_dr
            weight_sum = dice_coef * g
        a = -2.0 * weight_sum / den
        e = weight_sum * (2.0 * tp_sum + smooth_nr) / (den * den)
    else:
        a = 0.0 * c
        e = 0.0 * c
    return c, a, e


@triton.jit
def _voxel_gradient(z, y, fg, valid, limit, c, a, e, TRANSFORM, HAS_TRANSFORM, HAS_DICE, SOFT_TARGET):
    grad = tl.zeros_like(z)
    if HAS_TRANSFORM:
        term, slope = voxel_term(z, y, fg, limit, TRANSFORM, SOFT_TARGET)
        grad = c * slope
    if HAS_DICE:
        if SOFT_TARGET:
            p, q = sigmoid_pair(z)
            grad += (a * y + e) * (p * q)
        else:  # p (1 - p) = r (1 - r); A y + E by the label
            r = wrong_class_probability(z, fg)
            grad += tl.where(fg, a + e, e) * (r * (1.0 - r))
    return tl.where(valid, grad, 0.0)


@triton.jit
def _accumulate(
    z, y, fg, valid, limit, term_sum, valid_count, tp_or_fg, fp_or_r, fn_sum,
    TRANSFORM, HAS_TRANSFORM, HAS_DICE, SOFT_TARGET, MASKED,
):  # fmt: skip
    """Add one tile's voxels to the per-lane sums (``MASKED``: some lanes are invalid)."""
    probe = 0.0 * z  # NaN for a NaN or ±inf logit; masked-off lanes loaded 0
    if HAS_TRANSFORM:
        term, slope = voxel_term(z, y, fg, limit, TRANSFORM, SOFT_TARGET)
        if MASKED:
            term = tl.where(valid, term, 0.0)
        term_sum += term + probe
    else:
        term_sum += probe
    if MASKED:
        valid_count += valid.to(tl.int32)
    if HAS_DICE:
        if SOFT_TARGET:
            p, q = sigmoid_pair(z)
            if MASKED:
                y = tl.where(valid, y, 0.0)
                p = tl.where(valid, p, 0.0)
            tp_or_fg += y * p
            fp_or_r += (1.0 - y) * p
            fn_sum += y * q
        else:
            r = wrong_class_probability(z, fg)
            if MASKED:
                fg = fg & valid
                r = tl.where(valid, r, 0.0)
            r_fg = tl.where(fg, r, 0.0)
            tp_or_fg += fg.to(tl.float32)
            fp_or_r += r
            fn_sum += r_fg
    return term_sum, valid_count, tp_or_fg, fp_or_r, fn_sum


@triton.jit
def _calf_voxel_kernel(
    z_ptr,
    y_ptr,
    partial_ptr,
    grad_ptr,
    stats_ptr,
    g_ptr,
    num_voxels,
    z_batch_stride,
    z_voxel_stride,
    y_batch_stride,
    y_voxel_stride,
    g_stride,
    programs_per_image,
    tiles_per_program,
    num_images,
    ignore_index,
    limit,
    transform_coef,
    loss_scale,
    dice_coef,
    smooth_nr,
    smooth_dr,
    TRANSFORM: tl.constexpr,
    HAS_TRANSFORM: tl.constexpr,
    HAS_DICE: tl.constexpr,
    SOFT_TARGET: tl.constexpr,
    HAS_IGNORE: tl.constexpr,
    BATCH: tl.constexpr,
    BACKWARD: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // programs_per_image).to(tl.int64)
    first = (pid % programs_per_image) * tiles_per_program
    # Full tiles run unmasked; the last, partial tile of an image (if any) runs once, masked, at the end.
    full_tiles = num_voxels // BLOCK
    end = tl.minimum(first + tiles_per_program, full_tiles)
    has_tail = (num_voxels % BLOCK != 0) & (first + tiles_per_program > full_tiles)
    z_row = z_ptr + b * z_batch_stride
    y_row = y_ptr + b * y_batch_stride
    lanes = tl.arange(0, BLOCK)
    if BACKWARD:
        c, a, e = _image_coefficients(
            stats_ptr, g_ptr, b, g_stride, num_images, transform_coef, loss_scale, dice_coef, smooth_nr, smooth_dr,
            HAS_DICE, BATCH, BLOCK_B,
        )  # fmt: skip
        c = c.to(tl.float32)
        a = a.to(tl.float32)
        e = e.to(tl.float32)
        grad_row = grad_ptr + b * num_voxels
        start = first.to(tl.int64) * BLOCK
        for _ in range(first, end):
            offs = start + lanes
            start += BLOCK
            z, y, fg, valid = _load_voxels(
                z_row, y_row, offs, True, z_voxel_stride, y_voxel_stride, ignore_index, SOFT_TARGET, HAS_IGNORE, False
            )  # fmt: skip
            grad = _voxel_gradient(z, y, fg, valid, limit, c, a, e, TRANSFORM, HAS_TRANSFORM, HAS_DICE, SOFT_TARGET)
            tl.store(grad_row + offs, grad.to(grad_ptr.dtype.element_ty))
        if has_tail:
            offs = full_tiles.to(tl.int64) * BLOCK + lanes
            in_range = offs < num_voxels
            z, y, fg, valid = _load_voxels(
                z_row, y_row, offs, in_range, z_voxel_stride, y_voxel_stride, ignore_index, SOFT_TARGET, HAS_IGNORE,
                True,
            )  # fmt: skip
            grad = _voxel_gradient(z, y, fg, valid, limit, c, a, e, TRANSFORM, HAS_TRANSFORM, HAS_DICE, SOFT_TARGET)
            tl.store(grad_row + offs, grad.to(grad_ptr.dtype.element_ty), mask=in_range)
    else:
        term_sum = tl.zeros([BLOCK], dtype=tl.float32)
        valid_count = tl.zeros([BLOCK], dtype=tl.int32)
        tp_or_fg = tl.zeros([BLOCK], dtype=tl.float32)
        fp_or_r = tl.zeros([BLOCK], dtype=tl.float32)
        fn_sum = tl.zeros([BLOCK], dtype=tl.float32)
        start = first.to(tl.int64) * BLOCK
        for _ in range(first, end):
            offs = start + lanes
            start += BLOCK
            z, y, fg, valid = _load_voxels(
                z_row, y_row, offs, True, z_voxel_stride, y_voxel_stride, ignore_index, SOFT_TARGET, HAS_IGNORE, False
            )  # fmt: skip
            term_sum, valid_count, tp_or_fg, fp_or_r, fn_sum = _accumulate(
                z, y, fg, valid, limit, term_sum, valid_count, tp_or_fg, fp_or_r, fn_sum,
                TRANSFORM, HAS_TRANSFORM, HAS_DICE, SOFT_TARGET, HAS_IGNORE,
            )  # fmt: skip
        if has_tail:
            offs = full_tiles.to(tl.int64) * BLOCK + lanes
            in_range = offs < num_voxels
            z, y, fg, valid = _load_voxels(
                z_row, y_row, offs, in_range, z_voxel_stride, y_voxel_stride, ignore_index, SOFT_TARGET, HAS_IGNORE,
                True,
            )  # fmt: skip
            term_sum, valid_count, tp_or_fg, fp_or_r, fn_sum = _accumulate(
                z, y, fg, valid, limit, term_sum, valid_count, tp_or_fg, fp_or_r, fn_sum,
                TRANSFORM, HAS_TRANSFORM, HAS_DICE, SOFT_TARGET, True,
            )  # fmt: skip
        out = partial_ptr + pid.to(tl.int64) * 5
        tl.store(out, tl.sum(term_sum.to(tl.float64), axis=0))
        tl.store(out + 1, tl.sum(valid_count, axis=0).to(tl.float64))
        tl.store(out + 2, tl.sum(tp_or_fg.to(tl.float64), axis=0))
        tl.store(out + 3, tl.sum(fp_or_r.to(tl.float64), axis=0))
        tl.store(out + 4, tl.sum(fn_sum.to(tl.float64), axis=0))


@triton.jit
def _column(x, cols, k: tl.constexpr):
    return tl.sum(tl.where(cols[None, :] == k, x, 0.0), axis=1)


@triton.jit
def _dice(tp, fp, fn, smooth_nr, smooth_dr):
    # 1 - (2 TP + s_nr) / den, formed from sums of non-negative terms
    return (fp + fn + (smooth_dr - smooth_nr)) / (2.0 * tp + fp + fn + smooth_dr)


@triton.jit
def _finalize_kernel(
    partial_ptr,
    stats_ptr,
    loss_ptr,
    num_images,
    programs_per_image,
    num_voxels,
    transform_coef,
    loss_scale,
    dice_coef,
    smooth_nr,
    smooth_dr,
    HAS_DICE: tl.constexpr,
    SOFT_TARGET: tl.constexpr,
    HAS_IGNORE: tl.constexpr,
    BATCH: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """One program: the ``(B, 5)`` float64 statistics ``(Σ ℓ_T, V, TP, FP, FN)`` and the fp32 loss per image."""
    cols = tl.arange(0, 8)
    stat_col = cols < 5
    batch_sums = tl.zeros([8], dtype=tl.float64)
    for first in range(0, num_images, BLOCK_B):
        images = first + tl.arange(0, BLOCK_B).to(tl.int64)
        keep = images < num_images
        sums = tl.zeros([BLOCK_B, 8], dtype=tl.float64)
        for first_program in range(0, programs_per_image, BLOCK_P):
            programs = first_program + tl.arange(0, BLOCK_P)
            rows = images[:, None] * programs_per_image + programs[None, :]
            mask = (keep[:, None] & (programs < programs_per_image)[None, :])[:, :, None] & stat_col[None, None, :]
            sums += tl.sum(tl.load(partial_ptr + rows[:, :, None] * 5 + cols[None, None, :], mask=mask, other=0.0), 1)
        term_sum = _column(sums, cols, 0) * loss_scale
        if HAS_IGNORE:
            count = _column(sums, cols, 1)
        else:
            count = tl.zeros([BLOCK_B], dtype=tl.float64) + num_voxels
        tp = _column(sums, cols, 2)
        fp = _column(sums, cols, 3)
        fn = _column(sums, cols, 4)
        if not SOFT_TARGET:
            # Hard labels summed FG and R = FP + FN. The Dice term and its gradient use FP + FN and
            # 2 TP + FP + FN = 2 FG - FN + FP, sums of non-negative terms up to the rounding of FN.
            tp -= fn
            fp -= fn
        stats = tl.where(cols[None, :] == 0, term_sum[:, None], sums)
        stats = tl.where(cols[None, :] == 1, count[:, None], stats)
        stats = tl.where(cols[None, :] == 2, tp[:, None], stats)
        stats = tl.where(cols[None, :] == 3, fp[:, None], stats)
        stats = tl.where(keep[:, None], stats, 0.0)
        tl.store(stats_ptr + images[:, None] * 5 + cols[None, :], stats, mask=keep[:, None] & stat_col[None, :])
        loss = transform_coef * term_sum / tl.maximum(count, 1.0)
        if HAS_DICE:
            if BATCH:
                batch_sums += tl.sum(stats, axis=0)
            else:
                loss += dice_coef * _dice(tp, fp, fn, smooth_nr, smooth_dr)
        tl.store(loss_ptr + images, loss.to(tl.float32), mask=keep)
    if HAS_DICE:
        if BATCH:  # every image gets the batch's Dice term on top of its transform term written above
            dice = dice_coef * _dice(
                tl.sum(tl.where(cols == 2, batch_sums, 0.0), axis=0),
                tl.sum(tl.where(cols == 3, batch_sums, 0.0), axis=0),
                tl.sum(tl.where(cols == 4, batch_sums, 0.0), axis=0),
                smooth_nr,
                smooth_dr,
            )
            tl.debug_barrier()  # the losses stored above, read back by other threads
            for first in range(0, num_images, BLOCK_B):
                images = first + tl.arange(0, BLOCK_B).to(tl.int64)
                keep = images < num_images
                loss = tl.load(loss_ptr + images, mask=keep, other=0.0).to(tl.float64) + dice
                tl.store(loss_ptr + images, loss.to(tl.float32), mask=keep)


def _flatten(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, V)`` views (a copy only where torch's reshape cannot merge the voxel axes); the kernels read
    both strides, and a unit voxel stride is specialised into 128-bit vector loads."""
    batch_size = logits.shape[0]
    z = logits.reshape(batch_size, -1)
    y = target.reshape(batch_size, -1)
    if y.dtype == torch.bool:
        y = y.view(torch.uint8)
    return z, y


def _ignore_in_range(target: torch.Tensor, ignore_index: int | None) -> bool:
    # An ignore_index that the label dtype cannot hold marks nothing (and must not wrap around in the kernel).
    if ignore_index is None or target.is_floating_point():
        return False
    if target.dtype == torch.bool:
        return ignore_index in (0, 1)
    info = torch.iinfo(target.dtype)
    return info.min <= ignore_index <= info.max


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_SMS


def _plan(batch_size: int, num_voxels: int, device: torch.device, per_thread: int) -> tuple[int, int, int, int]:
    """``(BLOCK, num_warps, programs per image, tiles per program)`` of the voxel kernel, ``per_thread``
    voxels per thread (fewer warps for small images)."""
    block = max(128, min(_NUM_WARPS * 32 * per_thread, _MAX_BLOCK, triton.next_power_of_2(num_voxels)))
    num_warps = max(1, min(_NUM_WARPS, block // (32 * per_thread)))
    tiles = triton.cdiv(num_voxels, block)
    programs = _INTERPRETER_PROGRAMS if INTERPRETED else _PROGRAMS_PER_SM * _sm_count(device)
    per_image = max(1, min(tiles, programs // batch_size))
    tiles_per_program = triton.cdiv(tiles, per_image)
    return block, num_warps, triton.cdiv(tiles, tiles_per_program), tiles_per_program


def _launch_voxels(logits, target, transform, eps, ignore_index, options, backward=None):
    """One pass of ``_calf_voxel_kernel``: forward (returns the ``(B·P, 5)`` partial sums and ``P``) or
    backward from ``(grad_loss, stats)`` (returns the gradient)."""
    transform_coef, dice_coef, smooth_nr, smooth_dr, batch = options
    z, y = _flatten(logits, target)
    batch_size, num_voxels = z.shape
    # Voxels per thread and tile. Forward: 8, one 128-bit load of bf16 logits and a 64-bit load of uint8
    # labels. 16 (128-bit label loads) measured worse on sm_90: 152 instead of 64 registers per thread for
    # ln + Dice (four per-lane sums of 16), one resident program per SM, and 4 % more instructions per
    # voxel. Backward: as many as one 128-bit store of the gradient holds, so that the store needs no
    # layout change through shared memory.
    per_thread = 8 if backward is None else 16 // logits.element_size()
    block, num_warps, per_image, tiles_per_program = _plan(batch_size, num_voxels, logits.device, per_thread)
    has_ignore = _ignore_in_range(target, ignore_index)
    grad_loss, stats = backward if backward is not None else (z, z)
    if backward is None:
        partial = torch.empty((batch_size * per_image, _NUM_STATS), dtype=torch.float64, device=logits.device)
        grad = None
    else:
        partial = None
        grad = torch.empty((batch_size, num_voxels), dtype=logits.dtype, device=logits.device)
    _calf_voxel_kernel[(batch_size * per_image,)](
        z,
        y,
        partial if partial is not None else stats,
        grad if grad is not None else z,
        stats,
        grad_loss,
        num_voxels,
        z.stride(0),
        z.stride(1),
        y.stride(0),
        y.stride(1),
        grad_loss.stride(0) if backward is not None else 0,
        per_image,
        tiles_per_program,
        batch_size,
        ignore_index if has_ignore else 0,
        clip_limit(eps) if transform in CLIPPED_TRANSFORMS else 0.0,
        transform_coef,
        TRANSFORM_SCALE[transform],
        dice_coef,
        smooth_nr,
        smooth_dr,
        TRANSFORM=_TRANSFORM_CODE[transform],
        HAS_TRANSFORM=transform_coef != 0.0,
        HAS_DICE=dice_coef != 0.0,
        SOFT_TARGET=target.is_floating_point(),
        HAS_IGNORE=has_ignore,
        BATCH=batch,
        BACKWARD=backward is not None,
        BLOCK=block,
        BLOCK_B=min(triton.next_power_of_2(batch_size), 128),
        num_warps=num_warps,
    )
    return grad.view(logits.shape) if grad is not None else (partial, per_image)


@torch.library.custom_op("lmfloss::calf_transform_loss", mutates_args=())
def calf_transform_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    transform: str,
    transform_coef: float,
    dice_coef: float,
    eps: float,
    smooth_nr: float,
    smooth_dr: float,
    batch: bool,
    ignore_index: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image CALF loss ``L_b`` (float32, ``(B,)``) and the float64 ``(B, 5)`` sums backward needs."""
    batch_size = logits.shape[0]
    options = (transform_coef, dice_coef, smooth_nr, smooth_dr, batch)
    partial, per_image = _launch_voxels(logits, target, transform, eps, ignore_index, options)
    stats = torch.empty((batch_size, _NUM_STATS), dtype=torch.float64, device=logits.device)
    loss = torch.empty((batch_size,), dtype=torch.float32, device=logits.device)
    # Also with transform_coef = 0: stats[:, 0] is then the non-finite probe alone (0 or NaN).
    _finalize_kernel[(1,)](
        partial,
        stats,
        loss,
        batch_size,
        per_image,
        logits[0].numel(),
        transform_coef,
        TRANSFORM_SCALE[transform],
        dice_coef,
        smooth_nr,
        smooth_dr,
        HAS_DICE=dice_coef != 0.0,
        SOFT_TARGET=target.is_floating_point(),
        HAS_IGNORE=_ignore_in_range(target, ignore_index),
        BATCH=batch,
        BLOCK_B=min(triton.next_power_of_2(batch_size), 16),
        BLOCK_P=min(triton.next_power_of_2(per_image), 64),
    )
    return loss, stats


@calf_transform_loss.register_fake
def _(logits, target, transform, transform_coef, dice_coef, eps, smooth_nr, smooth_dr, batch, ignore_index):
    batch_size = logits.shape[0]
    return (
        logits.new_empty((batch_size,), dtype=torch.float32),
        logits.new_empty((batch_size, _NUM_STATS), dtype=torch.float64),
    )


@torch.library.custom_op("lmfloss::calf_transform_backward", mutates_args=())
def calf_transform_backward(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    stats: torch.Tensor,
    transform: str,
    transform_coef: float,
    dice_coef: float,
    eps: float,
    smooth_nr: float,
    smooth_dr: float,
    batch: bool,
    ignore_index: int | None,
) -> torch.Tensor:
    """Gradient of ``Σ_b grad_loss[b] · L_b`` w.r.t. the logits, in the logits' dtype and shape."""
    options = (transform_coef, dice_coef, smooth_nr, smooth_dr, batch)
    return _launch_voxels(logits, target, transform, eps, ignore_index, options, (grad_loss, stats))


@calf_transform_backward.register_fake
def _(grad_loss, logits, target, stats, transform, transform_coef, dice_coef, eps, smooth_nr, smooth_dr, batch, ii):
    return logits.new_empty(logits.shape)


_LOSS_ARGS = ("transform", "transform_coef", "dice_coef", "eps", "smooth_nr", "smooth_dr", "batch", "ignore_index")


def _setup_context(ctx, inputs, output):
    logits, target, *options = inputs
    ctx.save_for_backward(logits, target, output[1])
    ctx.options = options
    ctx.set_materialize_grads(False)  # no zeros for the statistics' (unused) gradient


def _backward(ctx, grad_loss, grad_stats):
    logits, target, stats = ctx.saved_tensors
    refuse_double_backward("triton")
    grad = None if grad_loss is None else calf_transform_backward(grad_loss, logits, target, stats, *ctx.options)
    return (grad, None) + (None,) * len(_LOSS_ARGS)


calf_transform_loss.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Foreground sizes


@triton.jit
def _count_kernel(
    label_ptr,
    partial_ptr,
    num_voxels,
    batch_stride,
    tiles_per_image,
    ignore_index,
    NUM_CLASSES: tl.constexpr,
    CLASS_BLOCK: tl.constexpr,
    PADDED_CLASSES: tl.constexpr,
    HAS_IGNORE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // tiles_per_image
    offs = (pid % tiles_per_image) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < num_voxels
    label = tl.load(label_ptr + b * batch_stride + offs, mask=keep, other=0).to(tl.int64)
    if HAS_IGNORE:
        keep = keep & (label != ignore_index)
    for first in tl.static_range(0, NUM_CLASSES, CLASS_BLOCK):
        classes = first + tl.arange(0, CLASS_BLOCK)
        hits = (label[:, None] == classes[None, :]) & keep[:, None]
        tl.store(partial_ptr + pid * PADDED_CLASSES + classes, tl.sum(hits.to(tl.int32), axis=0))


@torch.library.custom_op("lmfloss::calf_foreground_sizes", mutates_args=())
def calf_foreground_sizes(labels: torch.Tensor, num_classes: int, ignore_index: int | None) -> torch.Tensor:
    """``(B, num_classes)`` int64 voxel counts per image and class of a ``(B, *S)`` label map."""
    batch_size = labels.shape[0]
    flat = labels.reshape(batch_size, -1)
    if flat.stride(1) != 1:
        flat = flat.contiguous()
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    num_voxels = flat.shape[1]
    class_block = min(triton.next_power_of_2(num_classes), 32)
    padded = triton.cdiv(num_classes, class_block) * class_block
    block = max(128, min(4096, 16384 // class_block, triton.next_power_of_2(num_voxels)))
    tiles = max(triton.cdiv(num_voxels, block), 1)
    partial = torch.empty((batch_size * tiles, padded), dtype=torch.int32, device=labels.device)
    has_ignore = _ignore_in_range(labels, ignore_index)
    _count_kernel[(batch_size * tiles,)](
        flat,
        partial,
        num_voxels,
        flat.stride(0),
        tiles,
        ignore_index if has_ignore else 0,
        NUM_CLASSES=num_classes,
        CLASS_BLOCK=class_block,
        PADDED_CLASSES=padded,
        HAS_IGNORE=has_ignore,
        BLOCK=block,
    )
    return partial.view(batch_size, tiles, padded).sum(1, dtype=torch.int64)[:, :num_classes].contiguous()


@calf_foreground_sizes.register_fake
def _(labels, num_classes, ignore_index):
    return labels.new_empty((labels.shape[0], num_classes), dtype=torch.int64)
