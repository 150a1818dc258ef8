// CPU kernels of the row family: LMF = alpha * LDAM + beta * focal (reference.row_loss).
//
// Forward: one pass; per chunk the sums [sum w_t l^LDAM, sum w_t, sum a_t l^F, valid rows].
// The forward also applies the non-finite logits policy (tile.h, nonfinite_probe).
// Backward: recomputes both softmaxes and writes
//     d/dz_j = c_L s (softmax(zeta)_j - [j == t]) + c_F G(p_t) (p_j - [j == t])
// instead of storing a gradient during the forward: that reads the logits once more but
// writes nothing extra (3 passes over logit-sized memory instead of 4).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <vector>

#include "tile.h"

namespace lmfloss::cpu {
namespace {

template <typename math_t>
struct RowParams {
  const math_t* margins;
  const math_t* ldam_weight;
  const math_t* focal_weight;
  math_t alpha, beta, gamma, s;
  int64_t ignore;
};

// LDAM logits zeta_c = s (z_c - m_t [c == t]) of a tile.
template <typename math_t>
void ldam_logits(const math_t* z, const int64_t* label, const RowParams<math_t>& P, int64_t classes, math_t* zeta) {
  for (int64_t c = 0; c < classes; ++c) {
    const math_t margin = P.margins[c];
    for (int64_t t = 0; t < kTile; ++t) {
      zeta[c * kTile + t] = ldam_logit(z[c * kTile + t], P.s, margin, label[t] == c);
    }
  }
}

// Loads a tile and computes log p, p (in z, p) and, when alpha != 0, log softmax(zeta), softmax(zeta).
template <typename scalar_t, typename label_t>
struct RowTile {
  using math_t = math_of<scalar_t>;
  const scalar_t* x;
  Geometry g;
  LabelMap<label_t> target;
  const RowParams<math_t>& P;
  std::vector<math_t> buf;
  math_t *z, *p, *zeta, *q;
  int64_t label[kTile];
  math_t valid[kTile];

  RowTile(const scalar_t* x_, const Geometry& g_, const LabelMap<label_t>& target_, const RowParams<math_t>& P_)
      : x(x_), g(g_), target(target_), P(P_), buf(4 * g_.classes * kTile) {
    z = buf.data();
    p = z + g.classes * kTile;
    zeta = p + g.classes * kTile;
    q = zeta + g.classes * kTile;
  }

