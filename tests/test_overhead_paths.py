"""The criteria's fast call paths: call plans (lmfloss_kernels/_plans.py) and the C++ autograd nodes of the ext ops.

A plan replays what a criterion's first call with a given signature resolved; every test here
compares a replayed call with the functional API (which never uses plans) or the eager reference on
fresh values, and checks that each thing a plan depends on (dtype, shape, options, keywords,
buffers, the backend registry) makes the next call take the full path again. No timing.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.autograd.forward_ad as forward_ad

import lmfloss_kernels as lk
from lmfloss_kernels import _backends, reference
from lmfloss_kernels import functional as F

COUNTS = [90, 40, 11, 3]
BACKENDS = [name for name in ("cpu", "triton", "reference") if name in lk.available_backends("cpu")]

# name -> (criterion factory, functional equivalent, input kind)
CASES = {
    "lmf": (lambda b: lk.LMFLoss(COUNTS, backend=b), lambda x, y, b: F.lmf_loss(x, y, COUNTS, backend=b), "rows"),
    "ldam_none": (
        lambda b: lk.LDAMLoss(COUNTS, reduction="none", backend=b),
        lambda x, y, b: F.ldam_loss(x, y, COUNTS, reduction="none", backend=b),
        "rows",
    ),
    "focal_alpha": (
        lambda b: lk.FocalLoss(alpha=[0.1, 0.4, 0.7, 1.3], backend=b),
        lambda x, y, b: F.focal_loss(x, y, alpha=[0.1, 0.4, 0.7, 1.3], backend=b),
        "rows",
    ),
    "unified": (
        lambda b: lk.UnifiedFocalLoss(backend=b),
        lambda x, y, b: F.unified_focal_loss(x, y, backend=b),
        "dense",
    ),
    "mixed_alpha": (
        lambda b: lk.MixedFocalLoss(alpha=[0.5, 1.0, 1.5, 2.0], beta=0.3, backend=b),
        lambda x, y, b: F.mixed_focal_loss(x, y, alpha=[0.5, 1.0, 1.5, 2.0], beta=0.3, backend=b),
        "dense",
    ),
    "dice_sum": (
        lambda b: lk.DiceLoss(reduction="sum", backend=b),
        lambda x, y, b: F.dice_loss(x, y, reduction="sum", backend=b),
        "dense",
    ),
}


def _inputs(kind: str, dtype=torch.float32, rows: int = 13, side: int = 5):
    if kind == "rows":
        return torch.randn(rows, 4, dtype=dtype) * 3, torch.randint(0, 4, (rows,))
    return torch.randn(2, 4, side, side + 1, dtype=dtype) * 3, torch.randint(0, 4, (2, side, side + 1))


def _loss_and_grad(fn, x, y):
    leaf = x.detach().clone().requires_grad_(True)
    loss = fn(leaf, y)
    loss.sum().backward()
    return loss.detach(), leaf.grad


def _assert_same(criterion, functional, x, y, backend):
    got = _loss_and_grad(criterion, x, y)
    want = _loss_and_grad(lambda a, b: functional(a, b, backend), x, y)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_replayed_calls_equal_the_functional_api_on_fresh_values(case, backend):
    make, functional, kind = CASES[case]
    criterion = make(backend)
    for step in range(4):
        x, y = _inputs(kind)
        if step == 2:
            with torch.no_grad():
                torch.testing.assert_close(criterion(x, y), functional(x, y, backend), rtol=0, atol=0)
        _assert_same(criterion, functional, x, y, backend)
    assert len(criterion._call_plans) == 1
    (plan,) = criterion._call_plans.values()
    assert plan.compute is not None  # the later calls were replays


@pytest.mark.parametrize("case", ["lmf", "unified"])
def test_a_new_dtype_shape_or_target_layout_plans_again(case):
    make, functional, kind = CASES[case]
    criterion = make("cpu")
    calls = [
        _inputs(kind),
        _inputs(kind, dtype=torch.float64),
        _inputs(kind, rows=7, side=3),
    ]
    x, y = _inputs(kind)
    calls.append((x, y.unsqueeze(1)))  # (B, 1, *S) / (N, 1) labels
    calls.append((x, y.to(torch.uint8)))
    for x, y in calls:
        _assert_same(criterion, functional, x, y, "cpu")
    assert len(criterion._call_plans) == len(calls)


def test_edited_keywords_and_backend_are_seen_by_the_next_call():
    x, y = _inputs("dense")
    criterion = lk.UnifiedFocalLoss(backend="cpu")
    criterion(x, y)
    criterion.kwargs["gamma"] = 0.9
    criterion.kwargs["delta"] = 0.2
    torch.testing.assert_close(criterion(x, y), F.unified_focal_loss(x, y, gamma=0.9, delta=0.2), rtol=0, atol=0)
    criterion.backend = "reference"
    want = F.unified_focal_loss(x, y, gamma=0.9, delta=0.2, backend="reference")
    torch.testing.assert_close(criterion(x, y), want, rtol=0, atol=0)

    rows_x, rows_y = _inputs("rows")
    lmf = lk.LMFLoss(COUNTS, backend="cpu")
    lmf(rows_x, rows_y)
    lmf.options["gamma"] = 0.25
    lmf.options["reduction"] = "sum"
    want = F.lmf_loss(rows_x, rows_y, COUNTS, gamma=0.25, reduction="sum")
    torch.testing.assert_close(lmf(rows_x, rows_y), want, rtol=0, atol=0)
    lmf.options["gamma"] = -1.0  # a bad edit is still refused, plan or not
    with pytest.raises(ValueError, match="gamma must be in"):
        lmf(rows_x, rows_y)


def test_changed_buffers_are_seen_by_the_next_call():
    x, y = _inputs("rows")
    criterion = lk.LMFLoss(COUNTS, backend="cpu")
    criterion(x, y)
    with torch.no_grad():
        criterion.margins.mul_(0.5)  # in place: a new version
    weights = reference.ldam_margins(torch.tensor(COUNTS, dtype=torch.float64), 0.5).float()  # a buffer of its own
    want = reference.row_loss(x, y, weights * 0.5, weights, weights, alpha=1.0, beta=1.0, gamma=1.5, s=30.0,
                              ignore_index=-100, reduction="mean")  # fmt: skip
    torch.testing.assert_close(criterion(x, y), want, rtol=1e-6, atol=1e-6)
    other = lk.LMFLoss([5, 5, 5, 5], backend="cpu")
    criterion.load_state_dict(other.state_dict())  # copy_ into the buffers
    torch.testing.assert_close(criterion(x, y), F.lmf_loss(x, y, [5, 5, 5, 5]), rtol=0, atol=0)

    dense_x, dense_y = _inputs("dense")
    mixed = lk.MixedFocalLoss(alpha=[0.5, 1.0, 1.5, 2.0], backend="cpu")
    mixed(dense_x, dense_y)
    mixed.alpha = torch.tensor([2.0, 1.0, 1.0, 0.25], dtype=torch.float64)  # a replaced buffer
    want = F.mixed_focal_loss(dense_x, dense_y, alpha=[2.0, 1.0, 1.0, 0.25])
    torch.testing.assert_close(mixed(dense_x, dense_y), want, rtol=0, atol=0)


def test_value_checks_run_on_every_replayed_call():
    x, y = _inputs("rows")
    criterion = lk.LMFLoss(COUNTS, backend="cpu")
    criterion(x, y)
    bad = y.clone()
    bad[3] = 4
    with pytest.raises(ValueError, match=r"target labels must be in \[0, 3\] or ignore_index=-100, got values in"):
        criterion(x, bad)

    dense_x, _ = _inputs("dense")
    soft = torch.softmax(torch.randn_like(dense_x), dim=1)
    unified = lk.UnifiedFocalLoss(backend="cpu")
    torch.testing.assert_close(unified(dense_x, soft), F.unified_focal_loss(dense_x, soft), rtol=0, atol=0)
    soft[0, 1, 0, 0] = 1.5
    with pytest.raises(ValueError, match="must have every entry finite and in"):
        unified(dense_x, soft)


TARGET_LAYOUTS = ["labels", "labels_channel", "labels_int8", "bool_map", "int_map", "uint8_map", "soft_map"]


def _target(layout: str, labels: torch.Tensor) -> torch.Tensor:
    one_hot = torch.nn.functional.one_hot(labels, 4).movedim(-1, 1)
    return {
        "labels": labels,
        "labels_channel": labels.unsqueeze(1),
        "labels_int8": labels.to(torch.int8),
        "bool_map": one_hot.bool(),
        "int_map": one_hot.to(torch.int32),
        "uint8_map": one_hot.to(torch.uint8),
        "soft_map": torch.softmax(3 * torch.randn(one_hot.shape), 1),
    }[layout]


@pytest.mark.parametrize("layout", TARGET_LAYOUTS)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_replayed_target_checks_equal_the_full_checks_on_every_layout(layout, backend):
    """A replay checks only the target's values (its signature was checked once): same loss and gradient as
    the functional API on fresh targets of every layout, and the same errors for bad values."""
    unified = lk.UnifiedFocalLoss(backend=backend)
    for _ in range(3):
        x, labels = _inputs("dense")
        _assert_same(
            unified, lambda a, b, name: F.unified_focal_loss(a, b, backend=name), x, _target(layout, labels), backend
        )
    assert len(unified._call_plans) == 1 and next(iter(unified._call_plans.values())).compute is not None
    target = _target(layout, labels)
    if layout.startswith("labels"):
        target.view(-1)[5] = 4
        message = r"target labels must be in \[0, 3\], got values in \[0, 4\]"
    elif layout == "soft_map":
        target[1, 2, 0, 3] = float("nan")
        message = r"must have every entry finite and in \[0, 1\], got NaN entries"
    elif layout == "bool_map":
        return  # a bool map has no bad value
    else:
        target[1, 2, 0, 3] = 2
        message = r"must have every entry finite and in \[0, 1\], got values in \[0, 2\]"
    with pytest.raises(ValueError, match=message):
        F.unified_focal_loss(x, target, backend=backend)
    with pytest.raises(ValueError, match=message):
        unified(x, target)


@pytest.mark.parametrize("backend", BACKENDS)
def test_replayed_calls_keep_the_all_ignored_and_non_finite_rules(backend):
    x, y = _inputs("rows")
    criterion = lk.LMFLoss(COUNTS, backend=backend)
    criterion(x, y)
    ignored = torch.full_like(y, -100)
    loss, grad = _loss_and_grad(criterion, x, ignored)
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0
    poisoned = x.clone()
    poisoned[2, 1] = float("nan")
    assert criterion(poisoned, y).isnan()

    dense_x, dense_y = _inputs("dense")
    unified = lk.UnifiedFocalLoss(backend=backend)
    unified(dense_x, dense_y)
    poisoned = dense_x.clone()
    poisoned[1, 0, 2, 2] = float("inf")
    assert unified(poisoned, dense_y).isnan()


def test_options_are_part_of_the_signature():
    x, y = _inputs("dense")
    criterion = lk.UnifiedFocalLoss(backend="cpu")
    criterion(x, y)
    with lk.options(check_backend=True):
        torch.testing.assert_close(criterion(x, y), F.unified_focal_loss(x, y), rtol=0, atol=0)
    assert len(criterion._call_plans) == 1  # check mode always takes the full path (it compares with the reference)


def test_a_replaced_registry_entry_is_not_replayed(monkeypatch):
    calls = []

    class Recording:
        name = "cpu"

        def unavailable_reason(self, device, dtype):
            return None

        def row_loss(self, *args, **kwargs):
            calls.append("row")
            return reference.row_loss(*args, **kwargs)

        def region_loss(self, *args, **kwargs):
            calls.append("region")
            return reference.region_loss(*args, **kwargs)

    x, y = _inputs("rows")
    criterion = lk.LMFLoss(COUNTS, backend="cpu")
    criterion(x, y)
    monkeypatch.setitem(_backends._loaded, "cpu", Recording())
    criterion(x, y)
    criterion(x, y)
    assert calls == ["row", "row"]


def test_copies_and_pickles_start_without_plans_and_agree():
    x, y = _inputs("dense")
    criterion = lk.MixedFocalLoss(alpha=[0.5, 1.0, 1.5, 2.0], backend="cpu")
    want = criterion(x, y)
    for clone in (copy.deepcopy(criterion), pickle.loads(pickle.dumps(criterion))):
        assert len(clone.__dict__.get("_call_plans", {})) == 0
        torch.testing.assert_close(clone(x, y), want, rtol=0, atol=0)


def test_a_plan_recorded_in_inference_mode_serves_training():
    x, y = _inputs("dense")
    criterion = CASES["mixed_alpha"][0]("cpu")
    with torch.inference_mode():
        criterion(x, y)
    _assert_same(criterion, CASES["mixed_alpha"][1], x, y, "cpu")
    with torch.inference_mode():
        torch.testing.assert_close(criterion(x, y), CASES["mixed_alpha"][1](x, y, "cpu"), rtol=0, atol=0)


def test_a_loss_that_combines_results_is_not_planned(monkeypatch):
    """A criterion whose function post-processes the dispatch's result must run in full every call."""
    x, y = _inputs("dense")
    criterion = lk.DiceLoss(backend="cpu")
    monkeypatch.setattr(lk.DiceLoss, "_function", staticmethod(lambda *a, **k: 2.0 * F.dice_loss(*a, **k)))
    first = criterion(x, y)
    (plan,) = criterion._call_plans.values()
    assert plan.compute is None
    x2, y2 = _inputs("dense")
    torch.testing.assert_close(criterion(x2, y2), 2.0 * F.dice_loss(x2, y2), rtol=0, atol=0)
    torch.testing.assert_close(first, 2.0 * F.dice_loss(x, y), rtol=0, atol=0)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_row_op_gradient_in_eager_mode_equals_the_reference(reduction):
    x, y = _inputs("rows", dtype=torch.float64, rows=11)
    y[4] = -100
    kwargs = dict(weight=torch.tensor([0.3, 1.0, 2.0, 0.7]), gamma=0.7, reduction=reduction)
    got = _loss_and_grad(lambda a, b: F.lmf_loss(a, b, COUNTS, backend="cpu", **kwargs), x, y)
    want = _loss_and_grad(lambda a, b: F.lmf_loss(a, b, COUNTS, backend="reference", **kwargs), x, y)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-12)
    leaf = x.clone().requires_grad_(True)
    loss = F.lmf_loss(leaf, y, COUNTS, backend="cpu", **kwargs).sum()
    with pytest.raises(RuntimeError, match="double backward is not supported by backend 'cpu'.*reference"):
        torch.autograd.grad(loss, leaf, create_graph=True)


