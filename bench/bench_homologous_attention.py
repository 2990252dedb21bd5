"""Homologous-patch attention benchmarks (forward + backward unless an impl says otherwise).

Cases (names fixed):
  homattn_cpu   B=16, H=12, L=197, d=64, 4 groups + 1 global token, fp32, CPU.
  homattn_vitb  B=256, H=12, L=197, d=64, 4 groups + 1 global token, bf16, CUDA.
  homattn_long  B=4, H=16, L=4096, d=64, 4 groups, bf16, CUDA.
  homattn_topk_cpu   B=16, H=12, L=197, d=64, top-49 of all keys (K = L/4, Mixed Autoencoder's
                     homologous attention at mixing ratio 4), fp32, CPU.
  homattn_topk_vitb  the same at B=256, bf16, CUDA (pyssl-triton holds whole rows on chip;
                     pyssl-triton[stream] forces the streamed kernel that longer rows take).
  homattn_topk_long  B=4, H=16, L=4096, d=64, top-1024, bf16, CUDA (the streamed kernel).
Groups are interleaved at random over the positions (as mix_patches makes them).
impls:
  naive      masked softmax as a user writes it: scores, masked_fill, softmax, @ v (B·H·L·L);
             top-k cases: the kept set from torch.topk of the scores in the step.
  sdpa_mask  F.scaled_dot_product_attention with the dense boolean mask (built outside the step);
             top-k cases: the mask from the scores and torch.topk in the step, without gradient.
  flex       FlexAttention (torch.compile'd) with the same mask as a block mask built outside the
             timed region (its build time is in the note); on the CPU forward only (FlexAttention
             has no CPU backward), so its time is not comparable to the others there.
  pyssl-<b>  pyssl.homologous_attention on backend b.
TFLOP/s count only the unmasked (kept) pairs: 4·d FLOPs per pair forward, 10·d backward.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import pyssl
from bench.harness import Case, Skip, with_env
from pyssl.ops import homologous_attention as HA


def _sizes(full, tiny):
    return lambda size, device: tiny(device) if size == "tiny" else full(device)


def _problem(b, h, l, d, n_groups, n_global, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(b, h, l, d, generator=g).to(device, dtype) for _ in range(4))
    rows = []
    for _ in range(b):
        ids = torch.arange(l - n_global) % n_groups
        ids = ids[torch.randperm(l - n_global, generator=g)]
        rows.append(torch.cat([torch.full((n_global,), -1), ids]))
    groups = torch.stack(rows).to(device)
    mask = ((groups[:, :, None] == groups[:, None, :]) | (groups[:, :, None] < 0) | (groups[:, None, :] < 0))
    return {"q": q, "k": k, "v": v, "do": do, "groups": groups, "topk": None, "pairs": float(mask.sum()) * h}


def _topk_problem(b, h, l, d, topk, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(b, h, l, d, generator=g).to(device, dtype) for _ in range(4))
    return {"q": q, "k": k, "v": v, "do": do, "groups": None, "topk": topk, "pairs": float(b * h * l * min(topk, l))}


def _leaves(inp):
    return [t.detach().clone().requires_grad_() for t in (inp["q"], inp["k"], inp["v"])]


def _fwd_bwd(fn, inp):
    q, k, v = _leaves(inp)
    do = inp["do"]

    def step():
        fn(q, k, v).backward(do)
        # gradients dropped after the step, so a memory baseline taken between steps holds none
        for t in (q, k, v):
            t.grad = None
    return step


def _mask(inp):
    g = inp["groups"]
    if g is None:
        return None
    return ((g[:, :, None] == g[:, None, :]) | (g[:, :, None] < 0) | (g[:, None, :] < 0))[:, None]


def _topk_keep(s, topk):
    """The kept set of a top-k case from its scores (torch.topk: ties in no stated order)."""
    idx = s.topk(min(topk, s.shape[-1]), dim=-1).indices
    return torch.zeros(s.shape, dtype=torch.bool, device=s.device).scatter_(-1, idx, True)


def attn_naive(inp):
    mask, topk = _mask(inp), inp["topk"]
    scale = inp["q"].shape[-1] ** -0.5

    def fn(q, k, v):
        s = (q @ k.transpose(-1, -2)) * scale
        keep = _topk_keep(s.detach(), topk) if topk else mask
        return torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1) @ v
    return _fwd_bwd(fn, inp)


def attn_sdpa_mask(inp):
    mask, topk = _mask(inp), inp["topk"]
    scale = inp["q"].shape[-1] ** -0.5

    def fn(q, k, v):
        if topk:
            with torch.no_grad():
                keep = _topk_keep((q @ k.transpose(-1, -2)) * scale, topk)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return _fwd_bwd(fn, inp)


def attn_flex(inp):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        raise Skip(f"FlexAttention unavailable ({e})")
    g = inp["groups"]
    b, h, l, _ = inp["q"].shape

    def mask_mod(bi, hi, qi, ki):
        gq, gk = g[bi, qi], g[bi, ki]
        return (gq == gk) | (gq < 0) | (gk < 0)

    dev = inp["q"].device.type
    t0 = time.perf_counter()
    bm = create_block_mask(mask_mod, b, None, l, l, device=str(inp["q"].device))
    if dev == "cuda":
        torch.cuda.synchronize()
    build_ms = (time.perf_counter() - t0) * 1e3
    # compiled afresh per case with static shapes (a second case would otherwise recompile
    # the first's cached graph with dynamic shapes)
    torch._dynamo.reset()
    f = torch.compile(flex_attention, dynamic=False)
    if dev == "cpu":   # no CPU backward: forward only
        q, k, v = inp["q"], inp["k"], inp["v"]

        def step():
            with torch.no_grad():
                f(q, k, v, block_mask=bm)
        step.note = f"forward only (no CPU backward); block mask built in {build_ms:.0f} ms, untimed"
        step.flops_fraction = 4.0 / 14.0     # TFLOP/s of the forward's work (4·d of 14·d per pair)
        return step
    step = _fwd_bwd(lambda q, k, v: f(q, k, v, block_mask=bm), inp)
    step.note = f"block mask built in {build_ms:.0f} ms, untimed"
    return step


def attn_pyssl(backend):
    def setup(inp):
        why = HA.not_supported_reasons(inp["q"]).get(backend, []) if backend != "auto" else []
        if why:
            raise Skip(f"{backend}: " + "; ".join(why))
        g, topk = inp["groups"], inp["topk"]
        return _fwd_bwd(lambda q, k, v: pyssl.homologous_attention(q, k, v, g, topk=topk, backend=backend), inp)
    return setup


def attn_pyssl_fwd(backend):
    """Our forward alone, under no_grad: the like-for-like row for FlexAttention's CPU forward."""
    def setup(inp):
        why = HA.not_supported_reasons(inp["q"]).get(backend, [])
        if why:
            raise Skip(f"{backend}: " + "; ".join(why))
        q, k, v, g = inp["q"], inp["k"], inp["v"], inp["groups"]

        def step():
            with torch.no_grad():
                pyssl.homologous_attention(q, k, v, g, topk=inp["topk"], backend=backend)
        step.note = "forward only (the row to set against flex)"
        step.flops_fraction = 4.0 / 14.0
        return step
    return setup


