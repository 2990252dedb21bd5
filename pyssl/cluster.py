"""Clustering into many centers and top-l multi-label assignment (how MLCD labels a corpus).

    centroids = pyssl.cluster.kmeans(features, 100_000, niter=25, seed=0)          # (k, D)
    idx, sim = pyssl.cluster.topk_assign(features, centroids, l=8)                 # (N, 8) each

kmeans runs faiss's k-means when faiss is importable (faiss-cpu, or faiss-gpu with gpu=True),
else a torch Lloyd's iteration on the same initialisation rule. With spherical=True (cosine
clustering) the points are L2-normalized and the centroids renormalized after every update.
topk_assign streams the samples in batches — a numpy memmap of any size works — and can write
its labels straight into memmaps (out=(indices_memmap, similarities_memmap)).
"""
from __future__ import annotations

import math
import sys
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from pyssl import _checks
from pyssl.ops import knn as _knn


def _progress(progress: Optional[bool]) -> bool:
    return sys.stderr.isatty() if progress is None else bool(progress)


def _gpu_of(x) -> torch.device:
    """The CUDA device to run on: x's when it is a CUDA tensor, else the current one (with its
    index: torch.device("cuda") compares unequal to cuda:0)."""
    if isinstance(x, Tensor) and x.is_cuda:
        return x.device
    return torch.device("cuda", torch.cuda.current_device())


def _use_gpu(fn: str, gpu: Optional[bool], x: Tensor) -> bool:
    if gpu is None:
        return x.device.type == "cuda"
    if gpu and not torch.cuda.is_available():
        raise ValueError(f"{fn}: gpu=True but CUDA is not available")
    return bool(gpu)


KMEANSPP_MAX_K = 4096
KMEANSPP_MAX_POINTS = 1 << 20   # k-means++ seeds from a seeded subset of at most this many rows
LLOYD_BLOCK_ROWS = 1 << 20      # rows per block of a Lloyd pass (streamed from the host when needed)


def _fits_on(dev: torch.device, nbytes: int) -> bool:
    """Whether a training sample of nbytes stays on dev: always on the CPU; on a GPU when it takes
    at most half of the memory free now, counting what torch's allocator holds unused (else it
    stays on the host and streams to the GPU block by block, as faiss-gpu streams its training
    set)."""
    if dev.type != "cuda":
        return True
    free, _total = torch.cuda.mem_get_info(dev)
    free += torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    return nbytes <= free // 2


