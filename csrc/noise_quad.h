// The per-quad arithmetic of the CUDA noise kernels (csrc/noise_cuda.cu), written once for the
// device and the host. The kernels call these functions; tests/test_build.py compiles this
// header as plain C++ with a host driver that walks the same grid as the kernels and checks the
// result against the CPU backend, so the counters, the channel bookkeeping and both storage
// layouts are exercised without a GPU. The host versions of the CUDA intrinsics (umulhi,
// uint2float_rn, float/bit casts) compute the same values. csrc/noise_cpu.cpp takes its log and
// sin/cos from here too (its Philox stays its own: a 64-bit product form that vectorizes).
//
// Counter scheme (pyssl/ops/noise.py): Philox4x32-10 keyed by the 64-bit seed (k0, k1), counter
// (element quad q = e/4, sample, image id, 2*stream + ext); the four words give the radius
// uniforms (words 0, 2) and angle uniforms (words 1, 3) of two Box–Muller pairs; a radius word of
// 0 takes 32 more bits from the ext = 1 draw (radius uniform resolution 2^-64).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define PYSSL_HD __host__ __device__ __forceinline__
#else
#define PYSSL_HD inline
#endif

namespace pyssl_noise {

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;

PYSSL_HD uint32_t umulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return (uint32_t)(((uint64_t)a * b) >> 32);
#endif
}

PYSSL_HD float u2f(uint32_t w) {
#if defined(__CUDA_ARCH__)
  return __uint2float_rn(w);
#else
  return (float)w;   // round to nearest even, as __uint2float_rn
#endif
}

PYSSL_HD float ldg(const float* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}

// The 10 round keys of Philox4x32-10 for the 64-bit key (k0, k1), the same for every counter of
// a call: the CUDA kernels get them from the host as a kernel parameter (the rounds load them
// from the constant bank; derived inside the rounds they cost 20 additions per quad).
struct RoundKeys {
  uint32_t k0[10], k1[10];
};

PYSSL_HD RoundKeys round_keys(uint32_t k0, uint32_t k1) {
  RoundKeys rk;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    rk.k0[r] = k0 + (uint32_t)r * kW0;
    rk.k1[r] = k1 + (uint32_t)r * kW1;
  }
  return rk;
}

PYSSL_HD void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, const RoundKeys& rk) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    const uint32_t hi0 = umulhi(kM0, c0), lo0 = kM0 * c0;
    const uint32_t hi1 = umulhi(kM1, c2), lo1 = kM1 * c2;
    const uint32_t n0 = hi1 ^ c1 ^ rk.k0[r], n2 = hi0 ^ c3 ^ rk.k1[r];
    c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
  }
}

PYSSL_HD float unit32(uint32_t w) { return (u2f(w) + 0.5f) * 2.3283064365386963e-10f; }   // 2^-32
PYSSL_HD float unit64(uint32_t w) { return (u2f(w) + 0.5f) * 5.421010862427522e-20f; }    // 2^-64

PYSSL_HD float bits_to_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f; std::memcpy(&f, &b, 4); return f;
#endif
}
PYSSL_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b; std::memcpy(&b, &f, 4); return b;
#endif
}

// The transcendental functions of Box–Muller, the same polynomials on every C++/CUDA path
// (branch-free and division-free, so the CPU loops vectorize and the GPU spends no IEEE
// division per logarithm; the host driver test runs the very arithmetic the kernels do).
// ln(1 + f) for f in [√½ − 1, √2 − 1] as f − f²/2 + f³·P(f), P of degree 7 fitted (weighted
// least squares toward minimax on the relative error): ≤ 1.3 ulp over that interval in float32
// arithmetic (checked on 2.2M points, dense near 0). Callers pass f exactly (m − 1 of a
// mantissa, or −c and 1 − 2c near u = 1), so no cancellation enters before the polynomial.
PYSSL_HD float log_core(float f, float k) {   // k·ln 2 + ln(1 + f)
  float p = -0.07263852655887604f;
  p = p * f + 0.12476292252540588f;
  p = p * f - 0.13168855011463165f;
  p = p * f + 0.14244140684604645f;
  p = p * f - 0.1662653535604477f;
  p = p * f + 0.19999301433563232f;
  p = p * f - 0.2500069737434387f;
  p = p * f + 0.3333335816860199f;
  const float f2 = f * f;
  return k * 0.693147180559945f + (f - 0.5f * f2 + (f2 * f) * p);
}

