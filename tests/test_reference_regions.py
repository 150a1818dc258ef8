"""Segmentation losses of the public API (backend="reference") against the numpy transcriptions.

Every named region loss (Unified Focal, focal Tversky, symmetric / asymmetric focal, Mixed
Focal, Tversky, Dice) is compared, value and logit gradient, with an independent numpy float64
implementation written in the authors' Keras style (``numpy_losses``), whose gradient comes
from the complex step. Inputs are fresh seeded random logits of odd 2D and 3D shapes.
"""

from __future__ import annotations

import zlib

import numpy as np
import numpy_losses as nl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmfloss_kernels import functional as F


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: with 2 OpenMP threads on a loaded 2-core machine each op waits milliseconds
    # for a descheduled worker; one thread is ~1000x faster here.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _alpha(num_classes):
    return [0.3 + 0.25 * c for c in range(num_classes)]


# (id, torch function, torch keywords, numpy loss, numpy keywords); a keyword value that is a
# callable is called with the number of classes.
REGION_CASES = [
    ("ufl_asym_defaults", F.unified_focal_loss, {}, nl.asym_unified_focal_loss, {}),
    (
        "ufl_sym",
        F.unified_focal_loss,
        {"asymmetric": False, "weight": 0.3, "delta": 0.7, "gamma": 0.2},
        nl.sym_unified_focal_loss,
        {"weight": 0.3, "delta": 0.7, "gamma": 0.2},
    ),
    (
        "ufl_asym_unweighted",
        F.unified_focal_loss,
        {"weight": None, "gamma": 0.8, "delta": 0.45},
        nl.asym_unified_focal_loss,
        {"weight": None, "gamma": 0.8, "delta": 0.45},
    ),
    ("ufl_asym_noclip", F.unified_focal_loss, {"clip": False}, nl.asym_unified_focal_loss, {"clip": False}),
    ("ufl_sym_eps", F.unified_focal_loss, {"asymmetric": False, "eps": 1e-3}, nl.sym_unified_focal_loss, {"eps": 1e-3}),
    ("ftl_sym_defaults", F.focal_tversky_loss, {}, nl.symmetric_focal_tversky_loss, {}),
    (
        "ftl_asym",
        F.focal_tversky_loss,
        {"asymmetric": True, "delta": 0.4, "gamma": 0.3},
        nl.asymmetric_focal_tversky_loss,
        {"delta": 0.4, "gamma": 0.3},
    ),
    ("sfl_defaults", F.symmetric_focal_loss, {}, nl.symmetric_focal_loss, {}),
    ("afl_defaults", F.asymmetric_focal_loss, {}, nl.asymmetric_focal_loss, {}),
    (
        "afl_gamma_half_noclip",
        F.asymmetric_focal_loss,
        {"gamma": 0.5, "delta": 0.55, "clip": False},
        nl.asymmetric_focal_loss,
        {"gamma": 0.5, "delta": 0.55, "clip": False},
    ),
    ("mixed_defaults", F.mixed_focal_loss, {}, nl.mixed_focal_loss, {}),
    (
        "mixed_weighted",
        F.mixed_focal_loss,
        {"weight": 0.4, "alpha": _alpha, "beta": 0.3, "delta": 0.6, "gamma_f": 1.5, "gamma_fd": 0.5, "smooth": 1e-4},
        nl.mixed_focal_loss,
        {"weight": 0.4, "alpha": _alpha, "beta": 0.3, "delta": 0.6, "gamma_f": 1.5, "gamma_fd": 0.5, "smooth": 1e-4},
    ),
    ("tversky_defaults", F.tversky_loss, {}, nl.tversky_loss, {}),
    (
        "tversky_clip",
        F.tversky_loss,
        {"clip": True, "delta": 0.3, "smooth": 1e-3},
        nl.tversky_loss,
        {"clip": True, "delta": 0.3, "smooth": 1e-3},
    ),
    ("dice_defaults", F.dice_loss, {}, nl.dice_loss, {}),
]
CASE_IDS = [case[0] for case in REGION_CASES]
SHAPES = {"2d": (3, 5), "3d": (2, 3, 5)}


