"""OOD scores and metrics: against scikit-learn, brute force and hand computations."""
import numpy as np
import pytest
import torch

import pyssl
from pyssl.ops import knn as KNN
from conftest import device_for

sk = pytest.importorskip("sklearn.metrics")


def _scores(seed=0, n_id=300, n_ood=200, ties=False):
    g = np.random.default_rng(seed)
    a, b = g.normal(1.0, 1.0, n_id), g.normal(0.0, 1.0, n_ood)
    if ties:
        a, b = np.round(a, 1), np.round(b, 1)
    return a, b


@pytest.mark.parametrize("ties", [False, True])
def test_metrics_match_sklearn(ties):
    a, b = _scores(ties=ties)
    m = pyssl.ood.metrics(torch.tensor(a), torch.tensor(b))
    y = np.r_[np.ones(a.size), np.zeros(b.size)]
    s = np.r_[a, b]
    assert m["auroc"] == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)
    assert m["aupr_in"] == pytest.approx(sk.average_precision_score(y, s), abs=1e-12)
    assert m["aupr_out"] == pytest.approx(sk.average_precision_score(1 - y, -s), abs=1e-12)


def test_fpr95_both_conventions_by_hand():
    # 20 ID scores 1..20, 10 OOD scores; keeping 95% of ID (19 of 20) puts the threshold at 2
    idv = np.arange(1, 21, dtype=float)
    oodv = np.array([0.5, 1.5, 2.0, 2.5, 3, 4, 5, 30, 40, 50], dtype=float)
    m = pyssl.ood.metrics(idv, oodv)
    assert m["fpr95"] == pytest.approx(8 / 10)          # OOD ≥ 2: 2.0 2.5 3 4 5 30 40 50
    # catching 95% of OOD (10 of 10, ceil(9.5)) puts the threshold at 50: every ID is flagged
    assert m["fpr95_ood_positive"] == pytest.approx(1.0)
    oodv2 = np.r_[np.linspace(-10, 0, 19), 100.0]        # 19 of 20 OOD ≤ 0 → threshold 0
    m2 = pyssl.ood.metrics(idv, oodv2)
    assert m2["fpr95_ood_positive"] == 0.0
    assert m2["fpr95"] == pytest.approx(1 / 20)
    # separable scores: perfect metrics
    m3 = pyssl.ood.metrics(np.array([3.0, 4.0]), np.array([1.0, 2.0]))
    assert m3 == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0, "fpr95_ood_positive": 0.0}


def test_logit_scores():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.1, 0.2, 0.3]])
    torch.testing.assert_close(pyssl.ood.msp(logits), torch.softmax(logits, 1).max(1).values)
    torch.testing.assert_close(pyssl.ood.max_logit(logits), torch.tensor([2.0, 0.3]))
    torch.testing.assert_close(pyssl.ood.energy(logits, temperature=2.0), 2.0 * torch.logsumexp(logits / 2.0, 1))


@pytest.mark.parametrize("backend", ["cpu", "faiss", "torch", "triton"])
@pytest.mark.parametrize("normalize", [True, False])
def test_knn_scorer_matches_brute_force(backend, normalize):
    if backend == "faiss":
        pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(500, 24, generator=g) * 3
    x = torch.randn(37, 24, generator=g) * 3
    dev = device_for(backend)
    sc = pyssl.ood.KNNScorer(k=7, normalize=normalize, backend=backend).fit(bank.to(dev))
    got = sc.score(x.to(dev)).cpu()
    b, q = (torch.nn.functional.normalize(bank, dim=1), torch.nn.functional.normalize(x, dim=1)) if normalize else (bank, x)
    d2 = torch.cdist(q.double(), b.double()).pow(2)
    want = -d2.sort(1).values[:, 6]
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_knn_scorer_keeps_16_bit_banks_on_the_gpu(dtype):
    """A bf16/fp16 bank on CUDA is searched in its own dtype (normalized in float32 first); on the
    CPU it is searched in float32. Scores agree with float32 to 16-bit rounding of the rows."""
    dev = device_for("triton")
    g = torch.Generator().manual_seed(2)
    bank = (torch.randn(400, 32, generator=g) * 3).to(dev, dtype)
    x = (torch.randn(20, 32, generator=g) * 3).to(dev, dtype)
    sc = pyssl.ood.KNNScorer(k=5).fit(bank)
    assert sc.bank.dtype == (dtype if dev == "cuda" else torch.float32)
    ref = pyssl.ood.KNNScorer(k=5).fit(bank.float()).score(x.float())
    got = sc.score(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-2)


