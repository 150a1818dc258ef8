// CUDA kernels of the two loss families, from the same math header as the CPU kernels (with its
// LibmMath policy: CUDA's own expf / logf / powf).
//
// One thread per voxel (row) in grid-stride loops over one image (blockIdx.y = image); the
// classes of a voxel are class-strided, so each class loop reads consecutive voxels across a
// warp: coalesced for the usual (B, C, *S) layout. Loss math in float (double for float64),
// int64 offsets, everything on the current stream, no host synchronisation.
//
// Reductions are deterministic: each block reduces its threads' partial sums with a fixed
// shuffle tree and writes them to its own slot; a one-block kernel adds the slots in block order
// (in double) and finalizes the loss. No atomics.
//
//   rows    : row_forward (partials) -> row_finalize (loss, norms); row_backward (recomputes)
//   regions : region_forward (partials) -> region_finalize (stats, loss);
//             region_coefficients (d loss / d TP, FN, FP; focal scale) -> region_backward
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../common.h"
#include "../loss_math.h"

namespace lmfloss::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kGroup = 8;  // classes whose region sums a thread keeps in registers per pass
constexpr int64_t kMaxBlocksPerImage = 1024;

template <typename scalar_t>
using math_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Blocks per image for a grid-stride pass over `voxels`: one voxel per thread up to
// kMaxBlocksPerImage blocks (262144 threads, enough to fill any current GPU), grid-stride
// beyond. Rows are one image of N voxels, so N = 65536 rows get 256 blocks: at 4 voxels per
// thread they would get 64 and leave half of a 132-SM GPU idle. A function of the shape only,
// so the reduction order never changes between runs.
int64_t blocks_per_image(int64_t voxels) {
  return std::clamp<int64_t>((voxels + kThreads - 1) / kThreads, 1, kMaxBlocksPerImage);
}

// Sum over the block (fixed shuffle tree, then warp 0 over the warps); the result is in thread 0.
template <typename T>
__device__ T block_sum(T v, T* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // `shared` may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  T r = T(0);
  if (warp == 0) {
    r = lane < kWarps ? shared[lane] : T(0);
    for (int o = 16; o > 0; o >>= 1) r += __shfl_down_sync(0xffffffffu, r, o);
  }
  return r;
}

// Integer label map (B, V): label() is the class or -1 (ignored or out of [0, C): masked for
// memory safety; validation rejects such labels before the call when asked to).
template <typename label_t>
struct LabelMap {
  const label_t* ptr;
  Geometry g;
  int64_t classes;
  bool has_ignore;
  int64_t ignore;

  __device__ int64_t label(int64_t b, int64_t v) const {
    const int64_t l = static_cast<int64_t>(ptr[b * g.sb + v * g.sv]);
    return ((has_ignore && l == ignore) || l < 0 || l >= classes) ? -1 : l;
  }
  template <typename T>
  __device__ T y(int64_t, int64_t c, int64_t, int64_t l) const {
    return l == c ? T(1) : T(0);
  }
};

// Float one-hot / soft map (B, C, V) in the math type; every voxel is valid (label() = 0).
template <typename math_t>
struct SoftMap {
  const math_t* ptr;
  Geometry g;

  __device__ int64_t label(int64_t, int64_t) const { return 0; }
  template <typename T>
  __device__ T y(int64_t b, int64_t c, int64_t v, int64_t) const {
    return ptr[b * g.sb + c * g.sc + v * g.sv];
  }
};

template <typename math_t, typename scalar_t>
__device__ SoftmaxStats<math_t> softmax_of(const scalar_t* row, int64_t classes, int64_t sc) {
  SoftmaxStats<math_t> st = softmax_init<math_t>();
  for (int64_t c = 0; c < classes; ++c) softmax_push<LibmMath>(st, static_cast<math_t>(row[c * sc]));
  return st;
}

// Rows --------------------------------------------------------------------------------------

template <typename math_t>
struct RowParams {
  const math_t* margins;
  const math_t* ldam_weight;
  const math_t* focal_weight;
  math_t alpha, beta, gamma, s;
};

