// CPU kernels of the region family: per-voxel focal CE + per-(image, class) focal Tversky terms
// (reference.region_loss), in the plan of losses.md 0.4:
//   forward  : one pass -> per image [TP_c, FN_c, FP_c, focal sum, valid voxels] (RegionStats)
//              (the focal sum also carries the non-finite logits probe, tile.h nonfinite_probe)
//   finalize : O(B C) -> loss; in the backward, d loss / d TP, FN, FP per (b, c) and the focal scale
//   backward : one pass that recomputes the softmax and writes
//              h_c = p_c [mask_q (dTP y_c + dFP (1 - y_c)) - mask_u dFN y_c] - s_F a_c y_c G_c
//              d/dz_j = h_j - p_j sum_c h_c
// Sigmoid (multi-label) mode, kSigmoid: the same passes, finalize, chunks and reductions; only the
// per-voxel terms differ (loss_math.h, sigmoid_channel: every channel on its own, no softmax).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "tile.h"

namespace lmfloss::cpu {
namespace {

// The clip is not among the parameters: the kernels take it as an argument of type ClipBounds<math_t>
// or, for clip=False, NoClip (loss_math.h), so that the unclipped loops carry no clamps.
template <typename math_t>
struct RegionParams {
  const math_t* focal_weight;  // (C,), or (2, C) in sigmoid mode: [c] positive, [C + c] negative side
  const math_t* focal_gamma;
  bool with_focal, with_tversky;
  // Every gamma 0 (cross-entropy: DiceCE, nnU-Net's DC + CE): the modulation is exactly 1, and the
  // one-hot focal loops skip its pow (a log and an exp per voxel) with bitwise the same result.
  bool gamma_zero;
  // Every gamma 2 (MONAI's focal default): the sigmoid loops square instead (TileMathGammaTwo).
  bool gamma_two;
};

template <typename scalar_t, typename Target, bool kSigmoid>
struct RegionTile {
  using math_t = math_of<scalar_t>;
  const scalar_t* x;
  Geometry g;
  const Target& target;
  std::vector<math_t> buf;
  // log p, p, soft target, gradient w.r.t. log p; in sigmoid mode z keeps the logits, p is unused
  // and h is the gradient w.r.t. the logits.
  math_t *z, *p, *y, *h;
  int64_t label[kTile];
  math_t valid[kTile];

  RegionTile(const scalar_t* x_, const Geometry& g_, const Target& target_)
      : x(x_), g(g_), target(target_), buf(4 * g_.classes * kTile) {
    z = buf.data();
    p = z + g.classes * kTile;
    y = p + g.classes * kTile;
    h = y + g.classes * kTile;
  }

  // probe (forward only): the lanes' non-finite probes, taken before the softmax overwrites z.
  void load(int64_t b, int64_t v0, int64_t n, math_t* probe = nullptr) {
    load_tile(x, g, b, v0, n, z);
    if (probe != nullptr) nonfinite_probe(z, g.classes, probe);
    target.load(b, v0, n, label, valid, y);
    if constexpr (!Target::kSoft) {
      // The class loops read every target from y: a label map's one-hot, 0 on ignored and padding
      // lanes (a soft map's y is 0 there already). Label selects inside those loops kept GCC from
      // vectorising them (5x slower).
      for (int64_t c = 0; c < g.classes; ++c) {
        for (int64_t t = 0; t < kTile; ++t) y[c * kTile + t] = label[t] == c ? math_t(1) : math_t(0);
      }
    }
    if constexpr (!kSigmoid) softmax_tile(z, p, g.classes);
  }

