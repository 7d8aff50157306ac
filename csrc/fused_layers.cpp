// One-pass kernels for the frozen base's rotary embedding, RMSNorm and SwiGLU (the layer ops
// metakernels/ops/{rotary,rms_norm,swiglu}.py, which hold their plain-PyTorch references).
//
// The rotary forward rounds exactly as Hugging Face's `q * cos + rotate_half(q) * sin` does as
// separate ops (each product rounded, then the sum; setup.py compiles with -ffp-contract=off so
// that no multiply-add is fused), bitwise the library's. It reads q once and writes the result
// once, where the op-by-op form makes five passes (two products, a negation, a concatenation and
// a sum). The backwards are single passes too.
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
#include <type_traits>
#include <utility>
#include <vector>

#include "checks.h"
#include "ops.h"
#include "vec_math.h"

namespace metakernels {
namespace {

constexpr int64_t kMinRowsPerTask = 16;

// cos/sin (of x's dtype, checked by the caller) expanded to x's shape: broadcast axes get
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

// x * cos + cat(-x2, x1) * sin for one row of 2h elements, each product rounded on its own (to
// T: a bf16 row rounds each product and the sum to bf16, as the library's bf16 ops do).
template <typename T>
inline __attribute__((always_inline)) void rotary_row(const T* x, const T* c, const T* s, T* o,
                                                      int64_t h) {
#pragma omp simd
  for (int64_t j = 0; j < h; ++j) {
    const float a = round_to<T>(load(x[j]) * load(c[j]));
    const float b = round_to<T>(-load(x[j + h]) * load(s[j]));
    store(o + j, a + b);
  }
#pragma omp simd
  for (int64_t j = 0; j < h; ++j) {
    const float a = round_to<T>(load(x[j + h]) * load(c[j + h]));
    const float b = round_to<T>(load(x[j]) * load(s[j + h]));
    store(o + j + h, a + b);
  }
}

// The transpose of rotary_row: dy * cos + cat(dy2 * sin2, -dy1 * sin1) (in fp32, rounded once).
template <typename T>
inline __attribute__((always_inline)) void rotary_bwd_row(const T* g, const T* c, const T* s,
                                                          T* o, int64_t h) {
#pragma omp simd
  for (int64_t j = 0; j < h; ++j) {
    store(o + j, load(g[j]) * load(c[j]) + load(g[j + h]) * load(s[j + h]));
  }
#pragma omp simd
  for (int64_t j = 0; j < h; ++j) {
    store(o + j + h, load(g[j + h]) * load(c[j + h]) - load(g[j]) * load(s[j]));
  }
}

// Rows [begin, end) of the order r, forward (bwd = false) or backward: the loop over rows is
// inside the cloned function (one dispatch per chunk, not per row), the row's offsets kept by
// counters instead of a division per row.
template <typename T>
inline __attribute__((always_inline)) void rotary_rows_impl(const T* x, const T* c, const T* s,
                                                            T* o, const RowOrder& r,
                                                            int64_t begin, int64_t end, int64_t h,
                                                            bool bwd) {
  int64_t i0 = begin / (r.n[1] * r.n[2]), i1 = begin / r.n[2] % r.n[1], i2 = begin % r.n[2];
  for (int64_t row = begin; row < end; ++row) {
    const T* xr = x + i0 * r.xs[0] + i1 * r.xs[1] + i2 * r.xs[2];
    const T* cr = c + i0 * r.cs[0] + i1 * r.cs[1] + i2 * r.cs[2];
    const T* sr = s + i0 * r.ss[0] + i1 * r.ss[1] + i2 * r.ss[2];
    T* orow = o + i0 * r.os[0] + i1 * r.os[1] + i2 * r.os[2];
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

MK_TARGET_CLONES void rotary_rows(const float* x, const float* c, const float* s, float* o,
                                  const RowOrder& r, int64_t begin, int64_t end, int64_t h,
                                  bool bwd) {
  rotary_rows_impl(x, c, s, o, r, begin, end, h, bwd);
}

MK_TARGET_CLONES void rotary_rows(const bf16_t* x, const bf16_t* c, const bf16_t* s, bf16_t* o,
                                  const RowOrder& r, int64_t begin, int64_t end, int64_t h,
                                  bool bwd) {
  rotary_rows_impl(x, c, s, o, r, begin, end, h, bwd);
}

// The storage of a float32 or bfloat16 tensor as the kernels' element type.
template <typename T>
T* elements(const at::Tensor& t) {
  if constexpr (std::is_same_v<T, float>) {
    return t.data_ptr<float>();
  } else {
    return reinterpret_cast<bf16_t*>(t.data_ptr<at::BFloat16>());
  }
}

// Runs fn.template operator()<T>() with T the kernels' element type of a float32 or bfloat16 x.
template <typename Fn>
auto dispatch_float_bf16(const at::Tensor& x, const Fn& fn) {
  if (x.scalar_type() == at::kBFloat16) return fn.template operator()<bf16_t>();
  return fn.template operator()<float>();
}

// out = the rotary map of x (or its transpose, bwd) with the expanded cos/sin tables, in x's
// memory layout; rows in parallel.
at::Tensor rotary_map(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      bool bwd) {
  at::Tensor out = at::empty_like(x);
  const RowOrder r = row_order(x, cos, sin, out);
  const int64_t h = x.size(3) / 2;
  dispatch_float_bf16(x, [&]<typename T>() {
    const T* xp = elements<T>(x);
    const T* cp = elements<T>(cos);
    const T* sp = elements<T>(sin);
    T* op = elements<T>(out);
    at::parallel_for(0, r.n[0] * r.n[1] * r.n[2], kMinRowsPerTask,
                     [&](int64_t begin, int64_t end) {
                       rotary_rows(xp, cp, sp, op, r, begin, end, h, bwd);
                     });
  });
  return out;
}

// dgate = dy * up * s * (1 + gate * (1 - s)), dup = dy * gate * s, s = sigmoid(gate): the
// backward of silu(gate) * up in one pass (reads dy, gate, up; writes dgate, dup), in fp32.
template <typename T>
inline __attribute__((always_inline)) void swiglu_bwd_impl(const T* dy, const T* gate, const T* up,
                                                           T* dgate, T* dup, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float g = load(gate[i]);
    const float s = sigmoid(g);
    const float d = load(dy[i]);
    store(dgate + i, d * load(up[i]) * s * (1.f + g * (1.f - s)));
    store(dup + i, d * (g * s));
  }
}

// y = silu(gate) * up = (gate * sigmoid(gate)) * up in one pass (silu rounded to T first, as
// the library's bf16 silu then product do).
template <typename T>
inline __attribute__((always_inline)) void swiglu_fwd_impl(const T* gate, const T* up, T* y,
                                                           int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float g = load(gate[i]);
    store(y + i, round_to<T>(g * sigmoid(g)) * load(up[i]));
  }
}

MK_TARGET_CLONES void swiglu_bwd_kernel(const float* dy, const float* gate, const float* up,
                                        float* dgate, float* dup, int64_t n) {
  swiglu_bwd_impl(dy, gate, up, dgate, dup, n);
}
MK_TARGET_CLONES void swiglu_bwd_kernel(const bf16_t* dy, const bf16_t* gate, const bf16_t* up,
                                        bf16_t* dgate, bf16_t* dup, int64_t n) {
  swiglu_bwd_impl(dy, gate, up, dgate, dup, n);
}
MK_TARGET_CLONES void swiglu_fwd_kernel(const float* gate, const float* up, float* y, int64_t n) {
  swiglu_fwd_impl(gate, up, y, n);
}
MK_TARGET_CLONES void swiglu_fwd_kernel(const bf16_t* gate, const bf16_t* up, bf16_t* y,
                                        int64_t n) {
  swiglu_fwd_impl(gate, up, y, n);
}

// A row of T as floats: the row itself for float, else converted into buf.
inline const float* as_float_row(const float* x, float*, int64_t) { return x; }
inline const float* as_float_row(const bf16_t* x, float* buf, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) buf[j] = bf16_to_float(x[j]);
  return buf;
}

// RMSNorm forward over rows [begin, end) of D elements: r = 1 / sqrt(mean(x**2) + eps) (the row
// sum in fp64, then the library's fp32 roundings), y = w * (x * r) (two roundings, to T, as the
// library: x * r rounded to x's dtype, then the product with the weight). w: D floats; buf: D
// floats of scratch for a bf16 row.
template <typename T>
inline __attribute__((always_inline)) void rms_norm_fwd_impl(const T* x, const float* w, T* y,
                                                             float* rstd, float* buf,
                                                             int64_t begin, int64_t end,
                                                             int64_t D, float eps) {
  for (int64_t i = begin; i < end; ++i) {
    const float* xi = as_float_row(x + i * D, buf, D);
    const float ms = static_cast<float>(dot_f64(xi, xi, D)) / static_cast<float>(D);
    const float r = 1.0f / std::sqrt(ms + eps);
    rstd[i] = r;
    T* yi = y + i * D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) {
      const float t = round_to<T>(xi[j] * r);
      store(yi + j, w[j] * t);
    }
  }
}

