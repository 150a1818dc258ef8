r"""Functional API: every loss of the package, from logits, on any backend.

Each function validates its arguments, maps its keywords onto one of the two loss families of
:mod:`lmfloss_kernels.reference` (``row_loss`` for LMF / LDAM / focal, ``region_loss`` for the
segmentation losses) and runs that family on the chosen backend:

``backend="auto"``
    the fastest built backend for the logits' device (Triton, then the CUDA extension, on CUDA
    tensors; the C++ CPU extension on CPU tensors), falling back to the eager reference with a
    one-time warning;
``"reference"``, ``"triton"``, ``"cuda"``, ``"cpu"``
    that backend, or a ``ValueError`` listing the available ones.

Common conventions
------------------
* ``logits``: ``(N, C)`` rows (row losses only) or ``(B, C, *spatial)``; float16, bfloat16,
  float32 or float64. All loss arithmetic runs in float32 (float64 for float64 input); the
  gradient comes back in the logits' dtype.
* ``target``: integer class labels (any integer dtype or bool, uint8 is the fast path) of shape
  ``(N,)``, ``(B, *spatial)`` or ``(B, 1, *spatial)``; segmentation losses also take a float
  one-hot / soft map of the logits' shape. Label maps are never expanded to one-hot.
* Labels are checked to lie in ``[0, C)`` (or equal ``ignore_index``), and soft / one-hot maps to
  be finite and in ``[0, 1]``, on CPU tensors; on GPU tensors only with
  ``lmfloss_kernels.set_options(check_labels=True)``, because the check synchronises with the
  device.
* Non-finite logits are not hidden: a NaN, +inf or -inf logit makes the loss NaN (for
  ``reduction="none"`` the loss of its row / image), on every backend; NaN and +inf also give NaN
  gradients. Unlike :func:`torch.nn.functional.cross_entropy`, a -inf logit is not read as
  "probability 0": masking classes by -inf is not supported.
* Every label equal to ``ignore_index``: the loss is 0 with a zero gradient, for every loss and
  reduction (row losses' ``"mean"``: decided from the labels read on the host, so on GPU tensors
  only with ``check_labels``; otherwise the fused kernels give 0 / 0 = NaN there).
* Fused backends give first-order gradients only: a backward with ``create_graph=True`` raises
  a ``RuntimeError``; use ``backend="reference"`` for higher-order gradients.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import torch

from . import reference
from ._backends import resolve_backend
from ._config import get_options
from ._distributed import make_sync
from ._plans import record_dispatch
from ._validation import (
    as_class_values,
    check_bool,
    check_class_counts,
    check_ignore_index,
    check_labels_coverage,
    check_logits,
    check_number,
    check_reduction,
    check_target,
    class_sequence,
    class_vector,
    is_sequence,
    value_range,
)

__all__ = [
    "BackendMismatchError",
    "asymmetric_focal_loss",
    "dice_ce_loss",
    "dice_focal_loss",
    "dice_loss",
    "drw_weights",
    "focal_loss",
    "focal_tversky_loss",
    "ldam_loss",
    "ldam_margins",
    "lmf_loss",
    "mixed_focal_loss",
    "sigmoid_focal_loss",
    "symmetric_focal_loss",
    "tversky_loss",
    "unified_focal_loss",
]


class BackendMismatchError(RuntimeError):
    """Raised in check mode when a fused backend disagrees with the eager reference."""


# --------------------------------------------------------------------------------------------
# Class statistics


def ldam_margins(class_counts, max_m: float = 0.5) -> torch.Tensor:
    r"""LDAM margins from training-set class counts: ``m_j = max_m * (n_min / n_j) ** 0.25``.

    The rarest class gets ``max_m`` (default 0.5, ``get_mlist`` of the LMF authors and
    ``LDAMLoss`` of Cao et al.). ``class_counts``: a sequence or 1-D tensor of positive numbers.
    Computed in float64; returned as float32 (float64 for a float64 tensor of counts).
    """
    max_m = check_number("max_m", max_m, low=0.0)
    margins = reference.ldam_margins(_counts_tensor(class_counts), max_m)
    return margins if _is_float64(class_counts) else margins.float()


def drw_weights(class_counts, beta: float = 0.9999) -> torch.Tensor:
    r"""Deferred re-weighting weights ``w_j ∝ (1 - beta) / (1 - beta ** n_j)``, normalised to sum to C.

    Cao et al.'s DRW rule (kaidic/LDAM-DRW, ``beta = 0.9999``); pass the result as ``weight`` to
    :func:`ldam_loss` or :func:`lmf_loss` from the epoch where re-weighting starts.
    """
    beta = check_number("beta", beta, low=0.0, high=1.0, high_open=True)
    weights = reference.drw_weights(_counts_tensor(class_counts), beta)
    return weights if _is_float64(class_counts) else weights.float()


def _is_float64(value) -> bool:
    value = as_class_values(value)
    return isinstance(value, torch.Tensor) and value.dtype == torch.float64


def _counts_tensor(class_counts) -> torch.Tensor:
    class_counts = as_class_values(class_counts)
    if isinstance(class_counts, torch.Tensor):
        length = class_counts.numel()
        if class_counts.dim() != 1:
            raise ValueError(f"class_counts must be 1-D, got shape {tuple(class_counts.shape)}")
    elif isinstance(class_counts, (list, tuple)):
        length = len(class_counts)
    else:
        raise TypeError(f"class_counts must be a 1-D tensor, array or sequence, got {type(class_counts).__name__}")
    if length < 2:
        raise ValueError(f"class_counts must have at least 2 entries, got {length}")
    return check_class_counts(class_counts, length, torch.device("cpu"))


# --------------------------------------------------------------------------------------------
# Dispatch


@functools.lru_cache(maxsize=256)
def _constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Per-class constants are cached on the device so that a call builds no host-to-device copy.
    # A constant first built under torch.inference_mode() must still be usable by autograd later
    # (an inference tensor cannot be saved for backward), hence the explicit normal mode.
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=dtype, device=device)


def _vector_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _per_class(values, logits: torch.Tensor) -> torch.Tensor:
    # Under torch.compile the constant becomes part of the graph; the cache would only be
    # traced through (with a warning), so it is bypassed there.
    build = _constant.__wrapped__ if torch.compiler.is_compiling() else _constant
    return build(tuple(values), logits.device, _vector_dtype(logits))


def _class_values(name: str, value, logits: torch.Tensor) -> torch.Tensor:
    """A validated per-class vector in the logits' vector dtype on their device.

    A tensor is moved (free when it already lives there, as a module's buffers do); a sequence
    is checked on the host and served from the device cache, so a call with the same Python
    list makes no host-to-device copy.
    """
    if is_sequence(value):
        return _per_class(class_sequence(name, value, logits.shape[1]), logits)
    return class_vector(name, value, logits.shape[1], logits.device).to(_vector_dtype(logits))


# Set while a criterion validates its keywords at construction (:func:`checks_only`).
_CHECKS_ONLY = contextvars.ContextVar("lmfloss_kernels_checks_only", default=False)


@contextlib.contextmanager
def checks_only():
    """Within this context a loss function validates every argument, then returns ``None`` uncomputed.

    The criteria validate their keywords this way when they are built, without evaluating a loss
    (a dry run of the reference on meta tensors took some 17 ms). Per thread and per task.
    """
    token = _CHECKS_ONLY.set(True)
    try:
        yield
    finally:
        _CHECKS_ONLY.reset(token)


def _run(family: str, backend: str, logits: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if _CHECKS_ONLY.get():
        return None
    implementation = resolve_backend(backend, logits)
    function = getattr(implementation, family)
    if get_options().check_backend and implementation.name != "reference":
        _compare_with_reference(family, function, implementation.name, logits, args, kwargs)
    dispatch = _Dispatch(implementation, family)
    loss = dispatch(logits, *args, **kwargs)
    record_dispatch(dispatch, logits, args, kwargs, loss)
    return loss


class _Dispatch:
    """One loss family on one backend, with the non-finite logits policy: what a criterion's call plan replays."""

    __slots__ = ("implementation", "function", "family", "in_kernel")

    def __init__(self, implementation, family: str):
        self.implementation = implementation
        self.function = getattr(implementation, family)
        self.family = family
        # A backend whose kernels apply the non-finite logits policy themselves (Backend.nonfinite_in_kernel)
        # gets no _propagate_nonfinite on top; one that does not say so gets it.
        self.in_kernel = getattr(implementation, "nonfinite_in_kernel", False)

    def __call__(self, logits: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        loss = self.function(logits, *args, **kwargs)
        if self.in_kernel:
            return loss
        return _propagate_nonfinite(loss, logits, self.family, kwargs["reduction"])

    def prepared(self, constants: tuple, kwargs: dict):
        """``lambda logits, target: self(logits, target, *constants, **kwargs)`` with the work that depends on
        the constants and keywords alone done now (a call plan's replay), or ``None`` where the backend has no
        ``prepared_<family>`` or the policy runs on the host."""
        prepare = getattr(self.implementation, f"prepared_{self.family}", None)
        if prepare is None or not self.in_kernel:
            return None
        return prepare(*constants, **kwargs)


def _propagate_nonfinite(loss: torch.Tensor, logits: torch.Tensor, family: str, reduction: str) -> torch.Tensor:
    """Non-finite logits policy: NaN, +inf or -inf in a row / image makes its loss NaN, on every backend.

    Clipped probabilities and max-subtracted softmaxes can turn a NaN logit into a finite
    loss, so ``0 * (min + max)`` of the logits is added: torch's min and max propagate NaN,
    ``min + max`` (in float64, so finite logits never overflow) is non-finite exactly when a
    logit is, and ``0 * inf`` and ``0 * nan`` are NaN. One read of the logits with no
    temporary (about 2% of a CPU fwd+bwd), no host sync, nothing added to the gradient. The
    fused kernels (Triton, CUDA, the C++ CPU ones) apply the same policy in-kernel
    (their ``nonfinite_in_kernel``): this serves the reference. CPU logits are first checked on the
    host (one min/max read), and finite ones skip the addition.
    """
    signal = logits.detach()
    if signal.device.type == "cpu" and not torch.compiler.is_compiling():
        # On the host the range is read for free: finite logits (the usual case) leave the loss
        # untouched, with no extra autograd node.
        low, high = value_range(signal)
        if math.isfinite(low) and math.isfinite(high):
            return loss
    if reduction != "none":
        # aminmax copies a non-contiguous tensor first (an expanded view in full): amin + amax do not.
        low, high = torch.aminmax(signal) if signal.is_contiguous() else (signal.amin(), signal.amax())
    else:
        dims = (1,) if family == "row_loss" else tuple(range(1, signal.dim()))
        low, high = signal.amin(dims), signal.amax(dims)
    total = low.double() + high.double()
    return loss + (0.0 * total).to(loss.dtype)


def _compare_with_reference(family, function, name, logits, args, kwargs) -> None:
    """Check mode: run the backend and the reference on a detached copy; raise if they differ."""
    results = []
    # The gradient is part of the check even when the caller runs under no_grad or
    # inference_mode (validation loops); inference tensors cannot enter autograd, so they are
    # copied into normal ones first.
    with torch.inference_mode(False), torch.enable_grad():
        args = tuple(a.clone() if isinstance(a, torch.Tensor) and a.is_inference() else a for a in args)
        for fn in (function, getattr(reference, family)):
            x = logits.detach().clone().requires_grad_(True)
            value = fn(x, *args, **kwargs)
            (grad,) = torch.autograd.grad(value, x, torch.ones_like(value))
            results.append((value.detach().double(), grad.detach().double()))
    (value, grad), (ref_value, ref_grad) = results
    rtol = 1e-4 if logits.dtype in (torch.float32, torch.float64) else 3e-2
    value_ok = torch.allclose(value, ref_value, rtol=rtol, atol=rtol * 1e-2, equal_nan=True)
    grad_error = float((grad - ref_grad).norm())
    grad_ok = grad_error <= rtol * float(ref_grad.norm()) + 1e-12
    if not (value_ok and grad_ok):
        raise BackendMismatchError(
            f"backend {name!r} disagrees with the reference on {family}: loss {value.flatten()[:4].tolist()} "
            f"vs reference {ref_value.flatten()[:4].tolist()}; gradient error norm {grad_error:.3e} vs "
            f"reference gradient norm {float(ref_grad.norm()):.3e} (rtol {rtol})"
        )


# --------------------------------------------------------------------------------------------
# Row losses: LMF, LDAM, focal


def _margins(counts: torch.Tensor, max_m: float, logits: torch.Tensor) -> torch.Tensor:
    # Computed from float64 counts so that float64 logits get float64-exact margins and float32
    # ones correctly rounded margins (float32 counts above 2**24 are not even exact integers).
    return reference.ldam_margins(counts.double(), max_m).to(_vector_dtype(logits))


def _cached_margins(class_counts, max_m: float, logits: torch.Tensor) -> torch.Tensor:
    """:func:`_margins`, cached on the logits' device when the counts are a Python sequence.

    The functional API gets the counts as host data on every call; building the margins once
    per (counts, max_m, device, dtype) avoids a host-to-device copy per call (which, from
    pageable memory, waits for the device queue) and gives ``torch.compile`` constants.
    """
    if is_sequence(class_counts):
        counts = class_sequence("class_counts", class_counts, logits.shape[1], positive=True)
        return _margin_constant(counts, max_m, logits.device, _vector_dtype(logits))
    return _margins(check_class_counts(class_counts, logits.shape[1], logits.device), max_m, logits)


@functools.lru_cache(maxsize=256)
def _margin_constant(counts: tuple[float, ...], max_m: float, device: torch.device, dtype: torch.dtype):
    with torch.inference_mode(False):
        return reference.ldam_margins(torch.tensor(counts, dtype=torch.float64), max_m).to(device=device, dtype=dtype)


def _check_lmf_coefficients(alpha: object, beta: object) -> tuple[float, float]:
    alpha = check_number("alpha", alpha, low=0.0)
    beta = check_number("beta", beta, low=0.0)
    if alpha == 0.0 and beta == 0.0:
        raise ValueError("alpha and beta must not both be 0 (the loss would be identically 0), got alpha=0, beta=0")
    return alpha, beta


def _class_weight(
    weight, margins: torch.Tensor, logits: torch.Tensor, name: str = "weight", max_m: float = 0.5
) -> torch.Tensor:
    if isinstance(weight, str):
        if weight != "margins":
            raise ValueError(f"{name} must be 'margins', None or a per-class tensor, got {weight!r}")
        if max_m == 0.0:
            raise ValueError(
                f"{name}='margins' uses the margins as class weights, which are all 0 for max_m=0; "
                f"pass max_m > 0 or {name}=None"
            )
        return margins
    if weight is None:
        return _per_class([1.0] * logits.shape[1], logits)
    return _class_values(name, weight, logits)


def _row_family(
    logits,
    target,
    margins,
    ldam_weight,
    focal_weight,
    *,
    alpha,
    beta,
    gamma,
    s,
    reduction,
    ignore_index,
    backend,
) -> torch.Tensor:
    """Checks shared by every row loss, then the row family on the chosen backend.

    ``ignore_index=None`` ignores no label; the kernels, which take an integer, get -1, which no
    valid label equals. When the labels were read on the host (CPU tensors) and every one is
    ignored, ``"mean"`` is 0 with a zero gradient without running a kernel (the rule of
    :func:`reference.row_loss`; see the README's Guarantees).
    """
    reduction = check_reduction(reduction)
    ignore_index = check_ignore_index(ignore_index, optional=True)
    labels, every_ignored = check_labels_coverage(logits, target, ignore_index=ignore_index)
    if every_ignored and reduction == "mean" and not _CHECKS_ONLY.get():
        # No valid row: the loss is the constant 0; multiplying the logits keeps the graph (zero
        # gradient) and the non-finite policy (a NaN or inf logit still gives NaN).
        return torch.mul(logits, 0).sum(dtype=_vector_dtype(logits))
    return _run(
        "row_loss",
        backend,
        logits,
        labels,
        margins,
        ldam_weight,
        focal_weight,
        alpha=alpha,
        beta=beta,
        gamma=gamma,
        s=s,
        ignore_index=-1 if ignore_index is None else ignore_index,
        reduction=reduction,
    )


def lmf_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
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
) -> torch.Tensor:
    r"""LMF loss (Sadi et al., arXiv 2212.12741): ``alpha * LDAM + beta * focal``.

    For row ``i`` with label ``t``, margins ``m_j = max_m (n_min / n_j)^{1/4}`` from
    ``class_counts``, class weights ``w`` and ``p = softmax(z_i)``:

    .. math::

        L = \alpha \frac{\sum_i w_t\,[-\log \mathrm{softmax}(s(z_i - m_t e_t))_t]}{\sum_i w_t}
          + \beta \frac{1}{N} \sum_i w_t\,[-(1 - p_t)^{\gamma} \log p_t]

    Rows are ``(N, C)`` logits with ``(N,)`` labels, or every voxel of ``(B, C, *S)`` logits
    (dense LMF). Rows labelled ``ignore_index`` count in neither sum nor in ``N``.

    Defaults follow the authors' ``LMFLoss`` (Adnan-Sadi/LMFLOSS): ``alpha = beta = 1``
    (their ``config.ini`` trains with ``alpha = 1.5``), ``gamma = 1.5``, ``s = 30`` applied to
    unnormalised logits, ``max_m = 0.5``, and ``weight="margins"``: the margins are also the
    LDAM cross-entropy class weights and the focal per-class alpha, as in their ``train.py``.
    ``weight=None`` uses 1 for every class; a tensor sets both weightings (e.g.
    :func:`drw_weights`).

    ``class_counts``: the training set's per-class counts, best as a Python sequence (the margins
    are then built once per device and cached) or through :class:`lmfloss_kernels.LMFLoss` (built
    once, kept as buffers); a tensor is validated on the host at every call, which for a GPU
    tensor is a device-to-host copy.

    ``reduction``: ``"mean"`` is the formula above (LDAM divided by the sum of weights, focal
    by N: the authors' two normalisations); ``"none"`` gives each row's
    ``alpha w_t l^LDAM + beta w_t l^F`` in the labels' shape; ``"sum"`` their sum.
    MONAI has no LMF or LDAM loss.
    """
    logits = check_logits(logits, dense=False)
    alpha, beta = _check_lmf_coefficients(alpha, beta)
    gamma = check_number("gamma", gamma, low=0.0)
    s = check_number("s", s, low=0.0, low_open=True)
    max_m = check_number("max_m", max_m, low=0.0)
    margins = _cached_margins(class_counts, max_m, logits)
    class_weight = _class_weight(weight, margins, logits, max_m=max_m)
    return _row_family(
        logits,
        target,
        margins,
        class_weight,
        class_weight,
        alpha=alpha,
        beta=beta,
        gamma=gamma,
        s=s,
        reduction=reduction,
        ignore_index=ignore_index,
        backend=backend,
    )


def ldam_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_counts,
    *,
    max_m: float = 0.5,
    s: float = 30.0,
    weight=None,
    reduction: str = "mean",
    ignore_index: int | None = -100,
    backend: str = "auto",
) -> torch.Tensor:
    r"""LDAM loss (Cao et al. 2019): cross-entropy of ``s (z - m_t e_t)``.

    .. math::

        L = \frac{\sum_i w_t\,[-\log \mathrm{softmax}(s(z_i - m_t e_t))_t]}{\sum_i w_t},
        \qquad m_j = \mathrm{max\_m}\,(n_{min}/n_j)^{1/4}

    Defaults are kaidic/LDAM-DRW's ``LDAMLoss(max_m=0.5, s=30, weight=None)``; ``weight`` may be
    ``None`` (all ones), ``"margins"`` (LMF's choice) or a per-class tensor such as
    :func:`drw_weights`. Note that Cao et al. apply ``s = 30`` to cosine logits of a normalised
    head; on unnormalised logits (as LMF does) the softmax saturates quickly.
    Reductions as :func:`torch.nn.functional.cross_entropy` with ``weight``.
    """
    logits = check_logits(logits, dense=False)
    s = check_number("s", s, low=0.0, low_open=True)
    max_m = check_number("max_m", max_m, low=0.0)
    margins = _cached_margins(class_counts, max_m, logits)
    class_weight = _class_weight(weight, margins, logits, max_m=max_m)
    return _row_family(
        logits,
        target,
        margins,
        class_weight,
        class_weight,
        alpha=1.0,
        beta=0.0,
        gamma=0.0,
        s=s,
        reduction=reduction,
        ignore_index=ignore_index,
        backend=backend,
    )


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    gamma: float = 2.0,
    alpha=None,
    reduction: str = "mean",
    ignore_index: int | None = -100,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Softmax focal loss (Lin et al. 2017) with optional per-class ``alpha``.

    .. math::

        L = \frac{1}{N} \sum_i \alpha_t\,[-(1 - p_t)^{\gamma} \log p_t],\qquad p = \mathrm{softmax}(z_i)

    over the ``N`` rows (or voxels) not labelled ``ignore_index``. This is the focal term of LMF
    (AdeelH/pytorch-multi-class-focal-loss, which the LMF authors load): ``p_t`` is the true
    softmax probability, ``(1 - p)^gamma`` is evaluated stably for ``gamma < 1``.
    ``gamma = 2`` is Lin et al.'s default; ``alpha=None`` weighs every class 1.

    Differs from MONAI ``FocalLoss(use_softmax=True)``: MONAI's ``"mean"`` also divides by C
    (it averages over all B*C*spatial elements), its scalar ``alpha`` means ``1 - alpha`` for
    background and ``alpha`` otherwise, and it takes one-hot targets.
    """
    logits = check_logits(logits, dense=False)
    gamma = check_number("gamma", gamma, low=0.0)
    ones = _per_class([1.0] * logits.shape[1], logits)
    focal_weight = ones if alpha is None else _class_values("alpha", alpha, logits)
    return _row_family(
        logits,
        target,
        ones,
        ones,
        focal_weight,
        alpha=0.0,
        beta=1.0,
        gamma=gamma,
        s=1.0,
        reduction=reduction,
        ignore_index=ignore_index,
        backend=backend,
    )


# --------------------------------------------------------------------------------------------
# Region losses: Unified Focal, focal Tversky, Mixed Focal, Tversky, Dice


def _region_family(
    logits,
    target,
    focal_weight,
    focal_gamma,
    tversky_exponent,
    *,
    delta,
    focal_coef,
    tversky_coef,
    smooth,
    eps,
    clip,
    batch,
    reduction,
    ignore_index,
    backend,
    dist_sync=False,
    process_group=None,
    sigmoid=False,
    negative_weight=None,
    negative_gamma=None,
) -> torch.Tensor:
    """Checks shared by every region loss, then the region family on the chosen backend.

    ``sigmoid=True``: the multi-label mode of :func:`lmfloss_kernels.reference.region_loss`;
    ``focal_weight`` / ``focal_gamma`` are the positive side's per-class values and
    ``negative_weight`` / ``negative_gamma`` the negative side's, stacked into ``(2, C)``.
    """
    reduction = check_reduction(reduction)
    clip = check_bool("clip", clip)
    batch = check_bool("batch", batch)
    eps = check_number("eps", eps, low=0.0, high=0.5, low_open=True, high_open=True)
    ignore_index = check_ignore_index(ignore_index, optional=True)
    target = check_target(logits, target, ignore_index=ignore_index)
    sync = make_sync(check_bool("dist_sync", dist_sync), process_group)
    extra = {} if sync is None else {"sync": sync}
    if check_bool("sigmoid", sigmoid):
        extra["sigmoid"] = True
        focal_weight = _sides(focal_weight, negative_weight, logits)
        focal_gamma = _sides(focal_gamma, negative_gamma, logits)
    elif not isinstance(focal_weight, torch.Tensor):
        focal_weight = _per_class(focal_weight, logits)
    return _run(
        "region_loss",
        backend,
        logits,
        target,
        focal_weight,
        focal_gamma if isinstance(focal_gamma, torch.Tensor) else _per_class(focal_gamma, logits),
        _per_class(tversky_exponent, logits),
        delta=delta,
        focal_coef=focal_coef,
        tversky_coef=tversky_coef,
        smooth_nr=smooth,
        smooth_dr=smooth,
        eps=eps,
        clip=clip,
        batch=batch,
        ignore_index=ignore_index,
        reduction=reduction,
        **extra,
    )


def _sides(positive, negative, logits: torch.Tensor) -> torch.Tensor:
    """The ``(2, C)`` per-class values of the sigmoid mode: row 0 the positive side, row 1 the negative."""
    rows = [positive, negative]
    for index, values in enumerate(rows):
        if isinstance(values, torch.Tensor):
            rows[index] = values.to(device=logits.device, dtype=_vector_dtype(logits)).reshape(-1)
        else:
            rows[index] = _per_class(values, logits)
    return torch.stack(rows)


def _region_logits(logits, sigmoid) -> tuple[torch.Tensor, bool]:
    """Checked ``(B, C, *S)`` logits and the checked ``sigmoid`` flag (one channel is enough in sigmoid mode)."""
    sigmoid = check_bool("sigmoid", sigmoid)
    return check_logits(logits, dense=True, min_classes=1 if sigmoid else 2), sigmoid


def _focal_constants(num_classes, *, background, foreground, sigmoid) -> dict:
    """Per-class focal keywords of :func:`_region_family` from ``(weight, gamma)`` pairs.

    Softmax: channel 0 gets the ``background`` pair, channels ``1..C-1`` the ``foreground`` one.
    Sigmoid: there is no background channel; every channel's negative side ``1 - y`` gets the
    ``background`` pair and its positive side ``y`` the ``foreground`` pair.
    """
    (back_weight, back_gamma), (fore_weight, fore_gamma) = background, foreground
    if sigmoid:
        return {
            "focal_weight": [fore_weight] * num_classes,
            "focal_gamma": [fore_gamma] * num_classes,
            "negative_weight": [back_weight] * num_classes,
            "negative_gamma": [back_gamma] * num_classes,
        }
    return {
        "focal_weight": [back_weight] + [fore_weight] * (num_classes - 1),
        "focal_gamma": [back_gamma] + [fore_gamma] * (num_classes - 1),
    }


def _tversky_exponents(num_classes, *, background, foreground, sigmoid) -> list[float]:
    """Per-class Tversky exponents: in sigmoid mode every channel is a foreground channel."""
    if sigmoid:
        return [foreground] * num_classes
    return [background] + [foreground] * (num_classes - 1)


def _unified_coefficients(weight) -> tuple[float, float]:
    """(focal-Tversky coefficient, focal coefficient) of the authors' ``weight`` keyword."""
    if weight is None:
        return 1.0, 1.0
    weight = check_number("weight", weight, low=0.0, high=1.0)
    return weight, 1.0 - weight