def _graph_node_names(tensor):
    names, stack = [], [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None:
            names.append(node.name())
            stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def _region_target(kind, logits):
    """A label map (B, *S) with ignored voxels, or a uint8 (B, C, *S) map: one-hot (softmax) / multi-hot (sigmoid)."""
    num_classes = logits.shape[1]
    labels = torch.randint(0, num_classes, logits.shape[:1] + logits.shape[2:])
    if kind == "labels":
        labels.view(-1)[::7] = 255
        return labels
    if kind == "onehot":
        return torch.nn.functional.one_hot(labels, num_classes).movedim(-1, 1).to(torch.uint8)
    return (torch.rand(logits.shape) < 0.4).to(torch.uint8)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    ("sigmoid", "kind"), [(False, "labels"), (False, "onehot"), (True, "labels"), (True, "multihot")]
)
def test_region_op_gradient_in_eager_mode_equals_the_reference(reduction, dtype, sigmoid, kind):
    x = torch.randn(2, 3, 5, 7, dtype=dtype) * 3
    y = _region_target(kind, x)
    ignore_index = 255 if kind == "labels" else None
    kwargs = dict(delta=0.3, gamma=0.7, sigmoid=sigmoid, reduction=reduction, ignore_index=ignore_index)
    got = _loss_and_grad(lambda a, b: F.unified_focal_loss(a, b, backend="cpu", **kwargs), x, y)
    want = _loss_and_grad(lambda a, b: F.unified_focal_loss(a, b, backend="reference", **kwargs), x, y)
    tolerance = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(got[0], want[0], **tolerance)
    torch.testing.assert_close(got[1], want[1], **tolerance)
    leaf = x.clone().requires_grad_(True)
    loss = F.unified_focal_loss(leaf, y, backend="cpu", **kwargs).sum()
    names = _graph_node_names(loss)
    assert any("FusedLoss" in name for name in names), names  # the C++ node, not the Python formula
    with pytest.raises(RuntimeError, match="double backward is not supported by backend 'cpu'.*reference"):
        torch.autograd.grad(loss, leaf, create_graph=True)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("loss", ["dice", "tversky", "focal_tversky"])