MK_TARGET_CLONES void rms_norm_fwd_rows(const float* x, const float* w, float* y, float* rstd,
                                        float* buf, int64_t begin, int64_t end, int64_t D,
                                        float eps) {
  rms_norm_fwd_impl(x, w, y, rstd, buf, begin, end, D, eps);
}
MK_TARGET_CLONES void rms_norm_fwd_rows(const bf16_t* x, const float* w, bf16_t* y, float* rstd,
                                        float* buf, int64_t begin, int64_t end, int64_t D,
                                        float eps) {
  rms_norm_fwd_impl(x, w, y, rstd, buf, begin, end, D, eps);
}

// RMSNorm backward over rows [begin, end): dx = r * (g - xhat * mean(g * xhat)), g = dy * w, in
// fp32. From the input (xhat = x * r) or, x_is_output, from the output y = w * xhat
// (g * xhat = dy * y, xhat = y / w). scratch: 3 D floats (g, and the rows of a bf16 dy and x).
template <typename T>
inline __attribute__((always_inline)) void rms_norm_bwd_impl(const T* dy, const T* x,
                                                             const float* w, const float* rstd,
                                                             T* dx, float* scratch, int64_t begin,
                                                             int64_t end, int64_t D,
                                                             bool x_is_output) {
  float* gw = scratch;
  for (int64_t i = begin; i < end; ++i) {
    const float* gi = as_float_row(dy + i * D, scratch + D, D);
    const float* xi = as_float_row(x + i * D, scratch + 2 * D, D);
    const float ri = rstd[i];
    T* di = dx + i * D;
    if (x_is_output) {
      const float m = static_cast<float>(dot_f64(gi, xi, D) / static_cast<double>(D));
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) store(di + j, ri * (gi[j] * w[j] - (xi[j] / w[j]) * m));
      continue;
    }
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) gw[j] = gi[j] * w[j];
    // mean(g * xhat) / r
    const float m = static_cast<float>(dot_f64(gw, xi, D) * ri * ri / static_cast<double>(D));
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) store(di + j, ri * (gw[j] - xi[j] * m));
  }
}

