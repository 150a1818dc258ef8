r"""CALF transformation losses: binary cross-entropy with ``log`` replaced by a transformation ``T``.

Where this comes from
---------------------
The CALF paper (Alam et al., arXiv 2504.04458) lists the candidate losses *Fisher, Logit, Arcsine,
Log10 and Natural-Log transformations, and BCE-Dice*, and one fragment of the Fisher branch,
``L_Fisher = -E[y · ½ ln((1 + p)/(1 - p)) ...``. Only these names and that fragment are the paper's.
The exact per-branch expressions were not available; **everything below is our interpretation**
(``losses.md`` section 4.2): the fragment reads as BCE with ``ln`` replaced by ``T``,

.. math::

    \ell_T(z, y) = -\big[\, y\, T(p) + (1 - y)\, T(1 - p) \,\big], \qquad p = \sigma(z),

applied per voxel to a single-channel logit map, with

=========  ==========================================  ==================================================
``T``      ``T(p)``                                    ``∂ℓ/∂z`` per voxel
=========  ==========================================  ==================================================
ln         ``ln p``  (``ℓ`` = BCE)                     ``p - y``
log10      ``log10 p`` (= BCE / ln 10)                 ``(p - y) / ln 10``
fisher     ``artanh p = ½ ln((1 + p)/(1 - p))``        ``-[y p/(1 + p) - (1 - y)(1 - p)/(2 - p)] · m``
logit      ``ln(p / (1 - p)) = z``                     ``(1 - 2y) · m``
arcsine    ``arcsin √p = atan(e^{z/2})``               ``-(2y - 1) √(p(1 - p)) / 2``
=========  ==========================================  ==================================================

Clips (ours): ``artanh p`` and ``logit p`` are unbounded as ``p → 1``, so the loss could fall to
``-∞`` by pushing logits further out. For ``fisher`` and ``logit`` ``p`` is clipped to
``[eps, 1 - eps]`` (default ``eps = 1e-7``, the Keras ``K.epsilon()`` also used by the Unified Focal
loss of this package), with the usual clip gradient ``m = [eps ≤ p ≤ 1 - eps]`` (zero outside). We
apply it to the logit, ``z̃ = clamp(z, -L, L)`` with ``L = ln((1 - eps)/eps) ≈ 16.118``: since
``σ`` is increasing this is the same clip in exact arithmetic, and it never forms ``1 - p`` by
subtraction. The per-voxel loss of ``logit`` then lies in ``[-L, L]`` and that of ``fisher`` is
bounded by ``½ ln(2/eps)``. ``ln``, ``log10`` and ``arcsine`` need no clip: they are computed in
log space / through ``e^{-|z|/2}`` and are finite for every finite logit.

Note that the transformation losses are not non-negative (``arcsine`` lies in ``[-π/2, 0]``,
``fisher`` and ``logit`` go negative): only their gradients matter for training.

Dice term (ours; "BCE-Dice" is the paper's name): optionally ``dice_coef`` times a soft Dice loss
on the *unclipped* sigmoid probabilities, per image (MONAI ``DiceLoss(sigmoid=True)`` convention),

.. math::

    D_b = 1 - \frac{2\,TP + s_{nr}}{2\,TP + FP + FN + s_{dr}}, \quad
    TP = \sum y p,\ FP = \sum (1 - y) p,\ FN = \sum y (1 - p),

with ``s_nr = s_dr = 1e-5`` by default; ``1 - (...)`` is formed as ``(FP + FN + s_dr - s_nr)/(...)``
from sums of non-negative terms. ``batch=True`` sums TP, FP, FN over the batch first (MONAI's
``batch``), which keeps images without foreground from dominating.

Per-image loss and reductions: with ``V_b`` the number of valid (not ignored) voxels of image b,

.. math::

    L_b = w_T \frac{1}{V_b} \sum_{i\ \mathrm{valid}} \ell_T(z_{bi}, y_{bi}) + w_D\, D_b

(``w_T = transform_coef``, ``w_D = dice_coef``; a term with coefficient 0 is skipped).
``reduction="none"`` returns ``L_b`` of shape ``(B,)``, ``"mean"`` its mean, ``"sum"`` its sum.

Inputs: ``logits`` ``(B, 1, *S)`` or ``(B, *S)`` (every axis after the batch axis is a voxel axis,
so a ``(B, K, *S)`` map is treated as K binary maps pooled per image); ``target`` of the same shape
(a singleton channel axis on either side is allowed): an integer / bool label map with values in
``{0, 1}`` (or ``ignore_index``, whose voxels are dropped from every sum) or a float map in
``[0, 1]`` (``ignore_index`` must then be None). Target values are checked on CPU tensors, and
on GPU tensors with ``set_options(check_labels=True)`` (a sync); never inside ``torch.compile``.

Non-finite logits (the package's policy, as for every other loss): a NaN, +inf or -inf logit
makes the loss of its image NaN (and so a ``"mean"`` / ``"sum"``), ignored voxels included; the
other images keep their values. The reference adds ``0 · (min + max)`` of each image's logits
(:func:`lmfloss_kernels.functional._propagate_nonfinite`), the fused kernels add ``0 · z`` of every
logit to the per-image sum of ``ℓ_T`` in the pass that reads them anyway. Nothing is added to the
gradient, which is the formula's on every backend: NaN where a NaN logit enters (its voxel; its
whole image when the Dice term is on, whose sums become NaN; 0 where the clip masks it), the finite
limits at ``±inf``.

Backends (the package's names):

* ``"reference"``: eager PyTorch, autograd; float64 included.
* ``"cpu"``: the fused C++ kernels of ``csrc/cpu/calf.cpp`` (:mod:`lmfloss_kernels.ext.calf_ops`)
  for CPU tensors: one pass for the loss and the ``O(B)`` sums, one for the closed-form gradient;
  float16 / bfloat16 / float32 logits in fp32 math, float64 in fp64; bitwise deterministic.
* ``"triton"``: the fused per-voxel kernel of :mod:`lmfloss_kernels.calf._triton` (same plan, fp32
  math; CUDA, or CPU under ``TRITON_INTERPRET=1``; float16 / bfloat16 / float32 logits).

``"auto"`` picks Triton for CUDA tensors and the C++ kernels for CPU tensors when they can serve
them, else the reference (with one warning saying why). There is no C++ CUDA kernel for CALF:
``"triton"`` is its CUDA path.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import torch.nn.functional as F

from .._backends import _user_stacklevel
from .._config import get_options
from .._validation import (
    check_bool,
    check_ignore_index,
    check_label_range,
    check_number,
    check_reduction,
    check_soft_range,
)
from ..functional import _propagate_nonfinite
from ._definitions import CLIPPED_TRANSFORMS, TRANSFORMS, clip_limit

__all__ = [
    "TRANSFORMS",
    "bce_dice_loss",
    "clip_limit",
    "transform_loss",
    "transform_loss_reference",
]

BACKENDS = ("auto", "reference", "cpu", "triton")
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_LN10 = math.log(10.0)
_HALF_PI = math.pi / 2


def _transform_terms(z: torch.Tensor, y: torch.Tensor, transform: str, eps: float) -> torch.Tensor:
    """Per-voxel ``ℓ_T(z, y)`` in eager PyTorch (autograd gives the gradient)."""
    if transform in ("ln", "log10"):
        # -[y ln p + (1 - y) ln(1 - p)] with ln p = -softplus(-z), ln(1 - p) = -softplus(z).
        bce = y * F.softplus(-z) + (1.0 - y) * F.softplus(z)
        return bce if transform == "ln" else bce / _LN10
    if transform in CLIPPED_TRANSFORMS:
        limit = clip_limit(eps)
        zc = z.clamp(-limit, limit)
        if transform == "logit":
            return (1.0 - 2.0 * y) * zc
        # artanh p = ½[ln(1 + p) - ln(1 - p)], artanh(1 - p) = ½[ln(2 - p) - ln p].
        p, q = torch.sigmoid(zc), torch.sigmoid(-zc)
        artanh_p = 0.5 * (torch.log1p(p) + F.softplus(zc))
        artanh_q = 0.5 * (torch.log1p(q) + F.softplus(-zc))
        return -(y * artanh_p + (1.0 - y) * artanh_q)
    # arcsin √σ(z) = atan(e^{z/2}); written through e^{-|z|/2} so that nothing overflows. The
    # where() (not abs()) keeps the derivative right at z = 0.
    minus_abs = torch.where(z >= 0, -z, z)
    small = torch.atan(torch.exp(0.5 * minus_abs))
    theta = torch.where(z >= 0, _HALF_PI - small, small)
    return -(y * theta + (1.0 - y) * (_HALF_PI - theta))


def transform_loss_reference(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    transform: str,
    transform_coef: float = 1.0,
    dice_coef: float = 0.0,
    eps: float = 1e-7,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    batch: bool = False,
    ignore_index: int | None = None,
    reduction: str = "mean",
    upcast: bool = True,
) -> torch.Tensor:
    """Eager definition of the transformation loss (module docstring); inputs are not validated here.

    ``upcast=True`` computes half-precision logits in float32 (as the fused kernel does);
    float64 stays float64. Returns float32 (float64 for float64 logits). A non-finite logit makes
    its image's loss NaN (the package's policy, module docstring).
    """
    z = logits.float() if upcast and logits.dtype in (torch.float16, torch.bfloat16) else logits
    batch_size = z.shape[0]
    z = z.reshape(batch_size, -1)
    if target.is_floating_point():
        y = target.reshape(batch_size, -1).to(z.dtype)
        valid = torch.ones_like(z, dtype=torch.bool)
    else:
        labels = target.reshape(batch_size, -1)
        valid = torch.ones_like(labels, dtype=torch.bool) if ignore_index is None else labels != ignore_index
        y = (labels == 1).to(z.dtype)

    loss = z.new_zeros(batch_size)
    if transform_coef != 0.0:
        terms = torch.where(valid, _transform_terms(z, y, transform, eps), 0.0)
        loss = loss + transform_coef * terms.sum(1) / valid.sum(1).clamp_min(1).to(z.dtype)
    if dice_coef != 0.0:
        keep = valid.to(z.dtype)
        p, q = torch.sigmoid(z) * keep, torch.sigmoid(-z) * keep
        tp, fp, fn = (y * p).sum(1), ((1.0 - y) * p).sum(1), (y * q).sum(1)
        if batch:
            tp, fp, fn = (t.sum(0, keepdim=True) for t in (tp, fp, fn))
        dice = (fp + fn + (smooth_dr - smooth_nr)) / (2.0 * tp + fp + fn + smooth_dr)
        loss = loss + dice_coef * dice
    if reduction != "none":
        loss = loss.sum() if reduction == "sum" else loss.mean()
    return _propagate_nonfinite(loss, logits, "region_loss", reduction)


# --------------------------------------------------------------------------------------------
# Validation and dispatch


def _check_binary_target(logits: torch.Tensor, target: object, ignore_index: int | None) -> torch.Tensor:
    """``target`` viewed with the logits' shape (a singleton channel axis on either side is allowed)."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.is_complex():
        raise TypeError(f"target must be an integer / bool label map or a float map, got dtype {target.dtype}")
    if target.device != logits.device:
        raise ValueError(f"target must be on the logits' device {logits.device}, got {target.device}")
    shape, other = tuple(logits.shape), tuple(target.shape)
    squeezed = shape[:1] + shape[2:] if len(shape) >= 2 and shape[1] == 1 else shape
    other_squeezed = other[:1] + other[2:] if len(other) >= 2 and other[1] == 1 else other
    if squeezed != other_squeezed:
        raise ValueError(
            f"target must have the logits' shape {shape} (a singleton channel axis at dim 1 may be "
            f"present or absent), got {other}"
        )
    # Value checks need the data (a sync on a GPU) and cannot be traced: eager calls only.
    check_labels = (target.device.type == "cpu" or get_options().check_labels) and not torch.compiler.is_compiling()
    if target.is_floating_point():
        if ignore_index is not None:
            raise ValueError(
                f"ignore_index={ignore_index} applies to integer label maps only; a float target marks "
                f"nothing to ignore (pass ignore_index=None)"
            )
        if check_labels and target.numel():
            check_soft_range(target)
    elif check_labels and target.dtype != torch.bool:
        # Binary: the labels of a 2-class map (one aminmax pass on the labels' own dtype).
        check_label_range(target, 2, ignore_index)
    return target.reshape(shape)


