// Per-task masked token-mean cross-entropy and its gradient w.r.t. the hidden states, chunk by
// chunk: the logits of at most chunk_size rows exist at any time, never the [N, V] matrix.
//
// Only the rows with a label take part (an ignored row has no loss and a zero gradient): where
// some are ignored (the prompt tokens, a sequence's last token) they are gathered first and their
// dh rows scattered back into zeros, so that neither GEMM spends anything on the others.
//
// For every chunk of (labelled) rows:
//   logits = h_chunk @ W.T                    (in h's dtype, like the reference; ATen's GEMM, or
//                                              oneDNN's for fp32 with onednn: gemm.h)
//   one fused OpenMP loop over the rows, in place in the fp32 chunk buffer:
//     lse = logsumexp(logits_i); ce_i = lse - logits_i[label_i]
//     dlogits_i = (softmax(logits_i) - onehot(label_i)) / count[task(i)]
//   dh_chunk = dlogits @ W                     (ATen's GEMM written straight into dh, or oneDNN's)
// The per-row losses are added per task in row order afterwards (deterministic).
// For bf16/fp16 h the logits are rounded to h's dtype before the softmax and dlogits before the
// second GEMM, which is what autograd does to the reference (h @ W.T).float(). For bf16 the row
// loop reads the bf16 logits and writes the bf16 dlogits in place (a row's exps in the thread's
// fp32 scratch, in L2), so no fp32 copy of a chunk's logits is made: at a 49k vocabulary the two
// conversions of a [chunk, V] buffer cost as much as the row loop itself.
#include "checks.h"
#include "gemm.h"
#include "ops.h"
#include "vec_math.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <vector>

namespace metakernels {
namespace {

constexpr int64_t kIgnoreIndex = -100;
constexpr int64_t kMinParallelElems = 1 << 15;

// One row: turns the logits z[0:V] into the loss gradient (softmax(z) - onehot(label)) * ic in
// place and returns the cross-entropy, in float arithmetic whatever T is. The exps go to e[0:V]:
// z itself for float, a float scratch row for bf16 (so the bf16 row is read once, converted
// exactly, and its gradient rounded once, as the fp32 row's gradient copied to bf16 would be).
template <typename T>
inline __attribute__((always_inline)) float xent_row_impl(T* z, float* e, int64_t V,
                                                          int64_t label, float ic) {
  float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < V; ++j) mx = std::max(mx, load(z[j]));
  const float z_label = load(z[label]);
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < V; ++j) {
    const float ej = exp_nonpositive(load(z[j]) - mx);
    e[j] = ej;
    sum += ej;
  }
  const float p_scale = ic / sum;
  const float g_label = e[label] * p_scale - ic;
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) store(z + j, e[j] * p_scale);
  store(z + label, g_label);
  return mx + std::log(sum) - z_label;
}

// The exp loop is compute-bound, so GCC compiles each twice, for AVX2 + FMA (x86-64-v3) and for
// baseline x86-64, and the loader picks by CPU.
MK_TARGET_CLONES float xent_row(float* z, int64_t V, int64_t label, float ic) {
  return xent_row_impl(z, z, V, label, ic);
}

MK_TARGET_CLONES float xent_row(bf16_t* z, float* e, int64_t V, int64_t label, float ic) {
  return xent_row_impl(z, e, V, label, ic);
}

// Every row of logits [rows, V] (all labelled), in parallel; row_loss[i] = its cross-entropy.
void xent_rows(float* logits, int64_t rows, int64_t V, const int64_t* labels,
               const float* inv_count, float* row_loss) {
#pragma omp parallel for schedule(static) if (rows * V >= kMinParallelElems)
  for (int64_t i = 0; i < rows; ++i) {
    row_loss[i] = xent_row(logits + i * V, V, labels[i], inv_count[i]);
  }
}

