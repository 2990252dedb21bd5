"""kernels/knn.py: the fused similarity + streaming top-k kernel against brute force torch.

The reference computes the full score matrix in float64 from the same (possibly 16-bit) inputs
and sorts it stably (equal scores: lower bank index first). Without a GPU the kernel runs in the
Triton interpreter (conftest.py), so the shapes stay small: Q <= 40, B <= 600, D <= 64.
"""
import pytest
import torch

import pyssl  # noqa: F401  (installs pyssl.kernels)
from pyssl.kernels import knn as K

from conftest import GPU, device_for

DEV = "cuda" if GPU else "cpu"


def _unit(n, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return x.to(dtype).to(DEV)


def _brute(q, b, bias=None):
    """(scores, indices) of the whole bank per query, float64, descending, ties: lower index."""
    s = q.double() @ b.double().t()
    if bias is not None:
        s = s + bias.double()[None, :]
    out = torch.sort(s, dim=1, descending=True, stable=True)
    return out.values, out.indices


def _separated(ref_sorted, k, gap):
    """(Q, k) mask of ranks whose reference score is more than gap away from its neighbours in
    the full sorted order (the k+1-th included): there the index is unambiguous."""
    s = ref_sorted
    inf = torch.full_like(s[:, :1], float("inf"))
    prev = torch.cat([inf, s[:, :-1] - s[:, 1:]], dim=1)   # s[j-1] - s[j]
    nxt = torch.cat([s[:, :-1] - s[:, 1:], inf], dim=1)    # s[j] - s[j+1]
    return (torch.minimum(prev, nxt) > gap)[:, :k]


def _check(q, b, k, scores, idx, *, bias=None, atol, gap, exact_order):
    ref_s, ref_i = _brute(q, b, bias)
    Q = q.shape[0]
    assert scores.shape == (Q, k) and idx.shape == (Q, k)
    assert scores.dtype == torch.float32 and idx.dtype == torch.int64
    scores, idx, ref_s, ref_i = scores.cpu(), idx.cpu(), ref_s.cpu(), ref_i.cpu()
    # the scores are the k largest, sorted descending
    torch.testing.assert_close(scores.double(), ref_s[:, :k], atol=atol, rtol=0)
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())
    # every returned index is a distinct bank row whose true score is the returned score
    assert bool((idx >= 0).all()) and bool((idx < b.shape[0]).all())
    assert all(len(set(r.tolist())) == k for r in idx)
    full = q.double().cpu() @ b.double().cpu().t()
    if bias is not None:
        full = full + bias.double().cpu()[None, :]
    torch.testing.assert_close(full.gather(1, idx), scores.double(), atol=atol, rtol=0)
    sep = _separated(ref_s, k, gap)
    assert bool(sep.any()), "test problem has no well separated rank"
    if exact_order:
        assert torch.equal(idx[sep], ref_i[:, :k][sep])
    else:   # well separated ranks: the same bank rows, in any order among themselves
        for r in range(Q):
            assert set(idx[r][sep[r]].tolist()) <= set(ref_i[r, :k].tolist())


# ----------------------------------------------------------------------------------------------
# Accuracy
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("Q,B,D,k", [(40, 600, 64, 50), (33, 300, 20, 37), (5, 37, 8, 1),
                                     (17, 100, 24, 100), (9, 130, 16, 7)])
