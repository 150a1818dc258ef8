"""Property-based tests (hypothesis, bounded): every backend equals the reference, and the loss
families' invariants hold on every backend of every device present, on random shapes, class
counts, dtypes, options and targets (soft maps, int64 / int32 / uint8 label maps, with or without
MONAI's singleton channel axis, with ignored voxels)."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lmfloss_kernels as lk
from lmfloss_kernels import functional as F

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Tests that run every backend twice per example (the Triton interpreter costs ~0.1 s a call).
PAIRED_SETTINGS = settings(SETTINGS, max_examples=12)
# Bound on |sum_c grad_c| relative to the gradient's scale (see _zero_logit_scales): float64
# math, float32 math, and a gradient rounded to the logits' half dtype (each entry off by half an
# ulp, C <= 6 entries).
CLASS_SUM_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 6 * 2**-9, torch.float16: 6 * 2**-12}
# Bound on the difference of two computations of the same quantity whose sums run in another
# order (permuted classes, a duplicated batch), relative to its scale.
REORDER_TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}


def _subnormal_spacing(dtype: torch.dtype) -> float:
    """Absolute rounding step of ``dtype`` near 0 (float16 gradients below 6e-5 are subnormal)."""
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps


def _backends(dtype: torch.dtype) -> list[tuple[str, str]]:
    """(device, backend) pairs that serve logits of ``dtype``: every backend of every device present."""
    return [(device, name) for device in DEVICES for name in lk.available_backends(device, dtype)]


def _fused(dtype: torch.dtype) -> list[tuple[str, str]]:
    return [(device, name) for device, name in _backends(dtype) if name != "reference"]


def _labels(draw, generator, num_classes, shape):
    """An integer label map with some voxels ignored (or not), in a drawn dtype and form.

    Returns ``(target, ignore_index, labels)``: ``labels`` is ``target`` without the optional
    singleton channel axis (``target`` is a view of it), for the invariants' bookkeeping.
    """
    dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.uint8]))
    labels = torch.randint(0, num_classes, shape, generator=generator)
    ignore_index = None
    if draw(st.booleans()):
        ignore_index = 255 if dtype == torch.uint8 else -1
        labels[torch.rand(shape, generator=generator) < 0.3] = ignore_index
    labels = labels.to(dtype)
    target = labels.unsqueeze(1) if draw(st.booleans()) else labels  # MONAI's (B, 1, *S)
    return target, ignore_index, labels


@st.composite
def region_case(draw):
    num_classes = draw(st.integers(2, 5))
    spatial = tuple(draw(st.lists(st.integers(1, 7), min_size=1, max_size=3)))
    batch = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    logits = draw(st.sampled_from([1.0, 4.0, 12.0])) * torch.randn((batch, num_classes, *spatial), generator=generator)
    logits = logits.to(draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16])))
    if draw(st.booleans()):
        target = torch.softmax(2.0 * torch.randn(logits.shape, generator=generator), 1)
        ignore_index, labels = None, None
    else:
        target, ignore_index, labels = _labels(draw, generator, num_classes, (batch, *spatial))
    gamma = draw(st.floats(0.0, 1.0))
    options = {
        "delta": draw(st.floats(0.0, 1.0)),
        "focal_coef": draw(st.sampled_from([0.0, 0.5, 1.0])),
        "tversky_coef": draw(st.sampled_from([0.0, 0.5, 1.0])),
        "smooth": 1e-6,
        "eps": 1e-7,
        "clip": draw(st.booleans()),
        "batch": draw(st.booleans()),
        "ignore_index": ignore_index,
        "reduction": draw(st.sampled_from(["mean", "sum", "none"])),
    }
    if options["focal_coef"] == 0.0 and options["tversky_coef"] == 0.0:
        options["focal_coef"] = 1.0
    vectors = (
        torch.rand(num_classes, generator=generator) + 0.1,
        torch.full((num_classes,), gamma),
        torch.full((num_classes,), 1.0 - gamma * 0.5),
    )
    return logits, target, labels, vectors, options


def _region(logits, target, vectors, options, device, backend):
    """The region family through the functional API's checks (which squeeze a (B, 1, *S) map)."""
    per_class = [v.tolist() for v in vectors]
    return F._region_family(logits, target.to(device), *per_class, **options, backend=backend)


