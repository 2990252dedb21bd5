// Fused counter-based Gaussian noise + per-channel normalization on the GPU: the main GPU path
// of pyssl.gaussian_noise and pyssl.Smooth.
//
// Computes, for every output row r (image row_src[r], sample row_sample[r]) and element e of the
// image in logical order:
//     out[r, e] = a[c(e)] * (x[row_src[r], e] + sigma * z(seed, image_ids[row_src[r]], row_sample[r], e)) + b[c(e)]
// with z from the counter scheme of pyssl/ops/noise.py (Philox4x32-10 on (e/4, sample, image id,
// 2*stream + ext), Box–Muller, radius uniform extended to 2^-64 when its word is 0). Uniforms
// are bit-equal to the other backends; logf/sincospif are CUDA's full-precision versions.
//
// Tiling: one thread per quad of 4 elements; blockIdx.x = output row (rows may exceed 65535),
// blockIdx.y strides over the quads of the row. Everything lives in registers: 4 Philox words,
// 4 normals. Traffic: each output element is written once (one 16-byte store per thread for
// float32, 8-byte for 16-bit types, when the row is aligned); the image row is read through L2,
// where it stays because all its samples read it; a and b are 2·C floats.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace {

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
constexpr int kThreads = 256;

__device__ __forceinline__ void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2,
                                              uint32_t& c3, uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint32_t hi0 = __umulhi(kM0, c0), lo0 = kM0 * c0;
    const uint32_t hi1 = __umulhi(kM1, c2), lo1 = kM1 * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
    k0 += kW0; k1 += kW1;
  }
}

__device__ __forceinline__ float unit32(uint32_t w) { return (__uint2float_rn(w) + 0.5f) * 2.3283064365386963e-10f; }
__device__ __forceinline__ float unit64(uint32_t w) { return (__uint2float_rn(w) + 0.5f) * 5.421010862427522e-20f; }

template <typename T> __device__ __forceinline__ T to_out(float v);
template <> __device__ __forceinline__ float to_out<float>(float v) { return v; }
template <> __device__ __forceinline__ at::BFloat16 to_out<at::BFloat16>(float v) { return at::BFloat16(v); }
template <> __device__ __forceinline__ at::Half to_out<at::Half>(float v) { return at::Half(v); }

template <typename T>
__global__ void __launch_bounds__(kThreads)
noise_kernel(const float* __restrict__ x, const int64_t* __restrict__ row_src,
             const int64_t* __restrict__ row_sample, const int64_t* __restrict__ ids,
             const float* __restrict__ a, const float* __restrict__ b, T* __restrict__ out,
             float sigma, uint32_t k0, uint32_t k1, uint32_t c3, int64_t E, int64_t C, int64_t HW,
             bool channels_last) {
  const int64_t r = blockIdx.x;
  const int64_t src = row_src[r];
  const uint32_t sample = (uint32_t)row_sample[r];
  const uint32_t image = (uint32_t)ids[src];
  const float* xr = x + src * E;
  T* o = out + r * E;
  const int64_t nq = (E + 3) >> 2;
  const bool vec = !channels_last && (E & 3) == 0 &&
                   (reinterpret_cast<uintptr_t>(out) % (4 * sizeof(T))) == 0;
  for (int64_t q = (int64_t)blockIdx.y * kThreads + threadIdx.x; q < nq; q += (int64_t)gridDim.y * kThreads) {
    uint32_t w0 = (uint32_t)q, w1 = sample, w2 = image, w3 = c3;
    philox4x32_10(w0, w1, w2, w3, k0, k1);
    float ua = unit32(w0), ub = unit32(w2);
    if (w0 == 0 || w2 == 0) {   // probability 2^-31 per quad: extend the radius uniform
      uint32_t v0 = (uint32_t)q, v1 = sample, v2 = image, v3 = c3 | 1u;
      philox4x32_10(v0, v1, v2, v3, k0, k1);
      if (w0 == 0) ua = unit64(v0);
      if (w2 == 0) ub = unit64(v1);
    }
    const float ra = sqrtf(-2.0f * logf(ua));
    const float rb = sqrtf(-2.0f * logf(ub));
    float sa, ca, sb, cb;
    sincospif(2.0f * unit32(w1), &sa, &ca);   // sin/cos(2π t), 2t exact
    sincospif(2.0f * unit32(w3), &sb, &cb);
    const float z[4] = {ra * ca, ra * sa, rb * cb, rb * sb};
    const int64_t e0 = q << 2;
    // channel of each element: one division per quad (32-bit when it fits), then steps
    int64_t cq[4];
    int64_t c = E < (int64_t(1) << 32) ? (int64_t)((uint32_t)e0 / (uint32_t)HW) : e0 / HW;
    int64_t next = (c + 1) * HW;
    T y[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t e = e0 + k;
      while (e >= next) { ++c; next += HW; }
      cq[k] = c;
      if (e < E) {
        const float ac = __ldg(a + c);
        y[k] = to_out<T>(ac * __ldg(xr + e) + (ac * sigma) * z[k] + __ldg(b + c));
      }
    }
    if (vec) {
      struct alignas(4 * sizeof(T)) Pack { T v[4]; };
      Pack p;
#pragma unroll
      for (int k = 0; k < 4; ++k) p.v[k] = y[k];
      *reinterpret_cast<Pack*>(o + e0) = p;
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int64_t e = e0 + k;
        if (e < E) o[channels_last ? (e - cq[k] * HW) * C + cq[k] : e] = y[k];
      }
    }
  }
}

}  // namespace