// u = m·2^k with m in [√½, √2), for normal float u > 0 (flat selects: the CPU loops vectorize)
PYSSL_HD void mantissa(float u, float& m, float& k) {
  const uint32_t bits = float_to_bits(u);
  const float ka = (float)((int32_t)(bits >> 23) - 127);
  const float ma = bits_to_float((bits & 0x007FFFFFu) | 0x3F800000u);
  const bool big = ma > 1.41421356f;
  m = big ? 0.5f * ma : ma;
  k = big ? ka + 1.0f : ka;
}

PYSSL_HD float log_pos(float u) {
  float m, k;
  mantissa(u, m, k);
  return log_core(m - 1.0f, k);
}

// ln u of the radius uniform u = (w + ½)·2^-32 of a 32-bit word w ≠ 0. For w < 2^31 from u in
// float32 (log_pos); for w ≥ 2^31 (u ≥ ½) from c = 1 − u = (~w + ½)·2^-32, which float32 holds
// to 2^-24 relative, as ln(1 − c) = ln(1 + f) with f = −c (c ≤ 1 − √½) or −ln 2 + ln(1 + f)
// with f = 1 − 2c (exact in float32): so u near 1 keeps its 2^-32 resolution and
// r = sqrt(−2 ln u) never rounds to 0 (u itself in float32 would round the top 2^7 words to 1
// and resolve r² only to 2^-23).
PYSSL_HD float log_radius_word(uint32_t w) {
  // written as flat selects (no nested conditionals): GCC vectorizes only that form
  float m, kl;
  mantissa(unit32(w), m, kl);
  const float c = unit32(~w);
  const bool cbig = c > 0.29289322f;
  const float fh = cbig ? 1.0f - 2.0f * c : -c;
  const float kh = cbig ? -1.0f : 0.0f;
  const bool hi = (int32_t)w < 0;   // w >= 2^31
  return log_core(hi ? fh : m - 1.0f, hi ? kh : kl);
}

// (cos 2πt, sin 2πt) for t in [0, 1]: t = q/4 + f with |f| ≤ 1/8 (exact in float), then
// Taylor polynomials on [−π/4, π/4] (truncation < 4e-9) and a quadrant swap.
PYSSL_HD void sincos_turns(float t, float& c_out, float& s_out) {
  const int qi = (int)(4.0f * t + 0.5f);       // round(4t), t >= 0
  const float f = t - 0.25f * (float)qi;
  const int q = qi & 3;
  const float x = f * 6.28318530717958648f;
  const float x2 = x * x;
  const float s = x * (1.0f + x2 * (-1.0f / 6 + x2 * (1.0f / 120 + x2 * (-1.0f / 5040 + x2 * (1.0f / 362880)))));
  const float c = 1.0f + x2 * (-0.5f + x2 * (1.0f / 24 + x2 * (-1.0f / 720 + x2 * (1.0f / 40320 + x2 * (-1.0f / 3628800)))));
  const float cs = (q & 1) ? s : c;     // the value that lands on cos
  const float sn = (q & 1) ? c : s;
  c_out = (q == 1 || q == 2) ? -cs : cs;
  s_out = (q >= 2) ? -sn : sn;
}

// The four standard normals of quad q (elements 4q .. 4q+3).
PYSSL_HD void normals4(uint32_t q, uint32_t sample, uint32_t image, uint32_t c3, const RoundKeys& rk,
                       float z[4]) {
  uint32_t w0 = q, w1 = sample, w2 = image, w3 = c3;
  philox4x32_10(w0, w1, w2, w3, rk);
  float la = log_radius_word(w0), lb = log_radius_word(w2);
  if (w0 == 0 || w2 == 0) {   // probability 2^-31 per quad: extend the radius uniform
    uint32_t v0 = q, v1 = sample, v2 = image, v3 = c3 | 1u;
    philox4x32_10(v0, v1, v2, v3, rk);
    if (w0 == 0) la = log_pos(unit64(v0));
    if (w2 == 0) lb = log_pos(unit64(v1));
  }
  const float ra = sqrtf(-2.0f * la);
  const float rb = sqrtf(-2.0f * lb);
  float sa, ca, sb, cb;
  sincos_turns(unit32(w1), ca, sa);
  sincos_turns(unit32(w3), cb, sb);
  z[0] = ra * ca; z[1] = ra * sa; z[2] = rb * cb; z[3] = rb * sb;
}

