// CUDA kernels of the two loss families, from the same math header as the CPU kernels (with its
// LibmMath policy: CUDA's own expf / logf / powf).
//
// One thread per voxel (row) in grid-stride loops over one image (blockIdx.y = image). Dense
// (B, C, *S) logits are class-strided, so each class load reads consecutive voxels across a warp;
// (N, C) rows with contiguous classes are staged through shared memory (see Rows). Loss math in
// float (double for float64), int64 offsets, everything on the current stream, no host
// synchronisation.
//
// Reductions are deterministic (bitwise identical results run to run): each block reduces its
// threads' partial sums with a fixed shuffle tree and writes them to its own slot of each column;
// column_sums_kernel then adds each column's slots with a fixed tree (a block per column: every
// thread adds 4 of up to 1024 slots in order, then block_sum), in double. No atomics. The slot
// count is a function of the shape only (blocks_per_image).
//
// Non-finite logits policy (functional.py; the backend's nonfinite_in_kernel): the kernels add the probe
// sum_c 0 * z_c of every row / voxel (0, or NaN when a logit is NaN or +-inf; ignored ones too) to
// the row's loss and the sums of a row loss, and to the focal column of a region image, which every
// finalize adds to the image's loss (as 0 * column without a focal term) and no backward reads.
//
//   rows    : row_forward (partials) -> column_sums -> row_finalize (loss, norms); row_backward
//   regions : region_forward (partials) -> column_sums (stats) -> region_finalize (loss);
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

// out[col] = sum of partials[col * slots + s] over the slots s, one block per column: thread i
// adds slots i, i + kThreads, ... in order (4 dependent adds for 1024 slots, instead of 1024 in
// one thread), then block_sum's fixed tree. Same order on every run.
__global__ void __launch_bounds__(kThreads) column_sums_kernel(const double* partials, int64_t slots, double* out) {
  __shared__ double shared[kWarps];
  const double* column = partials + int64_t(blockIdx.x) * slots;
  double sum = 0.0;
  for (int64_t s = threadIdx.x; s < slots; s += kThreads) sum += column[s];
  sum = block_sum(sum, shared);
  if (threadIdx.x == 0) out[blockIdx.x] = sum;
}

// Integer label map (B, V) in its native dtype (uint8, int32 or int64: native_labels). label() is
// the class or -1 (ignored or out of [0, C): masked for memory safety; validation rejects such
// labels before the call when asked to). The width is a runtime field: a uniform branch per label,
// where a template parameter would triple the kernels (and the build time) once more.
struct LabelMap {
  static constexpr bool kSoft = false;
  const void* ptr;
  int bytes;
  Geometry g;
  int64_t classes;
  bool has_ignore;
  int64_t ignore;

  __device__ int64_t label(int64_t b, int64_t v) const {
    const int64_t i = b * g.sb + v * g.sv;
    const int64_t l = bytes == 1   ? int64_t(static_cast<const uint8_t*>(ptr)[i])
                      : bytes == 4 ? int64_t(static_cast<const int32_t*>(ptr)[i])
                                   : static_cast<const int64_t*>(ptr)[i];
    return ((has_ignore && l == ignore) || l < 0 || l >= classes) ? -1 : l;
  }
  template <typename T>
  __device__ T y(int64_t, int64_t c, int64_t, int64_t l) const {
    return l == c ? T(1) : T(0);
  }
};

// Dense map (B, C, V), read in its own dtype (target_t: a float one-hot / soft map in the logits'
// dtype or the math type, or a uint8 0/1 one-hot / multi-hot map) and converted to the math type
// per element; every voxel is valid (label() = 0). uint8 is a type of its own, not a runtime field
// as LabelMap's width: a flag in the float maps' kernels cost them 11-12 registers (ptxas, sm_90).
template <typename target_t>
struct SoftMap {
  static constexpr bool kSoft = true;
  const target_t* ptr;
  Geometry g;

  __device__ int64_t label(int64_t, int64_t) const { return 0; }
  template <typename T>
  __device__ T y(int64_t b, int64_t c, int64_t v, int64_t) const {
    return static_cast<T>(ptr[b * g.sb + c * g.sc + v * g.sv]);
  }
};

template <typename math_t, typename T>
__device__ SoftmaxStats<math_t> softmax_of(const T* row, int64_t classes, int64_t sc) {
  SoftmaxStats<math_t> st = softmax_init<math_t>();
  for (int64_t c = 0; c < classes; ++c) softmax_push<LibmMath>(st, static_cast<math_t>(row[c * sc]));
  return st;
}

// Rows --------------------------------------------------------------------------------------
//
// One thread per row. (N, C) rows with contiguous classes (class stride 1) are staged through
// shared memory a tile of kThreads rows at a time (RowTile): the block loads (and, in the backward,
// stores) the tile's n * C consecutive elements with consecutive threads on consecutive addresses,
// so a warp's load or store covers whole 32-byte sectors; reading its own row from its own
// class-strided address instead would touch a sector per thread and class (8x the store sectors for
// bf16 C = 8). The tile's row stride is odd (C | 1), so the threads' rows fall in distinct banks.
// Class-strided layouts ((B, C, *S) dense rows) are read in place: consecutive threads already read
// consecutive voxels. Rows with C > kStageMaxC (long-tailed classification, C ~ 1000) are read in
// place too: their per-thread rows are long enough for L1 to serve the sectors a warp shares.

constexpr int kStageMaxC = 32;  // a float tile of 256 x 33: 33 KB of shared memory

template <typename math_t>
struct RowParams {
  const math_t* margins;
  const math_t* ldam_weight;
  const math_t* focal_weight;
  math_t alpha, beta, gamma, s;
};

template <typename math_t, typename T>
__device__ SoftmaxStats<math_t> ldam_softmax_of(const T* row, int64_t classes, int64_t sc, int64_t t,
                                                const RowParams<math_t>& P) {
  SoftmaxStats<math_t> st = softmax_init<math_t>();
  for (int64_t c = 0; c < classes; ++c) {
    softmax_push<LibmMath>(st, ldam_logit(static_cast<math_t>(row[c * sc]), P.s, P.margins[t], c == t));
  }
  return st;
}

// Staging of rows [r0, r0 + n) of class-contiguous rows (element (r, c) at base[r * sv + c]) as
// tile[r * stride + c]: thread i of the block handles elements i, i + kThreads, ... of the n * C
// in row-major order, stepping its (row, class) by (kThreads / C, kThreads % C) without a division.
struct RowTile {
  int classes, stride;

