"""Bad input raises the documented error type with a message naming the argument, expected and actual."""

from __future__ import annotations

import pytest
import torch

import lmfloss_kernels as lk
from lmfloss_kernels import _validation
from lmfloss_kernels import functional as F

torch.manual_seed(0)
XR = torch.randn(6, 3)  # rows
YR = torch.tensor([0, 1, 2, 2, 1, 0])
XD = torch.randn(2, 3, 4, 5)  # dense
YD = torch.randint(0, 3, (2, 4, 5))
COUNTS = [10, 5, 2]
NAN = float("nan")
INF = float("inf")

REGION_FUNCTIONS = {
    "unified": F.unified_focal_loss,
    "focal_tversky": F.focal_tversky_loss,
    "symmetric_focal": F.symmetric_focal_loss,
    "asymmetric_focal": F.asymmetric_focal_loss,
    "mixed": F.mixed_focal_loss,
    "tversky": F.tversky_loss,
    "dice": F.dice_loss,
}
ROW_FUNCTIONS = {
    "lmf": lambda x, y, **kw: F.lmf_loss(x, y, COUNTS, **kw),
    "ldam": lambda x, y, **kw: F.ldam_loss(x, y, COUNTS, **kw),
    "focal": F.focal_loss,
}
ALL_FUNCTIONS = {**REGION_FUNCTIONS, **ROW_FUNCTIONS}


def _raises(error, match, call):
    with pytest.raises(error, match=match):
        call()


# ----------------------------------------------------------------------------------------------
# Logits


@pytest.mark.parametrize("name", list(ALL_FUNCTIONS))
def test_logits_checks(name):
    fn = ALL_FUNCTIONS[name]
    _raises(TypeError, "logits must be a torch.Tensor, got list", lambda: fn(XD.tolist(), YD))
    _raises(
        TypeError,
        "logits must be float16, bfloat16, float32 or float64, got torch.int64",
        lambda: fn(XD.long(), YD),
    )
    _raises(
        ValueError, r"logits must have at least 2 classes on dim 1.*got shape \(2, 1, 4, 5\)", lambda: fn(XD[:, :1], YD)
    )
    _raises(ValueError, r"logits must not be empty, got shape \(2, 3, 0, 5\)", lambda: fn(XD[:, :, :0], YD[:, :0]))
    _raises(ValueError, r"logits must have shape .*got shape \(3,\)", lambda: fn(XD[0, :, 0, 0], YD[0, 0, 0]))


@pytest.mark.parametrize("name", list(REGION_FUNCTIONS))
def test_region_losses_need_a_spatial_axis(name):
    _raises(
        ValueError,
        r"logits must have shape \(B, C, \*spatial\) with at least one spatial axis, got shape \(6, 3\)",
        lambda: REGION_FUNCTIONS[name](XR, YR),
    )


@pytest.mark.parametrize("name", list(ROW_FUNCTIONS))
def test_row_losses_reject_empty_rows(name):
    _raises(ValueError, r"logits must not be empty, got shape \(0, 3\)", lambda: ROW_FUNCTIONS[name](XR[:0], YR[:0]))


# ----------------------------------------------------------------------------------------------
# Targets


@pytest.mark.parametrize("name", list(ALL_FUNCTIONS))
def test_label_map_checks(name):
    fn = ALL_FUNCTIONS[name]
    _raises(TypeError, "target must be a torch.Tensor, got list", lambda: fn(XD, YD.tolist()))
    _raises(
        ValueError,
        r"target must have shape \(2, 4, 5\) or \(2, 1, 4, 5\) to match logits \(2, 3, 4, 5\), got \(2, 5, 4\)",
        lambda: fn(XD, YD.transpose(1, 2)),
    )
    _raises(
        ValueError,
        r"target labels must be in \[0, 2\].*got values in \[0, 3\]",
        lambda: fn(XD, YD.clamp(max=3) + (YD == 2)),
    )
    bad = YD.clone()
    bad[1, 2, 3] = -1
    _raises(ValueError, r"target labels must be in \[0, 2\].*got values in \[-1, 2\]", lambda: fn(XD, bad))
    fn(XD, bad, ignore_index=-1)  # the same value is fine once it is the ignore_index
    _raises(
        TypeError,
        "target must hold integer class labels for this loss, got dtype torch.complex64",
        lambda: fn(XD, YD.to(torch.complex64)),
    )
    _raises(ValueError, r"target must be on the logits' device cpu, got meta", lambda: fn(XD, YD.to("meta")))


