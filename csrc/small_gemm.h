// Single-threaded fp32 products of small blocks (a few hundred rows and columns at most), for
// kernels that run many of them inside their own parallel loops (the attention's per-head
// products, the per-task LoRA products of multi_lora_linear).
//
// gemm_rm computes the row-major C[M, N] = alpha op(A) op(B) + beta C, op(X) = X or X^T (tA, tB),
// leading dimensions in elements (unit stride along rows); beta = 0 overwrites C without reading
// it. Where the CPU has AVX-512 it runs an FMA kernel of its own (register tiles of 8 x 32, 4 x 32
// or 8 x 16); elsewhere the BLAS that PyTorch links (its sgemm_, MKL in the x86 wheels), or ATen's
// mm where no sgemm_ is exported. PyTorch's x86 builds link MKL, whose sgemm runs its AVX2 code on
// AMD processors even where they have AVX-512.
#pragma once

#include <cstdint>

namespace metakernels {

void gemm_rm(bool tA, bool tB, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
             int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols (a row-major transpose; 16 x 16
// register blocks where the CPU has AVX-512).
void transpose_rm(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst,
                  int64_t ldd);

// Whether gemm_rm runs its own AVX-512 kernel on this CPU.
bool small_gemm_avx512();

}  // namespace metakernels
