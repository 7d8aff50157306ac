// Input checks shared by the kernels' entry points (punica style).
//
// Every entry point declares `constexpr const char* kOp = "<op name>";` and then checks each
// input with the macros below. A failed check raises c10::Error (RuntimeError in Python) with a
// message that starts with the op and names the argument, what was expected, and the
// argument's actual shape and dtype, e.g.
//   multi_lora_linear_fwd: A must be [T, in, r] with in == x.size(1), i.e. [3, 7, 2], got
//   shape [3, 6, 2], dtype torch.float32
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

namespace metakernels {

// "shape [3, 6, 2], dtype torch.float32": what every check message reports about a tensor.
inline std::string describe(const at::Tensor& t) {
  std::ostringstream s;
  if (!t.defined()) {
    s << "an undefined tensor";
    return s.str();
  }
  s << "shape " << t.sizes() << ", dtype torch." << c10::getDtypeNames(t.scalar_type()).first;
  return s.str();
}

inline std::string dtype_name(at::ScalarType t) {
  return "torch." + std::string(c10::getDtypeNames(t).first);
}

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// Task segments of a packed batch, read once from the int32 offsets tensor.
struct Segments {
  std::vector<int64_t> offsets;  // T + 1 entries
  int64_t uniform = 0;           // rows per task if every task has the same number (> 0), else 0

  int64_t num_tasks() const { return static_cast<int64_t>(offsets.size()) - 1; }
  int64_t start(int64_t t) const { return offsets[t]; }
  int64_t size(int64_t t) const { return offsets[t + 1] - offsets[t]; }
};

// offsets: int32 [T + 1] on the CPU, offsets[0] == 0, non-decreasing, offsets[T] == N.
// T < 0 means "any T >= 1" (taken from offsets).
inline Segments check_offsets(const char* op, const char* name, const at::Tensor& offsets,
                              int64_t T, int64_t N) {
  TORCH_CHECK(offsets.defined() && offsets.device().is_cpu(), op, ": ", name,
              " must be a CPU tensor, got ", describe(offsets),
              offsets.defined() ? " on " + offsets.device().str() : std::string());
  TORCH_CHECK(offsets.scalar_type() == at::kInt, op, ": ", name, " must have dtype torch.int32, got ",
              describe(offsets));
  TORCH_CHECK(offsets.dim() == 1, op, ": ", name, " must be 1-D [T + 1], got ", describe(offsets));
  if (T >= 0) {
    TORCH_CHECK(offsets.size(0) == T + 1, op, ": ", name, " must have length T + 1 = ", T + 1,
                " (T = ", T, " tasks), got ", describe(offsets));
  } else {
    TORCH_CHECK(offsets.size(0) >= 2, op, ": ", name,
                " must have length T + 1 >= 2 (at least one task), got ", describe(offsets));
  }
  const int64_t n = offsets.size(0);
  const int64_t stride = offsets.stride(0);
  const int32_t* p = offsets.data_ptr<int32_t>();
  Segments seg;
  seg.offsets.resize(n);
  for (int64_t i = 0; i < n; ++i) seg.offsets[i] = p[i * stride];
  TORCH_CHECK(seg.offsets[0] == 0, op, ": ", name, "[0] must be 0, got ", seg.offsets[0]);
  for (int64_t i = 0; i + 1 < n; ++i) {
    TORCH_CHECK(seg.offsets[i + 1] >= seg.offsets[i], op, ": ", name,
                " must be non-decreasing, got ", name, "[", i, "]=", seg.offsets[i], " > ", name,
                "[", i + 1, "]=", seg.offsets[i + 1]);
  }
  TORCH_CHECK(seg.offsets[n - 1] == N, op, ": ", name, "[T] must equal the number of rows N = ", N,
              ", got ", name, "[", n - 1, "]=", seg.offsets[n - 1]);
  const int64_t first = n >= 2 ? seg.size(0) : 0;
  bool uniform = first > 0;
  for (int64_t t = 1; uniform && t < n - 1; ++t) uniform = seg.size(t) == first;
  seg.uniform = uniform ? first : 0;
  return seg;
}

}  // namespace metakernels

#define MK_CHECK_DEFINED(x) TORCH_CHECK((x).defined(), kOp, ": ", #x, " must be a tensor, got None")

#define MK_CHECK_CPU(x)                                                                         \
  TORCH_CHECK((x).device().is_cpu(), kOp, ": ", #x, " must be a CPU tensor, got ",             \
              ::metakernels::describe(x), " on ", (x).device())

#define MK_CHECK_DTYPE(x, dtype)                                                                \
  TORCH_CHECK((x).scalar_type() == (dtype), kOp, ": ", #x, " must have dtype ",                \
              ::metakernels::dtype_name(dtype), ", got ", ::metakernels::describe(x))

#define MK_CHECK_FLOATING(x)                                                                    \
  TORCH_CHECK(::metakernels::is_float_dtype((x).scalar_type()), kOp, ": ", #x,                 \
              " must have dtype torch.float32, torch.bfloat16 or torch.float16, got ",         \
              ::metakernels::describe(x))

// `what` names the dimensions, e.g. "[T, in, r]".
#define MK_CHECK_DIM(x, ndim, what)                                                             \
  TORCH_CHECK((x).dim() == (ndim), kOp, ": ", #x, " must be ", #ndim, "-D ", what, ", got ",   \
              ::metakernels::describe(x))

// MK_CHECK_SHAPE(A, "[T, in, r] with in == x.size(1)", T, in, r)
#define MK_CHECK_SHAPE(x, what, ...)                                                            \
  do {                                                                                          \
    const std::vector<int64_t> mk_want_{__VA_ARGS__};                                           \
    TORCH_CHECK((x).sizes() == at::IntArrayRef(mk_want_), kOp, ": ", #x, " must be ", what,    \
                ", i.e. ", at::IntArrayRef(mk_want_), ", got ", ::metakernels::describe(x));   \
  } while (0)

#define MK_CHECK_CONTIGUOUS(x)                                                                  \
  TORCH_CHECK((x).is_contiguous(), kOp, ": ", #x, " must be contiguous, got ",                 \
              ::metakernels::describe(x), " with strides ", (x).strides())

#define MK_CHECK_OFFSETS(offsets, T, N) ::metakernels::check_offsets(kOp, #offsets, offsets, T, N)

// The fp32-only CPU kernels (fused_update, meta_reduce) take nothing but float32 CPU tensors.
#define MK_CHECK_CPU_FLOAT(x)                                                                   \
  do {                                                                                          \
    MK_CHECK_DEFINED(x);                                                                        \
    MK_CHECK_CPU(x);                                                                            \
    MK_CHECK_DTYPE(x, at::kFloat);                                                              \
  } while (0)

// MK_CHECK_CPU_FLOAT_SHAPE(lr, "[T] with T == fast.size(0)", T)
#define MK_CHECK_CPU_FLOAT_SHAPE(x, what, ...)                                                  \
  do {                                                                                          \
    MK_CHECK_CPU_FLOAT(x);                                                                      \
    MK_CHECK_SHAPE(x, what, __VA_ARGS__);                                                       \
  } while (0)

// The [T, P] bank those kernels walk in chunks of contiguous floats, one row per task; its sizes
// are what the other inputs' shapes are checked against.
#define MK_CHECK_CPU_FLOAT_BANK(x)                                                              \
  do {                                                                                          \
    MK_CHECK_CPU_FLOAT(x);                                                                      \
    MK_CHECK_DIM(x, 2, "[T, P]");                                                               \
    MK_CHECK_CONTIGUOUS(x);                                                                     \
  } while (0)
