"""Correctness on the device before any number is recorded: the first step of bench/gpu_check.sh.

Each op's GPU path (real Triton kernels, the CUDA noise kernel) against pyssl.reference in float64
on the same device, at shapes that take the kernels' GPU configurations (bf16 MLCD at D = 512,
attention at L = 197 in group and top-k mode, at L = 1024 in group mode (whole tiles) and top-k
mode (a streamed row), the contrastive loss, the kNN search, the noise on every backend in float32
and bfloat16, a Smooth with CUDA graphs): one line
per check, "ok" or "FAIL" with the relative errors, so a fast but wrong kernel is seen before its
timing. It also measures what this card really reaches (a bf16 GEMM, a device copy), the yardstick
of the benchmarks' "% of peak". A check that raises is reported and the others go on; the exit
status is the number of failed checks.

    python -m bench.gpu_smoke              # on the GPU
    TRITON_INTERPRET=1 python -m bench.gpu_smoke --tiny    # on a CPU, at tiny sizes (tests/test_bench.py)
"""
from __future__ import annotations

import argparse
import time
import traceback

import torch

import pyssl
from bench.harness import env_set
from pyssl import reference as R


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (0 when both are zero)."""
    a, b = a.double(), b.double()
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


def _grads(fn, *inputs):
    """(output, gradients of the inputs) for a random upstream gradient (seeded)."""
    ins = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*ins)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(out.device)
    grads = torch.autograd.grad(out, ins, g.to(out.dtype))
    return out.detach(), grads, g


def _vs_reference(fn, ref, inputs, tol):
    """Max relative error of output and every gradient against ref on the float64 inputs."""
    out, grads, g = _grads(fn, *inputs)
    ins64 = [t.detach().double().requires_grad_(True) for t in inputs]
    want = ref(*ins64)
    wgrads = torch.autograd.grad(want, ins64, g)
    errs = [rel(out, want)] + [rel(a, b) for a, b in zip(grads, wgrads)]
    return max(errs) <= tol, "errors " + " ".join(f"{e:.1e}" for e in errs) + f" (tol {tol:g})"


def check_mlcd(dev, tiny):
    n, c, d = (32, 300, 32) if tiny else (512, 20_000, 512)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g).to(dev, torch.bfloat16)
    w = torch.randn(c, d, generator=g).to(dev, torch.bfloat16)
    pos = torch.stack([torch.randperm(c, generator=g)[:8] for _ in range(n)]).to(dev)
    pos[::3, 5:] = -1
    classes = pyssl.sample_classes(pos, c, 0.1, generator=torch.Generator(dev).manual_seed(2))
    out = []
    for cls, mg in ((None, "straight_through"), (classes, "exact")):
        kw = dict(scale=16.0, classes=cls, margin_grad=mg, reduction="sum")
        ok, msg = _vs_reference(lambda a, b: pyssl.mlcd_loss(a, b, pos, backend="triton", **kw),
                                lambda a, b: R.mlcd_loss(a, b, pos, **kw), (x, w), 3e-2)
        out.append((f"mlcd_loss {'sampled' if cls is not None else 'all'} {mg}", ok, msg))
    lab = pos[:, 0].contiguous()
    ok, msg = _vs_reference(lambda a, b: pyssl.margin_softmax_loss(a, b, lab, scale=16.0, backend="triton"),
                            lambda a, b: R.margin_softmax_loss(a, b, lab, scale=16.0), (x, w), 3e-2)
    out.append(("margin_softmax_loss", ok, msg))
    # float32 centers with bf16 features, the mixed path: dW comes back in float32
    wf = w.float()
    ok, msg = _vs_reference(lambda a, b: pyssl.mlcd_loss(a, b, pos, scale=16.0, classes=classes, backend="triton"),
                            lambda a, b: R.mlcd_loss(a, b, pos, scale=16.0, classes=classes), (x, wf), 3e-2)
    out.append(("mlcd_loss float32 centers", ok, msg))
    # the other backward forms: the fused dx / dw kernels, and the default in ragged class chunks
    for spec in ("GCHUNK=0", f"GCHUNK_COLS={7 if tiny else 768}"):   # C' = 2,000 (tiny: 30)
        with env_set("PYSSL_MLCD_TRITON_BWD", spec):
            kw = dict(scale=16.0, classes=classes, reduction="sum")
            ok, msg = _vs_reference(lambda a, b: pyssl.mlcd_loss(a, b, pos, backend="triton", **kw),
                                    lambda a, b: R.mlcd_loss(a, b, pos, **kw), (x, w), 3e-2)
            out.append((f"mlcd_loss sampled {spec}", ok, msg))
    # the benchmarks' configuration at a fraction of their size: scale 64, the default backward
    # in several automatic class chunks (C' ~ 39,000 against 4,608-column chunks), the forward
    # split over the columns (the float64 reference holds ~15 GB at its peak)
    n, c = (48, 3000) if tiny else (2048, 250_000)
    x = torch.randn(n, d, generator=g).to(dev, torch.bfloat16)
    w = torch.randn(c, d, generator=g).to(dev, torch.bfloat16)
    pos = torch.stack([torch.randperm(c, generator=g)[:8] for _ in range(n)]).to(dev)
    classes = pyssl.sample_classes(pos, c, 0.1, generator=torch.Generator(dev).manual_seed(3))
    ok, msg = _vs_reference(lambda a, b: pyssl.mlcd_loss(a, b, pos, classes=classes, backend="triton"),
                            lambda a, b: R.mlcd_loss(a, b, pos, classes=classes), (x, w), 3e-2)
    out.append((f"mlcd_loss scale 64, N={n}, C'={classes.numel()}", ok, msg))
    return out


def check_attention(dev, tiny):
    out = []
    # L = 1024 in group mode: groups of ~256 tokens, so sorted 64-row tiles lie whole inside one
    # group (the unmasked forward step and the backward's WHOLE_TILES path, rows >= 1024 only)
    cases = ([(1, 2, 23, 16, None), (1, 2, 23, 16, 6)] if tiny else
             [(2, 4, 197, 64, None), (2, 4, 197, 64, 49), (1, 2, 1024, 64, None), (1, 2, 1024, 64, 128)])
    for b, h, l, d, topk in cases:
        g = torch.Generator().manual_seed(l + (topk or 0))
        q, k, v = (torch.randn(b, h, l, d, generator=g).to(dev, torch.bfloat16) for _ in range(3))
        groups = torch.randint(0, 4, (b, l), generator=g).to(dev)
        groups[:, 0] = -1
        ok, msg = _vs_reference(lambda a, b_, c: pyssl.homologous_attention(a, b_, c, groups, topk=topk, backend="triton"),
                                lambda a, b_, c: R.homologous_attention(a, b_, c, groups, topk=topk), (q, k, v), 3e-2)
        out.append((f"homologous_attention L={l} topk={topk}", ok, msg))
    b, l, e = (2, 23, 16) if tiny else (4, 197, 256)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(b, l, e, generator=g).to(dev, torch.bfloat16)
    groups = torch.randint(0, 4, (b, l), generator=g).to(dev)
    groups[:, 0] = -1
    ok, msg = _vs_reference(lambda t: pyssl.homologous_contrastive_loss(t, groups, backend="triton"),
                            lambda t: R.homologous_contrastive_loss(t, groups), (z,), 3e-2)
    out.append(("homologous_contrastive_loss", ok, msg))
    return out


def check_knn(dev, tiny):
    from pyssl.ops import knn as K
    nb, nq, d, k = (200, 20, 16, 5) if tiny else (100_000, 1000, 256, 50)
    g = torch.Generator().manual_seed(4)
    bank = torch.nn.functional.normalize(torch.randn(nb, d, generator=g), dim=1).to(dev)
    qs = torch.nn.functional.normalize(torch.randn(nq, d, generator=g), dim=1).to(dev)
    s, i = K.search(qs, bank, k, backend="triton", fn="smoke")
    ws, wi = (qs.double() @ bank.double().t()).topk(k, dim=1)
    same = (i == wi).float().mean().item()
    err = rel(s, ws)
    # float32 scores: indices may swap only where two scores tie within float32 rounding
    return [("knn search (triton)", same > 0.999 and err < 1e-5, f"same indices {same:.4f}, score error {err:.1e}")]


def check_noise(dev, tiny):
    x = torch.rand(3, 3, 8, 8) if tiny else torch.rand(4, 3, 224, 224)
    n = 5 if tiny else 16
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ref = pyssl.gaussian_noise(x, n, 0.25, seed=7, mean=mean, std=std, backend="cpu")
    out = []
    backends = ["triton"] + (["cuda"] if dev == "cuda" else [])
    for be in backends:
        y = pyssl.gaussian_noise(x.to(dev), n, 0.25, seed=7, mean=mean, std=std, backend=be).cpu()
        err = (y - ref).abs().max().item()
        out.append((f"gaussian_noise {be} vs cpu", err < 1e-4, f"max abs difference {err:.1e}"))
        # bfloat16 out (noise_imagenet's path: HW % 4 == 0, the CUDA kernel's packed stores):
        # the float32 values rounded once to nearest; a value within float32 rounding of a bf16
        # midpoint may round the other way (one bf16 step). Triton's interpreter truncates to
        # bfloat16 (no rounding mode there): on a CPU only the one-step bound is checked.
        y = pyssl.gaussian_noise(x.to(dev), n, 0.25, seed=7, mean=mean, std=std, out_dtype=torch.bfloat16,
                                 backend=be).cpu()
        same = (y == ref.bfloat16()).float().mean().item()
        # one bf16 step at most (2^-7 relative) beyond the float32 backends' agreement (3e-5)
        excess = ((y.float() - ref).abs() - 2 ** -7 * ref.abs()).max().item()
        rounded = same > 0.999 or dev != "cuda"
        out.append((f"gaussian_noise {be} bf16 vs cpu", rounded and excess <= 3e-5,
                    f"equal to the rounded float32 values {same:.5f}, largest difference beyond one "
                    f"bf16 step {max(excess, 0.0):.1e}"))
    return out


def check_smooth(dev, tiny):
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10)).to(dev).eval()
    x = torch.rand(3, 3, 8, 8, device=dev)
    n0, n = (10, 50) if tiny else (100, 2000)
    base = pyssl.Smooth(model, 10, 0.25, batch_size=64, seed=0)
    want = base.certify(x, n0, n, 0.001)
    out = [("Smooth.certify", True, f"pred {want[0].tolist()}")]
    if dev == "cuda":
        graph = pyssl.Smooth(model, 10, 0.25, batch_size=64, seed=0, cuda_graph=True)
        got = graph.certify(x, n0, n, 0.001)
        same = torch.equal(got[0], want[0]) and torch.allclose(got[1], want[1])
        out.append(("Smooth.certify cuda_graph", same, f"pred {got[0].tolist()} vs {want[0].tolist()}"))
        # the configuration certify_resnet times: a conv net under bf16 autocast, channels_last,
        # a captured graph, more images than the first graph holds (recaptured) and n not a
        # multiple of the batch; against the same without the graph (cuDNN may pick other
        # algorithms for the eager partial batch: a vote may move, so agreement is counted)
        torch.manual_seed(6)
        cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                  torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
                                  torch.nn.Linear(64, 10)).to(dev).eval()
        xs = torch.rand(80, 3, 16, 16, device=dev)
        kw = dict(batch_size=256, seed=1, autocast=torch.bfloat16, channels_last=True)
        plain = pyssl.Smooth(cnn, 10, 0.25, **kw).certify(xs, 50, 700, 0.001)
        fast = pyssl.Smooth(cnn, 10, 0.25, cuda_graph=True, **kw).certify(xs, 50, 700, 0.001)
        agree = (fast[0] == plain[0]).float().mean().item()
        both = (fast[0] == plain[0]) & (plain[0] >= 0)
        drift = (fast[1][both] - plain[1][both]).abs().max().item() if bool(both.any()) else 0.0
        out.append(("Smooth.certify bf16 channels_last cuda_graph, 80 images", agree >= 0.95 and drift < 0.05,
                    f"predictions agree {agree:.3f}, radius drift {drift:.1e} (need >= 0.95, < 0.05)"))
    return out


def measure_peaks():
    """What this card reaches: a bf16 8192³ GEMM (TFLOP/s) and a 1 GiB device copy (GB/s)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    src = torch.empty(1 << 28, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)

    def rate(fn, work, reps=10):
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return work * reps / (time.perf_counter() - t)

    tf = rate(lambda: a @ b, 2 * 8192 ** 3) / 1e12
    gb = rate(lambda: dst.copy_(src), 2 * src.numel() * 4) / 1e9    # read + write
    return [("measured peaks", True, f"bf16 GEMM {tf:.0f} TFLOP/s, device copy {gb:.0f} GB/s "
                                     f"({torch.cuda.get_device_name()})")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_smoke")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (a CPU with TRITON_INTERPRET=1)")
    args = p.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    # the quick checks first (few kernels to compile): a cut by the step's time cap loses the
    # ones with the most Triton compiles, which the benchmarks and tests exercise again
    checks = [check_noise, check_smooth, check_knn, check_mlcd, check_attention]
    if dev == "cuda" and not args.tiny:
        checks.insert(0, lambda d, t: measure_peaks())
    failed = 0
    for check in checks:
        t = time.perf_counter()
        try:
            results = check(dev, args.tiny)
        except Exception as e:
            name = getattr(check, "__name__", "check")
            results = [(name, False, f"raised {e.__class__.__name__}: {str(e)[:300]}")]
            traceback.print_exc()
        for name, ok, msg in results:
            failed += not ok
            print(f"smoke {name}: {'ok' if ok else 'FAIL'} ({msg}) [{time.perf_counter() - t:.1f}s]", flush=True)
    print(f"smoke: {failed} failed", flush=True)
    return min(failed, 100)


if __name__ == "__main__":
    raise SystemExit(main())
