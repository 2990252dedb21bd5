"""Triton backend of the margin-loss engine (see pyssl/ops/_margin_engine_contract.md).

Two entry points, both working directly on the raw features x (N, D) and raw class centers
w (C, D) (float32, bfloat16 or float16, the same dtype), with classes = S (C',) int64 unique
class ids or None (= all C classes) and pos_col (N, L) integer column indices into S (-1 = padding;
held as int32 by the kernels):

    mlcd_lse(x, w, classes, pos_col, scale) -> (lse_neg (N,) f32, pos_cos (N, L) f32)
    mlcd_grad(x, w, classes, pos_col, scale, lse_total, gneg, gpos)
        -> (dx (N, D) x.dtype, dw (C, D) w.dtype)

plus mlcd_lse_stats / combine_lse_stats / lse_from_stats, the per-row (max, sum) form of the
forward that a model-parallel shard all-reduces (max, then the rescaled sums) before the log.

Nothing of size N x C' is ever materialised: the forward and the fused backward kernels load
the rows of w they need by pointer arithmetic on the class ids (no gathered copy of w[S]), and
the default backward holds G for one chunk of classes at a time (a bounded scratch, below). The
cosine matrix is recomputed wherever it is needed, the way FlashAttention recomputes P in its
backward: at MLCD sizes (C' up to millions) recomputing is far cheaper than storing.

Kernels (each has a header comment with tiling, residency and traffic):
    _row_inv_norm_kernel   1 / max(||row||, 1e-12) for rows of x, or rows w[S_j] by index
    _mlcd_lse_fwd_kernel   online (max, sum) of exp(logit) over the negative columns, per split
    _pos_cos_kernel        cos at the L positive columns of each row, by indexed dot products
    _mlcd_grad_g_kernel    the backward's G for one chunk of columns of S (default backward)
    _mlcd_g_positives_kernel  the positives' entries of that chunk's G
    _mlcd_dw_finish_kernel dw[S_k] of a chunk from its Gᵀ·X̂ product (default backward)
    _mlcd_grad_dx_kernel   fused backward (GCHUNK=0): dx with the normalization backward fused,
                           no atomics (optional column splits: fp32 partials summed by the caller)
    _mlcd_grad_dw_kernel   fused backward (GCHUNK=0): dw[S], normalization backward fused

FLOPs (units of N·C'·D; useful work 6 = 2 forward + 2 per backward product).
Default backward, class-chunked (GCHUNK=1): G recomputed once per chunk of CK columns into an
(N, CK) scratch, then two vendor GEMMs (cuBLAS, fp32 accumulation) for dx̂ and dŴ: 2 + 2 + 4 = 8,
half of it in cuBLAS, for a bounded scratch (the chunk's buffers take an eighth of the class
table's bytes, 32-256 MiB, at least 256 columns; _gchunk_cols).
Fused backward (GCHUNK=0): each of the two kernels recomputes the cos tile; for 16-bit inputs
with D <= 512 it does so once, over the whole D, and the same loaded w (or x) tile feeds both of
its tl.dots ("FULL_D" form): 2 + 4 + 4 = 10 (cap 60% of the tensor-core peak counted at 6).
Wider D is cut into 256-wide slices, each recomputing the tile: 2 + 2·(2·slices + 2)
(D = 768: 18, D = 1024: 22). No scratch beyond the dx split partials.
Which is faster on a given GPU is measured side by side (bench: pyssl-triton against
pyssl-triton[fused]); the default follows the FLOP count until a measurement says otherwise.

Backward configuration override, for timing variants on a GPU without code changes:
    PYSSL_MLCD_TRITON_BWD="GCHUNK=0,BLOCK_N=64,BLOCK_C=64,BLOCK_DO=512,num_warps=8,DX_SPLITS=2"
comma-separated KEY=INT entries. GCHUNK (1 = class-chunked, the default; 0 = fused) and
GCHUNK_COLS (columns per chunk, 0 = automatic) take no prefix; the chunked form's G kernel runs
on the forward's tiles. The other keys configure the fused kernels, each for both or, prefixed
"dx." / "dw.", for one of them (e.g. "dx.BLOCK_N=128,dw.num_stages=3"). Keys: BLOCK_N (rows of x per tile),
BLOCK_C (columns of S per tile), BLOCK_D (K step of the sliced form's recompute), BLOCK_DO (D
slice width; >= D means one slice), num_warps, num_stages, DX_SPLITS (column splits of the dx
kernel, 0 = automatic), FULL_D (0 = use the sliced form even for one slice), CUT_CHAIN (-1 =
automatic, 0/1 forced; see the backward kernels' header). Read on every call (no caching);
a malformed value raises ValueError. Check a variant's registers/spills before timing it:
_bwd_compile_case(kernel, dtype, _bwd_cfg(_config(...), "dx" or "dw", D)) gives the
(kernel, signature, constexprs, options, aligned) tuple tests/test_triton_compile.py compiles;
ptxas -v on its PTX reports registers and spill bytes.

Interpreter notes (TRITON_INTERPRET=1, CPU tensors): the interpreter does bf16 arithmetic
wrongly, so every load is converted to float32 before any arithmetic, and under the interpreter
(DOT_FP32=True) tl.dot operands are converted to float32 too (after the same rounding to the
input dtype that the GPU path applies to G). On the GPU the dot operands stay in the input
dtype (tensor cores; fp32 accumulation); fp32 inputs follow torch's float32 matmul precision:
input_precision="ieee" (FMA) by default, "tf32" (tensor cores) where the user allowed TF32
(torch.backends.cuda.matmul.fp32_precision = "tf32"; _tiles.fp32_dot_precision), read per call.

Offsets into x and w are computed in int64: with millions of classes C * D exceeds 2**31.
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from pyssl.kernels._tiles import dot_options as _dot_options, dot_rows_tile as _dot_tile
from pyssl.kernels._tiles import interpreting as _interpreting, on_tensor_device, pow2 as _p2

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
_EPS = 1e-12  # the contract's max(||v||, 1e-12), as in torch.nn.functional.normalize

_TL_DTYPE_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# ----------------------------------------------------------------------------------------------
# Device helpers (inlined into the kernels).
# ----------------------------------------------------------------------------------------------
@triton.jit
def _positive_tile(POS, GPOS, rows, rmask, cols, L: tl.constexpr, WITH_GPOS: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Which entries of a (rows x cols) tile are positives of their row, and their gpos.

    Compares each column index with the L pos_col entries of the row (L is a constexpr, the loop
    is unrolled); padding (-1) never matches. The L column vectors are re-read per tile: they
    are tiny (BLOCK_N * L int64, L1/L2 resident) next to the BLOCK_N x BLOCK_C x D tile dot.
    pos_col is int32 (columns of S < 2^31): an int64 compare is two instructions, and these
    L·BLOCK_C compares per row are the tile's largest elementwise cost after the exp.
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
def _two_in_tile(POS, rows, rmask, cols, c_lo, L: tl.constexpr, BLOCK_C: tl.constexpr):
    """Which entries of a (rows x cols) tile, cols = c_lo + [0, BLOCK_C), are positives of their
    row, when no row has more than two positives in the tile: per row the two smallest in-tile
    positive columns (L steps on row vectors), then two compares per entry."""
    big = c_lo + BLOCK_C           # no column of the tile
    f1 = tl.zeros_like(rows) + big
    f2 = tl.zeros_like(rows) + big
    base = rows.to(tl.int64) * L
    for i in tl.static_range(L):
        p = tl.load(POS + base + i, mask=rmask, other=-1)
        q = tl.where((p >= c_lo) & (p < big), p, big)
        f2 = tl.minimum(f2, tl.maximum(f1, q))
        f1 = tl.minimum(f1, q)
    return (cols[None, :] == f1[:, None]) | (cols[None, :] == f2[:, None])


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


# ----------------------------------------------------------------------------------------------
# _row_inv_norm_kernel
#   Computes: out[r] = 1 / max(||X[idx[r]]||, 1e-12) for r < R (idx = arange when HAS_IDX=False).
#   Tiling:   grid (cdiv(R, BLOCK_R),); a program owns BLOCK_R rows and walks D in BLOCK_D steps.
#   Registers: one (BLOCK_R, BLOCK_D) fp32 tile and the (BLOCK_R,) running sum of squares.
#   Traffic:  each indexed row is read once (R * D elements), R floats written. w[S] is read
#             through the ids, never copied.
# ----------------------------------------------------------------------------------------------
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
#   Positives: the row block's positive columns (BLOCK_N × L) are held from the start; a tile
#             none of them falls in (most tiles: a row's l of 10^5-10^6 columns) takes no
#             per-score test, one where no row has more than two takes two compares per score
#             (_two_in_tile), else the L of _positive_tile. Per 128 × 128 tile and thread
#             (SASS of the sm_90 build, bf16, L = 8, Triton 3.7): 1966 instructions without a
#             positive, 2350 with at most two per row, 3026 otherwise, against 3012 for every
#             tile before; ~3,900 issue cycles for a tile without positives against ~4,100 for
#             its tensor-core work (was ~6,000: issue-bound).
# ----------------------------------------------------------------------------------------------
@triton.jit
def _mlcd_lse_fwd_kernel(X, W, CLS, RX, RW, POS, MAX_OUT, SUM_OUT,
                         N, C, D, stride_x, stride_w, scale_log2e, tiles_per_split,
                         L: tl.constexpr, L_PAD: tl.constexpr, HAS_CLASSES: tl.constexpr,
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
    # the block's positive columns, once: a tile none of them falls in skips the per-score test
    li = tl.arange(0, L_PAD)
    own = tl.load(POS + rows.to(tl.int64)[:, None] * L + li[None, :], mask=rmask[:, None] & (li < L)[None, :],
                  other=-1)
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
        t2 = tl.where(cmask[None, :], cos * scale_log2e, float("-inf"))
        c_lo = t * BLOCK_C
        most = tl.max(tl.sum(((own >= c_lo) & (own < c_lo + BLOCK_C)).to(tl.int32), axis=1), axis=0)
        if most > 0:
            if most <= 2:
                # at most two of a row's positives in the tile (distinct ids in 128 of 10^5+
                # columns: nearly always): the row's two smallest in-tile columns, two tests per
                # score instead of L
                t2 = tl.where(_two_in_tile(POS, rows, rmask, cols, c_lo, L, BLOCK_C), float("-inf"), t2)
            else:
                is_pos, _unused = _positive_tile(POS, POS, rows, rmask, cols, L, False, BLOCK_N, BLOCK_C)
                t2 = tl.where(is_pos, float("-inf"), t2)
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
# Backward kernels (_mlcd_grad_dx_kernel, _mlcd_grad_dw_kernel): shared structure.
#   A program owns a block of output rows (rows of x for dx, classes of S for dw) and a BLOCK_DO
#   slice of the output's D columns, and loops over the other dimension in tiles; per tile it
#   recomputes the (BLOCK_N, BLOCK_C) cos tile over the full D, forms G (_grad_tile) and adds
#   one tl.dot into a (block, BLOCK_DO) fp32 accumulator. Two forms, by the constexpr
#   FULL_D = (BLOCK_DO >= D), i.e. one slice:
#
#   FULL_D (16-bit default for D <= 512): the streamed operand tile, (tile, BLOCK_DO) = whole
#     rows (zero beyond D), is loaded ONCE per tile and feeds both tl.dots: cos = x . wᵀ (one
#     tl.dot, K = BLOCK_DO) and the gradient product (the same shared-memory buffer, read
#     through a transposed view for one of the two). The owner's operand (x rows for dx, w rows
#     for dw) is loop-invariant: loaded once, kept in shared memory. The loop body has no inner
#     loop, so the compiler software-pipelines its one big load (num_stages buffers).
#     FLOPs per kernel: 4·N·C'·Dp (Dp = BLOCK_DO = D rounded up to a power of two).
#   Sliced (BLOCK_DO < D: the 16-bit default for D > 512; also fp32, and FULL_D=0): slices =
#     cdiv(D, BLOCK_DO) programs per owner block, each recomputing the cos tile over the full D
#     in BLOCK_D steps (an inner, pipelined loop), then loading the (tile, BLOCK_DO) slice for
#     the product. FLOPs per kernel: slices·2·N·C'·(Dr + BLOCK_DO), Dr = D rounded up to
#     BLOCK_D.
#
#   CUT_CHAIN (FULL_D, set when BLOCK_N < 16 * num_warps): Triton gives a tl.dot whose result
#   feeds another tl.dot ("chained", as in attention) all warps along M, warpsPerCTA =
#   [num_warps, 1]. With the cos tile's M = BLOCK_N = 64, one warpgroup's worth, and 8 warps,
#   the second warpgroup would compute a replica of the same 64 x BLOCK_C tile (the TTGIR shows
#   warpsPerCTA = [8, 1] on a 64-row tile; each warpgroup issues all 32 m64n32k16 wgmmas at
#   K = 512), doubling the recompute's tensor-core time, and the replicated elementwise tiles
#   pushed the kernel into spills. Computing G under `if D > 0` (always true at run time) hides
#   the chain from that heuristic (its forward slice stops at the scf.if's yield): the cos tile
#   gets [4, 2], each warpgroup computing half its columns. The sliced form's inner K loop hides
#   the chain the same way. BLOCK_N = 128 with 8 warps needs no cut (one warpgroup per 64 rows).
#
#   Normalization backward: dx = rx * (acc - x * rx * q) with q = x̂ . dx̂ (dw likewise with r).
#   FULL_D: the program holds whole rows of dx̂, so q = rx * Σ_d x·acc in the epilogue (equal to
#   Σ_j G cos). Sliced: q = Σ_j G_nj cos_nj (unclamped cos) accumulated in the loop. The
#   epilogue (_finish_store) works on the two D halves of the accumulator in turn: with the
#   whole 64 x 512 tile at once it spilled.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _col_tile(CLS, RW, t, C, HAS_CLASSES: tl.constexpr, BLOCK_C: tl.constexpr):
    """Columns of S in tile t: (cols, cmask, ids = class ids = rows of w, rw)."""
    cols = t * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    if HAS_CLASSES:
        ids = tl.load(CLS + cols, mask=cmask, other=0)
    else:
        ids = cols
    rw = tl.load(RW + cols, mask=cmask, other=0.0)
    return cols, cmask, ids, rw


@triton.jit
def _grad_full(x_op, w_op, POS, GPOS, rows, rmask, cols, cmask, rx, rw, lse_log2, gneg_scale,
               scale_log2e, L: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """FULL_D: the G tile from whole rows, x_op (BLOCK_N, BLOCK_DO) and w_op (BLOCK_C, BLOCK_DO)
    (zero beyond D): cos is one tl.dot with K = BLOCK_DO, w_op read through tl.trans (a view of
    the same shared-memory buffer, no copy)."""
    cos = tl.dot(x_op, tl.trans(w_op), input_precision=DOT_PRECISION)
    cos = cos * rx[:, None] * rw[None, :]
    return _grad_tile(cos, rows, rmask, cols, cmask, POS, GPOS, lse_log2, gneg_scale,
                      scale_log2e, L, BLOCK_N, BLOCK_C)


@triton.jit
def _g_operand(g, dtype: tl.constexpr):
    """G scaled by the other operand's inverse norms, as the products' operand in the input
    dtype. float16 saturates at ±65504 first: a zero (or ~0) row has an inverse norm of 1e12,
    and inf · 0 in the product made every row's gradient NaN; saturated, a zero row adds exactly
    its zero. (Rows of norm below ~|G| / 65504, elements in float16's subnormal range, get a
    gradient underestimated by the saturation; bfloat16 and float32 have the range.) NaN
    stays NaN. The chunked backward's G'' (< 4 · scale in magnitude) saturates only at scales
    beyond ~16,000."""
    if dtype == tl.float16:
        g = tl.minimum(tl.maximum(g, -65504.0, propagate_nan=tl.PropagateNan.ALL), 65504.0,
                       propagate_nan=tl.PropagateNan.ALL)
    return g.to(dtype)


@triton.jit
def _finish_store(acc, q, V_ROWS, OUT_ROWS, rv, vmask, d0, D, Q_FROM_ACC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_DO: tl.constexpr):
    """Normalization backward of a (BLOCK_M, BLOCK_DO) block of rows and its store:
    out = rv * (acc - v * rv * q), v the raw rows (V_ROWS: (BLOCK_M, 1) row-start pointers,
    columns d0 + [0, BLOCK_DO)), rv = 1/||v||, acc = dv̂ (fp32), q = v̂ . dv̂; with
    Q_FROM_ACC (the block holds whole rows) q = rv * Σ_d v·acc, else q as given.

    The accumulator is split in registers into its two D halves (reshape/permute/split, no data
    movement) and each half is finished and stored in turn, so the peak is one accumulator plus
    half a tile of v: finishing the whole 64 x 512 tile at once spilled. v is re-read (.cg, from
    L2) rather than kept in registers across the main loop."""
    HALF: tl.constexpr = BLOCK_DO // 2
    a_lo, a_hi = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))
    d_lo = d0 + tl.arange(0, HALF)
    d_hi = d_lo + HALF
    m_lo = vmask[:, None] & (d_lo < D)[None, :]
    m_hi = vmask[:, None] & (d_hi < D)[None, :]
    v_lo = tl.load(V_ROWS + d_lo[None, :], mask=m_lo, other=0.0,
                   cache_modifier=".cg").to(tl.float32)
    v_hi = tl.load(V_ROWS + d_hi[None, :], mask=m_hi, other=0.0,
                   cache_modifier=".cg").to(tl.float32)
    if Q_FROM_ACC:
        q = rv * (tl.sum(v_lo * a_lo, axis=1) + tl.sum(v_hi * a_hi, axis=1))
    c = rv * q
    out_lo = rv[:, None] * (a_lo - v_lo * c[:, None])
    tl.store(OUT_ROWS + d_lo[None, :], out_lo.to(OUT_ROWS.dtype.element_ty), mask=m_lo)
    out_hi = rv[:, None] * (a_hi - v_hi * c[:, None])
    tl.store(OUT_ROWS + d_hi[None, :], out_hi.to(OUT_ROWS.dtype.element_ty), mask=m_hi)


# ----------------------------------------------------------------------------------------------
# _mlcd_grad_dx_kernel
#   Computes: dx_n = rx_n * (dx̂_n - x̂_n (x̂_n . dx̂_n)) with dx̂ = G . Ŵ_S = (G ⊙ rw) . W_S,
#             accumulated straight from the raw w rows (acc), q_n = x̂_n . dx̂_n (see above).
#   Tiling:   grid (cdiv(N, BLOCK_N), cdiv(D, BLOCK_DO), SPLITS). A program owns a row block, a
#             BLOCK_DO slice of the output columns and the contiguous column-tile range
#             [s * tiles_per_split, (s+1) * tiles_per_split) of S (split s); per column tile it
#             recomputes G (FULL_D or sliced form, above), then acc += (G * rw) . w[S_tile, slice]
#             (tl.dot; G cast to the input dtype for bf16/fp16 like FlashAttention casts P).
#             SPLITS = 1: the program finishes dx (normalization backward fused) and stores it;
#             each output element has exactly one owner.
#             SPLITS > 1 (SPLIT_OUT; row blocks alone leave SMs idle, e.g. N = 4096 at
#             BLOCK_N = 64 is 64 programs for 132 SMs): the program stores its partial acc into
#             DX = a (SPLITS, N, D) fp32 buffer (and, sliced, its partial q into PART_Q
#             (SPLITS, N)); the caller sums over splits in a fixed order and finishes
#             dx = rx * (acc - x * rx * q), linear in (acc, q) (FULL_D: q = rx * Σ_d x·acc from
#             the summed acc). No atomics either way: deterministic.
#   Registers (16-bit, FULL_D, 64/64/512, 8 warps): acc (BLOCK_N, BLOCK_DO) fp32 =
#             BLOCK_N * BLOCK_DO / (32 * num_warps) = 128 per thread, the cos/G tile 16 (split
#             over both warpgroups, CUT_CHAIN), the w-tile gather addresses, per-row vectors;
#             ptxas: 254 registers, no spills. Shared memory: the x block (BLOCK_N x BLOCK_DO)
#             once + the pipelined w tiles (BLOCK_C x BLOCK_DO each) + the G tile staged for
#             the product: ~196 KiB with 2 stages. D <= 256: BLOCK_N = 128 (acc 128 x 256,
#             255 registers, 3 stages, CUT_CHAIN: see _bwd_default).
#   Traffic:  w[S] (the dominant term) read cdiv(N, BLOCK_N) times over in FULL_D form (once per
#             row block: the tile feeds both dots; 2·BLOCK_N FLOPs per element read),
#             cdiv(N, BLOCK_N) * (slices + 1) times sliced; the x block once per program
#             (FULL_D) or once per column tile from L2 (sliced); dx written once (SPLITS = 1)
#             or SPLITS * N * D fp32 partials written and read back.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _mlcd_grad_dx_kernel(X, W, CLS, RX, RW, POS, LSE, GNEG, GPOS, GSCALE, DX, PART_Q,
                         N, C, D, stride_x, stride_w, stride_dx, scale, scale_log2e,
                         tiles_per_split,
                         L: tl.constexpr, HAS_CLASSES: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_DO: tl.constexpr, FULL_D: tl.constexpr, CUT_CHAIN: tl.constexpr,
                         SPLIT_OUT: tl.constexpr, DOT_FP32: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
    pid_do = tl.program_id(1)
    split = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    do = pid_do * BLOCK_DO + tl.arange(0, BLOCK_DO)
    domask = do < D
    rx, lse_log2, gneg_scale = _row_grad_stats(RX, LSE, GNEG, rows, rmask, scale)
    x_rows = X + rows.to(tl.int64)[:, None] * stride_x

    acc = tl.zeros((BLOCK_N, BLOCK_DO), dtype=tl.float32)
    q = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t_begin = split * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, tl.cdiv(C, BLOCK_C))
    if FULL_D:
        # The row block's x, loop-invariant: one load, kept in shared memory for every tile.
        x_op = tl.load(x_rows + do[None, :], mask=rmask[:, None] & domask[None, :], other=0.0)
        if DOT_FP32:
            x_op = x_op.to(tl.float32)
        if CUT_CHAIN:
            live = D > 0                 # always true at run time (see CUT_CHAIN above)
        else:
            live: tl.constexpr = True
        for t in range(t_begin, t_end):
            cols, cmask, ids, rw = _col_tile(CLS, RW, t, C, HAS_CLASSES, BLOCK_C)
            w_blk = tl.load(W + ids.to(tl.int64)[:, None] * stride_w + do[None, :],
                            mask=cmask[:, None] & domask[None, :], other=0.0)
            w_op = w_blk
            if DOT_FP32:
                w_op = w_blk.to(tl.float32)
            gw = tl.zeros((BLOCK_N, BLOCK_C), dtype=w_blk.dtype)
            if live:
                g = _grad_full(x_op, w_op, POS, GPOS, rows, rmask, cols, cmask, rx, rw, lse_log2,
                               gneg_scale, scale_log2e, L, BLOCK_N, BLOCK_C, DOT_PRECISION)
                gw = _g_operand(g * rw[None, :], w_blk.dtype)   # the dot runs in the input dtype
            if DOT_FP32:
                gw = gw.to(tl.float32)
            acc = tl.dot(gw, w_op, acc, input_precision=DOT_PRECISION)
    else:
        for t in range(t_begin, t_end):
            cols, cmask, ids, rw = _col_tile(CLS, RW, t, C, HAS_CLASSES, BLOCK_C)
            cos, g = _cos_grad_tile(X, W, POS, GPOS, rows, rmask, ids, cols, cmask, rx, rw,
                                    lse_log2, gneg_scale, D, stride_x, stride_w, scale_log2e, L,
                                    BLOCK_N, BLOCK_C, BLOCK_D, DOT_FP32, DOT_PRECISION)
            q += tl.sum(g * cos, axis=1)
            w_blk = tl.load(W + ids.to(tl.int64)[:, None] * stride_w + do[None, :],
                            mask=cmask[:, None] & domask[None, :], other=0.0)
            gw = _g_operand(g * rw[None, :], w_blk.dtype)   # the dot runs in the input dtype on the GPU
            if DOT_FP32:
                gw = gw.to(tl.float32)
                w_blk = w_blk.to(tl.float32)
            acc = tl.dot(gw, w_blk, acc, input_precision=DOT_PRECISION)

    # the upstream gradient's factor, kept out of the 16-bit G tiles (see mlcd_grad)
    gs = tl.load(GSCALE)
    acc = acc * gs
    q = q * gs
    if SPLIT_OUT:
        prow = split.to(tl.int64) * N + rows           # row of the (SPLITS * N, D) buffer
        tl.store(DX + prow[:, None] * stride_dx + do[None, :], acc,
                 mask=rmask[:, None] & domask[None, :])
        if not FULL_D:   # (FULL_D: the caller takes q from the summed accumulator)
            tl.store(PART_Q + prow, q, mask=rmask & (pid_do == 0))   # once per row
    else:
        # rx re-read (.cg: not merged with the first load) so that its copy in the epilogue's
        # layout is not held across the loop.
        rx_e = tl.load(RX + rows, mask=rmask, other=0.0, cache_modifier=".cg")
        _finish_store(acc, q, x_rows, DX + rows.to(tl.int64)[:, None] * stride_dx, rx_e, rmask,
                      pid_do * BLOCK_DO, D, FULL_D, BLOCK_N, BLOCK_DO)


# ----------------------------------------------------------------------------------------------
# _mlcd_grad_dw_kernel
#   Computes: dw[S_c] = rw_c * (dŵ_c - ŵ_c (ŵ_c . dŵ_c)) with dŵ = Gᵀ . X̂ = (G ⊙ rx)ᵀ . X
#             accumulated from the raw x rows, r_c = ŵ_c . dŵ_c (as q in the dx kernel).
#   Tiling:   grid (cdiv(C', BLOCK_C), cdiv(D, BLOCK_DO)), the mirror image of the dx kernel: a
#             program owns a block of columns of S and a BLOCK_DO slice, loops over ALL row
#             tiles, recomputes G (FULL_D or sliced form, above) and does
#             acc += (G * rx)ᵀ . x[rows, slice]. The result rows are stored at the class ids
#             (indexed store); S is unique, so every dw row has one owner: no atomics. Rows of dw
#             outside S are zero-filled by the caller. cdiv(C', BLOCK_C) programs fill the GPU
#             at MLCD sizes, so no split here.
#   Registers (16-bit, FULL_D, 64/64/512, 8 warps): acc (BLOCK_C, BLOCK_DO) fp32 = 128 per
#             thread, the cos/G tile 16, r and the per-column rw/ids; ptxas: 234 registers, no
#             spills. Shared memory: w block BLOCK_C x BLOCK_DO once + x tiles in flight, plus
#             the staging of Gᵀ for the product.
#   Traffic:  x read cdiv(C', BLOCK_C) times over in FULL_D form (once per column block; small,
#             L2-resident for typical N), cdiv(C', BLOCK_C) * (slices + 1) times sliced; w[S]
#             rows read once (FULL_D) or about twice per slice; dw[S] written once.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _mlcd_grad_dw_kernel(X, W, CLS, RX, RW, POS, LSE, GNEG, GPOS, GSCALE, DW,
                         N, C, D, stride_x, stride_w, stride_dw, scale, scale_log2e,
                         L: tl.constexpr, HAS_CLASSES: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_DO: tl.constexpr, FULL_D: tl.constexpr, CUT_CHAIN: tl.constexpr,
                         DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    do = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    domask = do < D
    cols, cmask, ids, rw = _col_tile(CLS, RW, tl.program_id(0), C, HAS_CLASSES, BLOCK_C)
    w_rows = W + ids.to(tl.int64)[:, None] * stride_w

    acc = tl.zeros((BLOCK_C, BLOCK_DO), dtype=tl.float32)
    r = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if FULL_D:
        # The column block's w rows, loop-invariant: one load, kept in shared memory.
        w_op = tl.load(w_rows + do[None, :], mask=cmask[:, None] & domask[None, :], other=0.0)
        if DOT_FP32:
            w_op = w_op.to(tl.float32)
        if CUT_CHAIN:
            live = D > 0                 # always true at run time (see CUT_CHAIN above)
        else:
            live: tl.constexpr = True
        for n0 in range(0, N, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            rmask = rows < N
            rx, lse_log2, gneg_scale = _row_grad_stats(RX, LSE, GNEG, rows, rmask, scale)
            x_blk = tl.load(X + rows.to(tl.int64)[:, None] * stride_x + do[None, :],
                            mask=rmask[:, None] & domask[None, :], other=0.0)
            x_op = x_blk
            if DOT_FP32:
                x_op = x_blk.to(tl.float32)
            gx = tl.zeros((BLOCK_N, BLOCK_C), dtype=x_blk.dtype)
            if live:
                g = _grad_full(x_op, w_op, POS, GPOS, rows, rmask, cols, cmask, rx, rw, lse_log2,
                               gneg_scale, scale_log2e, L, BLOCK_N, BLOCK_C, DOT_PRECISION)
                gx = _g_operand(g * rx[:, None], x_blk.dtype)   # the dot runs in the input dtype
            if DOT_FP32:
                gx = gx.to(tl.float32)
            acc = tl.dot(tl.trans(gx), x_op, acc, input_precision=DOT_PRECISION)
    else:
        for n0 in range(0, N, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            rmask = rows < N
            rx, lse_log2, gneg_scale = _row_grad_stats(RX, LSE, GNEG, rows, rmask, scale)
            cos, g = _cos_grad_tile(X, W, POS, GPOS, rows, rmask, ids, cols, cmask, rx, rw,
                                    lse_log2, gneg_scale, D, stride_x, stride_w, scale_log2e, L,
                                    BLOCK_N, BLOCK_C, BLOCK_D, DOT_FP32, DOT_PRECISION)
            r += tl.sum(g * cos, axis=0)
            x_blk = tl.load(X + rows.to(tl.int64)[:, None] * stride_x + do[None, :],
                            mask=rmask[:, None] & domask[None, :], other=0.0)
            gx = _g_operand(g * rx[:, None], x_blk.dtype)   # the dot runs in the input dtype on the GPU
            if DOT_FP32:
                gx = gx.to(tl.float32)
                x_blk = x_blk.to(tl.float32)
            acc = tl.dot(tl.trans(gx), x_blk, acc, input_precision=DOT_PRECISION)

    gs = tl.load(GSCALE)       # the upstream gradient's factor (see mlcd_grad)
    acc = acc * gs
    r = r * gs
    rw_e = tl.load(RW + cols, mask=cmask, other=0.0, cache_modifier=".cg")   # see the dx kernel
    if HAS_CLASSES:
        # the class ids again, from L2: 64-bit row pointers kept live across the loop cost the
        # registers that made Triton 3.6 spill (250 -> 255 + 24 B of local memory)
        ids = tl.load(CLS + cols, mask=cmask, other=0, cache_modifier=".cg")
        w_rows = W + ids.to(tl.int64)[:, None] * stride_w
    _finish_store(acc, r, w_rows, DW + ids.to(tl.int64)[:, None] * stride_dw, rw_e, cmask,
                  tl.program_id(1) * BLOCK_DO, D, FULL_D, BLOCK_C, BLOCK_DO)


# ----------------------------------------------------------------------------------------------
# The class-chunked backward (GCHUNK, the default): G materialized one column chunk at a time.
#   The fused kernels above recompute the cos tile in each of the two backward products
#   (2 + 4 + 4 = 10 units of N·C'·D). Here the tile is recomputed once per chunk of CK columns
#   of S by _mlcd_grad_g_kernel into an (N, CK) scratch in the input dtype, and the two products
#   are plain GEMMs on it (cuBLAS on the GPU, fp32 accumulation and output). FLOPs: 2 + 2 + 4 = 8
#   units, half of them in the vendor GEMM. Deterministic: no atomics, chunks summed in order.
#
#   Operands exact in 16 bits: x̂ = rx ⊙ x and ŵ = rw ⊙ w rounded to 16 bits would move each
#   normalized row off its own direction by ~2^-9, an error the normalization backward's
#   projection does not remove: relative error ~2^-9 / sin θ for a row whose gradient is
#   dominated by a center at angle θ (68% at θ = 1e-3 in bfloat16). So the inverse norms are
#   split as r = 2^e · a (a in [1, 2)): the GEMM operands are X̃ = 2^e_x ⊙ x and W̃ = 2^e_w ⊙ w,
#   power-of-two scalings, exact in 16 bits (rows of norm in (1/2, 1]), and the remaining
#   factors ride on the scalar G'' = G · a_n · m_j (|G''| < 4 · scale), whose rounding only
#   scales each term along its own row, as in the fused kernels:
#       P_k  = G''_k · W̃_k   = a ⊙ dX̂ (rows of the chunk's part),  summed over chunks
#       B_k  = G''_kᵀ · X̃    = m ⊙ dŴ_k
#   dx = 2^e_x (P − x̂ (x̂ · P)) (_finish_dx) and dw_j = 2^e_w_j (B_j − ŵ_j (ŵ_j · B_j))
#   (_mlcd_dw_finish_kernel), times the upstream factor gscale.
#
#   Memory: per chunk the G scratch (N·CK), W̃_k (CK·D, one buffer for all chunks) and B_k
#   (CK·D fp32), sized together by _gchunk_cols. Traffic: G is written once and read by both
#   GEMMs: ~6 bytes per G element (16-bit) against 6·D FLOPs, i.e. D FLOPs per byte, so the
#   backward is compute-bound where D exceeds the card's bf16 FLOP-per-byte ridge (H200 ~206,
#   H100 ~295): at D = 512 by 2.5x / 1.7x; at small D the fused kernels (no scratch traffic)
#   may be faster.
# ----------------------------------------------------------------------------------------------
# _mlcd_grad_g_kernel
#   Computes: G''[n, j - c0] = G_nj · a_n · m_j for the columns j in [c0, c0 + CK) of S, G of the
#             contract with gneg, gpos already divided by gscale (mlcd_grad), a and m the
#             mantissa parts of rx and rw (above), stored in the input dtype, every column taken
#             as a negative: gneg·scale·exp(scale·clamp(cos) − lse_total). The row's positives are
#             overwritten afterwards by _mlcd_g_positives_kernel (N·L stores), so the tile does
#             no per-element positive test. With the test (L compares and selects per score) a
#             128 × 128 tile cost each of its 256 threads 2945 instructions at L = 4 and 3497 at
#             L = 8, against 1878 now, of which the dot over D = 512 is 8 × 98 (SASS of the sm_90
#             build, bf16, Triton 3.7): ~7,000 warp-instruction issue cycles per tile against the
#             ~4,100 cycles its 16.8 MFLOP take on the tensor cores, so the kernel was bound by
#             instruction issue; now ~3,750 against ~4,100.
#   Tiling:   grid (cdiv(N, BLOCK_N), cdiv(CK, BLOCK_C)), row blocks fastest so the programs in
#             flight share a w tile through L2; each program one (BLOCK_N, BLOCK_C) tile: the
#             forward's tile dot over D in BLOCK_D steps (software-pipelined), then the G tile.
#   Registers: the (BLOCK_N, BLOCK_C) fp32 tile, per-row (rx, a·gneg·scale, lse) and per-column
#             (rw, m, ids) vectors; operand tiles staged through shared memory by tl.dot.
#   Traffic:  w[S_k] read cdiv(N, BLOCK_N) times (from L2 mostly), x once per column tile
#             (L2-resident), G'' written once: N·CK elements.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _mlcd_grad_g_kernel(X, W, CLS, RX, RW, AF, MF, LSE, GNEG, G,
                        N, D, c0, CK, stride_x, stride_w, stride_g, scale, scale_log2e,
                        HAS_CLASSES: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                        DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    local = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    lmask = local < CK
    cols = c0 + local
    if HAS_CLASSES:
        ids = tl.load(CLS + cols, mask=lmask, other=0)
    else:
        ids = cols
    # rows and columns outside [0, N) x [c0, c0 + CK) are never stored: their zero-filled
    # loads only need to keep the arithmetic finite
    rw = tl.load(RW + cols, mask=lmask, other=0.0)
    m = tl.load(MF + cols, mask=lmask, other=0.0)
    rx = tl.load(RX + rows, mask=rmask, other=0.0)
    lse_log2 = tl.load(LSE + rows, mask=rmask, other=0.0) * 1.4426950408889634
    rowf = tl.load(GNEG + rows, mask=rmask, other=0.0) * scale * tl.load(AF + rows, mask=rmask, other=0.0)
    cos = _dot_tile(X, W, rows, ids, rmask, lmask, D, stride_x, stride_w,
                    BLOCK_N, BLOCK_C, BLOCK_D, DOT_FP32, DOT_PRECISION)
    cos = tl.minimum(tl.maximum(cos * rx[:, None] * rw[None, :], -1.0), 1.0)
    g = rowf[:, None] * tl.exp2(cos * scale_log2e - lse_log2[:, None]) * m[None, :]
    tl.store(G + rows.to(tl.int64)[:, None] * stride_g + local[None, :], _g_operand(g, G.dtype.element_ty),
             mask=rmask[:, None] & lmask[None, :])


# ----------------------------------------------------------------------------------------------
# _mlcd_g_positives_kernel
#   Computes: G''[n, p - c0] = gpos_ni · a_n · m_p for every positive column p = POS[n, i] of
#             row n inside the chunk [c0, c0 + CK) (padding −1 and other chunks skipped): the
#             positives' entries of the chunk's G'', over the negatives' values the G kernel
#             wrote there (a row's positives are distinct: one store per entry).
#   Tiling:   grid (cdiv(N, BLOCK_R),); BLOCK_R rows × the L positives (L a constexpr).
#   Traffic:  POS, GPOS read once (N·L), at most N·L scattered stores into G''.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _mlcd_g_positives_kernel(G, POS, GPOS, AF, MF, N, c0, CK, stride_g, L: tl.constexpr,
                             L_PAD: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    li = tl.arange(0, L_PAD)
    m2 = rmask[:, None] & (li < L)[None, :]
    off = rows.to(tl.int64)[:, None] * L + li[None, :]
    p = tl.load(POS + off, mask=m2, other=-1)
    inside = m2 & (p >= c0) & (p < c0 + CK)
    gp = tl.load(GPOS + off, mask=inside, other=0.0)
    a = tl.load(AF + rows, mask=rmask, other=0.0)
    mp = tl.load(MF + p, mask=inside, other=0.0)
    tl.store(G + rows.to(tl.int64)[:, None] * stride_g + (p - c0), _g_operand(gp * a[:, None] * mp, G.dtype.element_ty),
             mask=inside)


# ----------------------------------------------------------------------------------------------
# _scaled_rows_kernel
#   Computes: out[r] = src[idx[r0 + r]] · f[r0 + r] for r < R (idx = the identity when
#             HAS_IDX=False), the product in fp32, stored in out's dtype: the chunked backward's
#             X̃ and W̃_k (f a power of two: exact), gathered and scaled in one pass into a
#             preallocated buffer (no fp32 temporaries of the chunk's size).
#   Tiling:   grid (cdiv(R, BLOCK_R),); BLOCK_R rows, D in BLOCK_D pieces.
#   Traffic:  each source row read once, each output row written once.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _scaled_rows_kernel(SRC, IDX, F, OUT, r0, R, D, stride_src, stride_out,
                        HAS_IDX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    local = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    lmask = local < R
    if HAS_IDX:
        ids = tl.load(IDX + r0 + local, mask=lmask, other=0)
    else:
        ids = r0 + local
    f = tl.load(F + r0 + local, mask=lmask, other=0.0)
    src_rows = SRC + ids.to(tl.int64)[:, None] * stride_src
    out_rows = OUT + local.to(tl.int64)[:, None] * stride_out
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = lmask[:, None] & (d < D)[None, :]
        v = tl.load(src_rows + d[None, :], mask=m, other=0.0).to(tl.float32)
        tl.store(out_rows + d[None, :], (v * f[:, None]).to(OUT.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------
# _mlcd_dw_finish_kernel
#   Computes: dw[S_j] = gscale · p_j (B_j − w_j rw_j² (w_j · B_j)) for the CK rows j of one
#             chunk (B = m ⊙ dŴ, fp32, from the chunk's G''ᵀ·X̃ product; w_j raw; p_j = rw_j / m_j
#             the power-of-two part of rw), i.e. rw_j (dŵ_j − ŵ_j (ŵ_j · dŵ_j)) times the
#             upstream factor, stored at the class ids in dw's dtype (S is unique: one owner per
#             row).
#   Tiling:   grid (cdiv(CK, BLOCK_R),); BLOCK_R rows, D in BLOCK_D pieces twice (the row dots,
#             then the update, the second pass re-reading B and w from L1/L2).
#   Registers: two (BLOCK_R, BLOCK_D) fp32 tiles and per-row scalars.
#   Traffic:  B read once from DRAM (4 B per element), w rows once (2 or 4 B), dw written once.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _mlcd_dw_finish_kernel(B, W, CLS, RW, PW, GSCALE, DW, c0, CK, D, stride_b, stride_w,
                           stride_dw, HAS_CLASSES: tl.constexpr, BLOCK_R: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    local = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    lmask = local < CK
    cols = c0 + local
    if HAS_CLASSES:
        ids = tl.load(CLS + cols, mask=lmask, other=0)
    else:
        ids = cols
    rw = tl.load(RW + cols, mask=lmask, other=0.0)
    b_rows = B + local.to(tl.int64)[:, None] * stride_b
    w_rows = W + ids.to(tl.int64)[:, None] * stride_w
    dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = lmask[:, None] & (d < D)[None, :]
        b = tl.load(b_rows + d[None, :], mask=m, other=0.0)
        w = tl.load(w_rows + d[None, :], mask=m, other=0.0).to(tl.float32)
        dot += tl.sum(b * w, axis=1)
    c = rw * rw * dot
    f = tl.load(PW + cols, mask=lmask, other=0.0) * tl.load(GSCALE)
    out_rows = DW + ids.to(tl.int64)[:, None] * stride_dw
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = lmask[:, None] & (d < D)[None, :]
        b = tl.load(b_rows + d[None, :], mask=m, other=0.0)
        w = tl.load(w_rows + d[None, :], mask=m, other=0.0).to(tl.float32)
        out = (b - w * c[:, None]) * f[:, None]
        tl.store(out_rows + d[None, :], out.to(DW.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------
# Launch configuration: a small heuristic instead of autotuning (the interpreter cannot run
# several autotune configs, and these shapes are few and regular).
# ----------------------------------------------------------------------------------------------
# Keys of a backward kernel's configuration. All can be overridden by PYSSL_MLCD_TRITON_BWD (see
# the module docstring); tests also set them flat at the top level of _config's dict.
#   FULL_D: 1 = use the FULL_D form whenever BLOCK_DO >= D, 0 = always the sliced form.
#   CUT_CHAIN: -1 = automatic (BLOCK_N < 16 * num_warps), 0/1 = forced (FULL_D form only).
#   DX_SPLITS: 0 = automatic (_dx_splits), else the number of column splits of the dx kernel.
#   GCHUNK: 1 = the class-chunked backward (default), 0 = the fused dx / dw kernels; and
#   GCHUNK_COLS: its columns per chunk, 0 = automatic (_gchunk_cols). Both for the whole backward
#   (no dx./dw. prefix); the chunked form's G kernel takes the forward's tiles.
_BWD_ENV = "PYSSL_MLCD_TRITON_BWD"
_BWD_KEYS = ("BLOCK_N", "BLOCK_C", "BLOCK_D", "BLOCK_DO", "num_warps", "num_stages", "DX_SPLITS",
             "FULL_D", "CUT_CHAIN", "GCHUNK", "GCHUNK_COLS")
_WHOLE_BWD_KEYS = ("GCHUNK", "GCHUNK_COLS")
_FWD_FLAT_KEYS = ("BLOCK_N", "BLOCK_C", "BLOCK_D")
MAX_GRID_YZ = 65535        # CUDA's limit on grid axes y and z (splits run along them)
_MAX_AUTO_DX_SPLITS = 8   # bounds the (splits, N, D) fp32 partial buffer of the dx kernel
POS_BLOCK_R = 128          # rows per program of _mlcd_g_positives_kernel


def _bwd_env() -> dict:
    """PYSSL_MLCD_TRITON_BWD parsed into {"": keys for both kernels, "dx": ..., "dw": ...}."""
    out = {"": {}, "dx": {}, "dw": {}}
    spec = os.environ.get(_BWD_ENV, "")
    for item in spec.replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, val = item.partition("=")
        scope, _, name = key.strip().rpartition(".")
        ok = bool(sep) and scope in out and name in _BWD_KEYS and not (
            scope == "dw" and name == "DX_SPLITS") and not (scope and name in _WHOLE_BWD_KEYS)
        try:
            v = int(val.strip())
        except ValueError:
            ok = False
        if ok and name.startswith("BLOCK_"):
            ok = v >= 16 and v & (v - 1) == 0
        elif ok and name == "num_warps":
            ok = v in (1, 2, 4, 8, 16)
        elif ok and name in ("FULL_D", "CUT_CHAIN", "GCHUNK"):
            ok = v in ((-1, 0, 1) if name == "CUT_CHAIN" else (0, 1))
        elif ok:
            ok = v >= (0 if name in ("DX_SPLITS", "GCHUNK_COLS") else 1)
        if not ok:
            raise ValueError(
                f"{_BWD_ENV}={spec!r}: bad entry {item!r}; expected comma-separated "
                f"[dx.|dw.]KEY=INT with KEY in {_BWD_KEYS} (BLOCK_* powers of two >= 16, "
                "FULL_D 0/1, CUT_CHAIN -1/0/1, DX_SPLITS 0 = automatic, GCHUNK 0/1 and "
                "GCHUNK_COLS >= 0 without a prefix)")
        out[scope][name] = v
    return out


_GCHUNK_ON = dict(GCHUNK=1, GCHUNK_COLS=0)


def _bwd_default(dtype: torch.dtype, D: int) -> Tuple[dict, dict, dict]:
    """GPU backward configuration for 16-bit or fp32 inputs and feature size D:
    (both kernels, dx only, dw only). Chosen with ptxas -v on sm_90 (module docstring).

    16-bit, D <= 512: FULL_D (BLOCK_DO = next power of two of D), BLOCK_N = BLOCK_C = 64 and 8
    warps, so the (64, BLOCK_DO) fp32 accumulator is at most 128 registers per thread
    (FlashAttention-3's budget at head dim 256); 3 stages up to D = 256, 2 at D = 512 (3 would
    need ~260 KiB of shared memory). D = 512: 254 / 250 registers (dx / dw), no spills,
    ~196 / ~201 KiB of shared memory. D <= 256: the dx kernel takes BLOCK_N = 128 with the
    chain cut (below).
    16-bit, D > 512: a full-D accumulator would need 256 registers per thread; BLOCK_DO = 512
    spills inside the loop, so the sliced form with 256-wide slices (no spills).
    fp32 (input_precision="ieee": FMA, not tensor cores): the sliced form with the tiles of
    before (ptxas handles the fp32 FULL_D form badly: thousands of bytes of spills); dx takes
    BLOCK_D = 16 (with 32: 255 registers and a few spills).
    """
    Dp = _p2(D)
    if dtype != torch.float32:
        if Dp <= 512:
            stages = 3 if (64 + 2 * 64) * Dp * 2 <= 160 * 1024 else 2
            # D <= 256: the dx kernel's row block can be 128 = 16 x 8 warps (acc 128 x 256 is
            # 128 registers per thread): no chain cut needed, each warpgroup owns 64 rows, and
            # every w tile loaded serves twice the rows. With the chain cut all the same: uncut,
            # ptxas spilled 752 B (Triton 3.7) / 808 B (3.6) at 255 registers once the positive
            # masks went int32; cut, none under either (two stages uncut still spilled 32 B on
            # 3.6; BLOCK_C = 32 also fits, at half the product's N).
            only_dx = dict(BLOCK_N=128, CUT_CHAIN=1) if Dp <= 256 else {}
            return (dict(BLOCK_N=64, BLOCK_C=64, BLOCK_D=64, BLOCK_DO=Dp, num_warps=8,
                         num_stages=stages, DX_SPLITS=0, FULL_D=1, CUT_CHAIN=-1, **_GCHUNK_ON),
                    only_dx, {})
        return (dict(BLOCK_N=64, BLOCK_C=64, BLOCK_D=64, BLOCK_DO=256, num_warps=8, num_stages=3,
                     DX_SPLITS=0, FULL_D=1, CUT_CHAIN=-1, **_GCHUNK_ON), {}, {})
    return (dict(BLOCK_N=64, BLOCK_C=32, BLOCK_D=32, BLOCK_DO=_p2(D, hi=128), num_warps=8,
                 num_stages=2, DX_SPLITS=0, FULL_D=0, CUT_CHAIN=-1, **_GCHUNK_ON),
            dict(BLOCK_D=16), {})


def _config(dtype: torch.dtype, N: int, C: int, D: int, interpret: bool,
            env: bool = True) -> dict:
    """Block sizes, warps and stages for every kernel, for one problem.

    GPU: tiles sized for Hopper/Ampere tensor cores; 16-bit inputs get larger tiles (half the
    shared memory per element). Interpreter: the largest sensible tiles, because the interpreter
    costs about 1 ms per program and per op, regardless of the tile size (the backward's BLOCK_C
    is capped at 64 so that C > 64 gives the dx kernel two column splits to combine).

    The backward kernels' configurations are cfg["bwd_dx"] and cfg["bwd_dw"] (cfg["bwd"]: the
    shared defaults), with PYSSL_MLCD_TRITON_BWD applied (module docstring); _bwd_cfg then
    applies any _BWD_KEYS found flat in cfg (tests patch _config that way).
    """
    if interpret:
        bn, bc, bd = _p2(N, hi=128), _p2(C, hi=128), _p2(D, hi=128)
        bwd = dict(BLOCK_N=bn, BLOCK_C=_p2(C, hi=64), BLOCK_D=bd, BLOCK_DO=_p2(D, hi=128),
                   num_warps=4, num_stages=1, DX_SPLITS=0, FULL_D=1, CUT_CHAIN=-1, **_GCHUNK_ON)
        cfg = dict(fwd=dict(BLOCK_N=bn, BLOCK_C=bc, BLOCK_D=bd, num_warps=4, num_stages=1),
                   norm=dict(BLOCK_R=_p2(max(N, C), hi=256), BLOCK_D=bd, num_warps=4),
                   pos=dict(BLOCK_P=128, BLOCK_D=bd, num_warps=4))
        only_dx, only_dw = {}, {}
    else:
        # Chosen with ptxas -v on sm_90 (tests/test_triton_compile.py compiles these): no
        # register spills, loads pipelined through shared memory (num_stages buffers) on the
        # 16-bit path. fp32 uses input_precision="ieee", i.e. FMA rather than tensor cores, so
        # smaller tiles.
        if dtype != torch.float32:
            fwd = dict(BLOCK_N=_p2(N, hi=128), BLOCK_C=128, BLOCK_D=64, num_warps=8, num_stages=3)
        else:
            fwd = dict(BLOCK_N=_p2(N, hi=64), BLOCK_C=64, BLOCK_D=32, num_warps=8, num_stages=2)
        bwd, only_dx, only_dw = _bwd_default(dtype, D)
        cfg = dict(fwd=fwd,
                   norm=dict(BLOCK_R=32, BLOCK_D=_p2(D, hi=128), num_warps=4),
                   pos=dict(BLOCK_P=64, BLOCK_D=_p2(D, hi=128), num_warps=4))
    env = _bwd_env() if env else {"": {}, "dx": {}, "dw": {}}
    cfg["bwd"] = dict(bwd, **env[""])
    cfg["bwd_dx"] = dict(bwd, **only_dx, **env[""], **env["dx"])
    cfg["bwd_dw"] = dict(bwd, **only_dw, **env[""], **env["dw"])
    return cfg


def _fwd_cfg(cfg: dict) -> dict:
    """The forward kernel's configuration: cfg["fwd"] with flat block sizes applied (tests)."""
    f = dict(cfg["fwd"])
    f.update({k: cfg[k] for k in _FWD_FLAT_KEYS if k in cfg})
    return f


