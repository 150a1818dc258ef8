"""lmfloss_kernels.monai: MONAI 1.6's values, gradients and shapes; fused where the options map, else MONAI's class."""

from __future__ import annotations

import re
import sys
import warnings

import monai.losses as monai_losses  # a test requirement (requirements-test.txt)
import pytest
import torch

from lmfloss_kernels import _compat, available_backends
from lmfloss_kernels import monai as lm

FUSED_BACKENDS = available_backends("cpu")  # the eager reference, the C++ extension, Triton (interpreted)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def fused_only(monkeypatch):
    """Fail the test if the criterion hands the call to MONAI."""

    def refuse(self, reason, logits, target):
        raise AssertionError(f"expected the fused path, but it delegated: {reason}")

    monkeypatch.setattr(lm._MonaiCompatible, "_delegate", refuse)


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(_compat, "_warned", set())


def _inputs(batch, classes, spatial, target_kind, dtype=torch.float32):
    logits = torch.randn(batch, classes, *spatial, dtype=dtype) * 2
    labels = torch.randint(0, classes, (batch, 1, *spatial))
    if target_kind == "float_labels":
        return logits, labels.float()
    if target_kind == "int_labels":
        return logits, labels
    onehot = torch.nn.functional.one_hot(labels[:, 0], classes).movedim(-1, 1)
    if target_kind == "onehot_int":
        return logits, onehot
    return logits, onehot.float()


def _compare(ours, theirs, logits, target, rtol=1e-5, *, quiet=True):
    """Values and input gradients of two criteria on the same data (fp32: within ``rtol``).

    ``quiet``: our criterion must emit no UserWarning (a fused path has nothing to report); MONAI's
    own warnings (e.g. options it ignores for one channel) are not ours and are let through, and
    so are the Triton interpreter's numpy RuntimeWarnings.
    """
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    if quiet:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = ours(a, target)
        ours_warned = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
        assert not ours_warned, ours_warned
    else:
        value = ours(a, target)
    expected = theirs(b, target)
    assert value.shape == expected.shape
    torch.testing.assert_close(value.double(), expected.double(), rtol=rtol, atol=rtol * 1e-1)
    weights = torch.rand_like(expected)  # a random cotangent also checks "none" per element
    (value * weights).sum().backward()
    (expected * weights).sum().backward()
    scale = float(b.grad.abs().max()) + 1e-12
    torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=rtol * scale)


def _both(name, backend="cpu", **kwargs):
    return getattr(lm, name)(**kwargs, backend=backend), getattr(monai_losses, name)(**kwargs)


SPATIAL = {"2d": (5, 7), "3d": (3, 4, 5)}


@pytest.mark.parametrize("name", ["DiceLoss", "DiceCELoss", "TverskyLoss"])
@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dims", ["2d", "3d"])
def test_region_losses_equal_monai_with_label_maps(fused_only, name, include_background, batch, reduction, dims):
    logits, target = _inputs(3, 4, SPATIAL[dims], "float_labels")
    extra = {"alpha": 0.3, "beta": 0.7} if name == "TverskyLoss" else {}
    if name == "DiceCELoss":
        extra = {"lambda_dice": 0.6, "lambda_ce": 1.7}
    ours, theirs = _both(
        name,
        include_background=include_background,
        to_onehot_y=True,
        softmax=True,
        batch=batch,
        reduction=reduction,
        smooth_nr=1e-3,
        smooth_dr=2e-3,
        **extra,
    )
    _compare(ours, theirs, logits, target)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("name", ["DiceLoss", "DiceCELoss", "TverskyLoss"])
@pytest.mark.parametrize("target_kind", ["int_labels", "onehot_float", "onehot_int"])
def test_region_losses_equal_monai_on_every_backend_and_target_form(fused_only, backend, name, target_kind):
    logits, target = _inputs(2, 3, (4, 6), target_kind)
    ours, theirs = _both(name, backend, include_background=False, to_onehot_y=target_kind == "int_labels", softmax=True)
    _compare(ours, theirs, logits, target)


