"""lmfloss_kernels.nnunet against nnU-Net v2's formulas (written out here) and, where installed, nnunetv2's classes.

nnunetv2 is installed for the tests with ``pip install --no-deps nnunetv2`` (its loss modules
import only torch and numpy; see requirements-test-nodeps.txt). Without it the comparisons run
against the independent implementation below only.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from test_distributed import single_rank_group  # noqa: F401 (fixture)

from lmfloss_kernels import _compat, available_backends
from lmfloss_kernels import nnunet as ln

try:
    from nnunetv2.training.loss import compound_losses as nnunet_losses
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper as NnunetDeepSupervision
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss, SoftDiceLoss
except ImportError:
    nnunet_losses = None
    MemoryEfficientSoftDiceLoss = SoftDiceLoss = None

needs_nnunet = pytest.mark.skipif(nnunet_losses is None, reason="nnunetv2 is not installed (pip install --no-deps)")
BACKENDS = available_backends("cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------
# Independent float64 implementation of nnU-Net v2's formulas


def _soft_dice(probabilities, onehot, valid, *, batch_dice, do_bg, smooth):
    """-mean (2 I + s) / max(G + P + s, 1e-8) over the kept classes (and images unless batch_dice)."""
    probabilities, onehot = probabilities * valid, onehot * valid
    axes = tuple(range(2, probabilities.dim()))
    overlap = (probabilities * onehot).sum(axes)
    predicted, truth = probabilities.sum(axes), onehot.sum(axes)
    if batch_dice:
        overlap, predicted, truth = overlap.sum(0), predicted.sum(0), truth.sum(0)
    dice = (2 * overlap + smooth) / (truth + predicted + smooth).clamp_min(1e-8)
    if not do_bg:
        dice = dice[..., 1:]
    return -dice.mean()


def expected_dc_and_ce(logits, target, *, soft_dice_kwargs, ce_weight=None, weight_ce=1, weight_dice=1, ignore=None):
    x = logits.double()
    labels = target[:, 0].long()
    valid = torch.ones_like(labels, dtype=torch.bool) if ignore is None else labels != ignore
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    num_classes = x.shape[1]
    onehot = F.one_hot(safe, num_classes).movedim(-1, 1).double()
    dice = _soft_dice(
        torch.softmax(x, 1),
        onehot,
        valid.unsqueeze(1).double(),
        batch_dice=soft_dice_kwargs.get("batch_dice", False),
        do_bg=soft_dice_kwargs.get("do_bg", True),
        smooth=soft_dice_kwargs.get("smooth", 1.0),
    )
    nll = -torch.log_softmax(x, 1).gather(1, safe.unsqueeze(1)).squeeze(1)
    w = torch.ones(num_classes, dtype=torch.float64) if ce_weight is None else ce_weight.double()
    voxel_weight = w[safe] * valid
    ce = (voxel_weight * nll).sum() / voxel_weight.sum() if bool(valid.any()) else x.new_zeros(())
    return weight_ce * ce + weight_dice * dice


def expected_dc_and_bce(logits, target, *, soft_dice_kwargs, weight_ce=1, weight_dice=1, use_ignore_label=False):
    x = logits.double()
    regions = target[:, :-1] if use_ignore_label else target
    valid = (1 - target[:, -1:].double()) if use_ignore_label else torch.ones_like(x[:, :1])
    dice = _soft_dice(
        torch.sigmoid(x),
        regions.double(),
        valid,
        batch_dice=soft_dice_kwargs.get("batch_dice", False),
        do_bg=soft_dice_kwargs.get("do_bg", True),
        smooth=soft_dice_kwargs.get("smooth", 1.0),
    )
    y = regions.double()
    bce = torch.clamp_min(x, 0) - x * y + torch.log1p(torch.exp(-x.abs()))
    if use_ignore_label:  # nnU-Net divides the masked sum by the number of valid voxels, channels not counted
        bce = (bce * valid).sum() / valid.sum().clamp_min(1e-8)
    else:
        bce = bce.mean()
    return weight_ce * bce + weight_dice * dice


# ---------------------------------------------------------------------------------------------


def _value_and_grad(criterion, logits, target):
    x = logits.clone().requires_grad_(True)
    value = criterion(x, target)
    value.backward()
    return value.detach().double(), x.grad.double()


def _assert_same(ours, expected, rtol=1e-5):
    (value, grad), (ref_value, ref_grad) = ours, expected
    torch.testing.assert_close(value, ref_value, rtol=rtol, atol=rtol * 1e-1)
    torch.testing.assert_close(grad, ref_grad, rtol=rtol, atol=rtol * float(ref_grad.abs().max()))


def _independent(criterion, logits, target):
    x = logits.double().clone().requires_grad_(True)
    value = criterion(x, target)
    value.backward()
    return value.detach(), x.grad


def _case(batch, classes, spatial, *, ignore=None, dtype=torch.float32):
    logits = torch.randn(batch, classes, *spatial) * 2
    target = torch.randint(0, classes, (batch, 1, *spatial))
    if ignore is not None:
        target[0, 0, :2] = ignore
        target[-1, 0, -1] = ignore
    return logits, target.to(dtype)


DICE_OPTIONS = [
    {"batch_dice": False, "do_bg": False, "smooth": 1e-5, "ddp": False},
    {"batch_dice": True, "do_bg": False, "smooth": 1e-5, "ddp": False},
    {"batch_dice": False, "do_bg": True, "smooth": 1.0, "ddp": False},
    {"batch_dice": True, "do_bg": True, "smooth": 0.3, "ddp": False},
]


@pytest.mark.parametrize("soft_dice_kwargs", DICE_OPTIONS)
@pytest.mark.parametrize("spatial", [(6, 5), (3, 4, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("ignore", [None, 4])
@pytest.mark.parametrize("ce_weight", [None, torch.tensor([0.5, 1.0, 2.0, 3.0])], ids=["unweighted", "weighted"])
def test_dc_and_ce_equals_the_formula(soft_dice_kwargs, spatial, ignore, ce_weight):
    logits, target = _case(3, 4, spatial, ignore=ignore)
    ce_kwargs = {} if ce_weight is None else {"weight": ce_weight}
    ours = ln.DC_and_CE_loss(soft_dice_kwargs, ce_kwargs, weight_ce=0.7, weight_dice=1.3, ignore_label=ignore)
    expected = _independent(
        lambda x, y: expected_dc_and_ce(
            x, y, soft_dice_kwargs=soft_dice_kwargs, ce_weight=ce_weight, weight_ce=0.7, weight_dice=1.3, ignore=ignore
        ),
        logits,
        target,
    )
    _assert_same(_value_and_grad(ours, logits, target), expected)


@needs_nnunet
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("soft_dice_kwargs", DICE_OPTIONS)
@pytest.mark.parametrize("ignore", [None, 3])
@pytest.mark.parametrize("target_dtype", [torch.float32, torch.int64, torch.uint8])
def test_dc_and_ce_equals_nnunetv2(backend, soft_dice_kwargs, ignore, target_dtype):
    logits, target = _case(2, 3, (5, 4, 3), ignore=ignore, dtype=target_dtype)
    dice_class = MemoryEfficientSoftDiceLoss if soft_dice_kwargs["batch_dice"] else SoftDiceLoss
    ours = ln.DC_and_CE_loss(soft_dice_kwargs, {}, ignore_label=ignore, dice_class=dice_class, backend=backend)
    theirs = nnunet_losses.DC_and_CE_loss(dict(soft_dice_kwargs), {}, ignore_label=ignore, dice_class=dice_class)
    _assert_same(_value_and_grad(ours, logits, target), _value_and_grad(theirs, logits, target.float()))


@pytest.mark.parametrize(("weight_ce", "weight_dice"), [(0, 1), (1, 0), (2.5, 0.5)])
def test_term_weights_and_zero_terms(weight_ce, weight_dice):
    logits, target = _case(2, 3, (7, 6))
    kwargs = {"batch_dice": False, "do_bg": False, "smooth": 1e-5}
    ours = ln.DC_and_CE_loss(kwargs, {}, weight_ce=weight_ce, weight_dice=weight_dice)
    expected = _independent(
        lambda x, y: expected_dc_and_ce(x, y, soft_dice_kwargs=kwargs, weight_ce=weight_ce, weight_dice=weight_dice),
        logits,
        target,
    )
    _assert_same(_value_and_grad(ours, logits, target), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_voxel_ignored_gives_nnunets_value(backend):
    logits = torch.randn(2, 3, 4, 5)
    target = torch.full((2, 1, 4, 5), 3.0)
    kwargs = {"batch_dice": True, "do_bg": False, "smooth": 1e-5, "ddp": False}
    value, grad = _value_and_grad(ln.DC_and_CE_loss(kwargs, {}, ignore_label=3, backend=backend), logits, target)
    # CE skipped (0); every class has I = G = P = 0: dice = s / s = 1, loss = -1; no gradient.
    expected = _independent(lambda x, y: expected_dc_and_ce(x, y, soft_dice_kwargs=kwargs, ignore=3), logits, target)
    _assert_same((value, grad), expected)
    assert not grad.any()


def test_deep_supervision_weights_follow_nnunets_rule():
    for scales in (1, 2, 5):
        for ddp in (False, True):
            raw = [0.5**i for i in range(scales)]
            if scales > 1:
                raw[-1] = 1e-6 if ddp else 0.0
            expected = [w / sum(raw) for w in raw]
            assert ln.deep_supervision_weights(scales, ddp=ddp) == pytest.approx(expected, rel=1e-12)


def _pyramid(logits, target, scales):
    outputs, targets = [], []
    for i in range(scales):
        outputs.append(F.avg_pool2d(logits, 2**i) if i else logits)
        targets.append(target[..., :: 2**i, :: 2**i])
    return outputs, targets


@pytest.mark.parametrize("ignore", [None, 3])
def test_deep_supervision_sums_the_weighted_scales(ignore):
    logits, target = _case(2, 3, (8, 8), ignore=ignore)
    outputs, targets = _pyramid(logits, target, 3)
    kwargs = {"batch_dice": True, "do_bg": False, "smooth": 1e-5, "ddp": False}
    weights = ln.deep_supervision_weights(3)
    ours = ln.DeepSupervisionWrapper(ln.DC_and_CE_loss(kwargs, {}, ignore_label=ignore), weights)
    inputs = [o.clone().requires_grad_(True) for o in outputs]
    value = ours(inputs, targets)
    value.backward()
    assert weights[-1] == 0.0 and inputs[-1].grad is None  # a zero-weight scale is not evaluated
    for i, (output, scale_target) in enumerate(zip(outputs[:-1], targets[:-1], strict=True)):
        expected = _independent(
            lambda x, y: expected_dc_and_ce(x, y, soft_dice_kwargs=kwargs, ignore=ignore), output, scale_target
        )
        torch.testing.assert_close(inputs[i].grad.double(), weights[i] * expected[1], rtol=1e-5, atol=1e-7)
    if nnunet_losses is not None:
        theirs = NnunetDeepSupervision(nnunet_losses.DC_and_CE_loss(dict(kwargs), {}, ignore_label=ignore), weights)
        reference = theirs([o.clone() for o in outputs], [t.float() for t in targets])
        torch.testing.assert_close(value.double(), reference.double(), rtol=1e-5, atol=1e-6)


def test_deep_supervision_without_weights_sums_every_scale():
    logits, target = _case(2, 3, (8, 8))
    outputs, targets = _pyramid(logits, target, 2)
    loss = ln.DC_and_CE_loss({"smooth": 1e-5}, {})
    total = ln.DeepSupervisionWrapper(loss)(outputs, targets)
    torch.testing.assert_close(total, loss(outputs[0], targets[0]) + loss(outputs[1], targets[1]))


def _no_user_warning(criterion, logits, target):
    """``_value_and_grad`` asserting the criterion warns nothing (a fused path has nothing to report)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _value_and_grad(criterion, logits, target)
    ours = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert not ours, ours
    return result


