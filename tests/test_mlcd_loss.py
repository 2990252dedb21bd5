"""MLCD loss and margin softmax: every backend against pyssl.reference, gradients, bad input."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pyssl
from pyssl import reference as R
from pyssl.ops import mlcd_loss as M
from conftest import BACKENDS, GPU, Launches, at_angles, device_for, gpu_only


@pytest.fixture(params=BACKENDS + ["triton-fused"])
def backend(request, monkeypatch):
    """Every backend; "triton-fused" is the Triton backend with the fused dx / dw backward
    kernels instead of the class-chunked default (PYSSL_MLCD_TRITON_BWD, read per call)."""
    if request.param == "triton-fused":
        monkeypatch.setenv("PYSSL_MLCD_TRITON_BWD", "GCHUNK=0")
        return "triton"
    return request.param

# fp32 tolerances: the backends reorder fp32 sums (GEMM blocking, online log-sum-exp), and the
# scale s multiplies cosine errors, so losses agree to ~1e-5 relative and gradients to ~1e-4.
F32 = dict(rtol=2e-4, atol=2e-5)


def make_problem(n=23, c=97, d=16, l=4, device="cpu", dtype=torch.float32, seed=0, pad=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    pos = torch.stack([torch.randperm(c, generator=g)[:l] for _ in range(n)])
    if pad:  # rows with 1..l positives, padding anywhere in the row
        for i in range(n):
            k = i % l
            if k:
                drop = torch.randperm(l, generator=g)[:k]
                pos[i, drop] = -1
    return x.to(device, dtype), w.to(device, dtype), pos.to(device)


def grads(fn, x, w):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    out = fn(x, w)
    g = torch.randn_like(out) if out.dim() else torch.ones_like(out)
    out.backward(g)
    return out.detach(), x.grad, w.grad, g


def check_against_reference(loss_fn, ref_fn, x, w, tol):
    out, dx, dw, g = grads(loss_fn, x, w)
    torch.manual_seed(0)
    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    ref = ref_fn(x64, w64)
    ref.backward(g.double())
    torch.testing.assert_close(out.double(), ref.detach(), **tol)
    torch.testing.assert_close(dx.double(), x64.grad, **tol)
    torch.testing.assert_close(dw.double(), w64.grad, **tol)
    return dw


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("margin_grad", ["straight_through", "exact"])
@pytest.mark.parametrize("sampled", [False, True])
def test_mlcd_matches_reference(backend, reduction, margin_grad, sampled):
    dev = device_for(backend)
    x, w, pos = make_problem(device=dev)
    classes = pyssl.sample_classes(pos, w.shape[0], 0.2, generator=torch.Generator(dev).manual_seed(1)) if sampled else None
    kw = dict(scale=16.0, margin=0.3, classes=classes, margin_grad=margin_grad, reduction=reduction)
    dw = check_against_reference(lambda a, b: pyssl.mlcd_loss(a, b, pos, backend=backend, **kw),
                                 lambda a, b: R.mlcd_loss(a, b, pos, **kw), x, w, F32)
    if sampled:  # rows of W outside S get exactly zero gradient
        outside = torch.ones(w.shape[0], dtype=torch.bool, device=dev)
        outside[classes] = False
        assert outside.any() and (dw[outside] == 0).all()


@pytest.mark.parametrize("margins", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.35), (1.0, 0.3, 0.2), (1.35, 0.0, 0.0)],
                         ids=["arcface", "cosface", "combined", "sphereface"])
@pytest.mark.parametrize("sampled", [False, True])
def test_margin_softmax_matches_reference(backend, margins, sampled):
    dev = device_for(backend)
    x, w, pos = make_problem(device=dev, pad=False, seed=3)
    labels = pos[:, 0].contiguous()
    classes = pyssl.sample_classes(pos, w.shape[0], 0.1) if sampled else None
    m1, m2, m3 = margins
    for mg, red in (("straight_through", "mean"), ("exact", "none")):
        kw = dict(scale=32.0, m1=m1, m2=m2, m3=m3, classes=classes, margin_grad=mg, reduction=red)
        check_against_reference(lambda a, b: pyssl.margin_softmax_loss(a, b, labels, backend=backend, **kw),
                                lambda a, b: R.margin_softmax_loss(a, b, labels, **kw), x, w, F32)


def test_margin_softmax_is_cross_entropy_without_margin(backend):
    dev = device_for(backend)
    x, w, pos = make_problem(device=dev, pad=False, seed=5)
    labels = pos[:, 0].contiguous()
    out = pyssl.margin_softmax_loss(x, w, labels, scale=10.0, m1=1.0, m2=0.0, m3=0.0, backend=backend)
    logits = 10.0 * torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(w, dim=1).t()
    torch.testing.assert_close(out, torch.nn.functional.cross_entropy(logits, labels), **F32)


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_float64_gradcheck_torch_backend(reduction):
    """Finite differences in float64 (the torch backend serves float64). Only the exact margin
    gradient is the derivative of the loss's value; straight-through is checked against the
    reference in test_mlcd_matches_reference."""
    x, w, pos = make_problem(n=6, c=11, d=5, l=3, dtype=torch.float64)
    x.requires_grad_(True)
    w.requires_grad_(True)
    classes = torch.tensor(sorted(set(pos[pos >= 0].tolist()) | {0, 1}))
    labels = pos.max(1).values.contiguous()
    assert torch.autograd.gradcheck(
        lambda a, b: pyssl.mlcd_loss(a, b, pos, scale=4.0, classes=classes, margin_grad="exact",
                                     reduction=reduction, backend="torch"), (x, w))
    assert torch.autograd.gradcheck(
        lambda a, b: pyssl.margin_softmax_loss(a, b, labels, scale=4.0, m2=0.2, m3=0.1, margin_grad="exact",
                                               reduction=reduction, backend="torch"), (x, w))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(backend, dtype):
    """bf16/fp16 inputs, fp32 accumulation: loss within 2% and gradients within a few % of the
    fp64 reference on the same (rounded) inputs; bf16 has 8 mantissa bits, so the gradient
    outputs themselves round at ~0.4%."""
    dev = device_for(backend)
    x, w, pos = make_problem(n=16, c=64, d=32, device=dev, dtype=dtype, seed=7)
    out, dx, dw, g = grads(lambda a, b: pyssl.mlcd_loss(a, b, pos, scale=16.0, backend=backend), x, w)
    # the loss in float32 (as torch's losses under autocast), the gradients in the inputs' dtype
    assert out.dtype == torch.float32 and dx.dtype == dtype and dw.dtype == dtype
    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    ref = R.mlcd_loss(x64, w64, pos, scale=16.0)
    ref.backward()
    tol = dict(rtol=2e-2, atol=2e-2 * x64.grad.abs().max().item())
    torch.testing.assert_close(out.double(), ref.detach(), rtol=2e-2, atol=0)
    torch.testing.assert_close(dx.double(), x64.grad, **tol)
    torch.testing.assert_close(dw.double(), w64.grad, rtol=2e-2, atol=2e-2 * w64.grad.abs().max().item())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fp16_gradients_under_loss_scaling(backend, reduction):
    """A GradScaler multiplies the loss by 2^k so that small float16 gradients survive: the
    factor must reach them before they are rounded to float16. Centers of norm 3e4 make the dW
    entries ~1e-8 at unit upstream gradient, below float16's smallest subnormal (6e-8)."""
    dev = device_for(backend)
    x, w, pos = make_problem(n=64, c=300, d=16, device=dev, dtype=torch.float64, seed=3)
    w = torch.nn.functional.normalize(w, dim=1) * 3e4
    loss_scale = 2.0 ** 14
    xh, wh = x.half().requires_grad_(True), w.half().requires_grad_(True)
    (pyssl.mlcd_loss(xh, wh, pos, scale=16.0, reduction=reduction, backend=backend).float() * loss_scale).backward()
    x64, w64 = xh.detach().double().requires_grad_(True), wh.detach().double().requires_grad_(True)
    (R.mlcd_loss(x64, w64, pos, scale=16.0, reduction=reduction) * loss_scale).backward()
    assert wh.grad.dtype == torch.float16
    ref_nonzero = w64.grad.abs() > 1e-5
    assert ref_nonzero.float().mean() > 0.9
    # nothing flushed to zero that the scaled reference holds well above float16's floor
    assert not (wh.grad.double()[ref_nonzero] == 0).any()
    torch.testing.assert_close(wh.grad.double(), w64.grad, rtol=3e-2, atol=3e-2 * w64.grad.abs().max().item())
    torch.testing.assert_close(xh.grad.double(), x64.grad, rtol=3e-2, atol=3e-2 * x64.grad.abs().max().item())


