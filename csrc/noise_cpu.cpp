// Fused counter-based Gaussian noise + per-channel normalization on the CPU (OpenMP + SIMD).
//
// Computes, for every output row r (a noisy copy of image row_src[r], sample row_sample[r]) and
// element e of that image in logical order:
//     out[r, e] = a[c(e)] * (x[row_src[r], e] + sigma * z(seed, image_ids[row_src[r]], row_sample[r], e)) + b[c(e)]
// with z from the counter scheme of pyssl/ops/noise.py: Philox4x32-10 on the counter
// (e / 4, sample, image id, 2*stream + ext), one draw per quad of elements, Box–Muller with a
// radius uniform extended to 2^-64 when its 32-bit word is 0. The Philox words and uniforms are
// bit-equal to the other backends; log and sin/cos are the polynomials of noise_quad.h (~1-2 ulp).
//
// Work split: OpenMP over (row, block of BLOCK_E elements). Per block the Philox words of its
// quads go to a small stack buffer (4 * 4 * BLOCK_Q bytes), the normals to another, then one
// pass reads x (the image, hot in cache: it is shared by all samples) and writes each output
// element once. Memory traffic: the output, written once, plus the image per row from cache.
// channels_last output (storage (R, HW, C)): blocks run over HW positions; the normals of every
// channel of the block are generated first (C·T floats per thread), then stored channel-innermost.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "noise_quad.h"

namespace {

using pyssl_noise::kM0;
using pyssl_noise::kM1;
using pyssl_noise::kW0;
using pyssl_noise::kW1;
using pyssl_noise::log_pos;
using pyssl_noise::log_radius_word;
using pyssl_noise::sincos_turns;
using pyssl_noise::unit32;
using pyssl_noise::unit64;
constexpr int BLOCK_Q = 256;            // quads per block: 1024 elements, 4 KiB of normals
constexpr int BLOCK_E = 4 * BLOCK_Q;

// Straight-line rounds on scalars (the key is bumped after every round, one bump more than
// needed, so the loop body has no branch): vectorizes across quads with 32x32->64 multiplies.
inline void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = (uint64_t)kM0 * c0;
    const uint64_t p1 = (uint64_t)kM1 * c2;
    const uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
    c0 = n0; c1 = (uint32_t)p1; c2 = n2; c3 = (uint32_t)p0;
    k0 += kW0; k1 += kW1;
  }
}

// Standard normals of elements [e0, e0 + n) of one (image, sample), e0 any: the quads covering
// the range are drawn, the range is copied out.
struct NormalGen {
  uint32_t k0, k1, sample, image, c3;

  void quads(int64_t q0, int nq, float* z) const {
    alignas(64) uint32_t w[4][BLOCK_Q];
    const uint32_t qb = (uint32_t)q0;
#pragma omp simd
    for (int i = 0; i < nq; ++i) {
      uint32_t a0 = qb + (uint32_t)i, a1 = sample, a2 = image, a3 = c3;
      philox4x32_10(a0, a1, a2, a3, k0, k1);
      w[0][i] = a0; w[1][i] = a1; w[2][i] = a2; w[3][i] = a3;
    }
    alignas(64) float la[BLOCK_Q], lb[BLOCK_Q];   // ln of the radius uniforms
    int rare = 0;
#pragma omp simd reduction(| : rare)
    for (int i = 0; i < nq; ++i) rare |= (int)(w[0][i] == 0) | (int)(w[2][i] == 0);
#pragma omp simd
    for (int i = 0; i < nq; ++i) {
      la[i] = log_radius_word(w[0][i]);
      lb[i] = log_radius_word(w[2][i]);
    }
    if (rare) {   // probability ~2^-31 per quad: the extension draw for a zero radius word
      for (int i = 0; i < nq; ++i) {
        if (w[0][i] != 0 && w[2][i] != 0) continue;
        uint32_t v0 = qb + (uint32_t)i, v1 = sample, v2 = image, v3 = c3 | 1u;
        philox4x32_10(v0, v1, v2, v3, k0, k1);
        if (w[0][i] == 0) la[i] = log_pos(unit64(v0));
        if (w[2][i] == 0) lb[i] = log_pos(unit64(v1));
      }
    }
#pragma omp simd
    for (int i = 0; i < nq; ++i) {
      const float ra = std::sqrt(-2.0f * la[i]);
      const float rb = std::sqrt(-2.0f * lb[i]);
      float ca, sa, cb, sb;
      sincos_turns(unit32(w[1][i]), ca, sa);
      sincos_turns(unit32(w[3][i]), cb, sb);
      z[4 * i + 0] = ra * ca;
      z[4 * i + 1] = ra * sa;
      z[4 * i + 2] = rb * cb;
      z[4 * i + 3] = rb * sb;
    }
  }

  // n ≤ BLOCK_E - 3 so that the covering quads fit one block
  void range(int64_t e0, int n, float* z) const {
    alignas(64) float tmp[BLOCK_E];
    const int64_t q0 = e0 >> 2;
    const int skip = (int)(e0 & 3);
    const int nq = (skip + n + 3) >> 2;
    if (skip == 0) { quads(q0, nq, tmp); std::memcpy(z, tmp, sizeof(float) * n); return; }
    quads(q0, nq, tmp);
    std::memcpy(z, tmp + skip, sizeof(float) * n);
  }
};

template <typename T> inline T from_float(float v) { return (T)v; }
template <> inline c10::BFloat16 from_float<c10::BFloat16>(float v) { return c10::BFloat16(v); }
template <> inline c10::Half from_float<c10::Half>(float v) { return c10::Half(v); }