def _regions(batch, regions, spatial, dtype, *, ignore_channel=False):
    """Overlapping 0/1 region maps (BraTS style), optionally with nnU-Net's ignore channel last."""
    target = torch.rand(batch, regions + ignore_channel, *spatial) > 0.6
    return target.to(dtype)


def _nnunet_bce(soft_dice_kwargs, bce_kwargs=None, **kwargs):
    return nnunet_losses.DC_and_BCE_loss(
        dict(bce_kwargs or {}), dict(soft_dice_kwargs), dice_class=MemoryEfficientSoftDiceLoss, **kwargs
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("soft_dice_kwargs", DICE_OPTIONS)
@pytest.mark.parametrize("target_dtype", [torch.bool, torch.uint8, torch.float32])
def test_dc_and_bce_is_fused_and_equals_the_formula_and_nnunetv2(backend, soft_dice_kwargs, target_dtype):
    logits = torch.randn(2, 3, 5, 6) * 2
    target = _regions(2, 3, (5, 6), target_dtype)
    ours = ln.DC_and_BCE_loss({}, soft_dice_kwargs, weight_ce=0.8, weight_dice=1.3, backend=backend)
    value = _no_user_warning(ours, logits, target)
    expected = _independent(
        lambda x, y: expected_dc_and_bce(x, y, soft_dice_kwargs=soft_dice_kwargs, weight_ce=0.8, weight_dice=1.3),
        logits,
        target,
    )
    _assert_same(value, expected)
    if nnunet_losses is not None:
        theirs = _nnunet_bce(soft_dice_kwargs, weight_ce=0.8, weight_dice=1.3)
        _assert_same(value, _value_and_grad(theirs, logits, target))


def test_dc_and_bce_soft_regions_equal_the_formula():
    logits = torch.randn(2, 3, 4, 5, 3)
    target = torch.rand(2, 3, 4, 5, 3)
    kwargs = DICE_OPTIONS[1]
    value = _no_user_warning(ln.DC_and_BCE_loss({"reduction": "mean"}, kwargs, backend="reference"), logits, target)
    expected = _independent(lambda x, y: expected_dc_and_bce(x, y, soft_dice_kwargs=kwargs), logits, target)
    _assert_same(value, expected)


@pytest.mark.parametrize(
    ("bce_kwargs", "use_ignore_label", "reason"),
    [
        ({}, True, "use_ignore_label=True"),
        ({"pos_weight": torch.tensor([[[2.0]], [[0.5]], [[1.5]]])}, False, "bce_kwargs ['pos_weight']"),
    ],
    ids=["use_ignore_label", "pos_weight"],
)
@pytest.mark.parametrize("soft_dice_kwargs", DICE_OPTIONS[:2] + DICE_OPTIONS[3:])
def test_dc_and_bce_eager_options_warn_once_and_equal_nnunetv2(
    monkeypatch, bce_kwargs, use_ignore_label, reason, soft_dice_kwargs
):
    logits = torch.randn(2, 3, 5, 6)
    target = _regions(2, 3, (5, 6), torch.uint8, ignore_channel=use_ignore_label)
    ours = ln.DC_and_BCE_loss(
        bce_kwargs, soft_dice_kwargs, weight_ce=0.8, use_ignore_label=use_ignore_label, backend="reference"
    )
    monkeypatch.setattr(_compat, "_warned", set())
    with pytest.warns(UserWarning, match=re.escape(reason)):
        value = _value_and_grad(ours, logits, target)
    _no_user_warning(ours, logits, target)  # once per process
    if not bce_kwargs:
        expected = _independent(
            lambda x, y: expected_dc_and_bce(
                x, y, soft_dice_kwargs=soft_dice_kwargs, weight_ce=0.8, use_ignore_label=use_ignore_label
            ),
            logits,
            target,
        )
        _assert_same(value, expected)
    if nnunet_losses is not None:
        theirs = _nnunet_bce(soft_dice_kwargs, bce_kwargs, weight_ce=0.8, use_ignore_label=use_ignore_label)
        _assert_same(value, _value_and_grad(theirs, logits, target))


def _clamp_binds(probabilities, onehot, valid, batch_dice) -> bool:
    """Whether nnU-Net's ``max(G + P + s, 1e-8)`` takes the 1e-8 for some class (with ``s = 0``)."""
    axes = tuple(range(2, probabilities.dim()))
    total = (probabilities * valid).sum(axes) + (onehot * valid).sum(axes)
    if batch_dice:
        total = total.sum(0)
    return bool((total < 1e-8).any())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_dice", [False, True])
def test_denominator_clamp_with_zero_smoothing_gives_nnunets_values_sigmoid(backend, batch_dice):
    """smooth = 0, a class absent from the ground truth with no predicted mass: nnU-Net's clamp
    binds there (``0 / 1e-8 = 0``), where an unclamped ratio would be ``0 / 0``."""
    kwargs = {"batch_dice": batch_dice, "do_bg": False, "smooth": 0.0, "ddp": False}
    # Sigmoid: region 1 empty everywhere, its logits so negative that P underflows to 0 in float32.
    logits = torch.randn(2, 3, 5, 6)
    logits[:, 1] = -120.0
    target = _regions(2, 3, (5, 6), torch.uint8)
    target[:, 1] = 0
    assert _clamp_binds(torch.sigmoid(logits.double()), target.double(), torch.ones(1), batch_dice)
    ours = _no_user_warning(ln.DC_and_BCE_loss({}, kwargs, backend=backend), logits, target)
    expected = _independent(lambda x, y: expected_dc_and_bce(x, y, soft_dice_kwargs=kwargs), logits, target)
    assert torch.isfinite(ours[0]) and torch.isfinite(ours[1]).all()
    _assert_same(ours, expected)
    if nnunet_losses is not None:
        _assert_same(ours, _value_and_grad(_nnunet_bce(kwargs), logits, target))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_dice", [False, True])
def test_denominator_clamp_with_zero_smoothing_gives_nnunets_values_softmax(backend, batch_dice):
    """smooth = 0, the last image entirely ignored (G = P = 0 for every class), class 3 never present."""
    kwargs = {"batch_dice": batch_dice, "do_bg": False, "smooth": 0.0, "ddp": False}
    logits, target = _case(2, 4, (5, 6))
    target[target == 3] = 2
    target[1] = 3
    onehot = F.one_hot(target[:, 0].long(), 4).movedim(-1, 1).double()
    valid = (target != 3).double()
    # per image the ignored image binds; summed over the batch, class 3 keeps image 0's predicted mass
    assert _clamp_binds(torch.softmax(logits.double(), 1), onehot, valid, batch_dice) == (not batch_dice)
    ours = _value_and_grad(ln.DC_and_CE_loss(kwargs, {}, ignore_label=3, backend=backend), logits, target)
    expected = _independent(lambda x, y: expected_dc_and_ce(x, y, soft_dice_kwargs=kwargs, ignore=3), logits, target)
    assert torch.isfinite(ours[0]) and torch.isfinite(ours[1]).all()
    _assert_same(ours, expected)
    if nnunet_losses is not None:
        theirs = nnunet_losses.DC_and_CE_loss(dict(kwargs), {}, ignore_label=3, dice_class=MemoryEfficientSoftDiceLoss)
        _assert_same(ours, _value_and_grad(theirs, logits, target))


@pytest.mark.parametrize("ignore", [None, 2])
def test_ddp_batch_dice_on_one_rank_equals_the_plain_loss(single_rank_group, ignore):  # noqa: F811
    logits, target = _case(2, 3, (5, 6), ignore=ignore)
    synced = {"batch_dice": True, "do_bg": False, "smooth": 1e-5, "ddp": True}
    plain = dict(synced, ddp=False)
    _assert_same(
        _value_and_grad(ln.DC_and_CE_loss(synced, {}, ignore_label=ignore), logits, target),
        _value_and_grad(ln.DC_and_CE_loss(plain, {}, ignore_label=ignore), logits, target),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddp_batch_dice_dc_and_bce_on_one_rank_equals_the_plain_loss(single_rank_group, backend):  # noqa: F811
    logits = torch.randn(2, 3, 5, 6)
    target = _regions(2, 3, (5, 6), torch.bool)
    synced = {"batch_dice": True, "do_bg": True, "smooth": 1e-5, "ddp": True}
    _assert_same(
        _no_user_warning(ln.DC_and_BCE_loss({}, synced, backend=backend), logits, target),
        _value_and_grad(ln.DC_and_BCE_loss({}, dict(synced, ddp=False), backend=backend), logits, target),
    )


class _OtherDice:
    pass


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: ln.DC_and_CE_loss({}, {}, dice_class=_OtherDice), ValueError, "dice_class"),
        (lambda: ln.DC_and_CE_loss({"square": True}, {}), TypeError, "unexpected keys"),
        (lambda: ln.DC_and_CE_loss({"clip_tp": 0.1}, {}), ValueError, "clip_tp"),
        (lambda: ln.DC_and_CE_loss({"smooth": -1.0}, {}), ValueError, "smooth"),
        (lambda: ln.DC_and_CE_loss({}, {"reduction": "sum"}), ValueError, "reduction"),
        (lambda: ln.DC_and_CE_loss({}, {"label_smoothing": 0.1}), ValueError, "label_smoothing"),
        (lambda: ln.DC_and_CE_loss({}, {"ignore_index": 3}), ValueError, "ignore_label"),
        (lambda: ln.DC_and_CE_loss({}, {"weight": torch.tensor([1.0, -1.0])}), ValueError, "non-negative"),
        (lambda: ln.DC_and_CE_loss({}, {}, weight_ce=-1), ValueError, "weight_ce"),
        (lambda: ln.DC_and_CE_loss({}, {}, ignore_label=2.5), TypeError, "ignore_label"),
        (lambda: ln.DC_and_CE_loss([], {}), TypeError, "soft_dice_kwargs"),
        (lambda: ln.DeepSupervisionWrapper(None, [0, 0]), ValueError, "non-zero"),
        (lambda: ln.deep_supervision_weights(0), ValueError, "num_scales"),
    ],
)
def test_bad_arguments(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_bad_inputs_raise_clear_errors():
    logits, target = _case(2, 3, (4, 5))
    loss = ln.DC_and_CE_loss({}, {})
    with pytest.raises(ValueError, match=r"\(B, 1, \*spatial\)"):
        loss(logits, target[:, 0])
    with pytest.raises(ValueError, match=r"\(B, 1, \*spatial\)"):
        loss(logits, torch.zeros_like(logits))
    bad = target.clone()
    bad[0, 0, 0, 0] = 5
    with pytest.raises(ValueError, match="5"):
        loss(logits, bad)
    with pytest.raises(ValueError, match="3 classes"):
        ln.DC_and_CE_loss({}, {"weight": torch.ones(2)})(logits, target)
    with pytest.raises(ValueError, match="do_bg=False needs at least 2 classes"):
        ln.DC_and_CE_loss({"do_bg": False}, {})(logits[:, :1], target * 0)
    wrapper = ln.DeepSupervisionWrapper(loss, [1.0, 0.5])
    with pytest.raises(TypeError, match="tuple or list"):
        wrapper(logits, target)
    with pytest.raises(ValueError, match="same number of scales"):
        wrapper([logits, logits], [target])
    with pytest.raises(ValueError, match="2 weight factors for 3 scales"):
        wrapper([logits] * 3, [target] * 3)
    with pytest.raises(ValueError, match="one-hot regions"):
        ln.DC_and_BCE_loss({}, {})(logits, target)


# ---------------------------------------------------------------------------------------------
# Two gloo ranks: DDP with batch_dice gives the single-process parameter gradient

WORLD = 2
DDP_DICE = {"batch_dice": True, "do_bg": False, "smooth": 1e-5, "ddp": True}


def _ddp_data():
    generator = torch.Generator().manual_seed(11)
    features = torch.randn(2 * WORLD, 3, 6, 5, generator=generator)
    target = torch.randint(0, 4, (2 * WORLD, 1, 6, 5), generator=generator)
    return features, target


def _parameter_gradient(criterion, rank=None):
    """Gradient of a 1x1 convolution's parameters: under DDP on this rank's half, else on the whole batch."""
    torch.manual_seed(5)
    net = torch.nn.Conv2d(3, 4, 1)
    features, target = _ddp_data()
    if rank is not None:
        part = slice(2 * rank, 2 * rank + 2)
        features, target = features[part], target[part]
        model = torch.nn.parallel.DistributedDataParallel(net)
    else:
        model = net
    loss = criterion(model(features), target.float())
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in net.parameters()])


