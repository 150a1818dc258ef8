"""The extension's CALF kernels (``csrc/cpu/calf.cpp``) as ``torch.library`` custom ops.

Same contract as the Triton ops of :mod:`lmfloss_kernels.calf._triton`, for CPU tensors, with
float64 logits served too:

* ``ext_calf_transform_loss(...) -> (loss, stats)``: the per-image loss ``L_b`` ``(B,)`` (float32,
  float64 for float64 logits) and the float64 ``(B, 5)`` sums ``[Σ ℓ_T, V, TP, FP, FN]`` that
  are all the backward keeps; ``Σ ℓ_T`` also carries the non-finite probe ``Σ 0·z``.
* ``ext_calf_transform_backward(...) -> grad``: recomputes the sigmoid from the logits and writes
  ``∂/∂z_i = c_b ℓ_T'(z_i) + (A_b y_i + E_b) p_i (1 - p_i)`` in the logits' dtype.
* ``ext_calf_foreground_sizes(labels, C, ignore_index) -> (counts, strays)``: ``(B, C)`` int64
  counts in one pass, and the number of labels outside ``[0, C)`` that are not ``ignore_index``.

Each op has a fake implementation (tracing, ``torch.compile``); the loss op has an autograd formula
that calls the backward op, so ``torch.library.opcheck`` passes.
"""

from __future__ import annotations

import torch

from .._backends import refuse_double_backward
from . import CPU_BACKEND, LOAD_ERROR
from .ops import _math_dtype

__all__ = ["foreground_sizes_op", "transform_backward_op", "transform_loss_op", "unavailable_reason"]

_NUM_STATS = 5


def _has_calf_kernels() -> bool:
    # A library built before these kernels existed loads fine but lacks the ops.
    if LOAD_ERROR is not None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("lmfloss_ext::calf_transform_forward", "CPU")
    except RuntimeError:  # the schema itself is missing
        return False


HAS_KERNELS = _has_calf_kernels()


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the C++ CALF kernels can serve tensors of this device and dtype, else why not."""
    reason = CPU_BACKEND.unavailable_reason(device, dtype)
    if reason is None and not HAS_KERNELS:
        reason = "the loaded extension has no CALF kernels (it predates them; rebuild it)"
    return reason


@torch.library.custom_op("lmfloss::ext_calf_transform_loss", mutates_args=())
def transform_loss_op(
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
    """Per-image CALF loss ``L_b`` and the float64 ``(B, 5)`` sums the backward needs."""
    loss, stats = torch.ops.lmfloss_ext.calf_transform_forward(
        logits, target, transform, transform_coef, dice_coef, eps, smooth_nr, smooth_dr, batch, ignore_index
    )
    return loss, stats


@transform_loss_op.register_fake
def _(logits, target, transform, transform_coef, dice_coef, eps, smooth_nr, smooth_dr, batch, ignore_index):
    batch_size = logits.shape[0]
    return (
        logits.new_empty((batch_size,), dtype=_math_dtype(logits)),
        logits.new_empty((batch_size, _NUM_STATS), dtype=torch.float64),
    )


@torch.library.custom_op("lmfloss::ext_calf_transform_backward", mutates_args=())
def transform_backward_op(
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
    return torch.ops.lmfloss_ext.calf_transform_backward(
        grad_loss, logits, target, stats, transform, transform_coef, dice_coef, eps, smooth_nr, smooth_dr, batch,
        ignore_index,
    )  # fmt: skip


@transform_backward_op.register_fake
def _(grad_loss, logits, *args):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, target, *options = inputs
    ctx.save_for_backward(logits, target, output[1])
    ctx.options = options


def _backward(ctx, grad_loss, _grad_stats):
    logits, target, stats = ctx.saved_tensors
    refuse_double_backward("cpu")
    grad = transform_backward_op(grad_loss, logits, target, stats, *ctx.options)
    return (grad, None) + (None,) * len(ctx.options)


transform_loss_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("lmfloss::ext_calf_foreground_sizes", mutates_args=())
def foreground_sizes_op(
    labels: torch.Tensor, num_classes: int, ignore_index: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, num_classes)`` int64 counts of a ``(B, *S)`` label map, and the count of stray labels."""
    counts, strays = torch.ops.lmfloss_ext.calf_foreground_sizes(labels, num_classes, ignore_index)
    return counts, strays


@foreground_sizes_op.register_fake
def _(labels, num_classes, ignore_index):
    return (
        labels.new_empty((labels.shape[0], num_classes), dtype=torch.int64),
        labels.new_empty((), dtype=torch.int64),
    )
