"""Sigmoid (multi-label) mode and the Dice + CE / Dice + focal / sigmoid focal losses of the public API.

The reference backend against independent numpy float64 transcriptions (``numpy_losses``, gradients
by the complex step) and against torch's own formulas (``binary_cross_entropy_with_logits``,
``cross_entropy``, a torchvision-style sigmoid focal loss, a hand-written soft Dice); properties of
the mapping (one channel = two-channel softmax on ``(0, z)``, independent channels, target dtypes);
bad inputs; the criteria's state and repr. Fresh seeded random inputs of odd shapes.
"""

from __future__ import annotations

import zlib

import numpy as np
import numpy_losses as nl
import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

import lmfloss_kernels as lk
from lmfloss_kernels import functional as F


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


SHAPES = {"2d": (5, 7), "3d": (3, 4, 5)}


def _multi_hot(rng, shape, density=0.4):
    """A channels-first multi-hot map whose channels overlap (several 1s per voxel) and are sometimes empty."""
    return (rng.random(size=shape) < density).astype(np.float64)


def _inputs(seed, num_classes, spatial, batch=2, scale=1.5):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(batch, num_classes, *spatial)) * scale
    return logits, _multi_hot(rng, logits.shape), rng.integers(0, num_classes, size=(batch, *spatial))


def _value_grad(fn, logits, target, *, weights=None, dtype=torch.float64, **kwargs):
    x = torch.tensor(logits, dtype=dtype, requires_grad=True)
    value = fn(x, target, backend="reference", **kwargs)
    seed = torch.ones_like(value) if weights is None else torch.tensor(weights, dtype=value.dtype)
    (grad,) = torch.autograd.grad(value, x, seed)
    return value.detach().double().numpy(), grad.double().numpy()


def assert_close(actual, expected, rtol, what=""):
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(float(np.max(np.abs(expected))), 1e-300)
    error = float(np.max(np.abs(actual - expected)))
    assert error <= rtol * scale, f"{what}: max abs error {error:.3e} > {rtol:g} * {scale:.3e}"


def _alpha(num_classes):
    return [0.4 + 0.3 * c for c in range(num_classes)]


def _pos_weight(num_classes):
    return [2.0 - 0.5 * c for c in range(num_classes)]


# (id, function, keywords, numpy loss, numpy keywords, numpy activation is sigmoid); a callable
# keyword value is called with the number of classes. Sigmoid cases pass sigmoid=True.
CASES = [
    ("ufl_asym", F.unified_focal_loss, {"sigmoid": True}, nl.multilabel_unified_focal_loss, {}, True),
    (
        "ufl_sym_noclip",
        F.unified_focal_loss,
        {"sigmoid": True, "asymmetric": False, "weight": 0.3, "delta": 0.7, "gamma": 0.2, "clip": False},
        nl.multilabel_unified_focal_loss,
        {"asymmetric": False, "weight": 0.3, "delta": 0.7, "gamma": 0.2, "clip": False},
        True,
    ),
    (
        "ftl",
        F.focal_tversky_loss,
        {"sigmoid": True, "asymmetric": True},  # no background in sigmoid mode: every channel enhanced
        nl.multilabel_focal_tversky,
        {"delta": 0.7, "exponent": 0.25, "smooth": 1e-7, "clip": True},
        True,
    ),
    (
        "sym_focal",
        F.symmetric_focal_loss,
        {"sigmoid": True, "delta": 0.6, "gamma": 1.5},
        nl.multilabel_focal_loss,
        {"pos_weight": 0.6, "pos_gamma": 1.5, "neg_weight": 0.4, "neg_gamma": 1.5, "clip": True},
        True,
    ),
    (
        "asym_focal",
        F.asymmetric_focal_loss,
        {"sigmoid": True},
        nl.multilabel_focal_loss,
        {"pos_weight": 0.7, "pos_gamma": 0.0, "neg_weight": 0.3, "neg_gamma": 2.0, "clip": True},
        True,
    ),
    (
        "mixed",
        F.mixed_focal_loss,
        {"sigmoid": True, "weight": 0.4, "alpha": _alpha, "beta": 0.3},
        nl.multilabel_mixed_focal_loss,
        {"weight": 0.4, "alpha": _alpha, "beta": 0.3},
        True,
    ),
    (
        "tversky",
        F.tversky_loss,
        {"sigmoid": True, "delta": 0.3},
        nl.multilabel_focal_tversky,
        {"delta": 0.3, "exponent": 1.0, "smooth": 1e-6, "clip": False},
        True,
    ),
    (
        "dice",
        F.dice_loss,
        {"sigmoid": True},
        nl.multilabel_focal_tversky,
        {"delta": 0.5, "exponent": 1.0, "smooth": 1e-6, "clip": False},
        True,
    ),
    ("dice_bce", F.dice_ce_loss, {"sigmoid": True}, nl.dice_ce_loss, {"sigmoid": True}, True),
    (
        "dice_bce_weighted",
        F.dice_ce_loss,
        {"sigmoid": True, "lambda_dice": 0.7, "lambda_ce": 1.3, "smooth": 0.5, "weight": _alpha},
        nl.dice_ce_loss,
        {"sigmoid": True, "lambda_dice": 0.7, "lambda_ce": 1.3, "smooth": 0.5, "weight": _alpha},
        True,
    ),
    (
        "dice_bce_pos_weight_nobg",
        F.dice_ce_loss,
        {"sigmoid": True, "pos_weight": _pos_weight, "include_background": False},
        nl.dice_ce_loss,
        {"sigmoid": True, "pos_weight": _pos_weight, "include_background": False},
        True,
    ),
    (
        "dice_focal_sigmoid",
        F.dice_focal_loss,
        {"sigmoid": True, "alpha": 0.25, "gamma": 1.5, "lambda_focal": 2.0},
        nl.dice_focal_loss,
        {"sigmoid": True, "alpha": 0.25, "gamma": 1.5, "lambda_focal": 2.0},
        True,
    ),
    (
        "sigmoid_focal",
        F.sigmoid_focal_loss,
        {},
        nl.torchvision_sigmoid_focal_loss,
        {},
        True,
    ),
    (
        "sigmoid_focal_no_alpha",
        F.sigmoid_focal_loss,
        {"alpha": None, "gamma": 0.5},
        nl.torchvision_sigmoid_focal_loss,
        {"alpha": None, "gamma": 0.5},
        True,
    ),
    ("dice_ce", F.dice_ce_loss, {}, nl.dice_ce_loss, {"sigmoid": False}, False),
    (
        "dice_ce_weighted_nobg",
        F.dice_ce_loss,
        {"weight": _alpha, "include_background": False, "lambda_dice": 0.5, "smooth": 1e-3},
        nl.dice_ce_loss,
        {"sigmoid": False, "weight": _alpha, "include_background": False, "lambda_dice": 0.5, "smooth": 1e-3},
        False,
    ),
    (
        "dice_focal",
        F.dice_focal_loss,
        {"alpha": _alpha, "gamma": 1.5},
        nl.dice_focal_loss,
        {"sigmoid": False, "alpha": _alpha, "gamma": 1.5},
        False,
    ),
]
CASE_IDS = [case[0] for case in CASES]
SIGMOID_IDS = [case[0] for case in CASES if case[5]]


