"""Triton region family (Unified Focal, focal Tversky, Mixed Focal, Tversky, Dice) against the reference."""

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

import lmfloss_kernels.functional as F
from lmfloss_kernels import reference
from lmfloss_kernels.triton import BACKEND

pytestmark = INTERPRETER_WARNINGS


def _vectors(num_classes, gamma0=0.5, gamma_fg=0.0):
    """Random per-class focal weight, focal gamma (background, foreground) and Tversky exponent."""
    focal_weight = torch.rand(num_classes, device=DEVICE) + 0.2
    focal_gamma = torch.tensor([gamma0] + [gamma_fg] * (num_classes - 1), device=DEVICE)
    exponent = torch.rand(num_classes, device=DEVICE) * 0.8 + 0.25
    return focal_weight, focal_gamma, exponent


def _target(kind, shape, ignore_index=None, label_dtype=torch.int64, ignore_fraction=0.2):
    num_classes = shape[1]
    if kind == "soft":
        return torch.softmax(torch.randn(shape, device=DEVICE) * 2, dim=1)
    if kind == "onehot":
        labels = torch.randint(0, num_classes, shape[:1] + shape[2:], device=DEVICE)
        return torch.nn.functional.one_hot(labels, num_classes).movedim(-1, 1).float()
    labels = torch.randint(0, num_classes, shape[:1] + shape[2:], device=DEVICE)
    if ignore_index is not None:
        drop = torch.rand(labels.shape, device=DEVICE) < ignore_fraction
        labels = torch.where(drop, torch.full_like(labels, ignore_index), labels)
    return labels.to(label_dtype)


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
    )
    options.update(changes)
    return options


def _compare(logits, target, vectors, options, rtol=1e-5):
    loss_shape = (logits.shape[0],) if options["reduction"] == "none" else ()
    grad_output = random_grad_output(loss_shape)
    expected = loss_and_grad(reference.region_loss, logits, target, *vectors, grad_output=grad_output, **options)
    actual = loss_and_grad(BACKEND.region_loss, logits, target, *vectors, grad_output=grad_output, **options)
    assert actual[0].dtype == torch.float32 and actual[1].dtype == logits.dtype
    assert actual[1].stride() == torch.empty_like(logits).stride()
    assert_fp32_close(actual[0], expected[0], "loss", rtol)
    assert_fp32_close(actual[1], expected[1], "gradient", rtol)


# Every switch of the family on a small odd volume; the terms are (focal_coef, tversky_coef).
_MATRIX = [
    (reduction, clip, batch, kind, terms)
    for reduction, clip, batch, kind, terms in itertools.product(
        ["mean", "sum", "none"],
        [True, False],
        [False, True],
        ["labels", "ignore", "soft"],
        [(0.5, 0.5), (1.0, 0.0), (0.0, 1.0)],
    )
    if not (kind == "soft" and batch and terms == (1.0, 0.0))  # batch does not touch a focal-only loss
]


@pytest.mark.parametrize(("reduction", "clip", "batch", "kind", "terms"), _MATRIX)
def test_region_switches_match_reference(reduction, clip, batch, kind, terms):
    shape = (2, 3, 5, 6, 7)
    ignore_index = 2 if kind == "ignore" else None
    target = _target("soft" if kind == "soft" else "labels", shape, ignore_index=ignore_index)
    logits = torch.randn(shape, device=DEVICE) * 3
    options = _options(
        reduction=reduction,
        clip=clip,
        batch=batch,
        ignore_index=ignore_index,
        focal_coef=terms[0],
        tversky_coef=terms[1],
    )
    _compare(logits, target, _vectors(shape[1]), options)


@pytest.mark.parametrize("num_classes", [2, 3, 5, 32])
@pytest.mark.parametrize("kind", ["labels", "onehot"])
def test_class_counts(num_classes, kind):
    shape = (2, num_classes, 9, 10)
    logits = torch.randn(shape, device=DEVICE) * 2
    _compare(logits, _target(kind, shape), _vectors(num_classes, gamma0=0.5, gamma_fg=2.0), _options())