def _bwd_cfg(cfg: dict, which: str, D: int) -> dict:
    """The configuration of one backward kernel (which = "dx" or "dw"), flat overrides applied
    and the form resolved: a slice wider than the next power of two of D buys nothing;
    FULL_D = one slice (BLOCK_DO >= D) and the form allowed; CUT_CHAIN automatic unless forced."""
    b = dict(cfg.get("bwd_" + which, cfg["bwd"]))
    b.update({k: cfg[k] for k in _BWD_KEYS if k in cfg})
    b["BLOCK_DO"] = min(b["BLOCK_DO"], _p2(D))
    b["FULL_D"] = bool(b.get("FULL_D", 1)) and b["BLOCK_DO"] >= D
    cut = b.get("CUT_CHAIN", -1)
    b["CUT_CHAIN"] = b["BLOCK_N"] < 16 * b["num_warps"] if cut < 0 else bool(cut)
    return b


def _bwd_flops(N: int, Cp: int, D: int, b: dict) -> int:
    """FLOPs one backward kernel with configuration b (from _bwd_cfg) issues, padding included:
    per slice the cos recompute (2·N·C'·Dr; Dr = BLOCK_DO in FULL_D form, else D rounded up to
    BLOCK_D) and the product over the slice (2·N·C'·BLOCK_DO). Useful work is 2·N·C'·D per
    kernel."""
    if b["FULL_D"]:
        return 4 * N * Cp * b["BLOCK_DO"]
    slices = triton.cdiv(D, b["BLOCK_DO"])
    Dr = triton.cdiv(D, b["BLOCK_D"]) * b["BLOCK_D"]
    return slices * 2 * N * Cp * (Dr + b["BLOCK_DO"])


