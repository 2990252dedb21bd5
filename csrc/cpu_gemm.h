// Small dense kernels shared by the CPU ops: a register-blocked GEMM for the n×n×d blocks of
// attention-like ops (n, d of a few hundred at most: too small for a BLAS call to pay its
// overhead inside a per-(batch, head) OpenMP task) and a vectorizable exp for softmax rows.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace pyssl_cpu {

// C (M × N) = A (M × K, row stride lda) · B (K × N, row stride ldb), C row stride ldc.
// Register-blocked: MR × NR tiles of C live in registers across the whole K loop (MR
// broadcasts of A and NR/vector-width loads of B per k). Edge tiles are zero-padded into a
// packed panel so the same full-width loop serves them.
template <typename T>
inline void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc) {
  constexpr int MR = 8;
  constexpr int NR = 64 / sizeof(T) * 2;   // two 512-bit vectors of T
  std::vector<T> bpad, apad;
  for (int64_t j0 = 0; j0 < N; j0 += NR) {
    const int nr = (int)std::min<int64_t>(NR, N - j0);
    const T* bp = B + j0;
    int64_t ldbp = ldb;
    if (nr < NR) {
      bpad.assign((size_t)K * NR, T(0));
      for (int64_t k = 0; k < K; ++k)
        for (int j = 0; j < nr; ++j) bpad[k * NR + j] = B[k * ldb + j0 + j];
      bp = bpad.data();
      ldbp = NR;
    }
    for (int64_t i0 = 0; i0 < M; i0 += MR) {
      const int mr = (int)std::min<int64_t>(MR, M - i0);
      const T* ap = A + i0 * lda;
      int64_t ldap = lda;
      if (mr < MR) {
        apad.assign((size_t)MR * K, T(0));
        for (int r = 0; r < mr; ++r)
          for (int64_t k = 0; k < K; ++k) apad[r * K + k] = A[(i0 + r) * lda + k];
        ap = apad.data();
        ldap = K;
      }
      T c[MR][NR] = {};
      for (int64_t k = 0; k < K; ++k) {
        const T* b = bp + k * ldbp;
        for (int r = 0; r < MR; ++r) {
          const T a = ap[r * ldap + k];
#pragma omp simd
          for (int j = 0; j < NR; ++j) c[r][j] += a * b[j];
        }
      }
      for (int r = 0; r < mr; ++r)
        for (int j = 0; j < nr; ++j) C[(i0 + r) * ldc + j0 + j] = c[r][j];
    }
  }
}

// e^x for x <= 0 (−inf gives 0; below −87 flushed to 0): range reduction by ln 2, degree-6
// Taylor polynomial (at most 3 ulp, measured over [−87, 0]),
// branch-free so the softmax loops vectorize. Doubles use std::exp (float64 is for gradcheck).
inline float exp_nonpos(float x) {
  const float t = std::max(x, -87.0f) * 1.44269504088896341f;
  const float n = std::floor(t + 0.5f);
  const float r = (std::max(x, -87.0f) - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  const float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
  uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, 4);
  return x < -87.0f ? 0.0f : p * two_n;
}
inline double exp_nonpos(double x) { return std::exp(x); }

}  // namespace pyssl_cpu
