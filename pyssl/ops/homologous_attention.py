"""Homologous-patch attention (Mixed Autoencoder): each token attends only to tokens of its own
source image (group mode), optionally only to its top-k scoring keys among those (top-k mode).

    homologous_attention(q, k, v, groups=None, *, topk=None, scale=None, backend="auto")
        q, k, v (B, H, L, d); groups (B, L) integer or None -> (B, H, L, d)

    S_ij = scale·q_i·k_j;  allowed(i, j) = g_i == g_j or g_i < 0 or g_j < 0 (negative = global)
    topk=K: of the allowed keys query i keeps its K highest S_ij (per head; ties to the lower key
    index; all of them when fewer than K are allowed). O_i = softmax over kept j of S_ij · v_j.
    The kept set is constant under differentiation. A query with no kept key outputs zeros.

The op saves, per query row, the log-sum-exp of its kept scores (float32; float64 for float64
inputs) and, in top-k mode, the kept set as a bitmask: (B, H, L, ceil(L/8)) uint8, bit j % 8 of
byte j // 8 is key j (L²/8 bytes per head). The backward recomputes the scores and takes the
kept set from the bitmask, never from a re-ranking (re-deriving a threshold is only safe when
the arithmetic is bit-identical).

Backends:
  triton FlashAttention-style kernels (kernels/homologous_attention.py): group mode sorts tokens
         by group once per call (the permutation is saved for the backward) and skips the tiles
         outside the block diagonal; top-k mode finds each row's kept set in-kernel and saves it
         as the bitmask: from whole score rows held on chip where they fit (L up to 512 for 16-bit
         inputs at d ≤ 64, less for wider heads and float32, and within the GPU's shared memory:
         kernels/homologous_attention.py max_topk_l), else by a radix search over streamed key
         tiles (any L; up to 17 passes over k). Head dimensions up to 256.
  cpu    C++/OpenMP (csrc/homologous_attention_cpu.cpp): per (batch, head), tokens are
         gathered by group into dense blocks (each group's queries against its keys and the
         global keys; global queries against every key), so masked-out pairs cost nothing; no
         B·H·L·L tensor exists (an n_q×n_k float block per thread, 2^16 scores or 64 query rows:
         larger sets are cut into query chunks). Each thread takes one contiguous range of the
         (batch·head, set) pairs of equal work, so one long image is shared out too.
  torch  PyTorch only. Group mode: the same dense blocks as the C++ kernel, bucketed by shape
         and batched (gathered rows, unmasked attention, scattered back); without groups or top-k,
         one unmasked attention. On the CPU an unmasked block is attended by the flash-attention
         kernel F.scaled_dot_product_attention dispatches to there
         (aten._scaled_dot_product_flash_attention_for_cpu and its backward: these return the
         log-sum-exp the op saves, which the public function does not); elsewhere, or where torch
         lacks that kernel, by matmul + log-sum-exp. Top-k mode: query chunks × all keys
         (B·H·R·L scores per chunk).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from pyssl import _checks, _dispatch

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_PREFERENCE = {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")}
# torch backend, group mode: a bucket's sets sliced so that their score blocks stay near this size
CHUNK_ELEMS = 1 << 24
# the torch backend's row chunks of top-k and ungrouped rows: (B, H, r, L) scores of ~2^22
# elements (4 of its temporaries at once): at homattn_topk_cpu, 95.7 MB peak against 177.8 MB
# for 2^24 (one chunk of whole rows), the same time
ROW_CHUNK_ELEMS = 1 << 22


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------

def _check_inputs(fn, q, k, v, groups, topk, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.tensor(fn, name, t)
        if t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be (B, H, L, d), got shape {tuple(t.shape)}")
        if t.dtype not in _FLOATS:
            raise ValueError(f"{fn}: {name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"{fn}: q, k and v must have the same shape (B, H, L, d), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{fn}: q, k and v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{fn}: q, k and v must be on the same device, got {q.device}, {k.device}, {v.device}")
    if q.numel() == 0:
        raise ValueError(f"{fn}: q is empty (shape {tuple(q.shape)})")
    b, _, l, d = q.shape
    if _checks.tensor(fn, "groups", groups, optional=True) is not None:
        _checks.integer_tensor(fn, "groups", groups)
        if groups.shape != (b, l):
            raise ValueError(f"{fn}: groups must have shape (B, L) = ({b}, {l}), got {tuple(groups.shape)}")
        if groups.device != q.device:
            raise ValueError(f"{fn}: groups must be on q's device ({q.device}), got {groups.device}")
    _checks.integer(fn, "topk", topk, lo=1, optional=True)
    scale = _checks.real(fn, "scale", scale, optional=True)
    return 1.0 / math.sqrt(d) if scale is None else scale


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _backend_checks(q: Tensor):
    def triton():
        r = []
        if q.dtype == torch.float64:
            r.append("the Triton kernels take float32/bfloat16/float16, not float64")
        from pyssl.kernels.homologous_attention import MAX_HEAD_DIM
        d = q.shape[3]
        if d > MAX_HEAD_DIM:
            r.append(f"the Triton kernels take head dimensions d <= {MAX_HEAD_DIM}, got d={d}")
        return r

    return {"triton": triton, "cpu": lambda: [], "torch": lambda: []}


def not_supported_reasons(q: Tensor, topk: Optional[int] = None) -> dict:
    """Why each backend cannot serve this input (empty list: it can). topk is accepted for
    callers that pass it; every backend serves top-k rows of any length."""
    return _dispatch.not_supported_reasons(_backend_checks(q), q.device)


# --------------------------------------------------------------------------------------------
# the kept-set bitmask (shared format of every backend)
# --------------------------------------------------------------------------------------------

def pack_bits(kept: Tensor) -> Tensor:
    """bool (..., L) -> uint8 (..., ceil(L/8)), bit j % 8 of byte j // 8 = key j."""
    l = kept.shape[-1]
    nb = (l + 7) // 8
    pad = nb * 8 - l
    if pad:
        kept = torch.nn.functional.pad(kept, (0, pad))
    w = (1 << torch.arange(8, device=kept.device, dtype=torch.int32))
    return (kept.reshape(kept.shape[:-1] + (nb, 8)).to(torch.int32) * w).sum(-1).to(torch.uint8)


