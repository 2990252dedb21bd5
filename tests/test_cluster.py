"""Clustering and top-l assignment: against scikit-learn and brute force."""
import numpy as np
import pytest
import torch

import pyssl
from conftest import device_for


def _blobs(n=3000, k=12, d=16, seed=0):
    g = np.random.default_rng(seed)
    centers = g.normal(0, 6, (k, d))
    labels = g.integers(0, k, n)
    return (centers[labels] + g.normal(0, 1, (n, d))).astype(np.float32)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_kmeans_inertia_close_to_sklearn(backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    skc = pytest.importorskip("sklearn.cluster")
    x = _blobs()
    cent = pyssl.cluster.kmeans(x, 12, niter=25, seed=0, spherical=False, backend=backend).numpy()
    ours = ((x[:, None, :] - cent[None]) ** 2).sum(2).min(1).sum()
    ref = skc.KMeans(12, n_init=1, random_state=0, max_iter=25).fit(x).inertia_
    assert ours <= ref * 1.02, (ours, ref)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_spherical_kmeans_unit_centroids_and_seeded(backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    x = torch.from_numpy(_blobs(n=1200, k=8, d=10, seed=1))
    a = pyssl.cluster.kmeans(x, 8, seed=3, backend=backend)
    b = pyssl.cluster.kmeans(x, 8, seed=3, backend=backend)
    assert a.shape == (8, 10)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(8), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, b)                    # same seed, same centroids
    # every cluster is used and the within-cluster cosine is high on separated blobs
    xn = torch.nn.functional.normalize(x, dim=1)
    sims = xn @ a.t()
    assert torch.bincount(sims.argmax(1), minlength=8).min() > 0
    assert sims.max(1).values.mean() > 0.9


def test_kmeans_empty_cluster_is_reseeded():
    x = torch.cat([torch.zeros(50, 3), torch.ones(50, 3) * 10]) + 0.01 * torch.randn(100, 3)
    cent = pyssl.cluster.kmeans(x, 4, niter=10, seed=0, spherical=False, backend="torch")
    assert torch.isfinite(cent).all() and cent.shape == (4, 3)


@pytest.mark.parametrize("backend", ["cpu", "faiss", "torch", "triton"])
def test_topk_assign_matches_brute_force_with_memmap(backend, tmp_path):
    if backend == "faiss":
        pytest.importorskip("faiss")
    g = np.random.default_rng(4)
    n, d, k, l = 530, 12, 40, 5
    path = tmp_path / "x.f32"
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=(n, d))
    mm[:] = g.normal(size=(n, d))
    mm.flush()
    x = np.memmap(path, dtype=np.float32, mode="r", shape=(n, d))
    cent = torch.from_numpy(g.normal(size=(k, d)).astype(np.float32)).to(device_for(backend))
    idx_mm = np.memmap(tmp_path / "idx.i64", dtype=np.int64, mode="w+", shape=(n, l))
    sim_mm = np.memmap(tmp_path / "sim.f32", dtype=np.float32, mode="w+", shape=(n, l))
    idx, sim = pyssl.cluster.topk_assign(x, cent, l=l, batch_size=64, out=(idx_mm, sim_mm), backend=backend)
    xn = torch.nn.functional.normalize(torch.from_numpy(np.array(x)), dim=1)
    cn = torch.nn.functional.normalize(cent.cpu(), dim=1)
    ws, wi = (xn @ cn.t()).topk(l, dim=1)
    assert torch.equal(idx, wi)
    torch.testing.assert_close(sim, ws, rtol=1e-5, atol=1e-5)
    # the results live in the memmaps, on disk
    back = np.memmap(tmp_path / "idx.i64", dtype=np.int64, mode="r", shape=(n, l))
    assert np.array_equal(np.asarray(back), wi.numpy())


def test_topk_assign_and_spherical_kmeans_at_any_feature_scale():
    """Cosine assignment does not depend on the features' scale: rows of norm ~1e20 (float32
    squared norms overflow) or ~1e-20 (below F.normalize's 1e-12 floor) get the same centers and
    similarities as at unit scale, and spherical k-means' centroids are the same."""
    g = np.random.default_rng(6)
    x = torch.from_numpy(g.normal(size=(200, 8)).astype(np.float32))
    cent = torch.from_numpy(g.normal(size=(10, 8)).astype(np.float32))
    want_i, want_s = pyssl.cluster.topk_assign(x, cent, l=3, backend="torch")
    for scale in (1e20, 1e-20):
        i, s = pyssl.cluster.topk_assign(x * scale, cent / scale, l=3, backend="torch")
        assert torch.equal(i, want_i)
        torch.testing.assert_close(s, want_s)
    c1 = pyssl.cluster.kmeans(x, 4, niter=5, seed=0, backend="torch")
    c2 = pyssl.cluster.kmeans(x * 1e20, 4, niter=5, seed=0, backend="torch")
    torch.testing.assert_close(c1, c2)


