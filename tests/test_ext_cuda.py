"""``backend="cuda"`` (the extension's CUDA kernels) against the eager reference, on a GPU.

The same checks as the CPU tests on CUDA tensors: rows and regions, every reduction with a
random ``grad_output``, ignore_index, batch, clip on/off, soft targets, strided layouts, low
precision, bitwise determinism, opcheck. They need a CUDA device and a library built with CUDA
kernels (``FORCE_CUDA=1`` or a visible GPU at build time); elsewhere they are skipped with the
reason, and the CUDA build gate (the CUDA wheel of ``test_wheel.py``) still compiles the kernels.
"""

from __future__ import annotations

import pytest
import torch
from test_ext_helpers import compare_with_reference, loss_and_grad

import lmfloss_kernels as lk
from lmfloss_kernels import functional as F
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


# Issue 12 kernels: staged (N, C) rows, class capacities 4 / 8 / 16 and several passes beyond,
# batch sums computed once, native bf16 one-hot maps, the in-kernel non-finite probe.

CLASS_COUNTS = [2, 5, 8, 14, 33]  # capacities 4, 8, 8, 16 and 3 passes of 16; rows: staged up to 32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("num_classes", CLASS_COUNTS)
def test_rows_every_class_count_staged_and_strided(num_classes, reduction, dtype):
    """(N, C) rows with contiguous classes go through the shared-memory tile (C <= 32, N not a
    multiple of the tile), class-strided rows and C = 33 are read in place."""
    logits, labels, *vectors = _row_inputs((1000, num_classes), dtype)
    grad_output = torch.randn(labels.shape if reduction == "none" else (), device="cuda")
    kwargs = dict(alpha=1.0, beta=1.0, gamma=1.5, s=30.0, ignore_index=-100, reduction=reduction)
    strided = logits.t().contiguous().t()  # class stride N: not staged
    for x in (logits, strided, logits[::2]):  # logits[::2]: row stride 2C, classes still contiguous
        y = labels[::2] if x.shape[0] != logits.shape[0] else labels
        out = grad_output[::2] if reduction == "none" and x.shape[0] != logits.shape[0] else grad_output
        compare_with_reference(reference.row_loss, CUDA_BACKEND.row_loss, x, y, *vectors, grad_output=out, **kwargs)


@pytest.mark.parametrize("soft", [False, True], ids=["labels", "soft"])
@pytest.mark.parametrize("num_classes", CLASS_COUNTS)
def test_regions_every_class_count(num_classes, soft):
    for case in (dict(), dict(clip=False, batch=True, reduction="none"), dict(ignore_index=1, reduction="sum")):
        if soft and "ignore_index" in case:
            continue
        options = _region_options(**case)
        logits, target, *vectors = _region_inputs((3, num_classes, 9, 10, 7), soft=soft)
        grad_output = torch.randn((3,) if options["reduction"] == "none" else (), device="cuda")
        compare_with_reference(
            reference.region_loss, CUDA_BACKEND.region_loss, logits, target, *vectors, grad_output=grad_output,
            **options,
        )  # fmt: skip


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_regions_batch_sums_many_images(reduction):
    """batch=True shares one set of Tversky sums over 37 images (summed once in the finalize)."""
    options = _region_options(batch=True, reduction=reduction, focal_coef=0.3, tversky_coef=0.7)
    logits, target, *vectors = _region_inputs((37, 4, 6, 5, 3))
    grad_output = torch.randn((37,) if reduction == "none" else (), device="cuda")
    compare_with_reference(
        reference.region_loss, CUDA_BACKEND.region_loss, logits, target, *vectors, grad_output=grad_output, **options
    )


def test_bf16_one_hot_is_read_without_a_copy():
    logits, labels, *vectors = _region_inputs((2, 4, 9, 10, 11), dtype=torch.bfloat16)
    one_hot = torch.nn.functional.one_hot(labels.long(), 4).movedim(-1, 1).to(torch.bfloat16)
    options = _region_options()
    compare_with_reference(reference.region_loss, CUDA_BACKEND.region_loss, logits, one_hot, *vectors, **options)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        loss_and_grad(CUDA_BACKEND.region_loss, logits, one_hot, *vectors, **options)
    copies = [e.name for e in prof.events() if e.name == "aten::_to_copy" and e.input_shapes[:1] == [[*one_hot.shape]]]
    assert not copies, copies


