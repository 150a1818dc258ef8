r"""Helpers shared by the Triton kernels: launch policy, tensor views and the per-voxel softmax.

Layout. Every kernel sees the logits as a ``(B, C, V)`` *view* read with its three strides: a
dense map ``(B, C, *S)`` is ``x.reshape(B, C, -1)`` (a view for contiguous and channels-last
tensors, a copy only when the spatial axes cannot be merged), rows ``(N, C)`` are
``x.t().unsqueeze(0)`` (``B = 1``, ``V = N``, class stride 1). All offsets are int64.

Tiles. :func:`voxel_tiling` (region family): ``BLOCK_C x ROWS x VEC`` tiles with every class of
a voxel in one thread, several tiles per program (the row family sizes its own tiles:
:func:`.row.launch_config`). :func:`shifted_exponentials`, :func:`log_softmax_sum`,
:func:`log_top_probability` and :func:`fast_power` build one voxel's softmax with one hardware
logarithm (``._fastmath``). ``1 - p`` is never formed as a difference close to 1: for a class
``k`` it is the other classes' mass over the sum (a sum of small positive terms) and, when that
mass is small, ``log p_k = -log1p(mass)`` from its series, which keeps the focal factor
``(1 - p)^gamma`` and ``log p`` accurate for confident voxels (losses.md 6.1, 6.4). The sigmoid
mode's counterparts: :func:`sigmoid_parts` (``p``, ``1 - p`` and both logarithms of one logit)
and :func:`power_of_log` (a power from a logarithm already at hand).
"""

from __future__ import annotations

import math
import os
import struct

import torch
import triton
import triton.language as tl

from ._fastmath import INTERPRETED, fast_exp2, fast_log2, fast_rcp

SERVED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Voxel tiles with every class of a voxel in one thread (voxel_tiling): classes x voxels held by a
# thread at most (registers), warps per program, and the tiles a program loops over, so that the
# per-program set-up and the final cross-thread sums are spread over many voxels while the grid
# still has about _MIN_PROGRAMS programs to fill a GPU.
_THREAD_ELEMENTS = 32
_VOXEL_WARPS = 4
_MIN_PROGRAMS = 1024
_MAX_TILES_PER_PROGRAM = 16
_INTERPRETER_VOXEL_ROWS = 2048


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """``None`` when these kernels can serve logits of this device and dtype, else why not."""
    if dtype == torch.float64:
        return (
            "Triton computes in float32; float64 logits are served by the reference or the cpu backend "
            "(backend='reference' or 'cpu')"
        )
    if dtype not in SERVED_DTYPES:
        return f"Triton serves float16, bfloat16 and float32 logits, got {dtype}"
    if device.type == "cuda":
        if INTERPRETED:
            return "Triton runs in interpreter mode (TRITON_INTERPRET=1), which serves CPU tensors only"
        if not torch.cuda.is_available():
            return "no usable CUDA device"
        return None
    if device.type == "cpu":
        if INTERPRETED and os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return (
            "Triton serves CPU tensors only through its interpreter (set TRITON_INTERPRET=1 before "
            "importing triton); use backend='cpu' or 'reference'"
        )
    return f"Triton serves CUDA tensors, got a {device.type} tensor"