def _flops(inp):
    # unmasked pairs only: forward 4·d (QKᵀ, PV), backward 10·d (recomputed QKᵀ, dV, dP, dQ, dK)
    return 14.0 * inp["pairs"] * inp["q"].shape[-1]


def attn_pyssl_noskip(inp):
    """The Triton kernels with tile skipping off (PYSSL_HOMATTN_NO_SKIP=1, read per call): every
    key tile visited with the group ids masked in it, what skipping is measured against."""
    return with_env("PYSSL_HOMATTN_NO_SKIP", "1", attn_pyssl("triton")(inp),
                     "every key tile visited, group ids masked per tile; FLOP/s counted on unmasked pairs")


def attn_pyssl_stream(inp):
    """The Triton top-k forward streamed (PYSSL_HOMATTN_TOPK_STREAM=1) where rows would fit on
    chip: what the radix search over streamed key tiles costs against whole rows."""
    return with_env("PYSSL_HOMATTN_TOPK_STREAM", "1", attn_pyssl("triton")(inp),
                     "top-k rows streamed (radix search, up to 17 passes over k) instead of held whole")


def _impls(backend):
    """The peers, then our torch fallback and the backend under test (on the GPU also without
    tile skipping, measured side by side)."""
    impls = {"naive": attn_naive, "sdpa_mask": attn_sdpa_mask, "flex": attn_flex,
             "pyssl-torch": attn_pyssl("torch"), f"pyssl-{backend}": attn_pyssl(backend)}
    if backend == "triton":
        impls["pyssl-triton[noskip]"] = attn_pyssl_noskip
    else:   # FlexAttention has no CPU backward: its forward against ours
        impls[f"pyssl-{backend}[fwd]"] = attn_pyssl_fwd(backend)
    return impls