def test_fp32_matches_brute_force(Q, B, D, k):
    """k = 1, k = B, k not a power of two; Q, B, D not multiples of the tiles."""
    q, b = _unit(Q, D, seed=1), _unit(B, D, seed=2)
    s, i = K.knn_topk(q, b, k)
    _check(q, b, k, s, i, atol=1e-5, gap=1e-5, exact_order=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_matches_brute_force(dtype):
    q, b = _unit(24, 48, dtype, seed=3), _unit(500, 48, dtype, seed=4)
    s, i = K.knn_topk(q, b, 20)
    # reference from the same 16-bit values: only the accumulation differs (fp32 vs fp64)
    _check(q, b, 20, s, i, atol=2e-3 if GPU else 1e-5, gap=1e-2, exact_order=False)


def test_raw_scale_inputs():
    """Unnormalised inputs (inner product, not cosine), scores well above 1."""
    g = torch.Generator().manual_seed(5)
    q = (3 * torch.randn(20, 32, generator=g)).to(DEV)
    b = torch.randn(257, 32, generator=g).to(DEV)
    s, i = K.knn_topk(q, b, 10)
    _check(q, b, 10, s, i, atol=1e-4, gap=1e-3, exact_order=True)


def test_l2_nearest_neighbours_via_bias():
    """bank_bias = -0.5 ||b||^2 turns the top scores into the smallest squared L2 distances:
    dist^2 = ||q||^2 - 2 score."""
    g = torch.Generator().manual_seed(6)
    q = torch.randn(30, 16, generator=g).to(DEV)
    b = (torch.randn(400, 16, generator=g) * torch.rand(400, 1, generator=g) * 2).to(DEV)
    bias = -0.5 * (b * b).sum(1)
    s, i = K.knn_topk(q, b, 12, bank_bias=bias)
    _check(q, b, 12, s, i, bias=bias, atol=1e-4, gap=1e-3, exact_order=True)
    d2 = torch.cdist(q.double().cpu(), b.double().cpu()) ** 2
    ref = torch.sort(d2, dim=1, stable=True)
    dist2 = (q.double().cpu() ** 2).sum(1, keepdim=True) - 2 * s.double().cpu()
    torch.testing.assert_close(dist2, ref.values[:, :12], atol=1e-3, rtol=1e-5)
    sep = _separated(-ref.values, 12, 1e-3)
    assert torch.equal(i.cpu()[sep], ref.indices[:, :12][sep])


# ----------------------------------------------------------------------------------------------
# Tiles, splits, ties
# ----------------------------------------------------------------------------------------------
def _small_tiles(monkeypatch):
    real = K._config

    def small(*a, **kw):
        cfg = dict(real(*a, **kw))
        cfg.update(BLOCK_Q=16, BLOCK_B=max(16, cfg["K_PAD"]), BLOCK_D=16)
        return cfg
    monkeypatch.setattr(K, "_config", small)


@pytest.mark.parametrize("k", [5, 16])
def test_many_tiles_and_splits(monkeypatch, k):
    """Small tiles: several query blocks, many bank tiles per program (the running list merges
    repeatedly and the threshold skip triggers), the D loop over several steps, and bank splits
    merged by key; every split count gives bit-identical results."""
    _small_tiles(monkeypatch)
    q, b = _unit(24, 40, seed=7), _unit(300, 40, seed=8)
    base = None
    for splits in (1, 5):
        s, i = K.knn_topk(q, b, k, splits=splits)
        _check(q, b, k, s, i, atol=1e-5, gap=1e-5, exact_order=True)
        if base is None:
            base = (s, i)
        else:
            assert torch.equal(s, base[0]) and torch.equal(i, base[1])


def test_split_smaller_than_k(monkeypatch):
    """A split that owns fewer bank rows than k leaves sentinel keys, which never surface."""
    _small_tiles(monkeypatch)
    q, b = _unit(8, 16, seed=9), _unit(70, 16, seed=10)
    s, i = K.knn_topk(q, b, 60, splits=5)    # BLOCK_B = 64: 2 tiles, the second holds 6 rows
    _check(q, b, 60, s, i, atol=1e-5, gap=1e-5, exact_order=True)


def test_threshold_skip_and_late_winners(monkeypatch):
    """A bank whose best rows come first, so most later tiles cannot beat any row's k-th score
    and skip the merge, with a few winners planted in late tiles that must still get in."""
    _small_tiles(monkeypatch)
    g = torch.Generator().manual_seed(15)
    e = torch.nn.functional.normalize(torch.randn(1, 16, generator=g), dim=1)
    q = torch.nn.functional.normalize(e + 0.01 * torch.randn(20, 16, generator=g), dim=1)
    lvl = torch.linspace(0.9, -0.9, 300)[:, None]
    noise = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=1)
    b = lvl * e + 0.05 * noise
    b[[150, 233, 299]] = e * torch.tensor([[0.95], [1.0], [0.97]])  # late winners
    q, b = q.to(DEV), b.to(DEV)
    for splits in (1, 2):
        s, i = K.knn_topk(q, b, 6, splits=splits)
        _check(q, b, 6, s, i, atol=1e-5, gap=1e-5, exact_order=True)
        assert {150, 233, 299} <= set(i[0].tolist())


