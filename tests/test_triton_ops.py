"""Triton custom ops: opcheck, torch.compile, full writes of every output buffer, check mode."""

from __future__ import annotations

import pytest
import torch
from test_triton_helpers import DEVICE, INTERPRETER_WARNINGS, assert_fp32_close, loss_and_grad, random_grad_output

import lmfloss_kernels
from lmfloss_kernels import _validation, reference
from lmfloss_kernels._backends import resolve_backend
from lmfloss_kernels.functional import BackendMismatchError, lmf_loss, unified_focal_loss
from lmfloss_kernels.triton import BACKEND, _common, ops, region, row

pytestmark = INTERPRETER_WARNINGS


def _row_args(shape=(2, 3, 5, 6), reduction="mean"):
    num_classes = shape[1]
    logits = torch.randn(shape, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, num_classes, shape[:1] + shape[2:], device=DEVICE)
    labels.view(-1)[::5] = -100
    vectors = [torch.rand(num_classes, device=DEVICE) + 0.5 for _ in range(3)]
    return (logits, labels, *vectors, 1.0, 1.0, 1.5, 30.0, -100, reduction)


def _region_args(shape=(2, 3, 5, 6), reduction="mean", soft=False, ignore_index=None):
    num_classes = shape[1]
    logits = torch.randn(shape, device=DEVICE, requires_grad=True)
    if soft:
        target = torch.softmax(torch.randn(shape, device=DEVICE), 1)
    else:
        target = torch.randint(0, num_classes, shape[:1] + shape[2:], device=DEVICE).to(torch.uint8)
    vectors = [torch.rand(num_classes, device=DEVICE) + 0.2 for _ in range(3)]
    return (logits, target, *vectors, 0.6, 0.5, 0.5, 1e-5, 1e-5, 1e-7, True, False, ignore_index, reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 6), (17, 4)])
def test_opcheck_row(shape, reduction):
    args = _row_args(shape=shape, reduction=reduction)
    torch.library.opcheck(ops.row_loss_op, args)
    loss, norms = ops.row_loss_op(*args)
    grad_loss = random_grad_output(loss.shape)
    logits, labels, *rest = args
    torch.library.opcheck(ops.row_backward_op, (grad_loss, logits.detach(), labels, norms, *rest))


@pytest.mark.parametrize(("reduction", "soft"), [("mean", False), ("none", True), ("sum", False)])
def test_opcheck_region(reduction, soft):
    args = _region_args(reduction=reduction, soft=soft, ignore_index=None if soft else 1)
    torch.library.opcheck(ops.region_forward_op, args)
    loss, stats = ops.region_forward_op(*args)
    grad_loss = random_grad_output(loss.shape)
    logits, target, *rest = args
    torch.library.opcheck(ops.region_backward_op, (grad_loss, logits.detach(), target, stats.detach(), *rest))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_row_backward_is_one_kernel_pass(reduction):
    # The forward keeps only [W, n]: no gradient-sized buffer, and backward gets no materialised
    # zeros for that output (a gradient-sized torch.zeros plus a multiply pass, before). The
    # gradient of the op itself, for a random grad_output, is the reference's.
    logits, labels, margins, ldam_weight, focal_weight, *options = _row_args(reduction=reduction)
    loss, norms = ops.row_loss_op(logits, labels, margins, ldam_weight, focal_weight, *options)
    assert norms.numel() == (2 if reduction == "mean" else 0) and not norms.requires_grad
    kwargs = dict(zip(("alpha", "beta", "gamma", "s", "ignore_index", "reduction"), options, strict=True))
    grad_output = random_grad_output(labels.shape if reduction == "none" else ())
    expected = loss_and_grad(
        reference.row_loss, logits, labels, margins, ldam_weight, focal_weight, grad_output=grad_output, **kwargs
    )
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        actual = loss_and_grad(
            lambda x: ops.row_loss_op(x, labels, margins, ldam_weight, focal_weight, *options)[0],
            logits,
            grad_output=grad_output,
        )
    names = {event.name for event in profile.events()}
    assert "aten::zeros" not in names and "aten::mul" not in names, sorted(names)
    assert_fp32_close(actual[0], expected[0], "loss")
    assert_fp32_close(actual[1], expected[1], "gradient")


def _poison(monkeypatch):
    """Every buffer the kernels fill starts as NaN: any element a program forgets to write shows."""

    def empty(shape, *, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    def empty_like(x):
        return torch.full_like(x, float("nan"))

    for module in (_common, row, region):
        monkeypatch.setattr(module, "empty", empty, raising=False)
    monkeypatch.setattr(_common, "empty_like", empty_like)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(33, 5), (2, 3, 7, 9, 11)])