MK_TARGET_CLONES void rms_norm_bwd_rows(const float* dy, const float* x, const float* w,
                                        const float* rstd, float* dx, float* scratch,
                                        int64_t begin, int64_t end, int64_t D, bool x_is_output) {
  rms_norm_bwd_impl(dy, x, w, rstd, dx, scratch, begin, end, D, x_is_output);
}
MK_TARGET_CLONES void rms_norm_bwd_rows(const bf16_t* dy, const bf16_t* x, const float* w,
                                        const float* rstd, bf16_t* dx, float* scratch,
                                        int64_t begin, int64_t end, int64_t D, bool x_is_output) {
  rms_norm_bwd_impl(dy, x, w, rstd, dx, scratch, begin, end, D, x_is_output);
}

constexpr int64_t kMinElementsPerTask = 1 << 14;

// A float32 or bfloat16 CPU tensor (the kernels' element types).
#define MK_CHECK_CPU_F32_BF16(x)                                                                \
  do {                                                                                          \
    MK_CHECK_DEFINED(x);                                                                        \
    MK_CHECK_CPU(x);                                                                            \
    TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kBFloat16, kOp,     \
                ": ", #x, " must have dtype torch.float32 or torch.bfloat16, got ",             \
                ::metakernels::describe(x));                                                    \
  } while (0)