def unified_focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
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
) -> torch.Tensor:
    r"""Unified Focal loss (Yeung et al., CMIG 2022), asymmetric (default) or symmetric.

    ``L = weight * L_FT + (1 - weight) * L_F`` (``weight=None``: ``L_FT + L_F``), with channel 0
    the background and channels ``1..C-1`` the foreground classes, ``q = clip(softmax(z), eps,
    1 - eps)`` and the Tversky index of image ``b``, class ``c``
    ``TI = (TP + eps) / (TP + delta FN + (1 - delta) FP + eps)`` (``delta`` weighs false
    negatives, as in the authors' code):

    asymmetric
        ``L_F = mean_voxels[(1-delta)(1-q_0)^gamma CE_0 + delta sum_{c>=1} CE_c]``,
        ``L_FT = mean_b (1/C)[(1 - TI_0) + sum_{c>=1} (1 - TI_c)^{1-gamma}]``
    symmetric
        ``L_F = mean_voxels[(1-delta)(1-q_0)^gamma CE_0 + delta sum_{c>=1} (1-q_c)^gamma CE_c]``,
        ``L_FT = mean_b (1/C) sum_c (1 - TI_c)^{1-gamma}``

    where ``CE_c = -y_c log q_c``. One ``gamma`` suppresses the background focal term and
    enhances the foreground Tversky terms.

    ``sigmoid=True`` (multi-label, e.g. BraTS' overlapping regions): ``q_c = clip(sigmoid(z_c),
    eps, 1 - eps)``, every channel an independent binary problem and **no background channel**:
    each channel's negative side ``1 - y_c`` plays the authors' background (weight ``1 - delta``,
    focal exponent ``gamma``), its positive side ``y_c`` the foreground (weight ``delta``, exponent
    0 for the asymmetric loss, ``gamma`` for the symmetric one), and every channel's Tversky term
    is a foreground term:

    .. math::

        L_F &= \mathrm{mean}_{voxels} \sum_c \big[(1-\delta)\, (1 - y_c)\, q_c^{\gamma}\, (-\log(1 - q_c))
               + \delta\, y_c\, (1 - q_c)^{\gamma^+} (-\log q_c)\big],\quad \gamma^+ = 0 \text{ (asym) or } \gamma \\
        L_{FT} &= \mathrm{mean}_b \frac{1}{C} \sum_c (1 - TI_c)^{1-\gamma}

    with ``log q = logsigmoid(z)``, ``log(1 - q) = logsigmoid(-z)`` (clipped to
    ``[log eps, log(1 - eps)]`` when ``clip``). With ``C = 1`` the focal part equals the softmax
    focal part of the two-channel logits ``(0, z)`` (background, foreground); the Tversky part
    does not (the softmax form also averages the background's index). ``target``: a multi-hot
    map ``(B, C, *S)`` (bool, uint8 or float in ``[0, 1]``; channels may overlap) or an integer
    label map ``(B, *S)`` read as one-hot.

    Defaults are those of the authors' ``asym_unified_focal_loss`` / ``sym_unified_focal_loss``
    (mlyg/unified-focal-loss @ 411c9c5): ``weight=0.5, delta=0.6, gamma=0.5``, ``eps = 1e-7``
    both as the clip bound and as the Tversky smoothing. The binary code is generalised to C
    classes as the author suggests (issue #8): per-image, per-class sums, mean over classes.

    ``clip=True`` reproduces the authors' gradient exactly, including its dead zone: a voxel
    whose probability leaves ``[eps, 1 - eps]`` gets zero gradient from that channel, so a
    confidently wrong voxel (true-class probability below ``eps``) does not learn.
    ``clip=False`` evaluates ``log q`` in log space with no clip and no dead zone.
    ``batch=True`` sums TP, FN, FP over the batch before the index (MONAI's meaning).
    ``dist_sync=True`` (with ``process_group``, default the global group) computes the loss of the
    batch concatenated over the ranks: one all-reduce of the per-class sums, the per-image loss
    sum and the image count; each rank's logit gradient is its slice of the global gradient, so
    under DDP (which averages) multiply the loss by ``lmfloss_kernels.ddp_scale()`` (the world
    size) to get single-process parameter gradients. ``"none"`` returns this rank's images.
    ``ignore_index`` (label maps only) drops voxels from every sum; the voxel mean is then per
    image over its valid voxels.

    ``reduction``: ``"none"`` returns the per-image loss ``(B,)``
    (``weight * R_b + (1 - weight) * F_b``; with ``batch=True`` every image carries the shared
    Tversky term), ``"mean"`` its mean (= the authors' value), ``"sum"`` its sum.

    Differs from MONAI ``AsymmetricUnifiedFocalLoss``: MONAI takes probabilities (not logits),
    is binary only, puts ``weight`` on the focal term (paper placement; identical at 0.5), uses
    ``delta = 0.7`` and, in 1.6, halves the focal term (mean over classes).
    """
    logits, sigmoid = _region_logits(logits, sigmoid)
    num_classes = logits.shape[1]
    tversky_coef, focal_coef = _unified_coefficients(weight)
    delta = check_number("delta", delta, low=0.0, high=1.0)
    gamma = check_number("gamma", gamma, low=0.0, high=1.0)
    asymmetric = check_bool("asymmetric", asymmetric)
    return _region_family(
        logits,
        target,
        tversky_exponent=_tversky_exponents(
            num_classes, background=1.0 if asymmetric else 1.0 - gamma, foreground=1.0 - gamma, sigmoid=sigmoid
        ),
        **_focal_constants(
            num_classes,
            background=(1.0 - delta, gamma),
            foreground=(delta, 0.0 if asymmetric else gamma),
            sigmoid=sigmoid,
        ),
        delta=delta,
        focal_coef=focal_coef,
        tversky_coef=tversky_coef,
        smooth=eps,
        eps=eps,
        clip=clip,
        batch=batch,
        reduction=reduction,
        ignore_index=ignore_index,
        backend=backend,
        dist_sync=dist_sync,
        process_group=process_group,
        sigmoid=sigmoid,
    )


