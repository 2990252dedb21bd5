"""Counter-based Gaussian noise for randomized smoothing, with the normalization fused in.

    gaussian_noise(x, num_samples, sigma, *, seed, sample_offset=0, image_ids=None, mean=None,
                   std=None, out_dtype=None, memory_format=None, backend="auto")
        x (B, ...) -> (B·num_samples, ...), image-major;
        y[i·n + s, e] = a_c · (x[i, e] + sigma · z(seed, image_ids[i], sample_offset + s, e)) + b_c
        with a_c = 1/std_c, b_c = -mean_c/std_c for the channel c of element e (dimension 1).

The generator (the same on every backend; "the counter scheme"):

  Philox4x32-10 (Salmon et al. 2011, Random123's constants), key = (seed mod 2^32, seed >> 32),
  counter = (q, j, image_id, 2·stream + ext) for the quad q = e // 4 of the element index e in
  the logical (contiguous) order of one image, the sample index j, and ext = 0 for the main draw.
  One draw gives four 32-bit words w0..w3 and four normals by Box–Muller:
      z[4q]   = r_A·cos(2π·t_A),  z[4q+1] = r_A·sin(2π·t_A),   r_A = sqrt(−2·ln u_A)
      z[4q+2] = r_B·cos(2π·t_B),  z[4q+3] = r_B·sin(2π·t_B),   r_B = sqrt(−2·ln u_B)
  with float32 uniforms, computed identically everywhere as float32(float32(w) + ½)·2⁻³²
  (round-to-nearest; exact for w < 2²³, a relative resolution of 2⁻²⁴ above):
      u_A = (w0 + ½)·2⁻³²,  t_A = (w1 + ½)·2⁻³²,  u_B = (w2 + ½)·2⁻³²,  t_B = (w3 + ½)·2⁻³²,
  except that a radius word equal to 0 (probability 2⁻³² per pair) takes 32 more bits from the
  extension draw (ext = 1, words v0..v3): u_A = (v0 + ½)·2⁻⁶⁴ when w0 = 0, u_B = (v1 + ½)·2⁻⁶⁴
  when w2 = 0. The radius uniform thus resolves 2⁻⁶⁴ at the bottom, and r reaches 9.49σ.
  At the top, ln u for a radius word w >= 2³¹ is taken from c = 1 − u = (~w + ½)·2⁻³² (float32,
  2⁻²⁴ relative) as ln(1 − c): u near 1 keeps its 2⁻³² resolution, so r² is resolved to 2⁻³¹
  (not the 2⁻²³ of a float32 u, which rounds the top 2⁷ words to 1 and r to 0: an atom at
  zero noise of probability 2⁻²⁵ per pair); the smallest radius is 2⁻¹⁶.

Tail bound (noise_tv_bound): for a true Gaussian pair, the radius exceeds the sampler's largest
r = √(−2 ln 2⁻⁶⁵) only with probability P(U < 2⁻⁶⁵) = 2⁻⁶⁵; the bound counts 2⁻⁶⁴ per pair (the
whole lowest extension cell, 2x slack) for every pair of an image: ceil(E/2)·2⁻⁶⁴ for E elements,
2.7e-14 for E = 10^6 (by the same count a 32-bit Box–Muller, which stops at 6.66σ, leaves 1.2e-4,
and Triton's tl.randn, whose u ≥ 1e-7 stops it at 5.68σ, 0.05). It is a bound on the truncated
tail, the part of the distance that float rounding of the uniforms cannot explain:
like every floating-point sampler this one is discrete (float32 uniforms, 2⁻³² resolution at the
tail end, r² to 2⁻³¹ at the small-radius end, 2⁻²⁴ relative in between), and no sampler's
literal TV distance to a continuous law is below 1.

Agreement across backends: the Philox words and the uniforms are bit-equal everywhere; the
normals differ only by the last-place rounding of each backend's log/sqrt/sin/cos (the torch
backend evaluates them in float64), so outputs agree to ~1e-6 relative in float32.

Backends: cuda (csrc/noise_cuda.cu, the GPU path), triton (kernels/noise.py), cpu (C++/OpenMP,
csrc/noise_cpu.cpp) and torch (chunked PyTorch, int64 Philox). Each reads x once per output
row block and writes every output element once; none allocates more than the output.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from pyssl import _checks, _dispatch

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_PREFERENCE = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}

# Random123's Philox4x32 multipliers and Weyl key increments
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF

SEED_LIMIT = 1 << 63            # seeds are 64-bit non-negative integers
IMAGE_ID_LIMIT = 1 << 32        # image ids index the third counter word
SAMPLE_LIMIT = 1 << 32          # sample indices index the second counter word
ELEMENT_LIMIT = 1 << 34         # quads of an image index the first counter word

# torch backend: rows per chunk so that the int64 temporaries stay near this many quads
_TORCH_CHUNK_QUADS = 1 << 20


def noise_tv_bound(numel: int) -> float:
    """The generator's tail bound for one noisy image of `numel` elements: the Gaussian tail mass
    no draw reaches, summed over its pairs, ceil(numel/2)·2⁻⁶⁴ (module docstring: "Tail bound").
    Smooth.certify subtracts it from the Clopper–Pearson bound. It covers the truncated tail
    only, not the discretization of the uniforms and of the float32 transform."""
    numel = _checks.integer("noise_tv_bound", "numel", numel, lo=0)
    return math.ceil(numel / 2) * 2.0 ** -64


# --------------------------------------------------------------------------------------------
# the counter scheme in PyTorch (int64 tensors holding uint32 words): the torch backend and the
# reading of the scheme every other backend is tested against
# --------------------------------------------------------------------------------------------

def philox4x32(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: int, k1: int,
               rounds: int = PHILOX_ROUNDS):
    """Philox4x32-`rounds` of the counters (int64 tensors in [0, 2^32)), key (k0, k1)."""
    for r in range(rounds):
        if r:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        # products of two uint32 fit 64 bits; int64 multiplication wraps with the same bits
        p0 = c0 * PHILOX_M0
        p1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = ((p1 >> 32) & _MASK32) ^ c1 ^ k0, p1 & _MASK32, ((p0 >> 32) & _MASK32) ^ c3 ^ k1, p0 & _MASK32
    return c0, c1, c2, c3


def _unit(w: Tensor, scale_exp: int) -> Tensor:
    """(w + ½)·2^-scale_exp in float32, rounded as every backend rounds it."""
    return (w.to(torch.float32) + 0.5) * (2.0 ** -scale_exp)


def _log_radius(w: Tensor, u: Tensor) -> Tensor:
    """ln of the radius uniform in float64: ln u for words w < 2^31 (and extended draws), and
    for w >= 2^31 log1p(−c) of c = (~w + ½)·2⁻³² = 1 − u in float32 (module docstring)."""
    c = _unit(w ^ _MASK32, 32).double()
    return torch.where(w >= (1 << 31), torch.log1p(-c), torch.log(u.double()))


def philox_normals(seed: int, image_id: Tensor, sample: Tensor, num_elements: int,
                   stream: int = 0) -> Tensor:
    """Standard normals z(seed, image_id[r], sample[r], e) for e < num_elements, float32 (R, E).

    image_id and sample are int64 (R,) tensors; the transcendental part runs in float64."""
    dev = image_id.device
    nq = (num_elements + 3) // 4
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    q = torch.arange(nq, device=dev, dtype=torch.int64)[None, :]
    c1 = (sample & _MASK32)[:, None].expand(-1, nq)
    c2 = (image_id & _MASK32)[:, None].expand(-1, nq)
    q = q.expand(c1.shape)
    c3 = torch.full_like(q, (2 * stream) & _MASK32)
    w0, w1, w2, w3 = philox4x32(q, c1, c2, c3, k0, k1)
    ua, ub = _unit(w0, 32), _unit(w2, 32)
    need = (w0 == 0) | (w2 == 0)
    if dev.type != "cpu":
        # no host sync on a GPU: draw the extension for every quad and select
        v0, v1, _, _ = philox4x32(q, c1, c2, c3 | 1, k0, k1)
        ua = torch.where(w0 == 0, _unit(v0, 64), ua)
        ub = torch.where(w2 == 0, _unit(v1, 64), ub)
    elif bool(need.any()):
        idx = need.nonzero(as_tuple=True)
        v0, v1, _, _ = philox4x32(q[idx], c1[idx], c2[idx], c3[idx] | 1, k0, k1)
        ua[idx] = torch.where(w0[idx] == 0, _unit(v0, 64), ua[idx])
        ub[idx] = torch.where(w2[idx] == 0, _unit(v1, 64), ub[idx])
    ta, tb = _unit(w1, 32).double(), _unit(w3, 32).double()
    ra = torch.sqrt(-2.0 * _log_radius(w0, ua))
    rb = torch.sqrt(-2.0 * _log_radius(w2, ub))
    two_pi = 2.0 * math.pi
    z = torch.stack([ra * torch.cos(two_pi * ta), ra * torch.sin(two_pi * ta),
                     rb * torch.cos(two_pi * tb), rb * torch.sin(two_pi * tb)], dim=-1)
    return z.reshape(z.shape[0], 4 * nq)[:, :num_elements].float()


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------

def affine_values(fn, mean, std):
    """mean/std checked as Python numbers, before any x is seen: (mean list or None, std list or
    None), each a list of finite floats (one per channel, or one for every channel), std > 0.

    A tensor is read to the host once, so that a call traces under torch.compile without
    data-dependent branches."""
    vals = []
    for name, v in (("mean", mean), ("std", std)):
        if v is None:
            vals.append(None)
            continue
        if isinstance(v, Tensor):
            v = v.detach().cpu().reshape(-1).tolist()
        elif isinstance(v, numbers.Real):          # Python and numpy scalars
            v = [float(v)]
        elif hasattr(v, "reshape") and hasattr(v, "tolist"):    # numpy arrays, 0-d too
            v = v.reshape(-1).tolist()
        try:
            v = [float(u) for u in v]
        except (TypeError, ValueError):
            raise TypeError(f"{fn}: {name} must be a sequence of numbers or a tensor, got {v!r}") from None
        if not v:
            raise ValueError(f"{fn}: {name} is empty")
        if not all(_checks.finite(u) for u in v):
            raise ValueError(f"{fn}: {name} must be finite, got {v}")
        if name == "std" and any(u <= 0 for u in v):
            raise ValueError(f"{fn}: std must be > 0 in every channel, got {v}")
        vals.append(v)
    return tuple(vals)


def _channels(fn, name, n: int, x: Tensor) -> int:
    """x's channel count C, which a mean or std of n values must serve: one value per channel
    (dimension 1), or one for all of them."""
    c = x.shape[1] if x.dim() > 1 else 0
    # two comparisons, not `n in (1, c)`: under torch.compile(dynamic=True) c is a SymInt,
    # which tuple membership does not compare by value
    if x.dim() < 2 or (n != 1 and n != c):
        # the likeliest cause: one image (C, H, W) given where a batch is expected (Cohen et
        # al.'s certify takes one image)
        hint = (f"; x is a batch (B, C, ...): for one image of shape {tuple(x.shape)} pass x[None]"
                if x.dim() >= 1 and x.shape[0] == n else "")
        raise ValueError(f"{fn}: {name} must have one value per channel (x.shape[1] = "
                         f"{c if x.dim() > 1 else 'none: x has no channel dimension'}), "
                         f"got {c if n == 1 else n} values{hint}")
    return c


def _channel_affine(fn, x: Tensor, mean, std, dtype: torch.dtype = torch.float32, blocking: bool = False):
    """(a, b) (C,) of dtype on x's device with y = a·v + b; None/None is the identity.
    mean/std: as affine_values takes them (or its checked output). blocking: copied to a GPU
    with a wait for the copy (for a cache other streams read) rather than without one."""
    if mean is None and std is None:
        return None, None
    c = x.shape[1] if x.dim() > 1 else 0
    checked = {}
    for name, v, default in zip(("mean", "std"), affine_values(fn, mean, std), (0.0, 1.0)):
        if v is None:
            checked[name] = [default] * c
            continue
        c = _channels(fn, name, len(v), x)
        checked[name] = v * c if len(v) == 1 else v
    a = [1.0 / s_ for s_ in checked["std"]]
    b = [-m_ / s_ for m_, s_ in zip(checked["mean"], checked["std"])]
    ab = torch.tensor([a, b], dtype=dtype)
    # otherwise through pinned memory: a plain copy to the GPU waits for the stream, a host sync
    # in every gaussian_noise call
    ab = ab.to(x.device) if blocking else _checks.host_to(ab, x.device)
    return ab[0], ab[1]


def _channel_affine_traced(fn, x: Tensor, mean, std, dtype: torch.dtype):
    """_channel_affine for mean/std tensors under torch.compile: (a, b) formed on the device
    without reading the values (their finiteness and std > 0 are checked in the op,
    _check_values); the per-channel count is a shape, checked here."""
    vals = []
    for name, v, default in (("mean", mean, 0.0), ("std", std, 1.0)):
        # float64 as the eager path's Python floats, rounded to dtype once at the end: the same
        # a, b bit for bit (float64 tensors rounded to float32 first would differ in the last bit)
        if v is None:
            v = torch.full((1,), default, dtype=torch.float64, device=x.device)
        elif isinstance(v, Tensor):
            v = v.detach().reshape(-1).to(x.device, torch.float64)
        else:
            checked = affine_values(fn, v, None)[0] if name == "mean" else affine_values(fn, None, v)[1]
            v = torch.tensor(checked, dtype=torch.float64, device=x.device)
        if v.numel() == 0:
            raise ValueError(f"{fn}: {name} is empty")
        c = _channels(fn, name, v.numel(), x)
        vals.append(v.expand(c) if v.numel() == 1 else v)
    mean_t, std_t = vals
    return (1.0 / std_t).to(dtype).contiguous(), (-mean_t / std_t).to(dtype).contiguous()


def _check_values(fn, image_ids: Tensor, a: Optional[Tensor], b: Optional[Tensor]) -> None:
    """The data checks of a traced call, in the op: ids in range, a = 1/std finite and > 0,
    b = −mean/std finite."""
    if bool(image_ids_out_of_range(image_ids)):
        raise_image_ids_range(fn, image_ids)
    if a is not None and not bool((torch.isfinite(a) & (a > 0)).all()):
        raise ValueError(f"{fn}: std must be finite and > 0 in every channel")
    if b is not None and not bool(torch.isfinite(b).all()):
        raise ValueError(f"{fn}: mean must be finite (and mean / std within float range)")


def _check_x(fn, x):
    _checks.tensor(fn, "x", x)
    if x.dim() < 1 or x.shape[0] == 0 or x.numel() == 0:
        raise ValueError(f"{fn}: x must be (B, ...) with B >= 1 and no empty dimension, got shape {tuple(x.shape)}")
    if x.dtype not in _FLOATS + (torch.float64,):
        raise ValueError(f"{fn}: x must be a float tensor (pixels in [0, 1]), got {x.dtype}")
    if x[0].numel() > ELEMENT_LIMIT:   # beyond it the element counter word would wrap
        raise ValueError(f"{fn}: an image may have at most 2^34 elements, got {x[0].numel()}")


def _check_image_ids(fn, image_ids, b, device, check_range: bool = True):
    """image_ids as int64 on x's device (default 0..B−1). check_range=False leaves the range to
    a caller that syncs later anyway (Smooth: image_ids_out_of_range at its one host copy)."""
    if image_ids is None:
        if b > IMAGE_ID_LIMIT:
            raise ValueError(f"{fn}: more than 2^32 images need explicit image_ids")
        return torch.arange(b, device=device, dtype=torch.int64)
    if not isinstance(image_ids, Tensor):
        try:
            image_ids = torch.as_tensor(image_ids)     # on the host: checked there, copied below
        except (TypeError, ValueError, RuntimeError, OverflowError) as e:
            raise ValueError(f"{fn}: image_ids must be integers in [0, 2^32), one per image of x; "
                             f"{image_ids!r:.80} does not convert to an integer tensor ({e})") from None
    _checks.integer_tensor(fn, "image_ids", image_ids)
    if image_ids.shape != (b,):
        raise ValueError(f"{fn}: image_ids must have shape ({b},) (one id per image of x), got {tuple(image_ids.shape)}")
    if image_ids.device != device and image_ids.device.type != "cpu":
        raise ValueError(f"{fn}: image_ids must be on x's device ({device}) or the CPU, got {image_ids.device}")
    # the range check reads the ids on the host: free for CPU ids (what a DataLoader yields),
    # which are then copied to x's device from pinned memory, without waiting for the stream (a
    # plain copy from pageable memory synchronizes); ids already on a GPU cost one host sync here
    ids = image_ids.to(dtype=torch.int64)
    if check_range and bool(image_ids_out_of_range(ids)):
        raise_image_ids_range(fn, ids)
    return _checks.host_to(ids, device)


def image_ids_out_of_range(ids: Tensor) -> Tensor:
    """A bool scalar on ids' device: whether any id is outside [0, 2^32) (no sync)."""
    return ((ids < 0) | (ids >= IMAGE_ID_LIMIT)).any()


