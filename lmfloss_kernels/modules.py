"""Drop-in ``nn.Module`` criteria: ``criterion = UnifiedFocalLoss(); loss = criterion(logits, target)``.

Each module takes the keywords of the function of the same name in
:mod:`lmfloss_kernels.functional` (see there for formulas, defaults and sources) and checks
them when it is built, so a bad hyper-parameter fails at construction, not in the first
training step. Per-class tensors (margins, class weights, ``alpha``) are registered as
buffers, so ``criterion.to(device)`` moves them and ``state_dict`` saves them; they keep their
dtype under ``criterion.to(dtype)`` (see :class:`_Criterion`).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from . import functional as F
from ._backends import BACKEND_NAMES, preload
from ._plans import planned_call
from ._validation import as_class_values, check_bool, check_class_counts, check_number, class_vector, per_class_on

__all__ = [
    "AsymmetricFocalLoss",
    "DiceCELoss",
    "DiceFocalLoss",
    "DiceLoss",
    "FocalLoss",
    "FocalTverskyLoss",
    "LDAMLoss",
    "LMFLoss",
    "MixedFocalLoss",
    "SigmoidFocalLoss",
    "SymmetricFocalLoss",
    "TverskyLoss",
    "UnifiedFocalLoss",
]


def _documented(function):
    """Class decorator: the criterion's docstring continues with its function's (formula, defaults, MONAI)."""

    def decorate(cls):
        cls.__doc__ = (
            f"{inspect.cleandoc(cls.__doc__)}\n\n"
            f"``criterion(logits, target)`` equals ``{function.__name__}(logits, target, **keywords)`` with the "
            f"keywords given to the constructor; from :func:`lmfloss_kernels.functional.{function.__name__}`:\n\n"
            f"{inspect.cleandoc(function.__doc__)}"
        )
        return cls

    return decorate


def _check_backend(backend: object) -> str:
    if not isinstance(backend, str) or backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {list(BACKEND_NAMES)}, got {backend!r}")
    preload(backend)
    return backend


class _Criterion(nn.Module):
    """Base of the criteria: per-class buffers keep their dtype and are served to each call cached.

    ``criterion.to(torch.bfloat16)`` (or ``.half()``, ``.double()``) would round floating-point
    buffers; per-class constants (margins, class weights, ``alpha``) are not activations, so they
    keep the dtype they were built in (float64 or float32) and follow device moves only. Each
    call needs them on the logits' device in the loss's math dtype: that copy is made once per
    (buffer, device, dtype) and reused until the buffer is replaced or changed in place
    (``load_state_dict``, a DDP buffer broadcast), so a training step makes no per-class copies.
    """

    def __init__(self) -> None:
        super().__init__()
        self._served: dict = {}

    def _apply(self, fn, recurse=True):
        before = {name: buffer for name, buffer in self._buffers.items() if buffer is not None}
        super()._apply(fn, recurse)
        for name, buffer in before.items():
            moved = self._buffers[name]
            if moved is not None and moved.dtype != buffer.dtype:
                self._buffers[name] = buffer.to(device=moved.device)
        return self

    def _served_buffer(self, name: str, logits: torch.Tensor, label: str) -> torch.Tensor | None:
        """Buffer ``name`` on the logits' device in their math dtype; ``label`` names it in errors."""
        buffer = getattr(self, name)
        if buffer is None:
            return None
        dtype = F._vector_dtype(logits)
        if torch.compiler.is_compiling():
            return per_class_on(label, buffer, logits.device, dtype)
        # A criterion pickled before this cache existed has no _served until its first call.
        served = self.__dict__.setdefault("_served", {})
        key = (name, logits.device, dtype)
        hit = served.get(key)
        if hit is not None and hit[0] is buffer and hit[1] == buffer._version:
            return hit[2]
        # A copy made under inference_mode would be an inference tensor, which autograd refuses
        # to save in a later training step.
        with torch.inference_mode(False):
            value = per_class_on(label, buffer, logits.device, dtype)
        served[key] = (buffer, buffer._version, value)
        return value