def focal_tversky_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
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
) -> torch.Tensor:
    r"""Focal Tversky loss, the region component of the Unified Focal loss (Yeung et al.).

    ``TI_{bc} = (TP + eps) / (TP + delta FN + (1 - delta) FP + eps)`` on clipped softmax
    probabilities, then

    symmetric (default)
        ``mean_{b,c} (1 - TI_{bc})^{1 - gamma}``  (``symmetric_focal_tversky_loss``)
    asymmetric
        ``mean_b (1/C) [(1 - TI_{b0}) + sum_{c>=1} (1 - TI_{bc})^{1 - gamma}]``
        (``asymmetric_focal_tversky_loss``: the background is not enhanced)

    ``sigmoid=True``: ``q_c = clip(sigmoid(z_c), eps, 1 - eps)`` per channel, no background
    channel, so every channel is enhanced: ``mean_{b,c} (1 - TI_{bc})^{1 - gamma}`` whatever
    ``asymmetric`` says. Targets as in :func:`unified_focal_loss`.

    Defaults ``delta = 0.7, gamma = 0.75`` are the authors' stand-alone defaults
    (mlyg/unified-focal-loss @ 411c9c5). The exponent is ``1 - gamma`` as in that code; the
    Abraham & Khan form ``(1 - TI)^{0.75}`` is ``gamma = 0.25``. Clip, batch, dist_sync, ignore
    and reduction semantics as in :func:`unified_focal_loss`.

    Differs from MONAI ``AsymmetricFocalTverskyLoss`` (``delta = 0.7, gamma = 0.75``, the same
    index and exponent as ``asymmetric=True`` here): MONAI takes probabilities (not logits), is
    binary only (channels 0 and 1; further channels are ignored), and has no ``batch``,
    ``ignore_index`` or un-clipped mode. MONAI has no symmetric form.
    """
    logits, sigmoid = _region_logits(logits, sigmoid)
    num_classes = logits.shape[1]
    delta = check_number("delta", delta, low=0.0, high=1.0)
    gamma = check_number("gamma", gamma, low=0.0, high=1.0)
    asymmetric = check_bool("asymmetric", asymmetric)
    return _region_family(
        logits,
        target,
        tversky_exponent=_tversky_exponents(
            num_classes, background=1.0 if asymmetric else 1.0 - gamma, foreground=1.0 - gamma, sigmoid=sigmoid
        ),
        **_focal_constants(num_classes, background=(0.0, 0.0), foreground=(0.0, 0.0), sigmoid=sigmoid),
        delta=delta,
        focal_coef=0.0,
        tversky_coef=1.0,
        smooth=eps,
        eps=eps,
        clip=clip,
        batch=batch,
        reduction=reduction,
        ignore_index=ignore_index,
        backend=backend,
        dist_sync=dist_sync,
        process_group=process_group,
        sigmoid=sigmoid,
    )


