"""Sigmoid (multi-label) mode and uint8 dense targets of the C++ extension's region kernels (``backend="cpu"``).

Against :func:`lmfloss_kernels.reference.region_loss` with ``sigmoid=True`` evaluated in float64
(the ground truth: float32 within 1e-5, float64 within 1e-10, bfloat16 by the low-precision rule),
and against independent formulas: binary cross-entropy with logits, the two-channel softmax focal
term on logits ``(0, z)``, and a numpy soft Dice on sigmoid probabilities. Fresh random inputs, odd
shapes (partial tiles and chunks), C = 1, 2, 3, 5, 17, label maps with ignore_index, soft float
maps and uint8 multi-hot maps with overlapping channels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_ext_helpers import assert_close, compare_with_reference, loss_and_grad, requires_ext

from lmfloss_kernels import functional as F
from lmfloss_kernels import reference
from lmfloss_kernels.ext import CPU_BACKEND, ops

pytestmark = requires_ext


def _sigmoid_inputs(shape, kind, *, dtype=torch.float32, ignore_index=None, scale=3.0):
    """Logits, a target of `kind` ("labels", "soft", "multihot") and (2, C), (2, C), (C,) constants."""
    num_classes = shape[1]
    logits = (scale * torch.randn(shape, dtype=torch.float64)).to(dtype)
    if kind == "labels":
        target = torch.randint(0, num_classes, shape[:1] + shape[2:])
        if ignore_index is not None:
            target.view(-1)[::5] = ignore_index
    elif kind == "soft":
        target = torch.rand(shape, dtype=torch.float64).to(torch.float64 if dtype == torch.float64 else torch.float32)
    else:  # overlapping channels: each one on with probability 0.4, independently
        target = (torch.rand(shape) < 0.4).to(torch.uint8)
    vector_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    weight = torch.rand(2, num_classes, dtype=vector_dtype) + 0.2
    gamma = torch.tensor([[0.5, 0.0, 2.0, 1.0, 0.25], [1.5, 2.0, 0.0, 0.75, 3.0]], dtype=vector_dtype)
    gamma = gamma.repeat(1, num_classes)[:, :num_classes]
    exponent = torch.tensor([1.0, 0.5, 0.75, 0.0, 1.5] * num_classes, dtype=vector_dtype)[:num_classes]
    return logits, target, weight, gamma, exponent


def _options(**changes):
    options = dict(
        delta=0.6, focal_coef=0.5, tversky_coef=0.5, smooth_nr=1e-6, smooth_dr=1e-6, eps=1e-7, clip=True,
        batch=False, ignore_index=None, reduction="mean", sigmoid=True,
    )  # fmt: skip
    options.update(changes)
    return options


def _grad_output(logits, reduction, dtype=torch.float32):
    shape = (logits.shape[0],) if reduction == "none" else ()
    return torch.randn(shape, dtype=torch.float64).to(dtype)


def _against_float64_truth(logits, target, weight, gamma, exponent, options, rtol=1e-5):
    """Fused loss and gradient against the reference evaluated in float64 on the same inputs."""
    grad_output = _grad_output(logits, options["reduction"], torch.float64)
    actual = loss_and_grad(CPU_BACKEND.region_loss, logits, target, weight, gamma, exponent,
                           grad_output=grad_output, **options)  # fmt: skip
    truth = loss_and_grad(reference.region_loss, logits.double(), target, weight.double(), gamma.double(),
                          exponent.double(), grad_output=grad_output, **options)  # fmt: skip
    assert actual[0].dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    assert actual[1].dtype == logits.dtype and actual[1].shape == logits.shape
    assert_close(actual[0], truth[0], "loss", rtol)
    assert_close(actual[1], truth[1], "gradient", rtol)


TERMS = {  # focal only, Tversky only, both (with exponents on both sides of 1)
    "focal": dict(focal_coef=1.0, tversky_coef=0.0),
    "tversky": dict(focal_coef=0.0, tversky_coef=1.0),
    "both": dict(focal_coef=0.4, tversky_coef=0.6),
}
MODES = [  # clip, batch, reduction: every value of each, in few combinations
    dict(clip=True, batch=False, reduction="mean"),
    dict(clip=False, batch=True, reduction="none"),
    dict(clip=True, batch=True, reduction="sum"),
    dict(clip=False, batch=False, reduction="sum"),
]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(f"{k}={v}" for k, v in m.items()))
@pytest.mark.parametrize("terms", TERMS)
@pytest.mark.parametrize("kind", ["labels", "soft", "multihot"])
@pytest.mark.parametrize("num_classes", [1, 2, 3, 5, 17])
def test_sigmoid_matches_the_float64_reference(num_classes, kind, terms, mode):
    ignore_index = 255 if kind == "labels" else None
    shape = (2, num_classes, 7, 9) if num_classes < 17 else (3, num_classes, 5, 13)
    logits, target, *constants = _sigmoid_inputs(shape, kind, ignore_index=ignore_index)
    _against_float64_truth(logits, target, *constants, _options(ignore_index=ignore_index, **TERMS[terms], **mode))


@pytest.mark.parametrize("gamma_value", [2.0, 0.0], ids=["gamma2", "gamma0"])
@pytest.mark.parametrize("mode", MODES[:2], ids=["clip", "no-clip"])
@pytest.mark.parametrize("kind", ["labels", "multihot"])
def test_sigmoid_with_one_gamma_everywhere(kind, mode, gamma_value):
    """Every gamma 2 (MONAI's focal default: the CPU kernels square the modulation instead of an exp) or
    every gamma 0 (BCE), large logits included (u near 0 and 1), against the float64 reference."""
    logits, target, weight, gamma, exponent = _sigmoid_inputs((2, 3, 9, 11), kind, scale=12.0)
    _against_float64_truth(
        logits, target, weight, torch.full_like(gamma, gamma_value), exponent, _options(**TERMS["both"], **mode)
    )


@pytest.mark.parametrize("kind", ["labels", "soft", "multihot"])
def test_sigmoid_float64_logits(kind):
    ignore_index = 1 if kind == "labels" else None
    logits, target, *constants = _sigmoid_inputs((2, 3, 5, 6, 7), kind, dtype=torch.float64, ignore_index=ignore_index)
    for mode in MODES[:2]:
        _against_float64_truth(logits, target, *constants, _options(ignore_index=ignore_index, **mode), rtol=1e-10)


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("kind", ["labels", "multihot"])
def test_sigmoid_bfloat16_logits(kind, clip):
    logits, target, *constants = _sigmoid_inputs((2, 4, 9, 11), kind, dtype=torch.bfloat16, ignore_index=None)
    compare_with_reference(reference.region_loss, CPU_BACKEND.region_loss, logits, target, *constants,
                           **_options(clip=clip))  # fmt: skip


def test_sigmoid_large_voxel_counts_and_odd_tiles():
    """4099 voxels: a full chunk of 4096 and a 3-voxel tail (partial tile) in the same image."""
    logits, target, *constants = _sigmoid_inputs((2, 3, 4099), "multihot")
    _against_float64_truth(logits, target, *constants, _options(reduction="none"))
    logits, target, *constants = _sigmoid_inputs((1, 2, 3, 5, 7, 3), "labels", ignore_index=0)
    _against_float64_truth(logits, target, *constants, _options(ignore_index=0, batch=True))


def test_sigmoid_strided_logits():
    logits, target, *constants = _sigmoid_inputs((2, 3, 6, 10, 5), "multihot")
    channels_last = logits.contiguous(memory_format=torch.channels_last_3d)
    sliced = logits[:, :, :, ::2]  # spatial axes that do not flatten as a view
    classes_sliced = torch.randn(2, 6, 6, 10, 5)[:, ::2]  # class stride 2 voxel-planes
    for x, t in ((channels_last, target), (sliced, target[:, :, :, ::2]), (classes_sliced, target)):
        _against_float64_truth(x, t, *constants, _options(clip=False, reduction="none"))
        _, grad = loss_and_grad(CPU_BACKEND.region_loss, x, t, *constants, **_options())
        assert grad.shape == x.shape


def test_sigmoid_bitwise_identical_on_one_and_two_threads():
    """Enough chunks per image for the parallel grain to split them between two threads."""
    logits, target, *constants = _sigmoid_inputs((2, 2, 96, 96, 96), "multihot")
    runs = []
    for threads in (1, 2, 1):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            runs.append(loss_and_grad(CPU_BACKEND.region_loss, logits, target, *constants, **_options()))
        finally:
            torch.set_num_threads(previous)
    for other in runs[1:]:
        assert torch.equal(runs[0][0], other[0]) and torch.equal(runs[0][1], other[1])


# Independent checks ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["soft", "multihot", "labels"])
def test_unit_weights_and_zero_gamma_give_bce_with_logits(kind):
    """a = 1 and gamma = 0 on both sides: mean over voxels of the channel sum of BCE-with-logits."""
    logits, target, *_ = _sigmoid_inputs((2, 3, 6, 7), kind, scale=4.0)
    ones, zeros = torch.ones(2, 3), torch.zeros(2, 3)
    options = _options(focal_coef=1.0, tversky_coef=0.0, clip=False, reduction="none")
    dense = target if kind != "labels" else torch.nn.functional.one_hot(target, 3).movedim(-1, 1)

    def bce(x):
        terms = torch.nn.functional.binary_cross_entropy_with_logits(x, dense.to(x.dtype), reduction="none")
        return terms.sum(1).flatten(1).mean(1)

    grad_output = torch.randn(2)
    expected = loss_and_grad(bce, logits.double(), grad_output=grad_output.double())
    actual = loss_and_grad(CPU_BACKEND.region_loss, logits, target, ones, zeros, torch.ones(3),
                           grad_output=grad_output, **options)  # fmt: skip
    assert_close(actual[0], expected[0], "loss", 1e-5)
    assert_close(actual[1], expected[1], "gradient", 1e-5)


@pytest.mark.parametrize("clip", [True, False])
def test_one_channel_sigmoid_is_the_two_channel_softmax_focal_term(clip):
    """C = 1 with a- = a_0, g- = g_0, a+ = a_1, g+ = g_1 is softmax focal on logits (0, z) (softmax kernels)."""
    z = 3 * torch.randn(2, 1, 5, 9)
    y = (torch.rand(2, 5, 9) < 0.5).long()
    weight, gamma = torch.tensor([0.7, 1.3]), torch.tensor([1.5, 0.5])
    options = dict(delta=0.6, focal_coef=1.0, tversky_coef=0.0, smooth_nr=1e-6, smooth_dr=1e-6, eps=1e-7, clip=clip,
                   batch=False, ignore_index=None, reduction="none")  # fmt: skip
    sides = torch.stack([weight[[1]], weight[[0]]]), torch.stack([gamma[[1]], gamma[[0]]])
    grad_output = torch.randn(2)
    sig_loss, sig_grad = loss_and_grad(CPU_BACKEND.region_loss, z, y[:, None].to(torch.uint8), *sides, torch.ones(1),
                                       grad_output=grad_output, sigmoid=True, **options)  # fmt: skip
    pair = torch.cat([torch.zeros_like(z), z], 1)
    soft_loss, soft_grad = loss_and_grad(CPU_BACKEND.region_loss, pair, y, weight, gamma, torch.ones(2),
                                         grad_output=grad_output, **options)  # fmt: skip
    assert_close(sig_loss, soft_loss, "loss", 1e-5)
    assert_close(sig_grad, soft_grad[:, 1:], "gradient", 1e-5)


def test_sigmoid_soft_dice_against_numpy():
    """Tversky term with delta = 1/2, exponent 1, no clip: 1 - soft Dice per channel of sigmoid(z), numpy."""
    logits, target, *_ = _sigmoid_inputs((2, 4, 6, 5), "multihot")
    smooth = 1e-5
    options = _options(focal_coef=0.0, tversky_coef=1.0, delta=0.5, clip=False, smooth_nr=smooth, smooth_dr=smooth,
                       reduction="none")  # fmt: skip
    actual = CPU_BACKEND.region_loss(logits, target, torch.ones(2, 4), torch.ones(2, 4), torch.ones(4), **options)
    p = 1.0 / (1.0 + np.exp(-logits.double().numpy().reshape(2, 4, -1)))
    y = target.numpy().reshape(2, 4, -1).astype(np.float64)
    dice = (2 * (p * y).sum(-1) + smooth) / (p.sum(-1) + y.sum(-1) + smooth)
    np.testing.assert_allclose(actual.numpy(), (1.0 - dice).mean(1), rtol=1e-5)


# Targets, constants and the non-finite policy -----------------------------------------------------


@pytest.mark.parametrize("sigmoid", [False, True])
def test_uint8_and_bool_dense_maps_equal_float_ones(sigmoid):
    """The same 0/1 map as uint8, bool and float32 gives the same loss and gradient (softmax: one-hot)."""
    labels = torch.randint(0, 3, (2, 6, 7, 5))
    dense = torch.nn.functional.one_hot(labels, 3).movedim(-1, 1)
    if sigmoid:
        dense = dense | (torch.rand(dense.shape) < 0.3)  # overlapping channels
    logits = 3 * torch.randn(dense.shape)
    shape = (2, 3) if sigmoid else (3,)
    weight, gamma = torch.rand(shape) + 0.2, torch.rand(shape) * 2
    options = _options(sigmoid=sigmoid, reduction="none")
    expected = loss_and_grad(CPU_BACKEND.region_loss, logits, dense.float(), weight, gamma, torch.ones(3), **options)
    for target in (dense.to(torch.uint8), dense.bool()):
        actual = loss_and_grad(CPU_BACKEND.region_loss, logits, target, weight, gamma, torch.ones(3), **options)
        assert_close(actual[0], expected[0], "loss", 1e-6)
        assert_close(actual[1], expected[1], "gradient", 1e-6)


def test_uint8_dense_maps_are_read_without_a_copy():
    logits, target, *constants = _sigmoid_inputs((2, 3, 6, 7), "multihot")
    logits.requires_grad_(True)  # the logits have the target's shape: nothing of that shape may be copied
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        CPU_BACKEND.region_loss(logits, target, *constants, **_options()).backward()
    copies = [
        e.name
        for e in prof.events()
        if e.name in ("aten::_to_copy", "aten::copy_") and e.input_shapes and e.input_shapes[0] == [*target.shape]
    ]
    assert not copies, copies


def test_sigmoid_constants_must_be_two_rows():
    logits, target, weight, gamma, exponent = _sigmoid_inputs((2, 3, 4, 5), "multihot")
    with pytest.raises(RuntimeError, match=r"focal_weight must have shape \(2, 3\) in sigmoid mode"):
        CPU_BACKEND.region_loss(logits, target, weight[0], gamma, exponent, **_options())
    with pytest.raises(RuntimeError, match=r"focal_gamma must have shape \(3,\)"):
        CPU_BACKEND.region_loss(logits, target, weight[0], gamma, exponent, **_options(sigmoid=False))
    with pytest.raises(RuntimeError, match="C >= 2"):
        CPU_BACKEND.region_loss(logits[:, :1], target[:, :1], weight[:1, :1].reshape(1), gamma[0, :1], exponent[:1],
                                **_options(sigmoid=False))  # fmt: skip


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_logit_makes_its_image_nan(bad):
    """The package's policy through the functional API: a non-finite logit makes its image's loss NaN."""
    logits, target, weight, gamma, exponent = _sigmoid_inputs((2, 3, 5, 6), "multihot")
    logits[0, 1, 2, 3] = bad
    kwargs = dict(delta=0.6, focal_coef=0.5, tversky_coef=0.5, smooth=1e-6, eps=1e-7, clip=True, batch=False,
                  reduction="none", ignore_index=None, sigmoid=True, negative_weight=weight[1],
                  negative_gamma=gamma[1])  # fmt: skip
    loss = F._region_family(logits, target, weight[0], gamma[0], exponent, backend="cpu", **kwargs)
    assert bool(torch.isnan(loss[0])), loss
    expected = F._region_family(logits[1:], target[1:], weight[0], gamma[0], exponent, backend="reference", **kwargs)
    assert_close(loss[1:], expected, "finite image", 1e-5)


def test_sigmoid_through_the_distributed_path_of_one_rank():
    """sync (dist_sync) in sigmoid mode: a one-rank group gives the unsynchronised loss and gradient."""

    class OneRank:
        def all_reduce(self, tensor):
            return tensor.clone()

    logits, target, *constants = _sigmoid_inputs((3, 2, 6, 5), "labels", ignore_index=1)
    for batch in (False, True):
        options = _options(ignore_index=1, batch=batch)
        expected = loss_and_grad(CPU_BACKEND.region_loss, logits, target, *constants, **options)
        actual = loss_and_grad(CPU_BACKEND.region_loss, logits, target, *constants, sync=OneRank(), **options)
        assert_close(actual[0], expected[0], "loss", 1e-6)
        assert_close(actual[1], expected[1], "gradient", 1e-6)


def test_opcheck_sigmoid_ops():
    logits, target, weight, gamma, exponent = _sigmoid_inputs((2, 3, 4, 5), "multihot")
    logits.requires_grad_(True)
    scalars = (0.6, 0.5, 0.5, 1e-5, 1e-5, 1e-7, True, False, None)
    for t, reduction in ((target, "mean"), (torch.randint(0, 3, (2, 4, 5)), "none")):
        args = (logits, t, weight, gamma, exponent, *scalars, reduction, True)
        torch.library.opcheck(ops.region_loss_op, args)
        loss, stats = ops.region_loss_op(*args)
        grad_loss = torch.randn(loss.shape)
        backward_args = (
            grad_loss,
            logits.detach(),
            t,
            weight,
            gamma,
            exponent,
            stats.detach(),
            *scalars,
            reduction,
            True,
        )
        torch.library.opcheck(ops.region_loss_backward_op, backward_args)
    double = logits.detach().double().requires_grad_(True)
    vectors = (weight.double(), gamma.double(), exponent.double())
    # Away from the clip boundaries the function is smooth; gradcheck uses finite differences.
    assert torch.autograd.gradcheck(
        lambda x: ops.region_loss_op(x, target, *vectors, *scalars, "none", True)[0], (double,)
    )


def test_sigmoid_outputs_fully_written(monkeypatch):
    """Every output buffer starts as NaN (LMFLOSS_EXT_POISON=1): unwritten elements would show."""
    monkeypatch.setenv("LMFLOSS_EXT_POISON", "1")
    for shape, kind in (((2, 3, 7, 9, 11), "labels"), ((1, 5, 4099), "multihot"), ((2, 17, 5, 13), "soft")):
        logits, target, *constants = _sigmoid_inputs(shape, kind, ignore_index=2 if kind == "labels" else None)
        for options in (_options(reduction="none"), _options(batch=True, focal_coef=0.0, tversky_coef=1.0)):
            options["ignore_index"] = 2 if kind == "labels" else None
            _against_float64_truth(logits, target, *constants, options)
