"""Property-based tests (hypothesis, bounded): every CPU backend equals the reference, and the
region family's invariants hold on random shapes, class counts, dtypes, options and targets."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lmfloss_kernels as lk
from lmfloss_kernels import reference

BACKENDS = [name for name in ("cpu", "triton") if name in lk.available_backends("cpu")]
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def region_case(draw):
    num_classes = draw(st.integers(2, 5))
    spatial = tuple(draw(st.lists(st.integers(1, 7), min_size=1, max_size=3)))
    batch = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    logits = draw(st.sampled_from([1.0, 4.0, 12.0])) * torch.randn((batch, num_classes, *spatial), generator=generator)
    logits = logits.to(draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16])))
    soft = draw(st.booleans())
    ignore_index = None
    if soft:
        target = torch.softmax(2.0 * torch.randn(logits.shape, generator=generator), 1)
    else:
        target = torch.randint(0, num_classes, (batch, *spatial), generator=generator)
        if draw(st.booleans()):
            ignore_index = -1
            target[torch.rand(target.shape, generator=generator) < 0.3] = -1
    gamma = draw(st.floats(0.0, 1.0))
    options = {
        "delta": draw(st.floats(0.0, 1.0)),
        "focal_coef": draw(st.sampled_from([0.0, 0.5, 1.0])),
        "tversky_coef": draw(st.sampled_from([0.0, 0.5, 1.0])),
        "smooth_nr": 1e-6,
        "smooth_dr": 1e-6,
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
    return logits, target, vectors, options


def _value_and_grad(fn, logits, target, vectors, options):
    x = logits.clone().requires_grad_(True)
    value = fn(x, target, *vectors, **options)
    (grad,) = torch.autograd.grad(value.sum(), x)
    return value.detach(), grad


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


@SETTINGS
@given(region_case())
def test_backends_equal_reference(case):
    logits, target, vectors, options = case
    wide = _value_and_grad(reference.region_loss, logits.double(), target, [v.double() for v in vectors], options)
    same = _value_and_grad(reference.region_loss, logits, target, vectors, options)
    # Half-precision inputs are exact in float64; only the returned gradient is rounded to them.
    tol = 2e-5 if logits.dtype == torch.float32 else 1e-2
    for name in BACKENDS:
        backend = lk._backends.resolve_backend(name, logits)
        value, grad = _value_and_grad(backend.region_loss, logits, target, vectors, options)
        assert value.dtype == torch.float32 and grad.dtype == logits.dtype
        _assert_matches(name, (value, grad), same, wide, tol)


@SETTINGS
@given(region_case())
def test_invariants(case):
    logits, target, vectors, options = case
    value, grad = _value_and_grad(
        reference.region_loss, logits.double(), target, [v.double() for v in vectors], options
    )
    assert (value >= 0).all()
    # softmax: the gradient sums to zero over the classes at every voxel
    torch.testing.assert_close(grad.sum(1), torch.zeros_like(grad.sum(1)), rtol=0, atol=1e-10)
    if options["ignore_index"] is not None:
        ignored = (target == options["ignore_index"]).unsqueeze(1).expand_as(grad)
        assert (grad[ignored] == 0).all()


@SETTINGS
@given(region_case(), st.randoms(use_true_random=False))
def test_permuting_foreground_classes(case, rnd):
    """Same per-class settings on every foreground class: permuting them leaves the loss unchanged."""
    logits, target, vectors, options = case
    num_classes = logits.shape[1]
    order = [0, *rnd.sample(range(1, num_classes), num_classes - 1)]
    uniform = [torch.cat([v[:1], v[1:2].expand(num_classes - 1)]) for v in vectors]
    logits = logits.double()
    value = reference.region_loss(logits, target, *uniform, **options)
    if target.is_floating_point():
        moved = target[:, order]
    else:
        lookup = torch.tensor(order).argsort()
        moved = torch.where(target >= 0, lookup[target.clamp_min(0)], target)
    permuted = reference.region_loss(logits[:, order], moved, *uniform, **options)
    torch.testing.assert_close(permuted, value, rtol=1e-5, atol=1e-6)


@SETTINGS
@given(region_case())
def test_duplicating_the_batch_keeps_the_mean(case):
    logits, target, vectors, options = case
    # Without smoothing the Tversky index is a ratio of sums, unchanged when batch=True doubles them
    # (an index of 0 / 0 is NaN on both sides).
    options = {**options, "reduction": "mean", "smooth_nr": 0.0, "smooth_dr": 0.0}
    once = reference.region_loss(logits.double(), target, *vectors, **options)
    twice = reference.region_loss(
        torch.cat([logits, logits]).double(), torch.cat([target, target]), *vectors, **options
    )
    torch.testing.assert_close(twice, once, rtol=1e-9, atol=1e-12, equal_nan=True)


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
    labels = torch.randint(0, num_classes, shape[:1] + shape[2:], generator=generator)
    labels[torch.rand(labels.shape, generator=generator) < 0.2] = -100
    labels.view(-1)[0] = 0  # at least one row counts, so "mean" is defined
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
        "ignore_index": -100,
        "reduction": draw(st.sampled_from(["mean", "sum", "none"])),
    }
    if options["alpha"] == 0.0 and options["beta"] == 0.0:
        options["beta"] = 1.0
    return logits, labels, vectors, options


@SETTINGS
@given(row_case())
def test_row_backends_equal_reference(case):
    logits, labels, vectors, options = case
    wide = _value_and_grad(reference.row_loss, logits.double(), labels, [v.double() for v in vectors], options)
    same = _value_and_grad(reference.row_loss, logits, labels, vectors, options)
    tol = 2e-5 if logits.dtype == torch.float32 else 1e-2
    ignored = (labels == -100).unsqueeze(1).expand_as(wide[1])
    assert (wide[1][ignored] == 0).all()
    for name in BACKENDS:
        backend = lk._backends.resolve_backend(name, logits)
        value, grad = _value_and_grad(backend.row_loss, logits, labels, vectors, options)
        assert value.dtype == torch.float32 and grad.dtype == logits.dtype
        _assert_matches(name, (value, grad), same, wide, tol)
        assert (grad[ignored] == 0).all()