@pytest.mark.parametrize(
    ("label_dtype", "ignore_index"), [(torch.uint8, 255), (torch.int8, -1), (torch.int32, None), (torch.int64, -100)]
)
def test_label_dtypes(label_dtype, ignore_index):
    shape = (2, 4, 6, 5, 4)
    target = _target("labels", shape, ignore_index=ignore_index, label_dtype=label_dtype, ignore_fraction=0.3)
    logits = torch.randn(shape, device=DEVICE)
    _compare(logits, target, _vectors(4), _options(ignore_index=ignore_index, reduction="none"))


@pytest.mark.parametrize("target_dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_soft_target_dtypes(target_dtype):
    shape = (2, 4, 5, 6)
    target = _target("soft", shape).to(target_dtype)
    _compare(torch.randn(shape, device=DEVICE), target, _vectors(4), _options(reduction="none", clip=False))


def test_bool_labels_and_a_two_class_batch():
    shape = (3, 2, 8, 8)
    target = torch.rand(shape[:1] + shape[2:], device=DEVICE) < 0.3
    _compare(torch.randn(shape, device=DEVICE), target, _vectors(2), _options(batch=True))


@pytest.mark.parametrize(("batch", "reduction"), [(False, "none"), (True, "mean"), (True, "none"), (False, "sum")])
def test_many_images(batch, reduction):
    # More images than the finalize kernel's block of 16: its loops over image chunks.
    shape = (37, 3, 4, 5)
    logits = torch.randn(shape, device=DEVICE) * 2
    target = _target("labels", shape, ignore_index=255, label_dtype=torch.uint8)
    _compare(logits, target, _vectors(3), _options(batch=batch, reduction=reduction, ignore_index=255))


def test_odd_volume():
    shape = (2, 3, 17, 19, 23)
    logits = torch.randn(shape, device=DEVICE) * 2
    target = _target("labels", shape, ignore_index=255, label_dtype=torch.uint8)
    _compare(logits, target, _vectors(3), _options(ignore_index=255))


@pytest.mark.parametrize("clip", [True, False])
def test_larger_volume(clip):
    shape = (2, 4, 24, 24, 24)
    logits = torch.randn(shape, device=DEVICE) * 2
    target = _target("labels", shape, label_dtype=torch.uint8)
    _compare(logits, target, _vectors(4), _options(clip=clip, delta=0.7, reduction="none"))


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "expanded", "2d_channels_last"])
def test_strided_logits(layout):
    if layout == "channels_last":
        logits = torch.randn(2, 3, 6, 7, 5, device=DEVICE).to(memory_format=torch.channels_last_3d)
    elif layout == "sliced":
        logits = torch.randn(2, 6, 9, 14, device=DEVICE)[:, 1::2, :, ::2]
    elif layout == "expanded":
        logits = torch.randn(1, 3, 8, 9, device=DEVICE).expand(2, 3, 8, 9)
    else:
        logits = torch.randn(2, 5, 7, 9, device=DEVICE).to(memory_format=torch.channels_last)
    shape = tuple(logits.shape)
    num_classes = shape[1]
    _compare(logits, _target("labels", shape), _vectors(num_classes), _options(reduction="none"))
    soft = _target("soft", shape).transpose(-1, -2).contiguous().transpose(-1, -2)  # a strided soft target
    _compare(logits, soft, _vectors(num_classes), _options())


@pytest.mark.parametrize("clip", [True, False])
def test_confidently_wrong_voxel(clip):
    # Voxel 0 is labelled 0 while class 1 wins by 40 nats: every probability lies outside
    # [eps, 1 - eps], so the clipped loss gives it no gradient at all; the log-space loss does.
    shape = (1, 3, 4, 5)
    logits = torch.randn(shape, device=DEVICE)
    logits[0, :, 0, 0] = torch.tensor([0.0, 40.0, 0.0])
    target = _target("labels", shape)
    target[0, 0, 0] = 0
    options = _options(clip=clip, focal_coef=0.5, tversky_coef=0.5)
    _compare(logits, target, _vectors(3), options)
    _, grad = loss_and_grad(BACKEND.region_loss, logits, target, *_vectors(3), **options)
    if clip:
        assert bool((grad[0, :, 0, 0] == 0).all())
    else:
        assert float(grad[0, :, 0, 0].abs().max()) > 1e-3


