// Loss mathematics shared by the CPU and the CUDA kernels of lmfloss-kernels.
//
// Everything here is an inline function of scalars, compiled as plain C++ by the host compiler
// and as __host__ __device__ code by nvcc, so both backends evaluate exactly the same formulas
// (losses.md sections 0.2, 0.3, 1.5, 2.6), each with its own exp / log (the math policy `M`, see
// LibmMath). `T` is the math type: float for float16 / bfloat16 / float32 logits, double for
// float64 logits.
//
// Notation: per voxel (or row) p = softmax(z), log p = z - LSE(z); q = clip(p, eps, 1 - eps) when
// the authors' clip is on, else q = p with log q taken in log space; u = 1 - q.
// Every gradient below is taken with respect to log p_c ("h_c"); the logit gradient then is
//     dL/dz_j = h_j - p_j * sum_c h_c                      (log-softmax backward, losses.md (S))
// which needs only one reduction over the classes.
#pragma once

#include <math.h>

#include <cfloat>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LMF_HD __host__ __device__ __forceinline__
#else
// Always inlined, as on the device: the CPU tile loops vectorise only when every call in them is
// inlined, and GCC's size heuristics left focal_modulation out of line once the kernels had more
// instantiations (the focal loop then ran scalar, 1.7x slower).
#define LMF_HD inline __attribute__((always_inline))
#endif

