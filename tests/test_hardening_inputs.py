"""Bad-input battery: every public loss and criterion answers wrong input with a clear error that
names the argument, never a crash, a hang or a silently wrong answer."""

from __future__ import annotations

import math

import pytest
import torch

import lmfloss_kernels as lk
from lmfloss_kernels import functional as F

COUNTS = [30, 8, 2]
REGION = [
    F.unified_focal_loss, F.focal_tversky_loss, F.symmetric_focal_loss, F.asymmetric_focal_loss,
    F.mixed_focal_loss, F.tversky_loss, F.dice_loss,
]  # fmt: skip
ROWS = [
    lambda x, t, **kw: F.lmf_loss(x, t, COUNTS, **kw),
    lambda x, t, **kw: F.ldam_loss(x, t, COUNTS, **kw),
    lambda x, t, **kw: F.focal_loss(x, t, **kw),
]
ALL = REGION + ROWS
MODULES = [
    lambda: lk.UnifiedFocalLoss(), lambda: lk.FocalTverskyLoss(), lambda: lk.TverskyLoss(), lambda: lk.DiceLoss(),
    lambda: lk.SymmetricFocalLoss(), lambda: lk.AsymmetricFocalLoss(), lambda: lk.MixedFocalLoss(),
    lambda: lk.FocalLoss(), lambda: lk.LMFLoss(COUNTS), lambda: lk.LDAMLoss(COUNTS),
]  # fmt: skip


def _ok():
    return torch.randn(2, 3, 4, 5), torch.randint(0, 3, (2, 4, 5))


@pytest.mark.parametrize("fn", ALL + [m() for m in MODULES])
@pytest.mark.parametrize(
    ("logits", "target", "error", "match"),
    [
        (torch.randn(3), torch.zeros(3, dtype=torch.long), ValueError, "logits must have shape"),
        (torch.randn(2, 1, 4, 5), torch.zeros(2, 4, 5, dtype=torch.long), ValueError, "at least 2 classes"),
        (torch.randn(0, 3, 4, 5), torch.zeros(0, 4, 5, dtype=torch.long), ValueError, "must not be empty"),
        (torch.randint(0, 3, (2, 3, 4, 5)), torch.zeros(2, 4, 5, dtype=torch.long), TypeError, "logits must be float"),
        (torch.randn(2, 3, 4, 5), torch.zeros(2, 4, 6, dtype=torch.long), ValueError, "target must have shape"),
        (torch.randn(2, 3, 4, 5), torch.full((2, 4, 5), 3), ValueError, r"target labels must be in \[0, 2\]"),
        (torch.randn(2, 3, 4, 5), torch.full((2, 4, 5), -2), ValueError, r"got values in \[-2, -2\]"),
        (torch.randn(2, 3, 4, 5), torch.zeros(2, 4, 5, device="meta", dtype=torch.long), ValueError, "device"),
        (torch.randn(2, 3, 4, 5), [[0]], TypeError, "target must be a torch.Tensor"),
        ("logits", torch.zeros(2, dtype=torch.long), TypeError, "logits must be a torch.Tensor"),
    ],
)
def test_bad_tensors(fn, logits, target, error, match):
    with pytest.raises(error, match=match):
        fn(logits, target)


@pytest.mark.parametrize("fn", ALL)
@pytest.mark.parametrize(
    ("keyword", "value", "error", "match"),
    [
        ("reduction", "avg", ValueError, "reduction must be one of"),
        ("backend", "gpu", ValueError, "backend must be one of"),
        ("ignore_index", 1.5, TypeError, "ignore_index must be"),
    ],
)
def test_bad_common_keywords(fn, keyword, value, error, match):
    logits, target = _ok()
    with pytest.raises(error, match=match):
        fn(logits, target, **{keyword: value})


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda x, t: F.unified_focal_loss(x, t, delta=math.nan), "delta must be finite"),
        (lambda x, t: F.unified_focal_loss(x, t, gamma=-0.1), r"gamma must be in \[0, 1\]"),
        (lambda x, t: F.focal_tversky_loss(x, t, eps=math.inf), "eps must be finite"),
        (lambda x, t: F.tversky_loss(x, t, smooth=math.nan), "smooth must be finite"),
        (lambda x, t: F.mixed_focal_loss(x, t, alpha=[1.0, math.nan, 1.0]), "alpha must be finite"),
        (lambda x, t: F.mixed_focal_loss(x, t, alpha=[1.0, 1.0]), r"alpha must have one entry per class \(3\)"),
        (lambda x, t: F.lmf_loss(x, t, [30, 0, 2]), "class_counts must be positive"),
        (lambda x, t: F.lmf_loss(x, t, [30, -1, 2]), "class_counts must be positive"),
        (lambda x, t: F.lmf_loss(x, t, [30, 8]), r"class_counts must have one entry per class \(3\)"),
        (lambda x, t: F.lmf_loss(x, t, []), r"class_counts must have one entry per class \(3\)"),
        (lambda x, t: F.lmf_loss(x, t, COUNTS, gamma=math.nan), "gamma must be finite"),
        (lambda x, t: F.lmf_loss(x, t, COUNTS, s=0.0), "s must be in"),
        (lambda x, t: F.ldam_loss(x, t, torch.tensor([30.0, math.inf, 2.0])), "class_counts must be finite"),
        (lambda x, t: F.dice_loss(x, t, batch=1), "batch must be a bool"),
    ],
)
def test_bad_hyper_parameters(call, match):
    logits, target = _ok()
    with pytest.raises((ValueError, TypeError), match=match):
        call(logits, target)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: lk.UnifiedFocalLoss(delta=math.nan), "delta must be finite"),
        (lambda: lk.LMFLoss([5, 0, 1]), "class_counts must be positive"),
        (lambda: lk.LMFLoss([]), "class_counts"),
        (lambda: lk.DiceLoss(backend="gpu"), "backend must be one of"),
        (lambda: lk.TverskyLoss(dist_sync="no"), "dist_sync must be a bool"),
    ],
)
def test_modules_check_at_construction(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


@pytest.mark.parametrize("fn", ALL)
def test_ignored_labels_out_of_range_are_accepted(fn):
    logits, target = _ok()
    target[0, 0] = 255
    value = fn(logits, target, ignore_index=255)
    assert value.isfinite()


@pytest.mark.parametrize("fn", ALL)
@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 2**70])
def test_ignore_index_outside_int64(fn, value):
    logits, target = _ok()
    with pytest.raises(
        ValueError, match=rf"ignore_index must be in the int64 range \[-2\*\*63, 2\*\*63 - 1\], got {value}"
    ):
        fn(logits, target, ignore_index=value)


