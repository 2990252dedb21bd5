"""pyssl.gaussian_noise: the counter scheme on every backend, its statistics, bad input."""
import math

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import pyssl
from pyssl import _dispatch, reference
from pyssl.kernels import noise as KN
from pyssl.ops import noise as N

from conftest import BACKENDS, device_for, GPU

ALL = BACKENDS + (["cuda"] if GPU else [])
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# float32 outputs agree to the last-place rounding of log/sqrt/sin/cos (module docstring)
ATOL32 = 3e-5


def _x(b=3, c=3, h=5, w=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, h, w, generator=g)


# ---------------------------------------------------------------- the generator itself

KAT = [  # Random123's known-answer vectors for Philox4x32-10: (counter, key, words)
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,words", KAT)
def test_philox_known_answers(ctr, key, words):
    t = [torch.tensor([c], dtype=torch.int64) for c in ctr]
    assert tuple(int(w) for w in N.philox4x32(*t, *key)) == words
    cpu = _dispatch.extension().philox4x32_cpu(torch.tensor([ctr], dtype=torch.int64), *key)
    assert tuple(cpu[0].tolist()) == words


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("hw", [(5, 7), (4, 6)], ids=["hw35", "hw24"])
@pytest.mark.gpu
def test_backends_match_reference(backend, out_dtype, layout, hw):
    """hw24 (HW % 4 == 0, logical order): the CUDA per-channel kernel with its packed 16-byte /
    8-byte stores; hw35: quads straddling channels (the general kernel)."""
    dev = device_for(backend)
    x = _x(h=hw[0], w=hw[1]).to(dev)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    kw = dict(seed=(1 << 40) + 7, sample_offset=3, mean=MEAN, std=STD)
    y = pyssl.gaussian_noise(x, 4, 0.5, out_dtype=out_dtype, backend=backend, **kw)
    ref = reference.gaussian_noise(x.cpu(), 4, 0.5, **kw)
    assert y.shape == (12, 3) + hw and y.dtype == out_dtype and y.device.type == dev
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    if out_dtype == torch.float32:
        torch.testing.assert_close(y.cpu(), ref, atol=ATOL32, rtol=1e-5)
    else:   # one rounding to the 16-bit type (half an ulp at |y| <= 16), plus float32 noise
        eps = 2.0 ** -8 if out_dtype == torch.bfloat16 else 2.0 ** -11
        if backend == "triton" and _dispatch.triton_interpret():
            eps *= 2   # the interpreter truncates to 16 bits instead of rounding
        assert ((y.cpu().float() - ref).abs() <= ref.abs() * eps + ATOL32).all()


@pytest.mark.parametrize("backend", ALL)
def test_odd_sizes_and_plain_rank2(backend):
    """Element counts that are not a multiple of 4, rank-2 x without normalization."""
    dev = device_for(backend)
    x = torch.rand(2, 13).to(dev)
    y = pyssl.gaussian_noise(x, 3, 1.0, seed=5, backend=backend)
    torch.testing.assert_close(y.cpu(), reference.gaussian_noise(x.cpu(), 3, 1.0, seed=5), atol=ATOL32, rtol=1e-5)
    x = torch.rand(2, 3, 3, 3).to(dev).contiguous(memory_format=torch.channels_last)   # HW = 9
    y = pyssl.gaussian_noise(x, 2, 1.0, seed=5, mean=MEAN, std=STD, backend=backend)
    ref = reference.gaussian_noise(x.cpu(), 2, 1.0, seed=5, mean=MEAN, std=STD)
    torch.testing.assert_close(y.cpu(), ref, atol=ATOL32, rtol=1e-5)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_images_larger_than_one_block(backend, layout):
    """6912 elements per image: several blocks per row on every backend (C++: 1024 elements or
    1020 positions per block; Triton: 4096 elements per program in the interpreter)."""
    dev = device_for(backend)
    x = torch.rand(2, 3, 48, 48).to(dev)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    y = pyssl.gaussian_noise(x, 2, 0.5, seed=77, mean=MEAN, std=STD, backend=backend)
    ref = reference.gaussian_noise(x.cpu(), 2, 0.5, seed=77, mean=MEAN, std=STD)
    torch.testing.assert_close(y.cpu(), ref, atol=ATOL32, rtol=1e-5)


@pytest.mark.parametrize("backend", ALL)
def test_invariant_to_chunking_and_batch_composition(backend):
    dev = device_for(backend)
    x = _x(b=4).to(dev)
    kw = dict(seed=11, mean=MEAN, std=STD, backend=backend)
    whole = pyssl.gaussian_noise(x, 6, 0.25, **kw).view(4, 6, 3, 5, 7)
    # samples [0, 2) then [2, 6) of every image
    a = pyssl.gaussian_noise(x, 2, 0.25, **kw).view(4, 2, 3, 5, 7)
    b = pyssl.gaussian_noise(x, 4, 0.25, sample_offset=2, **kw).view(4, 4, 3, 5, 7)
    assert torch.equal(torch.cat([a, b], 1), whole)
    # image 2 alone, keyed by its id, gets the same noise as inside the batch: ids on the CPU
    # (as a DataLoader gives them) or on x's device, as a list or a tensor
    for ids in (torch.tensor([2]), torch.tensor([2], device=dev), [2]):
        alone = pyssl.gaussian_noise(x[2:3], 6, 0.25, image_ids=ids, **kw)
        assert torch.equal(alone.view(6, 3, 5, 7), whole[2])
    # the same image under another id gets other noise
    other = pyssl.gaussian_noise(x[2:3], 6, 0.25, image_ids=torch.tensor([9]), **kw)
    assert not torch.allclose(other.view(6, 3, 5, 7), whole[2])


def test_same_values_on_every_backend():
    x = _x(b=2, seed=3)
    ys = {be: pyssl.gaussian_noise(x.to(device_for(be)), 3, 0.5, seed=99, backend=be).cpu()
          for be in ALL}
    for be, y in ys.items():
        torch.testing.assert_close(y, ys["torch"], atol=ATOL32, rtol=1e-5, msg=be)


def test_determinism_and_seed():
    x = _x(b=2)
    a = pyssl.gaussian_noise(x, 3, 0.5, seed=1)
    assert torch.equal(a, pyssl.gaussian_noise(x, 3, 0.5, seed=1))
    b = pyssl.gaussian_noise(x, 3, 0.5, seed=2)
    assert (a - b).abs().mean() > 0.1
    # seeds that differ only in their high 32 bits differ
    c = pyssl.gaussian_noise(x, 3, 0.5, seed=1 + (1 << 32))
    assert (a - c).abs().mean() > 0.1


def test_float64_output_is_computed_in_float64():
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)   # values float32 cannot hold
    y = pyssl.gaussian_noise(x, 2, 0.0, seed=0)
    assert y.dtype == torch.float64 and torch.equal(y, x.repeat_interleave(2, 0))
    m = torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    s = torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)
    y = pyssl.gaussian_noise(x, 2, 0.0, seed=0, mean=MEAN, std=STD)
    torch.testing.assert_close(y, ((x - m) / s).repeat_interleave(2, 0), atol=1e-14, rtol=1e-14)
    assert not torch.equal(x.float().double(), x)
    # with noise: float32's values of z, the affine in float64
    y32 = pyssl.gaussian_noise(x.float(), 2, 0.5, seed=3, mean=MEAN, std=STD, backend="torch")
    y64 = pyssl.gaussian_noise(x, 2, 0.5, seed=3, mean=MEAN, std=STD)
    torch.testing.assert_close(y64.float(), y32, atol=1e-5, rtol=1e-5)
    # gradient in float64: 1/std summed over the samples
    xg = x.clone().requires_grad_(True)
    pyssl.gaussian_noise(xg, 3, 0.5, seed=3, mean=MEAN, std=STD).sum().backward()
    assert xg.grad.dtype == torch.float64
    torch.testing.assert_close(xg.grad, (3.0 / s).expand_as(x), atol=1e-14, rtol=1e-14)