@pytest.mark.parametrize("soft", [False, True], ids=["labels", "one_hot"])
def test_minus_inf_logit_without_clip_keeps_the_references_finite_gradient(soft):
    """As the CPU test: a -inf logit off the label, focal gamma 0 there, clip=False."""
    logits, labels, weight, _, exponent = _region_inputs((2, 4, 5, 6))
    labels = labels.long()
    gamma = torch.tensor([0.5, 0.0, 0.0, 0.0], device="cuda")
    labels[0, 1, 2], logits[0, 2, 1, 2] = 0, float("-inf")
    labels[1, 4, 5], logits[1, 1, 4, 5] = 3, float("-inf")
    target = torch.nn.functional.one_hot(labels, 4).movedim(-1, 1).float() if soft else labels
    options = _region_options(clip=False, reduction="sum")
    args = (logits, target, weight, gamma, exponent)
    _, expected = loss_and_grad(reference.region_loss, *args, **options)
    _, actual = loss_and_grad(CUDA_BACKEND.region_loss, *args, **options)
    assert bool(torch.isfinite(expected).all())
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nonfinite_policy_is_applied_in_kernel(bad, dtype, monkeypatch):
    """The CUDA kernels carry the policy (the backend's ``nonfinite_in_kernel``): no second read of the
    logits, and still NaN for exactly the row / image with the bad logit, ignored or not, for every
    reduction and with either term alone."""
    from lmfloss_kernels import functional as F

    def fail(*args, **kwargs):
        raise AssertionError("the cuda backend must not need _propagate_nonfinite")

    monkeypatch.setattr(F, "_propagate_nonfinite", fail)
    rows = torch.randn(40, 8, device="cuda", dtype=dtype)
    row_labels = torch.randint(0, 8, (40,), device="cuda")
    rows[3, 5], row_labels[3] = bad, -100  # an ignored row
    rows[7, 0] = bad
    counts = [10, 20, 30, 40, 50, 60, 70, 80]
    for kw in (dict(), dict(beta=0.0), dict(alpha=0.0)):
        per_row = F.lmf_loss(rows, row_labels, counts, backend="cuda", reduction="none", **kw)
        bad_rows = torch.zeros(40, dtype=torch.bool, device="cuda")
        bad_rows[[3, 7]] = True
        assert bool(per_row[bad_rows].isnan().all()) and bool(per_row[~bad_rows].isfinite().all()), kw
        for reduction in ("mean", "sum"):
            assert F.lmf_loss(rows, row_labels, counts, backend="cuda", reduction=reduction, **kw).isnan(), kw
    volume = torch.randn(3, 4, 5, 6, 7, device="cuda", dtype=dtype)
    labels = torch.randint(0, 4, (3, 5, 6, 7), device="cuda")
    volume[1, 2, 0, 0, 0] = bad
    labels[1, 0, 0, 0] = 3  # ignored below
    for loss_fn in (F.unified_focal_loss, F.tversky_loss):  # both terms; the Tversky term alone
        for batch in (False, True):
            kw = dict(ignore_index=3, batch=batch)
            per_image = loss_fn(volume, labels, backend="cuda", reduction="none", **kw)
            assert bool(per_image[1].isnan()), (loss_fn, kw)
            # batch=True shares the batch's Tversky sums, which a NaN or +inf logit poisons for every
            # image (as in the reference); without it the other images stay finite.
            assert batch or bool(per_image[[0, 2]].isfinite().all()), (loss_fn, kw)
            assert loss_fn(volume, labels, backend="cuda", **kw).isnan(), (loss_fn, kw)


def test_row_mean_allocates_no_per_row_buffer():
    """'mean' / 'sum' need only the four sums: no label-sized float32 per-row buffer (4 MB here)."""
    logits, labels, *vectors = _row_inputs((1 << 20, 2), torch.bfloat16)
    kwargs = dict(alpha=1.0, beta=1.0, gamma=1.5, s=30.0, ignore_index=-100, reduction="mean")
    CUDA_BACKEND.row_loss(logits, labels, *vectors, **kwargs)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    CUDA_BACKEND.row_loss(logits, labels, *vectors, **kwargs)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < labels.numel() * 4 // 2


