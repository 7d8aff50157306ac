// Multi-task LoRA linear on the CPU: the GEMMs are ATen's and, for the frozen base with onednn,
// oneDNN's (gemm.h); this file arranges them so that nothing is zero-filled or copied that does
// not have to be.
//
// Forward:  the base GEMM makes y (with b), the LoRA expand is accumulated into y with beta = 1,
//           alpha = scale.
// Backward: dA[t], dB[t] are accumulated in place (beta = 1) through the caller's views, the
//           LoRA part of dx is accumulated onto the base part dy @ W.
// With per_task, on AVX-512 CPUs with fp32 (or bf16 x over an fp32 bank) unit-stride operands
// and tasks that share the threads evenly, each thread runs its tasks' LoRA products one task at
// a time (small_gemm.h; see task_groups). Otherwise, when
// every task has the same number of rows (> 0) each product is one batched GEMM; ragged layouts
// loop over the tasks and skip empty ones.
// The LoRA terms are computed in A's dtype (fp32 in the bank). When x is bf16 over the fp32
// bank (a bf16 checkpoint), the per-task path converts each task's rows to fp32 in the thread's
// scratch and adds the LoRA term onto the bf16 base term in fp32, rounding y and dx once
// (lora_forward_tasks_bf16). Otherwise, for bf16/fp16 x, the LoRA term is accumulated in a
// full-size fp32 buffer with the base term added last, also rounded once.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "gemm.h"
#include "ops.h"
#include "small_gemm.h"
#include "vec_math.h"

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

// The per-task path: one task's LoRA products back to back on small_gemm's AVX-512 kernel,
// the tasks in parallel. One task's rows of x, dy and dx (a few hundred KB) stay in the core's
// L2 across its products, where the batched GEMMs above make one pass over all tasks' rows per
// product. The tasks are dealt to the threads by rows (largest first, each to the thread with
// the fewest rows so far); the path is taken when that keeps the busiest thread within 5/4 of
// an even share (else the batched GEMMs, which split every product, are faster), for fp32
// operands (or bf16 x over an fp32 bank) with unit column strides. The caller may turn it off
// (per_task false: the batched GEMMs always).
struct Mat {  // a row-major fp32 matrix: data and row stride
  float* p;
  int64_t ld;
};

Mat mat(const at::Tensor& t) { return {t.data_ptr<float>(), t.stride(-2)}; }

// The per-task fp32 matrices of a [T, rows, cols] bank view (A, B, dA, dB): task t's row-major
// matrix starts at at(t), row stride ld.
struct TaskMats {
  float* p;
  int64_t stride, ld;
  float* at(int64_t t) const { return p + t * stride; }
};

TaskMats task_mats(const at::Tensor& t) { return {t.data_ptr<float>(), t.stride(0), t.stride(1)}; }

// The tasks of each thread, or none when the per-task path does not apply.
std::vector<std::vector<int64_t>> task_groups(bool per_task, const Segments& seg,
                                              const LoraDims& d,
                                              std::initializer_list<const at::Tensor*> ts) {
  if (!per_task || !small_gemm_avx512() || d.N == 0) return {};
  for (const at::Tensor* t : ts) {
    const auto dt = t->scalar_type();
    if ((dt != at::kFloat && dt != at::kBFloat16) || t->stride(-1) != 1) return {};
  }
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  std::vector<int64_t> order(d.T);
  for (int64_t t = 0; t < d.T; ++t) order[t] = t;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return seg.size(a) > seg.size(b); });
  std::vector<std::vector<int64_t>> groups(threads);
  std::vector<int64_t> rows(threads, 0);
  for (int64_t t : order) {
    if (seg.size(t) == 0) break;
    const int64_t g = std::min_element(rows.begin(), rows.end()) - rows.begin();
    groups[g].push_back(t);
    rows[g] += seg.size(t);
  }
  const int64_t busiest = *std::max_element(rows.begin(), rows.end());
  if (4 * busiest * threads > 5 * d.N) return {};
  return groups;
}

// Whether x is bf16 over an fp32 bank (the bf16 per-task path's operands).
bool bf16_over_f32(const at::Tensor& x, const at::Tensor& A) {
  return x.scalar_type() == at::kBFloat16 && A.scalar_type() == at::kFloat;
}

// Runs fn(t) for every task of the groups, one group per thread.
template <typename Fn>
void for_tasks(const std::vector<std::vector<int64_t>>& groups, const Fn& fn) {
  at::parallel_for(0, static_cast<int64_t>(groups.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      for (int64_t t : groups[g]) fn(t);
    }
  });
}

