// Causal (or masked) attention for the short sequences of few-shot meta-learning, forward and
// backward, on the CPU.
//
// ATen's flash attention for the CPU splits a sequence of L <= 192 into blocks of 32 queries and
// makes five passes of small GEMMs per block in its backward. For L of a few hundred at most, a
// block of kRowBlock query rows' scores S = scale * Q K^T [rows, Lk] fits in L1/L2, so this kernel
// computes them in one product per block (small_gemm.h, single-threaded inside a parallel loop over
// the (batch, head) pairs), applies the mask and the softmax in place, and keeps only the output
// and the per-row logsumexp (lse) for the backward, which recomputes P = exp(S - lse):
//
//   forward:  S = scale Q K^T, masked; P = softmax(S); O = P V
//   backward: dV = P^T dO; dP = dO V^T; dS = P * (dP - rowsum(dO * O)); dQ = scale dS K;
//             dK = scale dS^T Q
//
// Under the causal mask a block of rows needs only the keys up to its last row: the products
// skip the rest (at L = 128 and 32-row blocks, 5/8 of the full products' work). K (and V in
// the backward) are transposed once per head, so that every block's product reads rows of
// vectors.
//
// The pairs of one key/value head (grouped-query attention: H / Hkv query heads share it) run in
// one task, so that dK and dV are accumulated without races. A query row with no key to attend to
// (a fully masked row) gets a zero output and lse = +inf, so that it passes no gradient.
//
// bfloat16 q, k, v (a bf16 base) are computed in fp32: each head's rows are converted in the
// thread's scratch as the head is reached, and its output and gradients rounded to bf16 once;
// lse stays fp32.
//
// Layouts: q [B, H, Lq, D], k/v [B, Hkv, Lk, D], any strides with a unit last stride (the
// projections' [B, L, H, D] outputs, transposed); mask: none (causal when `causal`, else full)
// or bool [B or 1, 1, Lq, Lk], true = attend. The output and dq are allocated [B, Lq, H, D] and
// returned as [B, H, Lq, D] views (what the o projection reads without a copy); dk/dv keep k/v's
// layout.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "checks.h"
#include "ops.h"
#include "small_gemm.h"
#include "vec_math.h"

namespace metakernels {
namespace {

struct AttnDims {
  int64_t B, H, Hkv, Lq, Lk, D, group;
};

// A [B, H, L, D] float32 or bfloat16 tensor's data and strides. A head's rows are handed to the
// products as floats: a float32 head in place; a bfloat16 head converted into the thread's scratch
// (row stride D), and its results written there and rounded into the tensor once the head is done
// (flush). The products, softmax and lse are fp32 either way.
struct Strided {
  void* p;
  int64_t sb, sh, sl;
  bool bf16;
  int64_t offset(int64_t b, int64_t h) const { return b * sb + h * sh; }
  float* f32(int64_t b, int64_t h) const { return static_cast<float*>(p) + offset(b, h); }
  bf16_t* b16(int64_t b, int64_t h) const { return static_cast<bf16_t*>(p) + offset(b, h); }
};

struct Rows {  // L rows of D floats
  float* p;
  int64_t ld;
};

Strided strided(const at::Tensor& t) {
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2),
          t.scalar_type() == at::kBFloat16};
}

MK_TARGET_CLONES void bf16_rows_in(const bf16_t* src, int64_t lds, int64_t L, int64_t D,
                                   float* dst) {
  for (int64_t i = 0; i < L; ++i) {
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) dst[i * D + j] = bf16_to_float(src[i * lds + j]);
  }
}

MK_TARGET_CLONES void bf16_rows_out(const float* src, int64_t L, int64_t D, bf16_t* dst,
                                    int64_t ldd) {
  for (int64_t i = 0; i < L; ++i) {
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) dst[i * ldd + j] = float_to_bf16(src[i * D + j]);
  }
}

