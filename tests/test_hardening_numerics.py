"""Production guarantees for every backend of every device present (CPU always; CUDA's triton, cuda
and reference backends when a GPU is there): non-finite logits, autocast (CPU bf16, CUDA fp16 and
bf16), determinism across runs (and CPU thread counts), saturated fp32 clip, memory layouts, index
arithmetic past int32 (CPU views with far offsets; on a GPU, more than 2**31 logits elements)."""

from __future__ import annotations

import resource

import pytest
import torch
from test_ext_helpers import assert_close, loss_and_grad

import lmfloss_kernels as lk
from lmfloss_kernels import functional as F
from lmfloss_kernels import reference

BACKENDS = [name for name in ("reference", "cpu", "triton") if name in lk.available_backends("cpu")]
CUDA_BACKENDS = lk.available_backends("cuda") if torch.cuda.is_available() else []
# (device, backend) of every backend of every device present; CUDA cases carry the gpu marker.
DEVICE_BACKENDS = [pytest.param("cpu", name, id=f"cpu-{name}") for name in BACKENDS] + [
    pytest.param("cuda", name, id=f"cuda-{name}", marks=pytest.mark.gpu) for name in CUDA_BACKENDS
]
FUSED_DEVICE_BACKENDS = [p for p in DEVICE_BACKENDS if p.values[1] != "reference"]
COUNTS = [40, 9, 3]


def _region(x, t, backend, **kw):
    return F.unified_focal_loss(x, t, backend=backend, **kw)


def _rows(x, t, backend, **kw):
    return F.lmf_loss(x, t, COUNTS, backend=backend, **kw)


def _tversky(x, t, backend, **kw):
    return F.tversky_loss(x, t, backend=backend, **kw)


LOSSES = {"unified": (_region, True), "tversky": (_tversky, True), "lmf": (_rows, False), "lmf_dense": (_rows, True)}


def _inputs(dense, dtype=torch.float32, device="cpu"):
    if dense:
        x, t = torch.randn(2, 3, 4, 5, dtype=dtype), torch.randint(0, 3, (2, 4, 5))
    else:
        x, t = torch.randn(6, 3, dtype=dtype), torch.randint(0, 3, (6,))
    return x.to(device), t.to(device)


