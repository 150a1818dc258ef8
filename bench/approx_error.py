"""Error that the hardware approximate instructions add to the Triton region kernels (no GPU needed).

The region kernels call ``fast_exp2``, ``fast_log2`` and ``fast_rcp`` (``lmfloss_kernels/triton/
_fastmath.py``: ``ex2`` / ``lg2`` / ``rcp.approx.ftz.f32`` on a GPU). This script runs the very
same kernels under the Triton interpreter three times: with the precise float32 functions, and
with each approximation replaced by the precise result pushed to the edge of its documented
error bound, once up and once down (a systematic bias, the worst case for sums over a volume),
with flush-to-zero of subnormal inputs and results:

* ``exp2``: relative ``2^-22``;  ``rcp``: relative ``2^-23``;
* ``log2``: absolute ``2^-22.6`` for ``x`` in ``[0.5, 2]``, relative ``2^-22`` elsewhere.

The cases cover the softmax and the sigmoid (multi-label) mode. It prints, per case, the
norm-wise relative error of the loss and of the gradient against the
float64 reference (``lmfloss_kernels.reference.region_loss`` on float64 logits), next to that of
the float32 reference. Run from the repository root::

    TRITON_INTERPRET=1 python -m bench.approx_error
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from lmfloss_kernels import reference  # noqa: E402
from lmfloss_kernels.triton import BACKEND, _common, region  # noqa: E402

_TINY = tl.constexpr(1.1754943508222875e-38)


# The bias of the emulated instructions: set by _bias() before a run (globals resolve at call time).
_EXP_SCALE = tl.constexpr(1.0)
_RCP_SCALE = tl.constexpr(1.0)
_LOG_SCALE = tl.constexpr(1.0)
_LOG_SHIFT = tl.constexpr(0.0)


def _bias(sign: float) -> None:
    global _EXP_SCALE, _RCP_SCALE, _LOG_SCALE, _LOG_SHIFT
    _EXP_SCALE = tl.constexpr(1.0 + sign * 2.0**-22)
    _RCP_SCALE = tl.constexpr(1.0 + sign * 2.0**-23)
    _LOG_SCALE = tl.constexpr(1.0 + sign * 2.0**-22)
    _LOG_SHIFT = tl.constexpr(sign * 2.0**-22.6)


@triton.jit
def _edge_exp2(x):
    r = tl.exp2(x) * _EXP_SCALE
    return tl.where(r < _TINY, 0.0, r)


@triton.jit
def _edge_log2(x):
    x = tl.where(x < _TINY, 0.0, x)
    r = tl.log2(x)
    return tl.where((x >= 0.5) & (x <= 2.0), r + _LOG_SHIFT, r * _LOG_SCALE)


@triton.jit
def _edge_rcp(x):
    return (1.0 / x) * _RCP_SCALE


def _install(functions) -> None:
    """Point the kernels' modules at ``(exp2, log2, rcp)`` (the interpreter resolves globals at call time)."""
    exp2, log2, rcp = functions
    for module in (_common, region):
        for name, fn in (("fast_exp2", exp2), ("fast_log2", log2), ("fast_rcp", rcp)):
            if hasattr(module, name):
                setattr(module, name, fn)


def _error(actual, truth) -> float:
    actual, truth = actual.double(), truth.double()
    return float((actual - truth).norm() / truth.norm().clamp_min(1e-300))


