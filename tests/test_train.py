"""The reference trainers (pyssl.train) on real images (scikit-learn's digits): each trains the
method for a few seconds and must show that the ops learned what the method asks of them, with
margins far from what an untrained model, a broken op or chance gives."""
import json

import numpy as np
import pytest
import torch

import pyssl
from pyssl import train as T
from pyssl.cli import main

from conftest import GPU, spawn_gloo

pytest.importorskip("sklearn")
DEV = "cuda" if GPU else "cpu"


@pytest.fixture(scope="module")
def data():
    return T.digits()


def test_digits_split(data):
    assert data.train_x.shape == (1348, 1, 8, 8) and data.test_x.shape == (449, 1, 8, 8)
    assert data.train_x.dtype == torch.float32 and 0.0 <= data.train_x.min() and data.train_x.max() <= 1.0
    assert data.num_classes == 10
    again = T.digits()
    assert torch.equal(again.test_y, data.test_y)
    assert not torch.equal(T.digits(seed=1).test_y, data.test_y)


def test_mlcd_learns_the_cluster_labels(data):
    """MLCD on k-means pseudo-labels: the encoder puts unseen test images next to one of their
    own l centers (chance l/C ≈ 0.09, measured at initialization). The kNN probe with the true
    labels cannot beat the pixels the pseudo-labels come from (a random CNN already matches
    them on digits); it must stay within a few points of them: training does not wreck it."""
    r = T.mlcd(data, epochs=10, device=DEV)
    assert r["loss"][-1] < 0.7 * r["loss"][0]
    assert r["test_positive_hit_rate"] > 0.9
    assert r["test_positive_hit_rate_init"] < 0.3
    assert r["cluster_purity"] > 0.8
    assert r["knn_accuracy"] > r["knn_accuracy_pixels"] - 0.04


def _mlcd_parallel_case(rank):
    import torch.distributed as dist
    world = dist.get_world_size()
    data = T.digits()
    # SGD: its steps scale with the gradient (Adam's barely do), so a wrong gradient scale
    # of the features (feature_grad_scale, DDP's averaging) changes the trajectory
    kw = dict(epochs=3, sample_ratio=1.0, optimizer="sgd", lr=0.002)
    one = T.mlcd(data, **kw)
    par = T.mlcd(data, process_group=dist.group.WORLD, **kw)
    assert one["loss"][-1] < 0.7 * one["loss"][0]
    assert par["world_size"] == world and one["world_size"] == 1
    np.testing.assert_allclose(par["loss"], one["loss"], rtol=1e-5)
    # float rounding apart (the shards' sums, DDP's all-reduce) the same model: the test-set
    # measures may flip an image or two (0.0022 each)
    assert par["cluster_purity"] == one["cluster_purity"]
    assert par["test_positive_hit_rate_init"] == one["test_positive_hit_rate_init"]
    for key in ("test_positive_hit_rate", "knn_accuracy"):
        assert par[key] == pytest.approx(one[key], abs=0.01), key
    every = [None] * world
    dist.all_gather_object(every, par)
    assert all(r == every[0] for r in every)


def test_mlcd_model_parallel_follows_one_process():
    """The trainer's model-parallel form (two gloo ranks: a shard of the centers each, half of
    every global batch, DDP on the encoder, feature_grad_scale=2) follows one process with the
    whole batch and all centers, epoch by epoch; every rank returns the same results."""
    spawn_gloo(_mlcd_parallel_case, 2)


def test_mixedae_reconstructs_and_isolates_sources(data):
    """MixedAE: the unseen patches are predicted better than by the mean patch, the contrastive
    loss falls, the encoder's features beat initialization in the kNN probe, and the trained
    encoder's tokens of one source do not move when the other sources' patches are replaced."""
    r = T.mixedae(data, device=DEV)
    assert r["test_reconstruction_mse"] < 0.85 * r["test_mean_patch_mse"]
    assert r["contrastive_loss"][-1] < 0.6 * r["contrastive_loss"][0]
    assert r["knn_accuracy"] > r["knn_accuracy_init"] + 0.2
    assert r["isolation_max_abs_diff"] <= 1e-5


def test_isolation_check_catches_a_leaking_attention(data, monkeypatch):
    """The isolation measure is not 0 by construction: an encoder whose attention ignores the
    groups (plain attention) moves source 0's tokens when the others change."""
    model = T._MixedAE((4, 4), 4, 32, 1, 2, 1, "torch")
    patches = T._patchify(data.test_x[:16], 2)
    ok = T._isolation(model, patches, 0.25, torch.Generator().manual_seed(0), "cpu")
    assert ok <= 1e-6
    real = T._Block.forward
    monkeypatch.setattr(T._Block, "forward", lambda self, x, groups: real(self, x, None))
    leak = T._isolation(model, patches, 0.25, torch.Generator().manual_seed(0), "cpu")
    assert leak > 1e-3


def test_smooth_certifies_most_test_images(data):
    """A CNN trained under the fused noise op, certified by Smooth: most test images certified
    at radius 0 and at 0.25 (σ = 0.25), none beyond the largest radius n samples can give."""
    r = T.smooth(data, epochs=8, n=500, max_certify=120, device=DEV)
    assert r["loss"][-1] < 0.5 * r["loss"][0]
    assert r["clean_accuracy"] > 0.9 and r["noisy_accuracy"] > 0.8
    acc = r["certified_accuracy"]
    assert acc[0.0] > 0.85 and acc[0.25] > 0.6
    assert r["abstain_rate"] < 0.15
    # the largest radius: all 500 votes for one class, Clopper–Pearson lower bound Beta(α; n, 1)
    from scipy.stats import beta, norm
    assert r["best_possible_radius"] == pytest.approx(0.25 * norm.ppf(beta.ppf(0.001, 500, 1)))
    assert acc[0.75] == acc[1.0] == 0.0


