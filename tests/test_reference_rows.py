"""Row losses of the public API (backend="reference") against the numpy transcriptions.

LMF, LDAM and the softmax focal loss on ``(N, C)`` rows and on dense ``(B, C, *S)`` maps are
compared, value and logit gradient, with per-row numpy float64 transcriptions of the authors'
code (kaidic ``LDAMLoss``, AdeelH ``FocalLoss``, Adnan-Sadi ``LMFLoss`` and ``get_mlist``);
numpy gradients come from the complex step and, for rows, from the closed form of losses.md 1.5.
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
from lmfloss_kernels import reference


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: with 2 OpenMP threads on a loaded 2-core machine each op waits milliseconds
    # for a descheduled worker.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _counts(num_classes):
    return [200, 35, 7, 90, 3][:num_classes]


def _alpha(num_classes):
    return [0.25 + 0.3 * c for c in range(num_classes)]


# id -> (torch loss(x, y, C, **common), numpy loss(z, labels, C, **common)); "common" is
# reduction and ignore_index, which every row loss takes.
ROW_CASES = {
    "lmf_defaults": (
        lambda x, y, c, **kw: F.lmf_loss(x, y, _counts(c), **kw),
        lambda z, t, c, **kw: nl.lmf_loss(z, t, _counts(c), **kw),
    ),
    "lmf_config": (
        lambda x, y, c, **kw: F.lmf_loss(x, y, _counts(c), alpha=1.5, gamma=2.0, s=10.0, max_m=0.3, **kw),
        lambda z, t, c, **kw: nl.lmf_loss(z, t, _counts(c), alpha=1.5, gamma=2.0, s=10.0, max_m=0.3, **kw),
    ),
    "lmf_unweighted": (
        lambda x, y, c, **kw: F.lmf_loss(x, y, _counts(c), weight=None, beta=0.7, **kw),
        lambda z, t, c, **kw: nl.lmf_loss(z, t, _counts(c), weight=None, beta=0.7, **kw),
    ),
    "lmf_drw": (
        lambda x, y, c, **kw: F.lmf_loss(
            x, y, _counts(c), weight=F.drw_weights(torch.tensor(_counts(c), dtype=torch.float64)), **kw
        ),
        lambda z, t, c, **kw: nl.lmf_loss(z, t, _counts(c), weight=nl.drw_per_cls_weights(_counts(c)), **kw),
    ),
    "ldam_defaults": (
        lambda x, y, c, **kw: F.ldam_loss(x, y, _counts(c), **kw),
        lambda z, t, c, **kw: nl.ldam_loss(z, t, nl.get_mlist(_counts(c)), None, 30.0, **kw),
    ),
    "ldam_margin_weights": (
        lambda x, y, c, **kw: F.ldam_loss(x, y, _counts(c), weight="margins", s=5.0, max_m=0.4, **kw),
        lambda z, t, c, **kw: nl.ldam_loss(
            z, t, nl.get_mlist(_counts(c), 0.4), nl.get_mlist(_counts(c), 0.4), 5.0, **kw
        ),
    ),
    "focal_defaults": (
        lambda x, y, c, **kw: F.focal_loss(x, y, **kw),
        lambda z, t, c, **kw: nl.adeelh_focal_loss(z, t, None, 2.0, **kw),
    ),
    "focal_alpha_gamma_half": (
        lambda x, y, c, **kw: F.focal_loss(x, y, gamma=0.5, alpha=_alpha(c), **kw),
        lambda z, t, c, **kw: nl.adeelh_focal_loss(z, t, _alpha(c), 0.5, **kw),
    ),
    "focal_gamma0": (
        lambda x, y, c, **kw: F.focal_loss(x, y, gamma=0.0, **kw),
        lambda z, t, c, **kw: nl.adeelh_focal_loss(z, t, None, 0.0, **kw),
    ),
}
SHAPES = {"rows": (7,), "dense2d": (2, 3, 5), "dense3d": (2, 2, 3, 2)}


def _inputs(seed, num_classes, shape, scale=1.0):
    """Logits of ``shape`` with the class axis inserted at dim 1 and labels of ``shape``."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(shape[0], num_classes, *shape[1:])) * scale
    labels = rng.integers(0, num_classes, size=shape)
    return logits, labels


