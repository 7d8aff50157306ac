// The CPU kernels of metakernels: plain ATen + OpenMP, no Python.
// python/bindings.cpp registers them as torch.ops.metakernels.*; the schemas there are the
// contract, the plain-PyTorch references in metakernels/ops/*.py the specification.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace metakernels {

// Semantics (s = offsets):
//   y = x @ W.T + b                                    (W None: y = 0)
//   xa[s[t]:s[t+1]] = x[s[t]:s[t+1]] @ A[t]            (in A's dtype)
//   y[s[t]:s[t+1]] += scale * xa[s[t]:s[t+1]] @ B[t]
// x [N, in] fp32/bf16/fp16, W [out, in] (any strides, dtype of x), b [out], A [T, in, r],
// B [T, r, out], offsets int32 [T + 1]. Returns (y [N, out] dtype of x, xa [N, r] dtype of A).
// onednn: the base GEMM (and the backward's dy @ W) through oneDNN for fp32 (gemm.h).
// per_task: the LoRA products one task per thread at a time where the CPU and the layout allow
// (multi_lora_linear.cpp, task_groups); false: batched GEMMs over all tasks.
std::tuple<at::Tensor, at::Tensor> multi_lora_linear_fwd(const at::Tensor& x,
                                                         const std::optional<at::Tensor>& W,
                                                         const std::optional<at::Tensor>& b,
                                                         const at::Tensor& A, const at::Tensor& B,
                                                         const at::Tensor& offsets, double scale,
                                                         bool onednn, bool per_task);

// Semantics (g_t = dy_t @ B[t].T, rows t = s[t]:s[t+1]):
//   dA[t] += scale * x_t.T @ g_t                       (in place, through the view)
//   dB[t] += scale * xa_t.T @ dy_t                     (in place, through the view)
//   dx_t   = dy_t @ W + scale * g_t @ A[t].T           (returned; empty [0] if !need_dx)
// dA, dB may be strided views (e.g. of a flat [T, P] gradient buffer).
at::Tensor multi_lora_linear_bwd(const at::Tensor& dy, const at::Tensor& x,
                                 const std::optional<at::Tensor>& W, const at::Tensor& A,
                                 const at::Tensor& B, const at::Tensor& xa,
                                 const at::Tensor& offsets, double scale, at::Tensor& dA,
                                 at::Tensor& dB, bool need_dx, bool onednn, bool per_task);

// Per task t (g = grad[t]): norm = ||g||; a non-finite norm skips the task (nothing written);
// g *= min(1, max_grad_norm / (norm + 1e-6)) if max_grad_norm > 0;
// g += weight_decay * fast[t]; fast[t] -= lr[t] * g.
// fast, grad [T, P] fp32 contiguous; lr [T] fp32. Returns (norms [T] fp32, finite [T] bool).
std::tuple<at::Tensor, at::Tensor> fused_sgd_(at::Tensor& fast, const at::Tensor& grad,
                                              const at::Tensor& lr, double max_grad_norm,
                                              double weight_decay);

// As fused_sgd_ for norm/skip/clip, then AdamW (decoupled weight decay), torch.optim.Adam's
// formula: step[t] += 1; fast *= 1 - lr wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
// fast -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps). exp_avg, exp_avg_sq [T, P], step [T] fp32.
std::tuple<at::Tensor, at::Tensor> fused_adam_(at::Tensor& fast, const at::Tensor& grad,
                                               at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                                               at::Tensor& step, const at::Tensor& lr,
                                               double max_grad_norm, double beta1, double beta2,
                                               double eps, double weight_decay);

// kind 0 (fomaml):  out = sum_t weights[t] * x[t]
// kind 1 (reptile): out = sum_t weights[t] * (theta - x[t])
// x [T, P] fp32 contiguous, weights [T] fp32, theta [P] fp32 (kind 1) or empty (kind 0).
at::Tensor meta_reduce(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& theta,
                       int64_t kind);

// loss[t] = mean over the rows of task t with labels != -100 of cross_entropy(h_i @ W.T, label_i)
//           (0 for a task without targets);
// dh = d(sum_t loss[t]) / dh, computed chunk_size rows at a time (never [N, V] logits).
// h [N, d] fp32/bf16/fp16, W [V, d] dtype of h, labels int64 [N], offsets int32 [T + 1].
// Returns (loss [T] fp32, dh [N, d] dtype of h). onednn: both GEMMs through oneDNN for fp32.
std::tuple<at::Tensor, at::Tensor> segment_cross_entropy_fwd(const at::Tensor& h,
                                                             const at::Tensor& W,
                                                             const at::Tensor& labels,
                                                             const at::Tensor& offsets,
                                                             int64_t chunk_size, bool onednn);

// Hugging Face's rotary map of q and k (q * cos + rotate_half(q) * sin, rounded as those separate
// ops round) in one pass each. q, k float32 or bfloat16 [B, H, L, D] (unit last stride), cos/sin
// of their dtype broadcastable to them. Returns (q', k') in q's and k's memory layouts.
std::tuple<at::Tensor, at::Tensor> rotary_fwd(const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& cos, const at::Tensor& sin);

// The rotary map's transpose: dy * cos + cat(dy2 * sin2, -dy1 * sin1) (dy's shape and layout).
at::Tensor rotary_bwd(const at::Tensor& dy, const at::Tensor& cos, const at::Tensor& sin);

// RMSNorm: y = weight * (x * r), r = 1 / sqrt(mean(x**2) + eps) per row of the last axis, in
// one pass over x. x float32 or bfloat16 [..., D], weight [D] of x's dtype. Returns (y in x's
// dtype, rstd [..., 1] float32).
std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                double eps);

// RMSNorm's input gradient: dx = r * (g - xhat * mean(g * xhat)), g = dy * weight, xhat = x * r,
// means over the last axis. dy, x float32 or bfloat16 [..., D], weight [D] of their dtype, rstd
// float32, one value per row. With
// x_is_output, x is the forward's output y (xhat = y / weight: weight must have no zero).
at::Tensor rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                        const at::Tensor& rstd, bool x_is_output);

// SwiGLU: silu(gate) * up in one pass. gate, up float32 or bfloat16, of one shape and dtype.
at::Tensor swiglu_fwd(const at::Tensor& gate, const at::Tensor& up);

// SwiGLU's backward: s = sigmoid(gate), dgate = dy * up * s * (1 + gate * (1 - s)),
// dup = dy * gate * s, in one pass. dy, gate, up float32 or bfloat16, of one shape and dtype.
// Returns (dgate, dup).
std::tuple<at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& dy, const at::Tensor& gate,
                                              const at::Tensor& up);

// Attention for short sequences (csrc/attention.cpp): O = softmax(scale Q K^T, masked) V per
// (batch, head), grouped-query heads allowed. q [B, H, Lq, D], k/v [B, Hkv, Lk, D] float32 or
// bfloat16 (computed in fp32, rounded once) with unit last strides; mask: bool [B or 1, 1, Lq, Lk]
// (true = attend), or none: causal (or full).
// Returns (out [B, H, Lq, D] as a view of a [B, Lq, H, D] tensor, lse [B, H, Lq]); a fully masked
// row gives zeros and lse = +inf.
std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v,
                                                 const std::optional<at::Tensor>& mask,
                                                 bool causal, double scale);

// Its backward from the forward's out and lse. Returns (dq, dk, dv).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& mask,
    bool causal, double scale);

}  // namespace metakernels
