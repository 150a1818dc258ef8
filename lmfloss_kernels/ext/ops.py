"""The extension's kernels as ``torch.library`` custom ops (namespace ``lmfloss``, prefix ``ext_``).

Each op wraps one kernel of ``torch.ops.lmfloss_ext`` (the C++ library dispatches it to the CPU
or CUDA implementation by the logits' device), has a fake implementation for tracing and, for
the forward ops, an autograd formula that calls the matching backward op. So
``torch.library.opcheck`` passes and ``torch.compile(fullgraph=True)`` traces through them.
The formulas are first order only: backward with ``create_graph=True`` raises
(:func:`.._autograd.refuse_double_backward`).

* ``ext_row_loss(...) -> (loss, norms)``, ``ext_row_loss_backward(...) -> grad``: the row family;
  ``norms`` = [sum of the valid rows' LDAM weights, number of valid rows] (float64), the two
  normalisers of ``"mean"``. The backward recomputes the softmax from the logits.
* ``ext_region_loss(...) -> (loss, stats)``, ``ext_region_loss_backward(...) -> grad``: the
  region family; ``stats`` (``B x (3C + 2)`` float64: TP, FN, FP per class, focal sum, valid
  voxels) is all that is kept between the passes. The last argument, ``sigmoid`` (default
  ``False``), selects the multi-label mode (``focal_weight`` / ``focal_gamma`` of shape ``(2, C)``).
"""

from __future__ import annotations

import torch

from .._autograd import call_op, refuse_double_backward, register_eager_kernel

REDUCTION_CODES = {"none": 0, "sum": 1, "mean": 2}


def _math_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