template <typename math_t, typename scalar_t>
__device__ SoftmaxStats<math_t> ldam_softmax_of(const scalar_t* row, int64_t classes, int64_t sc, int64_t t,
                                                const RowParams<math_t>& P) {
  SoftmaxStats<math_t> st = softmax_init<math_t>();
  for (int64_t c = 0; c < classes; ++c) {
    softmax_push<LibmMath>(st, ldam_logit(static_cast<math_t>(row[c * sc]), P.s, P.margins[t], c == t));
  }
  return st;
}

template <typename scalar_t, typename label_t>
__global__ void row_forward_kernel(const scalar_t* x, Geometry g, LabelMap<label_t> target, RowParams<math_of<scalar_t>> P,
                                   math_of<scalar_t>* per_row, double* partials) {
  using math_t = math_of<scalar_t>;
  __shared__ math_t shared[kWarps];
  const int64_t b = blockIdx.y;
  math_t acc[4] = {0, 0, 0, 0};  // LDAM weighted sum, LDAM weights, focal weighted sum, valid rows
  for (int64_t v = blockIdx.x * int64_t(kThreads) + threadIdx.x; v < g.voxels; v += int64_t(gridDim.x) * kThreads) {
    const int64_t l = target.label(b, v);
    const math_t valid = l >= 0 ? math_t(1) : math_t(0);
    const int64_t t = l >= 0 ? l : 0;
    const scalar_t* row = x + b * g.sb + v * g.sv;
    const math_t zt = static_cast<math_t>(row[t * g.sc]);
    math_t value = 0;
    if (P.alpha != math_t(0)) {
      const SoftmaxStats<math_t> st = ldam_softmax_of(row, g.classes, g.sc, t, P);
      const math_t w = P.ldam_weight[t] * valid;
      const math_t wce = -w * log_softmax<LibmMath>(st).at(ldam_logit(zt, P.s, P.margins[t], true));
      acc[0] += wce;
      acc[1] += w;
      value += P.alpha * wce;
    }
    if (P.beta != math_t(0)) {
      const math_t log_p = log_softmax<LibmMath>(softmax_of<math_t>(row, g.classes, g.sc)).at(zt);
      const math_t fl = P.focal_weight[t] * valid * focal_modulation<LibmMath>(-math_expm1(log_p), P.gamma) * (-log_p);
      acc[2] += fl;
      value += P.beta * fl;
    }
    acc[3] += valid;
    if (per_row != nullptr) per_row[b * g.voxels + v] = value;
  }
  for (int k = 0; k < 4; ++k) {
    const math_t total = block_sum(acc[k], shared);
    if (threadIdx.x == 0) partials[(b * gridDim.x + blockIdx.x) * 4 + k] = total;
  }
}

template <typename math_t>
__global__ void row_finalize_kernel(const double* partials, int64_t slots, double alpha, double beta,
                                    int64_t reduction, math_t* loss, double* norms) {
  __shared__ double total[4];
  if (threadIdx.x < 4) {
    double sum = 0.0;
    for (int64_t i = 0; i < slots; ++i) sum += partials[i * 4 + threadIdx.x];
    total[threadIdx.x] = sum;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    norms[0] = total[1];
    norms[1] = total[3];
    if (reduction == kSum) *loss = math_t(alpha * total[0] + beta * total[2]);
    // A term with coefficient 0 is not evaluated (no 0 * NaN when every row is ignored).
    if (reduction == kMean) {
      *loss = math_t((alpha != 0.0 ? alpha * (total[0] / total[1]) : 0.0) +
                     (beta != 0.0 ? beta * (total[2] / total[3]) : 0.0));
    }
  }
}

