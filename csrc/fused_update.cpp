// Fused inner-loop update of the whole [T, P] fast-weight bank.
//
// Two passes over each task row, both parallel over (task, chunk of P) with OpenMP:
//   1. the sum of squares of grad[t], in double, one partial per chunk; the partials are added
//      per task in a fixed order, so the norm does not depend on the number of threads;
//   2. for the tasks whose norm is finite: clip, weight decay and the SGD or Adam step, element
//      by element in one loop (no temporaries of size [T, P]).
// A task whose gradient holds a NaN or Inf is not written at all (fast, exp_avg, exp_avg_sq
// and step stay as they were) and is reported by finite[t] = false.
// The element arithmetic follows metakernels.ops.fused_update.fused_update_ref in fp32, in the
// same order of operations.
#include "checks.h"
#include "ops.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace metakernels {
namespace {

constexpr int64_t kChunk = 1 << 14;             // floats per work item (64 KiB)
constexpr int64_t kMinParallelElems = 1 << 15;  // below this, threads cost more than they save
constexpr float kEpsClip = 1e-6f;

struct TaskCoefs {
  std::vector<float> norm;   // ||grad[t]||, fp32
  std::vector<bool> finite;  // isfinite(norm[t])
  std::vector<float> clip;   // gradient multiplier: min(1, max_norm / (norm + 1e-6)) or 1
};

int64_t num_chunks(int64_t P) { return (P + kChunk - 1) / kChunk; }

TaskCoefs task_norms(const float* grad, int64_t T, int64_t P, double max_grad_norm) {
  const int64_t nc = num_chunks(P);
  std::vector<double> partial(static_cast<size_t>(T * nc));
#pragma omp parallel for schedule(static) if (T * P >= kMinParallelElems)
  for (int64_t i = 0; i < T * nc; ++i) {
    const int64_t t = i / nc, begin = (i % nc) * kChunk, end = std::min(P, begin + kChunk);
    const float* g = grad + t * P;
    double acc = 0.0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = begin; j < end; ++j) acc += static_cast<double>(g[j]) * g[j];
    partial[i] = acc;
  }
  TaskCoefs c;
  c.norm.resize(T);
  c.finite.resize(T);
  c.clip.resize(T);
  for (int64_t t = 0; t < T; ++t) {
    double sq = 0.0;
    for (int64_t k = 0; k < nc; ++k) sq += partial[t * nc + k];
    const float norm = static_cast<float>(std::sqrt(sq));
    c.norm[t] = norm;
    c.finite[t] = std::isfinite(norm);
    c.clip[t] = max_grad_norm > 0
                    ? std::min(1.0f, static_cast<float>(max_grad_norm) / (norm + kEpsClip))
                    : 1.0f;
  }
  return c;
}

std::tuple<at::Tensor, at::Tensor> to_tensors(const TaskCoefs& c, const at::Tensor& like) {
  const int64_t T = static_cast<int64_t>(c.norm.size());
  at::Tensor norms = at::empty({T}, like.options().dtype(at::kFloat));
  at::Tensor finite = at::empty({T}, like.options().dtype(at::kBool));
  float* n = norms.data_ptr<float>();
  bool* f = finite.data_ptr<bool>();
  for (int64_t t = 0; t < T; ++t) {
    n[t] = c.norm[t];
    f[t] = c.finite[t];
  }
  return {norms, finite};
}

// Calls body(t, begin, end) for every chunk of every finite task, in parallel.
template <typename Body>
void for_each_finite_chunk(const TaskCoefs& c, int64_t T, int64_t P, const Body& body) {
  const int64_t nc = num_chunks(P);
#pragma omp parallel for schedule(static) if (T * P >= kMinParallelElems)
  for (int64_t i = 0; i < T * nc; ++i) {
    const int64_t t = i / nc;
    if (!c.finite[t]) continue;
    const int64_t begin = (i % nc) * kChunk;
    body(t, begin, std::min(P, begin + kChunk));
  }
}

// The per-element inputs (grad, exp_avg, exp_avg_sq) are walked with fast's row offsets, so they
// must have its exact contiguous layout; the per-task ones (lr, step) are read through accessors,
// so any strides will do. Both expect T and P in scope.
#define MK_CHECK_LIKE_FAST(x)                                                                   \
  do {                                                                                          \
    MK_CHECK_CPU_FLOAT_SHAPE(x, "[T, P] like fast", T, P);                                      \
    MK_CHECK_CONTIGUOUS(x);                                                                     \
  } while (0)
#define MK_CHECK_PER_TASK(x) MK_CHECK_CPU_FLOAT_SHAPE(x, "[T] with T == fast.size(0)", T)

