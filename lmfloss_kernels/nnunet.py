r"""nnU-Net v2 compatible criteria: ``DC_and_CE_loss``, ``DC_and_BCE_loss``, ``DeepSupervisionWrapper``.

Same class names, constructor signatures and forward semantics as
``nnunetv2.training.loss`` (2.x), so a trainer swaps them in by changing its import line (see the
README's recipe). The Dice term is nnU-Net's soft Dice returned as ``-dice``:

.. math::

    \mathrm{DC} = -\mathrm{mean}_{b, c \in K} \frac{2 I_{bc} + s}{\max(G_{bc} + P_{bc} + s,\ 10^{-8})}

over the kept classes ``K`` (all, or all but channel 0 with ``do_bg=False``), with ``I``, ``G``,
``P`` summed over the batch too for ``batch_dice=True``; ``SoftDiceLoss`` and
``MemoryEfficientSoftDiceLoss`` have the same value and gradient and both are accepted as
``dice_class``. ``DC_and_CE_loss`` = ``weight_ce * CE + weight_dice * DC`` with torch's
cross-entropy (mean over the valid voxels of the batch).

Fused: ``DC_and_CE_loss`` runs both terms in one pass forward and one backward of the region
family (CE is its focal term with ``gamma = 0``; ``DC = (C/K) R - C/K`` with exponent-0 classes
for ``do_bg=False`` and the smoothing halved, :mod:`._compat`). With ``ignore_label`` the
cross-entropy's mean runs over the valid voxels of the whole batch where the region family
averages per image, so the Dice term is fused and the cross-entropy is the fused row family
(two passes).

``DC_and_BCE_loss`` (region-based training: independent sigmoid channels, region targets that
may overlap) = ``weight_ce * BCEWithLogits + weight_dice * DC`` on ``sigmoid(net_output)``, one
pass each way of the region family's sigmoid mode (BCE is its two-sided focal term with
``a = 1, gamma = 0``). ``use_ignore_label=True`` (an ignore channel on dense region targets,
which the region family cannot drop: it drops voxels of integer label maps only) and
``bce_kwargs`` other than ``reduction="mean"`` are computed in eager PyTorch, with a one-time
warning naming the option.

The ``10^{-8}`` clamp binds only when ``G + P + s < 10^{-8}``; the fused Dice uses
``max(s, 10^{-8})`` as the denominator's smoothing (:func:`_dice_smoothing`), which is exact
for ``s >= 10^{-8}`` and, for ``s = 0``, gives nnU-Net's 0 for a class with no ground truth (also
with no predicted mass, e.g. an image whose voxels are all ignored) instead of ``0 / 0``; with
ground truth present it changes the dice by a relative ``10^{-8} / (G + P)`` at most. Only a
smoothing strictly between 0 and ``10^{-8}`` with ``G + P`` below ``10^{-8}`` differs visibly.

``ddp=True`` with ``batch_dice=True`` under an initialised ``torch.distributed`` group: the
Dice statistics are summed over the ranks (``dist_sync``) and the gradient is scaled by the
world size, so that DistributedDataParallel's averaging gives the single-process parameter
gradient, as nnU-Net's gathered statistics do. The returned value is then the loss of the
global batch (nnU-Net's per-rank value has the rank's own cross-entropy).
"""

from __future__ import annotations

import torch
from torch import nn

from . import functional
from ._compat import check_backend, kept_class_scaling, label_map, region_mean, warn_once
from ._validation import check_bool, check_number

__all__ = ["DC_and_BCE_loss", "DC_and_CE_loss", "DeepSupervisionWrapper", "deep_supervision_weights"]

_DICE_CLASSES = ("SoftDiceLoss", "MemoryEfficientSoftDiceLoss")
_DICE_KEYS = ("batch_dice", "do_bg", "smooth", "ddp", "clip_tp")
# nnU-Net clamps the Dice denominator at this value.
_DENOMINATOR_FLOOR = 1e-8


