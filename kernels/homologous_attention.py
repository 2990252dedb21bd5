"""Triton backend of homologous-patch attention (pyssl.homologous_attention).

Entry points (q, k, v contiguous (B, H, L, D), float32/bfloat16/float16; groups (B, L) int64 or
None; per-row statistics in float32 and indexed by the original token position):

    forward(q, k, v, groups, topk, scale) -> (out, lse (B, H, L), bits, perm)
    backward(q, k, v, out, dout, lse, groups, bits, perm, topk, scale) -> (dq, dk, dv)

Group mode (topk = 0). Tokens are sorted by group id once per call (perm (B, L): sorted position
-> token, global tokens (negative ids) first); the forward returns perm and the backward reuses
it. Rows are loaded by index through perm (no permuted copy of q, k, v) and written back at the
original positions (no un-permute pass). Tiles follow the groups, as in variable-length
FlashAttention: a tile is at most BLOCK sorted rows of ONE group, and each group starts a new
tile, so a query tile's keys are exactly its group's sorted span [lo, hi) (visited in BLOCK-wide
key tiles) plus the global tokens [0, ng) (visited in BG = 16-wide tiles: a ViT has one class
token, and a 64-wide tile for it would cost as much as a group tile). Inside those tiles every
pair is allowed: no group ids are loaded. The global tokens' own rows attend to everything: one
extra program per (batch, head) takes them in BG-row blocks over all keys. The tile table
(tables()) is built on the device from the sorted ids without a host sync: the grid has
cdiv(L, BLOCK) tile programs per (batch, head) and each loops over tiles pid, pid + grid, ...,
since a batch row can have more tiles than cdiv(L, BLOCK) (one partial tile per group).
Work per (batch, head): sum over groups of ceil(n_g/BLOCK)^2 BLOCK^2 pairs, plus the global
rows and columns; at ViT-B size (197 tokens, 4 groups, 1 global) 38% of the dense 256 x 256
tile grid, against 88% for fixed 64-row tiles of the sorted order (the global token's tile
meets every other). PYSSL_HOMATTN_NO_SKIP=1 visits all non-global keys with the group mask
loaded per tile instead (what the benchmark compares). Many groups much smaller than BLOCK
cost up to one partial tile each: at G groups of n < BLOCK tokens the work is G·BLOCK^2.

Top-k mode (topk = K > 0). Rows that fit on chip (topk_whole_rows) are held whole by a program
(BLOCK_M × L_PAD, L_PAD = next power of two of L, at most max_topk_l(dtype, d): for 16-bit
inputs 512 at d <= 64, 256 at d <= 128, 128 at d <= 256; for float32 128 at d <= 64, else 64):
the K-th largest score of each row is found on its order-preserving int32 image by a bisection
in registers (_kth_select: 32 passes of a compare and a row count), the kept set is the allowed
keys above it and the first ties at it in key order (the lower index first). Longer rows
(or PYSSL_HOMATTN_TOPK_STREAM=1) stream their key tiles: a radix search over the int32 images
finds the K-th largest score in up to 16 passes, a last pass keeps the keys above it and the
first ties in key order (_attn_topk_stream_fwd_kernel). Both save the kept set as a bitmask
(B, H, L, ceil(L/8)) uint8 (bit j % 8 of byte j // 8 is key j) for the backward, which never
re-ranks. perm is the identity there, and the backward runs on the tile table of one group
spanning the row (fixed BLOCK tiles from 0).

Backward (both modes): FlashAttention-2's split into two atomic-free kernels: dK/dV by key tiles
(looping over the query tiles that can see them: the group's span and the global rows) and dQ
by query tiles (looping over the same keys as the forward), both recomputing P from the saved
log-sum-exp; the bitmask in top-k mode. delta = rowsum(dO ∘ O) is computed beforehand in
PyTorch.

Interpreter notes: loads are converted to float32 (DOT_FP32) because the interpreter does bf16
arithmetic wrongly; on the GPU 16-bit operands go to tensor cores with fp32 accumulation and fp32
inputs follow torch's float32 matmul precision: input_precision="ieee" by default, "tf32" where
the user allowed TF32 (_tiles.fp32_dot_precision; the tiles of _TF32_TILES then).
"""
from __future__ import annotations

import os
from typing import List, Optional

import torch
import triton
import triton.language as tl

from pyssl.kernels._tiles import dot_options, fp32_dot_precision, interpreting, on_tensor_device, pow2

MAX_HEAD_DIM = 256        # widest head the kernels take (BLOCK_D = next power of two of d)
BG = 16                   # width of the global-token tiles (rows or keys)

# Longest row (L_PAD) of the top-k kernel by (float32 inputs, BLOCK_D): k and v of the whole row
# sit in shared memory (2·L_PAD·BLOCK_D·element size, at most 227 KiB on sm_90), which bounds
# every entry (the next power of two would need 256 KiB), except float32 at BLOCK_D = 256, whose
# 128-key rows spill registers (ptxas -v under Triton 3.6 and 3.7; each is a compile case). The
# float32 rows doubled (64 -> 256, 128 -> 128) when the bisection replaced the int64 sort: a
# ViT's 197 tokens in float32 are held whole instead of streamed in 17 passes.
_TOPK_L = {(False, 64): 512, (False, 128): 256, (False, 256): 128,
           (True, 64): 256, (True, 128): 128, (True, 256): 64}


def max_topk_l(dtype, d: int = 64) -> int:
    """Longest row the top-k kernel holds on chip for head dimension d (0: d is too wide)."""
    bd = max(pow2(d, lo=16), 64)
    return _TOPK_L.get((dtype == torch.float32, bd), 0)


def shared_memory(device) -> Optional[int]:
    """Largest shared memory a block may opt in to on a CUDA device (None: not a CUDA device, or
    torch does not say). The whole-row top-k limits are set for sm_90 (227 KiB)."""
    if torch.device(device).type != "cuda":
        return None
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", None)


def topk_whole_rows(dtype, L: int, d: int, device) -> bool:
    """Whether the top-k forward holds whole rows on chip (_attn_topk_fwd_kernel: L up to
    max_topk_l and k, v of the row within the GPU's shared memory) or streams them
    (_attn_topk_stream_fwd_kernel: any L, up to 17 passes over k). PYSSL_HOMATTN_TOPK_STREAM=1,
    read per call, streams every row (what the benchmark compares the two kernels with)."""
    if os.environ.get("PYSSL_HOMATTN_TOPK_STREAM", "0") == "1" or L > max_topk_l(dtype, d):
        return False
    have = shared_memory(device)
    return have is None or topk_shared_bytes(dtype, L, d) <= have


