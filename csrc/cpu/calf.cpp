// CPU kernels of CALF (lmfloss_kernels.calf): the transformation losses of losses.md 4.2 with
// their optional Dice term (calf.transforms), and the per-image class counts of
// calf.stats.foreground_sizes.
//
// Transformation loss, in the plan of losses.md 0.4 (as region_loss.cpp), on logits and targets
// seen as (B, V) (every axis after the batch axis is a voxel axis):
//   forward  : one pass -> per image [S_b = sum of l_T, V_b valid voxels, TP, FP, FN] (CalfStat),
//              per chunk, added in chunk order in double; finalize
//              L_b = w_T S_b / max(V_b, 1) + w_D D_b
//   backward : one pass that recomputes the sigmoid and writes, for valid voxels,
//              d/dz_i = c_b slope_i + (A_b y_i + E_b) p_i (1 - p_i),   c_b = g_b w_T / max(V_b, 1),
//              A_b, E_b those of calf_dice times G_b = g_b w_D (batch = true: sum_b g_b w_D);
//              0 for ignored voxels.
// Non-finite logits (the package's policy, functional._propagate_nonfinite): the forward adds
// 0 * z of every logit of the image (ignored ones too) to S_b, so a NaN or +-inf logit makes S_b,
// hence L_b, NaN without a second read of the logits. S_b always enters L_b (times w_T; with
// w_T = 0 the transform is not evaluated and S_b is the probe alone). Nothing is added to the
// gradient: it is the formula's (NaN where a NaN logit enters, the finite limits at +-inf).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <array>
#include <mutex>
#include <string_view>
#include <type_traits>
#include <vector>

#include "tile.h"

namespace lmfloss::cpu {
namespace {

// Binary label map: y = [label == 1], valid unless label == ignore_index. Labels are compared as
// int64, so an ignore_index that the dtype cannot hold marks nothing (as the reference).
template <typename label_t>
struct BinaryLabels {
  const label_t* ptr;
  Geometry g;
  bool has_ignore;
  int64_t ignore;

  template <typename math_t>
  void load(int64_t b, int64_t v0, int64_t n, math_t* y, math_t* valid) const {
    const label_t* row = ptr + b * g.sb + v0 * g.sv;
    for (int64_t t = 0; t < n; ++t) {
      const int64_t l = static_cast<int64_t>(row[t * g.sv]);
      y[t] = l == 1 ? math_t(1) : math_t(0);
      valid[t] = has_ignore && l == ignore ? math_t(0) : math_t(1);
    }
    for (int64_t t = n; t < kTile; ++t) y[t] = valid[t] = math_t(0);
  }
};

// Float target in [0, 1], in the math type; every voxel is valid.
template <typename math_t>
struct SoftTarget {
  const math_t* ptr;
  Geometry g;