// Head (b, h)'s L rows as floats to read: in place, or converted into buf.
Rows rows_in(const Strided& X, int64_t b, int64_t h, int64_t L, int64_t D,
             std::vector<float>& buf) {
  if (!X.bf16) return {X.f32(b, h), X.sl};
  buf.resize(static_cast<size_t>(L * D));
  bf16_rows_in(X.b16(b, h), X.sl, L, D, buf.data());
  return {buf.data(), D};
}

// Where head (b, h)'s L result rows are written as floats: in place, or in buf until flush.
Rows rows_out(const Strided& X, int64_t b, int64_t h, int64_t L, int64_t D,
              std::vector<float>& buf) {
  if (!X.bf16) return {X.f32(b, h), X.sl};
  buf.resize(static_cast<size_t>(L * D));
  return {buf.data(), D};
}

void flush(const Strided& X, int64_t b, int64_t h, int64_t L, int64_t D,
           const std::vector<float>& buf) {
  if (X.bf16) bf16_rows_out(buf.data(), L, D, X.b16(b, h), X.sl);
}

// kept(i, j): query i may attend to key j.
struct Mask {
  const bool* p = nullptr;  // [B or 1, 1, Lq, Lk] contiguous, or null
  int64_t sb = 0, Lk = 0;
  bool causal = false;
  int64_t offset = 0;       // causal: key j <= i + offset (Lk - Lq, bottom-right aligned as
                            // flash; the callers only pass Lq == Lk)
  const bool* row(int64_t b, int64_t i) const { return p + b * sb + i * Lk; }
  // Query i's keys [0, n) may be kept (an explicit mask may still drop some); the rest are not.
  int64_t keys(int64_t i) const {
    return p == nullptr && causal ? std::clamp<int64_t>(i + offset + 1, 0, Lk) : Lk;
  }
};

// Query rows per block of the products: a block's [32, L] scores stay in L2 with the head's K^T
// (docs/performance.md compares the block sizes).
constexpr int64_t kRowBlock = 32;

// Softmax of the masked score rows i0 .. i0 + rows of a block in place (S [rows, width], row
// stride ld; columns past `width` are not touched, the mask drops them all); writes lse. Fully
// masked rows become zeros with lse = +inf.
MK_TARGET_CLONES void masked_softmax_rows(float* S, int64_t ld, float* lse, int64_t i0,
                                          int64_t rows, int64_t width, const Mask& mask,
                                          int64_t b) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    float* s = S + r * ld;
    const int64_t n = std::min(mask.keys(i), width);
    if (mask.p != nullptr) {
      const bool* keep = mask.row(b, i);
      for (int64_t j = 0; j < width; ++j) s[j] = keep[j] ? s[j] : kNegInf;
    }
    for (int64_t j = n; j < width; ++j) s[j] = 0.0f;
    float m = kNegInf;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j]);
    if (m == kNegInf) {                   // nothing to attend to
      for (int64_t j = 0; j < width; ++j) s[j] = 0.0f;
      lse[r] = std::numeric_limits<float>::infinity();
      continue;
    }
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      const float e = exp_nonpositive(s[j] - m);   // masked: exp(-inf) = 0
      s[j] = e;
      sum += e;
    }
    const float inv = 1.0f / sum;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) s[j] *= inv;
    lse[r] = m + std::log(sum);
  }
}

// P = exp(S - lse) in place over a block's rows (the forward's softmax, recomputed), masked
// entries 0; the layout as masked_softmax_rows'.
MK_TARGET_CLONES void recompute_probs(float* S, int64_t ld, const float* lse, int64_t i0,
                                      int64_t rows, int64_t width, const Mask& mask, int64_t b) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    float* s = S + r * ld;
    const float l = lse[r];
    if (std::isinf(l)) {
      std::fill(s, s + width, 0.0f);
      continue;
    }
    const int64_t n = std::min(mask.keys(i), width);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) s[j] = exp_nonpositive(std::min(s[j] - l, 0.0f));
    for (int64_t j = n; j < width; ++j) s[j] = 0.0f;
    if (mask.p != nullptr) {
      const bool* keep = mask.row(b, i);
      for (int64_t j = 0; j < width; ++j) s[j] = keep[j] ? s[j] : 0.0f;
    }
  }
}