@st.composite
def row_case(draw):
    num_classes = draw(st.integers(2, 6))
    dense = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    shape = (
        (draw(st.integers(1, 3)), num_classes, draw(st.integers(1, 9)))
        if dense
        else (draw(st.integers(1, 40)), num_classes)
    )
    logits = draw(st.sampled_from([1.0, 5.0])) * torch.randn(shape, generator=generator)
    logits = logits.to(draw(st.sampled_from([torch.float32, torch.bfloat16])))
    target, ignore_index, labels = _labels(draw, generator, num_classes, shape[:1] + shape[2:])
    ignore_index = -100 if ignore_index is None else ignore_index  # an int for this family; no label is -100
    labels.view(-1)[0] = 0  # at least one row counts, so "mean" is defined (target views labels)
    vectors = (
        0.5 * torch.rand(num_classes, generator=generator),
        torch.rand(num_classes, generator=generator) + 0.1,
        torch.rand(num_classes, generator=generator) + 0.1,
    )
    options = {
        "alpha": draw(st.sampled_from([0.0, 1.0, 1.5])),
        "beta": draw(st.sampled_from([0.0, 1.0])),
        "gamma": draw(st.floats(0.0, 3.0)),
        "s": draw(st.sampled_from([1.0, 30.0])),
        "ignore_index": ignore_index,
        "reduction": draw(st.sampled_from(["mean", "sum", "none"])),
    }
    if options["alpha"] == 0.0 and options["beta"] == 0.0:
        options["beta"] = 1.0
    return logits, target, labels, vectors, options


def _rows(logits, target, vectors, options, device, backend):
    """The row family through the functional API's checks; per-class vectors in the math dtype."""
    math_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    per_class = [v.to(device, math_dtype) for v in vectors]
    return F._row_family(logits, target.to(device), *per_class, **options, backend=backend)


def _value_and_grad(family, logits, target, vectors, options, device="cpu", backend="reference"):
    """Loss and logit gradient of ``family`` on ``device`` / ``backend``, both returned on the CPU."""
    x = logits.to(device, copy=True).requires_grad_(True)
    value = family(x, target, vectors, options, device, backend)
    (grad,) = torch.autograd.grad(value.sum(), x)
    return value.detach().cpu(), grad.cpu()


def _error(got: torch.Tensor, wide: torch.Tensor) -> float:
    """Largest deviation from the float64 value, relative to its largest entry (at least 1e-6).

    The floor matters for saturated rows only: there even the float64 reference rounds
    ``-log p_t = log(1 + 1e-21)`` to 0 while a fused log1p keeps it.
    """
    return float((got.double() - wide).abs().max() / wide.abs().max().clamp_min(1e-6))


def _assert_matches(name, got, same_precision, wide, tol):
    """Cut Cross-Entropy rule: within twice the reference's own float64 distance (same input precision), + tol.

    Twice: on confident rows both round ``p_t`` near 1, each in its own way.
    """
    for part, a, b, c in (
        ("loss", got[0], same_precision[0], wide[0]),
        ("gradient", got[1], same_precision[1], wide[1]),
    ):
        error, baseline = _error(a, c), _error(b, c)
        assert error <= 2 * baseline + tol, f"{name} {part}: error {error:.2e} vs reference's own {baseline:.2e}"


def _zero_logit_scales(family, case) -> tuple[float, float]:
    """Floors of the scales rounding errors are measured against: the loss and largest gradient entry
    of the same case at zero logits (uniform softmax: no saturation, no clip dead zone).

    The largest entry alone is not enough: on saturated voxels / rows the gradient is tiny
    (``p_c`` of 1e-19) while ``p_t - 1`` still rounds at the size of 1, as does ``-log p_t``
    formed from logits of size 45.
    """
    logits, target, _, vectors, options = case
    value, grad = _value_and_grad(family, torch.zeros_like(logits, dtype=torch.float64), target, vectors, options)
    return _largest(value), _largest(grad)


def _largest(tensor: torch.Tensor, floor: float = 0.0) -> float:
    return max(tensor.double().abs().nan_to_num(0.0).max().item(), floor)


def _check_equal_reference(family, case):
    logits, target, _, vectors, options = case
    wide = _value_and_grad(family, logits.double(), target, vectors, options)
    same = _value_and_grad(family, logits, target, vectors, options)
    # Half-precision inputs are exact in float64; only the returned gradient is rounded to them.
    tol = 2e-5 if logits.dtype == torch.float32 else 1e-2
    for device, name in _fused(logits.dtype):
        value, grad = _value_and_grad(family, logits, target, vectors, options, device, name)
        assert value.dtype == torch.float32 and grad.dtype == logits.dtype
        _assert_matches(f"{device}/{name}", (value, grad), same, wide, tol)