def _case(case_id, num_classes):
    _, fn, kwargs, np_loss, np_kwargs, use_sigmoid = next(case for case in CASES if case[0] == case_id)
    resolve = lambda kw: {k: (v(num_classes) if callable(v) else v) for k, v in kw.items()}  # noqa: E731
    return fn, resolve(kwargs), np_loss, resolve(np_kwargs), use_sigmoid


# One channel: sigmoid cases only, and not those that drop channel 0 (include_background=False).
ONE_CHANNEL_IDS = [case[0] for case in CASES if case[5] and case[2].get("include_background", True)]


@pytest.mark.parametrize(
    "case_id, num_classes", [(case_id, 3) for case_id in CASE_IDS] + [(case_id, 1) for case_id in ONE_CHANNEL_IDS]
)
@pytest.mark.parametrize("dim", ["2d", "3d"])
def test_value_and_gradient_match_numpy_float64(case_id, dim, num_classes):
    fn, kwargs, np_loss, np_kwargs, use_sigmoid = _case(case_id, num_classes)
    logits, multi_hot, labels = _inputs(zlib.crc32(f"{case_id}-{dim}-{num_classes}".encode()), num_classes, SHAPES[dim])
    dense = multi_hot if use_sigmoid else np.moveaxis(nl.one_hot(labels, num_classes), -1, 1)
    value, grad = _value_grad(fn, logits, torch.tensor(dense), **kwargs)

    def numpy_loss(z):
        return nl.probabilities_on_logits(np_loss, z, use_sigmoid=use_sigmoid, dense_target=dense, **np_kwargs)

    assert_close(value, numpy_loss(logits), 1e-12)
    assert_close(grad, nl.complex_step_grad(numpy_loss, logits), 1e-10)