def _class_focal(logits, target, *, delta, gamma, asymmetric, sigmoid, clip, eps, reduction, ignore_index, backend):
    logits, sigmoid = _region_logits(logits, sigmoid)
    num_classes = logits.shape[1]
    delta = check_number("delta", delta, low=0.0, high=1.0)
    gamma = check_number("gamma", gamma, low=0.0)
    return _region_family(
        logits,
        target,
        tversky_exponent=[1.0] * num_classes,
        **_focal_constants(
            num_classes,
            background=(1.0 - delta, gamma),
            foreground=(delta, 0.0 if asymmetric else gamma),
            sigmoid=sigmoid,
        ),
        delta=delta,
        focal_coef=1.0,
        tversky_coef=0.0,
        smooth=eps,
        eps=eps,
        clip=clip,
        batch=False,
        reduction=reduction,
        ignore_index=ignore_index,
        backend=backend,
        sigmoid=sigmoid,
    )


def symmetric_focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    delta: float = 0.7,
    gamma: float = 2.0,
    sigmoid: bool = False,
    clip: bool = True,
    eps: float = 1e-7,
    reduction: str = "mean",
    ignore_index: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Symmetric focal loss, the voxel component of the symmetric Unified Focal loss.

    ``mean_voxels[(1 - delta)(1 - q_0)^gamma CE_0 + delta sum_{c>=1} (1 - q_c)^gamma CE_c]``,
    ``q = clip(softmax(z), eps, 1 - eps)``, ``CE_c = -y_c log q_c``. Defaults ``delta = 0.7,
    gamma = 2`` are the authors' ``symmetric_focal_loss``. Options as in
    :func:`unified_focal_loss`; ``"none"`` gives the per-image voxel mean ``(B,)``.

    ``sigmoid=True``: ``q_c = clip(sigmoid(z_c), eps, 1 - eps)``, no background channel,
    ``mean_voxels sum_c [(1 - delta)(1 - y_c) q_c^gamma (-log(1 - q_c)) + delta y_c (1 - q_c)^gamma
    (-log q_c)]``; with ``C = 1`` this is the softmax loss of the logits ``(0, z)``.

    MONAI has no symmetric focal loss; its ``FocalLoss(use_softmax=True)`` is the unclipped,
    unweighted softmax focal loss (see :func:`focal_loss`).
    """
    return _class_focal(
        logits,
        target,
        delta=delta,
        gamma=gamma,
        asymmetric=False,
        sigmoid=sigmoid,
        clip=clip,
        eps=eps,
        reduction=reduction,
        ignore_index=ignore_index,
        backend=backend,
    )


def asymmetric_focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    delta: float = 0.7,
    gamma: float = 2.0,
    sigmoid: bool = False,
    clip: bool = True,
    eps: float = 1e-7,
    reduction: str = "mean",
    ignore_index: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Asymmetric focal loss, the voxel component of the asymmetric Unified Focal loss.

    ``mean_voxels[(1 - delta)(1 - q_0)^gamma CE_0 + delta sum_{c>=1} CE_c]``: only the
    background is focally suppressed. Defaults ``delta = 0.7, gamma = 2`` are the authors'
    ``asymmetric_focal_loss``. Options as in :func:`symmetric_focal_loss`.

    ``sigmoid=True``: no background channel; each channel's negative side is suppressed,
    ``mean_voxels sum_c [(1 - delta)(1 - y_c) q_c^gamma (-log(1 - q_c)) + delta y_c (-log q_c)]``;
    with ``C = 1`` this is the softmax loss of the logits ``(0, z)``.

    Differs from MONAI ``AsymmetricFocalLoss`` (same defaults): MONAI takes probabilities (not
    logits), is binary only (channels 0 and 1), and in recent versions (1.6) averages the two
    class terms instead of summing them, which halves the authors' value.
    """
    return _class_focal(
        logits,
        target,
        delta=delta,
        gamma=gamma,
        asymmetric=True,
        sigmoid=sigmoid,
        clip=clip,
        eps=eps,
        reduction=reduction,
        ignore_index=ignore_index,
        backend=backend,
    )