// y like x: x's dtype and shape.
#define MK_CHECK_LIKE(y, x, what)                                                               \
  do {                                                                                          \
    MK_CHECK_DEFINED(y);                                                                        \
    MK_CHECK_CPU(y);                                                                            \
    MK_CHECK_DTYPE(y, (x).scalar_type());                                                       \
    MK_CHECK_SHAPE(y, what, (x).sizes().vec());                                                 \
  } while (0)

// q, k, dy: float32 or bfloat16 CPU [B, H, L, D], D even, unit last stride.
#define MK_CHECK_ROTARY_INPUT(x)                                                                \
  do {                                                                                          \
    MK_CHECK_CPU_F32_BF16(x);                                                                   \
    MK_CHECK_DIM(x, 4, "[B, H, L, D]");                                                         \
    TORCH_CHECK((x).size(3) % 2 == 0 && (x).stride(3) == 1, kOp, ": ", #x,                     \
                " must have an even head size D with unit stride, got ", describe(x),          \
                " with strides ", (x).strides());                                              \
  } while (0)

// x float32 or bfloat16 [..., D], weight [D] of x's dtype: returns (D, rows).
std::pair<int64_t, int64_t> check_rms_norm_input(const char* kOp, const at::Tensor& x,
                                                 const at::Tensor& weight) {
  MK_CHECK_CPU_F32_BF16(x);
  TORCH_CHECK(x.dim() >= 1, kOp, ": x must be [..., D], got ", describe(x));
  const int64_t D = x.size(-1);
  MK_CHECK_DEFINED(weight);
  MK_CHECK_CPU(weight);
  MK_CHECK_DTYPE(weight, x.scalar_type());
  MK_CHECK_SHAPE(weight, "[D] with D == x.size(-1)", D);
  return {D, x.numel() / std::max<int64_t>(D, 1)};
}

}  // namespace

