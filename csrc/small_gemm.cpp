// gemm_rm (small_gemm.h): an AVX-512 FMA kernel where the CPU has AVX-512, else the BLAS.
#include "small_gemm.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

// The BLAS that torch itself links (MKL in the x86 wheels, OpenBLAS elsewhere) exports the
// Fortran sgemm_. Weak: where it is missing, at::mm on the blocks runs instead.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc) __attribute__((weak));

namespace metakernels {
namespace {

// dst[c * ldd + r] = src[r * lds + c], element by element.
void transpose_scalar(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst,
                      int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
  }
}

#if defined(__x86_64__)
// Mask of the first n (0..16) lanes.
__attribute__((target("avx512f"))) inline __mmask16 lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF)
                 : n <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << n) - 1);
}

// Stores rows r < mr of a tile: C[r, :] = alpha acc[r] + beta C[r, :] over the masked lanes.
__attribute__((target("avx512f"))) inline void store_row(float* c, __m512 acc, __mmask16 m,
                                                         __m512 va, __m512 vb, bool beta_zero) {
  __m512 out = _mm512_mul_ps(va, acc);
  if (!beta_zero) out = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m, c), out);
  _mm512_mask_storeu_ps(c, m, out);
}

// The tiles: op(B)'s rows are vectors (Bp row-major, leading dimension ldbp) and op(A)[i, k] =
// A[i a_row + k a_col] is broadcast; rows past M repeat the last one (computed, never stored).
// R x 32 (R = 8 or 4): 2R accumulators, 2 loads and R broadcasts per 2R FMAs; 8 rows keep 16
// independent FMA chains in flight, 4 rows serve the last rows of a block. The k loop of a tile
// of 32 full columns loads without masks (Full); only a row block's last tile masks its loads.
template <int R, bool Full>
__attribute__((target("avx512f"), always_inline)) inline void tile_k(
    int64_t K, const float* const (&a)[R], int64_t a_col, const float* Bp, int64_t ldbp,
    __mmask16 m0, __mmask16 m1, __m512 (&c)[2 * R]) {
  for (int64_t k = 0; k < K; ++k) {
    const float* brow = Bp + k * ldbp;
    const __m512 b0 = Full ? _mm512_loadu_ps(brow) : _mm512_maskz_loadu_ps(m0, brow);
    const __m512 b1 = Full ? _mm512_loadu_ps(brow + 16) : _mm512_maskz_loadu_ps(m1, brow + 16);
    const int64_t ak = k * a_col;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_set1_ps(a[r][ak]);
      c[2 * r] = _mm512_fmadd_ps(x, b0, c[2 * r]);
      c[2 * r + 1] = _mm512_fmadd_ps(x, b1, c[2 * r + 1]);
    }
  }
}

template <int R>
__attribute__((target("avx512f"))) void tiles_rx32(int64_t M, int64_t N, int64_t K, float alpha,
                                                    const float* A, int64_t a_row, int64_t a_col,
                                                    const float* Bp, int64_t ldbp, float beta,
                                                    float* C, int64_t ldc) {
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
  const bool bz = beta == 0.0f;
  for (int64_t i0 = 0; i0 < M; i0 += R) {
    const int64_t mr = std::min<int64_t>(R, M - i0);
    const float* a[R];
    for (int r = 0; r < R; ++r) a[r] = A + (i0 + std::min<int64_t>(r, mr - 1)) * a_row;
    for (int64_t j0 = 0; j0 < N; j0 += 32) {
      const __mmask16 m0 = lanes(N - j0), m1 = lanes(N - j0 - 16);
      __m512 acc[2 * R];
      for (__m512& v : acc) v = _mm512_setzero_ps();
      if (N - j0 >= 32) {
        tile_k<R, true>(K, a, a_col, Bp + j0, ldbp, m0, m1, acc);
      } else {
        tile_k<R, false>(K, a, a_col, Bp + j0, ldbp, m0, m1, acc);
      }
      float* c = C + i0 * ldc + j0;
      if (mr == R) {   // a whole block: the accumulators stay in registers
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          store_row(c + r * ldc, acc[2 * r], m0, va, vb, bz);
          store_row(c + r * ldc + 16, acc[2 * r + 1], m1, va, vb, bz);
        }
      } else {
        for (int64_t r = 0; r < mr; ++r) {
          store_row(c + r * ldc, acc[2 * r], m0, va, vb, bz);
          store_row(c + r * ldc + 16, acc[2 * r + 1], m1, va, vb, bz);
        }
      }
    }
  }
}