def _torch_value_grad(fn, logits, target, num_classes, *, weights=None, dtype=torch.float64, **kwargs):
    x = torch.tensor(logits, dtype=dtype, requires_grad=True)
    value = fn(x, target, num_classes, backend="reference", **kwargs)
    seed = torch.ones_like(value) if weights is None else torch.tensor(weights, dtype=value.dtype)
    (grad,) = torch.autograd.grad(value, x, seed)
    return value.detach().double().numpy(), grad.double().numpy()


def assert_close(actual, expected, rtol):
    """Elementwise agreement within ``rtol`` of the largest expected magnitude."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(float(np.max(np.abs(expected))), 1e-300)
    error = float(np.max(np.abs(actual - expected)))
    assert error <= rtol * scale, f"max abs error {error:.3e} > {rtol:g} * {scale:.3e}"


@pytest.mark.parametrize("case_id", list(ROW_CASES))
@pytest.mark.parametrize("layout", list(SHAPES))
@pytest.mark.parametrize("num_classes", [2, 3, 5])
def test_value_and_gradient_match_numpy_float64(case_id, layout, num_classes):
    fn, np_fn = ROW_CASES[case_id]
    logits, labels = _inputs(zlib.crc32(f"{case_id}-{layout}-{num_classes}".encode()), num_classes, SHAPES[layout])
    value, grad = _torch_value_grad(fn, logits, torch.tensor(labels), num_classes)
    expected = np_fn(logits, labels, num_classes)
    expected_grad = nl.complex_step_grad(lambda z: np_fn(z, labels, num_classes), logits)
    assert_close(value, expected, 1e-12)
    assert_close(grad, expected_grad, 1e-10)


@pytest.mark.parametrize("weight", ["margins", None])
def test_lmf_gradient_equals_closed_form(weight):
    """losses.md 1.5: alpha (w_t/W) s (q - e_t) + beta (w_t/N) G(p_t) (p - e_t), with an ignored row."""
    counts = [40, 9, 300, 2]
    logits, labels = _inputs(3, 4, (11,), scale=0.3)
    labels[4] = -100
    value, grad = _torch_value_grad(
        lambda x, y, c, **kw: F.lmf_loss(x, y, counts, alpha=1.3, beta=0.6, gamma=1.5, s=30.0, weight=weight, **kw),
        logits,
        torch.tensor(labels),
        4,
    )
    margins = nl.get_mlist(counts)
    class_weight = margins if weight == "margins" else np.ones(4)
    expected = nl.ldam_focal_closed_form_grad(logits, labels, margins, class_weight, 30.0, 1.5, 1.3, 0.6)
    assert_close(grad, expected, 1e-10)


def test_complex_step_agrees_with_central_differences():
    """The numpy gradient tool itself, on a smooth loss (guards the complex-step helper)."""
    logits, labels = _inputs(5, 3, (6,))
    f = lambda z: nl.lmf_loss(z, labels, [10, 3, 30], s=2.0)  # noqa: E731
    assert_close(nl.complex_step_grad(f, logits), nl.central_difference_grad(f, logits), 1e-7)


@pytest.mark.parametrize("case_id", list(ROW_CASES))
def test_float32_matches_numpy(case_id):
    fn, np_fn = ROW_CASES[case_id]
    logits, labels = _inputs(9, 4, (33,))
    logits = logits.astype(np.float32).astype(np.float64)
    x = torch.tensor(logits, dtype=torch.float32, requires_grad=True)
    value = fn(x, torch.tensor(labels), 4, backend="reference")
    value.backward()
    assert value.dtype == torch.float32 and x.grad.dtype == torch.float32
    expected_grad = nl.complex_step_grad(lambda z: np_fn(z, labels, 4), logits)
    np.testing.assert_allclose(value.item(), np_fn(logits, labels, 4), rtol=1e-5)
    assert np.linalg.norm(x.grad.double().numpy() - expected_grad) <= 1e-5 * np.linalg.norm(expected_grad)


@pytest.mark.parametrize("case_id", list(ROW_CASES))
def test_label_dtypes_and_forms_agree(case_id):
    fn, _ = ROW_CASES[case_id]
    logits, labels = _inputs(13, 3, (2, 3, 4))
    labels_t = torch.tensor(labels)
    ref = _torch_value_grad(fn, logits, labels_t, 3)
    for target in (labels_t.int(), labels_t.short(), labels_t.to(torch.int8), labels_t.to(torch.uint8)):
        value, grad = _torch_value_grad(fn, logits, target, 3)
        assert value == ref[0], target.dtype
        np.testing.assert_array_equal(grad, ref[1])
    value, grad = _torch_value_grad(fn, logits, labels_t.unsqueeze(1), 3)  # MONAI's (B, 1, *S)
    assert value == ref[0]
    np.testing.assert_array_equal(grad, ref[1])
    rows, row_labels = _inputs(14, 2, (9,))
    a = _torch_value_grad(fn, rows, torch.tensor(row_labels), 2)
    b = _torch_value_grad(fn, rows, torch.tensor(row_labels).bool(), 2)
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("case_id", list(ROW_CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("layout", ["rows", "dense2d"])
def test_ignore_index_and_reductions_match_numpy(case_id, reduction, layout):
    fn, np_fn = ROW_CASES[case_id]
    logits, labels = _inputs(17, 3, SHAPES[layout])
    ignore = -100 if layout == "rows" else 255
    labels[np.random.default_rng(2).random(labels.shape) < 0.3] = ignore
    target = torch.tensor(labels) if layout == "rows" else torch.tensor(labels).to(torch.uint8)
    weights = np.random.default_rng(4).normal(size=labels.shape) if reduction == "none" else None
    value, grad = _torch_value_grad(fn, logits, target, 3, weights=weights, reduction=reduction, ignore_index=ignore)

    def numpy_loss(z):
        out = np_fn(z, labels, 3, reduction=reduction, ignore_index=ignore)
        return np.sum(out * weights) if reduction == "none" else out

    expected = np_fn(logits, labels, 3, reduction=reduction, ignore_index=ignore)
    assert value.shape == (labels.shape if reduction == "none" else ())
    assert_close(value, expected, 1e-12)
    assert_close(grad, nl.complex_step_grad(numpy_loss, logits), 1e-10)
    if reduction == "none":
        assert np.all(value[labels == ignore] == 0.0)


@pytest.mark.parametrize("case_id", list(ROW_CASES))
def test_ignored_rows_have_zero_gradient_and_no_influence(case_id):
    fn, _ = ROW_CASES[case_id]
    logits, labels = _inputs(19, 4, (2, 5, 3))
    ignored = np.random.default_rng(6).random(labels.shape) < 0.3
    labels[ignored] = 7
    target = torch.tensor(labels)
    value, grad = _torch_value_grad(fn, logits, target, 4, ignore_index=7)
    mask = np.broadcast_to(ignored[:, None], logits.shape)
    assert np.all(grad[mask] == 0.0)
    assert np.any(grad[~mask] != 0.0)
    changed = logits.copy()
    changed[mask] = np.random.default_rng(8).normal(size=int(mask.sum())) * 20
    value2, grad2 = _torch_value_grad(fn, changed, target, 4, ignore_index=7)
    assert value2 == value
    np.testing.assert_array_equal(grad2[~mask], grad[~mask])


def test_every_row_ignored():
    """The package's one rule for losses with nothing valid (README, Guarantees): 0 with a zero
    gradient for every reduction ("mean" included, unlike torch's cross_entropy's 0 / 0 = NaN)."""
    x = torch.randn(4, 3, requires_grad=True)
    y = torch.full((4,), -100)
    mean = F.lmf_loss(x, y, [3, 2, 1], backend="reference")
    assert mean == 0.0
    mean.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert F.lmf_loss(x, y, [3, 2, 1], reduction="sum", backend="reference") == 0.0
    assert torch.equal(F.focal_loss(x, y, reduction="none", backend="reference"), torch.zeros(4))


def test_lmf_is_alpha_ldam_plus_beta_focal_with_their_own_normalisations():
    """The authors' LMFLoss: LDAM divided by the sum of w_t, focal by N, margins as both weights."""
    counts = [500, 60, 4]
    logits, labels = _inputs(23, 3, (40,))
    labels[:30] = 2  # many rows of the rare class: sum of weights far from N
    x, y = torch.tensor(logits), torch.tensor(labels)
    margins = F.ldam_margins(torch.tensor(counts, dtype=torch.float64))
    ldam = F.ldam_loss(x, y, counts, weight="margins", backend="reference")
    focal = F.focal_loss(x, y, gamma=1.5, alpha=margins, backend="reference")
    lmf = F.lmf_loss(x, y, counts, alpha=1.5, beta=0.25, backend="reference")
    torch.testing.assert_close(lmf, 1.5 * ldam + 0.25 * focal, rtol=1e-14, atol=0)
    weight_sum = margins[y].sum()
    per_row = F.ldam_loss(x, y, counts, weight="margins", reduction="none", backend="reference")
    torch.testing.assert_close(ldam, per_row.sum() / weight_sum, rtol=1e-14, atol=0)
    assert not torch.isclose(ldam, per_row.mean())
    per_row = F.focal_loss(x, y, gamma=1.5, alpha=margins, reduction="none", backend="reference")
    torch.testing.assert_close(focal, per_row.mean(), rtol=1e-14, atol=0)


