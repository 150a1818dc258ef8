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

inline int64_t chunks_per_image(int64_t voxels) { return (voxels + kChunk - 1) / kChunk; }

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

// In place z -> log p = z - LSE(z), and p = softmax(z); the per-voxel max is subtracted first.
template <typename math_t>
void softmax_tile(math_t* z, math_t* p, int64_t classes) {
  math_t m[kTile], s[kTile];
  for (int64_t t = 0; t < kTile; ++t) m[t] = z[t];
  for (int64_t c = 1; c < classes; ++c) {
    const math_t* zc = z + c * kTile;
    for (int64_t t = 0; t < kTile; ++t) m[t] = zc[t] > m[t] ? zc[t] : m[t];
  }
  for (int64_t t = 0; t < kTile; ++t) s[t] = math_t(0);
  for (int64_t c = 0; c < classes; ++c) {
    const math_t* zc = z + c * kTile;
    math_t* pc = p + c * kTile;
    for (int64_t t = 0; t < kTile; ++t) {
      pc[t] = math_exp(zc[t] - m[t]);
      s[t] += pc[t];
    }
  }
  for (int64_t t = 0; t < kTile; ++t) {
    m[t] += math_log(s[t]);
    s[t] = math_t(1) / s[t];
  }
  for (int64_t c = 0; c < classes; ++c) {
    math_t* zc = z + c * kTile;
    math_t* pc = p + c * kTile;
    for (int64_t t = 0; t < kTile; ++t) {
      zc[t] -= m[t];
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
    for (int64_t t = 0; t < kTile; ++t) {
      int64_t l = -1;
      if (t < n) {
        l = static_cast<int64_t>(row[t * g.sv]);
        if ((has_ignore && l == ignore) || l < 0 || l >= classes) l = -1;
      }
      label[t] = l;
      valid[t] = l >= 0 ? math_t(1) : math_t(0);
    }
  }
};

// Float one-hot / soft map (B, C, V) in the math type: y[c * kTile + t].
template <typename math_t>
struct SoftMap {
  static constexpr bool kSoft = true;
  const math_t* ptr;
  Geometry g;

  void load(int64_t b, int64_t v0, int64_t n, int64_t* label, math_t* valid, math_t* y) const {
    load_tile(ptr, g, b, v0, n, y);
    for (int64_t t = 0; t < kTile; ++t) {
      label[t] = -1;
      valid[t] = t < n ? math_t(1) : math_t(0);
    }
  }
};

// Label maps are read as uint8 (the fast path) or int64; other integer dtypes are widened once.
inline at::Tensor kernel_labels(const at::Tensor& labels) {
  const at::Tensor l = native_labels(labels);
  return l.scalar_type() == at::kByte ? l : l.to(at::kLong);
}

template <typename Fn>
void dispatch_labels(const at::Tensor& labels, Fn&& fn) {
  if (labels.scalar_type() == at::kByte) {
    fn(uint8_t{});
  } else {
    fn(int64_t{});
  }
}

inline void check_cpu(const at::Tensor& logits, const at::Tensor& target, const char* op) {
  check_logits(logits, op);
  TORCH_CHECK(logits.device().is_cpu() && target.device().is_cpu(), "lmfloss_ext::", op,
              " (CPU): tensors must be on the CPU");
}

}  // namespace lmfloss::cpu