@pytest.mark.parametrize("case_id", CASE_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_label_maps_ignore_index_and_reductions_match_numpy(case_id, reduction):
    """Label maps are read as one-hot in both modes; ignored voxels do not exist for the loss."""
    fn, kwargs, np_loss, np_kwargs, use_sigmoid = _case(case_id, 3)
    logits, _, labels = _inputs(zlib.crc32(case_id.encode()), 3, (3, 5), batch=3)
    labels[np.random.default_rng(1).random(labels.shape) < 0.3] = 255
    labels[2, 0] = 255  # images with different numbers of valid voxels
    if fn is F.sigmoid_focal_loss and reduction == "sum":
        with pytest.raises(ValueError, match="ignore_index=255 supports reduction 'mean' or 'none', got 'sum'"):
            fn(torch.tensor(logits), torch.tensor(labels), ignore_index=255, reduction="sum")
        return
    weights = np.array([0.7, -1.3, 2.1]) if reduction == "none" else None
    target = torch.tensor(labels).to(torch.uint8)
    value, grad = _value_grad(fn, logits, target, weights=weights, ignore_index=255, reduction=reduction, **kwargs)

    def numpy_loss(z):
        out = nl.probabilities_on_logits(
            np_loss, z, labels, use_sigmoid=use_sigmoid, ignore_index=255, reduction=reduction, **np_kwargs
        )
        return out @ weights if reduction == "none" else out

    expected = nl.probabilities_on_logits(
        np_loss, logits, labels, use_sigmoid=use_sigmoid, ignore_index=255, reduction=reduction, **np_kwargs
    )
    assert value.shape == ((3,) if reduction == "none" else ())
    assert_close(value, expected, 1e-12)
    assert_close(grad, nl.complex_step_grad(numpy_loss, logits), 1e-10)


@pytest.mark.parametrize("case_id", SIGMOID_IDS)
def test_float32_matches_numpy(case_id):
    fn, kwargs, np_loss, np_kwargs, _ = _case(case_id, 3)
    logits, multi_hot, _ = _inputs(17, 3, (3, 4, 5))
    logits = logits.astype(np.float32).astype(np.float64)  # the exact float32 inputs
    value, grad = _value_grad(fn, logits, torch.tensor(multi_hot, dtype=torch.float32), dtype=torch.float32, **kwargs)

    def numpy_loss(z):
        return nl.probabilities_on_logits(np_loss, z, use_sigmoid=True, dense_target=multi_hot, **np_kwargs)

    np.testing.assert_allclose(value, numpy_loss(logits), rtol=1e-5)
    expected_grad = nl.complex_step_grad(numpy_loss, logits)
    assert np.linalg.norm(grad - expected_grad) <= 1e-5 * np.linalg.norm(expected_grad)


# Randomised shapes, targets and hyper-parameters (hypothesis, derandomised)


@st.composite
def _multi_label_problem(draw):
    batch = draw(st.integers(1, 3))
    num_classes = draw(st.integers(1, 5))
    spatial = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    logits = rng.normal(size=(batch, num_classes, *spatial)) * draw(st.floats(0.1, 3.0))
    target = rng.random(size=logits.shape)  # soft multi-label targets
    if draw(st.booleans()):
        target = (target < draw(st.floats(0.0, 1.0))).astype(np.float64)  # multi-hot, sometimes all 0 or all 1
    return logits, target


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    problem=_multi_label_problem(),
    weight=st.one_of(st.none(), st.floats(0.0, 1.0)),
    delta=st.floats(0.05, 0.95),
    gamma=st.floats(0.0, 1.0),
    asymmetric=st.booleans(),
    clip=st.booleans(),
)
def test_random_sigmoid_unified_focal_problems_match_numpy(problem, weight, delta, gamma, asymmetric, clip):
    logits, target = problem
    options = {"weight": weight, "delta": delta, "gamma": gamma, "asymmetric": asymmetric, "clip": clip}
    value = F.unified_focal_loss(
        torch.tensor(logits), torch.tensor(target), sigmoid=True, reduction="none", backend="reference", **options
    )
    expected = nl.probabilities_on_logits(
        nl.multilabel_unified_focal_loss, logits, use_sigmoid=True, dense_target=target, reduction="none", **options
    )
    np.testing.assert_allclose(value.numpy(), expected, rtol=1e-11, atol=1e-14)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    problem=_multi_label_problem(),
    lambdas=st.tuples(st.floats(0.0, 2.0), st.floats(0.1, 2.0)),
    smooth=st.floats(0.0, 1.0),
    gamma=st.floats(0.0, 3.0),
    alpha=st.one_of(st.none(), st.floats(0.0, 1.0)),
)
def test_random_dice_focal_and_dice_bce_problems_match_numpy(problem, lambdas, smooth, gamma, alpha):
    logits, target = problem
    if smooth == 0.0:
        smooth = 1e-5  # an all-empty channel with no smoothing is 0 / 0 in both
    lambda_dice, lambda_ce = lambdas
    common = {"lambda_dice": lambda_dice, "smooth": smooth}
    x, y = torch.tensor(logits), torch.tensor(target)
    focal = F.dice_focal_loss(
        x, y, sigmoid=True, gamma=gamma, alpha=alpha, lambda_focal=lambda_ce, reduction="none", backend="reference",
        **common,
    )  # fmt: skip
    bce = F.dice_ce_loss(x, y, sigmoid=True, lambda_ce=lambda_ce, reduction="none", backend="reference", **common)
    expected_bce = nl.probabilities_on_logits(
        nl.dice_ce_loss, logits, use_sigmoid=True, dense_target=target, reduction="none", sigmoid=True,
        lambda_ce=lambda_ce, **common,
    )  # fmt: skip
    np.testing.assert_allclose(bce.numpy(), expected_bce, rtol=1e-11, atol=1e-14)
    # Soft targets: each side weighed on its own (torchvision's alpha_t, p_t agree on 0/1 targets only).
    positive, negative = (1.0, 1.0) if alpha is None else (alpha, 1 - alpha)
    expected_focal = nl.probabilities_on_logits(
        lambda y_true, y_pred: lambda_dice * np.mean(nl.soft_dice_per_class(y_true, y_pred, smooth))
        + lambda_ce * nl.multilabel_focal_loss(y_true, y_pred, positive, gamma, negative, gamma, clip=False)
        / y_true.shape[-1],
        logits, use_sigmoid=True, dense_target=target, reduction="none",
    )  # fmt: skip
    np.testing.assert_allclose(focal.numpy(), expected_focal, rtol=1e-11, atol=1e-14)
    binary = target.round()
    focal = F.dice_focal_loss(
        x, torch.tensor(binary), sigmoid=True, gamma=gamma, alpha=alpha, lambda_focal=lambda_ce, reduction="none",
        backend="reference", **common,
    )  # fmt: skip
    expected_torchvision = nl.probabilities_on_logits(
        nl.dice_focal_loss, logits, use_sigmoid=True, dense_target=binary, reduction="none", sigmoid=True,
        gamma=gamma, alpha=alpha, lambda_focal=lambda_ce, **common,
    )  # fmt: skip
    np.testing.assert_allclose(focal.numpy(), expected_torchvision, rtol=1e-11, atol=1e-14)


