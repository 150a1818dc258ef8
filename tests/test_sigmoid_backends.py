"""Sigmoid mode and the Dice + CE / Dice + focal / sigmoid focal losses on the fused backends.

Every new function and every region loss with ``sigmoid=True``, through the public API, on the
``"cpu"`` (C++ extension) and ``"triton"`` backends against the eager reference: loss and logit
gradient (a random ``grad_output`` for ``"none"``) in float32 within 1e-5 relative of the float64
reference (or no further from it than the float32 reference), on small odd shapes, multi-hot
targets as float / uint8 / bool / other integers, label maps with ``ignore_index``, one channel,
``batch=True``, and half-precision logits by the Cut Cross-Entropy rule.

``LMFLOSS_SIGMOID_BACKENDS=reference`` runs the same checks with the reference in place of the
fused backends, which checks the tests' own logic (every comparison then holds to rounding).
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch
from test_triton_helpers import (
    DEVICE,
    INTERPRETER_WARNINGS,
    assert_fp32_accurate,
    assert_no_worse_than_reference,
    loss_and_grad,
)

from lmfloss_kernels import functional as F

pytestmark = INTERPRETER_WARNINGS

BACKENDS = os.environ.get("LMFLOSS_SIGMOID_BACKENDS", "cpu,triton").split(",")


def _device(backend):
    # The C++ CPU kernels take CPU tensors; Triton runs on the GPU, or on the CPU through the interpreter.
    return torch.device("cpu") if backend in ("cpu", "reference") else DEVICE


# (id, function, keywords); every case but the last two is in sigmoid mode.
CASES = [
    ("ufl_asym", F.unified_focal_loss, {"sigmoid": True}),
    ("ufl_sym_noclip", F.unified_focal_loss, {"sigmoid": True, "asymmetric": False, "weight": None, "clip": False}),
    ("ftl", F.focal_tversky_loss, {"sigmoid": True, "gamma": 0.3}),
    ("sym_focal", F.symmetric_focal_loss, {"sigmoid": True, "delta": 0.4, "gamma": 1.5}),
    ("asym_focal", F.asymmetric_focal_loss, {"sigmoid": True, "clip": False}),
    ("mixed", F.mixed_focal_loss, {"sigmoid": True, "alpha": [0.5, 1.0, 1.5], "beta": 0.3, "weight": 0.6}),
    ("tversky", F.tversky_loss, {"sigmoid": True, "delta": 0.3}),
    ("dice", F.dice_loss, {"sigmoid": True}),
    ("dice_bce", F.dice_ce_loss, {"sigmoid": True}),
    (
        "dice_bce_weighted_nobg",
        F.dice_ce_loss,
        {"sigmoid": True, "weight": [0.5, 1.0, 2.0], "pos_weight": [3.0, 1.0, 0.5], "include_background": False},
    ),
    ("dice_focal_sigmoid", F.dice_focal_loss, {"sigmoid": True, "alpha": 0.25, "gamma": 1.5, "lambda_dice": 0.5}),
    ("sigmoid_focal", F.sigmoid_focal_loss, {}),
    ("sigmoid_focal_bce", F.sigmoid_focal_loss, {"alpha": None, "gamma": 0.0}),
    ("dice_ce", F.dice_ce_loss, {"weight": [0.5, 1.0, 2.0], "include_background": False}),
    ("dice_focal", F.dice_focal_loss, {"alpha": [0.2, 0.5, 1.0], "gamma": 0.5}),
]
CASE_IDS = [case[0] for case in CASES]
SHAPES = [(2, 3, 5, 7), (3, 3, 13), (2, 3, 3, 5, 7)]  # odd voxel counts: partial tiles


def _case(case_id):
    return next(case[1:] for case in CASES if case[0] == case_id)


def _logits(shape, seed, device, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * 2).to(device=device, dtype=dtype)


def _target(kind, shape, seed, device, ignore_index=None):
    """``kind``: a multi-hot map (``float``: soft values, ``uint8``, ``bool``, ``int64``) or ``labels``."""
    generator = torch.Generator().manual_seed(seed + 1)
    if kind == "labels":
        labels = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=generator)
        if ignore_index is not None:
            drop = torch.rand(labels.shape, generator=generator) < 0.25
            labels = torch.where(drop, torch.full_like(labels, ignore_index), labels)
        return labels.to(device)
    if kind == "float":
        return torch.rand(shape, generator=generator).to(device)
    multi_hot = torch.rand(shape, generator=generator) < 0.4
    return multi_hot.to(device=device, dtype={"uint8": torch.uint8, "bool": torch.bool, "int64": torch.int64}[kind])


def _compare(fn, backend, logits, target, *, grad_output=None, **kwargs):
    """The backend's float32 loss and gradient against the float64 reference (truth) and float32 reference."""
    got = loss_and_grad(fn, logits, target, backend=backend, grad_output=grad_output, **kwargs)
    same = loss_and_grad(fn, logits, target, backend="reference", grad_output=grad_output, **kwargs)
    truth = loss_and_grad(
        fn, logits.double(), target, backend="reference",
        grad_output=None if grad_output is None else grad_output.double(), **kwargs,
    )  # fmt: skip
    for what, actual, fp32, exact in zip(("loss", "gradient"), got, same, truth, strict=True):
        assert actual.dtype == torch.float32, f"{what}: dtype {actual.dtype}"
        assert_fp32_accurate(actual, fp32, exact, f"{backend} {fn.__name__} {what}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_id", CASE_IDS)