  template <typename F>
  __device__ void for_elements(int n, F&& f) const {
    const int step_r = kThreads / classes, step_c = kThreads % classes;
    int r = threadIdx.x / classes, c = threadIdx.x % classes;
    while (r < n) {
      f(r, c);
      r += step_r;
      c += step_c;
      if (c >= classes) {
        c -= classes;
        ++r;
      }
    }
  }
  template <typename math_t, typename scalar_t>
  __device__ void load(const scalar_t* base, int64_t sv, int n, math_t* tile) const {
    for_elements(n, [&](int r, int c) { tile[r * stride + c] = static_cast<math_t>(base[r * sv + c]); });
  }
  template <typename math_t, typename scalar_t>
  __device__ void store(const math_t* tile, int n, scalar_t* base, int64_t sv) const {
    for_elements(n, [&](int r, int c) { base[r * sv + c] = static_cast<scalar_t>(tile[r * stride + c]); });
  }
};

// Loss of one row (row[c * sc]) with label l (-1: ignored): adds [w l_LDAM, w, a l_F, valid] to acc
// and returns the row's alpha w l_LDAM + beta a l_F. probe = sum_c 0 * z_c (0, or NaN when a logit
// is NaN or +-inf) goes into the row's loss and into both weighted sums (a sum leaves out a term
// whose coefficient is 0): the non-finite policy without a second read of the logits.
template <typename math_t, typename T>
__device__ math_t row_loss_terms(const T* row, int64_t C, int64_t sc, int64_t l, const RowParams<math_t>& P,
                                 math_t (&acc)[4]) {
  const math_t valid = l >= 0 ? math_t(1) : math_t(0);
  const int64_t t = l >= 0 ? l : 0;
  const math_t zt = static_cast<math_t>(row[t * sc]);
  math_t probe = 0, value = 0;
  for (int64_t c = 0; c < C; ++c) probe += math_t(0) * static_cast<math_t>(row[c * sc]);
  if (P.alpha != math_t(0)) {
    const SoftmaxStats<math_t> st = ldam_softmax_of(row, C, sc, t, P);
    const math_t w = P.ldam_weight[t] * valid;
    const math_t wce = -w * log_softmax<LibmMath>(st).at(ldam_logit(zt, P.s, P.margins[t], true));
    acc[0] += wce;
    acc[1] += w;
    value += P.alpha * wce;
  }
  if (P.beta != math_t(0)) {
    const math_t log_p = log_softmax<LibmMath>(softmax_of<math_t>(row, C, sc)).at(zt);
    const math_t fl = P.focal_weight[t] * valid * focal_modulation<LibmMath>(-math_expm1(log_p), P.gamma) * (-log_p);
    acc[2] += fl;
    value += P.beta * fl;
  }
  acc[0] += probe;
  acc[2] += probe;
  acc[3] += valid;
  return value + probe;
}

// Blocks of image b walk tiles of kThreads rows; the loop bound is uniform over the block, as the
// staged tiles' barriers need. partials: column k (of 4), slot b * gridDim.x + blockIdx.x.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    row_forward_kernel(const scalar_t* x, Geometry g, LabelMap target, RowParams<math_of<scalar_t>> P,
                       RowTile stage, bool staged, math_of<scalar_t>* per_row, double* partials) {
  using math_t = math_of<scalar_t>;
  extern __shared__ unsigned char stage_bytes[];
  math_t* tile = reinterpret_cast<math_t*>(stage_bytes);
  __shared__ math_t shared[kWarps];
  const int64_t b = blockIdx.y;
  math_t acc[4] = {0, 0, 0, 0};
  for (int64_t v0 = blockIdx.x * int64_t(kThreads); v0 < g.voxels; v0 += int64_t(gridDim.x) * kThreads) {
    const int n = g.voxels - v0 < kThreads ? static_cast<int>(g.voxels - v0) : kThreads;
    const int64_t v = v0 + threadIdx.x;
    if (staged) {
      __syncthreads();  // the previous tile is consumed
      stage.load(x + b * g.sb + v0 * g.sv, g.sv, n, tile);
      __syncthreads();
    }
    if (threadIdx.x < n) {
      const int64_t l = target.label(b, v);
      const math_t value = staged ? row_loss_terms(tile + threadIdx.x * stage.stride, g.classes, 1, l, P, acc)
                                  : row_loss_terms(x + b * g.sb + v * g.sv, g.classes, g.sc, l, P, acc);
      if (per_row != nullptr) per_row[b * g.voxels + v] = value;
    }
  }
  const int64_t slots = int64_t(gridDim.x) * gridDim.y;
  for (int k = 0; k < 4; ++k) {
    const math_t total = block_sum(acc[k], shared);
    if (threadIdx.x == 0) partials[k * slots + b * gridDim.x + blockIdx.x] = total;
  }
}

// totals: [sum w l_LDAM, sum w, sum a l_F, valid rows] (column_sums_kernel of the partials).
template <typename math_t>
__global__ void row_finalize_kernel(const double* totals, double alpha, double beta, int64_t reduction, math_t* loss,
                                    double* norms) {
  norms[0] = totals[1];
  norms[1] = totals[3];
  if (reduction == kSum) *loss = math_t(alpha * totals[0] + beta * totals[2]);
  // A term with coefficient 0 is not evaluated (no 0 * NaN when every row is ignored).
  if (reduction == kMean) {
    *loss = math_t((alpha != 0.0 ? alpha * (totals[0] / totals[1]) : 0.0) +
                   (beta != 0.0 ? beta * (totals[2] / totals[3]) : 0.0));
  }
}