NONFINITE_CASES = [("unified", True), ("unified", False), ("tversky", True), ("tversky", False), ("lmf", None)]
NONFINITE_CASES += [("lmf_dense", None)]


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize(("loss", "clip"), NONFINITE_CASES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_logits_give_nan_loss(device, backend, loss, clip, bad):
    """The documented policy, observed from outside: NaN / +inf / -inf logits make the loss of their
    row / image NaN (+inf and NaN also the gradient), and no other row / image."""
    fn, dense = LOSSES[loss]
    kw = {} if clip is None else {"clip": clip}
    x, t = _inputs(dense, device=device)
    x[1, 1] = bad
    x.requires_grad_(True)
    value = fn(x, t, backend, **kw)
    assert value.isnan(), f"{backend} {loss}: logit {bad} gave a finite loss {float(value)}"
    value.backward()
    if bad != float("-inf"):
        assert x.grad.isnan().any(), f"{backend} {loss}: logit {bad} gave a finite gradient"
    per_item = fn(x.detach(), t, backend, reduction="none", **kw)
    assert per_item[1].isnan().all()
    assert per_item[0].isfinite().all(), "a non-finite logit must not poison the other rows / images"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernels' in-kernel probe needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("loss", "clip"), NONFINITE_CASES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_logits_give_nan_loss_on_gpu(loss, clip, bad, dtype):
    """The same policy from compiled kernels (the compiler must not fold the probe's 0 * z away)."""
    fn, dense = LOSSES[loss]
    kw = {} if clip is None else {"clip": clip}
    x, t = (a.cuda() for a in _inputs(dense, dtype))
    x[1, 1] = bad
    for backend in lk.available_backends("cuda", dtype):
        assert fn(x, t, backend, **kw).isnan(), f"{backend} {loss} {dtype}: logit {bad} gave a finite loss"
        per_item = fn(x, t, backend, reduction="none", **kw)
        assert per_item[1].isnan().all() and per_item[0].isfinite().all(), f"{backend} {loss} {dtype}"


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_logit_with_batch_sums_poisons_every_image_like_the_reference(device, backend, bad):
    """With ``batch=True`` the Tversky sums are shared by the batch, so a NaN / +inf logit in one image
    makes every image's loss NaN, as in the reference (a clamp at the smallest normal must not turn the
    NaN index into a finite one)."""
    x, t = _inputs(True, device=device)
    x[1, 1] = bad
    per_item = _tversky(x, t, backend, batch=True, reduction="none")
    truth = _tversky(x.cpu(), t.cpu(), "reference", batch=True, reduction="none")
    assert truth.isnan().all()
    assert per_item.isnan().all(), f"{backend}: {per_item.tolist()}"


IGNORING_LOSSES = {
    "lmf": lambda x, t, backend, **kw: F.lmf_loss(x, t, COUNTS, backend=backend, **kw),
    "ldam": lambda x, t, backend, **kw: F.ldam_loss(x, t, COUNTS, backend=backend, **kw),
    "focal": lambda x, t, backend, **kw: F.focal_loss(x, t, gamma=2.0, backend=backend, **kw),
    "unified": lambda x, t, backend, **kw: F.unified_focal_loss(x, t, backend=backend, **kw),
    "dice": lambda x, t, backend, **kw: F.dice_loss(x, t, backend=backend, **kw),
}
ROWS = ("lmf", "ldam", "focal")  # these also take (N, C) rows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("loss", "dense"), [(name, dense) for name in IGNORING_LOSSES for dense in (True, False)[: 1 + (name in ROWS)]]
)
def test_nonfinite_logit_of_an_ignored_row_or_voxel_gives_nan_loss(backend, loss, dense):
    """The policy looks at every logit, labelled or not, and at LDAM or focal alone as well."""
    fn = IGNORING_LOSSES[loss]
    x, t = _inputs(dense)
    t[1] = 7  # row / image 1: every label ignored, one of its logits -inf
    x[1, 1] = float("-inf")
    for reduction in ("mean", "sum"):
        value = fn(x, t, backend, ignore_index=7, reduction=reduction)
        assert value.isnan(), f"{backend} {loss} {reduction}: {float(value)}"
    per_item = fn(x, t, backend, ignore_index=7, reduction="none")
    assert per_item[1].isnan().all() and per_item[0].isfinite().all()


AUTOCAST_CASES = [pytest.param("cpu", name, torch.bfloat16, id=f"cpu-{name}-bf16") for name in BACKENDS] + [
    pytest.param("cuda", name, dtype, id=f"cuda-{name}-{dtype_id}", marks=pytest.mark.gpu)
    for name in CUDA_BACKENDS
    for dtype, dtype_id in ((torch.float16, "fp16"), (torch.bfloat16, "bf16"))
]


