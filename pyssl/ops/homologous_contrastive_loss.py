"""Homologous contrastive loss of the Mixed Autoencoder.

    homologous_contrastive_loss(z, groups, *, temperature=0.2, reduction="mean", backend="auto")

z (B, L, E), groups (B, L) integer. Within each sample, over the tokens with group id >= 0 (the
others take no part at all), s_ij = cos(z_i, z_j)/temperature, P(i) = the other tokens of i's
group, A(i) = all other tokens:
    ℓ_i = −(1/|P(i)|) Σ_{p∈P(i)} [ s_ip − log Σ_{a∈A(i)} exp(s_ia) ]
"mean" averages over the tokens with a non-empty P(i), "sum" sums them, "none" returns (B, L)
with 0 for the other tokens.

Backends:
  triton kernels/homologous_contrastive_loss.py: FlashAttention-style, any L: a program takes a
         block of one sample's rows and walks its columns in tiles, online masked LSE and group
         sums; the backward recomputes each tile, forms (G + Gᵀ)/τ from the per-token statistics
         of the columns (s is symmetric: no atomics) and accumulates it times Ẑ.
  cpu    C++/OpenMP (csrc/homologous_contrastive_loss_cpu.cpp): threads take row tiles of the
         samples (~2^20 scores, 64 to 256 rows: a whole sample at ViT lengths), a
         register-blocked GEMM of the tile's normalized tokens against the sample's (built once
         and shared for a multi-tile sample), fused row log-sum-exp and group sums; the backward
         recomputes the tile, forms its rows of (G + Gᵀ) from every column's saved statistics
         and multiplies them by Ẑ. Never a B·L·L or L·L tensor: a thread holds one tile.
  torch  samples in chunks (R·L·L scores per chunk, R·L² ≤ 2^24; one sample's query rows in
         chunks of 2^24/L when L² is larger), forward and backward by autograd through the
         chunk's ops, recomputed in the backward.
The op returns per-token losses; the reduction runs on those (B, L) values here.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

from pyssl import _checks, _dispatch
from pyssl.reference import NORM_EPS

_REDUCTIONS = ("none", "mean", "sum")
CHUNK_ELEMS = 1 << 24


def _check(fn, z, groups, temperature, reduction):
    _checks.tensor(fn, "z", z)
    if z.dim() != 3:
        raise ValueError(f"{fn}: z must be (B, L, E), got shape {tuple(z.shape)}")
    if z.numel() == 0:
        raise ValueError(f"{fn}: z is empty (shape {tuple(z.shape)})")
    if z.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise ValueError(f"{fn}: z must be float32, float64, bfloat16 or float16, got {z.dtype}")
    _checks.integer_tensor(fn, "groups", _checks.tensor(fn, "groups", groups))
    if groups.shape != z.shape[:2]:
        raise ValueError(f"{fn}: groups must have shape (B, L) = {tuple(z.shape[:2])}, got {tuple(groups.shape)}")
    if groups.device != z.device:
        raise ValueError(f"{fn}: groups must be on z's device ({z.device}), got {groups.device}")
    _checks.real(fn, "temperature", temperature, positive=True)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _rows(z: Tensor, groups: Tensor, temperature: float, q0: int = 0, q1: Optional[int] = None):
    """Per-token losses (R, Q) float32/float64 and the has-positive mask of the query rows
    [q0, q1) of a chunk of samples (all L tokens are keys): R·Q·L scores at a time."""
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    l = z.shape[1]
    q1 = l if q1 is None else q1
    zn = F.normalize(z.to(acc), dim=-1, eps=NORM_EPS)
    s = (zn[:, q0:q1] @ zn.transpose(1, 2)) * (1.0 / temperature)
    valid = groups >= 0
    eye = (torch.arange(q0, q1, device=z.device)[:, None] == torch.arange(l, device=z.device)[None, :])[None]
    other = valid[:, q0:q1, None] & valid[:, None, :] & ~eye
    pos = other & (groups[:, q0:q1, None] == groups[:, None, :])
    lse = torch.logsumexp(s.masked_fill(~other, float("-inf")), dim=-1)
    lse = torch.where(other.any(-1), lse, torch.zeros_like(lse))
    npos = pos.sum(-1)
    has = npos > 0
    mean_pos = s.masked_fill(~pos, 0.0).sum(-1) / npos.clamp_min(1)
    return torch.where(has, lse - mean_pos, torch.zeros_like(lse)), has


def _torch_rows(z: Tensor, groups: Tensor, temperature: float):
    """The torch backend: chunks of samples, and of query rows when one sample's L×L scores
    exceed CHUNK_ELEMS, each chunk's scores recomputed in the backward (checkpointing) rather
    than kept; (B, L) losses and has-positive mask."""
    b, l, _ = z.shape
    per = max(1, CHUNK_ELEMS // max(1, l * l))
    q = l if per > 1 or l * l <= CHUNK_ELEMS else max(1, CHUNK_ELEMS // l)
    rows_of = _rows
    if torch.is_grad_enabled() and z.requires_grad:
        def rows_of(zc, gc, t, q0, q1):
            return torch.utils.checkpoint.checkpoint(_rows, zc, gc, t, q0, q1, use_reentrant=False)
    rows, has = [], []
    for i0 in range(0, b, per):
        zc, gc = z[i0:i0 + per], groups[i0:i0 + per]
        parts = [rows_of(zc, gc, temperature, q0, min(l, q0 + q)) for q0 in range(0, l, q)]
        rows.append(torch.cat([p[0] for p in parts], 1) if len(parts) > 1 else parts[0][0])
        has.append(torch.cat([p[1] for p in parts], 1) if len(parts) > 1 else parts[0][1])
    return (torch.cat(rows) if len(rows) > 1 else rows[0]), (torch.cat(has) if len(has) > 1 else has[0])


def _backend_checks(z: Tensor):
    def triton():
        r = []
        if z.dtype == torch.float64:
            r.append("the Triton kernels take float32/bfloat16/float16, not float64")
        return r

    return {"triton": triton, "cpu": lambda: [], "torch": lambda: []}


def not_supported_reasons(z: Tensor) -> dict:
    """Why each backend cannot serve this input (empty list: it can)."""
    return _dispatch.not_supported_reasons(_backend_checks(z), z.device)


@torch.library.custom_op("pyssl::homologous_contrastive_rows", mutates_args=())
@_dispatch.autocast_off
def _rows_op(z: Tensor, groups: Tensor, temperature: float, backend: str) -> Tuple[Tensor, Tensor]:
    """(per-token losses, row log-sum-exp), both (B, L) float32 (float64 for float64 z)."""
    if backend == "triton":
        from pyssl.kernels import homologous_contrastive_loss as K
        rows, lse, _ = K.forward(z.contiguous(), groups.contiguous(), temperature, NORM_EPS)
        return rows, lse
    return tuple(_dispatch.extension().homologous_contrastive_fwd_cpu(z.contiguous(), groups.contiguous(),
                                                                      temperature, NORM_EPS))


@_rows_op.register_fake
def _(z, groups, temperature, backend):
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    return z.new_empty(z.shape[:2], dtype=acc), z.new_empty(z.shape[:2], dtype=acc)


@torch.library.custom_op("pyssl::homologous_contrastive_rows_backward", mutates_args=())
@_dispatch.autocast_off
def _rows_bwd_op(z: Tensor, groups: Tensor, lse: Tensor, grad_rows: Tensor, temperature: float,
                 backend: str) -> Tensor:
    if backend == "triton":
        from pyssl.kernels import homologous_contrastive_loss as K
        zc = z.contiguous()
        npos = _positives(groups).to(torch.float32).contiguous()
        u = torch.where(npos > 0, grad_rows.float(), torch.zeros_like(grad_rows, dtype=torch.float32))
        return K.backward(zc, groups.contiguous(), temperature, lse, K.inv_norms(zc, NORM_EPS), u, npos)
    return _dispatch.extension().homologous_contrastive_bwd_cpu(z.contiguous(), groups.contiguous(), lse,
                                                                grad_rows.contiguous(), temperature, NORM_EPS)


@_rows_bwd_op.register_fake
def _(z, groups, lse, grad_rows, temperature, backend):
    # contiguous, as both kernels return it (empty_like kept a permuted z's strides: compiled
    # code then read the gradient with the wrong strides)
    return z.new_empty(z.shape)


def _setup(ctx, inputs, output):
    z, groups, temperature, backend = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(z, groups, output[1])
    ctx.temperature, ctx.backend = temperature, backend


def _backward(ctx, grad_rows, _unused):
    if grad_rows is None:
        return None, None, None, None
    z, groups, lse = ctx.saved_tensors
    return _rows_bwd_op(z, groups, lse, grad_rows.to(lse.dtype), ctx.temperature, ctx.backend), None, None, None


_rows_op.register_autograd(_backward, setup_context=_setup)
_dispatch.no_second_order(_rows_bwd_op, "pyssl.homologous_contrastive_loss (cpu and triton backends)",
                          "z")


def _positives(groups: Tensor) -> Tensor:
    """(B, L) int64 |P(i)|: the other tokens of i's group (0 for ignored tokens); O(B·L)."""
    b, l = groups.shape
    valid = groups >= 0
    # ids need not be small: rank them per sample first (a sort of (B, L), no L×L mask)
    ids = torch.where(valid, groups, torch.full_like(groups, -1))
    srt, order = torch.sort(ids, dim=1)
    new = torch.ones_like(srt, dtype=torch.bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    rank_sorted = torch.cumsum(new.to(torch.int64), 1) - 1
    rank = torch.empty_like(rank_sorted).scatter_(1, order, rank_sorted)
    counts = torch.zeros(b, l, dtype=torch.int64, device=groups.device)
    counts.scatter_add_(1, rank, torch.ones_like(rank))
    return torch.where(valid, counts.gather(1, rank) - 1, torch.zeros_like(rank))


def _has_positive(groups: Tensor) -> Tensor:
    """(B, L) bool: the token has another token of its group."""
    return _positives(groups) > 0


def homologous_contrastive_loss(z: Tensor, groups: Tensor, *, temperature: float = 0.2,
                                reduction: str = "mean", backend: str = "auto") -> Tensor:
    """Homologous contrastive loss of token embeddings z (B, L, E) by group ids (B, L): within
    each sample, with s_ij = cos(z_i, z_j)/temperature over the tokens of id >= 0, P(i) the
    other tokens of i's group and A(i) all other tokens,
        ℓ_i = −(1/|P(i)|) Σ_{p ∈ P(i)} [ s_ip − log Σ_{a ∈ A(i)} exp(s_ia) ];
    tokens with a negative id, or alone in their group, contribute 0. reduction "mean" averages over the tokens that have a positive
    (0, not NaN, when none has: a batch without pairs adds nothing to a training loss).
    The loss is float32 for 16-bit z (float64 for float64), its gradient in z's dtype.
    No backend keeps a B·L·L float tensor for the backward: the Triton and C++ kernels recompute
    scores from z; the torch backend recomputes its row chunks (activation checkpointing)."""
    fn = "homologous_contrastive_loss"
    _check(fn, z, groups, temperature, reduction)
    chosen = _dispatch.choose(fn, backend, z.device, {"cpu": ("cpu", "torch"), "cuda": ("triton", "torch")},
                              _backend_checks(z))
    groups = groups.to(torch.int64)
    if chosen in ("cpu", "triton"):
        rows, _ = _rows_op(z, groups, float(temperature), chosen)
        has = _has_positive(groups)
    else:
        rows, has = _torch_rows(z, groups, float(temperature))
    # the loss stays in the accumulation dtype (float32 for 16-bit z), as the margin losses'
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / has.sum().clamp_min(1)