def _topk_impls(backend, stream=False):
    impls = {"naive": attn_naive, "sdpa_mask": attn_sdpa_mask, "pyssl-torch": attn_pyssl("torch"),
             f"pyssl-{backend}": attn_pyssl(backend)}
    if stream:
        impls["pyssl-triton[stream]"] = attn_pyssl_stream
    return impls


# on the GPU the kernels under test first, then FlexAttention (the peer of the target: its long
# first compile must not come after the rows a step's time cap would cut), then the others
_GPU_FIRST = ("pyssl-triton", "flex", "pyssl-triton[noskip]", "pyssl-triton[stream]", "sdpa_mask", "naive",
              "pyssl-torch")

CASES = [
    Case("homattn_cpu", "cpu",
         _sizes(lambda dev: _problem(16, 12, 197, 64, 4, 1, torch.float32, dev),
                lambda dev: _problem(2, 2, 23, 8, 4, 1, torch.float32, dev)),
         _impls("cpu"),
         flops=_flops, repeats=7, warmup=2,
         notes="B=16, H=12, L=197, d=64, 4 interleaved groups + 1 global token, fp32, forward+backward "
               "(flex: forward only, FlexAttention has no CPU backward; pyssl-cpu[fwd] is ours alone against it)."),
    Case("homattn_vitb", "cuda",
         _sizes(lambda dev: _problem(256, 12, 197, 64, 4, 1, torch.bfloat16, dev),
                lambda dev: _problem(2, 2, 23, 8, 4, 1, torch.float32, dev)),
         _impls("triton"),
         flops=_flops, repeats=5, warmup=2, run_first=_GPU_FIRST,
         notes="B=256, H=12, L=197, d=64, 4 groups + 1 global token, bf16, forward+backward. "
               "pyssl-triton[noskip] (PYSSL_HOMATTN_NO_SKIP=1) meets every key tile with the group ids "
               "masked per tile: the ratio is what per-group tiles and skipping buy."),
    Case("homattn_long", "cuda",
         _sizes(lambda dev: _problem(4, 16, 4096, 64, 4, 0, torch.bfloat16, dev),
                lambda dev: _problem(1, 2, 64, 8, 4, 0, torch.float32, dev)),
         _impls("triton"),
         flops=_flops, repeats=5, warmup=2, run_first=_GPU_FIRST,
         notes="B=4, H=16, L=4096, d=64, 4 groups, bf16, forward+backward (pyssl-triton[noskip] as in homattn_vitb)."),
    Case("homattn_topk_cpu", "cpu",
         _sizes(lambda dev: _topk_problem(16, 12, 197, 64, 49, torch.float32, dev),
                lambda dev: _topk_problem(2, 2, 23, 8, 6, torch.float32, dev)),
         _topk_impls("cpu"),
         flops=_flops, repeats=5, warmup=2,
         notes="B=16, H=12, L=197, d=64, top-49 of all keys, fp32, forward+backward; naive and sdpa_mask "
               "rank with torch.topk in the step."),
    Case("homattn_topk_vitb", "cuda",
         _sizes(lambda dev: _topk_problem(256, 12, 197, 64, 49, torch.bfloat16, dev),
                lambda dev: _topk_problem(2, 2, 23, 8, 6, torch.float32, dev)),
         _topk_impls("triton", stream=True),
         flops=_flops, repeats=5, warmup=2, run_first=_GPU_FIRST,
         notes="B=256, H=12, L=197, d=64, top-49, bf16, forward+backward. pyssl-triton holds whole rows on "
               "chip; pyssl-triton[stream] (PYSSL_HOMATTN_TOPK_STREAM=1) takes the streamed kernel of long rows."),
    Case("homattn_topk_long", "cuda",
         _sizes(lambda dev: _topk_problem(4, 16, 4096, 64, 1024, torch.bfloat16, dev),
                lambda dev: _topk_problem(1, 2, 64, 8, 16, torch.float32, dev)),
         _topk_impls("triton"),
         flops=_flops, repeats=5, warmup=2, run_first=_GPU_FIRST,
         notes="B=4, H=16, L=4096, d=64, top-1024, bf16, forward+backward (the streamed top-k kernel)."),
]
