// The Python module lmfloss_kernels._C: prepared calls of the fused ops for the criteria's call plans.
//
// A criterion's call plan (lmfloss_kernels/_plans.py) replays, on every training step, the same op
// with the same per-class constants and options, after the value checks of the target that its
// signature leaves open. From Python that costs more than the kernels on small inputs: torch.ops'
// binding of 11-16 arguments, and the label range read by a tensor reduction plus its host
// conversion. A PreparedRowLoss / PreparedRegionLoss holds the constants and options, takes
// (logits, target), checks the target's values here in one native pass, and calls the op through
// the dispatcher (its C++ autograd kernel, csrc/autograd.cpp, makes the graph node).
//
// It is an accelerator, never a second source of truth: whenever it cannot give exactly the call
// the plan would make, it returns None and the plan runs its Python replay, which raises the
// package's errors (with their messages) or applies its rules. That is the case for a bad target
// value, every label ignored where the row losses decide the loss upstream, a target layout the
// native scan does not read (not contiguous, empty), values that live on an accelerator while the
// check_labels option asks for them to be read, and an active Python mode (torch function or dispatch).
//
// Importing the module also loads the library, whose static initialisers register the ops.
#include <ATen/Parallel.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/extension.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace lmfloss {
namespace {

namespace py = pybind11;

// Targets up to this many elements are scanned on the calling thread, as the CPU kernels run
// (csrc/cpu/tile.h kMinTaskElements, lmfloss_kernels/_validation.py SERIAL_ELEMENTS).
constexpr int64_t kSerialElements = int64_t(1) << 20;

// What a recorded target check leaves to each call (lmfloss_kernels._plans.TargetReplay, filled in by
// the checks of lmfloss_kernels._validation).
struct TargetReplay {
  bool dense;                           // a dense map (B, C, *S); else a label map
  bool squeeze;                         // a label map given as (B, 1, *S): drop the channel axis
  bool inspect;                         // read the values (CPU always, elsewhere with check_labels)
  int64_t classes;                      // labels must be in [0, classes) ...
  std::optional<int64_t> ignore_index;  // ... or equal this
  bool every_ignored_to_python;         // the row losses decide an all-ignored call before any kernel
};

enum class Scan { kPass, kEveryIgnored, kBad };

// Per chunk: min and max of the labels with the ignored ones counted as 0, and whether all are ignored.
struct LabelRange {
  int64_t low = std::numeric_limits<int64_t>::max();
  int64_t high = std::numeric_limits<int64_t>::min();
  bool all_ignored = true;
};

template <typename T>
LabelRange label_range(const T* p, int64_t n, bool has_ignore, T ignore) {
  // Plain min / max / and over selects: GCC vectorises the loop for every integer width.
  T low = std::numeric_limits<T>::max(), high = std::numeric_limits<T>::lowest();
  bool all_ignored = true;
  for (int64_t i = 0; i < n; ++i) {
    const bool ignored = has_ignore && p[i] == ignore;
    const T v = ignored ? T(0) : p[i];
    low = std::min(low, v);
    high = std::max(high, v);
    all_ignored = all_ignored && ignored;
  }
  return {static_cast<int64_t>(low), static_cast<int64_t>(high), all_ignored};
}

// Calls fn(first, count) over [0, n) in chunks of kSerialElements, on several threads only when
// there is more than one chunk; returns the chunks' results in order.
template <typename Result, typename Fn>
std::vector<Result> over_chunks(int64_t n, Fn&& fn) {
  const int64_t chunks = (n + kSerialElements - 1) / kSerialElements;
  std::vector<Result> results(chunks);
  auto run = [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t first = k * kSerialElements;
      results[k] = fn(first, std::min(kSerialElements, n - first));
    }
  };
  if (chunks == 1) {
    run(0, 1);
  } else {
    at::parallel_for(0, chunks, 1, run);
  }
  return results;
}

