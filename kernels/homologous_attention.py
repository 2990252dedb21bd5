"""Triton backend of homologous-patch attention (pyssl.homologous_attention).

Entry points (q, k, v contiguous (B, H, L, D), float32/bfloat16/float16; groups (B, L) int64 or
None; per-row statistics in float32 and indexed by the original token position):

    forward(q, k, v, groups, topk, scale) -> (out, lse (B, H, L), bits, perm)
    backward(q, k, v, out, dout, lse, groups, bits, perm, topk, scale) -> (dq, dk, dv)

Group mode (topk = 0). Tokens are sorted by group id once per call (perm (B, L): sorted position
-> token, global tokens first); the forward returns perm and the backward reuses it. Tiles are
rows of the sorted order, loaded by index (no permuted copy of q, k, v), written back at the
original positions (no un-permute pass). Per (batch, tile) the smallest and largest group id
of the tile are tabulated; a query tile visits a key tile only when their group ranges overlap
or either holds a global token, so the off-diagonal tiles of the block-diagonal pattern are
skipped. Inside a visited tile the mask comes from the group ids of its rows and columns.

Top-k mode (topk = K > 0). A program holds whole score rows (BLOCK_M × L_PAD, L_PAD = next power
of two of L, at most max_topk_l(dtype): 512 for 16-bit inputs, 128 for float32): scores are keyed as (order-preserving int32 of the float32
score) << 32 | (2^31 − 1 − key index), so one int64 order ranks by score and puts the lower
index first among ties; tl.sort gives the K-th largest key per row, the kept set is the allowed
keys at or above it, saved as a bitmask (B, H, L, ceil(L/8)) uint8 (bit j % 8 of byte j // 8 is
key j) for the backward, which never re-ranks. perm is the identity there.

Backward (both modes): FlashAttention-2's split into two atomic-free kernels: dK/dV by key tiles
(looping over query tiles) and dQ by query tiles (looping over key tiles), both recomputing P
from the saved log-sum-exp, with the same tile skipping in group mode and the bitmask in top-k
mode. delta = rowsum(dO ∘ O) is computed beforehand in PyTorch.

Interpreter notes: loads are converted to float32 (DOT_FP32) because the interpreter does bf16
arithmetic wrongly; on the GPU 16-bit operands go to tensor cores with fp32 accumulation and fp32
inputs use input_precision="ieee".
"""
from __future__ import annotations

import os
from typing import List

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pyssl.kernels._tiles import dot_options, interpreting, pow2

MAX_TOPK_L = 512          # 16-bit inputs; float32 rows (FMA dots, 32-bit keys) fit up to 128


def max_topk_l(dtype) -> int:
    """Longest row the top-k kernel holds on chip without register spills (checked on sm_90)."""
    return 128 if dtype == torch.float32 else MAX_TOPK_L
_TL_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_BIG = tl.constexpr(1 << 62)


@triton.jit
def _group_mask(gq, gk):
    return (gq[:, None] == gk[None, :]) | (gq[:, None] < 0) | (gk[None, :] < 0)


@triton.jit
def _visit(TMIN, TMAX, b, t, NT, lo, hi, SKIP: tl.constexpr):
    """Whether the tile t of batch b can hold an allowed pair with group range [lo, hi]
    (always, without SKIP)."""
    if SKIP:
        kmin = tl.load(TMIN + b * NT + t)
        kmax = tl.load(TMAX + b * NT + t)
        return (lo < 0) | (kmin < 0) | ((kmin <= hi) & (kmax >= lo))
    else:
        return t >= 0


