r"""MONAI-compatible criteria: ``from lmfloss_kernels.monai import DiceCELoss`` in a MONAI script.

``DiceLoss``, ``DiceCELoss``, ``DiceFocalLoss``, ``TverskyLoss`` and ``FocalLoss`` take MONAI
1.6's constructor arguments with MONAI's defaults and return MONAI's values, gradients and
output shapes; they add one keyword, ``backend`` (as everywhere in this package). Inputs are as
MONAI takes them: logits ``(B, C, *S)`` and a target ``(B, 1, *S)`` label map (integer or float,
with ``to_onehot_y=True``) or a ``(B, C, *S)`` one-hot / soft map.

Fused (one pass forward, one backward, through the region family; see :mod:`._compat` for the
mapping) when the options are those of a softmax criterion:

* ``DiceLoss`` / ``DiceCELoss`` / ``TverskyLoss`` with ``softmax=True``, ``sigmoid=False``,
  ``other_act=None``, ``squared_pred=False``, ``jaccard=False``, ``reduction`` ``"mean"`` or
  ``"sum"``, a class ``weight`` that is ``None`` or the same for every class, ``C > 1``; any
  ``include_background``, ``to_onehot_y``, ``batch``, ``smooth_nr``, ``smooth_dr``,
  ``lambda_dice`` / ``lambda_ce``; ``ignore_index`` on label maps; ``TverskyLoss`` with
  ``alpha + beta = 1`` (``delta = beta``). ``DiceCELoss`` needs ``label_smoothing=0``.
* ``FocalLoss`` with ``use_softmax=True``, ``include_background=True``, ``reduction`` ``"mean"``
  or ``"sum"`` (``gamma``, scalar or per-class ``alpha``, per-class ``weight``, ``ignore_index``
  on label maps).

Every other combination is computed by MONAI's own class (when MONAI is installed), with a
one-time warning naming the option; without MONAI it raises ``ImportError``. ``DiceFocalLoss``
always delegates: in MONAI 1.6 its focal term is the sigmoid focal loss
(``FocalLoss(use_softmax=False)``), which the softmax kernels do not compute.
``GeneralizedDiceLoss`` is not provided: its class weights ``1 / G_c^2`` enter a ratio of sums
over classes, which the per-class Tversky terms of the region family cannot express.

Differences: the fused paths compute in float32 (float64 for float64 logits) and return a
float32 loss for half-precision logits, where MONAI computes in the input's dtype. Soft targets
must lie in ``[0, 1]`` (checked on CPU tensors).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from . import functional
from ._compat import (
    check_backend,
    host_values,
    kept_class_scaling,
    label_map,
    per_class_values,
    region_mean,
    uniform_value,
    warn_once,
)
from ._validation import check_bool, check_number

__all__ = ["DiceCELoss", "DiceFocalLoss", "DiceLoss", "FocalLoss", "TverskyLoss"]

_REDUCTIONS = ("none", "mean", "sum")


def _monai_losses():
    try:
        import monai.losses
    except ImportError as error:
        raise ImportError(
            "this combination of options is computed by MONAI's own loss, but MONAI is not installed "
            "(pip install monai), or choose options the fused kernels support (see lmfloss_kernels.monai)"
        ) from error
    return monai.losses


class _MonaiCompatible(nn.Module):
    """Keeps the MONAI constructor arguments, decides per call between the fused path and MONAI's class."""

    _monai_name: str

    def __init__(self, monai_kwargs: dict, backend: str) -> None:
        super().__init__()
        self._monai_kwargs = monai_kwargs
        self.backend = check_backend(backend)
        self._delegate_module: list[nn.Module] = []  # not a submodule: state_dict stays MONAI's

    def _delegate(self, reason: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        owner = f"lmfloss_kernels.monai.{type(self).__name__}"
        module_class = getattr(_monai_losses(), self._monai_name)
        warn_once(owner, reason, f"monai.losses.{self._monai_name}")
        if not self._delegate_module:
            self._delegate_module.append(module_class(**self._monai_kwargs))
        return self._delegate_module[0].to(logits.device)(logits, target)

    def _prepare(self, logits: torch.Tensor, target: torch.Tensor, to_onehot_y: bool, ignore_index) -> tuple:
        """``(target for the region family, is_label_map, reason to delegate or None)``."""
        if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
            raise TypeError(
                f"input and target must be torch.Tensors, got {type(logits).__name__} and {type(target).__name__}"
            )
        if logits.dim() < 3:
            raise ValueError(f"input must have shape (B, C, *spatial), got {tuple(logits.shape)}")
        if target.dim() != logits.dim():
            raise ValueError(
                f"input {tuple(logits.shape)} and target {tuple(target.shape)} must have the same number of "
                f"dimensions; pass a label map as (B, 1, *spatial)"
            )
        if logits.shape[1] == 1:
            return None, False, "a single-channel input (MONAI skips softmax there)"
        if to_onehot_y:
            if target.shape[1] != 1:
                raise ValueError(
                    f"to_onehot_y=True needs a label map of shape (B, 1, *spatial), got target {tuple(target.shape)}"
                )
            return label_map(target), True, None
        if target.shape != logits.shape:
            raise ValueError(
                f"target {tuple(target.shape)} must have the input's shape {tuple(logits.shape)} "
                f"(one-hot) when to_onehot_y=False"
            )
        if ignore_index is not None:
            return None, False, "ignore_index with a one-hot target"
        return (target if target.is_floating_point() else target.to(logits.dtype)), False, None


def _check_activation(sigmoid, softmax, other_act) -> None:
    if other_act is not None and not callable(other_act):
        raise TypeError(f"other_act must be None or callable, got {type(other_act).__name__}")
    if int(bool(sigmoid)) + int(bool(softmax)) + int(other_act is not None) > 1:
        raise ValueError(
            f"at most one of sigmoid=True, softmax=True, other_act may be set, got sigmoid={sigmoid}, "
            f"softmax={softmax}, other_act={other_act!r}"
        )


def _check_reduction(reduction, allowed=_REDUCTIONS) -> str:
    reduction = getattr(reduction, "value", reduction)  # MONAI's LossReduction enum
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {list(allowed)}, got {reduction!r}")
    return reduction


def _activation_reason(sigmoid, softmax, other_act) -> str | None:
    if sigmoid:
        return "sigmoid=True"
    if other_act is not None:
        return "other_act"
    if not softmax:
        return "softmax=False (the loss of raw input values)"
    return None


class _RegionLoss(_MonaiCompatible):
    """The Dice / Tversky part shared by ``DiceLoss``, ``DiceCELoss`` and ``TverskyLoss``."""

    def _region_reason(self) -> str | None:
        kw = self._monai_kwargs
        reason = _activation_reason(kw["sigmoid"], kw["softmax"], kw["other_act"])
        if reason is None and kw.get("squared_pred"):
            reason = "squared_pred=True"
        if reason is None and kw.get("jaccard"):
            reason = "jaccard=True"
        if reason is None and kw["reduction"] == "none":
            reason = 'reduction="none" (per-class values)'
        return reason

    def _region_term(
        self, logits, target, *, delta, smooth_nr, smooth_dr, scale, focal_coef, focal_weight, ignore_index
    ) -> torch.Tensor:
        """``scale`` times MONAI's reduced Dice / Tversky term plus ``focal_coef`` times the mean CE."""
        kw = self._monai_kwargs
        batch_size, num_classes = logits.shape[:2]
        kept = num_classes if kw["include_background"] else num_classes - 1
        factor = scale
        if kw["reduction"] == "sum":
            factor *= kept * (1 if kw["batch"] else batch_size)
        tversky_coef, constant = kept_class_scaling(num_classes, kept, factor)
        exponent = [1.0] * num_classes
        if not kw["include_background"]:
            exponent[0] = 0.0
        loss = region_mean(
            logits,
            target,
            focal_weight=focal_weight,
            focal_gamma=[0.0] * num_classes,
            exponent=exponent,
            delta=delta,
            focal_coef=focal_coef,
            tversky_coef=tversky_coef,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            batch=kw["batch"],
            ignore_index=ignore_index,
            backend=self.backend,
        )
        return loss + constant


class DiceLoss(_RegionLoss):
    r"""MONAI's ``DiceLoss``: ``1 - (2 TP + smooth_nr) / (G + P + smooth_dr)`` per image and class,
    reduced over ``(B, C)`` (over ``C`` with ``batch=True``). Fused for ``softmax=True`` (see the
    module docstring); ``weight`` must be uniform to fuse."""

    _monai_name = "DiceLoss"

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        squared_pred: bool = False,
        jaccard: bool = False,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        weight: Sequence[float] | float | int | torch.Tensor | None = None,
        soft_label: bool = False,
        ignore_index: int | None = None,
        *,
        backend: str = "auto",
    ) -> None:
        _check_activation(sigmoid, softmax, other_act)
        kwargs = dict(locals())
        for key in ("self", "__class__", "backend"):
            kwargs.pop(key)
        kwargs["reduction"] = _check_reduction(reduction)
        kwargs["smooth_nr"] = check_number("smooth_nr", smooth_nr, low=0.0)
        kwargs["smooth_dr"] = check_number("smooth_dr", smooth_dr, low=0.0)
        for name in ("include_background", "to_onehot_y", "batch", "soft_label"):
            check_bool(name, kwargs[name])
        super().__init__(kwargs, backend)
        self.register_buffer("class_weight", None if weight is None else torch.as_tensor(weight))
        self._weight_values = host_values("weight", weight)

    def _weight(self, num_classes: int) -> float | None:
        kept = num_classes if self._monai_kwargs["include_background"] else num_classes - 1
        if self._weight_values is None or kept == 1:  # MONAI applies no weight to a single class
            return 1.0
        return uniform_value("weight", self._weight_values, kept)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: A002 (MONAI's name)
        kw = self._monai_kwargs
        target_map, is_label_map, reason = self._prepare(input, target, kw["to_onehot_y"], kw["ignore_index"])
        reason = reason or self._region_reason()
        if reason is None and kw["soft_label"] and not is_label_map:
            reason = "soft_label=True with a soft target"
        weight = self._weight(input.shape[1]) if reason is None else 1.0
        if weight is None:
            reason = "a per-class weight"
        if reason is not None:
            return self._delegate(reason, input, target)
        return self._region_term(
            input,
            target_map,
            delta=0.5,
            smooth_nr=kw["smooth_nr"] / 2,
            smooth_dr=kw["smooth_dr"] / 2,
            scale=weight,
            focal_coef=0.0,
            focal_weight=[0.0] * input.shape[1],
            ignore_index=kw["ignore_index"],
        )


class TverskyLoss(_RegionLoss):
    r"""MONAI's ``TverskyLoss``: ``1 - (TP + smooth_nr) / (TP + alpha FP + beta FN + smooth_dr)``,
    reduced over ``(B, C)``. Fused for ``softmax=True`` and ``alpha + beta = 1``."""

    _monai_name = "TverskyLoss"

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        alpha: float = 0.5,
        beta: float = 0.5,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        soft_label: bool = False,
        ignore_index: int | None = None,
        *,
        backend: str = "auto",
    ) -> None:
        _check_activation(sigmoid, softmax, other_act)
        kwargs = dict(locals())
        for key in ("self", "__class__", "backend"):
            kwargs.pop(key)
        kwargs["reduction"] = _check_reduction(reduction)
        kwargs["alpha"] = check_number("alpha", alpha, low=0.0)
        kwargs["beta"] = check_number("beta", beta, low=0.0)
        kwargs["smooth_nr"] = check_number("smooth_nr", smooth_nr, low=0.0)
        kwargs["smooth_dr"] = check_number("smooth_dr", smooth_dr, low=0.0)
        for name in ("include_background", "to_onehot_y", "batch", "soft_label"):
            check_bool(name, kwargs[name])
        super().__init__(kwargs, backend)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: A002
        kw = self._monai_kwargs
        target_map, is_label_map, reason = self._prepare(input, target, kw["to_onehot_y"], kw["ignore_index"])
        reason = reason or self._region_reason()
        if reason is None and abs(kw["alpha"] + kw["beta"] - 1.0) > 1e-12:
            reason = "alpha + beta != 1"
        if reason is None and kw["soft_label"] and not is_label_map:
            reason = "soft_label=True with a soft target"
        if reason is not None:
            return self._delegate(reason, input, target)
        return self._region_term(
            input,
            target_map,
            delta=kw["beta"],
            smooth_nr=kw["smooth_nr"],
            smooth_dr=kw["smooth_dr"],
            scale=1.0,
            focal_coef=0.0,
            focal_weight=[0.0] * input.shape[1],
            ignore_index=kw["ignore_index"],
        )