def _num_splits(device: torch.device, row_blocks: int, col_tiles: int, interpret: bool) -> int:
    """Column splits of the forward so the grid is about 4 waves of the SMs (2 in the interpreter,
    which keeps the program count small and still exercises the split combine)."""
    if interpret or device.type != "cuda":
        return max(1, min(2, col_tiles))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(col_tiles, triton.cdiv(4 * sms, max(row_blocks, 1))))


def _dx_splits(device: torch.device, programs: int, col_tiles: int, interpret: bool,
               requested: int = 0) -> int:
    """Column splits of the dx kernel (requested > 0: that many, at most one per column tile).

    Automatic: the dx grid without splits is cdiv(N, BLOCK_N) x slices programs, e.g. 64 for
    N = 4096 at BLOCK_N = 64, half of an H200's 132 SMs. The backward configurations hold one
    program per SM (shared memory), so take the fewest splits s <= 8 whose grid fills its last
    wave best: efficiency programs * s / (waves * SMs), a split kept only when it gains more
    than 5 points (N = 4096: s = 2, 97%; N = 8192: s = 1, 97%; N = 6144: s = 4, 97%).
    The interpreter (and CPU tensors) use 2 when there are two column tiles, so the tests run
    the split combine.
    """
    if requested > 0:
        return max(1, min(int(requested), col_tiles, MAX_GRID_YZ))
    if interpret or device.type != "cuda":
        return max(1, min(2, col_tiles))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    best, best_eff = 1, 0.0
    for s in range(1, min(_MAX_AUTO_DX_SPLITS, col_tiles) + 1):
        p = programs * s
        eff = p / (triton.cdiv(p, sms) * sms)
        if eff > best_eff + 0.05:
            best, best_eff = s, eff
    return best


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
    if classes is not None:
        classes = classes.to(device=x.device, dtype=torch.int64).contiguous()
        Cp = classes.numel()
    else:
        Cp = w.shape[0]
    if Cp >= 2 ** 31:
        raise ValueError(f"the Triton kernels index at most 2^31 - 1 candidate classes per call (per shard), got {Cp}")
    # int32 column indices: the positive masks compare them with every column of a tile, and a
    # 64-bit compare costs two instructions (and registers: int64 copies of the columns spilled)
    pos_col = pos_col.to(torch.int32).contiguous()
    return x, w, classes, pos_col, Cp