def _mixed_focal_weights(alpha, beta, logits: torch.Tensor, sigmoid: bool) -> dict:
    """Per-class focal weights ``alpha_c * beta_c`` of the Mixed Focal loss (both sides in sigmoid mode)."""
    num_classes = logits.shape[1]
    if beta is not None:
        beta = check_number("beta", beta, low=0.0, high=1.0)
    background, foreground = (1.0, 1.0) if beta is None else (beta, 1.0 - beta)
    if sigmoid:
        sides = {"focal_weight": [foreground] * num_classes, "negative_weight": [background] * num_classes}
    else:
        sides = {"focal_weight": [background] + [foreground] * (num_classes - 1)}
    if alpha is None:
        return sides
    alpha = _class_values("alpha", alpha, logits)
    return {name: alpha * _per_class(values, logits) for name, values in sides.items()}


def mixed_focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
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
) -> torch.Tensor:
    r"""Mixed Focal loss (Yeung et al., arXiv 2102.04525 v1): modified focal + modified focal Dice.

    ``L = weight * L_FD + (1 - weight) * L_F`` (``weight=None``: the plain sum, the authors'
    default), ``q = clip(softmax(z), eps, 1 - eps)``:

    .. math::

        L_F &= \mathrm{mean}_{voxels} \sum_c \alpha_c \beta_c (1 - q_c)^{\gamma_f} (-y_c \log q_c) \\
        L_{FD} &= \mathrm{mean}_{b} \frac{1}{C} \sum_c (1 - \mathrm{dice}_{bc})^{\gamma_{fd}},\quad
        \mathrm{dice} = \frac{TP + s}{TP + \delta FN + (1 - \delta) FP + s}

    ``alpha``: per-class sequence (None: all 1). ``beta``: the authors' two-class weighting
    ``[beta, 1 - beta]`` on channels ``[0, 1]``; for C > 2 every foreground channel gets
    ``1 - beta`` (note: with channel 0 the background, ``beta > 0.5`` up-weights background
    errors, the reverse of the authors' docstring; ``beta = 0`` gives ``[0, 1, ...]``, where the
    authors' ``if beta:`` would skip the weighting). Defaults are the authors' code at d3e6647:
    ``delta = 0.7, gamma_f = 2, gamma_fd = 0.75, smooth = 1e-6``. Clip, ignore and reduction
    semantics as in :func:`unified_focal_loss` (``batch`` is not part of this loss).

    ``sigmoid=True``: ``q_c = clip(sigmoid(z_c), eps, 1 - eps)``, no background channel; the
    negative side of each channel takes the background's ``beta``, the positive side the
    foreground's ``1 - beta``:
    ``L_F = mean_voxels sum_c alpha_c [(1 - beta)(1 - q_c)^{gamma_f} (-y_c log q_c)
    + beta q_c^{gamma_f} (-(1 - y_c) log(1 - q_c))]`` (``beta=None``: both sides 1), ``L_FD`` as above
    over the C channels.

    MONAI has no Mixed Focal loss. Its closest, ``DiceFocalLoss(softmax=True)``, adds an
    unclipped softmax focal term to a soft Dice with ``1e-5`` smoothing and no focal exponent on
    the Dice term (``lambda_dice`` / ``lambda_focal`` play the role of ``weight``).
    """
    logits, sigmoid = _region_logits(logits, sigmoid)
    tversky_coef, focal_coef = _unified_coefficients(weight)
    delta = check_number("delta", delta, low=0.0, high=1.0)
    gamma_f = check_number("gamma_f", gamma_f, low=0.0)
    gamma_fd = check_number("gamma_fd", gamma_fd, low=0.0, low_open=True)
    smooth = check_number("smooth", smooth, low=0.0)
    num_classes = logits.shape[1]
    gammas = {"focal_gamma": [gamma_f] * num_classes}
    if sigmoid:
        gammas["negative_gamma"] = [gamma_f] * num_classes
    return _region_family(
        logits,
        target,
        tversky_exponent=[gamma_fd] * num_classes,
        **_mixed_focal_weights(alpha, beta, logits, sigmoid),
        **gammas,
        delta=delta,
        focal_coef=focal_coef,
        tversky_coef=tversky_coef,
        smooth=smooth,
        eps=eps,
        clip=clip,
        batch=False,
        reduction=reduction,
        ignore_index=ignore_index,
        backend=backend,
        sigmoid=sigmoid,
    )


