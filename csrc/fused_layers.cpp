// One-pass kernels for the frozen base's rotary embedding, RMSNorm and SwiGLU (the memory-lean
// layers of metakernels/fused.py, which holds their plain-PyTorch references).
//
// The rotary forward rounds exactly as Hugging Face's `q * cos + rotate_half(q) * sin` does as
// separate ops (each product rounded, then the sum; setup.py compiles with -ffp-contract=off so
// that no multiply-add is fused), bitwise the library's. It reads q once and writes the result once, where the op-by-op form makes five passes (two
// products, a negation, a concatenation and a sum). The backwards are single passes too.
//
// RMSNorm's forward makes two passes over a row (its sum of squares in fp64, then
// `weight * (x * r)` with both products rounded as the library rounds them) where the op-by-op
// form makes five over the tensor; SwiGLU's forward is one pass where silu then the product make
// two. Neither is bitwise the library's (the row sum's order and the exp differ): within an ulp
// or two. RMSNorm's backward also takes its output instead of its input (`xhat = y / weight`), so
// that a norm whose output the next layer keeps anyway (the q/k/v LoRA's input) keeps nothing else.
//
// Layouts: q/k/dq [B, H, L, D] with any strides but a unit last stride (q and k usually are
// transposed views of the projection's [B, L, H, D] output); cos/sin broadcast to them. The
// results keep the input's memory layout (empty_like), as torch's elementwise ops do.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

#include "checks.h"
#include "ops.h"
#include "vec_math.h"

namespace metakernels {
namespace {

constexpr int64_t kMinRowsPerTask = 16;

// q, k, dy: float32 CPU [B, H, L, D], D even, unit last stride.
#define MK_CHECK_ROTARY_INPUT(x)                                                                \
  do {                                                                                          \
    MK_CHECK_CPU_FLOAT(x);                                                                      \
    MK_CHECK_DIM(x, 4, "[B, H, L, D]");                                                         \
    TORCH_CHECK((x).size(3) % 2 == 0 && (x).stride(3) == 1, kOp, ": ", #x,                     \
                " must have an even head size D with unit stride, got ", describe(x),          \
                " with strides ", (x).strides());                                              \
  } while (0)

// cos/sin (float32 CPU, checked by the caller) expanded to x's shape: broadcast axes get
// stride 0, the last stride is 1.
at::Tensor expand_table(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D, broadcastable to ", x.sizes(),
              ", got ", describe(t));
  at::Tensor e = t.stride(3) == 1 ? t : t.contiguous();
  for (int64_t d = 0; d < 4; ++d) {
    TORCH_CHECK(e.size(d) == x.size(d) || e.size(d) == 1, op, ": ", name,
                " must be broadcastable to ", x.sizes(), ", got ", describe(t));
  }
  return e.expand(x.sizes());
}

// The rows (b, h, l) of a [B, H, L, D] tensor x in x's memory order: its three row axes
// sorted by stride, largest first (q and k are usually [B, L, H, D] buffers seen as
// [B, H, L, D], so their rows run (b, l, h)), with the strides of x, cos, sin and the output
// along them. Walking them in this order reads and writes each buffer front to back.
struct RowOrder {
  int64_t n[3];
  int64_t xs[3], cs[3], ss[3], os[3];
};

RowOrder row_order(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                   const at::Tensor& out) {
  int64_t axes[3] = {0, 1, 2};
  std::stable_sort(axes, axes + 3, [&](int64_t a, int64_t b) { return x.stride(a) > x.stride(b); });
  RowOrder r{};
  for (int k = 0; k < 3; ++k) {
    const int64_t a = axes[k];
    r.n[k] = x.size(a);
    r.xs[k] = x.stride(a);
    r.cs[k] = cos.stride(a);
    r.ss[k] = sin.stride(a);
    r.os[k] = out.stride(a);
  }
  return r;
}

// x * cos + cat(-x2, x1) * sin for one row of 2h elements, each product rounded on its own.
inline __attribute__((always_inline)) void rotary_row(const float* x, const float* c,
                                                      const float* s, float* o, int64_t h) {
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
}

// The transpose of rotary_row: dy * cos + cat(dy2 * sin2, -dy1 * sin1).
inline __attribute__((always_inline)) void rotary_bwd_row(const float* g, const float* c,
                                                          const float* s, float* o, int64_t h) {
#pragma omp simd
  for (int64_t j = 0; j < h; ++j) o[j] = g[j] * c[j] + g[j + h] * s[j + h];
#pragma omp simd
  for (int64_t j = 0; j < h; ++j) o[j + h] = g[j + h] * c[j + h] - g[j] * s[j];
}

// Rows [begin, end) of the order r, forward (bwd = false) or backward: the loop over rows is
// inside the cloned function (one dispatch per chunk, not per row), the row's offsets kept by
// counters instead of a division per row.
MK_TARGET_CLONES void rotary_rows(const float* x, const float* c, const float* s, float* o,
                                  const RowOrder& r, int64_t begin, int64_t end, int64_t h,
                                  bool bwd) {
  int64_t i0 = begin / (r.n[1] * r.n[2]), i1 = begin / r.n[2] % r.n[1], i2 = begin % r.n[2];
  for (int64_t row = begin; row < end; ++row) {
    const float* xr = x + i0 * r.xs[0] + i1 * r.xs[1] + i2 * r.xs[2];
    const float* cr = c + i0 * r.cs[0] + i1 * r.cs[1] + i2 * r.cs[2];
    const float* sr = s + i0 * r.ss[0] + i1 * r.ss[1] + i2 * r.ss[2];
    float* orow = o + i0 * r.os[0] + i1 * r.os[1] + i2 * r.os[2];
    if (bwd) {
      rotary_bwd_row(xr, cr, sr, orow, h);
    } else {
      rotary_row(xr, cr, sr, orow, h);
    }
    if (++i2 == r.n[2]) {
      i2 = 0;
      if (++i1 == r.n[1]) {
        i1 = 0;
        ++i0;
      }
    }
  }
}

// out = the rotary map of x (or its transpose, bwd) with the expanded cos/sin tables, in x's
// memory layout; rows in parallel.
at::Tensor rotary_map(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      bool bwd) {
  at::Tensor out = at::empty_like(x);
  const RowOrder r = row_order(x, cos, sin, out);
  const float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t h = x.size(3) / 2;
  at::parallel_for(0, r.n[0] * r.n[1] * r.n[2], kMinRowsPerTask,
                   [&](int64_t begin, int64_t end) {
                     rotary_rows(xp, cp, sp, op, r, begin, end, h, bwd);
                   });
  return out;
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

// y = silu(gate) * up = (gate * sigmoid(gate)) * up in one pass.
MK_TARGET_CLONES void swiglu_fwd_kernel(const float* gate, const float* up, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    y[i] = (g * sigmoid(g)) * up[i];
  }
}

// RMSNorm forward over rows [begin, end) of D elements: r = 1 / sqrt(mean(x**2) + eps) (the row
// sum in fp64, then the library's fp32 roundings), y = w * (x * r) (two roundings, as the library).
MK_TARGET_CLONES void rms_norm_fwd_rows(const float* x, const float* w, float* y, float* rstd,
                                        int64_t begin, int64_t end, int64_t D, float eps) {
  for (int64_t i = begin; i < end; ++i) {
    const float* xi = x + i * D;
    const float ms = static_cast<float>(dot_f64(xi, xi, D)) / static_cast<float>(D);
    const float r = 1.0f / std::sqrt(ms + eps);
    rstd[i] = r;
    float* yi = y + i * D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) {
      const float t = xi[j] * r;
      yi[j] = w[j] * t;
    }
  }
}