# ------------------------------------------------------------------------------------------------
# Against torch's own formulas


def _torch_inputs(seed, shape=(2, 3, 5, 6), dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=generator, dtype=dtype) * 2).requires_grad_(True)
    multi_hot = torch.rand(shape, generator=generator) < 0.35
    labels = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=generator)
    return logits, multi_hot, labels


def _grads(a, b, x):
    return torch.autograd.grad(a, x, retain_graph=True)[0], torch.autograd.grad(b, x)[0]


def _hand_dice(probs, y, smooth, kept=slice(None), batch=False):
    dims = tuple(range(2, probs.dim()))
    if batch:
        dims = (0, *dims)
    tp = (probs * y).sum(dims)
    dice = 1 - (2 * tp + smooth) / (probs.sum(dims) + y.sum(dims) + smooth)
    return dice[..., kept].mean()


def _torchvision_focal(logits, y, alpha, gamma):
    """torchvision.ops.sigmoid_focal_loss, written out (torchvision is not a dependency)."""
    p = torch.sigmoid(logits)
    ce = TF.binary_cross_entropy_with_logits(logits, y, reduction="none")
    p_t = p * y + (1 - p) * (1 - y)
    loss = ce * (1 - p_t) ** gamma
    if alpha is not None:
        loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
    return loss


def test_dice_bce_ce_term_is_binary_cross_entropy_with_logits():
    x, y, _ = _torch_inputs(1)
    weight = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    pos_weight = torch.tensor([3.0, 1.0, 0.25], dtype=torch.float64)
    ours = F.dice_ce_loss(
        x, y, sigmoid=True, lambda_dice=0.0, weight=weight, pos_weight=pos_weight, backend="reference"
    )
    torch_bce = TF.binary_cross_entropy_with_logits(
        x, y.double(), weight=weight.view(1, 3, 1, 1), pos_weight=pos_weight.view(1, 3, 1, 1)
    )
    torch.testing.assert_close(ours, torch_bce, rtol=1e-12, atol=0)
    ours_grad, torch_grad = _grads(ours, torch_bce, x)
    torch.testing.assert_close(ours_grad, torch_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("target_kind", ["labels", "one_hot", "soft"])
def test_dice_ce_ce_term_is_cross_entropy(target_kind):
    x, _, labels = _torch_inputs(2)
    weight = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    if target_kind == "labels":
        target, torch_target, torch_weight = labels, labels, None  # torch's class-index "mean" divides by sum w
    else:
        probs = TF.one_hot(labels, 3).movedim(-1, 1).double()
        if target_kind == "soft":
            probs = torch.softmax(torch.randn_like(probs) * 2, dim=1)
        target, torch_target, torch_weight = probs, probs, weight
    ours = F.dice_ce_loss(
        x, target, lambda_dice=0.0, weight=None if torch_weight is None else weight, backend="reference"
    )
    expected = TF.cross_entropy(x, torch_target, weight=torch_weight)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=0)
    ours_grad, expected_grad = _grads(ours, expected, x)
    torch.testing.assert_close(ours_grad, expected_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("sigmoid", [False, True])
@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("batch", [False, True])
def test_dice_term_is_the_hand_written_soft_dice(sigmoid, include_background, batch):
    x, y, labels = _torch_inputs(3)
    target = y if sigmoid else labels
    y_dense = y.double() if sigmoid else TF.one_hot(labels, 3).movedim(-1, 1).double()
    kept = slice(None) if include_background else slice(1, None)
    for smooth in (1e-5, 0.7):
        probs = torch.sigmoid(x) if sigmoid else torch.softmax(x, 1)
        ours = F.dice_ce_loss(
            x, target, sigmoid=sigmoid, lambda_ce=0.0, smooth=smooth, include_background=include_background,
            batch=batch, backend="reference",
        )  # fmt: skip
        expected = _hand_dice(probs, y_dense, smooth, kept, batch)
        torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-15)
        ours_grad, expected_grad = _grads(ours, expected, x)
        torch.testing.assert_close(ours_grad, expected_grad, rtol=1e-10, atol=1e-15)


def test_dice_ce_is_the_sum_of_its_terms_with_the_lambdas():
    x, y, labels = _torch_inputs(4)
    for sigmoid, target in ((False, labels), (True, y)):
        probs = torch.sigmoid(x) if sigmoid else torch.softmax(x, 1)
        y_dense = y.double() if sigmoid else TF.one_hot(labels, 3).movedim(-1, 1).double()
        ce = TF.binary_cross_entropy_with_logits(x, y_dense) if sigmoid else TF.cross_entropy(x, labels)
        ours = F.dice_ce_loss(x, target, sigmoid=sigmoid, lambda_dice=0.3, lambda_ce=1.7, backend="reference")
        torch.testing.assert_close(ours, 0.3 * _hand_dice(probs, y_dense, 1e-5) + 1.7 * ce, rtol=1e-12, atol=0)


