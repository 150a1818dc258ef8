// Tiling helpers of the CPU kernels (csrc/cpu/*.cpp).
//
// Plan (losses.md 0.4, as the Triton path): forward = one pass over logits and targets that
// produces per-chunk partial sums; a tiny finalize turns them into the loss (and, for regions,
// the per-(image, class) sums the backward needs); backward = one pass that recomputes the
// softmax and writes the gradient.
//
// Determinism: the voxels of each image are cut into chunks of kChunk voxels whatever the thread
// count; each chunk writes its own partial sums, which are added in chunk order in double.
// Vectorisation: voxels are processed in tiles of kTile; every class loop runs over a tile with
// a fixed trip count (padding lanes carry valid = 0), so the compiler vectorises it across voxels
// whatever the class count and the memory layout (the class stride is 1 for channels-last).
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>

#include "../common.h"
#include "../loss_math.h"

namespace lmfloss::cpu {

constexpr int64_t kTile = 64;
constexpr int64_t kChunk = 4096;  // a multiple of kTile

template <typename scalar_t>
using math_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Vectorisable float math (plain arithmetic and selects, so GCC vectorises the tile loops that
// call it, which it cannot do with libm calls); double keeps libm (tests, gradcheck).
// exp on x <= 0 (every argument here: z - max z, gamma log u): range reduction x = n ln2 + r,
// |r| <= ln2 / 2, Cephes degree-6 polynomial (~1 ulp); NaN propagates, x < -87.3 gives 0.
inline float exp_nonpos(float x) {
  const float xc = x < -87.3f ? -87.3f : x;
  // Round to nearest by adding and removing 1.5 * 2^23 (no SSE4.1 roundps needed to vectorise).
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits;
  __builtin_memcpy(&bits, &p, 4);
  bits += static_cast<int32_t>(n) << 23;
  float result;
  __builtin_memcpy(&result, &bits, 4);
  result = x < -87.3f ? 0.0f : result;
  return x != x ? x : result;
}

// 1 - p from log p and p: -expm1(log p) by its Taylor series to x^9/9! (relative error < 1e-9, no
// cancellation) where p > 1/sqrt(2), else 1 - p, which is then exact to rounding.
inline float one_minus_p(float log_p, float p) {
  float s = 2.75573192e-6f;
  s = s * log_p + 2.48015873e-5f;
  s = s * log_p + 1.98412698e-4f;
  s = s * log_p + 1.38888889e-3f;
  s = s * log_p + 8.33333333e-3f;
  s = s * log_p + 4.16666667e-2f;
  s = s * log_p + 1.66666667e-1f;
  s = s * log_p + 0.5f;
  const float series = -(log_p + log_p * log_p * s);
  return log_p > -0.34657359f ? series : 1.0f - p;
}
inline double one_minus_p(double log_p, double) { return -::expm1(log_p); }

// Vectorisable natural log of a positive normal float (Cephes logf: mantissa in
// [sqrt(1/2), sqrt(2)), degree-8 polynomial, ~1 ulp); NaN propagates.
inline float log_pos(float x) {
  int32_t bits;
  __builtin_memcpy(&bits, &x, 4);
  int32_t e = ((bits >> 23) & 0xff) - 126;
  int32_t mb = (bits & 0x007fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  float m;
  __builtin_memcpy(&m, &mb, 4);
  const bool small = m < 0.707106781186547524f;
  e -= small ? 1 : 0;
  const float f = (small ? m + m : m) - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  const float result = f + y + 0.693359375f * fe;
  return x != x ? x : result;
}

// ln(1 + e) for e in [0, 1] from log_pos: ln(u) e / (u - 1) with u = fl(1 + e) corrects the
// rounding of 1 + e, so it stays exact to rounding for tiny e (Goldberg); NaN propagates.
inline float log1p_unit(float e) {
  const float u = 1.0f + e;
  const float d = u - 1.0f;
  const float corrected = log_pos(u) * (e / (d == 0.0f ? 1.0f : d));
  return d == 0.0f ? e : corrected;
}

// atan(h) for h in [0, 1]: h > tan(pi/8) is reduced by atan(h) = pi/4 + atan((h - 1)/(h + 1)),
// then atan(x) = x + x^3 P(x^2) with P of degree 4 fitted on |x| <= tan(pi/8) (the polynomial
// of the Triton kernel, lmfloss_kernels/calf/_triton.py: absolute error < 3e-8); NaN propagates.
inline float atan_unit(float h) {
  const bool reduce = h > 0.41421356237309503f;
  const float x = reduce ? (h - 1.0f) / (h + 1.0f) : h;
  const float t = x * x;
  float poly = -0.06097643645f;
  poly = poly * t + 0.1060221863f;
  poly = poly * t - 0.1424480187f;
  poly = poly * t + 0.1999854843f;
  poly = poly * t - 0.3333331669f;
  const float r = x + x * t * poly;
  return reduce ? r + 0.7853981633974483f : r;
}

// Math policy of the loss math (loss_math.h) in the tile loops: the float functions above, libm for
// double. pow only meets x in [tiny, 1] and y >= 0 there, so y log x <= 0 is in exp_nonpos' range.
struct TileMath : LibmMath {
  using LibmMath::atan_unit;
  using LibmMath::exp;
  using LibmMath::exp_nonpos;
  using LibmMath::log;
  using LibmMath::log1p_unit;
  using LibmMath::pow;
  static float exp(float x) { return cpu::exp_nonpos(x); }
  static float log(float x) { return log_pos(x); }
  static float pow(float x, float y) { return cpu::exp_nonpos(y * log_pos(x)); }
  static float exp_nonpos(float x) { return cpu::exp_nonpos(x); }
  static float log1p_unit(float e) { return cpu::log1p_unit(e); }
  static float atan_unit(float h) { return cpu::atan_unit(h); }
};

// TileMath for a call whose focal gammas are all 2: the sigmoid mode's modulation is a square
// (loss_math.h, sigmoid_modulation), two exps fewer per voxel and channel in each pass.
struct TileMathGammaTwo : TileMath {
  static constexpr bool kGammaTwo = true;
};

inline int64_t chunks_per_image(int64_t voxels) { return (voxels + kChunk - 1) / kChunk; }

// Parallelism only pays for itself on large problems: waking and joining a worker costs tens of
// microseconds on an idle machine and, on a loaded one, up to a scheduler time slice (a 2x4x32^3
// loss took ~16 ms on 2 threads against ~1.3 ms on one). Each parallel task therefore gets at
// least kMinTaskElements elements (about 0.5 ms of work): smaller problems run on the calling
// thread, and at::parallel_for never starts a team for them.
constexpr int64_t kMinTaskElements = int64_t(1) << 20;

// Grain of at::parallel_for over work items of `elements_per_item` elements each.
inline int64_t parallel_grain(int64_t elements_per_item) {
  return std::max<int64_t>(1, kMinTaskElements / std::max<int64_t>(1, elements_per_item));
}

// Calls body(b, v0, n) for the tiles of chunk `chunk`: image b, voxels [v0, v0 + n).
template <typename Body>
void for_tiles(int64_t chunk, int64_t per_image, int64_t voxels, Body&& body) {
  const int64_t b = chunk / per_image;
  const int64_t first = (chunk % per_image) * kChunk;
  const int64_t last = std::min(voxels, first + kChunk);
  for (int64_t v0 = first; v0 < last; v0 += kTile) body(b, v0, std::min(kTile, last - v0));
}

// Tile [v0, v0 + n) of image b of a (B, C, V) tensor as out[c * kTile + t] in the math type;
// padding lanes get 0.
template <typename scalar_t, typename math_t>
void load_tile(const scalar_t* x, const Geometry& g, int64_t b, int64_t v0, int64_t n, math_t* out) {
  for (int64_t c = 0; c < g.classes; ++c) {
    const scalar_t* row = x + b * g.sb + c * g.sc + v0 * g.sv;
    math_t* o = out + c * kTile;
    if (g.sv == 1) {
      for (int64_t t = 0; t < n; ++t) o[t] = static_cast<math_t>(row[t]);
    } else {
      for (int64_t t = 0; t < n; ++t) o[t] = static_cast<math_t>(row[t * g.sv]);
    }
    for (int64_t t = n; t < kTile; ++t) o[t] = math_t(0);
  }
}

// Non-finite logits policy (functional.py; the backend's nonfinite_in_kernel), as the CUDA kernels apply it:
// probe[t] = sum_c 0 * z_c over lane t's logits as loaded (padding lanes load 0), which is 0, or NaN
// when one of them is NaN or +-inf. The forward kernels add it to the loss of the row / image
// (ignored ones included) and to no gradient: the policy without a second read of the logits.
template <typename math_t>
void nonfinite_probe(const math_t* z, int64_t classes, math_t* probe) {
  for (int64_t t = 0; t < kTile; ++t) probe[t] = math_t(0);
  for (int64_t c = 0; c < classes; ++c) {
    const math_t* zc = z + c * kTile;
    for (int64_t t = 0; t < kTile; ++t) probe[t] += math_t(0) * zc[t];
  }
}

// In place z -> log p = z - LSE(z), and p = softmax(z): the two-pass softmax statistics of
// loss_math.h, lane by lane, with the lanes' max and sum in arrays so that every loop vectorises.
template <typename math_t>
void softmax_tile(math_t* z, math_t* p, int64_t classes) {
  math_t m[kTile], s[kTile];
  for (int64_t t = 0; t < kTile; ++t) {
    const SoftmaxStats<math_t> st = softmax_init<math_t>();
    m[t] = st.max;
    s[t] = st.sum;
  }
  for (int64_t c = 0; c < classes; ++c) {
    const math_t* zc = z + c * kTile;
    for (int64_t t = 0; t < kTile; ++t) {
      SoftmaxStats<math_t> st{m[t], s[t]};
      softmax_max(st, zc[t]);
      m[t] = st.max;
    }
  }
  for (int64_t c = 0; c < classes; ++c) {
    const math_t* zc = z + c * kTile;
    math_t* pc = p + c * kTile;
    for (int64_t t = 0; t < kTile; ++t) {
      SoftmaxStats<math_t> st{m[t], s[t]};
      pc[t] = softmax_add<TileMath>(st, zc[t]);
      s[t] = st.sum;
    }
  }
  math_t log_sum[kTile];
  for (int64_t t = 0; t < kTile; ++t) {
    log_sum[t] = log_softmax<TileMath>(SoftmaxStats<math_t>{m[t], s[t]}).log_sum;
    s[t] = math_t(1) / s[t];
  }
  for (int64_t c = 0; c < classes; ++c) {
    math_t* zc = z + c * kTile;
    math_t* pc = p + c * kTile;
    for (int64_t t = 0; t < kTile; ++t) {
      zc[t] = LogSoftmax<math_t>{m[t], log_sum[t]}.at(zc[t]);
      pc[t] *= s[t];
    }
  }
}

// Integer label map (B, V): label[t] is the class, or -1 for ignored / padding voxels. Labels out
// of [0, C) are masked the same way (memory safety only: validation rejects them before the call).
template <typename label_t>
struct LabelMap {
  static constexpr bool kSoft = false;
  const label_t* ptr;
  Geometry g;
  int64_t classes;
  bool has_ignore;
  int64_t ignore;

  template <typename math_t>
  void load(int64_t b, int64_t v0, int64_t n, int64_t* label, math_t* valid, math_t* /*y*/) const {
    const label_t* row = ptr + b * g.sb + v0 * g.sv;
    const int64_t ignored = has_ignore ? ignore : -1;
    for (int64_t t = 0; t < kTile; ++t) {
      const int64_t l = t < n ? static_cast<int64_t>(row[t * g.sv]) : int64_t(-1);
      label[t] = (l == ignored || l < 0 || l >= classes) ? int64_t(-1) : l;
      valid[t] = label[t] >= 0 ? math_t(1) : math_t(0);
    }
  }
};

// Dense map (B, C, V): float one-hot / soft map in the math type, or a uint8 0/1 one-hot /
// multi-hot map read as it is; y[c * kTile + t] in the math type.
template <typename target_t>
struct SoftMap {
  static constexpr bool kSoft = true;
  const target_t* ptr;
  Geometry g;

  template <typename math_t>
  void load(int64_t b, int64_t v0, int64_t n, int64_t* label, math_t* valid, math_t* y) const {
    load_tile(ptr, g, b, v0, n, y);
    for (int64_t t = 0; t < kTile; ++t) {
      label[t] = -1;
      valid[t] = t < n ? math_t(1) : math_t(0);
    }
  }
};

// Label maps are read as uint8 (the fast path) or int64; other integer dtypes are widened once.

inline void check_cpu(const at::Tensor& logits, const at::Tensor& target, const char* op, int64_t min_classes = 2) {
  check_logits(logits, op, min_classes);
  TORCH_CHECK(logits.device().is_cpu() && target.device().is_cpu(), "lmfloss_ext::", op,
              " (CPU): tensors must be on the CPU");
}

}  // namespace lmfloss::cpu