def _check_invariants(family, case):
    """loss >= 0; the gradient sums to 0 over the classes at every voxel / row (softmax); ignored
    voxels / rows get exactly zero gradient. On the float64 reference and on every backend."""
    logits, target, labels, vectors, options = case
    grad_floor = _zero_logit_scales(family, case)[1]
    runs = [(logits.double(), "cpu", "reference")] + [(logits, d, n) for d, n in _backends(logits.dtype)]
    for x, device, name in runs:
        value, grad = _value_and_grad(family, x, target, vectors, options, device, name)
        where = f"{device}/{name} {x.dtype}"
        assert (value >= 0).all(), f"{where}: negative loss {value.min().item()}"
        class_sum = grad.double().sum(1).abs().max().item()
        bound = CLASS_SUM_TOL[x.dtype] * _largest(grad, grad_floor) + 6 * _subnormal_spacing(x.dtype)
        assert class_sum <= bound, f"{where}: gradient sums to {class_sum:.2e} over classes (bound {bound:.2e})"
        if options["ignore_index"] is not None:
            ignored = (labels == options["ignore_index"]).unsqueeze(1).expand_as(grad)
            assert (grad[ignored] == 0).all(), f"{where}: ignored voxels got a gradient"


def _assert_close_scaled(got, expected, scale, dtype, where):
    """Equal up to :data:`REORDER_TOL` of ``scale`` (NaN where NaN)."""
    tol = REORDER_TOL[dtype] * scale + _subnormal_spacing(dtype)
    torch.testing.assert_close(got.double(), expected.double(), rtol=0, atol=tol, equal_nan=True, msg=where)


def _check_permutation(family, case, rnd):
    """Permuting the foreground classes (channel 0 stays the background) together with their per-class
    settings leaves every loss value unchanged and permutes the gradient's channels the same way."""
    logits, target, labels, vectors, options = case
    num_classes = logits.shape[1]
    order = torch.tensor([0, *rnd.sample(range(1, num_classes), num_classes - 1)])
    moved_vectors = [v[order] for v in vectors]
    if target.is_floating_point():
        moved = target[:, order]
    else:
        # class order[k] becomes class k; ignored labels (outside [0, C)) stay as they are
        lookup = order.argsort().to(target.dtype)
        in_range = (target >= 0) & (target < num_classes)
        moved = torch.where(in_range, lookup[target.long().clamp(0, num_classes - 1)], target)
    loss_floor, grad_floor = _zero_logit_scales(family, case)
    runs = [(logits.double(), "cpu", "reference")] + [(logits, d, n) for d, n in _backends(logits.dtype)]
    for x, device, name in runs:
        value, grad = _value_and_grad(family, x, target, vectors, options, device, name)
        permuted, permuted_grad = _value_and_grad(family, x[:, order], moved, moved_vectors, options, device, name)
        where = f"{device}/{name} {x.dtype}"
        _assert_close_scaled(permuted, value, _largest(value, loss_floor), x.dtype, f"{where}: loss")
        _assert_close_scaled(permuted_grad, grad[:, order], _largest(grad, grad_floor), x.dtype, f"{where}: gradient")


@SETTINGS
@given(region_case())
def test_backends_equal_reference(case):
    _check_equal_reference(_region, case)


@SETTINGS
@given(region_case())
def test_invariants(case):
    _check_invariants(_region, case)


@PAIRED_SETTINGS
@given(region_case(), st.randoms(use_true_random=False))
def test_permuting_foreground_classes(case, rnd):
    _check_permutation(_region, case, rnd)


@PAIRED_SETTINGS
@given(region_case())
def test_duplicating_the_batch_keeps_the_mean(case):
    logits, target, _, vectors, options = case
    # Without smoothing the Tversky index is a ratio of sums, unchanged when batch=True doubles them
    # (an index of 0 / 0 is NaN on both sides).
    options = {**options, "reduction": "mean", "smooth": 0.0}
    loss_floor = _zero_logit_scales(_region, (logits, target, None, vectors, options))[0]
    twice_logits, twice_target = torch.cat([logits, logits]), torch.cat([target, target])
    runs = [(logits.double(), "cpu", "reference")] + [(logits, d, n) for d, n in _backends(logits.dtype)]
    for x, device, name in runs:
        once = _region(x.to(device), target, vectors, options, device, name).cpu()
        twice = _region(twice_logits.to(device, x.dtype), twice_target, vectors, options, device, name).cpu()
        _assert_close_scaled(twice, once, _largest(once, loss_floor), x.dtype, f"{device}/{name} {x.dtype}")


@SETTINGS
@given(row_case())
def test_row_backends_equal_reference(case):
    _check_equal_reference(_rows, case)


@SETTINGS
@given(row_case())
def test_row_invariants(case):
    _check_invariants(_rows, case)


@PAIRED_SETTINGS
@given(row_case(), st.randoms(use_true_random=False))
def test_row_permuting_classes(case, rnd):
    _check_permutation(_rows, case, rnd)