def test_knn_backends_agree_and_break_ties_low_index():
    g = torch.Generator().manual_seed(1)
    bank = torch.randn(300, 16, generator=g)
    bank[150] = bank[20]                              # an exact duplicate
    q = torch.cat([bank[20:21], torch.randn(9, 16, generator=g)])
    s_t, i_t = KNN.search(q, bank, 5, backend="torch")
    assert i_t[0, 0] == 20 and i_t[0, 1] == 150
    for backend in ("triton", "cpu"):
        dev = device_for(backend)
        s_k, i_k = KNN.search(q.to(dev), bank.to(dev), 5, backend=backend)
        torch.testing.assert_close(s_k.cpu(), s_t, rtol=1e-5, atol=1e-5)
        assert torch.equal(i_k.cpu(), i_t), backend
    if KNN.faiss_module() is not None:
        s_f, i_f = KNN.search(q, bank, 5, backend="faiss")
        torch.testing.assert_close(s_f, s_t, rtol=1e-5, atol=1e-5)
        assert torch.equal(i_f[1:], i_t[1:])          # faiss orders exact ties its own way


def test_knn_cpu_kernel_across_blocks():
    """Bank and query counts beyond one 8192×512 block of the C++ kernel, with bias (L2) and
    planted exact ties across blocks."""
    g = torch.Generator().manual_seed(5)
    bank = torch.randn(9000, 8, generator=g)
    bank[8500] = bank[100]
    q = torch.cat([bank[100:101], torch.randn(600, 8, generator=g)])
    for bias in (None, KNN.l2_bias(bank)):
        s_t, i_t = KNN.search(q, bank, 9, bank_bias=bias, backend="torch")
        s_c, i_c = KNN.search(q, bank, 9, bank_bias=bias, backend="cpu")
        torch.testing.assert_close(s_c, s_t, rtol=1e-5, atol=1e-4)
        gap = (s_t[:, :-1] - s_t[:, 1:]).abs().min(1).values > 1e-4
        assert torch.equal(i_c[gap], i_t[gap])
    assert i_c[0, 0] == 100 and i_c[0, 1] == 8500


def test_mahalanobis_matches_dense_formula():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200, 6, generator=g)
    y = torch.randint(0, 4, (200,), generator=g)
    x = x + y[:, None].float() * 2
    q = torch.randn(15, 6, generator=g)
    got = pyssl.ood.MahalanobisScorer().fit(x, y).score(q)
    xd, qd = x.double(), q.double()
    mus = torch.stack([xd[y == c].mean(0) for c in range(4)])
    cen = xd - mus[y]
    prec = torch.linalg.inv(cen.t() @ cen / 200)
    diff = qd[:, None, :] - mus[None]
    want = -torch.einsum("ncd,de,nce->nc", diff, prec, diff).min(1).values
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_vim_separates_residual_outliers():
    g = torch.Generator().manual_seed(3)
    d, c = 16, 5
    basis = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    inlier = torch.randn(400, 8, generator=g) @ basis[:, :8].t()        # lives in an 8-dim subspace
    w, b = torch.randn(c, d, generator=g), torch.randn(c, generator=g)
    outlier = inlier[:50] + 3 * torch.randn(50, 8, generator=g) @ basis[:, 8:].t()
    vim = pyssl.ood.ViMScorer(dim=8).fit(inlier, w, b)
    m = pyssl.ood.metrics(vim.score(inlier[:50]), vim.score(outlier))
    assert m["auroc"] > 0.95