def test_other_region_losses_use_the_cpp_node_and_equal_the_reference(loss):
    function = {"dice": F.dice_loss, "tversky": F.tversky_loss, "focal_tversky": F.focal_tversky_loss}[loss]
    x = torch.randn(3, 4, 6, dtype=torch.float64) * 2
    y = torch.randint(0, 4, (3, 6))
    got = _loss_and_grad(lambda a, b: function(a, b, backend="cpu"), x, y)
    want = _loss_and_grad(lambda a, b: function(a, b, backend="reference"), x, y)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-12)
    assert any("FusedLoss" in name for name in _graph_node_names(function(x.requires_grad_(True), y, backend="cpu")))


def test_the_python_formula_serves_a_library_without_the_autograd_kernel(monkeypatch):
    """An older build (no Autograd kernel for the op, as region_loss_backward has none) takes the Python formula."""
    from lmfloss_kernels import _autograd
    from lmfloss_kernels.ext import ops

    x, y = _inputs("dense", dtype=torch.float64)
    want = _loss_and_grad(lambda a, b: F.unified_focal_loss(a, b, backend="reference"), x, y)
    monkeypatch.setitem(_autograd._EAGER_KERNELS, ops.region_loss_op, (None, "lmfloss_ext::region_loss_backward"))
    got = _loss_and_grad(lambda a, b: F.unified_focal_loss(a, b, backend="cpu"), x, y)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-12)
    leaf = x.clone().requires_grad_(True)
    names = _graph_node_names(F.unified_focal_loss(leaf, y, backend="cpu"))
    assert not any("FusedLoss" in name for name in names), names


