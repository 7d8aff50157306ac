// Vectorisable float math shared by the kernels.
#pragma once

#include <bit>
#include <cstdint>
#include <type_traits>

// The kernels' inner loops are compiled three times: for x86-64-v4 (AVX-512), x86-64-v3 (AVX2)
// and the baseline (SSE2), picked when the extension loads. (-ffp-contract=off holds in every
// clone: no multiply-add is fused.)
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MK_TARGET_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MK_TARGET_CLONES
#endif

namespace metakernels {

// exp(x) for x <= 0 (logits minus their row max), within 1 ulp of std::exp (checked over every
// float in [-87.3, 0], with and without FMA), in plain arithmetic so that the loops calling it
// vectorise (std::exp is a scalar libm call): Cephes' range reduction x = n ln2 + r with
// |r| <= ln2 / 2, a degree-6 polynomial for exp(r), 2^n built in the exponent bits. Below -87.3,
// where fp32 leaves its normal range, it gives 0. The final select only vectorises under
// -fno-trapping-math (setup.py, CMakeLists.txt); without it this loop runs scalar.
inline float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = x * kLog2e + kRound;
  const float n = t - kRound;
  const int32_t n_int = std::bit_cast<int32_t>(t) - std::bit_cast<int32_t>(kRound);
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float scale = std::bit_cast<float>((n_int + 127) << 23);
  return x < -87.3f ? 0.0f : p * scale;
}

// sigmoid(x) = 1 / (1 + exp(-x)), through exp of a non-positive argument on both sides
// (for x < 0: exp(x) / (1 + exp(x))), so that it never overflows; branch-free.
inline float sigmoid(float x) {
  const float e = exp_nonpositive(x < 0.0f ? x : -x);
  const float inv = 1.0f / (1.0f + e);
  return x < 0.0f ? e * inv : inv;
}

// sum_j a[j] * b[j] in fp64 (a row's dot product that cancels), over 16 partial sums so that the
// loop vectorises into independent chains instead of one chain of dependent adds. Inlined into a
// MK_TARGET_CLONES function, it takes that clone's vector width.
inline double dot_f64(const float* a, const float* b, int64_t n) {
  constexpr int64_t kLanes = 16;
  double acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
#pragma omp simd
    for (int64_t k = 0; k < kLanes; ++k) acc[k] += static_cast<double>(a[j + k]) * b[j + k];
  }
  double s = 0.0;
  for (; j < n; ++j) s += static_cast<double>(a[j]) * b[j];
  for (int64_t k = 0; k < kLanes; ++k) s += acc[k];
  return s;
}

// bfloat16 storage (the bits of at::BFloat16) and its conversions, in plain integer arithmetic so
// that the loops calling them vectorise. to_bf16 rounds to nearest even, as torch does; a NaN
// stays a (quiet) NaN.
using bf16_t = uint16_t;

inline float bf16_to_float(bf16_t b) { return std::bit_cast<float>(static_cast<uint32_t>(b) << 16); }

inline bf16_t float_to_bf16(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<bf16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
}

// A kernel's element type: float, or bf16_t computed in float. load/store convert, round(x)
// rounds a float to the element type (the identity for float), so that a bf16 kernel rounds
// where the library's op-by-op bf16 form does.
inline float load(float x) { return x; }
inline float load(bf16_t x) { return bf16_to_float(x); }
inline void store(float* p, float v) { *p = v; }
inline void store(bf16_t* p, float v) { *p = float_to_bf16(v); }
template <typename T>
inline float round_to(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return bf16_to_float(float_to_bf16(v));
  }
}

}  // namespace metakernels
