"""Randomised Triton-vs-reference checks: shapes, class counts and options drawn by hypothesis."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from test_triton_helpers import DEVICE, INTERPRETER_WARNINGS, assert_fp32_accurate, loss_and_grad, random_grad_output

from lmfloss_kernels import reference
from lmfloss_kernels.triton import BACKEND

pytestmark = INTERPRETER_WARNINGS

# Derandomised (the same examples on every run) and without shrinking, which can take minutes
# of interpreter time; a failure reports the drawn example as it is.
_SETTINGS = settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

_shapes = st.tuples(
    st.integers(1, 2),
    st.integers(2, 7),
    st.lists(st.integers(1, 9), min_size=1, max_size=3),
).map(lambda t: (t[0], t[1], *t[2]))


def _check(reference_fn, fused_fn, logits, target, vectors, grad_output, options):
    truth = loss_and_grad(
        reference_fn, logits.double(), target, *(v.double() for v in vectors), grad_output=grad_output.double(),
        **options,
    )  # fmt: skip
    expected = loss_and_grad(reference_fn, logits, target, *vectors, grad_output=grad_output, **options)
    actual = loss_and_grad(fused_fn, logits, target, *vectors, grad_output=grad_output, **options)
    assert_fp32_accurate(actual[0], expected[0], truth[0], "loss")
    assert_fp32_accurate(actual[1], expected[1], truth[1], "gradient")


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


@_SETTINGS
@given(
    shape=_shapes,
    seed=st.integers(0, 2**31 - 1),
    kind=st.sampled_from(["labels", "ignore", "soft"]),
    terms=st.sampled_from([(0.5, 0.5), (1.0, 0.0), (0.0, 1.0), (0.2, 1.3)]),
    clip=st.booleans(),
    batch=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    delta=st.floats(0.0, 1.0),
    smooth=st.sampled_from([(1e-7, 1e-7), (1e-5, 1e-5), (0.0, 1e-6), (1.0, 1.0)]),
)
def test_region_random(shape, seed, kind, terms, clip, batch, reduction, delta, smooth):
    gen = _generator(seed)
    num_classes = shape[1]
    logits = torch.randn(shape, generator=gen, device=DEVICE) * 3
    label_shape = shape[:1] + shape[2:]
    ignore_index = None
    if kind == "soft":
        target = torch.softmax(torch.randn(shape, generator=gen, device=DEVICE), 1)
    else:
        target = torch.randint(0, num_classes, label_shape, generator=gen, device=DEVICE)
        if kind == "ignore":
            ignore_index = num_classes + 3
            drop = torch.rand(label_shape, generator=gen, device=DEVICE) < 0.25
            target = torch.where(drop, torch.full_like(target, ignore_index), target).to(torch.uint8)
    vectors = (
        torch.rand(num_classes, generator=gen, device=DEVICE) * 2,
        torch.rand(num_classes, generator=gen, device=DEVICE) * 3,
        torch.rand(num_classes, generator=gen, device=DEVICE) * 2 + 0.1,
    )
    options = dict(
        delta=delta, focal_coef=terms[0], tversky_coef=terms[1], smooth_nr=smooth[0], smooth_dr=smooth[1],
        eps=1e-7, clip=clip, batch=batch, ignore_index=ignore_index, reduction=reduction,
    )  # fmt: skip
    grad_output = random_grad_output((shape[0],) if reduction == "none" else ())
    _check(reference.region_loss, BACKEND.region_loss, logits, target, vectors, grad_output, options)


@_SETTINGS
@given(
    shape=st.one_of(st.tuples(st.integers(1, 70), st.integers(2, 40)), _shapes),
    seed=st.integers(0, 2**31 - 1),
    alpha=st.sampled_from([0.0, 1.0, 1.5]),
    beta=st.sampled_from([1.0, 0.5]),
    gamma=st.floats(0.0, 4.0),
    s=st.floats(1.0, 30.0),
    reduction=st.sampled_from(["mean", "sum", "none"]),
)
def test_row_random(shape, seed, alpha, beta, gamma, s, reduction):
    gen = _generator(seed)
    num_classes = shape[1]
    logits = torch.randn(shape, generator=gen, device=DEVICE) * 2
    label_shape = shape[:1] + shape[2:]
    labels = torch.randint(0, num_classes, label_shape, generator=gen, device=DEVICE)
    labels = torch.where(torch.rand(label_shape, generator=gen, device=DEVICE) < 0.2, -100, labels)
    labels.view(-1)[0] = 0  # at least one counted row, so "mean" is defined
    vectors = (
        torch.rand(num_classes, generator=gen, device=DEVICE) * 0.5,
        torch.rand(num_classes, generator=gen, device=DEVICE) + 0.1,
        torch.rand(num_classes, generator=gen, device=DEVICE) + 0.1,
    )
    options = dict(alpha=alpha, beta=beta, gamma=gamma, s=s, ignore_index=-100, reduction=reduction)
    grad_output = random_grad_output(label_shape if reduction == "none" else ())
    _check(reference.row_loss, BACKEND.row_loss, logits, labels, vectors, grad_output, options)
