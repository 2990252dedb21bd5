"""Triton backend of k-nearest-neighbour search (pyssl.ood.KNNScorer, pyssl.cluster.topk_assign).

One entry point:

    knn_topk(queries, bank, k, *, bank_bias=None) -> (scores (Q, k) float32, indices (Q, k) int64)

queries (Q, D) and bank (B, D) are float32, bfloat16 or float16 (the same dtype and device, rows
contiguous); score(q, b) = q . bank_b + bank_bias_b with bank_bias (B,) float32 or None. Per query
the k largest scores come back sorted descending with their bank indices; equal scores go to the
lower bank index. 1 <= k <= B and k <= MAX_K. Cosine similarity: pass L2-normalised rows. Squared
L2 nearest neighbours: pass bank_bias = -0.5 * ||b||^2; then dist^2 = ||q||^2 - 2 * score.

The Q x B score matrix is never materialised: every program computes (BLOCK_Q, BLOCK_B) score
tiles with tl.dot and folds each into a running top-K_PAD held in registers (K_PAD = next power
of two >= k), by bitonic networks on packed 64-bit keys:

    key = (order-preserving int32 image of the fp32 score) << 32 | (2**31 - 1 - bank index)

so that one signed int64 comparison orders by score and, among equal scores, puts the lower
index first. Keys are unique per query (the index is in them), so every merge -- in the kernel,
and the torch.topk over the bank splits afterwards -- is exact and deterministic. -0.0 is keyed
as +0.0 so that it ties with it. NaN scores have no defined place.

Kernels (each has a header comment with tiling, residency and traffic):
    _knn_topk_kernel   per (query block, bank split): fused score tiles + streaming top-K_PAD

Interpreter notes (TRITON_INTERPRET=1, CPU tensors): every load is converted to float32 before
arithmetic (the interpreter does bf16 arithmetic wrongly), and under the interpreter (DOT_FP32)
the tl.dot operands are float32. On the GPU the operands stay in the input dtype (tensor cores,
fp32 accumulation) and fp32 inputs use input_precision="ieee" (no TF32).

Offsets into queries, bank and the output are int64 (B * D exceeds 2**31 for large banks).
Bank indices live in the low 32 bits of a key, so B <= 2**30 is required.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from pyssl.kernels._tiles import dot_rows_tile as _score_tile
from pyssl.kernels._tiles import interpreting as _interpreting, on_tensor_device, pow2 as _p2

MAX_K = 256          # largest k of the in-register top-k; larger k: the caller's torch path
_MAX_B = 2 ** 30      # bank indices are packed into the low 32 bits of a key (as 2**31 - 1 - b)
_LOW31 = 2 ** 31 - 1

_TL_DTYPE_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# ----------------------------------------------------------------------------------------------
# Device helpers (inlined into the kernel).
# ----------------------------------------------------------------------------------------------
@triton.jit
def _pack_keys(score, cols, valid):
    """int64 keys ordering by (score, then lower column first); invalid entries get the sentinel.

    The fp32 bits b map to the int32 b ^ ((b >> 31) & 0x7fffffff), which orders like the floats
    (negative floats have their magnitude bits flipped); -0.0 is mapped like +0.0.
    """
    bits = score.to(tl.int32, bitcast=True)
    s = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    s = tl.where(score == 0.0, 0, s)
    key = (s.to(tl.int64) << 32) | (2147483647 - cols).to(tl.int64)
    return tl.where(valid, key, -9223372036854775808)


@triton.jit
def _indicator(n_dims: tl.constexpr, j: tl.constexpr):
    """0/1 along the j-th innermost axis of an n_dims hypercube (broadcastable)."""
    ar = tl.arange(0, 2)
    return tl.reshape(ar, [1] * (n_dims - j - 1) + [2] + [1] * j)


@triton.jit
def _compare_and_swap(h, flip, i: tl.constexpr):
    """One bitonic compare-and-swap along the i-th innermost axis of the hypercube h (int64).

    The partner of each element is (sum over that size-2 axis) - h, a single reduction
    (registers, or one warp shuffle for an axis spread over lanes); wrap-around of the int64 sum
    cancels exactly. (xor_sum would do the same, but the interpreter runs a custom combine
    element by element, some 10^4 times slower.) The left element keeps the min and the right
    one the max, reversed where flip is 1.
    """
    n_dims: tl.constexpr = len(h.shape)
    other = tl.sum(h, axis=n_dims - 1 - i, keep_dims=True) - h
    is_right = _indicator(n_dims, i)
    return tl.where((h > other) != (flip ^ is_right), other, h)


@triton.jit
def _bitonic_merge(h, stage: tl.constexpr, order: tl.constexpr):
    """Merge bitonic runs of 2**stage along the innermost axes of the hypercube h.

    order 0: ascending runs, 1: descending, 2: alternating (run r ascending iff r is even),
    which makes pairs of neighbouring runs bitonic for the next stage.
    """
    if order == 2:
        flip = _indicator(len(h.shape), stage)
    else:
        flip = order
    for i in tl.static_range(stage):
        h = _compare_and_swap(h, flip, stage - 1 - i)
    return h


@triton.jit
def _row_topk(x, BLOCK_Q: tl.constexpr, LOG_N: tl.constexpr, LOG_K: tl.constexpr,
              DESCENDING: tl.constexpr):
    """The 2**LOG_K largest entries of every row of x (BLOCK_Q, 2**LOG_N), sorted.

    Bitonic top-k: sort runs of 2**LOG_K (alternating directions), then repeatedly take the
    elementwise max of neighbouring runs (a bitonic run holding the top of both) and re-merge it,
    halving the row each time. LOG_K*(LOG_K+1)/2 compare-and-swap stages over the row, then
    LOG_K per halving on ever shorter rows.
    """
    h = tl.reshape(x, [BLOCK_Q] + [2] * LOG_N)
    for i in tl.static_range(1, LOG_K + 1):
        h = _bitonic_merge(h, i, 2 if i < LOG_N else DESCENDING)
    for i in tl.static_range(LOG_K + 1, LOG_N + 1):
        h = tl.max(h, axis=len(h.shape) - 1 - LOG_K)
        h = _bitonic_merge(h, LOG_K, 2 if i < LOG_N else DESCENDING)
    return tl.reshape(h, [BLOCK_Q, 2 ** LOG_K])


# ----------------------------------------------------------------------------------------------
# _knn_topk_kernel
#   Computes: for the queries of a block and the bank rows of split s, the K_PAD largest keys
#             key(score(q, b), b), score = q . bank_b (+ bias_b), sorted descending, into
#             OUT[s, q, :] (int64; the sentinel where the split has fewer than K_PAD rows).
#   Tiling:   grid (cdiv(Q, BLOCK_Q), SPLITS). A program owns BLOCK_Q queries and the contiguous
#             bank-tile range [s * tiles_per_split, (s + 1) * tiles_per_split). Per BLOCK_B tile:
#             the score tile by tl.dot over D in BLOCK_D steps (fp32 accumulate), packed to keys;
#             if some key of the tile beats its row's current K_PAD-th key (one max and one
#             compare per row), the tile's own top-K_PAD is extracted ascending (_row_topk),
#             max'ed elementwise against the descending running list (a bitonic sequence holding
#             the top K_PAD of both) and re-merged descending (LOG_K stages). Tiles that cannot
#             change any row's list cost the dot and two reductions only; in random bank order
#             tile t still holds about BLOCK_Q * k / t winners over the block, so skipping pays
#             off on banks of many more than BLOCK_Q * k tiles (or ordered/clustered banks).
#   Registers: the running top list (BLOCK_Q, K_PAD) int64 (BLOCK_Q * K_PAD is capped by the
#             config so it stays in registers), the (BLOCK_Q, BLOCK_B) fp32 accumulator and its
#             int64 keys; the query/bank operand tiles are staged through shared memory by
#             tl.dot (software-pipelined, num_stages buffers), and the sorting network's
#             layout conversions may use shared memory too.
#   Traffic:  the bank is read once per query block (cdiv(Q, BLOCK_Q) * B * D elements, the
#             dominant term; L2 serves the query blocks that stream the same tile together),
#             the queries once per bank tile from L1/L2, the bias once per tile. Written:
#             SPLITS * Q * K_PAD int64 keys, merged by torch.topk over the splits.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _knn_topk_kernel(Qp, Bp, BIAS, OUT, Q, B, D, stride_q, stride_b, tiles_per_split,
                     HAS_BIAS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_B: tl.constexpr,
                     BLOCK_D: tl.constexpr, LOG_B: tl.constexpr, LOG_K: tl.constexpr,
                     DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    K_PAD: tl.constexpr = 2 ** LOG_K
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    rmask = rows < Q

    # Running top list, descending; the sentinel is below every real key.
    top = tl.full((BLOCK_Q, K_PAD), -9223372036854775808, dtype=tl.int64)
    kth = tl.min(top, axis=1)
    t_begin = split * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, tl.cdiv(B, BLOCK_B))
    for t in range(t_begin, t_end):
        cols = t * BLOCK_B + tl.arange(0, BLOCK_B)
        cmask = cols < B
        score = _score_tile(Qp, Bp, rows, cols, rmask, cmask, D, stride_q, stride_b,
                            BLOCK_Q, BLOCK_B, BLOCK_D, DOT_FP32, DOT_PRECISION)
        if HAS_BIAS:
            bias = tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)
            score = score + bias[None, :]
        keys = _pack_keys(score, cols[None, :], cmask[None, :])
        beats = tl.max((tl.max(keys, axis=1) > kth).to(tl.int32), axis=0)
        if beats > 0:
            cand = _row_topk(keys, BLOCK_Q, LOG_B, LOG_K, 0)   # ascending
            top = tl.reshape(tl.maximum(top, cand), [BLOCK_Q] + [2] * LOG_K)
            top = _bitonic_merge(top, LOG_K, 1)                 # descending
            top = tl.reshape(top, [BLOCK_Q, K_PAD])
            kth = tl.min(top, axis=1)

    out = ((split.to(tl.int64) * Q + rows.to(tl.int64))[:, None] * K_PAD
           + tl.arange(0, K_PAD)[None, :])
    tl.store(OUT + out, top, mask=rmask[:, None])


# ----------------------------------------------------------------------------------------------
# Launch configuration: a small heuristic instead of autotuning (the interpreter cannot run
# several autotune configs).
# ----------------------------------------------------------------------------------------------
def _config(dtype: torch.dtype, Q: int, B: int, D: int, k: int, interpret: bool) -> dict:
    """Block sizes, warps and stages for one problem (K_PAD = next power of two >= k).

    BLOCK_B >= K_PAD always (a tile's own top-K_PAD is taken from that one tile). On the GPU the
    running list (BLOCK_Q, K_PAD) int64, the tile keys (BLOCK_Q, BLOCK_B) int64 and the sorting
    network's temporaries must stay in registers, so BLOCK_Q shrinks as k grows. Interpreter:
    the largest sensible tiles, since it costs about 1 ms per program and op whatever the size.
    """
    k_pad = triton.next_power_of_2(k)
    if interpret:
        return dict(BLOCK_Q=_p2(Q, hi=64), BLOCK_B=max(k_pad, _p2(B, hi=128)),
                    BLOCK_D=_p2(D, hi=128), K_PAD=k_pad, num_warps=4, num_stages=1)
    # Chosen with ptxas -v on sm_90 at D = 768 (tests/test_triton_compile.py compiles the
    # COMPILE_CASES below), all without spills and with 8 warps:
    #   16-bit, K_PAD <= 64: BLOCK_Q = 128 (wgmma with warps [8, 1], so a whole row of the tile
    #     sits in one warp and the sorting network needs shuffles only, no shared memory), about
    #     216 registers at k = 50; K_PAD <= 16 affords BLOCK_B = 128 (sorting is cheap there).
    #     With Q <= 64 the 16-bit path takes BLOCK_Q = 64 (about 170 registers).
    #   fp32 (FMA dot, "ieee"): BLOCK_Q = 64 (128 spills).
    #   K_PAD = 128 / 256: BLOCK_Q = 32 / 16, BLOCK_B = K_PAD (32 x 256 spills).
    # Smaller BLOCK_Q for small Q is avoided on purpose: ptxas then aims at two blocks per SM
    # (128 registers) and spills a little. 16 warps cap registers at 128 and spill everywhere.
    sixteen_bit = dtype != torch.float32
    if k_pad <= 64:
        block_q = 128 if sixteen_bit and Q > 64 else 64
    else:
        block_q = 4096 // k_pad
    block_b = max(k_pad, 128 if sixteen_bit and k_pad <= 16 else 64)
    if sixteen_bit:
        return dict(BLOCK_Q=block_q, BLOCK_B=block_b, BLOCK_D=64, K_PAD=k_pad,
                    num_warps=8, num_stages=3)
    return dict(BLOCK_Q=block_q, BLOCK_B=block_b, BLOCK_D=32, K_PAD=k_pad,
                num_warps=8, num_stages=2)


def _num_splits(device: torch.device, row_blocks: int, bank_tiles: int, interpret: bool) -> int:
    """Bank splits so that the grid is about 2 waves of the SMs, each split keeping >= 4 tiles
    (a split's first tiles always merge; the threshold skip pays off over longer ranges).
    The interpreter uses 2 when there are 2 tiles, which still exercises the split merge."""
    if interpret or device.type != "cuda":
        return max(1, min(2, bank_tiles))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(bank_tiles // 4, triton.cdiv(2 * sms, max(row_blocks, 1))))


# ----------------------------------------------------------------------------------------------
# Python entry point.
# ----------------------------------------------------------------------------------------------
def _check(queries: torch.Tensor, bank: torch.Tensor, k, bank_bias: Optional[torch.Tensor]):
    if not isinstance(queries, torch.Tensor) or queries.dim() != 2:
        raise ValueError(f"queries must be a (Q, D) tensor, got shape "
                         f"{tuple(getattr(queries, 'shape', ()))}")
    if not isinstance(bank, torch.Tensor) or bank.dim() != 2:
        raise ValueError(f"bank must be a (B, D) tensor, got shape "
                         f"{tuple(getattr(bank, 'shape', ()))}")
    if queries.shape[1] != bank.shape[1]:
        raise ValueError(f"queries (Q, D) and bank (B, D) must share D, got queries "
                         f"{tuple(queries.shape)} and bank {tuple(bank.shape)}")
    if queries.dtype not in _TL_DTYPE_NAME:
        raise ValueError(f"queries dtype must be float32, bfloat16 or float16, got {queries.dtype}")
    if bank.dtype != queries.dtype:
        raise ValueError(f"bank dtype ({bank.dtype}) must match queries dtype ({queries.dtype})")
    if bank.device != queries.device:
        raise ValueError(f"bank device ({bank.device}) must match queries device "
                         f"({queries.device})")
    B = bank.shape[0]
    if B > _MAX_B:
        raise ValueError(f"bank has {B} rows; at most {_MAX_B} are supported (32-bit indices)")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= B:
        raise ValueError(f"k must be an integer with 1 <= k <= B = {B}, got k={k!r}")
    if k > MAX_K:
        raise ValueError(f"k={k} exceeds the in-register top-k cap MAX_K={MAX_K} of the Triton "
                         f"kernel; use a chunked torch path for larger k")
    if bank_bias is not None:
        if not isinstance(bank_bias, torch.Tensor) or tuple(bank_bias.shape) != (B,):
            raise ValueError(f"bank_bias must be a (B,) = ({B},) tensor or None, got shape "
                             f"{tuple(getattr(bank_bias, 'shape', ()))}")
        if not bank_bias.is_floating_point():
            raise ValueError(f"bank_bias must be floating point (float32), got {bank_bias.dtype}")
        if bank_bias.device != bank.device:
            raise ValueError(f"bank_bias device ({bank_bias.device}) must match bank device "
                             f"({bank.device})")


def _decode(keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scores float32, indices int64) of packed keys (the inverse of _pack_keys)."""
    s = (keys >> 32).to(torch.int32)
    bits = s ^ ((s >> 31) & 0x7FFFFFFF)
    return bits.view(torch.float32), _LOW31 - (keys & 0xFFFFFFFF)


@on_tensor_device
def knn_topk(queries: torch.Tensor, bank: torch.Tensor, k: int, *,
             bank_bias: Optional[torch.Tensor] = None,
             splits: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per query the k largest q . bank_b (+ bank_bias_b), sorted descending, ties to the lower
    bank index: (scores (Q, k) float32, indices (Q, k) int64). splits overrides the number of
    bank splits (tests). Raises ValueError on bad input (naming the argument), and for
    k > MAX_K (the caller falls back to a chunked torch path)."""
    _check(queries, bank, k, bank_bias)
    Q, D = queries.shape
    B = bank.shape[0]
    dev = queries.device
    if Q == 0:
        return (torch.empty(0, k, device=dev, dtype=torch.float32),
                torch.empty(0, k, device=dev, dtype=torch.int64))
    queries = queries if queries.stride(-1) == 1 else queries.contiguous()
    bank = bank if bank.stride(-1) == 1 else bank.contiguous()
    bias = None if bank_bias is None else bank_bias.to(torch.float32).contiguous()
    interpret = _interpreting()
    cfg = _config(queries.dtype, Q, B, D, k, interpret)
    k_pad = cfg["K_PAD"]
    block_b = max(cfg["BLOCK_B"], k_pad, 16)
    row_blocks = triton.cdiv(Q, cfg["BLOCK_Q"])
    bank_tiles = triton.cdiv(B, block_b)
    if splits is None:
        splits = _num_splits(dev, row_blocks, bank_tiles, interpret)
    splits = max(1, min(int(splits), bank_tiles, 65535))   # grid axis y: CUDA's limit
    tiles_per_split = triton.cdiv(bank_tiles, splits)
    splits = triton.cdiv(bank_tiles, tiles_per_split)   # drop splits that would own no tile
    part = torch.empty(splits, Q, k_pad, device=dev, dtype=torch.int64)
    _knn_topk_kernel[(row_blocks, splits)](
        queries, bank, bias if bias is not None else part, part, Q, B, D,
        queries.stride(0), bank.stride(0), tiles_per_split,
        HAS_BIAS=bias is not None, BLOCK_Q=cfg["BLOCK_Q"], BLOCK_B=block_b,
        BLOCK_D=cfg["BLOCK_D"], LOG_B=block_b.bit_length() - 1, LOG_K=k_pad.bit_length() - 1,
        # exact float32 distances whatever torch's TF32 setting: a search ranks neighbours, and
        # TF32's 10-bit operands would reorder near-equal ones against faiss and the reference
        DOT_FP32=interpret, DOT_PRECISION="ieee",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if splits == 1:
        keys = part[0, :, :k]
    else:
        # Keys are unique per query (they contain the index), so the order is exact.
        keys = part.permute(1, 0, 2).reshape(Q, splits * k_pad).topk(k, dim=1, sorted=True).values
    scores, indices = _decode(keys)
    return scores.contiguous(), indices.contiguous()


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile cases (tests/test_triton_compile.py compiles each for sm_90 without a
# GPU): (kernel, signature, constexprs, options, aligned) with the block sizes the GPU path
# launches at D = 768. aligned names the arguments a real launch specialises as multiples of 16
# (torch allocations are 16-byte aligned; row strides and D usually are multiples of 16).
# ----------------------------------------------------------------------------------------------
def _aligned(signature: dict) -> List[str]:
    return [k for k, v in signature.items()
            if v.startswith("*") or k.startswith("stride_") or k == "D"]


def _compile_case(dtype: torch.dtype, k: int, has_bias: bool, D: int = 768,
                  Q: int = 1 << 16) -> tuple:
    t = "*" + _TL_DTYPE_NAME[dtype]
    cfg = _config(dtype, Q, 1 << 20, D, k, interpret=False)
    k_pad = cfg["K_PAD"]
    block_b = max(cfg["BLOCK_B"], k_pad, 16)
    sig = dict(Qp=t, Bp=t, BIAS="*fp32", OUT="*i64", Q="i32", B="i32", D="i32",
               stride_q="i32", stride_b="i32", tiles_per_split="i32",
               HAS_BIAS="constexpr", BLOCK_Q="constexpr", BLOCK_B="constexpr",
               BLOCK_D="constexpr", LOG_B="constexpr", LOG_K="constexpr",
               DOT_FP32="constexpr", DOT_PRECISION="constexpr")
    const = dict(HAS_BIAS=has_bias, BLOCK_Q=cfg["BLOCK_Q"], BLOCK_B=block_b,
                 BLOCK_D=cfg["BLOCK_D"], LOG_B=block_b.bit_length() - 1,
                 LOG_K=k_pad.bit_length() - 1, DOT_FP32=False, DOT_PRECISION="ieee")
    opts = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return (_knn_topk_kernel, sig, const, opts, _aligned(sig))


COMPILE_CASES = [
    _compile_case(torch.bfloat16, 50, True),    # KNNScorer's default (its bank bias always on)
    _compile_case(torch.bfloat16, 256, True),   # knn_gpu: k = 1000 as partitions of 256, with bias
    _compile_case(torch.float16, 128, False),
    _compile_case(torch.bfloat16, 10, True, Q=48),   # few queries: BLOCK_Q = 64
    _compile_case(torch.float32, 50, True),
    _compile_case(torch.float32, 256, False),
    _compile_case(torch.float32, 8, False),     # topk_assign: float32 unit rows, l = 8
    _compile_case(torch.float32, 1, True),      # kmeans' nearest centroid (L2 bias when not spherical)
]

__all__ = ["knn_topk", "MAX_K", "COMPILE_CASES"]