class DiceCELoss(_RegionLoss):
    r"""MONAI's ``DiceCELoss``: ``lambda_dice * DiceLoss + lambda_ce * CrossEntropyLoss``, both terms
    from one fused pass (cross-entropy = the focal term with ``gamma = 0``) for ``softmax=True``.

    The cross-entropy uses every channel (``include_background`` concerns the Dice term only); a
    ``(B, 1, *S)`` target is read as class indices, a ``(B, C, *S)`` one as class probabilities,
    as in MONAI. ``weight`` must be uniform to fuse (it then scales the Dice term, and the
    cross-entropy for probability targets or ``"sum"``, as torch's weighted cross-entropy does)."""

    _monai_name = "DiceCELoss"

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        squared_pred: bool = False,
        jaccard: bool = False,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        weight: torch.Tensor | None = None,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        label_smoothing: float = 0.0,
        *,
        backend: str = "auto",
    ) -> None:
        _check_activation(sigmoid, softmax, other_act)
        kwargs = dict(locals())
        for key in ("self", "__class__", "backend"):
            kwargs.pop(key)
        kwargs["reduction"] = _check_reduction(reduction, ("mean", "sum"))
        kwargs["lambda_dice"] = check_number("lambda_dice", lambda_dice, low=0.0)
        kwargs["lambda_ce"] = check_number("lambda_ce", lambda_ce, low=0.0)
        kwargs["label_smoothing"] = check_number("label_smoothing", label_smoothing, low=0.0, high=1.0)
        kwargs["smooth_nr"] = check_number("smooth_nr", smooth_nr, low=0.0)
        kwargs["smooth_dr"] = check_number("smooth_dr", smooth_dr, low=0.0)
        for name in ("include_background", "to_onehot_y", "batch"):
            check_bool(name, kwargs[name])
        if weight is not None and not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be None or a torch.Tensor (as MONAI's), got {type(weight).__name__}")
        super().__init__(kwargs, backend)
        self._weight_values = host_values("weight", weight)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: A002
        kw = self._monai_kwargs
        target_map, is_label_map, reason = self._prepare(input, target, kw["to_onehot_y"], None)
        reason = reason or self._region_reason()
        if reason is None and kw["label_smoothing"] != 0.0:
            reason = "label_smoothing != 0"
        weight = 1.0
        if reason is None and self._weight_values is not None:
            weight = uniform_value("weight", self._weight_values, input.shape[1])
            if weight is None:
                reason = "a per-class weight"
        if reason is not None:
            return self._delegate(reason, input, target)
        num_classes = input.shape[1]
        kept = num_classes if kw["include_background"] else num_classes - 1
        dice_weight = 1.0 if kept == 1 else weight
        # torch's weighted cross-entropy: for class indices "mean" divides by the sum of the
        # voxels' weights (a uniform weight cancels), for probabilities by the voxel count.
        ce_scale = weight if (kw["reduction"] == "sum" or not is_label_map) else 1.0
        if kw["reduction"] == "sum":
            ce_scale *= input[0, 0].numel() * input.shape[0]
        return self._region_term(
            input,
            target_map,
            delta=0.5,
            smooth_nr=kw["smooth_nr"] / 2,
            smooth_dr=kw["smooth_dr"] / 2,
            scale=kw["lambda_dice"] * dice_weight,
            focal_coef=kw["lambda_ce"] * ce_scale,
            focal_weight=[1.0] * num_classes,
            ignore_index=None,
        )


class DiceFocalLoss(_MonaiCompatible):
    r"""MONAI's ``DiceFocalLoss``, always computed by MONAI's class (warned once): its focal term is
    MONAI's sigmoid focal loss, which the softmax kernels do not compute. Needs MONAI installed."""

    _monai_name = "DiceFocalLoss"

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        squared_pred: bool = False,
        jaccard: bool = False,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        gamma: float = 2.0,
        weight: Sequence[float] | float | int | torch.Tensor | None = None,
        lambda_dice: float = 1.0,
        lambda_focal: float = 1.0,
        alpha: float | None = None,
        *,
        backend: str = "auto",
    ) -> None:
        _check_activation(sigmoid, softmax, other_act)
        kwargs = dict(locals())
        for key in ("self", "__class__", "backend"):
            kwargs.pop(key)
        kwargs["reduction"] = _check_reduction(reduction)
        check_number("lambda_dice", lambda_dice, low=0.0)
        check_number("lambda_focal", lambda_focal, low=0.0)
        super().__init__(kwargs, backend)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: A002
        return self._delegate("the sigmoid focal term of MONAI 1.6's DiceFocalLoss", input, target)