def test_a_first_call_with_every_label_ignored_plans_on_the_next_one():
    x, y = _inputs("rows")
    criterion = lk.LMFLoss(COUNTS, backend="cpu")
    assert criterion(x, torch.full_like(y, -100)).item() == 0.0
    assert len(criterion._call_plans) == 0
    _assert_same(criterion, CASES["lmf"][1], x, y, "cpu")
    _assert_same(criterion, CASES["lmf"][1], x, y, "cpu")
    (plan,) = criterion._call_plans.values()
    assert plan.compute is not None


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension is not built")
def test_the_cpp_op_makes_no_node_without_gradients_and_still_refuses_forward_mode_ad():
    """Under no_grad (or for inputs that need no gradient) the C++ autograd kernel runs the op alone; the
    values equal a graph-making call's, and a forward-mode tangent still meets the node's clear error."""
    x, y = _inputs("dense")
    unified = lk.UnifiedFocalLoss(backend="cpu")
    leaf = x.clone().requires_grad_(True)
    with_node = unified(leaf, y)
    assert with_node.grad_fn is not None
    with torch.no_grad():
        without = unified(leaf, y)
    assert not without.requires_grad and without.grad_fn is None
    torch.testing.assert_close(without, with_node.detach(), rtol=0, atol=0)
    torch.testing.assert_close(unified(x, y), with_node.detach(), rtol=0, atol=0)
    with forward_ad.dual_level(), pytest.raises(RuntimeError, match="jvp is not implemented"):
        F.unified_focal_loss(forward_ad.make_dual(x, torch.randn_like(x)), y, backend="cpu")