// dS = P * (dP - delta_i) in place in dP, delta_i = rowsum(dO * O) (given per row); both
// [rows, width] with row stride ld.
MK_TARGET_CLONES void softmax_bwd_rows(const float* P, float* dP, const float* delta, int64_t rows,
                                       int64_t width, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* p = P + r * ld;
    float* d = dP + r * ld;
    const float di = delta[r];
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) d[j] = p[j] * (d[j] - di);
  }
}

// Xt [D, L] (row stride L) = the [L, D] rows of X (row stride sl).
void transpose_rows(const float* X, int64_t sl, int64_t L, int64_t D, float* Xt) {
  transpose_rm(X, sl, L, D, Xt, L);
}

MK_TARGET_CLONES void row_dots(const float* a, int64_t lda, const float* b, int64_t ldb,
                               float* out, int64_t rows, int64_t D) {
  for (int64_t i = 0; i < rows; ++i) out[i] = static_cast<float>(dot_f64(a + i * lda, b + i * ldb, D));
}

// float32 or bfloat16, q's dtype.
#define MK_CHECK_ATTN_INPUT(x, what)                                                            \
  do {                                                                                          \
    MK_CHECK_DEFINED(x);                                                                        \
    MK_CHECK_CPU(x);                                                                            \
    TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kBFloat16, kOp,     \
                ": ", #x, " must have dtype torch.float32 or torch.bfloat16, got ",             \
                describe(x));                                                                   \
    MK_CHECK_DTYPE(x, q.scalar_type());                                                         \
    MK_CHECK_DIM(x, 4, what);                                                                   \
    TORCH_CHECK((x).stride(3) == 1, kOp, ": ", #x, " must have a unit last stride, got ",      \
                describe(x), " with strides ", (x).strides());                                 \
  } while (0)

AttnDims check_attention(const char* kOp, const at::Tensor& q, const at::Tensor& k,
                         const at::Tensor& v, const std::optional<at::Tensor>& mask_opt) {
  MK_CHECK_ATTN_INPUT(q, "[B, H, Lq, D]");
  MK_CHECK_ATTN_INPUT(k, "[B, Hkv, Lk, D]");
  MK_CHECK_ATTN_INPUT(v, "[B, Hkv, Lk, D]");
  AttnDims d{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), 1};
  MK_CHECK_SHAPE(k, "[B, Hkv, Lk, D] with B, D from q", d.B, d.Hkv, d.Lk, d.D);
  MK_CHECK_SHAPE(v, "k's shape", d.B, d.Hkv, d.Lk, d.D);
  TORCH_CHECK(d.Hkv > 0 && d.H % d.Hkv == 0, kOp, ": q's heads (", d.H,
              ") must be a multiple of k's (", d.Hkv, ")");
  d.group = d.H / d.Hkv;
  if (mask_opt.has_value() && mask_opt->defined()) {
    const at::Tensor& mask = *mask_opt;
    MK_CHECK_CPU(mask);
    MK_CHECK_DTYPE(mask, at::kBool);
    TORCH_CHECK(mask.dim() == 4 && (mask.size(0) == d.B || mask.size(0) == 1) &&
                    mask.size(1) == 1 && mask.size(2) == d.Lq && mask.size(3) == d.Lk,
                kOp, ": mask must be [B or 1, 1, Lq, Lk] = [", d.B, " or 1, 1, ", d.Lq, ", ", d.Lk,
                "], got ", describe(mask));
  }
  return d;
}