void gaussian_noise_cuda(at::Tensor x, at::Tensor row_src, at::Tensor row_sample,
                         at::Tensor image_ids, at::Tensor a, at::Tensor b, double sigma,
                         int64_t seed, int64_t stream, int64_t C, int64_t HW, bool channels_last,
                         at::Tensor out) {
  TORCH_CHECK(x.is_cuda() && out.is_cuda(), "x and out must be CUDA tensors");
  TORCH_CHECK(x.dtype() == at::kFloat && x.is_contiguous() && x.dim() == 2, "x must be contiguous float32 (B, E)");
  TORCH_CHECK(x.size(1) == C * HW, "x has ", x.size(1), " elements per image, expected C*HW = ", C * HW);
  TORCH_CHECK(row_src.dtype() == at::kLong && row_sample.dtype() == at::kLong && image_ids.dtype() == at::kLong,
              "row_src, row_sample and image_ids must be int64");
  TORCH_CHECK(a.dtype() == at::kFloat && b.dtype() == at::kFloat && a.numel() == C && b.numel() == C, "a, b must be float32 (C,)");
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(0) == row_src.numel() && out.size(1) == x.size(1),
              "out must be contiguous (R, E)");
  const int64_t R = row_src.numel();
  if (R == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t E = x.size(1);
  const int64_t nq = (E + 3) / 4;
  const int64_t blocks_y = std::min<int64_t>((nq + kThreads - 1) / kThreads, 65535);
  const dim3 grid((unsigned)R, (unsigned)blocks_y);
  auto st = c10::cuda::getCurrentCUDAStream();
  const uint32_t k0 = (uint32_t)(uint64_t)seed, k1 = (uint32_t)((uint64_t)seed >> 32);
  const uint32_t c3 = (uint32_t)(2 * stream);
  auto go = [&](auto* o) {
    using T = std::remove_pointer_t<decltype(o)>;
    noise_kernel<T><<<grid, kThreads, 0, st>>>(
        x.data_ptr<float>(), row_src.data_ptr<int64_t>(), row_sample.data_ptr<int64_t>(),
        image_ids.data_ptr<int64_t>(), a.data_ptr<float>(), b.data_ptr<float>(), o, (float)sigma,
        k0, k1, c3, E, C, HW, channels_last);
  };
  if (out.scalar_type() == at::kFloat) go(out.data_ptr<float>());
  else if (out.scalar_type() == at::kBFloat16) go(out.data_ptr<at::BFloat16>());
  else if (out.scalar_type() == at::kHalf) go(out.data_ptr<at::Half>());
  else TORCH_CHECK(false, "out must be float32, bfloat16 or float16, got ", out.scalar_type());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
