"""Noise-sampling and randomized-smoothing benchmarks.

Cases (names fixed):
  noise_cpu       64 images of 3×32×32, n=1000 samples each, fp32 out, CIFAR mean/std, CPU.
  certify_cpu     a small CNN, 16 images of 3×32×32, n0=100, n=10,000, batch 1000, CPU.
  noise_imagenet  8 images of 3×224×224, n=1000, bf16 out, ImageNet mean/std, CUDA (GB/s).
  certify_resnet  a ResNet-50 defined here, 4 images of 3×224×224, n0=100, n=10,000, CUDA.
impls:
  naive       the torch path users write today: x.repeat, randn_like·σ, add, normalize
              (for certify: a straight port of Cohen et al.'s loop — per image, per batch, a
              host copy of the predictions and a Python counting loop — with scipy's beta).
  floor       noise cases: filling a fresh output tensor of the same size with a constant.
  forward     certify cases: the model forward alone on the same number of rows, same batch
              size — the time outside it is what the smoothing machinery costs.
  pyssl-<b>   pyssl.gaussian_noise / pyssl.Smooth on backend b.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

import pyssl
from bench.harness import Case, Skip
from pyssl.ops import noise as NZ

CIFAR = ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616])
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def _sizes(full, tiny):
    return lambda size, device: tiny(device) if size == "tiny" else full(device)


def _skip_unless(backend, x, out_dtype=None):
    if backend == "auto":
        return
    why = NZ.not_supported_reasons(x, out_dtype).get(backend)
    if why:
        raise Skip(f"{backend}: " + "; ".join(why))


# ---------------------------------------------------------------- noise

def _noise_problem(b, hw, n, out_dtype, stats, device):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(b, 3, hw, hw, generator=g).to(device)
    return {"x": x, "n": n, "sigma": 0.25, "dtype": out_dtype, "mean": stats[0], "std": stats[1]}


def noise_naive(inp):
    x, n, sigma = inp["x"], inp["n"], inp["sigma"]
    shape = (1, 3, 1, 1)

    def step():
        batch = x.repeat_interleave(n, 0)
        noisy = batch + torch.randn_like(batch) * sigma
        mean = torch.tensor(inp["mean"], device=x.device).view(shape)
        std = torch.tensor(inp["std"], device=x.device).view(shape)
        return ((noisy - mean) / std).to(inp["dtype"])
    return step


def noise_floor(inp):
    x, n = inp["x"], inp["n"]
    shape = (x.shape[0] * n,) + tuple(x.shape[1:])
    return lambda: torch.full(shape, 1.0, dtype=inp["dtype"], device=x.device)


def noise_pyssl(backend):
    def setup(inp):
        _skip_unless(backend, inp["x"], inp["dtype"])
        return lambda: pyssl.gaussian_noise(inp["x"], inp["n"], inp["sigma"], seed=0, mean=inp["mean"],
                                            std=inp["std"], out_dtype=inp["dtype"], backend=backend)
    return setup


def _noise_bytes(inp):
    x = inp["x"]
    return x.numel() * inp["n"] * torch.finfo(inp["dtype"]).bits / 8 + x.numel() * 4


# ---------------------------------------------------------------- certification

class SmallCNN(nn.Module):
    """A CIFAR-sized classifier: two strided convolutions, pooling, a linear head."""

    def __init__(self, classes=10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, classes))

    def forward(self, v):
        return self.body(v)


class Bottleneck(nn.Module):
    def __init__(self, cin, width, stride):
        super().__init__()
        cout = 4 * width
        self.f = nn.Sequential(nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                               nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                               nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, v):
        return torch.relu(self.f(v) + self.skip(v))


class ResNet50(nn.Module):
    """ResNet-50's layout (bottlenecks 3-4-6-3, widths 64..512, 25.6M parameters at base 64)."""

    def __init__(self, classes=1000, base=64):
        super().__init__()
        layers = [nn.Conv2d(3, base, 7, 2, 3, bias=False), nn.BatchNorm2d(base), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
        cin = base
        for i, blocks in enumerate((3, 4, 6, 3)):
            width = base * 2 ** i
            for j in range(blocks):
                layers.append(Bottleneck(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = 4 * width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, v):
        return self.net(v)


class NormalizeLayer(nn.Module):
    """Cohen et al.'s normalization layer: rebuilds the mean/std tensors on every call."""

    def __init__(self, mean, std):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, v):
        b, c, h, w = v.shape
        mean = torch.tensor(self.mean, device=v.device).repeat((b, h, w, 1)).permute(0, 3, 1, 2)
        std = torch.tensor(self.std, device=v.device).repeat((b, h, w, 1)).permute(0, 3, 1, 2)
        return (v - mean) / std


def _certify_problem(model_fn, b, hw, n0, n, classes, stats, device, batch=1000):
    torch.manual_seed(0)
    model = model_fn().to(device).eval()
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    x = torch.rand(b, 3, hw, hw, generator=torch.Generator().manual_seed(1)).to(device)
    # CUDA: each setup warms up (cuDNN's algorithm choice, graph capture) on a short run of
    # warm_n samples instead of a whole certification: the case runs with warmup=0
    return {"model": model, "x": x, "n0": n0, "n": n, "alpha": 0.001, "sigma": 0.25,
            "classes": classes, "batch": batch, "mean": stats[0], "std": stats[1],
            "warm_n": 2 * batch if device == "cuda" else 0}


def certify_cohen(inp):
    """Cohen et al.'s Smooth.certify, ported line by line (counts on the host)."""
    from scipy.stats import beta, norm
    clf = nn.Sequential(NormalizeLayer(inp["mean"], inp["std"]), inp["model"])
    x, sigma, k, bs = inp["x"], inp["sigma"], inp["classes"], inp["batch"]

    def count_arr(arr):
        counts = np.zeros(k, dtype=int)
        for idx in arr:
            counts[idx] += 1
        return counts

    def sample_noise(xi, num):
        with torch.no_grad():
            counts = np.zeros(k, dtype=int)
            for _ in range(int(np.ceil(num / bs))):
                this = min(bs, num)
                num -= this
                batch = xi.repeat((this, 1, 1, 1))
                noise = torch.randn_like(batch) * sigma
                pred = clf(batch + noise).argmax(1)
                counts += count_arr(pred.cpu().numpy())
            return counts

    def certify(n):
        out = []
        for i in range(x.shape[0]):
            c_hat = sample_noise(x[i:i + 1], inp["n0"]).argmax()
            counts = sample_noise(x[i:i + 1], n)
            n_a = counts[c_hat]
            p_a = beta.ppf(inp["alpha"], n_a, n - n_a + 1) if n_a > 0 else 0.0
            out.append((-1, 0.0) if p_a < 0.5 else (int(c_hat), sigma * norm.ppf(p_a)))
        return out
    if inp["warm_n"]:
        certify(inp["warm_n"])
    return lambda: certify(inp["n"])


def certify_forward(inp):
    """The model forward alone over the same rows as one certify call (batches of `batch`)."""
    model, x, bs = inp["model"], inp["x"], inp["batch"]
    total = x.shape[0] * (inp["n0"] + inp["n"])
    amp = x.device.type == "cuda"
    dtype = torch.bfloat16 if amp else torch.float32
    fmt = torch.channels_last if amp else torch.contiguous_format
    full = torch.rand((bs,) + tuple(x.shape[1:]), device=x.device, dtype=dtype).contiguous(memory_format=fmt)

    def rows(count):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            for r0 in range(0, count, bs):
                model(full[:min(bs, count - r0)]).argmax(1)
    if inp["warm_n"]:
        rows(inp["warm_n"])
    return lambda: rows(total)


def certify_pyssl(backend, gpu_options=True):
    def setup(inp):
        x = inp["x"]
        _skip_unless(backend, x)
        opts = {}
        if x.device.type == "cuda" and gpu_options:
            opts = dict(autocast=torch.bfloat16, channels_last=True, cuda_graph=True)
        smooth = pyssl.Smooth(inp["model"], inp["classes"], inp["sigma"], mean=inp["mean"], std=inp["std"],
                              batch_size=inp["batch"], seed=0, backend=backend, **opts)
        if inp["warm_n"]:
            smooth.certify(x, inp["n0"], inp["warm_n"], inp["alpha"])
        return lambda: smooth.certify(x, inp["n0"], inp["n"], inp["alpha"])
    return setup


CASES = [
    Case("noise_cpu", "cpu",
         _sizes(lambda dev: _noise_problem(64, 32, 1000, torch.float32, CIFAR, dev),
                lambda dev: _noise_problem(4, 8, 10, torch.float32, CIFAR, dev)),
         {"naive": noise_naive, "floor": noise_floor, "pyssl-torch": noise_pyssl("torch"),
          "pyssl-cpu": noise_pyssl("cpu")},
         bytes=_noise_bytes, repeats=3, optional=("pyssl-torch",),
         notes="64 images of 3×32×32, 1000 samples each, fp32, CIFAR normalization; floor = torch.full of the output."),
    Case("certify_cpu", "cpu",
         _sizes(lambda dev: _certify_problem(SmallCNN, 16, 32, 100, 10_000, 10, CIFAR, dev),
                lambda dev: _certify_problem(SmallCNN, 2, 8, 10, 50, 10, CIFAR, dev, batch=16)),
         {"naive": certify_cohen, "forward": certify_forward, "pyssl-cpu": certify_pyssl("cpu")},
         repeats=2, warmup=0,
         notes="small CNN (2 convs + linear), 16 images of 3×32×32, n0=100, n=10,000, batch 1000; "
               "forward = the model alone on the same 161,600 rows."),
    Case("noise_imagenet", "cuda",
         _sizes(lambda dev: _noise_problem(8, 224, 1000, torch.bfloat16, IMAGENET, dev),
                lambda dev: _noise_problem(2, 16, 4, torch.bfloat16, IMAGENET, dev)),
         {"naive": noise_naive, "floor": noise_floor, "pyssl-cuda": noise_pyssl("cuda"),
          "pyssl-triton": noise_pyssl("triton")},
         bytes=_noise_bytes, repeats=5, run_first=("pyssl-cuda", "floor", "pyssl-triton"),
         notes="8 images of 3×224×224, 1000 samples each, bf16 out, ImageNet normalization; "
               "GB/s counts the output once and the input once."),
    Case("certify_resnet", "cuda",
         _sizes(lambda dev: _certify_problem(ResNet50, 4, 224, 100, 10_000, 1000, IMAGENET, dev, batch=500),
                lambda dev: _certify_problem(lambda: ResNet50(10, base=4), 1, 16, 4, 12, 10, IMAGENET, dev, batch=8)),
         {"naive": certify_cohen, "forward": certify_forward, "pyssl-auto": certify_pyssl("auto"),
          "pyssl-auto[fp32]": certify_pyssl("auto", gpu_options=False)},
         repeats=1, warmup=0, run_first=("pyssl-auto", "forward", "naive"),
         notes="ResNet-50 layout, 4 images of 3×224×224, n0=100, n=10,000, batch 500; pyssl with "
               "bf16 autocast, channels_last and CUDA graphs; pyssl-auto[fp32] without them (the same "
               "precision as the Cohen port); forward = the model alone (bf16) on the same rows."),
]
