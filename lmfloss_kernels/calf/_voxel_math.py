r"""Per-voxel math of the CALF Triton kernels: each transformation's term and its derivative, in fp32.

Every transformation with a logarithm is written through the softplus ``sp(a) = ln(1 + e^a)``:

* ln:  ``ℓ = y sp(-z) + (1 - y) sp(z)`` (BCE), ``ℓ' = σ(z) - y``; log10 is ln times ``1/ln 10``;
* fisher: ``artanh σ(w) = ½ ln((1 + σ(w)) / (1 - σ(w))) = ½ ln(1 + 2 e^w) = ½ sp(w + ln 2)``, so
  ``ℓ = -½ [y sp(z̃ + ln 2) + (1 - y) sp(-z̃ + ln 2)]`` and
  ``ℓ' = -½ [y σ(z̃ + ln 2) - (1 - y) σ(-z̃ + ln 2)] · m`` (``z̃`` the clipped logit, ``m`` the clip mask).

The kernels sum the *term* ``t`` with ``ℓ = s_T t`` (``s_T``: ``_definitions.TRANSFORM_SCALE``,
applied once per image, in the finalize kernel and the backward coefficients, not per voxel). With a hard label
(``y ∈ {0, 1}``) only the true class's softplus is needed: one exponential per voxel and no
logarithm instruction at all: ``sp(a) = max(a, 0) + log1p(e)`` with ``e = e^{-|a|} ∈ (0, 1]`` and
:func:`log1p_unit` a polynomial, ``σ(a) = 1/(1 + e)`` or ``e/(1 + e)`` by the sign of ``a``. Soft
targets evaluate both softplus terms.

Error (fp32 results against float64, measured by ``tests/test_calf_approx_error.py``, which runs
:func:`voxel_term` under the interpreter with ``ex2`` and ``rsqrt`` replaced by their worst case):

* :func:`log1p_unit`: ``x P(x)``, ``P`` of degree 7 fitted to the least maximum relative error on
  ``[0, 1]``: 1.9e-7 in exact arithmetic, 3.2e-7 evaluated in fp32. No logarithm instruction: the
  absolute error bound of ``lg2.approx`` near 1 would be a large relative error of ``ln(1 + e)``
  for small ``e``;
* ``e^{-|a|}``: ``ex2.approx.ftz.f32`` (relative error 2^-22.5) of ``|a| log2(e)`` rounded to fp32,
  whose rounding is the larger part at large ``|a|`` (condition number ``|a|``, as for any fp32
  ``exp`` of an fp32 argument); ``1/(1 + e)``: ``rsqrt.approx.ftz.f32`` squared (2 · 2^-22.9);
* together, per voxel, worst case over the sign of both instruction errors: term and derivative
  within 1.4e-6 and 1.8e-6 relative for ``|z| <= 20``, 3.6e-6 and 4.0e-6 for ``|z| <= 100`` (the
  term's relative error where it is tiny, about ``e^{-|z|}``); inside the package's 2e-5 budget.
  The per-image sums add terms of one sign (ln, fisher), so these bounds hold for the loss.
"""

from __future__ import annotations

import triton
import triton.language as tl

LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
HALF_PI: tl.constexpr = tl.constexpr(1.5707963267948966)


@triton.jit
def log1p_unit(x):
    """``ln(1 + x)`` for ``x ∈ [0, 1]`` to 3.2e-7 relative (fp32): ``x P(x)``, 7 FMAs and a multiply.

    ``P`` minimises the maximum relative error on [0, 1] (iteratively reweighted least squares on
    20 000 points); relative accuracy also for tiny ``x``, where ``ln(fl(1 + x))`` would lose it.
    """
    p = -0.008537963032722473 * x + 0.04408493638038635
    p = p * x - 0.10767462849617004
    p = p * x + 0.17744697630405426
    p = p * x - 0.24495239555835724
    p = p * x + 0.33275431394577026
    p = p * x - 0.49997401237487793
    p = p * x + 0.9999998211860657
    return x * p


@triton.jit
def atan_unit(h):
    # atan(h) for h in [0, 1]: h > tan(pi/8) is reduced by atan(h) = pi/4 + atan((h - 1)/(h + 1)), then
    # atan(x) = x + x^3 P(x^2) with P a degree-4 least-squares fit on Chebyshev nodes of |x| <= tan(pi/8)
    # (abs. error < 3e-8 evaluated in fp32, i.e. fp32 rounding).
    reduce = h > 0.41421356237309503
    x = tl.where(reduce, (h - 1.0) / (h + 1.0), h)
    t = x * x
    poly = ((((-0.06097643645 * t + 0.1060221863) * t - 0.1424480187) * t + 0.1999854843) * t) - 0.3333331669
    r = x + x * t * poly
    return tl.where(reduce, r + 0.7853981633974483, r)


