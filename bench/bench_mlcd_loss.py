"""MLCD loss benchmarks: pyssl backends against dense PyTorch, torch.compile and fused-CE peers.

Cases (names are fixed; results are compared across commits):
  mlcd_cpu         N=1024, D=256, C=100,000, all classes, l=8, fp32, forward+backward, CPU.
                   Also "floor": the three bare GEMMs of those shapes (x·Wᵀ, G·W, Gᵀ·x) on
                   materialized inputs — no fused loss can beat it.
  mlcd_1m_sampled  N=8192, D=512, C=1,000,000, sample ratio 0.1, l=8, bf16, CUDA.
  mlcd_1m_full     N=4096, D=512, all 1,000,000 classes, l=8, bf16, CUDA.
GPU peers run cross-entropy on the same N, D and C' (Liger-Kernel's fused linear cross entropy,
Apple's cut-cross-entropy, torch's own linear_cross_entropy). TFLOP/s count 6·N·C'·D useful FLOPs.
"""
from __future__ import annotations

import torch

import pyssl
from pyssl import reference as R
from bench.harness import Case, Skip

L = 8


def _problem(n, c, d, dtype, device, ratio=None, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(device, dtype).requires_grad_(True)
    w = torch.randn(c, d, generator=g).to(device, dtype).requires_grad_(True)
    pos = torch.randint(0, c, (n, L), generator=g)
    # unique within a row: redraw duplicates as neighbours (rare at large C)
    pos = (pos + torch.arange(L)[None, :] * (c // L)) % c
    pos = pos.to(device)
    classes = None
    if ratio is not None:
        classes = pyssl.sample_classes(pos, c, ratio, generator=torch.Generator(device=device).manual_seed(seed))
    return {"x": x, "w": w, "pos": pos, "classes": classes, "labels": pos[:, 0].contiguous(), "dtype": dtype}


def _cprime(inp):
    return inp["w"].shape[0] if inp["classes"] is None else inp["classes"].numel()


def _step(fn, inp):
    x, w = inp["x"], inp["w"]

    def step():
        x.grad = None
        w.grad = None
        fn().backward()
    return step


def naive(inp):
    return _step(lambda: R.mlcd_loss(inp["x"], inp["w"], inp["pos"], classes=inp["classes"]), inp)


def compiled(inp):
    f = torch.compile(R.mlcd_loss)
    return _step(lambda: f(inp["x"], inp["w"], inp["pos"], classes=inp["classes"]), inp)


def pyssl_backend(backend):
    def setup(inp):
        return _step(lambda: pyssl.mlcd_loss(inp["x"], inp["w"], inp["pos"], classes=inp["classes"],
                                             backend=backend), inp)
    return setup


def floor(inp):
    """Three bare GEMMs of the problem's shapes on materialized inputs (fp32 here)."""
    x = inp["x"].detach()
    w = inp["w"].detach() if inp["classes"] is None else inp["w"].detach()[inp["classes"]]
    g = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)

    def step():
        torch.mm(x, w.t(), out=g)
        torch.mm(g, w)
        torch.mm(g.t(), x)
    return step


def _ce_inputs(inp):
    """The equal-size cross-entropy problem: the N×D features against C' classes."""
    w = inp["w"] if inp["classes"] is None else inp["w"].detach()[inp["classes"]].clone().requires_grad_(True)
    labels = inp["labels"] if inp["classes"] is None else torch.searchsorted(inp["classes"], inp["labels"])
    return inp["x"], w, labels


def liger(inp):
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception as e:
        raise Skip(f"liger-kernel not installed ({e.__class__.__name__})")
    x, w, y = _ce_inputs(inp)
    f = LigerFusedLinearCrossEntropyLoss()
    return _step(lambda: f(w, x, y), {"x": x, "w": w})


def cce(inp):
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as e:
        raise Skip(f"cut-cross-entropy not installed ({e.__class__.__name__})")
    x, w, y = _ce_inputs(inp)
    return _step(lambda: linear_cross_entropy(x, w, y), {"x": x, "w": w})


def torch_lce(inp):
    f = getattr(torch.nn.functional, "linear_cross_entropy", None)
    if f is None:
        raise Skip(f"torch {torch.__version__} has no linear_cross_entropy")
    x, w, y = _ce_inputs(inp)
    return _step(lambda: f(x, w, y), {"x": x, "w": w})


def _flops(inp):
    n, d = inp["x"].shape
    return 6.0 * n * _cprime(inp) * d


def _sizes(full, tiny):
    return lambda size, device: tiny(device) if size == "tiny" else full(device)


CASES = [
    Case("mlcd_cpu", "cpu",
         _sizes(lambda dev: _problem(1024, 100_000, 256, torch.float32, dev),
                lambda dev: _problem(64, 2_000, 32, torch.float32, dev)),
         {"naive": naive, "compile": compiled, "floor": floor,
          "pyssl-torch": pyssl_backend("torch"), "pyssl-cpu": pyssl_backend("cpu"),
          "pyssl-auto": pyssl_backend("auto")},
         flops=_flops, repeats=3,
         notes="N=1024 D=256 C=100,000 all classes l=8 fp32, forward+backward. floor = the 3 bare GEMMs. "
               "Targets: pyssl-cpu ≤ 0.35× naive time, ≤ 1.3× floor, ≤ 0.25× naive peak memory."),
    Case("mlcd_1m_sampled", "cuda",
         _sizes(lambda dev: _problem(8192, 1_000_000, 512, torch.bfloat16, dev, ratio=0.1),
                lambda dev: _problem(64, 4_000, 32, torch.bfloat16, dev, ratio=0.1)),
         {"naive": naive, "compile": compiled, "pyssl-triton": pyssl_backend("triton"),
          "pyssl-torch": pyssl_backend("torch"), "liger": liger, "cce": cce, "torch-lce": torch_lce},
         flops=_flops,
         notes="N=8192 D=512 C=1M ratio 0.1 l=8 bf16; peers run CE on the same N, D, C'. "
               "Targets: ≥60% of dense bf16 peak at 6·N·C'·D, faster than liger and cce."),
    Case("mlcd_1m_full", "cuda",
         _sizes(lambda dev: _problem(4096, 1_000_000, 512, torch.bfloat16, dev),
                lambda dev: _problem(64, 4_000, 32, torch.bfloat16, dev)),
         {"naive": naive, "compile": compiled, "pyssl-triton": pyssl_backend("triton"),
          "pyssl-torch": pyssl_backend("torch"), "liger": liger, "cce": cce, "torch-lce": torch_lce},
         flops=_flops,
         notes="N=4096 D=512 all 1M classes l=8 bf16."),
]