@pytest.mark.parametrize("clip", [True, False])
def test_confident_correct_voxels_and_gamma_below_one(clip):
    # Every voxel predicts its label with p ~ 1 - 1e-5: (1 - p)^(gamma - 1) with gamma < 1 is
    # singular there, FN is a sum of tiny terms and the softmax backward h_t - p_t sum h cancels.
    # The kernel forms 1 - p from the other classes' mass, so it is held to the float64 truth at
    # 1e-5, which the float32 reference itself misses (about 2e-5 on the loss, 3e-4 on the gradient).
    shape = (2, 3, 6, 7)
    target = _target("labels", shape)
    logits = torch.randn(shape, device=DEVICE) + 12.0 * torch.nn.functional.one_hot(target, 3).movedim(-1, 1)
    vectors = _vectors(3, gamma0=0.25, gamma_fg=0.5)
    options = _options(clip=clip)
    truth = loss_and_grad(reference.region_loss, logits.double(), target, *(v.double() for v in vectors), **options)
    actual = loss_and_grad(BACKEND.region_loss, logits, target, *vectors, **options)
    assert_fp32_close(actual[0], truth[0], "loss")
    assert_fp32_close(actual[1], truth[1], "gradient")


def test_empty_class_in_an_image():
    shape = (2, 3, 6, 6)
    target = _target("labels", shape)
    target[0][target[0] == 2] = 1  # image 0 has no voxel of class 2
    _compare(torch.randn(shape, device=DEVICE), target, _vectors(3), _options(reduction="none"))


def test_no_grad_call_gives_the_same_loss():
    shape = (2, 3, 5, 6)
    logits, target, vectors = torch.randn(shape, device=DEVICE), _target("labels", shape), _vectors(3)
    with torch.no_grad():
        fused = BACKEND.region_loss(logits, target, *vectors, **_options())
    assert_fp32_close(fused, reference.region_loss(logits, target, *vectors, **_options()), "loss")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("clip", [True, False])
def test_low_precision_no_worse_than_reference_in_that_dtype(dtype, clip):
    shape = (2, 3, 7, 8, 9)
    logits = (torch.randn(shape, device=DEVICE) * 2).to(dtype)
    target = _target("labels", shape, ignore_index=2)
    vectors = _vectors(3)
    options = _options(clip=clip, ignore_index=2, reduction="none")
    grad_output = random_grad_output((shape[0],))
    truth = loss_and_grad(
        reference.region_loss, logits.double(), target, *(v.double() for v in vectors),
        grad_output=grad_output.double(), **options,
    )  # fmt: skip
    same = loss_and_grad(
        reference.region_loss, logits, target, *vectors, grad_output=grad_output.to(dtype), upcast=False, **options
    )
    fused = loss_and_grad(BACKEND.region_loss, logits, target, *vectors, grad_output=grad_output, **options)
    assert fused[1].dtype == dtype
    assert_no_worse_than_reference(fused[0], same[0], truth[0], dtype, "loss")
    assert_no_worse_than_reference(fused[1], same[1], truth[1], dtype, "gradient")


_NAMED = {
    "unified_asym": lambda x, t, b: F.unified_focal_loss(x, t, backend=b),
    "unified_sym_batch": lambda x, t, b: F.unified_focal_loss(x, t, asymmetric=False, batch=True, backend=b),
    "unified_noclip_noweight": lambda x, t, b: F.unified_focal_loss(x, t, weight=None, clip=False, backend=b),
    "focal_tversky": lambda x, t, b: F.focal_tversky_loss(x, t, backend=b),
    "focal_tversky_asym": lambda x, t, b: F.focal_tversky_loss(x, t, asymmetric=True, reduction="sum", backend=b),
    "symmetric_focal": lambda x, t, b: F.symmetric_focal_loss(x, t, backend=b),
    "asymmetric_focal": lambda x, t, b: F.asymmetric_focal_loss(x, t, reduction="none", backend=b),
    "mixed_focal": lambda x, t, b: F.mixed_focal_loss(x, t, backend=b),
    "mixed_focal_weighted": lambda x, t, b: F.mixed_focal_loss(
        x, t, weight=0.3, alpha=[0.2, 0.5, 0.3], beta=0.4, backend=b
    ),
    "tversky": lambda x, t, b: F.tversky_loss(x, t, backend=b),
    "dice_batch": lambda x, t, b: F.dice_loss(x, t, batch=True, backend=b),
}


