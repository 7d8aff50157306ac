// Fused inner-loop update of the whole [T, P] fast-weight bank.
//
// Two passes over each task row, both parallel over (task, chunk of P) with OpenMP:
//   1. the sum of squares of grad[t], in double, one partial per chunk; the partials are added
//      per task in a fixed order, so the norm does not depend on the number of threads;
//   2. for the tasks whose norm is finite: clip, weight decay and the SGD or Adam step, element
//      by element in one loop (no temporaries of size [T, P]).
// A task whose gradient holds a NaN or Inf is not written at all (fast, exp_avg, exp_avg_sq,
// step and direction stay as they were) and is reported by finite[t] = false.
// The rate of element j of task t is lr[t], or lr[t] * rates[s] for the segment s holding j
// (rate_offsets: the bank's slots), or lr[t] * rates[j]. Segments are walked as runs inside
// each chunk, so a per-segment rate is a scalar of the inner loop, as lr[t] is.
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

// The rate factors of the elements: none (1), one per segment of P, or one per element.
struct ElementRates {
  const float* values = nullptr;  // null: no factor
  std::vector<int64_t> offsets;   // S + 1 segment bounds; empty: one value per element
};

struct RowRate {  // a rate shared by a run of elements
  float rate;
  float operator()(int64_t) const { return rate; }
};

struct ElementRate {  // lr[t] * rates[j]
  float lr;
  const float* values;
  float operator()(int64_t j) const { return lr * values[j]; }
};

// Calls body(begin', end', rate) over [begin, end) of a task with learning rate lr_t, split into
// runs of one rate functor each (one run unless the rates are per segment).
template <typename Body>
void for_each_rate_run(const ElementRates& r, float lr_t, int64_t begin, int64_t end,
                       const Body& body) {
  if (r.values == nullptr) {
    body(begin, end, RowRate{lr_t});
    return;
  }
  if (r.offsets.empty()) {
    body(begin, end, ElementRate{lr_t, r.values});
    return;
  }
  // the segment holding `begin`: the last s with offsets[s] <= begin (empty segments skipped)
  int64_t s = std::upper_bound(r.offsets.begin(), r.offsets.end(), begin) - r.offsets.begin() - 1;
  for (int64_t pos = begin; pos < end; ++s) {
    const int64_t stop = std::min(end, r.offsets[s + 1]);
    if (stop > pos) body(pos, stop, RowRate{lr_t * r.values[s]});
    pos = std::max(pos, stop);
  }
}

ElementRates check_rates(const char* kOp, const c10::optional<at::Tensor>& rates_opt,
                         const c10::optional<at::Tensor>& offsets_opt, int64_t P) {
  ElementRates r;
  if (!rates_opt.has_value()) {
    TORCH_CHECK(!offsets_opt.has_value(), kOp, ": rate_offsets given without rates");
    return r;
  }
  const at::Tensor& rates = *rates_opt;
  MK_CHECK_CPU_FLOAT(rates);
  MK_CHECK_DIM(rates, 1, "[S] or [P]");
  MK_CHECK_CONTIGUOUS(rates);
  if (offsets_opt.has_value()) {
    const at::Tensor& rate_offsets = *offsets_opt;
    r.offsets = MK_CHECK_OFFSETS(rate_offsets, rates.size(0), P).offsets;
  } else {
    MK_CHECK_SHAPE(rates, "[P] with P == fast.size(1) (one rate per element)", P);
  }
  r.values = rates.data_ptr<float>();
  return r;
}

float* check_direction(const char* kOp, const c10::optional<at::Tensor>& direction_opt,
                       int64_t T, int64_t P) {
  if (!direction_opt.has_value()) return nullptr;
  const at::Tensor& direction = *direction_opt;
  MK_CHECK_LIKE_FAST(direction);
  return direction.data_ptr<float>();
}

void check_bank(const char* kOp, const at::Tensor& fast, const at::Tensor& grad,
                const at::Tensor& lr, double max_grad_norm) {
  MK_CHECK_CPU_FLOAT_BANK(fast);
  const int64_t T = fast.size(0), P = fast.size(1);
  MK_CHECK_LIKE_FAST(grad);
  MK_CHECK_PER_TASK(lr);
  TORCH_CHECK(max_grad_norm >= 0, kOp, ": max_grad_norm must be >= 0 (0 disables clipping), got ",
              max_grad_norm);
}

// One run of SGD: d = coef g + wd f; f -= rate d; direction += d (kDir).
template <bool kDir, typename Rate>
void sgd_run(float* f, const float* g, float* dir, int64_t begin, int64_t end, float coef,
             float wd, const Rate& rate) {
  if (wd != 0.0f) {
#pragma omp simd
    for (int64_t j = begin; j < end; ++j) {
      const float d = g[j] * coef + wd * f[j];
      if (kDir) dir[j] += d;
      f[j] = f[j] - rate(j) * d;
    }
  } else {
#pragma omp simd
    for (int64_t j = begin; j < end; ++j) {
      const float d = g[j] * coef;
      if (kDir) dir[j] += d;
      f[j] = f[j] - rate(j) * d;
    }
  }
}

struct AdamScalars {
  float b1, b2, omb1, omb2, eps, wd;
};

