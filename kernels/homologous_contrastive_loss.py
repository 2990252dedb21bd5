"""Triton backend of the homologous contrastive loss (pyssl.homologous_contrastive_loss).

Entry points (z (B, L, E) contiguous float32/bfloat16/float16, groups (B, L) int64):

    forward(z, groups, temperature) -> (rows (B, L) float32, lse (B, L) float32, inv_norm (B, L))
    backward(z, groups, temperature, lse, inv_norm, grad_rows) -> dz

With ẑ_i = z_i·inv_i (inv_i = 1/max(‖z_i‖, eps), computed beforehand in PyTorch) and
s_ij = ẑ_i·ẑ_j/τ over the tokens with group id ≥ 0: lse_i over the other valid tokens,
ℓ_i = lse_i − mean of s_ij over i's group (0 without positives). Backward from u_i = ∂L/∂ℓ_i:
G_ij = u_i (exp(s_ij − lse_i) − [j ∈ P(i)]/|P(i)|) on the other valid tokens, ∂L/∂ẑ_i =
(1/τ) Σ_j (G_ij + G_ji) ẑ_j (s is symmetric, so a row block needs only the per-token lse, u and
|P| of every column — no atomics, no transpose pass), then through the normalization.

Kernels (each program: one sample's BLOCK_M rows against its whole row of L_PAD tokens):
    _hcl_fwd_kernel   scores by E chunks with tl.dot, fused masked row LSE and group mean
    _hcl_bwd_kernel   recomputes the scores, forms (G + Gᵀ)/τ in registers, multiplies by Ẑ
                      chunk by chunk (dẑ written, then re-read once for the normalization)
Registers: the BLOCK_M × L_PAD score tile (fp32); z chunks stream through shared memory as dot
operands. Never a B·L·L tensor. L ≤ max_l(dtype): 256 for 16-bit inputs, 128 for float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyssl.kernels._tiles import dot_options, pow2

MAX_L = 256          # 16-bit inputs; float32 fits up to 128 (max_l)
_TL_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@triton.jit
def _scores(Z, INV, zb, b, L, E, rows, cols, rmask, cmask, inv_t,
            BLOCK_M: tl.constexpr, L_PAD: tl.constexpr, BLOCK_E: tl.constexpr,
            DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    acc = tl.zeros((BLOCK_M, L_PAD), tl.float32)
    for e0 in range(0, E, BLOCK_E):
        ee = e0 + tl.arange(0, BLOCK_E)
        emask = ee < E
        zi = tl.load(Z + zb + rows[:, None] * E + ee[None, :], mask=rmask[:, None] & emask[None, :], other=0.0)
        zjt = tl.load(Z + zb + cols[None, :] * E + ee[:, None], mask=emask[:, None] & cmask[None, :], other=0.0)
        if DOT_FP32:
            zi = zi.to(tl.float32)
            zjt = zjt.to(tl.float32)
        acc = tl.dot(zi, zjt, acc, input_precision=DOT_PRECISION)
    # |INV|: a negative entry only marks a norm clamped at eps
    inv_i = tl.abs(tl.load(INV + b * L + rows, mask=rmask, other=0.0))
    inv_j = tl.abs(tl.load(INV + b * L + cols, mask=cmask, other=0.0))
    return acc * inv_i[:, None] * inv_j[None, :] * inv_t


@triton.jit
def _tile(Z, G, INV, L, E, inv_t, BLOCK_M: tl.constexpr, L_PAD: tl.constexpr, BLOCK_E: tl.constexpr,
          DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The program's rows against its sample's columns: the sample b (grid axis 0: axis 1 stops
    at 65535), its offset in Z, the scores and the A(i) / P(i) masks."""
    b = tl.program_id(0)
    zb = b.to(tl.int64) * L * E
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, L_PAD)
    rmask = rows < L
    cmask = cols < L
    gi = tl.load(G + b * L + rows, mask=rmask, other=-1)
    gj = tl.load(G + b * L + cols, mask=cmask, other=-1)
    s = _scores(Z, INV, zb, b, L, E, rows, cols, rmask, cmask, inv_t, BLOCK_M, L_PAD, BLOCK_E, DOT_FP32, DOT_PRECISION)
    other = (gi[:, None] >= 0) & (gj[None, :] >= 0) & (rows[:, None] != cols[None, :])
    pos = other & (gi[:, None] == gj[None, :])
    return b, zb, rows, cols, rmask, cmask, s, other, pos