def test_bitwise_deterministic_staged_rows_and_capacities():
    for num_classes in (8, 14, 33):
        logits, labels, *vectors = _row_inputs((300_000, num_classes), torch.bfloat16)
        kwargs = dict(alpha=1.0, beta=1.0, gamma=1.5, s=30.0, ignore_index=-100, reduction="mean")
        first = loss_and_grad(CUDA_BACKEND.row_loss, logits, labels, *vectors, **kwargs)
        second = loss_and_grad(CUDA_BACKEND.row_loss, logits, labels, *vectors, **kwargs)
        assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
        logits, target, *vectors = _region_inputs((2, num_classes, 48, 48, 32), dtype=torch.bfloat16)
        options = _region_options(batch=True)
        first = loss_and_grad(CUDA_BACKEND.region_loss, logits, target, *vectors, **options)
        second = loss_and_grad(CUDA_BACKEND.region_loss, logits, target, *vectors, **options)
        assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


# Sigmoid (multi-label) mode and uint8 dense maps: the CPU tests' checks (test_ext_sigmoid.py) on
# CUDA tensors, through the sigmoid capacities 4 and 8 and passes of 8 channels beyond.

SIGMOID_CLASS_COUNTS = [1, 3, 5, 8, 9, 17]


def _sigmoid_inputs(shape, kind, dtype=torch.float32):
    num_classes = shape[1]
    logits = (3 * torch.randn(shape, dtype=torch.float64)).to(dtype).cuda()
    if kind == "labels":
        target = torch.randint(0, num_classes, shape[:1] + shape[2:])
        target.view(-1)[::5] = 255
    elif kind == "soft":
        target = torch.rand(shape).to(dtype if dtype != torch.float64 else torch.float32)
    else:  # uint8 multi-hot, overlapping channels
        target = (torch.rand(shape) < 0.4).to(torch.uint8)
    vector_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    weight = torch.rand(2, num_classes, dtype=vector_dtype) + 0.2
    gamma = torch.tensor([[0.5, 0.0, 2.0, 1.0], [1.5, 2.0, 0.0, 0.75]], dtype=vector_dtype).repeat(1, num_classes)
    exponent = torch.tensor([1.0, 0.5, 0.75, 0.0] * num_classes, dtype=vector_dtype)[:num_classes]
    return logits, target.cuda(), weight.cuda(), gamma[:, :num_classes].cuda(), exponent.cuda()


def _sigmoid_options(kind, **changes):
    return _region_options(sigmoid=True, ignore_index=255 if kind == "labels" else None, smooth_nr=1e-6,
                           smooth_dr=1e-6, **changes)  # fmt: skip