@torch.library.custom_op("lmfloss::ext_row_loss", mutates_args=())
def row_loss_op(
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
    loss, norms = torch.ops.lmfloss_ext.row_loss_forward(
        logits, labels, margins, ldam_weight, focal_weight, alpha, beta, gamma, s, ignore_index,
        REDUCTION_CODES[reduction],
    )  # fmt: skip
    return loss, norms


@row_loss_op.register_fake
def _(logits, labels, margins, ldam_weight, focal_weight, alpha, beta, gamma, s, ignore_index, reduction):
    shape = labels.shape if reduction == "none" else ()
    return logits.new_empty(shape, dtype=_math_dtype(logits)), logits.new_empty(2, dtype=torch.float64)


@torch.library.custom_op("lmfloss::ext_row_loss_backward", mutates_args=())
def row_loss_backward_op(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    margins: torch.Tensor,
    ldam_weight: torch.Tensor,
    focal_weight: torch.Tensor,
    norms: torch.Tensor,
    alpha: float,
    beta: float,
    gamma: float,
    s: float,
    ignore_index: int,
    reduction: str,
) -> torch.Tensor:
    return torch.ops.lmfloss_ext.row_loss_backward(
        grad_loss, logits, labels, margins, ldam_weight, focal_weight, norms, alpha, beta, gamma, s, ignore_index,
        REDUCTION_CODES[reduction],
    )  # fmt: skip


@row_loss_backward_op.register_fake
def _(grad_loss, logits, *args):
    return torch.empty_like(logits)


def _row_setup(ctx, inputs, output):
    logits, labels, margins, ldam_weight, focal_weight = inputs[:5]
    ctx.save_for_backward(logits, labels, margins, ldam_weight, focal_weight, output[1])
    ctx.options = inputs[5:]


def _row_backward(ctx, grad_loss, _grad_norms):
    logits, labels, margins, ldam_weight, focal_weight, norms = ctx.saved_tensors
    refuse_double_backward(logits.device.type)  # the backends are named "cpu" and "cuda"
    grad = call_op(
        row_loss_backward_op, grad_loss, logits, labels, margins, ldam_weight, focal_weight, norms, *ctx.options
    )
    return (grad,) + (None,) * 10


row_loss_op.register_autograd(_row_backward, setup_context=_row_setup)


def _row_loss_eager(logits, labels, margins, ldam_weight, focal_weight, alpha, beta, gamma, s, ignore_index, reduction):
    # The extension op itself, whose autograd kernel (csrc/autograd.cpp) is the formula above in C++.
    return torch.ops.lmfloss_ext.row_loss_forward(
        logits, labels, margins, ldam_weight, focal_weight, alpha, beta, gamma, s, ignore_index,
        REDUCTION_CODES[reduction],
    )  # fmt: skip


register_eager_kernel(row_loss_op, _row_loss_eager, "lmfloss_ext::row_loss_forward")


@torch.library.custom_op("lmfloss::ext_region_loss", mutates_args=())
def region_loss_op(
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
    loss, stats = torch.ops.lmfloss_ext.region_loss_forward(
        logits, target, focal_weight, focal_gamma, tversky_exponent, delta, focal_coef, tversky_coef, smooth_nr,
        smooth_dr, eps, clip, batch, ignore_index, REDUCTION_CODES[reduction], sigmoid,
    )  # fmt: skip
    return loss, stats


@region_loss_op.register_fake
def _(logits, target, focal_weight, focal_gamma, tversky_exponent, delta, focal_coef, tversky_coef, smooth_nr,
      smooth_dr, eps, clip, batch, ignore_index, reduction, sigmoid=False):  # fmt: skip
    batch, num_classes = logits.shape[:2]
    loss = logits.new_empty((batch,) if reduction == "none" else (), dtype=_math_dtype(logits))
    return loss, logits.new_empty((batch, 3 * num_classes + 2), dtype=torch.float64)


@torch.library.custom_op("lmfloss::ext_region_loss_backward", mutates_args=())
def region_loss_backward_op(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    focal_weight: torch.Tensor,
    focal_gamma: torch.Tensor,
    tversky_exponent: torch.Tensor,
    stats: torch.Tensor,
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
    return torch.ops.lmfloss_ext.region_loss_backward(
        grad_loss, logits, target, focal_weight, focal_gamma, tversky_exponent, stats, delta, focal_coef,
        tversky_coef, smooth_nr, smooth_dr, eps, clip, batch, ignore_index, REDUCTION_CODES[reduction], sigmoid,
    )  # fmt: skip


@region_loss_backward_op.register_fake
def _(grad_loss, logits, *args):
    return torch.empty_like(logits)


def _region_setup(ctx, inputs, output):
    logits, target, focal_weight, focal_gamma, tversky_exponent = inputs[:5]
    ctx.save_for_backward(logits, target, focal_weight, focal_gamma, tversky_exponent, output[1])
    ctx.options = inputs[5:]


def _region_backward(ctx, grad_loss, _grad_stats):
    logits, target, focal_weight, focal_gamma, tversky_exponent, stats = ctx.saved_tensors
    refuse_double_backward(logits.device.type)
    grad = call_op(
        region_loss_backward_op,
        grad_loss,
        logits,
        target,
        focal_weight,
        focal_gamma,
        tversky_exponent,
        stats,
        *ctx.options,
    )
    return (grad,) + (None,) * (4 + len(ctx.options))  # one per input; `sigmoid` may be left to its default


region_loss_op.register_autograd(_region_backward, setup_context=_region_setup)


def _region_loss_eager(logits, target, focal_weight, focal_gamma, tversky_exponent, delta, focal_coef, tversky_coef,
                       smooth_nr, smooth_dr, eps, clip, batch, ignore_index, reduction, sigmoid=False):  # fmt: skip
    # The extension op itself, whose autograd kernel (csrc/autograd.cpp) is the formula above in C++.
    return torch.ops.lmfloss_ext.region_loss_forward(
        logits, target, focal_weight, focal_gamma, tversky_exponent, delta, focal_coef, tversky_coef, smooth_nr,
        smooth_dr, eps, clip, batch, ignore_index, REDUCTION_CODES[reduction], sigmoid,
    )  # fmt: skip


register_eager_kernel(region_loss_op, _region_loss_eager, "lmfloss_ext::region_loss_forward")