def test_feature_scorers_keep_float64():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(120, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (120,), generator=g)
    w, b = torch.randn(4, 10, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    maha = pyssl.ood.MahalanobisScorer().fit(x, y)
    vim = pyssl.ood.ViMScorer(dim=5).fit(x, w, b)
    for scorer in (maha, vim):
        s64 = scorer.score(x[:7])
        assert s64.dtype == torch.float64
        assert scorer.score(x[:7].float()).dtype == torch.float32
        assert scorer.score(x[:7].numpy()).dtype == torch.float64
        torch.testing.assert_close(scorer.score(x[:7].float()), s64.float(), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="fitted D=10"):
        vim.score(x[:3, :9])


def test_logit_scores_keep_float64():
    logits = torch.tensor([[1e4, 1e4 + 1e-6, 0.0]], dtype=torch.float64)
    for f in (pyssl.ood.msp, pyssl.ood.energy, pyssl.ood.max_logit):
        assert f(logits).dtype == torch.float64
    assert pyssl.ood.max_logit(logits).item() == 1e4 + 1e-6     # float32 would round it to 1e4
    assert pyssl.ood.msp(logits.half()).dtype == torch.float32  # 16-bit logits are scored in float32


def test_metrics_keep_float64_resolution():
    # scores that differ only below float32's resolution: a float64 tensor ranks them as numpy does
    a = torch.tensor([1 + 1e-9, 1 + 2e-9], dtype=torch.float64)
    b = torch.tensor([1.0, 1 + 5e-10], dtype=torch.float64)
    m = pyssl.ood.metrics(a, b)
    assert m == pyssl.ood.metrics(a.numpy(), b.numpy())
    assert m["auroc"] == 1.0 and m["fpr95"] == 0.0


@pytest.mark.parametrize("backend", ["auto", "cpu", "faiss", "torch"])
def test_knn_scorer_non_finite_features(backend):
    # the backends disagreed (faiss dropped NaN bank rows silently, torch's scores went NaN):
    # a bank with one is refused, a query with one scores NaN on every backend
    if backend == "faiss":
        pytest.importorskip("faiss")
    bank = torch.randn(40, 6)
    bank[::2, 0] = float("nan")
    with pytest.raises(ValueError, match="KNNScorer: bank holds non-finite values"):
        pyssl.ood.KNNScorer(3, backend=backend).fit(bank)
    big = torch.randn(40, 6, dtype=torch.float64)
    big[5, 1] = 1e300                          # finite in float64, inf in float32
    with pytest.raises(ValueError, match="KNNScorer: bank holds non-finite values"):
        pyssl.ood.KNNScorer(3, backend=backend, normalize=False).fit(big)
    q = torch.randn(5, 6)
    clean = pyssl.ood.KNNScorer(3, backend=backend).fit(torch.randn(40, 6, generator=torch.Generator().manual_seed(0)))
    want = clean.score(q)
    q[3, 1] = float("-inf")
    got = clean.score(q)
    assert torch.isnan(got[3]) and not torch.isnan(got[[0, 1, 2, 4]]).any()
    torch.testing.assert_close(got[[0, 1, 2, 4]], want[[0, 1, 2, 4]])


def test_bad_input_ood():
    with pytest.raises(ValueError, match="k must be >= 1"):
        pyssl.ood.KNNScorer(k=0)
    with pytest.raises(TypeError, match="k must be an int"):
        pyssl.ood.KNNScorer(k=2.0)
    with pytest.raises(ValueError, match="k=10 is larger than the number of bank rows"):
        pyssl.ood.KNNScorer(k=10).fit(torch.randn(5, 3))
    with pytest.raises(ValueError, match="call fit"):
        pyssl.ood.KNNScorer(k=1).score(torch.randn(5, 3))
    with pytest.raises(ValueError, match="x has D=4"):
        pyssl.ood.KNNScorer(k=1).fit(torch.randn(5, 3)).score(torch.randn(2, 4))
    with pytest.raises(ValueError, match="bank must have 2 dimensions"):
        pyssl.ood.KNNScorer(k=1).fit(torch.randn(5))
    with pytest.raises(ValueError, match="id_scores must be a non-empty"):
        pyssl.ood.metrics([], [1.0])
    with pytest.raises(TypeError, match="metrics: id_scores must be a 1-D tensor or array of real scores"):
        pyssl.ood.metrics("ab", [1.0])
    with pytest.raises(TypeError, match="metrics: ood_scores must be a 1-D tensor or array of real scores"):
        pyssl.ood.metrics([1.0], ["a", "b"])
    with pytest.raises(ValueError, match="metrics: id_scores must be a 1-D array of scores"):
        pyssl.ood.metrics([[1.0, 2.0], [3.0]], [1.0])
    with pytest.raises(ValueError, match="ood_scores holds non-finite"):
        pyssl.ood.metrics([1.0], [float("nan")])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        pyssl.ood.energy(torch.randn(2, 3), temperature=0.0)
    with pytest.raises(ValueError, match="logits must have 2 dimensions"):
        pyssl.ood.msp(torch.randn(3))
    with pytest.raises(ValueError, match="backend must be one of"):
        pyssl.ood.KNNScorer(backend="gpu")
    # not real scores: refused rather than cast (complex would lose its imaginary part)
    for bad in (np.array([1 + 2j, 2.0]), torch.tensor([1 + 1j]), np.array(["1", "2"]),
                np.array(["2020-01-01"], dtype="datetime64[D]"), None):
        with pytest.raises(TypeError, match="id_scores must .*real scores"):
            pyssl.ood.metrics(bad, [1.0, 2.0])
    # the feature scorers: score before fit, non-finite fits, dim's type
    for scorer in (pyssl.ood.MahalanobisScorer(), pyssl.ood.ViMScorer()):
        with pytest.raises(ValueError, match="call fit"):
            scorer.score(torch.randn(3, 4))
    nan_x = torch.tensor([[float("nan"), 1.0], [1.0, 2.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="MahalanobisScorer: features holds non-finite"):
        pyssl.ood.MahalanobisScorer().fit(nan_x, torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="ViMScorer: features holds non-finite"):
        pyssl.ood.ViMScorer(1).fit(nan_x, torch.randn(3, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="ViMScorer: weight holds non-finite"):
        pyssl.ood.ViMScorer(1).fit(torch.randn(5, 2), torch.full((3, 2), float("inf")), torch.zeros(3))
    for dim in (2.0, True):
        with pytest.raises(TypeError, match="dim must be an int"):
            pyssl.ood.ViMScorer(dim)


def test_energy_at_a_tiny_temperature_tends_to_the_max_logit():
    """logits / T overflows float32 at T = 1e-40: the score is computed around the row's max
    (T·logsumexp(x/T) -> max x as T -> 0), finite, and unchanged at ordinary temperatures."""
    logits = torch.randn(6, 5)
    got = pyssl.ood.energy(logits, temperature=1e-40)
    torch.testing.assert_close(got, logits.max(1).values)
    torch.testing.assert_close(pyssl.ood.energy(logits, temperature=0.7), 0.7 * torch.logsumexp(logits / 0.7, 1))


@pytest.mark.parametrize("backend", ["cpu", "faiss", "torch", "triton"])
def test_knn_scorer_raw_features_far_from_the_origin(backend):
    """normalize=False with a common offset of 1e3 and 1e4 (features of a model without a
    centered output): the search's float32 ‖q‖² − 2q·b + ‖b‖² lost the distances to the offset
    (35% and 100% off); around the bank's mean (float64) they keep float32 accuracy. A query of
    the wrong width is a named error before any arithmetic; a refit that fails keeps the old
    bank and its center."""
    if backend == "faiss" and KNN.faiss_module() is None:
        pytest.skip("faiss is not installed")
    dev = device_for(backend)
    g = torch.Generator().manual_seed(8)
    for off in (1e3, 1e4):
        bank = torch.randn(600, 16, generator=g) + off
        q = torch.randn(40, 16, generator=g) + off
        want = -torch.cdist(q.double(), bank.double()).pow(2).sort(1).values[:, 4]
        sc = pyssl.ood.KNNScorer(5, normalize=False, backend=backend).fit(bank.to(dev))
        torch.testing.assert_close(sc.score(q.to(dev)).cpu().double(), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="x has D=15 but the bank has D=16"):
        sc.score(q[:, :15].to(dev))
    bad = bank.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        sc.fit(bad.to(dev))
    torch.testing.assert_close(sc.score(q.to(dev)).cpu().double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["cpu", "torch", "faiss"])
def test_knn_scorer_normalizes_features_of_any_scale(backend):
    """Features of norm 1e20 (their float32 squared norm overflows), 1e-20 (below the 1e-12 floor
    of F.normalize) or float64 1e-50 (zero once cast to float32) are still unit vectors: two
    orthogonal bank rows score -(‖e1 − e2‖²) = -2 at k = 2, as at unit scale."""
    if backend == "faiss" and KNN.faiss_module() is None:
        pytest.skip("faiss is not installed")
    for scale, dtype in ((1e20, torch.float32), (1e-20, torch.float32), (1e-50, torch.float64), (1.0, torch.float32)):
        bank = torch.tensor([[scale, 0.0], [0.0, scale]], dtype=dtype)
        got = pyssl.ood.KNNScorer(k=2, backend=backend).fit(bank).score(bank[:1])
        torch.testing.assert_close(got, torch.tensor([-2.0], dtype=got.dtype), msg=f"scale {scale}")


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_knn_ties_at_the_kth_place_go_to_lower_indices(backend):
    g = torch.Generator().manual_seed(6)
    bank = torch.randn(200, 8, generator=g) * 0.1
    v = torch.ones(8)
    tied = torch.tensor([170, 30, 99, 5, 140, 61])          # six equal best rows, k = 4
    bank[tied] = v
    dev = device_for(backend)
    s, i = KNN.search(v[None].to(dev), bank.to(dev), 4, backend=backend)
    assert i[0].tolist() == [5, 30, 61, 99]
    torch.testing.assert_close(s[0].cpu(), torch.full((4,), 8.0))


def test_faiss_index_is_built_once_per_bank_and_rebuilt_when_it_changes(monkeypatch):
    """The faiss backend keeps the index of the last bank while that bank tensor lives unmodified
    (KNNScorer's calls, topk_assign's batches), rebuilds it after an in-place change, and drops
    it with the bank."""
    import gc
    import weakref
    faiss = KNN.faiss_module()
    if faiss is None:
        pytest.skip("faiss is not installed")
    built = []
    real = faiss.IndexFlatIP
    monkeypatch.setattr(faiss, "IndexFlatIP", lambda d: built.append(d) or real(d))
    g = torch.Generator().manual_seed(0)
    bank, q = torch.randn(50, 8, generator=g), torch.randn(7, 8, generator=g)
    for _ in range(3):
        s, i = KNN.search(q, bank, 3, backend="faiss")
    assert len(built) == 1
    want = (q @ bank.t()).topk(3, dim=1)
    assert torch.equal(i, want.indices)
    bank.mul_(-1.0)                                  # in place: a new version, a new index
    s, i = KNN.search(q, bank, 3, backend="faiss")
    assert len(built) == 2 and torch.equal(i, (q @ bank.t()).topk(3, dim=1).indices)
    old = weakref.ref(KNN._FAISS_CACHE["entry"])
    bias = KNN.l2_bias(bank)                         # another bias: another index
    KNN.search(q, bank, 3, bank_bias=bias, backend="faiss")
    assert len(built) == 3
    gc.collect()
    assert old() is None                             # the replaced index is freed at once
    # two banks in turn: each search rebuilds, and the replaced entries' finalizers are detached
    other = torch.randn(40, 8, generator=g)
    finalizers, entries = [], []
    for _ in range(50):
        for b in (bank, other):
            KNN.search(q, b, 3, backend="faiss")
            finalizers.append(KNN._FAISS_CACHE["entry"].finalizer)
            entries.append(weakref.ref(KNN._FAISS_CACHE["entry"]))
    gc.collect()
    assert sum(f.alive for f in finalizers) == 1 and sum(e() is not None for e in entries) == 1
    del bank, bias, other, b
    gc.collect()
    assert KNN._FAISS_CACHE["entry"] is None


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_knn_scorer_under_autocast_scores_as_without(backend):
    """The search's float32 products are not cast by a caller's autocast (the torch path's
    block GEMMs would have run in bfloat16 under a CPU autocast)."""
    g = torch.Generator().manual_seed(3)
    bank, q = torch.randn(300, 12, generator=g), torch.randn(20, 12, generator=g)
    sc = pyssl.ood.KNNScorer(4, backend=backend).fit(bank)
    want = sc.score(q)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sc.score(q)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