@pytest.mark.parametrize("target_kind", ["labels", "onehot"])
@pytest.mark.parametrize("name", list(_NAMED))
def test_named_losses_on_triton(name, target_kind):
    shape = (2, 3, 6, 7, 5)
    logits = torch.randn(shape, device=DEVICE) * 2
    target = _target(target_kind, shape)
    if target_kind == "labels":
        target = target.to(torch.uint8).unsqueeze(1)  # MONAI's (B, 1, *S) label layout
    expected = loss_and_grad(_NAMED[name], logits, target, "reference")
    actual = loss_and_grad(_NAMED[name], logits, target, "triton")
    assert_fp32_close(actual[0], expected[0], "loss")
    assert_fp32_close(actual[1], expected[1], "gradient")


def _small_tiles(rows, vec, per_program):
    """A stand-in for ``voxel_tiling``: tiles of ``rows x vec`` voxels, ``per_program`` of them per program."""

    def tiling(num_images, num_classes, num_voxels, itemsize):
        tiles = -(-num_voxels // (rows * vec))
        return {
            "BLOCK_C": 1 << (num_classes - 1).bit_length(),
            "ROWS": rows,
            "VEC": vec,
            "num_warps": 4,
            "tiles_per_program": per_program,
            "programs_per_image": -(-tiles // per_program),
        }

    return tiling


@pytest.mark.parametrize(
    ("layout", "kind", "num_images", "num_classes", "per_program"),
    [
        ("contiguous", "ignore", 2, 4, 3),  # 10 tiles of 32 voxels: a partial one, then two past the end
        ("contiguous", "soft", 2, 5, 4),  # padded classes
        ("contiguous", "labels", 37, 3, 2),  # many images, each with a program running past its end
        ("channels_last", "ignore", 2, 4, 3),
        ("sliced", "soft", 2, 3, 5),
        ("contiguous", "labels", 2, 32, 3),  # one voxel per thread row
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_several_tiles_per_program(monkeypatch, layout, kind, num_images, num_classes, per_program, reduction):
    from lmfloss_kernels.triton import region

    monkeypatch.setattr(region, "voxel_tiling", _small_tiles(4, 8 if num_classes <= 4 else 2, per_program))
    # Many images, or 32 classes (two voxels per tile), already make many programs: a small volume will do.
    spatial = (7, 9, 5) if num_images < 10 and num_classes <= 8 else (3, 5, 2)
    shape = (num_images, num_classes, *spatial)
    if layout == "channels_last":
        logits = (torch.randn(shape, device=DEVICE) * 3).to(memory_format=torch.channels_last_3d)
    elif layout == "sliced":
        logits = torch.randn(num_images, num_classes, 7, 18, 5, device=DEVICE)[:, :, :, ::2] * 3
    else:
        logits = torch.randn(shape, device=DEVICE) * 3
    ignore_index = 255 if kind == "ignore" else None
    target = _target("soft" if kind == "soft" else "labels", shape, ignore_index=ignore_index, label_dtype=torch.uint8)
    vectors = _vectors(num_classes, gamma0=0.5, gamma_fg=0.25)
    _compare(logits, target, vectors, _options(ignore_index=ignore_index, reduction=reduction))


@pytest.mark.parametrize(("num_classes", "num_voxels", "itemsize"), [(4, 7 * 10**6, 2), (3, 100, 4), (32, 5000, 2)])
def test_voxel_tiling_covers_every_voxel_with_classes_in_one_thread(num_classes, num_voxels, itemsize):
    from lmfloss_kernels.triton import _common

    config = _common.voxel_tiling(2, num_classes, num_voxels, itemsize)
    assert config["BLOCK_C"] >= num_classes and config["VEC"] * itemsize <= 16
    assert config["BLOCK_C"] * config["VEC"] <= max(32, config["BLOCK_C"])
    tile = config["ROWS"] * config["VEC"]
    covered = config["programs_per_image"] * config["tiles_per_program"] * tile
    assert num_voxels <= covered < num_voxels + config["tiles_per_program"] * tile