@pytest.mark.parametrize("target_kind", ["uint8", "float", "labels"])
def test_every_loss_matches_the_reference(backend, case_id, target_kind):
    fn, kwargs = _case(case_id)
    if not kwargs.get("sigmoid", fn is F.sigmoid_focal_loss):
        # Softmax cases: a soft map summing to 1 per voxel, a uint8 one-hot map.
        target_kind = {"float": "soft", "uint8": "one_hot_uint8"}.get(target_kind, target_kind)
    seed = zlib.crc32(f"{case_id}-{target_kind}".encode())
    shape = SHAPES[seed % len(SHAPES)]
    device = _device(backend)
    logits = _logits(shape, seed, device)
    if target_kind == "soft":
        target = torch.softmax(_logits(shape, seed + 7, device), dim=1)
    elif target_kind == "one_hot_uint8":
        labels = _target("labels", shape, seed, device)
        target = torch.nn.functional.one_hot(labels, shape[1]).movedim(-1, 1).to(torch.uint8)
    else:
        target = _target(target_kind, shape, seed, device, ignore_index=255 if target_kind == "labels" else None)
    if target_kind == "labels":
        kwargs = {**kwargs, "ignore_index": 255}
    _compare(fn, backend, logits, target, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_id", ["ufl_asym", "mixed", "dice_bce_weighted_nobg", "sigmoid_focal", "dice_focal"])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_reductions_with_label_maps_and_ignore_index(backend, case_id, reduction):
    fn, kwargs = _case(case_id)
    device = _device(backend)
    shape = (3, 3, 7, 5)
    seed = zlib.crc32(f"{case_id}-{reduction}".encode())
    logits = _logits(shape, seed, device)
    if fn is F.sigmoid_focal_loss and reduction == "sum":
        target, options = _target("uint8", shape, seed, device), {}  # "sum" takes no ignore_index there
    else:
        target, options = _target("labels", shape, seed, device, ignore_index=1), {"ignore_index": 1}
    grad_output = None
    if reduction == "none":
        grad_output = torch.randn(shape[0], generator=torch.Generator().manual_seed(seed)).to(device)
    _compare(fn, backend, logits, target, grad_output=grad_output, reduction=reduction, **options, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target_kind", ["bool", "uint8", "int64", "float"])
def test_multi_hot_target_dtypes(backend, target_kind):
    device = _device(backend)
    logits = _logits((2, 4, 9, 5), 3, device)
    target = _target(target_kind, logits.shape, 3, device)
    if target_kind == "float":
        target = target.round()  # the same 0/1 map as a float tensor
    for fn, kwargs in ((F.dice_ce_loss, {"sigmoid": True}), (F.unified_focal_loss, {"sigmoid": True})):
        _compare(fn, backend, logits, target, **kwargs)
    # Every dtype gives the float map's loss on the backend itself.
    as_float = loss_and_grad(F.dice_ce_loss, logits, target.float(), sigmoid=True, backend=backend)
    native = loss_and_grad(F.dice_ce_loss, logits, target, sigmoid=True, backend=backend)
    for a, b in zip(native, as_float, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_id", ["ufl_sym_noclip", "asym_focal", "dice_bce", "dice_focal_sigmoid", "sigmoid_focal"])
def test_one_channel(backend, case_id):
    fn, kwargs = _case(case_id)
    device = _device(backend)
    logits = _logits((3, 1, 11, 3), 5, device)
    _compare(fn, backend, logits, _target("uint8", logits.shape, 5, device), **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_id", ["ufl_asym", "dice_bce_weighted_nobg", "dice_focal", "tversky"])
def test_batch_statistics(backend, case_id):
    fn, kwargs = _case(case_id)
    device = _device(backend)
    logits = _logits((3, 3, 5, 6), 9, device)
    target = _target("float" if kwargs.get("sigmoid") else "labels", logits.shape, 9, device)
    grad_output = torch.randn(3, generator=torch.Generator().manual_seed(9)).to(device)
    _compare(fn, backend, logits, target, batch=True, reduction="none", grad_output=grad_output, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case_id", ["ufl_asym", "dice_bce", "sigmoid_focal"])
def test_half_precision_logits(backend, dtype, case_id):
    fn, kwargs = _case(case_id)
    device = _device(backend)
    logits = _logits((2, 3, 7, 9), 11, device, dtype=dtype)
    target = _target("uint8", logits.shape, 11, device)
    fused = loss_and_grad(fn, logits, target, backend=backend, **kwargs)
    # The float32 reference on the same (half-precision) inputs, its gradient rounded to their dtype:
    # stricter than a reference computed in half precision.
    same = loss_and_grad(fn, logits.float(), target, backend="reference", **kwargs)
    same = (same[0], same[1].to(dtype))
    truth = loss_and_grad(fn, logits.double(), target, backend="reference", **kwargs)
    assert fused[1].dtype == dtype
    for what, a, b, c in zip(("loss", "gradient"), fused, same, truth, strict=True):
        assert_no_worse_than_reference(a, b, c, dtype, f"{backend} {fn.__name__} {dtype} {what}")