@pytest.mark.parametrize("name", list(ROW_FUNCTIONS))
def test_row_losses_take_integer_labels_only(name):
    _raises(
        TypeError,
        "target must hold integer class labels for this loss, got dtype torch.float32",
        lambda: ROW_FUNCTIONS[name](XR, YR.float()),
    )
    _raises(
        TypeError, "ignore_index must be an int or None, got str", lambda: ROW_FUNCTIONS[name](XR, YR, ignore_index="1")
    )


@pytest.mark.parametrize("name", list(REGION_FUNCTIONS))
def test_float_target_checks(name):
    fn = REGION_FUNCTIONS[name]
    one_hot = torch.nn.functional.one_hot(YD, 3).movedim(-1, 1).float()
    _raises(
        ValueError,
        r"a floating-point target is a one-hot / soft map and must have the logits' shape \(2, 3, 4, 5\), "
        r"got \(2, 4, 5\)",
        lambda: fn(XD, YD.float()),
    )
    _raises(ValueError, "ignore_index=0 applies to integer label maps only", lambda: fn(XD, one_hot, ignore_index=0))
    _raises(TypeError, "ignore_index must be an int or None, got float: 1.5", lambda: fn(XD, YD, ignore_index=1.5))
    _raises(TypeError, "ignore_index must be an int or None, got bool", lambda: fn(XD, YD, ignore_index=True))


SOFT = torch.softmax(torch.randn(2, 3, 4, 5), 1)


@pytest.mark.parametrize("name", list(REGION_FUNCTIONS))
def test_soft_target_values(name):
    """Soft-map entries outside [0, 1] or non-finite would give a meaningless (even negative) loss."""
    fn = REGION_FUNCTIONS[name]
    message = r"target \(a one-hot / soft map\) must have every entry finite and in \[0, 1\], got "
    negative = SOFT.clone()
    negative[1, 2, 3, 4] = -0.25
    _raises(ValueError, message + rf"values in \[-0.25, {float(SOFT.max()):g}\]", lambda: fn(XD, negative))
    _raises(ValueError, message + r"values in \[[0-9.e-]+, 2\]", lambda: fn(XD, 2 * SOFT / SOFT.max()))
    for bad, found in ((NAN, r"NaN entries and values in \[[0-9.e-]+, [0-9.e-]+\]"), (INF, r"values in .*, inf\]")):
        poisoned = SOFT.clone()
        poisoned[0, 1, 2, 3] = bad
        with pytest.raises(ValueError, match=message + found):
            fn(XD, poisoned)
    _raises(ValueError, message + "NaN entries$", lambda: fn(XD, torch.full_like(SOFT, NAN)))
    _raises(ValueError, message + r"values in \[-inf, 0\.\d+\]", lambda: fn(XD, SOFT.masked_fill(SOFT > 0.5, -INF)))
    # Entries need not sum to 1 over the classes (partial or multi-label maps are allowed), and
    # every floating dtype and layout is read as it is.
    for ok in (torch.full_like(SOFT, 0.5), torch.zeros_like(SOFT), SOFT.half(), SOFT.bfloat16(), SOFT.double()):
        assert fn(XD, ok).isfinite()
    assert fn(XD, SOFT[:1].expand(2, 3, 4, 5)).isfinite()