def tversky_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
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
) -> torch.Tensor:
    r"""Tversky loss on softmax probabilities: ``mean_{b,c} (1 - TI_{bc})``.

    ``TI = (TP + smooth) / (TP + delta FN + (1 - delta) FP + smooth)`` per image and class
    (``delta`` weighs false negatives). Defaults are the authors' ``tversky_loss(delta=0.7,
    smooth=1e-6)`` (mlyg/unified-focal-loss), which does not clip (``clip=False``).
    ``sigmoid=True``: the same on ``q_c = sigmoid(z_c)``, per channel (multi-label targets as in
    :func:`unified_focal_loss`; MONAI's ``TverskyLoss(sigmoid=True)``).

    Differs from MONAI ``TverskyLoss``: MONAI names the FP weight ``alpha`` and the FN weight
    ``beta`` (``alpha = 1 - delta, beta = delta`` here), smooths with 1e-5 and needs
    ``softmax=True`` to take logits. ``batch``, ``dist_sync`` / ``process_group``, ``ignore_index``
    and ``reduction`` as in :func:`unified_focal_loss`.
    """
    logits, sigmoid = _region_logits(logits, sigmoid)
    delta = check_number("delta", delta, low=0.0, high=1.0)
    smooth = check_number("smooth", smooth, low=0.0)
    num_classes = logits.shape[1]
    return _region_family(
        logits,
        target,
        tversky_exponent=[1.0] * num_classes,
        **_focal_constants(num_classes, background=(0.0, 0.0), foreground=(0.0, 0.0), sigmoid=sigmoid),
        delta=delta,
        focal_coef=0.0,
        tversky_coef=1.0,
        smooth=smooth,
        eps=eps,
        clip=clip,
        batch=batch,
        reduction=reduction,
        ignore_index=ignore_index,
        backend=backend,
        dist_sync=dist_sync,
        process_group=process_group,
        sigmoid=sigmoid,
    )


def dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
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
) -> torch.Tensor:
    r"""Soft Dice loss on softmax probabilities: ``mean_{b,c} [1 - (2 TP + 2s) / (2 TP + FN + FP + 2s)]``.

    The Tversky loss with ``delta = 0.5`` (the authors' ``dice_loss(delta=0.5, smooth=1e-6)``).
    ``sigmoid=True``: the same on ``q_c = sigmoid(z_c)`` per channel (multi-label).
    Differs from MONAI ``DiceLoss(softmax=True)`` only by smoothing (MONAI: ``(2 TP + 1e-5) /
    (P + Y + 1e-5)``; :func:`dice_ce_loss` with ``lambda_ce=0`` is MONAI's). Other keywords as in
    :func:`tversky_loss`.
    """
    return tversky_loss(
        logits,
        target,
        delta=0.5,
        smooth=smooth,
        sigmoid=sigmoid,
        batch=batch,
        clip=clip,
        eps=eps,
        reduction=reduction,
        ignore_index=ignore_index,
        backend=backend,
        dist_sync=dist_sync,
        process_group=process_group,
    )


# --------------------------------------------------------------------------------------------
# Compound losses: soft Dice + cross-entropy / focal, and the sigmoid focal loss

# eps only bounds clip=True, which the compound losses never use (log q is taken in log space).
_UNCLIPPED_EPS = 1e-7


def _check_lambdas(first: str, first_value, second: str, second_value) -> tuple[float, float]:
    first_value = check_number(first, first_value, low=0.0)
    second_value = check_number(second, second_value, low=0.0)
    if first_value == 0.0 and second_value == 0.0:
        raise ValueError(
            f"{first} and {second} must not both be 0 (the loss would be identically 0), got {first}=0, {second}=0"
        )
    return first_value, second_value