def kmeans(x, k: int, *, niter: int = 25, seed: int = 0, spherical: bool = True, gpu: Optional[bool] = None,
           init: str = "auto", max_points_per_centroid: int = 256, backend: str = "auto",
           progress: Optional[bool] = None) -> Tensor:
    """k-means centroids (k, D), float32, on x's device (or CUDA with gpu=True).

    init: "k-means++" (seeded greedy D² sampling, 2 + ln k candidates per center), "random" (k
    distinct points, faiss's rule) or "auto" (k-means++ up to k = 4096; beyond, its k sequential
    passes over the data cost about as much as the clustering, so random). Training uses at most
    max_points_per_centroid·k points (a seeded subset, the same rows for a memmap and a tensor),
    as faiss does; empty clusters are re-seeded by splitting the largest one (nudged by ±1/1024
    of its coordinates).
    backend: "auto" (faiss if importable), "faiss" or "torch"; both start from the same centroids.
    On a GPU the float32 training sample stays on the device when it takes at most half of the
    free memory (a float32 x already there with spherical=False is used in place); a larger one
    stays on the host and each Lloyd pass streams it through the GPU in blocks (faiss, which
    takes host arrays, always gets it from the host). k-means++ seeds on the device from a seeded
    subset of at most 2^20 rows of the sample (all of it at the defaults: 256·4096 rows), so the
    seeding never depends on where the sample lives or on free memory.
    """
    fn = "kmeans"
    k = _checks.integer(fn, "k", k, lo=1)
    max_points_per_centroid = _checks.integer(fn, "max_points_per_centroid", max_points_per_centroid, lo=1)
    seed = _checks.integer(fn, "seed", seed)
    if isinstance(x, (np.ndarray, Tensor)) and x.ndim == 2 and x.shape[0] > k * max_points_per_centroid:
        # train on a seeded subset, as faiss does (a memmap reads only the sampled rows), the same
        # rows in the same order for a memmap and a tensor of the same data
        keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
        rows = np.sort(keep[: k * max_points_per_centroid].numpy())
        x = x[rows] if isinstance(x, np.ndarray) else x[torch.from_numpy(rows).to(x.device)]
    x = _knn.as_float_tensor("x", fn, x)
    niter = _checks.integer(fn, "niter", niter, lo=0)
    n, d = x.shape
    if k > n:
        raise ValueError(f"{fn}: k={k} is larger than the number of points ({n})")
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"{fn}: backend must be 'auto', 'faiss' or 'torch', got {backend!r}")
    if init not in ("auto", "k-means++", "random"):
        raise ValueError(f"{fn}: init must be 'auto', 'k-means++' or 'random', got {init!r}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{fn}: x holds non-finite values")
    use_gpu = _use_gpu(fn, gpu, x)
    faiss = _knn.faiss_module()
    if backend == "faiss" and faiss is None:
        raise ValueError(f"{fn}: backend='faiss' cannot serve: faiss is not installed")
    dev = _gpu_of(x) if use_gpu else x.device
    g = torch.Generator().manual_seed(seed)
    use_faiss = backend == "faiss" or (backend == "auto" and faiss is not None and (not use_gpu or _knn.faiss_has_gpu()))
    in_place = not spherical and x.device == dev and x.dtype == torch.float32
    store = dev if in_place else _placement(dev, use_faiss, n * d * 4)
    # spherical: unit rows whatever the scale (_knn.unit_rows: no overflow or norm floor), written
    # block by block into the one float32 copy
    xf = _knn.unit_rows(x.detach(), device=store) if spherical else x.detach().to(store, torch.float32)
    plusplus = init == "k-means++" or (init == "auto" and k <= KMEANSPP_MAX_K)
    if plusplus:
        # on dev (a temporary copy when the sample lives on the host), from a seeded subset when
        # the sample is larger than KMEANSPP_MAX_POINTS rows (drawn after the subsample's own
        # draw, from the same generator: reproducible)
        src = xf
        if n > KMEANSPP_MAX_POINTS:
            pick = torch.randperm(n, generator=g)[:KMEANSPP_MAX_POINTS].sort().values
            src = xf[pick.to(xf.device)]
        cent = _kmeanspp(src.to(dev), k, g)
    else:
        cent = xf[torch.randperm(xf.shape[0], generator=g)[:k].to(store)].to(dev)
    if use_faiss:
        km = faiss.Kmeans(d, k, niter=niter, seed=seed, spherical=spherical, gpu=use_gpu and _knn.faiss_has_gpu(),
                          verbose=_progress(progress), max_points_per_centroid=max_points_per_centroid)
        km.train(np.ascontiguousarray(xf.cpu().numpy()), init_centroids=np.ascontiguousarray(cent.cpu().numpy()))
        return torch.from_numpy(km.centroids.copy()).to(dev)
    return _lloyd_torch(xf, cent, niter, spherical, progress)


def _placement(dev: torch.device, use_faiss: bool, nbytes: int) -> torch.device:
    """Where the float32 sample of nbytes lives: on dev, or on the host for faiss (which takes
    host arrays) and for a sample too large for the GPU (streamed by _lloyd_torch)."""
    return dev if not use_faiss and _fits_on(dev, nbytes) else torch.device("cpu")