def _resolve(kwargs, num_classes):
    return {k: (v(num_classes) if callable(v) else v) for k, v in kwargs.items()}


def _case(case_id):
    return next(case for case in REGION_CASES if case[0] == case_id)


def _inputs(seed, num_classes, spatial, batch=2, scale=1.5):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(batch, num_classes, *spatial)) * scale
    labels = rng.integers(0, num_classes, size=(batch, *spatial))
    return logits, labels


def _torch_value_grad(fn, logits, target, *, weights=None, dtype=torch.float64, **kwargs):
    """Loss and d(sum(weights * loss))/d(logits) through the public API on the reference backend."""
    x = torch.tensor(logits, dtype=dtype, requires_grad=True)
    value = fn(x, target, backend="reference", **kwargs)
    seed = torch.ones_like(value) if weights is None else torch.tensor(weights, dtype=value.dtype)
    (grad,) = torch.autograd.grad(value, x, seed)
    return value.detach().double().numpy(), grad.double().numpy()


def assert_close(actual, expected, rtol, what=""):
    """Elementwise agreement within ``rtol`` of the largest expected magnitude."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(float(np.max(np.abs(expected))), 1e-300)
    error = float(np.max(np.abs(actual - expected)))
    assert error <= rtol * scale, f"{what}: max abs error {error:.3e} > {rtol:g} * {scale:.3e}"


@pytest.mark.parametrize("case_id", CASE_IDS)
@pytest.mark.parametrize("dim", ["2d", "3d"])
@pytest.mark.parametrize("num_classes", [2, 3, 5])
def test_value_and_gradient_match_numpy_float64(case_id, dim, num_classes):
    _, fn, kwargs, np_loss, np_kwargs = _case(case_id)
    kwargs, np_kwargs = _resolve(kwargs, num_classes), _resolve(np_kwargs, num_classes)
    logits, labels = _inputs(zlib.crc32(f"{case_id}-{dim}-{num_classes}".encode()), num_classes, SHAPES[dim])
    value, grad = _torch_value_grad(fn, logits, torch.tensor(labels), **kwargs)

    expected = nl.keras_on_logits(np_loss, logits, labels, **np_kwargs)
    expected_grad = nl.complex_step_grad(lambda z: nl.keras_on_logits(np_loss, z, labels, **np_kwargs), logits)
    assert_close(value, expected, 1e-12)
    assert_close(grad, expected_grad, 1e-10)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_float32_matches_numpy(case_id):
    _, fn, kwargs, np_loss, np_kwargs = _case(case_id)
    kwargs, np_kwargs = _resolve(kwargs, 3), _resolve(np_kwargs, 3)
    logits, labels = _inputs(7, 3, (3, 4, 5))
    logits = logits.astype(np.float32).astype(np.float64)  # the exact float32 inputs
    value, grad = _torch_value_grad(fn, logits, torch.tensor(labels), dtype=torch.float32, **kwargs)
    expected = nl.keras_on_logits(np_loss, logits, labels, **np_kwargs)
    expected_grad = nl.complex_step_grad(lambda z: nl.keras_on_logits(np_loss, z, labels, **np_kwargs), logits)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    assert np.linalg.norm(grad - expected_grad) <= 1e-5 * np.linalg.norm(expected_grad)


def test_paper_defaults_equal_authors_binary_asym_unified_focal_loss():
    """unified_focal_loss() with no keywords = Keras asym_unified_focal_loss(weight=0.5, delta=0.6, gamma=0.5)."""
    rng = np.random.default_rng(11)
    logits = rng.normal(size=(3, 2, 9, 7)) * 2.0
    labels = (rng.random(size=(3, 9, 7)) < 0.15).astype(np.int64)  # a rare foreground, as in the paper
    y_true = nl.one_hot(labels, 2)
    y_pred = nl.softmax(nl.channels_last(logits), axis=-1)
    expected = nl.asym_unified_focal_loss(y_true, y_pred, weight=0.5, delta=0.6, gamma=0.5)
    value = F.unified_focal_loss(torch.tensor(logits), torch.tensor(labels), backend="reference")
    np.testing.assert_allclose(value.item(), expected, rtol=1e-12)
    sym = F.unified_focal_loss(torch.tensor(logits), torch.tensor(labels), asymmetric=False, backend="reference")
    np.testing.assert_allclose(sym.item(), nl.sym_unified_focal_loss(y_true, y_pred), rtol=1e-12)
    # The stand-alone component defaults are the authors' too.
    for fn, np_fn in [
        (F.focal_tversky_loss, nl.symmetric_focal_tversky_loss),
        (F.symmetric_focal_loss, nl.symmetric_focal_loss),
        (F.asymmetric_focal_loss, nl.asymmetric_focal_loss),
        (F.mixed_focal_loss, nl.mixed_focal_loss),
        (F.tversky_loss, nl.tversky_loss),
        (F.dice_loss, nl.dice_loss),
    ]:
        value = fn(torch.tensor(logits), torch.tensor(labels), backend="reference")
        np.testing.assert_allclose(value.item(), np_fn(y_true, y_pred), rtol=1e-12, err_msg=fn.__name__)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_label_map_forms_and_one_hot_agree(case_id):
    _, fn, kwargs, _, _ = _case(case_id)
    kwargs = _resolve(kwargs, 3)
    logits, labels = _inputs(3, 3, (3, 4, 5))
    labels_t = torch.tensor(labels)
    one_hot = torch.nn.functional.one_hot(labels_t, 3).movedim(-1, 1)
    targets = {
        "int64": labels_t,
        "int32": labels_t.int(),
        "int16": labels_t.short(),
        "uint8": labels_t.to(torch.uint8),
        "b1s": labels_t.unsqueeze(1).to(torch.uint8),
        "onehot64": one_hot.double(),
        "onehot32": one_hot.float(),
    }
    ref_value, ref_grad = _torch_value_grad(fn, logits, labels_t, **kwargs)
    for name, target in targets.items():
        value, grad = _torch_value_grad(fn, logits, target, **kwargs)
        assert_close(value, ref_value, 1e-14, name)
        assert_close(grad, ref_grad, 1e-13, name)


def test_bool_labels_are_binary_labels():
    logits, labels = _inputs(4, 2, (5, 6))
    labels_t = torch.tensor(labels)
    for fn in (F.unified_focal_loss, F.mixed_focal_loss, F.dice_loss):
        a = _torch_value_grad(fn, logits, labels_t)
        b = _torch_value_grad(fn, logits, labels_t.bool())
        assert_close(a[0], b[0], 1e-15)
        assert_close(a[1], b[1], 1e-15)


@pytest.mark.parametrize("case_id", ["ufl_asym_defaults", "ufl_sym", "mixed_weighted", "tversky_clip", "dice_defaults"])
def test_soft_targets_match_numpy(case_id):
    _, fn, kwargs, np_loss, np_kwargs = _case(case_id)
    kwargs, np_kwargs = _resolve(kwargs, 3), _resolve(np_kwargs, 3)
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(2, 3, 4, 5))
    soft = nl.softmax(rng.normal(size=(2, 3, 4, 5)) * 2, axis=1)  # a soft map summing to 1 per voxel
    value, grad = _torch_value_grad(fn, logits, torch.tensor(soft), **kwargs)
    expected = nl.keras_on_logits(np_loss, logits, soft_target=soft, **np_kwargs)
    expected_grad = nl.complex_step_grad(
        lambda z: nl.keras_on_logits(np_loss, z, soft_target=soft, **np_kwargs), logits
    )
    assert_close(value, expected, 1e-12)
    assert_close(grad, expected_grad, 1e-10)


@pytest.mark.parametrize("case_id", CASE_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ignore_index_and_reductions_match_numpy(case_id, reduction):
    """Ignored voxels do not exist for the loss: per image, only its valid voxels are summed and averaged."""
    _, fn, kwargs, np_loss, np_kwargs = _case(case_id)
    kwargs, np_kwargs = _resolve(kwargs, 3), _resolve(np_kwargs, 3)
    logits, labels = _inputs(9, 3, (3, 5), batch=3)
    labels[np.random.default_rng(1).random(labels.shape) < 0.3] = 255
    labels[2, 0] = 255  # images with different numbers of valid voxels
    target = torch.tensor(labels).to(torch.uint8)
    weights = np.array([0.7, -1.3, 2.1]) if reduction == "none" else None
    options = {"ignore_index": 255, "reduction": reduction, **kwargs}
    value, grad = _torch_value_grad(fn, logits, target, weights=weights, **options)

    def numpy_loss(z):
        out = nl.keras_on_logits(np_loss, z, labels, ignore_index=255, reduction=reduction, **np_kwargs)
        return out @ weights if reduction == "none" else out

    expected = nl.keras_on_logits(np_loss, logits, labels, ignore_index=255, reduction=reduction, **np_kwargs)
    assert value.shape == ((3,) if reduction == "none" else ())
    assert_close(value, expected, 1e-12)
    assert_close(grad, nl.complex_step_grad(numpy_loss, logits), 1e-10)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_ignored_voxels_have_zero_gradient_and_no_influence(case_id):
    _, fn, kwargs, _, _ = _case(case_id)
    kwargs = _resolve(kwargs, 4)
    logits, labels = _inputs(21, 4, (4, 3, 5))
    ignored = np.random.default_rng(2).random(labels.shape) < 0.25
    labels[ignored] = -1
    target = torch.tensor(labels)
    value, grad = _torch_value_grad(fn, logits, target, ignore_index=-1, **kwargs)
    mask = np.broadcast_to(ignored[:, None], logits.shape)
    assert np.all(grad[mask] == 0.0)
    assert np.any(grad[~mask] != 0.0)

    changed = logits.copy()
    changed[mask] = np.random.default_rng(3).normal(size=int(mask.sum())) * 10
    value2, grad2 = _torch_value_grad(fn, changed, target, ignore_index=-1, **kwargs)
    assert value2 == value
    np.testing.assert_array_equal(grad2[~mask], grad[~mask])


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_reductions_relate_as_documented(case_id):
    _, fn, kwargs, np_loss, np_kwargs = _case(case_id)
    kwargs, np_kwargs = _resolve(kwargs, 5), _resolve(np_kwargs, 5)
    logits, labels = _inputs(13, 5, (3, 7), batch=4)
    x = torch.tensor(logits)
    target = torch.tensor(labels)
    none = fn(x, target, reduction="none", backend="reference", **kwargs)
    assert none.shape == (4,)
    torch.testing.assert_close(fn(x, target, reduction="sum", backend="reference", **kwargs), none.sum())
    torch.testing.assert_close(fn(x, target, reduction="mean", backend="reference", **kwargs), none.mean())
    # "none" is the loss of each image on its own.
    for b in range(4):
        alone = nl.keras_on_logits(np_loss, logits[b : b + 1], labels[b : b + 1], **np_kwargs)
        np.testing.assert_allclose(none[b].item(), alone, rtol=1e-12)


BATCH_CASES = [
    ("ufl_asym", F.unified_focal_loss, {}, nl.asymmetric_focal_tversky_loss, nl.asymmetric_focal_loss, 0.5),
    (
        "ufl_sym",
        F.unified_focal_loss,
        {"asymmetric": False, "weight": None},
        nl.symmetric_focal_tversky_loss,
        nl.symmetric_focal_loss,
        None,
    ),
    ("ftl_sym", F.focal_tversky_loss, {}, nl.symmetric_focal_tversky_loss, None, 1.0),
    ("tversky", F.tversky_loss, {}, nl.tversky_loss, None, 1.0),
    ("dice", F.dice_loss, {}, nl.dice_loss, None, 1.0),
]


@pytest.mark.parametrize("case", BATCH_CASES, ids=[c[0] for c in BATCH_CASES])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_batch_true_sums_statistics_over_the_batch(case, reduction):
    _, fn, kwargs, ftl, fl, weight = case
    np_kwargs = {"delta": 0.6, "gamma": 0.5} if fn is F.unified_focal_loss else {}
    logits, labels = _inputs(17, 3, (3, 4), batch=3)
    weights = np.array([1.0, -0.5, 2.0]) if reduction == "none" else None
    value, grad = _torch_value_grad(
        fn, logits, torch.tensor(labels), weights=weights, batch=True, reduction=reduction, **kwargs
    )

    def numpy_loss(z):
        out = nl.batch_tversky_on_logits(ftl, fl, z, labels, weight=weight, reduction=reduction, **np_kwargs)
        return out @ weights if reduction == "none" else out

    expected = nl.batch_tversky_on_logits(ftl, fl, logits, labels, weight=weight, reduction=reduction, **np_kwargs)
    assert_close(value, expected, 1e-12)
    assert_close(grad, nl.complex_step_grad(numpy_loss, logits), 1e-10)
    # batch=True really differs from per-image statistics on this input.
    assert not np.allclose(value, _torch_value_grad(fn, logits, torch.tensor(labels), reduction=reduction, **kwargs)[0])


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_gradcheck_float64(case_id):
    _, fn, kwargs, _, _ = _case(case_id)
    kwargs = _resolve(kwargs, 3)
    logits, labels = _inputs(23, 3, (2, 3), scale=1.0)
    labels[0, 1, 2] = 9
    x = torch.tensor(logits, requires_grad=True)
    target = torch.tensor(labels)
    extra = {"ignore_index": 9, "reduction": "none"}
    if fn not in (F.symmetric_focal_loss, F.asymmetric_focal_loss, F.mixed_focal_loss):
        extra["batch"] = True
    plain = torch.tensor(labels.clip(0, 2))
    assert torch.autograd.gradcheck(lambda z: fn(z, plain, backend="reference", **kwargs), (x,), atol=1e-7)
    assert torch.autograd.gradcheck(lambda z: fn(z, target, backend="reference", **kwargs, **extra), (x,), atol=1e-7)


def _confidently_wrong(num_classes=3):
    """Random logits plus one voxel whose true class (0) has probability far below eps = 1e-7."""
    logits, labels = _inputs(29, num_classes, (3, 4), scale=1.0)
    labels[1, 2, 3] = 0
    logits[1, :, 2, 3] = 0.0
    logits[1, 0, 2, 3] = -20.0
    logits[1, 1, 2, 3] = 20.0  # p_0 ~ 4e-18, p_1 ~ 1 - 2e-9: every channel outside [eps, 1 - eps]
    return logits, labels


# (function, keywords, whether it has a cross-entropy term). Without the clip a pure Tversky loss
# still gives the saturated voxel only a tiny gradient (the softmax Jacobian is ~p_0), the
# cross-entropy an O(1/V) one.
CLIPPED_LOSSES = [
    (F.unified_focal_loss, {}, True),
    (F.unified_focal_loss, {"asymmetric": False}, True),
    (F.focal_tversky_loss, {}, False),
    (F.symmetric_focal_loss, {}, True),
    (F.asymmetric_focal_loss, {}, True),
    (F.mixed_focal_loss, {}, True),
    (F.tversky_loss, {"clip": True}, False),
]


@pytest.mark.parametrize("fn, kwargs, has_ce", CLIPPED_LOSSES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_clip_kills_the_gradient_of_a_confidently_wrong_voxel(fn, kwargs, has_ce):
    logits, labels = _confidently_wrong()
    target = torch.tensor(labels)
    _, grad = _torch_value_grad(fn, logits, target, **{**kwargs, "clip": True})
    assert np.all(grad[1, :, 2, 3] == 0.0), grad[1, :, 2, 3]
    assert np.any(grad != 0.0)
    _, grad_free = _torch_value_grad(fn, logits, target, **{**kwargs, "clip": False})
    assert np.all(np.isfinite(grad_free))
    assert np.abs(grad_free[1, :, 2, 3]).max() > (1e-3 if has_ce else 0.0), grad_free[1, :, 2, 3]


def test_clipped_value_of_a_confidently_wrong_voxel_is_the_authors():
    """With the clip its cross-entropy is stuck at -log(eps) ~ 16.12 (losses.md 6.5), as numpy's Keras clip says."""
    logits, labels = _confidently_wrong()
    value, _ = _torch_value_grad(F.asymmetric_focal_loss, logits, torch.tensor(labels), reduction="none")
    expected = nl.keras_on_logits(nl.asymmetric_focal_loss, logits, labels, reduction="none")
    assert_close(value, expected, 1e-12)
    alone = nl.asymmetric_focal_loss(np.eye(3)[[0]][None], np.array([[[1e-7, 1 - 1e-7, 1e-7]]]))
    np.testing.assert_allclose(alone, 0.3 * (1 - 1e-7) ** 2 * -np.log(1e-7), rtol=1e-12)