@pytest.mark.parametrize("case_id", list(ROW_CASES))
def test_gradcheck_float64(case_id):
    fn, _ = ROW_CASES[case_id]
    logits, labels = _inputs(29, 3, (2, 2, 3), scale=0.3)
    labels[0, 0, 1] = -100
    x = torch.tensor(logits, requires_grad=True)
    y = torch.tensor(labels)
    assert torch.autograd.gradcheck(lambda z: fn(z, y, 3, backend="reference"), (x,))
    rows = torch.tensor(logits[:, :, 0, 0].copy(), requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: fn(z, y[:, 0, 0], 3, reduction="none", backend="reference"), (rows,))


def test_ldam_margins_by_hand():
    m = F.ldam_margins([100, 10, 1])
    assert m.dtype == torch.float32
    torch.testing.assert_close(m, torch.tensor([0.5 * 0.1**0.5, 0.5 * 0.1**0.25, 0.5]), rtol=1e-7, atol=0)
    m = F.ldam_margins(torch.tensor([16.0, 81.0, 1.0], dtype=torch.float64), max_m=0.9)
    assert m.dtype == torch.float64
    torch.testing.assert_close(m, torch.tensor([0.45, 0.3, 0.9], dtype=torch.float64), rtol=1e-15, atol=0)
    counts = [1234, 56, 7, 89012]
    np.testing.assert_allclose(F.ldam_margins(torch.tensor(counts)).numpy(), nl.get_mlist(counts), rtol=1e-7)