  void load(int64_t b, int64_t v0, int64_t n, math_t* y, math_t* valid) const {
    load_tile(ptr, g, b, v0, n, y);
    for (int64_t t = 0; t < kTile; ++t) valid[t] = t < n ? math_t(1) : math_t(0);
  }
};

template <typename math_t>
struct CalfParams {
  math_t limit;  // L for fisher and logit (unused by the others)
  bool with_transform, with_dice;
};

template <int64_t kTransform, typename scalar_t, typename Target>
void calf_forward_impl(const scalar_t* x, const Geometry& g, const Target& target,
                       const CalfParams<math_of<scalar_t>>& P, double* stats) {
  using math_t = math_of<scalar_t>;
  const int64_t per_image = chunks_per_image(g.voxels);
  std::vector<double> partials(g.batch * per_image * kCalfWidth, 0.0);

  at::parallel_for(0, g.batch * per_image, parallel_grain(kChunk * g.classes), [&](int64_t begin, int64_t end) {
    math_t z[kTile], y[kTile], valid[kTile];
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      double* acc = partials.data() + chunk * kCalfWidth;
      for_tiles(chunk, per_image, g.voxels, [&](int64_t b, int64_t v0, int64_t n) {
        load_tile(x, g, b, v0, n, z);  // padding lanes: z = 0, valid = 0
        target.load(b, v0, n, y, valid);
        // Lane-wise partial sums in a fixed pattern: vectorised and still deterministic.
        math_t loss = 0, count = 0;
        if (P.with_transform) {
#pragma omp simd reduction(+ : loss)
          for (int64_t t = 0; t < kTile; ++t) {
            const CalfTerm<math_t> term = calf_term<kTransform, TileMath>(z[t], y[t], P.limit);
            loss += (valid[t] != math_t(0) ? term.loss : math_t(0)) + math_t(0) * z[t];
          }
        } else {
#pragma omp simd reduction(+ : loss)
          for (int64_t t = 0; t < kTile; ++t) loss += math_t(0) * z[t];
        }
#pragma omp simd reduction(+ : count)
        for (int64_t t = 0; t < kTile; ++t) count += valid[t];
        acc[kCalfLoss] += loss;
        acc[kCalfCount] += count;
        if (P.with_dice) {
          // Masked by multiplication, as the reference (p * keep): a NaN logit reaches the sums.
          math_t tp = 0, fp = 0, fn = 0;
#pragma omp simd reduction(+ : tp, fp, fn)
          for (int64_t t = 0; t < kTile; ++t) {
            const SigmoidParts<math_t> s = sigmoid_parts<TileMath>(z[t]);
            const math_t kept_y = valid[t] * y[t];
            tp += kept_y * s.p;
            fp += (valid[t] - kept_y) * s.p;
            fn += kept_y * s.q;
          }
          acc[kCalfTP] += tp;
          acc[kCalfFP] += fp;
          acc[kCalfFN] += fn;
        }
      });
    }
  });
  for (int64_t b = 0; b < g.batch; ++b) {
    for (int64_t k = 0; k < kCalfWidth; ++k) {
      double sum = 0.0;
      for (int64_t chunk = b * per_image; chunk < (b + 1) * per_image; ++chunk) {
        sum += partials[chunk * kCalfWidth + k];
      }
      stats[b * kCalfWidth + k] = sum;
    }
  }
}

// coef: per image [c_b, A_b, E_b] (already times the upstream gradient).
template <int64_t kTransform, typename scalar_t, typename Target>
void calf_backward_impl(const scalar_t* x, const Geometry& g, const Target& target,
                        const CalfParams<math_of<scalar_t>>& P, const std::vector<math_of<scalar_t>>& coef,
                        scalar_t* dx, const Geometry& gg) {
  using math_t = math_of<scalar_t>;
  const int64_t per_image = chunks_per_image(g.voxels);
  at::parallel_for(0, g.batch * per_image, parallel_grain(kChunk * g.classes), [&](int64_t begin, int64_t end) {
    math_t z[kTile], y[kTile], valid[kTile], d[kTile];
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      for_tiles(chunk, per_image, g.voxels, [&](int64_t b, int64_t v0, int64_t n) {
        const math_t c = coef[3 * b], a = coef[3 * b + 1], e = coef[3 * b + 2];
        load_tile(x, g, b, v0, n, z);
        target.load(b, v0, n, y, valid);
        for (int64_t t = 0; t < kTile; ++t) d[t] = math_t(0);
        if (P.with_transform) {
          for (int64_t t = 0; t < kTile; ++t) d[t] = c * calf_term<kTransform, TileMath>(z[t], y[t], P.limit).slope;
        }
        if (P.with_dice) {
          for (int64_t t = 0; t < kTile; ++t) {
            const SigmoidParts<math_t> s = sigmoid_parts<TileMath>(z[t]);
            d[t] += (a * y[t] + e) * (s.p * s.q);
          }
        }
        scalar_t* out = dx + b * gg.sb + v0 * gg.sv;
        for (int64_t t = 0; t < n; ++t) {
          out[t * gg.sv] = static_cast<scalar_t>(valid[t] != math_t(0) ? d[t] : math_t(0));
        }
      });
    }
  });
}

constexpr std::array<std::string_view, 5> kTransformNames = {"ln", "log10", "fisher", "logit", "arcsine"};

int64_t transform_code(c10::string_view name) {
  const std::string_view wanted(name.data(), name.size());
  size_t code = 0;
  while (code < kTransformNames.size() && kTransformNames[code] != wanted) ++code;
  TORCH_CHECK(code < kTransformNames.size(),
              "lmfloss_ext::calf: transform must be one of ln, log10, fisher, logit, arcsine, got ", wanted);
  return static_cast<int64_t>(code);
}

// Calls fn(std::integral_constant<int64_t, code>) so that the transform is a compile-time constant
// of the voxel loops.
template <typename Fn>
void dispatch_transform(int64_t code, Fn&& fn) {
  switch (code) {
    case kCalfLn:
      return fn(std::integral_constant<int64_t, kCalfLn>{});
    case kCalfLog10:
      return fn(std::integral_constant<int64_t, kCalfLog10>{});
    case kCalfFisher:
      return fn(std::integral_constant<int64_t, kCalfFisher>{});
    case kCalfLogit:
      return fn(std::integral_constant<int64_t, kCalfLogit>{});
    default:
      return fn(std::integral_constant<int64_t, kCalfArcsine>{});
  }
}