@pytest.mark.parametrize("fn", ALL)
def test_ignore_index_at_the_int64_ends(fn):
    """The extreme int64 values are valid: no label equals them, so the loss is the unignored one."""
    logits, target = _ok()
    plain = fn(logits, target, ignore_index=-100 if fn in ROWS else None)
    for value in (2**63 - 1, -(2**63)):
        torch.testing.assert_close(fn(logits, target, ignore_index=value), plain)


META = torch.ones(3, device="meta")
META_PER_CLASS = [
    ("alpha", lambda x, t, b: F.focal_loss(x, t, alpha=META, backend=b)),
    ("alpha", lambda x, t, b: F.mixed_focal_loss(x, t, alpha=META, backend=b)),
    ("weight", lambda x, t, b: F.lmf_loss(x, t, COUNTS, weight=META, backend=b)),
    ("weight", lambda x, t, b: F.ldam_loss(x, t, COUNTS, weight=META, backend=b)),
    ("class_counts", lambda x, t, b: F.lmf_loss(x, t, META, backend=b)),
    ("class_counts", lambda x, t, b: F.ldam_loss(x, t, META, backend=b)),
    ("class_counts", lambda x, t, b: F.ldam_margins(META)),
    ("class_counts", lambda x, t, b: F.drw_weights(META)),
    ("alpha", lambda x, t, b: lk.FocalLoss(alpha=META, backend=b)),
    ("class_counts", lambda x, t, b: lk.LMFLoss(META, backend=b)),
    # A criterion moved to the meta device: its buffers have no values any more.
    ("alpha", lambda x, t, b: lk.FocalLoss(alpha=[1.0, 2.0, 3.0], backend=b).to("meta")(x, t)),
    ("alpha", lambda x, t, b: lk.MixedFocalLoss(alpha=[1.0, 2.0, 3.0], backend=b).to("meta")(x, t)),
    (r"LMFLoss\.margins", lambda x, t, b: lk.LMFLoss(COUNTS, backend=b).to("meta")(x, t)),
    (r"LDAMLoss\.margins", lambda x, t, b: lk.LDAMLoss(COUNTS, backend=b).to("meta")(x, t)),
]


@pytest.mark.parametrize("backend", lk.available_backends("cpu"))
@pytest.mark.parametrize(("name", "call"), META_PER_CLASS)
def test_meta_per_class_tensors(backend, name, call):
    """A meta tensor has no values: a clear error, never a kernel reading it (the CPU kernels gave 0)."""
    logits, target = _ok()
    with pytest.raises(ValueError, match=rf"^{name} must hold values, got a meta tensor"):
        call(logits, target, backend)


ALPHA = torch.tensor([0.5, 1.0, 2.0])
COUNT_TENSOR = torch.tensor([30.0, 8.0, 2.0])
MOVED_PER_CLASS = [
    (ALPHA, lambda x, t, a, b: F.focal_loss(x, t, alpha=a, backend=b)),
    (ALPHA, lambda x, t, a, b: F.mixed_focal_loss(x, t, alpha=a, backend=b)),
    (ALPHA, lambda x, t, a, b: F.lmf_loss(x, t, COUNTS, weight=a, backend=b)),
    (COUNT_TENSOR, lambda x, t, a, b: F.lmf_loss(x, t, a, backend=b)),
    (COUNT_TENSOR, lambda x, t, a, b: F.ldam_loss(x, t, a, backend=b)),
    # A criterion left on another device than the logits: its buffers are moved per call.
    (COUNT_TENSOR, lambda x, t, a, b: lk.LMFLoss(a, backend=b).to(a.device)(x, t)),
    (ALPHA, lambda x, t, a, b: lk.FocalLoss(alpha=a, backend=b).to(a.device)(x, t)),
    (ALPHA, lambda x, t, a, b: lk.MixedFocalLoss(alpha=a, backend=b).to(a.device)(x, t)),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device as the second real device")
@pytest.mark.parametrize(("device", "other"), [("cuda", "cpu"), ("cpu", "cuda")])
@pytest.mark.parametrize(("vector", "call"), MOVED_PER_CLASS)
def test_per_class_tensors_on_another_device_are_moved(device, other, vector, call):
    """Per-class tensors on another device than the logits are moved to them (the documented
    behaviour): every backend of the logits' device gives the all-on-one-device result."""
    x, t = (v.to(device) for v in _ok())
    for backend in ("reference", *lk.available_backends(device)):
        expected = call(x, t, vector.to(device), backend)
        got = call(x, t, vector.to(other), backend)
        assert got.device == x.device
        torch.testing.assert_close(got, expected)
