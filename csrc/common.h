// Host-side preparation shared by the CPU and CUDA implementations: the ops' declarations, the
// (B, C, V) strided geometry of logits / targets / gradients, and argument conversions.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace lmfloss {

enum Reduction : int64_t { kNone = 0, kSum = 1, kMean = 2 };

// A tensor seen as (B, C, V) through strides: every loss is a loop over B images, C classes and V
// voxels (rows are B = 1, V = N). Offsets are int64 everywhere.
struct Geometry {
  int64_t batch = 1, classes = 1, voxels = 1;
  int64_t sb = 0, sc = 0, sv = 0;
};

// The stride that walks the flattened spatial axes dims[first..], if they can be flattened
// without a copy (size-1 axes are free); -1 otherwise.
int64_t flat_stride(const at::Tensor& t, int64_t first);

// (B, C, V) geometry of a (N, C) or (B, C, *S) tensor; makes `t` contiguous first if its spatial
// axes cannot be flattened as a view (rare: some permuted or expanded layouts).
Geometry class_geometry(at::Tensor& t);
// (B, V) geometry (classes = 1) of a (B, *S) tensor, every axis after the batch axis a voxel axis;
// makes `t` contiguous first if those axes cannot be flattened as a view.
Geometry flat_geometry(at::Tensor& t);
// (B, V) geometry (classes = 1) of labels of shape (N,) or (B, *S), paired with logits of rank `logits_dim`.
Geometry label_geometry(at::Tensor& labels, int64_t logits_dim);

// Labels in a dtype the kernels read natively (uint8, int32, int64): bool is reinterpreted as uint8,
// int8 / int16 are widened to int32 (half the bytes of int64), other integer dtypes to int64.
at::Tensor native_labels(const at::Tensor& labels);

// An integer target of the logits' rank and class count is a dense 0/1 map (B, C, *S) (a (B, 1, *S)
// one next to C > 1 classes is a label map); dense_byte_map returns it as uint8, the dtype the
// kernels read (bool is reinterpreted, other integer dtypes are converted: validation has already).
bool is_dense_map(const at::Tensor& target, const at::Tensor& logits);
at::Tensor dense_byte_map(const at::Tensor& target);

// Calls fn(label_t{}) with the C++ type of labels that native_labels returned.
template <typename Fn>
void dispatch_labels(const at::Tensor& labels, Fn&& fn) {
  switch (labels.scalar_type()) {
    case at::kByte:
      return fn(uint8_t{});
    case at::kInt:
      return fn(int32_t{});
    default:
      return fn(int64_t{});
  }
}

// Per-class vector as a contiguous tensor of the math dtype on the logits' device.
at::Tensor class_vector(const at::Tensor& v, const at::Tensor& logits, const char* name);
// The region family's focal weight / gamma: a class vector (C,), or in sigmoid mode a (2, C) table
// (row 0 the positive side, row 1 the negative side: element [C + c]), contiguous, math dtype.
at::Tensor focal_table(const at::Tensor& v, const at::Tensor& logits, const char* name, bool sigmoid);
at::ScalarType math_type(const at::Tensor& logits);

// Uninitialised gradient of the logits' shape and dtype whose spatial axes (dims first_voxel_axis..)
// flatten as a view (the logits' own layout when it allows it: contiguous, channels-last, ...).
at::Tensor gradient_like(const at::Tensor& logits, int64_t first_voxel_axis = 2);

// Test hook: with LMFLOSS_EXT_POISON=1 in the environment every output buffer starts as NaN, so
// an element a kernel forgets to write shows up in the tests. Returns `t`.
at::Tensor debug_poison(at::Tensor t);

// Logits (N, C) or (B, C, *S) of a float dtype with at least min_classes classes (the sigmoid mode
// of the region family takes C = 1).
void check_logits(const at::Tensor& logits, const char* op, int64_t min_classes = 2);

}  // namespace lmfloss