def _cls_arg(classes: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The CLS pointer: the class ids, or (HAS_CLASSES=False, never read) an empty int64 tensor."""
    return classes if classes is not None else torch.empty(0, dtype=torch.int64, device=like.device)


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


def _common_flags(dtype):
    """(interpreting, the constexprs every dot-using kernel takes): float32 inputs follow
    torch's float32 matmul precision ("ieee" unless the user allowed TF32, _tiles.dot_options)."""
    interpret = _interpreting()
    return interpret, _dot_options(dtype, interpret)


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
    interpret, flags = _common_flags(x.dtype)
    f = _fwd_cfg(cfg)
    row_blocks = triton.cdiv(N, f["BLOCK_N"])
    col_tiles = triton.cdiv(Cp, f["BLOCK_C"])
    if splits is None:
        splits = _num_splits(x.device, row_blocks, col_tiles, interpret)
    splits = max(1, min(int(splits), col_tiles, MAX_GRID_YZ))   # grid axis y
    tiles_per_split = triton.cdiv(col_tiles, splits)
    splits = triton.cdiv(col_tiles, tiles_per_split)   # drop splits that would own no tile
    rx, rw = _inv_norms(x, w, classes, Cp, cfg)
    part_max = torch.empty(splits, N, device=x.device, dtype=torch.float32)
    part_sum = torch.empty(splits, N, device=x.device, dtype=torch.float32)
    _mlcd_lse_fwd_kernel[(row_blocks, splits)](
        x, w, _cls_arg(classes, x), rx, rw, pos_col, part_max, part_sum,
        N, Cp, D, x.stride(0), w.stride(0), float(scale) * LOG2E, tiles_per_split,
        L=L, L_PAD=_p2(L, lo=2), HAS_CLASSES=classes is not None, BLOCK_N=f["BLOCK_N"], BLOCK_C=f["BLOCK_C"],
        BLOCK_D=f["BLOCK_D"], num_warps=f["num_warps"], num_stages=f["num_stages"], **flags)
    row_max, row_sum = combine_lse_stats(part_max, part_sum, dim=0)
    return row_max, row_sum, rx, rw


@on_tensor_device
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


@on_tensor_device
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
            x, w, _cls_arg(classes, x), rx, rw, pos_col, pos_cos,
            N * L, D, x.stride(0), w.stride(0),
            L=L, HAS_CLASSES=classes is not None, BLOCK_P=p["BLOCK_P"], BLOCK_D=p["BLOCK_D"],
            num_warps=p["num_warps"])
    return lse_neg, pos_cos