def check_transform(transform: object) -> str:
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
    return transform  # type: ignore[return-value]


def check_loss_options(
    *,
    transform: object,
    transform_coef: object,
    dice_coef: object,
    eps: object,
    smooth_nr: object,
    smooth_dr: object,
    batch: object,
    ignore_index: object,
    reduction: object,
) -> dict:
    """Validated keyword arguments of :func:`transform_loss` (shared with :class:`~.selection.CALFLoss`)."""
    options = {
        "transform": check_transform(transform),
        "transform_coef": check_number("transform_coef", transform_coef, low=0.0),
        "dice_coef": check_number("dice_coef", dice_coef, low=0.0),
        "eps": check_number("eps", eps, low=0.0, high=0.5, low_open=True, high_open=True),
        "smooth_nr": check_number("smooth_nr", smooth_nr, low=0.0),
        "smooth_dr": check_number("smooth_dr", smooth_dr, low=0.0, low_open=True),
        "batch": check_bool("batch", batch),
        "ignore_index": check_ignore_index(ignore_index, optional=True),
        "reduction": check_reduction(reduction),
    }
    if options["transform_coef"] == 0.0 and options["dice_coef"] == 0.0:
        raise ValueError("transform_coef and dice_coef are both 0: the loss would be identically 0")
    return options


