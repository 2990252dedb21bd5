"""Nearest-neighbour benchmarks: kNN OOD scoring and top-l cluster assignment.

Cases (names fixed):
  knn_cpu     bank 100,000×256, 10,000 queries, k=50, fp32, CPU: KNNScorer.score (fit outside).
  assign_cpu  200,000×256 samples into 10,000 centers, l=8, fp32, CPU: topk_assign.
  knn_gpu     bank 1,281,167×768 (ImageNet-1k size), 50,000 queries, k=1000, bf16, CUDA.
naive: dense PyTorch as a user writes it (the full query×bank matrix, then topk; for assign_cpu,
batches of 16,384 samples, as the full 200k×10k matrix is 8 GB). faiss: faiss's flat index
directly. pyssl-<backend>: our search through KNNScorer / topk_assign.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import pyssl
from bench.harness import Case, Skip
from pyssl.ops import knn as KNN


def _problem(nb, nq, d, k, dtype, device, seed=0):
    # drawn on the case's device (the 1.28M×768 bank takes seconds to draw on a CPU)
    g = torch.Generator(device=device).manual_seed(seed)
    bank = F.normalize(torch.randn(nb, d, generator=g, device=device), dim=1).to(dtype)
    q = F.normalize(torch.randn(nq, d, generator=g, device=device), dim=1).to(dtype)
    return {"bank": bank, "q": q, "k": k}


def knn_naive(inp):
    bank, q, k = inp["bank"].float(), inp["q"].float(), inp["k"]

    def step():
        d2 = (2 - 2 * q @ bank.t()).clamp_min(0)
        return -d2.topk(k, dim=1, largest=False).values[:, -1]
    return step


def knn_faiss(inp):
    faiss = KNN.faiss_module()
    if faiss is None:
        raise Skip("faiss not installed")
    if inp["q"].device.type == "cuda" and not KNN.faiss_has_gpu():
        raise Skip("faiss has no GPU support here")
    b = inp["bank"].float().cpu().numpy()
    q = inp["q"].float().cpu().numpy()
    index = faiss.IndexFlatL2(b.shape[1])
    res = None
    if inp["q"].device.type == "cuda":
        res = faiss.StandardGpuResources()      # must outlive the GPU index
        index = faiss.index_cpu_to_gpu(res, 0, index)
    index.add(b)
    held = (index, res)                         # the step keeps the GPU resources alive

    def step():
        d, _ = held[0].search(q, inp["k"])
        return -d[:, -1]
    return step


def knn_pyssl(backend):
    def setup(inp):
        sc = pyssl.ood.KNNScorer(k=inp["k"], backend=backend).fit(inp["bank"])
        return lambda: sc.score(inp["q"])
    return setup


def _assign_problem(n, c, d, l, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, d, generator=g).to(device), "cent": torch.randn(c, d, generator=g).to(device), "l": l}


def assign_naive(inp):
    x, cent, l = inp["x"], inp["cent"], inp["l"]

    def step():
        cn = F.normalize(cent, dim=1)
        out = []
        for b0 in range(0, x.shape[0], 16384):
            out.append((F.normalize(x[b0:b0 + 16384], dim=1) @ cn.t()).topk(l, dim=1))
        return out
    return step


def assign_faiss(inp):
    faiss = KNN.faiss_module()
    if faiss is None:
        raise Skip("faiss not installed")
    x = F.normalize(inp["x"], dim=1).numpy()
    cn = F.normalize(inp["cent"], dim=1).numpy()

    def step():
        index = faiss.IndexFlatIP(cn.shape[1])
        index.add(cn)
        return index.search(x, inp["l"])
    return step


def assign_pyssl(backend):
    def setup(inp):
        return lambda: pyssl.cluster.topk_assign(inp["x"], inp["cent"], l=inp["l"], backend=backend, progress=False)
    return setup


def _sizes(full, tiny):
    return lambda size, device: tiny(device) if size == "tiny" else full(device)


def _knn_flops(inp):
    return 2.0 * inp["bank"].shape[0] * inp["q"].shape[0] * inp["bank"].shape[1]


CASES = [
    Case("knn_cpu", "cpu",
         _sizes(lambda dev: _problem(100_000, 10_000, 256, 50, torch.float32, dev),
                lambda dev: _problem(2_000, 100, 32, 10, torch.float32, dev)),
         {"naive": knn_naive, "faiss": knn_faiss, "pyssl-torch": knn_pyssl("torch"),
          "pyssl-faiss": knn_pyssl("faiss"), "pyssl-auto": knn_pyssl("auto")},
         flops=_knn_flops, repeats=1, optional=("pyssl-torch", "pyssl-faiss"),
         notes="bank 100,000×256, 10,000 queries, k=50, fp32; score = −(k-th smallest squared L2)."),
    Case("assign_cpu", "cpu",
         _sizes(lambda dev: _assign_problem(200_000, 10_000, 256, 8, dev),
                lambda dev: _assign_problem(3_000, 200, 32, 8, dev)),
         {"naive": assign_naive, "faiss": assign_faiss, "pyssl-torch": assign_pyssl("torch"),
          "pyssl-auto": assign_pyssl("auto")},
         flops=lambda inp: 2.0 * inp["x"].shape[0] * inp["cent"].shape[0] * inp["x"].shape[1], repeats=1,
         optional=("pyssl-torch",),
         notes="200,000×256 samples into 10,000 centers, top-8 by cosine, fp32."),
    Case("knn_gpu", "cuda",
         _sizes(lambda dev: _problem(1_281_167, 50_000, 768, 1000, torch.bfloat16, dev),
                lambda dev: _problem(3_000, 64, 32, 100, torch.bfloat16, dev)),
         {"naive": knn_naive, "faiss": knn_faiss, "pyssl-triton": knn_pyssl("triton"),
          "pyssl-torch": knn_pyssl("torch"), "pyssl-auto": knn_pyssl("auto")},
         flops=_knn_flops, optional=("pyssl-torch", "pyssl-auto"),
         notes="bank 1,281,167×768, 50,000 queries, k=1000, bf16, searched in bf16 (KNNScorer keeps a 16-bit "
               "bank 16-bit on the GPU) (naive: the full 50k×1.28M matrix in fp32, 256 GB: expected out of memory)."),
]