@on_tensor_device
def mlcd_grad(x: torch.Tensor, w: torch.Tensor, classes: Optional[torch.Tensor],
              pos_col: torch.Tensor, scale: float, lse_total: torch.Tensor, gneg: torch.Tensor,
              gpos: torch.Tensor, dx_dtype: Optional[torch.dtype] = None, need_dx: bool = True,
              need_dw: bool = True, dw_dtype: Optional[torch.dtype] = None
              ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dx (N, D), dw (C, D)) of the contract, dw in w's dtype unless dw_dtype (float32 for the
    16-bit rows of float32 centers), dx in x's unless dx_dtype (float32: unrounded, for a caller
    that sums partial dx, as the model-parallel form does across ranks); rows of dw outside S
    are zero. need_dx / need_dw False: that product is skipped and None comes back in its place.

    The class-chunked default finishes both gradients in float32 and stores any dtype directly.
    The fused kernels (GCHUNK=0) store dw / gscale in w's dtype when dw_dtype widens it (in range
    whatever the upstream gradient's size; the factor applied in float32 afterwards: a float32
    store straight from the 16-bit FULL_D kernel spills at D = 512), and a float32 dx goes
    through the dx kernel's split form (float32 partials, whose stores do not spill)."""
    x, w, classes, pos_col, Cp = _prepare(x, w, classes, pos_col)
    N, D = x.shape
    C = w.shape[0]
    L = pos_col.shape[1]
    cfg = _config(x.dtype, N, Cp, D, _interpreting())
    gchunk = _gchunk_cfg(cfg)["GCHUNK"]
    dx = torch.empty(N, D, device=x.device, dtype=dx_dtype or x.dtype) if need_dx else None
    # With S = all classes every dw row is written by the kernel; otherwise the rows outside S
    # must be zero. The chunked form stores any dtype directly (its finish kernel is small).
    dw = (torch.empty if classes is None else torch.zeros)(
        C, D, device=w.device, dtype=(dw_dtype or w.dtype) if gchunk else w.dtype) if need_dw else None
    if N == 0 or Cp == 0 or D == 0 or not (need_dx or need_dw):
        return (None if dx is None else dx.zero_()), (None if dw is None else dw.zero_().to(dw_dtype or w.dtype))
    lse_total = lse_total.to(torch.float32).contiguous()
    # The G tiles feed 16-bit tensor-core products: with the upstream gradient inside them, a
    # loss scaler's 2^16 (or a sum over many rows) overflows float16 and 1/N for large N
    # loses it to subnormals. So the kernels take gneg, gpos divided by their largest magnitude
    # (|G| <= scale) and multiply the float32 accumulators back (a device scalar: no sync).
    gscale = torch.maximum(gneg.detach().abs().amax(), gpos.detach().abs().amax()).to(torch.float32)
    gscale = gscale.clamp_min(torch.finfo(torch.float32).tiny).reshape(1)
    gneg = (gneg.to(torch.float32) / gscale).contiguous()
    gpos = (gpos.to(torch.float32) / gscale).contiguous()
    interpret, flags = _common_flags(x.dtype)
    rx, rw = _inv_norms(x, w, classes, Cp, cfg)
    cls = _cls_arg(classes, x)
    scale = float(scale)
    if gchunk:
        _grad_gchunk(x, w, classes, cls, rx, rw, pos_col, lse_total, gneg, gpos, gscale, dx, dw,
                     scale, cfg, flags)
        return dx, dw
    common = dict(L=L, HAS_CLASSES=classes is not None, **flags)

    def launch_args(b):
        return dict(BLOCK_N=b["BLOCK_N"], BLOCK_C=b["BLOCK_C"], BLOCK_D=b["BLOCK_D"],
                    BLOCK_DO=b["BLOCK_DO"], FULL_D=b["FULL_D"], CUT_CHAIN=b["CUT_CHAIN"],
                    num_warps=b["num_warps"], num_stages=b["num_stages"], **common)

    if need_dx:
        _launch_dx(x, w, cls, rx, rw, pos_col, lse_total, gneg, gpos, gscale, dx, N, Cp, D, scale, cfg,
                   interpret, launch_args)
    if need_dw:
        # dw: column blocks x D slices.
        b = _bwd_cfg(cfg, "dw", D)
        widen = dw_dtype is not None and dw_dtype != dw.dtype
        _mlcd_grad_dw_kernel[(triton.cdiv(Cp, b["BLOCK_C"]), triton.cdiv(D, b["BLOCK_DO"]))](
            x, w, cls, rx, rw, pos_col, lse_total, gneg, gpos, torch.ones_like(gscale) if widen else gscale, dw,
            N, Cp, D, x.stride(0), w.stride(0), dw.stride(0), scale, scale * LOG2E,
            **launch_args(b))
        if widen:
            dw = dw.to(dw_dtype).mul_(gscale)
    return dx, dw


