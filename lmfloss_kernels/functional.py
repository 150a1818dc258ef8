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
    "dice_loss",
    "drw_weights",
    "focal_loss",
    "focal_tversky_loss",
    "ldam_loss",
    "ldam_margins",
    "lmf_loss",
    "mixed_focal_loss",
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


# Backends whose kernels apply the non-finite logits policy themselves, from the logits they
# load anyway (a probe added to each row's / image's loss): for them _propagate_nonfinite would
# be a second full read of the logits (two for reduction="none"), some 30% more memory traffic
# for a kernel bound by it.
_NONFINITE_IN_KERNEL = frozenset({"triton", "cuda"})


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
        self.in_kernel = implementation.name in _NONFINITE_IN_KERNEL

    def __call__(self, logits: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        loss = self.function(logits, *args, **kwargs)
        if self.in_kernel:
            return loss
        return _propagate_nonfinite(loss, logits, self.family, kwargs["reduction"])


def _propagate_nonfinite(loss: torch.Tensor, logits: torch.Tensor, family: str, reduction: str) -> torch.Tensor:
    """Non-finite logits policy: NaN, +inf or -inf in a row / image makes its loss NaN, on every backend.

    Clipped probabilities and max-subtracted softmaxes can turn a NaN logit into a finite
    loss, so ``0 * (min + max)`` of the logits is added: torch's min and max propagate NaN,
    ``min + max`` (in float64, so finite logits never overflow) is non-finite exactly when a
    logit is, and ``0 * inf`` and ``0 * nan`` are NaN. One read of the logits with no
    temporary (about 2% of a CPU fwd+bwd), no host sync, nothing added to the gradient. The
    Triton kernels apply the same policy in-kernel (``_NONFINITE_IN_KERNEL``). CPU logits are
    first checked on the host (one min/max read), and finite ones skip the addition.
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
    logits = check_logits(logits, dense=True)
    num_classes = logits.shape[1]
    tversky_coef, focal_coef = _unified_coefficients(weight)
    delta = check_number("delta", delta, low=0.0, high=1.0)
    gamma = check_number("gamma", gamma, low=0.0, high=1.0)
    asymmetric = check_bool("asymmetric", asymmetric)
    foreground = num_classes - 1
    focal_gamma = [gamma] + [0.0 if asymmetric else gamma] * foreground
    exponent = [1.0 if asymmetric else 1.0 - gamma] + [1.0 - gamma] * foreground
    return _region_family(
        logits,
        target,
        [1.0 - delta] + [delta] * foreground,
        focal_gamma,
        exponent,
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
    )


def focal_tversky_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    delta: float = 0.7,
    gamma: float = 0.75,
    asymmetric: bool = False,
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

    Defaults ``delta = 0.7, gamma = 0.75`` are the authors' stand-alone defaults
    (mlyg/unified-focal-loss @ 411c9c5). The exponent is ``1 - gamma`` as in that code; the
    Abraham & Khan form ``(1 - TI)^{0.75}`` is ``gamma = 0.25``. Clip, batch, dist_sync, ignore
    and reduction semantics as in :func:`unified_focal_loss`.

    Differs from MONAI ``AsymmetricFocalTverskyLoss`` (``delta = 0.7, gamma = 0.75``, the same
    index and exponent as ``asymmetric=True`` here): MONAI takes probabilities (not logits), is
    binary only (channels 0 and 1; further channels are ignored), and has no ``batch``,
    ``ignore_index`` or un-clipped mode. MONAI has no symmetric form.
    """
    logits = check_logits(logits, dense=True)
    delta = check_number("delta", delta, low=0.0, high=1.0)
    gamma = check_number("gamma", gamma, low=0.0, high=1.0)
    asymmetric = check_bool("asymmetric", asymmetric)
    foreground = logits.shape[1] - 1
    exponent = [1.0 if asymmetric else 1.0 - gamma] + [1.0 - gamma] * foreground
    zeros = [0.0] * (foreground + 1)
    return _region_family(
        logits,
        target,
        zeros,
        zeros,
        exponent,
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
    )


def _class_focal(logits, target, *, delta, gamma, asymmetric, clip, eps, reduction, ignore_index, backend):
    logits = check_logits(logits, dense=True)
    delta = check_number("delta", delta, low=0.0, high=1.0)
    gamma = check_number("gamma", gamma, low=0.0)
    foreground = logits.shape[1] - 1
    return _region_family(
        logits,
        target,
        [1.0 - delta] + [delta] * foreground,
        [gamma] + [0.0 if asymmetric else gamma] * foreground,
        [1.0] * (foreground + 1),
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
    )


def symmetric_focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    delta: float = 0.7,
    gamma: float = 2.0,
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

    MONAI has no symmetric focal loss; its ``FocalLoss(use_softmax=True)`` is the unclipped,
    unweighted softmax focal loss (see :func:`focal_loss`).
    """
    return _class_focal(
        logits,
        target,
        delta=delta,
        gamma=gamma,
        asymmetric=False,
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
        clip=clip,
        eps=eps,
        reduction=reduction,
        ignore_index=ignore_index,
        backend=backend,
    )


def _mixed_focal_weight(alpha, beta, logits: torch.Tensor) -> torch.Tensor | list[float]:
    """Per-class focal weight ``alpha_c * beta_c`` of the Mixed Focal loss."""
    num_classes = logits.shape[1]
    if beta is None:
        beta_c = [1.0] * num_classes
    else:
        beta = check_number("beta", beta, low=0.0, high=1.0)
        beta_c = [beta] + [1.0 - beta] * (num_classes - 1)
    if alpha is None:
        return beta_c
    alpha = _class_values("alpha", alpha, logits)
    return alpha * _per_class(beta_c, logits)


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

    MONAI has no Mixed Focal loss. Its closest, ``DiceFocalLoss(softmax=True)``, adds an
    unclipped softmax focal term to a soft Dice with ``1e-5`` smoothing and no focal exponent on
    the Dice term (``lambda_dice`` / ``lambda_focal`` play the role of ``weight``).
    """
    logits = check_logits(logits, dense=True)
    tversky_coef, focal_coef = _unified_coefficients(weight)
    delta = check_number("delta", delta, low=0.0, high=1.0)
    gamma_f = check_number("gamma_f", gamma_f, low=0.0)
    gamma_fd = check_number("gamma_fd", gamma_fd, low=0.0, low_open=True)
    smooth = check_number("smooth", smooth, low=0.0)
    num_classes = logits.shape[1]
    return _region_family(
        logits,
        target,
        _mixed_focal_weight(alpha, beta, logits),
        [gamma_f] * num_classes,
        [gamma_fd] * num_classes,
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
    )


def tversky_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    delta: float = 0.7,
    smooth: float = 1e-6,
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

    Differs from MONAI ``TverskyLoss``: MONAI names the FP weight ``alpha`` and the FN weight
    ``beta`` (``alpha = 1 - delta, beta = delta`` here), smooths with 1e-5 and needs
    ``softmax=True`` to take logits. ``batch``, ``dist_sync`` / ``process_group``, ``ignore_index``
    and ``reduction`` as in :func:`unified_focal_loss`.
    """
    logits = check_logits(logits, dense=True)
    delta = check_number("delta", delta, low=0.0, high=1.0)
    smooth = check_number("smooth", smooth, low=0.0)
    num_classes = logits.shape[1]
    return _region_family(
        logits,
        target,
        [0.0] * num_classes,
        [0.0] * num_classes,
        [1.0] * num_classes,
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
    )


def dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    smooth: float = 1e-6,
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
    Differs from MONAI ``DiceLoss(softmax=True)`` only by smoothing (MONAI: ``(2 TP + 1e-5) /
    (P + Y + 1e-5)``). Other keywords as in :func:`tversky_loss`.
    """
    return tversky_loss(
        logits,
        target,
        delta=0.5,
        smooth=smooth,
        batch=batch,
        clip=clip,
        eps=eps,
        reduction=reduction,
        ignore_index=ignore_index,
        backend=backend,
        dist_sync=dist_sync,
        process_group=process_group,
    )