// The rule of lmfloss_kernels._validation.check_label_range, decided natively: every label equal
// to ignore_index, or a label outside [0, classes) that is not ignore_index, or neither.
template <typename T>
Scan scan_labels(const T* p, int64_t n, const TargetReplay& r) {
  const int64_t ignore = r.ignore_index.value_or(0);
  const bool has_ignore = r.ignore_index.has_value() && ignore >= int64_t(std::numeric_limits<T>::lowest()) &&
                          ignore <= int64_t(std::numeric_limits<T>::max());
  const T ignore_t = has_ignore ? static_cast<T>(ignore) : T(0);
  LabelRange total;
  for (const LabelRange& part : over_chunks<LabelRange>(n, [&](int64_t first, int64_t count) {
         return label_range<T>(p + first, count, has_ignore, ignore_t);
       })) {
    total.low = std::min(total.low, part.low);
    total.high = std::max(total.high, part.high);
    total.all_ignored = total.all_ignored && part.all_ignored;
  }
  if (total.all_ignored) return Scan::kEveryIgnored;
  return total.low >= 0 && total.high < r.classes ? Scan::kPass : Scan::kBad;
}

// The rule of lmfloss_kernels._validation.check_soft_range: every entry finite and in [0, 1].
template <typename T>
bool soft_map_in_range(const T* p, int64_t n) {
  bool ok = true;
  for (const bool part : over_chunks<char>(n, [&](int64_t first, int64_t count) {
         const T* q = p + first;
         bool in_range = true;
         for (int64_t i = 0; i < count; ++i) {
           if constexpr (std::is_integral_v<T>) {
             in_range = in_range && q[i] <= T(1);  // uint8 (bool maps read as such)
           } else {
             const auto v = static_cast<std::conditional_t<std::is_same_v<T, double>, double, float>>(q[i]);
             in_range = in_range && v >= 0 && v <= 1;  // NaN fails both comparisons
           }
         }
         return static_cast<char>(in_range);
       })) {
    ok = ok && part;
  }
  return ok;
}

// The target as the op takes it, or nullopt where the plan's Python replay must run instead.
std::optional<at::Tensor> replayed_target(const at::Tensor& target, const TargetReplay& r) {
  at::Tensor t = r.squeeze ? target.squeeze(1) : target;
  if (!r.inspect) return t;
  if (!t.device().is_cpu() || !t.is_contiguous() || t.numel() == 0) return std::nullopt;
  const int64_t n = t.numel();
  if (r.dense) {
    bool ok = false;
    if (t.scalar_type() == at::kByte || t.scalar_type() == at::kBool) {  // a bool map is read as uint8
      ok = soft_map_in_range(static_cast<const uint8_t*>(t.const_data_ptr()), n);
    } else if (t.is_floating_point()) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "soft_map_in_range", [&] {
        ok = soft_map_in_range(t.const_data_ptr<scalar_t>(), n);
      });
    }
    return ok ? std::optional<at::Tensor>(t) : std::nullopt;
  }
  Scan scan = Scan::kBad;
  switch (t.scalar_type()) {
    case at::kBool:  // read as uint8: one byte, 0 or 1
    case at::kByte:
      scan = scan_labels(static_cast<const uint8_t*>(t.const_data_ptr()), n, r);
      break;
    case at::kChar:
      scan = scan_labels(t.const_data_ptr<int8_t>(), n, r);
      break;
    case at::kShort:
      scan = scan_labels(t.const_data_ptr<int16_t>(), n, r);
      break;
    case at::kInt:
      scan = scan_labels(t.const_data_ptr<int32_t>(), n, r);
      break;
    case at::kLong:
      scan = scan_labels(t.const_data_ptr<int64_t>(), n, r);
      break;
    default:
      return std::nullopt;
  }
  if (scan == Scan::kBad || (scan == Scan::kEveryIgnored && r.every_ignored_to_python)) return std::nullopt;
  return t;
}

