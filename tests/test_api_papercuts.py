"""API papercuts of a first training script: NumPy counts, ``ignore_index=None`` for row losses,
``available_backends()`` without a device, criteria that keep their per-class constants under
``.to(dtype)``, one all-ignored rule for every loss and backend, and the lean eager op path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lmfloss_kernels as lk
from lmfloss_kernels import ext
from lmfloss_kernels import functional as F
from lmfloss_kernels._autograd import call_op

CPU_BACKENDS = lk.available_backends("cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _rows(n=23, c=5):
    return torch.randn(n, c, dtype=torch.float64).float(), torch.randint(0, c, (n,))


# --------------------------------------------------------------------------------------------
# NumPy class counts (np.bincount) and alpha


def test_numpy_counts_equal_the_list():
    logits, labels = _rows()
    labels_np = np.random.default_rng(0).integers(0, 5, 400)
    counts = np.bincount(labels_np, minlength=5)
    as_list = counts.tolist()
    torch.testing.assert_close(F.lmf_loss(logits, labels, counts), F.lmf_loss(logits, labels, as_list))
    torch.testing.assert_close(F.ldam_loss(logits, labels, counts), F.ldam_loss(logits, labels, as_list))
    torch.testing.assert_close(lk.LMFLoss(counts)(logits, labels), lk.LMFLoss(as_list)(logits, labels))
    torch.testing.assert_close(lk.LDAMLoss(counts)(logits, labels), lk.LDAMLoss(as_list)(logits, labels))
    torch.testing.assert_close(F.ldam_margins(counts), F.ldam_margins(as_list))
    torch.testing.assert_close(F.drw_weights(counts), F.drw_weights(as_list))
    # Float64 arrays give float64 results, as float64 tensors do.
    assert F.ldam_margins(counts.astype(np.float64)).dtype == torch.float64


def test_numpy_alpha_equals_the_list():
    logits, labels = _rows()
    alpha = np.array([0.5, 1.0, 2.0, 1.5, 0.25])
    expected = F.focal_loss(logits, labels, alpha=alpha.tolist())
    torch.testing.assert_close(F.focal_loss(logits, labels, alpha=alpha), expected)
    torch.testing.assert_close(lk.FocalLoss(alpha=alpha)(logits, labels), expected)


def test_numpy_counts_still_validated():
    with pytest.raises(ValueError, match="class_counts must be positive"):
        lk.LMFLoss(np.array([3, 0, 2]))
    with pytest.raises(ValueError, match=r"class_counts must have one entry per class \(5\)"):
        F.lmf_loss(*_rows(), np.array([3, 1, 2]))


# --------------------------------------------------------------------------------------------
# ignore_index=None for the row losses


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_row_losses_take_ignore_index_none(backend):
    logits, labels = _rows()
    counts = [40, 10, 5, 3, 2]
    cases = [
        (lambda **kw: F.lmf_loss(logits, labels, counts, backend=backend, **kw)),
        (lambda **kw: F.ldam_loss(logits, labels, counts, backend=backend, **kw)),
        (lambda **kw: F.focal_loss(logits, labels, backend=backend, **kw)),
        (lambda **kw: lk.LMFLoss(counts, backend=backend, **kw)(logits, labels)),
    ]
    for loss in cases:
        # No label equals -100 here, so "ignore nothing" must give the default's value.
        torch.testing.assert_close(loss(ignore_index=None), loss(ignore_index=-100))


def test_ignore_index_none_ignores_nothing():
    logits, labels = _rows()
    labels[3] = -100
    with pytest.raises(ValueError, match=r"target labels must be in \[0, 4\], got values in \[-100, 4\]"):
        F.lmf_loss(logits, labels, [1, 2, 3, 4, 5], ignore_index=None)
    with pytest.raises(TypeError, match="ignore_index must be an int or None, got float"):
        lk.LMFLoss([1, 2, 3, 4, 5], ignore_index=2.0)


# --------------------------------------------------------------------------------------------
# available_backends() without a device


def test_available_backends_default_covers_the_devices_present():
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    expected = {name for device in devices for name in lk.available_backends(device)}
    found = lk.available_backends()
    assert set(found) == expected and len(found) == len(expected)
    assert found[0] == "reference"
    assert "cpu" in found or ext.LOAD_ERROR is not None


# --------------------------------------------------------------------------------------------
# Per-class constants keep their dtype under criterion.to(dtype)


@pytest.mark.parametrize("convert", [lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double()])
def test_criteria_keep_per_class_constants_under_dtype_casts(convert):
    counts = [5000, 400, 37, 3]
    logits = (torch.randn(64, 4) * 3).to(torch.bfloat16)
    labels = torch.randint(0, 4, (64,))
    for make in (lambda: lk.LMFLoss(counts, backend="reference"), lambda: lk.FocalLoss(alpha=[0.3, 1.1, 2.7, 0.9])):
        plain = make()
        converted = convert(make())
        for name, buffer in plain.named_buffers():
            assert getattr(converted, name).dtype == buffer.dtype, name
            torch.testing.assert_close(getattr(converted, name), buffer, rtol=0, atol=0)
        torch.testing.assert_close(converted(logits, labels), plain(logits, labels), rtol=0, atol=0)


def test_lmf_margins_are_not_rounded_to_bfloat16():
    # The case: rounding the margins to bfloat16 changed the loss (62.617 vs 62.632).
    counts = [5000, 400, 37, 3]
    criterion = lk.LMFLoss(counts).to(torch.bfloat16)
    exact = F.ldam_margins(torch.tensor(counts, dtype=torch.float64))
    torch.testing.assert_close(criterion.margins, exact, rtol=0, atol=0)


def test_served_buffers_follow_state_dict_and_in_place_changes():
    logits, labels = _rows(c=3)
    criterion = lk.LMFLoss([100, 10, 1])
    first = criterion(logits, labels)
    criterion.load_state_dict(lk.LMFLoss([1, 10, 100]).state_dict())  # copies into the buffers in place
    torch.testing.assert_close(criterion(logits, labels), F.lmf_loss(logits, labels, [1, 10, 100]))
    assert not torch.equal(first, criterion(logits, labels))
    focal = lk.FocalLoss(alpha=[1.0, 1.0, 1.0])
    focal(logits, labels)
    with torch.no_grad():
        focal.alpha[1] = -1.0
    with pytest.raises(ValueError, match="alpha must be non-negative"):
        focal(logits, labels)


# --------------------------------------------------------------------------------------------
# One rule when every label is ignored: loss 0, gradient 0, on every loss and backend


def _all_ignored_cases(backend):
    dense = torch.randn(2, 3, 4, 5)
    ignored_map = torch.full((2, 4, 5), 7)
    rows = torch.randn(6, 3)
    ignored_rows = torch.full((6,), 7)
    counts = [10, 5, 2]
    region = [
        F.unified_focal_loss, F.focal_tversky_loss, F.symmetric_focal_loss, F.asymmetric_focal_loss,
        F.mixed_focal_loss, F.tversky_loss, F.dice_loss,
    ]  # fmt: skip
    cases = [(f.__name__, f, dense, ignored_map, {}) for f in region]
    cases += [
        ("lmf_loss", lambda x, y, **kw: F.lmf_loss(x, y, counts, **kw), rows, ignored_rows, {}),
        ("ldam_loss", lambda x, y, **kw: F.ldam_loss(x, y, counts, **kw), rows, ignored_rows, {}),
        ("focal_loss", F.focal_loss, rows, ignored_rows, {}),
        ("lmf_dense", lambda x, y, **kw: F.lmf_loss(x, y, counts, **kw), dense, ignored_map, {}),
    ]
    return [(name, fn, x, y, {**kw, "backend": backend, "ignore_index": 7}) for name, fn, x, y, kw in cases]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_label_ignored_gives_zero_loss_and_zero_gradient(backend, reduction):
    for name, fn, x, y, kw in _all_ignored_cases(backend):
        x = x.clone().requires_grad_(True)
        loss = fn(x, y, reduction=reduction, **kw)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        # Tversky terms of an image without valid voxels: (1 - TI) = 0 is clamped to the smallest
        # normal float before the power, so "0" is up to tiny ** exponent.
        assert bool((loss.abs() < 1e-6).all()), f"{name}/{backend}/{reduction}: loss {loss}"
        assert bool((grad == 0).all()), f"{name}/{backend}/{reduction}: non-zero gradient"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_label_ignored_still_propagates_non_finite_logits(backend):
    for name, fn, x, y, kw in _all_ignored_cases(backend):
        x = x.clone()
        x.view(-1)[5] = float("nan")
        assert bool(fn(x, y, **kw).isnan()), f"{name}/{backend}: a NaN logit must give a NaN loss"


def test_criteria_follow_the_all_ignored_rule():
    rows, dense = torch.randn(6, 3, requires_grad=True), torch.randn(2, 3, 4, requires_grad=True)
    for criterion, x, y in (
        (lk.LMFLoss([3, 2, 1], ignore_index=9), rows, torch.full((6,), 9)),
        (lk.UnifiedFocalLoss(ignore_index=9), dense, torch.full((2, 4), 9)),
    ):
        loss = criterion(x, y)
        assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6)
        assert not bool(torch.autograd.grad(loss, x)[0].any())


# --------------------------------------------------------------------------------------------
# The eager op path equals the registered op, and gives way to it where something traces


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(ext.LOAD_ERROR is not None, reason=f"C++ extension not loaded: {ext.LOAD_ERROR}")
@pytest.mark.parametrize("family", ["row", "region"])
def test_call_op_equals_the_registered_op(family):
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (2, 5, 4))
    v = torch.rand(3, dtype=torch.float64) + 0.5
    if family == "row":
        op, args = ext.ops.row_loss_op, (y, v, v, v, 1.0, 0.5, 1.5, 4.0, -100, "mean")
    else:
        op, args = ext.ops.region_loss_op, (y, v, v, v, 0.6, 0.5, 0.5, 1e-6, 1e-6, 1e-7, True, False, None, "mean")
    results = []
    for call in (lambda z: op(z, *args), lambda z: call_op(op, z, *args)):
        z = x.clone().requires_grad_(True)
        loss = call(z)[0]
        results.append((loss, torch.autograd.grad(loss, z)[0]))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    with _Recorder() as recorder:
        call_op(op, x, *args)
    assert any(f"lmfloss.ext_{family}_loss" in name for name in recorder.seen), recorder.seen
