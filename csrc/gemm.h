// The frozen base's GEMMs: y = x @ W.T (+ b), through oneDNN's fp32 matmul or ATen's mm.
//
// ATen's fp32 mm on the CPU is MKL's sgemm, which on AMD processors runs its AVX2 code even where
// the CPU has AVX-512; oneDNN picks its kernels by the instruction sets the CPU reports, so which
// is faster depends on the CPU (metakernels/gemm.py chooses; docs/performance.md has the rates).
// The weight may be any strided view: W.t() of a row-major [out, in] weight
// is the backward's [in, out] operand, with no copy. Both compute in fp32 (no reduced-precision
// mode); they differ in the order of the sums, i.e. by rounding.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <string_view>

namespace metakernels {

// Whether linear_nt can take oneDNN for these operands (fp32 CPU, at least one row).
inline bool onednn_gemm_applies(const at::Tensor& x, const at::Tensor& W) {
  return x.scalar_type() == at::kFloat && W.scalar_type() == at::kFloat && x.size(0) > 0 &&
         x.size(1) > 0 && W.size(0) > 0;
}

// y [N, out] = x [N, in] @ W.T (+ b), W [out, in] (any strides). onednn: through
// mkldnn::_linear_pointwise (the caller checks torch.backends.mkldnn.is_available()); else, and
// for operands oneDNN does not take, ATen's addmm/mm.
inline at::Tensor linear_nt(const at::Tensor& x, const at::Tensor& W,
                            const std::optional<at::Tensor>& b, bool onednn) {
  const bool has_bias = b.has_value() && b->defined();
  if (onednn && onednn_gemm_applies(x, W) && (!has_bias || b->scalar_type() == at::kFloat)) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                              const std::optional<at::Tensor>&, std::string_view,
                              c10::List<std::optional<at::Scalar>>,
                              std::optional<std::string_view>)>();
    return op.call(x, W, b, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
  }
  if (has_bias) return at::addmm(*b, x, W.t());
  return at::mm(x, W.t());
}

}  // namespace metakernels
