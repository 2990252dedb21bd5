"""Model-parallel MLCD loss and margin softmax: the class centers sharded across the ranks of a
process group by contiguous class ranges (PartialFC style): pyssl.nn.MLCDLoss with a
process_group. The numbers are those of one process holding every center.

Rank r of P holds the centers of classes [start_r, start_r + C_r) and its own N_r rows. One call:

  1. all_gather of every rank's (N_r, l_r, start_r, C_r, D, dtype, gradient flags, error):
     batch sizes and positives per row may differ between ranks (an epoch's last batch, a rank
     with no rows), and the shards are checked to tile [0, C);
  2. all_gather of x and positives (padded to the largest N_r and l_r) -> X (N, D), P (N, l),
     N = Σ N_r, the same on every rank;
  3. this rank's candidate columns: all of its classes, the given ones, or — with sample_ratio —
     the batch's positives that fall in its range plus round(ratio·(C_r − |P_r|)) of its other
     classes (the union over ranks is what pyssl.sample_classes would draw, stratified by shard);
  4. the engine's lse (pyssl/ops/_margin_engine_contract.md) over those columns, with the
     positives that live on other shards as padding: per row lse_r and the cosines of its
     positives found here (0 elsewhere); nothing N×C'_r is allocated;
  5. all_reduce MAX of lse_r, then all_reduce SUM of [exp(lse_r − max) | cosines]: the row's
     log-sum-exp over every shard's negatives and every positive's cosine (each positive lives on
     exactly one shard); the per-row loss math (_row_terms) then runs alike on every rank, and
     every rank returns the same loss.
  Gradients: the engine's grad over this shard with the global lse_total gives dW of the shard
  (it stays here) and this shard's part of dX for all N rows, both in float32 (unrounded: the
  partials of one row can cancel); one reduce_scatter SUM in float32 hands each rank the sum for
  its own rows. Triton, and reduction "none", form them in the backward (recomputing the logits
  tile by tile). The cpu and torch backends with a scalar loss form them in the forward, as the
  single-process op does: per row chunk (a size every rank computes alike) steps 4-5 run on the
  chunk, then its gradient epilogue and GEMMs on the logits still in the buffer (3 GEMMs in all;
  the backward only scales by the upstream gradient, with no collective).

Traffic per call: N·D (x, in x's dtype) + N·l ids + N·(2 + l) floats for the statistics
(N·(2 + 2l) with margin_grad="exact", whose chords ride along), N·D floats sent and N_r·D received
for dX. The loss is float32 for 16-bit x (float64 for float64), as the single-process op's.

Every rank raises the same way on bad input, so no rank is left waiting in a collective: a
rank's own argument errors (shapes, dtypes, settings) ride on the first gather, and what is found
after a collective (a class id out of range, a row without a positive, shards that do not tile
[0, C), a candidate set missing one of its shard's positives) is seen by every rank alike or
rides on the max-reduce. The op runs eagerly (torch.compile leaves it out of the graph: it reads
the gathered sizes and checks the gathered ids on the host, a few synchronizations per call) and
every rank of the group must call it, and its backward, together: the ranks must agree on
whether the loss needs gradients (checked).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from pyssl import _checks, _dispatch
from pyssl.ops import mlcd_loss as E

__all__ = ["shard_range", "mlcd_loss_parallel", "margin_softmax_loss_parallel"]


def shard_range(num_classes: int, rank: int, world_size: int) -> Tuple[int, int]:
    """(first class, number of classes) of rank's shard when num_classes are split into
    world_size contiguous ranges, the first num_classes mod world_size ranks one class larger
    (as PartialFC splits them)."""
    fn = "shard_range"
    world_size = _checks.integer(fn, "world_size", world_size, lo=1)
    num_classes = _checks.integer(fn, "num_classes", num_classes, lo=world_size)
    rank = _checks.integer(fn, "rank", rank, lo=0, hi=world_size - 1)
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + (1 if rank < extra else 0)


@dataclass
class _Call:
    fn: str
    kind: int
    group: object
    start: int
    classes: Optional[Tensor]
    sample_ratio: Optional[float]
    generator: Optional[torch.Generator]
    scale: float
    m1: float
    m2: float
    m3: float
    exact: bool
    reduction: int
    backend: str
    metas: List[List[int]]         # every rank's _exchange entry
    any_x_grad: bool               # some rank's x needs a gradient: the dx reduce runs on all
    feature_grad_scale: float


def _gather_rows(t: Tensor, ns: List[int], group) -> Tensor:
    """Every rank's t (n_r, ...) concatenated in rank order; padded to max(ns) rows for the
    collective (all_gather wants equal sizes)."""
    nmax = max(ns)
    if t.shape[0] < nmax:
        t = torch.cat([t, t.new_zeros((nmax - t.shape[0],) + tuple(t.shape[1:]))])
    parts = [torch.empty_like(t) for _ in ns]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat([p[:k] for p, k in zip(parts, ns)])


def _shards(fn: str, metas: List[List[int]]) -> int:
    """Checks that the ranks' class ranges tile [0, C) and agree on D; returns C. Every rank sees
    the same metas, so every rank raises the same error."""
    ds = {m[4] for m in metas}
    if len(ds) != 1:
        raise ValueError(f"{fn}: the ranks' features have different dimensions D: {sorted(ds)}")
    ranges = sorted((m[2], m[3], r) for r, m in enumerate(metas))
    end = 0
    for start, count, r in ranges:
        if start != end:
            raise ValueError(f"{fn}: the class shards of the process group must tile [0, C) without "
                             f"gaps or overlaps; rank {r} holds [{start}, {start + count}) but the "
                             f"classes before it end at {end}")
        end = start + count
    return end


def _local_columns(fn: str, local: Tensor, classes: Optional[Tensor], count: int):
    """(pos_col, error): the column in classes of every positive in this shard (local ids, -1 =
    padding or another shard's class), and an error message ('' if none) instead of raising, so
    the caller can raise on every rank at once."""
    if classes is None:
        return local, ""
    if bool(((classes < 0) | (classes >= count)).any()):
        return local, f"{fn}: classes holds ids outside this rank's class range"
    cols, missing, srt = E._find_columns(local, classes)
    if bool((srt[1:] == srt[:-1]).any()):
        return local, f"{fn}: classes holds duplicated ids"
    if bool(missing.any()):
        return local, (f"{fn}: the classes of some rank do not contain a positive/label of its shard; each "
                       "rank's candidate set must hold every positive of the batch that falls in its class range")
    return cols, ""


class _ShardedMarginLoss(torch.autograd.Function):
    @staticmethod
    @_dispatch.autocast_off    # as the single-process op's body (see _dispatch.autocast_off)
    def forward(ctx, x: Tensor, weight: Tensor, positives: Tensor, call: _Call) -> Tensor:
        group, fn = call.group, call.fn
        rank = dist.get_rank(group)
        n = x.shape[0]
        count = weight.shape[0]
        metas = call.metas
        num_classes = _shards(fn, metas)
        ns = [m[0] for m in metas]
        lmax = max(m[1] for m in metas)
        offset, ntot = sum(ns[:rank]), sum(ns)

        if positives.shape[1] < lmax:
            positives = torch.cat([positives, positives.new_full((n, lmax - positives.shape[1]), -1)], 1)
        xs = _gather_rows(x.detach(), ns, group)
        pos = _gather_rows(positives, ns, group)
        E._validate_data(pos, None, num_classes, call.kind, fn)   # identical on every rank

        # this shard's candidate set (local ids) and the columns of its positives in it
        inside = (pos >= call.start) & (pos < call.start + count)
        local = torch.where(inside, pos - call.start, torch.full_like(pos, -1))
        classes = None
        if call.sample_ratio is not None:
            classes = E._sample(local, count, call.sample_ratio, call.generator)
        elif call.classes is not None:
            classes = call.classes - call.start
        pos_col, error = _local_columns(fn, local, classes, count)
        empty = classes is not None and classes.numel() == 0

        # 16-bit features with float32 centers: cast only the rows used, as autocast would
        # (not with an error: classes may then hold ids outside the shard)
        w_use, cls_use = weight.detach(), classes
        if weight.dtype != x.dtype and not (error or empty):
            if classes is None:
                w_use = w_use.to(x.dtype)
            else:
                w_use, cls_use = w_use.index_select(0, classes).to(x.dtype), None
        backend = E._choose_backend(fn, call.backend, x, lmax)
        acc = E._acc_dtype(x)
        ctx.call, ctx.backend, ctx.empty = call, backend, empty
        ctx.ns, ctx.offset, ctx.n = ns, offset, n
        ctx.x_dtype, ctx.w_dtype, ctx.w_shape = x.dtype, weight.dtype, weight.shape
        ctx.cast_rows = weight.dtype != x.dtype and classes is not None
        # cpu and torch backends with a scalar loss that needs gradients: per row chunk, the
        # chunk's statistics are exchanged and its gradients formed while its logits are still in
        # the buffer (3 GEMMs, as the single-process op; no collective in the backward)
        ctx.fused = backend in ("cpu", "torch") and call.reduction != 0 and bool(metas[0][6])
        combine = _Combine(fn, group, error, acc, x.device)
        valid = pos >= 0
        if ctx.fused:
            rows, dx_own, dw = _fused_forward(call, xs, w_use, cls_use, classes, pos_col, valid, empty or error,
                                              combine, backend, metas, ctx)
            ctx.save_for_backward(dx_own, dw)
        else:
            chord = None
            if empty or error:
                lse = torch.full((ntot,), float("-inf"), dtype=acc, device=x.device)
                pcos = torch.zeros(pos.shape, dtype=acc, device=x.device)
                if call.exact:
                    chord = torch.zeros_like(pcos)
            else:
                lse, pcos = E.engine_lse(xs, w_use, cls_use, pos_col, call.scale, backend)
                if call.exact:
                    chord = E._chords_of(xs, w_use, cls_use, pos_col)
            lse_neg, pos_cos, chord = E.combine_with_chords(combine, lse, pcos, chord)
            rows, lse_total, gpos_unit = E._row_terms(call.kind, lse_neg, pos_cos, valid, call.scale,
                                                      call.m1, call.m2, call.m3, call.exact, chord)
            ctx.save_for_backward(xs, w_use, cls_use, pos_col, lse_total, gpos_unit, classes)
        if call.reduction == 1:
            loss = rows.mean()
        elif call.reduction == 2:
            loss = rows.sum()
        else:
            loss = rows[offset:offset + n]
        return loss.to(acc)    # float32 for 16-bit x, as the single-process op

    @staticmethod
    @_dispatch.autocast_off
    def backward(ctx, grad_loss: Tensor):
        if ctx.fused:   # the gradients of a unit upstream gradient, formed in the forward
            dx_own, dw = ctx.saved_tensors   # dx_own None where no rank's x needs a gradient
            g = grad_loss.to(torch.float64 if ctx.x_dtype == torch.float64 else torch.float32)
            dx = (dx_own * g).to(ctx.x_dtype) if dx_own is not None and ctx.needs_input_grad[0] else None
            return dx, ((dw * g).to(ctx.w_dtype) if ctx.needs_input_grad[1] else None), None, None
        xs, w_use, cls_use, pos_col, lse_total, gpos_unit, classes = ctx.saved_tensors
        call, group = ctx.call, ctx.call.group
        ntot = xs.shape[0]
        g = grad_loss.to(lse_total.dtype)
        if call.reduction == 0:   # each rank holds the upstream gradient of its own rows
            g = _gather_rows(g.contiguous(), ctx.ns, group)
        gneg = E.upstream_rows(g, call.reduction, ntot)
        gpos = torch.where(pos_col >= 0, gpos_unit * gneg[:, None], torch.zeros_like(gpos_unit))
        if ctx.empty:
            dx, dw = torch.zeros(xs.shape, dtype=lse_total.dtype, device=xs.device), None
        else:
            dx, dw = E.engine_grad(xs, w_use, cls_use, pos_col, call.scale, lse_total, gneg, gpos.contiguous(),
                                   ctx.backend)
        dx_own, dw = _shard_grads(ctx, dx, dw, classes, ctx.w_dtype)
        dx_own = dx_own.to(ctx.x_dtype) if dx_own is not None and ctx.needs_input_grad[0] else None
        return dx_own, (dw if ctx.needs_input_grad[1] else None), None, None


class _Combine:
    """Step 5 for a block of rows: (lse_r, cosines found here) of this shard -> the rows'
    log-sum-exp over every shard's negatives and every positive's cosine. The first call also
    carries this rank's error flag on its max-reduce, and raises on every rank if any has one."""

    def __init__(self, fn, group, error, acc, device):
        self.fn, self.group, self.error, self.acc, self.device = fn, group, error, acc, device
        self.first = True

    def __call__(self, lse: Tensor, pcos: Tensor):
        n = lse.shape[0]
        red = lse.to(self.acc)
        if self.first:
            flag = torch.tensor([1.0 if self.error else 0.0], dtype=self.acc, device=self.device)
            red = torch.cat([red, flag])
        else:
            red = red.clone()
        dist.all_reduce(red, op=dist.ReduceOp.MAX, group=self.group)
        if self.first:
            self.first = False
            if red[-1].item() > 0:
                raise ValueError(self.error or f"{self.fn}: the candidate classes of another rank are "
                                               "invalid (its error names the problem)")
            red = red[:-1]
        ref = torch.where(torch.isneginf(red), torch.zeros_like(red), red)
        red = torch.cat([torch.exp(lse.to(self.acc) - ref), pcos.to(self.acc).reshape(-1)])
        dist.all_reduce(red, op=dist.ReduceOp.SUM, group=self.group)
        total = red[:n]
        lse_neg = torch.where(total == 0, torch.full_like(total, float("-inf")), ref + torch.log(total))
        return lse_neg, red[n:].view(pcos.shape)


def _fused_forward(call, xs, w_use, cls_use, classes, pos_col, valid, idle, combine, backend, metas, ctx):
    """The chunked backends' forward with gradients (scalar loss): the single-process chunk loop
    (E._chunked_forward) with row chunks of a size every rank computes alike (from the largest
    shard) and each chunk's statistics combined across ranks before its gradient epilogue and
    GEMMs. A rank with no candidate column (idle) takes part in every exchange. Returns (loss
    rows, this rank's dx rows for a unit upstream gradient (float32, feature_grad_scale applied;
    None where no rank's x needs one), dw of the shard)."""
    ntot, d = xs.shape
    acc = E._acc_dtype(xs)
    rows_per_chunk = E._chunk_rows(ntot, max(m[3] for m in metas), d)
    if idle:
        loss_rows = torch.empty(ntot, dtype=acc, device=xs.device)
        for r0 in range(0, ntot, rows_per_chunk):
            r1 = min(ntot, r0 + rows_per_chunk)
            zeros = torch.zeros((r1 - r0, pos_col.shape[1]), dtype=acc, device=xs.device)
            lse_neg, pos_cos, chord = E.combine_with_chords(
                combine, torch.full((r1 - r0,), float("-inf"), dtype=acc, device=xs.device), zeros,
                zeros if call.exact else None)
            loss_rows[r0:r1] = E._row_terms(call.kind, lse_neg, pos_cos, valid[r0:r1], call.scale,
                                            call.m1, call.m2, call.m3, call.exact, chord)[0]
        dx, dw = torch.zeros(ntot, d, dtype=acc, device=xs.device), None
    else:
        loss_rows, _, _, dx, dw = E._chunked_forward(
            xs, w_use, cls_use, pos_col, call.kind, call.scale, call.m1, call.m2, call.m3, call.exact,
            E._row_weights(call.reduction, ntot), backend, combine=combine, valid=valid, rows=rows_per_chunk,
            grad_dtype=acc)
    return (loss_rows,) + _shard_grads(ctx, dx, dw, classes, E._saved_grad_dtype(ctx.w_dtype))


def _shard_grads(ctx, dx: Tensor, dw: Optional[Tensor], classes: Optional[Tensor], w_dtype):
    """(this rank's dX rows: every rank's partial dx (N, D) summed, times feature_grad_scale, None
    where no rank's x needs a gradient; the shard's dW in w_dtype: zeros where dw is None (no
    candidate column here), the cast rows put back in place)."""
    call = ctx.call
    if dw is None:
        dw = torch.zeros(ctx.w_shape, dtype=w_dtype, device=dx.device)
    elif ctx.cast_rows:
        dw = torch.zeros(ctx.w_shape, dtype=w_dtype, device=dx.device).index_copy_(0, classes, dw.to(w_dtype))
    else:
        dw = dw.to(w_dtype)
    dx_own = None
    if call.any_x_grad:   # decided from every rank's flags: all take part alike
        dx_own = _sum_own_rows(dx, ctx.ns, call.group)
        if call.feature_grad_scale != 1.0:
            dx_own.mul_(call.feature_grad_scale)
    return dx_own, dw


def _sum_own_rows(dx: Tensor, ns: List[int], group) -> Tensor:
    """Σ over ranks of every rank's dx (N, D), this rank's rows of it: a reduce-scatter of the
    rows laid out padded to max(ns) per rank (all_reduce where the backend has none)."""
    rank, nmax = dist.get_rank(group), max(ns)
    padded = dx.new_zeros(len(ns) * nmax, dx.shape[1])
    r0 = 0
    for k, nk in enumerate(ns):
        padded[k * nmax:k * nmax + nk] = dx[r0:r0 + nk]
        r0 += nk
    out = dx.new_empty(nmax, dx.shape[1])
    # one collective, the same on every rank (no fallback on error: a rank switching to another
    # collective while the others wait in this one would hang NCCL); reduce_scatter_tensor was
    # renamed reduce_scatter_single (torch 2.13; the old name warns), gloo and NCCL both have it
    (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(
        out, padded, op=dist.ReduceOp.SUM, group=group)
    return out[:ns[rank]]


_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_BACKEND_CODES = ("auto", "triton", "cuda", "cpu", "torch")


def _nccl_only(group) -> bool:
    """The group's collectives run on NCCL alone (not a "cpu:gloo,cuda:nccl" pair): CUDA tensors
    only."""
    return str(dist.get_backend(group)) == "nccl"


def _meta_device(group, x=None) -> torch.device:
    """Where the metadata exchange runs: on an NCCL-only group x's CUDA device (the one its
    features' collectives use, whether or not the rank called set_device), else the current CUDA
    device (so that a rank with a bad x still takes part); the CPU on other groups."""
    if _nccl_only(group) and torch.cuda.is_available():
        if isinstance(x, Tensor) and x.is_cuda:
            return x.device
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _exchange(fn, group, x, weight, ids, class_start, local_error: str, exact: bool, reduction: int,
              backend: str) -> List[List[int]]:
    """The first collective of a call: every rank's (N, l, start, C_r, D, dtype, needs grad, x
    needs grad, error, margin_grad is "exact", reduction, backend asked for). A rank whose own
    arguments were bad still takes part, and then every rank raises: no rank is left waiting in a
    later collective. The settings that decide which collectives follow must agree."""
    ok = not local_error
    meta = [x.shape[0], ids.shape[1], class_start, weight.shape[0], x.shape[1], _DTYPES.index(x.dtype),
            int(torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)),
            int(torch.is_grad_enabled() and x.requires_grad), 0, int(exact), reduction,
            _BACKEND_CODES.index(backend)] if ok else [0] * 8 + [1, 0, 0, 0]
    # x's device whenever x is a CUDA tensor, also on a rank whose other arguments were bad: a
    # rank that never called set_device would gather on cuda:0 while the others use cuda:r
    t = torch.tensor(meta, dtype=torch.int64,
                     device=_meta_device(group, x if isinstance(x, Tensor) else None))[None]
    metas = _gather_rows(t, [1] * dist.get_world_size(group), group).tolist()
    bad = [r for r, m in enumerate(metas) if m[8]]
    if bad:
        raise ValueError(local_error or f"{fn}: the arguments of rank(s) {bad} are invalid (their "
                                        "error names the problem)")
    if len({m[5] for m in metas}) != 1:
        raise ValueError(f"{fn}: x must have the same dtype on every rank, got "
                         f"{sorted({str(_DTYPES[m[5]]) for m in metas})}")
    if len({m[6] for m in metas}) != 1:
        raise ValueError(f"{fn}: the ranks disagree on whether the loss needs gradients "
                         "(requires_grad of x and weight, torch.no_grad): its backward is collective")
    if len({m[9] for m in metas}) != 1:
        # "exact" adds the chords to the statistics' all-reduce: the ranks' sizes would differ
        raise ValueError(f"{fn}: the ranks disagree on margin_grad (give every rank the same)")
    if len({m[10] for m in metas}) != 1 or len({m[11] for m in metas}) != 1:
        # reduction "none" gathers upstream gradients in the backward, and the cpu/torch backends
        # exchange statistics per row chunk where Triton does once: other collectives
        raise ValueError(f"{fn}: the ranks disagree on reduction or backend (give every rank the same)")
    if sum(m[0] for m in metas) == 0:
        raise ValueError(f"{fn}: x is empty on every rank")
    return metas


def _run(fn, kind, x, weight, ids, class_start, process_group, classes, sample_ratio, generator,
         scale, check_own, margin_grad, reduction, backend, feature_grad_scale):
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{fn}: torch.distributed is not initialized (call "
                         "torch.distributed.init_process_group first, e.g. under torchrun)")
    group = dist.group.WORLD if process_group is None else process_group
    err_type = ValueError
    m1 = m2 = m3 = 0.0
    try:
        m1, m2, m3 = check_own()   # the ids' shape and dtype, the margins
        # classes may be empty: a shard holding no positive of the batch need not add a column
        E._check_common(fn, x, weight, classes, scale, reduction, margin_grad, shard=True)
        if _nccl_only(group) and not x.is_cuda:
            raise ValueError(f"{fn}: x must be a CUDA tensor on an NCCL process group, got {x.device}")
        class_start = _checks.integer(fn, "class_start", class_start, lo=0)
        _checks.generator(fn, "generator", generator)
        if classes is not None and sample_ratio is not None:
            raise ValueError(f"{fn}: give classes or sample_ratio, not both")
        if sample_ratio is not None:
            sample_ratio = _checks.real(fn, "sample_ratio", sample_ratio)
            if not 0.0 <= sample_ratio <= 1.0:
                raise ValueError(f"{fn}: sample_ratio must be in [0, 1], got {sample_ratio!r}")
            # the sampling draws on x's device: a CUDA generator of another GPU (made before
            # set_device) would raise on this rank alone, after the others entered a collective
            _checks.draw_device(fn, generator, x.device, "x")
        feature_grad_scale = _checks.real(fn, "feature_grad_scale", feature_grad_scale, positive=True)
        error = ""
    except (ValueError, TypeError) as e:
        error, err_type = str(e), type(e)
    try:
        metas = _exchange(fn, group, x, weight, ids, class_start, error, margin_grad == "exact",
                          E._REDUCTIONS.get(reduction, 0) if isinstance(reduction, str) else 0,
                          backend if backend in _BACKEND_CODES else "auto")
    except ValueError as e:
        raise (err_type(error) if error else e) from None
    call = _Call(fn, kind, group, class_start, classes, sample_ratio, generator, float(scale),
                 float(m1), float(m2), float(m3), margin_grad == "exact", E._REDUCTIONS[reduction], backend,
                 metas, any(m[7] for m in metas), feature_grad_scale)
    return _ShardedMarginLoss.apply(x, weight, ids, call)


@torch.compiler.disable
def mlcd_loss_parallel(x: Tensor, weight: Tensor, positives: Tensor, *, class_start: int,
                       process_group=None, scale: float = 64.0, margin: float = 0.3,
                       classes: Optional[Tensor] = None, sample_ratio: Optional[float] = None,
                       generator: Optional[torch.Generator] = None,
                       margin_grad: str = "straight_through", reduction: str = "mean",
                       feature_grad_scale: float = 1.0, backend: str = "auto") -> Tensor:
    """pyssl.mlcd_loss with the class centers sharded across process_group (default: the world).

    On each rank: x (N_r, D) its rows (N_r may be 0), weight (C_r, D) the centers of classes
    [class_start, class_start + C_r) (shard_range gives PartialFC's split), positives (N_r, l_r)
    global class ids, -1 = padding. The ranks' ranges must tile [0, C). Candidate columns of this
    shard: all of them (default), classes (1-D int64, global ids inside the range, holding every
    positive of the whole batch that falls in it), or sample_ratio (the positives in the range
    plus round(ratio·(C_r − |P_r|)) others, drawn with generator). float32 centers with 16-bit
    x are cast row by row as autocast would. reduction "mean"/"sum" over the whole batch (the
    same value on every rank); "none" gives this rank's N_r rows. weight gets the gradient of its
    shard, x that of its own rows times feature_grad_scale (1: the exact gradient; the world
    size undoes DistributedDataParallel's averaging of the backbone's gradients, as PartialFC
    does).
    """
    fn = "mlcd_loss_parallel"

    def check_own():
        E._check_ids(fn, "positives", positives, x, 2)
        return 1.0, _checks.real(fn, "margin", margin), 0.0

    return _run(fn, E.MLCD, x, weight, positives, class_start, process_group, classes, sample_ratio,
                generator, scale, check_own, margin_grad, reduction, backend, feature_grad_scale)


@torch.compiler.disable
def margin_softmax_loss_parallel(x: Tensor, weight: Tensor, labels: Tensor, *, class_start: int,
                                 process_group=None, scale: float = 64.0, m1: float = 1.0,
                                 m2: float = 0.5, m3: float = 0.0, classes: Optional[Tensor] = None,
                                 sample_ratio: Optional[float] = None,
                                 generator: Optional[torch.Generator] = None,
                                 margin_grad: str = "straight_through", reduction: str = "mean",
                                 feature_grad_scale: float = 1.0, backend: str = "auto") -> Tensor:
    """pyssl.margin_softmax_loss (ArcFace/CosFace) with sharded centers: PartialFC's model
    parallelism. labels (N_r,) int64 global class ids; everything else as mlcd_loss_parallel."""
    fn = "margin_softmax_loss_parallel"

    def check_own():
        E._check_ids(fn, "labels", labels, x, 1)
        return tuple(_checks.real(fn, name, v) for name, v in (("m1", m1), ("m2", m2), ("m3", m3)))

    ids = labels[:, None] if isinstance(labels, Tensor) and labels.dim() == 1 else labels
    return _run(fn, E.SOFTMAX, x, weight, ids, class_start, process_group, classes, sample_ratio,
                generator, scale, check_own, margin_grad, reduction, backend, feature_grad_scale)