// Calls fn(target accessor) for a float target (read in the math type) or a label map (uint8,
// int32, int64 read natively; bool viewed as uint8; other integer dtypes widened once).
template <typename math_t, typename Fn>
void dispatch_binary_target(const at::Tensor& target_in, std::optional<int64_t> ignore_index, Fn&& fn) {
  if (target_in.is_floating_point()) {
    at::Tensor target = target_in.to(c10::CppTypeToScalarType<math_t>());
    const Geometry tg = flat_geometry(target);
    fn(SoftTarget<math_t>{target.data_ptr<math_t>(), tg});
    return;
  }
  at::Tensor labels = native_labels(target_in);
  const Geometry lg = flat_geometry(labels);
  const bool has_ignore = ignore_index.has_value();
  const int64_t ignore = ignore_index.value_or(0);
  dispatch_labels(labels, [&](auto tag) {
    using label_t = decltype(tag);
    fn(BinaryLabels<label_t>{labels.data_ptr<label_t>(), lg, has_ignore, ignore});
  });
}

void check_calf_inputs(const at::Tensor& logits, const at::Tensor& target, const char* op) {
  const auto t = logits.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, "lmfloss_ext::", op,
              ": logits must be float16, bfloat16, float32 or float64, got ", t);
  TORCH_CHECK(logits.dim() >= 2, "lmfloss_ext::", op, ": logits must be (B, *S), got ", logits.sizes());
  TORCH_CHECK(target.sizes() == logits.sizes(), "lmfloss_ext::", op, ": target must have the logits' shape ",
              logits.sizes(), ", got ", target.sizes());
  TORCH_CHECK(logits.device().is_cpu() && target.device().is_cpu(), "lmfloss_ext::", op,
              " (CPU): tensors must be on the CPU");
}

// (TP, FP, FN) of image b, or (batch = true) of the whole batch.
std::vector<double> dice_rows(const double* st, int64_t batch, bool batch_sum) {
  std::vector<double> rows(3 * batch);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t k = 0; k < 3; ++k) rows[3 * b + k] = st[b * kCalfWidth + kCalfTP + k];
  }
  if (batch_sum) {
    for (int64_t k = 0; k < 3; ++k) {
      double sum = 0.0;
      for (int64_t b = 0; b < batch; ++b) sum += st[b * kCalfWidth + kCalfTP + k];
      for (int64_t b = 0; b < batch; ++b) rows[3 * b + k] = sum;
    }
  }
  return rows;
}

double valid_scale(const double* st_b) {
  const double n = st_b[kCalfCount];
  return 1.0 / (n > 1.0 ? n : 1.0);
}

template <typename math_t>
CalfParams<math_t> calf_params(int64_t code, double transform_coef, double dice_coef, double eps) {
  const bool clipped = code == kCalfFisher || code == kCalfLogit;
  return {clipped ? static_cast<math_t>(::log1p(-eps) - ::log(eps)) : math_t(0), transform_coef != 0.0,
          dice_coef != 0.0};
}

std::tuple<at::Tensor, at::Tensor> calf_transform_forward(const at::Tensor& logits_in, const at::Tensor& target,
                                                          c10::string_view transform, double transform_coef,
                                                          double dice_coef, double eps, double smooth_nr,
                                                          double smooth_dr, bool batch,
                                                          std::optional<int64_t> ignore_index) {
  check_calf_inputs(logits_in, target, "calf_transform_forward");
  const int64_t code = transform_code(transform);
  at::Tensor logits = logits_in;
  const Geometry g = flat_geometry(logits);
  const int64_t B = g.batch;
  at::Tensor stats = debug_poison(at::empty({B, kCalfWidth}, logits.options().dtype(at::kDouble)));
  double* st = stats.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "calf_transform_forward_cpu", [&] {
    using math_t = math_of<scalar_t>;
    const auto P = calf_params<math_t>(code, transform_coef, dice_coef, eps);
    dispatch_transform(code, [&](auto kind) {
      dispatch_binary_target<math_t>(target, ignore_index, [&](const auto& acc) {
        calf_forward_impl<decltype(kind)::value>(logits.data_ptr<scalar_t>(), g, acc, P, st);
      });
    });
  });
  // Finalize: L_b = w_T S_b / max(V_b, 1) + w_D D_b; the S_b term also carries the probe when w_T = 0.
  const std::vector<double> dice = dice_rows(st, B, batch);
  at::Tensor per_image = debug_poison(at::empty({B}, logits.options().dtype(at::kDouble)));
  double* L = per_image.data_ptr<double>();
  for (int64_t b = 0; b < B; ++b) {
    double value = transform_coef * st[b * kCalfWidth + kCalfLoss] * valid_scale(st + b * kCalfWidth);
    if (dice_coef != 0.0) {
      value += dice_coef * calf_dice(dice[3 * b], dice[3 * b + 1], dice[3 * b + 2], smooth_nr, smooth_dr).value;
    }
    L[b] = value;
  }
  return {per_image.to(math_type(logits)), stats};
}