void xent_rows(bf16_t* logits, int64_t rows, int64_t V, const int64_t* labels,
               const float* inv_count, float* row_loss) {
#pragma omp parallel if (rows * V >= kMinParallelElems)
  {
    std::vector<float> e(static_cast<size_t>(V));   // the thread's scratch row
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
      row_loss[i] = xent_row(logits + i * V, e.data(), V, labels[i], inv_count[i]);
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> segment_cross_entropy_fwd(const at::Tensor& h,
                                                             const at::Tensor& W,
                                                             const at::Tensor& labels,
                                                             const at::Tensor& offsets,
                                                             int64_t chunk_size, bool onednn) {
  constexpr const char* kOp = "segment_cross_entropy_fwd";
  MK_CHECK_DEFINED(h);
  MK_CHECK_CPU(h);
  MK_CHECK_FLOATING(h);
  MK_CHECK_DIM(h, 2, "[N, d]");
  const int64_t N = h.size(0), d = h.size(1);
  MK_CHECK_DEFINED(W);
  MK_CHECK_CPU(W);
  MK_CHECK_DTYPE(W, h.scalar_type());
  MK_CHECK_DIM(W, 2, "[V, d]");
  const int64_t V = W.size(0);
  MK_CHECK_SHAPE(W, "[V, d] with d == h.size(1)", V, d);
  MK_CHECK_DEFINED(labels);
  MK_CHECK_CPU(labels);
  MK_CHECK_DTYPE(labels, at::kLong);
  MK_CHECK_SHAPE(labels, "[N] with N == h.size(0)", N);
  TORCH_CHECK(chunk_size >= 1, kOp, ": chunk_size must be >= 1, got ", chunk_size);
  const Segments seg = MK_CHECK_OFFSETS(offsets, -1, N);
  const int64_t T = seg.num_tasks();

  const at::Tensor lab_c = labels.contiguous();
  const int64_t* lab = lab_c.data_ptr<int64_t>();
  // Targets per task, and the validity of every label (F.cross_entropy rejects the same ones).
  std::vector<int64_t> count(T, 0);
  std::vector<float> row_inv_count(N);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t i = seg.start(t); i < seg.start(t) + seg.size(t); ++i) {
      TORCH_CHECK(lab[i] == kIgnoreIndex || (lab[i] >= 0 && lab[i] < V), kOp, ": labels[", i,
                  "]=", lab[i], " is neither -100 nor a class in [0, V = ", V, ")");
      count[t] += lab[i] != kIgnoreIndex;
    }
    const float ic = count[t] > 0 ? 1.0f / static_cast<float>(count[t]) : 0.0f;
    for (int64_t i = seg.start(t); i < seg.start(t) + seg.size(t); ++i) row_inv_count[i] = ic;
  }

  // The labelled rows, in order; hs, labs and rics are theirs (h's own where all are labelled).
  std::vector<int64_t> kept;
  kept.reserve(static_cast<size_t>(N));
  for (int64_t i = 0; i < N; ++i) {
    if (lab[i] != kIgnoreIndex) kept.push_back(i);
  }
  const int64_t M = static_cast<int64_t>(kept.size());
  const bool every_row = M == N;
  at::Tensor idx, hs = h;
  std::vector<int64_t> lab_kept;
  std::vector<float> ric_kept;
  if (!every_row) {
    idx = at::from_blob(kept.data(), {M}, at::kLong).clone();
    hs = h.index_select(0, idx);
    lab_kept.resize(static_cast<size_t>(M));
    ric_kept.resize(static_cast<size_t>(M));
    for (int64_t r = 0; r < M; ++r) {
      lab_kept[r] = lab[kept[r]];
      ric_kept[r] = row_inv_count[kept[r]];
    }
  }
  const int64_t* labs = every_row ? lab : lab_kept.data();
  const float* rics = every_row ? row_inv_count.data() : ric_kept.data();

  const int64_t C = std::min(chunk_size, M);
  const bool low_precision = h.scalar_type() != at::kFloat;
  // oneDNN's matmul returns new tensors: each chunk's logits and dh rows are its outputs (dh's
  // rows copied in, unless one chunk covers them all) instead of preallocated buffers.
  onednn = onednn && !low_precision && C > 0 && onednn_gemm_applies(hs, W);
  at::Tensor dh = onednn && C == M ? at::Tensor() : at::empty({M, d}, h.options());
  std::vector<double> task_sum(T, 0.0);
  if (C > 0) {
    const bool bf16 = h.scalar_type() == at::kBFloat16;
    at::Tensor logits = onednn || bf16 ? at::Tensor()
                                       : at::empty({C, V}, h.options().dtype(at::kFloat));
    at::Tensor logits_lp = low_precision ? at::empty({C, V}, h.options()) : at::Tensor();
    const at::Tensor Wt = W.t();
    std::vector<float> row_loss(C);
    int64_t t = 0;  // task of the current row
    for (int64_t c0 = 0; c0 < M; c0 += C) {
      const int64_t rows = std::min(C, M - c0);
      const at::Tensor h_c = hs.narrow(0, c0, rows);
      if (bf16) {   // the bf16 logits turned into dlogits in place, then dh = dlogits @ W
        at::Tensor lp = logits_lp.narrow(0, 0, rows);
        at::mm_out(lp, h_c, Wt);
        xent_rows(reinterpret_cast<bf16_t*>(lp.data_ptr<at::BFloat16>()), rows, V, labs + c0,
                  rics + c0, row_loss.data());
        at::Tensor dh_c = dh.narrow(0, c0, rows);
        at::mm_out(dh_c, lp, W);
      } else if (onednn) {
        at::Tensor lg = linear_nt(h_c, W, std::nullopt, true);
        xent_rows(lg.data_ptr<float>(), rows, V, labs + c0, rics + c0, row_loss.data());
        at::Tensor dh_c = linear_nt(lg, Wt, std::nullopt, true);
        if (C == M) {
          dh = dh_c;
        } else {
          dh.narrow(0, c0, rows).copy_(dh_c);
        }
      } else {
        at::Tensor lg = logits.narrow(0, 0, rows);
        at::Tensor dh_c = dh.narrow(0, c0, rows);
        if (low_precision) {   // fp16
          at::Tensor lp = logits_lp.narrow(0, 0, rows);
          at::mm_out(lp, h_c, Wt);
          lg.copy_(lp);
          xent_rows(lg.data_ptr<float>(), rows, V, labs + c0, rics + c0, row_loss.data());
          lp.copy_(lg);
          at::mm_out(dh_c, lp, W);
        } else {
          at::mm_out(lg, h_c, Wt);
          xent_rows(lg.data_ptr<float>(), rows, V, labs + c0, rics + c0, row_loss.data());
          at::mm_out(dh_c, lg, W);
        }
      }
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t row = every_row ? c0 + i : kept[c0 + i];
        while (seg.offsets[t + 1] <= row) ++t;
        task_sum[t] += row_loss[i];
      }
    }
  }
  if (!every_row) {   // the ignored rows' gradient is 0
    at::Tensor full = at::zeros({N, d}, h.options());
    if (M > 0) full.index_copy_(0, idx, dh);
    dh = full;
  }
  at::Tensor loss = at::empty({T}, h.options().dtype(at::kFloat));
  float* l = loss.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    l[t] = static_cast<float>(task_sum[t] / static_cast<double>(std::max<int64_t>(count[t], 1)));
  }
  return {loss, dh};
}

}  // namespace metakernels