@pytest.mark.parametrize("which", ["x", "w"])
def test_fp16_zero_rows(backend, which):
    """float16 with an all-zero feature row or an all-zero class center: its inverse norm is
    1e12, and the Triton products' operand G / ||.|| overflowed to inf, inf · 0 = NaN in every
    row of dW (zero x row) or dX (zero center). No NaN anywhere; every entry the float64
    reference holds within float16's range agrees (the zero row's own gradient is ~1e12: inf)."""
    dev = device_for(backend)
    x, w, pos = make_problem(n=16, c=64, d=32, dtype=torch.float64, seed=5)
    if which == "x":
        x[3] = 0
    else:
        w[20] = 0
        pos[pos == 20] = 21 if not (pos == 21).any() else -1
        pos[:, 0] = torch.where(pos[:, 0] < 0, 22, pos[:, 0])
    x, w, pos = x.to(dev, torch.float16), w.to(dev, torch.float16), pos.to(dev)
    out, dx, dw, g = grads(lambda a, b: pyssl.mlcd_loss(a, b, pos, scale=1.0, backend=backend), x, w)
    assert not dx.isnan().any() and not dw.isnan().any() and torch.isfinite(out).all()
    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    ref = R.mlcd_loss(x64, w64, pos, scale=1.0)
    ref.backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=2e-2, atol=0)
    for got, want in ((dx, x64.grad), (dw, w64.grad)):
        fin = want.abs() < 65504
        assert torch.equal(torch.isfinite(got), fin)
        torch.testing.assert_close(got.double()[fin], want[fin], rtol=2e-2, atol=2e-2 * want[fin].abs().max().item())


def _hard_case(kind, dev):
    """Scale 64 with features nearly parallel to their positives."""
    g = torch.Generator().manual_seed(11)
    n, c, d = 12, 80, 24
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    pos = torch.stack([torch.randperm(c, generator=g)[:3] for _ in range(n)])
    if kind == "near_parallel":      # x ≈ its first positive center
        x = w[pos[:, 0]] + 1e-3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    elif kind == "dominant":          # one positive dominates: cos ≈ 0.99, negatives random
        x = w[pos[:, 0]] / w[pos[:, 0]].norm(dim=1, keepdim=True) * 10 + 0.1 * torch.randn(n, d, generator=g, dtype=torch.float64)
    else:                             # all positives at cos ≈ 1: every positive center equal to x
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        pos = torch.arange(3 * n).view(n, 3)
        for i in range(n):
            w[pos[i]] = x[i] * (1 + 1e-7 * torch.randn(3, 1, generator=g, dtype=torch.float64))
    return x.to(dev, torch.float32), w.to(dev, torch.float32), pos.to(dev)


@pytest.mark.parametrize("kind", ["near_parallel", "dominant", "all_cos_one"])
@pytest.mark.parametrize("margin_grad", ["straight_through", "exact"])
def test_hard_numerics(backend, kind, margin_grad):
    x, w, pos = _hard_case(kind, device_for(backend))
    kw = dict(scale=64.0, margin=0.3, margin_grad=margin_grad, reduction="none")
    out, dx, dw, _ = grads(lambda a, b: pyssl.mlcd_loss(a, b, pos, backend=backend, **kw), x, w)
    assert torch.isfinite(out).all() and torch.isfinite(dx).all() and torch.isfinite(dw).all()
    # the reference on the float32 inputs, in float64; a cosine error of 1e-7 is 6.4e-6 in a logit
    check_against_reference(lambda a, b: pyssl.mlcd_loss(a, b, pos, backend=backend, **kw),
                            lambda a, b: R.mlcd_loss(a, b, pos, **kw), x, w,
                            dict(rtol=1e-3, atol=1e-4))


@pytest.mark.parametrize("kind", ["near_parallel", "dominant", "all_cos_one"])
@pytest.mark.parametrize("margin_grad", ["straight_through", "exact"])
def test_hard_numerics_bf16(backend, kind, margin_grad):
    """The hard cases in bfloat16, the benchmarks' dtype: the float64 reference on the rounded
    inputs. The cosines accumulate in float32 from exact products (a logit error of ~1e-5 at
    scale 64), so the loss agrees to float32 rounding; the gradients come out rounded to
    bfloat16 (and Triton's products take G rounded to bfloat16): 2% of the largest entry."""
    x, w, pos = _hard_case(kind, device_for(backend))
    x, w = x.bfloat16(), w.bfloat16()
    kw = dict(scale=64.0, margin=0.3, margin_grad=margin_grad, reduction="none")
    out, dx, dw, g = grads(lambda a, b: pyssl.mlcd_loss(a, b, pos, backend=backend, **kw), x, w)
    assert dx.dtype == dw.dtype == torch.bfloat16
    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    ref = R.mlcd_loss(x64, w64, pos, **kw)
    ref.backward(g.double())
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-4, atol=1e-3)
    for got, want in ((dx, x64.grad), (dw, w64.grad)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


@pytest.mark.parametrize("kind", ["mlcd", "softmax"])
def test_exact_margin_near_a_center(backend, kind):
    """margin_grad="exact" at features 3e-5 to 3e-2 rad from a positive center, at a small scale
    where the positive's weight p⁺ is large: κ = sin(θ+m)/sin θ needs sin θ, which the float32
    cosine (1 − θ²/2, rounding to 1 below ~3e-4 rad) cannot give; the ops take θ from the chord
    ‖x̂ − ŵ‖ there. Against the float64 reference on the float32 inputs: the chord's float32
    error is ~1e-7 absolute, so 3e-5 rad is within ~1%; the cosine's sin θ was off by up to 100x."""
    dev = device_for(backend)
    g = torch.Generator().manual_seed(21)
    n, c, d = 8, 30, 32
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    pos = torch.stack([torch.randperm(c, generator=g)[:2] for _ in range(n)])
    thetas = torch.tensor([3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1.0], dtype=torch.float64)
    x = at_angles(w, pos, thetas, g)
    x, w, pos = x.float().to(dev), w.float().to(dev), pos.to(dev)
    if kind == "mlcd":
        kw = dict(scale=4.0, margin=0.3, margin_grad="exact", reduction="none")
        op, ref_op, ids = pyssl.mlcd_loss, R.mlcd_loss, pos
    else:
        kw = dict(scale=4.0, m1=1.0, m2=0.3, margin_grad="exact", reduction="none")
        op, ref_op, ids = pyssl.margin_softmax_loss, R.margin_softmax_loss, pos[:, 0].contiguous()
    out, dx, dw, up = grads(lambda a, b: op(a, b, ids, backend=backend, **kw), x, w)
    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    ref = ref_op(x64, w64, ids, **kw)
    ref.backward(up.double())
    # the value is the float32 cosine's (SPEC): acos of a cosine that rounded to 1 is off by up
    # to ~3.5e-4 rad, s·sin(m)·3.5e-4 ~ 4e-4 in the target logit
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-3, atol=1e-3)
    # per row: the near rows' gradients are dominated by their positive's term
    for i in range(n):
        torch.testing.assert_close(dx[i].double(), x64.grad[i], rtol=2e-2, atol=2e-2 * x64.grad[i].abs().max().item())
    torch.testing.assert_close(dw.double(), w64.grad, rtol=2e-2, atol=1e-2 * w64.grad.abs().max().item())