def check_backend(backend: object) -> str:
    if backend not in BACKENDS:
        hint = " (CALF has no C++ CUDA kernels: 'triton' is its CUDA path)" if backend == "cuda" else ""
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}{hint}")
    return backend  # type: ignore[return-value]


def triton_unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the fused Triton path can serve tensors of this device and dtype, else why not."""
    if dtype not in FUSED_DTYPES:
        return f"the kernel computes in float32 and serves float16/bfloat16/float32 logits, got {dtype}"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "CPU tensors need TRITON_INTERPRET=1 set before triton is imported"
    if device.type not in ("cpu", "cuda"):
        return f"Triton serves CUDA tensors, got {device.type}"
    try:
        from . import _triton  # noqa: F401
    except ImportError as error:
        return f"triton could not be imported ({error})"
    return None


def cpu_unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the C++ CALF kernels can serve tensors of this device and dtype, else why not."""
    try:
        from ..ext import calf_ops
    except Exception as error:  # a broken extension of any kind must not stop the other backends
        return f"the C++ extension could not be imported ({type(error).__name__}: {error})"
    return calf_ops.unavailable_reason(device, dtype)


# The fused backend that "auto" tries for each device type, and why it could not serve.
_AUTO = {"cuda": ("triton", triton_unavailable_reason), "cpu": ("cpu", cpu_unavailable_reason)}
_REASONS = {"triton": triton_unavailable_reason, "cpu": cpu_unavailable_reason}
_warned_fallback: set[str] = set()