def _soft_dice_options(soft_dice_kwargs, dice_class) -> dict:
    if dice_class is not None and getattr(dice_class, "__name__", None) not in _DICE_CLASSES:
        raise ValueError(
            f"dice_class must be nnU-Net's SoftDiceLoss or MemoryEfficientSoftDiceLoss (or None), got {dice_class!r}"
        )
    if not isinstance(soft_dice_kwargs, dict):
        raise TypeError(f"soft_dice_kwargs must be a dict, got {type(soft_dice_kwargs).__name__}")
    unknown = sorted(set(soft_dice_kwargs) - set(_DICE_KEYS))
    if unknown:
        raise TypeError(f"soft_dice_kwargs got unexpected keys {unknown}; nnU-Net's soft Dice takes {list(_DICE_KEYS)}")
    if soft_dice_kwargs.get("clip_tp") is not None:
        raise ValueError(f"soft_dice_kwargs['clip_tp'] is not supported, got {soft_dice_kwargs['clip_tp']!r}")
    return {
        "batch_dice": check_bool("batch_dice", soft_dice_kwargs.get("batch_dice", False)),
        "do_bg": check_bool("do_bg", soft_dice_kwargs.get("do_bg", True)),
        # nnU-Net's class default is 1; its trainers pass 1e-5.
        "smooth": check_number("smooth", soft_dice_kwargs.get("smooth", 1.0), low=0.0),
        "ddp": check_bool("ddp", soft_dice_kwargs.get("ddp", True)),
    }


def _dice_smoothing(smooth: float) -> tuple[float, float]:
    """``(smooth_nr, smooth_dr)`` of the region family for nnU-Net's
    ``(2 I + s) / max(G + P + s, 1e-8)`` (halved: ``G + P = 2 TP + FN + FP``).

    The clamp binds only when ``G + P + s < 1e-8``. The denominator's smoothing is therefore
    ``max(s, 1e-8)``: identical for ``s >= 1e-8`` (nnU-Net's trainers use 1e-5, its class default
    is 1); for ``s = 0`` it turns ``0 / 0`` (a class with no ground truth and no predicted mass,
    e.g. every voxel of the image ignored) into nnU-Net's 0, leaves a class with ``G = 0`` at 0
    (``I = 0`` there), and changes any other class's dice by a relative ``1e-8 / (G + P)`` at most
    (``G >= 1`` for 0/1 targets). For ``0 < s < 1e-8`` a class with ``G + P < 1e-8`` gets
    ``s / (P + 1e-8)`` where nnU-Net has ``s / 1e-8`` (values below ``s / 1e-8 < 1`` either way).
    """
    return smooth / 2, max(smooth, _DENOMINATOR_FLOOR) / 2


def _ddp_sync(options: dict) -> bool:
    return (
        options["ddp"]
        and options["batch_dice"]
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
    )


def _scale_gradient(loss: torch.Tensor, factor: int) -> torch.Tensor:
    """``loss`` in value, ``factor`` times its gradient."""
    return loss if factor == 1 else factor * loss - (factor - 1) * loss.detach()


def _check_weight(name: str, weight) -> float:
    if isinstance(weight, torch.Tensor) and weight.numel() == 1:
        weight = float(weight)
    return check_number(name, weight, low=0.0)


