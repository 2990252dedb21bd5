"""Homologous contrastive loss benchmarks (forward + backward).

Cases (names fixed):
  hcl_cpu    B=64, L=197, E=256, 4 groups + 1 global token, fp32, CPU.
  hcl_vitb   B=256, L=197, E=256, 4 groups + 1 global token, bf16, CUDA.
  hcl_long   B=4, L=4096, E=256, 4 groups, bf16, CUDA.
Groups are interleaved at random over the positions (as mix_patches makes them).
impls:
  naive      the loss as a user writes it (pyssl.reference): normalize, the B·L·L scores,
             masked log-sum-exp and group mean, autograd through all of it.
  compile    torch.compile of naive (CUDA only).
  pyssl-<b>  pyssl.homologous_contrastive_loss on backend b.
TFLOP/s count the three L·L·E products of a step over the valid pairs (scores forward, scores
recomputed and M·Ẑ backward): 6·E FLOPs per pair.
"""
from __future__ import annotations

import torch

import pyssl
from bench.harness import Case, Skip
from pyssl import reference
from pyssl.ops import homologous_contrastive_loss as HCL

TEMPERATURE = 0.2


def _problem(b, l, e, n_groups, n_global, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, l, e, generator=g).to(device, dtype)
    rows = []
    for _ in range(b):
        ids = torch.arange(l - n_global) % n_groups
        ids = ids[torch.randperm(l - n_global, generator=g)]
        rows.append(torch.cat([torch.full((n_global,), -1), ids]))
    return {"z": z, "groups": torch.stack(rows).to(device), "valid": b * float(l - n_global) ** 2}


def _fwd_bwd(fn, inp):
    z = inp["z"].detach().clone().requires_grad_()
    groups = inp["groups"]

    def step():
        fn(z, groups).backward()
        z.grad = None         # dropped after the step: a memory baseline between steps holds none
    return step


def hcl_naive(inp):
    return _fwd_bwd(lambda z, g: reference.homologous_contrastive_loss(z, g, temperature=TEMPERATURE), inp)


def hcl_compile(inp):
    if inp["z"].device.type != "cuda":
        raise Skip("compared on CUDA only")
    torch._dynamo.reset()
    f = torch.compile(lambda z, g: reference.homologous_contrastive_loss(z, g, temperature=TEMPERATURE),
                      dynamic=False)
    return _fwd_bwd(f, inp)


def hcl_pyssl(backend):
    def setup(inp):
        why = HCL.not_supported_reasons(inp["z"]).get(backend, [])
        if why:
            raise Skip(f"{backend}: " + "; ".join(why))
        return _fwd_bwd(lambda z, g: pyssl.homologous_contrastive_loss(z, g, temperature=TEMPERATURE,
                                                                       backend=backend), inp)
    return setup


def _flops(inp):
    return 6.0 * inp["valid"] * inp["z"].shape[-1]


def _sizes(full, tiny):
    return lambda size, device: tiny(device) if size == "tiny" else full(device)


def _impls(backend):
    return {"naive": hcl_naive, "compile": hcl_compile, "pyssl-torch": hcl_pyssl("torch"),
            f"pyssl-{backend}": hcl_pyssl(backend)}


CASES = [
    Case("hcl_cpu", "cpu",
         _sizes(lambda dev: _problem(64, 197, 256, 4, 1, torch.float32, dev),
                lambda dev: _problem(2, 23, 8, 4, 1, torch.float32, dev)),
         {k: v for k, v in _impls("cpu").items() if k != "compile"},
         flops=_flops, repeats=7, warmup=2,
         notes="B=64, L=197, E=256, 4 interleaved groups + 1 global token, fp32, forward+backward."),
    Case("hcl_vitb", "cuda",
         _sizes(lambda dev: _problem(256, 197, 256, 4, 1, torch.bfloat16, dev),
                lambda dev: _problem(2, 23, 8, 4, 1, torch.float32, dev)),
         _impls("triton"), flops=_flops, repeats=5, warmup=2,
         notes="B=256, L=197, E=256, 4 groups + 1 global token, bf16, forward+backward."),
    Case("hcl_long", "cuda",
         _sizes(lambda dev: _problem(4, 4096, 256, 4, 0, torch.bfloat16, dev),
                lambda dev: _problem(1, 70, 8, 4, 0, torch.float32, dev)),
         _impls("triton"), flops=_flops, repeats=5, warmup=2,
         notes="B=4, L=4096, E=256, 4 groups, bf16, forward+backward."),
]