def test_drw_weights_by_hand():
    # counts (1, 2), beta = 0.5: raw (1-b)/(1-b^n) = (1, 2/3), normalised to sum 2: (6/5, 4/5).
    w = F.drw_weights([1, 2], beta=0.5)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, torch.tensor([1.2, 0.8]), rtol=1e-7, atol=0)
    torch.testing.assert_close(F.drw_weights([5, 50, 500], beta=0.0), torch.ones(3))
    counts = [5000, 500, 50, 5]
    w = F.drw_weights(torch.tensor(counts, dtype=torch.float64))
    np.testing.assert_allclose(w.numpy(), nl.drw_per_cls_weights(counts), rtol=1e-13)
    assert abs(float(w.sum()) - 4.0) < 1e-12


def test_reference_class_helpers_take_sequences_like_tensors():
    counts = [1234, 56, 7, 89012]
    for helper, numpy_helper in (
        (reference.ldam_margins, nl.get_mlist),
        (reference.drw_weights, nl.drw_per_cls_weights),
    ):
        from_list, from_tuple = helper(counts), helper(tuple(counts))
        assert from_list.dtype == from_tuple.dtype == torch.float32
        torch.testing.assert_close(from_list, helper(torch.tensor(counts)), rtol=0, atol=0)
        torch.testing.assert_close(from_tuple, from_list, rtol=0, atol=0)
        np.testing.assert_allclose(from_list.numpy(), numpy_helper(counts), rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_large_logits_with_s30_stay_finite(dtype):
    """s = 30 on unnormalised logits reaches s*z ~ 1500: the softmax must be max-shifted (losses.md 6.7)."""
    logits, labels = _inputs(31, 5, (16,), scale=50.0)
    x = torch.tensor(logits).to(dtype).requires_grad_(True)
    value = F.lmf_loss(x, torch.tensor(labels), [9, 8, 7, 6, 5], backend="reference")
    value.backward()
    assert value.dtype == torch.float32 and x.grad.dtype == dtype
    assert torch.isfinite(value) and torch.isfinite(x.grad).all()
    exact = x.detach().double().numpy()
    np.testing.assert_allclose(value.item(), nl.lmf_loss(exact, labels, [9, 8, 7, 6, 5]), rtol=1e-5)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_focal_gradient_is_finite_when_the_row_is_certain(gamma):
    """(1 - p)^gamma with gamma <= 1 at p_t = 1 exactly (losses.md 6.3): no NaN, zero gradient."""
    x = torch.tensor([[0.0, -200.0, -200.0], [1.0, 2.0, 3.0]], requires_grad=True)
    y = torch.tensor([0, 1])
    F.focal_loss(x, y, gamma=gamma, backend="reference").backward()
    assert torch.isfinite(x.grad).all()
    assert torch.all(x.grad[0] == 0.0)
    assert torch.any(x.grad[1] != 0.0)


@st.composite
def _row_problem(draw):
    num_classes = draw(st.integers(2, 7))
    dense = draw(st.booleans())
    shape = (
        (draw(st.integers(1, 3)), *draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
        if dense
        else (draw(st.integers(1, 20)),)
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    logits = rng.normal(size=(shape[0], num_classes, *shape[1:])) * draw(st.floats(0.1, 5.0))
    labels = rng.integers(0, num_classes, size=shape)
    labels[rng.random(shape) < draw(st.floats(0.0, 0.5))] = -100
    labels.reshape(-1)[0] = 0  # at least one row counts ("mean" of nothing is NaN, as in torch)
    counts = list(rng.integers(1, 10_000, size=num_classes))
    return logits, labels, counts


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    problem=_row_problem(),
    alpha=st.floats(0.0, 2.0),
    beta=st.floats(0.1, 2.0),
    gamma=st.floats(0.0, 4.0),
    s=st.floats(0.5, 40.0),
    max_m=st.floats(0.05, 1.0),
    reduction=st.sampled_from(["mean", "sum", "none"]),
)
def test_random_lmf_problems_match_numpy(problem, alpha, beta, gamma, s, max_m, reduction):
    logits, labels, counts = problem
    options = {"alpha": alpha, "beta": beta, "gamma": gamma, "s": s, "max_m": max_m, "reduction": reduction}
    value = F.lmf_loss(torch.tensor(logits), torch.tensor(labels), counts, backend="reference", **options)
    expected = nl.lmf_loss(logits, labels, counts, **options)
    np.testing.assert_allclose(value.numpy(), expected, rtol=1e-11, atol=1e-13)