def unpack_bits(bits: Tensor, l: int) -> Tensor:
    """uint8 (..., ceil(L/8)) -> bool (..., L)."""
    sh = torch.arange(8, device=bits.device, dtype=torch.int32)
    b = (bits.to(torch.int32)[..., None] >> sh) & 1
    return b.reshape(bits.shape[:-1] + (bits.shape[-1] * 8,))[..., :l].bool()


# --------------------------------------------------------------------------------------------
# torch backend: query chunks against all keys
# --------------------------------------------------------------------------------------------

def _allowed_rows(groups: Optional[Tensor], i0: int, r: int, l: int, device) -> Optional[Tensor]:
    """(B, 1, r, L) bool allowed mask of query rows [i0, i0 + r), None when everything is."""
    if groups is None:
        return None
    gq = groups[:, i0:i0 + r]
    a = (gq[:, :, None] == groups[:, None, :]) | (gq[:, :, None] < 0) | (groups[:, None, :] < 0)
    return a[:, None]


def _topk_mask(s: Tensor, allowed: Optional[Tensor], topk: int) -> Tensor:
    """Kept keys: rank by (score desc, index asc) among allowed keys, rank < topk. From the K-th
    largest score (torch.topk, not a sort of the row): the scores above it, and the first
    K − (count above) equal to it in key order. NaN ranks as +inf (torch.sort ranks it above
    +inf: the same outputs, NaN either way, where a row holds both)."""
    sm = s.nan_to_num(nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))
    if allowed is not None:
        sm.masked_fill_(~allowed, float("-inf"))
    kk = min(topk, s.shape[-1])
    kth = sm.topk(kk, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    above = sm > kth
    # only allowed keys tie: a disallowed key (masked to -inf) is no candidate for the place of
    # an allowed key scoring -inf
    tie = sm == kth if allowed is None else (sm == kth) & allowed
    kept = above | (tie & (tie.cumsum(-1, dtype=torch.int32) <= kk - above.sum(-1, keepdim=True, dtype=torch.int32)))
    return kept if allowed is None else kept & allowed


def _chunk_rows(q: Tensor) -> int:
    b, h, l, _ = q.shape
    return max(1, min(l, ROW_CHUNK_ELEMS // max(1, b * h * l)))


def _torch_forward(q, k, v, groups, topk, scale):
    b, h, l, d = q.shape
    acc = _acc_dtype(q.dtype)
    kf, vf = k.to(acc), v.to(acc)
    out = torch.empty_like(q)
    lse = torch.empty((b, h, l), dtype=acc, device=q.device)
    keep = (torch.empty((b, h, l, (l + 7) // 8), dtype=torch.uint8, device=q.device) if topk
            else torch.empty(0, dtype=torch.uint8, device=q.device))
    rows = _chunk_rows(q)
    for i0 in range(0, l, rows):
        r = min(rows, l - i0)
        # the chunk's scores are a fresh tensor: masked, shifted and exponentiated in place (each
        # (B, H, r, L) temporary less is a chunk of peak memory less)
        s = (q[:, :, i0:i0 + r].to(acc) @ kf.transpose(-1, -2)).mul_(scale)
        kept = _allowed_rows(groups, i0, r, l, q.device)
        if topk:
            kept = _topk_mask(s, kept, topk)
            keep[:, :, i0:i0 + r] = pack_bits(kept)
        if kept is not None:
            s.masked_fill_(~kept, float("-inf"))
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = s.sub_(m).exp_()
        den = p.sum(-1, keepdim=True)
        lse[:, :, i0:i0 + r] = (m + torch.log(den)).squeeze(-1)
        o = (p @ vf) / torch.where(den > 0, den, torch.ones_like(den))
        out[:, :, i0:i0 + r] = o.to(q.dtype)
    return out, lse, keep


def _torch_backward(q, k, v, out, dout, lse, groups, keep, topk, scale):
    b, h, l, d = q.shape
    acc = lse.dtype
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    do = dout.to(acc)
    delta = (do * out.to(acc)).sum(-1)                     # rowsum(dO ∘ O), (B, H, L)
    dq = torch.empty((b, h, l, d), dtype=acc, device=q.device)
    dk = torch.zeros_like(dq)
    dv = torch.zeros_like(dq)
    rows = _chunk_rows(q)
    for i0 in range(0, l, rows):
        r = min(rows, l - i0)
        qc = qf[:, :, i0:i0 + r]
        kept = unpack_bits(keep[:, :, i0:i0 + r], l) if topk else _allowed_rows(groups, i0, r, l, q.device)
        lc = lse[:, :, i0:i0 + r, None]
        live = lc != float("-inf")                         # a NaN lse (NaN scores) stays live: NaN gradients
        # P and dS formed in place in the chunk's fresh score and dP tensors
        p = (qc @ kf.transpose(-1, -2)).mul_(scale).sub_(torch.where(live, lc, torch.zeros_like(lc))).exp_()
        p.masked_fill_(~(live if kept is None else (kept & live)), 0.0)
        doc = do[:, :, i0:i0 + r]
        dv += p.transpose(-1, -2) @ doc
        ds = (doc @ vf.transpose(-1, -2)).sub_(delta[:, :, i0:i0 + r, None]).mul_(p)
        dq[:, :, i0:i0 + r] = scale * (ds @ kf)
        dk += scale * (ds.transpose(-1, -2) @ qc)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _flash_cpu(device: torch.device):
    """The CPU flash-attention kernels behind F.scaled_dot_product_attention, (forward, backward),
    or None off the CPU or where this torch lacks them (private ops: looked up, not assumed)."""
    if device.type != "cpu":
        return None
    fwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    return None if fwd is None or bwd is None else (fwd, bwd)


def _unit_stride(t: Tensor) -> Tensor:
    """The flash kernels read rows as contiguous vectors: a view whose last dimension is strided
    (a transpose, an expand, a step slice) would be read wrongly, so it is copied."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _attend(qs: Tensor, ks: Tensor, vs: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """Unmasked attention of (n, H, m, d) blocks in the accumulation dtype -> (out, lse (n, H, m))."""
    flash = _flash_cpu(qs.device)
    if flash is not None:
        o, lse = flash[0](_unit_stride(qs), _unit_stride(ks), _unit_stride(vs), 0.0, False, scale=scale)
        # its max skips NaN scores, and a row of them comes out as zeros with lse 0: a NaN in a
        # query or in any key of the block poisons the row, as in the reference (sync-free)
        nan = qs.isnan().any(-1) | ks.isnan().any(-1).any(-1, keepdim=True)
        return o.masked_fill(nan[..., None], float("nan")), lse.masked_fill(nan, float("nan"))
    s = scale * (qs @ ks.transpose(-1, -2))
    lse = torch.logsumexp(s, dim=-1)
    return torch.exp(s - lse[..., None]) @ vs, lse


def _attend_backward(dos, qs, ks, vs, os, lse, scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of _attend's blocks from the saved out and lse (scores recomputed)."""
    flash = _flash_cpu(qs.device)
    if flash is not None:
        return tuple(flash[1](*(_unit_stride(t) for t in (dos, qs, ks, vs, os)), lse, 0.0, False, scale=scale))
    p = torch.exp(scale * (qs @ ks.transpose(-1, -2)) - lse[..., None])
    ds = p * (dos @ vs.transpose(-1, -2) - (dos * os).sum(-1, keepdim=True))
    return scale * (ds @ ks), scale * (ds.transpose(-1, -2) @ qs), p.transpose(-1, -2) @ dos


def _group_buckets(groups: Tensor, b: int, l: int):
    """The dense blocks of group mode, bucketed by shape: {(n_q, n_k): (batch ids, query ids,
    key ids)} with query ids (n, n_q) and key ids (n, n_k) — each group's tokens against
    themselves and the global tokens, and the global tokens against all L tokens."""
    g = groups.detach().cpu()
    found = {}
    everything = torch.arange(l)
    for bi in range(b):
        row = g[bi]
        glob = (row < 0).nonzero().flatten()
        srt, order = torch.sort(row, stable=True)
        own = order[srt >= 0]
        ids = srt[srt >= 0]
        if ids.numel():
            bounds = torch.cat([torch.tensor([0]), (ids[1:] != ids[:-1]).nonzero().flatten() + 1,
                                torch.tensor([ids.numel()])]).tolist()
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                qi = own[lo:hi].sort().values
                ki = torch.cat([qi, glob]).sort().values
                found.setdefault((qi.numel(), ki.numel()), []).append((bi, qi, ki))
        if glob.numel():
            found.setdefault((glob.numel(), l), []).append((bi, glob, everything))
    dev = groups.device
    return {shape: (torch.tensor([e[0] for e in sets], device=dev),
                    torch.stack([e[1] for e in sets]).to(dev), torch.stack([e[2] for e in sets]).to(dev))
            for shape, sets in found.items()}


def _bucket_chunks(bucket, h: int):
    """Slices of a bucket's sets whose score blocks stay near CHUNK_ELEMS elements."""
    bidx, qidx, kidx = bucket
    per = max(1, CHUNK_ELEMS // max(1, h * qidx.shape[1] * kidx.shape[1]))
    for i0 in range(0, bidx.shape[0], per):
        yield bidx[i0:i0 + per], qidx[i0:i0 + per], kidx[i0:i0 + per]


def _rows_of(t: Tensor, bidx: Tensor, idx: Tensor) -> Tensor:
    """t (B, H, L, d) rows idx (n, m) of batches bidx (n,) -> (n, H, m, d)."""
    return t.transpose(1, 2)[bidx[:, None], idx].transpose(1, 2)


def _torch_grouped_forward(q, k, v, groups, scale):
    """Group mode by dense blocks: gather each group's tokens (and the global ones), attend
    without a mask, scatter back. Work Σ n_q·n_k instead of L²."""
    b, h, l, d = q.shape
    acc = _acc_dtype(q.dtype)
    out_t = torch.empty((b, l, h, d), dtype=q.dtype, device=q.device)     # (B, L, H, d) for scatter
    lse_t = torch.empty((b, l, h), dtype=acc, device=q.device)
    for bucket in _group_buckets(groups, b, l).values():
        for bidx, qidx, kidx in _bucket_chunks(bucket, h):
            o, lse = _attend(_rows_of(q, bidx, qidx).to(acc), _rows_of(k, bidx, kidx).to(acc),
                             _rows_of(v, bidx, kidx).to(acc), scale)
            out_t[bidx[:, None], qidx] = o.transpose(1, 2).to(q.dtype)
            lse_t[bidx[:, None], qidx] = lse.transpose(1, 2)
    return out_t.transpose(1, 2).contiguous(), lse_t.transpose(1, 2).contiguous()


def _torch_grouped_backward(q, k, v, out, dout, lse, groups, scale):
    b, h, l, d = q.shape
    acc = lse.dtype
    dq_t = torch.empty((b, l, h, d), dtype=acc, device=q.device)
    dk_t = torch.zeros((b, l, h, d), dtype=acc, device=q.device)
    dv_t = torch.zeros((b, l, h, d), dtype=acc, device=q.device)
    dk_f, dv_f = dk_t.view(b * l, h, d), dv_t.view(b * l, h, d)
    for bucket in _group_buckets(groups, b, l).values():
        for bidx, qidx, kidx in _bucket_chunks(bucket, h):
            dq, dk, dv = _attend_backward(
                _rows_of(dout, bidx, qidx).to(acc), _rows_of(q, bidx, qidx).to(acc),
                _rows_of(k, bidx, kidx).to(acc), _rows_of(v, bidx, kidx).to(acc),
                _rows_of(out, bidx, qidx).to(acc),
                lse.transpose(1, 2)[bidx[:, None], qidx].transpose(1, 2), scale)
            dq_t[bidx[:, None], qidx] = dq.transpose(1, 2)
            # dK, dV rows of a key get contributions from several sets: index_add_ over (B·L)
            # rows (an accumulating index_put_ runs serially on the CPU)
            rows = (bidx[:, None] * l + kidx).reshape(-1)
            dk_f.index_add_(0, rows, dk.transpose(1, 2).reshape(-1, h, d))
            dv_f.index_add_(0, rows, dv.transpose(1, 2).reshape(-1, h, d))
    return (dq_t.transpose(1, 2).to(q.dtype), dk_t.transpose(1, 2).to(k.dtype), dv_t.transpose(1, 2).to(v.dtype))


# --------------------------------------------------------------------------------------------
# custom ops
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("pyssl::homologous_attention", mutates_args=())
@_dispatch.autocast_off
def _attn_op(q: Tensor, k: Tensor, v: Tensor, groups: Optional[Tensor], topk: int, scale: float,
             backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, lse, keep bitmask, perm): perm is the Triton group-mode sort (empty elsewhere)."""
    no_perm = torch.empty(0, dtype=torch.int64, device=q.device)
    g = groups.contiguous() if groups is not None else None
    if backend == "cpu":
        out, lse, keep = _dispatch.extension().homologous_attention_fwd_cpu(
            q.contiguous(), k.contiguous(), v.contiguous(), g, topk, scale)
        return out, lse, keep, no_perm
    if backend == "triton":
        from pyssl.kernels import homologous_attention as K
        return K.forward(q, k, v, g, topk, scale)   # strided q, k, v read in place
    if groups is not None and not topk:
        out, lse = _torch_grouped_forward(q, k, v, groups, scale)
        return out.contiguous(), lse, torch.empty(0, dtype=torch.uint8, device=q.device), no_perm
    if not topk and _flash_cpu(q.device) is not None:
        acc = _acc_dtype(q.dtype)
        out, lse = _attend(q.to(acc), k.to(acc), v.to(acc), scale)
        return out.to(q.dtype).contiguous(), lse.contiguous(), torch.empty(0, dtype=torch.uint8, device=q.device), no_perm
    out, lse, keep = _torch_forward(q, k, v, groups, topk, scale)
    return out.contiguous(), lse, keep, no_perm


@_attn_op.register_fake
def _(q, k, v, groups, topk, scale, backend):
    b, h, l, d = q.shape
    keep = q.new_empty((b, h, l, (l + 7) // 8), dtype=torch.uint8) if topk else q.new_empty(0, dtype=torch.uint8)
    if backend == "triton" and not topk:
        perm = q.new_empty((b, l), dtype=torch.int64)
    else:
        perm = q.new_empty(0, dtype=torch.int64)
    # outputs are contiguous whatever the strides of q, k, v
    return q.new_empty(q.shape), q.new_empty((b, h, l), dtype=_acc_dtype(q.dtype)), keep, perm


@torch.library.custom_op("pyssl::homologous_attention_backward", mutates_args=())
@_dispatch.autocast_off
def _attn_bwd_op(q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor,
                 groups: Optional[Tensor], keep: Tensor, perm: Tensor, topk: int, scale: float,
                 backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    g = groups.contiguous() if groups is not None else None
    if backend == "cpu":
        return tuple(_dispatch.extension().homologous_attention_bwd_cpu(
            q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(), dout.contiguous(),
            lse.contiguous(), g, keep.contiguous(), topk, scale))
    if backend == "triton":
        from pyssl.kernels import homologous_attention as K
        return tuple(K.backward(q, k, v, out.contiguous(),
                                dout.contiguous(), lse.contiguous(), g, keep.contiguous(), perm, topk, scale))
    if groups is not None and not topk:
        grads = _torch_grouped_backward(q, k, v, out, dout, lse, groups, scale)
    elif not topk and _flash_cpu(q.device) is not None:
        acc = lse.dtype
        grads = _attend_backward(dout.to(acc), q.to(acc), k.to(acc), v.to(acc), out.to(acc), lse, scale)
        grads = tuple(t.to(q.dtype) for t in grads)
    else:
        grads = _torch_backward(q, k, v, out, dout, lse, groups, keep, topk, scale)
    return tuple(t.contiguous() for t in grads)


@_attn_bwd_op.register_fake
def _(q, k, v, out, dout, lse, groups, keep, perm, topk, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    q, k, v, groups, topk, scale, backend = inputs
    out, lse, keep, perm = output
    ctx.mark_non_differentiable(lse, keep, perm)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, out, lse, groups, keep, perm)
    ctx.topk, ctx.scale, ctx.backend = topk, scale, backend


def _backward(ctx, dout, *unused):
    if dout is None:   # only the statistics reached the backward
        return (None,) * 7
    q, k, v, out, lse, groups, keep, perm = ctx.saved_tensors
    dq, dk, dv = _attn_bwd_op(q, k, v, out, dout.contiguous(), lse, groups, keep, perm, ctx.topk, ctx.scale,
                              ctx.backend)
    return dq, dk, dv, None, None, None, None


_attn_op.register_autograd(_backward, setup_context=_setup)
# as FlashAttention's and FlexAttention's: the backward is a fused kernel without a formula of its own
_dispatch.no_second_order(_attn_bwd_op, "pyssl.homologous_attention", "q, k and v")


def homologous_attention(q: Tensor, k: Tensor, v: Tensor, groups: Optional[Tensor] = None, *,
                         topk: Optional[int] = None, scale: Optional[float] = None,
                         backend: str = "auto") -> Tensor:
    """Attention restricted to each token's own source image (Mixed Autoencoder).

        S_ij = scale · q_i·k_j                  (scale defaults to 1/sqrt(d))
        allowed(i, j) = groups[i] == groups[j] or groups[i] < 0 or groups[j] < 0
        topk=K: of the allowed keys, query i keeps its K highest S_ij (per head; ties to the
                lower key index; all of them where fewer than K are allowed)
        O_i = Σ_j softmax over the kept j of S_ij · v_j     (a query with no kept key: 0)

    q, k, v (B, H, L, d) of one float dtype (views with a unit last stride are read in place);
    under autocast they are first cast to its dtype, as F.scaled_dot_product_attention's are
    (a q/k norm leaves q and k float32 beside a 16-bit v). groups (B, L) integer or None (one
    group). Negative ids are global tokens (a CLS token): they attend to all and are attended by
    all. The kept set gets no gradient. More in the module docstring (backends, kernels)."""
    return attention_with_stats(q, k, v, groups, topk=topk, scale=scale, backend=backend)[0]


def _autocast_inputs(*ts):
    """The tensors as autocast gives them to F.scaled_dot_product_attention where autocast is on
    for their device: float32/16-bit ones cast to its dtype (float64 and non-tensors as they are)."""
    t0 = next((t for t in ts if isinstance(t, Tensor)), None)
    if t0 is None or not torch.is_autocast_enabled(t0.device.type):
        return ts
    dt = torch.get_autocast_dtype(t0.device.type)
    return tuple(t.to(dt) if isinstance(t, Tensor) and t.dtype in (torch.float32, torch.float16, torch.bfloat16)
                 else t for t in ts)


def attention_with_stats(q, k, v, groups=None, *, topk=None, scale=None, backend="auto"):
    """(out, lse, keep bitmask): the op's saved statistics, for tests and diagnostics."""
    fn = "homologous_attention"
    q, k, v = _autocast_inputs(q, k, v)
    scale = _check_inputs(fn, q, k, v, groups, topk, scale)
    chosen = _dispatch.choose(fn, backend, q.device, _PREFERENCE, _backend_checks(q))
    g = None if groups is None else groups.to(torch.int64)
    # K >= L keeps every allowed key: clamped, a K beyond int64 still fits the op's schema
    return _attn_op(q, k, v, g, int(min(topk, q.shape[2])) if topk else 0, scale, chosen)[:3]