def _cases():
    torch.manual_seed(0)
    shape = (2, 4, 12, 13, 14)
    labels = torch.randint(0, 4, shape[:1] + shape[2:])
    onehot = torch.nn.functional.one_hot(labels, 4).movedim(-1, 1).float()
    random = torch.randn(shape) * 3
    confident = torch.randn(shape) + 12.0 * onehot
    wrong = torch.randn(shape) + 12.0 * onehot.roll(1, dims=1)
    soft = torch.softmax(torch.randn(shape) * 2, dim=1)
    ufl = dict(delta=0.6, focal_coef=0.5, tversky_coef=0.5, smooth_nr=1e-7, smooth_dr=1e-7, eps=1e-7,
               batch=False, ignore_index=None, reduction="mean")  # fmt: skip
    dice = dict(ufl, focal_coef=0.0, tversky_coef=1.0, smooth_nr=1e-5, smooth_dr=1e-5, eps=1e-7)
    vectors = (torch.tensor([0.4, 0.6, 0.6, 0.6]), torch.tensor([0.5, 0.0, 0.0, 0.0]), torch.full((4,), 0.5))
    for clip in (True, False):
        yield f"UFL labels, random, clip={clip}", random, labels, vectors, dict(ufl, clip=clip)
        yield f"UFL labels, confident, clip={clip}", confident, labels, vectors, dict(ufl, clip=clip)
        yield f"UFL labels, confidently wrong, clip={clip}", wrong, labels, vectors, dict(ufl, clip=clip)
        yield f"UFL one-hot, confident, clip={clip}", confident, onehot, vectors, dict(ufl, clip=clip)
        yield f"UFL soft, random, clip={clip}", random, soft, vectors, dict(ufl, clip=clip)
    yield "Dice labels, random", random, labels, vectors, dict(dice, clip=False)
    yield "Dice labels, confident", confident, labels, vectors, dict(dice, clip=False)
    # Sigmoid mode: (2, C) focal constants (positive side, negative side), overlapping uint8 channels.
    multi_hot = (torch.rand(shape) < 0.3).to(torch.uint8)
    sure = torch.randn(shape) + 12.0 * (2.0 * multi_hot - 1.0)
    sides = (torch.tensor([[0.6] * 4, [0.4] * 4]), torch.tensor([[0.0] * 4, [0.5] * 4]), torch.full((4,), 0.5))
    bce = (torch.ones(2, 4), torch.zeros(2, 4), torch.ones(4))
    for clip in (True, False):
        options = dict(ufl, clip=clip, sigmoid=True)
        yield f"sigmoid UFL multi-hot, random, clip={clip}", random, multi_hot, sides, options
        yield f"sigmoid UFL multi-hot, confident, clip={clip}", sure, multi_hot, sides, options
        yield f"sigmoid UFL labels, random, clip={clip}", random, labels, sides, options
    yield "sigmoid Dice+BCE multi-hot, random", random, multi_hot, bce, dict(ufl, clip=False, sigmoid=True)


def _loss_and_grad(function, logits, target, vectors, options):
    x = logits.clone().requires_grad_(True)
    loss = function(x, target, *vectors, **options)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


def main() -> None:
    precise = (_common.fast_exp2, _common.fast_log2, region.fast_rcp)
    edge = (_edge_exp2, _edge_log2, _edge_rcp)
    variants = {"precise": (precise, 0.0), "bias +": (edge, 1.0), "bias -": (edge, -1.0)}
    print(f"{'case':44s} {'fp32 reference':>19s} " + " ".join(f"{name:>19s}" for name in variants))
    print(f"{'':44s} " + " ".join(f"{'loss':>9s} {'grad':>9s}" for _ in range(len(variants) + 1)))
    worst = {name: [0.0, 0.0] for name in variants}
    for name, logits, target, vectors, options in _cases():
        truth = _loss_and_grad(reference.region_loss, logits.double(), target, [v.double() for v in vectors], options)
        same = _loss_and_grad(reference.region_loss, logits, target, vectors, options)
        row = [_error(same[0], truth[0]), _error(same[1], truth[1])]
        for variant, (functions, sign) in variants.items():
            _bias(sign)
            _install(functions)
            fused = _loss_and_grad(BACKEND.region_loss, logits, target, vectors, options)
            errors = (_error(fused[0], truth[0]), _error(fused[1], truth[1]))
            worst[variant] = [max(w, e) for w, e in zip(worst[variant], errors, strict=True)]
            row += errors
        _install(precise)
        print(f"{name:44s} " + " ".join(f"{e:9.2e}" for e in row))
    print("worst: " + ", ".join(f"{k}: loss {v[0]:.2e}, gradient {v[1]:.2e}" for k, v in worst.items()))


if __name__ == "__main__":
    main()