template <typename scalar_t, typename label_t>
__global__ void row_backward_kernel(const scalar_t* x, Geometry g, LabelMap<label_t> target,
                                    RowParams<math_of<scalar_t>> P, const math_of<scalar_t>* grad_out,
                                    const double* norms, int64_t reduction, scalar_t* dx, Geometry gg) {
  using math_t = math_of<scalar_t>;
  const int64_t b = blockIdx.y;
  const bool mean = reduction == kMean;
  const math_t ldam_scale = P.alpha * P.s * (mean ? math_t(1.0 / norms[0]) : math_t(1));
  const math_t focal_scale = P.beta * (mean ? math_t(1.0 / norms[1]) : math_t(1));
  for (int64_t v = blockIdx.x * int64_t(kThreads) + threadIdx.x; v < g.voxels; v += int64_t(gridDim.x) * kThreads) {
    const int64_t l = target.label(b, v);
    const math_t valid = l >= 0 ? math_t(1) : math_t(0);
    const int64_t t = l >= 0 ? l : 0;
    const scalar_t* row = x + b * g.sb + v * g.sv;
    const math_t g_row = (reduction == kNone ? grad_out[b * g.voxels + v] : grad_out[0]) * valid;
    const LogSoftmax<math_t> lse = log_softmax<LibmMath>(softmax_of<math_t>(row, g.classes, g.sc));
    LogSoftmax<math_t> lse_ldam{0, 0};
    math_t c_ldam = 0, c_focal = 0;
    if (P.alpha != math_t(0)) {
      lse_ldam = log_softmax<LibmMath>(ldam_softmax_of(row, g.classes, g.sc, t, P));
      c_ldam = ldam_scale * P.ldam_weight[t] * g_row;
    }
    if (P.beta != math_t(0)) {
      const math_t log_p = lse.at(static_cast<math_t>(row[t * g.sc]));
      const ClippedProb<math_t> cp{math_exp(log_p), -math_expm1(log_p), log_p, 1, 1, 1};
      c_focal = focal_scale * P.focal_weight[t] * g_row * focal_factor<LibmMath>(cp, cp.q, P.gamma);
    }
    scalar_t* out = dx + b * gg.sb + v * gg.sv;
    for (int64_t c = 0; c < g.classes; ++c) {
      const math_t z = static_cast<math_t>(row[c * g.sc]);
      const math_t hot = c == t ? math_t(1) : math_t(0);
      math_t d = c_focal * (math_exp(lse.at(z)) - hot);
      if (P.alpha != math_t(0)) d += c_ldam * (math_exp(lse_ldam.at(ldam_logit(z, P.s, P.margins[t], c == t))) - hot);
      out[c * gg.sc] = static_cast<scalar_t>(d);
    }
  }
}

// Regions -----------------------------------------------------------------------------------

template <typename math_t>
struct RegionParams {
  const math_t* focal_weight;
  const math_t* focal_gamma;
  ClipBounds<math_t> bounds;
  bool with_focal, with_tversky;
};

// Clipped q, 1 - q, log q of one class from its logit and the voxel's log softmax; p = softmax(z) in `p`.
template <typename math_t>
__device__ ClippedProb<math_t> clipped_at(math_t z, const LogSoftmax<math_t>& lse, const ClipBounds<math_t>& bounds,
                                          math_t& p) {
  const math_t log_p = lse.at(z);
  p = math_exp(log_p);
  return clip_prob(log_p, p, -math_expm1(log_p), bounds);
}