// RMSNorm backward over rows [begin, end): dx = r * (g - xhat * mean(g * xhat)), g = dy * w.
// From the input (xhat = x * r; gw holds one row's g as scratch) or, x_is_output, from the output
// y = w * xhat (g * xhat = dy * y, xhat = y / w).
MK_TARGET_CLONES void rms_norm_bwd_rows(const float* dy, const float* x, const float* w,
                                        const float* rstd, float* dx, float* gw, int64_t begin,
                                        int64_t end, int64_t D, bool x_is_output) {
  for (int64_t i = begin; i < end; ++i) {
    const float* gi = dy + i * D;
    const float* xi = x + i * D;
    const float ri = rstd[i];
    float* di = dx + i * D;
    if (x_is_output) {
      const float m = static_cast<float>(dot_f64(gi, xi, D) / static_cast<double>(D));
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) di[j] = ri * (gi[j] * w[j] - (xi[j] / w[j]) * m);
      continue;
    }
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) gw[j] = gi[j] * w[j];
    // mean(g * xhat) / r
    const float m = static_cast<float>(dot_f64(gw, xi, D) * ri * ri / static_cast<double>(D));
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) di[j] = ri * (gw[j] - xi[j] * m);
  }
}

constexpr int64_t kMinElementsPerTask = 1 << 14;

// x float32 [..., D], weight float32 [D]: returns (D, rows).
std::pair<int64_t, int64_t> check_rms_norm_input(const char* kOp, const at::Tensor& x,
                                                 const at::Tensor& weight) {
  MK_CHECK_CPU_FLOAT(x);
  TORCH_CHECK(x.dim() >= 1, kOp, ": x must be [..., D], got ", describe(x));
  const int64_t D = x.size(-1);
  MK_CHECK_CPU_FLOAT_SHAPE(weight, "[D] with D == x.size(-1)", D);
  return {D, x.numel() / std::max<int64_t>(D, 1)};
}

}  // namespace