def _non_negative_class_values(name: str, value, logits: torch.Tensor) -> torch.Tensor:
    """:func:`_class_values` that also refuses negative entries (where values are inspected, as labels are)."""
    vector = _class_values(name, value, logits)
    if is_sequence(value):
        low = min(float(v) for v in value)
    elif vector.device.type == "cpu" and not torch.compiler.is_compiling():
        low = value_range(vector)[0]
    else:
        return vector
    if low < 0:
        raise ValueError(f"{name} must be non-negative, got {vector.tolist()}")
    return vector


def _kept_class_scaling(num_classes: int, kept: int, factor: float) -> tuple[float, float]:
    """``(tversky_coef, constant)`` turning the region term over C classes into ``factor`` times the
    mean of ``1 - TI`` over the ``kept`` classes whose exponent is 1 (the others have exponent 0):
    ``(C/K) factor R_b - factor (C - K)/K``."""
    return factor * num_classes / kept, -factor * (num_classes - kept) / kept


def _dice_plus_voxel_term(
    logits,
    target,
    *,
    sigmoid,
    voxel_coef,
    lambda_dice,
    smooth,
    include_background,
    batch,
    reduction,
    ignore_index,
    backend,
    dist_sync,
    process_group,
    **focal_constants,
) -> torch.Tensor:
    r"""``lambda_dice * Dice_b + voxel_coef * F_b`` through one region-family call.

    The soft Dice ``1 - (2 TP + s) / (2 TP + FN + FP + s)`` is ``1 - TI`` with ``delta = 1/2`` and
    both smoothing terms ``s / 2``. A channel left out (``include_background=False``: channel 0)
    gets Tversky exponent 0, so ``(1 - TI)^0 = 1`` adds ``1/C`` and no gradient; scaling the
    region term by ``C/K`` and adding ``-(C - K)/K`` per image leaves the mean over the ``K`` kept
    channels.
    """
    num_classes = logits.shape[1]
    kept = num_classes - (0 if check_bool("include_background", include_background) else 1)
    if kept == 0:
        raise ValueError(
            "include_background=False drops channel 0 from the Dice term, but the logits have 1 channel; "
            "pass include_background=True"
        )
    smooth = check_number("smooth", smooth, low=0.0)
    reduction = check_reduction(reduction)
    tversky_coef, constant = _kept_class_scaling(num_classes, kept, lambda_dice)
    if constant != 0.0 and reduction == "sum" and check_bool("dist_sync", dist_sync):
        # The per-image constant times the global image count, which only the all-reduce knows.
        raise ValueError(
            "include_background=False with dist_sync=True supports reduction 'mean' or 'none', got 'sum'; "
            "multiply the 'mean' loss by the global batch size instead"
        )
    loss = _region_family(
        logits,
        target,
        tversky_exponent=[1.0 if c >= num_classes - kept else 0.0 for c in range(num_classes)],
        **focal_constants,
        delta=0.5,
        focal_coef=voxel_coef,
        tversky_coef=tversky_coef,
        smooth=smooth / 2,
        eps=_UNCLIPPED_EPS,
        clip=False,
        batch=batch,
        reduction=reduction,
        ignore_index=ignore_index,
        backend=backend,
        dist_sync=dist_sync,
        process_group=process_group,
        sigmoid=sigmoid,
    )
    if loss is None or constant == 0.0:
        return loss
    return loss + constant * (logits.shape[0] if reduction == "sum" else 1)


def dice_ce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
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
) -> torch.Tensor:
    r"""Soft Dice + cross-entropy (softmax) or soft Dice + binary cross-entropy (``sigmoid=True``), fused.

    Both terms come from one read of the logits and one gradient pass. Per image ``b``, with
    ``p = softmax(z)`` (``p_c = sigmoid(z_c)`` when ``sigmoid``), ``K`` kept channels (all, or
    ``1..C-1`` with ``include_background=False``) and ``V_b`` (valid) voxels:

    .. math::

        D_b &= \frac{1}{K} \sum_{c \in kept} \Big[1 - \frac{2 TP_{bc} + s}{2 TP_{bc} + FN_{bc} + FP_{bc} + s}\Big],
            \quad TP = \sum_i y p,\ FN = \sum_i y (1 - p),\ FP = \sum_i (1 - y) p \\
        CE_b &= \frac{1}{V_b} \sum_i \sum_c w_c\, y_{ic} (-\log p_{ic}) \qquad \text{(softmax)} \\
        CE_b &= \frac{1}{C V_b} \sum_i \sum_c w_c \big[u_c\, y_{ic} (-\log p_{ic})
                + (1 - y_{ic}) (-\log(1 - p_{ic}))\big] \qquad \text{(sigmoid)} \\
        L_b &= \lambda_{dice} D_b + \lambda_{ce} CE_b

    ``w = weight`` (per-class, default 1), ``u = pos_weight`` (sigmoid only, per channel, default
    1: :class:`torch.nn.BCEWithLogitsLoss`'s ``pos_weight``). ``reduction``: ``"none"`` gives
    ``L_b`` ``(B,)``, ``"mean"`` its mean, ``"sum"`` its sum.

    Equalities (tested): without ignored voxels, ``CE`` averaged over the batch is
    :func:`torch.nn.functional.cross_entropy` (class indices or one-hot / soft probabilities;
    with ``weight`` it is the probability-target form, which divides by the voxel count, where
    torch's class-index form divides by the sum of the voxels' weights) and, in sigmoid mode,
    :func:`torch.nn.functional.binary_cross_entropy_with_logits` with ``reduction="mean"`` (the
    mean over all ``B C S`` elements, ``weight`` broadcast over channels). ``D`` is MONAI's
    ``DiceLoss`` with ``smooth_nr = smooth_dr = s`` and nnU-Net's ``MemoryEfficientSoftDiceLoss``
    (as ``1 + `` its value; ``include_background=False`` is its ``do_bg=False``, ``batch`` its
    ``batch_dice``). With ``ignore_index`` (label maps only) ignored voxels leave every sum and
    ``CE_b`` averages each image's valid voxels, then images are averaged (torch's
    ``ignore_index`` averages all valid voxels of the batch at once: equal when the images have
    as many valid voxels).

    Defaults: ``lambda_dice = lambda_ce = 1`` (MONAI ``DiceCELoss``, nnU-Net ``DC_and_CE_loss``),
    ``smooth = 1e-5`` (both), ``include_background=True`` and ``batch=False`` (MONAI's defaults;
    nnU-Net uses ``do_bg=False`` for softmax and ``batch_dice`` from its plans). Targets: an
    integer label map ``(B, *S)`` or ``(B, 1, *S)``, or a dense ``(B, C, *S)`` one-hot / soft map
    (softmax) or multi-hot map (sigmoid; bool, uint8 or float in ``[0, 1]``, channels may overlap;
    a label map in sigmoid mode is read as one-hot). In sigmoid mode there is no background
    channel: ``include_background=False`` drops channel 0 from the Dice term, whatever it holds.
    ``dist_sync`` / ``process_group`` as in :func:`unified_focal_loss` (with
    ``include_background=False``, ``reduction="sum"`` is refused there).
    """
    logits, sigmoid = _region_logits(logits, sigmoid)
    num_classes = logits.shape[1]
    lambda_dice, lambda_ce = _check_lambdas("lambda_dice", lambda_dice, "lambda_ce", lambda_ce)
    class_weight = [1.0] * num_classes if weight is None else _non_negative_class_values("weight", weight, logits)
    if sigmoid:
        positive = class_weight
        if pos_weight is not None:
            positive = _non_negative_class_values("pos_weight", pos_weight, logits)
            if weight is not None:
                positive = positive * class_weight
        focal = {
            "focal_weight": positive,
            "focal_gamma": [0.0] * num_classes,
            "negative_weight": class_weight,
            "negative_gamma": [0.0] * num_classes,
        }
    elif pos_weight is not None:
        raise ValueError(f"pos_weight applies to sigmoid=True only (the BCE positive side), got {pos_weight!r}")
    else:
        focal = {"focal_weight": class_weight, "focal_gamma": [0.0] * num_classes}
    return _dice_plus_voxel_term(
        logits,
        target,
        sigmoid=sigmoid,
        voxel_coef=lambda_ce / num_classes if sigmoid else lambda_ce,
        lambda_dice=lambda_dice,
        smooth=smooth,
        include_background=include_background,
        batch=batch,
        reduction=reduction,
        ignore_index=ignore_index,
        backend=backend,
        dist_sync=dist_sync,
        process_group=process_group,
        **focal,
    )