template <typename scalar_t, typename Target>
__global__ void region_forward_kernel(const scalar_t* x, Geometry g, Target target, RegionParams<math_of<scalar_t>> P,
                                      double* partials) {
  using math_t = math_of<scalar_t>;
  __shared__ math_t shared[kWarps];
  const int64_t b = blockIdx.y;
  const int64_t C = g.classes;
  const int64_t width = RegionStats<double>::width(C);
  double* slot = partials + (b * gridDim.x + blockIdx.x) * width;
  math_t focal = 0, count = 0;
  for (int64_t c0 = 0; c0 < C; c0 += kGroup) {
    math_t tp[kGroup], fn[kGroup], fp[kGroup];
#pragma unroll
    for (int j = 0; j < kGroup; ++j) tp[j] = fn[j] = fp[j] = math_t(0);
    for (int64_t v = blockIdx.x * int64_t(kThreads) + threadIdx.x; v < g.voxels; v += int64_t(gridDim.x) * kThreads) {
      const int64_t l = target.label(b, v);
      const math_t valid = l >= 0 ? math_t(1) : math_t(0);
      const scalar_t* row = x + b * g.sb + v * g.sv;
      const LogSoftmax<math_t> lse = log_softmax<LibmMath>(softmax_of<math_t>(row, C, g.sc));
#pragma unroll
      for (int j = 0; j < kGroup; ++j) {
        const int64_t c = c0 + j;
        if (c >= C) break;
        math_t p;
        const ClippedProb<math_t> cp = clipped_at(static_cast<math_t>(row[c * g.sc]), lse, P.bounds, p);
        const math_t y = valid * target.template y<math_t>(b, c, v, l);
        tp[j] += y * cp.q;
        fn[j] += y * cp.u;
        fp[j] += (valid - y) * cp.q;
        if (P.with_focal) {
          focal += P.focal_weight[c] * y * focal_modulation<LibmMath>(cp.u, P.focal_gamma[c]) * (-cp.log_q);
        }
      }
      if (c0 == 0) count += valid;
    }
    for (int j = 0; j < kGroup && c0 + j < C; ++j) {
      const math_t s_tp = block_sum(tp[j], shared);
      const math_t s_fn = block_sum(fn[j], shared);
      const math_t s_fp = block_sum(fp[j], shared);
      if (threadIdx.x == 0) {
        slot[c0 + j] = s_tp;
        slot[C + c0 + j] = s_fn;
        slot[2 * C + c0 + j] = s_fp;
      }
    }
  }
  const math_t s_focal = block_sum(focal, shared);
  const math_t s_count = block_sum(count, shared);
  if (threadIdx.x == 0) {
    slot[RegionStats<double>::focal(C)] = s_focal;
    slot[RegionStats<double>::count(C)] = s_count;
  }
}

// Sums of (b, c) over the batch (batch = true) or of image b alone.
__device__ double tversky_sum(const double* stats, int64_t b, int64_t k, int64_t batch, int64_t width, bool batch_sum) {
  if (!batch_sum) return stats[b * width + k];
  double sum = 0.0;
  for (int64_t i = 0; i < batch; ++i) sum += stats[i * width + k];
  return sum;
}

struct RegionScalars {
  double delta, focal_coef, tversky_coef, smooth_nr, smooth_dr;
  bool batch;
  int64_t reduction;
};

template <typename math_t>
__global__ void region_finalize_kernel(const double* partials, int64_t slots_per_image, int64_t batch, int64_t C,
                                       const double* exponent, RegionScalars S, double* stats, double* image_loss,
                                       math_t* loss) {
  const int64_t width = RegionStats<double>::width(C);
  for (int64_t i = threadIdx.x; i < batch * width; i += blockDim.x) {
    const int64_t b = i / width, k = i % width;
    double sum = 0.0;
    for (int64_t s = 0; s < slots_per_image; ++s) sum += partials[(b * slots_per_image + s) * width + k];
    stats[i] = sum;
  }
  __syncthreads();
  for (int64_t b = threadIdx.x; b < batch; b += blockDim.x) {
    double value = 0.0;
    if (S.focal_coef != 0.0) {
      const double* st = stats + b * width;
      value += S.focal_coef * st[RegionStats<double>::focal(C)] * region_focal_scale(st, C);
    }
    if (S.tversky_coef != 0.0) {
      double sum = 0.0;
      for (int64_t c = 0; c < C; ++c) {
        const double tp = tversky_sum(stats, b, c, batch, width, S.batch);
        const double fn = tversky_sum(stats, b, C + c, batch, width, S.batch);
        const double fp = tversky_sum(stats, b, 2 * C + c, batch, width, S.batch);
        sum += tversky_term(tp, fn, fp, S.delta, S.smooth_nr, S.smooth_dr, exponent[c]).value;
      }
      value += S.tversky_coef * sum / double(C);
    }
    image_loss[b] = value;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    if (S.reduction == kNone) {
      for (int64_t b = 0; b < batch; ++b) loss[b] = math_t(image_loss[b]);
    } else {
      double total = 0.0;
      for (int64_t b = 0; b < batch; ++b) total += image_loss[b];
      loss[0] = math_t(S.reduction == kMean ? total / double(batch) : total);
    }
  }
}

