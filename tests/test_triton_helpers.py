"""Shared helpers of the Triton tests, and the tests of the backend's availability policy.

On a machine without a GPU every Triton kernel runs on CPU tensors through the interpreter
(``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before triton is imported); with a GPU the
same tests run the compiled kernels on CUDA tensors.

Tolerances (design.md): float32 loss within 1e-5 relative, gradient within 1e-5 of the
reference gradient's norm. float16 / bfloat16: the Cut Cross-Entropy rule, the fused error
against the float64 truth (the reference on the same low-precision logits, upcast) must be no
worse than the error of the reference computed in the low dtype itself, plus a small tolerance.
"""

from __future__ import annotations

import pytest
import torch

from lmfloss_kernels import reference
from lmfloss_kernels._backends import AUTO_ORDER, resolve_backend
from lmfloss_kernels.triton import BACKEND, _common, row

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# The interpreter evaluates masked-off lanes too (log2(0), x/0 on padding), which numpy reports.
INTERPRETER_WARNINGS = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

LOW_PRECISION_TOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2}
# An absolute ceiling for the low-precision error, so that a broken kernel fails even when the
# same-dtype reference is itself unusable (NaN) for that input.
LOW_PRECISION_CEILING = {torch.float16: 1e-2, torch.bfloat16: 5e-2}


def loss_and_grad(function, logits, *args, grad_output=None, **kwargs):
    """``(loss, d(loss . grad_output)/d logits)`` for a fresh leaf copy of ``logits``."""
    x = logits.detach().clone().requires_grad_(True)
    loss = function(x, *args, **kwargs)
    if grad_output is None:
        grad_output = torch.ones_like(loss)
    (grad,) = torch.autograd.grad(loss, x, grad_output)
    return loss.detach(), grad


def random_grad_output(loss_shape, device=DEVICE):
    return torch.randn(loss_shape, device=device, dtype=torch.float32)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def assert_fp32_close(actual, expected, what: str, rtol: float = 1e-5) -> None:
    """Norm-wise relative error (with a tiny absolute floor for an all-zero reference)."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    assert bool(torch.isfinite(actual).all()), f"{what}: non-finite values {actual.flatten()[:8].tolist()}"
    error = float((actual - expected).norm())
    bound = rtol * float(expected.norm()) + 1e-12
    assert error <= bound, f"{what}: error norm {error:.3e} > {bound:.3e} (reference norm {float(expected.norm()):.3e})"


def assert_fp32_accurate(actual, reference_fp32, truth, what: str, rtol: float = 1e-5) -> None:
    """Within ``rtol`` of the float64 truth, or no further from it than the float32 reference.

    For randomly drawn degenerate inputs (e.g. ``1 - TI`` ~ 1e-8) the float32 reference itself can
    be far from the truth while the kernel is not; the kernel is then held to the truth.
    """
    actual, reference_fp32, truth = actual.double().cpu(), reference_fp32.double().cpu(), truth.double().cpu()
    assert bool(torch.isfinite(actual).all()), f"{what}: non-finite values {actual.flatten()[:8].tolist()}"
    error = float((actual - truth).norm())
    bound = float((reference_fp32 - truth).norm()) + rtol * float(truth.norm()) + 1e-12
    assert error <= bound, f"{what}: error {error:.3e} from the float64 truth > {bound:.3e}"


def assert_no_worse_than_reference(fused, same_dtype, truth, dtype, what: str) -> None:
    """Cut Cross-Entropy rule: |fused - truth| <= |reference in dtype - truth| + tol (norm-wise, relative)."""
    fused, same_dtype, truth = fused.double().cpu(), same_dtype.double().cpu(), truth.double().cpu()
    assert bool(torch.isfinite(fused).all()), f"{what}: non-finite fused values"
    scale = float(truth.norm()) + 1e-12
    fused_error = float((fused - truth).norm()) / scale
    reference_error = float((same_dtype - truth).norm()) / scale
    if reference_error != reference_error:  # NaN: the same-dtype reference broke down
        reference_error = float("inf")
    bound = min(reference_error + LOW_PRECISION_TOL[dtype], LOW_PRECISION_CEILING[dtype])
    assert fused_error <= bound, (
        f"{what}: fused error {fused_error:.3e} vs same-dtype reference {reference_error:.3e} (bound {bound:.3e})"
    )


def test_triton_serves_cpu_tensors_under_the_interpreter_only():
    if _common.INTERPRETED:
        assert BACKEND.unavailable_reason(torch.device("cpu"), torch.float32) is None
        assert "interpreter" in BACKEND.unavailable_reason(torch.device("cuda"), torch.float32)
    else:
        assert "TRITON_INTERPRET" in BACKEND.unavailable_reason(torch.device("cpu"), torch.float32)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert BACKEND.unavailable_reason(DEVICE, dtype) is None


def test_float64_and_other_devices_are_refused_with_a_reason():
    reason = BACKEND.unavailable_reason(DEVICE, torch.float64)
    assert "float32" in reason and "float64" in reason
    assert "meta" in BACKEND.unavailable_reason(torch.device("meta"), torch.float32)
    with pytest.raises(ValueError, match="float64"):
        resolve_backend("triton", torch.zeros(2, 3, dtype=torch.float64, device=DEVICE))


def test_auto_prefers_triton_for_cuda_tensors():
    assert AUTO_ORDER["cuda"][0] == "triton"
    if DEVICE.type == "cuda":
        assert resolve_backend("auto", torch.zeros(2, 3, device=DEVICE)).name == "triton"
    assert resolve_backend("triton", torch.zeros(2, 3, device=DEVICE)) is BACKEND


@pytest.mark.parametrize(
    ("num_classes", "num_voxels"), [(2, 1), (3, 1000), (5, 17 * 19 * 23), (32, 5), (33, 100), (8, 65536)]
)
@pytest.mark.parametrize("class_last", [False, True])
def test_launch_config_covers_every_class_and_voxel(num_classes, num_voxels, class_last):
    config = row.launch_config(num_classes, num_voxels, class_last)
    assert config["BLOCK_C"] >= num_classes and config["BLOCK_C"] & (config["BLOCK_C"] - 1) == 0
    assert config["BLOCK_V"] & (config["BLOCK_V"] - 1) == 0 and config["BLOCK_V"] >= 16
    assert 1 <= config["num_warps"] <= 8


@INTERPRETER_WARNINGS
def test_gradient_buffer_for_a_layout_without_a_flat_view():
    # (B, C, H, W) stored as (B, C, W, H): H and W cannot merge into one stride, so the kernel
    # writes a contiguous buffer that is copied back into a gradient laid out like the logits.
    logits = torch.randn(2, 3, 5, 4, device=DEVICE).transpose(2, 3)
    labels = torch.randint(0, 3, (2, 4, 5), device=DEVICE)
    ones = torch.ones(3, device=DEVICE)
    ref = loss_and_grad(reference.region_loss, logits, labels, ones, ones * 0.5, ones, **_UFL)
    fused = loss_and_grad(BACKEND.region_loss, logits, labels, ones, ones * 0.5, ones, **_UFL)
    assert fused[1].stride() == torch.empty_like(logits).stride()
    assert_fp32_close(fused[0], ref[0], "loss")
    assert_fp32_close(fused[1], ref[1], "gradient")


_UFL = dict(
    delta=0.6,
    focal_coef=0.5,
    tversky_coef=0.5,
    smooth_nr=1e-7,
    smooth_dr=1e-7,
    eps=1e-7,
    clip=True,
    batch=False,
    ignore_index=None,
    reduction="mean",
)
