// Operator schemas of the extension (namespace lmfloss_ext) and the host-side helpers shared by
// the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels, which register their implementations with
// TORCH_LIBRARY_IMPL so the dispatcher picks one by the logits' device.
//
// Ops (their autograd kernels: csrc/autograd.cpp; the Python module and the call plans' prepared
// calls: csrc/prepared.cpp):
//   row_loss_forward     -> (loss, norms)   norms = [sum of valid LDAM weights, number of valid rows]
//   row_loss_backward    -> grad_logits     recomputes the softmax from the logits
//   region_loss_forward  -> (loss, stats)   stats = per-image TP, FN, FP per class, focal sum, valid count
//   region_loss_backward -> grad_logits     finalizes A, E per (image, class) from stats, then one pass
//                           (both: sigmoid = the multi-label mode, focal weight / gamma (2, C), C >= 1;
//                           targets: integer label map (B, *S), float or uint8 dense map (B, C, *S))
//   calf_transform_forward  -> (loss, stats)  loss per image (B,); stats = per image [sum of l_T (+ 0 z
//                                             over every logit), valid voxels, TP, FP, FN] (B, 5) float64
//   calf_transform_backward -> grad_logits    c_b, A_b, E_b per image from stats, then one pass
//   calf_foreground_sizes   -> (counts, strays) per-image class counts (B, C) int64 and the number of
//                                             labels outside [0, C) that are not ignore_index (int64 scalar)
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "common.h"

#include <cstdlib>
#include <limits>

namespace lmfloss {

int64_t flat_stride(const at::Tensor& t, int64_t first) {
  int64_t stride = -1;  // stride of the innermost non-trivial axis seen so far
  int64_t span = 1;     // elements spanned by the axes after the current one
  for (int64_t d = t.dim() - 1; d >= first; --d) {
    const int64_t size = t.size(d);
    if (size == 1) continue;
    if (stride < 0) {
      stride = t.stride(d);
    } else if (t.stride(d) != stride * span) {
      return -1;
    }
    span *= size;
  }
  return stride < 0 ? 1 : stride;
}

Geometry class_geometry(at::Tensor& t) {
  Geometry g;
  g.classes = t.size(1);
  if (t.dim() == 2) {  // (N, C) rows: one "image" of N voxels
    g.batch = 1;
    g.voxels = t.size(0);
    g.sb = 0;
    g.sv = t.stride(0);
    g.sc = t.stride(1);
    return g;
  }
  int64_t sv = flat_stride(t, 2);
  if (sv < 0) {
    t = t.contiguous();
    sv = 1;
  }
  g.batch = t.size(0);
  g.voxels = 1;
  for (int64_t d = 2; d < t.dim(); ++d) g.voxels *= t.size(d);
  g.sb = t.stride(0);
  g.sc = t.stride(1);
  g.sv = sv;
  return g;
}

Geometry flat_geometry(at::Tensor& t) {
  Geometry g;
  int64_t sv = flat_stride(t, 1);
  if (sv < 0) {
    t = t.contiguous();
    sv = 1;
  }
  g.batch = t.size(0);
  g.voxels = t.numel() / std::max<int64_t>(g.batch, 1);
  g.sb = t.stride(0);
  g.sv = sv;
  return g;
}

Geometry label_geometry(at::Tensor& labels, int64_t logits_dim) {
  if (logits_dim == 2) {
    Geometry g;
    g.voxels = labels.size(0);
    g.sv = labels.stride(0);
    return g;
  }
  return flat_geometry(labels);
}

at::Tensor native_labels(const at::Tensor& labels) {
  switch (labels.scalar_type()) {
    case at::kByte:
    case at::kInt:
    case at::kLong:
      return labels;
    case at::kBool:
      return labels.view(at::kByte);
    case at::kChar:
    case at::kShort:
      return labels.to(at::kInt);
    default:
      TORCH_CHECK(at::isIntegralType(labels.scalar_type(), /*includeBool=*/false),
                  "lmfloss_ext: labels must have an integer dtype, got ", labels.scalar_type());
      return labels.to(at::kLong);
  }
}

bool is_dense_map(const at::Tensor& target, const at::Tensor& logits) {
  return target.dim() == logits.dim() && target.size(1) == logits.size(1);
}

at::Tensor dense_byte_map(const at::Tensor& target) {
  if (target.scalar_type() == at::kByte) return target;
  if (target.scalar_type() == at::kBool) return target.view(at::kByte);
  return target.to(at::kByte);
}

at::ScalarType math_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

namespace {
// v as a contiguous tensor of the math dtype on the logits' device: v itself when it already is (the
// usual case: a criterion's constants), without the dispatcher round trips of to() and contiguous().
at::Tensor math_vector(const at::Tensor& v, const at::Tensor& logits) {
  const auto mt = math_type(logits);
  if (v.scalar_type() == mt && v.device() == logits.device() && v.is_contiguous()) return v;
  return v.to(logits.device(), mt).contiguous();
}
}  // namespace

at::Tensor class_vector(const at::Tensor& v, const at::Tensor& logits, const char* name) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == logits.size(1), "lmfloss_ext: ", name, " must have shape (",
              logits.size(1), ",), got ", v.sizes());
  return math_vector(v, logits);
}

