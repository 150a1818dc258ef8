"""CALF under the package's non-finite policy, on every backend that runs here (reference, cpu, triton).

A NaN, +inf or -inf logit makes the loss of its image NaN (ignored voxels included), so also a
"mean" / "sum"; the other images keep their values. Nothing is added to the gradient: every fused
backend gives the reference's gradient, NaN where the formula has it, finite elsewhere.
"""

from __future__ import annotations

import pytest
import torch

from lmfloss_kernels import ext
from lmfloss_kernels.calf import TRANSFORMS, CALFLoss, transform_loss

# numpy (under the Triton interpreter) warns about the 0 * inf of the probe, which is the point here.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
# Triton on CPU tensors through the interpreter (conftest), compiled where a GPU is present.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ["reference", *(["cpu"] if ext.LOAD_ERROR is None else []), "triton"]
BAD = [float("nan"), float("inf"), float("-inf")]
# (transform_coef, dice_coef): transform only, transform + Dice, Dice only (the transform is skipped).
TERMS = [(1.0, 0.0), (1.0, 1.0), (0.0, 1.0)]


def _device(backend):
    return DEVICE if backend == "triton" else torch.device("cpu")


def _inputs():
    z = 3.0 * torch.randn(3, 1, 5, 7)
    target = torch.randint(0, 2, (3, 5, 7), dtype=torch.uint8)
    target[:, 0, 0] = 1  # the voxel that gets the bad logit: y = 1 (ln then gave inf / nan by label)
    target[:, 0, 1] = 0
    target[:, 4, 6] = 255  # an ignored voxel
    return z, target


def _run(backend, z, target, transform, transform_coef, dice_coef, reduction):
    device = _device(backend)
    x = z.detach().clone().to(device).requires_grad_(True)
    value = transform_loss(
        x, target.to(device), transform, transform_coef=transform_coef, dice_coef=dice_coef, ignore_index=255,
        reduction=reduction, backend=backend,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(value.sum(), x)
    return value.detach().cpu(), grad.cpu()


WHERE = {"y=1": (0, 0), "y=0": (0, 1), "ignored": (4, 6)}  # voxels of _inputs: label 1, label 0, ignored


def _one_image_per_case(z, target):
    """(clean batch, batch, its target, cases): image 0 of ``z``, then one copy of image 1 per
    (position, bad value) case, which ``batch`` has with that logit set."""
    cases = [(name, where, bad) for name, where in WHERE.items() for bad in BAD]
    clean = torch.cat([z[:1]] + [z[1:2]] * len(cases))
    batch = clean.clone()
    for image, (_, where, bad) in enumerate(cases, start=1):
        batch[image, 0, where[0], where[1]] = bad
    return clean, batch, torch.cat([target[:1]] + [target[1:2]] * len(cases)), cases


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("transform_coef, dice_coef", TERMS)
def test_nonfinite_logit_gives_nan_loss_of_its_image(backend, transform, transform_coef, dice_coef):
    z, target = _inputs()
    # Every (position, bad value) case in its own image of one batch: one pass per backend checks them
    # all ("none" losses are per image), the clean image 0 showing that the others stay untouched.
    clean_batch, batch, batch_target, cases = _one_image_per_case(z, target)
    clean = _run(backend, clean_batch, batch_target, transform, transform_coef, dice_coef, "none")[0]
    assert clean.isfinite().all()
    per_image, grad = _run(backend, batch, batch_target, transform, transform_coef, dice_coef, "none")
    for image, (name, _, bad) in enumerate(cases, start=1):
        assert per_image[image].isnan(), f"{backend} {transform} {name}: logit {bad} gave {float(per_image[image])}"
    # The clean image keeps its value and its gradient.
    assert torch.equal(per_image[0], clean[0])
    assert grad[0].isfinite().all()
    # One bad logit among clean images makes "mean" and "sum" NaN: each position, each bad value.
    for (name, where), bad in zip(WHERE.items(), BAD, strict=True):
        single = z.clone()
        single[1, 0, where[0], where[1]] = bad
        for reduction in ("mean", "sum"):
            assert _run(backend, single, target, transform, transform_coef, dice_coef, reduction)[0].isnan(), name


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("transform_coef, dice_coef", TERMS)
@pytest.mark.parametrize("bad", BAD)
def test_gradient_at_nonfinite_logits_is_the_references(backend, transform, transform_coef, dice_coef, bad):
    """Nothing is added to the gradient: the fused one is the reference's, NaN pattern included (valid voxels)."""
    z, target = _inputs()
    z[1, 0, 0, 0], z[2, 0, 0, 1] = bad, bad
    grad = _run(backend, z, target, transform, transform_coef, dice_coef, "none")[1]
    ref_grad = _run("reference", z, target, transform, transform_coef, dice_coef, "none")[1]
    valid = (target != 255).unsqueeze(1)
    torch.testing.assert_close(grad[valid], ref_grad[valid], rtol=1e-5, atol=1e-7, equal_nan=True)
    assert torch.equal(grad[~valid], torch.zeros_like(grad[~valid]))  # ignored voxels get exactly 0
    if bad != bad:  # a NaN logit enters its voxel's gradient (0 where the clip masks it, as torch.clamp)
        masked = transform in ("fisher", "logit") and dice_coef == 0.0
        assert grad[1, 0, 0, 0].isnan() != masked


def test_criterion_and_check_mode():
    from lmfloss_kernels import options

    z, target = _inputs()
    z[0, 0, 2, 2] = float("inf")
    for backend in BACKENDS:
        device = _device(backend)
        criterion = CALFLoss("fisher", dice_coef=1.0, ignore_index=255, backend=backend)
        assert criterion(z.to(device), target.to(device)).isnan()
        if backend != "reference":
            with options(check_backend=True):  # both sides NaN: not a mismatch
                assert criterion(z.to(device), target.to(device)).isnan()