  // Focal terms of a one-hot target, which only the true class has: gathers that class's log p,
  // p, weight and gamma per lane (zero weight on ignored lanes), so the math below vectorises.
  void gather_true_class(const math_t* weight, const math_t* gamma, math_t* log_p, math_t* prob, math_t* w,
                         math_t* g) const {
    for (int64_t t = 0; t < kTile; ++t) {
      const int64_t c = label[t] < 0 ? 0 : label[t];
      log_p[t] = z[c * kTile + t];
      prob[t] = p[c * kTile + t];
      w[t] = weight[c] * valid[t];
      g[t] = gamma[c];
    }
  }
};

// Calls channels(with_focal, math policy) of the sigmoid loops: without a focal term, with one, or
// with one whose gammas are all 2 (TileMathGammaTwo: squares for the modulation).
template <typename math_t, typename Channels>
void with_sigmoid_policy(const RegionParams<math_t>& P, Channels&& channels) {
  if (!P.with_focal) return channels(std::false_type{}, TileMath{});
  if (P.gamma_two) return channels(std::true_type{}, TileMathGammaTwo{});
  channels(std::true_type{}, TileMath{});
}

template <typename scalar_t, bool kSigmoid, typename Target, typename Bounds>
void region_forward_impl(const at::Tensor& logits_in, const Target& target, const RegionParams<math_of<scalar_t>>& P,
                         const Bounds bounds, double* stats) {
  using math_t = math_of<scalar_t>;
  at::Tensor logits = logits_in;
  const Geometry g = class_geometry(logits);
  const int64_t C = g.classes;
  const int64_t width = RegionStats<double>::width(C);
  const int64_t per_image = chunks_per_image(g.voxels);
  std::vector<double> partials(g.batch * per_image * width, 0.0);

  at::parallel_for(0, g.batch * per_image, parallel_grain(kChunk * g.classes), [&](int64_t begin, int64_t end) {
    RegionTile<scalar_t, Target, kSigmoid> tile(logits.data_ptr<scalar_t>(), g, target);
    math_t probe[kTile];
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      double* acc = partials.data() + chunk * width;
      for_tiles(chunk, per_image, g.voxels, [&](int64_t, int64_t v0, int64_t n) {
        tile.load(chunk / per_image, v0, n, probe);
        if constexpr (kSigmoid) {
          // Channels are independent: one loop per channel gives its sums and its focal terms (the
          // focal switch and the math policy compile-time ones, so that every version of the loop
          // vectorises).
          const auto channels = [&](auto with_focal, auto math) {
            using Math = decltype(math);
            math_t focal = 0;
            for (int64_t c = 0; c < C; ++c) {
              const math_t a_pos = P.focal_weight[c], g_pos = P.focal_gamma[c];
              const math_t a_neg = P.focal_weight[C + c], g_neg = P.focal_gamma[C + c];
              // Row pointers taken out of the tile first: loaded in the loop, they kept GCC from vectorising it.
              const math_t *zc = tile.z + c * kTile, *y = tile.y + c * kTile, *valid = tile.valid;
              math_t tp = 0, fn = 0, fp = 0, fc = 0;
#pragma omp simd reduction(+ : tp, fn, fp, fc)
              for (int64_t t = 0; t < kTile; ++t) {
                const SigmoidChannel<math_t> ch = sigmoid_channel<Math>(zc[t], bounds);
                const math_t yt = y[t], vt = valid[t];
                tp += yt * ch.q;
                fn += yt * ch.one_minus_q;
                fp += (vt - yt) * ch.q;
                if constexpr (decltype(with_focal)::value) {
                  fc += sigmoid_focal_term<Math>(ch.q, ch.one_minus_q, ch.log_q, ch.log_one_minus_q, yt, vt, a_pos,
                                                 g_pos, a_neg, g_neg);
                }
              }
              acc[c] += tp;
              acc[C + c] += fn;
              acc[2 * C + c] += fp;
              focal += fc;
            }
            acc[RegionStats<double>::focal(C)] += focal;
          };
          with_sigmoid_policy(P, channels);
        } else {
          if (P.with_tversky) {
            for (int64_t c = 0; c < C; ++c) {
              math_t tp = 0, fn = 0, fp = 0;
              // Row pointers taken out of the tile first (as in the sigmoid loops): read through the
              // tile in the loop, they have kept GCC from vectorising it.
              const math_t *zc = tile.z + c * kTile, *pc = tile.p + c * kTile, *y = tile.y + c * kTile;
              const math_t* valid = tile.valid;
              // Lane-wise partial sums in a fixed pattern: vectorised and still deterministic.
#pragma omp simd reduction(+ : tp, fn, fp)
              for (int64_t t = 0; t < kTile; ++t) {
                const ClippedProb<math_t> cp = clip_prob(zc[t], pc[t], one_minus_p(zc[t], pc[t]), bounds);
                const math_t yt = y[t];
                tp += yt * cp.q;
                fn += yt * cp.u;
                fp += (valid[t] - yt) * cp.q;
              }
              acc[c] += tp;
              acc[C + c] += fn;
              acc[2 * C + c] += fp;
            }
          }
          if (P.with_focal) {
            math_t focal = 0;
            if constexpr (Target::kSoft) {
              for (int64_t c = 0; c < C; ++c) {
                const math_t a = P.focal_weight[c], gamma = P.focal_gamma[c];
                const math_t *zc = tile.z + c * kTile, *pc = tile.p + c * kTile, *y = tile.y + c * kTile;
                for (int64_t t = 0; t < kTile; ++t) {
                  const ClippedProb<math_t> cp = clip_prob(zc[t], pc[t], one_minus_p(zc[t], pc[t]), bounds);
                  // A select, not y * term: without the clip a -inf logit has log q = -inf, 0 * inf = NaN.
                  const math_t yt = y[t];
                  const math_t term = a * yt * focal_modulation<TileMath>(cp.u, gamma) * (-cp.log_q);
                  focal += yt != math_t(0) ? term : math_t(0);
                }
              }
            } else {
              math_t log_p[kTile], prob[kTile], w[kTile], g[kTile];
              tile.gather_true_class(P.focal_weight, P.focal_gamma, log_p, prob, w, g);
              if (P.gamma_zero) {
#pragma omp simd reduction(+ : focal)
                for (int64_t t = 0; t < kTile; ++t) {
                  focal += w[t] * (-clip_prob(log_p[t], prob[t], one_minus_p(log_p[t], prob[t]), bounds).log_q);
                }
              } else {
#pragma omp simd reduction(+ : focal)
                for (int64_t t = 0; t < kTile; ++t) {
                  const ClippedProb<math_t> cp = clip_prob(log_p[t], prob[t], one_minus_p(log_p[t], prob[t]), bounds);
                  focal += w[t] * focal_modulation<TileMath>(cp.u, g[t]) * (-cp.log_q);
                }
              }
            }
            acc[RegionStats<double>::focal(C)] += focal;
          }
        }
        math_t count = 0, bad = 0;  // bad: 0, or NaN (the non-finite probe, whatever the order)
#pragma omp simd reduction(+ : count, bad)
        for (int64_t t = 0; t < kTile; ++t) {
          count += tile.valid[t];
          bad += probe[t];
        }
        acc[RegionStats<double>::count(C)] += count;
        // The focal column carries the probe into the image's loss (finalize); no backward reads it.
        acc[RegionStats<double>::focal(C)] += bad;
      });
    }
  });
  for (int64_t b = 0; b < g.batch; ++b) {
    for (int64_t k = 0; k < width; ++k) {
      double sum = 0.0;
      for (int64_t chunk = b * per_image; chunk < (b + 1) * per_image; ++chunk) sum += partials[chunk * width + k];
      stats[b * width + k] = sum;
    }
  }
}

// coef: per image [dTP_c, dFN_c, dFP_c (3C), focal scale s_F], already times d loss / d L_b.
template <typename scalar_t, bool kSigmoid, typename Target, typename Bounds>
void region_backward_impl(const at::Tensor& logits_in, const Target& target, const RegionParams<math_of<scalar_t>>& P,
                          const Bounds bounds, const std::vector<math_of<scalar_t>>& coef, at::Tensor& grad_in) {
  using math_t = math_of<scalar_t>;
  at::Tensor logits = logits_in;
  const Geometry g = class_geometry(logits);
  const Geometry gg = class_geometry(grad_in);
  scalar_t* dx = grad_in.data_ptr<scalar_t>();
  const int64_t C = g.classes;
  const int64_t per_image = chunks_per_image(g.voxels);

  at::parallel_for(0, g.batch * per_image, parallel_grain(kChunk * g.classes), [&](int64_t begin, int64_t end) {
    RegionTile<scalar_t, Target, kSigmoid> tile(logits.data_ptr<scalar_t>(), g, target);
    math_t hsum[kTile];
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      for_tiles(chunk, per_image, g.voxels, [&](int64_t b, int64_t v0, int64_t n) {
        const math_t* k = coef.data() + b * (3 * C + 1);
        const math_t focal_scale = k[3 * C];
        tile.load(b, v0, n);
        if constexpr (kSigmoid) {
          const auto channels = [&](auto with_focal, auto math) {
            using Math = decltype(math);
            for (int64_t c = 0; c < C; ++c) {
              const math_t d_tp = k[c], d_fn = k[C + c], d_fp = k[2 * C + c];
              const math_t a_pos = focal_scale * P.focal_weight[c], g_pos = P.focal_gamma[c];
              const math_t a_neg = focal_scale * P.focal_weight[C + c], g_neg = P.focal_gamma[C + c];
              math_t* hc = tile.h + c * kTile;
              const math_t *zc = tile.z + c * kTile, *y = tile.y + c * kTile, *valid = tile.valid;
              for (int64_t t = 0; t < kTile; ++t) {
                const SigmoidChannel<math_t> ch = sigmoid_channel<Math>(zc[t], bounds);
                const math_t yt = y[t], vt = valid[t];
                math_t d = sigmoid_tversky_grad(ch, yt, vt, d_tp, d_fn, d_fp);
                if constexpr (decltype(with_focal)::value) {
                  d += sigmoid_focal_grad<Math>(ch, yt, vt, a_pos, g_pos, a_neg, g_neg);
                }
                hc[t] = d;
              }
            }
          };
          with_sigmoid_policy(P, channels);
        } else {
          for (int64_t c = 0; c < C; ++c) {
            const math_t d_tp = k[c], d_fn = k[C + c], d_fp = k[2 * C + c];
            const math_t a = focal_scale * P.focal_weight[c], gamma = P.focal_gamma[c];
            const math_t *zc = tile.z + c * kTile, *pc = tile.p + c * kTile, *y = tile.y + c * kTile;
            const math_t* valid = tile.valid;
            math_t* hc = tile.h + c * kTile;
            for (int64_t t = 0; t < kTile; ++t) {
              const ClippedProb<math_t> cp = clip_prob(zc[t], pc[t], one_minus_p(zc[t], pc[t]), bounds);
              const math_t yt = y[t];
              // Branch-free so that it vectorises: a skipped term has zero coefficients here.
              math_t d = pc[t] * (cp.mask_q * (d_tp * yt + d_fp * (valid[t] - yt)) - cp.mask_u * d_fn * yt);
              // A select, not y * factor: without the clip a -inf logit (p = 0, log q = -inf) makes the
              // factor 0 * inf = NaN, and y = 0 would not cancel it (the reference's gradient is finite
              // there where that class's gamma is 0: pow's derivative at exponent 0 is 0).
              if constexpr (Target::kSoft) {
                const math_t focal = a * yt * focal_factor<TileMath>(cp, pc[t], gamma);
                d -= yt != math_t(0) ? focal : math_t(0);
              }
              hc[t] = d;
            }
          }
          if (!Target::kSoft && P.with_focal) {
            math_t log_p[kTile], prob[kTile], w[kTile], g[kTile], d[kTile];
            tile.gather_true_class(P.focal_weight, P.focal_gamma, log_p, prob, w, g);
            if (P.gamma_zero) {
              for (int64_t t = 0; t < kTile; ++t) {  // focal_factor without its modulation, exactly 1 here
                const ClippedProb<math_t> cp = clip_prob(log_p[t], prob[t], one_minus_p(log_p[t], prob[t]), bounds);
                d[t] = focal_scale * w[t] * focal_bracket(cp, prob[t], math_t(0));
              }
            } else {
              for (int64_t t = 0; t < kTile; ++t) {
                const ClippedProb<math_t> cp = clip_prob(log_p[t], prob[t], one_minus_p(log_p[t], prob[t]), bounds);
                d[t] = focal_scale * w[t] * focal_factor<TileMath>(cp, prob[t], g[t]);
              }
            }
            for (int64_t t = 0; t < kTile; ++t) {
              if (tile.label[t] >= 0) tile.h[tile.label[t] * kTile + t] -= d[t];
            }
          }
          // d/dz_j = h_j - p_j sum_c h_c (the log-softmax backward; in sigmoid mode h is d/dz already).
          for (int64_t t = 0; t < kTile; ++t) hsum[t] = 0;
          for (int64_t c = 0; c < C; ++c) {
            for (int64_t t = 0; t < kTile; ++t) hsum[t] += tile.h[c * kTile + t];
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          scalar_t* out = dx + b * gg.sb + c * gg.sc + v0 * gg.sv;
          const math_t *hc = tile.h + c * kTile, *pc = tile.p + c * kTile;
          if constexpr (kSigmoid) {
            for (int64_t t = 0; t < n; ++t) out[t * gg.sv] = static_cast<scalar_t>(hc[t]);
          } else {
            for (int64_t t = 0; t < n; ++t) out[t * gg.sv] = static_cast<scalar_t>(hc[t] - pc[t] * hsum[t]);
          }
        }
      });
    }
  });
}

// Calls fn(target accessor) for a label map, a float map (read in the math dtype) or a uint8 dense
// map (dense_byte_map).
template <typename scalar_t, typename Fn>
void dispatch_target(const at::Tensor& logits, const at::Tensor& target_in, std::optional<int64_t> ignore_index,
                     Fn&& fn) {
  using math_t = math_of<scalar_t>;
  if (target_in.is_floating_point()) {
    at::Tensor target = target_in.to(c10::CppTypeToScalarType<math_t>());
    const Geometry tg = class_geometry(target);
    fn(SoftMap<math_t>{target.data_ptr<math_t>(), tg});
    return;
  }
  if (is_dense_map(target_in, logits)) {
    at::Tensor target = dense_byte_map(target_in);
    const Geometry tg = class_geometry(target);
    fn(SoftMap<uint8_t>{target.data_ptr<uint8_t>(), tg});
    return;
  }
  at::Tensor labels = native_labels(target_in);
  if (labels.dim() == logits.dim()) labels = labels.squeeze(1);
  const Geometry lg = label_geometry(labels, logits.dim());
  dispatch_labels(labels, [&](auto tag) {
    using label_t = decltype(tag);
    fn(LabelMap<label_t>{labels.data_ptr<label_t>(), lg, logits.size(1), ignore_index.has_value(),
                         ignore_index.value_or(0)});
  });
}

// Calls fn(std::bool_constant<sigmoid>, bounds): the softmax or the sigmoid (multi-label) kernels, with
// the clip's bounds or, without the clip, NoClip.
template <typename math_t, typename Fn>
void dispatch_mode(bool sigmoid, bool clip, double eps, Fn&& fn) {
  const auto with_bounds = [&](auto mode) {
    if (clip) return fn(mode, ClipBounds<math_t>::make(true, eps));
    fn(mode, NoClip{});
  };
  if (sigmoid) return with_bounds(std::true_type{});
  with_bounds(std::false_type{});
}

template <typename math_t>
RegionParams<math_t> region_params(const at::Tensor& fw, const at::Tensor& fg, double focal_coef,
                                   double tversky_coef) {
  const math_t* gamma = fg.data_ptr<math_t>();
  const bool gamma_zero = std::all_of(gamma, gamma + fg.numel(), [](math_t g) { return g == math_t(0); });
  const bool gamma_two = std::all_of(gamma, gamma + fg.numel(), [](math_t g) { return g == math_t(2); });
  return {fw.data_ptr<math_t>(), gamma, focal_coef != 0.0, tversky_coef != 0.0, gamma_zero, gamma_two};
}

// The elements of a float tensor of at most one axis (any stride) as doubles, exactly: the finalize's
// inputs (exponents, the loss's gradient) read without a converted copy of the tensor.
std::vector<double> doubles_of(const at::Tensor& t) {
  TORCH_CHECK(t.dim() <= 1, "lmfloss_ext: expected a scalar or a vector, got ", t.sizes());
  std::vector<double> out(t.numel());
  const int64_t stride = t.dim() == 0 ? 0 : t.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "doubles_of", [&] {
    const scalar_t* p = t.const_data_ptr<scalar_t>();
    for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<double>(p[int64_t(i) * stride]);
  });
  return out;
}