// Per task t (rows s .. s + n): xa = x A[t]; y (+)= scale xa B[t] (beta 0 or 1).
void lora_forward_tasks(const std::vector<std::vector<int64_t>>& groups, const Segments& seg,
                        const LoraDims& d, const at::Tensor& x, const at::Tensor& A,
                        const at::Tensor& B, double scale, at::Tensor& xa, at::Tensor& y,
                        float beta) {
  const Mat X = mat(x), XA = mat(xa), Y = mat(y);
  const TaskMats Am = task_mats(A), Bm = task_mats(B);
  const float sc = static_cast<float>(scale);
  for_tasks(groups, [&](int64_t t) {
    const int64_t s0 = seg.start(t), n = seg.size(t);
    float* xa_t = XA.p + s0 * XA.ld;
    gemm_rm(false, false, n, d.r, d.in, 1.0f, X.p + s0 * X.ld, X.ld, Am.at(t), Am.ld, 0.0f,
            xa_t, XA.ld);
    gemm_rm(false, false, n, d.out, d.r, sc, xa_t, XA.ld, Bm.at(t), Bm.ld, beta,
            Y.p + s0 * Y.ld, Y.ld);
  });
}

// Per task: g = dy B[t]^T; dB[t] += scale xa^T dy; dA[t] += scale x^T g;
// dx (+)= scale g A[t]^T (beta 0 or 1; when dx is given).
void lora_backward_tasks(const std::vector<std::vector<int64_t>>& groups, const Segments& seg,
                         const LoraDims& d, const at::Tensor& dy, const at::Tensor& x,
                         const at::Tensor& A, const at::Tensor& B, const at::Tensor& xa,
                         double scale, at::Tensor& dA, at::Tensor& dB, at::Tensor* dx,
                         float beta) {
  const Mat DY = mat(dy), X = mat(x), XA = mat(xa);
  const Mat DX = dx ? mat(*dx) : Mat{nullptr, 0};
  const TaskMats Am = task_mats(A), Bm = task_mats(B);
  const TaskMats dAm = task_mats(dA), dBm = task_mats(dB);
  const float sc = static_cast<float>(scale);
  for_tasks(groups, [&](int64_t t) {
    thread_local std::vector<float> g;
    const int64_t s0 = seg.start(t), n = seg.size(t);
    g.resize(static_cast<size_t>(n * d.r));
    const float* dy_t = DY.p + s0 * DY.ld;
    const float* x_t = X.p + s0 * X.ld;
    gemm_rm(false, true, n, d.r, d.out, 1.0f, dy_t, DY.ld, Bm.at(t), Bm.ld, 0.0f, g.data(),
            d.r);
    gemm_rm(true, false, d.r, d.out, n, sc, XA.p + s0 * XA.ld, XA.ld, dy_t, DY.ld, 1.0f,
            dBm.at(t), dBm.ld);
    gemm_rm(true, false, d.in, d.r, n, sc, x_t, X.ld, g.data(), d.r, 1.0f, dAm.at(t), dAm.ld);
    if (DX.p != nullptr) {
      gemm_rm(false, true, n, d.in, d.r, sc, g.data(), d.r, Am.at(t), Am.ld, beta,
              DX.p + s0 * DX.ld, DX.ld);
    }
  });
}

// The per-task path for bf16 x, dy, y, dx with the fp32 bank: a task's rows are converted to fp32
// in the thread's scratch (they stay in its L2 across the task's products), the products run in
// fp32 as above, and the LoRA term is added onto the bf16 base term in fp32 and rounded once, so
// no full-size fp32 copy of x, dy, the LoRA term or dx is made.
MK_TARGET_CLONES void bf16_rows_to_float(const bf16_t* src, int64_t lds, int64_t n, int64_t cols,
                                         float* dst) {
  for (int64_t i = 0; i < n; ++i) {
    const bf16_t* s = src + i * lds;
    float* o = dst + i * cols;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) o[j] = bf16_to_float(s[j]);
  }
}

// dst = bf16(float(dst) + src) over n rows of cols (src contiguous).
MK_TARGET_CLONES void add_float_rows_to_bf16(bf16_t* dst, int64_t ldd, const float* src, int64_t n,
                                             int64_t cols) {
  for (int64_t i = 0; i < n; ++i) {
    bf16_t* o = dst + i * ldd;
    const float* s = src + i * cols;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) o[j] = float_to_bf16(bf16_to_float(o[j]) + s[j]);
  }
}

// dst = bf16(src) over n rows of cols (src contiguous).
MK_TARGET_CLONES void float_rows_to_bf16(bf16_t* dst, int64_t ldd, const float* src, int64_t n,
                                         int64_t cols) {
  for (int64_t i = 0; i < n; ++i) {
    bf16_t* o = dst + i * ldd;
    const float* s = src + i * cols;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) o[j] = float_to_bf16(s[j]);
  }
}

