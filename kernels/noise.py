"""Triton backend of the fused counter-based Gaussian noise (pyssl.gaussian_noise, pyssl.Smooth).

One entry point:

    gaussian_noise(x, row_src, row_sample, image_ids, a, b, sigma, seed, stream, C, HW,
                   channels_last, out)

x (B, E) float32 contiguous (E = C·HW elements per image, logical order); row_src, row_sample
(R,) int64: output row r is the noisy copy of image row_src[r] with sample index row_sample[r];
image_ids (B,) int64; a, b (C,) float32; out (R, E) float32/bfloat16/float16, written in place,
in logical order or, when channels_last, in (R, HW, C) storage order.

The generator is the counter scheme of pyssl/ops/noise.py: tl.philox (Philox4x32-10, the same
constants) on the counter (quad, sample, image id, 2·stream + ext), Box–Muller on float32
uniforms that are bit-equal to the other backends, the radius uniform extended to 2⁻⁶⁴ by an
extension draw when its 32-bit word is 0. log and sin/cos are the same polynomials as the C++
kernel (branch-free; the hardware's approximate sin/cos lose accuracy outside [−π, π]).

Kernels (header comment on each):
    _noise_kernel   per (output row, block of BLOCK_Q quads): draws, transforms, normalizes, stores
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from pyssl.kernels._tiles import interpreting

_TL_OUT = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_TL_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@triton.jit
def _log_core(f, k):
    """k·ln 2 + ln(1 + f) for f in [√½ − 1, √2 − 1]: f − f²/2 + f³·P(f), the degree-7 polynomial
    of csrc/noise_quad.h's log_core (≤ 1.3 ulp, no division)."""
    p = -0.07263852655887604 * f + 0.12476292252540588
    p = p * f - 0.13168855011463165
    p = p * f + 0.14244140684604645
    p = p * f - 0.1662653535604477
    p = p * f + 0.19999301433563232
    p = p * f - 0.2500069737434387
    p = p * f + 0.3333335816860199
    f2 = f * f
    return k * 0.693147180559945 + (f - 0.5 * f2 + (f2 * f) * p)