def test_one_minus_tversky_index_is_accurate_in_float32():
    """Near-perfect predictions: 1 - TI ~ 1e-6 must not come from cancelling TP against its total (losses.md 6.2).

    float32 itself limits log p_t near 1 to ~1e-7 absolute (z_t - LSE cancels), which leaves
    ~5e-5 relative error here; forming 1 - TI as a difference of the ratio errs by ~4e-3 to 2e-2.
    """
    rng = np.random.default_rng(31)
    labels = rng.integers(0, 3, size=(2, 16, 16, 16))
    logits = np.eye(3)[labels].transpose(0, 4, 1, 2, 3) * 14.0 + rng.normal(size=(2, 3, 16, 16, 16)) * 0.1
    logits = logits.astype(np.float32).astype(np.float64)
    for fn, np_loss in [
        (F.focal_tversky_loss, nl.symmetric_focal_tversky_loss),
        (F.tversky_loss, nl.tversky_loss),
        (F.unified_focal_loss, nl.asym_unified_focal_loss),
    ]:
        value = fn(torch.tensor(logits, dtype=torch.float32), torch.tensor(labels), backend="reference")
        expected = nl.keras_on_logits(np_loss, logits, labels)
        np.testing.assert_allclose(value.item(), expected, rtol=1e-3, err_msg=fn.__name__)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_compute_in_float32(dtype):
    logits, labels = _inputs(37, 4, (4, 5, 6))
    x16 = torch.tensor(logits).to(dtype)
    x = x16.clone().requires_grad_(True)
    value = F.unified_focal_loss(x, torch.tensor(labels), backend="reference")
    value.backward()
    assert value.dtype == torch.float32
    assert x.grad.dtype == dtype
    exact = x16.double()
    expected = nl.keras_on_logits(nl.asym_unified_focal_loss, exact.numpy(), labels)
    np.testing.assert_allclose(value.item(), expected, rtol=1e-5)