at::Tensor calf_transform_backward(const at::Tensor& grad, const at::Tensor& logits_in, const at::Tensor& target,
                                   const at::Tensor& stats_in, c10::string_view transform, double transform_coef,
                                   double dice_coef, double eps, double smooth_nr, double smooth_dr, bool batch,
                                   std::optional<int64_t> ignore_index) {
  check_calf_inputs(logits_in, target, "calf_transform_backward");
  const int64_t code = transform_code(transform);
  at::Tensor logits = logits_in;
  const Geometry g = flat_geometry(logits);
  const int64_t B = g.batch;
  TORCH_CHECK(stats_in.dim() == 2 && stats_in.size(0) == B && stats_in.size(1) == kCalfWidth,
              "lmfloss_ext::calf_transform_backward: stats must have shape (", B, ", ", kCalfWidth, "), got ",
              stats_in.sizes());
  TORCH_CHECK(grad.numel() == B, "lmfloss_ext::calf_transform_backward: grad must have ", B, " elements, got ",
              grad.numel());
  const at::Tensor stats = stats_in.to(at::kDouble).contiguous();
  const at::Tensor go = grad.to(at::kDouble).contiguous();
  const double* st = stats.data_ptr<double>();
  const double* w = go.data_ptr<double>();
  double w_total = 0.0;
  for (int64_t b = 0; b < B; ++b) w_total += w[b];
  const std::vector<double> dice = dice_rows(st, B, batch);
  std::vector<double> coef(3 * B, 0.0);
  for (int64_t b = 0; b < B; ++b) {
    if (transform_coef != 0.0) coef[3 * b] = w[b] * transform_coef * valid_scale(st + b * kCalfWidth);
    if (dice_coef != 0.0) {
      // With batch = true the shared Dice enters every image's loss: its weight is sum_b g_b.
      const double weight = dice_coef * (batch ? w_total : w[b]);
      const auto d = calf_dice(dice[3 * b], dice[3 * b + 1], dice[3 * b + 2], smooth_nr, smooth_dr);
      coef[3 * b + 1] = weight * d.a;
      coef[3 * b + 2] = weight * d.e;
    }
  }
  at::Tensor grad_in = gradient_like(logits, 1);
  const Geometry gg = flat_geometry(grad_in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "calf_transform_backward_cpu", [&] {
    using math_t = math_of<scalar_t>;
    const auto P = calf_params<math_t>(code, transform_coef, dice_coef, eps);
    const std::vector<math_t> k(coef.begin(), coef.end());
    dispatch_transform(code, [&](auto kind) {
      dispatch_binary_target<math_t>(target, ignore_index, [&](const auto& acc) {
        calf_backward_impl<decltype(kind)::value>(logits.data_ptr<scalar_t>(), g, acc, P, k,
                                                  grad_in.data_ptr<scalar_t>(), gg);
      });
    });
  });
  return grad_in;
}

// ---------------------------------------------------------------------------------------------
// Per-image class counts in one pass over the labels, read in their own dtype. Bins: 0 .. C-1
// the classes, C the labels outside [0, C) that are not ignore_index ("strays", which the Python
// side turns into its range error), C + 1 the ignored voxels. Each body of the parallel loop
// counts its chunks into private histograms and adds them to the image's row under a lock:
// integer sums, so the result is the same for every thread count and order. Four interleaved
// histograms break the store-to-load dependency of runs of equal labels (a mask's background).
constexpr int64_t kCountChunk = int64_t(1) << 16;
constexpr int64_t kLanes = 4;