def topk_shared_bytes(dtype, L: int, d: int) -> int:
    """Shared memory of one top-k program: k and v of the padded row and the 16-row q tile
    (what Triton reports for every top-k compile case on sm_90)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return (2 * pow2(L, lo=16) + 16) * pow2(d, lo=16) * elem


_TL_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@triton.jit
def _group_mask(gq, gk):
    return (gq[:, None] == gk[None, :]) | (gq[:, None] < 0) | (gk[None, :] < 0)


@triton.jit
def _load_kv(K, V, PERM, b, ibase, SL, L, p0, p_hi, dd, dmask, D: tl.constexpr, RN: tl.constexpr,
             DOT_FP32: tl.constexpr):
    """Keys and values of the RN sorted positions p0 + [0, RN) below p_hi, loaded through perm."""
    offs = p0 + tl.arange(0, RN)
    msk = offs < p_hi
    tok = tl.load(PERM + b * L + offs, mask=msk, other=0)
    m2 = msk[:, None] & dmask[None, :]
    kk = tl.load(K + ibase + tok[:, None] * SL + dd[None, :], mask=m2, other=0.0)
    vv = tl.load(V + ibase + tok[:, None] * SL + dd[None, :], mask=m2, other=0.0)
    if DOT_FP32:
        kk = kk.to(tl.float32)
        vv = vv.to(tl.float32)
    return offs, msk, tok, kk, vv


@triton.jit
def _load_q(Q, DO, LSE, DELTA, PERM, b, bh, ibase, SL, base, L, p0, p_hi, dd, dmask, D: tl.constexpr,
            RM: tl.constexpr, WITH_GRAD: tl.constexpr, DOT_FP32: tl.constexpr):
    """Query side of RM sorted positions: (positions, mask, token ids, q[, dO, lse, delta])."""
    offs = p0 + tl.arange(0, RM)
    msk = offs < p_hi
    tok = tl.load(PERM + b * L + offs, mask=msk, other=0)
    m2 = msk[:, None] & dmask[None, :]
    q = tl.load(Q + ibase + tok[:, None] * SL + dd[None, :], mask=m2, other=0.0)
    do = q
    lse = tl.zeros((RM,), tl.float32)
    delta = lse
    if WITH_GRAD:
        do = tl.load(DO + base + tok[:, None] * D + dd[None, :], mask=m2, other=0.0)
        lse = tl.load(LSE + bh.to(tl.int64) * L + tok, mask=msk, other=float("-inf"))
        delta = tl.load(DELTA + bh.to(tl.int64) * L + tok, mask=msk, other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    return offs, msk, tok, q, do, lse, delta


@triton.jit
def _pair_mask(BITS, GS, bh, b, L, NB, n0, offs_m, offs_n, mmask, nmask,
               MASK_GROUPS: tl.constexpr, USE_BITS: tl.constexpr, RM: tl.constexpr,
               RN: tl.constexpr):
    """Allowed (query, key) pairs of an RM x RN tile (query positions offs_m, keys offs_n, the
    key tile starting at n0). Group-aligned tiles need no mask beyond the padding. Without tile
    skipping (MASK_GROUPS) the sorted group ids decide. Top-k mode runs in token order (perm is
    the identity) with key tiles starting at multiples of 8, so the tile's kept set is one
    (RM, RN/8) byte tile of the bitmask: one load per byte, unpacked in registers (a load per
    bit costs 8x the addresses, which spilled)."""
    ok = mmask[:, None] & nmask[None, :]
    if USE_BITS:
        jb = n0 // 8 + tl.arange(0, RN // 8)
        byte = tl.load(BITS + (bh.to(tl.int64) * L + offs_m[:, None]) * NB + jb[None, :],
                       mask=mmask[:, None] & (jb[None, :] < NB), other=0)
        bit = (byte.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
        ok = ok & (tl.reshape(bit, (RM, RN)) == 1)
    elif MASK_GROUPS:
        gq = tl.load(GS + b * L + offs_m, mask=mmask, other=0)
        gk = tl.load(GS + b * L + offs_n, mask=nmask, other=0)
        ok = ok & _group_mask(gq, gk)
    return ok


@triton.jit
def _program(NG, L, H, SB, SH, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """A (batch·head, slot) program of the group-mode kernels: batch·head on axis 0 (up to
    2^31 − 1; axis 1 stops at 65535), the tile slot (the last one takes the global tokens), the
    offsets of the contiguous outputs / dO (base) and of the strided q, k, v (ibase), the number
    of global tokens of the batch row."""
    bh = tl.program_id(0)
    slot = tl.program_id(1)
    b = bh // H
    base = bh.to(tl.int64) * L * D
    ibase = b.to(tl.int64) * SB + (bh % H).to(tl.int64) * SH
    dd = tl.arange(0, BLOCK_D)
    return bh, slot, tl.num_programs(1) - 1, b, base, ibase, dd, dd < D, tl.load(NG + b)


@triton.jit
def _tile(TAB, b, i, TM):
    """Tile i of batch row b: sorted rows [s, e) of one group, whose keys are [lo, hi)."""
    t = TAB + (b * TM + i).to(tl.int64) * 4
    return tl.load(t), tl.load(t + 1), tl.load(t + 2), tl.load(t + 3)


# ----------------------------------------------------------------------------------------------
# _attn_fwd_kernel: program (batch·head, tile slot). Slots 0..P-1 loop over the group tiles
# i = slot, slot + P, ...: a query tile of BLOCK sorted rows of one group, its keys the global
# tokens (BG-wide tiles) and the group's span (BLOCK-wide tiles). Slot P takes the global rows
# in BG-row blocks against every key. Registers: the q tile, the output accumulator
# (rows × BLOCK_D, fp32), running max and sum per row; k and v tiles stream through (shared
# memory as tl.dot operands). Traffic: q, out once; k, v once per visiting query tile.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fwd_block(Q, K, V, O, LSE, PERM, GS, b, bh, base, ibase, SL, L, p0, p_hi, lo, hi, ng, scale, dd, dmask,
               MASK_GROUPS: tl.constexpr, FOLD_SCALE: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
               RM: tl.constexpr, BLOCK: tl.constexpr, BGC: tl.constexpr,
               DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_m, mmask, rows, q, _do, _lse, _delta = _load_q(Q, Q, LSE, LSE, PERM, b, bh, ibase, SL, base, L, p0, p_hi,
                                                         dd, dmask, D, RM, False, DOT_FP32)
    m_i = tl.full((RM,), float("-inf"), tl.float32)
    l_i = tl.zeros((RM,), tl.float32)
    acc = tl.zeros((RM, BLOCK_D), tl.float32)
    for g0 in range(0, ng, BGC):                 # the global tokens: seen by every query
        offs_n, nmask, _c, kk, vv = _load_kv(K, V, PERM, b, ibase, SL, L, g0, ng, dd, dmask, D, BGC, DOT_FP32)
        m_i, l_i, acc = _fwd_step(q, kk, vv, mmask[:, None] & nmask[None, :], m_i, l_i, acc, scale,
                                  DOT_PRECISION)
    rows_full = p0 + RM <= p_hi
    for k0 in range(lo, hi, BLOCK):
        offs_n, nmask, _c, kk, vv = _load_kv(K, V, PERM, b, ibase, SL, L, k0, hi, dd, dmask, D, BLOCK, DOT_FP32)
        if MASK_GROUPS or not FOLD_SCALE:
            ok = _pair_mask(LSE, GS, bh, b, L, 1, k0, offs_m, offs_n, mmask, nmask, MASK_GROUPS, False,
                            RM, BLOCK)
            m_i, l_i, acc = _fwd_step(q, kk, vv, ok, m_i, l_i, acc, scale, DOT_PRECISION)
        elif rows_full & (k0 + BLOCK <= hi):
            # a whole tile of one group: every pair allowed, no mask (long groups: most tiles)
            m_i, l_i, acc = _fwd_step_pos(q, kk, vv, mmask, m_i, l_i, acc, scale, False, DOT_PRECISION)
        else:
            m_i, l_i, acc = _fwd_step_pos(q, kk, vv, mmask[:, None] & nmask[None, :], m_i, l_i, acc, scale, True,
                                          DOT_PRECISION)
    _fwd_store(O, LSE, base, bh, L, rows, mmask, dd, dmask, acc, m_i, l_i, D)


@triton.jit
def _fwd_store(O, LSE, base, bh, L, rows, mmask, dd, dmask, acc, m_i, l_i, D: tl.constexpr):
    """The normalized output rows (at token positions rows) and their log-sum-exp (-inf for a
    row that kept nothing; NaN, like the row, where a kept score was NaN: the GPU's max skips
    NaN, the sum does not)."""
    live = l_i != 0.0
    out = acc / tl.where(live, l_i, 1.0)[:, None]
    # m_i in base 2 (_online_softmax): the saved lse in natural units
    lse = tl.where(live, (m_i + tl.log2(tl.where(live, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(O + base + rows[:, None] * D + dd[None, :], out.to(O.dtype.element_ty),
             mask=mmask[:, None] & dmask[None, :])
    tl.store(LSE + bh.to(tl.int64) * L + rows, lse, mask=mmask)


@triton.jit
def _fwd_step(q, kk, vv, ok, m_i, l_i, acc, scale, DOT_PRECISION: tl.constexpr):
    # scores in base 2: log2(e) folded into the scale, one multiply per score
    s = tl.dot(q, tl.trans(kk), input_precision=DOT_PRECISION) * (scale * 1.4426950408889634)
    return _online_softmax(tl.where(ok, s, float("-inf")), 1.0, vv, m_i, l_i, acc, DOT_PRECISION)


WHOLE_TILES_MIN_L = 1024   # rows from which the backward takes whole tiles apart (_whole_tiles)


def _whole_tiles(dtype, mask_groups: bool, use_bits: bool, L: int, d: int = 64) -> bool:
    """Whether the backward kernels take whole tiles of one group (every pair allowed, every row
    and key real) without a select per score: group mode with tile skipping, 16-bit inputs
    (float32 rows keep one path: a second copy of the step costs registers there), rows of at
    least WHOLE_TILES_MIN_L tokens. Per 64 × 64 tile and thread (SASS of the sm_90 build, bf16,
    d = 64): dK/dV 424 instructions for a whole tile and 552 for a partial one against 519 for
    every tile with one path, dQ 300 and 397 against 382: a gain where groups are long (L = 4096
    in 4 groups: nearly every tile whole), a loss where no tile is whole (ViT lengths, groups
    shorter than a tile), hence the length rule (the number of groups is not known on the host
    without a sync). Heads up to 128 wide (the compile cases checked for spills)."""
    return (not mask_groups and not use_bits and dtype != torch.float32 and L >= WHOLE_TILES_MIN_L
            and pow2(d, lo=16) <= 128)


def _fold_scale(dtype, scale: float) -> bool:
    """Whether the group-mode forward takes _fwd_step_pos (scale folded into the exponential,
    whole tiles unmasked): for a positive scale and 16-bit inputs. float32 rows keep the plain
    step: the second copy of the step spilled registers there (d >= 80, and TF32 under Triton
    3.6), and their time goes to the float32 products anyway."""
    return scale > 0 and dtype != torch.float32


@triton.jit
def _fwd_step_pos(q, kk, vv, ok, m_i, l_i, acc, scale, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """_fwd_step for scale > 0 with the multiply folded: the row max of the raw products, then
    exp2(raw · scale·log2(e) − max) as one fused multiply-add per score (a multiply per score
    less), and with MASKED=False no mask at all (a tile of allowed pairs only). The group-mode
    forward's key-tile loop per 64 × 64 tile and thread (SASS of the sm_90 build, bf16, d = 64,
    Triton 3.7): 336 instructions for a whole tile of one group, 452 for a partial one, against
    458 for every tile before; its tensor-core and exponential work take ~256 cycles each
    against ~336-458 of instruction issue, so long groups (L = 4096 in 4 groups: nearly every
    tile whole) gain most."""
    raw = tl.dot(q, tl.trans(kk), input_precision=DOT_PRECISION)
    if MASKED:
        raw = tl.where(ok, raw, float("-inf"))
    return _online_softmax(raw, scale * 1.4426950408889634, vv, m_i, l_i, acc, DOT_PRECISION)


@triton.jit
def _online_softmax(s, c, vv, m_i, l_i, acc, DOT_PRECISION: tl.constexpr):
    """One key tile of the online softmax: s · c the tile's scores in base 2 (times log2(e)),
    c > 0 (1.0 where s is scaled already: the multiply folds away), with the excluded pairs at
    -inf; exp2 is the hardware's exponential (tl.exp multiplies by log2(e) first: one multiply
    per score more), and exp2(s · c − max) is one fused multiply-add per score."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * c)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s * c - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, PERM, GS, TAB, NTILE, NG, scale, SB, SH, SL, L, H, TM,
                     MASK_GROUPS: tl.constexpr, FOLD_SCALE: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BGC: tl.constexpr, DOT_FP32: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    bh, slot, P, b, base, ibase, dd, dmask, ng = _program(NG, L, H, SB, SH, D, BLOCK_D)
    if slot == P:
        for r0 in range(0, ng, BGC):
            _fwd_block(Q, K, V, O, LSE, PERM, GS, b, bh, base, ibase, SL, L, r0, ng, ng, L, ng, scale, dd, dmask,
                       MASK_GROUPS, FOLD_SCALE, D, BLOCK_D, BGC, BLOCK_N, BGC, DOT_FP32, DOT_PRECISION)
    else:
        for i in range(slot, tl.load(NTILE + b), P):
            s, e, lo, hi = _tile(TAB, b, i, TM)
            _fwd_block(Q, K, V, O, LSE, PERM, GS, b, bh, base, ibase, SL, L, s, e, lo, hi, ng, scale, dd, dmask,
                       MASK_GROUPS, FOLD_SCALE, D, BLOCK_D, BLOCK_M, BLOCK_N, BGC, DOT_FP32, DOT_PRECISION)