// Gradient of one row (row[c * sc] -> out[c * oc]; out may alias row: each logit is read before
// its gradient is written).
template <typename math_t, typename T, typename O>
__device__ void row_gradient(const T* row, int64_t C, int64_t sc, int64_t l, math_t g_row, const RowParams<math_t>& P,
                             math_t ldam_scale, math_t focal_scale, O* out, int64_t oc) {
  const math_t valid = l >= 0 ? math_t(1) : math_t(0);
  const int64_t t = l >= 0 ? l : 0;
  g_row *= valid;
  const LogSoftmax<math_t> lse = log_softmax<LibmMath>(softmax_of<math_t>(row, C, sc));
  LogSoftmax<math_t> lse_ldam{0, 0};
  math_t c_ldam = 0, c_focal = 0;
  if (P.alpha != math_t(0)) {
    lse_ldam = log_softmax<LibmMath>(ldam_softmax_of(row, C, sc, t, P));
    c_ldam = ldam_scale * P.ldam_weight[t] * g_row;
  }
  if (P.beta != math_t(0)) {
    const math_t log_p = lse.at(static_cast<math_t>(row[t * sc]));
    const ClippedProb<math_t> cp{math_exp(log_p), -math_expm1(log_p), log_p, 1, 1, 1};
    c_focal = focal_scale * P.focal_weight[t] * g_row * focal_factor<LibmMath>(cp, cp.q, P.gamma);
  }
  for (int64_t c = 0; c < C; ++c) {
    const math_t z = static_cast<math_t>(row[c * sc]);
    const math_t hot = c == t ? math_t(1) : math_t(0);
    math_t d = c_focal * (math_exp(lse.at(z)) - hot);
    if (P.alpha != math_t(0)) d += c_ldam * (math_exp(lse_ldam.at(ldam_logit(z, P.s, P.margins[t], c == t))) - hot);
    out[c * oc] = static_cast<O>(d);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    row_backward_kernel(const scalar_t* x, Geometry g, LabelMap target, RowParams<math_of<scalar_t>> P,
                        RowTile stage, bool staged, const math_of<scalar_t>* grad_out, const double* norms,
                        int64_t reduction, scalar_t* dx, Geometry gg) {
  using math_t = math_of<scalar_t>;
  extern __shared__ unsigned char stage_bytes[];
  math_t* tile = reinterpret_cast<math_t*>(stage_bytes);
  const int64_t b = blockIdx.y;
  const bool mean = reduction == kMean;
  const math_t ldam_scale = P.alpha * P.s * (mean ? math_t(1.0 / norms[0]) : math_t(1));
  const math_t focal_scale = P.beta * (mean ? math_t(1.0 / norms[1]) : math_t(1));
  for (int64_t v0 = blockIdx.x * int64_t(kThreads); v0 < g.voxels; v0 += int64_t(gridDim.x) * kThreads) {
    const int n = g.voxels - v0 < kThreads ? static_cast<int>(g.voxels - v0) : kThreads;
    const int64_t v = v0 + threadIdx.x;
    if (staged) {
      __syncthreads();  // the previous tile is stored
      stage.load(x + b * g.sb + v0 * g.sv, g.sv, n, tile);
      __syncthreads();
    }
    if (threadIdx.x < n) {
      const int64_t l = target.label(b, v);
      const math_t g_row = reduction == kNone ? grad_out[b * g.voxels + v] : grad_out[0];
      if (staged) {
        math_t* row = tile + threadIdx.x * stage.stride;
        row_gradient(row, g.classes, 1, l, g_row, P, ldam_scale, focal_scale, row, 1);
      } else {
        row_gradient(x + b * g.sb + v * g.sv, g.classes, g.sc, l, g_row, P, ldam_scale, focal_scale,
                     dx + b * gg.sb + v * gg.sv, gg.sc);
      }
    }
    if (staged) {
      __syncthreads();
      stage.store(tile, n, dx + b * gg.sb + v0 * gg.sv, gg.sv);
    }
  }
}

// Regions -----------------------------------------------------------------------------------
//
// The classes of a voxel live in registers: each kernel is instantiated for a class capacity
// kMaxC (dispatch_capacity: the smallest of 4, 8, 16 that holds C; 4 for float64, a test
// precision), so each logit is read once, the softmax is computed once and every per-class term
// (exp, expm1, pow) is evaluated once per voxel in the forward and once in the backward; slots
// beyond C cost a uniform branch. Only C > kMaxC (C > 16; C > 4 in float64) takes ceil(C / kMaxC)
// passes over the classes, each re-reading the voxel's logits for its softmax (the backward twice:
// sum_c h_c first). Why not a larger capacity: the forward keeps 5 values per class in registers
// (TP, FN, FP sums, log p, p); measured with ptxas for sm_90 (table at the end of this file),
// kMaxC = 16 takes 128 registers (25% occupancy) and kMaxC = 32 took 255 (12.5%), which leaves
// too few loads in flight per SM to cover DRAM latency, for a gain only at C > 16.
//
// Sigmoid (multi-label) mode (kSigmoid; same passes, reductions, finalize and coefficients): each
// channel is its own binary problem (loss_math.h, sigmoid_channel), so a pass over the channels
// [c0, c0 + kMaxC) reads only their logits and C > kMaxC costs no re-read; the capacity is 4 or 8
// in the forward (dispatch_capacity), 4 in the backward, which writes d loss / d z_c directly (no
// sum over the classes).

// The largest class capacity of a math type (dispatch_capacity): only its kernels meet C > kMaxC,
// the others compile without the multi-pass code.
template <typename math_t>
constexpr int kLargestCapacity = std::is_same_v<math_t, double> ? 4 : 16;

template <typename math_t>
struct RegionParams {
  const math_t* focal_weight;  // (C,), or (2, C) in sigmoid mode: [c] positive, [C + c] negative side
  const math_t* focal_gamma;
  ClipBounds<math_t> bounds;
  bool with_focal, with_tversky;
};

// log p and p of the classes [c0, c0 + kMaxC) of one voxel (0 beyond C), and the voxel's
// non-finite probe sum_c 0 * z_c over all its classes (0, or NaN when a logit is NaN or +-inf).
template <int kMaxC, typename math_t, typename scalar_t>
__device__ void voxel_probs(const scalar_t* row, int64_t C, int64_t sc, int64_t c0, math_t (&log_p)[kMaxC],
                            math_t (&p)[kMaxC], math_t& probe) {
  SoftmaxStats<math_t> st = softmax_init<math_t>();
  probe = 0;
  if (C <= kMaxC || kMaxC < kLargestCapacity<math_t>) {  // each logit read once, into registers
#pragma unroll
    for (int j = 0; j < kMaxC; ++j) {
      log_p[j] = j < C ? static_cast<math_t>(row[j * sc]) : math_t(0);
      probe += math_t(0) * log_p[j];
      if (j < C) softmax_max(st, log_p[j]);
    }
#pragma unroll
    for (int j = 0; j < kMaxC; ++j) {
      log_p[j] -= st.max;
      p[j] = j < C ? math_exp(log_p[j]) : math_t(0);
      st.sum += p[j];
    }
    const math_t log_sum = math_log(st.sum), inv = math_t(1) / st.sum;
#pragma unroll
    for (int j = 0; j < kMaxC; ++j) {
      log_p[j] -= log_sum;
      p[j] *= inv;
    }
    return;
  }
  for (int64_t c = 0; c < C; ++c) {
    const math_t z = static_cast<math_t>(row[c * sc]);
    probe += math_t(0) * z;
    softmax_push<LibmMath>(st, z);
  }
  const LogSoftmax<math_t> lse = log_softmax<LibmMath>(st);
#pragma unroll
  for (int j = 0; j < kMaxC; ++j) {
    const int64_t c = c0 + j;
    log_p[j] = c < C ? lse.at(static_cast<math_t>(row[c * sc])) : math_t(0);
    p[j] = c < C ? math_exp(log_p[j]) : math_t(0);
  }
}

template <typename math_t>
__device__ ClippedProb<math_t> clipped(math_t log_p, math_t p, const ClipBounds<math_t>& bounds) {
  return clip_prob(log_p, p, -math_expm1(log_p), bounds);
}

// Sigmoid mode: adds the TP, FN, FP terms of the channels [c0, c0 + kMaxC) of one voxel (label l)
// to tp, fn, fp, and their focal terms and non-finite probe (0 * z) to focal. The channels' loads are
// issued before their first use.
template <int kMaxC, typename math_t, typename scalar_t, typename Target>
__device__ void sigmoid_voxel_sums(const scalar_t* row, const Target& target, int64_t b, int64_t v, int64_t l,
                                   int64_t C, int64_t sc, int64_t c0, const RegionParams<math_t>& P,
                                   math_t (&tp)[kMaxC], math_t (&fn)[kMaxC], math_t (&fp)[kMaxC], math_t& focal) {
  const math_t valid = l >= 0 ? math_t(1) : math_t(0);
  math_t z[kMaxC];
#pragma unroll
  for (int j = 0; j < kMaxC; ++j) z[j] = c0 + j < C ? static_cast<math_t>(row[(c0 + j) * sc]) : math_t(0);
#pragma unroll
  for (int j = 0; j < kMaxC; ++j) {
    const int64_t c = c0 + j;
    if (c >= C) break;
    const SigmoidChannel<math_t> ch = sigmoid_channel<LibmMath>(z[j], P.bounds);
    const math_t y = valid * target.template y<math_t>(b, c, v, l);
    tp[j] += y * ch.q;
    fn[j] += y * ch.one_minus_q;
    fp[j] += (valid - y) * ch.q;
    focal += math_t(0) * z[j];
    if (P.with_focal) {
      focal += sigmoid_focal_term<LibmMath>(ch.q, ch.one_minus_q, ch.log_q, ch.log_one_minus_q, y, valid, P.focal_weight[c], P.focal_gamma[c],
                                            P.focal_weight[C + c], P.focal_gamma[C + c]);
    }
  }
}

template <typename scalar_t, typename Target, int kMaxC, bool kSigmoid>
__global__ void __launch_bounds__(kThreads) region_forward_kernel(const scalar_t* x, Geometry g, Target target,
                                                                  RegionParams<math_of<scalar_t>> P, double* partials) {
  using math_t = math_of<scalar_t>;
  __shared__ math_t shared[kWarps];
  const int64_t b = blockIdx.y;
  const int64_t C = g.classes;
  const int64_t width = RegionStats<double>::width(C);
  // Column k of image b; each block owns one slot of it (the layout column_sums_kernel reads).
  auto put = [&](int64_t k, math_t value) {
    const math_t total = block_sum(value, shared);
    if (threadIdx.x == 0) partials[(b * width + k) * gridDim.x + blockIdx.x] = total;
  };
  math_t focal = 0, count = 0;
  for (int64_t c0 = 0; c0 < C; c0 += kMaxC) {  // one pass unless C > kMaxC
    math_t tp[kMaxC], fn[kMaxC], fp[kMaxC];
#pragma unroll
    for (int j = 0; j < kMaxC; ++j) tp[j] = fn[j] = fp[j] = math_t(0);
    for (int64_t v = blockIdx.x * int64_t(kThreads) + threadIdx.x; v < g.voxels; v += int64_t(gridDim.x) * kThreads) {
      const int64_t l = target.label(b, v);
      const math_t valid = l >= 0 ? math_t(1) : math_t(0);
      if constexpr (kSigmoid) {
        sigmoid_voxel_sums<kMaxC>(x + b * g.sb + v * g.sv, target, b, v, l, C, g.sc, c0, P, tp, fn, fp, focal);
        if (c0 == 0) count += valid;
        continue;
      }
      math_t log_p[kMaxC], p[kMaxC], probe;
      voxel_probs<kMaxC>(x + b * g.sb + v * g.sv, C, g.sc, c0, log_p, p, probe);
      math_t u_l = 1, log_q_l = 0;  // label maps: 1 - q and log q of class l, picked by selects
#pragma unroll
      for (int j = 0; j < kMaxC; ++j) {
        const int64_t c = c0 + j;
        if (c >= C) break;
        const ClippedProb<math_t> cp = clipped(log_p[j], p[j], P.bounds);
        const math_t y = valid * target.template y<math_t>(b, c, v, l);
        tp[j] += y * cp.q;
        fn[j] += y * cp.u;
        fp[j] += (valid - y) * cp.q;
        if constexpr (Target::kSoft) {
          // A select, not y * term: without the clip a -inf logit has log q = -inf and 0 * inf = NaN.
          if (P.with_focal) {
            const math_t modulation = focal_modulation<LibmMath>(cp.u, P.focal_gamma[c]);
            const math_t term = P.focal_weight[c] * y * modulation * (-cp.log_q);
            focal += y != math_t(0) ? term : math_t(0);
          }
        } else {
          u_l = c == l ? cp.u : u_l;
          log_q_l = c == l ? cp.log_q : log_q_l;
        }
      }
      if constexpr (!Target::kSoft) {
        // Only class l has y = 1: one pow per voxel (selects above, no divergent branch per class).
        if (P.with_focal && l >= c0 && l < c0 + kMaxC) {
          focal += P.focal_weight[l] * focal_modulation<LibmMath>(u_l, P.focal_gamma[l]) * (-log_q_l);
        }
      }
      if (c0 == 0) {
        count += valid;
        focal += probe;  // the non-finite policy: the focal column of an image with a bad logit is NaN
      }
    }
#pragma unroll
    for (int j = 0; j < kMaxC; ++j) {
      if (c0 + j < C) {
        put(c0 + j, tp[j]);
        put(C + c0 + j, fn[j]);
        put(2 * C + c0 + j, fp[j]);
      }
    }
  }
  put(RegionStats<double>::focal(C), focal);
  put(RegionStats<double>::count(C), count);
}

struct RegionScalars {
  double delta, focal_coef, tversky_coef, smooth_nr, smooth_dr;
  bool batch;
  int64_t reduction;
};

// TP, FN, FP of class c for Tversky row r: image r's own sums, or (batch = true, r = 0) the sums
// over the batch, added in image order.
struct TverskySums {
  double tp, fn, fp;
};

__device__ TverskySums tversky_sums(const double* stats, int64_t r, int64_t c, int64_t batch, int64_t C,
                                    bool batch_sum) {
  const int64_t width = RegionStats<double>::width(C);
  TverskySums s{0.0, 0.0, 0.0};
  for (int64_t b = batch_sum ? 0 : r; b < (batch_sum ? batch : r + 1); ++b) {
    s.tp += stats[b * width + c];
    s.fn += stats[b * width + C + c];
    s.fp += stats[b * width + 2 * C + c];
  }
  return s;
}

__device__ TverskyTerm<double> tversky_of(const double* stats, int64_t r, int64_t c, int64_t batch, int64_t C,
                                          const double* exponent, const RegionScalars& S) {
  const TverskySums s = tversky_sums(stats, r, c, batch, C, S.batch);
  return tversky_term(s.tp, s.fn, s.fp, S.delta, S.smooth_nr, S.smooth_dr, exponent[c]);
}

// One block. Tversky rows: R = 1 with batch = true (the batch's sums, computed once and shared by
// every image), else R = B. work: R * C terms, then R class means.
template <typename math_t>
__global__ void region_finalize_kernel(const double* stats, int64_t batch, int64_t C, const double* exponent,
                                       RegionScalars S, double* work, math_t* loss) {
  __shared__ double shared[kWarps];
  const int64_t width = RegionStats<double>::width(C);
  const int64_t rows = S.batch ? 1 : batch;
  double* terms = work;
  double* region = work + rows * C;
  if (S.tversky_coef != 0.0) {
    for (int64_t i = threadIdx.x; i < rows * C; i += kThreads) {
      terms[i] = tversky_of(stats, i / C, i % C, batch, C, exponent, S).value;
    }
    __syncthreads();
    for (int64_t r = threadIdx.x; r < rows; r += kThreads) {
      double sum = 0.0;
      for (int64_t c = 0; c < C; ++c) sum += terms[r * C + c];
      region[r] = sum / double(C);
    }
    __syncthreads();
  }
  double part = 0.0;  // this thread's images, in order; then a fixed tree over the threads
  for (int64_t b = threadIdx.x; b < batch; b += kThreads) {
    const double* st = stats + b * width;
    const double focal = st[RegionStats<double>::focal(C)];  // carries the non-finite probe
    double value = S.focal_coef != 0.0 ? S.focal_coef * focal * region_focal_scale(st, C) : 0.0 * focal;
    if (S.tversky_coef != 0.0) value += S.tversky_coef * region[S.batch ? 0 : b];
    if (S.reduction == kNone) loss[b] = math_t(value);
    part += value;
  }
  const double total = block_sum(part, shared);
  if (threadIdx.x == 0 && S.reduction != kNone) loss[0] = math_t(S.reduction == kMean ? total / double(batch) : total);
}

// coef: per image [dTP_c, dFN_c, dFP_c (3C), focal scale], already times d loss / d L_b. One block.
template <typename math_t>
__global__ void region_coefficients_kernel(const double* stats, const double* grad, int64_t batch, int64_t C,
                                           const double* exponent, RegionScalars S, math_t* coef) {
  __shared__ double shared[kWarps];
  const int64_t width = RegionStats<double>::width(C);
  auto weight = [&](int64_t b) {  // d loss / d L_b
    return S.reduction == kNone ? grad[b] : (S.reduction == kMean ? grad[0] / double(batch) : grad[0]);
  };
  double part = 0.0;
  for (int64_t b = threadIdx.x; b < batch; b += kThreads) part += weight(b);
  const double w_total = block_sum(part, shared);  // in thread 0
  __syncthreads();
  if (threadIdx.x == 0) shared[0] = w_total;
  __syncthreads();
  const double w_batch = shared[0];
  for (int64_t b = threadIdx.x; b < batch; b += kThreads) {
    math_t* k = coef + b * (3 * C + 1);
    k[3 * C] = S.focal_coef != 0.0 ? math_t(S.focal_coef * weight(b) * region_focal_scale(stats + b * width, C))
                                   : math_t(0);
  }
  const int64_t rows = S.batch ? 1 : batch;
  for (int64_t i = threadIdx.x; i < rows * C; i += kThreads) {
    const int64_t r = i / C, c = i % C;
    TverskyTerm<double> term{0.0, 0.0, 0.0, 0.0};
    if (S.tversky_coef != 0.0) term = tversky_of(stats, r, c, batch, C, exponent, S);
    // With batch = true the shared index enters every image's loss: its weight is sum_b w_b, and the
    // one term of the batch is written to every image's coefficients.
    for (int64_t b = S.batch ? 0 : r; b < (S.batch ? batch : r + 1); ++b) {
      const double scale = S.tversky_coef * (S.batch ? w_batch : weight(b)) / double(C);
      math_t* k = coef + b * (3 * C + 1);
      k[c] = math_t(scale * term.d_tp);
      k[C + c] = math_t(scale * term.d_fn);
      k[2 * C + c] = math_t(scale * term.d_fp);
    }
  }
}

// h_c = d loss / d log p_c (clip masks included) of the classes [c0, c0 + kMaxC) of one voxel (0
// beyond C), and their p_c.
template <int kMaxC, typename math_t, typename scalar_t, typename Target>
__device__ void voxel_h(const scalar_t* row, const Target& target, int64_t b, int64_t v, int64_t l, int64_t C,
                        int64_t sc, int64_t c0, const math_t* k, const RegionParams<math_t>& P, math_t (&h)[kMaxC],
                        math_t (&p)[kMaxC]) {
  const math_t valid = l >= 0 ? math_t(1) : math_t(0);
  math_t log_p[kMaxC], probe;
  voxel_probs<kMaxC>(row, C, sc, c0, log_p, p, probe);
  ClippedProb<math_t> cp_l{0, 1, 0, 1, 1, 1};  // label maps: class l's, picked by selects
  math_t p_l = 0;
#pragma unroll
  for (int j = 0; j < kMaxC; ++j) {
    const int64_t c = c0 + j;
    h[j] = 0;
    if (c >= C) continue;
    const ClippedProb<math_t> cp = clipped(log_p[j], p[j], P.bounds);
    const math_t y = valid * target.template y<math_t>(b, c, v, l);
    if (P.with_tversky) h[j] = p[j] * (cp.mask_q * (k[c] * y + k[2 * C + c] * (valid - y)) - cp.mask_u * k[C + c] * y);
    if constexpr (Target::kSoft) {
      if (P.with_focal) {
        // A select, not y * factor: without the clip a -inf logit gives 0 * NaN (r = log q / u = -inf).
        const math_t d = k[3 * C] * P.focal_weight[c] * y * focal_factor<LibmMath>(cp, p[j], P.focal_gamma[c]);
        h[j] -= y != math_t(0) ? d : math_t(0);
      }
    } else {
      cp_l = c == l ? cp : cp_l;
      p_l = c == l ? p[j] : p_l;
    }
  }
  if constexpr (!Target::kSoft) {
    if (P.with_focal && l >= c0 && l < c0 + kMaxC) {  // one focal factor (pow) per voxel
      const math_t d = k[3 * C] * P.focal_weight[l] * focal_factor<LibmMath>(cp_l, p_l, P.focal_gamma[l]);
#pragma unroll
      for (int j = 0; j < kMaxC; ++j) h[j] -= c0 + j == l ? d : math_t(0);
    }
  }
}

// Sigmoid mode: writes d loss / d z_c of the channels [c0, c0 + kMaxC) of one voxel (label l) to
// out[c * osc]; k: the image's coefficients (region_coefficients_kernel).
template <int kMaxC, typename math_t, typename scalar_t, typename Target>
__device__ void sigmoid_voxel_grad(const scalar_t* row, const Target& target, int64_t b, int64_t v, int64_t l,
                                   int64_t C, int64_t sc, int64_t c0, const math_t* k, const RegionParams<math_t>& P,
                                   scalar_t* out, int64_t osc) {
  const math_t valid = l >= 0 ? math_t(1) : math_t(0);
  const math_t focal_scale = k[3 * C];
  math_t z[kMaxC];
#pragma unroll
  for (int j = 0; j < kMaxC; ++j) z[j] = c0 + j < C ? static_cast<math_t>(row[(c0 + j) * sc]) : math_t(0);
#pragma unroll
  for (int j = 0; j < kMaxC; ++j) {
    const int64_t c = c0 + j;
    if (c >= C) break;
    const SigmoidChannel<math_t> ch = sigmoid_channel<LibmMath>(z[j], P.bounds);
    const math_t y = valid * target.template y<math_t>(b, c, v, l);
    math_t d = sigmoid_tversky_grad(ch, y, valid, k[c], k[C + c], k[2 * C + c]);
    if (P.with_focal) {
      d += sigmoid_focal_grad<LibmMath>(ch, y, valid, focal_scale * P.focal_weight[c], P.focal_gamma[c],
                                        focal_scale * P.focal_weight[C + c], P.focal_gamma[C + c]);
    }
    out[c * osc] = static_cast<scalar_t>(d);
  }
}

template <typename scalar_t, typename Target, int kMaxC, bool kSigmoid>
__global__ void __launch_bounds__(kThreads)
    region_backward_kernel(const scalar_t* x, Geometry g, Target target, RegionParams<math_of<scalar_t>> P,
                           const math_of<scalar_t>* coef, scalar_t* dx, Geometry gg) {
  using math_t = math_of<scalar_t>;
  const int64_t b = blockIdx.y;
  const int64_t C = g.classes;
  const math_t* k = coef + b * (3 * C + 1);
  for (int64_t v = blockIdx.x * int64_t(kThreads) + threadIdx.x; v < g.voxels; v += int64_t(gridDim.x) * kThreads) {
    const int64_t l = target.label(b, v);
    const scalar_t* row = x + b * g.sb + v * g.sv;
    scalar_t* out = dx + b * gg.sb + v * gg.sv;
    if constexpr (kSigmoid) {
      for (int64_t c0 = 0; c0 < C; c0 += kMaxC) {
        sigmoid_voxel_grad<kMaxC>(row, target, b, v, l, C, g.sc, c0, k, P, out, gg.sc);
      }
      continue;
    }
    math_t h[kMaxC], p[kMaxC], hsum = 0;
    if (C <= kMaxC || kMaxC < kLargestCapacity<math_t>) {  // every class in registers, each term once
      voxel_h<kMaxC>(row, target, b, v, l, C, g.sc, 0, k, P, h, p);
#pragma unroll
      for (int j = 0; j < kMaxC; ++j) hsum += h[j];
#pragma unroll
      for (int j = 0; j < kMaxC; ++j) {
        if (j < C) out[j * gg.sc] = static_cast<scalar_t>(h[j] - p[j] * hsum);
      }
    } else {  // more classes than registers: a first pass for sum_c h_c, then h recomputed and written
      for (int64_t c0 = 0; c0 < C; c0 += kMaxC) {
        voxel_h<kMaxC>(row, target, b, v, l, C, g.sc, c0, k, P, h, p);
#pragma unroll
        for (int j = 0; j < kMaxC; ++j) hsum += h[j];
      }
      for (int64_t c0 = 0; c0 < C; c0 += kMaxC) {
        voxel_h<kMaxC>(row, target, b, v, l, C, g.sc, c0, k, P, h, p);
#pragma unroll
        for (int j = 0; j < kMaxC; ++j) {
          if (c0 + j < C) out[(c0 + j) * gg.sc] = static_cast<scalar_t>(h[j] - p[j] * hsum);
        }
      }
    }
  }
}

// Host side ---------------------------------------------------------------------------------

void check_cuda(const at::Tensor& logits, const at::Tensor& target, const char* op, int64_t min_classes = 2) {
  check_logits(logits, op, min_classes);
  TORCH_CHECK(logits.is_cuda() && target.device() == logits.device(), "lmfloss_ext::", op,
              " (CUDA): logits and target must be on the same CUDA device");
}

// labels: what native_labels returned (uint8, int32 or int64).
LabelMap label_map(const at::Tensor& labels, const Geometry& lg, int64_t classes, std::optional<int64_t> ignore_index) {
  return {labels.const_data_ptr(), static_cast<int>(labels.element_size()), lg, classes, ignore_index.has_value(),
          ignore_index.value_or(0)};
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

// Shared-memory bytes of a staged row tile, or 0 where rows are read in place: classes not
// contiguous (class stride != 1 in the logits or the gradient), or C > kStageMaxC, or a tile over
// the default 48 KB (float64 beyond C = 23).
template <typename math_t>
size_t row_stage_bytes(const Geometry& g, const Geometry* gg, const RowTile& stage) {
  const bool contiguous = g.sc == 1 && (gg == nullptr || gg->sc == 1);
  const size_t bytes = size_t(kThreads) * stage.stride * sizeof(math_t);
  return contiguous && g.classes <= kStageMaxC && bytes <= 48 * 1024 ? bytes : 0;
}

RowTile row_tile(const Geometry& g) {
  const int classes = static_cast<int>(std::min<int64_t>(g.classes, kStageMaxC));
  return {classes, classes | 1};
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
  const int64_t slots = int64_t(grid.x) * grid.y;
  const auto options = logits.options();
  // The label-sized per-row losses only for reduction="none": "mean" and "sum" need the 4 sums alone.
  at::Tensor per_row =
      reduction == kNone ? debug_poison(at::empty(labels_in.sizes(), options.dtype(mt))) : at::Tensor();
  at::Tensor partials = at::empty({4, slots}, options.dtype(at::kDouble));
  at::Tensor totals = at::empty({4}, options.dtype(at::kDouble));
  at::Tensor loss = debug_poison(at::empty({}, options.dtype(mt)));
  at::Tensor norms = debug_poison(at::empty({2}, options.dtype(at::kDouble)));
  const RowTile stage = row_tile(g);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "row_loss_forward_cuda", [&] {
    using math_t = math_of<scalar_t>;
    const auto P = row_params<math_t>(m, lw, fw, alpha, beta, gamma, s);
    const size_t smem = row_stage_bytes<math_t>(g, nullptr, stage);
    row_forward_kernel<scalar_t><<<grid, kThreads, smem, stream>>>(
        logits.data_ptr<scalar_t>(), g, label_map(labels, lg, g.classes, ignore_index), P, stage, smem > 0,
        reduction == kNone ? per_row.data_ptr<math_t>() : nullptr, partials.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    column_sums_kernel<<<4, kThreads, 0, stream>>>(partials.data_ptr<double>(), slots, totals.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    row_finalize_kernel<math_t><<<1, 1, 0, stream>>>(totals.data_ptr<double>(), alpha, beta, reduction,
                                                     loss.data_ptr<math_t>(), norms.data_ptr<double>());
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
  const RowTile stage = row_tile(g);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "row_loss_backward_cuda", [&] {
    using math_t = math_of<scalar_t>;
    const auto P = row_params<math_t>(m, lw, fw, alpha, beta, gamma, s);
    const size_t smem = row_stage_bytes<math_t>(g, &gg, stage);
    row_backward_kernel<scalar_t><<<grid_for(g.voxels, g.batch), kThreads, smem, stream>>>(
        logits.data_ptr<scalar_t>(), g, label_map(labels, lg, g.classes, ignore_index), P, stage, smem > 0,
        go.data_ptr<math_t>(), nm.data_ptr<double>(), reduction, grad_view.data_ptr<scalar_t>(), gg);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_in;
}

// Calls fn(target accessor): a label map in its native integer dtype, a float map read in the
// logits' dtype (a bf16 / fp16 one-hot next to bf16 / fp16 logits: no copy) or in the math type
// (other float dtypes are converted to it once), or a uint8 dense map (dense_byte_map) read as it is.
template <typename scalar_t, typename Fn>
void dispatch_target(const at::Tensor& logits, const at::Tensor& target_in, std::optional<int64_t> ignore_index,
                     Fn&& fn) {
  using math_t = math_of<scalar_t>;
  if (target_in.is_floating_point()) {
    if constexpr (!std::is_same_v<scalar_t, math_t>) {
      if (target_in.scalar_type() == logits.scalar_type()) {
        at::Tensor target = target_in;
        const Geometry tg = class_geometry(target);
        fn(SoftMap<scalar_t>{target.data_ptr<scalar_t>(), tg});
        return;
      }
    }
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
  fn(label_map(labels, lg, logits.size(1), ignore_index));
}

// Calls fn(std::integral_constant<int, kMaxC>) with the class capacity of the region kernels:
// the smallest of 4, 8, 16 that holds C (16 beyond: several passes); 4 for float64. Sigmoid mode:
// 4 or 8 (beyond: passes of 8 channels, which re-read no logit).
template <typename math_t, bool kSigmoid, typename Fn>
void dispatch_capacity(int64_t classes, Fn&& fn) {
  if constexpr (std::is_same_v<math_t, double>) {
    fn(std::integral_constant<int, kLargestCapacity<double>>{});
  } else {
    if (classes <= 4) return fn(std::integral_constant<int, 4>{});
    if (kSigmoid || classes <= 8) return fn(std::integral_constant<int, 8>{});
    if constexpr (!kSigmoid) fn(std::integral_constant<int, kLargestCapacity<float>>{});
  }
}

// Calls fn(std::bool_constant<sigmoid>): the softmax or the sigmoid (multi-label) kernels.
template <typename Fn>
void dispatch_mode(bool sigmoid, Fn&& fn) {
  if (sigmoid) return fn(std::true_type{});
  fn(std::false_type{});
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
                                                       std::optional<int64_t> ignore_index, int64_t reduction,
                                                       bool sigmoid) {
  check_cuda(logits_in, target, "region_loss_forward", sigmoid ? 1 : 2);
  TORCH_CHECK(logits_in.dim() >= 3, "lmfloss_ext::region_loss_forward: logits must be (B, C, *S), got ",
              logits_in.sizes());
  const c10::cuda::CUDAGuard guard(logits_in.device());
  at::Tensor logits = logits_in;
  const Geometry g = class_geometry(logits);
  const auto mt = math_type(logits);
  const at::Tensor fw = focal_table(focal_weight, logits, "focal_weight", sigmoid);
  const at::Tensor fg = focal_table(focal_gamma, logits, "focal_gamma", sigmoid);
  const at::Tensor ex = class_vector(tversky_exponent, logits, "tversky_exponent").to(at::kDouble);
  const int64_t B = g.batch, C = g.classes, width = RegionStats<double>::width(C);
  const dim3 grid = grid_for(g.voxels, B);
  const auto options = logits.options();
  at::Tensor partials = at::empty({B * width, int64_t(grid.x)}, options.dtype(at::kDouble));
  at::Tensor stats = debug_poison(at::empty({B, width}, options.dtype(at::kDouble)));
  const int64_t tversky_rows = batch ? 1 : B;
  at::Tensor work = at::empty({tversky_rows * (C + 1)}, options.dtype(at::kDouble));
  at::Tensor loss =
      debug_poison(at::empty(reduction == kNone ? at::IntArrayRef{B} : at::IntArrayRef{}, options.dtype(mt)));
  const RegionScalars S{delta, focal_coef, tversky_coef, smooth_nr, smooth_dr, batch, reduction};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "region_loss_forward_cuda", [&] {
    using math_t = math_of<scalar_t>;
    const auto P = region_params<math_t>(fw, fg, focal_coef, tversky_coef, eps, clip);
    dispatch_target<scalar_t>(logits, target, ignore_index, [&](const auto& acc) {
      dispatch_mode(sigmoid, [&](auto mode) {
        constexpr bool kSigmoid = decltype(mode)::value;
        dispatch_capacity<math_t, kSigmoid>(C, [&](auto capacity) {
          region_forward_kernel<scalar_t, std::decay_t<decltype(acc)>, decltype(capacity)::value, kSigmoid>
              <<<grid, kThreads, 0, stream>>>(logits.data_ptr<scalar_t>(), g, acc, P, partials.data_ptr<double>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
    column_sums_kernel<<<static_cast<unsigned>(B * width), kThreads, 0, stream>>>(partials.data_ptr<double>(), grid.x,
                                                                                   stats.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    region_finalize_kernel<math_t><<<1, kThreads, 0, stream>>>(stats.data_ptr<double>(), B, C, ex.data_ptr<double>(),
                                                               S, work.data_ptr<double>(), loss.data_ptr<math_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, stats};
}

at::Tensor region_loss_backward(const at::Tensor& grad, const at::Tensor& logits_in, const at::Tensor& target,
                                const at::Tensor& focal_weight, const at::Tensor& focal_gamma,
                                const at::Tensor& tversky_exponent, const at::Tensor& stats_in, double delta,
                                double focal_coef, double tversky_coef, double smooth_nr, double smooth_dr, double eps,
                                bool clip, bool batch, std::optional<int64_t> ignore_index, int64_t reduction,
                                bool sigmoid) {
  check_cuda(logits_in, target, "region_loss_backward", sigmoid ? 1 : 2);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  at::Tensor logits = logits_in;
  const Geometry g = class_geometry(logits);
  const at::Tensor fw = focal_table(focal_weight, logits, "focal_weight", sigmoid);
  const at::Tensor fg = focal_table(focal_gamma, logits, "focal_gamma", sigmoid);
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
      dispatch_mode(sigmoid, [&](auto mode) {
        constexpr bool kSigmoid = decltype(mode)::value;
        const auto launch = [&](auto capacity) {
          region_backward_kernel<scalar_t, std::decay_t<decltype(acc)>, decltype(capacity)::value, kSigmoid>
              <<<grid_for(g.voxels, B), kThreads, 0, stream>>>(
                  logits.data_ptr<scalar_t>(), g, acc, P, coef.data_ptr<math_t>(), grad_view.data_ptr<scalar_t>(), gg);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        // The sigmoid backward takes 4 channels at a time whatever C: with 8 logits in flight, the focal
        // gradient's two precise divisions (a call on their slow path) spilled 8 bytes (ptxas, sm_90).
        if constexpr (kSigmoid) {
          launch(std::integral_constant<int, 4>{});
        } else {
          dispatch_capacity<math_t, false>(C, launch);
        }
      });
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

// Resources, from ptxas -v for sm_90 (CUDA 13.0, -O3), 256 threads per block; occupancy from the
// registers alone (resident warps of 64). Before issue 12 -> now:
//   row_forward       64 registers (50%)          -> 48 (62%), plus the staged tile: 256 x (C | 1)
//                                                    floats of shared memory (3 KB at C = 2, 33 KB at 32)
//   row_backward      48 (62%)                    -> 48 (62%)
//   region_forward    71 (37%), every C in passes -> kMaxC 4: 47-48 (62%; float labels 64, 50%),
//                     of 8 classes                   8: 79 (37%), 16: 127-128 (25%)
//   region_backward   47-48 (62%)                 -> kMaxC 4: 34-35 (75%; float soft 60, 50%),
//                                                    8: 45-48 (62%), 16: 80 soft (37%), 128 labels (25%)
//   float64           forward 122-128 (25%), backward 64-66 -> forward 94-106 (25%), backward 76-92
//   column_sums 30, region_finalize 54, region_coefficients 58 (one block each, or one per column)
// At kMaxC = 16 a warp issues the loads of all 16 logits of its voxels before their first use: 16
// resident warps per SM keep 16 x 32 x 16 x 2 B = 16 KB (bf16) in flight, about what 3 TB/s needs
// over ~600 ns of DRAM latency on 132 SMs (14 KB per SM). Spills: none, except
// region_backward<*, SoftMap, 16> (soft targets with 9 to 16 classes): 32 bytes of stack, a kernel
// argument reloaded from L1 once per class after each call of the precise division's slow path
// (the call's ABI leaves too few registers across it at 80 live values).
// Build cost: 67 kernels, about 2 CPU-minutes per architecture (before: 62 kernels, 46 s); one
// template parameter per label dtype and a capacity of 32 had made it 151 kernels and 4 minutes.
// Issue 13 (sigmoid mode, uint8 dense maps; CUDA 13.0, sm_90, same flags): 111 region kernels, no
// spills. Softmax: every forward and every label-map backward as before; float-map backward at
// kMaxC 4 / 8 within 2 registers, at 16 112 registers and no spill (was 80 with 32 + 116 bytes).
// uint8 maps: the float maps' numbers (forward 55 / 79 / 127, backward 34-53 / 47 / 112). Sigmoid:
// forward kMaxC 4: 40-59 (labels 48), 8: 63-64; backward (kMaxC 4 only) 55-62; float64 forward
// 96-100, backward 88-95. 126 kernels in all (67 before): about 5 minutes of nvcc for sm_90 here.