namespace lmfloss {

// Overloads instead of std:: names so the same call resolves on the host and on the device.
LMF_HD float math_exp(float x) { return expf(x); }
LMF_HD double math_exp(double x) { return exp(x); }
LMF_HD float math_log(float x) { return logf(x); }
LMF_HD double math_log(double x) { return log(x); }
LMF_HD float math_expm1(float x) { return expm1f(x); }
LMF_HD double math_expm1(double x) { return expm1(x); }
LMF_HD float math_pow(float x, float y) { return powf(x, y); }
LMF_HD double math_pow(double x, double y) { return pow(x, y); }
LMF_HD float math_log1p(float x) { return log1pf(x); }
LMF_HD double math_log1p(double x) { return log1p(x); }
LMF_HD float math_atan(float x) { return atanf(x); }
LMF_HD double math_atan(double x) { return atan(x); }

template <typename T>
struct Limits;
template <>
struct Limits<float> {
  // Smallest positive normal number: the reference clamps (1 - q) and (1 - TI) to it before pow.
  LMF_HD static float tiny() { return FLT_MIN; }
  LMF_HD static float log_tiny() { return -87.336544750553102f; }  // log(FLT_MIN)
  LMF_HD static float lowest() { return -FLT_MAX; }
};
template <>
struct Limits<double> {
  LMF_HD static double tiny() { return DBL_MIN; }
  LMF_HD static double log_tiny() { return -708.39641853226408; }  // log(DBL_MIN)
  LMF_HD static double lowest() { return -DBL_MAX; }
};

// Math policy: the functions below take exp, log and pow from their parameter `M`, so that every
// backend evaluates the same formulas with the elementary functions that suit it. LibmMath is the C
// math library (CUDA's expf / logf / powf on the device); the CPU tile loops pass
// lmfloss::cpu::TileMath (csrc/cpu/tile.h), polynomial float versions that GCC vectorises across the
// voxels of a tile, which it cannot do with libm calls. A policy need only serve the arguments
// that occur here: exp(x) for x <= 0 (NaN propagates), log(x) for positive normal x, pow(x, y)
// for x in [tiny, 1] and y >= 0.
struct LibmMath {
  template <typename T>
  LMF_HD static T exp(T x) {
    return math_exp(x);
  }
  template <typename T>
  LMF_HD static T log(T x) {
    return math_log(x);
  }
  template <typename T>
  LMF_HD static T pow(T x, T y) {
    return math_pow(x, y);
  }
  // Restricted-range forms the CALF terms use (see calf_term): x <= 0, and e, h in [0, 1].
  template <typename T>
  LMF_HD static T exp_nonpos(T x) {
    return math_exp(x);
  }
  template <typename T>
  LMF_HD static T log1p_unit(T e) {
    return math_log1p(e);
  }
  template <typename T>
  LMF_HD static T atan_unit(T h) {
    return math_atan(h);
  }
  // Whether every focal gamma of the call is 2 (sigmoid_modulation then squares u: no exp); a policy
  // that says so serves only such calls (the CPU kernels pick it per call).
  static constexpr bool kGammaTwo = false;
};

// ---------------------------------------------------------------------------------------------
// Stable softmax statistics: max m and sum s = sum_c exp(z_c - m) >= 1 of one voxel (or row), so
// log p = (z - m) - log s neither overflows nor loses the largest terms (log_softmax). Two ways to accumulate them:
//   one pass, softmax_push: merges one logit at a time (online softmax), so that a CUDA thread
//     reads each logit of its voxel once;
//   two passes, softmax_max over the classes, then softmax_add over the classes: no branch, so the
//     CPU tile loops vectorise them across the voxels of a tile; softmax_add returns its term
//     exp(z_c - m), which the tile keeps as the unnormalised p_c.
template <typename T>
struct SoftmaxStats {
  T max;
  T sum;
};

template <typename T>
LMF_HD SoftmaxStats<T> softmax_init() {
  return {Limits<T>::lowest(), T(0)};
}

template <typename T>
LMF_HD void softmax_max(SoftmaxStats<T>& st, T z) {
  st.max = z > st.max ? z : st.max;
}

// st.max must already be the max over the classes (so z - max <= 0, in every policy's exp range).
template <typename M, typename T>
LMF_HD T softmax_add(SoftmaxStats<T>& st, T z) {
  const T e = M::exp(z - st.max);
  st.sum += e;
  return e;
}

template <typename M, typename T>
LMF_HD void softmax_push(SoftmaxStats<T>& st, T z) {
  if (z > st.max) {
    st.sum = st.sum * M::exp(st.max - z) + T(1);  // rescaled to the new max, whose own term is 1
    st.max = z;
  } else {
    softmax_add<M>(st, z);
  }
}

// log softmax from the statistics: log p_c = (z_c - max) - log(sum). The difference z_c - max comes
// first (exact for the largest logits), so a confident voxel's log p_t = -log(sum) keeps its digits;
// z_c - (max + log sum) would round log(sum) to the ulp of max (1e-6 at max = 15, a relative error
// of 1e-2 in a loss of 1e-4).
template <typename T>
struct LogSoftmax {
  T max, log_sum;
  LMF_HD T at(T z) const { return (z - max) - log_sum; }
};

template <typename M, typename T>
LMF_HD LogSoftmax<T> log_softmax(const SoftmaxStats<T>& st) {
  return {st.max, M::log(st.sum)};
}

// ---------------------------------------------------------------------------------------------
// Clip (losses.md 0.3, 6.5), as lmfloss_kernels.reference.region_loss evaluates it: q, 1 - q and
// log q each come from log p (1 - p = -expm1(log p) keeps its digits near p = 1) and are each
// clamped to the image of [eps, 1 - eps]; each clamp passes the gradient only inside its range,
// inclusive (torch.clamp, tf.clip_by_value).
template <typename T>
struct ClippedProb {
  T q, u, log_q;              // q, 1 - q, log q
  T mask_q, mask_u, mask_log;  // d(clamped)/d(unclamped) of each: 1 or 0
};

template <typename T>
LMF_HD T clamp_with_mask(T x, T lo, T hi, T& mask) {
  mask = (x >= lo && x <= hi) ? T(1) : T(0);
  return x < lo ? lo : (x > hi ? hi : x);
}

// Clip bounds rounded once from double, as torch rounds a Python float bound to the tensor dtype.
// Without the clip the bounds are the natural ranges of p, 1 - p and log p ([0, 1], [0, 1],
// [-inf, 0]), where clamping changes nothing and every mask is 1: one branch-free code path.
template <typename T>
struct ClipBounds {
  T lo, hi, log_lo, log_hi;  // eps, 1 - eps, log(eps), log1p(-eps)
  static ClipBounds make(bool clip, double eps) {
    if (!clip) return {T(0), T(1), -T(INFINITY), T(0)};
    return {T(eps), T(1.0 - eps), T(::log(eps)), T(::log1p(-eps))};
  }
};

// The clip switched off at compile time: the natural bounds above, whose clamps change nothing, with
// none of their compares and selects (a third of a CPU sigmoid Dice pass) and every mask 1. The CPU
// kernels pass it for clip=False. Only a NaN differs, whose masks the clamps make 0: p or log p is NaN
// there already, and so is every product it enters.
struct NoClip {};

// u = 1 - p, which the caller evaluates as -expm1(log p) (the CPU kernels with a vectorisable expm1).
template <typename T>
LMF_HD ClippedProb<T> clip_prob(T log_p, T p, T u, const ClipBounds<T>& b) {
  ClippedProb<T> r;
  r.q = clamp_with_mask(p, b.lo, b.hi, r.mask_q);
  r.u = clamp_with_mask(u, b.lo, b.hi, r.mask_u);
  r.log_q = clamp_with_mask(log_p, b.log_lo, b.log_hi, r.mask_log);
  return r;
}
template <typename T>
LMF_HD ClippedProb<T> clip_prob(T log_p, T p, T u, NoClip) {
  return {p, u, log_p, T(1), T(1), T(1)};
}

// ---------------------------------------------------------------------------------------------
// Focal term of one class, l = -(1 - q)^gamma log q (losses.md 0.2).
//
// Modulation M = (1 - q)^gamma with the reference's clamp of (1 - q) to the smallest normal
// number; gamma = 0 gives exactly 1 whatever the policy's pow (as pow(x, 0) = 1 in the reference).
// Selects instead of branches, here and in focal_factor, so the CPU tile loops vectorise.
template <typename M, typename T>
LMF_HD T focal_modulation(T u, T gamma) {
  const T uc = u > Limits<T>::tiny() ? u : Limits<T>::tiny();
  const T m = M::pow(uc, gamma);
  return gamma == T(0) ? T(1) : m;
}

// d l / d log p = -G with (d u / d log p = -p mask_u, d log q / d log p = mask_log)
//     G = u^gamma (mask_log - gamma p r mask_u),   r = log q / u,
// the stable form of (1 - p)^gamma - gamma p (1 - p)^(gamma - 1) log p: u^(gamma - 1), infinite
// at u = 0 for gamma < 1, is never formed. For a one-hot target t and no clip,
// d l / d z_j = G (p_j - delta_jt).
// Below the smallest normal number (u = 0 at p = 1 in floating point, or u subnormal) r takes its
// limit -1: there log q = log(1 - u) = -u to working precision, while a quotient of subnormals
// would have lost most of its digits. The division is by max(u, tiny) so that the lane a
// vectorised loop computes and then discards stays finite (no 0 / 0) and has no subnormal
// operand (which costs x86 a microcode assist per instruction).
// G / u^gamma, the bracket, which the sigmoid mode multiplies by a modulation taken from log u.
template <typename T>
LMF_HD T focal_bracket(const ClippedProb<T>& cp, T p, T gamma) {
  const T tiny = Limits<T>::tiny();
  const T ratio = cp.log_q / (cp.u > tiny ? cp.u : tiny);
  const T r = cp.u >= tiny ? ratio : T(-1);
  return cp.mask_log - gamma * p * r * cp.mask_u;
}

// The bracket (its division) first, then the modulation: the order the CUDA kernels' registers
// were sized for (the precise division's slow path is a call; fewer values live across it).
template <typename M, typename T>
LMF_HD T focal_factor(const ClippedProb<T>& cp, T p, T gamma) {
  const T bracket = focal_bracket(cp, p, gamma);
  return focal_modulation<M>(cp.u, gamma) * bracket;
}

// ---------------------------------------------------------------------------------------------
// p = sigmoid(z), q = 1 - p = sigmoid(-z), log p, log q from e = exp(-|z|) <= 1: nothing overflows
// and nothing is formed by cancellation. A NaN logit gives NaN in all four (through e).
template <typename T>
struct SigmoidParts {
  T p, q, log_p, log_q;
};

template <typename M, typename T>
LMF_HD SigmoidParts<T> sigmoid_parts(T z) {
  const T e = M::exp_nonpos(z < T(0) ? z : -z);
  const T inv = T(1) / (T(1) + e);
  const T softplus = M::log1p_unit(e);  // ln(1 + e^{-|z|})
  const bool positive = z >= T(0);
  SigmoidParts<T> r;
  r.p = positive ? inv : e * inv;
  r.q = positive ? e * inv : inv;
  r.log_p = (z < T(0) ? z : T(0)) - softplus;
  r.log_q = -(z > T(0) ? z : T(0)) - softplus;
  return r;
}

// Sigmoid (multi-label) mode of the region family (reference.region_loss(sigmoid=True)): every
// channel an independent binary problem, p = sigmoid(z), q = clip(p). The positive side (target y)
// is the focal term of q; the negative side (1 - y) is the positive side of the mirrored channel
// (z -> -z, p <-> 1 - p), so both are ClippedProb and share focal_bracket. From sigmoid_parts (one
// exp and one log1p per channel): log p = min(z, 0) - log1p(e^-|z|), log(1 - p) = -max(z, 0) - log1p(e^-|z|).
template <typename T>
struct SigmoidChannel {
  T p, u;  // p and 1 - p, unclipped: dp/dz = p u, d log p/dz = u, d log(1 - p)/dz = -p
  T q, one_minus_q, log_q, log_one_minus_q;  // clipped
  T mask_q, mask_u, mask_log_q, mask_log_u;  // their clamps' derivatives: 1 or 0
  // The two sides as the softmax mode's ClippedProb: (q, 1 - q, log q) and the mirror (1 - q, q, log(1 - q)).
  LMF_HD ClippedProb<T> positive() const { return {q, one_minus_q, log_q, mask_q, mask_u, mask_log_q}; }
  LMF_HD ClippedProb<T> negative() const { return {one_minus_q, q, log_one_minus_q, mask_u, mask_q, mask_log_u}; }
};

// Flat, built from locals in one go: a nested or member-by-member struct stays in memory in the
// CPU tile loops (GCC's per-lane copies of `omp simd`), which then neither vectorise nor run fast.
template <typename M, typename T>
LMF_HD SigmoidChannel<T> sigmoid_channel(T z, const ClipBounds<T>& b) {
  const SigmoidParts<T> s = sigmoid_parts<M>(z);
  T mask_q, mask_u, mask_log_q, mask_log_u;
  const T q = clamp_with_mask(s.p, b.lo, b.hi, mask_q);
  const T one_minus_q = clamp_with_mask(s.q, b.lo, b.hi, mask_u);
  const T log_q = clamp_with_mask(s.log_p, b.log_lo, b.log_hi, mask_log_q);
  const T log_one_minus_q = clamp_with_mask(s.log_q, b.log_lo, b.log_hi, mask_log_u);
  return {s.p, s.q, q, one_minus_q, log_q, log_one_minus_q, mask_q, mask_u, mask_log_q, mask_log_u};
}
template <typename M, typename T>
LMF_HD SigmoidChannel<T> sigmoid_channel(T z, NoClip) {
  const SigmoidParts<T> s = sigmoid_parts<M>(z);
  return {s.p, s.q, s.p, s.q, s.log_p, s.log_q, T(1), T(1), T(1), T(1)};
}

// u^gamma from log u, which the sigmoid mode has without a log: the reference's clamp of u to the
// smallest normal number is a clamp of log u; gamma = 0 gives exactly 1 (NaN stays in the other factor).
template <typename M, typename T>
LMF_HD T focal_modulation_of_log(T log_u, T gamma) {
  const T lo = Limits<T>::log_tiny();
  const T m = M::exp(gamma * (log_u > lo ? log_u : lo));
  return gamma == T(0) ? T(1) : m;
}

// The sigmoid mode's modulation u^gamma from u and log u (both clipped): from log u, or, under a
// policy whose kGammaTwo says every gamma is 2 (MONAI's default), max(u, tiny)^2, the reference's
// clamp and pow(., 2) without an exp (flushed to 0 below tiny).
template <typename M, typename T>
LMF_HD T sigmoid_modulation(T u, T log_u, T gamma) {
  if constexpr (M::kGammaTwo) {
    // Below the smallest normal number the square is 0, as exp(2 log u) underflows to in the other
    // form: no subnormal result (on x86 a microcode assist per instruction that meets one).
    const T uc = u > Limits<T>::tiny() ? u : Limits<T>::tiny();
    const T square = uc * uc;
    return square < Limits<T>::tiny() ? T(0) : square;
  } else {
    return focal_modulation_of_log<M>(log_u, gamma);
  }
}

// Focal sum of one channel of one voxel (y already times valid, 0 on ignored voxels), from the
// clipped q, 1 - q and their logs (scalars, not the struct: the CPU kernels call it in `omp simd`
// loops, where a struct passed by reference stays in memory and the loop neither vectorises nor
// runs fast):
//     a+ y (1 - q)^g+ (-log q) + a- (valid - y) q^g- (-log(1 - q)).
// Selects, not products, so that a side with weight 0 drops a -log q = inf (no clip, z = -+inf).
template <typename M, typename T>
LMF_HD T sigmoid_focal_term(T q, T one_minus_q, T log_q, T log_one_minus_q, T y, T valid, T a_pos, T g_pos, T a_neg,
                            T g_neg) {
  const T n = valid - y;
  const T pos = a_pos * y * sigmoid_modulation<M>(one_minus_q, log_one_minus_q, g_pos) * (-log_q);
  const T neg = a_neg * n * sigmoid_modulation<M>(q, log_q, g_neg) * (-log_one_minus_q);
  return (y != T(0) ? pos : T(0)) + (n != T(0) ? neg : T(0));
}

// d loss / d z of one channel, two parts that the kernels add (the focal one only with a focal term):
// the Tversky part of the softmax backward's h (d/d log p, sums of q and 1 - q) times d log p/dz = 1 - p;
// the focal part, positive side likewise (-a+ y G+ (1 - p)), negative side through log(1 - p)
// (+a- (1 - y) G- p, G- the mirrored channel's factor). d_tp, d_fn, d_fp: d loss / d TP, FN, FP of
// the channel; a_pos, a_neg already times the focal scale.
template <typename T>
LMF_HD T sigmoid_tversky_grad(const SigmoidChannel<T>& ch, T y, T valid, T d_tp, T d_fn, T d_fp) {
  return ch.u * ch.p * (ch.mask_q * (d_tp * y + d_fp * (valid - y)) - ch.mask_u * d_fn * y);
}

template <typename M, typename T>
LMF_HD T sigmoid_focal_grad(const SigmoidChannel<T>& ch, T y, T valid, T a_pos, T g_pos, T a_neg, T g_neg) {
  const T n = valid - y;
  const T bracket_pos = focal_bracket(ch.positive(), ch.p, g_pos);
  const T bracket_neg = focal_bracket(ch.negative(), ch.u, g_neg);
  const T pos = a_pos * y * sigmoid_modulation<M>(ch.one_minus_q, ch.log_one_minus_q, g_pos) * bracket_pos;
  const T neg = a_neg * n * sigmoid_modulation<M>(ch.q, ch.log_q, g_neg) * bracket_neg;
  return ch.p * (n != T(0) ? neg : T(0)) - ch.u * (y != T(0) ? pos : T(0));
}

// ---------------------------------------------------------------------------------------------
// LDAM (losses.md 1.2): the target logit is shifted by its margin before scaling by s,
//     zeta_c = s (z_c - m_t [c == t]),   l = LSE(zeta) - zeta_t,   d l / d z_j = s (softmax(zeta)_j - delta_jt).
template <typename T>
LMF_HD T ldam_logit(T z, T s, T margin, bool is_target) {
  return s * (is_target ? z - margin : z);
}

// ---------------------------------------------------------------------------------------------
// Tversky / Dice per (image, class) from the forward sums (losses.md 2.6, reference.region_loss):
//     den = TP + delta FN + (1 - delta) FP + s_dr
//     x   = 1 - TI = (delta FN + (1 - delta) FP + s_dr - s_nr) / den      (never 1 - TI: 6.2)
//     value = max(x, tiny)^e,   K = d value / d x = e x^(e - 1)  (0 under the clamp, or for e = 0)
//     d value / d TP = -K x / den,   d value / d FN = K delta TI / den,   d value / d FP = K (1 - delta) TI / den
// with TI = (TP + s_nr) / den = 1 - x. The backward pass spreads them over the voxels:
//     d/d log p_c = p_c [mask_q (dTP y + dFP (1 - y)) - mask_u dFN y].
template <typename T>
struct TverskyTerm {
  T value, d_tp, d_fn, d_fp;
};

template <typename T>
LMF_HD TverskyTerm<T> tversky_term(T tp, T fn, T fp, T delta, T smooth_nr, T smooth_dr, T exponent) {
  const T den = tp + delta * fn + (T(1) - delta) * fp + smooth_dr;
  const T x = (delta * fn + (T(1) - delta) * fp + (smooth_dr - smooth_nr)) / den;
  const T ti = (tp + smooth_nr) / den;
  const T tiny = Limits<T>::tiny();
  TverskyTerm<T> r;
  // Written so that a NaN x (a NaN batch sum) stays NaN, as the reference's clamp_min keeps it.
  r.value = math_pow(x < tiny ? tiny : x, exponent);
  T k = T(0);
  if (exponent == T(1)) {
    k = x >= tiny ? T(1) : T(0);
  } else if (exponent != T(0) && x >= tiny) {
    k = exponent * math_pow(x, exponent - T(1));
  }
  r.d_tp = -k * x / den;
  r.d_fn = k * delta * ti / den;
  r.d_fp = k * (T(1) - delta) * ti / den;
  return r;
}

// ---------------------------------------------------------------------------------------------
// Region-loss statistics of one image, a row of 3C + 2 sums written by the forward pass:
//     [TP_0..TP_{C-1}, FN_0.., FP_0.., focal sum, number of valid voxels].
template <typename T>
struct RegionStats {
  LMF_HD static int64_t width(int64_t classes) { return 3 * classes + 2; }
  LMF_HD static int64_t focal(int64_t classes) { return 3 * classes; }
  LMF_HD static int64_t count(int64_t classes) { return 3 * classes + 1; }
};

// Focal part of image b's loss: focal_coef * F_b,  F_b = focal sum / max(V_b, 1).
template <typename T>
LMF_HD T region_focal_scale(const T* stats_b, int64_t classes) {
  const T n = stats_b[RegionStats<T>::count(classes)];
  return T(1) / (n > T(1) ? n : T(1));
}

// ---------------------------------------------------------------------------------------------
// CALF transformation losses (losses.md 4.2, lmfloss_kernels.calf.transforms), binary, per voxel:
//     l_T(z, y) = -[y T(p) + (1 - y) T(1 - p)],   p = sigmoid(z),   slope = d l_T / d z,
// with z clipped to [-L, L] (L = log((1 - eps) / eps), i.e. p to [eps, 1 - eps]) for fisher and
// logit, the slope 0 outside (torch.clamp's gradient). The codes are the positions in
// calf.transforms.TRANSFORMS.
enum CalfTransform : int64_t { kCalfLn = 0, kCalfLog10 = 1, kCalfFisher = 2, kCalfLogit = 3, kCalfArcsine = 4 };

// The terms take three transcendental functions from the math policy (LibmMath above), each on a
// restricted range: exp_nonpos(x) for x <= 0, log1p_unit(e) = ln(1 + e) and atan_unit(h) for e, h
// in [0, 1].

template <typename T>
struct CalfTerm {
  T loss, slope;
};

// l_T and its slope for one voxel (target y in [0, 1]); `limit` = L for fisher and logit.
//   ln:      -[y log p + (1 - y) log q],                 slope p - y   (log10: both / ln 10)
//   fisher:  -[y artanh p + (1 - y) artanh q],           slope -[y p / (1 + p) - (1 - y) q / (1 + q)]
//            artanh p = (ln(1 + p) - log q) / 2, from the clipped logit
//   logit:   (1 - 2y) z_clipped,                         slope 1 - 2y
//   arcsine: -[y theta + (1 - y)(pi/2 - theta)], theta = arcsin sqrt(p) = atan(e^{z/2}), from
//            h = e^{-|z|/2}: theta = atan h (z < 0) or pi/2 - atan h;   slope (1 - 2y) h / (2 (1 + h^2))
template <int64_t kTransform, typename M, typename T>
LMF_HD CalfTerm<T> calf_term(T z, T y, T limit) {
  CalfTerm<T> r;
  if constexpr (kTransform == kCalfArcsine) {
    const T half_pi = T(1.5707963267948966);
    const T h = M::exp_nonpos(T(-0.5) * (z < T(0) ? -z : z));
    const T small = M::atan_unit(h);
    const T theta = z >= T(0) ? half_pi - small : small;
    r.loss = -(y * theta + (T(1) - y) * (half_pi - theta));
    r.slope = (T(1) - T(2) * y) * h / (T(2) * (T(1) + h * h));
  } else if constexpr (kTransform == kCalfFisher || kTransform == kCalfLogit) {
    // NaN fails both comparisons: it stays NaN and gets slope 0, like torch.clamp.
    const bool inside = z >= -limit && z <= limit;
    const T zc = z < -limit ? -limit : (z > limit ? limit : z);
    if constexpr (kTransform == kCalfLogit) {
      const T sign = T(1) - T(2) * y;
      r.loss = sign * zc;
      r.slope = inside ? sign : T(0);
    } else {
      const SigmoidParts<T> s = sigmoid_parts<M>(zc);
      const T artanh_p = T(0.5) * (M::log1p_unit(s.p) - s.log_q);
      const T artanh_q = T(0.5) * (M::log1p_unit(s.q) - s.log_p);
      r.loss = -(y * artanh_p + (T(1) - y) * artanh_q);
      r.slope = inside ? -(y * s.p / (T(1) + s.p) - (T(1) - y) * s.q / (T(1) + s.q)) : T(0);
    }
  } else {
    const SigmoidParts<T> s = sigmoid_parts<M>(z);
    r.loss = -(y * s.log_p + (T(1) - y) * s.log_q);
    r.slope = s.p - y;
    if constexpr (kTransform == kCalfLog10) {
      const T inv_ln10 = T(0.43429448190325176);
      r.loss *= inv_ln10;
      r.slope *= inv_ln10;
    }
  }
  return r;
}

// Soft Dice of CALF (MONAI DiceLoss(sigmoid=True) convention) from the sums TP = sum y p,
// FP = sum (1 - y) p, FN = sum y (1 - p) of an image (or of the batch):
//     den = 2 TP + FP + FN + s_dr,   D = (FP + FN + s_dr - s_nr) / den   (never 1 - (...): 6.2)
// and its voxel gradient d D / d z_i = (A y_i + E) p_i (1 - p_i), A = -2 / den, E = (2 TP + s_nr) / den^2.
template <typename T>
struct CalfDice {
  T value, a, e;
};

template <typename T>
LMF_HD CalfDice<T> calf_dice(T tp, T fp, T fn, T smooth_nr, T smooth_dr) {
  const T den = T(2) * tp + fp + fn + smooth_dr;
  return {(fp + fn + (smooth_dr - smooth_nr)) / den, T(-2) / den, (T(2) * tp + smooth_nr) / (den * den)};
}

// Column layout of the (B, 5) CALF statistics.
enum CalfStat : int64_t { kCalfLoss = 0, kCalfCount = 1, kCalfTP = 2, kCalfFP = 3, kCalfFN = 4, kCalfWidth = 5 };

}  // namespace lmfloss