@pytest.mark.parametrize("small", [False, True])
def test_exact_ties_go_to_lower_index(monkeypatch, small):
    """Duplicate bank rows (integer-valued, so every score is exact): equal scores come out in
    ascending bank index, across tiles and splits too."""
    if small:
        _small_tiles(monkeypatch)
    g = torch.Generator().manual_seed(11)
    distinct = torch.randint(-2, 3, (6, 24), generator=g).double()
    b = distinct[torch.randint(0, 6, (290,), generator=g)]
    q = torch.randint(-2, 3, (12, 24), generator=g).double()
    q[0] = 0.0          # a query whose every score is exactly 0: the first k rows, in order
    q, b = q.float().to(DEV), b.float().to(DEV)
    ref_s, ref_i = _brute(q, b)
    for k in (1, 9, 64, 200):
        for splits in ((1, 4) if small else (None,)):
            s, i = K.knn_topk(q, b, k, splits=splits)
            assert torch.equal(i.cpu(), ref_i[:, :k].cpu())
            assert torch.equal(s.double().cpu(), ref_s[:, :k].cpu())
    assert torch.equal(K.knn_topk(q, b, 64)[1][0].cpu(), torch.arange(64))


def test_bias_ties_and_negative_scores():
    """Negative scores (order of the sign-flipped keys) and ties created by the bias."""
    g = torch.Generator().manual_seed(12)
    b = torch.randint(-3, 4, (200, 8), generator=g).float()
    q = torch.randint(-3, 4, (10, 8), generator=g).float()
    bias = -torch.randint(80, 100, (200,), generator=g).float()   # every score negative
    q, b, bias = q.to(DEV), b.to(DEV), bias.to(DEV)
    ref_s, ref_i = _brute(q, b, bias)
    assert bool((ref_s < 0).all())
    s, i = K.knn_topk(q, b, 33, bank_bias=bias)
    assert torch.equal(i.cpu(), ref_i[:, :33].cpu())
    assert torch.equal(s.double().cpu(), ref_s[:, :33].cpu())


def test_strided_rows_and_empty_queries():
    """Row strides larger than D are used as given; Q = 0 returns empty results."""
    wide_q, wide_b = _unit(20, 64, seed=13), _unit(150, 64, seed=14)
    q, b = wide_q[:, :32], wide_b[:, :32]
    assert q.stride(0) == 64 and not q.is_contiguous()
    s, i = K.knn_topk(q, b, 8)
    s2, i2 = K.knn_topk(q.contiguous(), b.contiguous(), 8)
    assert torch.equal(s, s2) and torch.equal(i, i2)
    _check(q, b, 8, s, i, atol=1e-5, gap=1e-5, exact_order=True)
    s, i = K.knn_topk(q[:0], b, 3)
    assert s.shape == (0, 3) and i.shape == (0, 3) and i.dtype == torch.int64


# ----------------------------------------------------------------------------------------------
# Input checking
# ----------------------------------------------------------------------------------------------
def test_bad_input_raises_naming_the_argument():
    q, b = _unit(4, 8), _unit(300, 8)
    cases = [
        ((q[0], b, 1), {}, "queries"),
        ((q, b[None], 1), {}, "bank"),
        ((q, _unit(300, 9), 1), {}, "D"),
        ((q, b.to(torch.bfloat16), 1), {}, "dtype"),
        ((q.double(), b.double(), 1), {}, "dtype"),
        ((q, b, 0), {}, "k"),
        ((q, b, 301), {}, "k"),
        ((q, b, 2.0), {}, "k"),
        ((q, b, 1), dict(bank_bias=torch.zeros(299, device=DEV)), "bank_bias"),
    ]
    for args, kw, word in cases:
        with pytest.raises(ValueError, match=word):
            K.knn_topk(*args, **kw)
    with pytest.raises(ValueError, match=r"k=257.*MAX_K=256"):
        K.knn_topk(q, b, K.MAX_K + 1)
    assert K.MAX_K == 256