def test_kmeans_same_subset_for_a_memmap_and_a_tensor(tmp_path):
    """The training subsample (max_points_per_centroid·k rows) and everything after it are the
    same whether the data comes as a memmap or as a tensor: the same seed, the same centroids."""
    a = np.random.default_rng(1).normal(size=(3000, 6)).astype(np.float32)
    path = tmp_path / "a.npy"
    mm = np.lib.format.open_memmap(path, "w+", np.float32, a.shape)
    mm[:] = a
    mm.flush()
    kw = dict(niter=3, seed=0, max_points_per_centroid=50, backend="torch")
    c1 = pyssl.cluster.kmeans(np.load(path, mmap_mode="r"), 10, **kw)
    c2 = pyssl.cluster.kmeans(torch.from_numpy(a), 10, **kw)
    assert torch.equal(c1, c2)


def test_kmeanspp_beyond_2_to_24_points():
    """k-means++ on more than 2^24 points (torch.multinomial's limit) draws on the device."""
    x = torch.rand(2 ** 24 + 5, 1, generator=torch.Generator().manual_seed(0))
    c = pyssl.cluster.kmeans(x, 2, niter=0, seed=0, spherical=False, init="k-means++",
                             max_points_per_centroid=2 ** 25, backend="torch")
    assert c.shape == (2, 1) and torch.isfinite(c).all()


def test_empty_cluster_split_survives_a_large_offset():
    """Splitting the largest cluster for an empty one nudges it relative to its coordinates: at
    an offset of 1e4 an absolute 1e-4 nudge vanished in float32 rounding and left most of 400
    centroids duplicated (51 distinct before)."""
    torch.manual_seed(0)
    x = torch.randn(4000, 8) * 0.1 + 1e4
    x[:2000] += 1.0
    c = pyssl.cluster.kmeans(x, 400, niter=10, seed=0, spherical=False, backend="torch", init="random")
    assert torch.unique(c, dim=0).shape[0] > 300


