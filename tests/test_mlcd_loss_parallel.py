"""Model-parallel MLCD loss and margin softmax (pyssl/ops/mlcd_loss_parallel.py): two processes
on the gloo backend, each holding one shard of the class centers, against one process holding
them all (pyssl.reference on the gathered batch).

Every rank builds the same full problem from a seed and takes its rows and its shard, so each
rank can compare its loss, the gradient of its own rows and that of its shard with the
reference. The ranks hold different numbers of rows and of positives per row, and the shards
differ in size (C = 37 over 2 ranks: 19 and 18 classes; over 3: 13, 12, 12, the third rank
with no rows). A failed assertion on one rank ends the
spawn (torch.multiprocessing kills the other rank), with the traceback in the test's error.
"""

import pytest
import torch
import torch.distributed as dist

import pyssl
from conftest import at_angles, device_for, spawn_gloo
from pyssl import reference
from pyssl.ops import mlcd_loss as E
from pyssl.ops.mlcd_loss_parallel import margin_softmax_loss_parallel, mlcd_loss_parallel, shard_range

C, D = 37, 16
ROWS = (5, 3, 0)       # rows per rank (2 ranks, or 3 with an empty third)
L = (3, 2, 1)          # positives per row per rank (padded with -1)
TOL = dict(atol=2e-5, rtol=1e-4)
# Triton runs here in the interpreter on CPU tensors; with a GPU it needs CUDA tensors, which
# these gloo tests do not use (the engine's Triton kernels are tested in test_mlcd_loss.py)
BACKENDS = ["torch", "cpu"] + ([] if torch.cuda.is_available() else ["triton"])


# ------------------------------------------------------------------------------------------
# the shared problem
# ------------------------------------------------------------------------------------------

def _problem(seed=0, dtype=torch.float64, hard=False):
    """Full x (N, D), w (C, D), positives (N, max l) and per-rank slices of the rows."""
    g = torch.Generator().manual_seed(seed)
    n = sum(ROWS[:_world()])
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    pos = torch.full((n, max(L)), -1, dtype=torch.int64)
    r0 = 0
    for rows, l in zip(ROWS[:_world()], L):
        for i in range(r0, r0 + rows):
            k = 1 + int(torch.randint(l, (1,), generator=g))
            pos[i, :k] = torch.randperm(C, generator=g)[:k]
        r0 += rows
    pos[0, :3] = torch.tensor([0, 1, 2])            # every positive in shard 0
    pos[1, :2] = torch.tensor([30, 36])             # every positive in shard 1
    pos[1, 2] = -1
    pos[5, :2] = torch.tensor([18, 19])             # the 2-rank shard boundary
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    if hard:   # scale 64 with features nearly parallel to a positive: one dominant class
        x[0] = w[0] + 1e-4 * x[0]
        x[6] = w[pos[6, 0]] * 3.0 + 1e-5 * x[6]
    return x.to(dtype), w.to(dtype), pos


def _world():
    return dist.get_world_size()


def _shard(rank):
    return shard_range(C, rank, _world())


def _rows_of(rank):
    r0 = sum(ROWS[:rank])
    return slice(r0, r0 + ROWS[rank])


def _own(rank, x, pos):
    s = _rows_of(rank)
    return x[s].clone(), pos[s, :L[rank]].clone()


def _check(rank, got_loss, dx, dw, x, w, pos, *, classes=None, reduction="mean", kind="mlcd",
           tol=TOL, dx_scale=1.0, **kw):
    """got_loss / dx / dw of this rank against the reference on the whole problem (float64)."""
    xr = x.detach().double().requires_grad_()
    wr = w.detach().double().requires_grad_()
    if kind == "mlcd":
        ref = reference.mlcd_loss(xr, wr, pos, classes=classes, reduction=reduction, **kw)
    else:
        ref = reference.margin_softmax_loss(xr, wr, pos[:, 0], classes=classes, reduction=reduction, **kw)
    rows = _rows_of(rank)
    start, count = _shard(rank)
    up = torch.linspace(0.5, 1.5, ref.numel(), dtype=torch.float64).view(ref.shape)
    ref_dx, ref_dw = torch.autograd.grad(ref, (xr, wr), up)
    if reduction == "none":
        ref = ref[rows]
    torch.testing.assert_close(got_loss.double(), ref, **tol)
    if dx_scale is None:          # x did not ask for a gradient
        assert dx is None
    else:
        torch.testing.assert_close(dx.double(), dx_scale * ref_dx[rows], **tol)
    torch.testing.assert_close(dw.double(), ref_dw[start:start + count], **tol)