SIGMOID_CASES = [
    dict(),
    dict(clip=False, batch=True, reduction="none"),
    dict(focal_coef=1.0, tversky_coef=0.0, reduction="sum"),
    dict(focal_coef=0.0, tversky_coef=1.0, clip=False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kind", ["labels", "soft", "multihot"])
@pytest.mark.parametrize("num_classes", SIGMOID_CLASS_COUNTS)
def test_sigmoid_every_class_count(num_classes, kind, dtype):
    for case in SIGMOID_CASES:
        options = _sigmoid_options(kind, **case)
        logits, target, *vectors = _sigmoid_inputs((2, num_classes, 9, 10, 7), kind, dtype)
        grad_output = torch.randn((2,) if options["reduction"] == "none" else (), device="cuda")
        compare_with_reference(
            reference.region_loss, CUDA_BACKEND.region_loss, logits, target, *vectors, grad_output=grad_output,
            **options,
        )  # fmt: skip


def test_sigmoid_channels_last_and_deterministic():
    logits, target, *vectors = _sigmoid_inputs((2, 5, 48, 40, 32), "multihot", torch.bfloat16)
    channels_last = logits.contiguous(memory_format=torch.channels_last_3d)
    options = _sigmoid_options("multihot", batch=True)
    compare_with_reference(reference.region_loss, CUDA_BACKEND.region_loss, channels_last, target, *vectors, **options)
    first = loss_and_grad(CUDA_BACKEND.region_loss, logits, target, *vectors, **options)
    second = loss_and_grad(CUDA_BACKEND.region_loss, logits, target, *vectors, **options)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("sigmoid", [False, True])
def test_uint8_dense_maps_equal_float_ones_and_are_not_copied(sigmoid):
    labels = torch.randint(0, 3, (2, 9, 10, 11), device="cuda")
    dense = torch.nn.functional.one_hot(labels, 3).movedim(-1, 1)
    if sigmoid:
        dense = dense | (torch.rand(dense.shape, device="cuda") < 0.3)
    logits = 3 * torch.randn(dense.shape, device="cuda")
    shape = (2, 3) if sigmoid else (3,)
    vectors = (
        torch.rand(shape, device="cuda") + 0.2,
        2 * torch.rand(shape, device="cuda"),
        torch.ones(3, device="cuda"),
    )
    options = _region_options(sigmoid=sigmoid, reduction="none")
    expected = loss_and_grad(CUDA_BACKEND.region_loss, logits, dense.float(), *vectors, **options)
    target = dense.to(torch.uint8)
    compare_with_reference(reference.region_loss, CUDA_BACKEND.region_loss, logits, target, *vectors, **options)
    actual = loss_and_grad(CUDA_BACKEND.region_loss, logits, target, *vectors, **options)
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)
    x = logits.clone().requires_grad_(True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        CUDA_BACKEND.region_loss(x, target, *vectors, **options).sum().backward()
    copies = [e.name for e in prof.events() if e.name == "aten::_to_copy" and e.input_shapes[:1] == [[*target.shape]]]
    assert not copies, copies


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_sigmoid_nonfinite_policy_is_applied_in_kernel(bad, monkeypatch):
    from lmfloss_kernels import functional as F

    def fail(*args, **kwargs):
        raise AssertionError("the cuda backend must not need _propagate_nonfinite")

    monkeypatch.setattr(F, "_propagate_nonfinite", fail)
    logits, target, weight, gamma, exponent = _sigmoid_inputs((3, 9, 5, 6, 7), "multihot")
    logits[1, 8, 0, 0, 0] = bad  # in the second pass of 8 channels
    kwargs = dict(delta=0.6, focal_coef=0.5, tversky_coef=0.5, smooth=1e-6, eps=1e-7, clip=True, batch=False,
                  reduction="none", ignore_index=None, sigmoid=True, negative_weight=weight[1],
                  negative_gamma=gamma[1])  # fmt: skip
    for focal_coef in (0.5, 0.0):
        kwargs["focal_coef"] = focal_coef
        per_image = F._region_family(logits, target, weight[0], gamma[0], exponent, backend="cuda", **kwargs)
        assert bool(per_image[1].isnan()) and bool(per_image[[0, 2]].isfinite().all()), per_image


def test_opcheck_cuda_sigmoid():
    logits, target, *vectors = _sigmoid_inputs((2, 3, 5, 6), "multihot")
    scalars = (0.6, 0.5, 0.5, 1e-5, 1e-5, 1e-7, True, False, None)
    torch.library.opcheck(ops.region_loss_op, (logits.requires_grad_(), target, *vectors, *scalars, "mean", True))


def test_criteria_replay_one_native_call_and_read_labels_only_when_asked():
    """On CUDA tensors a criterion's plan replays as one C++ call (csrc/prepared.cpp) that reads no label;
    with the check_labels option it hands the call to the Python replay, which reads them and refuses a
    stray. Loss and gradient equal the functional API's on fresh values."""
    counts = [90, 40, 11, 3]
    for criterion, functional, kind in (
        (lk.LMFLoss(counts, backend="cuda"), lambda x, y: F.lmf_loss(x, y, counts, backend="cuda"), "rows"),
        (lk.UnifiedFocalLoss(backend="cuda"), lambda x, y: F.unified_focal_loss(x, y, backend="cuda"), "dense"),
        (lk.DiceLoss(backend="cuda"), lambda x, y: F.dice_loss(x, y, backend="cuda"), "dense"),
    ):
        for _ in range(3):
            if kind == "rows":
                x, y = torch.randn(37, 4, device="cuda"), torch.randint(0, 4, (37,), device="cuda")
            else:
                x = torch.randn(2, 4, 6, 7, 5, device="cuda")
                y = torch.randint(0, 4, (2, 6, 7, 5), device="cuda", dtype=torch.uint8)
            got, want = loss_and_grad(criterion, x, y), loss_and_grad(functional, x, y)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        (plan,) = criterion._call_plans.values()
        assert plan.native is not None and plan.native(x, y) is not None
        bad = y.clone()
        bad.view(-1)[3] = 9
        with lk.options(check_labels=True):  # a new signature: its plan's native call declines CUDA values
            criterion(x, y)
            criterion(x, y)
            checked = [p for p in criterion._call_plans.values() if p is not plan]
            assert len(checked) == 1 and checked[0].native(x, y) is None
            with pytest.raises(ValueError, match="target labels must be in"):
                criterion(x, bad)