class _KeywordLoss(_Criterion):
    """A criterion that forwards fixed keywords to one function of :mod:`functional`.

    Construction runs the function once on shape-only ``meta`` tensors under
    :func:`functional.checks_only`: every hyper-parameter check runs, nothing is computed.
    """

    _function = None

    def __init__(self, *, tensors: dict[str, torch.Tensor | None] | None = None, **kwargs) -> None:
        super().__init__()
        self.backend = _check_backend(kwargs.pop("backend"))
        self.kwargs = kwargs
        self._tensor_names = tuple(tensors or {})
        num_classes = 2
        for name, tensor in (tensors or {}).items():
            self.register_buffer(name, tensor)
            if tensor is not None:
                num_classes = tensor.numel()
        dry_logits = torch.zeros(1, num_classes, 1, device="meta")
        dry_target = torch.zeros(1, 1, dtype=torch.long, device="meta")
        dry_kwargs = self._call_kwargs()
        if "dist_sync" in dry_kwargs:
            # The process group may be initialised after the criterion is built: the dry run
            # checks the keyword's type only.
            check_bool("dist_sync", dry_kwargs["dist_sync"])
            dry_kwargs.update(dist_sync=False, process_group=None)
        with F.checks_only():
            type(self)._function(dry_logits, dry_target, **dry_kwargs, backend="reference")

    def _call_kwargs(self, logits: torch.Tensor | None = None) -> dict:
        tensors = {
            name: getattr(self, name) if logits is None else self._served_buffer(name, logits, name)
            for name in self._tensor_names
        }
        return {**self.kwargs, **tensors}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return planned_call(self, (self.backend, self.kwargs), self._compute, logits, target)

    def _compute(self, logits, target) -> torch.Tensor:
        served = self._call_kwargs(logits) if isinstance(logits, torch.Tensor) else self._call_kwargs()
        return type(self)._function(logits, target, **served, backend=self.backend)

    def extra_repr(self) -> str:
        shown = {k: v for k, v in self.kwargs.items() if not isinstance(v, torch.Tensor) and k != "process_group"}
        return ", ".join(f"{k}={v!r}" for k, v in {**shown, "backend": self.backend}.items())


@_documented(F.unified_focal_loss)
class UnifiedFocalLoss(_KeywordLoss):
    """Unified Focal loss criterion for segmentation logits ``(B, C, *S)`` (asymmetric by default)."""

    _function = staticmethod(F.unified_focal_loss)

    def __init__(
        self,
        *,
        weight: float | None = 0.5,
        delta: float = 0.6,
        gamma: float = 0.5,
        asymmetric: bool = True,
        sigmoid: bool = False,
        batch: bool = False,
        clip: bool = True,
        eps: float = 1e-7,
        reduction: str = "mean",
        ignore_index: int | None = None,
        backend: str = "auto",
        dist_sync: bool = False,
        process_group=None,
    ) -> None:
        super().__init__(**{k: v for k, v in locals().items() if k not in ("self", "__class__")})


@_documented(F.focal_tversky_loss)
class FocalTverskyLoss(_KeywordLoss):
    """Focal Tversky loss criterion (the region term of the Unified Focal loss)."""

    _function = staticmethod(F.focal_tversky_loss)

    def __init__(
        self,
        *,
        delta: float = 0.7,
        gamma: float = 0.75,
        asymmetric: bool = False,
        sigmoid: bool = False,
        batch: bool = False,
        clip: bool = True,
        eps: float = 1e-7,
        reduction: str = "mean",
        ignore_index: int | None = None,
        backend: str = "auto",
        dist_sync: bool = False,
        process_group=None,
    ) -> None:
        super().__init__(**{k: v for k, v in locals().items() if k not in ("self", "__class__")})


