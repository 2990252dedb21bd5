"""Triton backend of the homologous contrastive loss (pyssl.homologous_contrastive_loss).

Entry points (z (B, L, E) contiguous float32/bfloat16/float16, groups (B, L) int64, any L and E):

    forward(z, groups, temperature, eps) -> (rows (B, L) float32, lse (B, L) float32, inv_norm (B, L))
    backward(z, groups, temperature, lse, inv_norm, u, npos) -> dz

With ẑ_i = z_i·inv_i (inv_i = 1/max(‖z_i‖, eps), computed beforehand in PyTorch) and
s_ij = ẑ_i·ẑ_j/τ over the tokens with group id ≥ 0: lse_i over the other valid tokens A(i),
ℓ_i = lse_i − mean of s_ij over i's group P(i) (0 without positives). Backward from u_i = ∂L/∂ℓ_i:
G_ij = u_i (exp(s_ij − lse_i) − [j ∈ P(i)]/|P(i)|) on A(i), ∂L/∂ẑ_i = (1/τ) Σ_j (G_ij + G_ji) ẑ_j.
s is symmetric, so a block of rows forms G_ji for its own rows from the per-token lse, u and |P|
of the columns: no atomics, no transpose pass, no second kernel over key blocks.

Kernels (FlashAttention-style: a program is BLOCK_M rows of one sample and walks the sample's
columns in BLOCK_N tiles, so L has no limit and nothing of size L·L exists anywhere):
    _hcl_fwd_kernel   per column tile: raw z_i·z_j by BLOCK_E chunks with tl.dot (the operands are
                      rows addressed by index, scaled by inv_i·inv_j/τ after the dot, so 16-bit z
                      is never rounded after normalization), then the masked online log-sum-exp
                      over A(i) and the sum and count over P(i). Registers: the BLOCK_M × BLOCK_N
                      score tile and three BLOCK_M vectors.
    _hcl_bwd_kernel   grid (sample, row block, E slice): recomputes each score tile, forms
                      M = (G + Gᵀ)/τ in registers and accumulates dẑ = M·Ẑ for its
                      E_SPLIT columns of E (BLOCK_M × E_SPLIT float32 accumulator; M·inv_j and
                      the raw z_j tile are float32 operands, multiplied in TF32 for 16-bit z, in
                      which 16-bit values are exact; float32 z follows torch's float32 matmul
                      precision: "ieee" unless TF32 is allowed, _tiles.dot_options). With one slice (E ≤ E_SPLIT) the normalization's
                      backward dz = (dẑ − ẑ(ẑ·dẑ))·inv is applied in registers and dz written once;
                      with several, each slice recomputes the scores (E/E_SPLIT times the score
                      FLOPs) and the normalization runs afterwards in PyTorch on the float32 dẑ.
Memory traffic: per program, the sample's L·E inputs once per column sweep (twice in the
backward: scores and M·Z), from L2 at these sizes; outputs written once.
Interpreter: DOT_FP32 runs every dot in float32 (the interpreter's bf16 arithmetic is wrong).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyssl.kernels._tiles import dot_options, dot_rows_tile, on_tensor_device, pow2

_TL_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@triton.jit
def _score_tile(Z, G, INV, zb, gb, L, E, rows, rmask, gi, rs_i, n0,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Scores of the rows against columns [n0, n0 + BLOCK_N) of the sample in base 2,
    s·log2(e) = ẑ_i·ẑ_j/τ·log2(e) (rs_i = inv_i/τ·log2(e) per row: two multiplies per score,
    and exp2 is the hardware's exponential), the A(i) and P(i) masks, and the columns' ids and
    inverse norms (|INV|: a negative entry marks a clamped norm)."""
    cols = n0 + tl.arange(0, BLOCK_N)
    cmask = cols < L
    gj = tl.load(G + gb + cols, mask=cmask, other=-1)
    inv_j = tl.abs(tl.load(INV + gb + cols, mask=cmask, other=0.0))
    raw = dot_rows_tile(Z + zb, Z + zb, rows, cols, rmask, cmask, E, E, E,
                        BLOCK_M, BLOCK_N, BLOCK_E, DOT_FP32, DOT_PRECISION)
    s = raw * rs_i[:, None] * inv_j[None, :]
    other = (gi[:, None] >= 0) & (gj[None, :] >= 0) & (rows[:, None] != cols[None, :])
    pos = other & (gi[:, None] == gj[None, :])
    return s, other, pos, cols, cmask, inv_j