# ----------------------------------------------------------------------------------------------
# _attn_topk_fwd_kernel: program (batch·head, BLOCK_M query rows in token order; _topk_program's
# 1-D grid) holding whole
# rows: the score tile (BLOCK_M × L_PAD, fp32) and its uint32 images in registers, k and v of
# the whole (batch, head) through shared memory. Traffic: q, out, the bitmask once; k, v once per
# program (L/BLOCK_M times per head, from L2).
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attn_topk_fwd_kernel(Q, K, V, O, LSE, BITS, G, scale, SB, SH, SL, L, H, NB, KTH,
                          HAS_GROUPS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_M: tl.constexpr, L_PAD: tl.constexpr, DOT_FP32: tl.constexpr,
                          DOT_PRECISION: tl.constexpr):
    bh, b, base, ibase, rows, mmask, dd, dmask, q = _topk_program(Q, L, H, SB, SH, SL, D, BLOCK_D, BLOCK_M, DOT_FP32)
    cols = tl.arange(0, L_PAD)
    nmask = cols < L
    c64 = cols.to(tl.int64)
    kt = tl.load(K + ibase + c64[None, :] * SL + dd[:, None], mask=dmask[:, None] & nmask[None, :], other=0.0)
    vv = tl.load(V + ibase + c64[:, None] * SL + dd[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
    if DOT_FP32:
        kt = kt.to(tl.float32)
        vv = vv.to(tl.float32)
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale + 0.0    # + 0.0: a −0.0 dot ties +0.0
    allowed = mmask[:, None] & nmask[None, :]
    if HAS_GROUPS:
        gq = tl.load(G + b * L + rows, mask=mmask, other=0)
        gk = tl.load(G + b * L + cols, mask=nmask, other=0)
        allowed = allowed & _group_mask(gq, gk)
    kept = _kth_select(_ordered(s, DOT_FP32), allowed, KTH, BLOCK_M)
    s = tl.where(kept, s, float("-inf"))
    m = tl.max(s, axis=1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    # exp(s − m) as exp2(s·log2 e − m·log2 e): one fused multiply-add per score (s itself stays
    # in natural units: the ranking above compares it bit for bit)
    p = tl.exp2(s * 1.4426950408889634 - (m_safe * 1.4426950408889634)[:, None])
    den = tl.sum(p, axis=1)
    live = den != 0.0    # NaN (a kept NaN score) stays live: a NaN row and lse, as in _fwd_store
    p = p / tl.where(live, den, 1.0)[:, None]
    out = tl.dot(p.to(vv.dtype), vv, input_precision=DOT_PRECISION)
    lse = tl.where(live, m_safe + tl.log(tl.where(live, den, 1.0)), float("-inf"))
    tl.store(O + base + rows[:, None] * D + dd[None, :], out.to(O.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])
    tl.store(LSE + bh.to(tl.int64) * L + rows, lse, mask=mmask)
    _store_kept(BITS, bh, L, NB, rows, mmask, kept, 0, BLOCK_M, L_PAD)




@triton.jit
def _kth_select(sb, allowed, KTH, RM: tl.constexpr):
    """The kept set of each row of an (RM, L_PAD) tile held whole: its KTH + 1 largest allowed
    scores (sb, their order-preserving int32 images), ties at the threshold to the lower key
    index; every allowed key when fewer are allowed. The threshold is built bit by bit from the
    top as an unsigned image (allowed keys shifted into [1, 2^32): _ordered never gives INT_MIN,
    whose image would be 0; others 0, below every candidate): 32 passes of one compare and one
    row count each, then one scan for the ties (allowed keys only).
    A bitonic sort of (score, index) int64 keys, what this replaced, ran 1.5x (L_PAD = 256) to
    2.1x (512) the instructions per thread (7128 against 4759, 16248 against 7881) in 192
    against 98 registers at 256 (SASS of the sm_90 build, bf16, d = 64, Triton 3.7). The passes
    are a loop, not unrolled: unrolled they save ~7% of the instructions but take 124 registers
    and spill at d = 128 (ptxas caps them at 128 there)."""
    u = tl.where(allowed, (sb ^ (-2147483647 - 1)).to(tl.uint32, bitcast=True), 0)
    prefix = tl.zeros((RM,), tl.uint32)
    one = tl.full((RM,), 1, tl.uint32)
    for bit in range(31, -1, -1):
        cand = prefix | (one << bit)
        prefix = tl.where(tl.sum((u >= cand[:, None]).to(tl.int32), axis=1) > KTH, cand, prefix)
    above = allowed & (u > prefix[:, None])
    tie = allowed & (u == prefix[:, None])
    need = KTH + 1 - tl.sum(above.to(tl.int32), axis=1)
    return above | (tie & (tl.cumsum(tie.to(tl.int32), axis=1) <= need[:, None]))


@triton.jit
def _topk_program(Q, L, H, SB, SH, SL, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                  DOT_FP32: tl.constexpr):
    """A program of the top-k kernels: (batch·head, query block) of a 1-D grid of
    B·H·cdiv(L, BLOCK_M) programs, the query block fastest (programs running together share
    one head's k and v in L2; the streamed kernel reads k up to 17 times; one axis takes up to
    2^31 − 1 programs), and its q tile (int64 offsets: row strides of strided views can be
    large). Returns (bh, b, base of the contiguous outputs, ibase of the strided q, k, v,
    rows, row mask, dd, dd mask, q)."""
    nm = tl.cdiv(L, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // nm
    b = bh // H
    base = bh.to(tl.int64) * L * D
    ibase = b.to(tl.int64) * SB + (bh % H).to(tl.int64) * SH
    rows = (pid - bh * nm) * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = rows < L
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    q = tl.load(Q + ibase + rows.to(tl.int64)[:, None] * SL + dd[None, :], mask=mmask[:, None] & dmask[None, :],
                other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    return bh, b, base, ibase, rows, mmask, dd, dmask, q


@triton.jit
def _ordered(s, INTERPRETED: tl.constexpr):
    """The float32 scores as int32 in the same order (sign-magnitude to two's complement;
    -0.0 must have been turned into +0.0). NaN ranks first, as torch.sort ranks it: a NaN the
    GPU computes (the dot, the scale's multiply) is the canonical 0x7FFFFFFF, above +inf,
    whatever the sign of the NaN that went in; the interpreter's numpy keeps a NaN's sign bit
    (a -nan, or x86's 0 * inf), so there NaN is made canonical first (INTERPRETED: the
    kernels' DOT_FP32, set exactly under the interpreter)."""
    if INTERPRETED:
        sb = tl.where(s != s, 0x7FFFFFFF, s.to(tl.int32, bitcast=True))
    else:
        sb = s.to(tl.int32, bitcast=True)
    return sb ^ ((sb >> 31) & 0x7FFFFFFF)


@triton.jit
def _store_kept(BITS, bh, L, NB, rows, mmask, kept, n0, RM: tl.constexpr, RN: tl.constexpr):
    """The kept keys n0 + [0, RN) of an RM-row tile as bytes: bit j % 8 of byte j // 8 is key j."""
    kb = tl.reshape(kept.to(tl.int32), (RM, RN // 8, 8))
    byte = tl.sum(kb << tl.arange(0, 8)[None, None, :], axis=2)
    nb = n0 // 8 + tl.arange(0, RN // 8)
    tl.store(BITS + (bh.to(tl.int64) * L + rows[:, None]) * NB + nb[None, :], byte.to(tl.uint8),
             mask=mmask[:, None] & (nb[None, :] < NB))


# ----------------------------------------------------------------------------------------------
# _attn_topk_stream_fwd_kernel: top-k rows of any length. Program (batch·head, BLOCK_M query
# rows in token order), query blocks fastest in a 1-D grid (_topk_program: the programs resident
# together read one head's k from L2); key tiles of BLOCK_N stream through. The K-th largest
# score of each row is found by a radix search over its order-preserving int32 image, two bits
# per pass: 16 passes over the key tiles, each counting per row the allowed keys at or above
# three candidates (prefix + 1, 2, 3 << shift; a key's three hits packed in one int32, so a tile
# costs one row sum) and keeping the largest candidate that K keys reach. The count of the
# smallest failing candidate of the last pass that had one is the count above the threshold
# (the bits below it all passed), so need = K − that count ties are kept: the first in key
# order, by a cumulative count of the ties across the tiles. A final pass keeps those keys, runs
# the online softmax over them and writes the bitmask. All passes are one loop over (pass, tile)
# with one tl.dot, so the scores ranked are bit-for-bit the scores kept. Rows whose allowed set
# is at most K keep it all; when every row of the program is such (group ids counted first, in
# a loop without dots) the search is skipped. Registers: the q tile, the output accumulator
# (BLOCK_M × BLOCK_D fp32), per row the running max and sum, three counters, the threshold and
# the tie count. Traffic: q, out and the bitmask once; k once per pass (17 at most), v once.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attn_topk_stream_fwd_kernel(Q, K, V, O, LSE, BITS, G, scale, SB, SH, SL, L, H, NB, TOPK,
                                 HAS_GROUPS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
                                 DOT_PRECISION: tl.constexpr):
    bh, b, base, ibase, rows, mmask, dd, dmask, q = _topk_program(Q, L, H, SB, SH, SL, D, BLOCK_D, BLOCK_M, DOT_FP32)
    gbase = b.to(tl.int64) * L
    gq = tl.zeros((BLOCK_M,), tl.int64)
    n_ok = tl.zeros((BLOCK_M,), tl.int32) + L
    if HAS_GROUPS:
        gq = tl.load(G + gbase + rows, mask=mmask, other=0)
        n_ok = tl.zeros((BLOCK_M,), tl.int32)
        for g0 in range(0, L, BLOCK_N):
            cols = g0 + tl.arange(0, BLOCK_N)
            gk = tl.load(G + gbase + cols, mask=cols < L, other=0)
            n_ok += tl.sum((_group_mask(gq, gk) & (cols < L)[None, :]).to(tl.int32), axis=1)
    tl.static_assert(BLOCK_N < 1024)          # the packed per-tile counts
    search = mmask & (n_ok > TOPK)
    npass = tl.max(search.to(tl.int32), axis=0) * 16
    ntiles = tl.cdiv(L, BLOCK_N)
    ans = tl.zeros((BLOCK_M,), tl.int64)     # the threshold as flip + 2^31, two bits per pass from the top
    n_gt = tl.zeros((BLOCK_M,), tl.int32)    # allowed keys above the threshold
    c1 = tl.zeros((BLOCK_M,), tl.int32)
    c2 = tl.zeros((BLOCK_M,), tl.int32)
    c3 = tl.zeros((BLOCK_M,), tl.int32)
    seen = tl.zeros((BLOCK_M,), tl.int32)    # ties at the threshold in the key tiles passed
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for it in range(0, (npass + 1) * ntiles):
        ph = it // ntiles
        n0 = (it - ph * ntiles) * BLOCK_N
        cols = n0 + tl.arange(0, BLOCK_N)
        nmask = cols < L
        c64 = cols.to(tl.int64)
        kt = tl.load(K + ibase + c64[None, :] * SL + dd[:, None], mask=dmask[:, None] & nmask[None, :], other=0.0)
        if DOT_FP32:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale + 0.0    # + 0.0: a −0.0 dot ties +0.0
        allowed = mmask[:, None] & nmask[None, :]
        if HAS_GROUPS:
            gk = tl.load(G + gbase + cols, mask=nmask, other=0)
            allowed = allowed & _group_mask(gq, gk)
        flip = _ordered(s, DOT_FP32)
        if ph < npass:
            step = tl.full((BLOCK_M,), 1, tl.int64) << (30 - 2 * ph).to(tl.int64)
            lo = ans - 2147483648                 # the prefix in the int32 order of flip
            # excluded keys at −2^31, below every candidate (each is at least lo + step); the three
            # hits of a key packed in one int32 (10 bits each: BLOCK_N < 1024), one row sum per tile
            fm = tl.where(allowed, flip, -2147483648)
            hits = ((fm >= (lo + step).to(tl.int32)[:, None]).to(tl.int32)
                    + ((fm >= (lo + 2 * step).to(tl.int32)[:, None]).to(tl.int32) << 10)
                    + ((fm >= (lo + 3 * step).to(tl.int32)[:, None]).to(tl.int32) << 20))
            h = tl.sum(hits, axis=1)
            c1 += h & 1023
            c2 += (h >> 10) & 1023
            c3 += h >> 20
            if n0 + BLOCK_N >= L:                 # the pass is complete
                x = (c1 >= TOPK).to(tl.int32) + (c2 >= TOPK).to(tl.int32) + (c3 >= TOPK).to(tl.int32)
                n_gt = tl.where(x == 3, n_gt, tl.where(x == 0, c1, tl.where(x == 1, c2, c3)))
                ans += x.to(tl.int64) * step
                c1 = tl.zeros((BLOCK_M,), tl.int32)
                c2 = tl.zeros((BLOCK_M,), tl.int32)
                c3 = tl.zeros((BLOCK_M,), tl.int32)
        else:
            thr = (ans - 2147483648).to(tl.int32)[:, None]
            tie = allowed & (flip == thr)
            rank = tl.cumsum(tie.to(tl.int32), axis=1) + seen[:, None]
            kept = allowed & (~search[:, None] | (flip > thr) | (tie & (rank <= (TOPK - n_gt)[:, None])))
            seen += tl.sum(tie.to(tl.int32), axis=1)
            vv = tl.load(V + ibase + c64[:, None] * SL + dd[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
            if DOT_FP32:
                vv = vv.to(tl.float32)
            m_i, l_i, acc = _online_softmax(tl.where(kept, s * 1.4426950408889634, float("-inf")), 1.0, vv, m_i,
                                            l_i, acc, DOT_PRECISION)
            _store_kept(BITS, bh, L, NB, rows, mmask, kept, n0, BLOCK_M, BLOCK_N)
    _fwd_store(O, LSE, base, bh, L, rows, mmask, dd, dmask, acc, m_i, l_i, D)


@triton.jit
def _p_ds(a, da, bb, db, lse, delta, ok, scale, DOT_PRECISION: tl.constexpr,
          TRANSPOSED: tl.constexpr = False, MASKED: tl.constexpr = True):
    """P recomputed from the saved log-sum-exp, and dS = P ∘ (dO·Vᵀ − delta): (a, da, bb, db) =
    (q, dO, k, v) with (query, key) tiles, or with TRANSPOSED (k, v, q, dO) and (key, query)
    tiles, the per-query lse and delta then running along the columns."""
    # in base 2, as the forward: exp2(s·scale·log2(e) − lse·log2(e)), one fused multiply-add
    s = tl.dot(a, tl.trans(bb), input_precision=DOT_PRECISION) * (scale * 1.4426950408889634)
    dp = tl.dot(da, tl.trans(db), input_precision=DOT_PRECISION)
    live = lse != float("-inf")
    lse0 = tl.where(live, lse, 0.0) * 1.4426950408889634
    if TRANSPOSED:
        p = tl.where(ok & live[None, :], tl.exp2(s - lse0[None, :]), 0.0)
        ds = p * (dp - delta[None, :])
    elif MASKED:
        p = tl.where(ok & live[:, None], tl.exp2(s - lse0[:, None]), 0.0)
        ds = p * (dp - delta[:, None])
    else:
        # a whole tile of one group (every pair allowed, every row and key real): no select per
        # score; a row with lse = -inf kept nothing, its scores are all -inf and exp2 gives 0
        p = tl.exp2(s - lse0[:, None])
        ds = p * (dp - delta[:, None])
    return p, ds


@triton.jit
def _p_ds_tile(q, do, kk, vv, lse, delta, ok, whole, scale, DOT_PRECISION: tl.constexpr,
               WHOLE_TILES: tl.constexpr):
    """_p_ds of a (query, key) group tile: without the select per score where the tile is whole
    (whole: every pair allowed, every row and key real) and the kernel takes that path
    (WHOLE_TILES, _whole_tiles)."""
    if WHOLE_TILES:
        if whole:
            p, ds = _p_ds(q, do, kk, vv, lse, delta, ok, scale, DOT_PRECISION, False, False)
        else:
            p, ds = _p_ds(q, do, kk, vv, lse, delta, ok, scale, DOT_PRECISION)
    else:
        p, ds = _p_ds(q, do, kk, vv, lse, delta, ok, scale, DOT_PRECISION)
    return p, ds


# ----------------------------------------------------------------------------------------------
# _attn_bwd_dkdv_kernel: program (batch·head, tile slot), the mirror image of the forward: a
# key tile (group tile, or BG global keys in slot P) against the queries that see it: the
# global rows (BG-row tiles) and the group's span (every non-global row for global keys).
# Registers: k, v tiles and the dK, dV accumulators (rows × BLOCK_D fp32 each); q, dO tiles
# stream through. Traffic: k, v, dk, dv once; q, dO, lse, delta once per visited query tile.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dkdv_block(Q, K, V, DO, LSE, DELTA, DK, DV, PERM, GS, BITS, b, bh, base, ibase, SL, L, NB, n0, n_hi, lo, hi,
                ng, scale, dd, dmask, MASK_GROUPS: tl.constexpr, USE_BITS: tl.constexpr,
                D: tl.constexpr, BLOCK_D: tl.constexpr, RN: tl.constexpr, BLOCK: tl.constexpr,
                BGC: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
                WHOLE_TILES: tl.constexpr):
    offs_n, nmask, cols, kk, vv = _load_kv(K, V, PERM, b, ibase, SL, L, n0, n_hi, dd, dmask, D, RN, DOT_FP32)
    dk = tl.zeros((RN, BLOCK_D), tl.float32)
    dv = tl.zeros((RN, BLOCK_D), tl.float32)
    for g0 in range(0, ng, BGC):                 # the global rows see every key
        offs_m, mmask, _r, q, do, lse, delta = _load_q(Q, DO, LSE, DELTA, PERM, b, bh, ibase, SL, base, L, g0, ng,
                                                      dd, dmask, D, BGC, True, DOT_FP32)
        # transposed (keys x global rows): the key tile stays the M side of every product, so
        # these BG-row blocks use the same tensor-core form as the main loop
        pt, dst = _p_ds(kk, vv, q, do, lse, delta, nmask[:, None] & mmask[None, :], scale, DOT_PRECISION,
                        True)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
        dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PRECISION)
    keys_full = n0 + RN <= n_hi
    for m0 in range(lo, hi, BLOCK):
        offs_m, mmask, _r, q, do, lse, delta = _load_q(Q, DO, LSE, DELTA, PERM, b, bh, ibase, SL, base, L, m0, hi,
                                                      dd, dmask, D, BLOCK, True, DOT_FP32)
        ok = _pair_mask(BITS, GS, bh, b, L, NB, n0, offs_m, offs_n, mmask, nmask, MASK_GROUPS, USE_BITS,
                        BLOCK, RN)
        p, ds = _p_ds_tile(q, do, kk, vv, lse, delta, ok, keys_full & (m0 + BLOCK <= hi), scale, DOT_PRECISION,
                           WHOLE_TILES)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    m2 = nmask[:, None] & dmask[None, :]
    tl.store(DK + base + cols[:, None] * D + dd[None, :], (dk * scale).to(DK.dtype.element_ty), mask=m2)
    tl.store(DV + base + cols[:, None] * D + dd[None, :], dv.to(DV.dtype.element_ty), mask=m2)


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, PERM, GS, TAB, NTILE, NG, BITS, scale, SB, SH, SL, L, H, TM,
                          NB, MASK_GROUPS: tl.constexpr, USE_BITS: tl.constexpr, D: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BGC: tl.constexpr,
                          DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, WHOLE_TILES: tl.constexpr = False):
    bh, slot, P, b, base, ibase, dd, dmask, ng = _program(NG, L, H, SB, SH, D, BLOCK_D)
    if slot == P:
        for c0 in range(0, ng, BGC):
            _dkdv_block(Q, K, V, DO, LSE, DELTA, DK, DV, PERM, GS, BITS, b, bh, base, ibase, SL, L, NB, c0, ng, ng, L,
                        ng, scale, dd, dmask, MASK_GROUPS, USE_BITS, D, BLOCK_D, BGC, BLOCK_N, BGC,
                        DOT_FP32, DOT_PRECISION, WHOLE_TILES)
    else:
        for i in range(slot, tl.load(NTILE + b), P):
            s, e, lo, hi = _tile(TAB, b, i, TM)
            _dkdv_block(Q, K, V, DO, LSE, DELTA, DK, DV, PERM, GS, BITS, b, bh, base, ibase, SL, L, NB, s, e, lo, hi,
                        ng, scale, dd, dmask, MASK_GROUPS, USE_BITS, D, BLOCK_D, BLOCK_M, BLOCK_N, BGC,
                        DOT_FP32, DOT_PRECISION, WHOLE_TILES)


# ----------------------------------------------------------------------------------------------
# _attn_bwd_dq_kernel: program (batch·head, tile slot) over the forward's query tiles and keys.
# Registers: q, dO tiles and the dQ accumulator; k, v tiles stream through. Traffic: q, dO, dq
# once; k, v once per visited tile.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dq_block(Q, K, V, DO, LSE, DELTA, DQ, PERM, GS, BITS, b, bh, base, ibase, SL, L, NB, p0, p_hi, lo, hi, ng,
              scale, dd, dmask, MASK_GROUPS: tl.constexpr, USE_BITS: tl.constexpr, D: tl.constexpr,
              BLOCK_D: tl.constexpr, RM: tl.constexpr, BLOCK: tl.constexpr, BGC: tl.constexpr,
              DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, WHOLE_TILES: tl.constexpr):
    offs_m, mmask, rows, q, do, lse, delta = _load_q(Q, DO, LSE, DELTA, PERM, b, bh, ibase, SL, base, L, p0, p_hi,
                                                    dd, dmask, D, RM, True, DOT_FP32)
    dq = tl.zeros((RM, BLOCK_D), tl.float32)
    for g0 in range(0, ng, BGC):
        offs_n, nmask, _c, kk, vv = _load_kv(K, V, PERM, b, ibase, SL, L, g0, ng, dd, dmask, D, BGC, DOT_FP32)
        p, ds = _p_ds(q, do, kk, vv, lse, delta, mmask[:, None] & nmask[None, :], scale, DOT_PRECISION)
        dq += tl.dot(ds.to(kk.dtype), kk, input_precision=DOT_PRECISION)
    rows_full = p0 + RM <= p_hi
    for k0 in range(lo, hi, BLOCK):
        offs_n, nmask, _c, kk, vv = _load_kv(K, V, PERM, b, ibase, SL, L, k0, hi, dd, dmask, D, BLOCK, DOT_FP32)
        ok = _pair_mask(BITS, GS, bh, b, L, NB, k0, offs_m, offs_n, mmask, nmask, MASK_GROUPS, USE_BITS,
                        RM, BLOCK)
        p, ds = _p_ds_tile(q, do, kk, vv, lse, delta, ok, rows_full & (k0 + BLOCK <= hi), scale, DOT_PRECISION,
                           WHOLE_TILES)
        dq += tl.dot(ds.to(kk.dtype), kk, input_precision=DOT_PRECISION)
    tl.store(DQ + base + rows[:, None] * D + dd[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=mmask[:, None] & dmask[None, :])


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, PERM, GS, TAB, NTILE, NG, BITS, scale, SB, SH, SL, L, H, TM, NB,
                        MASK_GROUPS: tl.constexpr, USE_BITS: tl.constexpr, D: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BGC: tl.constexpr,
                        DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, WHOLE_TILES: tl.constexpr = False):
    bh, slot, P, b, base, ibase, dd, dmask, ng = _program(NG, L, H, SB, SH, D, BLOCK_D)
    if slot == P:
        for r0 in range(0, ng, BGC):
            _dq_block(Q, K, V, DO, LSE, DELTA, DQ, PERM, GS, BITS, b, bh, base, ibase, SL, L, NB, r0, ng, ng, L, ng,
                      scale, dd, dmask, MASK_GROUPS, USE_BITS, D, BLOCK_D, BGC, BLOCK_N, BGC,
                      DOT_FP32, DOT_PRECISION, WHOLE_TILES)
    else:
        for i in range(slot, tl.load(NTILE + b), P):
            s, e, lo, hi = _tile(TAB, b, i, TM)
            _dq_block(Q, K, V, DO, LSE, DELTA, DQ, PERM, GS, BITS, b, bh, base, ibase, SL, L, NB, s, e, lo, hi, ng,
                      scale, dd, dmask, MASK_GROUPS, USE_BITS, D, BLOCK_D, BLOCK_M, BLOCK_N, BGC,
                      DOT_FP32, DOT_PRECISION, WHOLE_TILES)


# ----------------------------------------------------------------------------------------------
# _plan_kernel: program per batch row: the tile table of tables() from the sorted group ids in one
# launch (the torch version is ~25 small kernels, each launched in the forward and the backward).
# The whole row sits in registers (L_PAD = next power of two of L); group starts and ends by
# max/min scans, tile slots by a prefix sum. Traffic: the row of ids once, the table once.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _max_i32(a, b):
    return tl.maximum(a, b)


@triton.jit
def _min_i32(a, b):
    return tl.minimum(a, b)


@triton.jit
def _plan_kernel(GS, TAB, NTILE, NG, L, TM, BLOCK: tl.constexpr, SKIP: tl.constexpr, L_PAD: tl.constexpr):
    b = tl.program_id(0)
    row = GS + b.to(tl.int64) * L
    pos = tl.arange(0, L_PAD)
    inb = pos < L
    g = tl.load(row + pos, mask=inb, other=0)
    g_prev = tl.load(row + pos - 1, mask=inb & (pos > 0), other=0)
    g_next = tl.load(row + pos + 1, mask=(pos + 1) < L, other=0)
    glob = inb & (g < 0)
    ng = tl.sum(glob.to(tl.int32), axis=0)
    start = inb & (g >= 0) & ((pos == ng) | (g != g_prev))
    start_next = ((pos + 1) < L) & (g_next >= 0) & (((pos + 1) == ng) | (g_next != g))
    gstart = tl.associative_scan(tl.where(start, pos, 0), 0, _max_i32)
    gend = tl.associative_scan(tl.where(start_next, pos + 1, L), 0, _min_i32, reverse=True)
    first = inb & (g >= 0) & ((pos - gstart) % BLOCK == 0)
    idx = tl.cumsum(first.to(tl.int32), axis=0) - 1
    if SKIP:
        lo = gstart
        hi = gend
    else:
        lo = tl.zeros_like(pos) + ng
        hi = tl.zeros_like(pos) + L
    t = TAB + (b.to(tl.int64) * TM + idx) * 4
    tl.store(t, pos, mask=first)
    tl.store(t + 1, tl.minimum(pos + BLOCK, gend), mask=first)
    tl.store(t + 2, lo, mask=first)
    tl.store(t + 3, hi, mask=first)
    tl.store(NTILE + b, tl.sum(first.to(tl.int32), axis=0))
    tl.store(NG + b, ng)


# ----------------------------------------------------------------------------------------------
# _delta_kernel: delta = rowsum(dO ∘ O) in float32 for BLOCK_R rows per program, read once in
# the input dtype (no float32 copies of O and dO).
# ----------------------------------------------------------------------------------------------
@triton.jit
def _delta_kernel(O, DO, DELTA, R, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < R
    dd = tl.arange(0, BLOCK_D)
    off = r.to(tl.int64)[:, None] * D + dd[None, :]
    m2 = rm[:, None] & (dd < D)[None, :]
    o = tl.load(O + off, mask=m2, other=0.0).to(tl.float32)
    do = tl.load(DO + off, mask=m2, other=0.0).to(tl.float32)
    tl.store(DELTA + r, tl.sum(o * do, axis=1), mask=rm)


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
_ENV = "PYSSL_HOMATTN_TRITON"
_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")


# GPU tiles of the group-mode kernels by (float32 inputs, BLOCK_D, phase): (BLOCK, warps of the
# forward / dK/dV / dK/dV with the top-k bitmask / dQ, num_stages). The accumulators are
# BLOCK x BLOCK_D float32, so wider heads take smaller tiles or more warps; chosen with ptxas -v
# so that no launch spills registers under Triton 3.6 or 3.7 (every entry is a compile case;
# with the base-2 softmax, float32 d <= 64 forwards spilled 32 B with 2 stages under 3.6, and
# the 16-bit d = 256 dQ 56 B with 8 warps under 3.7: 1 stage, 4 warps there).
# 16-bit tiles run on tensor cores, float32 tiles on FMA dots (twice the registers).
_GPU_TILES = {
    (False, 64, "fwd"): (64, (4, 4, 4, 4), 2), (False, 64, "bwd"): (64, (4, 4, 4, 4), 2),
    (True, 64, "fwd"): (32, (8, 4, 8, 4), 1), (True, 64, "bwd"): (32, (8, 4, 8, 4), 2),
    (False, 128, "fwd"): (64, (8, 8, 8, 8), 2), (False, 128, "bwd"): (32, (8, 8, 8, 4), 1),
    (True, 128, "fwd"): (32, (4, 8, 8, 8), 3), (True, 128, "bwd"): (32, (4, 8, 8, 8), 2),
    (False, 256, "fwd"): (32, (8, 8, 8, 8), 2), (False, 256, "bwd"): (32, (8, 8, 8, 4), 2),
    (True, 256, "fwd"): (16, (8, 8, 8, 8), 2), (True, 256, "bwd"): (16, (8, 8, 8, 8), 1),
}


# float32 under torch's TF32 setting (tensor-core dots on float32 operands): the float32 tiles
# except where those spill with TF32 (ptxas -v, Triton 3.6 and 3.7). A stages pair is (dK/dV, dQ):
# at d <= 64 the dQ kernel spills with 2 stages (4 or 8 warps), dK/dV with 1 (under 3.7).
_TF32_TILES = {
    (64, "fwd"): (32, (4, 4, 8, 4), 1), (64, "bwd"): (32, (8, 4, 8, 8), (2, 1)),
    (128, "bwd"): (32, (8, 8, 8, 4), 2),
}


def _gpu_tiles(dtype, d: int, phase: str, prec: Optional[str] = None):
    """The _GPU_TILES entry; float32 under TF32 (prec, default torch's current setting) takes
    _TF32_TILES where it has one."""
    key = (max(pow2(d, lo=16), 64), phase)
    if dtype == torch.float32 and key in _TF32_TILES and (prec or fp32_dot_precision()) == "tf32":
        return _TF32_TILES[key]
    return _GPU_TILES[(dtype == torch.float32,) + key]


def _stages(stages, kernel=None) -> int:
    """num_stages of one kernel from a table entry (a pair: dK/dV's, dQ's)."""
    if isinstance(stages, tuple):
        return stages[1] if kernel is _attn_bwd_dq_kernel else stages[0]
    return stages


def _config(L: int, dtype, phase: str = "fwd", d: int = 64) -> dict:
    """Tile configuration of the group-mode kernels: BLOCK_M rows per tile (the tile table's
    granularity: query tiles of the forward and dQ, key tiles of dK/dV), BLOCK_N rows per step
    of the streamed side, num_warps (None: _warps per kernel), num_stages.

    The interpreter (~1 ms a program) takes one tile for short rows and 16-row tiles beyond 32,
    so that tests cover multi-tile groups and several tiles per slot. On the GPU 64-row tiles
    for 16-bit inputs (tensor cores) and 32 for float32 (FMA dots; 64 spills registers).
    PYSSL_HOMATTN_TRITON="num_stages=3,fwd.BLOCK_M=128,fwd.num_warps=8" overrides any of the
    keys, for both phases or, prefixed "fwd." / "bwd.", for the forward or the backward (dK/dV
    and dQ share the backward's tile table); read on every call, for timing
    variants on a GPU without code changes; a malformed value raises ValueError. Variants that
    bench/gpu_check.sh times are compile cases (spill-free under Triton 3.6 and 3.7)."""
    if interpreting():
        b, stages = (32 if L <= 32 else 16), 2
    else:
        b, _, stages = _gpu_tiles(dtype, d, phase)
    cfg = dict(BLOCK_M=b, BLOCK_N=b, num_warps=None, num_stages=_stages(stages),
               num_stages_dq=_stages(stages, _attn_bwd_dq_kernel))
    spec = os.environ.get(_ENV, "").strip()
    for item in filter(None, (t.strip() for t in spec.split(","))):
        key, _, val = item.partition("=")
        where, _, key = key.strip().rpartition(".")
        try:
            v = int(val)
        except ValueError:
            v = -1
        pow2_key = key != "num_stages"
        if (where not in ("", "fwd", "bwd") or key not in _KEYS or v < 1 or (pow2_key and v & (v - 1))
                or (key.startswith("BLOCK") and v < 16)):
            raise ValueError(f"{_ENV}={spec!r}: bad entry {item!r}; expected comma-separated "
                             f"[fwd.|bwd.]KEY=INT with KEY in {_KEYS} (BLOCK_* and num_warps powers "
                             f"of two, BLOCK_* >= 16)")
        if where in ("", phase):
            cfg[key] = v
            if key == "num_stages":
                cfg["num_stages_dq"] = v
    return cfg


def _warps(kernel, dtype, use_bits: bool = False, cfg: Optional[dict] = None, d: int = 64,
           prec: Optional[str] = None) -> int:
    """Warps per program from _GPU_TILES (ptxas's allocation differs by kernel: at d <= 64 the
    float32 forward and top-k dK/dV need 8, the group dK/dV and dQ 4). cfg["num_warps"], when
    set, wins."""
    if cfg is not None and cfg.get("num_warps"):
        return cfg["num_warps"]
    if kernel is _attn_topk_stream_fwd_kernel:
        # the search's state on top of the forward's: ptxas spills the forward's warp counts
        # (16-bit at d <= 64: 4 warps take 255 registers and spill under Triton 3.6; float32:
        # 8 warps spill at d <= 64, 4 at d <= 128)
        return 4 if (dtype == torch.float32 and d <= 64) else 8
    fwd = kernel is _attn_fwd_kernel or kernel is _attn_topk_stream_fwd_kernel
    warps = _gpu_tiles(dtype, d, "fwd" if fwd else "bwd", prec)[1]
    if fwd:
        return warps[0]
    if kernel is _attn_bwd_dkdv_kernel:
        return warps[2] if use_bits else warps[1]
    return warps[3]


def _topk_warps(dtype, d: int = 64) -> int:
    # 8 warps keep every whole-row case free of spills under Triton 3.6 and 3.7 except float32
    # rows at BLOCK_D = 256 (255 registers, spilling: 16 warps there); at 16 warps Triton 3.6's
    # build of the float32 d = 64 case was held to 64 registers and spilled
    return 16 if dtype == torch.float32 and pow2(d, lo=16) > 128 else 8


def _skip() -> bool:
    """Tile skipping is on unless PYSSL_HOMATTN_NO_SKIP=1 (the benchmark measures what it buys)."""
    return os.environ.get("PYSSL_HOMATTN_NO_SKIP", "0") != "1"


def plan(groups, B: int, L: int, block: int, device, skip: bool = True):
    """perm (B, L) int64: sorted position -> token (groups ascending, stable; global first), and
    the tile table of tables()."""
    if groups is None:
        perm = torch.arange(L, device=device, dtype=torch.int64).expand(B, L).contiguous()
    else:
        perm = torch.sort(groups, dim=1, stable=True).indices.contiguous()
    return (perm,) + tables(groups, perm, B, L, block, skip)


MAX_PLAN_L = 8192   # rows the plan kernel holds in registers; longer rows use _tables_torch


def tables(groups, perm, B, L, block, skip: bool = True):
    """The group tiles of a sorted order (the backward reuses the forward's sort), built on the
    device without a host sync: gs (B, L) the sorted ids, tab (B, L + 1, 4) int32 with row i =
    tile i's sorted rows [s, e) and key span [lo, hi) (the group's span; all non-global rows
    without skip), ntile (B,) and ng (B,) the number of global tokens. groups None is one group.
    One launch of _plan_kernel (rows up to MAX_PLAN_L, CUDA tensors or the interpreter), else
    the torch version."""
    dev = perm.device
    if L > MAX_PLAN_L or (dev.type != "cuda" and not interpreting()):
        return _tables_torch(groups, perm, B, L, block, skip)
    gs = (torch.zeros((B, L), dtype=torch.int64, device=dev) if groups is None
          else groups.gather(1, perm).contiguous())
    tab = torch.zeros((B, L + 1, 4), dtype=torch.int32, device=dev)
    ntile = torch.empty(B, dtype=torch.int32, device=dev)
    ng = torch.empty(B, dtype=torch.int32, device=dev)
    lp = pow2(L, lo=16)
    _plan_kernel[(B,)](gs, tab, ntile, ng, L, L + 1, BLOCK=block, SKIP=skip, L_PAD=lp,
                       num_warps=_plan_warps(lp))
    return gs, tab, ntile, ng


def _plan_warps(l_pad: int) -> int:
    # 8 warps hold 8192 int64 ids (three shifted copies) in 255 registers without spills under
    # Triton 3.6 and 3.7; 16 warps cap registers at 128 and spill
    return 4 if l_pad <= 1024 else 8


def _tables_torch(groups, perm, B, L, block, skip: bool = True):
    """tables() in torch operations (rows longer than MAX_PLAN_L; the plan kernel's oracle)."""
    dev = perm.device
    gs = (torch.zeros((B, L), dtype=torch.int64, device=dev) if groups is None
          else groups.gather(1, perm).contiguous())
    pos = torch.arange(L, device=dev, dtype=torch.int64).expand(B, L)
    glob = gs < 0
    ng = glob.sum(1)
    prev = torch.cat([gs[:, :1], gs[:, :-1]], 1)
    start = ~glob & ((pos == ng[:, None]) | (gs != prev))
    gstart = torch.cummax(torch.where(start, pos, 0), 1).values
    after = torch.cat([torch.where(start, pos, L)[:, 1:], torch.full((B, 1), L, device=dev)], 1)
    gend = torch.flip(torch.cummin(torch.flip(after, [1]), 1).values, [1])
    first = ~glob & ((pos - gstart) % block == 0)
    idx = torch.where(first, torch.cumsum(first, 1) - 1, L)
    lo, hi = (gstart, gend) if skip else (ng[:, None].expand(B, L), torch.full_like(gend, L))
    ent = torch.stack([pos, torch.minimum(pos + block, gend), lo, hi], -1).to(torch.int32)
    tab = torch.zeros((B, L + 1, 4), dtype=torch.int32, device=dev)
    tab.scatter_(1, idx[..., None].expand(B, L, 4), ent)
    return gs, tab, first.sum(1).to(torch.int32), ng.to(torch.int32)


def visited_fraction(groups, L: int, block: int = 64, skip: bool = True) -> float:
    """Work of the group-mode kernels (query x key pairs in the tiles they compute, padding
    included) over the dense tile grid's (cdiv(L, block) * block)^2, averaged over the batch."""
    B = groups.shape[0]
    _, _, tab, ntile, ng = plan(groups, B, L, block, groups.device, skip)
    total = 0.0
    for b in range(B):
        t = tab[b, : int(ntile[b])].long()
        g = -(-int(ng[b]) // BG) * BG
        span = (-(-(t[:, 3] - t[:, 2]) // block) * block).sum().item()
        work = block * span + len(t) * block * g + g * (-(-(L - int(ng[b])) // block) * block + g)
        total += work / (triton.cdiv(L, block) * block) ** 2
    return total / B


def _grid(B, H, L, block):
    # cdiv(L, block) tile slots (each loops over its share of the tiles; at most 65534, since
    # grid axis 1 stops at 65535) + the global slot
    return (B * H, min(triton.cdiv(L, block), 65534) + 1)


def strided_inputs(q, k, v):
    """q, k, v as the kernels take them: any (batch, head, row) strides shared by the three with
    unit stride along D (e.g. views of one fused qkv projection, read in place), else
    contiguous copies. Returns (q, k, v, (stride_b, stride_h, stride_l))."""
    if not (q.stride() == k.stride() == v.stride() and q.stride(-1) == 1):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return q, k, v, tuple(q.stride()[:3])


@on_tensor_device
def forward(q, k, v, groups, topk: int, scale: float):
    B, H, L, D = q.shape
    q, k, v, strides = strided_inputs(q, k, v)
    out = torch.empty((B, H, L, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    bd = pow2(D, lo=16)
    dummy = torch.zeros(1, dtype=torch.int64, device=q.device)
    if topk:
        nb = (L + 7) // 8
        bits = torch.empty((B, H, L, nb), dtype=torch.uint8, device=q.device)
        g = groups if groups is not None else dummy
        if topk_whole_rows(q.dtype, L, D, q.device):
            lp = pow2(L, lo=16)
            bm = 16
            _attn_topk_fwd_kernel[(B * H * triton.cdiv(L, bm),)](
                q, k, v, out, lse, bits, g, float(scale), *strides, L, H, nb, min(topk, lp) - 1,
                HAS_GROUPS=groups is not None, D=D, BLOCK_D=bd, BLOCK_M=bm, L_PAD=lp,
                num_warps=_topk_warps(q.dtype, D), **dot_options(q.dtype))
        else:
            cfg = _config(L, q.dtype, "fwd", D)
            _attn_topk_stream_fwd_kernel[(B * H * triton.cdiv(L, cfg["BLOCK_M"]),)](
                q, k, v, out, lse, bits, g, float(scale), *strides, L, H, nb, min(topk, L),
                HAS_GROUPS=groups is not None, D=D, BLOCK_D=bd, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                num_warps=_warps(_attn_topk_stream_fwd_kernel, q.dtype, cfg=cfg, d=D),
                num_stages=cfg["num_stages"], **dot_options(q.dtype))
        perm = torch.empty(0, dtype=torch.int64, device=q.device)
        return out, lse, bits, perm
    cfg = _config(L, q.dtype, "fwd", D)
    skip = _skip()
    perm, gs, tab, ntile, ng = plan(groups, B, L, cfg["BLOCK_M"], q.device, skip)
    _attn_fwd_kernel[_grid(B, H, L, cfg["BLOCK_M"])](
        q, k, v, out, lse, perm, gs, tab, ntile, ng, float(scale), *strides, L, H, L + 1,
        MASK_GROUPS=groups is not None and not skip, FOLD_SCALE=_fold_scale(q.dtype, scale), D=D, BLOCK_D=bd, BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"], BGC=BG, num_warps=_warps(_attn_fwd_kernel, q.dtype, cfg=cfg, d=D),
        num_stages=cfg["num_stages"], **dot_options(q.dtype))
    return out, lse, torch.empty(0, dtype=torch.uint8, device=q.device), perm


@on_tensor_device
def backward(q, k, v, out, dout, lse, groups, bits, perm, topk: int, scale: float):
    """out, dout, lse contiguous; q, k, v as strided_inputs takes them."""
    B, H, L, D = q.shape
    q, k, v, strides = strided_inputs(q, k, v)
    cfg = _config(L, q.dtype, "bwd", D)
    block = cfg["BLOCK_M"]
    bd = pow2(D, lo=16)
    delta = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    _delta_kernel[(triton.cdiv(B * H * L, 64),)](out, dout, delta, B * H * L, D=D, BLOCK_D=bd, BLOCK_R=64,
                                                 num_warps=4)
    skip = _skip()
    if topk:
        # token order, one group spanning the row: fixed tiles from 0 and the kept-set bitmask
        perm = torch.arange(L, device=q.device, dtype=torch.int64).expand(B, L).contiguous()
        gs, tab, ntile, ng = tables(None, perm, B, L, block)
        nb = bits.shape[-1]
        mask_groups = False
    else:
        gs, tab, ntile, ng = tables(groups, perm, B, L, block, skip)
        nb = 1
        bits = torch.zeros(1, dtype=torch.uint8, device=q.device)
        mask_groups = groups is not None and not skip
    dq, dk, dv = (torch.empty((B, H, L, D), dtype=q.dtype, device=q.device) for _ in range(3))
    common = dict(MASK_GROUPS=mask_groups, USE_BITS=bool(topk), D=D, BLOCK_D=bd, BLOCK_M=block,
                  BLOCK_N=cfg["BLOCK_N"], BGC=BG, WHOLE_TILES=_whole_tiles(q.dtype, mask_groups, bool(topk), L, D),
                  **dot_options(q.dtype))
    grid = _grid(B, H, L, block)
    _attn_bwd_dkdv_kernel[grid](q, k, v, dout, lse, delta, dk, dv, perm, gs, tab, ntile, ng, bits,
                                float(scale), *strides, L, H, L + 1, nb,
                                num_warps=_warps(_attn_bwd_dkdv_kernel, q.dtype, bool(topk), cfg, D),
                                num_stages=cfg["num_stages"], **common)
    _attn_bwd_dq_kernel[grid](q, k, v, dout, lse, delta, dq, perm, gs, tab, ntile, ng, bits,
                              float(scale), *strides, L, H, L + 1, nb,
                              num_warps=_warps(_attn_bwd_dq_kernel, q.dtype, cfg=cfg, d=D),
                              num_stages=cfg["num_stages_dq"], **common)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile cases (tests/test_triton_compile.py): the GPU launches at d = 64.
# ----------------------------------------------------------------------------------------------
def _aligned(sig: dict) -> List[str]:
    # pointers, and the strides a launch sees as multiples of 16 (row strides of D = 64 views)
    return [n for n, t in sig.items() if t.startswith("*") or n in ("SB", "SH", "SL")]


_TABLE_SIG = dict(PERM="*i64", GS="*i64", TAB="*i32", NTILE="*i32", NG="*i32")
_STRIDES = dict(SB="i32", SH="i32", SL="i32")


def _tiles(dtype, tiles, d, phase, prec="ieee", kernel=None):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): the default GPU configuration (num_warps None:
    _warps decides), or tiles, a variant bench/gpu_check.sh times through PYSSL_HOMATTN_TRITON."""
    if tiles is None:
        b, _, stages = _gpu_tiles(dtype, d, phase, prec)
        return b, b, None, _stages(stages, kernel)
    return tiles


def _fwd_case(dtype, mask_groups, tiles=None, d=64, prec="ieee"):
    t = "*" + _TL_NAME[dtype]
    sig = dict(Q=t, K=t, V=t, O=t, LSE="*fp32", **_TABLE_SIG, scale="fp32", **_STRIDES, L="i32", H="i32",
               TM="i32", MASK_GROUPS="constexpr", FOLD_SCALE="constexpr", D="constexpr", BLOCK_D="constexpr",
               BLOCK_M="constexpr", BLOCK_N="constexpr", BGC="constexpr", DOT_FP32="constexpr",
               DOT_PRECISION="constexpr")
    bm, bn, nw, ns = _tiles(dtype, tiles, d, "fwd", prec)
    const = dict(MASK_GROUPS=mask_groups, FOLD_SCALE=_fold_scale(dtype, 1.0), D=d, BLOCK_D=pow2(d, lo=16), BLOCK_M=bm, BLOCK_N=bn, BGC=BG,
                 **dot_options(dtype, interpret=False, fp32_precision=prec))
    return (_attn_fwd_kernel, sig, const, dict(num_warps=nw or _warps(_attn_fwd_kernel, dtype, d=d, prec=prec),
                                               num_stages=ns),
            _aligned(sig))


def _topk_case(dtype, l_pad, d=64, prec="ieee"):
    t = "*" + _TL_NAME[dtype]
    sig = dict(Q=t, K=t, V=t, O=t, LSE="*fp32", BITS="*u8", G="*i64", scale="fp32", **_STRIDES, L="i32", H="i32",
               NB="i32", KTH="i32", HAS_GROUPS="constexpr", D="constexpr", BLOCK_D="constexpr",
               BLOCK_M="constexpr", L_PAD="constexpr", DOT_FP32="constexpr", DOT_PRECISION="constexpr")
    const = dict(HAS_GROUPS=True, D=d, BLOCK_D=pow2(d, lo=16), BLOCK_M=16, L_PAD=l_pad,
                 **dot_options(dtype, interpret=False, fp32_precision=prec))
    return (_attn_topk_fwd_kernel, sig, const, dict(num_warps=_topk_warps(dtype, d)), _aligned(sig))


def _topk_stream_case(dtype, d=64, has_groups=True, prec="ieee"):
    t = "*" + _TL_NAME[dtype]
    sig = dict(Q=t, K=t, V=t, O=t, LSE="*fp32", BITS="*u8", G="*i64", scale="fp32", **_STRIDES, L="i32", H="i32",
               NB="i32", TOPK="i32", HAS_GROUPS="constexpr", D="constexpr", BLOCK_D="constexpr",
               BLOCK_M="constexpr", BLOCK_N="constexpr", DOT_FP32="constexpr", DOT_PRECISION="constexpr")
    bm, bn, _, ns = _tiles(dtype, None, d, "fwd", prec)
    const = dict(HAS_GROUPS=has_groups, D=d, BLOCK_D=pow2(d, lo=16), BLOCK_M=bm, BLOCK_N=bn,
                 **dot_options(dtype, interpret=False, fp32_precision=prec))
    return (_attn_topk_stream_fwd_kernel, sig, const,
            dict(num_warps=_warps(_attn_topk_stream_fwd_kernel, dtype, d=d, prec=prec), num_stages=ns),
            _aligned(sig))


def _bwd_case(kernel, dtype, use_bits, mask_groups=False, tiles=None, d=64, prec="ieee", L=197):
    t = "*" + _TL_NAME[dtype]
    names = ["Q", "K", "V", "DO", "LSE", "DELTA"] + (["DK", "DV"] if kernel is _attn_bwd_dkdv_kernel else ["DQ"])
    sig = {n: (t if n in ("Q", "K", "V", "DO", "DK", "DV", "DQ") else "*fp32") for n in names}
    sig.update(**_TABLE_SIG, BITS="*u8", scale="fp32", **_STRIDES, L="i32", H="i32", TM="i32", NB="i32",
               MASK_GROUPS="constexpr", USE_BITS="constexpr", D="constexpr", BLOCK_D="constexpr",
               BLOCK_M="constexpr", BLOCK_N="constexpr", BGC="constexpr", DOT_FP32="constexpr",
               DOT_PRECISION="constexpr", WHOLE_TILES="constexpr")
    bm, bn, nw, ns = _tiles(dtype, tiles, d, "bwd", prec, kernel)
    const = dict(MASK_GROUPS=mask_groups, USE_BITS=use_bits, D=d, BLOCK_D=pow2(d, lo=16), BLOCK_M=bm, BLOCK_N=bn,
                 BGC=BG, WHOLE_TILES=_whole_tiles(dtype, mask_groups, use_bits, L, d),
                 **dot_options(dtype, interpret=False, fp32_precision=prec))
    return (kernel, sig, const, dict(num_warps=nw or _warps(kernel, dtype, use_bits, d=d, prec=prec), num_stages=ns),
            _aligned(sig))


def _plan_case(l_pad, skip):
    sig = dict(GS="*i64", TAB="*i32", NTILE="*i32", NG="*i32", L="i32", TM="i32", BLOCK="constexpr",
               SKIP="constexpr", L_PAD="constexpr")
    return (_plan_kernel, sig, dict(BLOCK=64, SKIP=skip, L_PAD=l_pad), dict(num_warps=_plan_warps(l_pad)),
            _aligned(sig))


def _delta_case(dtype):
    t = "*" + _TL_NAME[dtype]
    sig = dict(O=t, DO=t, DELTA="*fp32", R="i32", D="constexpr", BLOCK_D="constexpr", BLOCK_R="constexpr")
    return (_delta_kernel, sig, dict(D=64, BLOCK_D=64, BLOCK_R=64), dict(num_warps=4), _aligned(sig))


COMPILE_CASES = [
    _plan_case(256, True),
    _plan_case(4096, True),
    _plan_case(MAX_PLAN_L, False),
    _delta_case(torch.bfloat16),
    _delta_case(torch.float32),
    _fwd_case(torch.bfloat16, False),
    _fwd_case(torch.float16, True),
    _fwd_case(torch.float32, False),
    _topk_case(torch.bfloat16, 256),
    _topk_case(torch.float16, 512),
    _topk_case(torch.float32, max_topk_l(torch.float32, 64)),
    _topk_stream_case(torch.bfloat16),
    _topk_stream_case(torch.float16, has_groups=False),
    _topk_stream_case(torch.float32),
    _bwd_case(_attn_bwd_dkdv_kernel, torch.bfloat16, False),
    _bwd_case(_attn_bwd_dq_kernel, torch.bfloat16, False),
    _bwd_case(_attn_bwd_dkdv_kernel, torch.bfloat16, True),
    _bwd_case(_attn_bwd_dq_kernel, torch.bfloat16, True),
    _bwd_case(_attn_bwd_dkdv_kernel, torch.bfloat16, False, mask_groups=True),
    _bwd_case(_attn_bwd_dq_kernel, torch.bfloat16, False, mask_groups=True),
    _bwd_case(_attn_bwd_dkdv_kernel, torch.bfloat16, False, L=4096),
    _bwd_case(_attn_bwd_dq_kernel, torch.bfloat16, False, L=4096),
    _bwd_case(_attn_bwd_dkdv_kernel, torch.float16, False, L=4096, d=128),
    _bwd_case(_attn_bwd_dq_kernel, torch.float16, False, L=4096, d=128),
    _bwd_case(_attn_bwd_dkdv_kernel, torch.float32, False),
    _bwd_case(_attn_bwd_dq_kernel, torch.float32, False),
    _bwd_case(_attn_bwd_dkdv_kernel, torch.float32, True),
    # the variants bench/gpu_check.sh times (PYSSL_HOMATTN_TRITON): "num_stages=3" and
    # "fwd.BLOCK_M=128,fwd.num_warps=8,fwd.num_stages=3" (128-row key tiles spill in dK/dV)
    _fwd_case(torch.bfloat16, False, tiles=(64, 64, 4, 3)),
    _bwd_case(_attn_bwd_dkdv_kernel, torch.bfloat16, False, tiles=(64, 64, 4, 3)),
    _bwd_case(_attn_bwd_dq_kernel, torch.bfloat16, False, tiles=(64, 64, 4, 3)),
    _fwd_case(torch.bfloat16, False, tiles=(128, 64, 8, 3)),
    # wider heads (ViT-H's d = 80 runs at BLOCK_D = 128): every _GPU_TILES entry and the longest
    # top-k row each admits
    *[case for dtype in (torch.bfloat16, torch.float32) for d in (80, 256) for case in (
        _fwd_case(dtype, False, d=d), _fwd_case(dtype, True, d=d),
        _bwd_case(_attn_bwd_dkdv_kernel, dtype, False, d=d), _bwd_case(_attn_bwd_dq_kernel, dtype, False, d=d),
        _bwd_case(_attn_bwd_dkdv_kernel, dtype, True, d=d), _bwd_case(_attn_bwd_dq_kernel, dtype, True, d=d),
        _bwd_case(_attn_bwd_dkdv_kernel, dtype, False, mask_groups=True, d=d),
        _bwd_case(_attn_bwd_dq_kernel, dtype, False, mask_groups=True, d=d),
        _topk_case(dtype, max_topk_l(dtype, d), d=d), _topk_stream_case(dtype, d=d))],
    _topk_case(torch.bfloat16, max_topk_l(torch.bfloat16, 128), d=128),
    _topk_case(torch.float32, max_topk_l(torch.float32, 128), d=128),
    # float32 under torch's TF32 setting (dot_options): the same tiles on tensor cores
    _fwd_case(torch.float32, False, prec="tf32"),
    _fwd_case(torch.float32, True, prec="tf32"),
    _topk_case(torch.float32, max_topk_l(torch.float32, 64), prec="tf32"),
    _topk_stream_case(torch.float32, prec="tf32"),
    _bwd_case(_attn_bwd_dkdv_kernel, torch.float32, False, prec="tf32"),
    _bwd_case(_attn_bwd_dq_kernel, torch.float32, False, prec="tf32"),
    _bwd_case(_attn_bwd_dkdv_kernel, torch.float32, True, prec="tf32"),
    _bwd_case(_attn_bwd_dq_kernel, torch.float32, True, prec="tf32"),
    _bwd_case(_attn_bwd_dq_kernel, torch.float32, False, mask_groups=True, prec="tf32"),
    _bwd_case(_attn_bwd_dkdv_kernel, torch.float32, False, mask_groups=True, prec="tf32"),
    *[case for d in (128, 256) for case in (
        _fwd_case(torch.float32, True, d=d, prec="tf32"),
        _bwd_case(_attn_bwd_dkdv_kernel, torch.float32, True, d=d, prec="tf32"),
        _bwd_case(_attn_bwd_dq_kernel, torch.float32, False, d=d, prec="tf32"),
        _bwd_case(_attn_bwd_dq_kernel, torch.float32, False, mask_groups=True, d=d, prec="tf32"))],
]

__all__ = ["forward", "backward", "strided_inputs", "plan", "tables", "MAX_PLAN_L", "visited_fraction", "max_topk_l",
           "topk_shared_bytes", "topk_whole_rows", "shared_memory", "BG",
           "COMPILE_CASES"]