@triton.jit
def _hcl_fwd_kernel(Z, G, INV, ROWS, LSE, inv_t, L, E,
                    BLOCK_M: tl.constexpr, L_PAD: tl.constexpr, BLOCK_E: tl.constexpr,
                    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    b, zb, rows, cols, rmask, cmask, s, other, pos = _tile(Z, G, INV, L, E, inv_t, BLOCK_M, L_PAD, BLOCK_E,
                                                           DOT_FP32, DOT_PRECISION)
    m = tl.max(tl.where(other, s, float("-inf")), axis=1)
    has_other = m != float("-inf")
    m_safe = tl.where(has_other, m, 0.0)
    den = tl.sum(tl.where(other, tl.exp(s - m_safe[:, None]), 0.0), axis=1)
    lse = tl.where(has_other, m_safe + tl.log(tl.where(has_other, den, 1.0)), 0.0)
    npos = tl.sum(pos.to(tl.float32), axis=1)
    mean_pos = tl.sum(tl.where(pos, s, 0.0), axis=1) / tl.maximum(npos, 1.0)
    row = tl.where(npos > 0, lse - mean_pos, 0.0)
    tl.store(ROWS + b * L + rows, row, mask=rmask)
    tl.store(LSE + b * L + rows, lse, mask=rmask)


@triton.jit
def _hcl_bwd_kernel(Z, G, INV, LSE, U, NPOS, DZ, inv_t, L, E,
                    BLOCK_M: tl.constexpr, L_PAD: tl.constexpr, BLOCK_E: tl.constexpr,
                    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    b, zb, rows, cols, rmask, cmask, s, other, pos = _tile(Z, G, INV, L, E, inv_t, BLOCK_M, L_PAD, BLOCK_E,
                                                           DOT_FP32, DOT_PRECISION)
    lse_i = tl.load(LSE + b * L + rows, mask=rmask, other=0.0)
    lse_j = tl.load(LSE + b * L + cols, mask=cmask, other=0.0)
    u_i = tl.load(U + b * L + rows, mask=rmask, other=0.0)
    u_j = tl.load(U + b * L + cols, mask=cmask, other=0.0)
    np_i = tl.load(NPOS + b * L + rows, mask=rmask, other=0.0)
    np_j = tl.load(NPOS + b * L + cols, mask=cmask, other=0.0)
    w_i = tl.where(np_i > 0, 1.0 / tl.maximum(np_i, 1.0), 0.0)
    w_j = tl.where(np_j > 0, 1.0 / tl.maximum(np_j, 1.0), 0.0)
    g_ij = u_i[:, None] * (tl.exp(s - lse_i[:, None]) - tl.where(pos, w_i[:, None], 0.0))
    g_ji = u_j[None, :] * (tl.exp(s - lse_j[None, :]) - tl.where(pos, w_j[None, :], 0.0))
    mm = tl.where(other, (g_ij + g_ji) * inv_t, 0.0)
    inv_raw = tl.load(INV + b * L + rows, mask=rmask, other=0.0)
    clamped = inv_raw < 0
    inv_i = tl.abs(inv_raw)
    inv_j = tl.abs(tl.load(INV + b * L + cols, mask=cmask, other=0.0))
    # dẑ_i = Σ_j M_ij ẑ_j by E chunks, written to DZ; dot_i = ẑ_i·dẑ_i accumulated on the way
    dot = tl.zeros((BLOCK_M,), tl.float32)
    for e0 in range(0, E, BLOCK_E):
        ee = e0 + tl.arange(0, BLOCK_E)
        emask = ee < E
        zj = tl.load(Z + zb + cols[:, None] * E + ee[None, :], mask=cmask[:, None] & emask[None, :], other=0.0)
        zi = tl.load(Z + zb + rows[:, None] * E + ee[None, :], mask=rmask[:, None] & emask[None, :], other=0.0)
        zj = zj.to(tl.float32) * inv_j[:, None]
        zi = zi.to(tl.float32) * inv_i[:, None]
        dzn = tl.dot(mm, zj, input_precision="ieee")   # float32 operands: no TF32 rounding
        dot += tl.sum(dzn * zi, axis=1)
        tl.store(DZ + zb + rows[:, None] * E + ee[None, :], dzn.to(DZ.dtype.element_ty), mask=rmask[:, None] & emask[None, :])
    # through the normalization: dz = (dẑ − ẑ (ẑ·dẑ))·inv  (inv < 0 marks a norm clamped at eps:
    # then ẑ = z/eps and dz = dẑ/eps)
    for e0 in range(0, E, BLOCK_E):
        ee = e0 + tl.arange(0, BLOCK_E)
        emask = ee < E
        msk = rmask[:, None] & emask[None, :]
        dzn = tl.load(DZ + zb + rows[:, None] * E + ee[None, :], mask=msk, other=0.0).to(tl.float32)
        zi = tl.load(Z + zb + rows[:, None] * E + ee[None, :], mask=msk, other=0.0).to(tl.float32) * inv_i[:, None]
        dz = tl.where(clamped[:, None], dzn, dzn - zi * dot[:, None]) * inv_i[:, None]
        tl.store(DZ + zb + rows[:, None] * E + ee[None, :], dz.to(DZ.dtype.element_ty), mask=msk)


def max_l(dtype) -> int:
    """Longest sample the kernels hold on chip without register spills on sm_90."""
    return 128 if dtype == torch.float32 else MAX_L


def _cfg(L: int, E: int, backward: bool, dtype=torch.bfloat16):
    """(L_PAD, BLOCK_E, num_warps), spill-free on sm_90 (chosen with ptxas -v; checked by
    tests/test_triton_compile.py): the backward holds two BLOCK_M × L_PAD float32 tiles and a
    float32 Ẑ chunk, so 256-token rows take 16 warps and float32 takes 16-wide E chunks."""
    lp = pow2(L, lo=16)
    if dtype == torch.float32:
        be = 16 if backward else 32
    else:
        be = 32
    warps = 16 if (backward and lp > 128) else 8
    return lp, min(be, pow2(E, lo=16)), warps


def inv_norms(z: torch.Tensor, eps: float) -> torch.Tensor:
    """1/max(‖z_i‖, eps) per token, negated where the norm is clamped (the backward's marker)."""
    n = z.float().norm(dim=-1)
    inv = 1.0 / n.clamp_min(eps)
    return torch.where(n > eps, inv, -inv).contiguous()


def forward(z, groups, temperature, eps):
    B, L, E = z.shape
    inv = inv_norms(z, eps)
    rows = torch.empty((B, L), dtype=torch.float32, device=z.device)
    lse = torch.empty_like(rows)
    lp, be, warps = _cfg(L, E, backward=False, dtype=z.dtype)
    bm = 16
    _hcl_fwd_kernel[(B, triton.cdiv(L, bm))](z, groups, inv, rows, lse, 1.0 / temperature, L, E,
                                             BLOCK_M=bm, L_PAD=lp, BLOCK_E=be, num_warps=warps, **dot_options(z.dtype))
    return rows, lse, inv


def backward(z, groups, temperature, lse, inv, grad_rows, npos):
    B, L, E = z.shape
    dz = torch.empty_like(z) if z.dtype == torch.float32 else torch.empty(z.shape, dtype=torch.float32, device=z.device)
    lp, be, warps = _cfg(L, E, backward=True, dtype=z.dtype)
    bm = 16
    _hcl_bwd_kernel[(B, triton.cdiv(L, bm))](z, groups, inv, lse, grad_rows.float().contiguous(), npos, dz,
                                             1.0 / temperature, L, E, BLOCK_M=bm, L_PAD=lp, BLOCK_E=be,
                                             num_warps=warps, **dot_options(z.dtype))
    return dz.to(z.dtype)


def _case(kernel, dtype, L, E=768):
    t = "*" + _TL_NAME[dtype]
    if kernel is _hcl_fwd_kernel:
        sig = dict(Z=t, G="*i64", INV="*fp32", ROWS="*fp32", LSE="*fp32", inv_t="fp32", L="i32", E="i32")
    else:
        sig = dict(Z=t, G="*i64", INV="*fp32", LSE="*fp32", U="*fp32", NPOS="*fp32", DZ="*fp32",
                   inv_t="fp32", L="i32", E="i32")
    sig.update(BLOCK_M="constexpr", L_PAD="constexpr", BLOCK_E="constexpr", DOT_FP32="constexpr",
               DOT_PRECISION="constexpr")
    lp, be, warps = _cfg(L, E, backward=kernel is _hcl_bwd_kernel, dtype=dtype)
    const = dict(BLOCK_M=16, L_PAD=lp, BLOCK_E=be, **dot_options(dtype, interpret=False))
    return (kernel, sig, const, dict(num_warps=warps), [n for n, v in sig.items() if v.startswith("*")])


COMPILE_CASES = [
    _case(_hcl_fwd_kernel, torch.bfloat16, 196),
    _case(_hcl_fwd_kernel, torch.float32, 128),
    _case(_hcl_fwd_kernel, torch.float16, 100),
    _case(_hcl_bwd_kernel, torch.bfloat16, 196),
    _case(_hcl_bwd_kernel, torch.float16, 100),
    _case(_hcl_bwd_kernel, torch.float32, 128),
]

__all__ = ["forward", "backward", "max_l", "MAX_L", "COMPILE_CASES"]