@triton.jit
def _hcl_fwd_kernel(Z, G, INV, ROWS, LSE, inv_t, L, E,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    b = tl.program_id(0)                      # samples on axis 0 (axis 1 stops at 65535)
    zb = b.to(tl.int64) * L * E
    gb = b.to(tl.int64) * L
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < L
    gi = tl.load(G + gb + rows, mask=rmask, other=-1)
    rs_i = tl.abs(tl.load(INV + gb + rows, mask=rmask, other=0.0)) * (inv_t * 1.4426950408889634)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    den = tl.zeros((BLOCK_M,), tl.float32)
    psum = tl.zeros((BLOCK_M,), tl.float32)
    npos = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, L, BLOCK_N):
        s, other, pos, cols, cmask, inv_j = _score_tile(Z, G, INV, zb, gb, L, E, rows, rmask, gi, rs_i, n0,
                                                        BLOCK_M, BLOCK_N, BLOCK_E, DOT_FP32, DOT_PRECISION)
        m_new = tl.maximum(m, tl.max(tl.where(other, s, float("-inf")), axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)     # no valid column yet: keep den 0
        # exponents clamped at 0: the excluded entries (the diagonal at 1/τ, padding) would overflow
        # to inf before the select drops them; the kept ones are at most the running max anyway
        den = den * tl.exp2(m - m_safe) + tl.sum(tl.where(other, tl.exp2(tl.minimum(s - m_safe[:, None], 0.0)), 0.0),
                                                 axis=1)
        m = m_new
        psum += tl.sum(tl.where(pos, s, 0.0), axis=1)
        npos += tl.sum(pos.to(tl.float32), axis=1)
    has_other = m != float("-inf")
    # back to natural units: m and psum are in base 2
    lse = tl.where(has_other, (m + tl.log2(tl.where(has_other, den, 1.0))) * 0.6931471805599453, 0.0)
    row = tl.where(npos > 0, lse - psum * 0.6931471805599453 / tl.maximum(npos, 1.0), 0.0)
    tl.store(ROWS + gb + rows, row, mask=rmask)
    tl.store(LSE + gb + rows, lse, mask=rmask)


@triton.jit
def _hcl_bwd_kernel(Z, G, INV, LSE, U, NPOS, DZ, inv_t, L, E,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                    E_SPLIT: tl.constexpr, ONE_SPLIT: tl.constexpr,
                    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    b = tl.program_id(0)
    zb = b.to(tl.int64) * L * E
    gb = b.to(tl.int64) * L
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < L
    ee = tl.program_id(2) * E_SPLIT + tl.arange(0, E_SPLIT)
    emask = ee < E
    gi = tl.load(G + gb + rows, mask=rmask, other=-1)
    inv_raw = tl.load(INV + gb + rows, mask=rmask, other=0.0)
    inv_i = tl.abs(inv_raw)
    rs_i = inv_i * (inv_t * 1.4426950408889634)
    lse_i = tl.load(LSE + gb + rows, mask=rmask, other=0.0) * 1.4426950408889634     # base 2, as s
    u_i = tl.load(U + gb + rows, mask=rmask, other=0.0)
    np_i = tl.load(NPOS + gb + rows, mask=rmask, other=0.0)
    w_i = tl.where(np_i > 0, 1.0 / tl.maximum(np_i, 1.0), 0.0)
    acc = tl.zeros((BLOCK_M, E_SPLIT), tl.float32)
    for n0 in range(0, L, BLOCK_N):
        s, other, pos, cols, cmask, inv_j = _score_tile(Z, G, INV, zb, gb, L, E, rows, rmask, gi, rs_i, n0,
                                                        BLOCK_M, BLOCK_N, BLOCK_E, DOT_FP32, DOT_PRECISION)
        lse_j = tl.load(LSE + gb + cols, mask=cmask, other=0.0) * 1.4426950408889634
        u_j = tl.load(U + gb + cols, mask=cmask, other=0.0)
        np_j = tl.load(NPOS + gb + cols, mask=cmask, other=0.0)
        w_j = tl.where(np_j > 0, 1.0 / tl.maximum(np_j, 1.0), 0.0)
        # s <= lse of both its row and its column for every pair kept below: exponents clamped at
        # 0 so the excluded ones (the diagonal, padding) give no inf (0·inf = NaN before the select)
        g = (u_i[:, None] * (tl.exp2(tl.minimum(s - lse_i[:, None], 0.0)) - tl.where(pos, w_i[:, None], 0.0))
             + u_j[None, :] * (tl.exp2(tl.minimum(s - lse_j[None, :], 0.0)) - tl.where(pos, w_j[None, :], 0.0)))
        # M·ẑ_j = (M·inv_j)·z_j with the raw z_j as the operand, both in float32 and multiplied
        # in TF32 for 16-bit z (float32: torch's float32 matmul precision). A 16-bit z_j is exact in TF32, so the only
        # rounding is M·inv_j's (relative 2^-11, nearly all of it radial and removed by the
        # normalization below); rounding ẑ_j itself to 16 bits instead costs up to ~15% of dz on
        # near-parallel tokens (the radial parts cancel, the rounding noise does not), and M in
        # float16 overflows at large loss scales (|M| ~ |u|/τ). float32 M·inv_j cannot overflow
        # (inv_j ≤ 1/eps = 1e12).
        mm = tl.where(other, g * (inv_t * inv_j[None, :]), 0.0)
        zj = tl.load(Z + zb + cols.to(tl.int64)[:, None] * E + ee[None, :], mask=cmask[:, None] & emask[None, :],
                     other=0.0).to(tl.float32)
        acc = tl.dot(mm, zj, acc, input_precision=DOT_PRECISION)
    msk = rmask[:, None] & emask[None, :]
    ri = rows.to(tl.int64)[:, None] * E + ee[None, :]
    if ONE_SPLIT:
        # through the normalization: dz = (dẑ − ẑ (ẑ·dẑ))·inv (inv < 0 marks a norm clamped at
        # eps: then ẑ = z/eps and dz = dẑ/eps)
        zi = tl.load(Z + zb + ri, mask=msk, other=0.0).to(tl.float32) * inv_i[:, None]
        dot = tl.sum(acc * zi, axis=1)
        acc = tl.where((inv_raw < 0)[:, None], acc, acc - zi * dot[:, None]) * inv_i[:, None]
    tl.store(DZ + zb + ri, acc.to(DZ.dtype.element_ty), mask=msk)


def _cfg(L: int, E: int, dtype, backward: bool) -> dict:
    """Tile sizes and warps, spill-free on sm_90 under both Triton versions (chosen with ptxas -v
    over a grid of tiles; each configuration is a compile case in tests/test_triton_compile.py).
    The backward's E_SPLIT (256; float32: 128) keeps projection heads up to that width in one
    slice."""
    fp32 = dtype == torch.float32
    if backward:
        es = min(128 if fp32 else 256, pow2(E))
        cfg = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_E=16 if fp32 else 32, E_SPLIT=es,
                   num_warps=4 if es <= 64 else 8)
    else:
        cfg = dict(BLOCK_M=64, BLOCK_N=32 if fp32 else 64, BLOCK_E=16 if fp32 else 32, num_warps=8)
    cfg["BLOCK_M"] = min(cfg["BLOCK_M"], pow2(L))
    cfg["BLOCK_N"] = min(cfg["BLOCK_N"], pow2(L))
    return cfg


@on_tensor_device
def inv_norms(z: torch.Tensor, eps: float) -> torch.Tensor:
    """1/max(‖z_i‖, eps) per token, negated where the norm is clamped (the backward's marker)."""
    n = z.float().norm(dim=-1)
    inv = 1.0 / n.clamp_min(eps)
    return torch.where(n > eps, inv, -inv).contiguous()


@on_tensor_device
def forward(z, groups, temperature, eps):
    B, L, E = z.shape
    inv = inv_norms(z, eps)
    rows = torch.empty((B, L), dtype=torch.float32, device=z.device)
    lse = torch.empty_like(rows)
    cfg = _cfg(L, E, z.dtype, backward=False)
    _hcl_fwd_kernel[(B, triton.cdiv(L, cfg["BLOCK_M"]))](z, groups, inv, rows, lse, 1.0 / temperature, L, E,
                                                         **cfg, **dot_options(z.dtype))
    return rows, lse, inv


@on_tensor_device
def backward(z, groups, temperature, lse, inv, u, npos):
    B, L, E = z.shape
    cfg = _cfg(L, E, z.dtype, backward=True)
    splits = triton.cdiv(E, cfg["E_SPLIT"])
    one = splits == 1
    dz = torch.empty(z.shape, dtype=z.dtype if one else torch.float32, device=z.device)
    _hcl_bwd_kernel[(B, triton.cdiv(L, cfg["BLOCK_M"]), splits)](
        z, groups, inv, lse, u, npos, dz, 1.0 / temperature, L, E, ONE_SPLIT=one, **cfg, **dot_options(z.dtype))
    if one:
        return dz
    # dẑ of every slice is in dz: the normalization's backward over whole rows
    inv_abs = inv.abs()[..., None]
    zh = z.float() * inv_abs
    dot = (dz * zh).sum(-1, keepdim=True)
    return (torch.where(inv[..., None] < 0, dz, dz - zh * dot) * inv_abs).to(z.dtype)


def _case(kernel, dtype, L, E, prec="ieee"):
    t = "*" + _TL_NAME[dtype]
    bwd = kernel is _hcl_bwd_kernel
    if bwd:
        sig = dict(Z=t, G="*i64", INV="*fp32", LSE="*fp32", U="*fp32", NPOS="*fp32", DZ=t,
                   inv_t="fp32", L="i32", E="i32")
    else:
        sig = dict(Z=t, G="*i64", INV="*fp32", ROWS="*fp32", LSE="*fp32", inv_t="fp32", L="i32", E="i32")
    cfg = _cfg(L, E, dtype, backward=bwd)
    warps = cfg.pop("num_warps")
    const = dict(cfg, **dot_options(dtype, interpret=False, fp32_precision=prec))
    if bwd:
        const["ONE_SPLIT"] = E <= cfg["E_SPLIT"]
        if not const["ONE_SPLIT"]:
            sig["DZ"] = "*fp32"
    sig.update({k: "constexpr" for k in const})
    return (kernel, sig, const, dict(num_warps=warps), [n for n, v in sig.items() if v.startswith("*")])


# ViT lengths (197: partial tiles), long samples, one E slice and several
COMPILE_CASES = [
    _case(_hcl_fwd_kernel, torch.bfloat16, 197, 256),
    _case(_hcl_fwd_kernel, torch.float16, 4096, 768),
    _case(_hcl_fwd_kernel, torch.float32, 197, 128),
    _case(_hcl_fwd_kernel, torch.float32, 4096, 768),
    _case(_hcl_bwd_kernel, torch.bfloat16, 197, 128),
    _case(_hcl_bwd_kernel, torch.bfloat16, 197, 256),
    _case(_hcl_bwd_kernel, torch.bfloat16, 4096, 768),
    _case(_hcl_bwd_kernel, torch.float16, 197, 100),
    _case(_hcl_bwd_kernel, torch.float32, 197, 64),
    _case(_hcl_bwd_kernel, torch.float32, 197, 256),
    _case(_hcl_bwd_kernel, torch.float32, 1024, 768),
    # float32 under torch's TF32 setting (dot_options)
    _case(_hcl_fwd_kernel, torch.float32, 197, 128, prec="tf32"),
    _case(_hcl_bwd_kernel, torch.float32, 197, 256, prec="tf32"),
]

__all__ = ["forward", "backward", "COMPILE_CASES"]
