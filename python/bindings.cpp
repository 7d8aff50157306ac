// The binding layer: registers the kernels of csrc/ as torch.ops.metakernels.* and defines the
// Python module metakernels._C, whose import is what runs these registrations.
//
// The schemas are the contract with metakernels/ops/*.py (which call the ops) and with
// metakernels/ops/_fake.py (their fake/meta implementations for torch.compile and opcheck).
// Arguments written in place are annotated (a!), (b!), ...; no output aliases an input.
#include <pybind11/pybind11.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <vector>

#include "ops.h"

namespace {

// The Autograd kernel of every op. The kernels have no derivative formulas: metakernels/ops/*.py
// call them inside torch.autograd.Functions (where grad mode is off). Called directly on inputs
// that require grad, the outputs get a node that raises "derivative for metakernels::<op> is not
// implemented" on backward rather than silently not requiring grad. The arguments the op writes
// to (the (a!) ones) get their version counters bumped, as an ATen in-place op would do, so that
// autograd notices when a tensor saved for a backward pass has been overwritten.
void no_derivative(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                   torch::jit::Stack* stack) {
  const c10::FunctionSchema& schema = op.schema();
  const size_t num_args = schema.arguments().size();
  const size_t num_returns = schema.returns().size();
  const size_t first_arg = stack->size() - num_args;
  const bool grad_mode = at::GradMode::is_enabled();
  std::vector<at::Tensor> requiring_grad, written;
  for (size_t i = 0; i < num_args; ++i) {
    const c10::IValue& v = (*stack)[first_arg + i];
    if (!v.isTensor()) continue;
    const at::Tensor& t = v.toTensor();
    if (grad_mode && t.defined() && t.requires_grad()) requiring_grad.push_back(t);
    if (schema.is_mutable({c10::SchemaArgType::input, i})) {
      TORCH_CHECK(!(grad_mode && t.requires_grad()), schema.name(), ": ",
                  schema.arguments()[i].name(),
                  " is written in place but requires grad, and the op has no derivative");
      written.push_back(t);
    }
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : written) torch::autograd::impl::bump_version(t);
  if (requiring_grad.empty()) return;
  auto grad_fn = c10::make_intrusive<torch::autograd::NotImplemented>(schema.name());
  grad_fn->set_next_edges(torch::autograd::collect_next_edges(requiring_grad));
  for (size_t i = stack->size() - num_returns; i < stack->size(); ++i) {
    const c10::IValue& v = (*stack)[i];
    if (!v.isTensor()) continue;
    const at::Tensor& t = v.toTensor();
    if (t.defined() && torch::autograd::isDifferentiableType(t.scalar_type())) {
      torch::autograd::set_history(t, grad_fn);
    }
  }
}

}  // namespace

TORCH_LIBRARY(metakernels, m) {
  // FakeTensor looks here for the fake implementations when they have not been imported yet.
  m.set_python_module("metakernels.ops._fake");
  m.def(
      "multi_lora_linear_fwd(Tensor x, Tensor? W, Tensor? b, Tensor A, Tensor B, Tensor offsets, "
      "float scale, bool onednn=False, bool per_task=True) -> (Tensor, Tensor)");
  m.def(
      "multi_lora_linear_bwd(Tensor dy, Tensor x, Tensor? W, Tensor A, Tensor B, Tensor xa, "
      "Tensor offsets, float scale, Tensor(a!) dA, Tensor(b!) dB, bool need_dx, "
      "bool onednn=False, bool per_task=True) -> Tensor");
  m.def(
      "fused_sgd_(Tensor(a!) fast, Tensor grad, Tensor lr, float max_grad_norm, "
      "float weight_decay) -> (Tensor, Tensor)");
  m.def(
      "fused_adam_(Tensor(a!) fast, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "Tensor(d!) step, Tensor lr, float max_grad_norm, float beta1, float beta2, float eps, "
      "float weight_decay) -> (Tensor, Tensor)");
  m.def("meta_reduce(Tensor x, Tensor weights, Tensor theta, int kind) -> Tensor");
  m.def(
      "segment_cross_entropy_fwd(Tensor h, Tensor W, Tensor labels, Tensor offsets, "
      "int chunk_size, bool onednn=False) -> (Tensor, Tensor)");
  m.def("rotary_fwd(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
  m.def("rotary_bwd(Tensor dy, Tensor cos, Tensor sin) -> Tensor");
  m.def("rms_norm_fwd(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def(
      "rms_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor rstd, bool x_is_output=False) "
      "-> Tensor");
  m.def("swiglu_fwd(Tensor gate, Tensor up) -> Tensor");
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, bool causal, float scale) "
      "-> (Tensor, Tensor)");
  m.def(
      "attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? mask, bool causal, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("swiglu_bwd(Tensor dy, Tensor gate, Tensor up) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(metakernels, CPU, m) {
  m.impl("multi_lora_linear_fwd", &metakernels::multi_lora_linear_fwd);
  m.impl("multi_lora_linear_bwd", &metakernels::multi_lora_linear_bwd);
  m.impl("fused_sgd_", &metakernels::fused_sgd_);
  m.impl("fused_adam_", &metakernels::fused_adam_);
  m.impl("meta_reduce", &metakernels::meta_reduce);
  m.impl("segment_cross_entropy_fwd", &metakernels::segment_cross_entropy_fwd);
  m.impl("rotary_fwd", &metakernels::rotary_fwd);
  m.impl("rotary_bwd", &metakernels::rotary_bwd);
  m.impl("rms_norm_fwd", &metakernels::rms_norm_fwd);
  m.impl("rms_norm_bwd", &metakernels::rms_norm_bwd);
  m.impl("swiglu_fwd", &metakernels::swiglu_fwd);
  m.impl("swiglu_bwd", &metakernels::swiglu_bwd);
  m.impl("attention_fwd", &metakernels::attention_fwd);
  m.impl("attention_bwd", &metakernels::attention_bwd);
}

TORCH_LIBRARY_IMPL(metakernels, Autograd, m) {
  for (const char* name : {"multi_lora_linear_fwd", "multi_lora_linear_bwd", "fused_sgd_",
                           "fused_adam_", "meta_reduce", "segment_cross_entropy_fwd",
                           "rotary_fwd", "rotary_bwd", "rms_norm_fwd", "rms_norm_bwd",
                           "swiglu_fwd", "swiglu_bwd", "attention_fwd", "attention_bwd"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&no_derivative>());
  }
}

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "metakernels' compiled CPU kernels. Importing this module registers them as "
      "torch.ops.metakernels.*; with_openmp says whether they were built with OpenMP.";
#ifdef _OPENMP
  m.attr("with_openmp") = true;
#else
  m.attr("with_openmp") = false;
#endif
}