def test_mean_std_take_numpy_scalars_and_arrays():
    x = _x(b=1)
    ref = pyssl.gaussian_noise(x, 2, 0.5, seed=1, mean=[0.5] * 3, std=[0.25] * 3)
    for m, s in ((np.float32(0.5), np.float32(0.25)), (np.array(0.5), np.array([0.25, 0.25, 0.25]))):
        torch.testing.assert_close(pyssl.gaussian_noise(x, 2, 0.5, seed=1, mean=m, std=s), ref)


def test_normalization_per_channel_without_noise():
    x = _x(b=2)
    y = pyssl.gaussian_noise(x, 2, 0.0, seed=0, mean=MEAN, std=STD)
    m = torch.tensor(MEAN).view(1, 3, 1, 1)
    s = torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(y, ((x - m) / s).repeat_interleave(2, 0), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- the tail and its bound

# Seeds whose first draw (quad 0, sample 0, image 0) has a radius word equal to 0 (found by an
# exhaustive search over the low 32 bits of the seed): the radius comes from the extension draw.
ZERO_W0_SEED = 1836991927   # elements 0, 1
ZERO_W2_SEED = 627779616    # elements 2, 3


@pytest.mark.parametrize("backend", ALL)
def test_extension_draw_reaches_the_far_tail(backend):
    dev = device_for(backend)
    x = torch.zeros(1, 4, device=dev)
    for seed, pair in ((ZERO_W0_SEED, slice(0, 2)), (ZERO_W2_SEED, slice(2, 4))):
        w = N.philox4x32(*(torch.zeros(1, dtype=torch.int64) for _ in range(4)), seed & 0xFFFFFFFF, seed >> 32)
        assert int(w[0 if pair.start == 0 else 2]) == 0
        z = pyssl.gaussian_noise(x, 1, 1.0, seed=seed, backend=backend).cpu()[0]
        r2 = float((z[pair] ** 2).sum())
        # a 32-bit radius uniform stops at r^2 = 2·32·ln 2 = 44.4; the extended one goes beyond
        assert 2 * 32 * math.log(2) < r2 <= 2 * 65 * math.log(2) + 1e-3
        torch.testing.assert_close(z, reference.gaussian_noise(x.cpu(), 1, 1.0, seed=seed)[0], atol=1e-4, rtol=1e-5)


def test_tv_bound_covers_the_tail_the_transform_cannot_reach():
    """The bound against the sampler's own extreme: the largest radius the transform can give
    (radius word 0, extension word 0: u = ½·2⁻⁶⁴) leaves a Gaussian pair the tail
    P(R > r_max) = exp(−r_max²/2) per pair, which the bound must cover for every pair, within
    SPEC's 1e-9 at 10⁶ elements; without the extension (32-bit u) the same tail is 5.8e-5."""
    z = torch.zeros(1, dtype=torch.int64)
    r_max = math.sqrt(-2 * float(N._log_radius(z, N._unit(z, 64))[0]))
    r_32 = math.sqrt(-2 * float(N._log_radius(z, N._unit(z, 32))[0]))
    assert 9.4 < r_max < 9.6 and 6.6 < r_32 < 6.8
    for e in (1, 2, 3, 3072, 150528, 10 ** 6):
        assert pyssl.noise_tv_bound(e) >= math.ceil(e / 2) * math.exp(-r_max ** 2 / 2)
    assert pyssl.noise_tv_bound(10 ** 6) <= 1e-9 < 500_000 * math.exp(-r_32 ** 2 / 2)
    assert pyssl.noise_tv_bound(10 ** 6) == 500_000 * 2.0 ** -64
    assert pyssl.noise_tv_bound(3) == 2 * 2.0 ** -64
    with pytest.raises(ValueError, match="numel"):
        pyssl.noise_tv_bound(-1)
    for bad in (1.5, True):
        with pytest.raises(TypeError, match="numel must be an int"):
            pyssl.noise_tv_bound(bad)


# ---------------------------------------------------------------- statistics

def _big_draw(backend="cpu"):
    # 64 images x 64 samples x 1024 elements = 4.2M normals
    x = torch.zeros(64, 1024)
    return pyssl.gaussian_noise(x, 64, 1.0, seed=2024, backend=backend).view(64, 64, 1024)


def test_moments_and_normality():
    from scipy import stats
    z = _big_draw().double()
    n = z.numel()
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / n)
    assert abs(float((z ** 4).mean()) - 3) < 5 * math.sqrt(96 / n)
    assert abs(float((z ** 3).mean())) < 5 * math.sqrt(15 / n)
    sub = z.flatten()[::7].numpy()
    assert stats.kstest(sub, "norm").pvalue > 1e-4
    # tails: the count beyond 4 sigma matches the Gaussian's expectation within 5 sd
    expect = n * 2 * stats.norm.sf(4.0)
    beyond = int((z.abs() > 4.0).sum())
    assert abs(beyond - expect) < 5 * math.sqrt(expect)


