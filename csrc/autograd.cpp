// Autograd kernel of lmfloss_ext::row_loss_forward: the row family's gradient as a C++ graph node.
//
// The Python custom op (lmfloss_kernels/ext/ops.py) carries the same formula for torch.compile,
// opcheck and torch.func; in plain eager calls the package calls this op directly
// (lmfloss_kernels/_autograd.py, call_op), so a training step of a row loss creates one C++ node
// and runs no Python in its backward: on small inputs that Python node and its backward callback
// cost several times the kernels. Region ops keep their Python formula.
//
// forward:  (loss, norms) = row_loss_forward(...) below autograd; norms is non-differentiable.
// backward: grad_logits = row_loss_backward(grad_loss, logits, ..., norms, ...); first order only:
//           a create_graph=True backward (grad mode on inside backward) raises, as the Python
//           formula does (the kernels compute the gradient without a graph of their own).

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <tuple>

namespace lmfloss {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using RowForwardFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                          const at::Tensor&, const at::Tensor&, double, double,
                                                          double, double, int64_t, int64_t);
using RowBackwardFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double, double,
                                 double, int64_t, int64_t);

struct RowLoss : public torch::autograd::Function<RowLoss> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& labels,
                               const at::Tensor& margins, const at::Tensor& ldam_weight,
                               const at::Tensor& focal_weight, double alpha, double beta, double gamma, double s,
                               int64_t ignore_index, int64_t reduction) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("lmfloss_ext::row_loss_forward", "")
                               .typed<RowForwardFn>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, norms] =
        op.call(logits, labels, margins, ldam_weight, focal_weight, alpha, beta, gamma, s, ignore_index, reduction);
    ctx->save_for_backward({logits, labels, margins, ldam_weight, focal_weight, norms});
    ctx->mark_non_differentiable({norms});
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["gamma"] = gamma;
    ctx->saved_data["s"] = s;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["reduction"] = reduction;
    return {loss, norms};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("lmfloss_ext::row_loss_backward", "")
                               .typed<RowBackwardFn>();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& logits = saved[0];
    // Same words as lmfloss_kernels._autograd.refuse_double_backward; the backends are named by device type.
    TORCH_CHECK(!at::GradMode::is_enabled(), "double backward is not supported by backend '",
                c10::DeviceTypeName(logits.device().type(), /*lower_case=*/true),
                "' (create_graph=True builds a graph of a gradient that its fused kernels compute without one); "
                "use backend='reference' for higher-order gradients");
    variable_list result(11);
    if (!grads[0].defined()) return result;
    result[0] = op.call(grads[0], logits, saved[1], saved[2], saved[3], saved[4], saved[5],
                        ctx->saved_data["alpha"].toDouble(), ctx->saved_data["beta"].toDouble(),
                        ctx->saved_data["gamma"].toDouble(), ctx->saved_data["s"].toDouble(),
                        ctx->saved_data["ignore_index"].toInt(), ctx->saved_data["reduction"].toInt());
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor> row_loss_forward_autograd(const at::Tensor& logits, const at::Tensor& labels,
                                                             const at::Tensor& margins, const at::Tensor& ldam_weight,
                                                             const at::Tensor& focal_weight, double alpha,
                                                             double beta, double gamma, double s,
                                                             int64_t ignore_index, int64_t reduction) {
  auto outputs = RowLoss::apply(logits, labels, margins, ldam_weight, focal_weight, alpha, beta, gamma, s,
                                ignore_index, reduction);
  return {outputs[0], outputs[1]};
}

}  // namespace
}  // namespace lmfloss

TORCH_LIBRARY_IMPL(lmfloss_ext, Autograd, m) { m.impl("row_loss_forward", &lmfloss::row_loss_forward_autograd); }