// Per-image rows of Tversky sums: the image's own, or (batch = true) the sums over the batch.
std::vector<double> tversky_rows(const double* st, int64_t batch, int64_t classes, bool batch_sum) {
  const int64_t width = RegionStats<double>::width(classes);
  std::vector<double> rows(st, st + batch * width);
  if (batch_sum) {
    for (int64_t k = 0; k < width; ++k) {
      double sum = 0.0;
      for (int64_t b = 0; b < batch; ++b) sum += st[b * width + k];
      for (int64_t b = 0; b < batch; ++b) rows[b * width + k] = sum;
    }
  }
  return rows;
}

std::tuple<at::Tensor, at::Tensor> region_loss_forward(const at::Tensor& logits, const at::Tensor& target,
                                                       const at::Tensor& focal_weight, const at::Tensor& focal_gamma,
                                                       const at::Tensor& tversky_exponent, double delta,
                                                       double focal_coef, double tversky_coef, double smooth_nr,
                                                       double smooth_dr, double eps, bool clip, bool batch,
                                                       std::optional<int64_t> ignore_index, int64_t reduction,
                                                       bool sigmoid) {
  check_cpu(logits, target, "region_loss_forward", sigmoid ? 1 : 2);
  TORCH_CHECK(logits.dim() >= 3, "lmfloss_ext::region_loss_forward: logits must be (B, C, *S), got ", logits.sizes());
  const at::Tensor fw = focal_table(focal_weight, logits, "focal_weight", sigmoid);
  const at::Tensor fg = focal_table(focal_gamma, logits, "focal_gamma", sigmoid);
  const std::vector<double> e = doubles_of(class_vector(tversky_exponent, logits, "tversky_exponent"));
  const int64_t B = logits.size(0), C = logits.size(1);
  const int64_t width = RegionStats<double>::width(C);
  at::Tensor stats = debug_poison(at::empty({B, width}, logits.options().dtype(at::kDouble)));
  double* st = stats.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "region_loss_forward_cpu", [&] {
    using math_t = math_of<scalar_t>;
    const auto P = region_params<math_t>(fw, fg, focal_coef, tversky_coef);
    dispatch_target<scalar_t>(logits, target, ignore_index, [&](const auto& acc) {
      dispatch_mode<math_t>(sigmoid, clip, eps, [&](auto mode, auto bounds) {
        region_forward_impl<scalar_t, decltype(mode)::value>(logits, acc, P, bounds, st);
      });
    });
  });
  // Finalize: L_b = focal_coef F_b + tversky_coef mean_c max(1 - TI_bc, tiny)^e_c. The focal column
  // carries the non-finite probe: without a focal term it still enters as 0 * column.
  const std::vector<double> tv = tversky_rows(st, B, C, batch);
  std::vector<double> L(B);
  double total = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    const double focal = st[b * width + RegionStats<double>::focal(C)];
    double value = focal_coef != 0.0 ? focal_coef * focal * region_focal_scale(st + b * width, C) : 0.0 * focal;
    if (tversky_coef != 0.0) {
      const double* row = tv.data() + b * width;
      double sum = 0.0;
      for (int64_t c = 0; c < C; ++c) {
        sum += tversky_term(row[c], row[C + c], row[2 * C + c], delta, smooth_nr, smooth_dr, e[c]).value;
      }
      value += tversky_coef * sum / double(C);
    }
    L[b] = value;
    total += value;
  }
  const auto mt = math_type(logits);
  if (reduction == kNone) {
    at::Tensor per_image = at::empty({B}, logits.options().dtype(mt));
    AT_DISPATCH_FLOATING_TYPES(mt, "region_loss_per_image", [&] {
      scalar_t* out = per_image.data_ptr<scalar_t>();
      for (int64_t b = 0; b < B; ++b) out[b] = static_cast<scalar_t>(L[b]);
    });
    return {per_image, stats};
  }
  const double value = reduction == kMean ? total / double(B) : total;
  return {at::scalar_tensor(value, logits.options().dtype(mt)), stats};
}