class DC_and_CE_loss(nn.Module):  # noqa: N801 (nnU-Net's class name)
    r"""``weight_ce * CE + weight_dice * DC``; ``forward(net_output (B, C, *S), target (B, 1, *S))``.

    ``soft_dice_kwargs``: ``batch_dice`` (False), ``do_bg`` (True), ``smooth`` (1.0; nnU-Net's
    trainers pass 1e-5), ``ddp`` (True). ``ce_kwargs``: ``weight`` (per-class tensor),
    ``ignore_index`` (set from ``ignore_label``), ``reduction="mean"``, ``label_smoothing=0``.
    ``ignore_label`` drops its voxels from both terms; when every voxel is ignored the
    cross-entropy is 0, as in nnU-Net. ``backend``: this package's backend keyword.
    """

    def __init__(
        self,
        soft_dice_kwargs,
        ce_kwargs,
        weight_ce=1,
        weight_dice=1,
        ignore_label=None,
        dice_class=None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.dice_options = _soft_dice_options(soft_dice_kwargs, dice_class)
        if not isinstance(ce_kwargs, dict):
            raise TypeError(f"ce_kwargs must be a dict, got {type(ce_kwargs).__name__}")
        unknown = sorted(set(ce_kwargs) - {"weight", "ignore_index", "reduction", "label_smoothing"})
        if unknown:
            raise ValueError(f"ce_kwargs keys {unknown} are not supported (weight, ignore_index, reduction, ...)")
        if ce_kwargs.get("reduction", "mean") != "mean":
            raise ValueError(f"ce_kwargs['reduction'] must be 'mean' (nnU-Net's), got {ce_kwargs['reduction']!r}")
        if ce_kwargs.get("label_smoothing", 0.0) != 0.0:
            raise ValueError(f"ce_kwargs['label_smoothing'] must be 0, got {ce_kwargs['label_smoothing']!r}")
        if ignore_label is not None and (isinstance(ignore_label, bool) or not isinstance(ignore_label, int)):
            raise TypeError(f"ignore_label must be an int or None, got {type(ignore_label).__name__}")
        if ignore_label is None and "ignore_index" in ce_kwargs:
            raise ValueError("ce_kwargs['ignore_index'] is set from ignore_label: pass ignore_label instead")
        weight = ce_kwargs.get("weight")
        if weight is not None:
            weight = torch.as_tensor(weight, dtype=torch.float32).reshape(-1)
            if (weight < 0).any():
                raise ValueError(f"ce_kwargs['weight'] must be non-negative, got {weight.tolist()}")
        self.register_buffer("ce_weight", weight)
        self.weight_ce = _check_weight("weight_ce", weight_ce)
        self.weight_dice = _check_weight("weight_dice", weight_dice)
        self.ignore_label = ignore_label
        self.backend = check_backend(backend)

    def _ce_focal_weight(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | list[float]:
        """Per-class focal weights making the region family's voxel mean torch's weighted CE mean:
        ``w_c N / sum_i w_{t_i}`` (a device tensor, no host sync)."""
        num_classes = logits.shape[1]
        if self.ce_weight is None:
            return [1.0] * num_classes
        weight = self._weight_on(logits)
        counts = torch.bincount(labels.reshape(-1).long(), minlength=num_classes)[:num_classes]
        return weight * (labels.numel() / (weight * counts.to(weight.dtype)).sum())

    def _weight_on(self, logits: torch.Tensor) -> torch.Tensor:
        if self.ce_weight.numel() != logits.shape[1]:
            raise ValueError(f"ce_kwargs['weight'] has {self.ce_weight.numel()} entries for {logits.shape[1]} classes")
        return self.ce_weight.to(device=logits.device, dtype=functional._vector_dtype(logits))

    def forward(self, net_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not isinstance(net_output, torch.Tensor) or not isinstance(target, torch.Tensor):
            raise TypeError("net_output and target must be torch.Tensors")
        if net_output.dim() < 3 or target.dim() != net_output.dim() or target.shape[1] != 1:
            raise ValueError(
                f"target must be a (B, 1, *spatial) label map for net_output (B, C, *spatial); got net_output "
                f"{tuple(net_output.shape)} and target {tuple(target.shape)}"
            )
        labels = label_map(target)
        options = self.dice_options
        num_classes = net_output.shape[1]
        kept = num_classes if options["do_bg"] else num_classes - 1
        if kept < 1:
            raise ValueError("do_bg=False needs at least 2 classes, got 1")
        # -dice = mean(1 - TI) - 1 over the kept classes.
        tversky_coef, constant = kept_class_scaling(num_classes, kept, self.weight_dice)
        constant -= self.weight_dice
        exponent = [1.0] * num_classes if options["do_bg"] else [0.0] + [1.0] * (num_classes - 1)
        sync = _ddp_sync(options)
        smooth_nr, smooth_dr = _dice_smoothing(options["smooth"])
        fused_ce = self.ignore_label is None and self.weight_ce != 0.0
        loss = region_mean(
            net_output,
            labels,
            focal_weight=self._ce_focal_weight(net_output, labels) if fused_ce else [0.0] * num_classes,
            focal_gamma=[0.0] * num_classes,
            exponent=exponent,
            delta=0.5,
            focal_coef=self.weight_ce if fused_ce else 0.0,
            tversky_coef=tversky_coef,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            batch=options["batch_dice"],
            ignore_index=self.ignore_label,
            backend=self.backend,
            dist_sync=sync,
        )
        if sync:
            loss = _scale_gradient(loss, torch.distributed.get_world_size())
        loss = loss + constant
        if self.ignore_label is not None and self.weight_ce != 0.0:
            loss = loss + self.weight_ce * self._masked_ce(net_output, labels)
        return loss

    def _masked_ce(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """torch's (weighted) cross-entropy mean over the batch's valid voxels; 0 when none is valid."""
        alpha = None if self.ce_weight is None else self._weight_on(logits)
        total = functional.focal_loss(
            logits,
            labels,
            gamma=0.0,
            alpha=alpha,
            reduction="sum",
            ignore_index=self.ignore_label,
            backend=self.backend,
        )
        valid = labels != self.ignore_label
        if alpha is None:
            count = valid.sum().to(total.dtype)
        else:
            safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
            count = (alpha[safe] * valid).sum().to(total.dtype)
        return total / count.clamp_min(torch.finfo(total.dtype).tiny)


class DC_and_BCE_loss(nn.Module):  # noqa: N801 (nnU-Net's class name)
    r"""``weight_ce * BCEWithLogits + weight_dice * DC`` on sigmoid probabilities (nnU-Net's region-based
    training); ``forward(net_output (B, R, *S), target)``.

    ``target``: region maps ``(B, R, *S)`` (bool, integer 0/1 or float), with ``use_ignore_label``
    an extra last channel that is 1 (True) on ignored voxels. The cross-entropy is the mean over
    every element (``B R S``); with ``use_ignore_label`` the masked sum divided by the number of
    valid voxels (channels not counted), as in nnU-Net. ``do_bg`` concerns the Dice term only.

    Fused (one sigmoid pass of the region family each way: BCE is its two-sided focal term with
    ``a = 1, gamma = 0``, weighted ``weight_ce / R``) unless ``use_ignore_label=True`` or
    ``bce_kwargs`` sets anything but ``reduction="mean"``: those run in eager PyTorch with a one-time
    warning naming the option (the region family drops voxels only for integer label maps, and
    region targets may overlap, so they cannot be recoded as one). ``backend``: this package's
    backend keyword.
    """

    def __init__(
        self,
        bce_kwargs,
        soft_dice_kwargs,
        weight_ce=1,
        weight_dice=1,
        use_ignore_label: bool = False,
        dice_class=None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.dice_options = _soft_dice_options(soft_dice_kwargs, dice_class)
        if not isinstance(bce_kwargs, dict):
            raise TypeError(f"bce_kwargs must be a dict, got {type(bce_kwargs).__name__}")
        self.use_ignore_label = check_bool("use_ignore_label", use_ignore_label)
        self._eager_reason = None
        other = sorted(k for k, v in bce_kwargs.items() if not (k == "reduction" and v == "mean"))
        if other:
            self._eager_reason = f"bce_kwargs {other}"
        if self.use_ignore_label:
            self._eager_reason = "use_ignore_label=True (an ignore channel on dense region targets)"
        bce_kwargs = dict(bce_kwargs)
        if self.use_ignore_label:
            bce_kwargs["reduction"] = "none"
        self.bce = nn.BCEWithLogitsLoss(**bce_kwargs)
        self.weight_ce = _check_weight("weight_ce", weight_ce)
        self.weight_dice = _check_weight("weight_dice", weight_dice)
        self.backend = check_backend(backend)

    def forward(self, net_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not isinstance(net_output, torch.Tensor) or not isinstance(target, torch.Tensor):
            raise TypeError("net_output and target must be torch.Tensors")
        extra = 1 if self.use_ignore_label else 0
        if (
            net_output.dim() < 3
            or target.dim() != net_output.dim()
            or target.shape[1] != net_output.shape[1] + extra
            or target.shape[2:] != net_output.shape[2:]
        ):
            raise ValueError(
                f"target must be one-hot regions of shape (B, {net_output.shape[1] + extra}, *spatial) for "
                f"net_output {tuple(net_output.shape)} (use_ignore_label={self.use_ignore_label}), "
                f"got {tuple(target.shape)}"
            )
        options = self.dice_options
        num_classes = net_output.shape[1]
        kept = num_classes if options["do_bg"] else num_classes - 1
        if kept < 1:
            raise ValueError("do_bg=False needs at least 2 regions, got 1")
        if self._eager_reason is not None:
            warn_once("lmfloss_kernels.nnunet.DC_and_BCE_loss", self._eager_reason, "eager PyTorch")
            return self._eager(net_output, target)
        tversky_coef, constant = kept_class_scaling(num_classes, kept, self.weight_dice)
        constant -= self.weight_dice
        exponent = [1.0] * num_classes if options["do_bg"] else [0.0] + [1.0] * (num_classes - 1)
        smooth_nr, smooth_dr = _dice_smoothing(options["smooth"])
        ones, zeros = [1.0] * num_classes, [0.0] * num_classes
        sync = _ddp_sync(options)
        loss = region_mean(
            net_output,
            target,
            focal_weight=(ones, ones),
            focal_gamma=(zeros, zeros),
            exponent=exponent,
            delta=0.5,
            focal_coef=self.weight_ce / num_classes,
            tversky_coef=tversky_coef,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            batch=options["batch_dice"],
            ignore_index=None,
            backend=self.backend,
            dist_sync=sync,
            sigmoid=True,
        )
        if sync:
            loss = _scale_gradient(loss, torch.distributed.get_world_size())
        return loss + constant

    def _eager(self, net_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mask = None
        regions = target
        if self.use_ignore_label:
            mask = (~target[:, -1:]) if target.dtype == torch.bool else (1 - target[:, -1:]).bool()
            regions = target[:, :-1]
        dice = self._dice(torch.sigmoid(net_output), regions.float(), mask)
        bce = self.bce(net_output, regions.float())
        if mask is not None:
            bce = (bce * mask).sum() / mask.sum().clamp_min(_DENOMINATOR_FLOOR)
        return self.weight_ce * bce + self.weight_dice * dice

    def _dice(self, probabilities, regions, mask) -> torch.Tensor:
        options = self.dice_options
        if not options["do_bg"]:
            probabilities, regions = probabilities[:, 1:], regions[:, 1:]
        if mask is not None:
            probabilities, regions = probabilities * mask, regions * mask
        axes = tuple(range(2, probabilities.dim()))
        overlap = (probabilities * regions).sum(axes)
        predicted = probabilities.sum(axes)
        truth = regions.sum(axes)
        if options["batch_dice"]:
            if _ddp_sync(options):
                raise NotImplementedError("DC_and_BCE_loss with ddp=True and batch_dice=True under torch.distributed")
            overlap, predicted, truth = overlap.sum(0), predicted.sum(0), truth.sum(0)
        smooth = options["smooth"]
        dice = (2 * overlap + smooth) / (truth + predicted + smooth).clamp_min(_DENOMINATOR_FLOOR)
        return -dice.mean()


class DeepSupervisionWrapper(nn.Module):
    r"""``sum_i w_i * loss(inputs[0][i], inputs[1][i], ...)`` over the scales with ``w_i != 0``.

    ``forward(*args)``: each argument a list or tuple with one entry per scale (nnU-Net passes
    ``(outputs, targets)``, highest resolution first). ``weight_factors``: one weight per scale
    (``None``: all 1); :func:`deep_supervision_weights` gives the weights nnU-Net's trainer uses.
    """

    def __init__(self, loss, weight_factors=None) -> None:
        super().__init__()
        if weight_factors is not None:
            weight_factors = tuple(float(w) for w in weight_factors)
            if not any(w != 0.0 for w in weight_factors):
                raise ValueError(f"at least one weight factor must be non-zero, got {list(weight_factors)}")
        self.weight_factors = weight_factors
        self.loss = loss

    def forward(self, *args):
        if not args or not all(isinstance(a, (tuple, list)) for a in args):
            given = [type(a).__name__ for a in args]
            raise TypeError(f"every argument must be a tuple or list (one entry per scale), got {given}")
        scales = len(args[0])
        if any(len(a) != scales for a in args):
            raise ValueError(f"every argument must have the same number of scales, got {[len(a) for a in args]}")
        weights = (1.0,) * scales if self.weight_factors is None else self.weight_factors
        if len(weights) < scales:
            raise ValueError(f"{len(weights)} weight factors for {scales} scales")
        per_scale = enumerate(zip(*args, strict=True))
        return sum(weights[i] * self.loss(*inputs) for i, inputs in per_scale if weights[i] != 0.0)


def deep_supervision_weights(num_scales: int, *, ddp: bool = False) -> list[float]:
    r"""nnU-Net's deep-supervision weights: ``1 / 2^i`` for scale ``i``, the lowest resolution set to 0
    (``1e-6`` under DDP, so every output keeps a gradient), normalised to sum to 1."""
    if isinstance(num_scales, bool) or not isinstance(num_scales, int) or num_scales < 1:
        raise ValueError(f"num_scales must be a positive int, got {num_scales!r}")
    weights = [1.0 / 2**i for i in range(num_scales)]
    if num_scales > 1:
        weights[-1] = 1e-6 if ddp else 0.0
    total = sum(weights)
    return [w / total for w in weights]