def test_negative_sum_is_not_a_difference(backend):
    """With a positive at cos ≈ 1 and s = 64 the positive's exp(64) dwarfs the negatives'
    exp(~0) sum; masking it inside the tile keeps that sum exact (a subtraction from the full sum
    would leave rounding noise of order e^64·eps ≫ the true value)."""
    dev = device_for(backend)
    x, w, pos = _hard_case("near_parallel", dev)
    pos = pos[:, :1].contiguous()
    out = pyssl.mlcd_loss(x, w, pos, scale=64.0, reduction="none", backend=backend)
    ref = R.mlcd_loss(x.double(), w.double(), pos, scale=64.0, reduction="none")
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["mlcd", "softmax"])
def test_many_tiles_chunks_and_splits(backend, kind, monkeypatch):
    """Shapes that span several tiles on every backend: several row chunks (torch, cpu), more
    than one 1024-column block of the C++ row pass with positives in later blocks, and on Triton
    small tiles so the online log-sum-exp rescales across tiles, the column splits combine, and
    dx/dw accumulate over many tiles and D slices."""
    dev = device_for(backend)
    monkeypatch.setattr(M, "CHUNK_ELEMS", 3000)
    if backend == "triton":
        from pyssl.kernels import mlcd_loss as K
        real = K._config

        def small(*a, **k):
            cfg = dict(real(*a, **k))
            cfg.update(BLOCK_N=16, BLOCK_C=32, BLOCK_D=16, BLOCK_DO=16)
            return cfg
        monkeypatch.setattr(K, "_config", small)
        n, c, d = 40, 300, 40
    else:
        n, c, d = 50, 2600, 24
    x, w, pos = make_problem(n=n, c=c, d=d, l=3, device=dev, seed=13)
    pos[:, 0] = (torch.arange(n, device=dev) * (c // n) + c // 2) % c   # positives in late blocks too
    pos[:, 1] = torch.where(pos[:, 1] == pos[:, 0], -1, pos[:, 1])
    pos[:, 2] = torch.where((pos[:, 2] == pos[:, 0]) | (pos[:, 2] == pos[:, 1]), -1, pos[:, 2])
    if kind == "mlcd":
        kw = dict(scale=32.0, reduction="none")
        check_against_reference(lambda a, b: pyssl.mlcd_loss(a, b, pos, backend=backend, **kw),
                                lambda a, b: R.mlcd_loss(a, b, pos, **kw), x, w, F32)
    else:
        labels = pos[:, 0].contiguous()
        kw = dict(scale=32.0, m2=0.4, reduction="mean")
        check_against_reference(lambda a, b: pyssl.margin_softmax_loss(a, b, labels, backend=backend, **kw),
                                lambda a, b: R.margin_softmax_loss(a, b, labels, **kw), x, w, F32)


@pytest.mark.parametrize("classes,dtype", [(False, torch.float32), (True, torch.float32), (True, torch.bfloat16)])
def test_engine_rows_without_a_positive(backend, classes, dtype):
    """The engine on rows whose pos_col is all padding (what a rank of the model-parallel form
    sees for positives held by other shards), against dense float64 formulas: lse_neg over every
    column, pos_cos 0 there, and dx (float32) and dw with gpos = 0 on those rows."""
    dev = device_for(backend)
    x, w, pos = make_problem(n=9, c=41, d=16, l=3, device=dev, dtype=dtype)
    pos[[0, 4, 8]] = -1
    # bfloat16: the reference takes the rounded inputs; the engine accumulates in float32, and
    # its 16-bit GEMM operands (Triton rounds G to bfloat16) give ~1e-2 relative
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    cls = torch.randperm(41, generator=torch.Generator().manual_seed(1))[:30].to(dev) if classes else None
    if cls is not None:   # the positives' columns in S, those outside S dropped to padding
        col = torch.full((41,), -1, dtype=torch.int64, device=dev)
        col[cls] = torch.arange(30, device=dev)
        pos = torch.where(pos >= 0, col[pos.clamp_min(0)], pos)
    s = 30.0
    lse, pcos = M.engine_lse(x, w, cls, pos, s, backend)
    xh = torch.nn.functional.normalize(x.double(), dim=1)
    wh = torch.nn.functional.normalize(w.double(), dim=1)
    cos = (xh @ (wh if cls is None else wh[cls]).t()).clamp(-1, 1)
    is_pos = torch.zeros_like(cos).scatter_add_(1, pos.clamp_min(0), (pos >= 0).double()) > 0
    want = torch.logsumexp((s * cos).masked_fill(is_pos, float("-inf")), 1)
    torch.testing.assert_close(lse.double(), want, **tol)
    want_pc = torch.where(pos >= 0, cos.gather(1, pos.clamp_min(0)), torch.zeros((), dtype=cos.dtype, device=dev))
    torch.testing.assert_close(pcos.double(), want_pc, **tol)

    g = torch.Generator().manual_seed(2)
    lse_total = (want + 0.5).float()
    gneg = torch.rand(9, generator=g).to(dev)
    gpos = torch.where(pos >= 0, torch.randn(pos.shape, generator=g).to(dev), torch.zeros((), device=dev))
    dx, dw = M.engine_grad(x, w, cls, pos, s, lse_total, gneg, gpos, backend)
    assert dx.dtype == torch.float32     # unrounded: the model-parallel form sums partial dx
    G = (gneg.double() * s)[:, None] * torch.exp(s * cos - lse_total.double()[:, None])
    G = torch.where(is_pos, torch.zeros_like(G), G)
    G.scatter_add_(1, pos.clamp_min(0), torch.where(pos >= 0, gpos.double(), torch.zeros_like(gpos.double())))
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    cr = torch.nn.functional.normalize(xr, dim=1) @ torch.nn.functional.normalize(wr, dim=1)[
        cls if cls is not None else slice(None)].t()
    want_dx, want_dw = torch.autograd.grad(cr, (xr, wr), G)
    gtol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else tol
    torch.testing.assert_close(dx.double(), want_dx, **gtol)
    torch.testing.assert_close(dw.double(), want_dw, **gtol)


def _dense_engine_grad(x, w, cls, pos_col, s, lse_total, gneg, gpos):
    """dx, dw of the engine contract in float64 from the dense G (the test oracle)."""
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    xh, wh = torch.nn.functional.normalize(xr, dim=1), torch.nn.functional.normalize(wr, dim=1)
    cos = xh @ (wh if cls is None else wh[cls]).t()
    valid = pos_col >= 0
    is_pos = torch.zeros(cos.shape, dtype=torch.float64).scatter_add_(1, pos_col.clamp_min(0), valid.double()) > 0
    G = (gneg.double() * s)[:, None] * torch.exp(s * cos.detach().clamp(-1, 1) - lse_total.double()[:, None])
    G = torch.where(is_pos, torch.zeros_like(G), G)
    G.scatter_add_(1, pos_col.clamp_min(0), torch.where(valid, gpos.double(), torch.zeros_like(gpos.double())))
    return torch.autograd.grad(cos, (xr, wr), G)


@pytest.mark.parametrize("classes", [False, True])
def test_triton_backward_forms(monkeypatch, classes):
    """The class-chunked backward (default) in ragged chunks of every size down to one column,
    against the fused kernels and a dense float64 oracle: same dx, dw for float32 inputs; the
    G kernel launched once per chunk and the fused kernels not at all (and the other way round
    with GCHUNK=0); only the wanted gradient computed; float32 dx / dw out of bfloat16 inputs
    (the model-parallel form's call) without a 16-bit rounding of the result."""
    from pyssl.kernels import mlcd_loss as K
    x, w, pos = make_problem(n=21, c=90, d=24, l=3, seed=4)
    cls = torch.randperm(90, generator=torch.Generator().manual_seed(2))[:70].sort().values if classes else None
    if cls is not None:
        col = torch.full((90,), -1, dtype=torch.int64)
        col[cls] = torch.arange(70)
        pos = torch.where(pos >= 0, col[pos.clamp_min(0)], pos)
    cp = 70 if classes else 90
    g = torch.Generator().manual_seed(3)
    lse_total = torch.rand(21, generator=g) * 3 + 8
    gneg = torch.rand(21, generator=g) / 21
    gpos = torch.where(pos >= 0, torch.randn(pos.shape, generator=g) / 21, torch.zeros(()))
    s = 8.0
    want_dx, want_dw = _dense_engine_grad(x, w, cls, pos, s, lse_total, gneg, gpos)
    kernels = {name: Launches(getattr(K, name)) for name in
               ("_mlcd_grad_g_kernel", "_mlcd_g_positives_kernel", "_mlcd_grad_dx_kernel", "_mlcd_grad_dw_kernel")}
    for name, k in kernels.items():
        monkeypatch.setattr(K, name, k)

    dev = device_for("triton")
    on = lambda *ts: [None if t is None else t.to(dev) for t in ts]     # noqa: E731
    back = lambda ts: tuple(None if t is None else t.cpu() for t in ts)  # noqa: E731

    def run(spec, *need, **kw):
        monkeypatch.setenv("PYSSL_MLCD_TRITON_BWD", spec)
        for k in kernels.values():
            k.count = 0
        out = K.mlcd_grad(*on(x, w, cls, pos), s, *on(lse_total, gneg, gpos), None, *need, **kw)
        return back(out), {n: k.count for n, k in kernels.items()}

    (fdx, fdw), n = run("GCHUNK=0")
    assert n == {"_mlcd_grad_g_kernel": 0, "_mlcd_g_positives_kernel": 0, "_mlcd_grad_dx_kernel": 1,
                 "_mlcd_grad_dw_kernel": 1}
    torch.testing.assert_close(fdx.double(), want_dx, **F32)
    torch.testing.assert_close(fdw.double(), want_dw, **F32)
    for cols in (0, 1, 17, 32, cp - 1, 1000):
        (dx, dw), n = run(f"GCHUNK=1,GCHUNK_COLS={cols}")
        # the automatic width: never more than about half the columns in one chunk (no N x C'
        # buffer); a requested one as asked (at most C')
        chunks = -(-cp // (K._gchunk_cols(21, cp, 90, 24, 4, 64) if cols == 0 else min(cols, cp)))
        assert chunks >= 2 or cols >= cp
        assert n == {"_mlcd_grad_g_kernel": chunks, "_mlcd_g_positives_kernel": chunks,
                     "_mlcd_grad_dx_kernel": 0, "_mlcd_grad_dw_kernel": 0}
        torch.testing.assert_close(dx, fdx, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dw, fdw, rtol=1e-5, atol=1e-6)
        if classes:   # rows outside S exactly zero
            outside = torch.ones(90, dtype=torch.bool)
            outside[cls] = False
            assert (dw[outside] == 0).all()
    for need in ((True, False), (False, True)):
        (dx, dw), n = run("GCHUNK_COLS=32", *need)
        assert (dx is None) != need[0] and (dw is None) != need[1] and n["_mlcd_grad_g_kernel"] == -(-cp // 32)
        if need[0]:
            torch.testing.assert_close(dx, fdx, rtol=1e-5, atol=1e-6)
        else:
            torch.testing.assert_close(dw, fdw, rtol=1e-5, atol=1e-6)
    xb, wb = x.bfloat16(), w.bfloat16()
    monkeypatch.setenv("PYSSL_MLCD_TRITON_BWD", "GCHUNK_COLS=32")
    dx, dw = back(K.mlcd_grad(*on(xb, wb, cls, pos), s, *on(lse_total, gneg, gpos), torch.float32,
                              dw_dtype=torch.float32))
    assert dx.dtype == dw.dtype == torch.float32
    bdx, bdw = _dense_engine_grad(xb, wb, cls, pos, s, lse_total, gneg, gpos)
    # float32 results: not on bfloat16's grid (the 16-bit G and X̂ operands give ~1e-2)
    assert (dx != dx.bfloat16().float()).float().mean() > 0.5
    torch.testing.assert_close(dx.double(), bdx, rtol=3e-2, atol=2e-2 * bdx.abs().max().item())
    torch.testing.assert_close(dw.double(), bdw, rtol=3e-2, atol=2e-2 * bdw.abs().max().item())


def test_triton_gchunk_columns():
    """The automatic chunk width: the chunk's buffers (G'' N·elem, W̃ D·elem and the float32
    product 4·D bytes per column) take an eighth of the class table's bytes within
    [32 MiB, 256 MiB], whole 256-column tiles, about half the columns of S at most, never more column
    tiles than a grid axis takes (65,535), at every N (a few rows against millions of classes
    once made the per-column buffers dominate: gigabytes)."""
    from pyssl.kernels import mlcd_loss as K

    def chunk_bytes(n, d, elem, ck):
        return ck * (n * elem + d * (elem + 4))
    ck = K._gchunk_cols(4096, 1 << 20, 1 << 20, 512, 2, 128)         # 1M x 512 bf16: 128 MiB
    assert ck % 256 == 0 and 128 << 20 >= chunk_bytes(4096, 512, 2, ck) > (128 << 20) - chunk_bytes(4096, 512, 2, 256)
    ck = K._gchunk_cols(8192, 100_000, 1 << 20, 512, 2, 128)         # sampled: the table's size
    assert ck % 256 == 0 and chunk_bytes(8192, 512, 2, ck) <= 128 << 20 and ck > 6000
    for n, cp in ((16, 10_000_000), (64, 1 << 20), (1, 50_000_000)):
        ck = K._gchunk_cols(n, cp, cp, 512, 2, 128)
        assert chunk_bytes(n, 512, 2, ck) <= 256 << 20 and -(-ck // 128) <= 65535, (n, ck)
    assert chunk_bytes(4096, 64, 4, K._gchunk_cols(4096, 1 << 20, 1000, 64, 4, 64)) <= 32 << 20   # floor
    assert K._gchunk_cols(1 << 20, 1 << 20, 1 << 20, 512, 2, 128) == 256     # at least 256 columns
    # about half of S where the budget holds all of it (not the N x C' matrix): whole 256-column
    # tiles, a multiple of 8 below 512 columns
    assert K._gchunk_cols(100, 3001, 3001, 16, 4, 64) == 1536
    assert K._gchunk_cols(100, 70, 70, 16, 4, 64) == 40
    assert K._gchunk_cols(100, 1, 1, 16, 4, 64) == 1
    assert K._gchunk_cols(100, 3001, 3001, 16, 4, 64, requested=5000) == 3001   # asked: at most C'
    assert K._gchunk_cols(100, 70, 70, 16, 4, 64, requested=9) == 9
    assert K._gchunk_cols(4, 1 << 30, 1 << 30, 16, 2, 128, requested=1 << 29) == 65535 * 128
    for bad in ("GCHUNK=2", "dx.GCHUNK=0", "dw.GCHUNK_COLS=4", "GCHUNK_COLS=-1"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PYSSL_MLCD_TRITON_BWD", bad)
            with pytest.raises(ValueError, match="PYSSL_MLCD_TRITON_BWD"):
                K._bwd_env()


@pytest.mark.parametrize("which", ["x", "w"])
def test_triton_backward_row_beyond_float32_norms(monkeypatch, which):
    """A row of norm 1e20 (its float32 squared norm overflows: inverse norm 0, taken as x̂ = 0 as
    torch.linalg.vector_norm and F.normalize take it) adds nothing and gets no gradient in both
    backward forms; the chunked form's power-of-two split made it 0/0, and every row of the
    other gradient NaN."""
    from pyssl.kernels import mlcd_loss as K
    x, w, pos = make_problem(n=12, c=37, d=16, l=2)
    (x if which == "x" else w)[3] = 1e20
    lse, gneg = torch.full((12,), 5.0), torch.full((12,), 0.1)
    gpos = torch.where(pos >= 0, -0.1, 0.0)
    out = {}
    for spec in ("GCHUNK=0", "GCHUNK=1"):
        monkeypatch.setenv("PYSSL_MLCD_TRITON_BWD", spec)
        out[spec] = K.mlcd_grad(x, w, None, pos, 8.0, lse, gneg, gpos)
        assert all(torch.isfinite(t).all() for t in out[spec]), spec
    for a, b in zip(out["GCHUNK=0"], out["GCHUNK=1"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_backward_near_a_center_16_bit(monkeypatch, dtype):
    """16-bit features at θ = 1e-3..1 rad from their positive, whose term dominates the gradient:
    the normalization backward keeps only the part of dx̂ across x̂ (~ sin θ of it), so operands
    rounded off their rows' directions (x̂, ŵ in 16 bits: error ~2^-9 / sin θ, 68% at 1e-3 in
    bfloat16) would lose it. Both backward forms keep every row's dx and its positive's dw to
    1% (the fused form: ~0.3%), in ragged chunks too."""
    from pyssl.kernels import mlcd_loss as K
    g = torch.Generator().manual_seed(3)
    n, c, d = 8, 40, 128
    w = torch.randn(c, d, generator=g, dtype=torch.float64) * 0.05
    pos = torch.randperm(c, generator=g)[:n, None]
    thetas = torch.tensor([1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 0.6, 1.0], dtype=torch.float64)
    x = at_angles(w, pos, thetas, g).to(dtype)
    w = w.to(dtype)
    lse = torch.full((n,), 100.0)     # the negatives negligible: G is gpos at the positive
    gneg, gpos = torch.ones(n), torch.full((n, 1), -1.0)
    want_dx, want_dw = _dense_engine_grad(x, w, None, pos, 64.0, lse, gneg, gpos)
    for spec in ("GCHUNK=0", "GCHUNK=1", "GCHUNK_COLS=7"):
        monkeypatch.setenv("PYSSL_MLCD_TRITON_BWD", spec)
        dx, dw = K.mlcd_grad(x, w, None, pos, 64.0, lse, gneg, gpos, torch.float32, dw_dtype=torch.float32)
        ex = (dx.double() - want_dx).norm(dim=1) / want_dx.norm(dim=1)
        ew = (dw.double() - want_dw)[pos[:, 0]].norm(dim=1) / want_dw[pos[:, 0]].norm(dim=1)
        assert ex.max() < 1e-2 and ew.max() < 1e-2, (spec, ex.tolist(), ew.tolist())


def test_triton_split_statistics_combine():
    """The per-row (max, sum) statistics of column splits (the form a model-parallel shard
    all-reduces) combine to the same log-sum-exp for any number of splits."""
    from pyssl.kernels import mlcd_loss as K
    x, w, pos = make_problem(n=20, c=400, d=16, seed=17, pad=False, device=device_for("triton"))
    base, pc = K.mlcd_lse(x, w, None, pos, 16.0, splits=1)
    for splits in (2, 3, 5):
        lse, pc2 = K.mlcd_lse(x, w, None, pos, 16.0, splits=splits)
        torch.testing.assert_close(lse, base, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(pc2, pc)
    logits = 16.0 * torch.nn.functional.normalize(x.double(), dim=1) @ torch.nn.functional.normalize(w.double(), dim=1).t()
    logits = logits.scatter(1, pos, float("-inf"))
    torch.testing.assert_close(base.double(), torch.logsumexp(logits, 1), rtol=1e-5, atol=1e-5)


def test_sample_classes():
    g = torch.Generator().manual_seed(0)
    pos = torch.tensor([[3, 7, -1], [7, 9, 1]])
    s = pyssl.sample_classes(pos, 1000, 0.1, generator=g)
    assert s.dtype == torch.int64 and s.dim() == 1
    assert torch.equal(s, s.unique())                    # sorted and unique
    assert set([1, 3, 7, 9]) <= set(s.tolist())
    assert s.numel() == 4 + round(0.1 * (1000 - 4))
    s2 = pyssl.sample_classes(pos, 1000, 0.1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s, s2)                             # reproducible with a generator
    assert torch.equal(pyssl.sample_classes(pos, 12, 1.0), torch.arange(12))
    assert torch.equal(pyssl.sample_classes(pos, 12, 0.0), torch.tensor([1, 3, 7, 9]))
    # uniform over the non-positives: every class drawn about equally often
    counts = torch.zeros(50)
    for i in range(400):
        counts[pyssl.sample_classes(pos, 50, 0.5, generator=torch.Generator().manual_seed(i))] += 1
    others = torch.ones(50, dtype=torch.bool)
    others[[1, 3, 7, 9]] = False
    assert (counts[~others] == 400).all()
    p = counts[others] / 400                              # expected 23/46 = 0.5 each, sd 0.025
    assert (p - 0.5).abs().max() < 0.1


class _Allocations(TorchDispatchMode):
    """Records (tensor, op) of every tensor the torch ops inside it return into `seen`."""

    def __init__(self, seen):
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.seen.append((t, str(func)))
        return out


@pytest.mark.parametrize("spec", ["GCHUNK=1", "GCHUNK=0"])
def test_triton_allocates_no_dense_logits(monkeypatch, spec):
    """The Triton engine, forward statistics and both backward forms: no tensor of N×C' elements
    or more is created (the chunked backward's G'' buffer is at most half of S wide, also where
    its memory budget would hold every column)."""
    from pyssl.kernels import mlcd_loss as K
    monkeypatch.setenv("PYSSL_MLCD_TRITON_BWD", spec)
    n, c, d = 64, 300, 8
    x, w, pos = make_problem(n=n, c=c, d=d, l=3, device=device_for("triton"))
    sizes = []
    g = torch.Generator().manual_seed(1)
    lse_total = torch.rand(n, generator=g) * 3 + 8
    gneg = torch.rand(n, generator=g) / n
    gpos = torch.where(pos.cpu() >= 0, torch.randn(pos.shape, generator=g) / n, torch.zeros(()))
    lse_total, gneg, gpos = (t.to(x.device) for t in (lse_total, gneg, gpos))
    for run in (lambda: K.mlcd_lse(x, w, None, pos, 8.0),
                lambda: K.mlcd_grad(x, w, None, pos, 8.0, lse_total, gneg, gpos, None)):
        sizes.clear()
        with _Allocations(sizes):
            run()
        # in bytes: the interpreter moves buffers through byte views of their storage
        sizes[:] = [(t.numel() * t.element_size(), f) for t, f in sizes]
        assert sizes and max(sizes)[0] < n * c * 4, max(sizes)     # float32 logits: 4 bytes each


@pytest.mark.parametrize("chunk_elems", [256, 1 << 24])
def test_no_dense_logits_are_allocated(monkeypatch, chunk_elems):
    """No tensor of N×C' elements or more is created by the chunked engine, forward (with and
    without gradients) or backward, whether the row chunk is budget-bound or N-bound. The engine
    functions are watched directly: a dispatch mode does not see inside a custom op."""
    monkeypatch.setattr(M, "CHUNK_ELEMS", chunk_elems)
    n, c, d = 64, 500, 4
    x, w, pos = make_problem(n=n, c=c, d=d)
    sizes = []

    ones = torch.ones(n)
    runs = [lambda: M._chunked_forward(x, w, None, pos, M.MLCD, 8.0, 1.0, 0.3, 0.0, False, None, "torch"),
            lambda: M._chunked_forward(x, w, None, pos, M.MLCD, 8.0, 1.0, 0.3, 0.0, False, 1.0 / n, "torch"),
            lambda: M._chunked_backward(x, w, None, pos, 8.0, ones, ones, torch.zeros(pos.shape), "torch")]
    for run in runs:
        sizes.clear()
        pyssl.empty_cache()                               # so the scratch buffer is allocated in view
        with _Allocations(sizes):
            run()
        sizes[:] = [t.numel() for t, _ in sizes]
        assert max(sizes) < n * c, max(sizes)
        assert max(sizes) >= M._chunk_rows(n, c, d) * c     # the watcher did see the row buffer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_module_in_training_under_torch_compile_fullgraph(backend, dtype):
    """Training mode samples S on every call: sample_classes is an op with a data-dependent
    output size, so the whole module (sampling, the bfloat16 features' cast of the sampled
    centers, the loss) compiles into one graph; same RNG stream, same loss and gradients."""
    dev = device_for(backend)
    crit = pyssl.nn.MLCDLoss(200, 16, sample_ratio=0.2, backend=backend, device=dev)
    x, _, pos = make_problem(n=10, c=200, d=16, device=dev, dtype=dtype)
    x.requires_grad_(True)
    compiled = torch.compile(crit, fullgraph=True, backend="aot_eager")
    results = []
    for f in (crit, compiled, compiled):
        torch.manual_seed(3)
        loss = f(x, pos)
        results.append((loss.detach(), *torch.autograd.grad(loss, (x, crit.weight))))
    assert int((results[0][2] != 0).any(1).sum()) < 200           # rows outside S: no gradient
    for got in results[1:]:
        for a, b in zip(got, results[0]):
            torch.testing.assert_close(a, b)
    torch.library.opcheck(M._sample_op, (pos, 200, 0.2))


def test_module_samples_in_training_and_uses_all_in_eval(backend):
    dev = device_for(backend)
    crit = pyssl.nn.MLCDLoss(200, 16, sample_ratio=0.1, backend=backend,
                             generator=torch.Generator(dev).manual_seed(0), device=dev)
    x, _, pos = make_problem(n=10, c=200, d=16, device=dev)
    x.requires_grad_(True)
    loss = crit(x, pos)
    loss.backward()
    touched = (crit.weight.grad != 0).any(1)
    assert touched[pos[pos >= 0]].all()
    assert 5 < int((~touched).sum()) < 200               # sampled: most rows untouched
    crit.eval()
    with torch.no_grad():
        full = crit(x, pos)
    ref = R.mlcd_loss(x.double(), crit.weight.double(), pos)
    torch.testing.assert_close(full.double(), ref, **F32)


@pytest.mark.parametrize("ratio", [1.0, 0.3])
def test_module_mixed_precision(backend, ratio):
    """float32 centers with bfloat16 features (a bf16 backbone or autocast): the module casts
    its centers (only the sampled ones when sampling) for the op and their gradient comes back
    in float32, zero outside the sampled classes."""
    dev = device_for(backend)
    crit = pyssl.nn.MLCDLoss(50, 16, sample_ratio=ratio, backend=backend, device=dev,
                             generator=torch.Generator(dev).manual_seed(3))
    x, _, pos = make_problem(n=10, c=50, d=16, device=dev)
    classes = (None if ratio == 1.0 else
               pyssl.sample_classes(pos, 50, ratio, generator=torch.Generator(dev).manual_seed(3)))
    xb = x.bfloat16().requires_grad_(True)
    loss = crit(xb, pos)
    loss.backward()
    assert loss.dtype == torch.float32 and xb.grad.dtype == torch.bfloat16
    assert crit.weight.grad.dtype == torch.float32
    w64 = crit.weight.detach().bfloat16().double().requires_grad_(True)
    ref = R.mlcd_loss(xb.detach().double(), w64, pos, classes=classes)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-2, atol=0)
    torch.testing.assert_close(crit.weight.grad.double(), w64.grad, rtol=3e-2,
                               atol=3e-2 * w64.grad.abs().max().item())
    if classes is not None:
        outside = torch.ones(50, dtype=torch.bool, device=dev)
        outside[classes] = False
        assert outside.any() and (crit.weight.grad[outside] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["mlcd", "softmax"])
@pytest.mark.parametrize("sampled", [False, True])
def test_functional_float32_weight_with_16bit_x(backend, dtype, kind, sampled):
    """The functional ops take float32 centers with 16-bit features (autocast, a half-precision
    backbone) as the module does: the candidate rows are rounded to x's dtype for the products,
    the loss is float32, x's gradient in x's dtype, weight's in float32 (zero outside S)."""
    dev = device_for(backend)
    x, w, pos = make_problem(n=14, c=60, d=16, device=dev, seed=9)
    classes = pyssl.sample_classes(pos, 60, 0.3, generator=torch.Generator(dev).manual_seed(2)) if sampled else None
    if kind == "mlcd":
        kw = dict(scale=16.0, classes=classes, margin_grad="exact", reduction="none")
        op, ref_op, ids = pyssl.mlcd_loss, R.mlcd_loss, pos
    else:
        kw = dict(scale=16.0, m2=0.3, classes=classes, reduction="none")
        op, ref_op, ids = pyssl.margin_softmax_loss, R.margin_softmax_loss, pos.max(1).values
    xh = x.to(dtype).requires_grad_(True)
    wf = w.clone().requires_grad_(True)
    out = op(xh, wf, ids, backend=backend, **kw)
    g = torch.rand_like(out) + 0.5
    out.backward(g)
    assert out.dtype == torch.float32 and xh.grad.dtype == dtype and wf.grad.dtype == torch.float32
    x64 = xh.detach().double().requires_grad_(True)
    w64 = w.to(dtype).double().requires_grad_(True)        # the rows the products see
    ref = ref_op(x64, w64, ids, **kw)
    ref.backward(g.double())
    torch.testing.assert_close(out.double(), ref.detach(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(xh.grad.double(), x64.grad, rtol=3e-2, atol=3e-2 * x64.grad.abs().max().item())
    torch.testing.assert_close(wf.grad.double(), w64.grad, rtol=3e-2, atol=3e-2 * w64.grad.abs().max().item())
    if sampled:
        outside = torch.ones(60, dtype=torch.bool, device=dev)
        outside[classes] = False
        assert outside.any() and (wf.grad[outside] == 0).all()


def test_float32_weight_gradient_survives_a_loss_scaler_with_float16_x(backend):
    """float16 features, float32 centers of small norm (std 0.01: dW ~ 1/‖w‖ is large) and a
    loss scaler's 2^16: the centers' gradient is float32 and finite on every backend (Triton's
    16-bit dW tile holds dW / gscale; the factor comes back in float32)."""
    dev = device_for(backend)
    x, w, pos = make_problem(n=16, c=50, d=16, device=dev, seed=13)
    xh = x.half().requires_grad_(True)
    wf = (0.01 * w).requires_grad_(True)
    (pyssl.mlcd_loss(xh, wf, pos, scale=16.0, reduction="sum", backend=backend) * 65536.0).backward()
    assert wf.grad.dtype == torch.float32 and torch.isfinite(wf.grad).all()
    w64 = wf.detach().half().double().requires_grad_(True)
    (R.mlcd_loss(xh.detach().double(), w64, pos, scale=16.0, reduction="sum") * 65536.0).backward()
    assert w64.grad.abs().max() > 65504            # beyond float16's range: a 16-bit dW would be inf
    torch.testing.assert_close(wf.grad.double(), w64.grad, rtol=1e-2, atol=1e-2 * w64.grad.abs().max().item())


def test_functional_under_cpu_autocast():
    """A bf16 autocast region (a backbone's linear layer gives bf16 features) with float32
    centers: the functional op runs, returns a float32 loss, and matches the reference on the
    bf16-rounded operands."""
    torch.manual_seed(0)
    proj = torch.nn.Linear(12, 16)
    w = torch.nn.Parameter(torch.randn(40, 16))
    inp = torch.randn(10, 12)
    _, _, pos = make_problem(n=10, c=40, d=16, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = proj(inp)
        assert feats.dtype == torch.bfloat16
        loss = pyssl.mlcd_loss(feats, w, pos, scale=16.0)
    loss.backward()
    assert loss.dtype == torch.float32 and w.grad.dtype == torch.float32
    ref = R.mlcd_loss(feats.detach().double(), w.detach().bfloat16().double(), pos, scale=16.0)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-2, atol=0)
    assert proj.weight.grad is not None and torch.isfinite(proj.weight.grad).all()


@pytest.mark.parametrize("ratio", [1.0, 0.3])
def test_module_other_dtype_mixes(ratio):
    """Mixes the ops do not take, float64 features with float32 centers and float32 features with
    bfloat16 centers: the module casts its centers (the sampled rows) to the features' dtype, and
    their gradient returns in the centers' dtype."""
    for x_dtype, w_dtype in ((torch.float64, torch.float32), (torch.float32, torch.bfloat16)):
        crit = pyssl.nn.MLCDLoss(50, 16, sample_ratio=ratio, backend="torch", dtype=w_dtype,
                                 generator=torch.Generator().manual_seed(3))
        x, _, pos = make_problem(n=10, c=50, d=16, dtype=x_dtype)
        classes = None if ratio == 1.0 else pyssl.sample_classes(pos, 50, ratio, generator=torch.Generator().manual_seed(3))
        x.requires_grad_(True)
        loss = crit(x, pos)
        loss.backward()
        assert loss.dtype == x_dtype and x.grad.dtype == x_dtype and crit.weight.grad.dtype == w_dtype
        w64 = crit.weight.detach().to(x_dtype).double().requires_grad_(True)
        ref = R.mlcd_loss(x.detach().double(), w64, pos, classes=classes)
        ref.backward()
        torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
        tol = 1e-4 if w_dtype == torch.float32 else 1e-2
        torch.testing.assert_close(crit.weight.grad.double(), w64.grad, rtol=tol, atol=tol * w64.grad.abs().max().item())


def test_module_bad_arguments():
    for kwargs, err, msg in ((dict(num_classes=True, dim=3), TypeError, "num_classes must be an int"),
                             (dict(num_classes=10.5, dim=3), TypeError, "num_classes must be an int"),
                             (dict(num_classes=10, dim=0), ValueError, "dim must be >= 1"),
                             (dict(num_classes=10, dim=3, margin=float("nan")), ValueError, "margin must be finite"),
                             (dict(num_classes=10, dim=3, scale=0), ValueError, "scale must be > 0"),
                             (dict(num_classes=10, dim=3, sample_ratio=1.5), ValueError, "sample_ratio must be in"),
                             (dict(num_classes=10, dim=3, generator=0), TypeError, "generator must be a torch.Generator")):
        with pytest.raises(err, match=msg):
            pyssl.nn.MLCDLoss(**kwargs)


def test_deterministic(backend):
    dev = device_for(backend)
    x, w, pos = make_problem(device=dev)
    a = grads(lambda p, q: pyssl.mlcd_loss(p, q, pos, backend=backend), x, w)
    b = grads(lambda p, q: pyssl.mlcd_loss(p, q, pos, backend=backend), x, w)
    for u, v in zip(a[:3], b[:3]):
        assert torch.equal(u, v)


def test_inputs_not_modified(backend):
    dev = device_for(backend)
    x, w, pos = make_problem(device=dev)
    classes = pyssl.sample_classes(pos, w.shape[0], 0.3)
    copies = [t.clone() for t in (x, w, pos, classes)]
    grads(lambda p, q: pyssl.mlcd_loss(p, q, pos, classes=classes, backend=backend), x, w)
    for t, c in zip((x, w, pos, classes), copies):
        assert torch.equal(t, c)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_repeated_backward_and_unit_upstream_gradient(backend, reduction):
    """With an upstream gradient of 1 the gradients saved in the forward are handed to autograd
    as they are: backward three times with retain_graph must give 3× (a .grad that aliased the
    saved tensor would double it instead), then 2.5× more with an upstream gradient of 2.5;
    and a .grad modified in place must not change the next step's gradient."""
    dev = device_for(backend)
    x, w, pos = make_problem(device=dev)
    x.requires_grad_(), w.requires_grad_()
    loss = pyssl.mlcd_loss(x, w, pos, reduction=reduction, backend=backend)
    want_x, want_w = (t.clone() for t in torch.autograd.grad(loss, (x, w), retain_graph=True))
    for _ in range(3):
        loss.backward(retain_graph=True)
    torch.testing.assert_close(x.grad, 3 * want_x)
    torch.testing.assert_close(w.grad, 3 * want_w)
    loss.backward(torch.tensor(2.5, device=dev))
    torch.testing.assert_close(x.grad, 5.5 * want_x)
    torch.testing.assert_close(w.grad, 5.5 * want_w)
    x.grad = w.grad = None
    loss = pyssl.mlcd_loss(x, w, pos, reduction=reduction, backend=backend)
    loss.backward()
    x.grad.mul_(0.0), w.grad.mul_(0.0)      # an optimizer's in-place use of .grad
    pyssl.mlcd_loss(x, w, pos, reduction=reduction, backend=backend).backward()
    torch.testing.assert_close(x.grad, want_x)
    torch.testing.assert_close(w.grad, want_w)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_unit_upstream_gradient_keeps_double_backward(backend):
    """A learnable loss weight that happens to be 1 still gets its gradient through a double
    backward (create_graph): the fast path for an upstream gradient of 1 stays out of the way.
    (cpu and torch, which form the gradients in the forward; the Triton backward has no
    double-backward formula.)"""
    dev = device_for(backend)
    x, w, pos = make_problem(device=dev)
    x.requires_grad_()
    for value in (1.0, 1.5):
        lam = torch.tensor(value, device=dev, requires_grad=True)
        gx, = torch.autograd.grad(lam * pyssl.mlcd_loss(x, w, pos, backend=backend), x, create_graph=True)
        dlam, = torch.autograd.grad(gx.sum(), lam, retain_graph=True)
        torch.testing.assert_close(dlam * value, gx.sum().detach())
        # second derivatives in x are not implemented: an error, not a silent zero
        with pytest.raises(RuntimeError, match="second derivatives with respect to x and weight"):
            torch.autograd.grad(gx.square().sum(), x)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_double_backward_through_the_backward_op_says_what_is_missing(backend, reduction):
    """A double backward raises an error naming what is missing, not torch's "no autograd
    formula": where the backward recomputes (Triton; reduction "none" everywhere) from the
    backward op's formula, where the forward formed the gradients (cpu and torch with "mean")
    from the guard on the saved gradients."""
    dev = device_for(backend)
    x, w, pos = make_problem(n=6, c=20, d=8, device=dev)
    x.requires_grad_()
    loss = pyssl.mlcd_loss(x, w, pos, scale=8.0, reduction=reduction, backend=backend)
    gx, = torch.autograd.grad(loss.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives with respect to x and weight"):
        gx.square().sum().backward()


def test_unit_upstream_gradient_retained_graph_in_place_is_caught(backend):
    """What the fast path changes (documented at _backward): autograd.grad with retain_graph
    returns the saved gradient itself; modifying it in place makes the next backward through the
    retained graph raise, never return a wrong value."""
    dev = device_for(backend)
    x, w, pos = make_problem(device=dev)
    x.requires_grad_()
    loss = pyssl.mlcd_loss(x, w, pos, backend=backend)
    gx, = torch.autograd.grad(loss, x, retain_graph=True)
    want = gx.clone()
    gx.mul_(2.0)
    if backend in ("cpu", "torch"):     # gradients formed in the forward, handed out as they are
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad(loss, x)
    else:                               # Triton recomputes in the backward: the right gradient
        again, = torch.autograd.grad(loss, x)
        torch.testing.assert_close(again, want)


@gpu_only()
def test_data_checks_read_the_device_once():
    """The op's data checks (ids in range, a positive per row, no duplicates, classes valid)
    reduce to one flag on the device: one host sync per call when the data is good."""
    import warnings
    x, w, pos = make_problem(n=64, c=500, d=8, device="cuda")
    classes = pyssl.sample_classes(pos, 500, 0.2)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            M._validate_data(pos, classes, 500, M.MLCD)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [c for c in caught if "synchroniz" in str(c.message)]
    assert len(syncs) == 1, [str(c.message) for c in caught]


def test_opcheck(backend):
    x, w, pos = make_problem(n=8, c=20, d=6, l=2, device=device_for(backend))
    classes = torch.arange(0, 20, 2, device=x.device).unique()
    classes = torch.cat([classes, pos[pos >= 0]]).unique()
    for gif, red, cls, need in ((True, 1, None, 3), (True, 2, classes, 1), (True, 1, None, 2), (False, 0, None, 3),
                                (False, 2, classes, 3), (False, 0, classes, 2)):
        if backend == "triton" and gif:
            continue   # auto never asks the Triton path for gradients in the forward
        args = (x.clone().requires_grad_(bool(need & 1)), w.clone().requires_grad_(bool(need & 2)), pos, cls,
                M.MLCD, 8.0, 1.0, 0.3, 0.0, False, red, backend, gif, need)
        torch.library.opcheck(M._margin_loss_op, args)
    # float32 centers with bfloat16 features: the fakes give each gradient its input's dtype
    for gif, red, cls in ((True, 1, classes), (False, 0, classes), (False, 2, None)):
        if backend == "triton" and gif:
            continue
        args = (x.bfloat16().requires_grad_(), w.clone().requires_grad_(), pos, cls,
                M.MLCD, 8.0, 1.0, 0.3, 0.0, True, red, backend, gif, 3)
        torch.library.opcheck(M._margin_loss_op, args)


@pytest.mark.parametrize("frozen", ["x", "weight"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("sampled", [False, True])
def test_a_frozen_input_gets_no_gradient_and_the_other_is_exact(backend, frozen, reduction, sampled, monkeypatch):
    """A frozen input (the features of a linear probe, fixed class centers) gets no gradient
    and its product is never formed: the kernels are asked for the other gradient only."""
    dev = device_for(backend)
    x, w, pos = make_problem(n=12, c=40, d=8, device=dev, seed=4)
    classes = pyssl.sample_classes(pos, 40, 0.3, generator=torch.Generator(dev).manual_seed(1)) if sampled else None
    asked = []
    if backend == "triton":
        from pyssl.kernels import mlcd_loss as K
        real_grad = K.mlcd_grad
        monkeypatch.setattr(K, "mlcd_grad", lambda *a, **kw: asked.append(a[8:]) or real_grad(*a, **kw))
    else:
        real_kernels = M._chunk_kernels

        def spy(backend):
            lse_fn, grad_fn = real_kernels(backend)
            return lse_fn, lambda *a: asked.append((None, a[-3].dim() == 2, a[-2].dim() == 2)) or grad_fn(*a)
        monkeypatch.setattr(M, "_chunk_kernels", spy)
    xr, wr = x.clone().requires_grad_(frozen != "x"), w.clone().requires_grad_(frozen != "weight")
    out = pyssl.mlcd_loss(xr, wr, pos, classes=classes, scale=8.0, reduction=reduction, backend=backend)
    g = torch.randn_like(out)
    out.backward(g)
    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    ref = R.mlcd_loss(x64, w64, pos, classes=classes, scale=8.0, reduction=reduction)
    ref.backward(g.double())
    torch.testing.assert_close(out.detach().double(), ref.detach(), **F32)
    if frozen == "x":
        assert xr.grad is None
        torch.testing.assert_close(wr.grad.double(), w64.grad, **F32)
    else:
        assert wr.grad is None
        torch.testing.assert_close(xr.grad.double(), x64.grad, **F32)
    assert asked and all(tuple(a[1:]) == (frozen != "x", frozen != "weight") for a in asked), asked


def test_torch_compile_fullgraph(backend):
    x, w, pos = make_problem(n=8, c=20, d=6, l=2, device=device_for(backend))
    f = torch.compile(lambda a, b: pyssl.mlcd_loss(a, b, pos, scale=8.0, backend=backend), fullgraph=True)
    check_against_reference(f, lambda a, b: R.mlcd_loss(a, b, pos, scale=8.0), x, w, F32)
    g = torch.compile(lambda a, b: pyssl.margin_softmax_loss(a, b, pos[:, 0].clamp_min(0), scale=8.0,
                                                             reduction="none", backend=backend), fullgraph=True)
    check_against_reference(g, lambda a, b: R.margin_softmax_loss(a, b, pos[:, 0].clamp_min(0), scale=8.0,
                                                                  reduction="none"), x, w, F32)


def test_inference_mode_first_then_training(backend):
    """A first call under torch.inference_mode (an evaluation before training) must not leave an
    inference tensor in the CPU backends' reusable scratch buffer: later calls outside it write
    that buffer in place."""
    pyssl.empty_cache()
    x, w, pos = make_problem(n=8, c=30, d=6, l=2, device=device_for(backend))
    with torch.inference_mode():
        first = pyssl.mlcd_loss(x, w, pos, scale=8.0, backend=backend)
    check_against_reference(lambda a, b: pyssl.mlcd_loss(a, b, pos, scale=8.0, backend=backend),
                            lambda a, b: R.mlcd_loss(a, b, pos, scale=8.0), x, w, F32)
    with torch.inference_mode():
        torch.testing.assert_close(pyssl.mlcd_loss(x, w, pos, scale=8.0, backend=backend), first)


def test_torch_compile_dynamic_shapes(backend):
    """compile(dynamic=True) (or the automatic dynamic shapes after a batch-size change) makes
    Python floats SymFloats: the argument checks must not call math.isfinite on them."""
    torch._dynamo.reset()
    f = torch.compile(lambda a, b, p: pyssl.mlcd_loss(a, b, p, scale=8.0, backend=backend), fullgraph=True,
                      dynamic=True, backend="aot_eager")
    for n in (8, 13):
        x, w, pos = make_problem(n=n, c=20, d=6, l=2, device=device_for(backend), seed=n)
        check_against_reference(lambda a, b: f(a, b, pos), lambda a, b: R.mlcd_loss(a, b, pos, scale=8.0), x, w, F32)


# ---------------------------------------------------------------------------------------------
# bad input (SPEC §5)
# ---------------------------------------------------------------------------------------------

def _bad_cases():
    x, w, pos = make_problem(n=4, c=10, d=3, l=2, pad=False)
    ok = dict(x=x, weight=w, positives=pos)
    cases = [
        ("x must have|x must be \\(N, D\\)", dict(ok, x=x[0])),
        ("weight must be \\(C, D\\)", dict(ok, weight=w[0])),
        ("D=", dict(ok, weight=torch.randn(10, 4))),
        ("does not match x dtype", dict(ok, weight=w.double())),
        ("does not match x dtype", dict(ok, weight=w.bfloat16())),       # 16-bit centers, float32 x
        ("does not match x dtype", dict(ok, x=x.half(), weight=w.bfloat16())),
        ("x is empty", dict(ok, x=x[:0], positives=pos[:0])),
        ("weight is empty", dict(ok, weight=w[:0])),
        ("positives must be int64", dict(ok, positives=pos.int())),
        ("positives must be \\(N, l\\)", dict(ok, positives=pos[:3])),
        ("out of range", dict(ok, positives=torch.tensor([[0, 1], [2, 10], [3, 4], [5, 6]]))),
        ("out of range", dict(ok, positives=torch.tensor([[0, 1], [2, -3], [3, 4], [5, 6]]))),
        ("has no positive", dict(ok, positives=torch.tensor([[0, 1], [-1, -1], [3, 4], [5, 6]]))),
        ("duplicated class id", dict(ok, positives=torch.tensor([[0, 0], [1, 2], [3, 4], [5, 6]]))),
        ("does not contain positive", dict(ok, positives=torch.tensor([[0, 1], [1, 2], [3, 4], [5, 6]]),
                                           classes=torch.tensor([0, 1, 2, 3, 4, 5]))),
        ("classes holds duplicated", dict(ok, positives=torch.tensor([[0, 1], [1, 2], [0, 2], [1, 0]]),
                                          classes=torch.tensor([0, 1, 2, 2]))),
        ("classes holds ids outside", dict(ok, positives=torch.tensor([[0, 1], [1, 2], [0, 2], [1, 0]]),
                                           classes=torch.tensor([0, 1, 2, 12]))),
        ("classes must be int64", dict(ok, classes=torch.tensor([0.0, 1.0]))),
        ("scale must be finite", dict(ok, scale=float("nan"))),
        ("scale must be finite", dict(ok, scale=float("inf"))),
        ("margin must be finite", dict(ok, margin=float("nan"))),
        ("reduction must be", dict(ok, reduction="avg")),
        ("margin_grad must be", dict(ok, margin_grad="analytic")),
        ("backend must be one of", dict(ok, backend="gpu")),
    ]
    return cases


@pytest.mark.parametrize("match,kwargs", _bad_cases())
def test_bad_input_mlcd(match, kwargs):
    kwargs = dict(kwargs)
    x, w, pos = kwargs.pop("x"), kwargs.pop("weight"), kwargs.pop("positives")
    copies = [t.clone() for t in (x, w, pos)]
    with pytest.raises(ValueError, match=match):
        pyssl.mlcd_loss(x, w, pos, **kwargs)
    for t, c in zip((x, w, pos), copies):
        assert torch.equal(t, c)


def test_bad_input_types_and_other_entry_points():
    x, w, pos = make_problem(n=4, c=10, d=3, l=2, pad=False)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        pyssl.mlcd_loss(x.numpy(), w, pos)
    with pytest.raises(ValueError, match="labels must be \\(N,\\)"):
        pyssl.margin_softmax_loss(x, w, pos)
    with pytest.raises(ValueError, match="out of range"):
        pyssl.margin_softmax_loss(x, w, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="m2 must be finite"):
        pyssl.margin_softmax_loss(x, w, pos[:, 0].contiguous(), m2=float("inf"))
    with pytest.raises(ValueError, match="ratio must be in"):
        pyssl.sample_classes(pos, 10, 1.5)
    with pytest.raises(ValueError, match="positives must be \\(N, l\\)"):
        pyssl.sample_classes(pos[:, 0], 10, 0.5)
    with pytest.raises(TypeError, match="num_classes must be an int"):
        pyssl.sample_classes(pos, 10.0, 0.5)
    with pytest.raises(TypeError, match="sample_classes: generator must be a torch.Generator or None, got int"):
        pyssl.sample_classes(pos, 10, 0.5, generator=5)
    with pytest.raises(TypeError, match="scale must be a real number"):
        pyssl.mlcd_loss(x, w, pos, scale="64")
    with pytest.raises(TypeError, match="margin must be a real number"):
        pyssl.mlcd_loss(x, w, pos, margin=True)
    with pytest.raises(ValueError, match="scale must be > 0"):
        pyssl.mlcd_loss(x, w, pos, scale=0.0)
    with pytest.raises(ValueError, match="labels holds class id -1"):
        pyssl.margin_softmax_loss(x, w, torch.tensor([0, -1, 2, 3]))
    with pytest.raises(ValueError, match="classes must be a non-empty 1-D"):
        pyssl.mlcd_loss(x, w, pos, classes=torch.arange(10).view(2, 5))
    with pytest.raises(ValueError, match="positives must have at least one column"):
        pyssl.mlcd_loss(x, w, pos[:, :0])
    with pytest.raises(ValueError, match="classes is on meta"):
        pyssl.mlcd_loss(x, w, pos, classes=torch.arange(10, device="meta"))
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        pyssl.mlcd_loss(x, w.to("meta"), pos)
    with pytest.raises(ValueError, match="positives is on meta but x is on cpu"):
        pyssl.mlcd_loss(x, w, pos.to("meta"))
    with pytest.raises(ValueError, match="labels is on meta but x is on cpu"):
        pyssl.margin_softmax_loss(x, w, pos[:, 0].contiguous().to("meta"))
    with pytest.raises(ValueError, match="classes must be a non-empty 1-D"):
        pyssl.mlcd_loss(x, w, pos, classes=torch.arange(0))
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        pyssl.sample_classes(pos, 0, 0.5)
    with pytest.raises(ValueError, match="out of range"):
        pyssl.sample_classes(pos, 3, 0.1)
    with pytest.raises(ValueError, match="num_classes"):
        pyssl.nn.MLCDLoss(0, 8)
    with pytest.raises(ValueError, match="sample_classes: positives of row 0 contain a duplicated"):
        pyssl.sample_classes(torch.tensor([[1, 1], [2, 3]]), 10, 0.5)
    with pytest.raises(ValueError, match="sample_classes: row 1 of positives has no positive"):
        pyssl.sample_classes(torch.tensor([[1, 2], [-1, -1]]), 10, 0.5)
    with pytest.raises(ValueError, match="reduction must be"):
        pyssl.mlcd_loss(x, w, pos, reduction=["mean"])
    with pytest.raises(ValueError, match="backend='cpu' cannot serve"):
        pyssl.mlcd_loss(x.double(), w.double(), pos, backend="cpu")


def test_reasons_name_every_backend():
    x, w, pos = make_problem(n=4, c=10, d=3, l=2)
    reasons = M.not_supported_reasons(x.double(), pos)
    assert reasons["torch"] == []
    assert any("float64" in r for r in reasons["cpu"])
    assert any("float64" in r for r in reasons["triton"])


def test_cpu_kernel_with_no_candidate_columns_writes_zero_dx():
    # dX̂ = G'·W over no columns is 0, not what was in the output
    ext = pytest.importorskip("pyssl._C")
    r, d = 3, 4
    xhat, w, rw = torch.randn(r, d), torch.zeros(0, d), torch.zeros(0)
    pc = torch.full((r, 1), -1, dtype=torch.int64)
    buf = torch.zeros(r, 0)
    lse, _ = ext.mlcd_chunk_lse(xhat, w, rw, pc, 1.0, buf)
    assert torch.isinf(lse).all() and (lse < 0).all()
    dx = torch.full((r, d), 7.0)
    ext.mlcd_chunk_grad(buf, xhat, w, rw, pc, 1.0, lse, torch.ones(r), torch.zeros(r, 1), dx,
                        torch.zeros(0, d), False)
    assert torch.equal(dx, torch.zeros(r, d))


def test_scratch_buffers_are_reused_on_the_cpu_only():
    """CPU scratch is kept per thread (a fresh buffer costs page faults); other devices get a fresh
    tensor per call, so no buffer is shared between CUDA streams or autograd's backward thread."""
    from pyssl import _workspace
    import threading

    pyssl.empty_cache()
    a = _workspace.scratch(1000, torch.float32, "cpu")
    b = _workspace.scratch(500, torch.float32, "cpu")
    assert b.data_ptr() == a.data_ptr() and b.numel() == 500
    c = _workspace.scratch(2000, torch.float32, "cpu")                 # grown
    assert c.numel() == 2000 and _workspace.scratch(10, torch.float64, "cpu").dtype == torch.float64
    other = []
    t = threading.Thread(target=lambda: other.append(_workspace.scratch(100, torch.float32, "cpu").data_ptr()))
    t.start()
    t.join()
    assert other[0] != c.data_ptr()                                     # per thread
    m = _workspace.scratch(100, torch.float32, "meta")
    assert m.device.type == "meta" and m.numel() == 100
    assert _workspace._local.buffers.keys() == {torch.float32, torch.float64}      # nothing kept for meta
    pyssl.empty_cache()
    assert not _workspace._local.buffers


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_loss_under_autocast_computes_as_without(backend):
    """A custom op runs under its caller's autocast unless it turns it off: the chunked
    backends' products (the normalization backward's batched GEMV among them) were cast to
    bfloat16 inside the op under a CPU autocast (dW moved by 3.6e-4 relative). The op body runs
    with autocast off: float32 inputs give the float32 results, bit for bit."""
    x, w, pos = make_problem(n=30, c=200, d=24, seed=9)
    out = {}
    for amp in (False, True):
        xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = pyssl.mlcd_loss(xa, wa, pos, backend=backend)
        out[amp] = (loss.detach(), *torch.autograd.grad(loss, (xa, wa)))
    for a, b in zip(out[False], out[True]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sample_classes_generator_devices():
    """A CPU generator works for any positives' device (its keys drawn on the host, reproducibly);
    a generator on another device than the positives is a named error, as in mix_patches
    (drawing on GPU 0 for every rank's positives made each rank touch GPU 0)."""
    dev = device_for("triton")
    pos = torch.tensor([[3, 7], [1, 9]], device=dev)
    a = pyssl.sample_classes(pos, 100, 0.2, generator=torch.Generator().manual_seed(4))
    b = pyssl.sample_classes(pos, 100, 0.2, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and a.device == pos.device and a.numel() == 4 + 19
    if GPU:    # a CUDA generator for CPU positives
        with pytest.raises(ValueError, match="generator must be a CPU generator or one on positives' device"):
            pyssl.sample_classes(pos.cpu(), 100, 0.2, generator=torch.Generator("cuda").manual_seed(4))


def test_data_checks_read_one_flag_on_any_device():
    """The op's data checks (ids in range, rows with a positive, duplicates, the candidate set's
    ids, every positive in it) reduce to one flag read once per call: one host sync (the
    column check used to read a second), counted here as reads of a tensor's value."""
    from torch.overrides import TorchFunctionMode
    reads = []

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("__bool__", "item", "tolist", "__int__", "__float__"):
                reads.append(func.__name__)
            return func(*args, **(kwargs or {}))

    x, w, pos = make_problem(n=8, c=50, d=4)
    classes = pyssl.sample_classes(pos, 50, 0.3, generator=torch.Generator().manual_seed(0))
    for cls in (None, classes):
        reads.clear()
        with Count():
            M._validated_columns(pos, cls, 50, M.MLCD, "mlcd_loss")
        assert reads == ["__bool__"], reads
    with pytest.raises(ValueError, match="classes does not contain positive/label id"):
        M._validated_columns(pos, classes[classes != pos[0, 0]], 50, M.MLCD, "mlcd_loss")
    # sample_classes: its data checks and the count of distinct positives in one read (with a
    # generator it runs in Python, where the mode sees it; the op's body is the same function)
    reads.clear()
    with Count():
        pyssl.sample_classes(pos, 50, 0.3, generator=torch.Generator().manual_seed(0))
    assert reads == ["tolist"], reads


@gpu_only()
def test_sample_classes_syncs_once():
    """sample_classes on the GPU: one host sync (the data checks and |P| read together); the
    distinct positives and the drawn classes are marked in a mask and read off it at the size
    now known, no unique or boolean indexing (each of which syncs)."""
    import warnings
    pos = (torch.randint(0, 100_000, (512, 1), device="cuda") + 997 * torch.arange(8, device="cuda")) % 100_000
    pos[:, 6:] = -1
    torch.cuda.synchronize()
    for gen in (None, torch.Generator("cuda").manual_seed(3)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                s = pyssl.sample_classes(pos, 100_000, 0.1, generator=gen)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [c for c in caught if "synchroniz" in str(c.message)]
        assert len(syncs) == 1, [str(c.message) for c in caught]
        want = torch.unique(pos[pos >= 0])
        assert torch.isin(want, s).all() and torch.equal(s, s.unique())
        assert s.numel() == want.numel() + round(0.1 * (100_000 - want.numel()))