def test_load_npz(tmp_path):
    g = np.random.default_rng(0)
    x = g.integers(0, 256, (40, 8, 8), dtype=np.uint8)
    y = g.integers(0, 3, 40)
    p = tmp_path / "d.npz"
    np.savez(p, images=x, labels=y)
    d = T.load_npz(str(p))
    assert d.train_x.shape == (30, 1, 8, 8) and d.test_x.shape == (10, 1, 8, 8)
    assert d.train_x.max() <= 1.0 and d.train_y.dtype == torch.int64
    both = torch.cat([d.train_x, d.test_x]).mul(255).round().to(torch.uint8)[:, 0]
    assert sorted(map(bytes, both.numpy())) == sorted(map(bytes, x))
    np.savez(p, images=x[:30] / 255.0, labels=y[:30], test_images=x[30:] / 255.0, test_labels=y[30:])
    d = T.load_npz(str(p))
    assert len(d.train_x) == 30 and torch.equal(d.test_y, torch.from_numpy(y[30:]))
    for kw, msg in ((dict(images=x * 2.0, labels=y), "images must hold values in"),
                    (dict(images=x, labels=y[:5]), "labels must be"),
                    (dict(pictures=x, labels=y), "has no array 'images'"),
                    (dict(images=x[:, 0], labels=y), r"images must be \(N, C, H, W\)"),
                    (dict(images=x, labels=y, test_images=x), "test_images but no test_labels")):
        np.savez(p, **kw)
        with pytest.raises(ValueError, match=msg):
            T.load_npz(str(p))
    np.save(tmp_path / "a.npy", x)
    with pytest.raises(ValueError, match="single array, not a .npz archive"):
        T.load_npz(str(tmp_path / "a.npy"))
    np.savez(p, images=x, labels=y)
    for tf in (0.0, -0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="test_fraction"):
            T.load_npz(str(p), test_fraction=tf)


def test_bad_arguments(data):
    with pytest.raises(TypeError, match="data must be a pyssl.train.Images"):
        T.mlcd((data.train_x, data.train_y))
    with pytest.raises(ValueError, match="l .* must be at most num_clusters"):
        T.mlcd(data, num_clusters=4, l=5)
    with pytest.raises(ValueError, match="batch_size .* must be divisible by G"):
        T.mixedae(data, batch_size=30)
    with pytest.raises(ValueError, match="patch .* must divide"):
        T.mixedae(data, patch=3)
    with pytest.raises(ValueError, match="sigma"):
        T.smooth(data, sigma=0.0)
    with pytest.raises(ValueError, match="lr"):
        T.smooth(data, lr=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        T.mixedae(data, temperature=0.0)
    with pytest.raises(ValueError, match="max_certify"):
        T.smooth(data, max_certify=0)
    bad = T.Images(data.train_x, data.train_y, data.test_x[:, :, :4], data.test_y)
    with pytest.raises(ValueError, match=r"one \(C, H, W\) shape"):
        T.smooth(bad)
    bad = T.Images(data.train_x, data.train_y[:-1], data.test_x, data.test_y)
    with pytest.raises(ValueError, match="one per image"):
        T.mlcd(bad)
    e, y = torch.randn(5, 3), torch.arange(5)
    with pytest.raises(ValueError, match="k must be >= 1"):
        T.knn_accuracy(e, y, e, y, k=0)
    with pytest.raises(ValueError, match="test_y must be"):
        T.knn_accuracy(e, y, e, y[:4])
    with pytest.raises(ValueError, match="test_emb has D=2"):
        T.knn_accuracy(e, y, e[:, :2], y)
    assert T.knn_accuracy(e, y, e, y, k=1) == 1.0


def test_cli_train(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["train", "smooth", "--epochs", "1", "--n", "50", "--n0", "10", "--max-certify", "8",
                 "--json", str(out), "--quiet"]) == 0
    got = json.loads(out.read_text())
    assert set(got) >= {"loss", "clean_accuracy", "certified_accuracy", "abstain_rate"}
    assert len(got["loss"]) == 1 and set(got["certified_accuracy"]) == {"0.0", "0.25", "0.5", "0.75", "1.0"}
    assert json.loads(capsys.readouterr().out) == got
    assert main(["train", "mlcd", "--data", str(tmp_path / "missing.npz"), "--quiet"]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["train", "mlcd", "--sigma", "0.5", "--quiet"]) == 2
    assert "--sigma: an option of `train smooth`" in capsys.readouterr().err


def test_cli_train_under_torchrun(tmp_path, monkeypatch, capsys):
    """`torchrun -m pyssl.cli train mlcd`: the centers sharded over two ranks, rank 0 reports."""
    import os
    import subprocess
    import sys
    out = tmp_path / "r.json"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "pyssl.cli", "train", "mlcd",
                           "--epochs", "1", "--quiet", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["world_size"] == 2 and len(got["loss"]) == 1
    assert "Grad strides" not in proc.stderr
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "mixedae", "--quiet"]) == 2
    assert "only `train mlcd` has a model-parallel form" in capsys.readouterr().err