def test_layout_of_logits_does_not_matter():
    logits, labels = _inputs(41, 3, (4, 5, 6))
    base = torch.tensor(logits, dtype=torch.float32)
    target = torch.tensor(labels)
    variants = {
        "channels_last_3d": base.contiguous(memory_format=torch.channels_last_3d),
        "strided": torch.tensor(np.repeat(logits, 2, axis=-1), dtype=torch.float32)[..., ::2],
        "permuted": base.permute(0, 2, 3, 4, 1).contiguous().permute(0, 4, 1, 2, 3),
    }
    ref = _torch_value_grad(F.unified_focal_loss, logits, target, dtype=torch.float32)
    for name, x in variants.items():
        assert torch.equal(x, base)
        x = x.detach().requires_grad_(True)
        value = F.unified_focal_loss(x, target, backend="reference")
        value.backward()
        np.testing.assert_allclose(value.item(), ref[0], rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(x.grad.numpy(), ref[1], rtol=1e-5, atol=1e-9, err_msg=name)
    # Expanded (stride-0) batch: two identical images.
    x = base[:1].expand(2, -1, -1, -1, -1)
    value = F.unified_focal_loss(x, target[:1].expand(2, -1, -1, -1), reduction="none", backend="reference")
    assert value[0] == value[1]


# ----------------------------------------------------------------------------------------------
# Randomised shapes and hyper-parameters (hypothesis, derandomised so CI is reproducible)


@st.composite
def _region_problem(draw):
    batch = draw(st.integers(1, 3))
    num_classes = draw(st.integers(2, 6))
    spatial = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(batch, num_classes, *spatial)) * draw(st.floats(0.1, 3.0))
    labels = rng.integers(0, num_classes, size=(batch, *spatial))
    if draw(st.booleans()):
        labels[rng.random(labels.shape) < 0.3] = -7
        labels.reshape(batch, -1)[:, 0] = 0  # every image keeps a voxel (the authors' mean of nothing is NaN)
        ignore_index = -7
    else:
        ignore_index = None
    return logits, labels, ignore_index


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    problem=_region_problem(),
    weight=st.one_of(st.none(), st.floats(0.0, 1.0)),
    delta=st.floats(0.05, 0.95),
    gamma=st.floats(0.0, 1.0),
    asymmetric=st.booleans(),
    clip=st.booleans(),
)
def test_random_unified_focal_problems_match_numpy(problem, weight, delta, gamma, asymmetric, clip):
    logits, labels, ignore_index = problem
    np_loss = nl.asym_unified_focal_loss if asymmetric else nl.sym_unified_focal_loss
    options = {"weight": weight, "delta": delta, "gamma": gamma}
    value = F.unified_focal_loss(
        torch.tensor(logits),
        torch.tensor(labels),
        asymmetric=asymmetric,
        clip=clip,
        ignore_index=ignore_index,
        reduction="none",
        backend="reference",
        **options,
    )
    expected = nl.keras_on_logits(
        np_loss, logits, labels, ignore_index=ignore_index, reduction="none", clip=clip, **options
    )
    np.testing.assert_allclose(value.numpy(), expected, rtol=1e-11, atol=1e-14)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    problem=_region_problem(),
    weight=st.one_of(st.none(), st.floats(0.0, 1.0)),
    beta=st.one_of(st.none(), st.floats(0.0, 1.0)),
    delta=st.floats(0.05, 0.95),
    gamma_f=st.floats(0.0, 3.0),
    gamma_fd=st.floats(0.1, 2.0),
)
def test_random_mixed_focal_problems_match_numpy(problem, weight, beta, delta, gamma_f, gamma_fd):
    logits, labels, ignore_index = problem
    alpha = list(np.linspace(0.5, 1.5, logits.shape[1]))
    options = {"weight": weight, "alpha": alpha, "beta": beta, "delta": delta, "gamma_f": gamma_f, "gamma_fd": gamma_fd}
    value = F.mixed_focal_loss(
        torch.tensor(logits),
        torch.tensor(labels),
        ignore_index=ignore_index,
        reduction="none",
        backend="reference",
        **options,
    )
    expected = nl.keras_on_logits(
        nl.mixed_focal_loss, logits, labels, ignore_index=ignore_index, reduction="none", **options
    )
    np.testing.assert_allclose(value.numpy(), expected, rtol=1e-11, atol=1e-14)