template <typename label_t>
void count_impl(const label_t* ptr, const Geometry& g, int64_t C, std::optional<int64_t> ignore_index,
                int64_t* counts, int64_t* strays) {
  const int64_t width = C + 2;
  const bool has_ignore = ignore_index.has_value();
  const int64_t ignore = ignore_index.value_or(0);
  const auto bin_of = [&](int64_t v) -> int64_t {
    if (has_ignore && v == ignore) return C + 1;
    return v >= 0 && v < C ? v : C;
  };
  // One-byte labels: the bin of each of the 256 values, looked up (no compare per voxel).
  std::array<int32_t, 256> lut{};
  if constexpr (sizeof(label_t) == 1) {
    for (int64_t i = 0; i < 256; ++i) {
      lut[i] = static_cast<int32_t>(bin_of(static_cast<int64_t>(static_cast<label_t>(static_cast<uint8_t>(i)))));
    }
  }
  const int64_t per_image = (g.voxels + kCountChunk - 1) / kCountChunk;
  std::mutex mutex;
  at::parallel_for(0, g.batch * per_image, parallel_grain(kCountChunk), [&](int64_t begin, int64_t end) {
    std::vector<int64_t> hist(kLanes * width, 0);
    int64_t image = -1;
    const auto flush = [&] {
      const std::lock_guard<std::mutex> lock(mutex);
      for (int64_t c = 0; c <= C; ++c) {
        int64_t sum = 0;
        for (int64_t k = 0; k < kLanes; ++k) sum += hist[k * width + c];
        if (c < C) {
          counts[image * C + c] += sum;
        } else {
          *strays += sum;
        }
      }
      std::fill(hist.begin(), hist.end(), 0);
    };
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t b = chunk / per_image;
      if (b != image) {
        if (image >= 0) flush();
        image = b;
      }
      const int64_t first = (chunk % per_image) * kCountChunk;
      const int64_t last = std::min(g.voxels, first + kCountChunk);
      const label_t* row = ptr + b * g.sb;
      const auto bin = [&](int64_t v) -> int64_t {
        const label_t l = row[v * g.sv];
        if constexpr (sizeof(label_t) == 1) {
          return lut[static_cast<uint8_t>(l)];
        } else {
          return bin_of(static_cast<int64_t>(l));
        }
      };
      int64_t v = first;
      for (; v + kLanes <= last; v += kLanes) {
        for (int64_t k = 0; k < kLanes; ++k) ++hist[k * width + bin(v + k)];
      }
      for (; v < last; ++v) ++hist[bin(v)];
    }
    if (image >= 0) flush();
  });
}

std::tuple<at::Tensor, at::Tensor> calf_foreground_sizes(const at::Tensor& labels_in, int64_t num_classes,
                                                         std::optional<int64_t> ignore_index) {
  TORCH_CHECK(labels_in.device().is_cpu(), "lmfloss_ext::calf_foreground_sizes (CPU): labels must be on the CPU");
  TORCH_CHECK(at::isIntegralType(labels_in.scalar_type(), /*includeBool=*/true),
              "lmfloss_ext::calf_foreground_sizes: labels must have an integer or bool dtype, got ",
              labels_in.scalar_type());
  TORCH_CHECK(labels_in.dim() >= 1, "lmfloss_ext::calf_foreground_sizes: labels must be (B, *S), got a scalar");
  TORCH_CHECK(num_classes >= 1, "lmfloss_ext::calf_foreground_sizes: num_classes must be at least 1, got ",
              num_classes);
  at::Tensor labels = labels_in.scalar_type() == at::kBool ? labels_in.view(at::kByte) : labels_in;
  const Geometry g = flat_geometry(labels);
  at::Tensor counts = at::zeros({g.batch, num_classes}, labels.options().dtype(at::kLong));
  at::Tensor strays = at::zeros({}, labels.options().dtype(at::kLong));
  AT_DISPATCH_INTEGRAL_TYPES(labels.scalar_type(), "calf_foreground_sizes_cpu", [&] {
    count_impl(labels.data_ptr<scalar_t>(), g, num_classes, ignore_index, counts.data_ptr<int64_t>(),
               strays.data_ptr<int64_t>());
  });
  return {counts, strays};
}

}  // namespace
}  // namespace lmfloss::cpu

TORCH_LIBRARY_IMPL(lmfloss_ext, CPU, m) {
  m.impl("calf_transform_forward", &lmfloss::cpu::calf_transform_forward);
  m.impl("calf_transform_backward", &lmfloss::cpu::calf_transform_backward);
  m.impl("calf_foreground_sizes", &lmfloss::cpu::calf_foreground_sizes);
}