// One family's forward op with its three per-class tensors and its options (in schema order) bound.
template <typename... Options>
class PreparedLoss {
 public:
  using ForwardFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                        const at::Tensor&, const at::Tensor&, Options...);

  PreparedLoss(const char* op_name, TargetReplay replay, at::Tensor first, at::Tensor second, at::Tensor third,
               Options... options)
      : op_(c10::Dispatcher::singleton().findSchemaOrThrow(op_name, "").template typed<ForwardFn>()),
        replay_(replay),
        constants_{std::move(first), std::move(second), std::move(third)},
        options_(options...) {}

  // The loss, or None: the plan's Python replay decides this call (see the top of the file).
  py::object operator()(const at::Tensor& logits, const at::Tensor& target) const {
    // A Python mode (torch function or dispatch) must see the ops the Python replay calls.
    if (c10::impl::dispatch_mode_enabled() || at::impl::torch_function_mode_enabled()) return py::none();
    std::optional<at::Tensor> checked;
    at::Tensor loss;
    {
      py::gil_scoped_release no_gil;  // a large volume's kernels take a while: other threads may run
      checked = replayed_target(target, replay_);
      if (checked) {
        loss = std::get<0>(std::apply(
            [&](auto... options) {
              return op_.call(logits, *checked, constants_[0], constants_[1], constants_[2], options...);
            },
            options_));
      }
    }
    if (!checked) return py::none();
    return py::cast(std::move(loss));
  }

 private:
  c10::TypedOperatorHandle<ForwardFn> op_;
  TargetReplay replay_;
  at::Tensor constants_[3];
  std::tuple<Options...> options_;
};

// Options in schema order (csrc/ops.cpp). row: alpha, beta, gamma, s, ignore_index, reduction.
using PreparedRowLoss = PreparedLoss<double, double, double, double, int64_t, int64_t>;
// region: delta, focal_coef, tversky_coef, smooth_nr, smooth_dr, eps, clip, batch, ignore_index, reduction, sigmoid.
using PreparedRegionLoss = PreparedLoss<double, double, double, double, double, double, bool, bool,
                                        std::optional<int64_t>, int64_t, bool>;

template <typename Prepared, typename... Options>
void bind_prepared(py::module_& m, const char* name, const char* op_name, const char* doc) {
  py::class_<Prepared>(m, name, doc)
      .def(py::init([op_name](const TargetReplay& replay, at::Tensor first, at::Tensor second, at::Tensor third,
                              Options... options) {
             return Prepared(op_name, replay, std::move(first), std::move(second), std::move(third), options...);
           }))
      .def("__call__", &Prepared::operator(), py::arg("logits"), py::arg("target"));
}

}  // namespace
}  // namespace lmfloss

PYBIND11_MODULE(_C, m) {
  using namespace lmfloss;
  m.doc() = "lmfloss-kernels C++/CUDA ops (torch.ops.lmfloss_ext) and the prepared calls of the call plans";
  // The CPU kernels apply the non-finite logits policy themselves (the backend's nonfinite_in_kernel);
  // a library built before they did lacks this attribute.
  m.attr("NONFINITE_IN_CPU_KERNELS") = 1;
  py::class_<TargetReplay>(m, "TargetReplay", "What a call plan's target check leaves to each call.")
      .def(py::init<bool, bool, bool, int64_t, std::optional<int64_t>, bool>(), py::arg("dense"),
           py::arg("squeeze"), py::arg("inspect"), py::arg("classes"), py::arg("ignore_index"),
           py::arg("every_ignored_to_python"));
  bind_prepared<PreparedRowLoss, double, double, double, double, int64_t, int64_t>(
      m, "PreparedRowLoss", "lmfloss_ext::row_loss_forward",
      "PreparedRowLoss(replay, margins, ldam_weight, focal_weight, alpha, beta, gamma, s, ignore_index, "
      "reduction_code)(logits, target) -> loss or None");
  bind_prepared<PreparedRegionLoss, double, double, double, double, double, double, bool, bool,
                std::optional<int64_t>, int64_t, bool>(
      m, "PreparedRegionLoss", "lmfloss_ext::region_loss_forward",
      "PreparedRegionLoss(replay, focal_weight, focal_gamma, tversky_exponent, delta, focal_coef, tversky_coef, "
      "smooth_nr, smooth_dr, eps, clip, batch, ignore_index, reduction_code, sigmoid)(logits, target) -> loss or "
      "None");
}
