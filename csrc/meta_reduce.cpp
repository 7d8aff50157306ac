// Meta-gradient reductions over the task axis, parallel over chunks of P with OpenMP.
// Reptile takes theta - x[t] before weighting: the fast weights are close to theta, so the
// differences are exact and the result does not lose digits to cancellation.
#include "checks.h"
#include "ops.h"

#include <algorithm>

namespace metakernels {
namespace {
constexpr int64_t kChunk = 1 << 12;  // floats of out per work item: stays in L1 across tasks
constexpr int64_t kMinParallelElems = 1 << 15;
}  // namespace

at::Tensor meta_reduce(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& theta,
                       int64_t kind) {
  constexpr const char* kOp = "meta_reduce";
  TORCH_CHECK(kind == 0 || kind == 1, kOp, ": kind must be 0 (fomaml) or 1 (reptile), got ", kind);
  MK_CHECK_CPU_FLOAT_BANK(x);
  const int64_t T = x.size(0), P = x.size(1);
  MK_CHECK_CPU_FLOAT_SHAPE(weights, "[T] with T == x.size(0)", T);
  MK_CHECK_DEFINED(theta);
  MK_CHECK_CPU(theta);
  if (kind == 1) {
    MK_CHECK_DTYPE(theta, at::kFloat);
    MK_CHECK_SHAPE(theta, "[P] with P == x.size(1) for kind 1 (reptile)", P);
    MK_CHECK_CONTIGUOUS(theta);
  } else {
    TORCH_CHECK(theta.numel() == 0, kOp, ": theta must be empty for kind 0 (fomaml), got ",
                describe(theta));
  }

  at::Tensor out = at::empty({P}, x.options());
  std::vector<float> w(T);
  const auto w_a = weights.accessor<float, 1>();
  for (int64_t t = 0; t < T; ++t) w[t] = w_a[t];
  const float* xp = x.data_ptr<float>();
  const float* th = kind == 1 ? theta.data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();
  const int64_t nc = (P + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (T * P >= kMinParallelElems)
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t begin = c * kChunk, end = std::min(P, begin + kChunk);
#pragma omp simd
    for (int64_t j = begin; j < end; ++j) o[j] = 0.0f;
    for (int64_t t = 0; t < T; ++t) {
      const float* xt = xp + t * P;
      const float wt = w[t];
      if (th) {
#pragma omp simd
        for (int64_t j = begin; j < end; ++j) o[j] += wt * (th[j] - xt[j]);
      } else {
#pragma omp simd
        for (int64_t j = begin; j < end; ++j) o[j] += wt * xt[j];
      }
    }
  }
  return out;
}

}  // namespace metakernels