at::Tensor swiglu_fwd(const at::Tensor& gate, const at::Tensor& up) {
  constexpr const char* kOp = "swiglu_fwd";
  MK_CHECK_CPU_FLOAT(gate);
  MK_CHECK_CPU_FLOAT_SHAPE(up, "gate's shape", gate.sizes().vec());
  const at::Tensor g = gate.contiguous(), u = up.contiguous();
  at::Tensor y = at::empty_like(g);
  const float* gp = g.data_ptr<float>();
  const float* upp = u.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, g.numel(), kMinElementsPerTask, [&](int64_t begin, int64_t end) {
    swiglu_fwd_kernel(gp + begin, upp + begin, yp + begin, end - begin);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& dy, const at::Tensor& gate,
                                              const at::Tensor& up) {
  constexpr const char* kOp = "swiglu_bwd";
  MK_CHECK_CPU_FLOAT(gate);
  MK_CHECK_CPU_FLOAT_SHAPE(dy, "gate's shape", gate.sizes().vec());
  MK_CHECK_CPU_FLOAT_SHAPE(up, "gate's shape", gate.sizes().vec());
  const at::Tensor d = dy.contiguous(), g = gate.contiguous(), u = up.contiguous();
  at::Tensor dgate = at::empty_like(g), dup = at::empty_like(g);
  const float* dp = d.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  const float* upp = u.data_ptr<float>();
  float* dgp = dgate.data_ptr<float>();
  float* dup_p = dup.data_ptr<float>();
  at::parallel_for(0, g.numel(), kMinElementsPerTask, [&](int64_t begin, int64_t end) {
    swiglu_bwd_kernel(dp + begin, gp + begin, upp + begin, dgp + begin, dup_p + begin,
                      end - begin);
  });
  return {dgate, dup};
}

std::tuple<at::Tensor, at::Tensor> rotary_fwd(const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& cos, const at::Tensor& sin) {
  constexpr const char* kOp = "rotary_fwd";
  MK_CHECK_ROTARY_INPUT(q);
  MK_CHECK_ROTARY_INPUT(k);
  MK_CHECK_CPU_FLOAT(cos);
  MK_CHECK_CPU_FLOAT(sin);
  TORCH_CHECK(q.size(3) == k.size(3), kOp, ": q and k must have the same head size, got q ",
              describe(q), " and k ", describe(k));
  const at::Tensor cq = expand_table(kOp, "cos", cos, q), sq = expand_table(kOp, "sin", sin, q);
  const at::Tensor ck = expand_table(kOp, "cos", cos, k), sk = expand_table(kOp, "sin", sin, k);
  return {rotary_map(q, cq, sq, false), rotary_map(k, ck, sk, false)};
}

at::Tensor rotary_bwd(const at::Tensor& dy, const at::Tensor& cos, const at::Tensor& sin) {
  constexpr const char* kOp = "rotary_bwd";
  MK_CHECK_ROTARY_INPUT(dy);
  MK_CHECK_CPU_FLOAT(cos);
  MK_CHECK_CPU_FLOAT(sin);
  const at::Tensor c = expand_table(kOp, "cos", cos, dy), s = expand_table(kOp, "sin", sin, dy);
  return rotary_map(dy, c, s, true);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                double eps) {
  constexpr const char* kOp = "rms_norm_fwd";
  const auto [D, N] = check_rms_norm_input(kOp, x, weight);
  TORCH_CHECK(eps >= 0, kOp, ": eps must be >= 0, got ", eps);
  const at::Tensor xc = x.contiguous(), w = weight.contiguous();
  at::Tensor y = at::empty_like(xc);
  std::vector<int64_t> rshape = x.sizes().vec();
  rshape.back() = 1;
  at::Tensor rstd = at::empty(rshape, xc.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  float* rp = rstd.data_ptr<float>();
  const float eps_f = static_cast<float>(eps);   // the library adds eps in fp32
  at::parallel_for(0, N, kMinRowsPerTask, [&](int64_t begin, int64_t end) {
    rms_norm_fwd_rows(xp, wp, yp, rp, begin, end, D, eps_f);
  });
  return {y, rstd};
}

at::Tensor rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                        const at::Tensor& rstd, bool x_is_output) {
  constexpr const char* kOp = "rms_norm_bwd";
  const auto [D, N] = check_rms_norm_input(kOp, x, weight);
  MK_CHECK_CPU_FLOAT_SHAPE(dy, "x's shape", x.sizes().vec());
  MK_CHECK_CPU_FLOAT(rstd);
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
  if (x_is_output) {
    for (int64_t j = 0; j < D; ++j) {
      TORCH_CHECK(wp[j] != 0.0f, kOp, ": x_is_output needs a weight without zeros (xhat = y / "
                  "weight), but weight[", j, "] is 0");
    }
  }
  at::parallel_for(0, N, kMinRowsPerTask, [&](int64_t begin, int64_t end) {
    std::vector<float> gw(x_is_output ? 0 : D);
    rms_norm_bwd_rows(gp, xp, wp, rp, dp, gw.data(), begin, end, D, x_is_output);
  });
  return dx;
}

}  // namespace metakernels