template <typename T>
void run(const float* x, const int64_t* row_src, const int64_t* row_sample, const int64_t* ids,
         const float* a, const float* b, float sigma, uint64_t seed, int64_t stream, int64_t C,
         int64_t HW, bool channels_last, int64_t R, T* out) {
  const int64_t E = C * HW;
  const uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
  const uint32_t c3 = (uint32_t)(2 * stream);
  if (!channels_last) {
    const int64_t nblk = (E + BLOCK_E - 1) / BLOCK_E;
    at::parallel_for(0, R * nblk, 1, [&](int64_t begin, int64_t end) {
      alignas(64) float z[BLOCK_E];
      for (int64_t it = begin; it < end; ++it) {
        const int64_t r = it / nblk, e0 = (it % nblk) * BLOCK_E;
        const int n = (int)std::min<int64_t>(BLOCK_E, E - e0);
        const int64_t src = row_src[r];
        NormalGen g{k0, k1, (uint32_t)row_sample[r], (uint32_t)ids[src], c3};
        g.quads(e0 >> 2, (n + 3) >> 2, z);
        const float* xr = x + src * E;
        T* o = out + r * E;
        // channel segments inside the block keep a, b scalar in the inner loop
        for (int i = 0; i < n;) {
          const int64_t e = e0 + i;
          const int64_t c = e / HW;
          const int seg = (int)std::min<int64_t>(n - i, (c + 1) * HW - e);
          const float ac = a[c], bc = b[c], as = a[c] * sigma;
#pragma omp simd
          for (int k = 0; k < seg; ++k)
            o[e + k] = from_float<T>(ac * xr[e + k] + as * z[i + k] + bc);
          i += seg;
        }
      }
    });
    return;
  }
  // channels_last: blocks of T_HW positions; normals per channel, then channel-innermost stores
  constexpr int T_HW = BLOCK_E - 4;
  const int64_t nblk = (HW + T_HW - 1) / T_HW;
  at::parallel_for(0, R * nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> zc((size_t)C * T_HW);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t r = it / nblk, p0 = (it % nblk) * T_HW;
      const int n = (int)std::min<int64_t>(T_HW, HW - p0);
      const int64_t src = row_src[r];
      NormalGen g{k0, k1, (uint32_t)row_sample[r], (uint32_t)ids[src], c3};
      for (int64_t c = 0; c < C; ++c) g.range(c * HW + p0, n, zc.data() + c * T_HW);
      const float* xr = x + src * E;
      T* o = out + r * E + p0 * C;
      for (int p = 0; p < n; ++p)
        for (int64_t c = 0; c < C; ++c)
          o[p * C + c] = from_float<T>(a[c] * xr[c * HW + p0 + p] + a[c] * sigma * zc[c * T_HW + p] + b[c]);
    }
  });
}

}  // namespace

void gaussian_noise_cpu(at::Tensor x, at::Tensor row_src, at::Tensor row_sample,
                        at::Tensor image_ids, at::Tensor a, at::Tensor b, double sigma,
                        int64_t seed, int64_t stream, int64_t C, int64_t HW, bool channels_last,
                        at::Tensor out) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.is_contiguous() && x.dim() == 2, "x must be contiguous float32 (B, E)");
  TORCH_CHECK(x.size(1) == C * HW, "x has ", x.size(1), " elements per image, expected C*HW = ", C * HW);
  TORCH_CHECK(row_src.dtype() == at::kLong && row_sample.dtype() == at::kLong && image_ids.dtype() == at::kLong,
              "row_src, row_sample and image_ids must be int64");
  TORCH_CHECK(row_src.is_contiguous() && row_sample.is_contiguous() && image_ids.is_contiguous(), "index tensors must be contiguous");
  TORCH_CHECK(a.dtype() == at::kFloat && b.dtype() == at::kFloat && a.numel() == C && b.numel() == C, "a, b must be float32 (C,)");
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(0) == row_src.numel() && out.size(1) == x.size(1),
              "out must be contiguous (R, E)");
  const int64_t R = row_src.numel();
  const float s = (float)sigma;
  const uint64_t sd = (uint64_t)seed;
  auto go = [&](auto* o) {
    run(x.data_ptr<float>(), row_src.data_ptr<int64_t>(), row_sample.data_ptr<int64_t>(),
        image_ids.data_ptr<int64_t>(), a.data_ptr<float>(), b.data_ptr<float>(), s, sd, stream, C,
        HW, channels_last, R, o);
  };
  if (out.scalar_type() == at::kFloat) go(out.data_ptr<float>());
  else if (out.scalar_type() == at::kBFloat16) go(out.data_ptr<c10::BFloat16>());
  else if (out.scalar_type() == at::kHalf) go(out.data_ptr<c10::Half>());
  else TORCH_CHECK(false, "out must be float32, bfloat16 or float16, got ", out.scalar_type());
}

// Philox4x32-10 words of counters (c0, c1, c2, c3) with key (k0, k1): for tests of the scheme.
at::Tensor philox4x32_cpu(at::Tensor counters, int64_t k0, int64_t k1) {
  TORCH_CHECK(counters.dtype() == at::kLong && counters.dim() == 2 && counters.size(1) == 4, "counters must be int64 (n, 4)");
  auto c = counters.contiguous();
  auto out = at::empty_like(c);
  const int64_t* ci = c.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < c.size(0); ++i) {
    uint32_t w[4] = {(uint32_t)ci[4 * i], (uint32_t)ci[4 * i + 1], (uint32_t)ci[4 * i + 2], (uint32_t)ci[4 * i + 3]};
    philox4x32_10(w[0], w[1], w[2], w[3], (uint32_t)k0, (uint32_t)k1);
    for (int j = 0; j < 4; ++j) o[4 * i + j] = w[j];
  }
  return out;
}
