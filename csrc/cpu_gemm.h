// Small dense kernels shared by the CPU ops: a register-blocked GEMM for the n×n×d blocks of
// attention-like ops (n, d of a few hundred at most: too small for a BLAS call to pay its
// overhead inside a per-(batch, head) OpenMP task) and a vectorizable exp for softmax rows
// (fast_exp; every CPU kernel's exp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
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

// dst (cols × rows) = transpose of src (rows × cols), both row-major, in 16 × 16 tiles (a
// plain double loop writes every element to a different cache line of dst).
template <typename T>
inline void transpose(const T* src, int64_t rows, int64_t cols, T* dst) {
  constexpr int64_t kT = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += kT) {
    const int64_t i1 = std::min(rows, i0 + kT);
    for (int64_t j0 = 0; j0 < cols; j0 += kT) {
      const int64_t j1 = std::min(cols, j0 + kT);
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t i = i0; i < i1; ++i) dst[j * rows + i] = src[i * cols + j];
    }
  }
}

// exp for float32 written so that gcc -O3 vectorizes it inside `#pragma omp simd` loops (no
// calls, no branches, no float->int conversion; std::floor and std::max would each stop it:
// floor may raise the inexact flag, max returns a reference to one of its arguments). Cody-Waite reduction x = n·ln2 + r with
// |r| <= ln2/2, Cephes' degree-7 polynomial for e^r, 2^n built in the exponent bits.
// Max error 1.01 ulp on [-87.3, 88] (checked exhaustively against double exp). Below -87.34
// (where the result would be subnormal) it returns 0, so -inf -> 0; above 88.37 it returns +inf
// (the true overflow is at 88.72; nothing here exponentiates positive arguments that large, since
// every argument is a logit minus an upper bound of it).
inline float fast_exp(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kC1 = 0.693359375f;     // ln2, high part: 9 significant bits, so n·kC1 is exact
  const float kC2 = -2.12194440e-4f;  // ln2 - kC1
  const float kRound = 12582912.0f;   // 1.5·2^23: x + kRound rounds x to an integer in the low bits
  float xc = x < -87.5f ? -87.5f : x;
  xc = xc > 88.37f ? 88.37f : xc;     // keeps n in [-127, 127]
  const float t = xc * kLog2e + kRound;
  const float n = t - kRound;
  float r = xc - n * kC1;
  r = r - n * kC2;
  const float z = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * z + r + 1.0f;
  // The low mantissa bits of t hold n + 2^22 (t's exponent is fixed by kRound), so n comes out of
  // an integer subtraction; NaN input still gives NaN through p.
  int32_t tb;
  std::memcpy(&tb, &t, sizeof(tb));
  const uint32_t bits = (uint32_t)(tb - 0x4B400000 + 127) << 23;   // unsigned: no signed overflow for NaN
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  float y = p * two_n;
  y = x < -87.33654475f ? 0.0f : y;
  y = x > 88.37f ? std::numeric_limits<float>::infinity() : y;
  return y;
}
inline double fast_exp(double x) { return std::exp(x); }   // float64 is for gradcheck

}  // namespace pyssl_cpu