def test_lloyd_streams_the_sample_in_blocks(monkeypatch):
    """Lloyd's passes take the sample in blocks (a sample too large for the GPU streams from the
    host): blocks of 37 rows give the clustering of one block, to float32 summation order. Where
    the sample lives: on the GPU when it fits, else on the host; always on the host for faiss."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(500, 6, generator=g) + torch.randint(0, 4, (500, 1), generator=g) * 3.0
    kw = dict(niter=8, seed=1, spherical=False, backend="torch")
    whole = pyssl.cluster.kmeans(x, 5, **kw)
    monkeypatch.setattr(pyssl.cluster, "LLOYD_BLOCK_ROWS", 37)
    torch.testing.assert_close(pyssl.cluster.kmeans(x, 5, **kw), whole, rtol=1e-5, atol=1e-5)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for fits in (True, False):
        monkeypatch.setattr(pyssl.cluster, "_fits_on", lambda dev, nbytes: fits or dev.type != "cuda")
        assert pyssl.cluster._placement(cuda, False, 1 << 40) == (cuda if fits else cpu)
        assert pyssl.cluster._placement(cuda, True, 1 << 40) == cpu       # faiss: host arrays
        assert pyssl.cluster._placement(cpu, False, 1 << 40) == cpu


def test_kmeanspp_seeds_from_a_bounded_subset(monkeypatch):
    """k-means++ seeds from a seeded subset of at most KMEANSPP_MAX_POINTS rows (on the device,
    whatever the sample's size or where it lives): the seeds are rows of that subset, the same on
    every call."""
    monkeypatch.setattr(pyssl.cluster, "KMEANSPP_MAX_POINTS", 100)
    x = torch.randn(500, 4, generator=torch.Generator().manual_seed(6))
    kw = dict(niter=0, seed=2, spherical=False, backend="torch", init="k-means++")
    a = pyssl.cluster.kmeans(x, 6, **kw)
    torch.testing.assert_close(a, pyssl.cluster.kmeans(x, 6, **kw), rtol=0, atol=0)
    g = torch.Generator().manual_seed(2)
    subset = x[torch.randperm(500, generator=g)[:100].sort().values]
    assert all(bool((subset == c).all(1).any()) for c in a)


def test_bad_input_cluster():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="k=11 is larger than the number of points"):
        pyssl.cluster.kmeans(x, 11)
    with pytest.raises(TypeError, match="k must be an int"):
        pyssl.cluster.kmeans(x, 2.5)
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        pyssl.cluster.kmeans(torch.randn(10), 2)
    with pytest.raises(ValueError, match="non-finite"):
        pyssl.cluster.kmeans(torch.full((10, 3), float("nan")), 2)
    with pytest.raises(ValueError, match="l=6 is larger than the number of centroids"):
        pyssl.cluster.topk_assign(x, torch.randn(5, 3), l=6)
    with pytest.raises(ValueError, match="x has D=3 but centroids have D=4"):
        pyssl.cluster.topk_assign(x, torch.randn(5, 4), l=2)
    with pytest.raises(ValueError, match="out\\[0\\] must be a numpy array"):
        pyssl.cluster.topk_assign(x, torch.randn(5, 3), l=2, out=(np.zeros((10, 2)), np.zeros((10, 2), np.float32)))


@pytest.mark.parametrize("backend", ["auto", "cpu", "faiss", "torch"])
def test_topk_assign_refuses_non_finite_rows(backend):
    # the backends used to disagree on a NaN row (-1, INT64_MAX, or valid-looking ids): refused
    if backend == "faiss":
        pytest.importorskip("faiss")
    x = torch.randn(50, 6)
    x[37, 2] = float("nan")
    cent = torch.randn(6, 6)
    with pytest.raises(ValueError, match=r"topk_assign: x holds non-finite values \(row 37;"):
        pyssl.cluster.topk_assign(x, cent, 3, batch_size=16, backend=backend)
    with pytest.raises(ValueError, match=r"x holds non-finite values \(row 37;"):
        pyssl.cluster.topk_assign(x.numpy(), cent, 3, batch_size=16, backend=backend)
    bad = cent.clone()
    bad[1, 0] = float("inf")
    with pytest.raises(ValueError, match="topk_assign: centroids hold non-finite values"):
        pyssl.cluster.topk_assign(torch.randn(5, 6), bad, 3, backend=backend)
    assert torch.isnan(x[37, 2])   # the input is left as it was


def test_topk_assign_refuses_all_zero_rows():
    """An all-zero feature row has no direction: every centroid ties at similarity 0 and it got
    centroids 0..l-1 as its MLCD positives without a word. Refused, naming the row, as is an
    all-zero centroid; a row of tiny values is still a direction."""
    x = torch.randn(50, 6)
    x[21] = 0
    cent = torch.randn(6, 6)
    with pytest.raises(ValueError, match=r"topk_assign: x has an all-zero row \(row 21;"):
        pyssl.cluster.topk_assign(x, cent, 3, batch_size=16)
    x[21] = 1e-30
    idx, sim = pyssl.cluster.topk_assign(x, cent, 3, batch_size=16)
    torch.testing.assert_close(sim[21], pyssl.cluster.topk_assign(x[21:22] * 1e30, cent, 3)[1][0])
    cent[4] = 0
    with pytest.raises(ValueError, match=r"topk_assign: centroids hold an all-zero row \(row 4\)"):
        pyssl.cluster.topk_assign(x, cent, 3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is absent")
def test_gpu_without_cuda_names_the_function():
    with pytest.raises(ValueError, match="kmeans: gpu=True but CUDA is not available"):
        pyssl.cluster.kmeans(torch.randn(10, 3), 2, gpu=True)
    with pytest.raises(ValueError, match="topk_assign: gpu=True but CUDA is not available"):
        pyssl.cluster.topk_assign(torch.randn(10, 3), torch.randn(4, 3), 2, gpu=True)


def test_kmeans_reads_only_a_sample_of_a_large_memmap(tmp_path):
    n, d, k = 5000, 4, 3
    mm = np.memmap(tmp_path / "x.f32", dtype=np.float32, mode="w+", shape=(n, d))
    mm[:] = np.random.default_rng(0).normal(size=(n, d))
    mm.flush()
    x = np.memmap(tmp_path / "x.f32", dtype=np.float32, mode="r", shape=(n, d))
    cent = pyssl.cluster.kmeans(x, k, niter=5, max_points_per_centroid=100, backend="torch")
    assert cent.shape == (k, d) and torch.isfinite(cent).all()
    again = pyssl.cluster.kmeans(x, k, niter=5, max_points_per_centroid=100, backend="torch")
    torch.testing.assert_close(cent, again)


def test_read_only_memmap_without_warnings(tmp_path):
    # np.load(mmap_mode="r") as the README shows: wrapped in place, no "not writable" warning.
    # In a fresh process: torch gives that warning once per process, so an earlier test that
    # triggered it would hide it here.
    import subprocess
    import sys
    import textwrap
    script = textwrap.dedent(f"""
        import warnings, numpy as np, torch, pyssl
        path = {str(tmp_path / "feats.npy")!r}
        np.save(path, np.random.default_rng(1).normal(size=(300, 8)).astype(np.float32))
        x = np.load(path, mmap_mode="r")
        warnings.simplefilter("error")
        cent = pyssl.cluster.kmeans(x, 4, niter=3, backend="torch")
        pyssl.ood.KNNScorer(3).fit(x).score(x[:5])
        idx, _ = pyssl.cluster.topk_assign(x, cent, 2)
        assert idx.shape == (300, 2)
        assert np.array_equal(np.load(path), np.asarray(x))
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_kmeanspp_never_reads_the_device():
    """k-means++ seeding runs without host syncs (as its docstring says): on meta tensors, where
    any read of a value fails, it goes through (it indexed with 0-d tensors: two syncs per
    center on a GPU)."""
    x = torch.empty(50, 4, device="meta")
    c = pyssl.cluster._kmeanspp(x, 5, torch.Generator().manual_seed(0))
    assert c.shape == (5, 4) and c.device.type == "meta"
