// Autograd kernels of lmfloss_ext::row_loss_forward and lmfloss_ext::region_loss_forward: the two
// families' gradients as C++ graph nodes.
//
// The Python custom ops (lmfloss_kernels/ext/ops.py) carry the same formulas for torch.compile,
// opcheck and torch.func; in plain eager calls the package calls these ops directly
// (lmfloss_kernels/_autograd.py, call_op), so a training step of a row or region loss creates one
// C++ node and runs no Python in its backward: on small inputs that Python node and its backward
// callback cost several times the kernels.
//
// Both families have the same shape, so one template serves them:
// forward:  (loss, aux) = <family>_loss_forward(five tensors, options...) below autograd; aux (the row
//           normalisers / the region statistics) is non-differentiable.
// backward: grad_logits = <family>_loss_backward(grad_loss, five tensors, aux, options...); first order
//           only: a create_graph=True backward (grad mode on inside backward) raises, as the Python
//           formula does (the kernels compute the gradient without a graph of their own).

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/ivalue.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cstddef>
#include <optional>
#include <tuple>
#include <utility>

namespace lmfloss {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr std::size_t kTensorInputs = 5;  // logits, target and three per-class tensors, in both families

// The dispatcher ops of one family, by name.
struct RowOps {
  static constexpr const char* forward = "lmfloss_ext::row_loss_forward";
  static constexpr const char* backward = "lmfloss_ext::row_loss_backward";
};
struct RegionOps {
  static constexpr const char* forward = "lmfloss_ext::region_loss_forward";
  static constexpr const char* backward = "lmfloss_ext::region_loss_backward";
};

// Same words as lmfloss_kernels._autograd.refuse_double_backward; the backends are named by device type.
void refuse_double_backward(const at::Tensor& logits) {
  TORCH_CHECK(!at::GradMode::is_enabled(), "double backward is not supported by backend '",
              c10::DeviceTypeName(logits.device().type(), /*lower_case=*/true),
              "' (create_graph=True builds a graph of a gradient that its fused kernels compute without one); "
              "use backend='reference' for higher-order gradients");
}

// Options are the scalar arguments after the five tensors (double, int64_t, bool, std::optional<int64_t>).
template <typename Ops, typename... Options>
struct FusedLoss : public torch::autograd::Function<FusedLoss<Ops, Options...>> {
  using ForwardFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                        const at::Tensor&, const at::Tensor&, Options...);
  using BackwardFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, const at::Tensor&, Options...);

  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target,
                               const at::Tensor& first, const at::Tensor& second, const at::Tensor& third,
                               Options... options) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow(Ops::forward, "").template typed<ForwardFn>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, aux] = op.call(logits, target, first, second, third, options...);
    ctx->save_for_backward({logits, target, first, second, third, aux});
    ctx->mark_non_differentiable({aux});
    // aux never receives a gradient: no zeros are materialised for it (nor for an unused loss).
    ctx->set_materialize_grads(false);
    ctx->saved_data["options"] = c10::ivalue::Tuple::create({c10::IValue(options)...});
    return {loss, aux};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    refuse_double_backward(saved[0]);
    variable_list result(kTensorInputs + sizeof...(Options));
    if (!grads[0].defined()) return result;
    const auto options = ctx->saved_data["options"].toTupleRef().elements().asArrayRef();
    result[0] = call_backward(grads[0], saved, options, std::index_sequence_for<Options...>{});
    return result;
  }

  template <std::size_t... I>
  static at::Tensor call_backward(const at::Tensor& grad, const variable_list& saved,
                                  c10::ArrayRef<c10::IValue> options, std::index_sequence<I...>) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow(Ops::backward, "").template typed<BackwardFn>();
    return op.call(grad, saved[0], saved[1], saved[2], saved[3], saved[4], saved[5],
                   options[I].template to<Options>()...);
  }
};

// Whether a call can make a graph node: grad mode on and an input that requires a gradient, or a
// forward-mode tangent on the logits (which the node's Function refuses, as it should keep doing).
inline bool wants_node(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& first,
                       const at::Tensor& second, const at::Tensor& third) {
  if (logits._fw_grad(/*level=*/0).defined()) return true;
  return at::GradMode::is_enabled() && (logits.requires_grad() || target.requires_grad() || first.requires_grad() ||
                                        second.requires_grad() || third.requires_grad());
}

template <typename Ops, typename... Options>
std::tuple<at::Tensor, at::Tensor> fused_loss_autograd(const at::Tensor& logits, const at::Tensor& target,
                                                       const at::Tensor& first, const at::Tensor& second,
                                                       const at::Tensor& third, Options... options) {
  if (!wants_node(logits, target, first, second, third)) {
    // No node to make (validation under no_grad, inputs that need no gradient): the kernel alone,
    // without the Function machinery's bookkeeping of the outputs.
    using ForwardFn = typename FusedLoss<Ops, Options...>::ForwardFn;
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow(Ops::forward, "").template typed<ForwardFn>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(logits, target, first, second, third, options...);
  }
  auto outputs = FusedLoss<Ops, Options...>::apply(logits, target, first, second, third, options...);
  return {outputs[0], outputs[1]};
}

// Options in schema order (csrc/ops.cpp). row: alpha, beta, gamma, s, ignore_index, reduction.
constexpr auto row_loss_forward_autograd =
    &fused_loss_autograd<RowOps, double, double, double, double, int64_t, int64_t>;
// region: delta, focal_coef, tversky_coef, smooth_nr, smooth_dr, eps, clip, batch, ignore_index, reduction, sigmoid.
constexpr auto region_loss_forward_autograd =
    &fused_loss_autograd<RegionOps, double, double, double, double, double, double, bool, bool,
                         std::optional<int64_t>, int64_t, bool>;

}  // namespace
}  // namespace lmfloss

TORCH_LIBRARY_IMPL(lmfloss_ext, Autograd, m) {
  m.impl("row_loss_forward", lmfloss::row_loss_forward_autograd);
  m.impl("region_loss_forward", lmfloss::region_loss_forward_autograd);
}
