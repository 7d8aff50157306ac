// One-pass kernels for the frozen base's rotary embedding and RMSNorm backward (the memory-lean
// layers of metakernels/fused.py, which holds their plain-PyTorch references).
//
// The rotary forward rounds exactly as Hugging Face's `q * cos + rotate_half(q) * sin` does as
// separate ops (each product rounded, then the sum; setup.py compiles with -ffp-contract=off so
// that no multiply-add is fused), so the fused model's forward stays bitwise the library's. It
// reads q once and writes the result once, where the op-by-op form makes five passes (two
// products, a negation, a concatenation and a sum). The backwards are single passes too.
//
// Layouts: q/k/dq [B, H, L, D] with any strides but a unit last stride (q and k usually are
// transposed views of the projection's [B, L, H, D] output); cos/sin broadcast to them. The
// results keep the input's memory layout (empty_like), as torch's elementwise ops do.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <tuple>

#include "checks.h"
#include "ops.h"
#include "vec_math.h"

namespace metakernels {
namespace {

constexpr int64_t kMinRowsPerTask = 16;

void check_rotary_input(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, op, ": ", name,
              " must be a float32 CPU tensor, got ", describe(x));
  TORCH_CHECK(x.dim() == 4, op, ": ", name, " must be [B, H, L, D], got ", describe(x));
  TORCH_CHECK(x.size(3) % 2 == 0 && x.stride(3) == 1, op, ": ", name,
              " must have an even head size D with unit stride, got ", describe(x),
              " with strides ", x.strides());
}

// cos/sin expanded to x's shape (broadcast axes get stride 0), unit last stride.
at::Tensor expand_table(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, op, ": ", name,
              " must be a float32 CPU tensor, got ", describe(t));
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D, broadcastable to ", x.sizes(),
              ", got ", describe(t));
  at::Tensor e = t.stride(3) == 1 ? t : t.contiguous();
  for (int64_t d = 0; d < 4; ++d) {
    TORCH_CHECK(e.size(d) == x.size(d) || e.size(d) == 1, op, ": ", name,
                " must be broadcastable to ", x.sizes(), ", got ", describe(t));
  }
  return e.expand(x.sizes());
}

// For every row (b, h, l) of D elements: out = f(x row, cos row, sin row), rows in parallel.
template <typename RowFn>
at::Tensor for_each_row(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                        RowFn row_fn) {
  at::Tensor out = at::empty_like(x);
  const int64_t B = x.size(0), H = x.size(1), L = x.size(2), D = x.size(3);
  const float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const auto xs = x.strides(), cs = cos.strides(), ss = sin.strides(), os = out.strides();
  at::parallel_for(0, B * H * L, kMinRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / (H * L), h = (i / L) % H, l = i % L;
      row_fn(xp + b * xs[0] + h * xs[1] + l * xs[2], cp + b * cs[0] + h * cs[1] + l * cs[2],
             sp + b * ss[0] + h * ss[1] + l * ss[2], op + b * os[0] + h * os[1] + l * os[2],
             D / 2);
    }
  });
  return out;
}

at::Tensor rotary_one(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  return for_each_row(x, cos, sin, [](const float* x, const float* c, const float* s, float* o,
                                      int64_t h) {
    // x * cos + cat(-x2, x1) * sin, each product rounded on its own
#pragma omp simd
    for (int64_t j = 0; j < h; ++j) {
      const float a = x[j] * c[j];
      const float b = -x[j + h] * s[j];
      o[j] = a + b;
    }
#pragma omp simd
    for (int64_t j = 0; j < h; ++j) {
      const float a = x[j + h] * c[j + h];
      const float b = x[j] * s[j + h];
      o[j + h] = a + b;
    }
  });
}