def resolve_fused(backend: str, device: torch.device, dtype: torch.dtype, what: str) -> str:
    """The backend that computes ``what`` for these tensors: ``backend`` itself if it can serve
    them (else ValueError), or for ``"auto"`` the device's fused backend if it can, else
    ``"reference"`` (warning once per reason where a fused backend exists for the device).
    """
    if backend in _REASONS:
        reason = _REASONS[backend](device, dtype)
        if reason is not None:
            raise ValueError(f"backend {backend!r} cannot serve {device.type} {dtype} {what}: {reason}")
        return backend
    if backend == "auto" and device.type in _AUTO:
        name, unavailable = _AUTO[device.type]
        reason = unavailable(device, dtype)
        if reason is None:
            return name
        if reason not in _warned_fallback:
            _warned_fallback.add(reason)
            warnings.warn(
                f"CALF: using the eager reference for {device.type} {dtype} {what} ({name}: {reason})",
                RuntimeWarning,
                stacklevel=_user_stacklevel(),
            )
    return "reference"


def _fused(logits: torch.Tensor, target: torch.Tensor, options: dict, backend: str) -> torch.Tensor:
    if backend == "cpu":
        from ..ext.calf_ops import transform_loss_op as calf_transform_loss
    else:
        from ._triton import calf_transform_loss

    per_image, _ = calf_transform_loss(
        logits,
        target,
        options["transform"],
        options["transform_coef"],
        options["dice_coef"],
        options["eps"],
        options["smooth_nr"],
        options["smooth_dr"],
        options["batch"],
        options["ignore_index"],
    )
    if options["reduction"] == "none":
        return per_image
    return per_image.sum() if options["reduction"] == "sum" else per_image.mean()