  // probe (forward only): the rows' non-finite probes, taken before the softmax overwrites z.
  void load(int64_t b, int64_t v0, int64_t n, math_t* probe = nullptr) {
    load_tile(x, g, b, v0, n, z);
    if (probe != nullptr) nonfinite_probe(z, g.classes, probe);
    target.load(b, v0, n, label, valid, static_cast<math_t*>(nullptr));
    if (P.alpha != math_t(0)) {
      ldam_logits(z, label, P, g.classes, zeta);
      softmax_tile(zeta, q, g.classes);
    }
    softmax_tile(z, p, g.classes);
  }
};

template <typename scalar_t, typename label_t>
void row_forward_impl(const at::Tensor& logits_in, const at::Tensor& labels_in, const RowParams<math_of<scalar_t>>& P,
                      bool per_row_out, at::Tensor& per_row, std::vector<double>& partials) {
  using math_t = math_of<scalar_t>;
  at::Tensor logits = logits_in, labels = labels_in;
  const Geometry g = class_geometry(logits);
  const Geometry lg = label_geometry(labels, logits.dim());  // may make `labels` contiguous: before data_ptr
  const LabelMap<label_t> target{labels.data_ptr<label_t>(), lg, g.classes, true, P.ignore};
  const int64_t per_image = chunks_per_image(g.voxels);
  partials.assign(g.batch * per_image * 4, 0.0);
  math_t* out = per_row_out ? per_row.data_ptr<math_t>() : nullptr;

  at::parallel_for(0, g.batch * per_image, parallel_grain(kChunk * g.classes), [&](int64_t begin, int64_t end) {
    RowTile<scalar_t, label_t> tile(logits.data_ptr<scalar_t>(), g, target, P);
    math_t probe[kTile];
    // Per lane: the true class's LDAM logit, log p and p, and the class weights (0 on ignored and
    // padding lanes), gathered first so that the loss loop below vectorises (with the gathers in it,
    // it ran one lane at a time).
    math_t zeta_t[kTile], log_pt[kTile], pt[kTile], w_ldam[kTile], w_focal[kTile], rows[kTile];
    const bool ldam = P.alpha != math_t(0), focal = P.beta != math_t(0);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      double* acc = partials.data() + chunk * 4;
      for_tiles(chunk, per_image, g.voxels, [&](int64_t b, int64_t v0, int64_t n) {
        tile.load(b, v0, n, probe);
        for (int64_t t = 0; t < kTile; ++t) {
          const int64_t c = tile.label[t] < 0 ? 0 : tile.label[t];
          zeta_t[t] = ldam ? tile.zeta[c * kTile + t] : math_t(0);
          log_pt[t] = tile.z[c * kTile + t];
          pt[t] = tile.p[c * kTile + t];
          w_ldam[t] = P.ldam_weight[c] * tile.valid[t];
          w_focal[t] = P.focal_weight[c] * tile.valid[t];
        }
        const math_t alpha = P.alpha, beta = P.beta, gamma = P.gamma;
        const math_t* valid = tile.valid;
        math_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
        for (int64_t t = 0; t < kTile; ++t) {
          math_t row = 0;
          if (ldam) {
            const math_t wce = -w_ldam[t] * zeta_t[t];
            s0 += wce;
            s1 += w_ldam[t];
            row += alpha * wce;
          }
          if (focal) {
            const math_t u = one_minus_p(log_pt[t], pt[t]);
            const math_t fl = w_focal[t] * focal_modulation<TileMath>(u, gamma) * (-log_pt[t]);
            s2 += fl;
            row += beta * fl;
          }
          // The non-finite probe enters the row's loss and both weighted sums (whichever term is on).
          s0 += probe[t];
          s2 += probe[t];
          s3 += valid[t];
          rows[t] = row + probe[t];
        }
        if (out != nullptr) {
          for (int64_t t = 0; t < n; ++t) out[b * g.voxels + v0 + t] = rows[t];
        }
        acc[0] += s0;
        acc[1] += s1;
        acc[2] += s2;
        acc[3] += s3;
      });
    }
  });
}

template <typename scalar_t, typename label_t>
void row_backward_impl(const at::Tensor& grad_out, const at::Tensor& logits_in, const at::Tensor& labels_in,
                       const RowParams<math_of<scalar_t>>& P, const double* norms, int64_t reduction,
                       at::Tensor& grad_in) {
  using math_t = math_of<scalar_t>;
  at::Tensor logits = logits_in, labels = labels_in;
  const Geometry g = class_geometry(logits);
  const Geometry gg = class_geometry(grad_in);
  const Geometry lg = label_geometry(labels, logits.dim());  // may make `labels` contiguous: before data_ptr
  const LabelMap<label_t> target{labels.data_ptr<label_t>(), lg, g.classes, true, P.ignore};
  scalar_t* dx = grad_in.data_ptr<scalar_t>();
  const math_t* go = grad_out.data_ptr<math_t>();
  // d loss / d (row term): grad_output ("none": per row), divided for "mean" by the normalisers
  // (LDAM: the sum of valid weights, focal: the number of valid rows).
  const math_t ldam_scale = P.alpha * P.s * (reduction == kMean ? math_t(1.0 / norms[0]) : math_t(1));
  const math_t focal_scale = P.beta * (reduction == kMean ? math_t(1.0 / norms[1]) : math_t(1));
  const int64_t per_image = chunks_per_image(g.voxels);

  at::parallel_for(0, g.batch * per_image, parallel_grain(kChunk * g.classes), [&](int64_t begin, int64_t end) {
    RowTile<scalar_t, label_t> tile(logits.data_ptr<scalar_t>(), g, target, P);
    math_t c_ldam[kTile], c_focal[kTile], log_pt[kTile], pt[kTile];
    const bool focal = P.beta != math_t(0);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      for_tiles(chunk, per_image, g.voxels, [&](int64_t b, int64_t v0, int64_t n) {
        tile.load(b, v0, n);
        // Gathers first (the true class's log p and p, the weights times d loss / d row), then the
        // focal factor in a loop of its own, which vectorises.
        for (int64_t t = 0; t < kTile; ++t) {
          const int64_t c = tile.label[t] < 0 ? 0 : tile.label[t];
          const math_t v = tile.valid[t];
          const math_t g_row = reduction == kNone ? (t < n ? go[b * g.voxels + v0 + t] : math_t(0)) : go[0];
          c_ldam[t] = ldam_scale * P.ldam_weight[c] * v * g_row;
          c_focal[t] = focal_scale * P.focal_weight[c] * v * g_row;
          log_pt[t] = tile.z[c * kTile + t];
          pt[t] = tile.p[c * kTile + t];
        }
        if (focal) {
          const math_t gamma = P.gamma;
#pragma omp simd
          for (int64_t t = 0; t < kTile; ++t) {
            const ClippedProb<math_t> cp{pt[t], one_minus_p(log_pt[t], pt[t]), log_pt[t], 1, 1, 1};  // rows: no clip
            c_focal[t] *= focal_factor<TileMath>(cp, pt[t], gamma);
          }
        } else {
          for (int64_t t = 0; t < kTile; ++t) c_focal[t] = math_t(0);
        }
        const bool ldam = P.alpha != math_t(0);
        for (int64_t c = 0; c < g.classes; ++c) {
          scalar_t* out = dx + b * gg.sb + c * gg.sc + v0 * gg.sv;
          const math_t* pc = tile.p + c * kTile;
          const math_t* qc = tile.q + c * kTile;
          for (int64_t t = 0; t < n; ++t) {
            const math_t hot = tile.label[t] == c ? math_t(1) : math_t(0);
            math_t d = c_focal[t] * (pc[t] - hot);
            if (ldam) d += c_ldam[t] * (qc[t] - hot);
            out[t * gg.sv] = static_cast<scalar_t>(d);
          }
        }
      });
    }
  });
}