CUDA_BACKENDS = available_backends("cuda") if torch.cuda.is_available() else []


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("name", ["DiceLoss", "DiceCELoss", "TverskyLoss", "FocalLoss", "DiceFocalLoss"])
@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_fused_losses_equal_monai_on_cuda(fused_only, backend, name, include_background, reduction, activation):
    logits, target = _inputs(2, 4, (6, 5, 7), "float_labels")
    logits, target = logits.cuda(), target.cuda()
    if name == "FocalLoss":
        kwargs = {"use_softmax": activation == "softmax", "gamma": 1.5, "alpha": 0.3}
        kwargs["ignore_index"] = None if include_background else 2
    else:
        kwargs = {activation: True, "include_background": include_background, "batch": not include_background}
    ours, theirs = _both(name, backend, to_onehot_y=True, reduction=reduction, **kwargs)
    _compare(ours, theirs, logits, target.to(torch.uint8) if include_background else target)


def test_soft_targets_equal_monai(fused_only):
    logits = torch.randn(2, 3, 6, 5)
    target = torch.softmax(torch.randn(2, 3, 6, 5), 1)
    for name in ("DiceLoss", "DiceCELoss", "TverskyLoss"):
        _compare(*_both(name, softmax=True), logits, target)


@pytest.mark.parametrize("weight", [2.5, [0.7, 0.7, 0.7], torch.tensor([1.5, 1.5, 1.5])])
@pytest.mark.parametrize("target_kind", ["int_labels", "onehot_float"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_uniform_weight_is_fused_and_equal(fused_only, weight, target_kind, reduction):
    logits, target = _inputs(2, 3, (5, 5), target_kind)
    onehot = target_kind == "int_labels"
    _compare(*_both("DiceLoss", softmax=True, to_onehot_y=onehot, weight=weight, reduction=reduction), logits, target)
    tensor_weight = torch.as_tensor(weight, dtype=torch.float32).expand(3).clone()
    _compare(
        *_both("DiceCELoss", softmax=True, to_onehot_y=onehot, weight=tensor_weight, reduction=reduction),
        logits,
        target,
    )


def test_weight_of_a_single_kept_class_is_ignored_as_in_monai(fused_only):
    logits, target = _inputs(2, 2, (6, 4), "int_labels")
    _compare(*_both("DiceLoss", softmax=True, to_onehot_y=True, include_background=False, weight=[3.0]), logits, target)


@pytest.mark.parametrize("name", ["DiceLoss", "TverskyLoss"])
@pytest.mark.parametrize("ignore_index", [1, -1, 255])
@pytest.mark.parametrize("include_background", [True, False])
def test_ignore_index_on_label_maps(fused_only, name, ignore_index, include_background):
    logits, target = _inputs(3, 4, (5, 6), "int_labels")
    target[0, 0, :2] = ignore_index
    target[2] = ignore_index  # an image with no valid voxel
    _compare(
        *_both(name, softmax=True, to_onehot_y=True, include_background=include_background, ignore_index=ignore_index),
        logits,
        target,
    )


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("alpha", [None, 0.25, [0.1, 0.5, 0.2, 0.9]])
def test_softmax_focal_loss_equals_monai(fused_only, backend, reduction, alpha):
    logits, target = _inputs(2, 4, (4, 5), "int_labels")
    kwargs = {"use_softmax": True, "to_onehot_y": True, "gamma": 1.5, "alpha": alpha, "reduction": reduction}
    _compare(*_both("FocalLoss", backend, **kwargs, weight=[1.0, 2.0, 0.5, 3.0]), logits, target)
    _compare(*_both("FocalLoss", backend, **kwargs), logits, target.float())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("ignore_index", [2, -100])
def test_softmax_focal_loss_with_ignore_index(fused_only, reduction, ignore_index):
    logits, target = _inputs(3, 4, (5, 4), "int_labels")
    target[1, 0, :3] = ignore_index
    _compare(
        *_both(
            "FocalLoss", use_softmax=True, to_onehot_y=True, ignore_index=ignore_index, reduction=reduction, gamma=2
        ),
        logits,
        target,
    )


def test_softmax_focal_loss_with_one_hot_target(fused_only):
    logits, target = _inputs(2, 3, (3, 4, 5), "onehot_float")
    _compare(*_both("FocalLoss", use_softmax=True, gamma=0.5), logits, target)


# ---------------------------------------------------------------------------------------------
# Sigmoid (multi-label) options: fused through the region family's sigmoid mode

SIGMOID_REGION = ["DiceLoss", "TverskyLoss", "DiceCELoss", "DiceFocalLoss"]


def _multi_hot(batch, classes, spatial, dtype=torch.float32):
    """Overlapping 0/1 regions (a voxel may be in several channels or none)."""
    return (torch.rand(batch, classes, *spatial) > 0.6).to(dtype)


def _sigmoid_extra(name):
    return {
        "TverskyLoss": {"alpha": 0.3, "beta": 0.7},
        "DiceCELoss": {"lambda_dice": 0.6, "lambda_ce": 1.7},
        "DiceFocalLoss": {"gamma": 1.5, "alpha": 0.25, "lambda_focal": 0.7},
    }.get(name, {})


@pytest.mark.parametrize("name", SIGMOID_REGION)
@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("target_kind", ["float_labels", "multi_hot"])
def test_sigmoid_region_losses_equal_monai(fused_only, name, include_background, batch, reduction, target_kind):
    logits, target = _inputs(3, 4, SPATIAL["2d"], "float_labels")
    if target_kind == "multi_hot":
        target = _multi_hot(3, 4, SPATIAL["2d"])
    ours, theirs = _both(
        name,
        "reference",
        sigmoid=True,
        to_onehot_y=target_kind == "float_labels",
        include_background=include_background,
        batch=batch,
        reduction=reduction,
        smooth_nr=1e-3,
        smooth_dr=2e-3,
        **_sigmoid_extra(name),
    )
    _compare(ours, theirs, logits, target)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("name", [*SIGMOID_REGION, "FocalLoss"])
@pytest.mark.parametrize("target_kind", ["int_labels", "multi_hot_float", "multi_hot_uint8"])
def test_sigmoid_losses_equal_monai_on_every_backend_and_target_form(fused_only, backend, name, target_kind):
    logits, target = _inputs(2, 3, SPATIAL["3d"], "int_labels")
    if target_kind != "int_labels":
        target = _multi_hot(2, 3, SPATIAL["3d"], torch.uint8 if target_kind == "multi_hot_uint8" else torch.float32)
    kwargs = {"to_onehot_y": target_kind == "int_labels", "include_background": False, **_sigmoid_extra(name)}
    if name == "FocalLoss":
        kwargs.update(gamma=2.0, alpha=0.25)
    else:
        kwargs["sigmoid"] = True
    _compare(*_both(name, backend, **kwargs), logits, target)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("name", [*SIGMOID_REGION, "FocalLoss"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_single_channel_sigmoid_equals_monai(fused_only, backend, name, reduction):
    """Binary segmentation: one channel, a (B, 1, *S) 0/1 target; MONAI ignores to_onehot_y and
    include_background there (with its own warning), and DiceCELoss adds BCEWithLogits(pos_weight)."""
    logits = torch.randn(2, 1, 5, 6) * 2
    target = (torch.rand(2, 1, 5, 6) > 0.5).float()
    kwargs = {"to_onehot_y": True, "include_background": False, "reduction": reduction, **_sigmoid_extra(name)}
    if name == "FocalLoss":
        kwargs.update(gamma=2.0, alpha=0.7)
    else:
        kwargs["sigmoid"] = True
    if name == "DiceCELoss":
        kwargs["weight"] = torch.tensor([2.5])
    _compare(*_both(name, backend, **kwargs), logits, target)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("alpha", [None, 0.25, "per-class"])
def test_sigmoid_focal_loss_equals_monai(fused_only, reduction, include_background, alpha):
    kept = 4 if include_background else 3
    if alpha == "per-class":
        alpha = [0.1, 0.5, 0.2, 0.9][-kept:]
    kwargs = {"include_background": include_background, "reduction": reduction, "alpha": alpha, "gamma": 1.5}
    logits, target = _inputs(2, 4, (4, 5), "int_labels")
    weight = [1.0, 2.0, 0.5, 3.0][-kept:]
    _compare(*_both("FocalLoss", "reference", to_onehot_y=True, weight=weight, **kwargs), logits, target)
    _compare(*_both("FocalLoss", "reference", **kwargs), logits, _multi_hot(2, 4, (4, 5)))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("ignore_index", [2, 255])
@pytest.mark.parametrize("include_background", [True, False])
def test_sigmoid_losses_with_ignore_index(fused_only, reduction, ignore_index, include_background):
    logits, target = _inputs(3, 4, (5, 4), "int_labels")
    target[0, 0, 0, :2] = ignore_index
    target[1, 0, :3] = ignore_index  # images with different numbers of valid voxels
    target[2] = ignore_index  # and one with none
    common = {"to_onehot_y": True, "include_background": include_background, "reduction": reduction}
    common["ignore_index"] = ignore_index
    _compare(*_both("FocalLoss", "reference", gamma=2.0, alpha=0.3, **common), logits, target)
    _compare(*_both("DiceLoss", "reference", sigmoid=True, **common), logits, target)
    _compare(*_both("TverskyLoss", "reference", sigmoid=True, alpha=0.4, beta=0.6, **common), logits, target)


def test_sigmoid_soft_targets_equal_monai_where_the_formulas_agree(fused_only):
    logits = torch.randn(2, 3, 6, 5)
    soft = torch.rand(2, 3, 6, 5)
    for name in ("DiceLoss", "TverskyLoss", "DiceCELoss"):
        _compare(*_both(name, "reference", sigmoid=True), logits, soft)
    # gamma = 0 and no alpha: MONAI's sigmoid focal term is binary cross-entropy, soft targets included
    _compare(*_both("FocalLoss", "reference", gamma=0.0, weight=[1.0, 2.0, 0.5]), logits, soft)
    _compare(*_both("DiceFocalLoss", "reference", sigmoid=True, gamma=0.0), logits, soft)


@pytest.mark.parametrize("name", ["FocalLoss", "DiceFocalLoss"])
def test_soft_targets_with_the_sigmoid_focal_term_delegate(fresh_warnings, name):
    logits = torch.randn(2, 3, 6, 5)
    soft = torch.rand(2, 3, 6, 5)
    kwargs = {"sigmoid": True} if name == "DiceFocalLoss" else {}
    ours, theirs = _both(name, "reference", gamma=2.0, **kwargs)
    with pytest.warns(UserWarning, match=re.escape("a soft (non 0/1) float target")):
        _compare(ours, theirs, logits, soft, quiet=False)
    _compare(ours, theirs, logits, soft.round())  # 0/1 floats: fused again, nothing to warn


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_softmax_dice_focal_equals_monai(fused_only, backend, include_background, reduction):
    """MONAI 1.6 pairs the softmax Dice with the sigmoid focal term (two fused passes)."""
    logits, target = _inputs(2, 4, (4, 5), "int_labels")
    kwargs = {"softmax": True, "to_onehot_y": True, "include_background": include_background}
    kwargs.update(reduction=reduction, gamma=2.0, alpha=0.25, weight=0.6, lambda_focal=1.3)
    _compare(*_both("DiceFocalLoss", backend, **kwargs), logits, target)
    _compare(*_both("DiceFocalLoss", backend, softmax=True, batch=True), logits, _multi_hot(2, 4, (4, 5)).round())


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("name", ["DiceLoss", "TverskyLoss"])
@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("mode", ["softmax_foreground", "sigmoid_one_channel"])
def test_reduction_none_with_one_kept_class_is_fused(fused_only, backend, name, batch, mode):
    """One kept class: MONAI's per-(image, class) values are the region family's per-image ones
    (shapes: DiceLoss (B, 1, 1, 1), TverskyLoss (B, 1); with batch (1, 1, 1) and (1,))."""
    if mode == "softmax_foreground":
        logits, target = _inputs(3, 2, (5, 6), "int_labels")
        kwargs = {"softmax": True, "to_onehot_y": True, "include_background": False}
    else:
        logits = torch.randn(3, 1, 5, 6) * 2
        target = (torch.rand(3, 1, 5, 6) > 0.5).float()
        kwargs = {"sigmoid": True}
    if name == "TverskyLoss":
        kwargs.update(alpha=0.35, beta=0.65)
    else:
        kwargs["weight"] = 2.0  # MONAI weighs no single class
    _compare(*_both(name, backend, reduction="none", batch=batch, **kwargs), logits, target)


DELEGATED = [
    ("DiceLoss", {"softmax": False}, "softmax=False"),
    ("DiceLoss", {"other_act": torch.tanh}, "other_act"),
    ("DiceLoss", {"softmax": True, "squared_pred": True}, "squared_pred=True"),
    ("DiceLoss", {"softmax": True, "jaccard": True}, "jaccard=True"),
    ("DiceLoss", {"softmax": True, "reduction": "none"}, 'reduction="none"'),
    ("DiceLoss", {"softmax": True, "weight": [1.0, 2.0, 3.0]}, "a per-class weight"),
    ("DiceCELoss", {"softmax": True, "weight": torch.tensor([1.0, 2.0, 3.0])}, "a per-class weight"),
    ("DiceCELoss", {"softmax": True, "label_smoothing": 0.1}, "label_smoothing"),
    ("DiceCELoss", {"sigmoid": True, "label_smoothing": 0.1}, "label_smoothing"),
    ("DiceCELoss", {"sigmoid": True, "weight": torch.tensor([1.0, 2.0, 3.0])}, "a per-class weight"),
    ("DiceLoss", {"sigmoid": True, "squared_pred": True}, "squared_pred=True"),
    ("DiceLoss", {"sigmoid": True, "reduction": "none"}, 'reduction="none"'),
    ("DiceLoss", {"sigmoid": True, "weight": [1.0, 2.0, 3.0]}, "a per-class weight"),
    ("TverskyLoss", {"softmax": True, "alpha": 0.5, "beta": 0.7}, "alpha + beta != 1"),
    ("TverskyLoss", {"sigmoid": True, "alpha": 0.5, "beta": 0.7}, "alpha + beta != 1"),
    ("TverskyLoss", {"softmax": True, "reduction": "none"}, 'reduction="none"'),
    ("DiceFocalLoss", {"sigmoid": True, "reduction": "none"}, 'reduction="none"'),
    ("DiceFocalLoss", {"softmax": True, "weight": [1.0, 2.0, 3.0]}, "a per-class weight"),
    ("DiceFocalLoss", {"sigmoid": True, "jaccard": True}, "jaccard=True"),
    ("DiceFocalLoss", {"other_act": torch.tanh}, "other_act"),
    ("FocalLoss", {"use_softmax": True, "include_background": False}, "include_background=False"),
    ("FocalLoss", {"use_softmax": True, "reduction": "none"}, 'reduction="none"'),
    ("FocalLoss", {"reduction": "none"}, 'reduction="none"'),
]


@pytest.mark.parametrize(("name", "kwargs", "reason"), DELEGATED, ids=[f"{d[0]}-{d[2]}" for d in DELEGATED])
def test_unsupported_options_delegate_to_monai_and_warn_once(fresh_warnings, name, kwargs, reason):
    logits, target = _inputs(2, 3, (4, 5), "int_labels")
    kwargs = {"to_onehot_y": True, **kwargs}
    ours, theirs = _both(name, **kwargs)
    with pytest.warns(UserWarning, match=re.escape(reason)):
        _compare(ours, theirs, logits, target, quiet=False)
    _compare(ours, theirs, logits, target)  # warned once: the second call is silent


def test_one_hot_target_with_ignore_index_delegates(fresh_warnings):
    logits, target = _inputs(2, 3, (4, 5), "onehot_float")
    with pytest.warns(UserWarning, match="ignore_index with a one-hot target"):
        _compare(*_both("DiceLoss", softmax=True, ignore_index=1), logits, target, quiet=False)


@pytest.mark.parametrize("name", ["DiceLoss", "DiceCELoss", "DiceFocalLoss"])
def test_single_channel_input_without_sigmoid_delegates(fresh_warnings, name):
    logits = torch.randn(2, 1, 4, 5)
    target = torch.randint(0, 2, (2, 1, 4, 5)).float()
    with pytest.warns(UserWarning, match="single-channel input without sigmoid"):
        _compare(*_both(name, softmax=True), logits, target, quiet=False)


def test_delegation_without_monai_raises_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "monai", None)
    monkeypatch.setitem(sys.modules, "monai.losses", None)
    logits, target = _inputs(2, 3, (4, 5), "int_labels")
    with pytest.raises(ImportError, match="MONAI is not installed"):
        lm.DiceLoss(other_act=torch.tanh, to_onehot_y=True)(logits, target)
    # fused options need no MONAI
    assert torch.isfinite(lm.DiceLoss(softmax=True, to_onehot_y=True)(logits, target))
    assert torch.isfinite(lm.DiceFocalLoss(sigmoid=True, to_onehot_y=True, backend="reference")(logits, target))


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: lm.DiceLoss(sigmoid=True, softmax=True), ValueError, "at most one of"),
        (lambda: lm.DiceLoss(other_act=3), TypeError, "other_act"),
        (lambda: lm.DiceLoss(reduction="avg"), ValueError, "reduction"),
        (lambda: lm.DiceCELoss(reduction="none"), ValueError, "reduction"),
        (lambda: lm.DiceCELoss(lambda_ce=-1.0), ValueError, "lambda_ce"),
        (lambda: lm.DiceCELoss(weight=[1.0, 2.0]), TypeError, "weight"),
        (lambda: lm.TverskyLoss(alpha=-0.1), ValueError, "alpha"),
        (lambda: lm.FocalLoss(gamma=-1.0), ValueError, "gamma"),
        (lambda: lm.DiceLoss(smooth_nr=float("nan")), ValueError, "smooth_nr"),
        (lambda: lm.DiceLoss(batch="yes"), TypeError, "batch"),
        (lambda: lm.DiceLoss(backend="tpu"), ValueError, "backend"),
        (lambda: lm.DiceLoss(weight=[1.0, -1.0]), ValueError, "non-negative"),
        (lambda: lm.FocalLoss(weight=torch.tensor(-2.0)), ValueError, "non-negative"),
    ],
)
def test_bad_constructor_arguments(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_bad_inputs_raise_clear_errors():
    logits, target = _inputs(2, 3, (4, 5), "int_labels")
    with pytest.raises(ValueError, match="same number of dimensions"):
        lm.DiceLoss(softmax=True, to_onehot_y=True)(logits, target[:, 0])
    with pytest.raises(ValueError, match="to_onehot_y=True needs a label map"):
        lm.DiceLoss(softmax=True, to_onehot_y=True)(logits, torch.zeros_like(logits))
    with pytest.raises(ValueError, match="must have the input's shape"):
        lm.DiceLoss(softmax=True)(logits, target)
    with pytest.raises(ValueError, match="must have the input's shape"):
        lm.DiceCELoss(softmax=True)(logits, target.float())
    bad = target.clone()
    bad[0, 0, 0, 0] = 7
    with pytest.raises(ValueError, match="7"):
        lm.DiceLoss(softmax=True, to_onehot_y=True)(logits, bad)
    with pytest.raises(ValueError, match="weight must have one entry per class"):
        lm.DiceLoss(softmax=True, to_onehot_y=True, weight=[1.0, 1.0])(logits, target)
    with pytest.raises(ValueError, match="alpha must have one entry per class"):
        lm.FocalLoss(use_softmax=True, to_onehot_y=True, alpha=[0.5, 0.5])(logits, target)
    with pytest.raises(TypeError, match="torch.Tensor"):
        lm.DiceLoss(softmax=True)(logits.tolist(), target)


def test_state_dict_keeps_monai_keys():
    ours = lm.DiceLoss(softmax=True, weight=[1.0, 2.0])
    theirs = monai_losses.DiceLoss(softmax=True, weight=[1.0, 2.0])
    assert ours.state_dict().keys() == theirs.state_dict().keys()


def test_fused_criterion_compiles_with_fullgraph(fused_only):
    logits, target = _inputs(2, 4, (3, 4, 5), "float_labels")
    ours, theirs = _both("DiceCELoss", include_background=False, to_onehot_y=True, softmax=True, batch=True)
    _compare(torch.compile(ours, fullgraph=True), theirs, logits, target)


def test_sigmoid_focal_term_compiles_with_fullgraph_on_float_targets(fused_only):
    """The 0/1 check of float targets reads values: it must not run (nor break the graph) under compile."""
    logits, target = _inputs(2, 3, (4, 5), "onehot_float")
    ours, theirs = _both("DiceFocalLoss", sigmoid=True, gamma=2.0, alpha=0.25)
    _compare(torch.compile(ours, fullgraph=True), theirs, logits, target)


def test_float_targets_unchecked_where_values_are_not_inspected(fused_only, monkeypatch):
    """Where the package reads no values (GPU without ``check_labels``), a soft float target is taken as 0/1.

    It then gets the kernels' two-sided sigmoid focal term, with no delegation and no host sync:
    ``a+ y (1 - p)^g (-log p) + a- (1 - y) p^g (-log(1 - p))``, here against a direct torch formula.
    """
    monkeypatch.setattr(lm, "_can_inspect", lambda tensor: False)
    logits = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    soft = torch.rand(2, 3, 6, 5, dtype=torch.float64)
    gamma, alpha = 2.0, 0.25
    value = lm.FocalLoss(gamma=gamma, alpha=alpha, backend="cpu")(logits, soft)
    p = torch.sigmoid(logits)
    term = alpha * soft * (1 - p) ** gamma * -torch.nn.functional.logsigmoid(logits) + (1 - alpha) * (
        1 - soft
    ) * p**gamma * -torch.nn.functional.logsigmoid(-logits)
    torch.testing.assert_close(value, term.mean(), rtol=1e-10, atol=0)
