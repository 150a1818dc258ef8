"""The CPU kernels apply the non-finite logits policy themselves (the backend's ``nonfinite_in_kernel``).

A NaN, +inf or -inf logit makes the loss of its row / image NaN (ignored ones included) and of no
other, for every reduction, rows and regions, softmax and sigmoid, label maps and dense targets,
in any tile of a row / image; the gradient is the kernels' own (the policy adds nothing to it). The
expected loss is the reference's with the host-side policy (``functional._propagate_nonfinite``,
which the ``cpu`` backend no longer runs).
"""

from __future__ import annotations

import pytest
import torch
from test_ext_helpers import RTOL, assert_close, loss_and_grad, requires_ext

from lmfloss_kernels import ext, reference
from lmfloss_kernels import functional as F
from lmfloss_kernels.ext import CPU_BACKEND

pytestmark = requires_ext

BAD = [float("nan"), float("inf"), float("-inf")]
REDUCTIONS = ["none", "mean", "sum"]


def _with_policy(function, family, logits, *args, **kwargs):
    """The reference under the host-side policy: what the ``cpu`` backend computed before the probe."""
    return F._propagate_nonfinite(function(logits, *args, **kwargs), logits, family, kwargs["reduction"])


def _check(fused, expected_fn, family, logits, args, kwargs, bad_items, dtype):
    """Loss: the policy's (NaN exactly on ``bad_items``); gradient: the reference's on the other items."""
    reduction = kwargs["reduction"]
    per_item = logits.shape[:1] if family == "region_loss" else args[0].shape
    grad_output = torch.randn(per_item if reduction == "none" else (), dtype=torch.float64)
    loss, grad = loss_and_grad(fused, logits, *args, grad_output=grad_output, **kwargs)
    expected = _with_policy(expected_fn, family, logits, *args, **kwargs).detach()
    torch.testing.assert_close(loss.double(), expected.double(), rtol=1e-5, atol=1e-7, equal_nan=True)
    if reduction == "none":
        flat = loss.reshape(-1)
        nan_items = flat.isnan().nonzero().flatten().tolist()
        assert nan_items == sorted(bad_items), (nan_items, bad_items)
    else:
        assert bool(loss.isnan()), float(loss)
    # The other items' gradients do not depend on the bad logit (no shared sums with batch=False).
    _, ref_grad = loss_and_grad(expected_fn, logits, *args, grad_output=grad_output, **kwargs)
    good = torch.ones(logits.shape[0], dtype=torch.bool)
    if family == "region_loss":
        good[bad_items] = False
        assert_close(grad[good], ref_grad[good], "gradient of the finite images", RTOL[dtype])
    else:
        rows = torch.ones(args[0].numel(), dtype=torch.bool)
        rows[bad_items] = False
        mask = rows.reshape(args[0].shape)
        pick = (lambda g: g[mask]) if logits.dim() == 2 else (lambda g: g.movedim(1, -1)[mask])
        assert_close(pick(grad), pick(ref_grad), "gradient of the finite rows", RTOL[dtype])


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 1.0), (1.0, 0.0), (0.0, 1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows(bad, reduction, alpha, beta, dtype):
    """(N, C) rows: a bad logit in a later tile, one in an ignored row; LDAM or focal alone too."""
    n, c = 151, 7
    logits = (3 * torch.randn(n, c, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, c, (n,))
    labels[::9] = -100
    logits[130, 5] = bad  # third tile of 64 rows
    logits[18, 0], labels[18] = bad, -100  # an ignored row
    vector_dtype = dtype
    margins, ldam_weight, focal_weight = (torch.rand(c, dtype=vector_dtype) + 0.2 for _ in range(3))
    kwargs = dict(alpha=alpha, beta=beta, gamma=1.5, s=30.0, ignore_index=-100, reduction=reduction)
    args = (labels, margins, ldam_weight, focal_weight)
    _check(CPU_BACKEND.row_loss, reference.row_loss, "row_loss", logits, args, kwargs, [18, 130], dtype)


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_dense_rows(bad, reduction):
    """(B, C, *S) logits of a row loss: every voxel is a row."""
    logits = 3 * torch.randn(2, 5, 9, 11)
    labels = torch.randint(0, 5, (2, 9, 11))
    logits[1, 3, 8, 10] = bad  # the last voxel: a partial tile
    vectors = tuple(torch.rand(5) + 0.2 for _ in range(3))
    kwargs = dict(alpha=1.0, beta=1.0, gamma=0.5, s=30.0, ignore_index=-100, reduction=reduction)
    bad_row = 99 + 8 * 11 + 10
    _check(CPU_BACKEND.row_loss, reference.row_loss, "row_loss", logits, (labels, *vectors), kwargs, [bad_row],
           torch.float32)  # fmt: skip


def _region_inputs(shape, kind, sigmoid, dtype=torch.float32):
    c = shape[1]
    logits = (3 * torch.randn(shape, dtype=torch.float64)).to(dtype)
    if kind == "labels":
        target = torch.randint(0, c, shape[:1] + shape[2:])
    elif kind == "soft":
        target = torch.softmax(2 * torch.randn(shape, dtype=torch.float64), 1).to(dtype)
    else:
        target = (torch.rand(shape) < 0.4).to(torch.uint8)
    weight = torch.rand((2, c) if sigmoid else (c,), dtype=dtype) + 0.2
    gamma = torch.tensor([0.5, 0.0, 2.0, 1.0] * 2 * c, dtype=dtype)[: weight.numel()].reshape(weight.shape)
    exponent = torch.tensor([1.0, 0.5, 0.75, 0.0] * c, dtype=dtype)[:c]
    return logits, target, weight, gamma, exponent


REGION_TERMS = [dict(), dict(focal_coef=0.0, tversky_coef=1.0), dict(focal_coef=1.0, tversky_coef=0.0)]


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("terms", REGION_TERMS, ids=["both", "tversky", "focal"])
@pytest.mark.parametrize(
    ("kind", "sigmoid"), [("labels", False), ("soft", False), ("labels", True), ("multihot", True), ("soft", True)]
)
def test_regions(bad, reduction, terms, kind, sigmoid):
    """(B, C, *S): the bad logit in image 1's third tile (a partial one), another in image 3's first."""
    logits, target, *vectors = _region_inputs((4, 3, 11, 15), kind, sigmoid)
    logits[1, 2, 10, 14] = bad
    logits[3, 0, 0, 1] = bad
    options = dict(delta=0.6, focal_coef=0.5, tversky_coef=0.5, smooth_nr=1e-6, smooth_dr=1e-6, eps=1e-7,
                   clip=kind != "soft", batch=False, ignore_index=None, reduction=reduction,
                   sigmoid=sigmoid)  # fmt: skip
    options.update(terms)
    _check(CPU_BACKEND.region_loss, reference.region_loss, "region_loss", logits, (target, *vectors), options,
           [1, 3], torch.float32)  # fmt: skip


@pytest.mark.parametrize("bad", BAD)
def test_region_ignored_voxel_and_float64(bad):
    """A bad logit on an ignored voxel still counts; float64 logits carry the probe too."""
    logits, target, *vectors = _region_inputs((3, 4, 5, 7), "labels", False, torch.float64)
    target[2, 4, 6] = 9
    logits[2, 1, 4, 6] = bad
    options = dict(delta=0.6, focal_coef=0.5, tversky_coef=0.5, smooth_nr=1e-6, smooth_dr=1e-6, eps=1e-7,
                   clip=True, batch=False, ignore_index=9, reduction="none")  # fmt: skip
    _check(CPU_BACKEND.region_loss, reference.region_loss, "region_loss", logits, (target, *vectors), options,
           [2], torch.float64)  # fmt: skip


def test_functional_api_runs_no_host_side_policy_on_cpu(monkeypatch):
    """The ``cpu`` backend needs no second read of the logits: ``_propagate_nonfinite`` is not called."""
    assert ext.CPU_NONFINITE_IN_KERNEL, "the loaded library predates the CPU kernels' probe: rebuild it"

    def fail(*args, **kwargs):
        raise AssertionError("the cpu backend must not need _propagate_nonfinite")

    monkeypatch.setattr(F, "_propagate_nonfinite", fail)
    rows = torch.randn(40, 8)
    rows[7, 2] = float("nan")
    labels = torch.randint(0, 8, (40,))
    per_row = F.lmf_loss(rows, labels, [10, 20, 30, 40, 50, 60, 70, 80], backend="cpu", reduction="none")
    assert per_row.isnan().nonzero().flatten().tolist() == [7]
    volume = torch.randn(2, 4, 6, 7)
    volume[0, 3, 5, 6] = float("inf")
    labels = torch.randint(0, 4, (2, 6, 7))
    per_image = F.unified_focal_loss(volume, labels, backend="cpu", reduction="none")
    assert bool(per_image[0].isnan()) and bool(per_image[1].isfinite())