const bf16_t* bf16_ptr(const at::Tensor& t) {
  return reinterpret_cast<const bf16_t*>(t.data_ptr<at::BFloat16>());
}
bf16_t* bf16_ptr_mut(const at::Tensor& t) {
  return reinterpret_cast<bf16_t*>(t.data_ptr<at::BFloat16>());
}

// The bf16 path converts a task's rows in chunks of at most this many bytes of fp32 per row
// buffer (every product is separable by rows: dA and dB accumulate over the chunks), so that the
// thread's scratch stays a few MB whatever the task's length and the layer's width, and a chunk
// stays in the core's L2 across its products.
constexpr int64_t kBf16ChunkBytes = 1 << 20;

int64_t bf16_chunk_rows(const LoraDims& d) {
  const int64_t width = std::max<int64_t>({d.in, d.out, 1});
  return std::max<int64_t>(16, kBf16ChunkBytes / (4 * width));
}

// Per task t: xa = x A[t]; y (+)= scale xa B[t], x and y bf16 (has_base: y holds the base term).
void lora_forward_tasks_bf16(const std::vector<std::vector<int64_t>>& groups, const Segments& seg,
                             const LoraDims& d, const at::Tensor& x, const at::Tensor& A,
                             const at::Tensor& B, double scale, at::Tensor& xa, at::Tensor& y,
                             bool has_base) {
  const bf16_t* X = bf16_ptr(x);
  bf16_t* Y = bf16_ptr_mut(y);
  const int64_t ldx = x.stride(0), ldy = y.stride(0);
  const Mat XA = mat(xa);
  const TaskMats Am = task_mats(A), Bm = task_mats(B);
  const float sc = static_cast<float>(scale);
  const int64_t chunk = bf16_chunk_rows(d);
  for_tasks(groups, [&](int64_t t) {
    thread_local std::vector<float> xt, lora;
    const int64_t n = seg.size(t);
    xt.resize(static_cast<size_t>(std::min(n, chunk) * d.in));
    lora.resize(static_cast<size_t>(std::min(n, chunk) * d.out));
    for (int64_t c0 = 0; c0 < n; c0 += chunk) {
      const int64_t s0 = seg.start(t) + c0, m = std::min(chunk, n - c0);
      bf16_rows_to_float(X + s0 * ldx, ldx, m, d.in, xt.data());
      float* xa_c = XA.p + s0 * XA.ld;
      gemm_rm(false, false, m, d.r, d.in, 1.0f, xt.data(), d.in, Am.at(t), Am.ld, 0.0f, xa_c,
              XA.ld);
      gemm_rm(false, false, m, d.out, d.r, sc, xa_c, XA.ld, Bm.at(t), Bm.ld, 0.0f, lora.data(),
              d.out);
      if (has_base) {
        add_float_rows_to_bf16(Y + s0 * ldy, ldy, lora.data(), m, d.out);
      } else {
        float_rows_to_bf16(Y + s0 * ldy, ldy, lora.data(), m, d.out);
      }
    }
  });
}