def _run_op(rank, x, w, pos, *, kind="mlcd", reduction="mean", dtype=torch.float32, wdtype=None,
            x_grad=True, **kw):
    """This rank's loss and gradients through the parallel op (upstream gradient as _check's)."""
    start, count = _shard(rank)
    xo, po = _own(rank, x, pos)
    xo = xo.to(dtype).requires_grad_(x_grad)
    wo = w[start:start + count].to(wdtype or dtype).clone().requires_grad_()
    if kind == "mlcd":
        loss = mlcd_loss_parallel(xo, wo, po, class_start=start, reduction=reduction, **kw)
    else:
        loss = margin_softmax_loss_parallel(xo, wo, po[:, 0], class_start=start, reduction=reduction, **kw)
    n = sum(ROWS[:_world()])
    if reduction == "none":
        up = torch.linspace(0.5, 1.5, n, dtype=torch.float64)[_rows_of(rank)]
    else:
        up = torch.tensor(0.5, dtype=torch.float64)
    loss.backward(up.to(loss.dtype))
    return loss.detach(), xo.grad, wo.grad


# ------------------------------------------------------------------------------------------
# cases (each runs on every rank)
# ------------------------------------------------------------------------------------------

def case_backends(rank):
    """Every backend, reduction and margin gradient, all classes, MLCD and margin softmax."""
    x, w, pos = _problem(0)
    for backend in BACKENDS:
        for reduction in ("mean", "sum", "none"):
            for margin_grad in ("straight_through", "exact"):
                if backend == "triton" and (reduction, margin_grad) not in (("mean", "exact"), ("none", "straight_through")):
                    continue   # the interpreter is slow: two of the six combinations
                got = _run_op(rank, x, w, pos, reduction=reduction, margin_grad=margin_grad, backend=backend)
                _check(rank, *got, x, w, pos, reduction=reduction, margin_grad=margin_grad)
        got = _run_op(rank, x, w, pos, kind="softmax", m2=0.3, m3=0.1, backend=backend)
        _check(rank, *got, x, w, pos, kind="softmax", m2=0.3, m3=0.1)


def _local_classes(rank, pos, extra):
    """This rank's candidate ids: its positives plus `extra` other classes of its range."""
    start, count = _shard(rank)
    mine = pos[(pos >= start) & (pos < start + count)].unique()
    others = [c for c in range(start, start + count) if c not in set(mine.tolist())][:extra]
    return torch.cat([mine, torch.tensor(others, dtype=torch.int64)]).unique()


def case_classes(rank):
    """Explicit candidate sets per rank (unsorted) equal one process with their union."""
    x, w, pos = _problem(1)
    union = torch.cat([_local_classes(r, pos, 3) for r in range(_world())])
    mine = _local_classes(rank, pos, 3)
    mine = mine[torch.randperm(mine.numel(), generator=torch.Generator().manual_seed(rank))]
    for backend in ("torch", "cpu"):
        got = _run_op(rank, x, w, pos, classes=mine, backend=backend)
        _check(rank, *got, x, w, pos, classes=union)
        got = _run_op(rank, x, w, pos, kind="softmax", classes=mine, backend=backend)
        _check(rank, *got, x, w, pos, kind="softmax", classes=union)
    # a shard whose candidate set is empty (no positive there, nothing else asked for)
    pos0 = torch.full_like(pos, -1)
    pos0[:, 0] = pos[:, 0] % 19                     # every positive in shard 0
    got = _run_op(rank, x, w, pos0, classes=_local_classes(rank, pos0, 0) if rank == 0
                  else torch.empty(0, dtype=torch.int64), backend="torch")
    _check(rank, *got, x, w, pos0, classes=_local_classes(0, pos0, 0))


def case_hard_numerics(rank):
    """Scale 64, features nearly parallel to a positive (one dominant class), exact margin."""
    x, w, pos = _problem(2, hard=True)
    for backend in ("torch", "cpu"):
        got = _run_op(rank, x, w, pos, scale=64.0, margin_grad="exact", backend=backend)
        _check(rank, *got, x, w, pos, scale=64.0, margin_grad="exact", tol=dict(atol=1e-4, rtol=1e-4))