def _on_regions(criterion):
    """The criterion on the one-hot regions of a (B, 1, *S) label target (DC_and_BCE_loss's input)."""
    return lambda output, target: criterion(output, F.one_hot(target[:, 0].long(), 4).movedim(-1, 1).to(torch.uint8))


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    import datetime
    import os

    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    torch.set_num_threads(1)
    results = {}
    try:
        results["ours"] = _parameter_gradient(ln.DC_and_CE_loss(dict(DDP_DICE), {}), rank)
        bce = ln.DC_and_BCE_loss({}, dict(DDP_DICE), backend="reference")
        results["ours_bce"] = _parameter_gradient(_on_regions(bce), rank)
        if nnunet_losses is not None:
            theirs = nnunet_losses.DC_and_CE_loss(dict(DDP_DICE), {}, dice_class=MemoryEfficientSoftDiceLoss)
            results["nnunetv2"] = _parameter_gradient(theirs, rank)
            results["nnunetv2_bce"] = _parameter_gradient(_on_regions(_nnunet_bce(DDP_DICE)), rank)
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def test_ddp_batch_dice_gives_the_single_process_parameter_gradient(tmp_path):
    import time

    import torch.multiprocessing as mp
    from test_distributed import _free_port

    context = mp.start_processes(
        _ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two gloo ranks did not finish within 240 s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single_value, single_grad = _parameter_gradient(ln.DC_and_CE_loss(dict(DDP_DICE, ddp=False), {}))
    bce = ln.DC_and_BCE_loss({}, dict(DDP_DICE, ddp=False), backend="reference")
    single_bce_value, single_bce_grad = _parameter_gradient(_on_regions(bce))
    for result in ranks:
        value, grad = result["ours"]
        torch.testing.assert_close(value, single_value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, single_grad, rtol=1e-5, atol=1e-6)
        value, bce_grad = result["ours_bce"]
        torch.testing.assert_close(value, single_bce_value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bce_grad, single_bce_grad, rtol=1e-5, atol=1e-6)
        if "nnunetv2" in result:
            torch.testing.assert_close(grad, result["nnunetv2"][1], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(bce_grad, result["nnunetv2_bce"][1], rtol=1e-5, atol=1e-6)
