"""``nn.Module`` criteria: equal to the functional API, buffers that move and persist, early checks."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import lmfloss_kernels as lk
from lmfloss_kernels import _backends, reference
from lmfloss_kernels import functional as F


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


COUNTS = [120, 30, 4]

# (module class, positional args, keywords, functional equivalent); target kind "rows" or "dense".
MODULE_CASES = {
    "lmf_defaults": (lk.LMFLoss, (COUNTS,), {}, lambda x, y, **kw: F.lmf_loss(x, y, COUNTS, **kw)),
    "lmf_custom": (
        lk.LMFLoss,
        (torch.tensor(COUNTS),),
        {"alpha": 1.5, "beta": 0.5, "gamma": 2.0, "s": 12.0, "max_m": 0.3, "ignore_index": 2, "reduction": "sum"},
        lambda x, y, **kw: F.lmf_loss(
            x, y, COUNTS, alpha=1.5, beta=0.5, gamma=2.0, s=12.0, max_m=0.3, ignore_index=2, reduction="sum", **kw
        ),
    ),
    "lmf_weight_tensor": (
        lk.LMFLoss,
        (COUNTS,),
        {"weight": torch.tensor([0.2, 1.0, 3.0])},
        lambda x, y, **kw: F.lmf_loss(x, y, COUNTS, weight=torch.tensor([0.2, 1.0, 3.0]), **kw),
    ),
    "ldam": (
        lk.LDAMLoss,
        (COUNTS,),
        {"s": 8.0, "weight": "margins", "reduction": "none"},
        lambda x, y, **kw: F.ldam_loss(x, y, COUNTS, s=8.0, weight="margins", reduction="none", **kw),
    ),
    "focal": (
        lk.FocalLoss,
        (),
        {"gamma": 0.5, "alpha": [0.2, 0.5, 0.9]},
        lambda x, y, **kw: F.focal_loss(x, y, gamma=0.5, alpha=[0.2, 0.5, 0.9], **kw),
    ),
    "unified": (lk.UnifiedFocalLoss, (), {}, F.unified_focal_loss),
    "unified_custom": (
        lk.UnifiedFocalLoss,
        (),
        {"weight": None, "delta": 0.7, "gamma": 0.2, "asymmetric": False, "batch": True, "reduction": "none"},
        lambda x, y, **kw: F.unified_focal_loss(
            x, y, weight=None, delta=0.7, gamma=0.2, asymmetric=False, batch=True, reduction="none", **kw
        ),
    ),
    "focal_tversky": (
        lk.FocalTverskyLoss,
        (),
        {"asymmetric": True, "clip": False},
        lambda x, y, **kw: F.focal_tversky_loss(x, y, asymmetric=True, clip=False, **kw),
    ),
    "symmetric_focal": (
        lk.SymmetricFocalLoss,
        (),
        {"gamma": 1.0},
        lambda x, y, **kw: F.symmetric_focal_loss(x, y, gamma=1.0, **kw),
    ),
    "asymmetric_focal": (lk.AsymmetricFocalLoss, (), {}, F.asymmetric_focal_loss),
    "mixed": (
        lk.MixedFocalLoss,
        (),
        {"weight": 0.3, "alpha": torch.tensor([0.5, 1.0, 2.0]), "beta": 0.4, "ignore_index": 255},
        lambda x, y, **kw: F.mixed_focal_loss(
            x, y, weight=0.3, alpha=torch.tensor([0.5, 1.0, 2.0]), beta=0.4, ignore_index=255, **kw
        ),
    ),
    "tversky": (lk.TverskyLoss, (), {"delta": 0.3}, lambda x, y, **kw: F.tversky_loss(x, y, delta=0.3, **kw)),
    "dice": (lk.DiceLoss, (), {"smooth": 1e-3}, lambda x, y, **kw: F.dice_loss(x, y, smooth=1e-3, **kw)),
}


def _build(case_id, **overrides):
    cls, args, kwargs, _ = MODULE_CASES[case_id]
    return cls(*args, **{"backend": "reference", **kwargs, **overrides})


def _inputs(dtype=torch.float64):
    torch.manual_seed(3)
    x = torch.randn(2, 3, 4, 5, dtype=dtype)
    y = torch.randint(0, 3, (2, 4, 5))
    return x, y


def _value_grad(fn, x, y):
    x = x.detach().clone().requires_grad_(True)
    value = fn(x, y)
    value.sum().backward()
    return value.detach(), x.grad


@pytest.mark.parametrize("case_id", list(MODULE_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_module_equals_functional(case_id, dtype):
    function = MODULE_CASES[case_id][3]
    module = _build(case_id)
    x, y = _inputs(dtype)
    got = _value_grad(module, x, y)
    want = _value_grad(lambda a, b: function(a, b, backend="reference"), x, y)
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1], want[1])


@pytest.mark.parametrize(
    "case_id, buffers",
    [
        ("lmf_defaults", {"class_counts", "margins", "class_weight"}),
        ("ldam", {"class_counts", "margins", "class_weight"}),
        ("focal", {"alpha"}),
        ("mixed", {"alpha"}),
        ("unified", set()),
    ],
)
def test_per_class_tensors_are_buffers(case_id, buffers):
    module = _build(case_id)
    assert set(module.state_dict()) == buffers
    assert {name for name, _ in module.named_buffers()} == buffers
    assert list(module.parameters()) == []
    moved = module.to("meta")
    assert all(buffer.device.type == "meta" for buffer in moved.buffers())
    x, y = _inputs()
    value = moved(x.to("meta"), y.to("meta"))
    assert value.device.type == "meta"


def test_lmf_buffers_hold_the_margins():
    module = lk.LMFLoss(COUNTS, max_m=0.4)
    torch.testing.assert_close(module.margins, F.ldam_margins(torch.tensor(COUNTS, dtype=torch.float64), 0.4))
    torch.testing.assert_close(module.class_weight, module.margins)
    torch.testing.assert_close(module.class_counts, torch.tensor(COUNTS, dtype=module.class_counts.dtype))


def test_state_dict_round_trip_restores_the_class_statistics():
    trained = lk.LMFLoss([1000, 10, 1], backend="reference")
    fresh = lk.LMFLoss([1, 1, 1], backend="reference")
    x, y = _inputs()
    x = x[:, :, 0, 0]
    y = y[:, 0, 0]
    assert not torch.equal(trained(x, y), fresh(x, y))
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(trained(x, y), fresh(x, y))


def test_module_dtype_conversion_keeps_working():
    module = _build("focal").double()
    x, y = _inputs(torch.float32)
    torch.testing.assert_close(module(x, y), F.focal_loss(x, y, gamma=0.5, alpha=[0.2, 0.5, 0.9], backend="reference"))


@pytest.mark.parametrize("case_id", list(MODULE_CASES))
def test_construction_works_with_the_check_labels_option(case_id):
    """Regression: the construction-time dry run uses meta tensors, which the label check must not read."""
    with lk.options(check_labels=True):
        _build(case_id)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: lk.UnifiedFocalLoss(delta=1.5), r"delta must be in \[0, 1\], got 1.5"),
        (lambda: lk.UnifiedFocalLoss(gamma=-0.1), "gamma must be in"),
        (lambda: lk.UnifiedFocalLoss(reduction="avg"), "reduction must be one of"),
        (lambda: lk.FocalTverskyLoss(eps=0.0), "eps must be in"),
        (lambda: lk.SymmetricFocalLoss(delta=float("nan")), "delta must be finite"),
        (lambda: lk.MixedFocalLoss(alpha=[1.0, -2.0]), "alpha must be non-negative"),
        (lambda: lk.MixedFocalLoss(gamma_fd=0.0), "gamma_fd must be in"),
        (lambda: lk.FocalLoss(gamma=-1.0), "gamma must be in"),
        (lambda: lk.FocalLoss(alpha=torch.tensor(0.5)), r"alpha must have one entry per class \(1\), got shape \(\)"),
        (lambda: lk.FocalLoss(alpha=0.5), "alpha must be None, a tensor, an array or a sequence of numbers, got float"),
        (lambda: lk.TverskyLoss(smooth=-1.0), "smooth must be in"),
        (lambda: lk.DiceLoss(backend="nope"), "backend must be one of"),
        (lambda: lk.LMFLoss([3, 0, 1]), "class_counts must be positive"),
        (lambda: lk.LMFLoss([3]), "at least 2 classes"),
        (lambda: lk.LMFLoss([3, 2], s=0.0), "s must be in"),
        (lambda: lk.LMFLoss([3, 2], alpha=0.0, beta=0.0), "alpha and beta must not both be 0"),
        (lambda: lk.LMFLoss([3, 2], weight="balanced"), "weight must be 'margins', None or a per-class tensor"),
        (lambda: lk.LMFLoss([3, 2], weight=[1.0, 2.0, 3.0]), r"weight must have one entry per class \(2\)"),
        (lambda: lk.LDAMLoss([3, 2], max_m=-1.0), "max_m must be in"),
        (lambda: lk.LDAMLoss([3, 2], weight="margins", max_m=0.0), "max_m > 0"),
        (lambda: lk.LDAMLoss([3, 2], reduction="mean ", backend="reference"), "reduction must be one of"),
    ],
)
def test_bad_hyper_parameters_fail_at_construction(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


def test_forward_checks_the_number_of_classes():
    with pytest.raises(ValueError, match="class_counts has 3 entries"):
        lk.LMFLoss(COUNTS)(torch.randn(5, 4), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"alpha must have one entry per class \(4\)"):
        lk.FocalLoss(alpha=[1.0, 2.0, 3.0])(torch.randn(5, 4), torch.zeros(5, dtype=torch.long))


def test_repr_shows_the_keywords():
    text = repr(lk.UnifiedFocalLoss(delta=0.65, backend="reference"))
    assert "delta=0.65" in text and "backend='reference'" in text
    assert "gamma=1.5" in repr(lk.LMFLoss(COUNTS))


def test_module_uses_its_backend(monkeypatch):
    calls = []

    class Recording:
        name = "cpu"

        def unavailable_reason(self, device, dtype):
            return None

        def region_loss(self, *args, **kwargs):
            calls.append("region")
            return reference.region_loss(*args, **kwargs)

        def row_loss(self, *args, **kwargs):
            calls.append("row")
            return reference.row_loss(*args, **kwargs)

    monkeypatch.setitem(_backends._loaded, "cpu", Recording())
    x, y = _inputs(torch.float32)
    lk.UnifiedFocalLoss(backend="cpu")(x, y)
    lk.LMFLoss(COUNTS, backend="cpu")(x, y)
    lk.LMFLoss(COUNTS, backend="reference")(x, y)
    assert calls == ["region", "row"]


@pytest.mark.parametrize("case_id", ["lmf_defaults", "focal", "mixed", "unified_custom"])
def test_modules_copy_and_pickle(case_id):
    """DDP wrappers and checkpoints deep-copy / pickle criteria; the copies must compute the same loss."""
    module = _build(case_id)
    x, y = _inputs()
    for clone in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        assert torch.equal(clone(x, y), module(x, y))
