"""The build: the extension is present and fresh, and every CUDA source compiles for sm_90."""
import glob
import os
import shutil
import subprocess

import pytest

from pyssl import _dispatch
from pyssl._srchash import source_hash

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu")))


def test_extension_loads_and_matches_sources():
    assert _dispatch.extension_error() is None, _dispatch.extension_error()
    ext = _dispatch.extension()
    assert ext.source_hash == source_hash(os.path.join(ROOT, "csrc"))


def test_stale_extension_is_reported(monkeypatch):
    class Old:
        source_hash = "0000000000000000"
    assert "built from 0000000000000000" in _dispatch._stale_sources(Old())


@pytest.mark.skipif(not CU_SOURCES, reason="no CUDA sources (csrc/*.cu) in this tree yet")
@pytest.mark.parametrize("path", CU_SOURCES, ids=os.path.basename)
def test_cuda_source_compiles_for_sm90(path, tmp_path):
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if nvcc is None:
        pytest.skip("nvcc not found: CUDA sources not compile-checked on this machine")
    import torch.utils.cpp_extension as ce
    import sysconfig
    # torch/extension.h includes Python.h, as in the real build
    paths = ce.include_paths() + [sysconfig.get_paths()["include"]]
    # A CPU build of torch ships c10/cuda's headers but not the one its CMake generates; the
    # CUDA build's copy holds a single define, so a stand-in lets the headers compile here.
    if not any(os.path.exists(os.path.join(p, "c10/cuda/impl/cuda_cmake_macros.h")) for p in paths):
        shim = tmp_path / "shim" / "c10" / "cuda" / "impl"
        shim.mkdir(parents=True)
        (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        paths.append(str(tmp_path / "shim"))
    inc = sum((["-I", p] for p in paths), [])
    cmd = [nvcc, "-arch=sm_90", "-std=c++17", "-O3", "-c", path, "-o", str(tmp_path / "k.o"),
           "-DPYSSL_WITH_CUDA", "-DPYSSL_SOURCE_HASH=check"] + inc
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]


def test_cli_info_reports_backends(capsys):
    from pyssl.cli import main
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "extension pyssl._C: ok" in out and "cpu  cpu   : ok" in out


def test_kernel_entry_points_launch_on_their_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: every kernel entry point makes its first CUDA
    tensor's device current (a process on several GPUs that never called set_device would
    otherwise hand cuda:1 tensors to a kernel on cuda:0). Checked with a stand-in tensor and a
    recording torch.cuda.device; the entry points themselves carry the guard."""
    import contextlib
    import types

    import torch

    from pyssl.kernels import _tiles, homologous_attention, homologous_contrastive_loss, knn, mlcd_loss
    entered = []

    @contextlib.contextmanager
    def device(d):
        entered.append(d)
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    seen = []
    guarded = _tiles.on_tensor_device(lambda *a, **k: seen.append(list(entered)) or "done")
    fake = types.SimpleNamespace(is_cuda=True, device="cuda:1")
    assert guarded(3, fake, k=1) == "done" and seen == [["cuda:1"]]
    entered.clear()
    assert guarded(torch.zeros(1)) == "done" and entered == []      # CPU tensors: no guard
    for fn in (mlcd_loss.mlcd_lse, mlcd_loss.mlcd_lse_stats, mlcd_loss.mlcd_grad, homologous_attention.forward,
               homologous_attention.backward, homologous_contrastive_loss.forward,
               homologous_contrastive_loss.backward, homologous_contrastive_loss.inv_norms, knn.knn_topk):
        assert fn.__code__ is _tiles.on_tensor_device(lambda: None).__code__, fn.__name__
