"""``backend="cuda"`` (the extension's CUDA kernels) against the eager reference, on a GPU.

The same checks as the CPU tests on CUDA tensors: rows and regions, every reduction with a
random ``grad_output``, ignore_index, batch, clip on/off, soft targets, strided layouts, low
precision, bitwise determinism, opcheck. They need a CUDA device and a library built with CUDA
kernels (``FORCE_CUDA=1`` or a visible GPU at build time); elsewhere they are skipped with the
reason, and the CUDA build gate (``test_cuda_build.py``) still compiles the kernels.
"""

from __future__ import annotations

import pytest
import torch
from test_ext_helpers import compare_with_reference, loss_and_grad

from lmfloss_kernels import reference
from lmfloss_kernels.ext import CUDA_BACKEND, ops

_REASON = CUDA_BACKEND.unavailable_reason(torch.device("cuda"), torch.float32)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=f"cuda backend: {_REASON}")]


def _row_inputs(shape, dtype=torch.float32):
    num_classes = shape[1]
    logits = (3 * torch.randn(shape, dtype=torch.float64)).to(dtype).cuda()
    labels = torch.randint(0, num_classes, shape[:1] + shape[2:])
    labels.view(-1)[::5] = -100
    vector_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    vectors = [(torch.rand(num_classes, dtype=vector_dtype) + 0.2).cuda() for _ in range(3)]
    return logits, labels.cuda(), *vectors


def _region_inputs(shape, dtype=torch.float32, soft=False):
    num_classes = shape[1]
    logits = (3 * torch.randn(shape, dtype=torch.float64)).to(dtype).cuda()
    if soft:
        target = torch.softmax(2 * torch.randn(shape), 1).cuda()
    else:
        target = torch.randint(0, num_classes, shape[:1] + shape[2:], dtype=torch.uint8).cuda()
    vector_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    weight = torch.rand(num_classes, dtype=vector_dtype) + 0.2
    gamma = torch.tensor([0.5, 0.0, 2.0, 1.0] * num_classes, dtype=vector_dtype)[:num_classes]
    exponent = torch.tensor([1.0, 0.5, 0.75, 0.0] * num_classes, dtype=vector_dtype)[:num_classes]
    return logits, target, weight.cuda(), gamma.cuda(), exponent.cuda()


def _region_options(**changes):
    options = dict(
        delta=0.6, focal_coef=0.5, tversky_coef=0.5, smooth_nr=1e-7, smooth_dr=1e-7, eps=1e-7, clip=True,
        batch=False, ignore_index=None, reduction="mean",
    )  # fmt: skip
    options.update(changes)
    return options


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(1000, 5), (2, 3, 17, 9, 11)])
def test_rows_match_reference(shape, reduction, dtype):
    logits, labels, *vectors = _row_inputs(shape, dtype)
    grad_output = torch.randn(labels.shape if reduction == "none" else (), device="cuda")
    kwargs = dict(alpha=1.0, beta=1.0, gamma=1.5, s=30.0, ignore_index=-100, reduction=reduction)
    compare_with_reference(
        reference.row_loss, CUDA_BACKEND.row_loss, logits, labels, *vectors, grad_output=grad_output, **kwargs
    )


CASES = [
    dict(),
    dict(clip=False, reduction="none"),
    dict(batch=True, ignore_index=1, reduction="sum"),
    dict(focal_coef=0.0, tversky_coef=1.0),
    dict(focal_coef=1.0, tversky_coef=0.0, ignore_index=0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("shape", [(2, 3, 17, 9, 11), (1, 12, 40, 33)])
def test_regions_match_reference(shape, case, dtype):
    options = _region_options(**case)
    logits, target, *vectors = _region_inputs(shape, dtype)
    grad_output = torch.randn((shape[0],) if options["reduction"] == "none" else (), device="cuda")
    compare_with_reference(
        reference.region_loss, CUDA_BACKEND.region_loss, logits, target, *vectors, grad_output=grad_output, **options
    )


def test_regions_soft_targets_and_channels_last():
    logits, target, *vectors = _region_inputs((2, 4, 9, 10, 11), soft=True)
    options = _region_options()
    compare_with_reference(reference.region_loss, CUDA_BACKEND.region_loss, logits, target, *vectors, **options)
    labels = target.argmax(1).to(torch.uint8)
    channels_last = logits.contiguous(memory_format=torch.channels_last_3d)
    compare_with_reference(
        reference.region_loss, CUDA_BACKEND.region_loss, channels_last, labels, *vectors, **_region_options()
    )


def test_bitwise_deterministic():
    logits, target, *vectors = _region_inputs((2, 4, 64, 64, 32))
    first = loss_and_grad(CUDA_BACKEND.region_loss, logits, target, *vectors, **_region_options(batch=True))
    second = loss_and_grad(CUDA_BACKEND.region_loss, logits, target, *vectors, **_region_options(batch=True))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    logits, labels, *vectors = _row_inputs((4, 8, 64, 64))
    kwargs = dict(alpha=1.0, beta=1.0, gamma=1.5, s=30.0, ignore_index=-100, reduction="mean")
    first = loss_and_grad(CUDA_BACKEND.row_loss, logits, labels, *vectors, **kwargs)
    second = loss_and_grad(CUDA_BACKEND.row_loss, logits, labels, *vectors, **kwargs)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_opcheck_cuda():
    logits, labels, *vectors = _row_inputs((2, 3, 5, 6))
    args = (logits.requires_grad_(), labels, *vectors, 1.0, 1.0, 1.5, 30.0, -100, "none")
    torch.library.opcheck(ops.row_loss_op, args)
    logits, target, *vectors = _region_inputs((2, 3, 5, 6))
    args = (logits.requires_grad_(), target, *vectors, 0.6, 0.5, 0.5, 1e-5, 1e-5, 1e-7, True, False, 1, "mean")
    torch.library.opcheck(ops.region_loss_op, args)