void check_bank(const char* kOp, const at::Tensor& fast, const at::Tensor& grad,
                const at::Tensor& lr, double max_grad_norm) {
  MK_CHECK_CPU_FLOAT_BANK(fast);
  const int64_t T = fast.size(0), P = fast.size(1);
  MK_CHECK_LIKE_FAST(grad);
  MK_CHECK_PER_TASK(lr);
  TORCH_CHECK(max_grad_norm >= 0, kOp, ": max_grad_norm must be >= 0 (0 disables clipping), got ",
              max_grad_norm);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> fused_sgd_(at::Tensor& fast, const at::Tensor& grad,
                                              const at::Tensor& lr, double max_grad_norm,
                                              double weight_decay) {
  constexpr const char* kOp = "fused_sgd_";
  check_bank(kOp, fast, grad, lr, max_grad_norm);
  const int64_t T = fast.size(0), P = fast.size(1);
  const TaskCoefs c = task_norms(grad.data_ptr<float>(), T, P, max_grad_norm);

  float* f_base = fast.data_ptr<float>();
  const float* g_base = grad.data_ptr<float>();
  const auto lr_a = lr.accessor<float, 1>();
  const float wd = static_cast<float>(weight_decay);
  for_each_finite_chunk(c, T, P, [&](int64_t t, int64_t begin, int64_t end) {
    float* f = f_base + t * P;
    const float* g = g_base + t * P;
    const float coef = c.clip[t], lr_t = lr_a[t];
    if (wd != 0.0f) {
#pragma omp simd
      for (int64_t j = begin; j < end; ++j) f[j] = f[j] - lr_t * (g[j] * coef + wd * f[j]);
    } else {
#pragma omp simd
      for (int64_t j = begin; j < end; ++j) f[j] = f[j] - lr_t * (g[j] * coef);
    }
  });
  return to_tensors(c, fast);
}

std::tuple<at::Tensor, at::Tensor> fused_adam_(at::Tensor& fast, const at::Tensor& grad,
                                               at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                                               at::Tensor& step, const at::Tensor& lr,
                                               double max_grad_norm, double beta1, double beta2,
                                               double eps, double weight_decay) {
  constexpr const char* kOp = "fused_adam_";
  check_bank(kOp, fast, grad, lr, max_grad_norm);
  const int64_t T = fast.size(0), P = fast.size(1);
  MK_CHECK_LIKE_FAST(exp_avg);
  MK_CHECK_LIKE_FAST(exp_avg_sq);
  MK_CHECK_PER_TASK(step);
  TORCH_CHECK(beta1 >= 0 && beta1 < 1, kOp, ": beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK(beta2 >= 0 && beta2 < 1, kOp, ": beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK(eps > 0, kOp, ": eps must be > 0, got ", eps);

  const TaskCoefs c = task_norms(grad.data_ptr<float>(), T, P, max_grad_norm);
  auto step_a = step.accessor<float, 1>();
  const auto lr_a = lr.accessor<float, 1>();
  // Per-task scalars of the step, after the step count has been advanced.
  std::vector<float> step_size(T), sqrt_bc2(T), decay(T);
  for (int64_t t = 0; t < T; ++t) {
    if (!c.finite[t]) continue;
    step_a[t] += 1.0f;
    const double s = step_a[t];
    const float bc1 = static_cast<float>(1.0 - std::pow(beta1, s));
    const float bc2 = static_cast<float>(1.0 - std::pow(beta2, s));
    step_size[t] = lr_a[t] / bc1;
    sqrt_bc2[t] = std::sqrt(bc2);
    decay[t] = 1.0f - lr_a[t] * static_cast<float>(weight_decay);
  }

  float* f_base = fast.data_ptr<float>();
  const float* g_base = grad.data_ptr<float>();
  float* m_base = exp_avg.data_ptr<float>();
  float* v_base = exp_avg_sq.data_ptr<float>();
  const float b1 = static_cast<float>(beta1), b2 = static_cast<float>(beta2);
  const float omb1 = static_cast<float>(1.0 - beta1), omb2 = static_cast<float>(1.0 - beta2);
  const float epsf = static_cast<float>(eps);
  const bool decoupled_decay = weight_decay != 0.0;
  for_each_finite_chunk(c, T, P, [&](int64_t t, int64_t begin, int64_t end) {
    float* f = f_base + t * P;
    const float* g = g_base + t * P;
    float* m = m_base + t * P;
    float* v = v_base + t * P;
    const float coef = c.clip[t], ss = step_size[t], sb2 = sqrt_bc2[t];
    const float dec = decoupled_decay ? decay[t] : 1.0f;
#pragma omp simd
    for (int64_t j = begin; j < end; ++j) {
      const float gj = g[j] * coef;
      const float mj = m[j] * b1 + omb1 * gj;
      const float vj = v[j] * b2 + omb2 * gj * gj;
      m[j] = mj;
      v[j] = vj;
      f[j] = f[j] * dec - ss * mj / (std::sqrt(vj) / sb2 + epsf);
    }
  });
  return to_tensors(c, fast);
}

}  // namespace metakernels
