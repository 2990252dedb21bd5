"""MLCD multi-label margin loss and the ArcFace/CosFace margin softmax, on one engine.

The engine (pyssl/ops/_margin_engine_contract.md) gives, per row, the log-sum-exp of the
scaled cosines over the candidate classes S minus the row's own positives, and the positives'
cosines; and, given per-row gradient weights, dX and dW. Everything loss-specific (the margin,
the extra zero logit of MLCD, the softmax of margin CE) is per-row math on (N,) and (N, l)
tensors done here, once, for every backend.

Backends: "triton" (fused kernels, kernels/mlcd_loss.py), "cpu" (C++/OpenMP epilogues around
MKL GEMMs on row chunks, csrc/mlcd_loss_cpu.cpp) and "torch" (the same row-chunked scheme in
plain PyTorch). No backend allocates an N×C' tensor: chunked backends use an R×C' buffer with
R·C' bounded by CHUNK_ELEMS (or C'·D, whichever is larger), Triton keeps tiles on chip.

With reduction "mean" or "sum" the chunked backends compute dX and dW during the forward (the
three GEMMs of the problem, no recompute, as Liger-Kernel's fused linear cross entropy does) and
the backward only scales them by the incoming gradient. With reduction "none", or on Triton,
the backward recomputes the logits tile by tile.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from pyssl import _checks, _dispatch, _workspace
from pyssl.reference import NORM_EPS, SIN_EPS

# loss kinds understood by the op
MLCD = 0
SOFTMAX = 1
_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
_MARGIN_GRADS = ("straight_through", "exact")
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)

# Chunked backends: the R×C' float32 buffer holds at most max(CHUNK_ELEMS, 2·C'·D) elements (at
# most twice the class matrix in float32: O(C'·D) memory), and R < N whenever N > 1, so no N×C'
# tensor exists. Larger R means fewer passes of the C'×D gradient accumulator through memory.
CHUNK_ELEMS = 1 << 24

_PREFERENCE = {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")}


# --------------------------------------------------------------------------------------------
# argument checks (shapes and types here, data-dependent checks inside the op)
# --------------------------------------------------------------------------------------------

def takes_dtypes(x_dtype: torch.dtype, w_dtype: torch.dtype) -> bool:
    """Whether the ops take x and weight of these dtypes: the same, or float32 weight with 16-bit
    x (its candidate rows rounded to x's dtype, see _rounded_rows)."""
    return x_dtype == w_dtype or (w_dtype == torch.float32 and x_dtype in (torch.bfloat16, torch.float16))


def _check_common(fn, x, weight, classes, scale, reduction, margin_grad, shard=False):
    """Shapes, dtypes, devices and settings. shard: the model-parallel form's rank, which may
    have no rows (N = 0) and an empty candidate set. float32 centers with 16-bit x are taken
    (the candidate rows are rounded to x's dtype, see _rounded_rows)."""
    _checks.tensor(fn, "x", x)
    _checks.tensor(fn, "weight", weight)
    if x.dim() != 2:
        raise ValueError(f"{fn}: x must be (N, D), got shape {tuple(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"{fn}: weight must be (C, D), got shape {tuple(weight.shape)}")
    if x.dtype not in _FLOATS + (torch.float64,):
        raise ValueError(f"{fn}: x must be float32, bfloat16, float16 or float64 (torch backend), got {x.dtype}")
    if not takes_dtypes(x.dtype, weight.dtype):
        raise ValueError(f"{fn}: weight dtype {weight.dtype} does not match x dtype {x.dtype} (float32 "
                         "weight with bfloat16/float16 x is taken too)")
    if weight.device != x.device:
        raise ValueError(f"{fn}: weight is on {weight.device} but x is on {x.device}")
    if x.shape[0] == 0 and not shard:
        raise ValueError(f"{fn}: x is empty (N = 0)")
    if weight.shape[0] == 0:
        raise ValueError(f"{fn}: weight is empty (C = 0)")
    if x.shape[1] == 0 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"{fn}: x has D={x.shape[1]} but weight has D={weight.shape[1]}")
    if _checks.tensor(fn, "classes", classes, optional=True) is not None:
        if classes.dim() != 1 or (classes.numel() == 0 and not shard):
            raise ValueError(f"{fn}: classes must be a non-empty 1-D tensor, got shape {tuple(classes.shape)}")
        if classes.dtype != torch.int64:
            raise ValueError(f"{fn}: classes must be int64, got {classes.dtype}")
        if classes.device != x.device:
            raise ValueError(f"{fn}: classes is on {classes.device} but x is on {x.device}")
    _checks.real(fn, "scale", scale, positive=True)
    if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not isinstance(margin_grad, str) or margin_grad not in _MARGIN_GRADS:
        raise ValueError(f"{fn}: margin_grad must be one of {_MARGIN_GRADS}, got {margin_grad!r}")


def _check_ids(fn, name, ids, x, ndim):
    _checks.tensor(fn, name, ids)
    if ids.dtype != torch.int64:
        raise ValueError(f"{fn}: {name} must be int64, got {ids.dtype}")
    if ids.dim() != ndim or ids.shape[0] != x.shape[0]:
        want = "(N, l)" if ndim == 2 else "(N,)"
        raise ValueError(f"{fn}: {name} must be {want} with N={x.shape[0]}, got shape {tuple(ids.shape)}")
    if ndim == 2 and ids.shape[1] == 0:
        raise ValueError(f"{fn}: {name} must have at least one column")
    if ids.device != x.device:
        raise ValueError(f"{fn}: {name} is on {ids.device} but x is on {x.device}")


def _validate_data(pos_ids: Tensor, classes: Optional[Tensor], num_classes: int, kind: int,
                   fn: Optional[str] = None, missing: Optional[Tensor] = None,
                   count: Optional[Tensor] = None) -> Optional[int]:
    """Data-dependent checks, done inside the op so torch.compile sees no break: every check
    reduced on the device into one flag, read with one host sync; the details (which id,
    which row) only when a check failed. missing: the positives the candidate set lacks
    (_find_columns), checked with the rest (after them: an id out of range is named first).
    count: a 0-d integer tensor the caller needs on the host, read in the same sync and
    returned (None without it)."""
    arg = "positives" if kind == MLCD else "labels"
    fn = fn or ("mlcd_loss" if kind == MLCD else "margin_softmax_loss")
    valid = pos_ids >= 0
    bad = (pos_ids < (-1 if kind == MLCD else 0)) | (pos_ids >= num_classes)
    empty = ~valid.any(1)
    dup = None
    if pos_ids.shape[1] > 1:
        srt = pos_ids.sort(1).values
        dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
    c_out = c_dup = None
    if classes is not None:
        csrt = classes.sort().values
        c_out, c_dup = (classes < 0) | (classes >= num_classes), csrt[1:] == csrt[:-1]
    flags = [t.any() for t in (bad, empty, dup, c_out, c_dup, missing) if t is not None]
    failed = torch.stack(flags).any()
    if count is None:
        if not bool(failed):
            return None
    else:
        failed, n = torch.stack([failed.to(torch.int64), count.to(torch.int64)]).tolist()
        if not failed:
            return n
    if bool(bad.any()):
        v = pos_ids[bad][0].item()
        pad = " (-1 is padding)" if kind == MLCD else ""
        raise ValueError(f"{fn}: {arg} holds class id {v}, out of range [0, {num_classes}){pad}")
    if bool(empty.any()):
        row = int(empty.nonzero()[0].item())
        raise ValueError(f"{fn}: row {row} of positives has no positive (all -1)")
    if dup is not None and bool(dup.any()):
        row = int(dup.any(1).nonzero()[0].item())
        raise ValueError(f"{fn}: positives of row {row} contain a duplicated class id")
    if c_out is not None and bool(c_out.any()):
        raise ValueError(f"{fn}: classes holds ids outside [0, {num_classes})")
    if c_dup is not None and bool(c_dup.any()):
        raise ValueError(f"{fn}: classes holds duplicated ids")
    if missing is not None and bool(missing.any()):
        raise ValueError(f"{fn}: classes does not contain positive/label id {pos_ids[missing][0].item()}; "
                         "the candidate set must hold every positive of the batch")


def _find_columns(ids: Tensor, classes: Tensor):
    """(the column in classes of every id >= 0, -1 elsewhere; the mask of ids >= 0 that classes
    lacks; classes sorted)."""
    srt, perm = classes.sort()
    valid = ids >= 0
    if srt.numel() == 0:
        return torch.full_like(ids, -1), valid, srt
    idx = torch.searchsorted(srt, ids.clamp_min(0)).clamp_max(srt.numel() - 1)
    found = valid & (srt[idx] == ids)
    return torch.where(found, perm[idx], torch.full_like(ids, -1)), valid & ~found, srt


def _validated_columns(pos_ids: Tensor, classes: Optional[Tensor], num_classes: int, kind: int,
                       fn: str) -> Tensor:
    """Every data check of the op and the column index in S of every positive (-1 stays
    padding), with one host sync for all of them (a positive missing from S included)."""
    if classes is None:
        _validate_data(pos_ids, None, num_classes, kind, fn)
        return pos_ids
    cols, missing, _ = _find_columns(pos_ids, classes)
    _validate_data(pos_ids, classes, num_classes, kind, fn, missing)
    return cols


# --------------------------------------------------------------------------------------------
# per-row loss math, shared by every backend
# --------------------------------------------------------------------------------------------

def _row_terms(kind: int, lse_neg: Tensor, pos_cos: Tensor, valid: Tensor, scale: float,
               m1: float, m2: float, m3: float, exact: bool, chord: Optional[Tensor] = None):
    """From the engine's (lse_neg, pos_cos) give (loss_rows, lse_total, gpos_unit).

    lse_total is what the engine subtracts to turn a negative logit into its probability;
    gpos_unit is ∂loss_n/∂cos of each positive for a unit upstream gradient (0 at padding).
    chord: the positives' ½‖x̂ − ŵ‖² (_positive_chords), where margin_grad="exact" takes θ
    from near a center.
    """
    c = pos_cos.clamp(-1.0, 1.0)
    theta = torch.acos(c)
    t = scale * (torch.cos(m1 * theta + m2) - m3)              # positive (target) logits
    if exact:
        if chord is not None:
            # within ~0.14 rad of the center the float32 cosine is 1 − O(θ²) and acos of it has
            # lost θ's digits (all of them below ~3e-4 rad, where the cosine rounds to 1 and
            # sin θ would hit the clamp); the chord 1 − cos = 2 sin²(θ/2) of the unit vectors
            # keeps them. The logit's value stays the cosine's, as SPEC defines it.
            near = 2.0 * torch.asin(torch.sqrt(chord.clamp(0.0, 2.0) * 0.5))
            theta = torch.where(c > 0.99, near, theta)
        dt = scale * m1 * torch.sin(m1 * theta + m2) / torch.sin(theta).clamp_min(SIN_EPS)
    else:
        dt = torch.full_like(t, scale)
    ninf = torch.full_like(t, float("-inf"))
    if kind == MLCD:
        zero = torch.zeros_like(lse_neg)
        lse_total = torch.logaddexp(zero, lse_neg)             # log(1 + Σ_j exp b_j)
        neg_a = torch.where(valid, -t, ninf)
        lse_pos = torch.logsumexp(torch.cat([zero[:, None], neg_a], 1), 1)  # log(1 + Σ_i exp −a_i)
        rows = lse_pos + lse_total
        p_pos = torch.exp(neg_a - lse_pos[:, None])
        gpos = -p_pos * dt
    else:
        t = torch.where(valid, t, ninf)
        tgt = t.max(1).values                                  # the single label's logit
        lse_total = torch.logaddexp(lse_neg, tgt)
        rows = lse_total - tgt
        p_t = torch.exp(t - lse_total[:, None])
        gpos = torch.where(valid, (p_t - 1.0) * dt, torch.zeros_like(t))
    return rows, lse_total, gpos


def _positive_chords(x: Tensor, w: Tensor, ids: Tensor, w_round: Optional[torch.dtype] = None,
                     normalized: bool = False) -> Tensor:
    """½‖x̂_n − ŵ_c‖² (= 1 − cos θ) of every positive, from the vectors rather than their dot:
    x (R, D) the features (normalized: already unit rows in the accumulation dtype), w the
    centers at any scale, ids (R, l) the positives' rows of w (< 0: padding, 0 there), w_round
    the dtype the kernels round those rows to first (float32 centers with 16-bit x), or None.
    R·l·D work in row blocks of at most 2^21 gathered elements (float32 temporaries of ~8 MB, not
    R×l×D); only margin_grad="exact" asks for it."""
    r, l = ids.shape
    acc = _acc_dtype(x)
    out = torch.zeros(ids.shape, dtype=acc, device=x.device)
    valid = ids >= 0
    idx = ids.clamp_min(0)
    step = max(1, (1 << 21) // max(1, l * x.shape[1]))
    for r0 in range(0, r, step):
        r1 = min(r, r0 + step)
        xr = x[r0:r1].to(acc)
        if not normalized:
            xr = xr / torch.linalg.vector_norm(xr, dim=1, keepdim=True).clamp_min(NORM_EPS)
        wr = w[idx[r0:r1]]                                     # (rows, l, D)
        if w_round is not None:
            wr = wr.to(w_round)
        wr = wr.to(acc)
        wr = wr / torch.linalg.vector_norm(wr, dim=-1, keepdim=True).clamp_min(NORM_EPS)
        out[r0:r1] = 0.5 * (xr[:, None, :] - wr).square().sum(-1)
    return torch.where(valid, out, torch.zeros_like(out))


def _chords_of(x: Tensor, weight: Tensor, classes: Optional[Tensor], pos_col: Tensor) -> Tensor:
    """_positive_chords from the op's own inputs (the Triton path and the model-parallel form,
    which hold no normalized copies): pos_col names columns of S."""
    ids = pos_col if classes is None else torch.where(pos_col >= 0, classes[pos_col.clamp_min(0)], pos_col)
    return _positive_chords(x, weight, ids, x.dtype if weight.dtype != x.dtype else None)


def _acc_dtype(x: Tensor) -> torch.dtype:
    """Accumulation dtype: float64 inputs (torch backend only) keep float64, all else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def upstream_rows(g: Tensor, reduction: int, n: int) -> Tensor:
    """Each row's upstream gradient (n,) from the loss's: the scalar g spread by the reduction,
    or g itself for reduction "none"."""
    if reduction == 1:
        g = (g / n).expand(n)
    elif reduction == 2:
        g = g.expand(n)
    return g.contiguous()


def _row_weights(reduction: int, n: int) -> float:
    return 1.0 / n if reduction == 1 else 1.0


# --------------------------------------------------------------------------------------------
# chunked backends (torch and cpu): row chunks × all candidate columns
# --------------------------------------------------------------------------------------------

def _torch_chunk_lse(xhat, w_eff, rw, pos_col, scale, buf):
    torch.mm(xhat, w_eff.t(), out=buf)
    buf.mul_(rw).clamp_(-1.0, 1.0)
    valid = pos_col >= 0
    col = pos_col.clamp_min(0)
    pos_cos = torch.where(valid, buf.gather(1, col), torch.zeros((), dtype=buf.dtype, device=buf.device))
    buf.mul_(scale)
    # padding points at the row's first valid positive, so its -inf lands on a positive too; a
    # row without a positive (a shard of the model-parallel form) writes column 0's own value back
    col, has, _ = _scatter_columns(pos_col, valid)
    buf.scatter_(1, col, torch.where(has, float("-inf"), buf.gather(1, col)))
    return torch.logsumexp(buf, 1), pos_cos


def _scatter_columns(pos_col, valid):
    """Columns to scatter the positives' values into, duplicates made harmless: padding takes the
    row's first positive column (it receives that positive's value), and a row with no positive
    at all points every entry at column 0; has (N, 1) says which rows have a positive, first_i
    (N, 1) the slot of the row's first positive."""
    has = valid.any(1, keepdim=True)
    first_i = valid.to(torch.int8).argmax(1, keepdim=True)
    first = torch.where(has, pos_col.gather(1, first_i), 0)
    return torch.where(valid, pos_col, first), has, first_i


def _torch_chunk_grad(buf, xhat, w_eff, rw, pos_col, scale, lse_total, gneg, gpos, dxhat_out, dw_acc, accumulate):
    buf.sub_(lse_total[:, None]).exp_().mul_((gneg * scale)[:, None])
    valid = pos_col >= 0
    col, has, first_i = _scatter_columns(pos_col, valid)
    val = torch.where(valid, gpos, gpos.gather(1, first_i))
    buf.scatter_(1, col, torch.where(has, val, buf.gather(1, col)))
    buf.mul_(rw)
    if dxhat_out.dim() == 2:        # (an empty 1-D dxhat_out or dw_acc: that product is skipped)
        torch.mm(buf, w_eff, out=dxhat_out)
    if dw_acc.dim() != 2:
        return
    if accumulate:
        dw_acc.addmm_(buf.t(), xhat)
    else:
        torch.mm(buf.t(), xhat, out=dw_acc)


def _chunk_kernels(backend):
    if backend == "cpu":
        ext = _dispatch.extension()
        return ext.mlcd_chunk_lse, ext.mlcd_chunk_grad
    return _torch_chunk_lse, _torch_chunk_grad


def _chunk_rows(n, cp, d):
    budget = max(CHUNK_ELEMS, 2 * cp * d)
    return max(1, min((n + 1) // 2, budget // max(cp, 1)))


class _Chunked:
    """Shared state of one chunked call: normalized x, the float32 class matrix, its norms."""

    def __init__(self, x, weight, classes, backend, rows=None):
        """rows: the row-chunk size (default from the buffer budget); the model-parallel form
        passes one that every rank computes alike, so the ranks' chunks line up."""
        self.backend = backend
        acc = _acc_dtype(x)
        self.xf = x.to(acc)
        self.rx = 1.0 / torch.linalg.vector_norm(self.xf, dim=1).clamp_min(NORM_EPS)
        self.xhat = (self.xf * self.rx[:, None]).contiguous()
        w = weight if classes is None else weight.index_select(0, classes)
        if w.dtype != x.dtype:     # float32 centers, 16-bit x: the rows rounded as on Triton
            w = w.to(x.dtype)
        self.w_eff = w.to(acc).contiguous()
        self.rw = 1.0 / torch.linalg.vector_norm(self.w_eff, dim=1).clamp_min(NORM_EPS)
        n, d = x.shape
        self.cp = self.w_eff.shape[0]
        self.rows = _chunk_rows(n, self.cp, d) if rows is None else rows
        # reused across calls (pyssl/_workspace.py): a fresh one costs page faults every step
        self.buf = _workspace.scratch(self.rows * self.cp, acc, x.device).view(self.rows, self.cp)
        self.lse_fn, self.grad_fn = _chunk_kernels(backend)

    def chunks(self, n):
        """(r0, r1, buffer rows, whether dw_acc already holds earlier chunks)."""
        for r0 in range(0, n, self.rows):
            r1 = min(n, r0 + self.rows)
            yield r0, r1, self.buf[: r1 - r0], r0 > 0

    def finish(self, dxhat, dw_acc, x, weight, classes, dtype=None, w_dtype=None):
        """Normalization backwards; dw_acc holds rw ⊙ dŴ (see the engine contract). dx comes
        out in dtype (default: x's), dw in w_dtype (default: dtype if given, else weight's)."""
        w_dtype = w_dtype or dtype or weight.dtype
        dtype = x.dtype if dtype is None else dtype
        dx = dw = None
        if dxhat.dim() == 2:
            dx = ((dxhat - self.xhat * (self.xhat * dxhat).sum(1, keepdim=True)) * self.rx[:, None]).to(dtype)
        if dw_acc.dim() != 2:
            return dx, dw
        # dW_c = rw_c (dŵ_c − ŵ_c (ŵ_c·dŵ_c)) = acc_c − w_c rw_c² (w_c·acc_c), with no C'×D
        # temporary: the row dots by a batched GEMV, the update in place
        dots = torch.bmm(self.w_eff.unsqueeze(1), dw_acc.unsqueeze(2)).view(-1)
        dw_acc.addcmul_(self.w_eff, (dots * self.rw * self.rw)[:, None], value=-1.0)
        if classes is None:
            dw = dw_acc.to(w_dtype)
        else:
            dw = torch.zeros(weight.shape, dtype=w_dtype, device=weight.device)
            dw.index_copy_(0, classes, dw_acc.to(w_dtype))
        return dx, dw


def _saved_grad_dtype(dtype):
    """dtype of the gradients computed in the forward at unit upstream gradient: float16's range
    would flush small ones to zero before a loss scaler's factor reaches them, so float16
    gradients wait in float32 until the backward has scaled them (bfloat16 has float32's range)."""
    return torch.float32 if dtype == torch.float16 else dtype


def _chunked_forward(x, weight, classes, pos_col, kind, scale, m1, m2, m3, exact,
                     row_weight: Optional[float], backend, combine=None, valid=None, rows=None,
                     grad_dtype=None, need=(True, True)):
    """Loss rows, lse_total, gpos_unit; and dX, dW for upstream weight row_weight if given (both
    in grad_dtype if given, else each in _saved_grad_dtype of its input's dtype; need = (dX
    wanted, dW wanted): None for the other, its GEMM skipped).

    The model-parallel form passes combine(lse_neg, pos_cos) -> the same for the chunk's rows
    over every shard (applied before the row math), valid = the whole batch's positives (those
    of other shards are padding in pos_col) and rows = a chunk size every rank computes alike."""
    st = _Chunked(x, weight, classes, backend, rows)
    n, d = x.shape
    valid = pos_col >= 0 if valid is None else valid
    rows_out = torch.empty(n, dtype=st.xhat.dtype, device=x.device)
    lse_total = torch.empty_like(rows_out)
    gpos_unit = torch.empty(pos_col.shape, dtype=st.xhat.dtype, device=x.device)
    want_grad = row_weight is not None
    if want_grad:
        dxhat, dw_acc = _grad_buffers(st, need)
    for r0, r1, buf, acc in st.chunks(n):
        pc = pos_col[r0:r1].contiguous()
        ln, pcs = st.lse_fn(st.xhat[r0:r1], st.w_eff, st.rw, pc, float(scale), buf)
        chord = _positive_chords(st.xhat[r0:r1], st.w_eff, pc, normalized=True) if exact else None
        if combine is not None:
            ln, pcs, chord = combine_with_chords(combine, ln, pcs, chord)
        rows_c, lt, gp = _row_terms(kind, ln, pcs, valid[r0:r1], scale, m1, m2, m3, exact, chord)
        rows_out[r0:r1], lse_total[r0:r1], gpos_unit[r0:r1] = rows_c, lt, gp
        if want_grad:
            g = torch.full_like(lt, row_weight)
            gp = torch.where(pc >= 0, gp * row_weight, torch.zeros_like(gp))   # 0 at padding (contract)
            st.grad_fn(buf, st.xhat[r0:r1], st.w_eff, st.rw, pc, float(scale), lt.contiguous(),
                       g, gp.contiguous(), dxhat[r0:r1], dw_acc, acc)
    if want_grad:
        dx, dw = st.finish(dxhat, dw_acc, x, weight, classes, grad_dtype or _saved_grad_dtype(x.dtype),
                           grad_dtype or _saved_grad_dtype(weight.dtype))
    else:
        dx = dw = None
    return rows_out, lse_total, gpos_unit, dx, dw


def combine_with_chords(combine, lse, pcos, chord):
    """The model-parallel combine (a shard's (lse, cosines found here) -> the whole row's) with
    the chords riding along the cosines' sum: each positive's chord comes from the one shard that
    holds its center, zeros elsewhere, as its cosine does."""
    if chord is None:
        return combine(lse, pcos) + (None,)
    lse, both = combine(lse, torch.cat([pcos, chord.to(pcos.dtype)], 1))
    return lse, both[:, :pcos.shape[1]], both[:, pcos.shape[1]:]


def _chunked_lse(x, weight, classes, pos_col, scale, backend):
    """The engine's lse (lse_neg (N,), pos_cos (N, L), accumulation dtype) chunk by chunk."""
    st = _Chunked(x, weight, classes, backend)
    n = x.shape[0]
    lse_neg = torch.empty(n, dtype=st.xhat.dtype, device=x.device)
    pos_cos = torch.empty(pos_col.shape, dtype=st.xhat.dtype, device=x.device)
    for r0, r1, buf, _ in st.chunks(n):
        lse_neg[r0:r1], pos_cos[r0:r1] = st.lse_fn(st.xhat[r0:r1], st.w_eff, st.rw,
                                                   pos_col[r0:r1].contiguous(), float(scale), buf)
    return lse_neg, pos_cos


def _grad_buffers(st, need):
    """dx̂ and rw ⊙ dŴ accumulators, an empty 1-D tensor where that gradient is not needed (the
    kernels then skip its GEMM; its row slices stay empty 1-D tensors)."""
    skip = st.xhat.new_empty(0)
    return (torch.empty_like(st.xhat) if need[0] else skip), (torch.empty_like(st.w_eff) if need[1] else skip)


def _chunked_backward(x, weight, classes, pos_col, scale, lse_total, gneg, gpos, backend, dtype=None,
                      need=(True, True)):
    """(dx, dw) at upstream row gradients gneg, gpos; None for a gradient need says is not wanted."""
    st = _Chunked(x, weight, classes, backend)
    n = x.shape[0]
    dxhat, dw_acc = _grad_buffers(st, need)
    lse_total = lse_total.to(st.xhat.dtype)
    gneg = gneg.to(st.xhat.dtype)
    gpos = gpos.to(st.xhat.dtype)
    for r0, r1, buf, acc in st.chunks(n):
        pc = pos_col[r0:r1].contiguous()
        st.lse_fn(st.xhat[r0:r1], st.w_eff, st.rw, pc, float(scale), buf)
        st.grad_fn(buf, st.xhat[r0:r1], st.w_eff, st.rw, pc, float(scale),
                   lse_total[r0:r1].contiguous(), gneg[r0:r1].contiguous(),
                   gpos[r0:r1].contiguous(), dxhat[r0:r1], dw_acc, acc)
    return st.finish(dxhat, dw_acc, x, weight, classes, dtype)


# --------------------------------------------------------------------------------------------
# triton backend
# --------------------------------------------------------------------------------------------

def _rounded_rows(x, weight, classes):
    """The kernels' (weight, classes): float32 centers with 16-bit x give the candidate rows
    rounded to x's dtype, as autocast rounds a linear layer's weight ((C', D), classes None: pos_col
    already names columns of S, which are now the rows). The tiles take one dtype; this copy of
    C'·D 16-bit values is the price of mixed dtypes (same-dtype inputs are read in place)."""
    if weight.dtype == x.dtype:
        return weight, classes
    w = weight if classes is None else weight.index_select(0, classes)
    return w.to(x.dtype), None


def _scatter_rows(dw, weight, classes):
    """dw of _rounded_rows' rows back to weight's shape and dtype (zero outside S)."""
    if dw is None or classes is None:
        return None if dw is None else dw.to(weight.dtype)
    out = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
    return out.index_copy_(0, classes, dw.to(weight.dtype))


def _triton_forward(x, weight, classes, pos_col, kind, scale, m1, m2, m3, exact):
    from pyssl.kernels import mlcd_loss as K
    chord = _chords_of(x, weight, classes, pos_col) if exact else None
    weight, classes = _rounded_rows(x, weight, classes)
    lse_neg, pos_cos = K.mlcd_lse(x, weight, classes, pos_col, float(scale))
    return _row_terms(kind, lse_neg, pos_cos, pos_col >= 0, scale, m1, m2, m3, exact, chord)


def engine_lse(x, weight, classes, pos_col, scale, backend):
    """The engine's lse on any backend: (lse_neg (N,), pos_cos (N, L)) in the accumulation dtype."""
    if backend == "triton":
        from pyssl.kernels import mlcd_loss as K
        return K.mlcd_lse(x, weight, classes, pos_col, float(scale))
    return _chunked_lse(x, weight, classes, pos_col, scale, backend)


def engine_grad(x, weight, classes, pos_col, scale, lse_total, gneg, gpos, backend):
    """The engine's grad on any backend: dx and dw in the accumulation dtype (float32; float64
    for float64 x), dx unrounded, for callers that sum partial dx (on Triton dw comes from its
    16-bit tile through the range-safe store: no float16 overflow under a loss scaler's factor;
    rows outside classes zero)."""
    acc = _acc_dtype(x)
    if backend == "triton":
        return _triton_backward(x, weight, classes, pos_col, scale, lse_total, gneg, gpos, acc, dw_dtype=acc)
    return _chunked_backward(x, weight, classes, pos_col, scale, lse_total, gneg, gpos, backend, acc)


def _triton_backward(x, weight, classes, pos_col, scale, lse_total, gneg, gpos, dx_dtype=None,
                     need=(True, True), dw_dtype=None):
    from pyssl.kernels import mlcd_loss as K
    w_use, cls_use = _rounded_rows(x, weight, classes)
    # float32 centers: dw comes back in float32 from a range-safe 16-bit store (see mlcd_grad)
    dx, dw = K.mlcd_grad(x, w_use, cls_use, pos_col, float(scale), lse_total.float().contiguous(),
                         gneg.float().contiguous(), gpos.float().contiguous(), dx_dtype, *need,
                         dw_dtype=dw_dtype or weight.dtype)
    return dx, (dw if w_use is weight else _scatter_rows(dw, weight, classes))


def _need_bits(dx: bool, dw: bool) -> int:
    """The ops' need_grad bits (1: dx, 2: dw) of which gradients are wanted."""
    return int(dx) | 2 * int(dw)


def _need(bits: int):
    """(dx wanted, dw wanted) of the ops' need_grad bits (_need_bits)."""
    return bool(bits & 1), bool(bits & 2)


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    """A gradient not computed travels through the op schema as an empty tensor."""
    return like.new_empty(0) if t is None else t


# --------------------------------------------------------------------------------------------
# backend choice
# --------------------------------------------------------------------------------------------

def _backend_checks(x: Tensor, l: int):
    def triton_reasons() -> List[str]:
        r = []
        if x.dtype == torch.float64:
            r.append("triton kernels take float32/bfloat16/float16, not float64")
        if l > 64:
            r.append(f"triton masks at most 64 positives per row, got l={l}")
        return r

    def cpu_reasons() -> List[str]:
        return ["cpu kernels take float32/bfloat16/float16, not float64"] if x.dtype == torch.float64 else []

    return {"triton": triton_reasons, "cpu": cpu_reasons, "torch": lambda: []}


def not_supported_reasons(x: Tensor, positives: Tensor) -> dict:
    """Why each backend cannot serve these inputs (empty list: it can)."""
    return _dispatch.not_supported_reasons(_backend_checks(x, positives.shape[1]), x.device)


def _choose_backend(fn, backend, x, l):
    return _dispatch.choose(fn, backend, x.device, _PREFERENCE, _backend_checks(x, l))


# --------------------------------------------------------------------------------------------
# the custom op: forward gives (loss, lse_total, gpos_unit, pos_col, dx, dw)
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("pyssl::margin_loss", mutates_args=(), tags=_dispatch.HOST_SYNC_TAGS)
@_dispatch.autocast_off
def _margin_loss_op(x: Tensor, weight: Tensor, pos_ids: Tensor, classes: Optional[Tensor],
                    kind: int, scale: float, m1: float, m2: float, m3: float, exact: bool,
                    reduction: int, backend: str, grad_in_forward: bool, need_grad: int
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    fn = "mlcd_loss" if kind == MLCD else "margin_softmax_loss"
    pos_col = _validated_columns(pos_ids, classes, weight.shape[0], kind, fn)
    n = x.shape[0]
    dx = dw = None
    if backend == "triton":
        rows, lse_total, gpos_unit = _triton_forward(x, weight, classes, pos_col, kind, scale, m1, m2, m3, exact)
        if grad_in_forward:
            w_row = _row_weights(reduction, n)
            g = torch.full_like(lse_total, w_row)
            dx, dw = _triton_backward(x, weight, classes, pos_col, scale, lse_total, g, gpos_unit * w_row,
                                      need=_need(need_grad))
            gd, gw = _saved_grad_dtype(x.dtype), _saved_grad_dtype(weight.dtype)   # as the fake says
            dx, dw = (None if dx is None else dx.to(gd)), (None if dw is None else dw.to(gw))
    else:
        w_row = _row_weights(reduction, n) if grad_in_forward else None
        rows, lse_total, gpos_unit, dx, dw = _chunked_forward(
            x, weight, classes, pos_col, kind, scale, m1, m2, m3, exact, w_row, backend, need=_need(need_grad))
    if reduction == 1:
        loss = rows.mean()
    elif reduction == 2:
        loss = rows.sum()
    else:
        loss = rows
    acc = _acc_dtype(x)
    # the loss stays in the accumulation dtype: a 16-bit loss would round a value near 50 to
    # 0.25 (bf16), and torch's own losses under autocast, cut-cross-entropy and Liger's fused
    # linear cross-entropy all return float32
    loss = loss.to(acc)
    dx, dw = _or_empty(dx, x), _or_empty(dw, weight)
    return loss, lse_total.to(acc), gpos_unit.to(acc), pos_col.clone(memory_format=torch.contiguous_format), dx, dw


@_margin_loss_op.register_fake
def _(x, weight, pos_ids, classes, kind, scale, m1, m2, m3, exact, reduction, backend, grad_in_forward,
      need_grad):
    n = x.shape[0]
    loss = x.new_empty(() if reduction else (n,), dtype=_acc_dtype(x))
    stats = x.new_empty((n,), dtype=_acc_dtype(x))
    gpos = x.new_empty(pos_ids.shape, dtype=_acc_dtype(x))
    pos_col = pos_ids.new_empty(pos_ids.shape)
    dx, dw = x.new_empty(0), weight.new_empty(0)
    if grad_in_forward:
        want_dx, want_dw = _need(need_grad)
        if want_dx:
            dx = x.new_empty(x.shape, dtype=_saved_grad_dtype(x.dtype))
        if want_dw:
            dw = weight.new_empty(weight.shape, dtype=_saved_grad_dtype(weight.dtype))
    return loss, stats, gpos, pos_col, dx, dw


@torch.library.custom_op("pyssl::margin_loss_backward", mutates_args=())
@_dispatch.autocast_off
def _margin_loss_backward_op(x: Tensor, weight: Tensor, classes: Optional[Tensor], pos_col: Tensor,
                             scale: float, lse_total: Tensor, gneg: Tensor, gpos: Tensor,
                             backend: str, need_grad: int) -> Tuple[Tensor, Tensor]:
    need = _need(need_grad)
    if backend == "triton":
        dx, dw = _triton_backward(x, weight, classes, pos_col, scale, lse_total, gneg, gpos, need=need)
    else:
        dx, dw = _chunked_backward(x, weight, classes, pos_col, scale, lse_total, gneg, gpos, backend, need=need)
    return _or_empty(dx, x), _or_empty(dw, weight)


@_margin_loss_backward_op.register_fake
def _(x, weight, classes, pos_col, scale, lse_total, gneg, gpos, backend, need_grad):
    want_dx, want_dw = _need(need_grad)
    return (x.new_empty(x.shape) if want_dx else x.new_empty(0),
            weight.new_empty(weight.shape) if want_dw else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, pos_ids, classes, kind, scale, m1, m2, m3, exact, reduction, backend, gif, need_grad = inputs
    loss, lse_total, gpos_unit, pos_col, dx, dw = output
    ctx.grad_in_forward = gif
    ctx.dtype, ctx.w_dtype = x.dtype, weight.dtype
    ctx.reduction = reduction
    ctx.scale = scale
    ctx.backend = backend
    ctx.mark_non_differentiable(lse_total, gpos_unit, pos_col, dx, dw)
    # the auxiliary outputs never get a gradient: without this autograd would hand the backward
    # zero-filled tensors for them, a C×D fill for dw
    ctx.set_materialize_grads(False)
    if gif:
        # x and weight only as anchors of the double-backward guard (_NoSecondOrder): no copies
        ctx.save_for_backward(dx, dw, x, weight)
    else:
        ctx.save_for_backward(x, weight, classes, pos_col, lse_total, gpos_unit)


_SECOND_ORDER_WHAT = "pyssl margin losses (mlcd_loss, margin_softmax_loss)"
# (this path, the Triton backend or reduction "none", recomputes in the backward: its derivative
# through the upstream gradient, e.g. to a learnable loss weight, is missing as well)
_dispatch.no_second_order(_margin_loss_backward_op, _SECOND_ORDER_WHAT,
                          "x and weight (nor, where the backward recomputes: Triton or reduction='none', "
                          "with respect to the upstream gradient)")


class _NoSecondOrder(torch.autograd.Function):
    """A zero that depends on x and weight, added to the gradients of a double backward: the
    second derivatives of the margin losses with respect to x and weight are not implemented,
    and this says so when a backward reaches them."""

    @staticmethod
    def forward(ctx, x, weight):
        return x.new_zeros((), dtype=_acc_dtype(x))

    @staticmethod
    def backward(ctx, grad):
        raise _dispatch.no_second_order_error(_SECOND_ORDER_WHAT, "x and weight")


def _is_one(g: Tensor) -> bool:
    """Whether the upstream gradient is exactly 1, asked only where the answer costs no device
    sync and no graph break and changes nothing but speed: eager mode outside any tracer (not a
    fake or functional tensor of AOTAutograd, a functorch wrapper or a dispatch-mode trace such
    as make_fx, where it would be a data-dependent branch), a plain CPU scalar, and no
    create_graph (a double backward needs the product's graph, e.g. to a learnable weight that
    happens to be 1)."""
    from torch.utils._python_dispatch import is_in_torch_dispatch_mode
    return (not torch.compiler.is_compiling() and not torch.is_grad_enabled() and not g.requires_grad
            and type(g) is torch.Tensor and not torch._C._functorch.is_functorch_wrapped_tensor(g)
            and not is_in_torch_dispatch_mode()
            and g.device.type == "cpu" and g.numel() == 1 and bool(g == 1))


def _backward(ctx, grad_loss, *unused):
    if grad_loss is None:   # only auxiliary outputs reached the backward: no gradient flows
        return (None,) * 14
    if ctx.grad_in_forward:
        dx, dw, x, weight = ctx.saved_tensors
        dx, dw = _scaled_saved_grads(ctx, grad_loss, dx, dw, x, weight)
        # a gradient the forward did not form (its input did not require one) is None
        return (dx if ctx.needs_input_grad[0] else None, dw if ctx.needs_input_grad[1] else None) + (None,) * 12
    x, weight, classes, pos_col, lse_total, gpos_unit = ctx.saved_tensors
    gneg = upstream_rows(grad_loss.to(lse_total.dtype), ctx.reduction, x.shape[0])
    gpos = gpos_unit * gneg[:, None]
    need = _need_bits(*ctx.needs_input_grad[:2])
    dx, dw = _margin_loss_backward_op(x, weight, classes, pos_col, ctx.scale, lse_total, gneg, gpos, ctx.backend,
                                      need)
    return (dx if need & 1 else None, dw if need & 2 else None) + (None,) * 12


def _scaled_saved_grads(ctx, grad_loss, dx, dw, x, weight):
    """The gradients formed in the forward at unit upstream gradient, times grad_loss (an empty
    placeholder where a gradient was not formed stays one)."""
    pairs = ((dx, ctx.dtype), (dw, ctx.w_dtype))     # each gradient in its input's dtype
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        # create_graph=True: the gradients were formed in the forward as constants, so their
        # own derivatives with respect to x and weight would silently be zero; a node on
        # those paths raises instead (the upstream gradient's inputs, e.g. a learnable loss
        # weight, still get theirs)
        guard = _NoSecondOrder.apply(x, weight)
        return tuple((t * grad_loss.to(_acc_dtype(t)) + guard).to(dt) for t, dt in pairs)
    if all(t.numel() == 0 or t.dtype == dt for t, dt in pairs) and _is_one(grad_loss):
        # loss.backward(): the saved gradients are the answer. Without retain_graph autograd
        # has released its saved copy by the time they are accumulated, so .grad takes them
        # without a copy; with retain_graph it copies them. Saves a C'×D pass (~3% of
        # mlcd_cpu) and that tensor's memory. One visible difference: torch.autograd.grad
        # with retain_graph=True returns the saved tensor itself, and modifying it in place
        # makes a later backward through the retained graph raise autograd's "modified by
        # an inplace operation" error (never a wrong value).
        return dx, dw
    # one scaling pass, no data-dependent branch (it must trace under torch.compile); the
    # products are fresh tensors that autograd's accumulation can take without a copy
    return tuple((t * grad_loss.to(_acc_dtype(t))).to(dt) for t, dt in pairs)


_margin_loss_op.register_autograd(_backward, setup_context=_setup_context)


def _run(fn, kind, x, weight, pos_ids, classes, scale, m1, m2, m3, margin_grad, reduction, backend):
    chosen = _choose_backend(fn, backend, x, pos_ids.shape[1])
    red = _REDUCTIONS[reduction]
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    # Gradients during the forward pay off where no recompute is needed (chunked backends);
    # they require a scalar loss, whose upstream gradient is one number.
    gif = needs_grad and red != 0 and chosen in ("cpu", "torch")
    # which gradients to form: a frozen input (requires_grad False) skips its product, a third
    # of the backward's work
    need = _need_bits(x.requires_grad, weight.requires_grad)
    out = _margin_loss_op(x, weight, pos_ids, classes, kind, float(scale), float(m1), float(m2), float(m3),
                          margin_grad == "exact", red, chosen, gif, need)
    return out[0]


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------

def mlcd_loss(x: Tensor, weight: Tensor, positives: Tensor, *, scale: float = 64.0, margin: float = 0.3,
              classes: Optional[Tensor] = None, margin_grad: str = "straight_through",
              reduction: str = "mean", backend: str = "auto") -> Tensor:
    """MLCD multi-label margin loss (Multi-label Cluster Discrimination), never materializing
    the N×C' logits.

    With cos_nc = clamp(x̂_n·ŵ_c, −1, 1) (rows L2-normalized), the row's positives P_n and its
    negatives S ∖ P_n (other rows' positives are negatives):
        a_ni = s·cos(arccos(cos_ni) + m)   (i ∈ P_n),      b_nj = s·cos_nj   (j ∈ S ∖ P_n)
        L_n  = log(1 + Σ_i exp(−a_ni)) + log(1 + Σ_j exp(b_nj))
    and loss = mean_n L_n (reduction "mean"; "sum", "none" too). The negative sum is never a
    difference of sums: a row's own positives are masked inside each tile.
    Gradients: ∂L_n/∂cos_nj = s·p⁻_nj on negatives and −s·p⁺_ni·κ_ni on positives, with κ = 1
    (margin_grad="straight_through", PartialFC's) or sin(θ+m)/sin θ ("exact"; within 0.14 rad of
    a positive center, where the float32 cosine 1 − θ²/2 has lost θ's digits (below ~3e-4 rad it
    rounds to 1), θ comes from the chord ‖x̂ − ŵ‖ of the unit vectors instead, an N·l·D pass; sin θ
    is clamped at 1e-6); rows of weight outside S get zero; a frozen input (requires_grad False)
    gets none and costs none.

    x (N, D) and weight (C, D) share a float dtype, or weight is float32 and x bfloat16/float16
    (a half-precision backbone or autocast with float32 centers: the candidate rows are rounded
    to x's dtype for the products, as autocast rounds a linear layer's weight, and weight's
    gradient comes back in float32). The loss is float32 (float64 for float64 x), the
    gradients in their inputs' dtypes. positives (N, l) int64 class ids with -1 as
    padding (at least one per row, unique within a row); classes None (all C classes) or the
    unique candidate ids S holding every positive of the batch (see sample_classes).
    """
    fn = "mlcd_loss"
    _check_common(fn, x, weight, classes, scale, reduction, margin_grad)
    _check_ids(fn, "positives", positives, x, 2)
    margin = _checks.real(fn, "margin", margin)
    return _run(fn, MLCD, x, weight, positives, classes, scale, 1.0, margin, 0.0, margin_grad,
                reduction, backend)


def margin_softmax_loss(x: Tensor, weight: Tensor, labels: Tensor, *, scale: float = 64.0, m1: float = 1.0,
                        m2: float = 0.5, m3: float = 0.0, classes: Optional[Tensor] = None,
                        margin_grad: str = "straight_through", reduction: str = "mean",
                        backend: str = "auto") -> Tensor:
    """Single-label margin softmax (ArcFace m2, CosFace m3, SphereFace m1) over S, on the
    MLCD loss's engine (never an N×C' tensor).

    Target logit s·(cos(m1·θ + m2) − m3), other logits s·cos θ (θ the angle between the
    normalized x_n and w_c), cross-entropy over the candidate classes S (classes None: all C);
    labels (N,) int64. dtypes as in mlcd_loss (float32 weight with 16-bit x; a float32 loss).
    """
    fn = "margin_softmax_loss"
    _check_common(fn, x, weight, classes, scale, reduction, margin_grad)
    _check_ids(fn, "labels", labels, x, 1)
    m1, m2, m3 = (_checks.real(fn, name, v) for name, v in (("m1", m1), ("m2", m2), ("m3", m3)))
    return _run(fn, SOFTMAX, x, weight, labels[:, None], classes, scale, m1, m2, m3, margin_grad,
                reduction, backend)


def sample_classes(positives: Tensor, num_classes: int, ratio: float = 0.1, *,
                   generator: Optional[torch.Generator] = None) -> Tensor:
    """S = every positive of the batch ∪ round(ratio·(C − |P|)) other classes drawn uniformly
    without replacement; sorted, unique, int64, on positives' device. Without a generator it
    is the op pyssl::sample_classes (the data checks and the draw inside, from the default
    generator), so it runs under torch.compile(fullgraph=True) with S of a data-dependent size;
    a torch.Generator cannot enter a graph, so with one it runs in Python."""
    fn = "sample_classes"
    _checks.tensor(fn, "positives", positives)
    if positives.dtype != torch.int64:
        raise ValueError(f"{fn}: positives must be int64, got {positives.dtype}")
    if positives.dim() != 2:
        raise ValueError(f"{fn}: positives must be (N, l), got shape {tuple(positives.shape)}")
    if positives.numel() == 0:
        raise ValueError(f"{fn}: positives is empty")
    num_classes = _checks.integer(fn, "num_classes", num_classes, lo=1)
    ratio = _checks.real(fn, "ratio", ratio)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"{fn}: ratio must be in [0, 1], got {ratio!r}")
    if _checks.generator(fn, "generator", generator) is None:
        return _sample_op(positives, num_classes, ratio)
    _checks.draw_device(fn, generator, positives.device, "positives")
    return _sample(positives, num_classes, ratio, generator, check=fn)


@torch.library.custom_op("pyssl::sample_classes", mutates_args=())
@_dispatch.autocast_off
def _sample_op(positives: Tensor, num_classes: int, ratio: float) -> Tensor:
    return _sample(positives, num_classes, ratio, None, check="sample_classes")


@_sample_op.register_fake
def _(positives, num_classes, ratio):
    # |S| depends on the data (the batch's distinct positives): an unbacked size, at least one
    # class (every row holds a positive), at most all of them
    n = torch.library.get_ctx().new_dynamic_size(min=1, max=num_classes)
    return positives.new_empty((n,))


def _sample(positives: Tensor, num_classes: int, ratio: float,
            generator: Optional[torch.Generator], check: Optional[str] = None) -> Tensor:
    """sample_classes: every id >= 0 of positives (any shape; -1 and other negatives are
    ignored, a row may have none) plus round(ratio·(C − |P|)) others. check: the function name
    under which positives get the data checks of the loss first (_validate_data, its host sync
    shared with the count of distinct positives: the one sync of the call; the rest runs on the
    device without another). The classes are marked in a (C,) mask and read off it in order
    (nonzero_static at the size now known): no sort, no unique."""
    flat = positives.reshape(-1)
    dev = positives.device
    # ids out of range go to a spare slot (they are refused below, but must not index first)
    ok = (flat >= 0) & (flat < num_classes)
    present = torch.zeros(num_classes + 1, dtype=torch.bool, device=dev)
    present[torch.where(ok, flat, num_classes)] = True
    present = present[:num_classes]
    npos = present.sum()
    if check is not None:
        npos = _validate_data(positives, None, num_classes, MLCD, check, count=npos)
    else:
        npos = int(npos.item())
    k = int(round(ratio * (num_classes - npos)))
    if k:
        gen_device = dev if generator is None or generator.device.type != "cpu" else generator.device
        # uniform without replacement over the complement: rank random keys, positives excluded
        keys = _checks.host_to(torch.rand(num_classes, generator=generator, device=gen_device), dev)
        keys.masked_fill_(present, 2.0)
        present[torch.topk(keys, k, largest=False, sorted=False).indices] = True
    return torch.nonzero_static(present, size=npos + k).reshape(-1)