@pytest.mark.parametrize(
    "layout",
    [
        lambda t: t[:1].expand_as(t),  # stride 0 over the batch
        lambda t: t.contiguous(memory_format=torch.channels_last),
        lambda t: t.transpose(2, 3).contiguous().transpose(2, 3),
    ],
)
def test_value_checks_copy_no_strided_target(layout):
    """torch.aminmax copies a non-contiguous input first; the value checks must not (an expanded
    map would be materialised in full), and must still see every entry."""
    soft, labels = layout(SOFT), layout(YD.unsqueeze(1)).squeeze(1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _validation.check_target(XD, soft, ignore_index=None)
        _validation.check_labels(XD, labels, ignore_index=None)
    copies = [e.name for e in prof.events() if e.name in ("aten::clone", "aten::contiguous", "aten::copy_")]
    assert not copies, copies
    bad = layout(SOFT.masked_fill(SOFT == SOFT[0, 2].max(), 1.5))
    _raises(
        ValueError, r"got values in \[[0-9.e-]+, 1.5\]", lambda: _validation.check_target(XD, bad, ignore_index=None)
    )
    bad_labels = layout(YD.masked_fill(YD == 2, 3).unsqueeze(1)).squeeze(1)
    _raises(ValueError, r"got values in \[0, 3\]", lambda: _validation.check_labels(XD, bad_labels, ignore_index=None))


# ----------------------------------------------------------------------------------------------
# Hyper-parameters


@pytest.mark.parametrize("name", list(ALL_FUNCTIONS))
@pytest.mark.parametrize("reduction", ["avg", "Mean", None, 0])
def test_reduction(name, reduction):
    _raises(
        ValueError,
        r"reduction must be one of \('mean', 'sum', 'none'\), got",
        lambda: ALL_FUNCTIONS[name](XD, YD, reduction=reduction),
    )


# (function, keyword, bad value, error, message)
BAD_HYPER_PARAMETERS = [
    (F.unified_focal_loss, "delta", 1.2, ValueError, r"delta must be in \[0, 1\], got 1.2"),
    (F.unified_focal_loss, "delta", -0.1, ValueError, r"delta must be in \[0, 1\], got -0.1"),
    (F.unified_focal_loss, "gamma", -0.5, ValueError, r"gamma must be in \[0, 1\], got -0.5"),
    (F.unified_focal_loss, "gamma", 1.5, ValueError, r"gamma must be in \[0, 1\], got 1.5"),
    (F.unified_focal_loss, "weight", 1.1, ValueError, r"weight must be in \[0, 1\], got 1.1"),
    (F.unified_focal_loss, "weight", NAN, ValueError, "weight must be finite, got nan"),
    (F.unified_focal_loss, "delta", NAN, ValueError, "delta must be finite, got nan"),
    (F.unified_focal_loss, "gamma", float("inf"), ValueError, "gamma must be finite, got inf"),
    (F.unified_focal_loss, "eps", 0.0, ValueError, r"eps must be in \(0, 0.5\), got 0"),
    (F.unified_focal_loss, "eps", 0.5, ValueError, r"eps must be in \(0, 0.5\), got 0.5"),
    (F.unified_focal_loss, "eps", NAN, ValueError, "eps must be finite"),
    (F.unified_focal_loss, "gamma", "0.5", TypeError, "gamma must be a real number, got str"),
    (F.unified_focal_loss, "delta", True, TypeError, "delta must be a real number, got bool"),
    (F.unified_focal_loss, "clip", 1, TypeError, "clip must be a bool, got int"),
    (F.unified_focal_loss, "batch", "yes", TypeError, "batch must be a bool, got str"),
    (F.unified_focal_loss, "asymmetric", None, TypeError, "asymmetric must be a bool, got NoneType"),
    (F.focal_tversky_loss, "delta", 2.0, ValueError, r"delta must be in \[0, 1\], got 2"),
    (F.focal_tversky_loss, "gamma", -1.0, ValueError, r"gamma must be in \[0, 1\], got -1"),
    (F.symmetric_focal_loss, "gamma", -1.0, ValueError, r"gamma must be in \[0, inf\), got -1"),
    (F.asymmetric_focal_loss, "delta", NAN, ValueError, "delta must be finite"),
    (F.mixed_focal_loss, "delta", 1.5, ValueError, r"delta must be in \[0, 1\], got 1.5"),
    (F.mixed_focal_loss, "gamma_f", -2.0, ValueError, r"gamma_f must be in \[0, inf\), got -2"),
    (F.mixed_focal_loss, "gamma_fd", 0.0, ValueError, r"gamma_fd must be in \(0, inf\), got 0"),
    (F.mixed_focal_loss, "gamma_fd", NAN, ValueError, "gamma_fd must be finite"),
    (F.mixed_focal_loss, "smooth", -1e-6, ValueError, r"smooth must be in \[0, inf\), got -1e-06"),
    (F.mixed_focal_loss, "beta", 1.5, ValueError, r"beta must be in \[0, 1\], got 1.5"),
    (F.mixed_focal_loss, "weight", -0.5, ValueError, r"weight must be in \[0, 1\], got -0.5"),
    (
        F.mixed_focal_loss,
        "alpha",
        [1.0, 2.0],
        ValueError,
        r"alpha must have one entry per class \(3\), got shape \(2,\)",
    ),
    (F.mixed_focal_loss, "alpha", [1.0, -2.0, 1.0], ValueError, r"alpha must be non-negative, got \[1.0, -2.0, 1.0\]"),
    (F.mixed_focal_loss, "alpha", [1.0, NAN, 1.0], ValueError, "alpha must be finite"),
    (
        F.mixed_focal_loss,
        "alpha",
        0.5,
        TypeError,
        "alpha must be a tensor, an array or a sequence of 3 numbers, got float",
    ),
    (F.mixed_focal_loss, "alpha", ["a", "b", "c"], TypeError, "alpha must be a sequence of numbers"),
    (
        F.mixed_focal_loss,
        "alpha",
        torch.ones(3, dtype=torch.bool),
        TypeError,
        "alpha must be a real tensor, got dtype torch.bool",
    ),
    (F.tversky_loss, "delta", -0.01, ValueError, r"delta must be in \[0, 1\], got -0.01"),
    (F.tversky_loss, "smooth", NAN, ValueError, "smooth must be finite"),
    (F.dice_loss, "smooth", -1.0, ValueError, r"smooth must be in \[0, inf\), got -1"),
    (F.dice_loss, "batch", 0, TypeError, "batch must be a bool, got int"),
]


@pytest.mark.parametrize(
    "fn, key, value, error, match",
    BAD_HYPER_PARAMETERS,
    ids=[f"{c[0].__name__}-{c[1]}-{c[2]!r}" for c in BAD_HYPER_PARAMETERS],
)
def test_bad_region_hyper_parameters(fn, key, value, error, match):
    _raises(error, match, lambda: fn(XD, YD, **{key: value}))


BAD_ROW_HYPER_PARAMETERS = [
    (F.lmf_loss, "s", 0.0, ValueError, r"s must be in \(0, inf\), got 0"),
    (F.lmf_loss, "s", -30.0, ValueError, r"s must be in \(0, inf\), got -30"),
    (F.lmf_loss, "gamma", -1.5, ValueError, r"gamma must be in \[0, inf\), got -1.5"),
    (F.lmf_loss, "alpha", -1.0, ValueError, r"alpha must be in \[0, inf\), got -1"),
    (F.lmf_loss, "beta", NAN, ValueError, "beta must be finite, got nan"),
    (F.lmf_loss, "max_m", -0.5, ValueError, r"max_m must be in \[0, inf\), got -0.5"),
    (F.lmf_loss, "max_m", 0.0, ValueError, "weight='margins' uses the margins as class weights.*max_m > 0"),
    (
        F.lmf_loss,
        "weight",
        "balanced",
        ValueError,
        "weight must be 'margins', None or a per-class tensor, got 'balanced'",
    ),
    (F.lmf_loss, "weight", torch.ones(4), ValueError, r"weight must have one entry per class \(3\), got shape \(4,\)"),
    (F.lmf_loss, "weight", 2.0, TypeError, "weight must be a tensor, an array or a sequence of 3 numbers, got float"),
    (F.lmf_loss, "weight", torch.tensor([1.0, -1.0, 1.0]), ValueError, "weight must be non-negative"),
    (F.ldam_loss, "s", NAN, ValueError, "s must be finite"),
    (F.ldam_loss, "max_m", -1.0, ValueError, r"max_m must be in \[0, inf\), got -1"),
]


@pytest.mark.parametrize(
    "fn, key, value, error, match",
    BAD_ROW_HYPER_PARAMETERS,
    ids=[f"{c[0].__name__}-{c[1]}-{c[2]!r}" for c in BAD_ROW_HYPER_PARAMETERS],
)
def test_bad_row_hyper_parameters(fn, key, value, error, match):
    _raises(error, match, lambda: fn(XR, YR, COUNTS, **{key: value}))


def test_lmf_coefficients_not_both_zero():
    _raises(ValueError, "alpha and beta must not both be 0", lambda: F.lmf_loss(XR, YR, COUNTS, alpha=0.0, beta=0.0))
    assert F.lmf_loss(XR, YR, COUNTS, alpha=0.0, beta=1.0, backend="reference").isfinite()


@pytest.mark.parametrize("name", ["focal_gamma", "focal_alpha_len", "focal_alpha_negative"])
def test_focal_loss_hyper_parameters(name):
    call = {
        "focal_gamma": (lambda: F.focal_loss(XR, YR, gamma=-2.0), r"gamma must be in \[0, inf\), got -2"),
        "focal_alpha_len": (
            lambda: F.focal_loss(XR, YR, alpha=[1.0, 2.0]),
            r"alpha must have one entry per class \(3\)",
        ),
        "focal_alpha_negative": (lambda: F.focal_loss(XR, YR, alpha=[1.0, -2.0, 1.0]), "alpha must be non-negative"),
    }[name]
    _raises((ValueError, TypeError), call[1], call[0])


# ----------------------------------------------------------------------------------------------
# Class counts


@pytest.mark.parametrize(
    "counts, error, match",
    [
        ([10, 5], ValueError, r"class_counts must have one entry per class \(3\), got shape \(2,\)"),
        ([10, 5, 2, 1], ValueError, r"class_counts must have one entry per class \(3\), got shape \(4,\)"),
        ([10, 0, 2], ValueError, r"class_counts must be positive, got \[10.0, 0.0, 2.0\]"),
        ([10, -5, 2], ValueError, "class_counts must be positive"),
        ([10, NAN, 2], ValueError, "class_counts must be finite"),
        (None, TypeError, "class_counts is required"),
        ("10,5,2", TypeError, "class_counts must be a tensor, an array or a sequence of 3 numbers, got str"),
        (torch.ones(3, 1), ValueError, r"class_counts must have one entry per class \(3\), got shape \(3, 1\)"),
    ],
)
@pytest.mark.parametrize("fn", [F.lmf_loss, F.ldam_loss], ids=["lmf", "ldam"])
def test_bad_class_counts(fn, counts, error, match):
    _raises(error, match, lambda: fn(XR, YR, counts))


def test_margin_and_drw_helpers_validate():
    _raises(ValueError, "class_counts must have at least 2 entries, got 1", lambda: F.ldam_margins([5]))
    _raises(ValueError, r"class_counts must be 1-D, got shape \(2, 2\)", lambda: F.ldam_margins(torch.ones(2, 2)))
    _raises(TypeError, "class_counts must be a 1-D tensor, array or sequence, got int", lambda: F.drw_weights(5))
    _raises(ValueError, "class_counts must be positive", lambda: F.drw_weights([3, 0]))
    _raises(ValueError, r"beta must be in \[0, 1\), got 1", lambda: F.drw_weights([3, 2], beta=1.0))
    _raises(ValueError, r"max_m must be in \[0, inf\), got -0.1", lambda: F.ldam_margins([3, 2], max_m=-0.1))


# ----------------------------------------------------------------------------------------------
# Backend name and options


@pytest.mark.parametrize("name", list(ALL_FUNCTIONS))
def test_unknown_backend(name):
    _raises(
        ValueError,
        r"backend must be one of \['auto', 'reference', 'triton', 'cuda', 'cpu'\], got 'gpu'",
        lambda: ALL_FUNCTIONS[name](XD, YD, backend="gpu"),
    )


def test_option_names_and_types():
    _raises(ValueError, "unknown option 'check_label'", lambda: lk.set_options(check_label=True))
    _raises(TypeError, "option 'check_backend' must be a bool, got str", lambda: lk.set_options(check_backend="on"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the label check differs only on accelerator tensors")
def test_check_labels_option_on_cuda():
    """On CUDA tensors label values are checked only with the option (the check needs a device-to-host sync)."""
    x = XD.cuda()
    assert F.unified_focal_loss(x, YD.cuda(), backend="reference").isfinite()
    bad = (YD + 1).cuda()  # label 3 with C = 3; not run without the option: kernels would index out of range
    with lk.options(check_labels=True):
        _raises(
            ValueError, r"target labels must be in \[0, 2\]", lambda: F.unified_focal_loss(x, bad, backend="reference")
        )
    negative = -SOFT.cuda()  # a soft map is not read without the option either
    assert F.dice_loss(x, negative, backend="reference").isfinite()
    with lk.options(check_labels=True):
        _raises(ValueError, r"target \(a one-hot / soft map\) .* got values in \[-", lambda: F.dice_loss(x, negative))


def test_value_checks_are_skipped_while_compiling(monkeypatch):
    """torch.compile(fullgraph=True) cannot read tensor values; the CPU label check steps aside while tracing."""
    bad = YD + 1
    _raises(ValueError, "target labels must be in", lambda: F.unified_focal_loss(XD, bad))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert _validation.check_labels(XD, bad, ignore_index=None) is bad  # not read while tracing
    _raises(ValueError, "target must have shape", lambda: F.unified_focal_loss(XD, bad[:, :2]))  # shapes still checked
    soft = -torch.ones_like(XD)
    assert _validation.check_target(XD, soft, ignore_index=None) is soft  # soft-map values are not read either