def _compare_with_reference(logits: torch.Tensor, target: torch.Tensor, options: dict, backend: str) -> None:
    """Check mode (``set_options(check_backend=True)``): fused and reference on a detached copy."""
    from ..functional import BackendMismatchError

    results = []
    for compute in (lambda x, t, o: _fused(x, t, o, backend), lambda x, t, o: transform_loss_reference(x, t, **o)):
        x = logits.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            value = compute(x, target, options)
            (grad,) = torch.autograd.grad(value, x, torch.ones_like(value))
        results.append((value.detach().double(), grad.double()))
    (value, grad), (ref_value, ref_grad) = results
    rtol = 1e-4 if logits.dtype in (torch.float32, torch.float64) else 3e-2
    grad_error = float((grad - ref_grad).norm())
    if (
        not torch.allclose(value, ref_value, rtol=rtol, atol=rtol * 1e-2, equal_nan=True)
        or grad_error > rtol * float(ref_grad.norm()) + 1e-12
    ):
        raise BackendMismatchError(
            f"backend {backend!r} disagrees with the reference on the CALF loss: {value.flatten()[:4].tolist()} vs "
            f"{ref_value.flatten()[:4].tolist()}; gradient error norm {grad_error:.3e} vs reference gradient "
            f"norm {float(ref_grad.norm()):.3e}"
        )


def _check_logits(logits: object) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in (*FUSED_DTYPES, torch.float64):
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape (B, 1, *spatial) or (B, *spatial), got {tuple(logits.shape)}")
    if logits.numel() == 0:
        raise ValueError(f"logits must not be empty, got shape {tuple(logits.shape)}")
    return logits


def transform_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    transform: str = "ln",
    *,
    transform_coef: float = 1.0,
    dice_coef: float = 0.0,
    eps: float = 1e-7,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    batch: bool = False,
    ignore_index: int | None = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    r"""CALF transformation loss ``w_T · mean_i ℓ_T + w_D · Dice`` of single-channel logits.

    See the module docstring for the formulas, the clip and which parts are the paper's. The
    result is float32 (float64 for float64 logits), differentiable w.r.t. ``logits``.

    >>> loss = transform_loss(logits, mask, "fisher")                # clipped Fisher loss
    >>> loss = transform_loss(logits, mask, "ln", dice_coef=1.0)     # BCE-Dice
    """
    logits = _check_logits(logits)
    options = check_loss_options(
        transform=transform,
        transform_coef=transform_coef,
        dice_coef=dice_coef,
        eps=eps,
        smooth_nr=smooth_nr,
        smooth_dr=smooth_dr,
        batch=batch,
        ignore_index=ignore_index,
        reduction=reduction,
    )
    target = _check_binary_target(logits, target, options["ignore_index"])
    chosen = resolve_fused(check_backend(backend), logits.device, logits.dtype, "logits")
    if chosen == "reference":
        return transform_loss_reference(logits, target, **options)
    if get_options().check_backend:
        _compare_with_reference(logits, target, options, chosen)
    return _fused(logits, target, options, chosen)


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor, **kwargs) -> torch.Tensor:
    """BCE-Dice: :func:`transform_loss` with ``transform="ln"`` and ``dice_coef=1`` unless given."""
    kwargs.setdefault("dice_coef", 1.0)
    return transform_loss(logits, target, "ln", **kwargs)