// Per task: g = dy B[t]^T; dB[t] += scale xa^T dy; dA[t] += scale x^T g; dx (+)= scale g A[t]^T
// (when dx is given; has_base: dx holds the base term), with x, dy, dx bf16.
void lora_backward_tasks_bf16(const std::vector<std::vector<int64_t>>& groups,
                              const Segments& seg, const LoraDims& d, const at::Tensor& dy,
                              const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                              const at::Tensor& xa, double scale, at::Tensor& dA, at::Tensor& dB,
                              at::Tensor* dx, bool has_base) {
  const bf16_t* DY = bf16_ptr(dy);
  const bf16_t* X = bf16_ptr(x);
  bf16_t* DX = dx ? bf16_ptr_mut(*dx) : nullptr;
  const int64_t lddy = dy.stride(0), ldx = x.stride(0), lddx = dx ? dx->stride(0) : 0;
  const Mat XA = mat(xa);
  const TaskMats Am = task_mats(A), Bm = task_mats(B);
  const TaskMats dAm = task_mats(dA), dBm = task_mats(dB);
  const float sc = static_cast<float>(scale);
  const int64_t chunk = bf16_chunk_rows(d);
  for_tasks(groups, [&](int64_t t) {
    thread_local std::vector<float> g, dyt, xt, dxt;
    const int64_t n = seg.size(t), rows = std::min(n, chunk);
    g.resize(static_cast<size_t>(rows * d.r));
    dyt.resize(static_cast<size_t>(rows * d.out));
    xt.resize(static_cast<size_t>(rows * d.in));
    if (DX != nullptr) dxt.resize(static_cast<size_t>(rows * d.in));
    for (int64_t c0 = 0; c0 < n; c0 += chunk) {
      const int64_t s0 = seg.start(t) + c0, m = std::min(chunk, n - c0);
      bf16_rows_to_float(DY + s0 * lddy, lddy, m, d.out, dyt.data());
      bf16_rows_to_float(X + s0 * ldx, ldx, m, d.in, xt.data());
      gemm_rm(false, true, m, d.r, d.out, 1.0f, dyt.data(), d.out, Bm.at(t), Bm.ld, 0.0f,
              g.data(), d.r);
      gemm_rm(true, false, d.r, d.out, m, sc, XA.p + s0 * XA.ld, XA.ld, dyt.data(), d.out, 1.0f,
              dBm.at(t), dBm.ld);
      gemm_rm(true, false, d.in, d.r, m, sc, xt.data(), d.in, g.data(), d.r, 1.0f, dAm.at(t),
              dAm.ld);
      if (DX == nullptr) continue;
      gemm_rm(false, true, m, d.in, d.r, sc, g.data(), d.r, Am.at(t), Am.ld, 0.0f, dxt.data(),
              d.in);
      if (has_base) {
        add_float_rows_to_bf16(DX + s0 * lddx, lddx, dxt.data(), m, d.in);
      } else {
        float_rows_to_bf16(DX + s0 * lddx, lddx, dxt.data(), m, d.in);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> multi_lora_linear_fwd(const at::Tensor& x,
                                                         const std::optional<at::Tensor>& W_opt,
                                                         const std::optional<at::Tensor>& b_opt,
                                                         const at::Tensor& A, const at::Tensor& B,
                                                         const at::Tensor& offsets, double scale,
                                                         bool onednn, bool per_task) {
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
  at::Tensor xa = at::empty({d.N, d.r}, A.options());
  at::Tensor y = d.has_base ? linear_nt(x, *W_opt, b_opt, onednn)
                            : at::empty({d.N, d.out}, x.options());
  if (bf16_over_f32(x, A)) {
    const auto groups = task_groups(per_task, seg, d, {&x, &A, &B, &xa, &y});
    if (!groups.empty()) {
      lora_forward_tasks_bf16(groups, seg, d, x, A, B, scale, xa, y, d.has_base);
      return {y, xa};
    }
  }
  const at::Tensor xf = same_dtype ? x : x.to(A.scalar_type());
  const auto groups = same_dtype ? task_groups(per_task, seg, d, {&xf, &A, &B, &y})
                                 : std::vector<std::vector<int64_t>>();
  if (!groups.empty()) {
    lora_forward_tasks(groups, seg, d, xf, A, B, scale, xa, y, d.has_base ? 1.0f : 0.0f);
  } else if (same_dtype) {
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
                                 at::Tensor& dB, bool need_dx, bool onednn, bool per_task) {
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
  if (bf16_over_f32(x, A)) {
    const auto groups = task_groups(per_task, seg, d, {&dy, &x, &A, &B, &xa, &dA, &dB});
    if (!groups.empty()) {
      if (!need_dx) {
        lora_backward_tasks_bf16(groups, seg, d, dy, x, A, B, xa, scale, dA, dB, nullptr, false);
        return at::empty({0}, x.options());
      }
      at::Tensor dx = d.has_base ? linear_nt(dy, W_opt->t(), std::nullopt, onednn)
                                 : at::empty({d.N, d.in}, x.options());
      if (dx.stride(-1) == 1) {
        lora_backward_tasks_bf16(groups, seg, d, dy, x, A, B, xa, scale, dA, dB, &dx,
                                 d.has_base);
        return dx;
      }
    }
  }
  const at::Tensor xf = same_dtype ? x : x.to(A.scalar_type());
  const at::Tensor dyf = same_dtype ? dy : dy.to(A.scalar_type());
  const auto groups = same_dtype
                          ? task_groups(per_task, seg, d, {&dyf, &xf, &A, &B, &xa, &dA, &dB})
                          : std::vector<std::vector<int64_t>>();
  if (!need_dx) {
    if (!groups.empty()) {
      lora_backward_tasks(groups, seg, d, dyf, xf, A, B, xa, scale, dA, dB, nullptr, 0.0f);
    } else {
      lora_backward(seg, d, dyf, xf, A, B, xa, scale, dA, dB, nullptr, 0.0);
    }
    return at::empty({0}, x.options());
  }
  at::Tensor dx = d.has_base ? linear_nt(dy, W_opt->t(), std::nullopt, onednn)
                             : at::empty({d.N, d.in}, x.options());
  if (!groups.empty() && dx.stride(-1) == 1) {
    lora_backward_tasks(groups, seg, d, dyf, xf, A, B, xa, scale, dA, dB, &dx,
                        d.has_base ? 1.0f : 0.0f);
  } else if (same_dtype) {
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
