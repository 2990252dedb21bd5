// Fused counter-based Gaussian noise + per-channel normalization on the GPU: the main GPU path
// of pyssl.gaussian_noise and pyssl.Smooth.
//
// Computes, for every output row r (image row_src[r], sample row_sample[r]) and element e of the
// image in logical order:
//     out[r, e] = a[c(e)] * (x[row_src[r], e] + sigma * z(seed, image_ids[row_src[r]], row_sample[r], e)) + b[c(e)]
// with z from the counter scheme of pyssl/ops/noise.py (Philox4x32-10 on (e/4, sample, image id,
// 2*stream + ext), Box–Muller, radius uniform extended to 2^-64 when its word is 0). Uniforms
// are bit-equal to the other backends; log and sin/cos are the CPU backend's polynomials (~1-2 ulp).
//
// The per-quad arithmetic (Philox, Box–Muller, the affine map, the channel bookkeeping) lives in
// noise_quad.h, shared with a host driver that tests it against the CPU backend.
//
// Tiling. Logical order with HW % 4 == 0 (the common case): grid (output row, chunk, channel),
// 256 threads of 4 quads each (coalesced), so a_c, b_c and the row's counter words are block
// constants; x is one 16-byte load per quad, the output one 16-byte (float32) or 8-byte
// (16-bit) store. Otherwise (channels_last, or quads straddling channels): one quad per thread,
// grid (output row, quad blocks, striding), the channel found per element, scalar stores. Everything lives in
// registers: 4 Philox words, 4 normals. Traffic: each output element written once; the image
// row read through L2, where it stays because all its samples read it; a, b are 2·C floats.
// The arithmetic, not the traffic, bounds the kernel. SASS of the sm_90 build (nvcc 13.0 -O3,
// cuobjdump; bf16 per-channel kernel, its 4 quads per thread unrolled; 47 registers, no stack):
// 350 instructions per quad, of which 84 are the radius extension (taken with probability
// 2^-31) and ~16 the sqrt slow-path stubs, so ~247 run per quad: Philox-10 50 (20 IMAD.WIDE,
// 20 LOP3, 10 LDC.64 of the round keys, which come in as a kernel parameter: derived in the
// kernel they cost 20 additions per quad, the compiler re-deriving them rather than holding 20
// registers), the two radius logarithms ~50 (division-free polynomials; with the earlier
// atanh form's IEEE divisions the common path was 267), the two square roots, the two sincos,
// the affine map, load, bf16 pack, store and indexing. At ~62 instructions per element against
// 2 bytes written, noise_imagenet (1.2e9 elements) would take ~2.3 ms issue-bound on an H200
// (132 SMs × 4 warp instructions per clock at 1.98 GHz) against ~0.56 ms for its 2.4 GB of
// writes at the ~4.3 TB/s a device copy reaches there: about a quarter of the bandwidth, an
// estimate until timed. Reaching 70% needs ≤ ~80 instructions per quad: Philox alone is 50,
// so the Box–Muller part would have to go to the SFU (MUFU lg2/rsqrt/sin/cos, with an exact
// path for u near 1 and the tail) and the counter-based generator to fewer rounds.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "noise_quad.h"

namespace {

using pyssl_noise::Row;
constexpr int kThreads = 256;

template <typename T> __device__ __forceinline__ T to_out(float v);
template <> __device__ __forceinline__ float to_out<float>(float v) { return v; }
template <> __device__ __forceinline__ at::BFloat16 to_out<at::BFloat16>(float v) { return at::BFloat16(v); }
template <> __device__ __forceinline__ at::Half to_out<at::Half>(float v) { return at::Half(v); }

// keys: the Philox round keys, a kernel parameter: the rounds load them from the constant
// bank (10 LDC.64 per quad); computed in the kernel they were re-derived for every quad (20
// additions), the compiler preferring that to holding 20 registers.
__device__ __forceinline__ Row row_of(int64_t r, const float* x, const int64_t* row_src,
                                      const int64_t* row_sample, const int64_t* ids, int64_t E,
                                      float sigma, const pyssl_noise::RoundKeys& keys, uint32_t c3) {
  const int64_t src = row_src[r];
  return Row{x + src * E, (uint32_t)row_sample[r], (uint32_t)ids[src], c3, keys, sigma};
}

// 4 outputs as one store: 16 bytes of float32, 8 bytes of bf16/fp16 (rounded to nearest even,
// as at::BFloat16/at::Half convert). Inline PTX: written as a float4/uint2 store, NVVM split it
// into 4 (2) scalar stores (seen in the sm_90 PTX), having lost the pointer's alignment. The
// callers guarantee it (row and quad offsets are multiples of 4 elements, aligned base).
__device__ __forceinline__ void store4(float* p, const float y[4]) {
  asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(y[0]), "f"(y[1]), "f"(y[2]), "f"(y[3])
               : "memory");
}
__device__ __forceinline__ void store4_16(void* p, uint32_t lo, uint32_t hi) {
  asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(p), "r"(lo), "r"(hi) : "memory");
}
__device__ __forceinline__ void store4(at::BFloat16* p, const float y[4]) {
  const __nv_bfloat162 lo = __floats2bfloat162_rn(y[0], y[1]), hi = __floats2bfloat162_rn(y[2], y[3]);
  store4_16(p, *reinterpret_cast<const uint32_t*>(&lo), *reinterpret_cast<const uint32_t*>(&hi));
}
__device__ __forceinline__ void store4(at::Half* p, const float y[4]) {
  const __half2 lo = __floats2half2_rn(y[0], y[1]), hi = __floats2half2_rn(y[2], y[3]);
  store4_16(p, *reinterpret_cast<const uint32_t*>(&lo), *reinterpret_cast<const uint32_t*>(&hi));
}

