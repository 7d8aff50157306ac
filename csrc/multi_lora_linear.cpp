// Multi-task LoRA linear on the CPU: the GEMMs are ATen's and, for the frozen base with onednn,
// oneDNN's (gemm.h); this file arranges them so that nothing is zero-filled or copied that does
// not have to be.
//
// Forward:  the base GEMM makes y (with b), the LoRA expand is accumulated into y with beta = 1,
//           alpha = scale.
// Backward: dA[t], dB[t] are accumulated in place (beta = 1) through the caller's views, the
//           LoRA part of dx is accumulated onto the base part dy @ W.
// When every task has the same number of rows (> 0) each product is one batched GEMM; ragged
// layouts loop over the tasks and skip empty ones.
// The LoRA terms are computed in A's dtype (fp32 in the bank). When x is bf16/fp16 the LoRA
// term is accumulated in an fp32 buffer with the base term added last, so y and dx are rounded
// to x's dtype once.
#include "checks.h"
#include "gemm.h"
#include "ops.h"

namespace metakernels {
namespace {

struct LoraDims {
  int64_t N, in, out, T, r;
  bool has_base;
};

LoraDims check_lora_inputs(const char* kOp, const at::Tensor& x,
                           const std::optional<at::Tensor>& W_opt, const at::Tensor& A,
                           const at::Tensor& B) {
  MK_CHECK_DEFINED(x);
  MK_CHECK_CPU(x);
  MK_CHECK_FLOATING(x);
  MK_CHECK_DIM(x, 2, "[N, in]");
  MK_CHECK_DEFINED(A);
  MK_CHECK_CPU(A);
  MK_CHECK_FLOATING(A);
  MK_CHECK_DIM(A, 3, "[T, in, r]");
  LoraDims d;
  d.N = x.size(0);
  d.in = x.size(1);
  d.T = A.size(0);
  d.r = A.size(2);
  MK_CHECK_SHAPE(A, "[T, in, r] with in == x.size(1)", d.T, d.in, d.r);
  MK_CHECK_DEFINED(B);
  MK_CHECK_CPU(B);
  MK_CHECK_DTYPE(B, A.scalar_type());
  MK_CHECK_DIM(B, 3, "[T, r, out]");
  d.out = B.size(2);
  MK_CHECK_SHAPE(B, "[T, r, out] with T, r from A", d.T, d.r, d.out);
  d.has_base = W_opt.has_value() && W_opt->defined();
  if (d.has_base) {
    const at::Tensor& W = *W_opt;
    MK_CHECK_CPU(W);
    MK_CHECK_DTYPE(W, x.scalar_type());
    MK_CHECK_SHAPE(W, "[out, in] with in == x.size(1), out == B.size(2)", d.out, d.in);
  }
  return d;
}

// xa = x @ A[t] per segment; y (+)= scale * xa @ B[t] with the given beta (0: y is overwritten).
void lora_forward(const Segments& seg, const LoraDims& d, const at::Tensor& xf,
                  const at::Tensor& A, const at::Tensor& B, double scale, at::Tensor& xa,
                  at::Tensor& y, double beta) {
  if (seg.uniform) {
    const int64_t n = seg.uniform;
    at::Tensor xa3 = xa.view({d.T, n, d.r});
    at::bmm_out(xa3, xf.view({d.T, n, d.in}), A);
    y.view({d.T, n, d.out}).baddbmm_(xa3, B, beta, scale);
    return;
  }
  for (int64_t t = 0; t < d.T; ++t) {
    const int64_t s = seg.start(t), n = seg.size(t);
    if (n == 0) continue;
    at::Tensor xa_t = xa.narrow(0, s, n);
    at::mm_out(xa_t, xf.narrow(0, s, n), A.select(0, t));
    y.narrow(0, s, n).addmm_(xa_t, B.select(0, t), beta, scale);
  }
}

// out += scale * a @ b over the batch. out is a view of the bank's flat gradient ([T, P]
// sliced), whose batch stride is P: ATen's baddbmm_ into such a view runs one addmm_ per
// batch, so one batched GEMM fills a contiguous product that is then added in.
void accumulate_bmm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double scale) {
  if (out.is_contiguous()) {
    out.baddbmm_(a, b, 1.0, scale);
    return;
  }
  out.add_(at::bmm(a, b), scale);
}

// g = dy @ B[t].T; dA[t] += scale x_t.T g; dB[t] += scale xa_t.T dy_t;
// dx_t (+)= scale g A[t].T with the given beta (when dx is defined).
void lora_backward(const Segments& seg, const LoraDims& d, const at::Tensor& dyf,
                   const at::Tensor& xf, const at::Tensor& A, const at::Tensor& B,
                   const at::Tensor& xa, double scale, at::Tensor& dA, at::Tensor& dB,
                   at::Tensor* dx, double beta) {
  if (seg.uniform) {
    const int64_t n = seg.uniform;
    at::Tensor dy3 = dyf.view({d.T, n, d.out});
    at::Tensor g = at::bmm(dy3, B.transpose(1, 2));
    accumulate_bmm(dA, xf.view({d.T, n, d.in}).transpose(1, 2), g, scale);
    accumulate_bmm(dB, xa.view({d.T, n, d.r}).transpose(1, 2), dy3, scale);
    if (dx) dx->view({d.T, n, d.in}).baddbmm_(g, A.transpose(1, 2), beta, scale);
    return;
  }
  at::Tensor g = at::empty({d.N, d.r}, A.options());
  for (int64_t t = 0; t < d.T; ++t) {
    const int64_t s = seg.start(t), n = seg.size(t);
    if (n == 0) continue;
    at::Tensor dy_t = dyf.narrow(0, s, n);
    at::Tensor g_t = g.narrow(0, s, n);
    at::mm_out(g_t, dy_t, B.select(0, t).t());
    dA.select(0, t).addmm_(xf.narrow(0, s, n).t(), g_t, 1.0, scale);
    dB.select(0, t).addmm_(xa.narrow(0, s, n).t(), dy_t, 1.0, scale);
    if (dx) dx->narrow(0, s, n).addmm_(g_t, A.select(0, t).t(), beta, scale);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> multi_lora_linear_fwd(const at::Tensor& x,
                                                         const std::optional<at::Tensor>& W_opt,
                                                         const std::optional<at::Tensor>& b_opt,
                                                         const at::Tensor& A, const at::Tensor& B,
                                                         const at::Tensor& offsets, double scale,
                                                         bool onednn) {
  constexpr const char* kOp = "multi_lora_linear_fwd";
  const LoraDims d = check_lora_inputs(kOp, x, W_opt, A, B);
  const bool has_bias = b_opt.has_value() && b_opt->defined();
  if (has_bias) {
    const at::Tensor& b = *b_opt;
    TORCH_CHECK(d.has_base, kOp, ": b is given without W");
    MK_CHECK_CPU(b);
    MK_CHECK_DTYPE(b, x.scalar_type());
    MK_CHECK_SHAPE(b, "[out] with out == B.size(2)", d.out);
  }
  const Segments seg = MK_CHECK_OFFSETS(offsets, d.T, d.N);

  const bool same_dtype = x.scalar_type() == A.scalar_type();
  const at::Tensor xf = same_dtype ? x : x.to(A.scalar_type());
  at::Tensor xa = at::empty({d.N, d.r}, A.options());
  at::Tensor y = d.has_base ? linear_nt(x, *W_opt, b_opt, onednn)
                            : at::empty({d.N, d.out}, x.options());
  if (same_dtype) {
    lora_forward(seg, d, xf, A, B, scale, xa, y, d.has_base ? 1.0 : 0.0);
  } else {
    at::Tensor lora = at::empty({d.N, d.out}, A.options());
    lora_forward(seg, d, xf, A, B, scale, xa, lora, 0.0);
    if (d.has_base) lora.add_(y);
    y.copy_(lora);
  }
  return {y, xa};
}

at::Tensor multi_lora_linear_bwd(const at::Tensor& dy, const at::Tensor& x,
                                 const std::optional<at::Tensor>& W_opt, const at::Tensor& A,
                                 const at::Tensor& B, const at::Tensor& xa,
                                 const at::Tensor& offsets, double scale, at::Tensor& dA,
                                 at::Tensor& dB, bool need_dx, bool onednn) {
  constexpr const char* kOp = "multi_lora_linear_bwd";
  const LoraDims d = check_lora_inputs(kOp, x, W_opt, A, B);
  MK_CHECK_DEFINED(dy);
  MK_CHECK_CPU(dy);
  MK_CHECK_DTYPE(dy, x.scalar_type());
  MK_CHECK_SHAPE(dy, "[N, out] with N == x.size(0), out == B.size(2)", d.N, d.out);
  MK_CHECK_DEFINED(xa);
  MK_CHECK_CPU(xa);
  MK_CHECK_DTYPE(xa, A.scalar_type());
  MK_CHECK_SHAPE(xa, "[N, r] with N == x.size(0), r == A.size(2)", d.N, d.r);
  MK_CHECK_DEFINED(dA);
  MK_CHECK_CPU(dA);
  MK_CHECK_DTYPE(dA, A.scalar_type());
  MK_CHECK_SHAPE(dA, "[T, in, r] like A", d.T, d.in, d.r);
  MK_CHECK_DEFINED(dB);
  MK_CHECK_CPU(dB);
  MK_CHECK_DTYPE(dB, B.scalar_type());
  MK_CHECK_SHAPE(dB, "[T, r, out] like B", d.T, d.r, d.out);
  const Segments seg = MK_CHECK_OFFSETS(offsets, d.T, d.N);

  const bool same_dtype = x.scalar_type() == A.scalar_type();
  const at::Tensor xf = same_dtype ? x : x.to(A.scalar_type());
  const at::Tensor dyf = same_dtype ? dy : dy.to(A.scalar_type());
  if (!need_dx) {
    lora_backward(seg, d, dyf, xf, A, B, xa, scale, dA, dB, nullptr, 0.0);
    return at::empty({0}, x.options());
  }
  at::Tensor dx = d.has_base ? linear_nt(dy, W_opt->t(), std::nullopt, onednn)
                             : at::empty({d.N, d.in}, x.options());
  if (same_dtype) {
    lora_backward(seg, d, dyf, xf, A, B, xa, scale, dA, dB, &dx, d.has_base ? 1.0 : 0.0);
  } else {
    at::Tensor dx_lora = at::empty({d.N, d.in}, A.options());
    lora_backward(seg, d, dyf, xf, A, B, xa, scale, dA, dB, &dx_lora, 0.0);
    if (d.has_base) dx_lora.add_(dx);
    dx.copy_(dx_lora);
  }
  return dx;
}

}  // namespace metakernels
