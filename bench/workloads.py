"""The benchmarked losses: how to build their inputs and call them through each kind of provider.

A workload is one named loss of :mod:`lmfloss_kernels.functional` with fixed keywords (the
authors' defaults), plus MONAI's closest equivalent and a sentence saying how MONAI's function
differs. Dense workloads take ``(B, C, D, H, W)`` logits and a ``uint8`` label map ``(B, D, H, W)`` (the
fast path) or, for the region losses, a float one-hot map of the logits' shape; row workloads
take ``(N, C)`` logits and ``int64`` labels ``(N,)`` as a classification data loader yields them.
Drop-in workloads (:mod:`.dropin`) are a class of ``lmfloss_kernels.monai`` / ``.nnunet`` against the
library class it replaces, on the targets that library takes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from unittest import mock

import torch

import lmfloss_kernels.functional as lf
from lmfloss_kernels import reference

from .dropin import DROPINS, DropIn, make_target

# Class counts of a long-tailed training set (each class 4x rarer than the one before); only the
# LMF margins depend on them.
_TAIL_RATIO = 4.0
TARGET_KINDS = ("labels", "onehot", "multihot")


def class_counts(num_classes: int) -> list[float]:
    return [1e6 / _TAIL_RATIO**j for j in range(num_classes)]


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    dense: bool  # (B, C, *S) volumes, else (N, C) rows
    call: Callable[..., torch.Tensor]  # call(logits, target, backend=...) through the public API
    monai_note: str
    family: str | None = "region_loss"  # the reference family the public API maps it onto (None: drop-in)
    onehot: bool = True  # also takes a float one-hot target (the region losses)
    dropin: DropIn | None = None  # a drop-in class against the library's own (then family is None)

    @property
    def target_kinds(self) -> tuple[str, ...]:
        if self.dropin is not None:
            return (self.dropin.target_kind,)
        return ("labels", "onehot") if self.onehot else ("labels",)


def _lmf(x, t, backend):
    return lf.lmf_loss(x, t, class_counts(x.shape[1]), backend=backend)


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "ufl_asym",
            "Unified Focal, asymmetric (weight=0.5, delta=0.6, gamma=0.5)",
            True,
            lambda x, t, backend: lf.unified_focal_loss(x, t, asymmetric=True, backend=backend),
            "MONAI AsymmetricUnifiedFocalLoss(weight=0.5, delta=0.6, gamma=0.5) fed softmax(logits) (it takes "
            "probabilities; the softmax is timed): binary only, reads channels 0 and 1 and silently drops classes "
            ">= 2, averages the focal term over its 2 channels (half the authors' value), weight on the focal term "
            "(same at 0.5)",
        ),
        Workload(
            "ufl_sym",
            "Unified Focal, symmetric (weight=0.5, delta=0.6, gamma=0.5)",
            True,
            lambda x, t, backend: lf.unified_focal_loss(x, t, asymmetric=False, backend=backend),
            "MONAI has no symmetric UFL; closest: 0.5*TverskyLoss(softmax, alpha=0.4, beta=0.6) + "
            "0.5*FocalLoss(use_softmax, gamma=0.5): no focal exponent on the Tversky term, 1e-5 smoothing, no clip, "
            "focal term averaged over C and without the delta class weights",
        ),
        Workload(
            "mixed_focal",
            "Mixed Focal (weight=None, delta=0.7, gamma_f=2, gamma_fd=0.75)",
            True,
            lambda x, t, backend: lf.mixed_focal_loss(x, t, backend=backend),
            "MONAI DiceFocalLoss(softmax=True, gamma=2): softmax Dice without the focal exponent 0.75 or delta, and "
            "a SIGMOID focal term (use_softmax is not forwarded), averaged over C",
        ),
        Workload(
            "dense_lmf",
            "LMF on voxels (alpha=beta=1, gamma=1.5, s=30, margins as weights)",
            True,
            _lmf,
            "MONAI FocalLoss(use_softmax=True, gamma=1.5): focal term only (MONAI has no LDAM), no class weights, "
            "mean over B*C*voxels (divided by C too)",
            family="row_loss",
            onehot=False,
        ),
        Workload(
            "lmf_rows",
            "LMF on rows (alpha=beta=1, gamma=1.5, s=30, margins as weights)",
            False,
            _lmf,
            "MONAI FocalLoss(use_softmax=True, gamma=1.5) on (N, C): focal term only (MONAI has no LDAM), no class "
            "weights, mean over N*C",
            family="row_loss",
            onehot=False,
        ),
    )
}
WORKLOADS.update(
    {
        name: Workload(
            name,
            title,
            True,
            # One construction per call: the runner builds the criterion once per provider instead.
            lambda x, t, backend, dropin=dropin: dropin.ours(backend)(x, t),
            "",
            family=None,
            onehot=False,
            dropin=dropin,
        )
        for name, (title, dropin) in DROPINS.items()
    }
)


def logits_shape(workload: Workload, size: int, num_classes: int, batch: int = 2) -> tuple[int, ...]:
    """``(B, C, size, size, size)`` for dense workloads, ``(size, C)`` for rows."""
    return (batch, num_classes, size, size, size) if workload.dense else (size, num_classes)


def make_inputs(
    workload: Workload, shape: tuple[int, ...], dtype: torch.dtype, target_kind: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh random logits (leaf, requires grad) and a target for them."""
    num_classes = shape[1]
    logits = (3.0 * torch.randn(shape, device=device)).to(dtype).requires_grad_(True)
    if target_kind not in workload.target_kinds:
        raise ValueError(f"workload {workload.name!r} takes {workload.target_kinds}, got target kind {target_kind!r}")
    if workload.dropin is not None:
        return logits, make_target(workload.dropin, logits)
    label_shape = shape[:1] + shape[2:]
    label_dtype = torch.uint8 if workload.dense else torch.int64
    labels = torch.randint(0, num_classes, label_shape, device=device, dtype=label_dtype)
    if target_kind == "labels":
        return logits, labels
    onehot = torch.nn.functional.one_hot(labels.long(), num_classes).movedim(-1, 1).to(dtype).contiguous()
    return logits, onehot