def case_exact_margin_near_a_center(rank):
    """margin_grad="exact" with features 1e-4 to 1e-2 rad from a positive center at scale 4 (the
    positive's weight large): each positive's θ comes from the chord ‖x̂ − ŵ‖ of the shard that
    holds its center, carried to every rank with the cosines."""
    x, w, pos = _problem(3)
    g = torch.Generator().manual_seed(7)
    thetas = torch.tensor([1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 0.5, 1e-4, 2e-4], dtype=torch.float64)[:x.shape[0]]
    x = at_angles(w, pos, thetas, g).float()
    w = w.float()
    kw = dict(scale=4.0, margin_grad="exact")
    for backend in BACKENDS:
        for reduction in ("mean", "none"):
            got = _run_op(rank, x, w, pos, reduction=reduction, backend=backend, **kw)
            _check(rank, *got, x, w, pos, reduction=reduction, tol=dict(atol=2e-3, rtol=2e-2), **kw)
            got = _run_op(rank, x, w, pos, kind="softmax", reduction=reduction, backend=backend, m2=0.3, **kw)
            _check(rank, *got, x, w, pos, kind="softmax", reduction=reduction, tol=dict(atol=2e-3, rtol=2e-2),
                   m2=0.3, **kw)


def case_float32_centers_under_a_loss_scale(rank):
    """float16 features with float32 centers and a loss scaler's 2^16 upstream factor, centers of
    small norm (large dW): every backend's shard gradient is float32 and finite, and matches the
    reference times the factor (Triton's 16-bit dW tile is scaled into range first)."""
    start, count = _shard(rank)
    x, w, pos = _problem(5)
    w = 0.01 * w
    xo, po = _own(rank, x, pos)
    for backend in BACKENDS:
        xh = xo.half().requires_grad_()
        wo = w[start:start + count].float().clone().requires_grad_()
        loss = mlcd_loss_parallel(xh, wo, po, class_start=start, scale=16.0, reduction="sum", backend=backend)
        (loss * 65536.0).backward()
        assert wo.grad.dtype == torch.float32 and torch.isfinite(wo.grad).all(), backend
        wr = w.half().double().requires_grad_()
        ref = reference.mlcd_loss(x.half().double(), wr, pos, scale=16.0, reduction="sum") * 65536.0
        ref.backward()
        want = wr.grad[start:start + count]
        assert want.abs().max() > 65504, "the case must overflow float16"
        torch.testing.assert_close(wo.grad.double(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def case_module(rank):
    """MLCDLoss / MarginSoftmaxLoss with a process group: the shard, sampling per shard in
    training (the union of the ranks' sets), all classes in eval, float32 centers with bfloat16
    features."""
    start, count = _shard(rank)
    x, w, pos = _problem(3)
    crit = pyssl.nn.MLCDLoss(C, D, sample_ratio=0.3, process_group=dist.group.WORLD,
                             generator=torch.Generator().manual_seed(100 + rank), backend="cpu")
    assert crit.weight.shape == (count, D) and crit.class_start == start
    assert f"shard=[{start}, {start + count})" in repr(crit)
    with torch.no_grad():
        crit.weight.copy_(w[start:start + count])
    xo, po = _own(rank, x, pos)
    xo = xo.float().requires_grad_()

    # eval: all classes
    crit.eval()
    loss = crit(xo, po)
    loss.backward(torch.full_like(loss, 0.5))    # _check's upstream gradient
    _check(rank, loss, xo.grad, crit.weight.grad, x, w, pos, tol=dict(atol=1e-4, rtol=1e-4))

    # train: rank r draws from its own generator; rebuild every rank's set from the seeds
    crit.train()
    xo.grad = crit.weight.grad = None
    loss = crit(xo, po)
    loss.backward(torch.full_like(loss, 0.5))    # _check's upstream gradient
    union = []
    for r in range(_world()):
        s, c = _shard(r)
        inside = (pos >= s) & (pos < s + c)
        local = torch.where(inside, pos - s, torch.full_like(pos, -1))
        drawn = E._sample(local, c, 0.3, torch.Generator().manual_seed(100 + r)) + s
        k = local[local >= 0].unique().numel()
        assert drawn.numel() == k + round(0.3 * (c - k))
        union.append(drawn)
    _check(rank, loss, xo.grad, crit.weight.grad, x, w, pos, classes=torch.cat(union),
           tol=dict(atol=1e-4, rtol=1e-4))

    # bfloat16 features, float32 centers: cast row by row, gradient back in float32
    crit.eval()
    xb = xo.detach().bfloat16().requires_grad_()
    crit.weight.grad = None
    loss = crit(xb, po)
    loss.backward(torch.full_like(loss, 0.5))    # _check's upstream gradient
    assert loss.dtype == torch.float32 and xb.grad.dtype == torch.bfloat16
    assert crit.weight.grad.dtype == torch.float32
    _check(rank, loss, xb.grad, crit.weight.grad, _gathered(xb.detach()).double(), w.bfloat16(), pos,
           tol=dict(atol=2e-3, rtol=1e-2))

    # checkpoints: the full centers load into a shard (each rank its rows), full_weight gathers
    # them back, and a shard's own state dict round-trips
    other = pyssl.nn.MLCDLoss(C, D, process_group=dist.group.WORLD)
    other.load_state_dict({"weight": w.float()})
    assert torch.equal(other.weight.detach(), w[start:start + count].float())
    assert torch.equal(other.full_weight(), w.float())
    other.load_state_dict(crit.state_dict())
    assert torch.equal(other.weight, crit.weight)
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_state_dict({"weight": torch.zeros(C + 1, D)})
    # a shard's state dict records its class range: rank 0's shard refuses to load on rank 1
    # (the shards here have different sizes, but equal ones would load silently without it)
    states = [None] * _world()
    dist.all_gather_object(states, crit.state_dict())
    other.load_state_dict(states[rank])
    if rank == 1:
        with pytest.raises(RuntimeError, match=r"holds classes \[0, 19\) of 37"):
            other.load_state_dict(states[0])
    # a single-process checkpoint (all classes) still loads, each rank taking its rows
    single = pyssl.nn.MLCDLoss(C, D)
    single.load_state_dict({"weight": w.float()})
    other.load_state_dict(single.state_dict())
    assert torch.equal(other.weight.detach(), w[start:start + count].float())
    # all C rows load whatever class range the state dict's metadata names (a shard's state dict
    # whose weight was replaced by full_weight()), on every rank and into one process
    sd = crit.state_dict()
    sd["weight"] = w.float()
    other.load_state_dict(sd)
    assert torch.equal(other.weight.detach(), w[start:start + count].float())
    single.load_state_dict(sd)
    assert torch.equal(single.weight.detach(), w.float())

    head = pyssl.nn.MarginSoftmaxLoss(C, D, m2=0.4, process_group=dist.group.WORLD, backend="torch")
    with torch.no_grad():
        head.weight.copy_(w[start:start + count])
    xo = _own(rank, x, pos)[0].float().requires_grad_()
    loss = head(xo, po[:, 0])
    loss.backward(torch.full_like(loss, 0.5))    # _check's upstream gradient
    _check(rank, loss, xo.grad, head.weight.grad, x, w, pos, kind="softmax", m2=0.4)


def case_three_ranks(rank):
    """Three ranks, the third with no rows: every reduction, both kinds."""
    x, w, pos = _problem(5)
    for backend in ("torch", "cpu"):
        for reduction in ("mean", "none"):
            got = _run_op(rank, x, w, pos, reduction=reduction, backend=backend)
            _check(rank, *got, x, w, pos, reduction=reduction)
        got = _run_op(rank, x, w, pos, kind="softmax", reduction="none", backend=backend)
        _check(rank, *got, x, w, pos, kind="softmax", reduction="none")
    union = torch.cat([_local_classes(r, pos, 2) for r in range(_world())])
    got = _run_op(rank, x, w, pos, classes=_local_classes(rank, pos, 2), backend="cpu")
    _check(rank, *got, x, w, pos, classes=union)


def _gathered(t):
    """Every rank's rows of t concatenated (the ranks' row counts are ROWS)."""
    parts = [t.new_empty((max(ROWS),) + tuple(t.shape[1:])) for _ in range(_world())]
    dist.all_gather(parts, torch.cat([t, t.new_zeros((max(ROWS) - t.shape[0],) + tuple(t.shape[1:]))]))
    return torch.cat([p[:ROWS[r]] for r, p in enumerate(parts)])


def case_low_precision(rank):
    """float16 features and centers; bfloat16 features with float32 centers, the candidate rows
    cast one by one (explicit classes and sampling). Reference: float64 on the rounded inputs.
    Tolerance: the gradients of x come back in 16 bits (2^-9 to 2^-11 relative per element)."""
    tol = dict(atol=2e-3, rtol=1e-2)
    x, w, pos = _problem(6)
    start, count = _shard(rank)
    for backend in BACKENDS:
        got = _run_op(rank, x, w, pos, dtype=torch.float16, backend=backend)
        assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.float16
        _check(rank, *got, x.half(), w.half(), pos, tol=tol)
    xb = x.bfloat16()
    union = torch.cat([_local_classes(r, pos, 3) for r in range(_world())])
    for backend in BACKENDS:
        got = _run_op(rank, x, w, pos, dtype=torch.bfloat16, wdtype=torch.float32,
                      classes=_local_classes(rank, pos, 3), backend=backend)
        assert got[0].dtype == got[2].dtype == torch.float32 and got[1].dtype == torch.bfloat16
        _check(rank, *got, xb, w.bfloat16(), pos, classes=union, tol=tol)
        # rows outside the candidate set get exactly zero
        outside = torch.ones(count, dtype=torch.bool)
        outside[_local_classes(rank, pos, 3) - start] = False
        assert bool((got[2][outside] == 0).all())
    # the module in training: float32 centers, bfloat16 features, sampling per shard
    crit = pyssl.nn.MLCDLoss(C, D, sample_ratio=0.5, process_group=dist.group.WORLD, backend="cpu",
                             generator=torch.Generator().manual_seed(200 + rank))
    with torch.no_grad():
        crit.weight.copy_(w[start:start + count])
    xo = _own(rank, x, pos)[0].bfloat16().requires_grad_()
    loss = crit(xo, _own(rank, x, pos)[1])
    loss.backward(torch.full_like(loss, 0.5))
    union = []
    for r in range(_world()):
        s0, c0 = _shard(r)
        local = torch.where((pos >= s0) & (pos < s0 + c0), pos - s0, torch.full_like(pos, -1))
        union.append(E._sample(local, c0, 0.5, torch.Generator().manual_seed(200 + r)) + s0)
    _check(rank, loss, xo.grad, crit.weight.grad, _gathered(xo.detach()).double(), w.bfloat16(), pos,
           classes=torch.cat(union), tol=tol)


def case_grad_flags(rank):
    """Centers-only gradients (x without requires_grad on every rank), feature_grad_scale, and
    ranks that disagree on needing gradients (raised on every rank, not a hang in backward)."""
    x, w, pos = _problem(7)
    got = _run_op(rank, x, w, pos, x_grad=False, backend="cpu")
    _check(rank, *got, x, w, pos, dx_scale=None)
    got = _run_op(rank, x, w, pos, feature_grad_scale=float(_world()), backend="torch")
    _check(rank, *got, x, w, pos, dx_scale=float(_world()))
    start, count = _shard(rank)
    xo, po = _own(rank, x, pos)
    wo = w[start:start + count].float()
    with pytest.raises(ValueError, match="disagree on whether the loss needs gradients"):
        mlcd_loss_parallel(xo.float().requires_grad_(rank == 0), wo, po, class_start=start)
    with torch.no_grad():   # no rank needs gradients: fine
        loss = mlcd_loss_parallel(xo.float().requires_grad_(), wo, po, class_start=start)
    assert not loss.requires_grad


def case_errors(rank):
    """Bad input seen after a collective raises the same ValueError on every rank (none hangs)."""
    start, count = _shard(rank)
    x, w, pos = _problem(4)
    xo, po = _own(rank, x, pos)
    xo, wo = xo.float(), w[start:start + count].float()
    with pytest.raises(ValueError, match="must tile"):
        mlcd_loss_parallel(xo, wo, po, class_start=start + (1 if rank == 1 else 0))
    bad = po.clone()
    if rank == 0:
        bad[0, 0] = C
    with pytest.raises(ValueError, match="out of range"):
        mlcd_loss_parallel(xo, wo, bad, class_start=start)
    empty = po.clone()
    if rank == 1:
        empty[0] = -1
    with pytest.raises(ValueError, match="has no positive"):
        mlcd_loss_parallel(xo, wo, empty, class_start=start)
    # rank 0's candidate set misses one of its positives; rank 1's is fine
    classes = _local_classes(rank, pos, 2)
    if rank == 0:
        classes = classes[1:]
    with pytest.raises(ValueError, match="classes of some rank do not contain|another rank"):
        mlcd_loss_parallel(xo, wo, po, class_start=start, classes=classes)
    with pytest.raises(ValueError, match="outside this rank's class range|another rank"):
        mlcd_loss_parallel(xo, wo, po, class_start=start,
                           classes=torch.tensor([C + 5]) if rank == 1 else _local_classes(rank, pos, 0))
    # the same with gradients (the cpu/torch path that forms them chunk by chunk in the forward)
    for backend in ("cpu", "torch"):
        with pytest.raises(ValueError, match="classes of some rank do not contain|another rank"):
            mlcd_loss_parallel(xo.clone().requires_grad_(), wo, po, class_start=start, classes=classes,
                               backend=backend)
    # float32 centers with bfloat16 features: the rows are cast only once classes are known good
    with pytest.raises(ValueError, match="outside this rank's class range|another rank"):
        mlcd_loss_parallel(xo.bfloat16(), wo, po, class_start=start,
                           classes=torch.tensor([C + 5]) if rank == 1 else _local_classes(rank, pos, 0))
    # a rank's own argument errors: that rank names them, every other rank raises too
    with pytest.raises(ValueError, match="positives must be int64|arguments of rank"):
        mlcd_loss_parallel(xo, wo, po.int() if rank == 1 else po, class_start=start)
    with pytest.raises(TypeError if rank == 0 else ValueError, match="margin must be a real number|arguments of rank"):
        mlcd_loss_parallel(xo, wo, po, class_start=start, margin="0.3" if rank == 0 else 0.3)
    with pytest.raises(ValueError, match="same dtype on every rank"):
        mlcd_loss_parallel(xo.double() if rank == 0 else xo, wo.double() if rank == 0 else wo, po,
                           class_start=start, backend="torch")
    # the ranks must agree on margin_grad ("exact" widens the statistics' all-reduce), reduction
    # and backend (they decide which collectives follow)
    with pytest.raises(ValueError, match="disagree on margin_grad"):
        mlcd_loss_parallel(xo, wo, po, class_start=start, margin_grad="exact" if rank == 0 else "straight_through")
    with pytest.raises(ValueError, match="disagree on reduction or backend"):
        mlcd_loss_parallel(xo, wo, po, class_start=start, reduction="none" if rank == 0 else "mean")
    with pytest.raises(ValueError, match="disagree on reduction or backend"):
        mlcd_loss_parallel(xo, wo, po, class_start=start, backend="cpu" if rank == 0 else "torch")
    # settings errors
    with pytest.raises(ValueError, match="classes or sample_ratio, not both"):
        mlcd_loss_parallel(xo, wo, po, class_start=start, classes=classes, sample_ratio=0.1)
    with pytest.raises(ValueError, match="sample_ratio must be in"):
        mlcd_loss_parallel(xo, wo, po, class_start=start, sample_ratio=1.5)
    with pytest.raises(ValueError, match="weight dtype"):
        mlcd_loss_parallel(xo, wo.double(), po, class_start=start)
    with pytest.raises(ValueError, match="num_classes .* must be at least"):
        pyssl.nn.MLCDLoss(1, D, process_group=dist.group.WORLD)
    # a module's bad labels on one rank: every rank raises (the sharded op checks them together)
    head = pyssl.nn.MarginSoftmaxLoss(C, D, process_group=dist.group.WORLD, backend="torch")
    with pytest.raises(ValueError, match="labels must be int64|arguments of rank"):
        head(xo, po[:, 0].int() if rank == 1 else po[:, 0])

    # the group is still usable afterwards
    loss = mlcd_loss_parallel(xo, wo, po, class_start=start)
    assert torch.isfinite(loss)


def case_bench_script(rank):
    """bench/mlcd_parallel.py (the torchrun scaling script) at a tiny size: it runs, every rank
    holds its shard, and the result names the global batch."""
    from bench import mlcd_parallel
    args = mlcd_parallel.parse(["--classes", "101", "--dim", "16", "--batch", "6", "--positives", "3",
                                "--ratio", "0.5", "--dtype", "float32", "--steps", "2", "--warmup", "1"])
    res = mlcd_parallel.run(args)
    assert res["world"] == _world() and res["global_batch"] == 6 * _world()
    assert res["classes_per_rank"] == shard_range(101, rank, _world())[1]
    assert res["time_ms"] > 0 and len(res["peak_mem_mb_per_rank"]) == _world()


# ------------------------------------------------------------------------------------------
# the spawn
# ------------------------------------------------------------------------------------------

def _spawn(case, world):
    spawn_gloo(globals()[case], world)


@pytest.mark.parametrize("case", ["case_backends", "case_classes", "case_hard_numerics",
                                  "case_exact_margin_near_a_center", "case_float32_centers_under_a_loss_scale",
                                  "case_module", "case_low_precision",
                                  "case_grad_flags", "case_errors", "case_bench_script"])
def test_parallel(case):
    _spawn(case, 2)


@pytest.mark.parametrize("case", ["case_three_ranks", "case_exact_margin_near_a_center"])
def test_parallel_three_ranks(case):
    _spawn(case, 3)


def test_shard_range_tiles_the_classes():
    for c, p in ((37, 2), (10, 3), (1_000_000, 8), (5, 5)):
        ranges = [shard_range(c, r, p) for r in range(p)]
        assert ranges[0][0] == 0 and sum(n for _, n in ranges) == c
        assert all(ranges[i][0] + ranges[i][1] == ranges[i + 1][0] for i in range(p - 1))
        assert max(n for _, n in ranges) - min(n for _, n in ranges) <= 1
    with pytest.raises(ValueError, match="num_classes must be >= 3"):
        shard_range(2, 0, 3)
    with pytest.raises(ValueError, match="rank must be in"):
        shard_range(10, 3, 3)


def test_parallel_needs_an_initialized_group():
    x, w = torch.randn(4, 8), torch.randn(10, 8)
    pos = torch.zeros(4, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        mlcd_loss_parallel(x, w, pos, class_start=0)
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        pyssl.nn.MLCDLoss(10, 8, process_group=object())


def test_full_weight_without_a_group_is_the_weight():
    crit = pyssl.nn.MarginSoftmaxLoss(10, 4)
    assert crit.full_weight().data_ptr() == crit.weight.data_ptr() and not crit.full_weight().requires_grad
    with pytest.raises(ValueError, match="feature_grad_scale applies to the model-parallel form only"):
        pyssl.nn.MLCDLoss(10, 4, feature_grad_scale=2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("classes", [False, True])
def test_shard_engine_rows_without_local_positives(classes):
    """What a shard feeds the engine and the single-process op never does: rows whose positives
    all live on other shards (pos_col all -1), beside rows with 1..8 local positives. Triton
    against the torch engine on the same device, at a shard's size on a GPU (4096 rows, 12,500
    centers of 512, bf16: several forward splits and G'' chunks) and a small one elsewhere."""
    from pyssl.ops import mlcd_loss as E
    dev = device_for("triton")
    n, c, d, dt = (4096, 12_500, 512, torch.bfloat16) if dev == "cuda" else (40, 300, 32, torch.float32)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(n, d, generator=g).to(dev, dt)
    w = torch.randn(c, d, generator=g).to(dev, dt)
    cls = torch.randperm(c, generator=g)[: c // 2].sort().values.to(dev) if classes else None
    cp = c // 2 if classes else c
    pos = torch.stack([torch.randperm(cp, generator=g)[:8] for _ in range(n)])
    keep = torch.randint(0, 9, (n, 1), generator=g)                  # 0..8 local positives per row
    pos = torch.where(torch.arange(8)[None] < keep, pos, torch.full_like(pos, -1)).to(dev)
    assert (keep == 0).any() and (keep == 8).any()
    lse_t, pcos_t = E.engine_lse(x, w, cls, pos, 16.0, "torch")
    lse_k, pcos_k = E.engine_lse(x, w, cls, pos, 16.0, "triton")
    torch.testing.assert_close(lse_k.float(), lse_t.float(), rtol=1e-4, atol=1e-4)
    valid = pos >= 0
    torch.testing.assert_close(pcos_k.float()[valid], pcos_t.float()[valid], rtol=1e-4, atol=1e-4)
    lse_total = lse_t.float() + 1.0
    gneg = torch.rand(n, generator=g).to(dev) / n
    gpos = torch.where(valid.cpu(), torch.randn(pos.shape, generator=g) / n, torch.zeros(())).to(dev)
    dx_t, dw_t = E.engine_grad(x, w, cls, pos, 16.0, lse_total, gneg, gpos, "torch")
    dx_k, dw_k = E.engine_grad(x, w, cls, pos, 16.0, lse_total, gneg, gpos, "triton")
    tol = 2e-2 if dt == torch.bfloat16 else 1e-4
    for got, want in ((dx_k, dx_t), (dw_k, dw_t)):
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.abs().max().item())