Mask make_mask(const std::optional<at::Tensor>& mask, at::Tensor& keep, bool causal,
               const AttnDims& d) {
  Mask m;
  m.Lk = d.Lk;
  if (mask.has_value() && mask->defined()) {
    keep = mask->contiguous();
    m.p = keep.data_ptr<bool>();
    m.sb = keep.size(0) == 1 ? 0 : d.Lq * d.Lk;
  } else {
    m.causal = causal;
    m.offset = d.Lk - d.Lq;
  }
  return m;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v,
                                                 const std::optional<at::Tensor>& mask,
                                                 bool causal, double scale) {
  constexpr const char* kOp = "attention_fwd";
  const AttnDims d = check_attention(kOp, q, k, v, mask);
  at::Tensor keep;
  const Mask m = make_mask(mask, keep, causal, d);
  at::Tensor out = at::empty({d.B, d.Lq, d.H, d.D}, q.options()).transpose(1, 2);
  at::Tensor lse = at::empty({d.B, d.H, d.Lq}, q.options().dtype(at::kFloat));
  const Strided Q = strided(q), K = strided(k), V = strided(v), O = strided(out);
  float* lp = lse.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, d.B * d.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> S(kRowBlock * d.Lk), Kt(d.D * d.Lk), qbuf, kbuf, vbuf, obuf;
    int64_t kv_of = -1;   // the (batch, kv head) whose K is in Kt: grouped heads share it
    Rows v_rows{};
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / d.H, h = bh % d.H, hk = h / d.group;
      if (b * d.Hkv + hk != kv_of) {
        const Rows k_rows = rows_in(K, b, hk, d.Lk, d.D, kbuf);
        transpose_rows(k_rows.p, k_rows.ld, d.Lk, d.D, Kt.data());
        v_rows = rows_in(V, b, hk, d.Lk, d.D, vbuf);
        kv_of = b * d.Hkv + hk;
      }
      const Rows q_rows = rows_in(Q, b, h, d.Lq, d.D, qbuf);
      const Rows o = rows_out(O, b, h, d.Lq, d.D, obuf);
      for (int64_t i0 = 0; i0 < d.Lq; i0 += kRowBlock) {
        const int64_t rows = std::min(kRowBlock, d.Lq - i0);
        const int64_t nk = m.keys(i0 + rows - 1);     // the block's last row sees the most keys
        gemm_rm(false, false, rows, nk, d.D, sc, q_rows.p + i0 * q_rows.ld, q_rows.ld, Kt.data(),
                d.Lk, 0.0f, S.data(), d.Lk);
        masked_softmax_rows(S.data(), d.Lk, lp + bh * d.Lq + i0, i0, rows, nk, m, b);
        gemm_rm(false, false, rows, d.D, nk, 1.0f, S.data(), d.Lk, v_rows.p, v_rows.ld, 0.0f,
                o.p + i0 * o.ld, o.ld);
      }
      flush(O, b, h, d.Lq, d.D, obuf);
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& mask,
    bool causal, double scale) {
  constexpr const char* kOp = "attention_bwd";
  const AttnDims d = check_attention(kOp, q, k, v, mask);
  MK_CHECK_ATTN_INPUT(dout, "[B, H, Lq, D]");
  MK_CHECK_SHAPE(dout, "q's shape", d.B, d.H, d.Lq, d.D);
  MK_CHECK_ATTN_INPUT(out, "[B, H, Lq, D]");
  MK_CHECK_SHAPE(out, "q's shape", d.B, d.H, d.Lq, d.D);
  MK_CHECK_CPU_FLOAT_SHAPE(lse, "[B, H, Lq]", d.B, d.H, d.Lq);
  at::Tensor keep;
  const Mask m = make_mask(mask, keep, causal, d);
  const at::Tensor lc = lse.contiguous();
  at::Tensor dq = at::empty({d.B, d.Lq, d.H, d.D}, q.options()).transpose(1, 2);
  if (d.Lq == 0) return {dq, at::zeros_like(k), at::zeros_like(v)};   // no query: no gradient
  at::Tensor dk = at::empty_like(k), dv = at::empty_like(v);
  const Strided Q = strided(q), K = strided(k), V = strided(v), dO = strided(dout),
                O = strided(out), dQ = strided(dq), dK = strided(dk), dV = strided(dv);
  const float* lp = lc.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const int64_t last = (d.Lq - 1) / kRowBlock * kRowBlock;   // the last block's first row
  // one task per (batch, kv head): its query heads accumulate into its dK, dV. The blocks run
  // last first: the last row sees every key (m.keys(Lq - 1) == Lk), so the first block's
  // products write all of dK and dV (beta = 0) and the others add to the rows they reach.
  at::parallel_for(0, d.B * d.Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> P(kRowBlock * d.Lk), dP(kRowBlock * d.Lk), delta(kRowBlock),
        Kt(d.D * d.Lk), Vt(d.D * d.Lk), kbuf, vbuf, qbuf, dobuf, obuf, dqbuf, dkbuf, dvbuf;
    for (int64_t bk = begin; bk < end; ++bk) {
      const int64_t b = bk / d.Hkv, hk = bk % d.Hkv;
      const Rows k_rows = rows_in(K, b, hk, d.Lk, d.D, kbuf);
      const Rows v_rows = rows_in(V, b, hk, d.Lk, d.D, vbuf);
      transpose_rows(k_rows.p, k_rows.ld, d.Lk, d.D, Kt.data());
      transpose_rows(v_rows.p, v_rows.ld, d.Lk, d.D, Vt.data());
      const Rows dk_rows = rows_out(dK, b, hk, d.Lk, d.D, dkbuf);
      const Rows dv_rows = rows_out(dV, b, hk, d.Lk, d.D, dvbuf);
      for (int64_t g = 0; g < d.group; ++g) {
        const int64_t h = hk * d.group + g;
        const Rows q_rows = rows_in(Q, b, h, d.Lq, d.D, qbuf);
        const Rows do_rows = rows_in(dO, b, h, d.Lq, d.D, dobuf);
        const Rows o_rows = rows_in(O, b, h, d.Lq, d.D, obuf);
        const Rows dq_rows = rows_out(dQ, b, h, d.Lq, d.D, dqbuf);
        const float* lse_bh = lp + (b * d.H + h) * d.Lq;
        for (int64_t i0 = last; i0 >= 0; i0 -= kRowBlock) {
          const int64_t rows = std::min(kRowBlock, d.Lq - i0);
          const int64_t nk = m.keys(i0 + rows - 1);
          const float beta = g == 0 && i0 == last ? 0.0f : 1.0f;
          const float* q_i = q_rows.p + i0 * q_rows.ld;
          const float* do_i = do_rows.p + i0 * do_rows.ld;
          gemm_rm(false, false, rows, nk, d.D, sc, q_i, q_rows.ld, Kt.data(), d.Lk, 0.0f,
                  P.data(), d.Lk);
          recompute_probs(P.data(), d.Lk, lse_bh + i0, i0, rows, nk, m, b);
          // dV (+)= P^T dO
          gemm_rm(true, false, nk, d.D, rows, 1.0f, P.data(), d.Lk, do_i, do_rows.ld, beta,
                  dv_rows.p, dv_rows.ld);
          // dP = dO V^T; dS = P * (dP - rowsum(dO * O))
          gemm_rm(false, false, rows, nk, d.D, 1.0f, do_i, do_rows.ld, Vt.data(), d.Lk, 0.0f,
                  dP.data(), d.Lk);
          row_dots(do_i, do_rows.ld, o_rows.p + i0 * o_rows.ld, o_rows.ld, delta.data(), rows,
                   d.D);
          softmax_bwd_rows(P.data(), dP.data(), delta.data(), rows, nk, d.Lk);
          // dQ = scale dS K; dK (+)= scale dS^T Q
          gemm_rm(false, false, rows, d.D, nk, sc, dP.data(), d.Lk, k_rows.p, k_rows.ld, 0.0f,
                  dq_rows.p + i0 * dq_rows.ld, dq_rows.ld);
          gemm_rm(true, false, nk, d.D, rows, sc, dP.data(), d.Lk, q_i, q_rows.ld, beta,
                  dk_rows.p, dk_rows.ld);
        }
        flush(dQ, b, h, d.Lq, d.D, dqbuf);
      }
      flush(dK, b, hk, d.Lk, d.D, dkbuf);
      flush(dV, b, hk, d.Lk, d.D, dvbuf);
    }
  });
  return {dq, dk, dv};
}

}  // namespace metakernels