@triton.jit
def _mantissa(u):
    """(m, k) with u = m·2^k, m in [√½, √2), for normal float32 u > 0."""
    bits = u.to(tl.uint32, bitcast=True)
    k = (bits >> 23).to(tl.int32) - 127
    m = ((bits & 0x007FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    big = m > 1.41421356
    return tl.where(big, 0.5 * m, m), tl.where(big, k + 1, k).to(tl.float32)


@triton.jit
def _log_pos(u):
    """ln(u) for normal float32 u > 0 (u = m·2^k, ln m = ln(1 + (m − 1)))."""
    m, k = _mantissa(u)
    return _log_core(m - 1.0, k)


@triton.jit
def _log_radius_word(w):
    """ln((w + ½)·2^-32) of uint32 words w ≠ 0; for w >= 2^31 from c = (~w + ½)·2^-32 = 1 − u
    as ln(1 − c) (csrc/noise_quad.h log_radius_word: u near 1 keeps its 2^-32 resolution)."""
    m, k = _mantissa(_unit(w, 2.3283064365386963e-10))
    c = _unit(w ^ 0xFFFFFFFF, 2.3283064365386963e-10)
    cbig = c > 0.29289322
    hi = w >= 0x80000000
    f = tl.where(hi, tl.where(cbig, 1.0 - 2.0 * c, -c), m - 1.0)
    kf = tl.where(hi, tl.where(cbig, -1.0, 0.0), k)
    return _log_core(f, kf)


@triton.jit
def _sincos_turns(t):
    """(cos 2πt, sin 2πt) for t in [0, 1]: quadrant split in turns (exact), Taylor on [−π/4, π/4]."""
    qi = (4.0 * t + 0.5).to(tl.int32)
    f = t - 0.25 * qi.to(tl.float32)
    q = qi & 3
    x = f * 6.283185307179586
    x2 = x * x
    s = x * (1.0 + x2 * (-0.16666666666666666 + x2 * (0.008333333333333333 + x2 * (-0.0001984126984126984 + x2 * 2.755731922398589e-06))))
    c = 1.0 + x2 * (-0.5 + x2 * (0.041666666666666664 + x2 * (-0.001388888888888889 + x2 * (2.48015873015873e-05 + x2 * -2.755731922398589e-07))))
    odd = (q & 1) == 1
    cs = tl.where(odd, s, c)
    sn = tl.where(odd, c, s)
    cos_v = tl.where((q == 1) | (q == 2), -cs, cs)
    sin_v = tl.where(q >= 2, -sn, sn)
    return cos_v, sin_v


@triton.jit
def _unit(w, SCALE: tl.constexpr):
    # (w + ½)·SCALE in float32; w is uint32 (exact conversion rules as in the other backends)
    return (w.to(tl.float32) + 0.5) * SCALE


# ----------------------------------------------------------------------------------------------
# _noise_kernel: program (r, blk) (one flattened grid axis) handles quads [blk·BLOCK_Q, (blk+1)·BLOCK_Q) of output row r.
# Registers: the four Philox words of BLOCK_Q quads, then four float32 vectors of normals,
# interleaved to 4·BLOCK_Q consecutive elements (join + permute, so stores are contiguous in the
# logical layout). Nothing in shared memory. Traffic: each output element is written once; x's
# row (one image, shared by all its samples) and a, b come from L2. The extension draw runs only
# in programs where some radius word is 0 (about one program in 2^22 at BLOCK_Q = 256).
# ----------------------------------------------------------------------------------------------
@triton.jit
def _noise_kernel(X, ROW_SRC, ROW_SAMPLE, IDS, A, B, OUT, sigma, seed, c3, E, C, HW, NBLK,
                  BLOCK_Q: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    # one grid axis (2^31 − 1 programs): a second axis would cap blocks or rows at 65535
    pid = tl.program_id(0).to(tl.int64)
    r = pid // NBLK
    blk = pid - r * NBLK
    src = tl.load(ROW_SRC + r)
    sample = tl.load(ROW_SAMPLE + r).to(tl.uint32)
    image = tl.load(IDS + src).to(tl.uint32)
    q = blk * BLOCK_Q + tl.arange(0, BLOCK_Q)          # int64: an image may exceed 2^31 elements
    qc = q.to(tl.uint32)
    zero = tl.zeros((BLOCK_Q,), dtype=tl.uint32)
    c3u = c3.to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, qc, zero + sample, zero + image, zero + c3u)
    la = _log_radius_word(w0)
    lb = _log_radius_word(w2)
    rare = (w0 == 0) | (w2 == 0)
    if tl.sum(rare.to(tl.int32), axis=0) > 0:
        v0, v1, v2, v3 = tl.philox(seed, qc, zero + sample, zero + image, zero + (c3u | 1))
        la = tl.where(w0 == 0, _log_pos(_unit(v0, 5.421010862427522e-20)), la)
        lb = tl.where(w2 == 0, _log_pos(_unit(v1, 5.421010862427522e-20)), lb)
    ra = tl.sqrt(-2.0 * la)
    rb = tl.sqrt(-2.0 * lb)
    ca, sa = _sincos_turns(_unit(w1, 2.3283064365386963e-10))
    cb, sb = _sincos_turns(_unit(w3, 2.3283064365386963e-10))
    # (BLOCK_Q, 2 pairs, 2 coordinates) -> 4·BLOCK_Q elements in the order z0 z1 z2 z3 per quad
    za = tl.join(ra * ca, ra * sa)
    zb = tl.join(rb * cb, rb * sb)
    z = tl.reshape(tl.permute(tl.join(za, zb), (0, 2, 1)), (4 * BLOCK_Q,))
    e = blk * (4 * BLOCK_Q) + tl.arange(0, 4 * BLOCK_Q).to(tl.int64)
    emask = e < E
    c = e // HW
    a = tl.load(A + c, mask=emask, other=1.0)
    bb = tl.load(B + c, mask=emask, other=0.0)
    xv = tl.load(X + src * E + e, mask=emask, other=0.0)
    y = a * xv + (a * sigma) * z + bb
    row = OUT + r * E
    if CHANNELS_LAST:
        dst = row + (e - c * HW) * C + c
    else:
        dst = row + e
    tl.store(dst, y.to(OUT.dtype.element_ty), mask=emask)


def _block_q(nq: int) -> int:
    # 256 quads (1024 elements) per program on the GPU; under the interpreter (~1 ms a program)
    # one program covers the whole image when it is small
    if interpreting():
        return max(16, min(1024, triton.next_power_of_2(nq)))
    return 256 if nq >= 256 else max(16, triton.next_power_of_2(nq))


def gaussian_noise(x, row_src, row_sample, image_ids, a, b, sigma, seed, stream, C, HW,
                   channels_last, out):
    E = x.shape[1]
    R = row_src.shape[0]
    nq = (E + 3) // 4
    bq = _block_q(nq)
    nblk = triton.cdiv(nq, bq)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _noise_kernel[(R * nblk,)](x, row_src, row_sample, image_ids, a, b, out, float(sigma), int(seed),
                                   (2 * int(stream)) & 0xFFFFFFFF, E, C, HW, nblk,
                                   BLOCK_Q=bq, CHANNELS_LAST=bool(channels_last), num_warps=4)
    return out



# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile cases (tests/test_triton_compile.py): the launches of the GPU path.
# ----------------------------------------------------------------------------------------------
def _compile_case(out_dtype: torch.dtype, channels_last: bool) -> tuple:
    # E, HW and NBLK as i32: what images below 2^31 elements (every bench and common size) launch;
    # larger ones get Triton's i64 specialization (the offsets are int64 either way, through the
    # int64 program id)
    sig = dict(X="*fp32", ROW_SRC="*i64", ROW_SAMPLE="*i64", IDS="*i64", A="*fp32", B="*fp32",
               OUT="*" + _TL_NAME[out_dtype], sigma="fp32", seed="i64", c3="i32", E="i32",
               C="i32", HW="i32", NBLK="i32", BLOCK_Q="constexpr", CHANNELS_LAST="constexpr")
    const = dict(BLOCK_Q=256, CHANNELS_LAST=channels_last)
    aligned = [k for k, v in sig.items() if v.startswith("*")]
    return (_noise_kernel, sig, const, dict(num_warps=4), aligned)


COMPILE_CASES = [
    _compile_case(torch.bfloat16, False),
    _compile_case(torch.float32, False),
    _compile_case(torch.float16, True),
]

__all__ = ["gaussian_noise", "COMPILE_CASES"]