def voxel_tiling(num_images: int, num_classes: int, num_voxels: int, itemsize: int) -> dict[str, int]:
    """Tiles of ``BLOCK_C x ROWS x VEC`` (padded classes x voxels) for kernels that keep a voxel's classes in a thread.

    ``VEC`` consecutive voxels of every class sit in one thread's registers: one 128-bit access
    per class for ``itemsize``-byte logits (fewer voxels when ``BLOCK_C x VEC`` would exceed
    ``_THREAD_ELEMENTS``); the ``ROWS`` groups of ``VEC`` voxels go to the 32 lanes of each of
    ``num_warps`` warps. Reductions over classes never leave a thread. A program loops over
    ``tiles_per_program`` consecutive tiles of one image; ``programs_per_image`` programs cover
    an image (the last one may run past its end: those tiles are masked off).

    Registers (sm_90, ptxas, bf16 logits and uint8 labels, contiguous, both passes): 121-122 per
    thread for C = 4, up to 150 / 185 / 255 for C = 8 / 16 / 32, no spills; from C = 64 on a
    thread's 64+ classes spill (about 0.8 KB forward): correct, but such class counts would need
    the class axis split over threads.
    """
    block_c = triton.next_power_of_2(num_classes)
    vec = max(1, min(16 // itemsize, _THREAD_ELEMENTS // block_c))
    num_warps = _VOXEL_WARPS
    rows = _INTERPRETER_VOXEL_ROWS // vec if INTERPRETED else 32 * num_warps
    tiles = triton.cdiv(num_voxels, rows * vec)
    per_program = max(1, min(_MAX_TILES_PER_PROGRAM, num_images * tiles // _MIN_PROGRAMS))
    return {
        "BLOCK_C": block_c,
        "ROWS": rows,
        "VEC": vec,
        "num_warps": num_warps,
        "tiles_per_program": per_program,
        "programs_per_image": triton.cdiv(tiles, per_program),
    }


def empty(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel fills comes from here (tests poison it with NaN to prove full writes)."""
    return torch.empty(shape, dtype=dtype, device=device)


def empty_like(x: torch.Tensor) -> torch.Tensor:
    """A buffer shaped and strided like ``x`` (channels-last stays channels-last); see :func:`empty`."""
    return torch.empty_like(x)


def fp32(value: float) -> float:
    """``value`` rounded to float32, as compiled kernels receive it.

    The interpreter keeps a Python float as it is, so a value float32 cannot hold (gamma = 1e-300)
    passed the ``gamma == 0`` test as non-zero yet flushed to 0 in float32 arithmetic (NaN from
    ``0 * log2(0)``); rounding on the host gives interpreter and GPU the same float32 scalars.
    """
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def class_view(x: torch.Tensor) -> torch.Tensor:
    """``(N, C) -> (1, C, N)`` or ``(B, C, *S) -> (B, C, V)``; a view unless the axes cannot merge."""
    if x.dim() == 2:
        return x.t().unsqueeze(0)
    return x.reshape(x.shape[0], x.shape[1], -1)


def label_view(labels: torch.Tensor) -> torch.Tensor:
    """``(N,) -> (1, N)`` or ``(B, *S) -> (B, V)``, bool read as uint8 (same bytes, no copy)."""
    if labels.dtype == torch.bool:
        labels = labels.view(torch.uint8)
    if labels.dim() == 1:
        return labels.unsqueeze(0)
    return labels.reshape(labels.shape[0], -1)


def gradient_buffer(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh gradient ``g`` like ``logits`` and a ``(B, C, V)`` view the kernel writes into.

    When ``g``'s spatial axes cannot be merged into one stride (a rare permuted layout), the
    kernel writes a contiguous buffer instead and the caller copies it into ``g`` with
    :func:`finish_gradient`.
    """
    grad = empty_like(logits)
    if grad.dim() == 2:
        return grad, grad.t().unsqueeze(0)
    try:
        return grad, grad.view(grad.shape[0], grad.shape[1], -1)
    except RuntimeError:
        return grad, empty((grad.shape[0], grad.shape[1], grad[0, 0].numel()), dtype=grad.dtype, device=grad.device)


def finish_gradient(grad: torch.Tensor, written: torch.Tensor) -> torch.Tensor:
    """``grad`` holding what the kernel wrote into ``written`` (a copy only in the fallback case)."""
    if grad.dim() > 2 and written.data_ptr() != grad.data_ptr():
        grad.copy_(written.view(grad.shape))
    return grad


@triton.jit
def tile_position(V, BLOCK_V: tl.constexpr):
    """``(pid, b, v)`` of this program in the 1-D grid ``B * cdiv(V, BLOCK_V)``, all int64.

    One image-major grid axis has no 65535 limit on B; ``pid`` indexes the program's row of a
    ``[B, cdiv(V, BLOCK_V), ...]`` partial-sums buffer.
    """
    pid = tl.program_id(0).to(tl.int64)
    blocks = tl.cdiv(V, BLOCK_V)
    b = pid // blocks
    return pid, b, (pid - b * blocks) * BLOCK_V + tl.arange(0, BLOCK_V)


@triton.jit
def nonfinite_probe(z):
    """Per voxel of a ``[BLOCK_C, BLOCK_V]`` tile of raw float32 logits: ``sum_c 0 * z_c``.

    0 when every logit of the voxel is finite, NaN when one is NaN or +-inf (``0 * inf`` is
    NaN). Added to a loss it carries the non-finite logits policy (functional.py) without a
    second read of the logits. Masked-off entries must hold the load's ``other=0.0``: the probe
    is taken before padded classes are set to -inf.
    """
    return tl.sum(z * 0.0, axis=0)


_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
# Below this mass of the other classes, log p of the arg-max class is -log1p(mass) from its series.
_SERIES_BELOW = tl.constexpr(0.0625)


@triton.jit
def shifted_exponentials(z):
    """Per voxel of a ``[BLOCK_C, ROWS, VEC]`` fp32 tile (padded classes at -inf): ``d = z - max_c z``, ``e = exp(d)``.

    ``e`` of the arg-max class is exactly 1 (``exp2(0)``), which the callers use to find it.
    """
    d = z - tl.max(z, axis=0, keep_dims=True)
    return d, fast_exp2(d * _LOG2E)


@triton.jit
def log_softmax_sum(s):
    """``log s`` of a softmax sum ``s >= 1`` (hardware ``lg2``: absolute error about 1.1e-7)."""
    return fast_log2(s) * _LN2


@triton.jit
def log1p_series(x):
    """``log(1 + x)`` for ``0 <= x < 1/16`` to float32 accuracy: five terms (truncation below ``x^6 / 6``)."""
    return x * (1.0 + x * (-0.5 + x * (1.0 / 3.0 + x * (-0.25 + x * 0.2))))


@triton.jit
def log_top_probability(mass, d, log_sum):
    """``log p`` of a class whose others' mass is ``mass`` and ``d = z - max z``: ``-log1p(mass)``
    from its series when ``mass < 1/16`` (only the arg-max class has ``mass < 1``), else ``d - log s``."""
    return tl.where(mass < _SERIES_BELOW, -log1p_series(tl.minimum(mass, _SERIES_BELOW)), d - log_sum)


@triton.jit
def fast_power(x, g):
    """``x ** g`` for ``x >= 0`` with ``0 ** 0 = 1``, by the hardware ``lg2`` / ``ex2``.

    Relative error about ``2.4e-7 + 1.7e-7 |g| max(1, |log2 x|)`` (``ex2``'s, plus ``|g|`` times ``lg2``'s).
    """
    return tl.where(g == 0.0, 1.0, fast_exp2(g * fast_log2(x)))


@triton.jit
def power(x, g):
    """``x ** g`` for ``x >= 0`` with ``0 ** 0 = 1`` (``exp2(g * log2 x)`` is NaN there)."""
    return tl.where(g == 0.0, 1.0, tl.exp2(g * tl.log2(x)))


@triton.jit
def focal_gradient_factor(p, log_p, one_minus_p, modulation, gamma, FAST: tl.constexpr = False):
    """``G(p) = (1-p)^gamma - gamma p (1-p)^(gamma-1) log p``, with ``modulation = (1-p)^gamma``.

    Written as ``G = (1-p)^gamma (1 - gamma p r)``, ``r = log(p) / (1 - p)`` (losses.md 0.2): finite
    for ``gamma < 1`` and at ``p = 1``. Below ``1 - p = 1e-3`` the ratio comes from its series
    ``r = -1 - u/2 - u^2/3`` (truncation below 3e-10), which also covers ``1 - p = 0``. ``FAST``
    divides by the hardware reciprocal (1 ulp) instead of a full-range division.
    """
    series = one_minus_p < 1e-3
    divisor = tl.where(series, 1.0, one_minus_p)
    if FAST:
        quotient = log_p * fast_rcp(divisor)
    else:
        quotient = log_p / divisor
    ratio = tl.where(series, -1.0 - one_minus_p * (0.5 + one_minus_p * (1.0 / 3.0)), quotient)
    return modulation * (1.0 - gamma * p * ratio)


@triton.jit
def sigmoid_parts(z, keep):
    """Per element of a fp32 logit tile: ``(p, 1 - p, log p, log(1 - p))`` of ``p = sigmoid(z)``.

    One exponential, one reciprocal and one logarithm: ``e = exp(-|z|) <= 1``, ``sp = log1p(e)``
    (its series below 1/16, where ``lg2(1 + e)`` would lose the digits, else the hardware
    ``lg2``), ``log p = min(z, 0) - sp``, ``log(1 - p) = -max(z, 0) - sp``; ``p = 1 / (1 + e)``
    for ``z >= 0`` else ``e / (1 + e)``, and ``1 - p`` the other one, so that neither is a
    difference close to 1. Where ``keep`` is false (padding, ignored voxels) ``p = 1 - p = 0``;
    the logarithms are those of ``z`` there (callers mask what they sum).
    """
    e = fast_exp2(-tl.abs(z) * _LOG2E)
    rcp = tl.where(keep, fast_rcp(1.0 + e), 0.0)
    small = e * rcp
    positive = z >= 0.0
    sp = tl.where(e < _SERIES_BELOW, log1p_series(tl.minimum(e, _SERIES_BELOW)), fast_log2(1.0 + e) * _LN2)
    log_p = tl.minimum(z, 0.0) - sp
    log_one_minus_p = -tl.maximum(z, 0.0) - sp
    return tl.where(positive, rcp, small), tl.where(positive, small, rcp), log_p, log_one_minus_p


@triton.jit
def power_of_log(log_x, g):
    """``x ** g`` from ``log x`` (natural), with ``0 ** 0 = 1``: one hardware ``ex2``, no ``lg2``."""
    return tl.where(g == 0.0, 1.0, fast_exp2(g * log_x * _LOG2E))