// coef: per image [dTP_c, dFN_c, dFP_c (3C), focal scale], already times d loss / d L_b.
template <typename math_t>
__global__ void region_coefficients_kernel(const double* stats, const double* grad, int64_t batch, int64_t C,
                                           const double* exponent, RegionScalars S, math_t* coef) {
  const int64_t width = RegionStats<double>::width(C);
  auto weight = [&](int64_t b) {  // d loss / d L_b
    return S.reduction == kNone ? grad[b] : (S.reduction == kMean ? grad[0] / double(batch) : grad[0]);
  };
  double w_total = 0.0;
  for (int64_t b = 0; b < batch; ++b) w_total += weight(b);
  for (int64_t i = threadIdx.x; i < batch * C; i += blockDim.x) {
    const int64_t b = i / C, c = i % C;
    math_t* k = coef + b * (3 * C + 1);
    k[c] = k[C + c] = k[2 * C + c] = math_t(0);
    if (S.tversky_coef != 0.0) {
      // With batch = true the shared index enters every image's loss: its weight is sum_b w_b.
      const double scale = S.tversky_coef * (S.batch ? w_total : weight(b)) / double(C);
      const auto term = tversky_term(tversky_sum(stats, b, c, batch, width, S.batch),
                                     tversky_sum(stats, b, C + c, batch, width, S.batch),
                                     tversky_sum(stats, b, 2 * C + c, batch, width, S.batch), S.delta, S.smooth_nr,
                                     S.smooth_dr, exponent[c]);
      k[c] = math_t(scale * term.d_tp);
      k[C + c] = math_t(scale * term.d_fn);
      k[2 * C + c] = math_t(scale * term.d_fp);
    }
    if (c == 0) {
      k[3 * C] = S.focal_coef != 0.0
                     ? math_t(S.focal_coef * weight(b) * region_focal_scale(stats + b * width, C))
                     : math_t(0);
    }
  }
}

// Gradient of the loss with respect to log p_c at one voxel (clip masks included).
template <typename math_t, typename Target>
__device__ math_t region_h(const ClippedProb<math_t>& cp, math_t p, math_t y, math_t valid, const math_t* k,
                           int64_t c, int64_t C, const RegionParams<math_t>& P) {
  math_t d = 0;
  if (P.with_tversky) d = p * (cp.mask_q * (k[c] * y + k[2 * C + c] * (valid - y)) - cp.mask_u * k[C + c] * y);
  if (P.with_focal) d -= k[3 * C] * P.focal_weight[c] * y * focal_factor<LibmMath>(cp, p, P.focal_gamma[c]);
  return d;
}

template <typename scalar_t, typename Target>
__global__ void region_backward_kernel(const scalar_t* x, Geometry g, Target target, RegionParams<math_of<scalar_t>> P,
                                       const math_of<scalar_t>* coef, scalar_t* dx, Geometry gg) {
  using math_t = math_of<scalar_t>;
  const int64_t b = blockIdx.y;
  const int64_t C = g.classes;
  const math_t* k = coef + b * (3 * C + 1);
  for (int64_t v = blockIdx.x * int64_t(kThreads) + threadIdx.x; v < g.voxels; v += int64_t(gridDim.x) * kThreads) {
    const int64_t l = target.label(b, v);
    const math_t valid = l >= 0 ? math_t(1) : math_t(0);
    const scalar_t* row = x + b * g.sb + v * g.sv;
    const LogSoftmax<math_t> lse = log_softmax<LibmMath>(softmax_of<math_t>(row, C, g.sc));
    // Two passes over the classes: the sum of h first, then h_j - p_j sum (h recomputed: no
    // per-voxel arrays of runtime length).
    math_t hsum = 0;
    for (int64_t c = 0; c < C; ++c) {
      math_t p;
      const ClippedProb<math_t> cp = clipped_at(static_cast<math_t>(row[c * g.sc]), lse, P.bounds, p);
      hsum += region_h<math_t, Target>(cp, p, valid * target.template y<math_t>(b, c, v, l), valid, k, c, C, P);
    }
    scalar_t* out = dx + b * gg.sb + v * gg.sv;
    for (int64_t c = 0; c < C; ++c) {
      math_t p;
      const ClippedProb<math_t> cp = clipped_at(static_cast<math_t>(row[c * g.sc]), lse, P.bounds, p);
      const math_t h = region_h<math_t, Target>(cp, p, valid * target.template y<math_t>(b, c, v, l), valid, k, c, C, P);
      out[c * gg.sc] = static_cast<scalar_t>(h - p * hsum);
    }
  }
}

