"""CALF on the C++ CPU backend: against the reference and numpy, gradients against finite differences,
dtypes, layouts, poisoned outputs, determinism, the custom ops, and the one-pass foreground_sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_calf_stats import _bincount_per_image
from test_calf_transforms import _logits, _np_loss, _np_voxel_grad, _np_voxel_loss
from test_ext_helpers import requires_ext

from lmfloss_kernels import options
from lmfloss_kernels.calf import TRANSFORMS, CALFLoss, clip_limit, foreground_sizes, transform_loss
from lmfloss_kernels.calf import transforms as calf_transforms

pytestmark = requires_ext

EPS = 1e-7


def _loss_and_grad(z, target, transform, backend, dtype, **kwargs):
    """Loss and the gradient of ``Σ w_b L_b`` (fixed uneven weights ``w``) for a fresh leaf copy of ``z``."""
    x = z.detach().to(dtype).requires_grad_(True)
    value = transform_loss(x, target, transform, backend=backend, **kwargs)
    weights = torch.linspace(0.5, 1.5, value.numel(), dtype=value.dtype).view(value.shape)
    (grad,) = torch.autograd.grad((value * weights).sum(), x)
    return value.detach(), grad


def _assert_matches_reference(z, target, transform, dtype=torch.float32, value_rtol=1e-5, grad_rtol=1e-5, **kwargs):
    value, grad = _loss_and_grad(z, target, transform, "cpu", dtype, **kwargs)
    ref_value, ref_grad = _loss_and_grad(z, target, transform, "reference", dtype, **kwargs)
    assert value.dtype == ref_value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype and grad.shape == z.shape
    torch.testing.assert_close(value, ref_value, rtol=value_rtol, atol=value_rtol * 1e-2)
    error = float((grad.double() - ref_grad.double()).norm())
    assert error <= grad_rtol * float(ref_grad.double().norm()) + 1e-12, (error, float(ref_grad.double().norm()))
    return value, grad


def _target(kind, shape):
    """(target, ignore_index) of a kind; ``shape`` = (B, 1, *S)."""
    labels = (torch.rand(shape[:1] + shape[2:]) < 0.3).to(torch.uint8)
    if kind == "soft":
        return torch.rand(shape), None
    if kind == "ignore":
        labels[torch.rand(labels.shape) < 0.25] = 255
        labels[-1] = 255  # one image entirely ignored
        return labels, 255
    if kind == "bool":
        return labels.bool(), None
    if kind == "int32":
        return labels.int(), None
    if kind == "int8_ignore":
        labels = labels.to(torch.int8)
        labels[torch.rand(labels.shape) < 0.2] = -1
        return labels, -1
    return labels, None


# --------------------------------------------------------------------------------------------
# Against the reference


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("dice_coef, batch", [(0.0, False), (1.0, False), (0.7, True)])
@pytest.mark.parametrize("target_kind", ["uint8", "ignore", "bool", "int32", "int8_ignore", "soft"])
def test_cpu_matches_reference_fp32(transform, dice_coef, batch, target_kind):
    shape = (3, 1, 13, 17, 19)  # 4199 voxels per image: two chunks of the kernel, the second partial
    z = _logits(shape, torch.float32)
    target, ignore_index = _target(target_kind, shape)
    kwargs = dict(transform_coef=1.3, dice_coef=dice_coef, batch=batch, ignore_index=ignore_index)
    for reduction in ("none", "mean", "sum"):
        _assert_matches_reference(z, target, transform, reduction=reduction, **kwargs)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("dice_coef", [0.0, 1.0])
def test_cpu_matches_reference_fp64(transform, dice_coef):
    z = _logits((2, 1, 9, 10, 11))
    target = torch.randint(0, 2, (2, 9, 10, 11))
    target[0, 0] = 9
    kwargs = dict(dice_coef=dice_coef, ignore_index=9, reduction="none")
    _assert_matches_reference(z, target, transform, torch.float64, 1e-12, 1e-12, **kwargs)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_matches_reference_half(transform, dtype):
    # Both compute in float32 from the same half-precision logits; the gradients are then rounded to
    # the half dtype, which can differ by one rounding where the float32 values differ in the last bits.
    z = _logits((2, 1, 16, 16, 9), torch.float32, spread=3.0).to(dtype)
    target = torch.randint(0, 2, (2, 16, 16, 9), dtype=torch.uint8)
    grad_rtol = 4e-3 if dtype == torch.bfloat16 else 5e-4
    _assert_matches_reference(z, target, transform, dtype, 1e-5, grad_rtol, dice_coef=0.5, reduction="sum")


@pytest.mark.parametrize("transform", ["fisher", "arcsine", "ln"])
def test_cpu_odd_layouts_and_options(transform):
    # Channels-last logits, no channel axis on the target, batch Dice, an all-ignored image, int64 labels.
    z = _logits((3, 1, 7, 11, 5), torch.float32).to(memory_format=torch.channels_last_3d)
    target = torch.randint(0, 2, (3, 7, 11, 5))
    target[1] = -1
    kwargs = dict(dice_coef=2.0, transform_coef=0.5, batch=True, ignore_index=-1, reduction="none")
    _assert_matches_reference(z, target, transform, **kwargs)
    # (B, *S) logits without a channel axis, (B, 1, *S) target, expanded (stride-0) batch.
    z2 = _logits((1, 23, 29), torch.float32).expand(2, 23, 29)
    target2 = torch.randint(0, 2, (2, 1, 23, 29), dtype=torch.uint8)
    _assert_matches_reference(z2, target2, transform, dice_coef=1.0)
    # Spatial axes that cannot be flattened as a view (a transposed map), and a strided target.
    z3 = _logits((2, 31, 37), torch.float32).transpose(1, 2)
    target3 = torch.randint(0, 2, (2, 62, 37), dtype=torch.uint8)[:, ::2].transpose(1, 2)
    _assert_matches_reference(z3, target3, transform, dice_coef=1.0, reduction="none")
    # Dice only: the transform is not evaluated.
    _assert_matches_reference(z2, target2, transform, transform_coef=0.0, dice_coef=1.0)
    # One voxel per image, and an image of many chunks.
    _assert_matches_reference(_logits((5, 1), torch.float32), torch.randint(0, 2, (5, 1)), transform, reduction="none")
    big = _logits((1, 1, 3 * 4096 + 17), torch.float32)
    _assert_matches_reference(big, torch.randint(0, 2, (1, 1, 3 * 4096 + 17)), transform, dice_coef=1.0)


# --------------------------------------------------------------------------------------------
# Against numpy and finite differences


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("dtype, rtol, atol", [(torch.float32, 2e-6, 2e-7), (torch.float64, 1e-12, 1e-15)])
def test_cpu_voxel_gradient_on_a_dense_grid(transform, dtype, rtol, atol):
    # One image: every voxel's gradient is dℓ/dz / V, the kernel's closed forms (and its vectorised
    # exp, log1p and atan, and the clip) against numpy float64 over the whole logit range.
    limit = np.float32(clip_limit(EPS))
    grid = np.concatenate([np.linspace(-40, 40, 4001), [limit, -limit, np.nextafter(limit, np.float32(99))]])
    z = torch.from_numpy(np.repeat(grid, 3)).to(dtype).view(1, 1, -1)
    y = torch.tensor([0.0, 1.0, 0.3], dtype=dtype).repeat(grid.size).view(1, 1, -1)
    x = z.clone().requires_grad_(True)
    transform_loss(x, y, transform, reduction="sum", backend="cpu").backward()
    expected = _np_voxel_grad(z.double().numpy().ravel(), y.double().numpy().ravel(), transform)
    np.testing.assert_allclose(x.grad.double().numpy().ravel() * z.numel(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("dtype, rtol, atol", [(torch.float32, 1e-6, 1e-6), (torch.float64, 1e-10, 1e-12)])
def test_cpu_voxel_loss_on_a_grid(transform, dtype, rtol, atol):
    # (B, 1) logits: every image is one voxel, so reduction="none" returns the per-voxel loss. float64:
    # artanh at the clip end p = 1 - eps has condition 1 / (2 eps), so 1e-10 is what rounding allows.
    limit = np.float32(clip_limit(EPS))
    grid = np.concatenate([np.linspace(-30, 30, 61), [limit, -limit, 1e-3, -1e-3, 0.0, 17.0, 1e-30]])
    y = np.resize(np.array([0.0, 1.0, 0.7]), grid.size)
    z = torch.from_numpy(grid.astype(np.float32)).to(dtype).view(-1, 1)
    got = transform_loss(z, torch.from_numpy(y).to(dtype).view(-1, 1), transform, reduction="none", backend="cpu")
    expected = _np_voxel_loss(z.double().numpy().ravel(), y, transform)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("target_kind", ["labels", "soft"])
def test_cpu_loss_matches_numpy(transform, target_kind):
    # No |z| >= 35 outliers: numpy's arcsin(sqrt(p)) itself is off by ~1e-9 there (p rounds near 1).
    z = _logits((3, 1, 5, 6, 7), outliers=False)
    if target_kind == "soft":
        target = torch.rand(3, 1, 5, 6, 7, dtype=torch.float64)
        y, valid, ignore_index = target.reshape(3, -1).numpy(), np.ones((3, 210), dtype=bool), None
    else:
        target = torch.where(torch.rand(3, 5, 6, 7) < 0.2, 4, (torch.rand(3, 5, 6, 7) < 0.3).long())
        y, valid, ignore_index = (target == 1).reshape(3, -1).double().numpy(), (target != 4).reshape(3, -1).numpy(), 4
    for dice_coef, batch in ((0.0, False), (0.6, False), (1.0, True)):
        expected = _np_loss(
            z.reshape(3, -1).numpy(), y, valid, transform, transform_coef=0.8, dice_coef=dice_coef, batch=batch
        )
        kwargs = dict(transform_coef=0.8, dice_coef=dice_coef, batch=batch, ignore_index=ignore_index)
        got = transform_loss(z, target, transform, reduction="none", backend="cpu", **kwargs)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Poisoned outputs, determinism, ops, dispatch


def test_outputs_fully_written(monkeypatch):
    """Every output buffer starts as NaN (LMFLOSS_EXT_POISON=1): unwritten elements would show."""
    monkeypatch.setenv("LMFLOSS_EXT_POISON", "1")
    for shape in [(2, 1, 7, 9, 11), (3, 1, 4099), (1, 1, 5)]:
        z = _logits(shape, torch.float32)
        target = torch.randint(0, 3, shape[:1] + shape[2:], dtype=torch.uint8)  # 2 = ignored
        for transform in TRANSFORMS:
            for kwargs in (dict(dice_coef=1.0, reduction="none"), dict(transform_coef=0.0, dice_coef=1.0, batch=True)):
                _assert_matches_reference(z, target, transform, ignore_index=2, **kwargs)


@pytest.mark.parametrize("transform", ["ln", "fisher", "arcsine"])
def test_cpu_bitwise_deterministic_across_runs_and_threads(transform):
    z = _logits((2, 1, 33, 47, 5), torch.float32)
    target = torch.randint(0, 2, (2, 33, 47, 5), dtype=torch.uint8)
    labels = torch.randint(0, 4, (3, 70001), dtype=torch.uint8)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            value, grad = _loss_and_grad(z, target, transform, "cpu", torch.float32, dice_coef=1.0, batch=True)
            results.append((value, grad, foreground_sizes(labels, 4, backend="cpu")))
    finally:
        torch.set_num_threads(threads)
    for outputs in results[1:]:
        for got, first in zip(outputs, results[0], strict=True):
            assert torch.equal(got, first)


def test_ops_opcheck_and_compile():
    from lmfloss_kernels.ext.calf_ops import foreground_sizes_op, transform_backward_op, transform_loss_op

    for dtype, transform in ((torch.float32, "fisher"), (torch.float64, "ln"), (torch.bfloat16, "arcsine")):
        z = _logits((2, 1, 6, 7), dtype, spread=2.0).requires_grad_(True)
        target = torch.randint(0, 2, (2, 1, 6, 7), dtype=torch.uint8)
        args = (transform, 1.0, 0.5, EPS, 1e-5, 1e-5, False, None)
        torch.library.opcheck(transform_loss_op, (z, target, *args))
        stats = transform_loss_op(z.detach(), target, *args)[1]
        torch.library.opcheck(
            transform_backward_op, (torch.rand(2, dtype=torch.float64), z.detach(), target, stats, *args)
        )
    soft = torch.rand(3, 5, 4)
    torch.library.opcheck(
        transform_loss_op,
        (torch.randn(3, 5, 4, requires_grad=True), soft, "logit", 0.5, 1.0, EPS, 1e-5, 1e-5, True, None),
    )
    for labels, ignore_index in (
        (torch.randint(0, 3, (2, 6, 7), dtype=torch.uint8), None),
        (torch.randint(-1, 3, (2, 9)), -1),
    ):
        torch.library.opcheck(foreground_sizes_op, (labels, 3, ignore_index))

    def step(x, y):
        return transform_loss(x, y, "arcsine", dice_coef=1.0, backend="cpu")

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    z = _logits((2, 1, 6, 7), torch.float32, spread=2.0).requires_grad_(True)
    target = torch.randint(0, 2, (2, 6, 7), dtype=torch.uint8)
    x = z.detach().clone().requires_grad_(True)
    compiled(x, target).backward()
    step(z, target).backward()
    torch.testing.assert_close(x.grad, z.grad)


def test_op_shape_checks():
    z = torch.randn(2, 1, 4, 4)
    with pytest.raises(RuntimeError, match="target must have the logits' shape"):
        torch.ops.lmfloss_ext.calf_transform_forward(
            z, torch.zeros(2, 4, 4), "ln", 1.0, 0.0, EPS, 1e-5, 1e-5, False, None
        )
    with pytest.raises(RuntimeError, match="transform must be one of"):
        torch.ops.lmfloss_ext.calf_transform_forward(
            z, torch.zeros_like(z), "sqrt", 1.0, 0.0, EPS, 1e-5, 1e-5, False, None
        )
    with pytest.raises(RuntimeError, match=r"stats must have shape \(2, 5\)"):
        torch.ops.lmfloss_ext.calf_transform_backward(
            torch.ones(2), z, torch.zeros_like(z), torch.zeros(2, 4), "ln", 1.0, 0.0, EPS, 1e-5, 1e-5, False, None
        )


def test_auto_picks_cpu_and_check_mode():
    z = _logits((2, 1, 8, 9), torch.float32, spread=2.0)
    target = torch.randint(0, 2, (2, 8, 9))
    for transform in TRANSFORMS:
        auto = _loss_and_grad(z, target, transform, "auto", torch.float32, dice_coef=1.0)
        cpu = _loss_and_grad(z, target, transform, "cpu", torch.float32, dice_coef=1.0)
        assert all(torch.equal(a, b) for a, b in zip(auto, cpu, strict=True))
        with options(check_backend=True):
            checked = _loss_and_grad(z, target, transform, "cpu", torch.float32, dice_coef=1.0)
        assert all(torch.equal(a, b) for a, b in zip(checked, cpu, strict=True))
    labels = torch.randint(0, 3, (2, 8, 9), dtype=torch.uint8)
    assert torch.equal(foreground_sizes(labels, 3), foreground_sizes(labels, 3, backend="cpu"))


def test_without_the_kernels_auto_falls_back_to_the_reference(monkeypatch):
    from lmfloss_kernels.ext import calf_ops

    monkeypatch.setattr(calf_ops, "HAS_KERNELS", False)
    monkeypatch.setattr(calf_transforms, "_warned_fallback", set())
    z = _logits((2, 1, 5, 6), torch.float32, spread=2.0)
    target = torch.randint(0, 2, (2, 5, 6))
    with pytest.warns(RuntimeWarning, match="using the eager reference .*no CALF kernels"):
        value = transform_loss(z, target, "logit", dice_coef=1.0)
    assert torch.equal(value, transform_loss(z, target, "logit", dice_coef=1.0, backend="reference"))
    with pytest.raises(ValueError, match="backend 'cpu' cannot serve cpu torch.float32 logits: .*no CALF kernels"):
        CALFLoss("ln", backend="cpu")(z, target)
    labels = target.to(torch.uint8)
    assert torch.equal(foreground_sizes(labels, 2), foreground_sizes(labels, 2, backend="reference"))
    with pytest.raises(ValueError, match="backend 'cpu' cannot serve cpu"):
        foreground_sizes(labels, 2, backend="cpu")


# --------------------------------------------------------------------------------------------
# foreground_sizes


@pytest.mark.parametrize(
    "dtype, ignore_index",
    [
        (torch.uint8, None),
        (torch.uint8, 255),
        (torch.uint8, 1),  # an ignore_index that is a class: that class counts 0
        (torch.int8, -1),
        (torch.int16, 300),
        (torch.int32, -100),
        (torch.int64, None),
        (torch.int64, 2**40),
    ],
)
@pytest.mark.parametrize("num_classes", [1, 3, 200])
def test_foreground_sizes_cpu_matches_bincount(dtype, ignore_index, num_classes):
    high = min(num_classes, torch.iinfo(dtype).max)
    for shape in ((3, 70001), (2, 1, 9, 13), (1, 1)):  # several count chunks per image; tiny
        labels = torch.randint(0, high, shape).to(dtype)
        if ignore_index is not None and torch.iinfo(dtype).min <= ignore_index <= torch.iinfo(dtype).max:
            labels[torch.rand(shape) < 0.15] = ignore_index
        counts = foreground_sizes(labels, num_classes, ignore_index, backend="cpu")
        assert counts.dtype == torch.int64 and counts.shape == (shape[0], num_classes)
        assert torch.equal(counts, _bincount_per_image(labels, num_classes, ignore_index))


def test_foreground_sizes_cpu_layouts_and_strays():
    mask = torch.rand(3, 12, 10) < 0.3
    assert torch.equal(foreground_sizes(mask, 2, backend="cpu"), _bincount_per_image(mask, 2, None))
    strided = torch.randint(0, 3, (4, 9, 8, 2), dtype=torch.uint8).permute(0, 3, 2, 1)[::2]
    assert torch.equal(foreground_sizes(strided, 3, backend="cpu"), _bincount_per_image(strided, 3, None))
    expanded = torch.randint(0, 2, (1, 6, 7)).expand(3, 6, 7)
    assert torch.equal(foreground_sizes(expanded, 2, backend="cpu"), _bincount_per_image(expanded, 2, None))
    # Labels out of range: the same error as the other backends, from the kernel's stray count.
    labels = torch.randint(0, 2, (2, 5, 5), dtype=torch.int32)
    labels[1, 2, 3], labels[0, 0, 0] = 7, -3
    for ignore_index in (None, 255):
        allowed = r"\[0, 1\]" + ("" if ignore_index is None else r" or ignore_index=255")
        with pytest.raises(ValueError, match=rf"^labels must be in {allowed}, got values in \[-3, 7\]"):
            foreground_sizes(labels, 2, ignore_index, backend="cpu")
    labels[1, 2, 3] = labels[0, 0, 0] = 255
    assert torch.equal(foreground_sizes(labels, 2, 255, backend="cpu"), _bincount_per_image(labels, 2, 255))
    from lmfloss_kernels.ext.calf_ops import foreground_sizes_op

    counts, strays = foreground_sizes_op(torch.tensor([[0, 5, 1, 9, -1]]), 2, -1)
    assert counts.tolist() == [[1, 1]] and int(strays) == 2
