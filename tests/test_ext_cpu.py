"""``backend="cpu"`` (the C++ extension's CPU kernels) against the eager reference.

Fresh random inputs, odd shapes (voxel counts that leave partial tiles and chunks), every
reduction with a random ``grad_output``, ignore_index, batch, clip (including confidently wrong
and saturated voxels), soft targets, strided layouts, every label dtype, float64 at 1e-10 and
the low-precision rule for float16 / bfloat16.
"""

from __future__ import annotations

import pytest
import torch
from test_ext_helpers import RTOL, assert_close, compare_with_reference, loss_and_grad, requires_ext

from lmfloss_kernels import functional as F
from lmfloss_kernels import reference
from lmfloss_kernels.ext import CPU_BACKEND

pytestmark = requires_ext

ROW_CONFIGS = [  # alpha, beta, gamma: LMF, LDAM only, focal only (gamma < 1 and gamma = 0)
    (1.0, 1.0, 1.5),
    (1.5, 0.0, 0.0),
    (0.0, 1.0, 0.5),
    (0.7, 0.3, 0.0),
]


def _row_inputs(shape, label_dtype=torch.int64, dtype=torch.float32, ignore_every=5):
    num_classes = shape[1]
    logits = (3 * torch.randn(shape, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, num_classes, shape[:1] + shape[2:])
    if ignore_every:
        labels.view(-1)[::ignore_every] = 255 if label_dtype == torch.uint8 else -100
    vector_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    margins, ldam_weight, focal_weight = (torch.rand(num_classes, dtype=vector_dtype) + 0.2 for _ in range(3))
    return logits, labels.to(label_dtype), margins, ldam_weight, focal_weight


def _grad_output(shape, dtype=torch.float32):
    return torch.randn(shape, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("config", ROW_CONFIGS)
@pytest.mark.parametrize("shape", [(33, 5), (2, 3, 7, 9, 11), (1, 2, 131), (70, 32)])
def test_rows_match_reference(shape, config, reduction):
    alpha, beta, gamma = config
    logits, labels, *vectors = _row_inputs(shape)
    ignore_index = -100
    out_shape = labels.shape if reduction == "none" else ()
    kwargs = dict(alpha=alpha, beta=beta, gamma=gamma, s=30.0, ignore_index=ignore_index, reduction=reduction)
    compare_with_reference(
        reference.row_loss, CPU_BACKEND.row_loss, logits, labels, *vectors, grad_output=_grad_output(out_shape),
        **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_rows_any_label_dtype(label_dtype):
    logits, labels, *vectors = _row_inputs((3, 4, 5, 7), label_dtype=label_dtype)
    ignore_index = 255 if label_dtype == torch.uint8 else -100
    kwargs = dict(alpha=1.0, beta=1.0, gamma=1.5, s=30.0, ignore_index=ignore_index, reduction="mean")
    compare_with_reference(reference.row_loss, CPU_BACKEND.row_loss, logits, labels, *vectors, **kwargs)


def test_rows_bool_labels_and_all_ignored():
    logits, _, *vectors = _row_inputs((40, 2))
    labels = torch.rand(40) > 0.5
    kwargs = dict(alpha=1.0, beta=1.0, gamma=1.5, s=30.0, ignore_index=-100, reduction="mean")
    compare_with_reference(reference.row_loss, CPU_BACKEND.row_loss, logits, labels, *vectors, **kwargs)
    # Every row ignored: "mean" is NaN (0 / 0, as cross_entropy), "sum" is 0 with a zero gradient.
    ignored = torch.full((40,), -100)
    assert torch.isnan(CPU_BACKEND.row_loss(logits, ignored, *vectors, **kwargs))
    loss, grad = loss_and_grad(CPU_BACKEND.row_loss, logits, ignored, *vectors, **{**kwargs, "reduction": "sum"})
    assert float(loss) == 0.0 and not bool(grad.any())


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_rows_float64(reduction):
    logits, labels, *vectors = _row_inputs((4, 3, 5, 6), dtype=torch.float64)
    out_shape = labels.shape if reduction == "none" else ()
    kwargs = dict(alpha=1.0, beta=1.0, gamma=0.5, s=30.0, ignore_index=-100, reduction=reduction)
    compare_with_reference(
        reference.row_loss, CPU_BACKEND.row_loss, logits, labels, *vectors,
        grad_output=_grad_output(out_shape, torch.float64), **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rows_low_precision(dtype):
    logits, labels, *vectors = _row_inputs((2, 4, 9, 13), dtype=dtype)
    kwargs = dict(alpha=1.0, beta=1.0, gamma=1.5, s=30.0, ignore_index=-100, reduction="mean")
    compare_with_reference(reference.row_loss, CPU_BACKEND.row_loss, logits, labels, *vectors, **kwargs)


def test_rows_strided_layouts():
    logits, labels, *vectors = _row_inputs((3, 5, 6, 7))
    kwargs = dict(alpha=1.0, beta=1.0, gamma=1.5, s=30.0, ignore_index=-100, reduction="none")
    grad_output = _grad_output(labels.shape)
    variants = [
        logits.contiguous(memory_format=torch.channels_last),
        logits.transpose(2, 3).contiguous().transpose(2, 3),  # spatial axes that do not flatten
        logits[:1].expand(3, -1, -1, -1),  # stride-0 batch
    ]
    for x in variants:
        compare_with_reference(
            reference.row_loss, CPU_BACKEND.row_loss, x, labels.transpose(1, 2).contiguous().transpose(1, 2),
            *vectors, grad_output=grad_output, **kwargs,
        )  # fmt: skip
    rows = torch.randn(9, 40).t()  # (40, 9) with the class axis strided
    compare_with_reference(
        reference.row_loss, CPU_BACKEND.row_loss, rows, torch.randint(0, 9, (80,))[::2], *_row_inputs((2, 9))[2:],
        **{**kwargs, "reduction": "mean"},
    )  # fmt: skip


# Regions ---------------------------------------------------------------------------------------


def _region_inputs(shape, dtype=torch.float32, soft=False, label_dtype=torch.uint8, scale=3.0):
    num_classes = shape[1]
    logits = (scale * torch.randn(shape, dtype=torch.float64)).to(dtype)
    if soft:
        target = torch.softmax(2 * torch.randn(shape, dtype=torch.float64), 1).to(
            torch.float64 if dtype == torch.float64 else torch.float32
        )
    else:
        target = torch.randint(0, num_classes, shape[:1] + shape[2:]).to(label_dtype)
    vector_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    focal_weight = torch.rand(num_classes, dtype=vector_dtype) + 0.2
    focal_gamma = torch.tensor([0.5, 0.0, 2.0, 1.0] * num_classes, dtype=vector_dtype)[:num_classes]
    exponent = torch.tensor([1.0, 0.5, 0.75, 0.0] * num_classes, dtype=vector_dtype)[:num_classes]
    return logits, target, focal_weight, focal_gamma, exponent


def _region_options(**changes):
    options = dict(
        delta=0.6, focal_coef=0.5, tversky_coef=0.5, smooth_nr=1e-7, smooth_dr=1e-7, eps=1e-7, clip=True,
        batch=False, ignore_index=None, reduction="mean",
    )  # fmt: skip
    options.update(changes)
    return options


def _out_shape(logits, reduction):
    return (logits.shape[0],) if reduction == "none" else ()


REGION_CASES = [
    dict(),
    dict(clip=False),
    dict(batch=True, reduction="none"),
    dict(ignore_index=1, reduction="sum"),
    dict(ignore_index=1, clip=False, batch=True),
    dict(focal_coef=0.0, tversky_coef=1.0, smooth_nr=1e-6, smooth_dr=1e-6, reduction="none"),
    dict(focal_coef=1.0, tversky_coef=0.0, ignore_index=0),
    dict(delta=0.5, smooth_nr=1e-5, smooth_dr=2e-5, clip=False),
]


@pytest.mark.parametrize("case", REGION_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("shape", [(2, 3, 7, 9, 11), (1, 5, 13, 3), (3, 2, 67), (2, 32, 4, 5, 3)])
def test_regions_match_reference(shape, case):
    options = _region_options(**case)
    logits, target, *vectors = _region_inputs(shape)
    grad_output = _grad_output(_out_shape(logits, options["reduction"]))
    compare_with_reference(
        reference.region_loss, CPU_BACKEND.region_loss, logits, target, *vectors, grad_output=grad_output, **options
    )


@pytest.mark.parametrize("soft", [False, True], ids=["labels", "soft"])
@pytest.mark.parametrize("case", [dict(), dict(clip=False, ignore_index=2, reduction="none"), dict(clip=False)])
def test_regions_with_every_gamma_zero(case, soft):
    """Every focal gamma 0 (cross-entropy, as DiceCE and nnU-Net's DC + CE have it): the kernels skip the
    modulation's pow there, with and without the clip (the clip-free kernels have no clamps at all)."""
    if soft and case.get("ignore_index") is not None:
        case = {k: v for k, v in case.items() if k != "ignore_index"}
    options = _region_options(**case)
    logits, target, weight, gamma, exponent = _region_inputs((2, 4, 7, 5, 3), soft=soft, scale=6.0)
    grad_output = _grad_output(_out_shape(logits, options["reduction"]))
    compare_with_reference(
        reference.region_loss, CPU_BACKEND.region_loss, logits, target, weight, torch.zeros_like(gamma), exponent,
        grad_output=grad_output, **options,
    )  # fmt: skip


@pytest.mark.parametrize("case", [dict(), dict(clip=False, reduction="none"), dict(batch=True, reduction="sum")])
def test_regions_soft_targets(case):
    options = _region_options(**case)
    logits, target, *vectors = _region_inputs((2, 4, 6, 5, 7), soft=True)
    grad_output = _grad_output(_out_shape(logits, options["reduction"]))
    compare_with_reference(
        reference.region_loss, CPU_BACKEND.region_loss, logits, target, *vectors, grad_output=grad_output, **options
    )
    one_hot = torch.nn.functional.one_hot(torch.randint(0, 4, (2, 6, 5, 7)), 4).movedim(-1, 1).to(torch.float16)
    compare_with_reference(reference.region_loss, CPU_BACKEND.region_loss, logits, one_hot, *vectors, **options)


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int8, torch.int32, torch.int64, torch.bool])
def test_regions_any_label_dtype(label_dtype):
    num_classes = 2 if label_dtype == torch.bool else 3
    logits, target, *vectors = _region_inputs((2, num_classes, 5, 9), label_dtype=label_dtype)
    options = _region_options(ignore_index=None if label_dtype == torch.bool else 2)
    compare_with_reference(reference.region_loss, CPU_BACKEND.region_loss, logits, target, *vectors, **options)


@pytest.mark.parametrize("case", [dict(), dict(clip=False, reduction="none", batch=True), dict(ignore_index=0)])
def test_regions_float64(case):
    options = _region_options(**case)
    logits, target, *vectors = _region_inputs((2, 3, 5, 6, 7), dtype=torch.float64)
    grad_output = _grad_output(_out_shape(logits, options["reduction"]), torch.float64)
    compare_with_reference(
        reference.region_loss, CPU_BACKEND.region_loss, logits, target, *vectors, grad_output=grad_output, **options
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("clip", [True, False])
def test_regions_low_precision(dtype, clip):
    logits, target, *vectors = _region_inputs((2, 4, 8, 9, 5), dtype=dtype)
    compare_with_reference(
        reference.region_loss, CPU_BACKEND.region_loss, logits, target, *vectors, **_region_options(clip=clip)
    )


def test_regions_strided_layouts():
    logits, target, *vectors = _region_inputs((2, 4, 5, 6, 7))
    options = _region_options(reduction="none", ignore_index=3)
    grad_output = _grad_output((2,))
    variants = [
        logits.contiguous(memory_format=torch.channels_last_3d),
        logits.permute(0, 1, 4, 3, 2).contiguous().permute(0, 1, 4, 3, 2),
        logits[:1].expand(2, -1, -1, -1, -1),
        logits[:, :, ::2],
    ]
    for x in variants:
        labels = (
            target[:, ::2] if x.shape[2] != target.shape[1] else target.transpose(1, 3).contiguous().transpose(1, 3)
        )
        actual = loss_and_grad(CPU_BACKEND.region_loss, x, labels, *vectors, grad_output=grad_output, **options)
        expected = loss_and_grad(reference.region_loss, x, labels, *vectors, grad_output=grad_output, **options)
        assert_close(actual[0], expected[0], "loss", 1e-5)
        assert_close(actual[1], expected[1], "gradient", 1e-5)
    channels_last = logits.contiguous(memory_format=torch.channels_last_3d).requires_grad_(True)
    CPU_BACKEND.region_loss(channels_last, target, *vectors, **_region_options()).backward()
    assert channels_last.grad.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("soft", [False, True], ids=["labels", "one_hot"])
def test_minus_inf_logit_without_clip_keeps_the_references_finite_gradient(soft, dtype):
    """clip=False and a -inf logit on a class the voxel is not labelled with, whose focal gamma is 0
    (the asymmetric Unified Focal's foreground classes): there log q = -inf, and the reference's
    gradient stays finite (pow's derivative at exponent 0 is 0). A kernel that forms y * term gets
    0 * inf = NaN instead; a select on y keeps the reference's values. (The loss itself is NaN by
    the non-finite logits policy, which the kernels apply: tests/test_ext_cpu_nonfinite.py.)"""
    logits, labels, weight, _, exponent = _region_inputs((2, 4, 5, 6), dtype=dtype, label_dtype=torch.int64)
    gamma = torch.tensor([0.5, 0.0, 0.0, 0.0], dtype=weight.dtype)
    labels[0, 1, 2], logits[0, 2, 1, 2] = 0, float("-inf")
    labels[1, 4, 5], logits[1, 1, 4, 5] = 3, float("-inf")
    target = torch.nn.functional.one_hot(labels, 4).movedim(-1, 1).to(dtype) if soft else labels
    options = _region_options(clip=False, reduction="sum")
    grad_output = _grad_output(())
    args = (logits, target, weight, gamma, exponent)
    _, expected = loss_and_grad(reference.region_loss, *args, grad_output=grad_output, **options)
    _, actual = loss_and_grad(CPU_BACKEND.region_loss, *args, grad_output=grad_output, **options)
    assert bool(torch.isfinite(expected).all()), "premise: the reference's gradient is finite here"
    assert_close(actual, expected, "gradient", RTOL[dtype])


def test_clip_dead_zone_of_confidently_wrong_and_saturated_voxels():
    logits, target, *vectors = _region_inputs((1, 3, 4, 5))
    logits[0, :, 0, 0] = torch.tensor([20.0, -20.0, 0.0])  # label forced to 1 below: p_t ~ 1e-18 < eps
    logits[0, :, 1, 1] = torch.tensor([40.0, 0.0, 0.0])  # label 0: saturated, p_0 = 1 in float32
    target[0, 0, 0], target[0, 1, 1] = 1, 0
    for clip in (True, False):
        options = _region_options(clip=clip)
        actual = loss_and_grad(CPU_BACKEND.region_loss, logits, target, *vectors, **options)
        expected = loss_and_grad(reference.region_loss, logits, target, *vectors, **options)
        assert_close(actual[0], expected[0], "loss", 1e-5)
        assert_close(actual[1], expected[1], "gradient", 1e-5)
        wrong = actual[1][0, :, 0, 0]
        # With the clip every channel of that voxel is outside [eps, 1 - eps]: no gradient at all.
        assert bool((wrong == 0).all()) == clip, wrong


def test_outputs_fully_written(monkeypatch):
    """Every output buffer starts as NaN (LMFLOSS_EXT_POISON=1): unwritten elements would show."""
    monkeypatch.setenv("LMFLOSS_EXT_POISON", "1")
    for shape in [(2, 3, 7, 9, 11), (1, 5, 4099)]:
        logits, target, *vectors = _region_inputs(shape)
        for options in (_region_options(reduction="none", ignore_index=2), _region_options(batch=True)):
            grad_output = _grad_output(_out_shape(logits, options["reduction"]))
            compare_with_reference(
                reference.region_loss, CPU_BACKEND.region_loss, logits, target, *vectors,
                grad_output=grad_output, **options,
            )  # fmt: skip
        logits, labels, *vectors = _row_inputs(shape)
        kwargs = dict(alpha=1.0, beta=1.0, gamma=1.5, s=30.0, ignore_index=-100, reduction="none")
        compare_with_reference(
            reference.row_loss, CPU_BACKEND.row_loss, logits, labels, *vectors,
            grad_output=_grad_output(labels.shape), **kwargs,
        )  # fmt: skip


# Named losses through the functional API ------------------------------------------------------

NAMED = [
    (F.unified_focal_loss, dict()),
    (F.unified_focal_loss, dict(asymmetric=False, weight=None, clip=False, batch=True)),
    (F.focal_tversky_loss, dict(asymmetric=True)),
    (F.symmetric_focal_loss, dict()),
    (F.asymmetric_focal_loss, dict(reduction="sum")),
    (F.mixed_focal_loss, dict(alpha=[0.5, 1.0, 2.0], beta=0.4, weight=0.3)),
    (F.tversky_loss, dict(batch=True)),
    (F.dice_loss, dict(ignore_index=2)),
]


@pytest.mark.parametrize(("loss_fn", "kwargs"), NAMED, ids=lambda v: getattr(v, "__name__", ""))
def test_named_region_losses(loss_fn, kwargs):
    logits, target, *_ = _region_inputs((2, 3, 6, 7, 5))
    expected = loss_and_grad(loss_fn, logits, target.long(), backend="reference", **kwargs)
    actual = loss_and_grad(loss_fn, logits, target, backend="cpu", **kwargs)
    assert_close(actual[0], expected[0], "loss", 1e-5)
    assert_close(actual[1], expected[1], "gradient", 1e-5)


def test_named_row_losses_and_auto_picks_cpu():
    logits = 2 * torch.randn(50, 4)
    labels = torch.randint(0, 4, (50,))
    counts = [100, 30, 10, 3]
    for fn, args in ((F.lmf_loss, (counts,)), (F.ldam_loss, (counts,)), (F.focal_loss, ())):
        expected = loss_and_grad(fn, logits, labels, *args, backend="reference")
        actual = loss_and_grad(fn, logits, labels, *args, backend="auto")
        assert_close(actual[0], expected[0], "loss", 1e-5)
        assert_close(actual[1], expected[1], "gradient", 1e-5)
    from lmfloss_kernels._backends import resolve_backend

    assert resolve_backend("auto", logits).name == "cpu"


def test_saturated_voxels_match_the_float64_definition():
    """Confident, correct predictions everywhere (the end of training): 1 - q comes from log p.

    In float32, ``1 - clip(p)`` rounds to 1.19e-7 instead of eps = 1e-7 for every saturated
    voxel, which shifts FN (and the loss) by a few percent; the kernels form 1 - q from log p,
    as the float64 reference effectively does, and agree with it.
    """
    labels = torch.randint(0, 3, (2, 16, 16))
    logits = torch.nn.functional.one_hot(labels, 3).movedim(-1, 1).float() * 40
    for loss_fn, kwargs in ((F.unified_focal_loss, {}), (F.tversky_loss, {"clip": True})):
        truth = loss_fn(logits.double(), labels, backend="reference", **kwargs)
        actual = loss_fn(logits, labels, backend="cpu", **kwargs)
        assert_close(actual, truth, "loss", 1e-5)


def test_rows_mean_and_sum_allocate_no_per_row_buffer():
    """Reductions "mean" and "sum" need only four sums: the label-sized float32 per-row losses are made for
    "none" alone (the profiler's memory count of the forward op; "none" shows what it would be)."""
    logits, labels, *vectors = _row_inputs((1 << 16, 2))
    kwargs = dict(alpha=1.0, beta=1.0, gamma=1.5, s=30.0, ignore_index=-100)
    per_row_bytes = labels.numel() * 4
    allocated = {}
    for reduction in ("mean", "sum", "none"):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            CPU_BACKEND.row_loss(logits, labels, *vectors, reduction=reduction, **kwargs)
        (event,) = [e for e in prof.events() if e.name == "lmfloss_ext::row_loss_forward"]
        allocated[reduction] = event.cpu_memory_usage
    assert allocated["none"] >= per_row_bytes, allocated
    assert allocated["mean"] < per_row_bytes // 4 and allocated["sum"] < per_row_bytes // 4, allocated


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int32, torch.int64])
def test_native_label_dtypes_are_read_without_a_copy(label_dtype):
    """uint8, int32 and int64 label maps go to the kernels as they are: no widened copy (an int64
    copy of an int32 map would cost half a float32 C=4 gradient more on a large volume)."""
    logits, target, *vectors = _region_inputs((2, 3, 6, 7), label_dtype=label_dtype)
    rows, labels, *row_vectors = _row_inputs((3, 4, 5, 7), label_dtype=label_dtype)
    row_kwargs = dict(alpha=1.0, beta=1.0, gamma=1.5, s=30.0, ignore_index=-100, reduction="mean")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        CPU_BACKEND.region_loss(logits, target, *vectors, **_region_options())
        CPU_BACKEND.row_loss(rows, labels, *row_vectors, **row_kwargs)
    label_shapes = ([*target.shape], [*labels.shape])
    copies = [
        (e.name, e.input_shapes[0])
        for e in prof.events()
        if e.name in ("aten::_to_copy", "aten::copy_") and e.input_shapes and e.input_shapes[0] in label_shapes
    ]
    assert not copies, copies