def test_independence_across_samples_images_elements():
    z = _big_draw()
    n = z[:, :-1].numel()

    def corr(a, b):
        a, b = a.flatten().double(), b.flatten().double()
        return float(((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std()))

    lim = 5 / math.sqrt(n)
    assert abs(corr(z[:, :-1], z[:, 1:])) < lim        # neighbouring samples
    assert abs(corr(z[:-1], z[1:])) < lim              # neighbouring images
    assert abs(corr(z[..., :-1], z[..., 1:])) < lim    # neighbouring elements (inside a quad too)
    assert abs(corr(z[..., 0::4], z[..., 1::4])) < 5 / math.sqrt(z[..., 0::4].numel())   # cos/sin of one pair
    assert abs(corr(z[..., 0::4] ** 2, z[..., 1::4] ** 2)) < 5 * math.sqrt(2) / math.sqrt(z[..., 0::4].numel())


# ---------------------------------------------------------------- autograd, torch.library

def test_gradient_wrt_x():
    x = _x(b=2).requires_grad_()
    y = pyssl.gaussian_noise(x, 3, 0.5, seed=0, mean=MEAN, std=STD)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    a = 1 / torch.tensor(STD).view(1, 3, 1, 1)
    expect = (w.view(2, 3, 3, 5, 7) * a[:, None]).sum(1)
    torch.testing.assert_close(x.grad, expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_and_compile(backend):
    dev = device_for(backend)
    x = _x(b=2).to(dev)
    rs, rm = N._rows_for(2, 3, 0, x.device)
    ids = torch.arange(2, device=x.device)
    a, b = N._channel_affine("t", x, MEAN, STD)
    for check in (False, True):
        torch.library.opcheck(N._noise_op, (x, rs, rm, ids, a, b, 0.5, 7, 0, torch.float32, False, backend, check))
    f = torch.compile(lambda t: pyssl.gaussian_noise(t, 3, 0.5, seed=7, mean=MEAN, std=STD, backend=backend),
                      fullgraph=True, backend="eager")
    torch.testing.assert_close(f(x), pyssl.gaussian_noise(x, 3, 0.5, seed=7, mean=MEAN, std=STD, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_with_dynamic_shapes(backend):
    """compile(dynamic=True): the channel count is a SymInt, which the per-channel check of
    mean/std must compare by value; two batch and image sizes, one graph, the eager values."""
    torch._dynamo.reset()
    dev = device_for(backend)

    def f(t):
        return pyssl.gaussian_noise(t, 3, 0.5, seed=7, mean=MEAN, std=STD, backend=backend)
    g = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    for shape in ((2, 3, 8, 8), (3, 3, 6, 8)):
        x = torch.rand(shape, device=dev)
        assert torch.equal(g(x), f(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_with_tensor_ids_mean_and_std(backend):
    """image_ids and mean/std as tensors (what a data pipeline hands over) trace with
    fullgraph=True: their values are checked inside the op, which still raises ValueError."""
    torch._dynamo.reset()     # one code object for every backend: its recompiles would add up
    dev = device_for(backend)
    x = _x(b=2).to(dev)
    mean, std = torch.tensor(MEAN, device=dev), torch.tensor(STD, device=dev)

    def f(t, ids, m, s):
        return pyssl.gaussian_noise(t, 3, 0.5, seed=7, image_ids=ids, mean=m, std=s, backend=backend)
    g = torch.compile(f, fullgraph=True, backend="aot_eager")
    ids = torch.tensor([5, 9], device=dev)
    # bit for bit: float32 and float64 tensors (a numpy array's), one value for every channel,
    # a tensor mean with a list std
    assert torch.equal(g(x, ids, mean, std), f(x, ids, mean, std))
    assert torch.equal(g(x, ids, mean.double(), std.double()), f(x, ids, mean.double(), std.double()))
    assert torch.equal(g(x, ids, mean[:1], std[:1]), f(x, ids, mean[:1], std[:1]))
    assert torch.equal(g(x, ids, mean, STD), f(x, ids, mean, STD))
    with pytest.raises(ValueError, match="image_ids must be in"):
        g(x, torch.tensor([5, 1 << 32], device=dev), mean, std)
    with pytest.raises(ValueError, match="std must be finite and > 0"):
        g(x, ids, mean, torch.tensor([0.2, 0.0, 0.2], device=dev))
    with pytest.raises(ValueError, match="mean must be finite"):
        g(x, ids, torch.tensor([0.5, float("nan"), 0.5], device=dev), std)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs,match", [
    (dict(num_samples=0), "num_samples"),
    (dict(sigma=float("nan")), "sigma"),
    (dict(sigma=-1.0), "sigma"),
    (dict(seed=-1), "seed"),
    (dict(seed=1 << 63), "seed"),
    (dict(sample_offset=-2), "sample_offset"),
    (dict(sample_offset=(1 << 32) - 1), "sample_offset"),
    (dict(image_ids=torch.tensor([0, 1])), "image_ids"),
    (dict(image_ids=torch.tensor([0, -1, 2])), "image_ids"),
    (dict(image_ids=torch.tensor([0.0, 1.0, 2.0])), "image_ids"),
    (dict(image_ids=torch.tensor([0, 1, 2], device="meta")), "image_ids must be on x's device"),
    (dict(image_ids=[0, 1, 2 ** 64]), "image_ids must be integers in"),
    (dict(mean=[0.5, 0.5]), "mean"),
    (dict(std=[0.2, 0.0, 0.2]), "std"),
    (dict(std=[0.2, float("inf"), 0.2]), "std"),
    (dict(out_dtype=torch.int32), "out_dtype"),
    (dict(memory_format=torch.channels_last_3d), "memory_format"),
    (dict(backend="gpu"), "backend"),
])
def test_bad_input(kwargs, match):
    args = dict(num_samples=2, sigma=0.5, seed=0)
    args.update(kwargs)
    x = _x()
    before = x.clone()
    with pytest.raises(ValueError, match=match):
        pyssl.gaussian_noise(x, args.pop("num_samples"), args.pop("sigma"), **args)
    assert torch.equal(x, before)


def test_bad_x_and_types():
    with pytest.raises(ValueError, match="x must be a float"):
        pyssl.gaussian_noise(torch.zeros(2, 3, dtype=torch.uint8), 1, 0.5, seed=0)
    with pytest.raises(ValueError, match="x must be"):
        pyssl.gaussian_noise(torch.zeros(0, 3), 1, 0.5, seed=0)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        pyssl.gaussian_noise(np.zeros((2, 3)), 1, 0.5, seed=0)
    with pytest.raises(TypeError, match="num_samples"):
        pyssl.gaussian_noise(torch.zeros(2, 3), 1.5, 0.5, seed=0)
    with pytest.raises(ValueError, match="backend='cuda' cannot serve"):
        pyssl.gaussian_noise(torch.zeros(2, 3), 1, 0.5, seed=0, backend="cuda")


# ---------------------------------------------------------------- the CUDA kernels, driven on the host

_DRIVER = r"""
// Walks the grids of csrc/noise_cuda.cu's kernels on the host through csrc/noise_quad.h.
#include "noise_quad.h"
#include <cmath>
#include <cstdio>
#include <vector>
using namespace pyssl_noise;
template <typename T> static void rd(FILE* f, T* p, size_t n) { if (fread(p, sizeof(T), n, f) != n) throw 1; }
int main(int argc, char** argv) {
  FILE* f = fopen(argv[1], "rb");
  int64_t h[8];  // B, C, HW, R, seed, stream, mode (0 per-channel, 1 general, 2 general channels_last), threads
  rd(f, h, 8);
  const int64_t B = h[0], C = h[1], HW = h[2], R = h[3], E = C * HW, mode = h[6];
  const int threads = (int)h[7];
  const uint64_t seed = (uint64_t)h[4];
  float sigma; rd(f, &sigma, 1);
  std::vector<float> x(B * E), a(C), b(C);
  std::vector<int64_t> src(R), smp(R), ids(B);
  rd(f, x.data(), x.size()); rd(f, a.data(), C); rd(f, b.data(), C);
  rd(f, src.data(), R); rd(f, smp.data(), R); rd(f, ids.data(), B);
  fclose(f);
  std::vector<float> out(R * E, NAN);
  for (int64_t r = 0; r < R; ++r) {
    const Row row{x.data() + src[r] * E, (uint32_t)smp[r], (uint32_t)ids[src[r]], (uint32_t)(2 * h[5]),
                  round_keys((uint32_t)seed, (uint32_t)(seed >> 32)), sigma};
    float* o = out.data() + r * E;
    if (mode == 0) {
      const int64_t per_block = (int64_t)threads * kQuadsPerThread, chunks = (HW / 4 + per_block - 1) / per_block;
      for (int64_t c = 0; c < C; ++c)
        for (int64_t by = 0; by < chunks; ++by)
          for (int t = 0; t < threads; ++t)
            channel_block(row, a[c], b[c], HW, c, by, threads, t,
                          [&](int64_t e0, const float* y) { for (int k = 0; k < 4; ++k) o[e0 + k] = y[k]; });
    } else {
      const int64_t nq = (E + 3) / 4, blocks = std::min<int64_t>((nq + threads - 1) / threads, 3);
      for (int64_t by = 0; by < blocks; ++by)
        for (int t = 0; t < threads; ++t)
          general_thread(row, a.data(), b.data(), E, HW, by, blocks, threads, t,
                         [&](int64_t e, int64_t c, float v) { o[mode == 2 ? (e - c * HW) * C + c : e] = v; });
    }
  }
  f = fopen(argv[2], "wb");
  fwrite(out.data(), sizeof(float), out.size(), f);
  fclose(f);
  return 0;
}
"""


@pytest.fixture(scope="module")
def noise_driver(tmp_path_factory):
    import pathlib
    import shutil
    import subprocess
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler: the CUDA kernels' host driver is not built")
    d = tmp_path_factory.mktemp("noise_driver")
    (d / "driver.cpp").write_text(_DRIVER)
    csrc = pathlib.Path(__file__).resolve().parents[1] / "csrc"
    r = subprocess.run([cxx, "-std=c++17", "-O2", "-I", str(csrc), str(d / "driver.cpp"), "-o", str(d / "driver")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return d / "driver"


@pytest.mark.parametrize("chw,mode,threads", [((3, 8, 8), 0, 4), ((3, 16, 16), 0, 8), ((3, 8, 8), 1, 8),
                                              ((3, 8, 8), 2, 8), ((3, 5, 5), 1, 4), ((3, 5, 5), 2, 4),
                                              ((1, 3, 7), 1, 2)],
                         ids=["channel", "channel-chunks", "general", "general-cl", "straddle", "straddle-cl",
                              "one-channel-odd"])
def test_cuda_kernel_quads_on_the_host(noise_driver, chw, mode, threads, tmp_path):
    """csrc/noise_cuda.cu's per-quad arithmetic and index bookkeeping (csrc/noise_quad.h), walked
    over the kernels' grids on the host (per-channel kernel: chunks of threads x 4 quads; general
    kernel: grid-striding quads that straddle channels, logical and channels_last stores), against
    the CPU backend; every output written (NaN-poisoned), the extension draw included (seed)."""
    import subprocess
    c, hh, ww = chw
    hw = hh * ww
    x = _x(b=2, c=c, h=hh, w=ww, seed=5)
    ids = torch.tensor([0, 9], dtype=torch.int64)
    row_src = torch.tensor([0, 1, 0, 1, 1], dtype=torch.int64)
    row_sample = torch.tensor([0, 0, 3, 7, 1000], dtype=torch.int64)
    a = torch.tensor([2.0, 0.5, 3.0][:c])
    b = torch.tensor([-0.1, 0.2, 0.0][:c])
    sigma, seed, stream = 0.5, ZERO_W0_SEED, 0   # row 0: image 0, sample 0, quad 0 -> extension
    header = np.array([2, c, hw, 5, seed, stream, mode, threads], dtype=np.int64)
    with open(tmp_path / "in.bin", "wb") as f:
        f.write(header.tobytes())
        f.write(np.float32(sigma).tobytes())
        for t in (x.reshape(2, -1), a, b, row_src, row_sample, ids):
            f.write(t.numpy().tobytes())
    r = subprocess.run([str(noise_driver), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = torch.from_numpy(np.fromfile(tmp_path / "out.bin", dtype=np.float32)).view(5, -1)
    assert not got.isnan().any(), "an output element was never written"
    want = N.noise_rows(x, row_src, row_sample, sigma, seed=seed, image_ids=ids, a=a, b=b,
                        out_dtype=torch.float32, channels_last=mode == 2, backend="cpu")
    want = (want.permute(0, 2, 3, 1) if mode == 2 else want).reshape(5, -1)
    # the same polynomials as the CPU backend: equal up to the compilers' FMA contractions
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert float(got[0, :2].sub(x[0].reshape(-1)[:2] * a[0] + b[0]).abs().max()) > 0   # noise present


_RADIUS_DRIVER = r"""
#include <cstdio>
#include "noise_quad.h"
int main() {   // words on stdin, ln of their radius uniform (csrc/noise_quad.h) on stdout
  unsigned w;
  while (std::scanf("%u", &w) == 1) std::printf("%.9e\n", (double)pyssl_noise::log_radius_word(w));
  return 0;
}
"""


@triton.jit
def _radius_probe(W, OUT, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    w = tl.load(W + i, mask=i < n, other=1)
    tl.store(OUT + i, KN._log_radius_word(w), mask=i < n)


def _radius_words():
    top = [(1 << 32) - 1 - i for i in range(300)]                 # u within 2^-24 of 1
    edges = [1, 2, 3, (1 << 23) - 1, 1 << 23, (1 << 23) + 1, (1 << 31) - 1, 1 << 31, (1 << 31) + 1]
    # c = 1 − u around 1 − √½, where ln(1 − c) switches its reduction
    cb = int((1 - 2 ** -0.5) * 2 ** 32)
    edges += [(1 << 32) - 1 - (cb + d) for d in range(-3, 4)]
    rnd = torch.randint(1, 1 << 32, (2000,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    return torch.tensor(top + edges + rnd.tolist(), dtype=torch.int64)


def _exact_log_radius(words):
    """ln((w + ½)·2⁻³²) in float64 by the form that is exact at both ends."""
    u = (words.double() + 0.5) * 2.0 ** -32
    c = ((2 ** 32 - 1 - words).double() + 0.5) * 2.0 ** -32
    return torch.where(u < 0.5, torch.log(u), torch.log1p(-c))


def test_radius_uniform_keeps_its_resolution_near_one(tmp_path):
    """r = sqrt(−2 ln u) for the radius words on every backend: to float32 precision of the
    exact (w + ½)·2⁻³², also for the top words, which a float32 u rounds to 1 (r = 0: an atom of
    probability 2⁻²⁵ per pair and r² resolved to 2⁻²³ only); the smallest r is 2⁻¹⁶."""
    import shutil
    import subprocess
    words = _radius_words()
    want = _exact_log_radius(words)
    assert (want < 0).all() and (-2 * want).sqrt().min() > 2 ** -16.5
    got = {"torch": N._log_radius(words, N._unit(words, 32))}

    dev = device_for("triton")
    out = torch.empty(words.numel(), dtype=torch.float32, device=dev)
    w32 = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)   # same bits
    _radius_probe[(1,)](w32.view(torch.uint32).to(dev), out, words.numel(),
                        BLOCK=triton.next_power_of_2(words.numel()))
    got["triton"] = out.double().cpu()
    cxx = shutil.which("g++") or shutil.which("c++")
    for name, g in got.items():
        rel = ((g - want) / want).abs()
        assert rel.max() < 2e-6, (name, int(words[rel.argmax()]), float(rel.max()))
    if cxx is None:
        pytest.skip("torch and Triton checked; no C++ compiler for csrc/noise_quad.h's version")
    import pathlib
    csrc = pathlib.Path(__file__).resolve().parents[1] / "csrc"
    (tmp_path / "r.cpp").write_text(_RADIUS_DRIVER)
    r = subprocess.run([cxx, "-std=c++17", "-O2", "-I", str(csrc), str(tmp_path / "r.cpp"), "-o",
                        str(tmp_path / "r")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([str(tmp_path / "r")], input=" ".join(map(str, words.tolist())),
                       capture_output=True, text=True, check=True)
    cpp = torch.tensor([float(v) for v in r.stdout.split()], dtype=torch.float64)
    rel = ((cpp - want) / want).abs()
    assert rel.max() < 2e-6, ("c++/cuda", int(words[rel.argmax()]), float(rel.max()))
