"""Triton row family (LMF, LDAM, focal on (N, C) rows and dense (B, C, *S) maps) against the reference."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from test_triton_helpers import (
    DEVICE,
    INTERPRETER_WARNINGS,
    assert_fp32_close,
    assert_no_worse_than_reference,
    loss_and_grad,
    random_grad_output,
)

import lmfloss_kernels.functional as F
from lmfloss_kernels import reference
from lmfloss_kernels.triton import BACKEND, _common, row

pytestmark = INTERPRETER_WARNINGS

# (alpha, beta, gamma): LMF with the authors' gamma, LDAM alone, focal alone with gamma < 1 and 0.
TERMS = {
    "lmf": (1.5, 1.0, 1.5),
    "ldam": (1.0, 0.0, 0.0),
    "focal_half": (0.0, 1.0, 0.5),
    "lmf_gamma0": (1.0, 2.0, 0.0),
}


def _row_inputs(shape, label_dtype=torch.int64, ignore_index=-100, ignore_fraction=0.2, scale=3.0):
    num_classes = shape[1]
    logits = torch.randn(shape, device=DEVICE) * scale
    label_shape = shape[:1] + shape[2:]
    labels = torch.randint(0, num_classes, label_shape, device=DEVICE)
    drop = torch.rand(label_shape, device=DEVICE) < ignore_fraction
    labels = torch.where(drop, torch.full_like(labels, ignore_index), labels).to(label_dtype)
    margins = torch.rand(num_classes, device=DEVICE) * 0.5
    ldam_weight = torch.rand(num_classes, device=DEVICE) + 0.5
    focal_weight = torch.rand(num_classes, device=DEVICE) + 0.5
    return logits, labels, margins, ldam_weight, focal_weight


def _compare(logits, labels, margins, ldam_weight, focal_weight, terms, reduction, ignore_index=-100, s=30.0):
    alpha, beta, gamma = TERMS[terms]
    kwargs = dict(alpha=alpha, beta=beta, gamma=gamma, s=s, ignore_index=ignore_index, reduction=reduction)
    args = (labels, margins, ldam_weight, focal_weight)
    loss_shape = labels.shape if reduction == "none" else ()
    grad_output = random_grad_output(loss_shape)
    expected = loss_and_grad(reference.row_loss, logits, *args, grad_output=grad_output, **kwargs)
    actual = loss_and_grad(BACKEND.row_loss, logits, *args, grad_output=grad_output, **kwargs)
    assert actual[0].dtype == torch.float32 and actual[1].dtype == logits.dtype
    assert_fp32_close(actual[0], expected[0], "loss")
    assert_fp32_close(actual[1], expected[1], "gradient")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("terms", list(TERMS))
@pytest.mark.parametrize("shape", [(37, 5), (64, 2), (2, 3, 9, 10, 11), (3, 4, 13)])
def test_rows_match_reference(shape, terms, reduction):
    _compare(*_row_inputs(shape), terms, reduction)


@pytest.mark.parametrize("num_classes", [3, 32, 33])
def test_many_classes_not_a_power_of_two(num_classes):
    _compare(*_row_inputs((45, num_classes)), "lmf", "mean")


@pytest.mark.parametrize(
    ("label_dtype", "ignore_index"),
    [(torch.uint8, 255), (torch.int8, -1), (torch.int16, -100), (torch.int32, -100), (torch.int64, 7)],
)
def test_label_dtypes_and_ignore_index(label_dtype, ignore_index):
    inputs = _row_inputs((2, 4, 6, 7), label_dtype=label_dtype, ignore_index=ignore_index, ignore_fraction=0.3)
    assert bool((inputs[1] == ignore_index).any())
    _compare(*inputs, "lmf", "mean", ignore_index=ignore_index)
    _compare(*inputs, "lmf", "none", ignore_index=ignore_index)


def test_bool_labels():
    logits, labels, *vectors = _row_inputs((50, 2), ignore_fraction=0.0)
    _compare(logits, labels.bool(), *vectors, "lmf", "mean")


@pytest.mark.parametrize("layout", ["transposed_rows", "channels_last", "sliced", "expanded"])
def test_strided_logits(layout):
    if layout == "transposed_rows":
        logits = torch.randn(5, 40, device=DEVICE).t()  # (40, 5) with class stride 40
    elif layout == "channels_last":
        logits = torch.randn(2, 3, 6, 7, 5, device=DEVICE).to(memory_format=torch.channels_last_3d)
    elif layout == "sliced":
        logits = torch.randn(2, 6, 9, 14, device=DEVICE)[:, ::2, :, ::2]
    else:
        logits = torch.randn(1, 3, 8, 9, device=DEVICE).expand(3, 3, 8, 9)
    _, labels, *vectors = _row_inputs(tuple(logits.shape))
    _compare(logits, labels, *vectors, "lmf", "none")
    _compare(logits, labels, *vectors, "lmf", "mean")


def test_confident_rows_stay_finite_and_exact():
    # Scaled logits with margins of s = 30: q is one-hot to float32 precision on most rows, and
    # p_t -> 1 exercises the series branch of the focal factor.
    logits, labels, *vectors = _row_inputs((200, 4), ignore_fraction=0.0, scale=12.0)
    _compare(logits, labels, *vectors, "lmf", "sum")
    _compare(logits, labels, *vectors, "focal_half", "none")


def test_all_rows_ignored():
    logits, labels, *vectors = _row_inputs((20, 3), ignore_fraction=1.0)
    for reduction in ("sum", "none"):
        loss, grad = loss_and_grad(
            BACKEND.row_loss, logits, labels, *vectors, alpha=1.0, beta=1.0, gamma=1.5, s=30.0,
            ignore_index=-100, reduction=reduction,
        )  # fmt: skip
        assert bool((loss == 0).all()) and bool((grad == 0).all())
    # "mean" is 0 / 0 = NaN, as in the reference and cross_entropy; the gradient (n = 0 rows
    # divide it) is the reference's NaN too, not some finite value that would hide the empty batch.
    kwargs = dict(alpha=1.0, beta=1.0, gamma=1.5, s=30.0, ignore_index=-100, reduction="mean")
    for alpha in (1.0, 0.0):
        expected = loss_and_grad(reference.row_loss, logits, labels, *vectors, **{**kwargs, "alpha": alpha})
        actual = loss_and_grad(BACKEND.row_loss, logits, labels, *vectors, **{**kwargs, "alpha": alpha})
        assert bool(actual[0].isnan()) and bool(expected[0].isnan())
        torch.testing.assert_close(actual[1], expected[1], equal_nan=True)


def test_no_grad_call_gives_the_same_loss():
    logits, labels, *vectors = _row_inputs((2, 3, 5, 6))
    kwargs = dict(alpha=1.0, beta=1.0, gamma=1.5, s=30.0, ignore_index=-100, reduction="mean")
    with torch.no_grad():
        fused = BACKEND.row_loss(logits, labels, *vectors, **kwargs)
    assert_fp32_close(fused, reference.row_loss(logits, labels, *vectors, **kwargs), "loss")


def test_logits_are_not_modified():
    logits, labels, *vectors = _row_inputs((30, 4))
    before = logits.clone()
    loss_and_grad(BACKEND.row_loss, logits, labels, *vectors, alpha=1.0, beta=1.0, gamma=1.5, s=30.0,
                  ignore_index=-100, reduction="mean")  # fmt: skip
    assert torch.equal(logits, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("shape", [(64, 5), (2, 3, 7, 9)])
def test_low_precision_no_worse_than_reference_in_that_dtype(shape, dtype, reduction):
    logits, labels, *vectors = _row_inputs(shape)
    logits = logits.to(dtype)
    kwargs = dict(alpha=1.0, beta=1.0, gamma=1.5, s=30.0, ignore_index=-100, reduction=reduction)
    grad_output = random_grad_output(labels.shape if reduction == "none" else ())
    truth = loss_and_grad(
        reference.row_loss, logits.double(), labels, *(v.double() for v in vectors), grad_output=grad_output.double(),
        **kwargs,
    )  # fmt: skip
    same = loss_and_grad(reference.row_loss, logits, labels, *vectors, grad_output=grad_output.to(dtype),
                         upcast=False, **kwargs)  # fmt: skip
    fused = loss_and_grad(BACKEND.row_loss, logits, labels, *vectors, grad_output=grad_output, **kwargs)
    assert fused[1].dtype == dtype
    assert_no_worse_than_reference(fused[0], same[0], truth[0], dtype, "loss")
    assert_no_worse_than_reference(fused[1], same[1], truth[1], dtype, "gradient")


@pytest.mark.parametrize("name", ["lmf", "ldam", "focal"])
def test_public_api_on_triton(name):
    logits, labels, *_ = _row_inputs((2, 4, 5, 6), ignore_fraction=0.1)
    counts = [100, 20, 5, 1]
    calls = {
        "lmf": lambda x, backend: F.lmf_loss(x, labels, counts, backend=backend),
        "ldam": lambda x, backend: F.ldam_loss(x, labels, counts, weight=F.drw_weights(counts), backend=backend),
        "focal": lambda x, backend: F.focal_loss(x, labels, gamma=0.5, alpha=[0.1, 0.2, 0.3, 0.4], backend=backend),
    }
    expected = loss_and_grad(calls[name], logits, backend="reference")
    actual = loss_and_grad(calls[name], logits, backend="triton")
    assert_fp32_close(actual[0], expected[0], "loss")
    assert_fp32_close(actual[1], expected[1], "gradient")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("shape", "terms"), [((65536, 8), "focal_half"), ((65536, 8), "lmf"), ((2, 8, 128, 256), "lmf")]
)
def test_mean_gradient_under_a_loss_scaler_keeps_half_precision(shape, terms, dtype):
    # A GradScaler's grad_output = 2**16 on a "mean" over 65536 rows: each entry of the mean
    # loss's gradient is ~ w G / N ~ 1e-5, below float16's normal range (6.1e-5), so a kernel that
    # rounds it to float16 before the scale is applied flushes it; the scaled gradient itself is
    # order 1 and exact to float16 precision. Baseline: the reference as users run it (float32
    # math, the gradient rounded once into the logits' dtype). Its float16-math mode cannot take
    # this grad_output at all (2**16 exceeds float16's largest finite value, 65504).
    logits, labels, *vectors = _row_inputs(shape, ignore_fraction=0.1)
    logits = logits.to(dtype)
    alpha, beta, gamma = TERMS[terms]
    kwargs = dict(alpha=alpha, beta=beta, gamma=gamma, s=30.0, ignore_index=-100, reduction="mean")
    grad_output = torch.tensor(2.0**16, device=DEVICE)
    wide = (logits.double(), labels, *(v.double() for v in vectors))
    truth = loss_and_grad(reference.row_loss, *wide, grad_output=grad_output.double(), **kwargs)
    same = loss_and_grad(reference.row_loss, logits, labels, *vectors, grad_output=grad_output, **kwargs)
    fused = loss_and_grad(BACKEND.row_loss, logits, labels, *vectors, grad_output=grad_output, **kwargs)
    assert fused[1].dtype == dtype and same[1].dtype == dtype
    assert_no_worse_than_reference(fused[0], same[0], truth[0], dtype, "loss")
    assert_no_worse_than_reference(fused[1], same[1], truth[1], dtype, "gradient")
    # The norm-wise rule hides flushed entries when LDAM's larger s (q - y) terms dominate the
    # norm; count them: no more zeros than the once-rounded reference (ignored rows), up to
    # entries that round to 0 differently at float16's subnormal edge.
    flushed = int((fused[1] == 0).sum()) - int((same[1] == 0).sum())
    assert flushed <= fused[1].numel() // 1000, f"{flushed} more gradient entries flushed to 0 than the reference"


@pytest.mark.parametrize(
    ("layout", "shape", "dtype"),
    [
        ("rows", (2500, 8), torch.bfloat16),  # class-last 128-bit rows, a partial last tile
        ("rows", (2300, 5), torch.float32),  # C not a power of two: padded classes
        ("rows", (700, 14), torch.float16),
        ("transposed_rows", (1500, 8), torch.float32),  # class stride N: the strided path
        ("dense", (3, 14, 7, 11), torch.float32),  # vectors along the voxels, classes in registers
        ("channels_last", (2, 8, 9, 13), torch.bfloat16),  # class-last voxels of a map
        ("rows", (300, 40), torch.float32),  # classes spread over threads, a bounded tile
        ("dense", (2, 40, 11, 13), torch.float32),
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_tiling_matches_reference(monkeypatch, layout, shape, dtype, reduction):
    # The interpreter normally takes one big tile; here the kernels run with the block sizes a GPU
    # launch gets (several programs, a partial last tile, the per-program partial sums).
    monkeypatch.setattr(row, "INTERPRETED", False)
    if layout == "transposed_rows":
        logits = torch.randn(shape[::-1], device=DEVICE).t() * 3.0
    else:
        logits = torch.randn(shape, device=DEVICE) * 3.0
        if layout == "channels_last":
            logits = logits.to(memory_format=torch.channels_last)
    _, labels, *vectors = _row_inputs(tuple(logits.shape))
    num_voxels = labels[0].numel() if logits.dim() > 2 else labels.numel()
    class_last = layout in ("rows", "channels_last") and shape[1] in (2, 4, 8, 16, 32, 64)
    config = row.launch_config(shape[1], num_voxels, class_last)
    assert config["BLOCK_V"] < labels.numel() and config["num_warps"] > 1
    logits = logits.to(dtype)
    kwargs = dict(alpha=1.5, beta=1.0, gamma=1.5, s=30.0, ignore_index=-100, reduction=reduction)
    grad_output = random_grad_output(labels.shape if reduction == "none" else ())
    wide = (logits.double(), labels, *(v.double() for v in vectors))
    truth = loss_and_grad(reference.row_loss, *wide, grad_output=grad_output.double(), **kwargs)
    fused = loss_and_grad(BACKEND.row_loss, logits, labels, *vectors, grad_output=grad_output, **kwargs)
    assert fused[1].dtype == dtype and fused[1].stride() == logits.stride()
    if dtype == torch.float32:
        assert_fp32_close(fused[0], truth[0], "loss")
        assert_fp32_close(fused[1], truth[1], "gradient")
    else:
        same = loss_and_grad(reference.row_loss, logits, labels, *vectors, grad_output=grad_output, **kwargs)
        assert_no_worse_than_reference(fused[0], same[0], truth[0], dtype, "loss")
        assert_no_worse_than_reference(fused[1], same[1], truth[1], dtype, "gradient")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gpu_tiling_ignored_rows_and_nonfinite_logits(monkeypatch, reduction):
    # Whole tiles of ignored rows, and a NaN / -inf logit in an ignored and in a counted row.
    monkeypatch.setattr(row, "INTERPRETED", False)
    logits, labels, *vectors = _row_inputs((3000, 8), ignore_fraction=0.0)
    labels[:1100] = -100
    kwargs = dict(alpha=1.0, beta=1.0, gamma=1.5, s=30.0, ignore_index=-100, reduction=reduction)
    _compare(logits, labels, *vectors, "lmf", reduction)
    logits[5, 2] = float("nan")
    logits[2000, 0] = float("-inf")
    loss = BACKEND.row_loss(logits, labels, *vectors, **kwargs)
    if reduction == "none":
        assert bool(loss[5].isnan()) and bool(loss[2000].isnan()) and bool(loss[1100:2000].isfinite().all())
    else:
        assert bool(loss.isnan())


# The worst error of lg2.approx.f32 (PTX ISA: 2^-22.6 absolute on [0.5, 2], 2^-22 relative
# elsewhere), taken as 2^-22 max(1, |log2 x|) and added in one direction: under the interpreter the
# precise logarithm plus this error stands in for the GPU's approximate one.
@triton.jit
def _log2_high(x):
    exact = tl.log2(x)
    return exact + 2.384185791015625e-07 * tl.maximum(tl.abs(exact), 1.0)


@triton.jit
def _log2_low(x):
    exact = tl.log2(x)
    return exact - 2.384185791015625e-07 * tl.maximum(tl.abs(exact), 1.0)


@triton.jit
def _log_high(x):
    return _log2_high(x) * 0.6931471805599453


@triton.jit
def _log_low(x):
    return _log2_low(x) * 0.6931471805599453


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize(("shape", "scale"), [((3000, 8), 3.0), ((1500, 14), 12.0), ((2, 5, 9, 11), 6.0)])
def test_fast_log_error_within_budget(monkeypatch, sign, shape, scale):
    # fp32 results within 2e-5 relative of the float64 truth with the approximate logarithm's
    # worst-case error injected (per row for "none", for the mean and the gradient norm-wise).
    monkeypatch.setattr(_common, "fast_log2", _log2_high if sign > 0 else _log2_low)  # powers (fast_power)
    monkeypatch.setattr(row, "fast_log", _log_high if sign > 0 else _log_low)  # log of the softmax sum
    logits, labels, *vectors = _row_inputs(shape, scale=scale)
    kwargs = dict(alpha=1.5, beta=1.0, gamma=1.5, s=30.0, ignore_index=-100)
    wide = (labels, *(v.double() for v in vectors))
    for reduction in ("none", "mean"):
        grad_output = random_grad_output(labels.shape if reduction == "none" else ())
        truth = loss_and_grad(reference.row_loss, logits.double(), *wide, grad_output=grad_output.double(),
                              reduction=reduction, **kwargs)  # fmt: skip
        fused = loss_and_grad(BACKEND.row_loss, logits, labels, *vectors, grad_output=grad_output,
                              reduction=reduction, **kwargs)  # fmt: skip
        error = (fused[0].double() - truth[0]).abs() / truth[0].abs().clamp_min(1e-30)
        # Rows whose loss is below float32 resolution of an order-1 loss are held to an absolute bound.
        assert bool(((error <= 2e-5) | ((fused[0].double() - truth[0]).abs() <= 1e-9)).all()), float(error.max())
        assert_fp32_close(fused[1], truth[1], "gradient", rtol=2e-5)