# ----------------------------------------------------------------------------------------------
# _attn_fwd_kernel: program (query tile of BLOCK sorted rows, batch·head). Registers: the q tile
# (BLOCK × BLOCK_D), the output accumulator (BLOCK × BLOCK_D, fp32), running max and sum per row;
# k and v tiles of BLOCK rows stream through (shared memory as tl.dot operands). Traffic: q, out
# once; k, v once per visited tile; the skipped tiles cost two scalar loads.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, PERM, GS, TMIN, TMAX, scale, L, H, NT,
                     HAS_GROUPS: tl.constexpr, SKIP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    bh = tl.program_id(0)          # batch·head on axis 0 (up to 2^31 − 1; axis 1 stops at 65535)
    pid_m = tl.program_id(1)
    b = bh // H
    base = bh.to(tl.int64) * L * D
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    mmask = offs_m < L
    rows = tl.load(PERM + b * L + offs_m, mask=mmask, other=0)
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    q = tl.load(Q + base + rows[:, None] * D + dd[None, :], mask=mmask[:, None] & dmask[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    lo = tl.full((), 0, tl.int64)
    hi = tl.full((), 0, tl.int64)
    gq = offs_m.to(tl.int64)
    if HAS_GROUPS:
        gq = tl.load(GS + b * L + offs_m, mask=mmask, other=0)
        lo = tl.min(tl.where(mmask, gq, _BIG), axis=0)
        hi = tl.max(tl.where(mmask, gq, -_BIG), axis=0)
    m_i = tl.full((BLOCK,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK,), tl.float32)
    acc = tl.zeros((BLOCK, BLOCK_D), tl.float32)
    for t in range(0, NT):
        if _visit(TMIN, TMAX, b, t, NT, lo, hi, SKIP):
            offs_n = t * BLOCK + tl.arange(0, BLOCK)
            nmask = offs_n < L
            cols = tl.load(PERM + b * L + offs_n, mask=nmask, other=0)
            kt = tl.load(K + base + cols[None, :] * D + dd[:, None], mask=dmask[:, None] & nmask[None, :], other=0.0)
            vv = tl.load(V + base + cols[:, None] * D + dd[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
            if DOT_FP32:
                kt = kt.to(tl.float32)
                vv = vv.to(tl.float32)
            s = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale
            ok = mmask[:, None] & nmask[None, :]
            if HAS_GROUPS:
                gk = tl.load(GS + b * L + offs_n, mask=nmask, other=0)
                ok = ok & _group_mask(gq, gk)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision=DOT_PRECISION)
            m_i = m_new
    live = l_i > 0
    out = acc / tl.where(live, l_i, 1.0)[:, None]
    lse = tl.where(live, m_i + tl.log(tl.where(live, l_i, 1.0)), float("-inf"))
    tl.store(O + base + rows[:, None] * D + dd[None, :], out.to(O.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])
    tl.store(LSE + bh.to(tl.int64) * L + rows, lse, mask=mmask)


# ----------------------------------------------------------------------------------------------
# _attn_topk_fwd_kernel: program (BLOCK_M query rows in token order, batch·head) holding whole
# rows: the score tile (BLOCK_M × L_PAD, fp32) and its int64 keys in registers, k and v of the
# whole (batch, head) through shared memory. Traffic: q, out, the bitmask once; k, v once per
# program (L/BLOCK_M times per head, from L2).
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attn_topk_fwd_kernel(Q, K, V, O, LSE, BITS, G, scale, L, H, NB, KTH,
                          HAS_GROUPS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_M: tl.constexpr, L_PAD: tl.constexpr, DOT_FP32: tl.constexpr,
                          DOT_PRECISION: tl.constexpr):
    bh = tl.program_id(0)          # batch·head on axis 0 (up to 2^31 − 1; axis 1 stops at 65535)
    pid_m = tl.program_id(1)
    b = bh // H
    base = bh.to(tl.int64) * L * D
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = rows < L
    cols = tl.arange(0, L_PAD)
    nmask = cols < L
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    q = tl.load(Q + base + rows[:, None] * D + dd[None, :], mask=mmask[:, None] & dmask[None, :], other=0.0)
    kt = tl.load(K + base + cols[None, :] * D + dd[:, None], mask=dmask[:, None] & nmask[None, :], other=0.0)
    vv = tl.load(V + base + cols[:, None] * D + dd[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
        kt = kt.to(tl.float32)
        vv = vv.to(tl.float32)
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale + 0.0    # + 0.0: −0.0 ties +0.0
    allowed = mmask[:, None] & nmask[None, :]
    if HAS_GROUPS:
        gq = tl.load(G + b * L + rows, mask=mmask, other=0)
        gk = tl.load(G + b * L + cols, mask=nmask, other=0)
        allowed = allowed & _group_mask(gq, gk)
    sb = s.to(tl.int32, bitcast=True)
    flip = sb ^ ((sb >> 31) & 0x7FFFFFFF)
    key = (flip.to(tl.int64) << 32) | (0x7FFFFFFF - cols).to(tl.int64)[None, :]
    key = tl.where(allowed, key, -9223372036854775807 - 1)
    ordered = tl.sort(key, dim=1, descending=True)
    thr = tl.sum(tl.where(cols[None, :] == KTH, ordered, 0), axis=1)
    kept = allowed & (key >= thr[:, None])
    s = tl.where(kept, s, float("-inf"))
    m = tl.max(s, axis=1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    p = tl.exp(s - m_safe[:, None])
    den = tl.sum(p, axis=1)
    live = den > 0
    p = p / tl.where(live, den, 1.0)[:, None]
    out = tl.dot(p.to(vv.dtype), vv, input_precision=DOT_PRECISION)
    lse = tl.where(live, m_safe + tl.log(tl.where(live, den, 1.0)), float("-inf"))
    tl.store(O + base + rows[:, None] * D + dd[None, :], out.to(O.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])
    tl.store(LSE + bh.to(tl.int64) * L + rows, lse, mask=mmask)
    # the kept set as bytes: bit j % 8 of byte j // 8
    kb = tl.reshape(kept.to(tl.int32), (BLOCK_M, L_PAD // 8, 8))
    byte = tl.sum(kb << tl.arange(0, 8)[None, None, :], axis=2)
    nb = tl.arange(0, L_PAD // 8)
    tl.store(BITS + (bh.to(tl.int64) * L + rows[:, None]) * NB + nb[None, :], byte.to(tl.uint8),
             mask=mmask[:, None] & (nb[None, :] < NB))


@triton.jit
def _bwd_mask(BITS, GS, bh, b, L, NB, n0, offs_m, offs_n, mmask, nmask,
              HAS_GROUPS: tl.constexpr, USE_BITS: tl.constexpr, BLOCK: tl.constexpr):
    """Allowed (query, key) pairs of the tile whose sorted rows are offs_m and columns offs_n
    (key tile start n0). Top-k mode runs in token order (perm is the identity) and n0 is a
    multiple of 8, so the tile's kept set is one (BLOCK, BLOCK/8) byte tile of the bitmask: one
    load per byte, unpacked in registers (a load per bit costs 8x the addresses, which spilled)."""
    ok = mmask[:, None] & nmask[None, :]
    if USE_BITS:
        jb = n0 // 8 + tl.arange(0, BLOCK // 8)
        byte = tl.load(BITS + (bh.to(tl.int64) * L + offs_m[:, None]) * NB + jb[None, :],
                       mask=mmask[:, None] & (jb[None, :] < NB), other=0)
        bit = (byte.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
        ok = ok & (tl.reshape(bit, (BLOCK, BLOCK)) == 1)
    elif HAS_GROUPS:
        gq = tl.load(GS + b * L + offs_m, mask=mmask, other=0)
        gk = tl.load(GS + b * L + offs_n, mask=nmask, other=0)
        ok = ok & _group_mask(gq, gk)
    return ok


# ----------------------------------------------------------------------------------------------
# _attn_bwd_dkdv_kernel: program (key tile, batch·head). Registers: k, v tiles and the dK, dV
# accumulators (BLOCK × BLOCK_D fp32 each); q, dO tiles stream through. Traffic: k, v, dk, dv
# once; q, dO, lse, delta once per visited query tile.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, PERM, GS, TMIN, TMAX, BITS, scale, L, H, NT, NB,
                          HAS_GROUPS: tl.constexpr, USE_BITS: tl.constexpr, SKIP: tl.constexpr,
                          D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, DOT_FP32: tl.constexpr,
                          DOT_PRECISION: tl.constexpr):
    bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = bh // H
    base = bh.to(tl.int64) * L * D
    offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
    nmask = offs_n < L
    cols = tl.load(PERM + b * L + offs_n, mask=nmask, other=0)
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    kk = tl.load(K + base + cols[:, None] * D + dd[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
    vv = tl.load(V + base + cols[:, None] * D + dd[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
    if DOT_FP32:
        kk = kk.to(tl.float32)
        vv = vv.to(tl.float32)
    lo = tl.full((), 0, tl.int64)
    hi = tl.full((), 0, tl.int64)
    if HAS_GROUPS:
        lo = tl.load(TMIN + b * NT + pid_n)
        hi = tl.load(TMAX + b * NT + pid_n)
    dk = tl.zeros((BLOCK, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK, BLOCK_D), tl.float32)
    for t in range(0, NT):
        if _visit(TMIN, TMAX, b, t, NT, lo, hi, SKIP):
            offs_m = t * BLOCK + tl.arange(0, BLOCK)
            mmask = offs_m < L
            rows = tl.load(PERM + b * L + offs_m, mask=mmask, other=0)
            q = tl.load(Q + base + rows[:, None] * D + dd[None, :], mask=mmask[:, None] & dmask[None, :], other=0.0)
            do = tl.load(DO + base + rows[:, None] * D + dd[None, :], mask=mmask[:, None] & dmask[None, :], other=0.0)
            if DOT_FP32:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(LSE + bh.to(tl.int64) * L + rows, mask=mmask, other=float("-inf"))
            delta = tl.load(DELTA + bh.to(tl.int64) * L + rows, mask=mmask, other=0.0)
            s = tl.dot(q, tl.trans(kk), input_precision=DOT_PRECISION) * scale
            ok = _bwd_mask(BITS, GS, bh, b, L, NB, pid_n * BLOCK, offs_m, offs_n, mmask, nmask, HAS_GROUPS, USE_BITS,
                           BLOCK)
            live = lse != float("-inf")
            ok = ok & live[:, None]
            p = tl.where(ok, tl.exp(s - tl.where(live, lse, 0.0)[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
            dp = tl.dot(do, tl.trans(vv), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    tl.store(DK + base + cols[:, None] * D + dd[None, :], (dk * scale).to(DK.dtype.element_ty), mask=nmask[:, None] & dmask[None, :])
    tl.store(DV + base + cols[:, None] * D + dd[None, :], dv.to(DV.dtype.element_ty), mask=nmask[:, None] & dmask[None, :])


# ----------------------------------------------------------------------------------------------
# _attn_bwd_dq_kernel: program (query tile, batch·head). Registers: q, dO tiles and the dQ
# accumulator; k, v tiles stream through. Traffic: q, dO, dq once; k, v once per visited tile.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, PERM, GS, TMIN, TMAX, BITS, scale, L, H, NT, NB,
                        HAS_GROUPS: tl.constexpr, USE_BITS: tl.constexpr, SKIP: tl.constexpr,
                        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, DOT_FP32: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    bh = tl.program_id(0)          # batch·head on axis 0 (up to 2^31 − 1; axis 1 stops at 65535)
    pid_m = tl.program_id(1)
    b = bh // H
    base = bh.to(tl.int64) * L * D
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    mmask = offs_m < L
    rows = tl.load(PERM + b * L + offs_m, mask=mmask, other=0)
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    q = tl.load(Q + base + rows[:, None] * D + dd[None, :], mask=mmask[:, None] & dmask[None, :], other=0.0)
    do = tl.load(DO + base + rows[:, None] * D + dd[None, :], mask=mmask[:, None] & dmask[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + bh.to(tl.int64) * L + rows, mask=mmask, other=float("-inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * L + rows, mask=mmask, other=0.0)
    live = lse != float("-inf")
    lo = tl.full((), 0, tl.int64)
    hi = tl.full((), 0, tl.int64)
    if HAS_GROUPS:
        lo = tl.load(TMIN + b * NT + pid_m)
        hi = tl.load(TMAX + b * NT + pid_m)
    dq = tl.zeros((BLOCK, BLOCK_D), tl.float32)
    for t in range(0, NT):
        if _visit(TMIN, TMAX, b, t, NT, lo, hi, SKIP):
            offs_n = t * BLOCK + tl.arange(0, BLOCK)
            nmask = offs_n < L
            cols = tl.load(PERM + b * L + offs_n, mask=nmask, other=0)
            kk = tl.load(K + base + cols[:, None] * D + dd[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
            vv = tl.load(V + base + cols[:, None] * D + dd[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
            if DOT_FP32:
                kk = kk.to(tl.float32)
                vv = vv.to(tl.float32)
            s = tl.dot(q, tl.trans(kk), input_precision=DOT_PRECISION) * scale
            ok = _bwd_mask(BITS, GS, bh, b, L, NB, t * BLOCK, offs_m, offs_n, mmask, nmask, HAS_GROUPS, USE_BITS,
                           BLOCK)
            ok = ok & live[:, None]
            p = tl.where(ok, tl.exp(s - tl.where(live, lse, 0.0)[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(vv), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kk.dtype), kk, input_precision=DOT_PRECISION)
    tl.store(DQ + base + rows[:, None] * D + dd[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
def _block(L: int, dtype) -> int:
    # the interpreter (~1 ms a program) takes one tile for short rows and 16-row tiles beyond
    # 32, so that tests cover multi-tile rows and skipped tiles. On the GPU 64-row tiles for
    # 16-bit inputs (tensor cores) and 32 for float32 (FMA dots; 64 spills registers).
    if interpreting():
        return 32 if L <= 32 else 16
    return 32 if dtype == torch.float32 else 64


def _bwd_warps(dtype) -> int:
    # float32 tiles (FMA dots) hold twice the registers of 16-bit ones: with 4 warps the dK/dV
    # kernel spills under Triton 3.6 (the GPU machine's), with 8 it does not under 3.6 or 3.7
    return 8 if dtype == torch.float32 else 4


def _topk_warps(dtype) -> int:
    # whole rows of float32 keys and scores: 16 warps keep the float32 case free of spills
    return 16 if dtype == torch.float32 else 8


def _skip() -> bool:
    """Tile skipping is on unless PYSSL_HOMATTN_NO_SKIP=1 (the benchmark measures what it buys)."""
    return os.environ.get("PYSSL_HOMATTN_NO_SKIP", "0") != "1"


def visited_fraction(groups, L: int, block: int = 64) -> float:
    """Fraction of (query tile, key tile) pairs the group-mode kernels visit after sorting."""
    B = groups.shape[0]
    _, _, tmin, tmax, nt = plan(groups, B, L, block, groups.device)
    lo, hi = tmin[:, :, None], tmax[:, :, None]
    klo, khi = tmin[:, None, :], tmax[:, None, :]
    visit = (lo < 0) | (klo < 0) | ((klo <= hi) & (khi >= lo))
    return float(visit.float().mean())


def plan(groups, B: int, L: int, block: int, device):
    """perm (B, L) int64: sorted position -> token (groups ascending, stable; global first),
    the sorted group ids and each tile's smallest and largest id (B, NT)."""
    nt = triton.cdiv(L, block)
    if groups is None:
        perm = torch.arange(L, device=device, dtype=torch.int64).expand(B, L).contiguous()
        return perm, None, None, None, nt
    perm = torch.sort(groups, dim=1, stable=True).indices.contiguous()
    return (perm,) + tables(groups, perm, B, L, block)


def tables(groups, perm, B, L, block):
    """Sorted ids and tile tables for a permutation (the backward reuses the forward's sort):
    the tiles' smallest and largest ids, the last tile padded with its last id."""
    nt = triton.cdiv(L, block)
    if groups is None:
        return None, None, None, nt
    gs = groups.gather(1, perm)
    pad = nt * block - L
    gp = torch.cat([gs, gs[:, -1:].expand(B, pad)], 1) if pad else gs
    t = gp.view(B, nt, block)
    return gs.contiguous(), t.amin(2).contiguous(), t.amax(2).contiguous(), nt


def forward(q, k, v, groups, topk: int, scale: float):
    B, H, L, D = q.shape
    interp = interpreting()
    out = torch.empty_like(q)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    bd = pow2(D, lo=16)
    dummy = torch.zeros(1, dtype=torch.int64, device=q.device)
    if topk:
        nb = (L + 7) // 8
        bits = torch.empty((B, H, L, nb), dtype=torch.uint8, device=q.device)
        lp = pow2(L, lo=16)
        bm = 16
        grid = (B * H, triton.cdiv(L, bm))
        _attn_topk_fwd_kernel[grid](q, k, v, out, lse, bits, groups if groups is not None else dummy,
                                    float(scale), L, H, nb, min(topk, lp) - 1,
                                    HAS_GROUPS=groups is not None, D=D, BLOCK_D=bd, BLOCK_M=bm, L_PAD=lp,
                                    num_warps=_topk_warps(q.dtype), **dot_options(q.dtype))
        perm = torch.empty(0, dtype=torch.int64, device=q.device)
        return out, lse, bits, perm
    block = _block(L, q.dtype)
    perm, gs, tmin, tmax, nt = plan(groups, B, L, block, q.device)
    grid = (B * H, nt)
    _attn_fwd_kernel[grid](q, k, v, out, lse, perm, gs if gs is not None else dummy,
                           tmin if tmin is not None else dummy, tmax if tmax is not None else dummy,
                           float(scale), L, H, nt, HAS_GROUPS=groups is not None,
                           SKIP=groups is not None and _skip(), D=D, BLOCK_D=bd,
                           BLOCK=block, num_warps=4, num_stages=2, **dot_options(q.dtype))
    return out, lse, torch.empty(0, dtype=torch.uint8, device=q.device), perm


def backward(q, k, v, out, dout, lse, groups, bits, perm, topk: int, scale: float):
    B, H, L, D = q.shape
    interp = interpreting()
    block = _block(L, q.dtype)
    bd = pow2(D, lo=16)
    delta = (dout.float() * out.float()).sum(-1).contiguous()
    dummy = torch.zeros(1, dtype=torch.int64, device=q.device)
    if topk:
        perm = torch.arange(L, device=q.device, dtype=torch.int64).expand(B, L).contiguous()
        gs = tmin = tmax = None
        nt = triton.cdiv(L, block)
        has_groups = False
        nb = bits.shape[-1]
    else:
        gs, tmin, tmax, nt = tables(groups, perm, B, L, block)
        has_groups = groups is not None
        nb = 1
        bits = torch.zeros(1, dtype=torch.uint8, device=q.device)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = dict(HAS_GROUPS=has_groups, USE_BITS=bool(topk), SKIP=has_groups and _skip(), D=D,
                  BLOCK_D=bd, BLOCK=block,
                  num_warps=_bwd_warps(q.dtype), num_stages=2, **dot_options(q.dtype))
    g_args = (perm, gs if gs is not None else dummy, tmin if tmin is not None else dummy,
              tmax if tmax is not None else dummy, bits)
    _attn_bwd_dkdv_kernel[(B * H, nt)](q, k, v, dout, lse, delta, dk, dv, *g_args, float(scale), L, H, nt, nb,
                                       **common)
    _attn_bwd_dq_kernel[(B * H, nt)](q, k, v, dout, lse, delta, dq, *g_args, float(scale), L, H, nt, nb,
                                     **common)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile cases (tests/test_triton_compile.py): the GPU launches at d = 64.
# ----------------------------------------------------------------------------------------------
def _aligned(sig: dict) -> List[str]:
    return [n for n, t in sig.items() if t.startswith("*")]


def _fwd_case(dtype, has_groups):
    t = "*" + _TL_NAME[dtype]
    sig = dict(Q=t, K=t, V=t, O=t, LSE="*fp32", PERM="*i64", GS="*i64", TMIN="*i64", TMAX="*i64",
               scale="fp32", L="i32", H="i32", NT="i32", HAS_GROUPS="constexpr", SKIP="constexpr", D="constexpr",
               BLOCK_D="constexpr", BLOCK="constexpr", DOT_FP32="constexpr", DOT_PRECISION="constexpr")
    const = dict(HAS_GROUPS=has_groups, SKIP=has_groups, D=64, BLOCK_D=64, BLOCK=32 if dtype == torch.float32 else 64,
                 **dot_options(dtype, interpret=False))
    return (_attn_fwd_kernel, sig, const, dict(num_warps=4, num_stages=2), _aligned(sig))


def _topk_case(dtype, l_pad):
    t = "*" + _TL_NAME[dtype]
    sig = dict(Q=t, K=t, V=t, O=t, LSE="*fp32", BITS="*u8", G="*i64", scale="fp32", L="i32", H="i32",
               NB="i32", KTH="i32", HAS_GROUPS="constexpr", D="constexpr", BLOCK_D="constexpr",
               BLOCK_M="constexpr", L_PAD="constexpr", DOT_FP32="constexpr", DOT_PRECISION="constexpr")
    const = dict(HAS_GROUPS=True, D=64, BLOCK_D=64, BLOCK_M=16, L_PAD=l_pad, **dot_options(dtype, interpret=False))
    return (_attn_topk_fwd_kernel, sig, const, dict(num_warps=_topk_warps(dtype)), _aligned(sig))


def _bwd_case(kernel, dtype, use_bits):
    t = "*" + _TL_NAME[dtype]
    names = ["Q", "K", "V", "DO", "LSE", "DELTA"] + (["DK", "DV"] if kernel is _attn_bwd_dkdv_kernel else ["DQ"])
    sig = {n: (t if n in ("Q", "K", "V", "DO", "DK", "DV", "DQ") else "*fp32") for n in names}
    sig.update(PERM="*i64", GS="*i64", TMIN="*i64", TMAX="*i64", BITS="*u8", scale="fp32", L="i32",
               H="i32", NT="i32", NB="i32", HAS_GROUPS="constexpr", USE_BITS="constexpr", SKIP="constexpr",
               D="constexpr",
               BLOCK_D="constexpr", BLOCK="constexpr", DOT_FP32="constexpr", DOT_PRECISION="constexpr")
    const = dict(HAS_GROUPS=not use_bits, USE_BITS=use_bits, SKIP=not use_bits, D=64, BLOCK_D=64,
                 BLOCK=32 if dtype == torch.float32 else 64, **dot_options(dtype, interpret=False))
    return (kernel, sig, const, dict(num_warps=_bwd_warps(dtype), num_stages=2), _aligned(sig))


COMPILE_CASES = [
    _fwd_case(torch.bfloat16, True),
    _fwd_case(torch.float16, False),
    _fwd_case(torch.float32, True),
    _topk_case(torch.bfloat16, 256),
    _topk_case(torch.float16, 512),
    _topk_case(torch.float32, 128),
    _bwd_case(_attn_bwd_dkdv_kernel, torch.bfloat16, False),
    _bwd_case(_attn_bwd_dq_kernel, torch.bfloat16, False),
    _bwd_case(_attn_bwd_dkdv_kernel, torch.bfloat16, True),
    _bwd_case(_attn_bwd_dq_kernel, torch.bfloat16, True),
    _bwd_case(_attn_bwd_dkdv_kernel, torch.float32, False),
    _bwd_case(_attn_bwd_dq_kernel, torch.float32, False),
    _bwd_case(_attn_bwd_dkdv_kernel, torch.float32, True),
]

__all__ = ["forward", "backward", "plan", "visited_fraction", "max_topk_l", "MAX_TOPK_L", "COMPILE_CASES"]