at::Tensor region_loss_backward(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target,
                                const at::Tensor& focal_weight, const at::Tensor& focal_gamma,
                                const at::Tensor& tversky_exponent, const at::Tensor& stats_in, double delta,
                                double focal_coef, double tversky_coef, double smooth_nr, double smooth_dr, double eps,
                                bool clip, bool batch, std::optional<int64_t> ignore_index, int64_t reduction,
                                bool sigmoid) {
  check_cpu(logits, target, "region_loss_backward", sigmoid ? 1 : 2);
  const at::Tensor fw = focal_table(focal_weight, logits, "focal_weight", sigmoid);
  const at::Tensor fg = focal_table(focal_gamma, logits, "focal_gamma", sigmoid);
  const std::vector<double> e = doubles_of(class_vector(tversky_exponent, logits, "tversky_exponent"));
  const at::Tensor stats = stats_in.to(at::kDouble).contiguous();
  const std::vector<double> g = doubles_of(grad);
  const int64_t B = logits.size(0), C = logits.size(1);
  const int64_t width = RegionStats<double>::width(C);
  const double* st = stats.data_ptr<double>();
  // w_b = d loss / d L_b.
  std::vector<double> w(B);
  double w_total = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    w[b] = reduction == kNone ? g[b] : (reduction == kMean ? g[0] / double(B) : g[0]);
    w_total += w[b];
  }
  const std::vector<double> tv = tversky_rows(st, B, C, batch);
  std::vector<double> coef(B * (3 * C + 1), 0.0);
  for (int64_t b = 0; b < B; ++b) {
    double* k = coef.data() + b * (3 * C + 1);
    if (tversky_coef != 0.0) {
      // With batch = true the shared index enters every image's loss: its weight is sum_b w_b.
      const double scale = tversky_coef * (batch ? w_total : w[b]) / double(C);
      const double* row = tv.data() + b * width;
      for (int64_t c = 0; c < C; ++c) {
        const auto term = tversky_term(row[c], row[C + c], row[2 * C + c], delta, smooth_nr, smooth_dr, e[c]);
        k[c] = scale * term.d_tp;
        k[C + c] = scale * term.d_fn;
        k[2 * C + c] = scale * term.d_fp;
      }
    }
    if (focal_coef != 0.0) k[3 * C] = focal_coef * w[b] * region_focal_scale(st + b * width, C);
  }
  at::Tensor grad_in = gradient_like(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "region_loss_backward_cpu", [&] {
    using math_t = math_of<scalar_t>;
    const auto P = region_params<math_t>(fw, fg, focal_coef, tversky_coef);
    const std::vector<math_t> k(coef.begin(), coef.end());
    dispatch_target<scalar_t>(logits, target, ignore_index, [&](const auto& acc) {
      dispatch_mode<math_t>(sigmoid, clip, eps, [&](auto mode, auto bounds) {
        region_backward_impl<scalar_t, decltype(mode)::value>(logits, acc, P, bounds, k, grad_in);
      });
    });
  });
  return grad_in;
}

}  // namespace
}  // namespace lmfloss::cpu

TORCH_LIBRARY_IMPL(lmfloss_ext, CPU, m) {
  m.impl("region_loss_forward", &lmfloss::cpu::region_loss_forward);
  m.impl("region_loss_backward", &lmfloss::cpu::region_loss_backward);
}