# ----------------------------------------------------------------------------------------------
# The docstrings' comparisons with MONAI (losses.md 5.1-5.3)


def test_dice_loss_is_monai_dice_with_doubled_smoothing():
    logits, labels = _inputs(43, 4, (3, 4, 5))
    value = F.dice_loss(torch.tensor(logits), torch.tensor(labels), smooth=5e-6, backend="reference")
    expected = nl.monai_dice_loss(logits, labels, smooth_nr=1e-5, smooth_dr=1e-5)
    np.testing.assert_allclose(value.item(), expected, rtol=1e-12)


def test_tversky_loss_is_monai_tversky_with_alpha_one_minus_delta():
    logits, labels = _inputs(47, 3, (5, 6))
    value = F.tversky_loss(torch.tensor(logits), torch.tensor(labels), delta=0.8, smooth=1e-5, backend="reference")
    expected = nl.monai_tversky_loss(logits, labels, alpha=0.2, beta=0.8)
    np.testing.assert_allclose(value.item(), expected, rtol=1e-12)


def test_focal_loss_mean_is_c_times_monai_softmax_focal():
    logits, labels = _inputs(53, 5, (4, 3))
    value = F.focal_loss(torch.tensor(logits), torch.tensor(labels), gamma=2.0, backend="reference")
    np.testing.assert_allclose(value.item(), 5 * nl.monai_softmax_focal_loss(logits, labels, gamma=2.0), rtol=1e-12)