class FocalLoss(_MonaiCompatible):
    r"""MONAI's ``FocalLoss``: ``-alpha_c w_c (1 - p_c)^gamma y_c log p_c`` per element.

    Fused for ``use_softmax=True`` with ``include_background=True``: ``"mean"`` divides by
    ``B C S`` (by the number of valid voxels with ``ignore_index``), ``"sum"`` sums the per-image,
    per-class spatial means, as MONAI does. A scalar ``alpha`` weighs the background ``1 - alpha``
    and the other classes ``alpha``."""

    _monai_name = "FocalLoss"

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        gamma: float = 2.0,
        alpha: float | Sequence[float] | None = None,
        weight: Sequence[float] | float | int | torch.Tensor | None = None,
        reduction: str = "mean",
        use_softmax: bool = False,
        ignore_index: int | None = None,
        *,
        backend: str = "auto",
    ) -> None:
        kwargs = dict(locals())
        for key in ("self", "__class__", "backend"):
            kwargs.pop(key)
        kwargs["reduction"] = _check_reduction(reduction)
        kwargs["gamma"] = check_number("gamma", gamma, low=0.0)
        for name in ("include_background", "to_onehot_y", "use_softmax"):
            check_bool(name, kwargs[name])
        super().__init__(kwargs, backend)
        self.register_buffer("class_weight", None if weight is None else torch.as_tensor(weight))
        self._alpha_values = host_values("alpha", alpha, non_negative=False)
        self._weight_values = host_values("weight", weight)

    def _class_factor(self, num_classes: int) -> list[float]:
        """Per-class ``alpha_c * weight_c`` (a scalar ``alpha``: ``1 - alpha`` for the background)."""
        factor = [1.0] * num_classes
        if self._alpha_values is not None:
            values, scalar = self._alpha_values
            if scalar:
                factor = [1.0 - values[0]] + [values[0]] * (num_classes - 1)
            else:
                factor = list(per_class_values("alpha", self._alpha_values, num_classes))
        if self._weight_values is not None:
            weight = per_class_values("weight", self._weight_values, num_classes)
            factor = [a * w for a, w in zip(factor, weight, strict=True)]
        return factor

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: A002
        kw = self._monai_kwargs
        target_map, is_label_map, reason = self._prepare(input, target, kw["to_onehot_y"], kw["ignore_index"])
        if reason is None and not kw["use_softmax"]:
            reason = "use_softmax=False (the sigmoid focal loss)"
        if reason is None and not kw["include_background"]:
            reason = "include_background=False (MONAI's softmax then runs over the foreground channels only)"
        if reason is None and kw["reduction"] == "none":
            reason = 'reduction="none" (per-element values)'
        if reason is not None:
            return self._delegate(reason, input, target)
        batch_size, num_classes = input.shape[:2]
        factor = self._class_factor(num_classes)
        ignore_index = kw["ignore_index"]
        if ignore_index is not None and kw["reduction"] == "mean":
            # MONAI divides by the valid voxels of the whole batch, not per image: the row family's mean.
            return functional.focal_loss(
                input, target_map, gamma=kw["gamma"], alpha=factor, ignore_index=ignore_index, backend=self.backend
            )
        coef = 1.0 / num_classes if kw["reduction"] == "mean" else float(batch_size)
        return region_mean(
            input,
            target_map,
            focal_weight=factor,
            focal_gamma=[kw["gamma"]] * num_classes,
            exponent=[1.0] * num_classes,
            delta=0.5,
            focal_coef=coef,
            tversky_coef=0.0,
            smooth_nr=0.0,
            smooth_dr=0.0,
            batch=False,
            ignore_index=ignore_index,
            backend=self.backend,
        )