def _brute_ordered(q, b, k, bias=None):
    s = q.float() @ b.float().t()
    if bias is not None:
        s = s + bias
    idx = torch.arange(b.shape[0]).expand_as(s)
    # ties to the lower index: sort by index, then stably by score
    o = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    return s.gather(1, o), idx.gather(1, o)


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("crowded", ["spread", "contiguous", "one_partition"])
def test_large_k_partitioned_search_is_exact(crowded, chunked, monkeypatch):
    """k beyond the kernel's MAX_K: interleaved partitions of the bank through the fused kernel,
    merged; queries whose k-th score a full partition could hide are redone exactly.
    `contiguous` puts the best neighbours of every query into the bank's first 150 rows (a bank
    stored class by class): spread over the interleaved partitions, no redo. `one_partition`
    puts them on rows 0, 13, 26, ... (one partition of the 13), which forces the redo. `chunked`
    bounds the merge's memory so the 6 queries go through in passes of 4 and 2."""
    from pyssl.ops import knn as KNN
    if chunked:   # 13 partitions × 32 candidates × 48 bytes per query: 4 queries per pass
        monkeypatch.setattr(KNN, "LARGE_K_MERGE_BYTES", 4 * 13 * 32 * 48)
    passes = []
    rows_fn = KNN._search_triton_large_rows
    monkeypatch.setattr(KNN, "_search_triton_large_rows",
                        lambda qq, *a: (passes.append(qq.shape[0]), rows_fn(qq, *a))[1])
    redone = []
    exact = KNN._search_torch
    monkeypatch.setattr(KNN, "_search_torch", lambda qq, *a, **kw: (redone.append(qq.shape[0]), exact(qq, *a, **kw))[1])
    g = torch.Generator().manual_seed(5)
    q = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=1)
    b = torch.nn.functional.normalize(torch.randn(1200, 16, generator=g), dim=1)
    if crowded != "spread":   # 6 queries about one direction, 150 bank rows close to it
        base = torch.randn(16, generator=g)
        q = torch.nn.functional.normalize(base + 0.1 * torch.randn(6, 16, generator=g), dim=1)
        near = torch.nn.functional.normalize(base + 0.05 * torch.randn(150, 16, generator=g), dim=1)
        if crowded == "contiguous":
            b[:150] = near
        else:                  # rows 0, 13, 26, ...: partition 0 of 13 (93 rows)
            b[::13] = near[:93]
    bias = torch.randn(1200, generator=g) * 0.01
    dev = device_for("triton")
    for bb in (None, bias):
        s, i = KNN._search_triton_large(q.to(dev), b.to(dev), 100, None if bb is None else bb.to(dev),
                                        part_k=32)   # 13 partitions of 93 rows
        ws, wi = _brute_ordered(q, b, 100, bb)
        torch.testing.assert_close(s.cpu(), ws, atol=1e-5, rtol=1e-5)
        if crowded == "spread":
            assert torch.equal(i.cpu(), wi)
        else:   # crowded scores lie ~1e-4 apart: float32 rounding may swap two, nothing else
            full = q.double() @ b.double().t() + (0 if bb is None else bb.double())
            got = full.gather(1, i.cpu())
            assert (got - ws.double()).abs().max() < 1e-5
            assert all(len(set(r)) == 100 for r in i.cpu().tolist())
    # neighbours spread over the partitions never need the redo; crowded into one they do
    assert (len(redone) > 0) == (crowded == "one_partition")
    assert passes == ([4, 2, 4, 2] if chunked else [6, 6])


def test_search_routes_large_k_to_the_partitioned_triton_path():
    from pyssl.ops import knn as KNN
    g = torch.Generator().manual_seed(6)
    q = torch.randn(4, 16, generator=g)
    b = torch.randn(700, 16, generator=g)
    dev = device_for("triton")
    assert KNN.not_supported_reasons(q.to(dev), 300)["triton"] == []
    s, i = KNN.search(q.to(dev), b.to(dev), 300, backend="triton")
    ws, wi = _brute_ordered(q, b, 300)
    torch.testing.assert_close(s.cpu(), ws, atol=1e-4, rtol=1e-5)
    assert torch.equal(i.cpu(), wi)