@pytest.mark.parametrize(("device", "backend", "dtype"), AUTOCAST_CASES)
@pytest.mark.parametrize("loss", LOSSES)
def test_autocast(device, backend, dtype, loss):
    """Logits made by a layer under autocast (CPU: bf16; CUDA: fp16 and bf16) are in the autocast dtype;
    the loss is fp32, the gradient in the logits' dtype."""
    fn, dense = LOSSES[loss]
    x, t = _inputs(dense, device=device)
    layer = (torch.nn.Linear(3, 3) if not dense else torch.nn.Conv2d(3, 3, 1)).to(device)
    with torch.autocast(device, dtype=dtype):
        logits = layer(x)
        logits.retain_grad()
        value = fn(logits, t, backend)
    assert logits.dtype == dtype
    assert value.dtype == torch.float32
    value.backward()
    assert logits.grad.dtype == dtype
    assert layer.weight.grad is not None and layer.weight.grad.isfinite().all()
    expected = fn(logits.detach().float(), t, "reference")
    torch.testing.assert_close(value.detach(), expected, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize(("device", "backend"), FUSED_DEVICE_BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_bitwise_deterministic_across_runs_and_threads(device, backend, loss):
    """Fixed-order reductions: identical bits across runs, CPU thread counts and (CUDA) with
    torch.use_deterministic_algorithms both off and on."""
    fn, dense = LOSSES[loss]
    x = torch.randn(2, 3, 33, 47) if dense else torch.randn(517, 3)
    t = torch.randint(0, 3, x.shape[:1] + x.shape[2:])
    x, t = x.to(device), t.to(device)
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    results = []
    try:
        for mode in (False, True) if device == "cuda" else (strict,):
            torch.use_deterministic_algorithms(mode)
            for n in (1, 2, 1, 2) if device == "cpu" else (1, 1):
                torch.set_num_threads(n)
                z = x.clone().requires_grad_(True)
                value = fn(z, t, backend, **({"batch": True} if loss == "unified" else {}))
                value.backward()
                results.append((value.detach(), z.grad))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(strict)
    for value, grad in results[1:]:
        assert torch.equal(value, results[0][0])
        assert torch.equal(grad, results[0][1])


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
def test_runs_under_use_deterministic_algorithms(device, backend):
    """No backend uses an op that torch flags as nondeterministic (all reductions are fixed-order)."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for fn, dense in LOSSES.values():
            x, t = _inputs(dense, device=device)
            x.requires_grad_(True)
            fn(x, t, backend).backward()
            assert x.grad.isfinite().all()
    finally:
        torch.use_deterministic_algorithms(before)


def test_fp32_reference_clip_matches_float64_on_saturated_voxels():
    """1 - clip(p) and log clip(p) from log p: the fp32 reference keeps eps, not 1.19e-7."""
    x = 30.0 * torch.randn(2, 4, 6, 7, dtype=torch.float64)
    t = x.argmax(1)
    t[:, 0] = 0
    kw = {
        "delta": 0.6, "focal_coef": 0.5, "tversky_coef": 0.5, "smooth_nr": 1e-7, "smooth_dr": 1e-7, "eps": 1e-7,
        "clip": True, "batch": False, "ignore_index": None, "reduction": "none",
    }  # fmt: skip
    vectors = [torch.tensor(v, dtype=torch.float64) for v in ([0.4, 0.6, 0.6, 0.6], [0.5, 0, 0, 0], [1, 0.5, 0.5, 0.5])]
    wide = reference.region_loss(x, t, *vectors, **kw)
    narrow = reference.region_loss(x.float(), t, *(v.float() for v in vectors), **kw)
    torch.testing.assert_close(narrow.double(), wide, rtol=1e-5, atol=0)


# Logits of confident voxels, 1 - p_t = 2 exp(-z_t): 8.5e-18 (p_t rounds to 1 in float32, where the
# kernels' 1 - p from log p is then 0), 1.2e-38 (just above the smallest normal float32), 1.6e-39 and
# 7.4e-44 (subnormal in float32), 2.8e-87 (below float32's range), 2.3e-7 (an ordinary voxel).
SATURATED = [[40.0, 0, 0], [88.0, 0, 0], [90.0, 0, 0], [0, 100.0, 0], [0, 0, 200.0], [16.0, 0, 0]]


def _saturated_inputs():
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(7))
    for i, row in enumerate(SATURATED):
        x[i % 2, :, i // 2, 0] = torch.tensor(row)
    return x, x.argmax(1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma", [0.0, 0.05, 0.5, 2.0])
def test_focal_terms_at_saturated_voxels_match_float64(backend, gamma):
    """The focal modulation u^gamma and factor G = u^gamma (1 - gamma p log(p) / u), u = 1 - p, where
    u is 0 or subnormal, without the clip: gamma = 0 (0^0 = 1, not exp(0 log 0) = NaN), gamma < 1
    (u^(gamma - 1) infinite), gamma > 1. Every backend stays finite and equals the float64 reference
    (design tolerance), for both loss families, with a random grad_output per item."""
    x, t = _saturated_inputs()
    fw, exponent = torch.tensor([0.5, 1.0, 1.0]), torch.tensor([1.0, 0.5, 0.75])
    fg = torch.tensor([gamma, gamma, 0.5 * gamma])
    kw = {
        "delta": 0.6, "focal_coef": 0.5, "tversky_coef": 0.5, "smooth_nr": 1e-6, "smooth_dr": 1e-6, "eps": 1e-7,
        "clip": False, "batch": False, "ignore_index": None, "reduction": "none",
    }  # fmt: skip
    rows, labels = x.movedim(1, -1).reshape(-1, 3), t.reshape(-1)
    row_vectors = (torch.zeros(3), torch.ones(3), torch.tensor([1.0, 0.5, 2.0]))
    row_kw = {"alpha": 0.0, "beta": 1.0, "gamma": gamma, "s": 30.0, "ignore_index": -100, "reduction": "none"}
    impl = lk._backends.resolve_backend(backend, x)
    for family, inputs, vectors, options in (
        ("region_loss", (x, t), (fw, fg, exponent), kw),
        ("row_loss", (rows, labels), row_vectors, row_kw),
    ):
        z, target = inputs
        grad_output = torch.rand(z.shape[0], dtype=torch.float64) + 0.5
        got = loss_and_grad(getattr(impl, family), z, target, *vectors, grad_output=grad_output, **options)
        wide_vectors = (v.double() for v in vectors)
        wide = loss_and_grad(
            getattr(reference, family), z.double(), target, *wide_vectors, grad_output=grad_output, **options
        )
        assert_close(got[0], wide[0], f"{backend} {family} loss", 1e-5)
        assert_close(got[1], wide[1], f"{backend} {family} gradient", 1e-5)


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "channels_last", "expanded", "sliced"])
def test_memory_layouts_equal_contiguous(device, backend, layout):
    base = torch.randn(2, 3, 6, 5, device=device)
    labels = torch.randint(0, 3, (2, 6, 5), device=device)
    if layout == "transposed":
        x = base.transpose(2, 3).contiguous().transpose(2, 3)
    elif layout == "channels_last":
        x = base.contiguous(memory_format=torch.channels_last)
    elif layout == "expanded":
        x = base[:1].expand(2, 3, 6, 5)  # stride 0 over the batch
        labels = labels[:1].expand(2, 6, 5)
    else:
        x = torch.randn(2, 6, 6, 10, device=device)[:, ::2, :, ::2]
    for fn in (_region, _rows):
        z = x.detach().requires_grad_(True)
        value = fn(z, labels, backend)
        value.backward()
        c = x.contiguous().requires_grad_(True)
        expected = fn(c, labels.contiguous(), "reference")
        expected.backward()
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(z.grad, c.grad, rtol=1e-5, atol=1e-6)
        assert z.grad.shape == x.shape
    soft = torch.softmax(torch.randn(x.shape, device=device), 1)
    soft_view = soft.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else soft
    z = x.detach().requires_grad_(True)
    value = F.dice_loss(z, soft_view.transpose(2, 3).contiguous().transpose(2, 3), backend=backend, reduction="none")
    value.sum().backward()
    c = x.contiguous().requires_grad_(True)
    expected = F.dice_loss(c, soft.contiguous(), backend="reference", reduction="none")
    expected.sum().backward()
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z.grad, c.grad, rtol=1e-5, atol=1e-6)
    with_channel = labels.unsqueeze(1)  # MONAI's (B, 1, *S) label form
    torch.testing.assert_close(_region(x, with_channel, backend), _region(x.contiguous(), labels, "reference"))


def test_class_view_of_a_huge_expanded_tensor_makes_no_copy():
    """A stride-0 view with > 2**31 logical elements reaches the kernels as strides, not as a copy."""
    pytest.importorskip("triton")
    from lmfloss_kernels.triton import _common

    big = torch.zeros(1).expand(3, 4, 2**30)
    view = _common.class_view(big)
    assert view.shape == (3, 4, 2**30) and view.numel() > 2**31
    assert view.data_ptr() == big.data_ptr()
    last = sum((n - 1) * s for n, s in zip(view.shape, view.stride(), strict=True))
    assert last == 0  # every offset of the expanded view points at the one stored element


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


REGION_VECTORS = ([0.4, 0.6, 0.6], [0.5, 0.0, 0.0], [1.0, 0.5, 0.5])  # unified focal, C = 3
REGION_OPTIONS = {
    "delta": 0.6, "focal_coef": 0.5, "tversky_coef": 0.5, "smooth_nr": 1e-7, "smooth_dr": 1e-7, "eps": 1e-7,
    "clip": True, "batch": False, "reduction": "none",
}  # fmt: skip
ROW_VECTORS = ([0.5, 0.3, 0.2, 0.1, 0.0], [1.0, 2.0, 0.5, 1.0, 1.5], [0.5, 1.0, 2.0, 1.0, 1.0])
ROW_OPTIONS = {"alpha": 1.0, "beta": 1.0, "gamma": 1.5, "s": 5.0, "reduction": "none"}
# (family, logits shape, logits strides, labels strides): every case has element offsets past 2**31.
FAR_VIEWS = [
    ("region", (2, 3, 8), (2**31, 8, 1), (2**31, 1)),  # image 1 starts at 2**31
    ("region", (2, 3, 2, 4), (8, 2**30, 4, 1), (2**31, 4, 1)),  # class 2 starts at 2**31
    ("row", (2, 5), (2**31 + 16, 1), (2**31,)),  # (N, C) rows with a row stride > 2**31
    ("row", (4, 2), (1, 2**31), (1,)),  # (N, C) rows of a transposed (C, N) map: class 1 at 2**31
    ("row", (2, 5, 8), (2**31, 8, 1), (2**31, 1)),  # dense rows: image 1 at 2**31
]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize(("family", "shape", "strides", "label_strides"), FAR_VIEWS)
def test_cpu_kernels_index_past_int32(backend, family, shape, strides, label_strides):
    """The kernels themselves read logits, labels and soft targets at element offsets > 2**31.

    Views into 8 GiB (logits) and 2 GiB (labels) of address space of which only the touched pages
    become memory; the loss and gradient equal the reference's on compact copies. No copy of the
    views may reach the kernels (it would hide the index arithmetic): none of the logits' shape is
    made, and the process's peak memory stays far below the 8 GiB a full read of the storage needs.
    """
    before = max(_rss_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10)
    storage = torch.empty(2**31 + 80)
    label_storage = torch.empty(2**31 + 16, dtype=torch.uint8)
    x = storage.as_strided(shape, strides)
    x.copy_(3.0 * torch.randn(shape))
    num_classes = shape[1]
    labels = label_storage.as_strided(shape[:1] + shape[2:], label_strides)
    labels.copy_(torch.randint(0, num_classes, labels.shape))
    labels[(0,) * labels.dim()] = 255  # one ignored voxel / row (the far part must get a gradient)
    targets = [labels]
    if family == "region":
        # A soft map in the same storage, 24 elements after the logits (their footprints interleave).
        soft = storage.as_strided(shape, strides, storage_offset=24)
        soft.copy_(torch.softmax(torch.randn(shape), 1))
        targets.append(soft)
    vectors = REGION_VECTORS if family == "region" else ROW_VECTORS
    vectors = [torch.tensor(v[:num_classes]) for v in vectors]
    fused = getattr(lk._backends.resolve_backend(backend, x), f"{family}_loss")
    expected_fn = getattr(reference, f"{family}_loss")
    for target in targets:
        ignore_index = None if target.is_floating_point() else 255
        options = {**(REGION_OPTIONS if family == "region" else ROW_OPTIONS), "ignore_index": ignore_index}
        z = x.detach().requires_grad_(True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            value = fused(z, target, *vectors, **options)
            (grad,) = torch.autograd.grad(value.sum(), z)
        copies = [
            e.name
            for e in prof.events()
            if e.name in ("aten::clone", "aten::contiguous", "aten::copy_", "aten::_to_copy")
            and e.input_shapes
            and e.input_shapes[0] == list(shape)
        ]
        assert not copies, f"{backend}: the far view was copied ({copies})"
        c = x.detach().contiguous().requires_grad_(True)
        expected = expected_fn(c, target.contiguous(), *vectors, **options)
        (expected_grad,) = torch.autograd.grad(expected.sum(), c)
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)
        assert grad.shape == x.shape and grad[-1].abs().sum() > 0  # the far part got its gradient
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    assert peak < before + 2048, f"peak RSS {peak:.0f} MiB: the 8 GiB storage was read in full"


def _repeated_dice(x, labels, backend):
    return F.dice_loss(x, labels, smooth=0.0, backend=backend)


def _repeated_lmf(x, labels, backend):
    return F.lmf_loss(x, labels, [40, 3], backend=backend)


# (loss, pattern shape, repeat counts): the repeated logits have 2 * 1024 * (2**20 + 1) > 2**31 elements.
HUGE_CASES = {
    "dice_dense": (_repeated_dice, (1, 2, 1024), (1, 1, 2**20 + 1)),
    "lmf_dense": (_repeated_lmf, (1, 2, 1024), (1, 1, 2**20 + 1)),
    "lmf_rows": (_repeated_lmf, (1024, 2), (2**20 + 1, 1)),
}


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU with ~16 GiB free for > 2**31 logits elements"
)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("case", HUGE_CASES)
def test_gpu_more_than_int32_elements(backend, case):
    """A 1024-voxel (or 1024-row) pattern repeated 2**20 + 1 times: every sum scales by the repeat
    count, so the mean loss equals the pattern's own and each copy's gradient is the pattern's
    divided by the count. Region (Dice) and row (dense LMF, (N, C) LMF rows) families."""
    if backend not in CUDA_BACKENDS:
        pytest.skip(f"backend {backend!r} is not available on this CUDA machine ({lk.available_backends('cuda')})")
    fn, shape, repeats = HUGE_CASES[case]
    count = repeats[0] * repeats[-1]
    pattern = torch.randn(shape, device="cuda").to(torch.bfloat16)
    labels = torch.randint(0, 2, shape[:1] + shape[2:], device="cuda", dtype=torch.uint8)
    x = pattern.repeat(repeats).requires_grad_(True)
    assert x.numel() > 2**31
    value = fn(x, labels.repeat(repeats[:1] + repeats[2:]), backend)
    value.backward()
    small = pattern.double().requires_grad_(True)
    expected = fn(small, labels, "reference")
    expected.backward()
    assert abs(float(value) - float(expected)) <= 1e-4 * max(1.0, abs(float(expected)))
    block = 1024 if len(shape) == 2 else None  # (N, C) rows: copies follow each other on dim 0
    for copy in (x.grad[:block], x.grad[-block:]) if block else (x.grad[..., :1024], x.grad[..., -1024:]):
        torch.testing.assert_close(copy.double() * count, small.grad, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("loss", ["unified", "lmf", "lmf_dense"])
def test_fused_backends_refuse_double_backward(backend, loss):
    """Their gradient is a kernel's output with no graph: create_graph=True raises one clear error."""
    fn, dense = LOSSES[loss]
    x, t = _inputs(dense)
    x.requires_grad_(True)
    for reduction in ("mean", "sum", "none"):
        value = fn(x, t, backend, reduction=reduction)
        with pytest.raises(RuntimeError, match=f"double backward is not supported by backend '{backend}'.*reference"):
            torch.autograd.grad(value.sum(), x, create_graph=True)
    # The first-order gradient is unaffected.
    (grad,) = torch.autograd.grad(fn(x, t, backend), x)
    (expected,) = torch.autograd.grad(fn(x, t, "reference"), x)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", ["unified", "lmf", "lmf_dense"])
def test_reference_gives_second_derivatives(loss):
    fn, dense = LOSSES[loss]
    x, t = _inputs(dense, torch.float64)
    assert torch.autograd.gradgradcheck(lambda z: fn(z, t, "reference"), (x.requires_grad_(True),))