// Host side ---------------------------------------------------------------------------------

void check_cuda(const at::Tensor& logits, const at::Tensor& target, const char* op) {
  check_logits(logits, op);
  TORCH_CHECK(logits.is_cuda() && target.device() == logits.device(), "lmfloss_ext::", op,
              " (CUDA): logits and target must be on the same CUDA device");
}


dim3 grid_for(int64_t voxels, int64_t batch) {
  TORCH_CHECK(batch <= 65535, "lmfloss_ext (CUDA): at most 65535 images per call, got ", batch);
  return dim3(static_cast<unsigned>(blocks_per_image(voxels)), static_cast<unsigned>(batch));
}

template <typename math_t>
RowParams<math_t> row_params(const at::Tensor& m, const at::Tensor& lw, const at::Tensor& fw, double alpha, double beta,
                             double gamma, double s) {
  return {m.data_ptr<math_t>(), lw.data_ptr<math_t>(), fw.data_ptr<math_t>(), math_t(alpha), math_t(beta),
          math_t(gamma), math_t(s)};
}

std::tuple<at::Tensor, at::Tensor> row_loss_forward(const at::Tensor& logits_in, const at::Tensor& labels_in,
                                                    const at::Tensor& margins, const at::Tensor& ldam_weight,
                                                    const at::Tensor& focal_weight, double alpha, double beta,
                                                    double gamma, double s, int64_t ignore_index, int64_t reduction) {
  check_cuda(logits_in, labels_in, "row_loss_forward");
  const c10::cuda::CUDAGuard guard(logits_in.device());
  at::Tensor logits = logits_in;
  at::Tensor labels = native_labels(labels_in);
  const Geometry g = class_geometry(logits);
  const Geometry lg = label_geometry(labels, logits.dim());
  const auto mt = math_type(logits);
  const at::Tensor m = class_vector(margins, logits, "margins");
  const at::Tensor lw = class_vector(ldam_weight, logits, "ldam_weight");
  const at::Tensor fw = class_vector(focal_weight, logits, "focal_weight");
  const dim3 grid = grid_for(g.voxels, g.batch);
  const auto options = logits.options();
  at::Tensor per_row = debug_poison(at::empty(labels_in.sizes(), options.dtype(mt)));
  at::Tensor partials = at::empty({int64_t(grid.x) * grid.y, 4}, options.dtype(at::kDouble));
  at::Tensor loss = debug_poison(at::empty({}, options.dtype(mt)));
  at::Tensor norms = debug_poison(at::empty({2}, options.dtype(at::kDouble)));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "row_loss_forward_cuda", [&] {
    using math_t = math_of<scalar_t>;
    const auto P = row_params<math_t>(m, lw, fw, alpha, beta, gamma, s);
    dispatch_labels(labels, [&](auto tag) {
      using label_t = decltype(tag);
      const LabelMap<label_t> target{labels.data_ptr<label_t>(), lg, g.classes, true, ignore_index};
      row_forward_kernel<scalar_t, label_t><<<grid, kThreads, 0, stream>>>(
          logits.data_ptr<scalar_t>(), g, target, P, reduction == kNone ? per_row.data_ptr<math_t>() : nullptr,
          partials.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    row_finalize_kernel<math_t><<<1, 32, 0, stream>>>(partials.data_ptr<double>(), partials.size(0), alpha, beta,
                                                      reduction, loss.data_ptr<math_t>(), norms.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {reduction == kNone ? per_row : loss, norms};
}

at::Tensor row_loss_backward(const at::Tensor& grad, const at::Tensor& logits_in, const at::Tensor& labels_in,
                             const at::Tensor& margins, const at::Tensor& ldam_weight, const at::Tensor& focal_weight,
                             const at::Tensor& norms, double alpha, double beta, double gamma, double s,
                             int64_t ignore_index, int64_t reduction) {
  check_cuda(logits_in, labels_in, "row_loss_backward");
  const c10::cuda::CUDAGuard guard(logits_in.device());
  at::Tensor logits = logits_in;
  at::Tensor labels = native_labels(labels_in);
  const Geometry g = class_geometry(logits);
  const Geometry lg = label_geometry(labels, logits.dim());
  const at::Tensor m = class_vector(margins, logits, "margins");
  const at::Tensor lw = class_vector(ldam_weight, logits, "ldam_weight");
  const at::Tensor fw = class_vector(focal_weight, logits, "focal_weight");
  const at::Tensor go = grad.to(math_type(logits)).contiguous();
  const at::Tensor nm = norms.to(at::kDouble).contiguous();
  at::Tensor grad_in = gradient_like(logits_in);
  at::Tensor grad_view = grad_in;
  const Geometry gg = class_geometry(grad_view);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "row_loss_backward_cuda", [&] {
    using math_t = math_of<scalar_t>;
    const auto P = row_params<math_t>(m, lw, fw, alpha, beta, gamma, s);
    dispatch_labels(labels, [&](auto tag) {
      using label_t = decltype(tag);
      const LabelMap<label_t> target{labels.data_ptr<label_t>(), lg, g.classes, true, ignore_index};
      row_backward_kernel<scalar_t, label_t><<<grid_for(g.voxels, g.batch), kThreads, 0, stream>>>(
          logits.data_ptr<scalar_t>(), g, target, P, go.data_ptr<math_t>(), nm.data_ptr<double>(), reduction,
          grad_view.data_ptr<scalar_t>(), gg);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_in;
}

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
  at::Tensor labels = native_labels(target_in);
  if (labels.dim() == logits.dim()) labels = labels.squeeze(1);
  const Geometry lg = label_geometry(labels, logits.dim());
  dispatch_labels(labels, [&](auto tag) {
    using label_t = decltype(tag);
    fn(LabelMap<label_t>{labels.data_ptr<label_t>(), lg, logits.size(1), ignore_index.has_value(),
                         ignore_index.value_or(0)});
  });
}

template <typename math_t>
RegionParams<math_t> region_params(const at::Tensor& fw, const at::Tensor& fg, double focal_coef, double tversky_coef,
                                   double eps, bool clip) {
  return {fw.data_ptr<math_t>(), fg.data_ptr<math_t>(), ClipBounds<math_t>::make(clip, eps), focal_coef != 0.0,
          tversky_coef != 0.0};
}

std::tuple<at::Tensor, at::Tensor> region_loss_forward(const at::Tensor& logits_in, const at::Tensor& target,
                                                       const at::Tensor& focal_weight, const at::Tensor& focal_gamma,
                                                       const at::Tensor& tversky_exponent, double delta,
                                                       double focal_coef, double tversky_coef, double smooth_nr,
                                                       double smooth_dr, double eps, bool clip, bool batch,
                                                       std::optional<int64_t> ignore_index, int64_t reduction) {
  check_cuda(logits_in, target, "region_loss_forward");
  TORCH_CHECK(logits_in.dim() >= 3, "lmfloss_ext::region_loss_forward: logits must be (B, C, *S), got ",
              logits_in.sizes());
  const c10::cuda::CUDAGuard guard(logits_in.device());
  at::Tensor logits = logits_in;
  const Geometry g = class_geometry(logits);
  const auto mt = math_type(logits);
  const at::Tensor fw = class_vector(focal_weight, logits, "focal_weight");
  const at::Tensor fg = class_vector(focal_gamma, logits, "focal_gamma");
  const at::Tensor ex = class_vector(tversky_exponent, logits, "tversky_exponent").to(at::kDouble);
  const int64_t B = g.batch, C = g.classes, width = RegionStats<double>::width(C);
  const dim3 grid = grid_for(g.voxels, B);
  const auto options = logits.options();
  at::Tensor partials = at::empty({int64_t(grid.x) * B, width}, options.dtype(at::kDouble));
  at::Tensor stats = debug_poison(at::empty({B, width}, options.dtype(at::kDouble)));
  at::Tensor image_loss = at::empty({B}, options.dtype(at::kDouble));
  at::Tensor loss = debug_poison(at::empty(reduction == kNone ? at::IntArrayRef{B} : at::IntArrayRef{}, options.dtype(mt)));
  const RegionScalars S{delta, focal_coef, tversky_coef, smooth_nr, smooth_dr, batch, reduction};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "region_loss_forward_cuda", [&] {
    using math_t = math_of<scalar_t>;
    const auto P = region_params<math_t>(fw, fg, focal_coef, tversky_coef, eps, clip);
    dispatch_target<scalar_t>(logits, target, ignore_index, [&](const auto& acc) {
      region_forward_kernel<<<grid, kThreads, 0, stream>>>(logits.data_ptr<scalar_t>(), g, acc, P,
                                                           partials.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    region_finalize_kernel<math_t><<<1, kThreads, 0, stream>>>(partials.data_ptr<double>(), grid.x, B, C,
                                                               ex.data_ptr<double>(), S, stats.data_ptr<double>(),
                                                               image_loss.data_ptr<double>(), loss.data_ptr<math_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, stats};
}

at::Tensor region_loss_backward(const at::Tensor& grad, const at::Tensor& logits_in, const at::Tensor& target,
                                const at::Tensor& focal_weight, const at::Tensor& focal_gamma,
                                const at::Tensor& tversky_exponent, const at::Tensor& stats_in, double delta,
                                double focal_coef, double tversky_coef, double smooth_nr, double smooth_dr, double eps,
                                bool clip, bool batch, std::optional<int64_t> ignore_index, int64_t reduction) {
  check_cuda(logits_in, target, "region_loss_backward");
  const c10::cuda::CUDAGuard guard(logits_in.device());
  at::Tensor logits = logits_in;
  const Geometry g = class_geometry(logits);
  const at::Tensor fw = class_vector(focal_weight, logits, "focal_weight");
  const at::Tensor fg = class_vector(focal_gamma, logits, "focal_gamma");
  const at::Tensor ex = class_vector(tversky_exponent, logits, "tversky_exponent").to(at::kDouble);
  const at::Tensor stats = stats_in.to(at::kDouble).contiguous();
  const at::Tensor go = grad.to(at::kDouble).contiguous();
  const int64_t B = g.batch, C = g.classes;
  const RegionScalars S{delta, focal_coef, tversky_coef, smooth_nr, smooth_dr, batch, reduction};
  at::Tensor coef = at::empty({B, 3 * C + 1}, logits.options().dtype(math_type(logits)));
  at::Tensor grad_in = gradient_like(logits_in);
  at::Tensor grad_view = grad_in;
  const Geometry gg = class_geometry(grad_view);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "region_loss_backward_cuda", [&] {
    using math_t = math_of<scalar_t>;
    region_coefficients_kernel<math_t><<<1, kThreads, 0, stream>>>(
        stats.data_ptr<double>(), go.data_ptr<double>(), B, C, ex.data_ptr<double>(), S, coef.data_ptr<math_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const auto P = region_params<math_t>(fw, fg, focal_coef, tversky_coef, eps, clip);
    dispatch_target<scalar_t>(logits, target, ignore_index, [&](const auto& acc) {
      region_backward_kernel<<<grid_for(g.voxels, B), kThreads, 0, stream>>>(
          logits.data_ptr<scalar_t>(), g, acc, P, coef.data_ptr<math_t>(), grad_view.data_ptr<scalar_t>(), gg);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_in;
}

}  // namespace
}  // namespace lmfloss::cuda

TORCH_LIBRARY_IMPL(lmfloss_ext, CUDA, m) {
  m.impl("row_loss_forward", &lmfloss::cuda::row_loss_forward);
  m.impl("row_loss_backward", &lmfloss::cuda::row_loss_backward);
  m.impl("region_loss_forward", &lmfloss::cuda::region_loss_forward);
  m.impl("region_loss_backward", &lmfloss::cuda::region_loss_backward);
}