def target_label(workload: Workload, target: torch.Tensor) -> str:
    """Short description of a target tensor for the results table."""
    if target.is_floating_point():
        kind = "multi-hot" if workload.target_kinds == ("multihot",) else "one-hot"
        return f"{kind} {str(target.dtype).removeprefix('torch.')}"
    return {torch.uint8: "u8 labels", torch.int64: "i64 labels"}.get(target.dtype, str(target.dtype))


# --------------------------------------------------------------------------------------------
# torch.compile of the reference


class _Recorder:
    """Stands in for a backend to record the exact family call the public API would make."""

    name = "reference"  # keeps check mode from comparing the recorder with the reference

    def __init__(self):
        self.call = None

    def _record(self, family, logits, *args, **kwargs):
        self.call = (family, args, kwargs)
        return logits.new_zeros(())

    def row_loss(self, logits, *args, **kwargs):
        return self._record("row_loss", logits, *args, **kwargs)

    def region_loss(self, logits, *args, **kwargs):
        return self._record("region_loss", logits, *args, **kwargs)


def family_call(workload: Workload, logits: torch.Tensor, target: torch.Tensor):
    """``(family name, per-class vectors, keywords)`` that the public API passes to a backend."""
    recorder = _Recorder()
    with mock.patch.object(lf, "resolve_backend", lambda name, x: recorder), torch.no_grad():
        workload.call(logits.detach(), target, backend="reference")
    family, args, kwargs = recorder.call
    return family, args[1:], kwargs


@functools.cache
def _compiled_family(family: str, frozen_kwargs: tuple) -> Callable:
    return torch.compile(functools.partial(getattr(reference, family), **dict(frozen_kwargs)), dynamic=True)


def compiled_reference(workload: Workload, logits: torch.Tensor, target: torch.Tensor) -> Callable:
    """``torch.compile`` of the reference family with this workload's arguments bound.

    The per-class vectors (which depend on C) are arguments of the compiled function, the scalar
    keywords are constants of it, and shapes are dynamic: a sweep over sizes and class counts
    compiles one graph per dtype and grad mode. Compilation happens in the warm-up, untimed.
    """
    family, vectors, kwargs = family_call(workload, logits, target)
    compiled = _compiled_family(family, tuple(sorted(kwargs.items())))
    return lambda x, t: compiled(x, t, *vectors)


# --------------------------------------------------------------------------------------------
# MONAI


def monai_loss(workload: Workload, num_classes: int, target_kind: str) -> Callable | None:
    """MONAI's closest equivalent as ``fn(logits, target)``, or None when MONAI is not installed."""
    try:
        from monai import losses
    except ImportError:
        return None
    onehot_y = target_kind == "labels"

    def channel_target(t):
        # MONAI wants label maps with a channel axis: (B, 1, *S) or (N, 1).
        return t.unsqueeze(1) if onehot_y else t

    if workload.name == "ufl_asym":
        loss = losses.AsymmetricUnifiedFocalLoss(
            to_onehot_y=onehot_y, num_classes=num_classes, weight=0.5, gamma=0.5, delta=0.6
        )
        return lambda x, t: loss(torch.softmax(x, 1), channel_target(t))
    if workload.name == "ufl_sym":
        tversky = losses.TverskyLoss(to_onehot_y=onehot_y, softmax=True, alpha=0.4, beta=0.6)
        focal = losses.FocalLoss(to_onehot_y=onehot_y, use_softmax=True, gamma=0.5)
        return lambda x, t: 0.5 * tversky(x, channel_target(t)) + 0.5 * focal(x, channel_target(t))
    if workload.name == "mixed_focal":
        loss = losses.DiceFocalLoss(to_onehot_y=onehot_y, softmax=True, gamma=2.0)
        return lambda x, t: loss(x, channel_target(t))
    loss = losses.FocalLoss(to_onehot_y=onehot_y, use_softmax=True, gamma=1.5)
    return lambda x, t: loss(x, channel_target(t))


# --------------------------------------------------------------------------------------------
# Bytes that a fused implementation must move


def bytes_moved(mode: str, logits: torch.Tensor, target: torch.Tensor) -> int:
    """Compulsory memory traffic of one call in ``mode`` (the design's bandwidth model).

    forward / no-grad forward: logits and target read once. backward: logits and target read
    once more (the gradient is recomputed from them) and the gradient (logits' dtype) written
    once. fwd+bwd: logits and target read twice, gradient written once. Per-(b, c) statistics
    and the scalar loss are negligible.
    """
    logits_bytes = logits.numel() * logits.element_size()
    target_bytes = target.numel() * target.element_size()
    reads = {"forward": 1, "nograd": 1, "backward": 1, "full": 2}[mode]
    writes = 0 if mode in ("forward", "nograd") else 1
    return reads * (logits_bytes + target_bytes) + writes * logits_bytes


def voxels(shape: tuple[int, ...]) -> int:
    """Rows or voxels: every logits element but the class axis."""
    return math.prod(shape) // shape[1]
