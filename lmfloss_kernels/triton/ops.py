"""The Triton kernels as ``torch.library`` custom ops (namespace ``lmfloss``, prefix ``triton_``).

Each op has a fake (meta) implementation and an autograd formula, so ``torch.library.opcheck``
passes and ``torch.compile(fullgraph=True)`` traces through a criterion (the ops are opaque to
Inductor, which is what lets them run under the Triton interpreter too). The formulas are first
order only: backward with ``create_graph=True`` raises (:func:`.._backends.refuse_double_backward`).

* ``triton_row_loss(...) -> (loss, norms)`` and ``triton_row_backward(...) -> grad``: the row
  family's loss pass and its gradient pass (:mod:`.row`); ``norms`` = [sum of the valid rows'
  LDAM weights ``W``, number of valid rows ``n``] (float32) for ``"mean"``, empty otherwise, is
  all that is kept between them besides the inputs. The forward computes no gradient, so a
  no-grad call pays for none; ``norms`` is non-differentiable and no gradient is materialised
  for it.
* ``triton_region_forward(...) -> (loss, stats)`` and ``triton_region_backward(...) -> grad``:
  the region family's statistics pass + finalize and its gradient pass; only ``stats``
  (``B x (2 + 3C)`` floats) is kept between them. ``sigmoid`` (last, default False) selects the
  multi-label mode, whose focal weight and gamma are ``(2, C)`` (positive row, then negative).
"""

from __future__ import annotations

import torch

from .._autograd import call_op
from .._backends import refuse_double_backward
from . import region, row


@torch.library.custom_op("lmfloss::triton_row_loss", mutates_args=())
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
    return row.row_forward(
        logits, labels, margins, ldam_weight, focal_weight, alpha, beta, gamma, s, ignore_index, reduction
    )


@row_loss_op.register_fake
def _(logits, labels, margins, ldam_weight, focal_weight, alpha, beta, gamma, s, ignore_index, reduction):
    shape = labels.shape if reduction == "none" else ()
    loss = logits.new_empty(shape, dtype=torch.float32)
    norms = logits.new_empty(2 if reduction == "mean" else 0, dtype=torch.float32)
    return loss, norms


@torch.library.custom_op("lmfloss::triton_row_backward", mutates_args=())
def row_backward_op(
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
    return row.row_backward(
        grad_loss, logits, labels, norms, margins, ldam_weight, focal_weight, alpha, beta, gamma, s, ignore_index,
        reduction,
    )  # fmt: skip


@row_backward_op.register_fake
def _(grad_loss, logits, *args):
    return torch.empty_like(logits)


def _row_setup(ctx, inputs, output):
    logits, labels, margins, ldam_weight, focal_weight = inputs[:5]
    ctx.save_for_backward(logits, labels, output[1], margins, ldam_weight, focal_weight)
    ctx.options = inputs[5:]
    # norms is a by-product: no zeros are materialised for its (absent) gradient.
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _row_backward(ctx, grad_loss, _grad_of_norms):
    refuse_double_backward("triton")
    if grad_loss is None:
        return (None,) * 11
    logits, labels, norms, margins, ldam_weight, focal_weight = ctx.saved_tensors
    # Through call_op: in eager mode the op's implementation directly, without torch.library's dispatch layers.
    grad = call_op(row_backward_op, grad_loss, logits, labels, norms, margins, ldam_weight, focal_weight, *ctx.options)
    return (grad,) + (None,) * 10


row_loss_op.register_autograd(_row_backward, setup_context=_row_setup)


@torch.library.custom_op("lmfloss::triton_region_forward", mutates_args=())
def region_forward_op(
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
    return region.region_forward(
        logits, target, focal_weight, focal_gamma, tversky_exponent, delta, focal_coef, tversky_coef,
        smooth_nr, smooth_dr, eps, clip, batch, ignore_index, reduction, sigmoid,
    )  # fmt: skip


@region_forward_op.register_fake
def _(logits, target, focal_weight, focal_gamma, tversky_exponent, delta, focal_coef, tversky_coef, smooth_nr,
      smooth_dr, eps, clip, batch, ignore_index, reduction, sigmoid=False):  # fmt: skip
    num_images, num_classes = logits.shape[:2]
    loss = logits.new_empty((num_images,) if reduction == "none" else (), dtype=torch.float32)
    return loss, logits.new_empty((num_images, 2 + 3 * num_classes), dtype=torch.float32)


@torch.library.custom_op("lmfloss::triton_region_backward", mutates_args=())
def region_backward_op(
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
    return region.region_backward(
        grad_loss, logits, target, stats, focal_weight, focal_gamma, tversky_exponent, delta, focal_coef,
        tversky_coef, smooth_nr, smooth_dr, eps, clip, batch, ignore_index, reduction, sigmoid,
    )  # fmt: skip


@region_backward_op.register_fake
def _(grad_loss, logits, *args):
    return torch.empty_like(logits)


def _region_setup(ctx, inputs, output):
    logits, target, focal_weight, focal_gamma, tversky_exponent = inputs[:5]
    ctx.save_for_backward(logits, target, output[1], focal_weight, focal_gamma, tversky_exponent)
    ctx.options = inputs[5:]


def _region_backward(ctx, grad_loss, _grad_of_stats):
    refuse_double_backward("triton")
    logits, target, stats, focal_weight, focal_gamma, tversky_exponent = ctx.saved_tensors
    # Through call_op, as the row backward: eager mode skips torch.library's dispatch layers.
    grad = call_op(
        region_backward_op, grad_loss, logits, target, stats, focal_weight, focal_gamma, tversky_exponent, *ctx.options
    )
    return (grad,) + (None,) * (len(ctx.options) + 4)


region_forward_op.register_autograd(_region_backward, setup_context=_region_setup)
