"""Triton backend of the margin-loss engine (see pyssl/ops/_margin_engine_contract.md).

Two entry points, both working directly on the raw features x (N, D) and raw class centers
w (C, D) (float32, bfloat16 or float16, the same dtype), with classes = S (C',) int64 unique
class ids or None (= all C classes) and pos_col (N, L) int64 column indices into S (-1 = padding):

    mlcd_lse(x, w, classes, pos_col, scale) -> (lse_neg (N,) f32, pos_cos (N, L) f32)
    mlcd_grad(x, w, classes, pos_col, scale, lse_total, gneg, gpos)
        -> (dx (N, D) x.dtype, dw (C, D) w.dtype)

plus mlcd_lse_stats / combine_lse_stats / lse_from_stats, the per-row (max, sum) form of the
forward that a model-parallel shard all-reduces (max, then the rescaled sums) before the log.

Nothing of size N x C' is ever materialised and w[S] is never gathered into a copy: every kernel
loads the rows of w it needs by pointer arithmetic on the class ids. The cosine matrix is
recomputed tile by tile wherever it is needed (forward, dx, dw), the way FlashAttention
recomputes P in its backward: at MLCD sizes (C' up to millions) recomputing is far cheaper than
storing.

Kernels (each has a header comment with tiling, residency and traffic):
    _row_inv_norm_kernel   1 / max(||row||, 1e-12) for rows of x, or rows w[S_j] by index
    _mlcd_lse_fwd_kernel   online (max, sum) of exp(logit) over the negative columns, per split
    _pos_cos_kernel        cos at the L positive columns of each row, by indexed dot products
    _mlcd_grad_dx_kernel   dx with the normalization backward fused, no atomics
    _mlcd_grad_dw_kernel   dw[S] with the normalization backward fused, no atomics

Interpreter notes (TRITON_INTERPRET=1, CPU tensors): the interpreter does bf16 arithmetic
wrongly, so every load is converted to float32 before any arithmetic, and under the interpreter
(DOT_FP32=True) tl.dot operands are converted to float32 too (after the same rounding to the
input dtype that the GPU path applies to G). On the GPU the dot operands stay in the input
dtype (tensor cores; fp32 accumulation), and fp32 inputs use input_precision="ieee" (no TF32).

Offsets into x and w are computed in int64: with millions of classes C * D exceeds 2**31.
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
_EPS = 1e-12  # the contract's max(||v||, 1e-12), as in torch.nn.functional.normalize

_TL_DTYPE_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# ----------------------------------------------------------------------------------------------
# Device helpers (inlined into the kernels).
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dot_tile(X, W, rows, ids, rmask, cmask, D, stride_x, stride_w,
              BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
              DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Raw dot products x[rows] . w[ids]^T as a (BLOCK_N, BLOCK_C) float32 tile, D in BLOCK_D steps.

    The w tile is loaded directly transposed, (BLOCK_D, BLOCK_C), from the row pointers
    w + id * stride_w, so no gathered copy of w[S] exists and no tl.trans is needed. Masked
    rows/columns load zeros and so give 0 in the tile.
    """
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    x_rows = X + rows.to(tl.int64)[:, None] * stride_x     # (BLOCK_N, 1) row starts
    w_rows = W + ids.to(tl.int64)[None, :] * stride_w      # (1, BLOCK_C) row starts
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < D
        xt = tl.load(x_rows + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        wt = tl.load(w_rows + d[:, None], mask=dmask[:, None] & cmask[None, :], other=0.0)
        if DOT_FP32:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(xt, wt, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _positive_tile(POS, GPOS, rows, rmask, cols, L: tl.constexpr, WITH_GPOS: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Which entries of a (rows x cols) tile are positives of their row, and their gpos.

    Compares each column index with the L pos_col entries of the row (L is a constexpr, the loop
    is unrolled); padding (-1) never matches. The L column vectors are re-read per tile: they
    are tiny (BLOCK_N * L int64, L1/L2 resident) next to the BLOCK_N x BLOCK_C x D tile dot.
    """
    is_pos = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.int1)
    gpos = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    base = rows.to(tl.int64) * L
    for i in tl.static_range(L):
        p = tl.load(POS + base + i, mask=rmask, other=-1)
        hit = p[:, None] == cols[None, :]
        is_pos = is_pos | hit
        if WITH_GPOS:
            g = tl.load(GPOS + base + i, mask=rmask, other=0.0)
            gpos = tl.where(hit, g[:, None], gpos)
    return is_pos, gpos


@triton.jit
def _grad_tile(cos, rows, rmask, cols, cmask, POS, GPOS, lse_log2, gneg_scale, scale_log2e,
               L: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """G of the contract on one tile, from the unclamped cos tile (float32).

    G = gneg * scale * exp(scale * clamp(cos) - lse_total) on negatives (in base 2:
    exp2(clamp(cos) * scale * log2e - lse_total * log2e)), gpos at the positives, 0 on
    invalid rows/columns.
    """
    is_pos, gpos = _positive_tile(POS, GPOS, rows, rmask, cols, L, True, BLOCK_N, BLOCK_C)
    cos_c = tl.minimum(tl.maximum(cos, -1.0), 1.0)
    neg = gneg_scale[:, None] * tl.exp2(cos_c * scale_log2e - lse_log2[:, None])
    g = tl.where(is_pos, gpos, neg)
    return tl.where(rmask[:, None] & cmask[None, :], g, 0.0)


# ----------------------------------------------------------------------------------------------
# _row_inv_norm_kernel
#   Computes: out[r] = 1 / max(||X[idx[r]]||, 1e-12) for r < R (idx = arange when HAS_IDX=False).
#   Tiling:   grid (cdiv(R, BLOCK_R),); a program owns BLOCK_R rows and walks D in BLOCK_D steps.
#   Registers: one (BLOCK_R, BLOCK_D) fp32 tile and the (BLOCK_R,) running sum of squares.
#   Traffic:  each indexed row is read once (R * D elements), R floats written. w[S] is read
#             through the ids, never copied.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _row_grad_stats(RX, LSE, GNEG, rows, rmask, scale):
    """Per-row inputs of the gradient tile: 1/||x||, lse_total in base 2, gneg * scale."""
    rx = tl.load(RX + rows, mask=rmask, other=0.0)
    lse_log2 = tl.load(LSE + rows, mask=rmask, other=0.0) * 1.4426950408889634
    gneg_scale = tl.load(GNEG + rows, mask=rmask, other=0.0) * scale
    return rx, lse_log2, gneg_scale


@triton.jit
def _cos_grad_tile(X, W, POS, GPOS, rows, rmask, ids, cols, cmask, rx, rw, lse_log2, gneg_scale,
                   D, stride_x, stride_w, scale_log2e, L: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The recomputed (unclamped) cos tile and its gradient tile G, shared by both backwards."""
    cos = _dot_tile(X, W, rows, ids, rmask, cmask, D, stride_x, stride_w,
                    BLOCK_N, BLOCK_C, BLOCK_D, DOT_FP32, DOT_PRECISION)
    cos = cos * rx[:, None] * rw[None, :]
    g = _grad_tile(cos, rows, rmask, cols, cmask, POS, GPOS, lse_log2, gneg_scale,
                   scale_log2e, L, BLOCK_N, BLOCK_C)
    return cos, g


@triton.jit
def _row_inv_norm_kernel(X, IDX, OUT, R, D, stride_x,
                         HAS_IDX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < R
    if HAS_IDX:
        ids = tl.load(IDX + r, mask=rmask, other=0)
    else:
        ids = r
    rows = X + ids.to(tl.int64)[:, None] * stride_x
    ss = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        v = tl.load(rows + d[None, :], mask=rmask[:, None] & (d < D)[None, :], other=0.0)
        v = v.to(tl.float32)
        ss += tl.sum(v * v, axis=1)
    inv = 1.0 / tl.maximum(tl.sqrt_rn(ss), 1e-12)
    tl.store(OUT + r, inv, mask=rmask)


# ----------------------------------------------------------------------------------------------
# _mlcd_lse_fwd_kernel
#   Computes: for each row n and split s, the online-softmax statistics over the negative
#             columns of split s: max_s[n] = max_j logit_nj (natural units) and
#             sum_s[n] = sum_j exp(logit_nj - max_s[n]), logit = scale * clamp(cos, -1, 1),
#             positives and out-of-range columns masked to -inf inside the tile.
#   Tiling:   grid (cdiv(N, BLOCK_N), SPLITS). A program owns a row block and the contiguous
#             column-tile range [s * tiles_per_split, (s+1) * tiles_per_split); each BLOCK_C
#             tile is a tl.dot over D in BLOCK_D steps (fp32 accumulate).
#   Registers: the (BLOCK_N, BLOCK_C) fp32 accumulator, rx (BLOCK_N,), rw/ids (BLOCK_C,) and the
#             running (max, sum) per row; the x / w operand tiles are staged through shared
#             memory by tl.dot (software-pipelined by the compiler, num_stages).
#   Traffic:  w[S] is read once per row block (cdiv(N, BLOCK_N) * C' * D elements, the dominant
#             term; BLOCK_N large amortises it), x once per column tile from L2. Written:
#             2 * SPLITS * N floats. The split form lets the grid fill the GPU when N is small,
#             and is the same (max, sum) that a model-parallel shard all-reduces.
#   Base 2: exp2 with log2(e) folded into the scale (one multiply instead of exp's range
#             reduction); the stored max is converted back to natural units.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _mlcd_lse_fwd_kernel(X, W, CLS, RX, RW, POS, MAX_OUT, SUM_OUT,
                         N, C, D, stride_x, stride_w, scale_log2e, tiles_per_split,
                         L: tl.constexpr, HAS_CLASSES: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                         DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    rx = tl.load(RX + rows, mask=rmask, other=0.0)

    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)  # running max, base-2 units
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)                 # running sum of exp2(t - m)
    t_begin = split * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, tl.cdiv(C, BLOCK_C))
    for t in range(t_begin, t_end):
        cols = t * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        if HAS_CLASSES:
            ids = tl.load(CLS + cols, mask=cmask, other=0)
        else:
            ids = cols
        rw = tl.load(RW + cols, mask=cmask, other=0.0)
        acc = _dot_tile(X, W, rows, ids, rmask, cmask, D, stride_x, stride_w,
                        BLOCK_N, BLOCK_C, BLOCK_D, DOT_FP32, DOT_PRECISION)
        cos = tl.minimum(tl.maximum(acc * rx[:, None] * rw[None, :], -1.0), 1.0)
        is_pos, _unused = _positive_tile(POS, POS, rows, rmask, cols, L, False, BLOCK_N, BLOCK_C)
        t2 = tl.where(cmask[None, :] & (is_pos == 0), cos * scale_log2e, float("-inf"))
        m_new = tl.maximum(m, tl.max(t2, axis=1))
        # A row that has seen only -inf so far keeps m_new = -inf; rescale around 0 then, so
        # that exp2(-inf - (-inf)) = NaN never happens (exp2(-inf - 0) = 0 is what we want).
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp2(m - m_ref) + tl.sum(tl.exp2(t2 - m_ref[:, None]), axis=1)
        m = m_new

    out = split.to(tl.int64) * N + rows
    tl.store(MAX_OUT + out, m * 0.6931471805599453, mask=rmask)  # base 2 -> natural units
    tl.store(SUM_OUT + out, s, mask=rmask)


# ----------------------------------------------------------------------------------------------
# _pos_cos_kernel
#   Computes: pos_cos[n, i] = clamp(x̂_n . ŵ_{S[pos_col[n, i]]}, -1, 1), 0 at padding.
#   Tiling:   grid (cdiv(N * L, BLOCK_P),); a program owns BLOCK_P flattened (n, i) pairs and
#             walks D in BLOCK_D steps with elementwise products + row sums (N * L dot products
#             of length D: no tensor-core shape to exploit).
#   Registers: two (BLOCK_P, BLOCK_D) fp32 tiles and the (BLOCK_P,) accumulator.
#   Traffic:  2 * N * L * D elements read (x rows re-read L times, from L1/L2).
# ----------------------------------------------------------------------------------------------
@triton.jit
def _pos_cos_kernel(X, W, CLS, RX, RW, POS, OUT, NL, D, stride_x, stride_w,
                    L: tl.constexpr, HAS_CLASSES: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    pairs = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = pairs < NL
    col = tl.load(POS + pairs, mask=pmask, other=-1)
    valid = pmask & (col >= 0)
    col = tl.where(valid, col, 0)   # padding reads column 0 (masked below), never index -1
    if HAS_CLASSES:
        ids = tl.load(CLS + col, mask=valid, other=0)
    else:
        ids = col
    rows = pairs // L
    x_rows = X + rows.to(tl.int64)[:, None] * stride_x
    w_rows = W + ids.to(tl.int64)[:, None] * stride_w
    acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m2 = valid[:, None] & (d < D)[None, :]
        xt = tl.load(x_rows + d[None, :], mask=m2, other=0.0).to(tl.float32)
        wt = tl.load(w_rows + d[None, :], mask=m2, other=0.0).to(tl.float32)
        acc += tl.sum(xt * wt, axis=1)
    rx = tl.load(RX + rows, mask=valid, other=0.0)
    rw = tl.load(RW + col, mask=valid, other=0.0)
    cos = tl.minimum(tl.maximum(acc * rx * rw, -1.0), 1.0)
    tl.store(OUT + pairs, tl.where(valid, cos, 0.0), mask=pmask)


# ----------------------------------------------------------------------------------------------
# _mlcd_grad_dx_kernel
#   Computes: dx_n = rx_n * (dx̂_n - x̂_n (x̂_n . dx̂_n)) with dx̂ = G . Ŵ_S. Since
#             Ŵ_S = rw ⊙ W_S, dx̂ = (G ⊙ rw) . W_S, accumulated straight from the raw w rows; and
#             x̂_n . dx̂_n = sum_j G_nj cos_nj (unclamped cos) = q_n, so the normalization backward
#             needs only q, accumulated alongside: dx = rx * (acc - x * rx * q).
#   Tiling:   grid (cdiv(N, BLOCK_N), cdiv(D, BLOCK_DO)). A program owns a row block and a
#             BLOCK_DO slice of the output columns, and loops over ALL column tiles of S:
#             recompute the (BLOCK_N, BLOCK_C) cos tile over the full D (tl.dot in BLOCK_D steps),
#             form G, then acc += (G * rw) . w[S_tile, do-slice] (tl.dot; G cast to the input
#             dtype for bf16/fp16 like FlashAttention casts P). Each output element is owned by
#             exactly one program: no atomics, deterministic.
#   Registers: acc (BLOCK_N, BLOCK_DO) fp32, the cos/G tile (BLOCK_N, BLOCK_C) fp32, q and the
#             per-row vectors (rx, lse_total, gneg); operand tiles go through shared memory.
#   Traffic:  w[S] read cdiv(N, BLOCK_N) * (cdiv(D, BLOCK_DO) + 1) times over (the recompute
#             reads full rows; the product reads the do-slice); x rows from L2; dx written once.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _mlcd_grad_dx_kernel(X, W, CLS, RX, RW, POS, LSE, GNEG, GPOS, DX,
                         N, C, D, stride_x, stride_w, stride_dx, scale, scale_log2e,
                         L: tl.constexpr, HAS_CLASSES: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_DO: tl.constexpr, DOT_FP32: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    do = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    domask = do < D
    rx, lse_log2, gneg_scale = _row_grad_stats(RX, LSE, GNEG, rows, rmask, scale)

    acc = tl.zeros((BLOCK_N, BLOCK_DO), dtype=tl.float32)
    q = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        if HAS_CLASSES:
            ids = tl.load(CLS + cols, mask=cmask, other=0)
        else:
            ids = cols
        rw = tl.load(RW + cols, mask=cmask, other=0.0)
        cos, g = _cos_grad_tile(X, W, POS, GPOS, rows, rmask, ids, cols, cmask, rx, rw, lse_log2,
                                gneg_scale, D, stride_x, stride_w, scale_log2e, L,
                                BLOCK_N, BLOCK_C, BLOCK_D, DOT_FP32, DOT_PRECISION)
        q += tl.sum(g * cos, axis=1)
        w_blk = tl.load(W + ids.to(tl.int64)[:, None] * stride_w + do[None, :],
                        mask=cmask[:, None] & domask[None, :], other=0.0)
        gw = (g * rw[None, :]).to(w_blk.dtype)   # the dot runs in the input dtype on the GPU
        if DOT_FP32:
            gw = gw.to(tl.float32)
            w_blk = w_blk.to(tl.float32)
        acc = tl.dot(gw, w_blk, acc, input_precision=DOT_PRECISION)

    omask = rmask[:, None] & domask[None, :]
    x_blk = tl.load(X + rows.to(tl.int64)[:, None] * stride_x + do[None, :], mask=omask,
                    other=0.0).to(tl.float32)
    dx = rx[:, None] * (acc - x_blk * rx[:, None] * q[:, None])
    tl.store(DX + rows.to(tl.int64)[:, None] * stride_dx + do[None, :],
             dx.to(DX.dtype.element_ty), mask=omask)


# ----------------------------------------------------------------------------------------------
# _mlcd_grad_dw_kernel
#   Computes: dw[S_c] = rw_c * (dŵ_c - ŵ_c (ŵ_c . dŵ_c)) with dŵ = Gᵀ . X̂ = (G ⊙ rx)ᵀ . X and
#             ŵ_c . dŵ_c = sum_n G_nc cos_nc = r_c (unclamped cos): dw = rw * (acc - w * rw * r).
#   Tiling:   grid (cdiv(C', BLOCK_C), cdiv(D, BLOCK_DO)), the mirror image of the dx kernel: a
#             program owns a block of columns of S and a BLOCK_DO slice, loops over ALL row tiles,
#             recomputes the (BLOCK_N, BLOCK_C) cos tile, forms G and does
#             acc += (G * rx)ᵀ . x[rows, do-slice]. The result rows are stored at the class ids
#             (indexed store); S is unique, so every dw row has one owner: no atomics. Rows of dw
#             outside S are zero-filled by the caller.
#   Registers: acc (BLOCK_C, BLOCK_DO) fp32, the cos/G tile, r and the per-column rw/ids.
#   Traffic:  x read cdiv(C', BLOCK_C) * (cdiv(D, BLOCK_DO) + 1) times over (small, L2-resident
#             for typical N); w[S] rows read about twice per slice; dw[S] written once.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _mlcd_grad_dw_kernel(X, W, CLS, RX, RW, POS, LSE, GNEG, GPOS, DW,
                         N, C, D, stride_x, stride_w, stride_dw, scale, scale_log2e,
                         L: tl.constexpr, HAS_CLASSES: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_DO: tl.constexpr, DOT_FP32: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    do = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    domask = do < D
    if HAS_CLASSES:
        ids = tl.load(CLS + cols, mask=cmask, other=0)
    else:
        ids = cols
    rw = tl.load(RW + cols, mask=cmask, other=0.0)

    acc = tl.zeros((BLOCK_C, BLOCK_DO), dtype=tl.float32)
    r = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        rmask = rows < N
        rx, lse_log2, gneg_scale = _row_grad_stats(RX, LSE, GNEG, rows, rmask, scale)
        cos, g = _cos_grad_tile(X, W, POS, GPOS, rows, rmask, ids, cols, cmask, rx, rw, lse_log2,
                                gneg_scale, D, stride_x, stride_w, scale_log2e, L,
                                BLOCK_N, BLOCK_C, BLOCK_D, DOT_FP32, DOT_PRECISION)
        r += tl.sum(g * cos, axis=0)
        x_blk = tl.load(X + rows.to(tl.int64)[:, None] * stride_x + do[None, :],
                        mask=rmask[:, None] & domask[None, :], other=0.0)
        gx = (g * rx[:, None]).to(x_blk.dtype)   # the dot runs in the input dtype on the GPU
        if DOT_FP32:
            gx = gx.to(tl.float32)
            x_blk = x_blk.to(tl.float32)
        acc = tl.dot(tl.trans(gx), x_blk, acc, input_precision=DOT_PRECISION)

    omask = cmask[:, None] & domask[None, :]
    w_blk = tl.load(W + ids.to(tl.int64)[:, None] * stride_w + do[None, :], mask=omask,
                    other=0.0).to(tl.float32)
    dw = rw[:, None] * (acc - w_blk * rw[:, None] * r[:, None])
    tl.store(DW + ids.to(tl.int64)[:, None] * stride_dw + do[None, :],
             dw.to(DW.dtype.element_ty), mask=omask)


# ----------------------------------------------------------------------------------------------
# Launch configuration: a small heuristic instead of autotuning (the interpreter cannot run
# several autotune configs, and these shapes are few and regular).
# ----------------------------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _p2(n: int, lo: int = 16, hi: Optional[int] = None) -> int:
    """Next power of two of n, clamped to [lo, hi] (tl.dot needs every dimension >= 16)."""
    v = max(lo, triton.next_power_of_2(max(int(n), 1)))
    return min(v, hi) if hi is not None else v


def _config(dtype: torch.dtype, N: int, C: int, D: int, interpret: bool) -> dict:
    """Block sizes, warps and stages for every kernel, for one problem.

    GPU: tiles sized for Hopper/Ampere tensor cores; 16-bit inputs get larger tiles (half the
    shared memory per element). Interpreter: the largest sensible tiles, because the interpreter
    costs about 1 ms per program and per op, regardless of the tile size.
    """
    if interpret:
        bn, bc, bd = _p2(N, hi=128), _p2(C, hi=128), _p2(D, hi=128)
        return dict(fwd=dict(BLOCK_N=bn, BLOCK_C=bc, BLOCK_D=bd, num_warps=4, num_stages=1),
                    bwd=dict(BLOCK_N=bn, BLOCK_C=bc, BLOCK_D=bd, BLOCK_DO=_p2(D, hi=128),
                             num_warps=4, num_stages=1),
                    norm=dict(BLOCK_R=_p2(max(N, C), hi=256), BLOCK_D=bd, num_warps=4),
                    pos=dict(BLOCK_P=128, BLOCK_D=bd, num_warps=4))
    # Chosen with ptxas -v on sm_90 (tests/test_triton_compile.py compiles these): no register
    # spills, loads pipelined through shared memory (num_stages buffers) on the 16-bit path.
    # fp32 uses input_precision="ieee", i.e. FMA rather than tensor cores, so smaller tiles.
    if dtype != torch.float32:
        fwd = dict(BLOCK_N=_p2(N, hi=128), BLOCK_C=128, BLOCK_D=64, num_warps=8, num_stages=3)
        bwd = dict(BLOCK_N=64, BLOCK_C=64, BLOCK_D=64, BLOCK_DO=_p2(D, hi=256),
                   num_warps=8, num_stages=3)
    else:
        fwd = dict(BLOCK_N=_p2(N, hi=64), BLOCK_C=64, BLOCK_D=32, num_warps=8, num_stages=2)
        bwd = dict(BLOCK_N=64, BLOCK_C=32, BLOCK_D=32, BLOCK_DO=_p2(D, hi=128),
                   num_warps=8, num_stages=2)
    return dict(fwd=fwd, bwd=bwd,
                norm=dict(BLOCK_R=32, BLOCK_D=_p2(D, hi=128), num_warps=4),
                pos=dict(BLOCK_P=64, BLOCK_D=_p2(D, hi=128), num_warps=4))


def _num_splits(device: torch.device, row_blocks: int, col_tiles: int, interpret: bool) -> int:
    """Column splits of the forward so the grid is about 4 waves of the SMs (2 in the interpreter,
    which keeps the program count small and still exercises the split combine)."""
    if interpret or device.type != "cuda":
        return max(1, min(2, col_tiles))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(col_tiles, triton.cdiv(4 * sms, max(row_blocks, 1))))


# ----------------------------------------------------------------------------------------------
# Python entry points.
# ----------------------------------------------------------------------------------------------
def _prepare(x: torch.Tensor, w: torch.Tensor, classes: Optional[torch.Tensor],
             pos_col: torch.Tensor):
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x (N, D) and w (C, D) expected, got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.dtype != w.dtype or x.dtype not in _TL_DTYPE_NAME:
        raise ValueError(f"x and w must share a dtype in float32/bfloat16/float16, got {x.dtype}, {w.dtype}")
    if pos_col.dim() != 2 or pos_col.shape[0] != x.shape[0]:
        raise ValueError(f"pos_col must be (N, L) with N = {x.shape[0]}, got {tuple(pos_col.shape)}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    w = w if w.stride(-1) == 1 else w.contiguous()
    pos_col = pos_col.to(torch.int64).contiguous()
    if classes is not None:
        classes = classes.to(device=x.device, dtype=torch.int64).contiguous()
        Cp = classes.numel()
    else:
        Cp = w.shape[0]
    return x, w, classes, pos_col, Cp


def _inv_norms(x, w, classes, Cp, cfg):
    """(rx (N,), rw (C',)) float32: 1 / max(||row||, 1e-12) of x and of the rows w[S]."""
    N, D = x.shape
    rx = torch.empty(N, device=x.device, dtype=torch.float32)
    rw = torch.empty(Cp, device=x.device, dtype=torch.float32)
    c = cfg["norm"]
    for src, idx, out, R in ((x, None, rx, N), (w, classes, rw, Cp)):
        if R == 0:
            continue
        _row_inv_norm_kernel[(triton.cdiv(R, c["BLOCK_R"]),)](
            src, idx if idx is not None else out, out, R, D, src.stride(0),
            HAS_IDX=idx is not None, BLOCK_R=c["BLOCK_R"], BLOCK_D=c["BLOCK_D"],
            num_warps=c["num_warps"])
    return rx, rw


def _common_flags():
    """(interpreting, the constexprs every dot-using kernel takes)."""
    interpret = _interpreting()
    return interpret, dict(DOT_FP32=interpret, DOT_PRECISION="ieee")


def combine_lse_stats(row_max: torch.Tensor, row_sum: torch.Tensor, dim: int = 0):
    """Merge per-part online-softmax statistics along dim: returns (max, sum) with
    sum = Σ_k sum_k * exp(max_k - max). Parts with no column (max = -inf, sum = 0) drop out.
    A model-parallel shard does the same across ranks (all-reduce max, then sum)."""
    m = row_max.amax(dim)
    m_ref = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    s = (row_sum * torch.exp(row_max - m_ref.unsqueeze(dim))).sum(dim)
    return m, s


def lse_from_stats(row_max: torch.Tensor, row_sum: torch.Tensor) -> torch.Tensor:
    """log Σ exp = max + log(sum); -inf for a row with no column."""
    return torch.where(row_sum > 0, row_max + torch.log(row_sum),
                       torch.full_like(row_max, float("-inf")))


def _lse_stats(x, w, classes, pos_col, scale, Cp, cfg, splits):
    N, D = x.shape
    L = pos_col.shape[1]
    interpret, flags = _common_flags()
    f = cfg["fwd"]
    row_blocks = triton.cdiv(N, f["BLOCK_N"])
    col_tiles = triton.cdiv(Cp, f["BLOCK_C"])
    if splits is None:
        splits = _num_splits(x.device, row_blocks, col_tiles, interpret)
    splits = max(1, min(int(splits), col_tiles))
    tiles_per_split = triton.cdiv(col_tiles, splits)
    splits = triton.cdiv(col_tiles, tiles_per_split)   # drop splits that would own no tile
    rx, rw = _inv_norms(x, w, classes, Cp, cfg)
    part_max = torch.empty(splits, N, device=x.device, dtype=torch.float32)
    part_sum = torch.empty(splits, N, device=x.device, dtype=torch.float32)
    _mlcd_lse_fwd_kernel[(row_blocks, splits)](
        x, w, classes if classes is not None else pos_col, rx, rw, pos_col, part_max, part_sum,
        N, Cp, D, x.stride(0), w.stride(0), float(scale) * LOG2E, tiles_per_split,
        L=L, HAS_CLASSES=classes is not None, BLOCK_N=f["BLOCK_N"], BLOCK_C=f["BLOCK_C"],
        BLOCK_D=f["BLOCK_D"], num_warps=f["num_warps"], num_stages=f["num_stages"], **flags)
    row_max, row_sum = combine_lse_stats(part_max, part_sum, dim=0)
    return row_max, row_sum, rx, rw


def mlcd_lse_stats(x: torch.Tensor, w: torch.Tensor, classes: Optional[torch.Tensor],
                   pos_col: torch.Tensor, scale: float,
                   splits: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row online-softmax statistics over the negative columns: (row_max (N,), row_sum (N,))
    float32 with lse_neg = row_max + log(row_sum) (see lse_from_stats). This is the form a
    model-parallel shard all-reduces before taking the log (combine_lse_stats)."""
    x, w, classes, pos_col, Cp = _prepare(x, w, classes, pos_col)
    N = x.shape[0]
    if N == 0 or Cp == 0:
        return (torch.full((N,), float("-inf"), device=x.device, dtype=torch.float32),
                torch.zeros(N, device=x.device, dtype=torch.float32))
    cfg = _config(x.dtype, N, Cp, x.shape[1], _interpreting())
    row_max, row_sum, _, _ = _lse_stats(x, w, classes, pos_col, scale, Cp, cfg, splits)
    return row_max, row_sum


def mlcd_lse(x: torch.Tensor, w: torch.Tensor, classes: Optional[torch.Tensor],
             pos_col: torch.Tensor, scale: float,
             splits: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(lse_neg (N,) f32, pos_cos (N, L) f32) of the contract; splits overrides the number of
    column splits of the forward (tests)."""
    x, w, classes, pos_col, Cp = _prepare(x, w, classes, pos_col)
    N, D = x.shape
    L = pos_col.shape[1]
    if N == 0 or Cp == 0:
        return (torch.full((N,), float("-inf"), device=x.device, dtype=torch.float32),
                torch.zeros(N, L, device=x.device, dtype=torch.float32))
    cfg = _config(x.dtype, N, Cp, D, _interpreting())
    row_max, row_sum, rx, rw = _lse_stats(x, w, classes, pos_col, scale, Cp, cfg, splits)
    lse_neg = lse_from_stats(row_max, row_sum)
    pos_cos = torch.empty(N, L, device=x.device, dtype=torch.float32)
    if L > 0:
        p = cfg["pos"]
        _pos_cos_kernel[(triton.cdiv(N * L, p["BLOCK_P"]),)](
            x, w, classes if classes is not None else pos_col, rx, rw, pos_col, pos_cos,
            N * L, D, x.stride(0), w.stride(0),
            L=L, HAS_CLASSES=classes is not None, BLOCK_P=p["BLOCK_P"], BLOCK_D=p["BLOCK_D"],
            num_warps=p["num_warps"])
    return lse_neg, pos_cos


def mlcd_grad(x: torch.Tensor, w: torch.Tensor, classes: Optional[torch.Tensor],
              pos_col: torch.Tensor, scale: float, lse_total: torch.Tensor, gneg: torch.Tensor,
              gpos: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dx (N, D) x.dtype, dw (C, D) w.dtype) of the contract; rows of dw outside S are zero."""
    x, w, classes, pos_col, Cp = _prepare(x, w, classes, pos_col)
    N, D = x.shape
    C = w.shape[0]
    L = pos_col.shape[1]
    dx = torch.empty(N, D, device=x.device, dtype=x.dtype)
    # With S = all classes every dw row is written by the kernel; otherwise the rows outside S
    # must be zero.
    dw = (torch.empty if classes is None else torch.zeros)(C, D, device=w.device, dtype=w.dtype)
    if N == 0 or Cp == 0 or D == 0:
        return dx.zero_(), dw.zero_()
    lse_total = lse_total.to(torch.float32).contiguous()
    gneg = gneg.to(torch.float32).contiguous()
    gpos = gpos.to(torch.float32).contiguous()
    cfg = _config(x.dtype, N, Cp, D, _interpreting())
    _, flags = _common_flags()
    rx, rw = _inv_norms(x, w, classes, Cp, cfg)
    b = cfg["bwd"]
    cls = classes if classes is not None else pos_col
    common = dict(L=L, HAS_CLASSES=classes is not None, BLOCK_N=b["BLOCK_N"],
                  BLOCK_C=b["BLOCK_C"], BLOCK_D=b["BLOCK_D"], BLOCK_DO=b["BLOCK_DO"],
                  num_warps=b["num_warps"], num_stages=b["num_stages"], **flags)
    scale = float(scale)
    _mlcd_grad_dx_kernel[(triton.cdiv(N, b["BLOCK_N"]), triton.cdiv(D, b["BLOCK_DO"]))](
        x, w, cls, rx, rw, pos_col, lse_total, gneg, gpos, dx,
        N, Cp, D, x.stride(0), w.stride(0), dx.stride(0), scale, scale * LOG2E, **common)
    _mlcd_grad_dw_kernel[(triton.cdiv(Cp, b["BLOCK_C"]), triton.cdiv(D, b["BLOCK_DO"]))](
        x, w, cls, rx, rw, pos_col, lse_total, gneg, gpos, dw,
        N, Cp, D, x.stride(0), w.stride(0), dw.stride(0), scale, scale * LOG2E, **common)
    return dx, dw


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile cases (tests/test_triton_compile.py compiles each for sm_90 without a
# GPU): (kernel, signature, constexprs, options, aligned) with the block sizes the GPU path
# launches. aligned names the arguments a real launch specialises as multiples of 16 (torch
# allocations are 16-byte aligned; row strides and D usually are multiples of 16): without
# that hint the compiler cannot vectorise the loads, and then does not pipeline them either.
# ----------------------------------------------------------------------------------------------
def _aligned(signature: dict) -> List[str]:
    return [k for k, v in signature.items()
            if v.startswith("*") or k.startswith("stride_") or k == "D"]


def _compile_cases() -> List[tuple]:
    cases = []
    D = 512
    for dtype in (torch.float32, torch.bfloat16):
        t = "*" + _TL_DTYPE_NAME[dtype]
        cfg = _config(dtype, 4096, 1 << 20, D, interpret=False)
        f, b, nrm, p = cfg["fwd"], cfg["bwd"], cfg["norm"], cfg["pos"]
        flags = dict(DOT_FP32=False, DOT_PRECISION="ieee")
        for has_idx in (False, True):
            cases.append((_row_inv_norm_kernel,
                          dict(X=t, IDX="*i64", OUT="*fp32", R="i32", D="i32", stride_x="i32",
                               HAS_IDX="constexpr", BLOCK_R="constexpr", BLOCK_D="constexpr"),
                          dict(HAS_IDX=has_idx, BLOCK_R=nrm["BLOCK_R"], BLOCK_D=nrm["BLOCK_D"]),
                          dict(num_warps=nrm["num_warps"])))
        base = dict(X=t, W=t, CLS="*i64", RX="*fp32", RW="*fp32", POS="*i64")
        const = dict(L="constexpr", HAS_CLASSES="constexpr", BLOCK_N="constexpr",
                     BLOCK_C="constexpr", BLOCK_D="constexpr")
        cases.append((_mlcd_lse_fwd_kernel,
                      dict(base, MAX_OUT="*fp32", SUM_OUT="*fp32", N="i32", C="i32", D="i32",
                           stride_x="i32", stride_w="i32", scale_log2e="fp32",
                           tiles_per_split="i32", **const, DOT_FP32="constexpr",
                           DOT_PRECISION="constexpr"),
                      dict(L=4, HAS_CLASSES=True, BLOCK_N=f["BLOCK_N"], BLOCK_C=f["BLOCK_C"],
                           BLOCK_D=f["BLOCK_D"], **flags),
                      dict(num_warps=f["num_warps"], num_stages=f["num_stages"])))
        cases.append((_pos_cos_kernel,
                      dict(base, OUT="*fp32", NL="i32", D="i32", stride_x="i32", stride_w="i32",
                           L="constexpr", HAS_CLASSES="constexpr", BLOCK_P="constexpr",
                           BLOCK_D="constexpr"),
                      dict(L=4, HAS_CLASSES=True, BLOCK_P=p["BLOCK_P"], BLOCK_D=p["BLOCK_D"]),
                      dict(num_warps=p["num_warps"])))
        for kern, out in ((_mlcd_grad_dx_kernel, "DX"), (_mlcd_grad_dw_kernel, "DW")):
            sig = dict(base, LSE="*fp32", GNEG="*fp32", GPOS="*fp32", **{out: t},
                       N="i32", C="i32", D="i32", stride_x="i32", stride_w="i32",
                       **{"stride_" + out.lower(): "i32"}, scale="fp32", scale_log2e="fp32",
                       **const, BLOCK_DO="constexpr", DOT_FP32="constexpr",
                       DOT_PRECISION="constexpr")
            cases.append((kern, sig,
                          dict(L=4, HAS_CLASSES=False, BLOCK_N=b["BLOCK_N"], BLOCK_C=b["BLOCK_C"],
                               BLOCK_D=b["BLOCK_D"], BLOCK_DO=b["BLOCK_DO"], **flags),
                          dict(num_warps=b["num_warps"], num_stages=b["num_stages"])))
    return [case + (_aligned(case[1]),) for case in cases]


COMPILE_CASES = _compile_cases()

__all__ = ["mlcd_lse", "mlcd_grad", "mlcd_lse_stats", "combine_lse_stats", "lse_from_stats",
           "COMPILE_CASES"]
