"""The extension's custom ops: opcheck, torch.compile, gradcheck, determinism, bad inputs."""

from __future__ import annotations

import pytest
import torch
from test_ext_helpers import assert_close, loss_and_grad, requires_ext

import lmfloss_kernels
from lmfloss_kernels import functional as F
from lmfloss_kernels.ext import CPU_BACKEND, ops

pytestmark = requires_ext


def _row_args(shape=(2, 3, 5, 6), reduction="mean", dtype=torch.float32):
    num_classes = shape[1]
    logits = torch.randn(shape, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, num_classes, shape[:1] + shape[2:])
    labels.view(-1)[::5] = -100
    vector_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    vectors = [torch.rand(num_classes, dtype=vector_dtype) + 0.5 for _ in range(3)]
    return (logits, labels, *vectors, 1.0, 1.0, 1.5, 30.0, -100, reduction)


def _region_args(shape=(2, 3, 5, 6), reduction="mean", soft=False, ignore_index=None, dtype=torch.float32, clip=True):
    num_classes = shape[1]
    logits = torch.randn(shape, dtype=dtype, requires_grad=True)
    if soft:
        target = torch.softmax(torch.randn(shape, dtype=dtype), 1)
    else:
        target = torch.randint(0, num_classes, shape[:1] + shape[2:]).to(torch.uint8)
    vector_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    vectors = [torch.rand(num_classes, dtype=vector_dtype) + 0.2 for _ in range(3)]
    return (logits, target, *vectors, 0.6, 0.5, 0.5, 1e-5, 1e-5, 1e-7, clip, False, ignore_index, reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_opcheck_row(reduction):
    args = _row_args(reduction=reduction)
    torch.library.opcheck(ops.row_loss_op, args)
    torch.library.opcheck(ops.row_loss_op, _row_args(shape=(17, 4), reduction=reduction))
    loss, norms = ops.row_loss_op(*args)
    grad_loss = torch.randn(loss.shape)
    logits, labels, *rest = args
    torch.library.opcheck(
        ops.row_loss_backward_op, (grad_loss, logits.detach(), labels, *rest[:3], norms.detach(), *rest[3:])
    )


@pytest.mark.parametrize(("reduction", "soft"), [("mean", False), ("none", True), ("sum", False)])
def test_opcheck_region(reduction, soft):
    args = _region_args(reduction=reduction, soft=soft, ignore_index=None if soft else 1)
    torch.library.opcheck(ops.region_loss_op, args)
    loss, stats = ops.region_loss_op(*args)
    grad_loss = torch.randn(loss.shape)
    logits, target, *rest = args
    torch.library.opcheck(
        ops.region_loss_backward_op, (grad_loss, logits.detach(), target, *rest[:3], stats.detach(), *rest[3:])
    )


def test_gradcheck_float64():
    logits, labels, *rest = _row_args(shape=(2, 3, 4), dtype=torch.float64)
    rest[-1] = "none"
    assert torch.autograd.gradcheck(lambda x: ops.row_loss_op(x, labels, *rest)[0], (logits,))
    for clip, soft in ((True, False), (False, True)):
        logits, target, *rest = _region_args(shape=(2, 3, 3, 4), dtype=torch.float64, clip=clip, soft=soft)
        rest[-1] = "none"
        # Away from the clip boundaries the function is smooth; gradcheck uses finite differences.
        assert torch.autograd.gradcheck(lambda x, t=target, r=rest: ops.region_loss_op(x, t, *r)[0], (logits,))


def test_compile_fullgraph_unified_focal_criterion():
    criterion = lmfloss_kernels.UnifiedFocalLoss(backend="cpu")
    compiled = torch.compile(criterion, fullgraph=True, backend="aot_eager")
    shape = (2, 3, 6, 5, 4)
    logits = torch.randn(shape)
    target = torch.randint(0, 3, shape[:1] + shape[2:])
    # The registry imports a backend on its first use, which Dynamo cannot trace: use it once.
    criterion(logits, target)
    expected = loss_and_grad(lambda x: lmfloss_kernels.UnifiedFocalLoss(backend="reference")(x, target), logits)
    actual = loss_and_grad(lambda x: compiled(x, target), logits)
    assert_close(actual[0], expected[0], "loss", 1e-5)
    assert_close(actual[1], expected[1], "gradient", 1e-5)


def test_compile_fullgraph_lmf_criterion():
    counts = [50, 10, 3]
    compiled = torch.compile(lmfloss_kernels.LMFLoss(counts, backend="cpu"), fullgraph=True, backend="aot_eager")
    logits = torch.randn(40, 3)
    labels = torch.randint(0, 3, (40,))
    lmfloss_kernels.LMFLoss(counts, backend="cpu")(logits, labels)  # first use imports the backend
    expected = loss_and_grad(lambda x: lmfloss_kernels.LMFLoss(counts, backend="reference")(x, labels), logits)
    actual = loss_and_grad(lambda x: compiled(x, labels), logits)
    assert_close(actual[0], expected[0], "loss", 1e-5)
    assert_close(actual[1], expected[1], "gradient", 1e-5)


def _bitwise_runs(fn, logits, *args, **kwargs):
    results = []
    for threads in (1, 2, 1):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            results.append(loss_and_grad(fn, logits, *args, **kwargs))
        finally:
            torch.set_num_threads(previous)
    return results


def test_deterministic_whatever_the_thread_count():
    # Several chunks per image, so threads really split the work.
    logits = torch.randn(2, 4, 24, 24, 24)
    target = torch.randint(0, 4, (2, 24, 24, 24), dtype=torch.uint8)
    runs = _bitwise_runs(F.unified_focal_loss, logits, target, backend="cpu")
    runs += _bitwise_runs(F.lmf_loss, logits, target.long(), [9, 5, 3, 1], backend="cpu")
    for first, other in zip(runs[0::3], runs[1::3], strict=True):
        assert torch.equal(first[0], other[0]) and torch.equal(first[1], other[1])
    for first, other in zip(runs[0::3], runs[2::3], strict=True):
        assert torch.equal(first[0], other[0]) and torch.equal(first[1], other[1])


def test_bad_inputs_raise_clear_errors():
    logits = torch.randn(2, 3, 4, 5)
    labels = torch.randint(0, 3, (2, 4, 5))
    with pytest.raises(ValueError, match="target labels must be in"):
        F.unified_focal_loss(logits, labels + 3, backend="cpu")
    with pytest.raises(ValueError, match="target must have shape"):
        F.unified_focal_loss(logits, labels[:, :3], backend="cpu")
    with pytest.raises(TypeError, match="logits must be float16"):
        F.focal_loss(logits.long(), labels, backend="cpu")
    with pytest.raises(ValueError, match="backend 'cpu' cannot serve"):
        F.focal_loss(torch.randn(4, 3, device="meta"), torch.zeros(4, dtype=torch.long, device="meta"), backend="cpu")
    # The raw kernels check what they rely on, naming the argument.
    vectors = [torch.ones(3)] * 2
    with pytest.raises(RuntimeError, match="tversky_exponent must have shape"):
        torch.ops.lmfloss_ext.region_loss_forward(
            logits, labels, *vectors, torch.ones(4), 0.6, 0.5, 0.5, 1e-5, 1e-5, 1e-7, True, False, None, 2
        )
    with pytest.raises(RuntimeError, match="C >= 2"):
        torch.ops.lmfloss_ext.row_loss_forward(
            torch.randn(5, 1), torch.zeros(5, dtype=torch.long), *[torch.ones(1)] * 3, 1.0, 1.0, 1.0, 30.0, -100, 2
        )


def test_does_not_write_into_inputs():
    logits, target, *vectors = _region_args(soft=True)[:5]
    logits = logits.detach()
    copies = [t.clone() for t in (logits, target, *vectors)]
    loss_and_grad(
        CPU_BACKEND.region_loss, logits, target, *vectors, delta=0.6, focal_coef=0.5, tversky_coef=0.5,
        smooth_nr=1e-5, smooth_dr=1e-5, eps=1e-7, clip=True, batch=False, ignore_index=None, reduction="mean",
    )  # fmt: skip
    for before, after in zip(copies, (logits, target, *vectors), strict=True):
        assert torch.equal(before, after)


def test_check_mode_accepts_the_cpu_backend():
    logits = torch.randn(2, 3, 5, 4)
    target = torch.randint(0, 3, (2, 5, 4))
    with lmfloss_kernels.options(check_backend=True):
        value = F.mixed_focal_loss(logits, target, backend="cpu")
    assert_close(value, F.mixed_focal_loss(logits, target, backend="reference"), "loss", 1e-5)