// One run of Adam(W) for one task: bc1 = 1 - beta1^step, sb2 = sqrt(1 - beta2^step).
template <bool kDir, typename Rate>
void adam_run(float* f, const float* g, float* m, float* v, float* dir, int64_t begin,
              int64_t end, float coef, float bc1, float sb2, const AdamScalars& a,
              const Rate& rate) {
  const bool decoupled_decay = a.wd != 0.0f;
#pragma omp simd
  for (int64_t j = begin; j < end; ++j) {
    const float r = rate(j);
    const float ss = r / bc1;
    const float dec = decoupled_decay ? 1.0f - r * a.wd : 1.0f;
    const float gj = g[j] * coef;
    const float mj = m[j] * a.b1 + a.omb1 * gj;
    const float vj = v[j] * a.b2 + a.omb2 * gj * gj;
    const float denom = std::sqrt(vj) / sb2 + a.eps;
    m[j] = mj;
    v[j] = vj;
    if (kDir) dir[j] += a.wd * f[j] + mj / (bc1 * denom);
    f[j] = f[j] * dec - ss * mj / denom;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> fused_sgd_(at::Tensor& fast, const at::Tensor& grad,
                                              const at::Tensor& lr, double max_grad_norm,
                                              double weight_decay,
                                              const c10::optional<at::Tensor>& rates,
                                              const c10::optional<at::Tensor>& rate_offsets,
                                              const c10::optional<at::Tensor>& direction) {
  constexpr const char* kOp = "fused_sgd_";
  check_bank(kOp, fast, grad, lr, max_grad_norm);
  const int64_t T = fast.size(0), P = fast.size(1);
  const ElementRates er = check_rates(kOp, rates, rate_offsets, P);
  float* d_base = check_direction(kOp, direction, T, P);
  const TaskCoefs c = task_norms(grad.data_ptr<float>(), T, P, max_grad_norm);

  float* f_base = fast.data_ptr<float>();
  const float* g_base = grad.data_ptr<float>();
  const auto lr_a = lr.accessor<float, 1>();
  const float wd = static_cast<float>(weight_decay);
  for_each_finite_chunk(c, T, P, [&](int64_t t, int64_t begin, int64_t end) {
    float* f = f_base + t * P;
    const float* g = g_base + t * P;
    float* dir = d_base ? d_base + t * P : nullptr;
    const float coef = c.clip[t];
    for_each_rate_run(er, lr_a[t], begin, end, [&](int64_t b, int64_t e, const auto& rate) {
      if (dir) {
        sgd_run<true>(f, g, dir, b, e, coef, wd, rate);
      } else {
        sgd_run<false>(f, g, dir, b, e, coef, wd, rate);
      }
    });
  });
  return to_tensors(c, fast);
}

std::tuple<at::Tensor, at::Tensor> fused_adam_(at::Tensor& fast, const at::Tensor& grad,
                                               at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                                               at::Tensor& step, const at::Tensor& lr,
                                               double max_grad_norm, double beta1, double beta2,
                                               double eps, double weight_decay,
                                               const c10::optional<at::Tensor>& rates,
                                               const c10::optional<at::Tensor>& rate_offsets,
                                               const c10::optional<at::Tensor>& direction) {
  constexpr const char* kOp = "fused_adam_";
  check_bank(kOp, fast, grad, lr, max_grad_norm);
  const int64_t T = fast.size(0), P = fast.size(1);
  const ElementRates er = check_rates(kOp, rates, rate_offsets, P);
  float* d_base = check_direction(kOp, direction, T, P);
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
  std::vector<float> bc1(T), sqrt_bc2(T);
  for (int64_t t = 0; t < T; ++t) {
    if (!c.finite[t]) continue;
    step_a[t] += 1.0f;
    const double s = step_a[t];
    bc1[t] = static_cast<float>(1.0 - std::pow(beta1, s));
    sqrt_bc2[t] = std::sqrt(static_cast<float>(1.0 - std::pow(beta2, s)));
  }

  float* f_base = fast.data_ptr<float>();
  const float* g_base = grad.data_ptr<float>();
  float* m_base = exp_avg.data_ptr<float>();
  float* v_base = exp_avg_sq.data_ptr<float>();
  const AdamScalars a{static_cast<float>(beta1),       static_cast<float>(beta2),
                      static_cast<float>(1.0 - beta1), static_cast<float>(1.0 - beta2),
                      static_cast<float>(eps),         static_cast<float>(weight_decay)};
  for_each_finite_chunk(c, T, P, [&](int64_t t, int64_t begin, int64_t end) {
    float* f = f_base + t * P;
    const float* g = g_base + t * P;
    float* m = m_base + t * P;
    float* v = v_base + t * P;
    float* dir = d_base ? d_base + t * P : nullptr;
    const float coef = c.clip[t], b1c = bc1[t], sb2 = sqrt_bc2[t];
    for_each_rate_run(er, lr_a[t], begin, end, [&](int64_t b, int64_t e, const auto& rate) {
      if (dir) {
        adam_run<true>(f, g, m, v, dir, b, e, coef, b1c, sb2, a, rate);
      } else {
        adam_run<false>(f, g, m, v, dir, b, e, coef, b1c, sb2, a, rate);
      }
    });
  });
  return to_tensors(c, fast);
}

}  // namespace metakernels
