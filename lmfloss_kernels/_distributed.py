r"""Cross-rank batch statistics for the region family (``dist_sync=True``).

With data parallelism every rank holds a slice of the global batch. ``dist_sync=True`` makes
each rank compute the loss of the *concatenated* batch: one ``all_reduce`` (sum) of an
``O(C)`` vector per call, made of the per-class sums ``TP_c, FN_c, FP_c`` over the rank's
images (``batch=True`` only), the sum of the rank's image-private loss terms and its number of
images. With ``B_g`` the global number of images, ``P_b = w_F F_b`` (plus ``w_FT R_b`` when
``batch=False``) the part of image ``b``'s loss that depends on that image only, and ``R`` the
Tversky term of the global sums:

.. math::

    \text{sum} = \sum_{b \in \text{all ranks}} P_b + [\text{batch}]\, B_g\, w_{FT} R,\qquad
    \text{mean} = \text{sum} / B_g,\qquad
    \text{none}_b = P_b + [\text{batch}]\, w_{FT} R \ \ (b \text{ on this rank}).

Gradient. The other ranks' statistics enter as constants, so for ``"mean"`` and ``"sum"`` the
logit gradient on each rank is exactly its slice of the single-process gradient of the
concatenated batch (no collective in backward, so a rank that skips backward blocks nobody).
For ``"none"`` it is the gradient of this rank's outputs, the other ranks' images held fixed.

DDP. DistributedDataParallel *averages* parameter gradients over the ``W`` ranks, so training
with the synced loss gives ``1/W`` times the single-process parameter gradient; multiply the
loss by :func:`ddp_scale` (``W``) before ``backward`` to match single-process training exactly
(or leave it and absorb the constant factor in the learning rate).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from ._autograd import refuse_double_backward


class DistSync:
    """Which process group to sum the statistics over (``None``: the default group)."""

    def __init__(self, process_group=None) -> None:
        self.process_group = process_group

    def all_reduce(self, values: torch.Tensor) -> torch.Tensor:
        """Sum ``values`` over the group into a fresh tensor (no autograd)."""
        total = values.detach().clone()
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM, group=self.process_group)
        return total


def make_sync(dist_sync: bool, process_group) -> DistSync | None:
    """Validate the ``dist_sync`` / ``process_group`` keywords; ``None`` when not syncing."""
    if not dist_sync:
        if process_group is not None:
            raise ValueError("process_group is used only with dist_sync=True, got dist_sync=False and a process_group")
        return None
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError(
            "dist_sync=True needs an initialised torch.distributed process group "
            "(call torch.distributed.init_process_group first), but none is initialised"
        )
    return DistSync(process_group)


def ddp_scale(process_group=None) -> int:
    """Factor to multiply a ``dist_sync`` loss by under DDP so parameter gradients equal single-process ones.

    DDP averages gradients over the ``W`` ranks of the group while each rank's logit gradient
    is already its slice of the global one, so the factor is ``W``.
    """
    return torch.distributed.get_world_size(process_group)


@dataclasses.dataclass(frozen=True)
class RegionKernels:
    """A fused backend's region kernels as :class:`SyncedRegion` calls them (both with ``reduction="none"``).

    ``statistics(logits) -> (per-image loss, stats)``; ``gradient(weights, stats) -> grad``;
    ``layout`` = (focal-sum column, voxel-count column, first TP column) of ``stats``;
    ``backend``: the backend's name, for the error of a double backward.
    """

    statistics: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    gradient: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    layout: tuple[int, int, int]
    backend: str


def synced_options(
    tversky_exponent, *, delta, focal_coef, tversky_coef, smooth_nr, smooth_dr, batch, reduction
) -> dict:
    """The keywords of the region family that the cross-rank finalize needs."""
    return {
        "tversky_exponent": tversky_exponent.detach(),
        "delta": float(delta),
        "focal_coef": float(focal_coef),
        "tversky_coef": float(tversky_coef),
        "smooth_nr": float(smooth_nr),
        "smooth_dr": float(smooth_dr),
        "batch": bool(batch),
        "reduction": reduction,
    }


def tversky_region(tp, fn, fp, exponent, *, delta, smooth_nr, smooth_dr):
    r"""``R = (1/C) sum_c max(1 - TI_c, tiny)^{e_c}`` from the sums (last axis: classes)."""
    weighted = delta * fn + (1.0 - delta) * fp
    den = tp + weighted + smooth_dr
    one_minus_ti = (weighted + (smooth_dr - smooth_nr)) / den
    return one_minus_ti.clamp_min(torch.finfo(tp.dtype).tiny).pow(exponent).mean(-1)


def combine(private, shared, totals, reduction: str):
    """The reduced loss from differentiable local terms and their all-reduced totals.

    ``private``: ``(B,)`` image-private terms ``P_b``; ``shared``: the term ``w_FT R`` shared by
    every image (0-d, already from global sums) or ``None``; ``totals``: ``[sum_b P_b, B]`` over
    all ranks. Other ranks' terms enter as constants, so the gradient is this rank's slice of
    the global one.
    """
    if reduction == "none":
        return private if shared is None else private + shared
    local = private.sum()
    total = local + (totals[0].to(local.dtype) - local).detach()
    images = totals[1].to(local.dtype)
    if shared is not None:
        total = total + images * shared
    return total / images if reduction == "mean" else total


class SyncedRegion(torch.autograd.Function):
    """A fused backend's region loss over the global batch: statistics pass, all-reduce, finalize, gradient pass.

    ``kernels`` gives ``statistics(logits) -> (per-image loss of the local batch, stats)`` and
    ``gradient(weights, stats) -> logit gradient`` (the backend's kernels run with
    ``reduction="none"``), and ``layout`` = (focal-sum column, voxel-count column, first TP
    column; TP, FN, FP follow as ``C`` columns each). The backward feeds the kernels the global
    sums by adding the other ranks' ``TP, FN, FP`` to the first image's row (with ``batch=True``
    the kernels sum the rows) and, for ``"mean"``/``"sum"``, scales every image's voxel count
    by ``B_g / B`` so that the per-image focal weight ``w_b / n_b`` and the shared Tversky
    weight ``sum_b w_b`` both come out as in the global loss.
    """

    @staticmethod
    def forward(ctx, logits, kernels, options, sync):
        batch, reduction = options["batch"], options["reduction"]
        with torch.no_grad():
            per_image, stats = kernels.statistics(logits)
        focal_col, count_col, tp_col = kernels.layout
        num_images, num_classes = logits.shape[:2]
        wide = stats.double()
        if batch:
            focal = wide[:, focal_col] / wide[:, count_col].clamp_min(1.0)
            private = options["focal_coef"] * focal
            sums = wide[:, tp_col : tp_col + 3 * num_classes].sum(0)
        else:
            private = per_image.double()
            sums = wide.new_zeros(0)
        count = wide.new_full((1,), float(num_images))
        totals = sync.all_reduce(torch.cat([private.sum().reshape(1), count, sums]))
        shared = None
        if batch and options["tversky_coef"] != 0.0:
            tp, fn, fp = totals[2:].view(3, num_classes)
            region = tversky_region(
                tp, fn, fp, options["tversky_exponent"].double(),
                delta=options["delta"], smooth_nr=options["smooth_nr"], smooth_dr=options["smooth_dr"],
            )  # fmt: skip
            shared = options["tversky_coef"] * region
        loss = combine(private, shared, totals[:2], reduction)
        ctx.kernels, ctx.batch, ctx.reduction, ctx.dtype = kernels, batch, reduction, per_image.dtype
        ctx.save_for_backward(logits, stats, totals)
        return loss.to(per_image.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        kernels = ctx.kernels
        refuse_double_backward(kernels.backend)  # the gradient pass is a fused kernel
        logits, stats, totals = ctx.saved_tensors
        _, count_col, tp_col = kernels.layout
        num_images, num_classes = logits.shape[:2]
        columns = slice(tp_col, tp_col + 3 * num_classes)
        global_images = totals[1].to(stats.dtype)
        stats = stats.clone()
        grad_loss = grad_loss.to(ctx.dtype)
        if ctx.batch:
            stats[0, columns] += totals[2:].to(stats.dtype) - stats[:, columns].sum(0)
        if ctx.reduction == "none":
            weights = grad_loss
        elif ctx.batch:
            shared_weight = grad_loss if ctx.reduction == "mean" else grad_loss * global_images.to(ctx.dtype)
            weights = (shared_weight / num_images).expand(num_images)
            stats[:, count_col] *= global_images / num_images
        else:
            image_weight = grad_loss / global_images.to(ctx.dtype) if ctx.reduction == "mean" else grad_loss
            weights = image_weight.expand(num_images)
        grad = kernels.gradient(weights.contiguous(), stats)
        return grad, None, None, None