// Rows in blocks of 8, the last M % 8 in blocks of 4; all in blocks of 4 for a short k loop
// (K < 32, e.g. the LoRA expand over the rank), where the 8-row tile's stores outweigh its gain.
__attribute__((target("avx512f"))) void tiles_x32(int64_t M, int64_t N, int64_t K, float alpha,
                                                   const float* A, int64_t a_row, int64_t a_col,
                                                   const float* Bp, int64_t ldbp, float beta,
                                                   float* C, int64_t ldc) {
  const int64_t m8 = K >= 32 ? M / 8 * 8 : 0;
  if (m8 > 0) tiles_rx32<8>(m8, N, K, alpha, A, a_row, a_col, Bp, ldbp, beta, C, ldc);
  if (M > m8) {
    tiles_rx32<4>(M - m8, N, K, alpha, A + m8 * a_row, a_row, a_col, Bp, ldbp, beta,
                  C + m8 * ldc, ldc);
  }
}

// 8 x 16, for N <= 16 (a few keys, a small head dimension, the LoRA rank): 8 accumulators,
// 1 load and 8 broadcasts per 8 FMAs.
__attribute__((target("avx512f"))) void tiles_8x16(int64_t M, int64_t N, int64_t K, float alpha,
                                                    const float* A, int64_t a_row, int64_t a_col,
                                                    const float* Bp, int64_t ldbp, float beta,
                                                    float* C, int64_t ldc) {
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
  const bool bz = beta == 0.0f;
  const __mmask16 m0 = lanes(N);
  for (int64_t i0 = 0; i0 < M; i0 += 8) {
    const int64_t mr = std::min<int64_t>(8, M - i0);
    const float* a[8];
    for (int64_t r = 0; r < 8; ++r) a[r] = A + (i0 + std::min<int64_t>(r, mr - 1)) * a_row;
    const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5],
                *a6 = a[6], *a7 = a[7];
    __m512 c0 = _mm512_setzero_ps(), c1 = _mm512_setzero_ps(), c2 = _mm512_setzero_ps(),
           c3 = _mm512_setzero_ps(), c4 = _mm512_setzero_ps(), c5 = _mm512_setzero_ps(),
           c6 = _mm512_setzero_ps(), c7 = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
      const __m512 b = _mm512_maskz_loadu_ps(m0, Bp + k * ldbp);
      const int64_t ak = k * a_col;
      c0 = _mm512_fmadd_ps(_mm512_set1_ps(a0[ak]), b, c0);
      c1 = _mm512_fmadd_ps(_mm512_set1_ps(a1[ak]), b, c1);
      c2 = _mm512_fmadd_ps(_mm512_set1_ps(a2[ak]), b, c2);
      c3 = _mm512_fmadd_ps(_mm512_set1_ps(a3[ak]), b, c3);
      c4 = _mm512_fmadd_ps(_mm512_set1_ps(a4[ak]), b, c4);
      c5 = _mm512_fmadd_ps(_mm512_set1_ps(a5[ak]), b, c5);
      c6 = _mm512_fmadd_ps(_mm512_set1_ps(a6[ak]), b, c6);
      c7 = _mm512_fmadd_ps(_mm512_set1_ps(a7[ak]), b, c7);
    }
    const __m512 acc[8] = {c0, c1, c2, c3, c4, c5, c6, c7};
    for (int64_t r = 0; r < mr; ++r) store_row(C + (i0 + r) * ldc, acc[r], m0, va, vb, bz);
  }
}

