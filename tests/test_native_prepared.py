"""The call plans' native prepared calls (csrc/prepared.cpp): target check and op call in one C++ call.

A native call must give exactly the plan's Python replay: the same loss and gradient when the
target passes, and ``None`` (so that the replay runs, with the package's errors and rules) whenever
it does not or when the native scan cannot read it. The scan's verdicts are checked against the
Python checks of ``_validation`` (and numpy) on random labels of every integer dtype, with and
without an ignore_index that the dtype can or cannot hold, on both sides of its serial size.
No timing: ``bench/overhead.py`` measures what this saves.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import lmfloss_kernels as lk
from lmfloss_kernels import _validation, ext, reference
from lmfloss_kernels import functional as F
from lmfloss_kernels._plans import TargetReplay

pytestmark = pytest.mark.skipif(
    "cpu" not in lk.available_backends("cpu") or not ext.NATIVE_PREPARED_CALLS,
    reason="the C++ extension is not built",
)

LIBRARY = ext._LIBRARY
COUNTS = [90, 40, 11, 3]


def _plan(criterion):
    (plan,) = criterion._call_plans.values()
    return plan


def _loss_and_grad(fn, x, y):
    leaf = x.detach().clone().requires_grad_(True)
    loss = fn(leaf, y)
    loss.sum().backward()
    return loss.detach(), leaf.grad


def _assert_same(criterion, functional, x, y):
    got = _loss_and_grad(criterion, x, y)
    want = _loss_and_grad(functional, x, y)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


def _row_call(classes: int, ignore_index: int | None, *, coverage: bool = True, inspect: bool = True):
    replay = TargetReplay(
        dense=False, squeeze=False, inspect=inspect, classes=classes, ignore_index=ignore_index,
        every_ignored_to_python=coverage,
    )  # fmt: skip
    weights = torch.ones(classes)
    return LIBRARY.PreparedRowLoss(
        LIBRARY.TargetReplay(*replay), weights * 0.1, weights, weights, 1.0, 1.0, 1.5, 30.0,
        -1 if ignore_index is None else ignore_index, 1,
    )  # fmt: skip


def _row_reference(x: torch.Tensor, labels: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    """What _row_call computes, by the eager reference."""
    weights = torch.ones(x.shape[1])
    return reference.row_loss(
        x, labels.long(), weights * 0.1, weights, weights, alpha=1.0, beta=1.0, gamma=1.5, s=30.0,
        ignore_index=-1 if ignore_index is None else ignore_index, reduction="sum",
    )  # fmt: skip


def _python_verdict(labels: torch.Tensor, classes: int, ignore_index: int | None) -> str:
    try:
        every_ignored = _validation.check_label_range(labels, classes, ignore_index)
    except ValueError:
        return "bad"
    return "every_ignored" if every_ignored else "pass"


def _numpy_verdict(labels: np.ndarray, classes: int, ignore_index: int | None) -> str:
    values = labels.astype(np.int64)
    ignored = np.zeros(values.shape, bool) if ignore_index is None else values == ignore_index
    if ignored.all():
        return "every_ignored"
    kept = values[~ignored]
    return "pass" if kept.min() >= 0 and kept.max() < classes else "bad"


DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ignore_index", [None, -100, 255, 3, 70000])
def test_the_label_scan_decides_as_the_python_check_and_numpy(dtype, ignore_index):
    """Random label vectors (in range, with ignored entries, all ignored, with strays): the native call
    answers a loss exactly when the Python check passes and finds some label not ignored."""
    generator = torch.Generator().manual_seed(DTYPES.index(dtype) * 1000 + (ignore_index or 0) % 997)
    classes = 2 if dtype == torch.bool else 5
    call = _row_call(classes, ignore_index)
    seen = set()
    for trial in range(40):
        n = int(torch.randint(1, 50, (), generator=generator))
        low, high = (0, 2) if dtype == torch.bool else (-3 if dtype.is_signed else 0, classes + 3)
        labels = torch.randint(low, high, (n,), generator=generator)
        if trial % 4 == 0:
            labels = labels.clamp(0, classes - 1)  # in range
        if ignore_index is not None and trial % 3 == 0:
            fill = torch.rand(n, generator=generator) < (1.0 if trial % 9 == 0 else 0.4)
            labels = torch.where(fill, torch.tensor(ignore_index), labels)
        info = torch.iinfo(dtype) if dtype != torch.bool else None
        if info is not None and ((labels < info.min) | (labels > info.max)).any():
            continue  # not representable in this dtype: nothing to test
        labels = labels.to(dtype)
        verdict = _python_verdict(labels, classes, ignore_index)
        assert verdict == _numpy_verdict(labels.numpy(), classes, ignore_index)
        seen.add(verdict)
        x = torch.randn(n, classes)
        native = call(x, labels)
        if verdict == "pass":
            want = _row_reference(x, labels, ignore_index)
            assert native is not None
            torch.testing.assert_close(native.double(), want.double(), rtol=1e-5, atol=1e-5)
        else:
            assert native is None, (verdict, labels)
    assert "pass" in seen


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_the_scan_of_a_large_target_reads_every_chunk(dtype):
    """Past the serial size the scan runs in chunks (on threads): a stray in the last chunk, or every label
    ignored but one in the first, is still seen."""
    n = (1 << 21) + 77
    labels = torch.randint(0, 3, (n,)).to(dtype)
    x = torch.randn(n, 3)
    call = _row_call(3, 255)
    assert call(x, labels) is not None
    labels[-1] = 7
    assert call(x, labels) is None
    labels.fill_(255)
    assert call(x, labels) is None  # every label ignored: decided upstream
    labels[3] = 1
    assert call(x, labels) is not None
    region = _row_call(3, 255, coverage=False)
    labels[3] = 255
    assert region(x, labels) is not None  # every label ignored, left to the kernels (the region rule)


def test_the_soft_map_scan_refuses_what_the_python_check_refuses():
    replay = TargetReplay(dense=True, squeeze=False, inspect=True, classes=3, ignore_index=None,
                          every_ignored_to_python=False)  # fmt: skip
    ones = torch.ones(3)
    arguments = (ones, ones * 2, ones * 0.75, 0.6, 0.5, 0.5, 1e-6, 1e-6, 1e-7, True, False, None, 2, False)
    call = LIBRARY.PreparedRegionLoss(LIBRARY.TargetReplay(*replay), *arguments)
    x = torch.randn(2, 3, 4, 5)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.bool):
        target = torch.softmax(torch.randn(2, 3, 4, 5), 1)
        target = (target > 0.3) if dtype == torch.bool else (target > 0.3).to(dtype) if dtype == torch.uint8 else target
        target = target.to(dtype)
        want, _ = torch.ops.lmfloss_ext.region_loss_forward(x, target, *arguments)
        torch.testing.assert_close(call(x, target), want, rtol=0, atol=0)
        if dtype == torch.bool:
            continue
        for bad in (2, -0.25, float("nan"), float("inf")):
            if dtype == torch.uint8 and bad != 2:
                continue
            spoiled = target.clone()
            spoiled[1, 2, 3, 4] = bad
            with pytest.raises(ValueError):
                _validation.check_soft_range(spoiled)
            assert call(x, spoiled) is None


LAYOUTS = {
    "labels": lambda y: y,
    "labels_channel": lambda y: y.unsqueeze(1),
    "labels_uint8": lambda y: y.to(torch.uint8),
    "labels_int8": lambda y: y.to(torch.int8),
    "bool_map": lambda y: torch.nn.functional.one_hot(y, 4).movedim(-1, 1).bool(),
    "uint8_map": lambda y: torch.nn.functional.one_hot(y, 4).movedim(-1, 1).to(torch.uint8).contiguous(),
    "soft_map": lambda y: torch.softmax(3 * torch.randn(y.shape[0], 4, *y.shape[1:]), 1),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_criteria_replay_natively_and_equal_the_functional_api(layout):
    unified = lk.UnifiedFocalLoss(backend="cpu")
    for _ in range(3):
        x = torch.randn(2, 4, 5, 6) * 3
        target = LAYOUTS[layout](torch.randint(0, 4, (2, 5, 6)))
        _assert_same(unified, lambda a, b: F.unified_focal_loss(a, b, backend="cpu"), x, target)
    assert _plan(unified).native is not None


def test_an_integer_dense_map_is_converted_by_the_python_replay():
    """int32 0/1 maps are converted to uint8 each call: that replay stays in Python."""
    unified = lk.UnifiedFocalLoss(backend="cpu")
    x = torch.randn(2, 4, 5, 6)
    target = torch.nn.functional.one_hot(torch.randint(0, 4, (2, 5, 6)), 4).movedim(-1, 1).to(torch.int32)
    for _ in range(2):
        _assert_same(unified, lambda a, b: F.unified_focal_loss(a, b, backend="cpu"), x, target)
    assert _plan(unified).native is None and _plan(unified).compute is not None


def test_ignored_labels_bad_labels_and_every_label_ignored_through_a_native_plan():
    lmf = lk.LMFLoss(COUNTS, backend="cpu")
    functional = lambda a, b: F.lmf_loss(a, b, COUNTS)  # noqa: E731
    x = torch.randn(17, 4)
    y = torch.randint(0, 4, (17,))
    _assert_same(lmf, functional, x, y)
    assert _plan(lmf).native is not None
    y[[2, 9]] = -100
    _assert_same(lmf, functional, x, y)  # some ignored
    loss, grad = _loss_and_grad(lmf, x, torch.full_like(y, -100))  # every one: the rule, not 0 / 0
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0
    y[4] = 4
    with pytest.raises(ValueError, match=r"target labels must be in \[0, 3\] or ignore_index=-100, got values in"):
        lmf(x, y)

    dice = lk.DiceLoss(ignore_index=255, backend="cpu")
    functional = lambda a, b: F.dice_loss(a, b, ignore_index=255)  # noqa: E731
    dense_x = torch.randn(2, 4, 6, 7)
    labels = torch.randint(0, 4, (2, 6, 7), dtype=torch.uint8)
    _assert_same(dice, functional, dense_x, labels)
    assert _plan(dice).native is not None
    labels[0, :3] = 255
    _assert_same(dice, functional, dense_x, labels)
    _assert_same(dice, functional, dense_x, torch.full_like(labels, 255))  # every one ignored: the kernels' rule
    labels[1, 2, 2] = 9
    with pytest.raises(ValueError, match=r"target labels must be in \[0, 3\] or ignore_index=255, got values in"):
        dice(dense_x, labels)


def test_non_contiguous_targets_take_the_python_replay():
    unified = lk.UnifiedFocalLoss(backend="cpu")
    x = torch.randn(2, 4, 5, 6)
    labels = torch.randint(0, 4, (2, 6, 5)).transpose(1, 2)
    _assert_same(unified, lambda a, b: F.unified_focal_loss(a, b, backend="cpu"), x, labels)
    plan = _plan(unified)
    assert plan.native is not None and plan.native(x, labels) is None
    _assert_same(unified, lambda a, b: F.unified_focal_loss(a, b, backend="cpu"), x, labels)
    labels[0, 0, 0] = 6
    with pytest.raises(ValueError, match=r"got values in \[0, 6\]"):
        unified(x, labels)


class _Logged:
    """A Python mode that records the name of every function it sees and runs it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def _record(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


class _FunctionLog(_Logged, TorchFunctionMode):
    __torch_function__ = _Logged._record


class _DispatchLog(_Logged, TorchDispatchMode):
    __torch_dispatch__ = _Logged._record


@pytest.mark.parametrize(
    "mode, make, inputs, op",
    [
        (_FunctionLog, lambda: lk.UnifiedFocalLoss(backend="cpu"), "dense", "region_loss_forward"),
        (_DispatchLog, lambda: lk.LMFLoss(COUNTS, backend="cpu"), "rows", "lmfloss"),
    ],
    ids=["torch_function", "dispatch"],
)
def test_a_python_mode_sees_the_ops_of_the_python_replay(mode, make, inputs, op):
    criterion = make()
    if inputs == "rows":
        x, y = torch.randn(9, 4), torch.randint(0, 4, (9,))
    else:
        x, y = torch.randn(2, 4, 5, 6), torch.randint(0, 4, (2, 5, 6))
    want = criterion(x, y)
    criterion(x, y)
    assert _plan(criterion).native is not None
    with mode() as log:
        got = criterion(x, y)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert any(op in name for name in log.names), log.names


def test_forward_mode_ad_through_a_native_plan_is_refused():
    lmf = lk.LMFLoss(COUNTS, backend="cpu")
    x = torch.randn(9, 4)
    y = torch.randint(0, 4, (9,))
    lmf(x, y)
    lmf(x, y)
    assert _plan(lmf).native is not None
    with forward_ad.dual_level(), pytest.raises(RuntimeError, match="jvp is not implemented"):
        lmf(forward_ad.make_dual(x, torch.randn_like(x)), y)


def test_values_not_inspected_are_not_read():
    """Where the plan does not read values (an accelerator without check_labels), neither does the native call:
    a stray label reaches the kernels, which mask it (the replay's contract, here on CPU tensors)."""
    call = _row_call(4, -100, inspect=False)
    x = torch.randn(6, 4)
    labels = torch.tensor([0, 1, 2, 3, 9, -5])
    got = call(x, labels)
    want = _row_reference(x[:4], labels[:4], -100)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