template <typename math_t>
RowParams<math_t> row_params(const at::Tensor& m, const at::Tensor& lw, const at::Tensor& fw, double alpha, double beta,
                             double gamma, double s, int64_t ignore_index) {
  return {m.data_ptr<math_t>(), lw.data_ptr<math_t>(), fw.data_ptr<math_t>(), math_t(alpha), math_t(beta),
          math_t(gamma),        math_t(s),             ignore_index};
}

std::tuple<at::Tensor, at::Tensor> row_loss_forward(const at::Tensor& logits, const at::Tensor& labels_in,
                                                    const at::Tensor& margins, const at::Tensor& ldam_weight,
                                                    const at::Tensor& focal_weight, double alpha, double beta,
                                                    double gamma, double s, int64_t ignore_index, int64_t reduction) {
  check_cpu(logits, labels_in, "row_loss_forward");
  const at::Tensor labels = native_labels(labels_in);
  const auto mt = math_type(logits);
  const at::Tensor m = class_vector(margins, logits, "margins");
  const at::Tensor lw = class_vector(ldam_weight, logits, "ldam_weight");
  const at::Tensor fw = class_vector(focal_weight, logits, "focal_weight");
  // The label-sized per-row losses only for reduction="none": "mean" and "sum" need the 4 sums alone.
  at::Tensor per_row =
      reduction == kNone ? debug_poison(at::empty(labels_in.sizes(), logits.options().dtype(mt))) : at::Tensor();
  std::vector<double> partials;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "row_loss_forward_cpu", [&] {
    const auto P = row_params<math_of<scalar_t>>(m, lw, fw, alpha, beta, gamma, s, ignore_index);
    dispatch_labels(labels, [&](auto tag) {
      row_forward_impl<scalar_t, decltype(tag)>(logits, labels, P, reduction == kNone, per_row, partials);
    });
  });
  // Chunk partials added in chunk order (deterministic whatever the thread count), in double.
  double tot[4] = {0, 0, 0, 0};
  for (size_t i = 0; i < partials.size(); ++i) tot[i % 4] += partials[i];
  at::Tensor norms = debug_poison(at::empty({2}, logits.options().dtype(at::kDouble)));
  norms.data_ptr<double>()[0] = tot[1];
  norms.data_ptr<double>()[1] = tot[3];
  if (reduction == kNone) return {per_row, norms};
  double value = alpha * tot[0] + beta * tot[2];
  if (reduction == kMean) {
    // A term with coefficient 0 is not evaluated (no 0 * NaN when every row is ignored).
    value = (alpha != 0.0 ? alpha * (tot[0] / tot[1]) : 0.0) + (beta != 0.0 ? beta * (tot[2] / tot[3]) : 0.0);
  }
  return {at::scalar_tensor(value, logits.options().dtype(mt)), norms};
}

at::Tensor row_loss_backward(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& labels_in,
                             const at::Tensor& margins, const at::Tensor& ldam_weight, const at::Tensor& focal_weight,
                             const at::Tensor& norms, double alpha, double beta, double gamma, double s,
                             int64_t ignore_index, int64_t reduction) {
  check_cpu(logits, labels_in, "row_loss_backward");
  const at::Tensor labels = native_labels(labels_in);
  const at::Tensor m = class_vector(margins, logits, "margins");
  const at::Tensor lw = class_vector(ldam_weight, logits, "ldam_weight");
  const at::Tensor fw = class_vector(focal_weight, logits, "focal_weight");
  const at::Tensor go = grad.to(math_type(logits)).contiguous();
  const at::Tensor nm = norms.to(at::kDouble).contiguous();
  at::Tensor grad_in = gradient_like(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "row_loss_backward_cpu", [&] {
    const auto P = row_params<math_of<scalar_t>>(m, lw, fw, alpha, beta, gamma, s, ignore_index);
    dispatch_labels(labels, [&](auto tag) {
      row_backward_impl<scalar_t, decltype(tag)>(go, logits, labels, P, nm.data_ptr<double>(), reduction, grad_in);
    });
  });
  return grad_in;
}

}  // namespace
}  // namespace lmfloss::cpu

TORCH_LIBRARY_IMPL(lmfloss_ext, CPU, m) {
  m.impl("row_loss_forward", &lmfloss::cpu::row_loss_forward);
  m.impl("row_loss_backward", &lmfloss::cpu::row_loss_backward);
}