@pytest.mark.parametrize("alpha", [0.25, 0.8, None])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_sigmoid_focal_loss_is_torchvisions(alpha, gamma, reduction):
    x, y, _ = _torch_inputs(5, shape=(3, 2, 4, 5, 3))
    ours = F.sigmoid_focal_loss(x, y, alpha=alpha, gamma=gamma, reduction=reduction, backend="reference")
    elements = _torchvision_focal(x, y.double(), alpha, gamma)
    expected = {
        "mean": elements.mean(),
        "sum": elements.sum(),
        "none": elements.flatten(1).mean(1),
    }[reduction]
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=0)
    seed = torch.linspace(-1, 2, 3, dtype=torch.float64) if reduction == "none" else torch.ones(())
    ours_grad = torch.autograd.grad(ours, x, seed.to(ours.dtype), retain_graph=True)[0]
    expected_grad = torch.autograd.grad(expected, x, seed.to(expected.dtype))[0]
    torch.testing.assert_close(ours_grad, expected_grad, rtol=1e-10, atol=1e-15)


def test_sigmoid_focal_with_gamma_0_and_no_alpha_is_bce_with_logits():
    x, y, _ = _torch_inputs(6)
    ours = F.sigmoid_focal_loss(x, y, alpha=None, gamma=0.0, backend="reference")
    torch.testing.assert_close(ours, TF.binary_cross_entropy_with_logits(x, y.double()), rtol=1e-12, atol=0)