@_documented(F.symmetric_focal_loss)
class SymmetricFocalLoss(_KeywordLoss):
    """Symmetric focal loss criterion (the voxel term of the symmetric Unified Focal loss)."""

    _function = staticmethod(F.symmetric_focal_loss)

    def __init__(
        self,
        *,
        delta: float = 0.7,
        gamma: float = 2.0,
        sigmoid: bool = False,
        clip: bool = True,
        eps: float = 1e-7,
        reduction: str = "mean",
        ignore_index: int | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__(**{k: v for k, v in locals().items() if k not in ("self", "__class__")})


@_documented(F.asymmetric_focal_loss)
class AsymmetricFocalLoss(SymmetricFocalLoss):
    """Asymmetric focal loss criterion (the voxel term of the asymmetric Unified Focal loss)."""

    _function = staticmethod(F.asymmetric_focal_loss)


@_documented(F.tversky_loss)
class TverskyLoss(_KeywordLoss):
    """Tversky loss criterion on softmax probabilities of the logits."""

    _function = staticmethod(F.tversky_loss)

    def __init__(
        self,
        *,
        delta: float = 0.7,
        smooth: float = 1e-6,
        sigmoid: bool = False,
        batch: bool = False,
        clip: bool = False,
        eps: float = 1e-7,
        reduction: str = "mean",
        ignore_index: int | None = None,
        backend: str = "auto",
        dist_sync: bool = False,
        process_group=None,
    ) -> None:
        super().__init__(**{k: v for k, v in locals().items() if k not in ("self", "__class__")})


@_documented(F.dice_loss)
class DiceLoss(_KeywordLoss):
    """Soft Dice loss criterion on softmax probabilities of the logits."""

    _function = staticmethod(F.dice_loss)

    def __init__(
        self,
        *,
        smooth: float = 1e-6,
        sigmoid: bool = False,
        batch: bool = False,
        clip: bool = False,
        eps: float = 1e-7,
        reduction: str = "mean",
        ignore_index: int | None = None,
        backend: str = "auto",
        dist_sync: bool = False,
        process_group=None,
    ) -> None:
        super().__init__(**{k: v for k, v in locals().items() if k not in ("self", "__class__")})


def _class_buffer(name: str, value) -> torch.Tensor | None:
    """A per-class keyword (tensor, array or sequence) as a CPU buffer; ``None`` stays ``None``."""
    value = as_class_values(value)
    if value is None:
        return None
    if not isinstance(value, (torch.Tensor, list, tuple)):
        raise TypeError(f"{name} must be None, a tensor, an array or a sequence of numbers, got {type(value).__name__}")
    count = value.numel() if isinstance(value, torch.Tensor) else len(value)
    return class_vector(name, value, count, torch.device("cpu"))


class _AlphaLoss(_KeywordLoss):
    """A keyword loss whose optional per-class ``alpha`` is kept as a buffer."""

    def __init__(self, *, alpha, **kwargs) -> None:
        super().__init__(tensors={"alpha": _class_buffer("alpha", alpha)}, **kwargs)


@_documented(F.focal_loss)
class FocalLoss(_AlphaLoss):
    """Softmax focal loss criterion for rows ``(N, C)`` or voxel maps ``(B, C, *S)``."""

    _function = staticmethod(F.focal_loss)

    def __init__(
        self,
        *,
        gamma: float = 2.0,
        alpha=None,
        reduction: str = "mean",
        ignore_index: int | None = -100,
        backend: str = "auto",
    ) -> None:
        super().__init__(**{k: v for k, v in locals().items() if k not in ("self", "__class__")})


@_documented(F.mixed_focal_loss)
class MixedFocalLoss(_AlphaLoss):
    """Mixed Focal loss criterion (modified Dice term + modified focal term)."""

    _function = staticmethod(F.mixed_focal_loss)

    def __init__(
        self,
        *,
        weight: float | None = None,
        alpha=None,
        beta: float | None = None,
        delta: float = 0.7,
        gamma_f: float = 2.0,
        gamma_fd: float = 0.75,
        sigmoid: bool = False,
        clip: bool = True,
        eps: float = 1e-7,
        smooth: float = 1e-6,
        reduction: str = "mean",
        ignore_index: int | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__(**{k: v for k, v in locals().items() if k not in ("self", "__class__")})


@_documented(F.dice_ce_loss)
class DiceCELoss(_KeywordLoss):
    """Soft Dice + cross-entropy criterion (softmax), or soft Dice + BCE-with-logits (``sigmoid=True``).

    Per-class ``weight`` and ``pos_weight`` are kept as buffers."""

    _function = staticmethod(F.dice_ce_loss)

    def __init__(
        self,
        *,
        sigmoid: bool = False,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        smooth: float = 1e-5,
        include_background: bool = True,
        weight=None,
        pos_weight=None,
        batch: bool = False,
        reduction: str = "mean",
        ignore_index: int | None = None,
        backend: str = "auto",
        dist_sync: bool = False,
        process_group=None,
    ) -> None:
        kwargs = {k: v for k, v in locals().items() if k not in ("self", "__class__", "weight", "pos_weight")}
        tensors = {"weight": _class_buffer("weight", weight), "pos_weight": _class_buffer("pos_weight", pos_weight)}
        super().__init__(tensors=tensors, **kwargs)


@_documented(F.dice_focal_loss)
class DiceFocalLoss(_KeywordLoss):
    """Soft Dice + focal criterion (softmax, or sigmoid focal with ``sigmoid=True``).

    A per-class ``alpha`` (softmax) is kept as a buffer, a scalar one (sigmoid) as a keyword."""

    _function = staticmethod(F.dice_focal_loss)

    def __init__(
        self,
        *,
        sigmoid: bool = False,
        gamma: float = 2.0,
        alpha=None,
        lambda_dice: float = 1.0,
        lambda_focal: float = 1.0,
        smooth: float = 1e-5,
        include_background: bool = True,
        batch: bool = False,
        reduction: str = "mean",
        ignore_index: int | None = None,
        backend: str = "auto",
        dist_sync: bool = False,
        process_group=None,
    ) -> None:
        kwargs = {k: v for k, v in locals().items() if k not in ("self", "__class__", "alpha")}
        if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
            super().__init__(alpha=alpha, **kwargs)
        else:
            super().__init__(tensors={"alpha": _class_buffer("alpha", alpha)}, **kwargs)


@_documented(F.sigmoid_focal_loss)
class SigmoidFocalLoss(_KeywordLoss):
    """Sigmoid focal loss criterion (torchvision's ``sigmoid_focal_loss``) for ``(B, C, *S)`` logits."""

    _function = staticmethod(F.sigmoid_focal_loss)

    def __init__(
        self,
        *,
        alpha: float | None = 0.25,
        gamma: float = 2.0,
        reduction: str = "mean",
        ignore_index: int | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__(**{k: v for k, v in locals().items() if k not in ("self", "__class__")})


class _MarginLoss(_Criterion):
    """LDAM-style criterion: margins and class weights computed once from ``class_counts``."""

    def __init__(self, class_counts, *, max_m, s, weight, alpha, beta, gamma, reduction, ignore_index, backend):
        super().__init__()
        class_counts = as_class_values(class_counts)
        if isinstance(class_counts, torch.Tensor):
            num_classes = class_counts.numel()
        else:
            num_classes = len(class_counts)
        if num_classes < 2:
            raise ValueError(f"class_counts must have one entry per class, at least 2 classes, got {num_classes}")
        counts = check_class_counts(class_counts, num_classes, torch.device("cpu")).double()
        max_m = check_number("max_m", max_m, low=0.0)
        # float64 buffers: each call rounds them once to the logits' vector dtype, so float64
        # logits see exact margins and float32 logits the same values as the functional API.
        dry_logits = torch.zeros(1, num_classes, dtype=torch.float64)
        margins = F._margins(counts, max_m, dry_logits)
        class_weight = F._class_weight(weight, margins, dry_logits, max_m=max_m).double()
        self.backend = _check_backend(backend)
        self.options = dict(alpha=alpha, beta=beta, gamma=gamma, s=s, reduction=reduction, ignore_index=ignore_index)
        self.register_buffer("class_counts", counts)
        self.register_buffer("margins", margins)
        self.register_buffer("class_weight", class_weight.clone())
        # Validate every remaining keyword now, on a one-row dry run that computes nothing.
        with F.checks_only():
            self._call(dry_logits, torch.zeros(1, dtype=torch.long), backend="reference")

    def _call(self, logits, target, backend):
        opts = self.options
        logits = F.check_logits(logits, dense=False)
        if logits.shape[1] != self.margins.numel():
            raise ValueError(
                f"logits have {logits.shape[1]} classes on dim 1 but class_counts has {self.margins.numel()} entries"
            )
        alpha, beta = F._check_lmf_coefficients(opts["alpha"], opts["beta"])
        # The fused kernels take the buffers' pointers as they are, so a criterion left on another
        # device has them moved, as the functional API moves per-class tensors (meta ones raise).
        margins, class_weight = (
            self._served_buffer(name, logits, f"{type(self).__name__}.{name}") for name in ("margins", "class_weight")
        )
        return F._row_family(
            logits,
            target,
            margins,
            class_weight,
            class_weight,
            alpha=alpha,
            beta=beta,
            gamma=check_number("gamma", opts["gamma"], low=0.0),
            s=check_number("s", opts["s"], low=0.0, low_open=True),
            reduction=opts["reduction"],
            ignore_index=opts["ignore_index"],
            backend=backend,
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return planned_call(self, (self.backend, self.options), self._compute, logits, target)

    def _compute(self, logits, target) -> torch.Tensor:
        return self._call(logits, target, self.backend)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in {**self.options, "backend": self.backend}.items())


@_documented(F.lmf_loss)
class LMFLoss(_MarginLoss):
    """LMF loss criterion ``alpha * LDAM + beta * focal``; margins and class weights are computed once
    from ``class_counts`` and kept as buffers."""

    def __init__(
        self,
        class_counts,
        *,
        alpha: float = 1.0,
        beta: float = 1.0,
        gamma: float = 1.5,
        s: float = 30.0,
        max_m: float = 0.5,
        weight="margins",
        reduction: str = "mean",
        ignore_index: int | None = -100,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            class_counts,
            max_m=max_m,
            s=s,
            weight=weight,
            alpha=alpha,
            beta=beta,
            gamma=gamma,
            reduction=reduction,
            ignore_index=ignore_index,
            backend=backend,
        )


@_documented(F.ldam_loss)
class LDAMLoss(_MarginLoss):
    """LDAM loss criterion; the margins are computed once from ``class_counts`` and kept as buffers."""

    def __init__(
        self,
        class_counts,
        *,
        max_m: float = 0.5,
        s: float = 30.0,
        weight=None,
        reduction: str = "mean",
        ignore_index: int | None = -100,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            class_counts,
            max_m=max_m,
            s=s,
            weight=weight,
            alpha=1.0,
            beta=0.0,
            gamma=0.0,
            reduction=reduction,
            ignore_index=ignore_index,
            backend=backend,
        )
