"""CALF transformation losses: reference vs numpy, gradients vs closed forms and finite differences, fused."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from lmfloss_kernels import ext, options
from lmfloss_kernels.calf import TRANSFORMS, bce_dice_loss, clip_limit, transform_loss, transform_loss_reference
from lmfloss_kernels.calf._voxel_math import atan_unit, log1p_unit

EPS = 1e-7
# Fused tests run the compiled kernels on a GPU, else the interpreter on CPU tensors (conftest).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------------------------
# Independent numpy float64 transcription (written from the formula table, in terms of p)


def _np_voxel_loss(z: np.ndarray, y: np.ndarray, transform: str, eps: float = EPS) -> np.ndarray:
    p, q = 1.0 / (1.0 + np.exp(-z)), 1.0 / (1.0 + np.exp(z))  # q = 1 - p without cancellation
    if transform in ("fisher", "logit"):
        p, q = np.clip(p, eps, 1.0 - eps), np.clip(q, eps, 1.0 - eps)
    if transform == "ln":
        return -(y * np.log(p) + (1 - y) * np.log(q))
    if transform == "log10":
        return -(y * np.log10(p) + (1 - y) * np.log10(q))
    if transform == "fisher":
        return -(y * np.arctanh(p) + (1 - y) * np.arctanh(q))
    if transform == "logit":
        return -(y * np.log(p / q) + (1 - y) * np.log(q / p))
    return -(y * np.arcsin(np.sqrt(p)) + (1 - y) * np.arcsin(np.sqrt(q)))


def _np_voxel_grad(z: np.ndarray, y: np.ndarray, transform: str, eps: float = EPS) -> np.ndarray:
    """The closed forms of losses.md 4.2 (per voxel, before the 1/V normalisation)."""
    p, q = 1.0 / (1.0 + np.exp(-z)), 1.0 / (1.0 + np.exp(z))
    inside = (p >= eps) & (p <= 1.0 - eps)
    if transform == "ln":
        return p - y
    if transform == "log10":
        return (p - y) / math.log(10)
    if transform == "fisher":
        return -(y * p / (1 + p) - (1 - y) * q / (2 - p)) * inside
    if transform == "logit":
        return (1 - 2 * y) * inside
    return -(2 * y - 1) * np.sqrt(p * q) / 2


def _np_loss(z, y, valid, transform, *, transform_coef=1.0, dice_coef=0.0, batch=False, smooth=1e-5):
    """Per-image loss (B,) from flattened (B, V) float64 arrays."""
    terms = np.where(valid, _np_voxel_loss(z, y, transform), 0.0)
    loss = transform_coef * terms.sum(1) / np.maximum(valid.sum(1), 1)
    if dice_coef:
        p = 1.0 / (1.0 + np.exp(-z)) * valid
        inter, total = (y * p).sum(1), (p + y * valid).sum(1)
        if batch:
            inter, total = inter.sum(keepdims=True), total.sum(keepdims=True)
        loss = loss + dice_coef * (1.0 - (2 * inter + smooth) / (total + smooth))
    return loss


def _logits(shape, dtype=torch.float64, spread=4.0, outliers=True):
    z = torch.randn(shape, dtype=torch.float64) * spread
    if outliers:  # saturated and clipped voxels: |z| beyond L = 16.1 and far beyond
        flat = z.view(-1)
        flat[::7] = torch.tensor([18.0, -20.0, 35.0, -60.0]).repeat(flat[::7].numel() // 4 + 1)[: flat[::7].numel()]
    return z.to(dtype)


# --------------------------------------------------------------------------------------------
# Reference vs numpy


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("target_kind", ["labels", "ignore", "soft"])
@pytest.mark.parametrize("dice_coef, batch", [(0.0, False), (0.7, False), (1.0, True)])
def test_reference_matches_numpy(transform, target_kind, dice_coef, batch):
    z = _logits((3, 1, 5, 6, 7))
    labels = (torch.rand(3, 5, 6, 7) < 0.3).long()
    ignore_index = None
    if target_kind == "soft":
        target = torch.rand(3, 1, 5, 6, 7, dtype=torch.float64)
        y, valid = target.reshape(3, -1).numpy(), np.ones((3, 210), dtype=bool)
    else:
        target = labels
        if target_kind == "ignore":
            ignore_index = -100
            target = torch.where(torch.rand(labels.shape) < 0.2, -100, labels)
            target[2] = -100  # one image entirely ignored
        y = (target == 1).reshape(3, -1).double().numpy()
        valid = (target != -100).reshape(3, -1).numpy()
    expected = _np_loss(
        z.reshape(3, -1).numpy(), y, valid, transform, transform_coef=1.3, dice_coef=dice_coef, batch=batch
    )
    kwargs = dict(transform_coef=1.3, dice_coef=dice_coef, batch=batch, ignore_index=ignore_index)
    got = transform_loss(z, target, transform, reduction="none", backend="reference", **kwargs)
    assert got.dtype == torch.float64 and got.shape == (3,)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)
    for reduction, fold in (("mean", np.mean), ("sum", np.sum)):
        value = transform_loss(z, target, transform, reduction=reduction, backend="reference", **kwargs)
        np.testing.assert_allclose(value.item(), fold(expected), rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------
# Gradients: closed form (numpy), finite differences


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_reference_gradient_matches_closed_form(transform):
    z = _logits((2, 1, 9, 11)).requires_grad_(True)
    target = (torch.rand(2, 9, 11) < 0.4).to(torch.uint8)
    transform_loss(z, target, transform, reduction="sum", backend="reference").backward()
    y = target.reshape(2, -1).double().numpy()
    expected = _np_voxel_grad(z.detach().reshape(2, -1).numpy(), y, transform) / y.shape[1]
    np.testing.assert_allclose(z.grad.reshape(2, -1).numpy(), expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("dice_coef, batch", [(0.0, False), (0.5, False), (1.0, True)])
def test_float64_gradcheck(backend, transform, dice_coef, batch):
    # Away from the clip ends (|z| = L), where the derivative jumps.
    z = _logits((2, 1, 4, 5), spread=3.0, outliers=False)
    z.view(-1)[::9] = 25.0
    z.requires_grad_(True)
    target = torch.randint(0, 2, (2, 1, 4, 5))
    target[0, 0, 0] = 7  # ignored voxels

    def fn(x):
        return transform_loss(
            x, target, transform, dice_coef=dice_coef, batch=batch, ignore_index=7, reduction="none", backend=backend
        )

    assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-7)


def test_clip_kills_gradient_outside_and_bounds_loss():
    limit = clip_limit(EPS)
    assert limit == pytest.approx(math.log((1 - EPS) / EPS), rel=1e-12)
    z = torch.tensor([[limit - 1.0, limit + 1.0, -limit - 1.0, 80.0]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[1, 1, 0, 0]])
    for transform in ("fisher", "logit"):
        z.grad = None
        loss = transform_loss(z, target, transform, reduction="sum", backend="reference")
        loss.backward()
        assert z.grad[0, 0] != 0 and torch.all(z.grad[0, 1:] == 0)
        assert torch.isfinite(loss)
    big = torch.tensor([[1e4, -1e4]], dtype=torch.float64)
    assert transform_loss(big, torch.tensor([[1, 0]]), "logit", backend="reference").item() == pytest.approx(-limit)


# --------------------------------------------------------------------------------------------
# Fused (Triton; interpreter on CPU) vs reference


def _fused_and_reference(z, target, transform, dtype=torch.float32, **kwargs):
    results = []
    target = target.to(DEVICE)
    for backend in ("triton", "reference"):
        x = z.detach().to(DEVICE, dtype).requires_grad_(True)
        value = transform_loss(x, target, transform, backend=backend, **kwargs)
        weights = torch.linspace(0.5, 1.5, value.numel(), dtype=value.dtype, device=DEVICE).view(value.shape)
        (value * weights).sum().backward()
        assert x.grad.dtype == dtype and x.grad.shape == z.shape
        results.append((value.detach().cpu(), x.grad.cpu()))
    return results


def _assert_close(results, value_rtol, grad_rtol):
    (value, grad), (ref_value, ref_grad) = results
    assert value.dtype == ref_value.dtype == torch.float32
    torch.testing.assert_close(value, ref_value, rtol=value_rtol, atol=value_rtol * 1e-2)
    error = float((grad.double() - ref_grad.double()).norm())
    assert error <= grad_rtol * float(ref_grad.double().norm()) + 1e-12, (error, float(ref_grad.norm()))


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("dice_coef", [0.0, 1.0])
@pytest.mark.parametrize("target_kind", ["uint8", "ignore", "bool", "soft"])
def test_fused_matches_reference_fp32(transform, dice_coef, target_kind):
    shape = (2, 1, 13, 17, 19)  # 4199 voxels per image: two tiles, the second partial
    z = _logits(shape, torch.float32)
    ignore_index = None
    if target_kind == "soft":
        target = torch.rand(shape)
    else:
        target = (torch.rand(2, 13, 17, 19) < 0.3).to(torch.uint8)
        if target_kind == "ignore":
            ignore_index = 255
            target[torch.rand(target.shape) < 0.25] = 255
        elif target_kind == "bool":
            target = target.bool()
    for reduction in ("none", "mean") if target_kind == "uint8" else ("none",):
        results = _fused_and_reference(
            z, target, transform, dice_coef=dice_coef, ignore_index=ignore_index, reduction=reduction
        )
        _assert_close(results, 1e-5, 1e-5)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("dtype, grad_rtol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_fused_matches_reference_half(transform, dtype, grad_rtol):
    z = _logits((2, 1, 16, 16, 9), torch.float32, spread=3.0)
    target = torch.randint(0, 2, (2, 16, 16, 9), dtype=torch.int32)
    results = _fused_and_reference(z, target, transform, dtype, dice_coef=0.5, reduction="sum")
    _assert_close(results, 1e-5, grad_rtol)


@pytest.mark.parametrize("transform", ["fisher", "arcsine"])
def test_fused_odd_layouts_and_options(transform):
    # Channels-last logits, no channel axis on the target, batch Dice, an all-ignored image, int64 labels.
    z = _logits((3, 1, 7, 11, 5), torch.float32).to(memory_format=torch.channels_last_3d)
    target = torch.randint(0, 2, (3, 7, 11, 5))
    target[1] = -1
    kwargs = dict(dice_coef=2.0, transform_coef=0.5, batch=True, ignore_index=-1, reduction="none")
    _assert_close(_fused_and_reference(z, target, transform, **kwargs), 1e-5, 1e-5)
    # (B, *S) logits without a channel axis, (B, 1, *S) target, expanded (stride-0) batch.
    z2 = _logits((1, 23, 29), torch.float32).expand(2, 23, 29)
    target2 = torch.randint(0, 2, (2, 1, 23, 29), dtype=torch.uint8)
    _assert_close(_fused_and_reference(z2, target2, transform, dice_coef=1.0), 1e-5, 1e-5)
    # Dice only: the transform term is skipped.
    _assert_close(_fused_and_reference(z2, target2, transform, transform_coef=0.0, dice_coef=1.0), 1e-5, 1e-5)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_fused_voxel_gradient_on_a_dense_grid(transform):
    # One image, every voxel's gradient is dℓ/dz / V: the kernel's closed forms (and its atan, log1p
    # and clip) against numpy float64 over the whole logit range, the clip ends included.
    limit = np.float32(clip_limit(EPS))
    grid = np.concatenate([np.linspace(-40, 40, 4001), [limit, -limit, np.nextafter(limit, np.float32(99))]])
    z = torch.from_numpy(np.repeat(grid, 3).astype(np.float32)).view(1, 1, -1)
    y = torch.tensor([0.0, 1.0, 0.3]).repeat(grid.size).view(1, 1, -1)
    x = z.to(DEVICE).clone().requires_grad_(True)
    transform_loss(x, y.to(DEVICE), transform, reduction="sum", backend="triton").backward()
    expected = _np_voxel_grad(z.double().numpy().ravel(), y.double().numpy().ravel(), transform)
    np.testing.assert_allclose(x.grad.cpu().double().numpy().ravel() * z.numel(), expected, rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_fused_voxel_loss_on_a_grid(transform):
    # (B, 1) logits: every image is one voxel, so reduction="none" returns the per-voxel loss.
    limit = np.float32(clip_limit(EPS))
    grid = np.concatenate([np.linspace(-30, 30, 25), [limit, -limit, 1e-3, -1e-3, 0.0, 17.0]]).astype(np.float32)
    y = np.resize(np.array([0.0, 1.0, 0.7], dtype=np.float32), grid.size)
    z = torch.from_numpy(grid).view(-1, 1).to(DEVICE)
    got = transform_loss(z, torch.from_numpy(y).view(-1, 1).to(DEVICE), transform, reduction="none", backend="triton")
    expected = _np_voxel_loss(grid.astype(np.float64), y.astype(np.float64), transform)
    np.testing.assert_allclose(got.cpu().double().numpy(), expected, rtol=1e-6, atol=1e-6)


@triton.jit
def _helpers_kernel(x_ptr, atan_ptr, log1p_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(atan_ptr + offs, atan_unit(x), mask=offs < n)
    tl.store(log1p_ptr + offs, log1p_unit(x), mask=offs < n)


def test_kernel_math_helpers_against_numpy():
    # The hand-written atan and log1p of the kernel (libdevice is not available to the interpreter), to a
    # few fp32 ulp (fp32 log itself may be a few ulp off, in numpy SIMD and on the GPU).
    x = np.concatenate([np.linspace(0, 1, 60001), np.geomspace(1e-30, 1e-2, 2000)]).astype(np.float32)
    inputs = torch.from_numpy(x).to(DEVICE)
    atan, log1p = torch.empty_like(inputs), torch.empty_like(inputs)
    _helpers_kernel[(1,)](inputs, atan, log1p, x.size, BLOCK=triton.next_power_of_2(x.size))
    exact = x.astype(np.float64)
    np.testing.assert_allclose(atan.cpu().double().numpy(), np.arctan(exact), rtol=5e-7, atol=4e-8)
    np.testing.assert_allclose(log1p.cpu().double().numpy(), np.log1p(exact), rtol=1e-6, atol=0)


def test_fused_check_mode_and_bce_dice_alias():
    z = _logits((2, 1, 8, 8), torch.float32, spread=2.0).to(DEVICE)
    target = torch.randint(0, 2, (2, 8, 8), device=DEVICE)
    with options(check_backend=True):
        fused = bce_dice_loss(z, target, backend="triton")
    reference = transform_loss(z, target, "ln", dice_coef=1.0, backend="reference")
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-7)


def test_fused_ops_opcheck_and_compile():
    from lmfloss_kernels.calf._triton import calf_foreground_sizes, calf_transform_backward, calf_transform_loss

    z = _logits((2, 1, 6, 7), torch.float32, spread=2.0).to(DEVICE).requires_grad_(True)
    target = torch.randint(0, 2, (2, 6, 7), dtype=torch.uint8, device=DEVICE)
    args = ("fisher", 1.0, 0.5, EPS, 1e-5, 1e-5, False, None)
    torch.library.opcheck(calf_transform_loss, (z, target, *args))
    stats = calf_transform_loss(z.detach(), target, *args)[1]
    torch.library.opcheck(calf_transform_backward, (torch.ones(2, device=DEVICE), z.detach(), target, stats, *args))
    torch.library.opcheck(calf_foreground_sizes, (target, 2, None))

    def step(x, y):
        return transform_loss(x, y, "arcsine", dice_coef=1.0, backend="triton")

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    x = z.detach().clone().requires_grad_(True)
    compiled(x, target).backward()
    z.grad = None
    step(z, target).backward()
    torch.testing.assert_close(x.grad, z.grad)


# --------------------------------------------------------------------------------------------
# Input checks


def test_bad_input():
    z = torch.randn(2, 1, 4, 4)
    labels = torch.randint(0, 2, (2, 4, 4))
    with pytest.raises(ValueError, match="transform must be one of"):
        transform_loss(z, labels, "sqrt")
    with pytest.raises(ValueError, match="target must have the logits' shape"):
        transform_loss(z, labels[:, :3], "ln")
    with pytest.raises(ValueError, match=r"target labels must be in \[0, 1\], got values in \[1, 2\]"):
        transform_loss(z, labels + 1, "ln")
    stray = labels.to(torch.int16)
    stray[0, 0, :2] = torch.tensor([-1, 1], dtype=torch.int16)
    stray[1, 1, 1] = 255
    with pytest.raises(
        ValueError, match=r"target labels must be in \[0, 1\] or ignore_index=255, got values in \[-1, 1\]"
    ):
        transform_loss(z, stray, "ln", ignore_index=255)
    with pytest.raises(ValueError, match=r"every entry finite and in \[0, 1\], got NaN entries"):
        transform_loss(z, torch.full((2, 1, 4, 4), float("nan")), "ln")
    with pytest.raises(ValueError, match=r"every entry finite and in \[0, 1\], got values in \["):
        transform_loss(z, torch.rand(2, 1, 4, 4) * 2, "ln")
    with pytest.raises(ValueError, match="applies to integer label maps only"):
        transform_loss(z, torch.rand(2, 4, 4), "ln", ignore_index=255)
    with pytest.raises(ValueError, match="both 0"):
        transform_loss(z, labels, "ln", transform_coef=0.0)
    with pytest.raises(ValueError, match=r"eps must be in \(0, 0.5\)"):
        transform_loss(z, labels, "fisher", eps=0.0)
    with pytest.raises(TypeError, match="logits must be float16"):
        transform_loss(z.long(), labels, "ln")
    with pytest.raises(ValueError, match="backend 'triton' cannot serve cpu torch.float64"):
        transform_loss(z.double(), labels, "ln", backend="triton")
    with pytest.raises(ValueError, match="backend must be one of .*'triton' is its CUDA path"):
        transform_loss(z, labels, "ln", backend="cuda")
    with pytest.raises(ValueError, match="reduction must be one of"):
        transform_loss(z, labels, "ln", reduction="batchmean")


def test_reference_half_upcast_matches_float():
    z = _logits((2, 1, 5, 5), torch.float32).to(torch.bfloat16)
    target = torch.randint(0, 2, (2, 5, 5))
    half = transform_loss_reference(z, target, transform="arcsine", dice_coef=1.0)
    full = transform_loss_reference(z.float(), target, transform="arcsine", dice_coef=1.0)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_fused_backends_refuse_double_backward(backend):
    if backend == "cpu" and ext.LOAD_ERROR is not None:
        pytest.fail(f"the C++ extension must load for this test: {ext.LOAD_ERROR}")
    z = torch.randn(2, 1, 4, 5, requires_grad=True)
    labels = torch.randint(0, 2, (2, 4, 5), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=f"double backward is not supported by backend '{backend}'.*reference"):
        torch.autograd.grad(transform_loss(z, labels, "arcsine", backend=backend), z, create_graph=True)
    (grad,) = torch.autograd.grad(transform_loss(z, labels, "arcsine", backend=backend), z)
    (expected,) = torch.autograd.grad(transform_loss(z, labels, "arcsine", backend="reference"), z)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)