at::Tensor focal_table(const at::Tensor& v, const at::Tensor& logits, const char* name, bool sigmoid) {
  if (!sigmoid) return class_vector(v, logits, name);
  TORCH_CHECK(v.dim() == 2 && v.size(0) == 2 && v.size(1) == logits.size(1), "lmfloss_ext: ", name,
              " must have shape (2, ", logits.size(1), ") in sigmoid mode (positive, negative side), got ", v.sizes());
  return math_vector(v, logits);
}

at::Tensor debug_poison(at::Tensor t) {
  const char* flag = std::getenv("LMFLOSS_EXT_POISON");
  if (flag != nullptr && flag[0] == '1') t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

at::Tensor gradient_like(const at::Tensor& logits, int64_t first_voxel_axis) {
  const bool flattens = logits.dim() > first_voxel_axis;
  at::Tensor grad;
  if (flattens && flat_stride(logits, first_voxel_axis) < 0) {
    grad = at::empty_like(logits, at::MemoryFormat::Contiguous);
  } else {
    grad = at::empty_like(logits);
    if (flattens && flat_stride(grad, first_voxel_axis) < 0) {
      grad = at::empty_like(logits, at::MemoryFormat::Contiguous);
    }
  }
  return debug_poison(grad);
}

void check_logits(const at::Tensor& logits, const char* op, int64_t min_classes) {
  TORCH_CHECK(logits.dim() >= 2 && logits.size(1) >= min_classes, "lmfloss_ext::", op,
              ": logits must be (N, C) or (B, C, *S) with C >= ", min_classes, ", got ", logits.sizes());
  const auto t = logits.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, "lmfloss_ext::", op,
              ": logits must be float16, bfloat16, float32 or float64, got ", t);
}

}  // namespace lmfloss

TORCH_LIBRARY(lmfloss_ext, m) {
  m.def(
      "row_loss_forward(Tensor logits, Tensor labels, Tensor margins, Tensor ldam_weight, Tensor focal_weight, "
      "float alpha, float beta, float gamma, float s, int ignore_index, int reduction) -> (Tensor, Tensor)");
  m.def(
      "row_loss_backward(Tensor grad, Tensor logits, Tensor labels, Tensor margins, Tensor ldam_weight, "
      "Tensor focal_weight, Tensor norms, float alpha, float beta, float gamma, float s, int ignore_index, "
      "int reduction) -> Tensor");
  m.def(
      "region_loss_forward(Tensor logits, Tensor target, Tensor focal_weight, Tensor focal_gamma, "
      "Tensor tversky_exponent, float delta, float focal_coef, float tversky_coef, float smooth_nr, "
      "float smooth_dr, float eps, bool clip, bool batch, int? ignore_index, int reduction, bool sigmoid=False) -> "
      "(Tensor, Tensor)");
  m.def(
      "region_loss_backward(Tensor grad, Tensor logits, Tensor target, Tensor focal_weight, Tensor focal_gamma, "
      "Tensor tversky_exponent, Tensor stats, float delta, float focal_coef, float tversky_coef, float smooth_nr, "
      "float smooth_dr, float eps, bool clip, bool batch, int? ignore_index, int reduction, bool sigmoid=False) -> "
      "Tensor");
  m.def(
      "calf_transform_forward(Tensor logits, Tensor target, str transform, float transform_coef, float dice_coef, "
      "float eps, float smooth_nr, float smooth_dr, bool batch, int? ignore_index) -> (Tensor, Tensor)");
  m.def(
      "calf_transform_backward(Tensor grad, Tensor logits, Tensor target, Tensor stats, str transform, "
      "float transform_coef, float dice_coef, float eps, float smooth_nr, float smooth_dr, bool batch, "
      "int? ignore_index) -> Tensor");
  m.def("calf_foreground_sizes(Tensor labels, int num_classes, int? ignore_index) -> (Tensor, Tensor)");
}