def raise_image_ids_range(fn, ids: Tensor):
    raise ValueError(f"{fn}: image_ids must be in [0, 2^32), got values from {int(ids.min())} to {int(ids.max())}")


def _out_memory_format(fn, x, memory_format):
    """True when the output is stored channels-last (channel innermost)."""
    if memory_format is None or memory_format is torch.preserve_format:
        return x.dim() in (4, 5) and not x.is_contiguous() and (
            x.is_contiguous(memory_format=torch.channels_last) if x.dim() == 4
            else x.is_contiguous(memory_format=torch.channels_last_3d))
    if memory_format is torch.contiguous_format:
        return False
    if memory_format in (torch.channels_last, torch.channels_last_3d):
        want = 4 if memory_format is torch.channels_last else 5
        if x.dim() != want:
            raise ValueError(f"{fn}: memory_format={memory_format} needs a {want}-d x, got shape {tuple(x.shape)}")
        return True
    raise ValueError(f"{fn}: memory_format must be None, torch.contiguous_format, torch.channels_last "
                     f"or torch.channels_last_3d, got {memory_format}")


# --------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------

def _backend_checks(x: Tensor, out_dtype: torch.dtype, rows: int = 0):
    def cpu():
        return [] if out_dtype in _FLOATS else [f"the C++ kernel writes float32/bfloat16/float16, not {out_dtype}"]

    def triton():
        r = []
        if out_dtype not in _FLOATS:
            r.append(f"the Triton kernel writes float32/bfloat16/float16, not {out_dtype}")
        blocks = -(-x[0].numel() // 1024)
        if rows * blocks > 2 ** 31 - 1:
            r.append(f"{rows} output rows of {blocks} blocks exceed Triton's 2^31 − 1 programs")
        return r

    def cuda():
        r = [] if out_dtype in _FLOATS else [f"the CUDA kernel writes float32/bfloat16/float16, not {out_dtype}"]
        if rows > 2 ** 31 - 1:
            r.append(f"the CUDA kernel takes at most 2^31 − 1 output rows (one grid row each), got {rows}")
        return r

    return {"cuda": cuda, "triton": triton, "cpu": cpu, "torch": lambda: []}


def not_supported_reasons(x: Tensor, out_dtype: Optional[torch.dtype] = None) -> dict:
    """Why each backend cannot serve this input (empty list: it can)."""
    return _dispatch.not_supported_reasons(_backend_checks(x, out_dtype or x.dtype), x.device)


def _torch_noise(xf, row_src, row_sample, image_ids, a, b, sigma, seed, stream, out, channels_last, chw):
    e = xf.shape[1]
    rows = max(1, _TORCH_CHUNK_QUADS // max(1, (e + 3) // 4))
    c, hw = chw
    for r0 in range(0, row_src.shape[0], rows):
        src = row_src[r0:r0 + rows]
        z = philox_normals(seed, image_ids[src], row_sample[r0:r0 + rows], e, stream)
        y = xf[src] + sigma * z
        if a is not None:
            y = (y.view(-1, c, hw) * a[:, None] + b[:, None]).view(-1, e)
        if channels_last:
            out[r0:r0 + rows].view(-1, hw, c).copy_(y.view(-1, c, hw).transpose(1, 2))
        else:
            out[r0:r0 + rows].copy_(y)
    return out


def _noise_rows(xf: Tensor, row_src: Tensor, row_sample: Tensor, image_ids: Tensor,
                a: Optional[Tensor], b: Optional[Tensor], sigma: float, seed: int, stream: int,
                out_dtype: torch.dtype, channels_last: bool, chw, backend: str,
                out: Optional[Tensor] = None) -> Tensor:
    """The engine: out (R, E) in storage order (logical, or (R, HW, C) when channels_last),
    row r = noisy copy of xf[row_src[r]] with sample index row_sample[r]. `out`, when given, is
    a contiguous (R, E) tensor of out_dtype to write into (Smooth's CUDA-graph input)."""
    r = row_src.shape[0]
    if out is None:
        out = torch.empty((r, xf.shape[1]), dtype=out_dtype, device=xf.device)
    if r == 0:
        return out
    if backend == "torch":
        return _torch_noise(xf, row_src, row_sample, image_ids, a, b, sigma, seed, stream, out, channels_last, chw)
    c, hw = chw
    if a is None:
        a = torch.ones(c, dtype=torch.float32, device=xf.device)
        b = torch.zeros(c, dtype=torch.float32, device=xf.device)
    if backend == "cpu":
        _dispatch.extension().gaussian_noise_cpu(xf, row_src, row_sample, image_ids, a, b, sigma,
                                                 seed, stream, c, hw, channels_last, out)
    elif backend == "cuda":
        _dispatch.extension().gaussian_noise_cuda(xf, row_src, row_sample, image_ids, a, b, sigma,
                                                  seed, stream, c, hw, channels_last, out)
    else:
        from pyssl.kernels import noise as K
        K.gaussian_noise(xf, row_src, row_sample, image_ids, a, b, sigma, seed, stream, c, hw,
                         channels_last, out)
    return out


# --------------------------------------------------------------------------------------------
# the custom op (differentiable in x: dy/dx = a, summed over the samples of each image)
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("pyssl::gaussian_noise", mutates_args=(), tags=_dispatch.HOST_SYNC_TAGS)
@_dispatch.autocast_off
def _noise_op(x: Tensor, row_src: Tensor, row_sample: Tensor, image_ids: Tensor,
              a: Optional[Tensor], b: Optional[Tensor], sigma: float, seed: int, stream: int,
              out_dtype: torch.dtype, channels_last: bool, backend: str, check: bool) -> Tensor:
    if check:
        # under torch.compile the data-dependent checks run here, in the op (eager: before it,
        # where CPU image ids and Python mean/std cost no device sync)
        _check_values("gaussian_noise", image_ids, a, b)
    xf = x.reshape(x.shape[0], -1).to(_engine_dtype(out_dtype)).contiguous()
    chw = _chw(x)
    y = _noise_rows(xf, row_src, row_sample, image_ids, a, b, sigma, seed, stream, out_dtype,
                    channels_last, chw, backend)
    return _as_output(y, x, row_src.shape[0], channels_last)


def _engine_dtype(out_dtype: torch.dtype) -> torch.dtype:
    """What x is read as: float32, except for float64 output (the torch backend, the only one
    writing it, then forms x + σ·z and the normalization in float64, so σ = 0 returns x)."""
    return torch.float64 if out_dtype == torch.float64 else torch.float32


def _chw(x: Tensor):
    c = x.shape[1] if x.dim() > 1 else 1
    hw = x[0].numel() // c if x.dim() > 1 else 1
    return c, hw


def _as_output(y: Tensor, x: Tensor, rows: int, channels_last: bool) -> Tensor:
    shape = (rows,) + tuple(x.shape[1:])
    if not channels_last:
        return y.view(shape)
    c = shape[1]
    spatial = shape[2:]
    # storage is (R, *spatial, C): view it so, then permute to the logical (R, C, *spatial)
    perm = (0, len(shape) - 1) + tuple(range(1, len(shape) - 1))
    return y.view((rows,) + tuple(spatial) + (c,)).permute(perm)


@_noise_op.register_fake
def _(x, row_src, row_sample, image_ids, a, b, sigma, seed, stream, out_dtype, channels_last, backend, check):
    rows = row_src.shape[0]
    shape = (rows,) + tuple(x.shape[1:])
    y = x.new_empty(shape, dtype=out_dtype)
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return y


def _noise_setup(ctx, inputs, output):
    x, row_src, row_sample, image_ids, a, b, *_ = inputs
    ctx.save_for_backward(row_src, a)
    ctx.x_shape = x.shape
    ctx.x_dtype = x.dtype


def _noise_backward(ctx, grad):
    row_src, a = ctx.saved_tensors
    shape = ctx.x_shape
    acc = torch.float64 if torch.float64 in (grad.dtype, ctx.x_dtype) else torch.float32
    g = grad.to(acc)
    if a is not None:
        c = shape[1]
        g = g * a.to(acc).view((1, c) + (1,) * (len(shape) - 2))
    dx = torch.zeros(shape, dtype=acc, device=grad.device).index_add_(0, row_src, g)
    return (dx.to(ctx.x_dtype),) + (None,) * 12


_noise_op.register_autograd(_noise_backward, setup_context=_noise_setup)


def _rows_for(b: int, num_samples: int, sample_offset: int, device):
    row_src = torch.arange(b, device=device, dtype=torch.int64).repeat_interleave(num_samples)
    row_sample = (torch.arange(num_samples, device=device, dtype=torch.int64) + sample_offset).repeat(b)
    return row_src, row_sample


def gaussian_noise(x: Tensor, num_samples: int, sigma: float, *, seed: int, sample_offset: int = 0,
                   image_ids: Optional[Tensor] = None, mean: Union[None, Sequence[float], Tensor] = None,
                   std: Union[None, Sequence[float], Tensor] = None,
                   out_dtype: Optional[torch.dtype] = None, memory_format=None,
                   backend: str = "auto") -> Tensor:
    """num_samples noisy, normalized copies of every image of x, image-major:
    y[i·n + s] = a·(x[i] + sigma·z(seed, image_ids[i], sample_offset + s, element)) + b, with
    a = 1/std, b = −mean/std per channel and z standard normal from the counter scheme (module
    docstring: Philox4x32-10, Box–Muller with tails to 9.49σ).

    x: (B, ...) float pixels (noise is added before normalization). mean/std: one value per
    channel (x.shape[1]). out_dtype: float32/bfloat16/float16, or float64 (torch backend, which
    then forms x + σ·z and the normalization in float64); default x's dtype.
    memory_format: None keeps x's (channels_last stays channels_last), or torch.contiguous_format,
    torch.channels_last (4-d x), torch.channels_last_3d (5-d x). The values depend only on
    (seed, image_ids[i], sample_offset + s, element) — not on B, chunking, backend or device.
    image_ids: (B,) integers in [0, 2^32), default 0..B−1; on x's device or on the CPU (checked
    there and copied from pinned memory, no device sync; ids on a GPU cost one sync for the
    range check).
    Differentiable in x."""
    fn = "gaussian_noise"
    _check_x(fn, x)
    num_samples = _checks.integer(fn, "num_samples", num_samples, lo=1, hi=SAMPLE_LIMIT)
    sigma = _checks.real(fn, "sigma", sigma, nonnegative=True)
    seed = _checks.integer(fn, "seed", seed, lo=0, hi=SEED_LIMIT - 1)
    sample_offset = _checks.integer(fn, "sample_offset", sample_offset, lo=0, hi=SAMPLE_LIMIT - 1)
    if sample_offset + num_samples > SAMPLE_LIMIT:
        raise ValueError(f"{fn}: sample_offset + num_samples must be <= 2^32, got {sample_offset + num_samples}")
    if out_dtype is None:
        out_dtype = x.dtype
    if out_dtype not in _FLOATS + (torch.float64,):
        raise ValueError(f"{fn}: out_dtype must be a float dtype, got {out_dtype}")
    # under torch.compile, values a graph cannot read on the host (image ids, mean/std given as
    # tensors) are checked inside the op instead
    tracing = torch.compiler.is_compiling()
    ids = _check_image_ids(fn, image_ids, x.shape[0], x.device, check_range=not tracing)
    if tracing and (isinstance(mean, Tensor) or isinstance(std, Tensor)):
        a, b = _channel_affine_traced(fn, x, mean, std, _engine_dtype(out_dtype))
    else:
        a, b = _channel_affine(fn, x, mean, std, _engine_dtype(out_dtype))
    channels_last = _out_memory_format(fn, x, memory_format)
    chosen = _dispatch.choose(fn, backend, x.device, _PREFERENCE,
                              _backend_checks(x, out_dtype, x.shape[0] * num_samples))
    row_src, row_sample = _rows_for(x.shape[0], num_samples, sample_offset, x.device)
    return _noise_op(x, row_src, row_sample, ids, a, b, sigma, seed, 0, out_dtype, channels_last, chosen, tracing)


def noise_rows(x: Tensor, row_src: Tensor, row_sample: Tensor, sigma: float, *, seed: int,
               image_ids: Tensor, a: Optional[Tensor], b: Optional[Tensor], out_dtype: torch.dtype,
               channels_last: bool, backend: str, stream: int = 0) -> Tensor:
    """Engine entry for callers that pack rows themselves (Smooth): row r is the noisy copy of
    x[row_src[r]] with sample index row_sample[r]. Arguments are assumed checked."""
    return _noise_op(x, row_src, row_sample, image_ids, a, b, sigma, seed, stream, out_dtype,
                     channels_last, backend, False)