def test_sigmoid_focal_takes_detection_scores_as_one_voxel_images():
    x, y, _ = _torch_inputs(7, shape=(9, 4))
    ours = F.sigmoid_focal_loss(x.unsqueeze(-1), y.unsqueeze(-1), reduction="sum", backend="reference")
    torch.testing.assert_close(ours, _torchvision_focal(x, y.double(), 0.25, 2.0).sum(), rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------------
# Properties of the mapping


@pytest.mark.parametrize(
    "fn, kwargs",
    [
        (F.asymmetric_focal_loss, {"delta": 0.65, "gamma": 1.5}),
        (F.symmetric_focal_loss, {"delta": 0.35, "gamma": 0.7}),
        (F.unified_focal_loss, {"weight": 0.0}),  # the focal part only
        (F.unified_focal_loss, {"weight": 0.0, "asymmetric": False, "clip": False}),
        (F.mixed_focal_loss, {"weight": 0.0, "beta": 0.3, "gamma_f": 1.2}),
        (F.dice_focal_loss, {"lambda_dice": 0.0, "gamma": 1.3}),
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_one_channel_sigmoid_focal_part_is_two_channel_softmax_on_zero_and_z(fn, kwargs, reduction):
    z, y, _ = _torch_inputs(8, shape=(3, 1, 4, 6))
    ours = fn(z, y, sigmoid=True, reduction=reduction, backend="reference", **kwargs)
    two = torch.cat([torch.zeros_like(z), z], dim=1)
    softmax = fn(two, y[:, 0].long(), reduction=reduction, backend="reference", **kwargs)
    torch.testing.assert_close(ours, softmax, rtol=1e-12, atol=1e-15)
    weights = torch.linspace(0.5, 1.5, ours.numel(), dtype=ours.dtype).reshape(ours.shape)
    ours_grad = torch.autograd.grad(ours, z, weights, retain_graph=True)[0]
    softmax_grad = torch.autograd.grad(softmax, z, weights)[0]
    torch.testing.assert_close(ours_grad, softmax_grad, rtol=1e-10, atol=1e-15)


def test_dice_focal_with_gamma_0_is_dice_ce_in_both_modes():
    x, y, labels = _torch_inputs(9)
    for sigmoid, target in ((False, labels), (True, y)):
        focal = F.dice_focal_loss(x, target, sigmoid=sigmoid, gamma=0.0, backend="reference")
        ce = F.dice_ce_loss(x, target, sigmoid=sigmoid, backend="reference")
        torch.testing.assert_close(focal, ce, rtol=1e-13, atol=0)


def test_symmetric_focal_with_alpha_delta_is_c_times_sigmoid_focal():
    x, y, _ = _torch_inputs(10)
    sym = F.symmetric_focal_loss(x, y, sigmoid=True, delta=0.3, gamma=1.5, clip=False, backend="reference")
    focal = F.sigmoid_focal_loss(x, y, alpha=0.3, gamma=1.5, backend="reference")
    torch.testing.assert_close(sym, 3 * focal, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "fn, kwargs, combine",
    [
        (F.dice_ce_loss, {"sigmoid": True}, "mean"),
        (F.dice_focal_loss, {"sigmoid": True, "alpha": 0.4}, "mean"),
        (F.sigmoid_focal_loss, {}, "mean"),
        (F.tversky_loss, {"sigmoid": True}, "mean"),
        (F.focal_tversky_loss, {"sigmoid": True}, "mean"),
        (F.asymmetric_focal_loss, {"sigmoid": True}, "sum"),
        (F.unified_focal_loss, {"sigmoid": True, "weight": 0.0}, "sum"),
    ],
)
def test_overlapping_channels_are_independent_binary_problems(fn, kwargs, combine):
    """A multi-hot loss over C overlapping channels is the mean (Dice-like, element means) or the sum
    (voxel means summed over channels) of the C one-channel losses, each channel's gradient its own."""
    x, y, _ = _torch_inputs(11, shape=(2, 4, 5, 3))
    y[:, 1] = y[:, 0]  # identical (fully overlapping) channels
    y[:, 2] |= y[:, 3]  # a region containing another
    whole = fn(x, y, backend="reference", **kwargs)
    whole_grad = torch.autograd.grad(whole, x)[0]
    parts, part_grads = [], []
    for c in range(4):
        xc = x.detach()[:, c : c + 1].clone().requires_grad_(True)
        part = fn(xc, y[:, c : c + 1], backend="reference", **kwargs)
        parts.append(part)
        part_grads.append(torch.autograd.grad(part, xc)[0])
    scale = 1 / 4 if combine == "mean" else 1.0
    torch.testing.assert_close(whole, scale * torch.stack(parts).sum(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(whole_grad, scale * torch.cat(part_grads, 1), rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize(
    "fn, kwargs",
    [
        (F.dice_ce_loss, {"sigmoid": True}),
        (F.dice_focal_loss, {"sigmoid": True}),
        (F.sigmoid_focal_loss, {}),
        (F.unified_focal_loss, {"sigmoid": True}),
        (F.mixed_focal_loss, {"sigmoid": True}),
        (F.dice_loss, {"sigmoid": True}),
    ],
)
def test_bool_uint8_integer_and_float_multi_hot_targets_agree(fn, kwargs):
    x, y, _ = _torch_inputs(12, shape=(2, 3, 4, 5))
    values = {}
    for name, target in {
        "bool": y,
        "uint8": y.to(torch.uint8),
        "int64": y.long(),
        "float32": y.float(),
        "float64": y.double(),
    }.items():
        value = fn(x, target, backend="reference", **kwargs)
        values[name] = (value.detach(), torch.autograd.grad(value, x)[0])
    for name, (value, grad) in values.items():
        torch.testing.assert_close(value, values["float64"][0], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(grad, values["float64"][1], rtol=0, atol=0, msg=name)


def test_one_channel_sigmoid_tversky_is_not_the_softmax_one():
    """The documented difference: softmax's two-channel Tversky term also averages the background's."""
    z, y, _ = _torch_inputs(13, shape=(2, 1, 5, 5))
    ours = F.tversky_loss(z, y, sigmoid=True, backend="reference")
    softmax = F.tversky_loss(torch.cat([torch.zeros_like(z), z], 1), y[:, 0].long(), backend="reference")
    assert abs(float(ours.detach() - softmax.detach())) > 1e-3


def test_sum_reduction_adds_the_dropped_background_constant_per_image():
    x, _, labels = _torch_inputs(14)
    kwargs = {"include_background": False, "backend": "reference"}
    none = F.dice_ce_loss(x, labels, reduction="none", **kwargs)
    torch.testing.assert_close(F.dice_ce_loss(x, labels, reduction="sum", **kwargs), none.sum(), rtol=1e-13, atol=0)
    torch.testing.assert_close(F.dice_ce_loss(x, labels, reduction="mean", **kwargs), none.mean(), rtol=1e-13, atol=0)


# ------------------------------------------------------------------------------------------------
# Bad input


X3 = torch.randn(2, 3, 4, 5)
Y3 = torch.rand(2, 3, 4, 5) < 0.5
L3 = torch.randint(0, 3, (2, 4, 5))


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: F.dice_loss(X3, Y3, sigmoid=1), TypeError, "sigmoid must be a bool, got int: 1"),
        (lambda: F.dice_ce_loss(X3, L3, sigmoid="yes"), TypeError, "sigmoid must be a bool"),
        (lambda: F.dice_ce_loss(X3, L3, pos_weight=[1, 2, 3]), ValueError, "pos_weight applies to sigmoid=True only"),
        (lambda: F.dice_ce_loss(X3, Y3, sigmoid=True, pos_weight=[1, 2]), ValueError, r"pos_weight must have one entry per class \(3\)"),  # noqa: E501
        (lambda: F.dice_ce_loss(X3, L3, weight=[1, -2, 3]), ValueError, r"weight must be non-negative, got \[1.0, -2.0, 3.0\]"),  # noqa: E501
        (lambda: F.dice_ce_loss(X3, L3, weight=torch.tensor([1.0, -2, 3])), ValueError, "weight must be non-negative"),
        (lambda: F.dice_ce_loss(X3, L3, lambda_dice=0, lambda_ce=0), ValueError, "lambda_dice and lambda_ce must not both be 0"),  # noqa: E501
        (lambda: F.dice_ce_loss(X3, L3, lambda_ce=-1), ValueError, r"lambda_ce must be in \[0, inf\), got -1"),
        (lambda: F.dice_ce_loss(X3, L3, smooth=-1e-5), ValueError, r"smooth must be in \[0, inf\)"),
        (lambda: F.dice_ce_loss(X3, L3, include_background=0), TypeError, "include_background must be a bool"),
        (lambda: F.dice_ce_loss(X3[:, :1], Y3[:, :1], sigmoid=True, include_background=False), ValueError, "include_background=False drops channel 0"),  # noqa: E501
        (lambda: F.dice_ce_loss(X3, L3, include_background=False, dist_sync=True, reduction="sum"), ValueError, "include_background=False with dist_sync=True supports reduction 'mean' or 'none', got 'sum'"),  # noqa: E501
        (lambda: F.dice_ce_loss(X3, L3, reduction="avg"), ValueError, "reduction must be one of"),
        (lambda: F.dice_ce_loss(X3[:, :1], Y3[:, :1]), ValueError, "logits must have at least 2 classes on dim 1"),
        (lambda: F.dice_focal_loss(X3, L3, alpha=0.25), TypeError, "alpha must be None or one weight per class with sigmoid=False"),  # noqa: E501
        (lambda: F.dice_focal_loss(X3, Y3, sigmoid=True, alpha=[0.2, 0.3, 0.4]), TypeError, r"alpha must be None or a number in \[0, 1\]"),  # noqa: E501
        (lambda: F.dice_focal_loss(X3, Y3, sigmoid=True, alpha=1.5), ValueError, r"alpha must be in \[0, 1\], got 1.5"),
        (lambda: F.dice_focal_loss(X3, Y3, sigmoid=True, gamma=-1), ValueError, r"gamma must be in \[0, inf\), got -1"),
        (lambda: F.dice_focal_loss(X3, L3, lambda_dice=0, lambda_focal=0), ValueError, "lambda_dice and lambda_focal must not both be 0"),  # noqa: E501
        (lambda: F.sigmoid_focal_loss(X3, Y3, alpha=-0.1), ValueError, r"alpha must be in \[0, 1\], got -0.1"),
        (lambda: F.sigmoid_focal_loss(X3, Y3, alpha=True), TypeError, "alpha must be None or a number"),
        (lambda: F.sigmoid_focal_loss(X3, Y3, gamma="2"), TypeError, "gamma must be a real number"),
        (lambda: F.sigmoid_focal_loss(X3, Y3, reduction=None), ValueError, "reduction must be one of"),
        (lambda: F.sigmoid_focal_loss(X3, L3, ignore_index=-1, reduction="sum"), ValueError, "supports reduction 'mean' or 'none', got 'sum'"),  # noqa: E501
        (lambda: F.sigmoid_focal_loss(X3[:, :, 0, 0], Y3[:, :, 0, 0]), ValueError, "at least one spatial axis"),
        (lambda: F.sigmoid_focal_loss(X3, Y3.float() * 2), ValueError, r"target \(a one-hot / soft map\) must have every entry finite and in \[0, 1\]"),  # noqa: E501
        (lambda: F.sigmoid_focal_loss(X3, Y3, ignore_index=0), ValueError, "ignore_index=0 applies to integer label maps only"),  # noqa: E501
        (lambda: F.sigmoid_focal_loss(X3, L3 + 1), ValueError, r"target labels must be in \[0, 2\], got values in \[1, 3\]"),  # noqa: E501
        (lambda: F.unified_focal_loss(X3, Y3, sigmoid=True, gamma=1.5), ValueError, r"gamma must be in \[0, 1\]"),
        (lambda: F.mixed_focal_loss(X3, Y3, sigmoid=True, alpha=[1, 2]), ValueError, r"alpha must have one entry per class \(3\)"),  # noqa: E501
        (lambda: F.tversky_loss(X3[:, :0], Y3[:, :0], sigmoid=True), ValueError, "at least 1 classes on dim 1"),
    ],
)  # fmt: skip
def test_bad_input_names_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()


# ------------------------------------------------------------------------------------------------
# Criteria


@pytest.mark.parametrize(
    "module, function, kwargs",
    [
        (lk.DiceCELoss, F.dice_ce_loss, {"sigmoid": True, "weight": [1.0, 0.5, 2.0], "pos_weight": [2.0, 1.0, 0.5]}),
        (lk.DiceCELoss, F.dice_ce_loss, {"include_background": False, "weight": torch.tensor([1.0, 0.5, 2.0])}),
        (lk.DiceFocalLoss, F.dice_focal_loss, {"sigmoid": True, "alpha": 0.3, "gamma": 1.0}),
        (lk.DiceFocalLoss, F.dice_focal_loss, {"alpha": [0.2, 0.5, 1.0], "batch": True}),
        (lk.SigmoidFocalLoss, F.sigmoid_focal_loss, {"alpha": None, "reduction": "sum"}),
        (lk.UnifiedFocalLoss, F.unified_focal_loss, {"sigmoid": True, "asymmetric": False}),
        (lk.FocalTverskyLoss, F.focal_tversky_loss, {"sigmoid": True}),
        (lk.SymmetricFocalLoss, F.symmetric_focal_loss, {"sigmoid": True}),
        (lk.AsymmetricFocalLoss, F.asymmetric_focal_loss, {"sigmoid": True}),
        (lk.MixedFocalLoss, F.mixed_focal_loss, {"sigmoid": True, "alpha": [1.0, 2.0, 3.0], "beta": 0.4}),
        (lk.TverskyLoss, F.tversky_loss, {"sigmoid": True}),
        (lk.DiceLoss, F.dice_loss, {"sigmoid": True}),
    ],
)
def test_criteria_equal_their_functions(module, function, kwargs):
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    target = Y3 if kwargs.get("sigmoid", module is lk.SigmoidFocalLoss) else L3
    criterion = module(**kwargs, backend="reference")
    torch.testing.assert_close(criterion(x, target), function(x, target, **kwargs, backend="reference"))
    if kwargs.get("sigmoid"):
        assert "sigmoid=True" in repr(criterion)


def test_criteria_keep_per_class_weights_as_fp32_buffers():
    criterion = lk.DiceCELoss(
        sigmoid=True, weight=[1.0, 0.5, 2.0], pos_weight=torch.tensor([2.0, 1.0, 0.5]), backend="reference"
    )
    assert sorted(criterion.state_dict()) == ["pos_weight", "weight"]
    criterion.to(torch.bfloat16)
    assert criterion.weight.dtype == torch.float64 and criterion.pos_weight.dtype == torch.float32
    assert "weight" not in repr(criterion).replace("pos_weight", "")
    focal = lk.DiceFocalLoss(alpha=[0.2, 0.5, 1.0])
    assert list(focal.state_dict()) == ["alpha"]
    scalar = lk.DiceFocalLoss(sigmoid=True, alpha=0.25)
    assert list(scalar.state_dict()) == [] and "alpha=0.25" in repr(scalar)
    loaded = lk.DiceCELoss(sigmoid=True, weight=[0.0, 0.0, 0.0], pos_weight=[0.0, 0.0, 0.0], backend="reference")
    loaded.load_state_dict(criterion.state_dict())
    x = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(loaded(x, Y3), criterion(x, Y3))


@pytest.mark.parametrize(
    "build, error, message",
    [
        (lambda: lk.DiceCELoss(pos_weight=[1.0, 2.0]), ValueError, "pos_weight applies to sigmoid=True only"),
        (lambda: lk.DiceCELoss(lambda_dice=0.0, lambda_ce=0.0), ValueError, "must not both be 0"),
        (lambda: lk.DiceCELoss(weight="balanced"), TypeError, "weight must be None, a tensor"),
        (lambda: lk.DiceFocalLoss(alpha=0.25), TypeError, "one weight per class with sigmoid=False"),
        (lambda: lk.DiceFocalLoss(sigmoid=True, alpha=2.0), ValueError, r"alpha must be in \[0, 1\]"),
        (lambda: lk.SigmoidFocalLoss(gamma=-0.5), ValueError, "gamma must be in"),
        (lambda: lk.UnifiedFocalLoss(sigmoid=None), TypeError, "sigmoid must be a bool"),
        (lambda: lk.DiceCELoss(backend="gpu"), ValueError, "backend must be one of"),
    ],
)
def test_criteria_check_their_keywords_when_built(build, error, message):
    with pytest.raises(error, match=message):
        build()


# ------------------------------------------------------------------------------------------------
# dist_sync: two gloo ranks give the single-process loss (the dropped-background constant included)

SYNC_SLICES = (slice(0, 1), slice(1, 3))  # unequal slices: a wrong image count shows
SYNC_CASES = {
    "dice_bce_nobg": (F.dice_ce_loss, {"sigmoid": True, "include_background": False, "pos_weight": [2.0, 1.0, 0.5]}),
    "dice_focal_nobg": (F.dice_focal_loss, {"include_background": False, "alpha": [0.5, 1.0, 2.0]}),
    "ufl_sigmoid": (F.unified_focal_loss, {"sigmoid": True}),
    "sigmoid_dice": (F.dice_loss, {"sigmoid": True}),
}


def _sync_inputs(name):
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    logits = 2.0 * torch.randn(3, 3, 4, 5, generator=generator, dtype=torch.float64)
    if SYNC_CASES[name][1].get("sigmoid"):
        return logits, torch.rand(logits.shape, generator=generator) < 0.4
    return logits, torch.randint(0, 3, (3, 4, 5), generator=generator)


def _sync_run(name, logits, target, batch, reduction, **extra):
    fn, kwargs = SYNC_CASES[name]
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, target, batch=batch, reduction=reduction, backend="reference", **kwargs, **extra)
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype) if loss.dim() else torch.ones_like(loss)
    loss.backward(upstream)
    return loss.detach(), x.grad


def _sync_worker(rank: int, port: int, out_dir: str) -> None:
    import datetime
    import os

    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
    )
    torch.set_num_threads(1)
    results = {}
    try:
        for name in SYNC_CASES:
            logits, target = _sync_inputs(name)
            part = SYNC_SLICES[rank]
            for batch in (False, True):
                results[name, batch] = _sync_run(name, logits[part], target[part], batch, "mean", dist_sync=True)
            results[name, "none"] = _sync_run(name, logits[part], target[part], False, "none", dist_sync=True)
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sync_results(tmp_path_factory):
    import os
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_dir = str(tmp_path_factory.mktemp("sigmoid_dist"))
    context = mp.start_processes(_sync_worker, args=(port, out_dir), nprocs=2, join=False, start_method="spawn")
    for _ in range(48):
        if context.join(timeout=5):
            break
    else:
        for process in context.processes:
            process.kill()
        pytest.fail("the two gloo ranks did not finish within 240 s")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]


@pytest.mark.parametrize("name", list(SYNC_CASES))
@pytest.mark.parametrize("mode", [False, True, "none"], ids=["mean", "mean_batch", "none"])
def test_dist_sync_ranks_equal_single_process(sync_results, name, mode):
    logits, target = _sync_inputs(name)
    batch, reduction = (False, "none") if mode == "none" else (mode, "mean")
    full_loss, _ = _sync_run(name, logits, target, batch, reduction)
    # The gradient each rank computes is the global loss's, with its own upstream weights.
    upstream = (
        torch.cat([torch.linspace(0.5, 1.5, s.stop - s.start, dtype=torch.float64) for s in SYNC_SLICES])
        if reduction == "none"
        else torch.tensor(1.0, dtype=torch.float64)
    )
    x = logits.detach().clone().requires_grad_(True)
    fn, kwargs = SYNC_CASES[name]
    fn(x, target, batch=batch, reduction=reduction, backend="reference", **kwargs).backward(upstream)
    for rank, part in enumerate(SYNC_SLICES):
        loss, grad = sync_results[rank][name, mode]
        torch.testing.assert_close(loss, full_loss[part] if reduction == "none" else full_loss, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad, x.grad[part], rtol=1e-10, atol=1e-14)