@triton.jit
def exp_neg_abs(a):
    """``e^{-|a|} ∈ [0, 1]``: ``tl.exp2`` is one ``ex2.approx.ftz`` on the GPU. (``tl.exp`` compiles to the
    non-``ftz`` form, three more instructions to scale subnormal results; flushed to 0 here, they change
    ``ln(1 + e)`` and ``σ`` by less than 1e-38.)"""
    return tl.exp2(tl.abs(a) * -1.4426950408889634)


@triton.jit
def reciprocal_unit(x):
    """``1/x`` for ``x ∈ [1, 2]`` as ``rsqrt(x)²``: two instructions (``MUFU.RSQ``, ``FMUL``), 2.7e-7 relative.

    ``/`` compiles to ``div.full.f32``, which adds range checks and scaling (8 instructions) that an
    argument in [1, 2] does not need; Triton has no plain approximate reciprocal, and inline PTX cannot
    run under the interpreter.
    """
    r = tl.math.rsqrt(x)
    return r * r


@triton.jit
def softplus(a):
    """``sp(a) = ln(1 + e^a) = max(a, 0) + ln(1 + e^{-|a|})``: no overflow, relative accuracy for ``a ≪ 0``."""
    return tl.maximum(a, 0.0) + log1p_unit(exp_neg_abs(a))


@triton.jit
def sigmoid_pair(a):
    """``(σ(a), σ(-a))`` without overflow or cancellation: ``1/(1 + e)`` and ``e/(1 + e)``, ``e = e^{-|a|}``."""
    e = exp_neg_abs(a)
    inv = reciprocal_unit(1.0 + e)
    small = e * inv
    positive = a >= 0.0
    return tl.where(positive, inv, small), tl.where(positive, small, inv)


@triton.jit
def sigmoid(a):
    """``σ(a)``: the first of :func:`sigmoid_pair` (the compiler drops the second)."""
    s, _ = sigmoid_pair(a)
    return s


@triton.jit
def wrong_class_probability(z, fg):
    """``r = σ(-z)`` for a foreground voxel, ``σ(z)`` for a background one: ``|y - p|`` of a hard label."""
    return sigmoid(tl.where(fg, -z, z))


@triton.jit
def voxel_term(z, y, fg, limit, TRANSFORM: tl.constexpr, SOFT_TARGET: tl.constexpr):
    """Per-voxel term ``t`` (``ℓ_T = s_T t``) and ``dt/dz`` (clip mask included) of fp32 logits ``z``.

    ``y``: the fp32 target; ``fg``: ``y == 1`` as a mask (used instead of ``y`` for hard labels).
    Unused results cost nothing: the kernels inline this and the compiler drops what they ignore.
    """
    if TRANSFORM == 4:  # arcsine: θ = atan(e^{z/2}); √(p(1-p)) = h / (1 + h²), h = e^{-|z|/2}
        h = tl.exp(-0.5 * tl.abs(z))
        small = atan_unit(h)
        theta = tl.where(z >= 0.0, HALF_PI - small, small)
        term = -(y * theta + (1.0 - y) * (HALF_PI - theta))
        slope = (1.0 - 2.0 * y) * h / (2.0 * (1.0 + h * h))
    elif TRANSFORM >= 2:  # fisher (2), logit (3): z clipped to [-L, L], gradient masked outside
        inside = (z >= -limit) & (z <= limit)
        zc = tl.minimum(tl.maximum(z, -limit), limit)  # NaN becomes ±L here: the kernels' probe keeps it
        if TRANSFORM == 3:
            sign = 1.0 - 2.0 * y
            term = sign * zc
            slope = tl.where(inside, sign, 0.0)
        elif SOFT_TARGET:
            term = y * softplus(zc + LN2) + (1.0 - y) * softplus(-zc + LN2)
            slope = tl.where(inside, y * sigmoid(zc + LN2) - (1.0 - y) * sigmoid(-zc + LN2), 0.0)
        else:  # the true class's softplus alone
            w = tl.where(fg, zc, -zc) + LN2
            term = softplus(w)
            s = sigmoid(w)
            slope = tl.where(inside, tl.where(fg, s, -s), 0.0)
    else:  # ln (0), log10 (1): BCE (log10's 1/ln 10 is in s_T)
        if SOFT_TARGET:
            # Both softplus terms share e^{-|z|} and its log1p: sp(±z) = max(±z, 0) + log1p(e^{-|z|}).
            shared = log1p_unit(exp_neg_abs(z))
            term = y * (tl.maximum(-z, 0.0) + shared) + (1.0 - y) * (tl.maximum(z, 0.0) + shared)
            p, q = sigmoid_pair(z)
            slope = (1.0 - y) * p - y * q  # p - y without cancellation for y = 1
        else:
            a = tl.where(fg, -z, z)
            term = softplus(a)
            r = sigmoid(a)
            slope = tl.where(fg, -r, r)
    return term, slope