// dst[c * ldd + r] = src[r * lds + c] for a 16 x 16 block: unpacks of row pairs, then 64-bit and
// 128-bit lane shuffles.
__attribute__((target("avx512f"))) inline void transpose_16x16(const float* src, int64_t lds,
                                                               float* dst, int64_t ldd) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 16; i += 8) {
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0xdd);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ldd, r[i]);
}

__attribute__((target("avx512f"))) void transpose_avx512(const float* src, int64_t lds,
                                                         int64_t rows, int64_t cols, float* dst,
                                                         int64_t ldd) {
  const int64_t r16 = rows / 16 * 16, c16 = cols / 16 * 16;
  for (int64_t r = 0; r < r16; r += 16) {
    for (int64_t c = 0; c < c16; c += 16) {
      transpose_16x16(src + r * lds + c, lds, dst + c * ldd + r, ldd);
    }
  }
  // the edges: the columns past c16 of the first r16 rows, then the rows past r16
  transpose_scalar(src + c16, lds, r16, cols - c16, dst + c16 * ldd, ldd);
  transpose_scalar(src + r16 * lds, lds, rows - r16, cols, dst + r16, ldd);
}

__attribute__((target("avx512f"))) void gemm_rm_avx512(bool tA, bool tB, int64_t M, int64_t N,
                                                       int64_t K, float alpha, const float* A,
                                                       int64_t lda, const float* B, int64_t ldb,
                                                       float beta, float* C, int64_t ldc) {
  thread_local std::vector<float> packed;
  const float* Bp = B;
  int64_t ldbp = ldb;
  if (tB) {  // op(B)[k, j] = B[j, k]: packed as [K, N] so that its rows are vectors
    packed.resize(static_cast<size_t>(K * N));
    transpose_avx512(B, ldb, N, K, packed.data(), N);
    Bp = packed.data();
    ldbp = N;
  }
  const int64_t a_row = tA ? 1 : lda, a_col = tA ? lda : 1;
  if (N <= 16) {  // one vector of columns: more rows per tile instead
    tiles_8x16(M, N, K, alpha, A, a_row, a_col, Bp, ldbp, beta, C, ldc);
  } else {
    tiles_x32(M, N, K, alpha, A, a_row, a_col, Bp, ldbp, beta, C, ldc);
  }
}
#endif

void gemm_rm_blas(bool tA, bool tB, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                  int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (sgemm_ != nullptr) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: the operands swap, the
    // transpose flags stay.
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    const char ta = tB ? 'T' : 'N', tb = tA ? 'T' : 'N';
    sgemm_(&ta, &tb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  auto view = [](const float* p, bool t, int64_t rows, int64_t cols, int64_t ld) {
    // op(X) is [rows, cols]; X itself is stored [rows, cols] (no transpose) or [cols, rows]
    at::Tensor x = t ? at::from_blob(const_cast<float*>(p), {cols, rows}, {ld, 1}, at::kFloat).t()
                     : at::from_blob(const_cast<float*>(p), {rows, cols}, {ld, 1}, at::kFloat);
    return x;
  };
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, at::kFloat);
  at::Tensor prod = at::mm(view(A, tA, M, K, lda), view(B, tB, K, N, ldb));
  if (beta == 0.0f) {
    c.copy_(prod.mul_(alpha));
  } else {
    c.mul_(beta).add_(prod, alpha);
  }
}

}  // namespace

void transpose_rm(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst,
                  int64_t ldd) {
#if defined(__x86_64__)
  if (small_gemm_avx512()) {
    transpose_avx512(src, lds, rows, cols, dst, ldd);
    return;
  }
#endif
  transpose_scalar(src, lds, rows, cols, dst, ldd);
}

bool small_gemm_avx512() {
#if defined(__x86_64__)
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
#else
  return false;
#endif
}

void gemm_rm(bool tA, bool tB, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
             int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
#if defined(__x86_64__)
  if (small_gemm_avx512()) {
    gemm_rm_avx512(tA, tB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
#endif
  gemm_rm_blas(tA, tB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

}  // namespace metakernels