// One output row's constants: the image row, the counter words of the row, the round keys, sigma.
struct Row {
  const float* x;   // the source image, logical (C, HW) order
  uint32_t sample, image, c3;
  RoundKeys keys;
  float sigma;
};

// y = a_c (x + sigma z) + b_c, in this association on every path (a_c x + (a_c sigma) z + b_c).
PYSSL_HD float affine(float ac, float bc, float sigma, float x, float z) {
  return ac * x + (ac * sigma) * z + bc;
}

// Fast path: quad qc of channel c, the whole quad inside the channel (HW % 4 == 0, logical
// order). The kernel has a_c, b_c per block; one 16-byte load of x.
PYSSL_HD void quad_in_channel(const Row& row, float ac, float bc, int64_t HW, int64_t c, int64_t qc,
                              float y[4]) {
  const int64_t e0 = c * HW + 4 * qc;
  float z[4];
  normals4((uint32_t)(e0 >> 2), row.sample, row.image, row.c3, row.keys, z);
#if defined(__CUDA_ARCH__)
  const float4 xv = __ldg(reinterpret_cast<const float4*>(row.x + e0));
  y[0] = affine(ac, bc, row.sigma, xv.x, z[0]);
  y[1] = affine(ac, bc, row.sigma, xv.y, z[1]);
  y[2] = affine(ac, bc, row.sigma, xv.z, z[2]);
  y[3] = affine(ac, bc, row.sigma, xv.w, z[3]);
#else
  for (int k = 0; k < 4; ++k) y[k] = affine(ac, bc, row.sigma, row.x[e0 + k], z[k]);
#endif
}

// Quads per thread in the per-channel kernel: the block preamble (row lookups, a_c, b_c, the
// output pointer: ~80 instructions) is paid once for 4 quads instead of once per quad.
constexpr int kQuadsPerThread = 4;

// The quads of thread `tid` in block `by` of channel c (block size `threads`): quads
// by * threads * kQuadsPerThread + j * threads + tid, j < kQuadsPerThread (coalesced per j).
// Store(e0, y) writes the 4 outputs of logical elements e0 .. e0 + 3.
template <typename Store>
PYSSL_HD void channel_block(const Row& row, float ac, float bc, int64_t HW, int64_t c, int64_t by,
                            int threads, int tid, Store store) {
  const int64_t nqc = HW / 4;
  const int64_t q0 = by * threads * kQuadsPerThread + tid;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int j = 0; j < kQuadsPerThread; ++j) {
    const int64_t qc = q0 + (int64_t)j * threads;
    if (qc < nqc) {
      float y[4];
      quad_in_channel(row, ac, bc, HW, c, qc, y);
      store(c * HW + 4 * qc, y);
    }
  }
}

// General path: quad q of the row in logical order, any HW; elements beyond E are not written.
// Store(e, c, v) writes logical element e (channel c) wherever the layout puts it.
template <typename Store>
PYSSL_HD void quad_general(const Row& row, const float* a, const float* b, int64_t E, int64_t HW,
                           int64_t q, Store store) {
  float z[4];
  normals4((uint32_t)q, row.sample, row.image, row.c3, row.keys, z);
  const int64_t e0 = q << 2;
  // channel of each element: one division per quad (32-bit when it fits), then steps
  int64_t c = E < (int64_t(1) << 32) ? (int64_t)((uint32_t)e0 / (uint32_t)HW) : e0 / HW;
  int64_t next = (c + 1) * HW;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int k = 0; k < 4; ++k) {
    const int64_t e = e0 + k;
    while (e >= next) { ++c; next += HW; }
    if (e < E) {
      const float ac = ldg(a + c);
      store(e, c, affine(ac, ldg(b + c), row.sigma, ldg(row.x + e), z[k]));
    }
  }
}

// The quads of thread `tid` in block `by` of the general kernel (grid stride `blocks` blocks).
template <typename Store>
PYSSL_HD void general_thread(const Row& row, const float* a, const float* b, int64_t E, int64_t HW,
                             int64_t by, int64_t blocks, int threads, int tid, Store store) {
  const int64_t nq = (E + 3) >> 2;
  for (int64_t q = by * threads + tid; q < nq; q += blocks * threads) quad_general(row, a, b, E, HW, q, store);
}

}  // namespace pyssl_noise
