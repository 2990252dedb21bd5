"""The command line: `pyssl kmeans`, `pyssl assign`, `pyssl ood` on .npy files give what the API
gives on the same data; bad input exits with status 2 and a message naming the argument."""
import json

import numpy as np
import pytest
import torch

import pyssl
from pyssl.cli import main


def _blobs(n, d, seed):
    g = np.random.default_rng(seed)
    centers = g.normal(size=(6, d)) * 4
    return (centers[g.integers(0, 6, n)] + g.normal(size=(n, d))).astype(np.float32)


def test_kmeans_and_assign_files_match_the_api(tmp_path, capsys):
    x = _blobs(700, 8, 0)
    feats = tmp_path / "feats.npy"
    np.save(feats, x)
    cent_path = tmp_path / "cent.npy"
    assert main(["kmeans", str(feats), "5", "--out", str(cent_path), "--niter", "6", "--seed", "3",
                 "--backend", "torch", "--quiet"]) == 0
    cent = np.load(cent_path)
    want = pyssl.cluster.kmeans(np.load(feats, mmap_mode="r"), 5, niter=6, seed=3, backend="torch")
    np.testing.assert_array_equal(cent, want.numpy())
    assert main(["assign", str(feats), str(cent_path), "--out", str(tmp_path / "lab"), "--l", "2",
                 "--batch-size", "128", "--quiet"]) == 0
    idx, sim = np.load(tmp_path / "lab.idx.npy"), np.load(tmp_path / "lab.sim.npy")
    assert idx.shape == sim.shape == (700, 2) and idx.dtype == np.int64 and sim.dtype == np.float32
    wi, ws = pyssl.cluster.topk_assign(torch.from_numpy(x), torch.from_numpy(cent), 2)
    np.testing.assert_array_equal(idx, wi.numpy())
    np.testing.assert_allclose(sim, ws.numpy(), rtol=1e-6, atol=1e-6)
    assert "lab.idx.npy" in capsys.readouterr().out


def test_ood_metrics_match_the_api(tmp_path, capsys):
    bank, ind = _blobs(400, 6, 1), _blobs(100, 6, 2)
    ood = np.random.default_rng(3).normal(size=(80, 6)).astype(np.float32) * 9
    paths = {}
    for name, a in (("bank", bank), ("id", ind), ("ood", ood)):
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], a)
    out = tmp_path / "m.json"
    assert main(["ood", "--bank", str(paths["bank"]), "--id", str(paths["id"]), "--ood", str(paths["ood"]),
                 "--k", "5", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    sc = pyssl.ood.KNNScorer(5).fit(torch.from_numpy(bank))
    want = pyssl.ood.metrics(sc.score(torch.from_numpy(ind)), sc.score(torch.from_numpy(ood)))
    assert set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(float(want[k]), abs=1e-6)
    assert json.loads(capsys.readouterr().out) == got


def test_bad_input_exits_2_naming_the_argument(tmp_path, capsys):
    feats = tmp_path / "f.npy"
    np.save(feats, _blobs(50, 4, 4))
    flat = tmp_path / "flat.npy"
    np.save(flat, np.zeros(10, dtype=np.float32))
    ints = tmp_path / "ints.npy"
    np.save(ints, np.zeros((10, 4), dtype=np.int64))
    wide = tmp_path / "wide.npy"
    np.save(wide, np.ones((3, 5), dtype=np.float32))
    zero = tmp_path / "zero.npy"
    z = _blobs(50, 4, 5)
    z[7] = 0
    np.save(zero, z)
    cases = [
        (["kmeans", str(tmp_path / "missing.npy"), "3", "--out", str(tmp_path / "c.npy")], "FEATURES: cannot read"),
        (["kmeans", str(flat), "3", "--out", str(tmp_path / "c.npy")], "FEATURES: expected a non-empty (N, D) array"),
        (["kmeans", str(ints), "3", "--out", str(tmp_path / "c.npy")], "expected floating-point features"),
        (["kmeans", str(feats), "51", "--out", str(tmp_path / "c.npy"), "--quiet"], "k=51 is larger"),
        (["assign", str(feats), str(wide), "--out", str(tmp_path / "o")], "CENTROIDS: D=5 differs"),
        (["assign", str(feats), str(feats), "--out", str(tmp_path / "o"), "--l", "51"], "--l: must be in [1, 50]"),
        (["assign", str(zero), str(feats), "--out", str(tmp_path / "o"), "--quiet"], "x has an all-zero row (row 7;"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"pyssl {argv[0]}: error:" in err and msg in err, (argv, err)