// Logical order with HW % 4 == 0 (every quad inside one channel), the common case: grid
// (R, chunks, C); a block owns kThreads * kQuadsPerThread quads of one channel of one output
// row, so a_c, b_c and the row's counter words are block constants.
template <typename T>
__global__ void __launch_bounds__(kThreads)
noise_channel_kernel(const float* __restrict__ x, const int64_t* __restrict__ row_src,
                     const int64_t* __restrict__ row_sample, const int64_t* __restrict__ ids,
                     const float* __restrict__ a, const float* __restrict__ b, T* __restrict__ out,
                     float sigma, const pyssl_noise::RoundKeys keys, uint32_t c3, int64_t E, int64_t HW) {
  const int64_t r = blockIdx.x;
  const int c = blockIdx.z;
  const Row row = row_of(r, x, row_src, row_sample, ids, E, sigma, keys, c3);
  T* o = out + r * E;
  pyssl_noise::channel_block(row, __ldg(a + c), __ldg(b + c), HW, c, blockIdx.y, kThreads, threadIdx.x,
                             [&](int64_t e0, const float* y) { store4(o + e0, y); });
}

// Any layout and HW: one thread per quad of the row in logical order (quads may straddle
// channels), blockIdx.x = output row, blockIdx.y strides over the quads; each element is stored
// at its logical position or, channels_last, at (e - c*HW)*C + c.
template <typename T>
__global__ void __launch_bounds__(kThreads)
noise_kernel(const float* __restrict__ x, const int64_t* __restrict__ row_src,
             const int64_t* __restrict__ row_sample, const int64_t* __restrict__ ids,
             const float* __restrict__ a, const float* __restrict__ b, T* __restrict__ out,
             float sigma, const pyssl_noise::RoundKeys keys, uint32_t c3, int64_t E, int64_t C, int64_t HW,
             bool channels_last) {
  const int64_t r = blockIdx.x;
  const Row row = row_of(r, x, row_src, row_sample, ids, E, sigma, keys, c3);
  T* o = out + r * E;
  pyssl_noise::general_thread(row, a, b, E, HW, blockIdx.y, gridDim.y, kThreads, threadIdx.x,
                              [&](int64_t e, int64_t c, float v) {
                                o[channels_last ? (e - c * HW) * C + c : e] = to_out<T>(v);
                              });
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
  TORCH_CHECK(row_src.is_contiguous() && row_sample.is_contiguous() && image_ids.is_contiguous(),
              "row_src, row_sample and image_ids must be contiguous");
  TORCH_CHECK(a.dtype() == at::kFloat && b.dtype() == at::kFloat && a.numel() == C && b.numel() == C &&
              a.is_contiguous() && b.is_contiguous(), "a, b must be contiguous float32 (C,)");
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(0) == row_src.numel() && out.size(1) == x.size(1),
              "out must be contiguous (R, E)");
  const int64_t R = row_src.numel();
  if (R == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t E = x.size(1);
  auto st = c10::cuda::getCurrentCUDAStream();
  const pyssl_noise::RoundKeys keys =
      pyssl_noise::round_keys((uint32_t)(uint64_t)seed, (uint32_t)((uint64_t)seed >> 32));
  const uint32_t c3 = (uint32_t)(2 * stream);
  constexpr int64_t per_block = (int64_t)kThreads * pyssl_noise::kQuadsPerThread;
  const int64_t chunks = (HW / 4 + per_block - 1) / per_block;
  // x rows and the output are 16-byte aligned when E % 4 == 0 (torch allocations are)
  const bool per_channel = !channels_last && HW % 4 == 0 && HW > 0 && chunks <= 65535 && C <= 65535 &&
                           reinterpret_cast<uintptr_t>(x.data_ptr<float>()) % 16 == 0 &&
                           reinterpret_cast<uintptr_t>(out.data_ptr()) % (4 * out.element_size()) == 0;
  auto go = [&](auto* o) {
    using T = std::remove_pointer_t<decltype(o)>;
    if (per_channel) {
      const dim3 grid((unsigned)R, (unsigned)chunks, (unsigned)C);
      noise_channel_kernel<T><<<grid, kThreads, 0, st>>>(
          x.data_ptr<float>(), row_src.data_ptr<int64_t>(), row_sample.data_ptr<int64_t>(),
          image_ids.data_ptr<int64_t>(), a.data_ptr<float>(), b.data_ptr<float>(), o, (float)sigma,
          keys, c3, E, HW);
    } else {
      const int64_t nq = (E + 3) / 4;
      const dim3 grid((unsigned)R, (unsigned)std::min<int64_t>((nq + kThreads - 1) / kThreads, 65535));
      noise_kernel<T><<<grid, kThreads, 0, st>>>(
          x.data_ptr<float>(), row_src.data_ptr<int64_t>(), row_sample.data_ptr<int64_t>(),
          image_ids.data_ptr<int64_t>(), a.data_ptr<float>(), b.data_ptr<float>(), o, (float)sigma,
          keys, c3, E, C, HW, channels_last);
    }
  };
  if (out.scalar_type() == at::kFloat) go(out.data_ptr<float>());
  else if (out.scalar_type() == at::kBFloat16) go(out.data_ptr<at::BFloat16>());
  else if (out.scalar_type() == at::kHalf) go(out.data_ptr<at::Half>());
  else TORCH_CHECK(false, "out must be float32, bfloat16 or float16, got ", out.scalar_type());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