def _sigmoid_alpha(alpha) -> tuple[float, float]:
    """(positive, negative) side weights of torchvision's scalar ``alpha`` (``None``: 1 and 1)."""
    if alpha is None:
        return 1.0, 1.0
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(
            f"alpha must be None or a number in [0, 1] (the positive side's weight, torchvision's alpha) "
            f"with sigmoid=True, got {type(alpha).__name__}: {alpha!r}"
        )
    alpha = check_number("alpha", alpha, low=0.0, high=1.0)
    return alpha, 1.0 - alpha


def dice_focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
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
) -> torch.Tensor:
    r"""Soft Dice + focal loss (softmax or ``sigmoid=True``), fused: ``L_b = lambda_dice D_b + lambda_focal F_b``.

    ``D_b`` is the soft Dice of :func:`dice_ce_loss` (``smooth``, ``include_background``,
    ``batch`` as there). The focal term, per image over its ``V_b`` (valid) voxels:

    .. math::

        F_b &= \frac{1}{V_b} \sum_i \sum_c \alpha_c\, y_{ic} (1 - p_{ic})^{\gamma} (-\log p_{ic})
              \qquad p = \mathrm{softmax}(z) \\
        F_b &= \frac{1}{C V_b} \sum_i \sum_c \big[\alpha\, y (1 - p)^{\gamma} (-\log p)
              + (1 - \alpha) (1 - y)\, p^{\gamma} (-\log(1 - p))\big]_{ic} \qquad p = \mathrm{sigmoid}(z)

    Softmax: ``alpha`` is ``None`` (all 1) or per class, as in :func:`focal_loss` (the softmax
    focal loss of Lin et al.; its mean is over voxels, summed over classes, so ``gamma = 0`` is
    :func:`dice_ce_loss`). Sigmoid: ``alpha`` is ``None`` (both sides 1) or a number in
    ``[0, 1]`` weighing positives, ``1 - alpha`` weighing negatives, and ``F`` is the mean over
    all ``B C S`` elements: :func:`sigmoid_focal_loss` (torchvision's ``sigmoid_focal_loss``
    with ``reduction="mean"``; on soft targets each side is weighed separately, see there);
    ``gamma = 0, alpha=None`` is :func:`dice_ce_loss` with ``sigmoid=True``. No background
    channel in sigmoid mode.

    Defaults: ``gamma = 2`` (Lin et al., MONAI, torchvision), ``alpha=None`` and
    ``lambda_dice = lambda_focal = 1``, ``smooth = 1e-5`` (MONAI ``DiceFocalLoss``). Differs from
    MONAI's ``DiceFocalLoss``: in softmax mode MONAI's focal mean also divides by C (an average
    over ``B C S`` elements) and reads a scalar ``alpha`` as ``1 - alpha`` for channel 0; its
    sigmoid mode (``FocalLoss(use_softmax=False)``) is the one here. Targets, ``ignore_index``,
    ``reduction`` and ``dist_sync`` as in :func:`dice_ce_loss`.
    """
    logits, sigmoid = _region_logits(logits, sigmoid)
    num_classes = logits.shape[1]
    gamma = check_number("gamma", gamma, low=0.0)
    lambda_dice, lambda_focal = _check_lambdas("lambda_dice", lambda_dice, "lambda_focal", lambda_focal)
    if sigmoid:
        positive, negative = _sigmoid_alpha(alpha)
        focal = {
            "focal_weight": [positive] * num_classes,
            "focal_gamma": [gamma] * num_classes,
            "negative_weight": [negative] * num_classes,
            "negative_gamma": [gamma] * num_classes,
        }
    else:
        if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
            raise TypeError(
                f"alpha must be None or one weight per class with sigmoid=False (a scalar alpha is the sigmoid "
                f"mode's positive-side weight), got {alpha!r}"
            )
        class_alpha = [1.0] * num_classes if alpha is None else _non_negative_class_values("alpha", alpha, logits)
        focal = {"focal_weight": class_alpha, "focal_gamma": [gamma] * num_classes}
    return _dice_plus_voxel_term(
        logits,
        target,
        sigmoid=sigmoid,
        voxel_coef=lambda_focal / num_classes if sigmoid else lambda_focal,
        lambda_dice=lambda_dice,
        smooth=smooth,
        include_background=include_background,
        batch=batch,
        reduction=reduction,
        ignore_index=ignore_index,
        backend=backend,
        dist_sync=dist_sync,
        process_group=process_group,
        **focal,
    )


def sigmoid_focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float | None = 0.25,
    gamma: float = 2.0,
    reduction: str = "mean",
    ignore_index: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Sigmoid focal loss (Lin et al. 2017, RetinaNet), per element, fused: torchvision's semantics.

    For every element (image ``b``, channel ``c``, voxel ``i``) with ``p = sigmoid(z)``:

    .. math::

        \ell = \alpha\, y (1 - p)^{\gamma} (-\log p) + (1 - \alpha)(1 - y)\, p^{\gamma} (-\log(1 - p))

    (``alpha=None``: both sides weigh 1; ``gamma = 0, alpha=None`` is
    :func:`torch.nn.functional.binary_cross_entropy_with_logits`). ``log p`` and ``log(1 - p)``
    are log-sigmoids, so saturated logits give finite values. On 0/1 targets this is
    torchvision's ``alpha_t (1 - p_t)^gamma BCE``; on soft targets (``0 < y < 1``) the two sides
    are weighed separately as above, where torchvision mixes them through ``p_t`` and ``alpha_t``.
    ``reduction``: ``"mean"`` is the mean over all ``B C S`` elements (torchvision's ``"mean"``),
    ``"sum"`` their sum (torchvision's ``"sum"``), ``"none"`` the per-image mean over its ``C S``
    elements, shape ``(B,)`` (torchvision returns every element; the fused kernels reduce in
    their pass). Logits ``(B, C, *S)`` with ``C >= 1`` (one-dimensional detection scores
    ``(N, C)`` can be passed as ``(N, C, 1)``); targets a multi-hot map of the logits' shape
    (float in ``[0, 1]``, bool or uint8) or an integer label map ``(B, *S)`` read as one-hot.
    ``ignore_index`` (label maps only) drops voxels: the mean is then per image over its valid
    elements, averaged over images, and ``"sum"`` is refused (the per-image valid counts are only
    known inside the kernel).

    Defaults ``alpha = 0.25, gamma = 2`` are torchvision's ``sigmoid_focal_loss`` and Lin et al.'s
    (MONAI's ``FocalLoss`` defaults to ``alpha=None``).
    """
    logits = check_logits(logits, dense=True, min_classes=1)
    batch_size, num_classes = logits.shape[:2]
    positive, negative = _sigmoid_alpha(alpha)
    gamma = check_number("gamma", gamma, low=0.0)
    reduction = check_reduction(reduction)
    is_label_map = isinstance(target, torch.Tensor) and target.dim() != logits.dim()
    if reduction == "sum" and is_label_map and ignore_index is not None:
        raise ValueError(
            f"sigmoid_focal_loss with ignore_index={ignore_index!r} supports reduction 'mean' or 'none', got 'sum'"
        )
    spatial_size = logits[0, 0].numel()
    return _region_family(
        logits,
        target,
        [positive] * num_classes,
        [gamma] * num_classes,
        [1.0] * num_classes,
        delta=0.5,
        focal_coef=float(spatial_size) if reduction == "sum" else 1.0 / num_classes,
        tversky_coef=0.0,
        smooth=0.0,
        eps=_UNCLIPPED_EPS,
        clip=False,
        batch=False,
        reduction=reduction,
        ignore_index=ignore_index,
        backend=backend,
        sigmoid=True,
        negative_weight=[negative] * num_classes,
        negative_gamma=[gamma] * num_classes,
    )