def _kmeanspp(x: Tensor, k: int, g: torch.Generator) -> Tensor:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007; the greedy form scikit-learn uses):
    for each next center, 2 + ⌊ln k⌋ candidates drawn with probability proportional to the
    squared distance to the nearest center so far, and the one that lowers the total most is
    kept (one draw per step lands two centers in one blob far more often). Per center one (N, D)
    × (D, L) product (‖x‖² − 2x·c + ‖c‖², no N×D temporary) and inverse-CDF draws on the device
    (a float64 cumulative sum and searchsorted; any N, where torch.multinomial stops at 2^24
    categories), with no host sync: the uniforms come from g up front."""
    n, dev = x.shape[0], x.device
    trials = 2 + int(math.log(k)) if k > 1 else 1
    u = torch.rand(k, trials, generator=g, dtype=torch.float64).to(dev)
    first = torch.randint(n, (1,), generator=g).to(dev)
    sq = x.pow(2).sum(1)
    idx = torch.empty(k, dtype=torch.int64, device=dev)
    idx[:1] = first
    # (indexing with 1-element tensors, never 0-d ones: a 0-d index is read on the host)
    d2 = (sq - 2.0 * (x @ x.index_select(0, first)[0]) + sq.index_select(0, first)).clamp_min(0.0)
    for j in range(1, k):
        cdf = torch.cumsum(d2.double(), 0)
        total = cdf[-1]
        cand = torch.searchsorted(cdf, u[j] * total, right=True).clamp_max(n - 1)
        # every point already a center (fewer distinct points than k): uniform candidates
        cand = torch.where(total > 0, cand, (u[j] * n).long().clamp_max(n - 1))
        dc = (sq[:, None] - 2.0 * (x @ x[cand].t()) + sq[cand][None, :]).clamp_min(0.0)   # (N, L)
        new_d2 = torch.minimum(d2[:, None], dc)
        best = new_d2.double().sum(0).argmin().view(1)
        idx[j:j + 1] = cand.index_select(0, best)
        d2 = new_d2.index_select(1, best)[:, 0]
    return x[idx].clone()


def _lloyd_torch(xf, cent, niter, spherical, progress):
    """Lloyd's iterations on the centers' device; xf (float32) there or on the host, taken in
    blocks of LLOYD_BLOCK_ROWS rows (copied to the device when it is elsewhere)."""
    k, dev = cent.shape[0], cent.device
    n = xf.shape[0]
    for _ in tqdm(range(niter), desc="kmeans", disable=not _progress(progress)):
        bias = None if spherical else _knn.l2_bias(cent)
        sums = torch.zeros_like(cent)
        counts = torch.zeros(k, dtype=torch.int64, device=dev)
        for r0 in range(0, n, LLOYD_BLOCK_ROWS):
            xb = xf[r0:r0 + LLOYD_BLOCK_ROWS].to(dev, non_blocking=True)
            # the nearest center of every point: the fastest exact search here (C++ on the CPU,
            # Triton on the GPU), blocked, never an N×k matrix
            _, assign = _knn.search(xb, cent, 1, bank_bias=bias, backend="auto", fn="kmeans")
            assign = assign[:, 0]
            sums.index_add_(0, assign, xb)
            counts += torch.bincount(assign, minlength=k)
        counts = counts.to(xf.dtype)
        empty = counts == 0
        new = sums / counts.clamp_min(1)[:, None]
        # split the largest cluster into two nudged copies, relative to its coordinates (as faiss
        # does: an absolute nudge vanishes in float32 rounding at large offsets), the signs
        # alternating along D so the two copies differ in every coordinate
        sign = torch.ones(new.shape[1], device=dev)
        sign[1::2] = -1.0
        for c in torch.nonzero(empty).flatten().tolist():
            big = int(torch.argmax(counts))
            nudge = new[big] * sign * (1.0 / 1024)
            new[c] = new[big] + nudge
            new[big] = new[big] - nudge
            counts[c] = counts[big] / 2
            counts[big] = counts[big] / 2
        cent = F.normalize(new, dim=1) if spherical else new
    return cent


def topk_assign(x, centroids, l: int = 8, *, batch_size: Optional[int] = None, gpu: Optional[bool] = None,
                out: Optional[Tuple[np.ndarray, np.ndarray]] = None, backend: str = "auto",
                progress: Optional[bool] = None) -> Tuple[Tensor, Tensor]:
    """The l nearest centroids of every sample by cosine similarity, nearest first.

    x: (N, D) tensor or numpy array (a memmap streams: only batch_size rows are in memory at a
    time). Returns (indices (N, l) int64, similarities (N, l) float32). With out=(idx_array,
    sim_array) — e.g. np.memmap files of shapes (N, l), int64 and float32 — the results are
    written there batch by batch and returned as tensors sharing their memory.
    """
    fn = "topk_assign"
    l = _checks.integer(fn, "l", l, lo=1)
    cent = _knn.as_float_tensor("centroids", fn, centroids)
    if isinstance(x, np.ndarray):
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"{fn}: x must be a non-empty (N, D) array, got shape {x.shape}")
        n, d = x.shape
    else:
        x = _knn.as_float_tensor("x", fn, x)
        n, d = x.shape
    if d != cent.shape[1]:
        raise ValueError(f"{fn}: x has D={d} but centroids have D={cent.shape[1]}")
    if l > cent.shape[0]:
        raise ValueError(f"{fn}: l={l} is larger than the number of centroids ({cent.shape[0]})")
    if batch_size is None:
        # about 2^26 scores per batch (its inputs, normalized copy and results stay small), but
        # never fewer than 4096 rows: every backend blocks the batch × k scores, and the centers
        # are re-read once per batch (at k = 1M the 2^26 rule alone gave 64 rows)
        batch_size = max(1, min(n, 65536, max(4096, (1 << 26) // max(cent.shape[0], 1))))
    batch_size = _checks.integer(fn, "batch_size", batch_size, lo=1)
    if not torch.isfinite(cent).all():
        raise ValueError(f"{fn}: centroids hold non-finite values")
    zero_c = (cent == 0).all(1)
    if bool(zero_c.any()):
        raise ValueError(f"{fn}: centroids hold an all-zero row (row {int(zero_c.nonzero()[0, 0])}): it has no "
                         "direction to compare by cosine")
    ref = cent if not isinstance(x, Tensor) else x
    dev = _gpu_of(ref) if _use_gpu(fn, gpu, ref) else cent.device
    cn = _knn.unit_rows(cent.detach(), device=dev)
    if out is not None:
        idx_out, sim_out = out
        for name, a, dt in (("out[0]", idx_out, np.int64), ("out[1]", sim_out, np.float32)):
            if not isinstance(a, np.ndarray) or a.shape != (n, l) or a.dtype != dt:
                raise ValueError(f"{fn}: {name} must be a numpy array of shape {(n, l)} and dtype "
                                 f"{np.dtype(dt).name}")
        idx_t, sim_t = torch.from_numpy(idx_out), torch.from_numpy(sim_out)
    else:
        idx_t = torch.empty(n, l, dtype=torch.int64)
        sim_t = torch.empty(n, l, dtype=torch.float32)
    for b0 in tqdm(range(0, n, batch_size), desc="topk_assign", disable=not _progress(progress)):
        xb = x[b0:b0 + batch_size]
        xb = torch.from_numpy(np.array(xb, dtype=np.float32)) if isinstance(xb, np.ndarray) else xb
        xb = _knn.unit_rows(xb.detach(), device=dev)
        # checked per batch (a memmap is never read whole) and read with the results (no sync
        # of its own); a non-finite row would otherwise come out as an index that differs by
        # backend (-1, INT64_MAX or a plausible-looking one). Batches before it are written.
        bad = ~torch.isfinite(xb).all(1)
        # an all-zero row has no direction: every centroid would tie at similarity 0 and the
        # row would get centroids 0..l-1 as its labels, silently
        zero = (xb == 0).all(1)
        s, i = _knn.search(xb, cn, l, backend=backend, fn=fn)
        i, bad, zero = i.cpu(), bad.cpu(), zero.cpu()
        for flags, what in ((bad, "holds non-finite values"), (zero, "has an all-zero row")):
            if bool(flags.any()):
                row = b0 + int(flags.nonzero()[0, 0])
                raise ValueError(f"{fn}: x {what} (row {row}; rows [0, {b0}) of the earlier batches are "
                                 "assigned)")
        idx_t[b0:b0 + batch_size] = i
        sim_t[b0:b0 + batch_size] = s.cpu()
    if out is not None:
        for a in out:
            if isinstance(a, np.memmap):
                a.flush()
    elif isinstance(x, Tensor):
        return idx_t.to(x.device), sim_t.to(x.device)
    return idx_t, sim_t