at::Tensor swiglu_fwd(const at::Tensor& gate, const at::Tensor& up) {
  constexpr const char* kOp = "swiglu_fwd";
  MK_CHECK_CPU_F32_BF16(gate);
  MK_CHECK_LIKE(up, gate, "gate's shape");
  const at::Tensor g = gate.contiguous(), u = up.contiguous();
  at::Tensor y = at::empty_like(g);
  dispatch_float_bf16(g, [&]<typename T>() {
    const T* gp = elements<T>(g);
    const T* upp = elements<T>(u);
    T* yp = elements<T>(y);
    at::parallel_for(0, g.numel(), kMinElementsPerTask, [&](int64_t begin, int64_t end) {
      swiglu_fwd_kernel(gp + begin, upp + begin, yp + begin, end - begin);
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& dy, const at::Tensor& gate,
                                              const at::Tensor& up) {
  constexpr const char* kOp = "swiglu_bwd";
  MK_CHECK_CPU_F32_BF16(gate);
  MK_CHECK_LIKE(dy, gate, "gate's shape");
  MK_CHECK_LIKE(up, gate, "gate's shape");
  const at::Tensor d = dy.contiguous(), g = gate.contiguous(), u = up.contiguous();
  at::Tensor dgate = at::empty_like(g), dup = at::empty_like(g);
  dispatch_float_bf16(g, [&]<typename T>() {
    const T* dp = elements<T>(d);
    const T* gp = elements<T>(g);
    const T* upp = elements<T>(u);
    T* dgp = elements<T>(dgate);
    T* dup_p = elements<T>(dup);
    at::parallel_for(0, g.numel(), kMinElementsPerTask, [&](int64_t begin, int64_t end) {
      swiglu_bwd_kernel(dp + begin, gp + begin, upp + begin, dgp + begin, dup_p + begin,
                        end - begin);
    });
  });
  return {dgate, dup};
}

std::tuple<at::Tensor, at::Tensor> rotary_fwd(const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& cos, const at::Tensor& sin) {
  constexpr const char* kOp = "rotary_fwd";
  MK_CHECK_ROTARY_INPUT(q);
  MK_CHECK_ROTARY_INPUT(k);
  MK_CHECK_DTYPE(k, q.scalar_type());
  MK_CHECK_CPU(cos);
  MK_CHECK_DTYPE(cos, q.scalar_type());
  MK_CHECK_CPU(sin);
  MK_CHECK_DTYPE(sin, q.scalar_type());
  TORCH_CHECK(q.size(3) == k.size(3), kOp, ": q and k must have the same head size, got q ",
              describe(q), " and k ", describe(k));
  const at::Tensor cq = expand_table(kOp, "cos", cos, q), sq = expand_table(kOp, "sin", sin, q);
  const at::Tensor ck = expand_table(kOp, "cos", cos, k), sk = expand_table(kOp, "sin", sin, k);
  return {rotary_map(q, cq, sq, false), rotary_map(k, ck, sk, false)};
}

at::Tensor rotary_bwd(const at::Tensor& dy, const at::Tensor& cos, const at::Tensor& sin) {
  constexpr const char* kOp = "rotary_bwd";
  MK_CHECK_ROTARY_INPUT(dy);
  MK_CHECK_CPU(cos);
  MK_CHECK_DTYPE(cos, dy.scalar_type());
  MK_CHECK_CPU(sin);
  MK_CHECK_DTYPE(sin, dy.scalar_type());
  const at::Tensor c = expand_table(kOp, "cos", cos, dy), s = expand_table(kOp, "sin", sin, dy);
  return rotary_map(dy, c, s, true);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                double eps) {
  constexpr const char* kOp = "rms_norm_fwd";
  const auto [D, N] = check_rms_norm_input(kOp, x, weight);
  TORCH_CHECK(eps >= 0, kOp, ": eps must be >= 0, got ", eps);
  const at::Tensor xc = x.contiguous();
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  at::Tensor y = at::empty_like(xc);
  std::vector<int64_t> rshape = x.sizes().vec();
  rshape.back() = 1;
  at::Tensor rstd = at::empty(rshape, xc.options().dtype(at::kFloat));   // fp32, as the library's
  const float* wp = w.data_ptr<float>();
  float* rp = rstd.data_ptr<float>();
  const float eps_f = static_cast<float>(eps);   // the library adds eps in fp32
  dispatch_float_bf16(xc, [&]<typename T>() {
    const T* xp = elements<T>(xc);
    T* yp = elements<T>(y);
    at::parallel_for(0, N, kMinRowsPerTask, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(std::is_same_v<T, float> ? 0 : D);
      rms_norm_fwd_rows(xp, wp, yp, rp, buf.data(), begin, end, D, eps_f);
    });
  });
  return {y, rstd};
}

at::Tensor rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                        const at::Tensor& rstd, bool x_is_output) {
  constexpr const char* kOp = "rms_norm_bwd";
  const auto [D, N] = check_rms_norm_input(kOp, x, weight);
  MK_CHECK_LIKE(dy, x, "x's shape");
  MK_CHECK_CPU_FLOAT(rstd);
  TORCH_CHECK(rstd.numel() == N, kOp, ": rstd must hold one value per row of x (", N,
              "), got ", describe(rstd));
  const at::Tensor g = dy.contiguous(), xc = x.contiguous(), r = rstd.contiguous();
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  at::Tensor dx = at::empty_like(xc);
  const float* wp = w.data_ptr<float>();
  const float* rp = r.data_ptr<float>();
  if (x_is_output) {
    for (int64_t j = 0; j < D; ++j) {
      TORCH_CHECK(wp[j] != 0.0f, kOp, ": x_is_output needs a weight without zeros (xhat = y / "
                  "weight), but weight[", j, "] is 0");
    }
  }
  dispatch_float_bf16(xc, [&]<typename T>() {
    const T* gp = elements<T>(g);
    const T* xp = elements<T>(xc);
    T* dp = elements<T>(dx);
    at::parallel_for(0, N, kMinRowsPerTask, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(3 * D);
      rms_norm_bwd_rows(gp, xp, wp, rp, dp, scratch.data(), begin, end, D, x_is_output);
    });
  });
  return dx;
}

}  // namespace metakernels
