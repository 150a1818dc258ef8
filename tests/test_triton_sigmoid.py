"""Triton region family in sigmoid (multi-label) mode, and uint8 dense targets in both modes.

Ground truth is :func:`lmfloss_kernels.reference.region_loss` in float64 (the kernels are held to
1e-5 of it, norm-wise), plus two checks that do not go through the reference: binary
cross-entropy with logits (gamma 0, weights 1) and, for one channel, the two-channel softmax
focal term on logits ``(0, z)``.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from test_triton_helpers import (
    DEVICE,
    INTERPRETER_WARNINGS,
    assert_fp32_close,
    assert_no_worse_than_reference,
    loss_and_grad,
    random_grad_output,
)
from test_triton_regions import _small_tiles

from lmfloss_kernels import functional, reference
from lmfloss_kernels.triton import BACKEND

pytestmark = INTERPRETER_WARNINGS


def _sides(num_classes, gamma=(0.5, 2.0, 0.0, 0.25)):
    """Random (2, C) focal weights, (2, C) gammas (row 0 positive side, row 1 negative) and (C,) exponents."""
    weight = torch.rand(2, num_classes, device=DEVICE) + 0.2
    cycle = itertools.cycle(gamma)
    gammas = torch.tensor([[next(cycle) for _ in range(num_classes)] for _ in range(2)], device=DEVICE)
    exponent = torch.rand(num_classes, device=DEVICE) * 0.8 + 0.25
    return weight, gammas, exponent


def _target(kind, shape, ignore_index=None):
    """``labels`` / ``ignore`` (int64 label map), ``soft`` (float in [0, 1]), ``multihot`` (uint8, overlapping)."""
    if kind == "soft":
        return torch.rand(shape, device=DEVICE)
    if kind == "multihot":
        return (torch.rand(shape, device=DEVICE) < 0.4).to(torch.uint8)
    labels = torch.randint(0, shape[1], shape[:1] + shape[2:], device=DEVICE)
    if ignore_index is not None:
        labels[torch.rand(labels.shape, device=DEVICE) < 0.25] = ignore_index
    return labels


def _options(**changes):
    options = dict(
        delta=0.6,
        focal_coef=0.5,
        tversky_coef=0.5,
        smooth_nr=1e-5,
        smooth_dr=2e-5,
        eps=1e-7,
        clip=True,
        batch=False,
        ignore_index=None,
        reduction="mean",
        sigmoid=True,
    )
    options.update(changes)
    return options


def _truth(logits, target, vectors, options, grad_output):
    """The float64 reference: loss and gradient."""
    wide = [v.double() for v in vectors]
    target = target.double() if target.is_floating_point() else target
    return loss_and_grad(reference.region_loss, logits.double(), target, *wide, grad_output=grad_output.double(),
                         **options)  # fmt: skip


def _compare(logits, target, vectors, options, rtol=1e-5):
    loss_shape = (logits.shape[0],) if options["reduction"] == "none" else ()
    grad_output = random_grad_output(loss_shape)
    expected = _truth(logits, target, vectors, options, grad_output)
    actual = loss_and_grad(BACKEND.region_loss, logits, target, *vectors, grad_output=grad_output, **options)
    assert actual[0].dtype == torch.float32 and actual[1].dtype == logits.dtype
    assert actual[1].stride() == torch.empty_like(logits).stride()
    assert_fp32_close(actual[0], expected[0], "loss", rtol)
    assert_fp32_close(actual[1], expected[1], "gradient", rtol)
    return actual


_TERMS = {"both": (0.5, 0.5), "focal": (1.0, 0.0), "tversky": (0.0, 1.0)}
_REDUCTION_BATCH = list(itertools.product(["mean", "sum", "none"], [False, True]))
# Every target kind x term set x clip; the six (reduction, batch) pairs take turns over them.
_MATRIX = [
    (kind, terms, clip, *_REDUCTION_BATCH[i % len(_REDUCTION_BATCH)])
    for i, (kind, terms, clip) in enumerate(
        itertools.product(["labels", "ignore", "soft", "multihot"], list(_TERMS), [True, False])
    )
]


@pytest.mark.parametrize(("kind", "terms", "clip", "reduction", "batch"), _MATRIX)
def test_sigmoid_switches_match_reference(kind, terms, clip, reduction, batch):
    shape = (2, 3, 5, 6, 7)
    ignore_index = 255 if kind == "ignore" else None
    logits = torch.randn(shape, device=DEVICE) * 3
    focal_coef, tversky_coef = _TERMS[terms]
    options = _options(clip=clip, batch=batch, reduction=reduction, ignore_index=ignore_index,
                       focal_coef=focal_coef, tversky_coef=tversky_coef)  # fmt: skip
    _compare(logits, _target(kind, shape, ignore_index), _sides(3), options)


@pytest.mark.parametrize("num_classes", [1, 2, 3, 5])
@pytest.mark.parametrize("kind", ["multihot", "ignore"])
def test_class_counts_on_odd_volumes(num_classes, kind):
    shape = (2, num_classes, 7, 9, 3)
    ignore_index = -1 if kind == "ignore" else None
    target = _target(kind, shape, ignore_index)
    _compare(torch.randn(shape, device=DEVICE) * 2, target, _sides(num_classes), _options(ignore_index=ignore_index))


def test_label_dtypes_and_a_label_past_the_classes():
    # uint8 labels with 255 ignored; a label of C (not ignored) marks every channel negative.
    shape = (2, 4, 6, 5)
    target = _target("ignore", shape, ignore_index=255).to(torch.uint8)
    options = _options(ignore_index=255, reduction="none")
    _compare(torch.randn(shape, device=DEVICE) * 2, target, _sides(4), options)
    labels = _target("labels", shape).to(torch.int32)
    labels[0, :2] = 4
    one_hot = torch.nn.functional.one_hot(labels.long(), 5)[..., :4].movedim(-1, 1).float()
    logits = torch.randn(shape, device=DEVICE)
    vectors = _sides(4)
    as_labels = loss_and_grad(BACKEND.region_loss, logits, labels, *vectors, **_options())
    as_dense = loss_and_grad(BACKEND.region_loss, logits, one_hot, *vectors, **_options())
    assert_fp32_close(as_labels[0], as_dense[0], "loss")
    assert_fp32_close(as_labels[1], as_dense[1], "gradient")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_soft_target_dtypes(dtype):
    shape = (2, 3, 5, 6)
    target = _target("soft", shape).to(dtype)
    _compare(torch.randn(shape, device=DEVICE) * 2, target, _sides(3), _options(reduction="none"))


def test_bool_multihot_target_reads_as_uint8():
    shape = (2, 3, 6, 5)
    target = torch.rand(shape, device=DEVICE) < 0.5
    logits, vectors = torch.randn(shape, device=DEVICE), _sides(3)
    _compare(logits, target, vectors, _options())
    as_bool = loss_and_grad(BACKEND.region_loss, logits, target, *vectors, **_options())
    as_float = loss_and_grad(BACKEND.region_loss, logits, target.float(), *vectors, **_options())
    assert_fp32_close(as_bool[0], as_float[0], "loss")
    assert_fp32_close(as_bool[1], as_float[1], "gradient")


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "expanded"])
def test_strided_logits_and_targets(layout):
    if layout == "channels_last":
        logits = torch.randn(2, 3, 6, 7, 5, device=DEVICE).to(memory_format=torch.channels_last_3d)
    elif layout == "sliced":
        logits = torch.randn(2, 6, 9, 14, device=DEVICE)[:, 1::2, :, ::2]
    else:
        logits = torch.randn(1, 3, 8, 9, device=DEVICE).expand(2, 3, 8, 9)
    shape = tuple(logits.shape)
    multihot = _target("multihot", shape).transpose(-1, -2).contiguous().transpose(-1, -2)  # strided uint8
    _compare(logits * 2, multihot, _sides(3), _options(reduction="none"))
    _compare(logits * 2, _target("ignore", shape, ignore_index=7), _sides(3), _options(ignore_index=7, batch=True))


@pytest.mark.parametrize(("kind", "num_classes", "per_program"), [("multihot", 4, 3), ("ignore", 5, 4), ("soft", 3, 2)])
def test_several_tiles_per_program(monkeypatch, kind, num_classes, per_program):
    from lmfloss_kernels.triton import region

    monkeypatch.setattr(region, "voxel_tiling", _small_tiles(4, 8 if num_classes <= 4 else 2, per_program))
    shape = (2, num_classes, 7, 9, 5)
    ignore_index = 255 if kind == "ignore" else None
    options = _options(ignore_index=ignore_index, reduction="none")
    _compare(torch.randn(shape, device=DEVICE) * 3, _target(kind, shape, ignore_index), _sides(num_classes), options)


@pytest.mark.parametrize(("clip", "wrong"), [(True, True), (False, True), (False, False)])
def test_confident_voxels_and_gamma_below_one(clip, wrong):
    # |z| ~ 12-18: p within 1e-5..1e-8 of 0 or 1, some inside the clip dead zone. 1 - p and the
    # logarithms come from exp(-|z|) and its log1p, so the kernel is held to the float64 truth,
    # also when every voxel is right and the loss is made of terms of size exp(-|z|) alone.
    shape = (2, 3, 6, 7)
    target = _target("multihot", shape)
    sign = target.float() * 2 - 1
    logits = sign * (12.0 + 6.0 * torch.rand(shape, device=DEVICE))
    if wrong:
        logits[0, 0, :2] *= -1
    vectors = _sides(3, gamma=(0.25, 0.5))
    terms = _TERMS["both" if wrong else "focal"]
    _compare(logits, target, vectors, _options(clip=clip, focal_coef=terms[0], tversky_coef=terms[1], reduction="none"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["multihot", "ignore"])
def test_low_precision_no_worse_than_reference_in_that_dtype(dtype, kind):
    shape = (2, 3, 7, 8, 5)
    logits = (torch.randn(shape, device=DEVICE) * 2).to(dtype)
    ignore_index = 2 if kind == "ignore" else None
    target = _target(kind, shape, ignore_index)
    vectors = _sides(3)
    options = _options(ignore_index=ignore_index, reduction="none")
    grad_output = random_grad_output((shape[0],))
    truth = _truth(logits, target, vectors, options, grad_output)
    same = loss_and_grad(
        reference.region_loss, logits, target, *vectors, grad_output=grad_output.to(dtype), upcast=False, **options
    )
    fused = loss_and_grad(BACKEND.region_loss, logits, target, *vectors, grad_output=grad_output, **options)
    assert fused[1].dtype == dtype
    assert_no_worse_than_reference(fused[0], same[0], truth[0], dtype, "loss")
    assert_no_worse_than_reference(fused[1], same[1], truth[1], dtype, "gradient")


@pytest.mark.parametrize("kind", ["soft", "multihot"])
def test_gamma_zero_unit_weights_is_bce_with_logits(kind):
    # Independent of the reference: torch's BCE-with-logits, summed over channels, averaged over voxels.
    shape = (3, 4, 5, 7)
    logits = torch.randn(shape, device=DEVICE) * 3
    target = _target(kind, shape)
    ones, zeros = torch.ones(2, 4, device=DEVICE), torch.zeros(2, 4, device=DEVICE)
    options = _options(focal_coef=1.0, tversky_coef=0.0, clip=False)
    actual = loss_and_grad(BACKEND.region_loss, logits, target, ones, zeros, torch.ones(4, device=DEVICE), **options)

    def bce(x):
        terms = torch.nn.functional.binary_cross_entropy_with_logits(x, target.double(), reduction="none")
        return terms.sum(1).mean((1, 2)).mean()

    expected = loss_and_grad(bce, logits.double())
    assert_fp32_close(actual[0], expected[0], "loss")
    assert_fp32_close(actual[1], expected[1], "gradient")


@pytest.mark.parametrize(("kind", "clip"), [("soft", False), ("multihot", True), ("multihot", False)])
def test_one_channel_is_two_channel_softmax_focal(kind, clip):
    # sigmoid(z) = softmax(0, z)[1]: with a- = a_0, g- = g_0, a+ = a_1, g+ = g_1 the focal terms agree,
    # and the gradient w.r.t. z is the softmax gradient's channel 1 (channel 0 is the constant 0).
    shape = (2, 1, 9, 8)
    logits = torch.randn(shape, device=DEVICE) * 3
    sigmoid_target = _target(kind, shape)
    if kind == "multihot":  # a 0/1 map: the softmax side takes it as a label map (class 1 = positive)
        softmax_target = sigmoid_target[:, 0].long()
    else:
        softmax_target = torch.cat([1 - sigmoid_target, sigmoid_target], 1).double()
    weight, gamma = torch.tensor([0.3, 0.7], device=DEVICE), torch.tensor([0.5, 2.0], device=DEVICE)
    options = _options(focal_coef=1.0, tversky_coef=0.0, clip=clip, reduction="none")
    grad_output = random_grad_output((2,))
    sigmoid = loss_and_grad(
        BACKEND.region_loss, logits, sigmoid_target, weight.flip(0).view(2, 1), gamma.flip(0).view(2, 1),
        torch.ones(1, device=DEVICE), grad_output=grad_output, **options,
    )  # fmt: skip
    pair = torch.cat([torch.zeros_like(logits), logits], 1).double()
    softmax = loss_and_grad(
        reference.region_loss, pair, softmax_target, weight.double(), gamma.double(),
        torch.ones(2, device=DEVICE).double(), grad_output=grad_output.double(), **{**options, "sigmoid": False},
    )  # fmt: skip
    assert_fp32_close(sigmoid[0], softmax[0], "loss")
    assert_fp32_close(sigmoid[1], softmax[1][:, 1:], "gradient")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("terms", ["focal", "tversky"])
def test_nonfinite_logit_gives_nan_loss(value, terms):
    # As in softmax mode: a non-finite logit makes its image's loss NaN (sigmoid(+-inf) is finite,
    # so only the policy does), even on an ignored voxel and without a focal term.
    shape = (3, 2, 4, 5)
    logits = torch.randn(shape, device=DEVICE)
    target = _target("ignore", shape, ignore_index=255)
    logits[1, 1, 2, 3] = value
    target[1, 2, 3] = 255
    focal_coef, tversky_coef = _TERMS[terms]
    options = _options(focal_coef=focal_coef, tversky_coef=tversky_coef, ignore_index=255, reduction="none")
    per_image = BACKEND.region_loss(logits, target, *_sides(2), **options)
    assert per_image[1].isnan() and per_image[[0, 2]].isfinite().all()
    assert BACKEND.region_loss(logits, target, *_sides(2), **{**options, "reduction": "mean"}).isnan()


class _Recorded:
    """The all-reduce of one rank, recording what it sends (the other rank's contribution)."""

    def all_reduce(self, values):
        self.sent = values.detach().clone()
        return self.sent.clone()


class _PlusOtherRank:
    """A two-rank all-reduce seen from one rank: its values plus those the other rank sent."""

    def __init__(self, other):
        self.other = other

    def all_reduce(self, values):
        return values.detach() + self.other.to(values.dtype)


@pytest.mark.parametrize(("batch", "reduction"), [(True, "mean"), (False, "mean"), (True, "sum"), (True, "none")])
@pytest.mark.parametrize("kind", ["ignore", "multihot"])
def test_dist_sync_rank_equals_single_process(batch, reduction, kind):
    # Two ranks (images [0] and [1, 2]) emulated in-process: each rank's loss is the single-process
    # loss of the whole batch (its own images' for "none"), its gradient that of the reference with
    # the same all-reduce and, but for batch with "none" (the other ranks' upstream weights of the
    # shared term are not seen), the whole batch's gradient's slice.
    shape = (3, 3, 4, 5, 6)
    ignore_index = 255 if kind == "ignore" else None
    logits = torch.randn(shape, device=DEVICE) * 2
    target = _target(kind, shape, ignore_index)
    vectors = _sides(3)
    wide = [v.double() for v in vectors]
    options = _options(batch=batch, reduction=reduction, ignore_index=ignore_index)
    grad_output = random_grad_output((3,) if reduction == "none" else ())
    whole = _truth(logits, target, vectors, options, grad_output)
    for mine, theirs in ((slice(0, 1), slice(1, 3)), (slice(1, 3), slice(0, 1))):
        recorder = _Recorded()
        reference.region_loss(logits[theirs].double(), target[theirs], *wide, sync=recorder, **options)
        sync = _PlusOtherRank(recorder.sent)
        upstream = grad_output[mine] if reduction == "none" else grad_output
        synced = loss_and_grad(reference.region_loss, logits[mine].double(), target[mine], *wide,
                               grad_output=upstream.double(), sync=sync, **options)  # fmt: skip
        loss, grad = loss_and_grad(BACKEND.region_loss, logits[mine], target[mine], *vectors, grad_output=upstream,
                                   sync=sync, **options)  # fmt: skip
        assert_fp32_close(loss, synced[0], "loss")
        assert_fp32_close(grad, synced[1], "gradient")
        assert_fp32_close(loss, whole[0][mine] if reduction == "none" else whole[0], "loss")
        if not (batch and reduction == "none"):
            assert_fp32_close(grad, whole[1][mine], "gradient")


def test_functional_region_family_reaches_the_kernels():
    shape = (2, 3, 6, 5)
    logits, target = torch.randn(shape, device=DEVICE), _target("multihot", shape)
    keywords = dict(delta=0.7, focal_coef=0.5, tversky_coef=0.5, smooth=1e-5, eps=1e-7, clip=True, batch=False,
                    reduction="mean", ignore_index=None, sigmoid=True, negative_weight=[0.2, 0.3, 0.4],
                    negative_gamma=[1.0, 0.0, 0.5])  # fmt: skip
    call = functional._region_family
    args = ([0.6, 0.5, 0.4], [0.5, 2.0, 0.0], [1.0, 0.75, 0.5])
    expected = loss_and_grad(lambda x: call(x, target, *args, backend="reference", **keywords), logits)
    actual = loss_and_grad(lambda x: call(x, target, *args, backend="triton", **keywords), logits)
    assert_fp32_close(actual[0], expected[0], "loss")
    assert_fp32_close(actual[1], expected[1], "gradient")


# ------------------------------------------------------------------ uint8 dense maps, softmax mode


@pytest.mark.parametrize("kind", ["onehot", "multihot"])
def test_softmax_uint8_dense_target_equals_float(kind):
    # The same kernel code on a uint8 load: bit-identical to the float map, and the reference's value.
    shape = (2, 4, 5, 6, 3)
    labels = torch.randint(0, 4, shape[:1] + shape[2:], device=DEVICE)
    if kind == "onehot":
        target = torch.nn.functional.one_hot(labels, 4).movedim(-1, 1).to(torch.uint8)
    else:
        target = _target("multihot", shape)
    logits = torch.randn(shape, device=DEVICE) * 2
    vectors = (torch.rand(4, device=DEVICE) + 0.2, torch.tensor([0.5, 0.0, 2.0, 0.25], device=DEVICE), _sides(4)[2])
    options = _options(sigmoid=False, reduction="none")
    _compare(logits, target, vectors, options)
    as_uint8 = loss_and_grad(BACKEND.region_loss, logits, target, *vectors, **options)
    as_float = loss_and_grad(BACKEND.region_loss, logits, target.float(), *vectors, **options)
    assert torch.equal(as_uint8[0], as_float[0]) and torch.equal(as_uint8[1], as_float[1])