// dgate = dy * up * s * (1 + gate * (1 - s)), dup = dy * gate * s, s = sigmoid(gate): the
// backward of silu(gate) * up in one pass (reads dy, gate, up; writes dgate, dup). Compiled for
// x86-64-v3 and the baseline (MK_TARGET_CLONES).
MK_TARGET_CLONES void swiglu_bwd_kernel(const float* dy, const float* gate, const float* up,
                                        float* dgate, float* dup, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    const float s = sigmoid(g);
    const float d = dy[i];
    dgate[i] = d * up[i] * s * (1.f + g * (1.f - s));
    dup[i] = d * (g * s);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& dy, const at::Tensor& gate,
                                              const at::Tensor& up) {
  constexpr const char* kOp = "swiglu_bwd";
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"dy", dy},
                                {"gate", gate}, {"up", up}}) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, kOp, ": ", name,
                " must be a float32 CPU tensor, got ", describe(t));
    TORCH_CHECK(t.sizes() == gate.sizes(), kOp, ": ", name, " must have gate's shape ",
                gate.sizes(), ", got ", describe(t));
  }
  const at::Tensor d = dy.contiguous(), g = gate.contiguous(), u = up.contiguous();
  at::Tensor dgate = at::empty_like(g), dup = at::empty_like(g);
  const float* dp = d.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  const float* upp = u.data_ptr<float>();
  float* dgp = dgate.data_ptr<float>();
  float* dup_p = dup.data_ptr<float>();
  at::parallel_for(0, g.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
    swiglu_bwd_kernel(dp + begin, gp + begin, upp + begin, dgp + begin, dup_p + begin,
                      end - begin);
  });
  return {dgate, dup};
}

std::tuple<at::Tensor, at::Tensor> rotary_fwd(const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& cos, const at::Tensor& sin) {
  constexpr const char* kOp = "rotary_fwd";
  check_rotary_input(kOp, "q", q);
  check_rotary_input(kOp, "k", k);
  TORCH_CHECK(q.size(3) == k.size(3), kOp, ": q and k must have the same head size, got q ",
              describe(q), " and k ", describe(k));
  const at::Tensor cq = expand_table(kOp, "cos", cos, q), sq = expand_table(kOp, "sin", sin, q);
  const at::Tensor ck = expand_table(kOp, "cos", cos, k), sk = expand_table(kOp, "sin", sin, k);
  return {rotary_one(q, cq, sq), rotary_one(k, ck, sk)};
}

at::Tensor rotary_bwd(const at::Tensor& dy, const at::Tensor& cos, const at::Tensor& sin) {
  constexpr const char* kOp = "rotary_bwd";
  check_rotary_input(kOp, "dy", dy);
  const at::Tensor c = expand_table(kOp, "cos", cos, dy), s = expand_table(kOp, "sin", sin, dy);
  // the transpose of the forward map: dy * cos + cat(dy2 * sin2, -dy1 * sin1)
  return for_each_row(dy, c, s, [](const float* g, const float* c, const float* s, float* o,
                                   int64_t h) {
#pragma omp simd
    for (int64_t j = 0; j < h; ++j) o[j] = g[j] * c[j] + g[j + h] * s[j + h];
#pragma omp simd
    for (int64_t j = 0; j < h; ++j) o[j + h] = g[j + h] * c[j + h] - g[j] * s[j];
  });
}

at::Tensor rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                        const at::Tensor& rstd) {
  constexpr const char* kOp = "rms_norm_bwd";
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"dy", dy},
                                {"x", x}, {"weight", weight}, {"rstd", rstd}}) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, kOp, ": ", name,
                " must be a float32 CPU tensor, got ", describe(t));
  }
  TORCH_CHECK(x.dim() >= 1 && dy.sizes() == x.sizes(), kOp,
              ": dy must have x's shape, got dy ", describe(dy), " and x ", describe(x));
  const int64_t D = x.size(-1), N = x.numel() / std::max<int64_t>(D, 1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == D, kOp, ": weight must be [", D,
              "], got ", describe(weight));
  TORCH_CHECK(rstd.numel() == N, kOp, ": rstd must hold one value per row of x (", N,
              "), got ", describe(rstd));
  const at::Tensor g = dy.contiguous(), xc = x.contiguous(), w = weight.contiguous(),
                   r = rstd.contiguous();
  at::Tensor dx = at::empty_like(xc);
  const float* gp = g.data_ptr<float>();
  const float* xp = xc.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* rp = r.data_ptr<float>();
  float* dp = dx.data_ptr<float>();
  // dx = r * (g - xhat * mean(g * xhat)), g = dy * w, xhat = x * r
  at::parallel_for(0, N, kMinRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* gi = gp + i * D;
      const float* xi = xp + i * D;
      const float ri = rp[i];
      double dot = 0.0;   // the row's dot product in fp64: it cancels
#pragma omp simd reduction(+ : dot)
      for (int64_t j = 0; j < D; ++j) dot += static_cast<double>(gi[j] * wp[j]) * xi[j];
      const float m = static_cast<float>(dot * ri * ri / static_cast<double>(D));  // mean(g xhat)/r
      float* di = dp + i * D;
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) di[j] = ri * (gi[j] * wp[j] - xi[j] * m);
    }
  });
  return dx;
}

}  // namespace metakernels