def _gchunk_cfg(cfg: dict) -> dict:
    """GCHUNK / GCHUNK_COLS of the backward: cfg["bwd"] (PYSSL_MLCD_TRITON_BWD applied), then
    flat keys (tests)."""
    b = {k: cfg["bwd"][k] for k in _WHOLE_BWD_KEYS}
    b.update({k: cfg[k] for k in _WHOLE_BWD_KEYS if k in cfg})
    return b


def _row_tiles(D: int) -> Tuple[dict, dict]:
    """(constexprs, options) of the row-wise kernels of the chunked backward
    (_scaled_rows_kernel, _mlcd_dw_finish_kernel): 32 rows, D in pieces of at most 128."""
    return dict(BLOCK_R=32, BLOCK_D=_p2(D, hi=128)), dict(num_warps=4)


_GCHUNK_MIN_BYTES = 32 << 20
_GCHUNK_MAX_BYTES = 256 << 20


def _gchunk_cols(N: int, Cp: int, C: int, D: int, elem: int, block_c: int, requested: int = 0) -> int:
    """Columns of S per chunk of the class-chunked backward (requested > 0: that many).

    Automatic: the chunk's buffers, N·elem (G'') + D·elem (W̃_k) + 4·D (B_k) bytes per column,
    take an eighth of the class table's bytes (C·D·elem / 8), clamped to [32 MiB, 256 MiB]:
    a fraction of the inputs and gradients (2·C·D·elem and up) at every C and N. CK is a
    multiple of 256 (whole tiles, GEMM-friendly K), at least 256, e.g. CK = 11,776 at N = 4096
    for 1M x 512 bfloat16 centers (128 MiB), and at most about half of S (C' up to a few
    thousand: two chunks rather than the N x C' matrix; below 512 columns a multiple of 8).
    Either way at most C' and at most MAX_GRID_YZ column tiles (grid axis 1 of the G kernel)."""
    if requested > 0:
        ck = int(requested)
    else:
        budget = min(max(C * D * elem // 8, _GCHUNK_MIN_BYTES), _GCHUNK_MAX_BYTES)
        ck = max(256, budget // max(N * elem + D * (elem + 4), 1) // 256 * 256)
        # about half the columns at most, rounded up to whole 256-column tiles (8 columns below
        # 512: 16-byte rows for the GEMMs): the G'' chunk is not the N x C' logits matrix
        # (SPEC §1) where the budget would hold all of them (C' up to a few thousand)
        half = (Cp + 1) // 2
        unit = 256 if half >= 256 else 8
        ck = min(ck, -(-half // unit) * unit)
    return max(1, min(ck, Cp, MAX_GRID_YZ * block_c))


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a · b with float32 accumulation and a float32 result: cuBLAS's 16-bit GEMM with a float32
    output on the GPU (torch >= 2.8: mm's out_dtype; no rounding of the product to 16 bits);
    elsewhere (the interpreter's CPU tensors) the float32 product of the upcast operands, the
    same arithmetic (products of 16-bit values are exact in float32). float32 inputs follow
    torch's float32 matmul precision, as the fused kernels do."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def _pow2_split(r: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(p, a) with r = p · a, p a power of two and a in about [1, 2) (exactly r / p): the
    exact-operand split of the chunked backward (see its header). r = 0 (a float32 row whose
    squared norm overflows, as torch.linalg.vector_norm and F.normalize take it: x̂ = 0) gives
    p = 1, a = 0: the row adds nothing and gets a zero gradient, as in the fused kernels (0/0
    there made every row of the other gradient NaN)."""
    p = torch.exp2(torch.floor(torch.log2(r)))
    p = torch.where(r > 0, p, torch.ones_like(p))
    return p, r / p


def _scaled_rows(src, idx, f, out, r0, R):
    """out[:R] = src[idx[r0:r0+R]] · f[r0:r0+R] (idx None: rows r0...), _scaled_rows_kernel."""
    D = src.shape[1]
    tiles, opts = _row_tiles(D)
    _scaled_rows_kernel[(triton.cdiv(R, tiles["BLOCK_R"]),)](
        src, idx if idx is not None else f, f, out, r0, R, D, src.stride(0), out.stride(0),
        HAS_IDX=idx is not None, **tiles, **opts)
    return out[:R]


def _grad_gchunk(x, w, classes, cls, rx, rw, pos_col, lse_total, gneg, gpos, gscale, dx, dw,
                 scale, cfg, flags):
    """The class-chunked backward (see the kernels' header): per chunk of CK columns of S, the G''
    kernel, then P += G''·W̃_k and B = G''ᵀ·X̃ with dw[S_k] finished and stored; dx finished once
    at the end. dx / dw None: that product (and its buffers) skipped."""
    N, D = x.shape
    Cp = rw.shape[0]
    L = pos_col.shape[1]
    f = _fwd_cfg(cfg)
    ck = _gchunk_cols(N, Cp, w.shape[0], D, x.element_size(), f["BLOCK_C"],
                      _gchunk_cfg(cfg)["GCHUNK_COLS"])
    px, ax = _pow2_split(rx)
    pw, mw = _pow2_split(rw)
    g = torch.empty(N, ck, device=x.device, dtype=x.dtype)
    if dx is not None:
        acc_x = torch.zeros(N, D, device=x.device, dtype=torch.float32)
        w_t = torch.empty(ck, D, device=x.device, dtype=x.dtype)
    if dw is not None:
        x_t = _scaled_rows(x, None, px, torch.empty_like(x, memory_format=torch.contiguous_format), 0, N)
    tiles, opts = _row_tiles(D)
    for c0 in range(0, Cp, ck):
        k = min(ck, Cp - c0)
        _mlcd_grad_g_kernel[(triton.cdiv(N, f["BLOCK_N"]), triton.cdiv(k, f["BLOCK_C"]))](
            x, w, cls, rx, rw, ax, mw, lse_total, gneg, g,
            N, D, c0, k, x.stride(0), w.stride(0), g.stride(0), scale, scale * LOG2E,
            HAS_CLASSES=classes is not None, BLOCK_N=f["BLOCK_N"], BLOCK_C=f["BLOCK_C"],
            BLOCK_D=f["BLOCK_D"], num_warps=f["num_warps"], num_stages=f["num_stages"], **flags)
        _mlcd_g_positives_kernel[(triton.cdiv(N, POS_BLOCK_R),)](
            g, pos_col, gpos, ax, mw, N, c0, k, g.stride(0), L=L, L_PAD=_p2(L, lo=2), BLOCK_R=POS_BLOCK_R,
            num_warps=4)
        gk = g[:, :k]
        if dx is not None:
            acc_x += _mm_f32(gk, _scaled_rows(w, classes, pw, w_t, c0, k))
        if dw is not None:
            b = _mm_f32(gk.t(), x_t)
            _mlcd_dw_finish_kernel[(triton.cdiv(k, tiles["BLOCK_R"]),)](
                b, w, cls, rw, pw, gscale, dw, c0, k, D, b.stride(0), w.stride(0), dw.stride(0),
                HAS_CLASSES=classes is not None, **tiles, **opts)
    if dx is not None:
        _finish_dx(acc_x, x, rx, None, dx, gscale, out_rows=px)


def _finish_dx(acc, x, rx, q, dx, gscale=None, out_rows=None):
    """dx = f * (acc - x * rx * q) (* gscale) into dx, with acc (float32, consumed) = dx̂ · rx / f,
    f = out_rows (default rx: acc = dx̂); q = x̂ . acc, taken from acc when None
    (rx * Σ_d x·acc)."""
    xf = x.to(torch.float32)
    if q is None:
        q = rx * (xf * acc).sum(1)
    acc.addcmul_(xf, (rx * q).unsqueeze(1), value=-1.0)
    f = rx if out_rows is None else out_rows
    acc.mul_(f.unsqueeze(1) if gscale is None else f.unsqueeze(1) * gscale)
    dx.copy_(acc)


def _launch_dx(x, w, cls, rx, rw, pos_col, lse_total, gneg, gpos, gscale, dx, N, Cp, D, scale, cfg,
               interpret, launch_args):
    """dx: row blocks x D slices x column splits."""
    b = _bwd_cfg(cfg, "dx", D)
    row_blocks, slices = triton.cdiv(N, b["BLOCK_N"]), triton.cdiv(D, b["BLOCK_DO"])
    col_tiles = triton.cdiv(Cp, b["BLOCK_C"])
    splits = _dx_splits(x.device, row_blocks * slices, col_tiles, interpret, b["DX_SPLITS"])
    tiles_per_split = triton.cdiv(col_tiles, splits)
    splits = triton.cdiv(col_tiles, tiles_per_split)   # drop splits that would own no tile
    split_out = splits > 1 or dx.dtype != x.dtype
    if split_out:
        # (FULL_D: no partial q, the caller takes q from the summed accumulator)
        part = torch.empty(splits, N, D, device=x.device, dtype=torch.float32)
        part_q = rx if b["FULL_D"] else torch.empty(splits, N, device=x.device,
                                                      dtype=torch.float32)
        out, out_q, stride_out = part, part_q, D
    else:
        out, out_q, stride_out = dx, rx, dx.stride(0)     # PART_Q unused without splits
    _mlcd_grad_dx_kernel[(row_blocks, slices, splits)](
        x, w, cls, rx, rw, pos_col, lse_total, gneg, gpos, gscale, out, out_q,
        N, Cp, D, x.stride(0), w.stride(0), stride_out, scale, scale * LOG2E, tiles_per_split,
        SPLIT_OUT=split_out, **launch_args(b))
    if split_out:
        # dx = rx * (acc - x * rx * q) is linear in the partial (acc, q): sum them over the
        # splits (fixed order, deterministic), then finish the normalization backward here.
        # FULL_D: q = x̂ . dx̂ = rx * Σ_d x·acc from the summed accumulator.
        _finish_dx(part.sum(0), x, rx, None if b["FULL_D"] else part_q.sum(0), dx)


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


def _bwd_compile_case(kernel, dtype: torch.dtype, b: dict, split_out: bool = False,
                      has_classes: bool = True, L: int = 4, prec: str = "ieee") -> tuple:
    """A compile case of a backward kernel with configuration b (from _bwd_cfg): also what a
    ptxas check of a candidate configuration builds (see the module docstring)."""
    t = "*" + _TL_DTYPE_NAME[dtype]
    base = dict(X=t, W=t, CLS="*i64", RX="*fp32", RW="*fp32", POS="*i32", LSE="*fp32",
                GNEG="*fp32", GPOS="*fp32", GSCALE="*fp32")
    scalars = dict(N="i32", C="i32", D="i32", stride_x="i32", stride_w="i32")
    const = dict(L="constexpr", HAS_CLASSES="constexpr", BLOCK_N="constexpr",
                 BLOCK_C="constexpr", BLOCK_D="constexpr", BLOCK_DO="constexpr",
                 FULL_D="constexpr", CUT_CHAIN="constexpr")
    flags = dict(DOT_FP32="constexpr", DOT_PRECISION="constexpr")
    if kernel is _mlcd_grad_dx_kernel:
        sig = dict(base, DX="*fp32" if split_out else t, PART_Q="*fp32", **scalars,
                   stride_dx="i32", scale="fp32", scale_log2e="fp32", tiles_per_split="i32",
                   **const, SPLIT_OUT="constexpr", **flags)
        extra = dict(SPLIT_OUT=split_out)
    else:
        sig = dict(base, DW=t, **scalars, stride_dw="i32", scale="fp32", scale_log2e="fp32",
                   **const, **flags)
        extra = {}
    consts = dict(L=L, HAS_CLASSES=has_classes, BLOCK_N=b["BLOCK_N"], BLOCK_C=b["BLOCK_C"],
                  BLOCK_D=b["BLOCK_D"], BLOCK_DO=b["BLOCK_DO"], FULL_D=b["FULL_D"],
                  CUT_CHAIN=b["CUT_CHAIN"], **extra,
                  **_dot_options(dtype, False, prec))    # what a launch passes (_common_flags)
    return (kernel, sig, consts, dict(num_warps=b["num_warps"], num_stages=b["num_stages"]),
            _aligned(sig))


def _gchunk_compile_cases() -> List[tuple]:
    """The class-chunked backward's kernels at D = 512: the G kernel on the forward's tiles
    (16-bit, fp32 under both matmul precisions; also S = all classes), the dw finish into
    16-bit and float32 gradients. The G kernel's N, c0 and CK are multiples of 16 at a typical
    launch (CK a multiple of 256, c0 of CK; the launcher specialises such integers), which is
    what lets its tile store vectorise (8 16-byte stores per thread against 64 2-byte ones);
    the ragged last chunk (CK not a multiple of 16) is compiled too."""
    cases = []
    D = 512
    for dtype, prec in ((torch.bfloat16, "ieee"), (torch.float16, "ieee"),
                        (torch.float32, "ieee"), (torch.float32, "tf32")):
        t = "*" + _TL_DTYPE_NAME[dtype]
        f = _config(dtype, 4096, 1 << 20, D, interpret=False, env=False)["fwd"]
        sig = dict(X=t, W=t, CLS="*i64", RX="*fp32", RW="*fp32", AF="*fp32", MF="*fp32", LSE="*fp32",
                   GNEG="*fp32", G=t, N="i32", D="i32", c0="i32",
                   CK="i32", stride_x="i32", stride_w="i32", stride_g="i32", scale="fp32",
                   scale_log2e="fp32", HAS_CLASSES="constexpr",
                   BLOCK_N="constexpr", BLOCK_C="constexpr", BLOCK_D="constexpr",
                   DOT_FP32="constexpr", DOT_PRECISION="constexpr")
        forms = ((True, True), (False, True), (True, False)) if dtype == torch.bfloat16 else ((True, True),)
        for has_cls, whole in forms:
            cases.append((_mlcd_grad_g_kernel, sig,
                          dict(HAS_CLASSES=has_cls, BLOCK_N=f["BLOCK_N"],
                               BLOCK_C=f["BLOCK_C"], BLOCK_D=f["BLOCK_D"],
                               **_dot_options(dtype, False, prec)),
                          dict(num_warps=f["num_warps"], num_stages=f["num_stages"]),
                          _aligned(sig) + (["N", "c0", "CK"] if whole else [])))
        if prec == "ieee":
            cases.append((_mlcd_g_positives_kernel,
                          dict(G=t, POS="*i32", GPOS="*fp32", AF="*fp32", MF="*fp32", N="i32", c0="i32",
                               CK="i32", stride_g="i32", L="constexpr", L_PAD="constexpr",
                               BLOCK_R="constexpr"),
                          dict(L=8, L_PAD=8, BLOCK_R=POS_BLOCK_R), dict(num_warps=4)))
        if prec != "ieee" or dtype == torch.float16:
            continue
        cases.append((_scaled_rows_kernel,
                      dict(SRC=t, IDX="*i64", F="*fp32", OUT=t, r0="i32", R="i32", D="i32",
                           stride_src="i32", stride_out="i32", HAS_IDX="constexpr",
                           BLOCK_R="constexpr", BLOCK_D="constexpr"),
                      dict(HAS_IDX=True, **_row_tiles(D)[0]), _row_tiles(D)[1]))
        for dw_t in sorted({t, "*fp32"}):
            cases.append((_mlcd_dw_finish_kernel,
                          dict(B="*fp32", W=t, CLS="*i64", RW="*fp32", PW="*fp32", GSCALE="*fp32", DW=dw_t,
                               c0="i32", CK="i32", D="i32", stride_b="i32", stride_w="i32",
                               stride_dw="i32", HAS_CLASSES="constexpr", BLOCK_R="constexpr",
                               BLOCK_D="constexpr"),
                          dict(HAS_CLASSES=True, **_row_tiles(D)[0]), _row_tiles(D)[1]))
    return [case if len(case) == 5 else case + (_aligned(case[1]),) for case in cases]


def _compile_cases() -> List[tuple]:
    cases = []
    D = 512
    for dtype, prec in ((torch.float32, "ieee"), (torch.bfloat16, "ieee"), (torch.float32, "tf32")):
        t = "*" + _TL_DTYPE_NAME[dtype]
        cfg = _config(dtype, 4096, 1 << 20, D, interpret=False)
        f, nrm, p = cfg["fwd"], cfg["norm"], cfg["pos"]
        flags = _dot_options(dtype, False, prec)    # what a launch passes (_common_flags)
        for has_idx in ((False, True) if prec == "ieee" else ()):
            cases.append((_row_inv_norm_kernel,
                          dict(X=t, IDX="*i64", OUT="*fp32", R="i32", D="i32", stride_x="i32",
                               HAS_IDX="constexpr", BLOCK_R="constexpr", BLOCK_D="constexpr"),
                          dict(HAS_IDX=has_idx, BLOCK_R=nrm["BLOCK_R"], BLOCK_D=nrm["BLOCK_D"]),
                          dict(num_warps=nrm["num_warps"])))
        base = dict(X=t, W=t, CLS="*i64", RX="*fp32", RW="*fp32", POS="*i32")
        const = dict(L="constexpr", HAS_CLASSES="constexpr", BLOCK_N="constexpr",
                     BLOCK_C="constexpr", BLOCK_D="constexpr")
        cases.append((_mlcd_lse_fwd_kernel,
                      dict(base, MAX_OUT="*fp32", SUM_OUT="*fp32", N="i32", C="i32", D="i32",
                           stride_x="i32", stride_w="i32", scale_log2e="fp32",
                           tiles_per_split="i32", **const, L_PAD="constexpr", DOT_FP32="constexpr",
                           DOT_PRECISION="constexpr"),
                      dict(L=8, L_PAD=8, HAS_CLASSES=True, BLOCK_N=f["BLOCK_N"], BLOCK_C=f["BLOCK_C"],
                           BLOCK_D=f["BLOCK_D"], **flags),
                      dict(num_warps=f["num_warps"], num_stages=f["num_stages"])))
        if prec != "ieee":
            continue
        cases.append((_pos_cos_kernel,
                      dict(base, OUT="*fp32", NL="i32", D="i32", stride_x="i32", stride_w="i32",
                           L="constexpr", HAS_CLASSES="constexpr", BLOCK_P="constexpr",
                           BLOCK_D="constexpr"),
                      dict(L=4, HAS_CLASSES=True, BLOCK_P=p["BLOCK_P"], BLOCK_D=p["BLOCK_D"]),
                      dict(num_warps=p["num_warps"])))
    cases = [case + (_aligned(case[1]),) for case in cases] + _gchunk_compile_cases()
    # Backward kernels, the default GPU configurations (PYSSL_MLCD_TRITON_BWD ignored): 16-bit
    # FULL_D at D = 512 (the MLCD target; also with S = all classes) and D = 256, sliced at
    # D = 1024 (also what D = 768 runs), the dx kernel with and without the column split; fp32
    # (sliced at every D). ptxas -v for each: no spills (module docstring, _bwd_default).
    for dtype, Dk, dx_split_forms in ((torch.bfloat16, 512, (False, True)),
                                      (torch.bfloat16, 256, (False,)),
                                      (torch.bfloat16, 1024, (False, True)),
                                      (torch.float16, 512, (False,)),
                                      (torch.float32, 512, (False,))):
        cfg = _config(dtype, 4096, 1 << 20, Dk, interpret=False, env=False)
        for split_out in dx_split_forms:
            cases.append(_bwd_compile_case(_mlcd_grad_dx_kernel, dtype, _bwd_cfg(cfg, "dx", Dk),
                                           split_out=split_out))
        cases.append(_bwd_compile_case(_mlcd_grad_dw_kernel, dtype, _bwd_cfg(cfg, "dw", Dk)))
        if dtype == torch.float32:   # under torch's TF32 setting: the same tiles on tensor cores
            for kern in (_mlcd_grad_dx_kernel, _mlcd_grad_dw_kernel):
                cases.append(_bwd_compile_case(kern, dtype, _bwd_cfg(cfg, kern.__name__[11:13], Dk),
                                               prec="tf32"))
        if dtype == torch.bfloat16 and Dk == 512:   # S = all classes (no id gather)
            for kern in (_mlcd_grad_dx_kernel, _mlcd_grad_dw_kernel):
                cases.append(_bwd_compile_case(kern, dtype, _bwd_cfg(cfg, kern.__name__[11:13], Dk),
                                               has_classes=False))
    return cases


COMPILE_CASES = _compile_cases()

__all__ = ["mlcd_lse", "mlcd_grad", "mlcd_lse_stats", "combine_lse_stats", "lse_from_stats",
           "COMPILE_CASES"]