def test_row_outputs_fully_written(monkeypatch, shape, reduction):
    _poison(monkeypatch)
    logits, labels, *vectors = _row_args(shape)[:5]
    kwargs = dict(alpha=1.0, beta=1.0, gamma=1.5, s=30.0, ignore_index=-100, reduction=reduction)
    grad_output = random_grad_output(labels.shape if reduction == "none" else ())
    expected = loss_and_grad(reference.row_loss, logits, labels, *vectors, grad_output=grad_output, **kwargs)
    actual = loss_and_grad(BACKEND.row_loss, logits, labels, *vectors, grad_output=grad_output, **kwargs)
    assert_fp32_close(actual[0], expected[0], "loss")
    assert_fp32_close(actual[1], expected[1], "gradient")


@pytest.mark.parametrize(("reduction", "soft", "ignore_index"), [("mean", False, 2), ("none", True, None)])
@pytest.mark.parametrize("shape", [(2, 3, 7, 9, 11), (1, 5, 13, 3)])
def test_region_outputs_fully_written(monkeypatch, shape, reduction, soft, ignore_index):
    _poison(monkeypatch)
    logits, target, *vectors = _region_args(shape, soft=soft)[:5]
    options = dict(
        delta=0.6, focal_coef=0.5, tversky_coef=0.5, smooth_nr=1e-5, smooth_dr=1e-5, eps=1e-7, clip=True,
        batch=False, ignore_index=ignore_index, reduction=reduction,
    )  # fmt: skip
    grad_output = random_grad_output((shape[0],) if reduction == "none" else ())
    expected = loss_and_grad(reference.region_loss, logits, target, *vectors, grad_output=grad_output, **options)
    actual = loss_and_grad(BACKEND.region_loss, logits, target, *vectors, grad_output=grad_output, **options)
    assert_fp32_close(actual[0], expected[0], "loss")
    assert_fp32_close(actual[1], expected[1], "gradient")


def _skip_label_check_while_tracing(monkeypatch):
    # The foundation's CPU label-range check reads tensor data (int(labels.min())), which a
    # fullgraph trace cannot do; the criterion is compiled with that check off while tracing.
    original = _validation.check_label_range

    def check(*args):
        if not torch.compiler.is_compiling():
            original(*args)

    monkeypatch.setattr(_validation, "check_label_range", check)
    # The registry imports a backend lazily (importlib), which a trace cannot do: load it first.
    resolve_backend("triton", torch.zeros(1, 2, device=DEVICE))


def test_compile_fullgraph_unified_focal_criterion(monkeypatch):
    _skip_label_check_while_tracing(monkeypatch)
    criterion = lmfloss_kernels.UnifiedFocalLoss(backend="triton")
    compiled = torch.compile(criterion, fullgraph=True)
    shape = (2, 3, 6, 5, 4)
    logits = torch.randn(shape, device=DEVICE)
    target = torch.randint(0, 3, shape[:1] + shape[2:], device=DEVICE)
    expected = loss_and_grad(lambda x: lmfloss_kernels.UnifiedFocalLoss(backend="reference")(x, target), logits)
    actual = loss_and_grad(lambda x: compiled(x, target), logits)
    assert_fp32_close(actual[0], expected[0], "loss")
    assert_fp32_close(actual[1], expected[1], "gradient")


def test_compile_fullgraph_lmf_criterion(monkeypatch):
    _skip_label_check_while_tracing(monkeypatch)
    counts = [50, 10, 3]
    compiled = torch.compile(lmfloss_kernels.LMFLoss(counts, backend="triton"), fullgraph=True, backend="aot_eager")
    logits = torch.randn(40, 3, device=DEVICE)
    labels = torch.randint(0, 3, (40,), device=DEVICE)
    expected = loss_and_grad(lambda x: lmfloss_kernels.LMFLoss(counts, backend="reference")(x, labels), logits)
    actual = loss_and_grad(lambda x: compiled(x, labels), logits)
    assert_fp32_close(actual[0], expected[0], "loss")
    assert_fp32_close(actual[1], expected[1], "gradient")


def test_check_mode_passes_and_catches_a_wrong_kernel(monkeypatch):
    shape = (2, 3, 5, 6)
    logits = torch.randn(shape, device=DEVICE, requires_grad=True)
    target = torch.randint(0, 3, shape[:1] + shape[2:], device=DEVICE)
    with lmfloss_kernels.options(check_backend=True):
        unified_focal_loss(logits, target, backend="triton").backward()
        lmf_loss(logits, target, [10, 5, 1], backend="triton").backward()
        original = region.region_forward

        def off_by_one_percent(*args):
            loss, stats = original(*args)
            return loss * 1.01, stats

        monkeypatch.setattr(region, "region_forward", off_by_one_percent)
        with pytest.raises(BackendMismatchError, match="triton"):
            unified_focal_loss(logits, target, backend="triton")
