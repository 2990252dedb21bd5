"""Exact k-nearest-neighbour search by inner product, the engine of clustering assignment and
kNN OOD scoring.

    search(queries, bank, k, *, bank_bias=None, backend="auto") -> (scores (Q, k) f32, indices (Q, k) i64)

score(q, b) = q·b + bank_bias_b, the k largest per query, sorted descending (ties: lower index).
Cosine similarity: pass L2-normalized rows. Squared L2: bank_bias = −½‖b‖², then
‖q − b‖² = ‖q‖² − 2·score (see l2_bias / l2_from_scores).

Backends:
  cpu     C++/OpenMP (csrc/knn_cpu.cpp): MKL GEMM blocks and a per-query heap fed by a
          vectorized strip filter; never the Q×B matrix.
  faiss   faiss flat index (IndexFlatIP; faiss-gpu's GpuIndexFlatIP for CUDA tensors when
          installed). faiss loads on first use. No bank_bias: the bias is folded in by an extra
          coordinate (q ↦ [q, 1], b ↦ [b, bias]), exact.
  triton  fused similarity tiles with a streaming top-k (kernels/knn.py): never the Q×B matrix.
          k > MAX_K (256): an exact partitioned search over the same kernel (the bank cut into
          partitions, each one's top 256 merged; queries whose k-th score a full partition list
          could hide are redone exactly), for kNN OOD at k = 1000.
  torch   chunked matmul + topk, merged across bank chunks; Q×chunk memory.
"""
from __future__ import annotations

import functools
import importlib.util
import threading
import warnings
import weakref
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pyssl import _checks, _dispatch

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
BACKENDS = ("auto", "cpu", "faiss", "triton", "torch")

# torch path: Q-chunk × B-chunk score blocks of at most this many elements
CHUNK_ELEMS = 1 << 24


@functools.lru_cache(maxsize=None)
def faiss_module():
    """The faiss module, imported on first use (None when not installed)."""
    if importlib.util.find_spec("faiss") is None:
        return None
    import faiss
    return faiss


def faiss_has_gpu() -> bool:
    f = faiss_module()
    return f is not None and hasattr(f, "StandardGpuResources") and f.get_num_gpus() > 0


def as_float_tensor(name: str, fn: str, x, ndim: int = 2) -> Tensor:
    """Accept a tensor or a numpy array (a memmap too); check rank, emptiness and dtype."""
    if isinstance(x, np.ndarray):
        if x.dtype not in (np.float32, np.float16, np.float64):
            raise ValueError(f"{fn}: {name} must hold floats, got numpy dtype {x.dtype}")
        x = np.ascontiguousarray(x)
        if x.flags.writeable:
            x = torch.from_numpy(x)
        else:
            with warnings.catch_warnings():
                # a read-only memmap (np.load(mmap_mode="r")) is wrapped, never written: torch's
                # warning about non-writable arrays does not apply
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{fn}: {name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{fn}: {name} is empty (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise ValueError(f"{fn}: {name} must be a float tensor, got {x.dtype}")
    return x


def unit_rows(x: Tensor, dtype: torch.dtype = torch.float32, device=None, block: int = 1 << 16,
              out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Rows scaled to unit L2 norm, in dtype, on device (default x's): each row first divided by
    its largest magnitude in its own dtype, so a float32 row of 1e20 (whose squared norm
    overflows) or a float64 row of 1e-50 (zero once cast) or below F.normalize's 1e-12 norm
    floor still comes out a unit vector. Zero rows stay zero; a row with inf or NaN comes out
    NaN. Blocks of rows at a time into one output: the only full-size allocation (x may stay
    on the host while the output is on the GPU). out_dtype: the output's dtype when not dtype
    (a 16-bit bank normalized in float32 block by block, stored 16-bit: no full float32 copy)."""
    device = x.device if device is None else torch.device(device)
    # computed on the GPU where either side is one (a CUDA x bound for host memory too)
    work = x.device if x.device.type == "cuda" else device
    out = torch.empty(x.shape, dtype=dtype if out_dtype is None else out_dtype, device=device)
    for r0 in range(0, x.shape[0], block):
        xb = x[r0:r0 + block].to(work)
        top = xb.abs().amax(1, keepdim=True)
        yb = (xb / top.clamp_min(torch.finfo(xb.dtype).tiny)).to(dtype)
        out[r0:r0 + block] = F.normalize(yb, dim=1)
    return out


def row_mean(x: Tensor, device=None, block: int = 1 << 16) -> Tensor:
    """Mean of the rows of x in float64, on device (default x's), block by block (no float64 copy
    of x)."""
    device = x.device if device is None else torch.device(device)
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=device)
    for r0 in range(0, x.shape[0], block):
        total += x[r0:r0 + block].to(device).sum(0, dtype=torch.float64)
    return total / max(x.shape[0], 1)


def centered_rows(x: Tensor, center: Tensor, dtype: torch.dtype = torch.float32, device=None,
                  block: int = 1 << 13) -> Tensor:
    """x − center in dtype, on device (default center's), computed in float64 block by block.
    Squared L2 distances are unchanged by a common shift, and the search's ‖q‖² − 2q·b + ‖b‖²
    in float32 loses what a large common offset adds to those terms: around the bank's mean only
    the data's own spread is left. (Blocks of 8192 rows: the float64 temporary stays small.)"""
    device = center.device if device is None else torch.device(device)
    center = center.to(device)
    out = torch.empty(x.shape, dtype=dtype, device=device)
    for r0 in range(0, x.shape[0], block):
        out[r0:r0 + block] = (x[r0:r0 + block].to(device, torch.float64) - center).to(dtype)
    return out


def l2_bias(bank: Tensor, block: int = 1 << 16) -> Tensor:
    """bank_bias that turns the inner-product search into a squared-L2 nearest search: −½‖b‖²
    in float32, computed in row blocks (a 16-bit 1.28M × 768 bank's float32 copy and its
    squares would be two 3.9 GB temporaries)."""
    out = torch.empty(bank.shape[0], dtype=torch.float32, device=bank.device)
    for r0 in range(0, bank.shape[0], block):
        out[r0:r0 + block] = bank[r0:r0 + block].float().pow(2).sum(1)
    return out.mul_(-0.5)


def l2_from_scores(queries: Tensor, scores: Tensor) -> Tensor:
    """‖q − b‖² from the scores of an l2_bias search (clamped at 0 against rounding)."""
    return (queries.float().pow(2).sum(1, keepdim=True) - 2.0 * scores).clamp_min(0.0)


def _reasons(queries: Tensor, k: int):
    def faiss_reasons() -> List[str]:
        if faiss_module() is None:
            return ["faiss is not installed (pip install faiss-cpu, or faiss-gpu for CUDA)"]
        if queries.device.type == "cuda" and not faiss_has_gpu():
            return ["this faiss has no GPU support for CUDA tensors"]
        return []

    def triton_reasons() -> List[str]:
        # k > MAX_K runs as an exact partitioned search (_search_triton_large)
        return _dispatch.common_reasons("triton", queries.device)

    return {"cpu": lambda: _dispatch.common_reasons("cpu", queries.device), "faiss": faiss_reasons,
            "triton": triton_reasons, "torch": lambda: []}


def not_supported_reasons(queries: Tensor, k: int) -> dict:
    return {name: fn() for name, fn in _reasons(queries, k).items()}


def choose_backend(fn: str, backend: str, queries: Tensor, k: int) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{fn}: backend must be one of {BACKENDS}, got {backend!r}")
    checks = _reasons(queries, k)
    if backend != "auto":
        why = checks[backend]()
        if why:
            raise ValueError(f"{fn}: backend={backend!r} cannot serve these inputs: " + "; ".join(why))
        return backend
    order = ("triton", "faiss", "torch") if queries.device.type == "cuda" else ("cpu", "faiss", "torch")
    for name in order:
        if not checks[name]():
            return name
    return "torch"  # pragma: no cover - torch always serves


def _merge_topk(s_a, i_a, s_b, i_b, k):
    """Top-k of two candidate sets, ties to the lower index (stable on a sort by index first)."""
    s = torch.cat([s_a, s_b], 1)
    i = torch.cat([i_a, i_b], 1)
    order = torch.argsort(i, dim=1, stable=True)
    s, i = s.gather(1, order), i.gather(1, order)
    top = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    return s.gather(1, top), i.gather(1, top)


def _block_topk(s: Tensor, k: int):
    """topk of each row, exact on ties: every score above the k-th value, then the lowest-index
    entries equal to it; returned by descending score, ties by ascending index. torch.topk picks
    among boundary ties arbitrarily, so the rows where a tie straddles the k-th place (rare) are
    redone exactly."""
    val, idx = s.topk(k, dim=1)
    kth = val[:, -1:]
    straddle = torch.nonzero((s == kth).sum(1) > (val == kth).sum(1)).flatten()
    if straddle.numel():
        r = s[straddle]
        rk = kth[straddle]
        above, equal = r > rk, r == rk
        take = above | (equal & (equal.cumsum(1) <= k - above.sum(1, keepdim=True)))
        ridx = take.nonzero()[:, 1].view(-1, k)
        val[straddle], idx[straddle] = r.gather(1, ridx), ridx
    # order by (score desc, index asc): stable sort by index, then stable sort by score
    o = torch.argsort(idx, dim=1, stable=True)
    val, idx = val.gather(1, o), idx.gather(1, o)
    o = torch.sort(val, dim=1, descending=True, stable=True).indices
    return val.gather(1, o), idx.gather(1, o)


def _search_torch(queries, bank, k, bank_bias, exact: bool = False):
    """Blocked GEMM + top-k. Its float32 products follow torch's float32 matmul setting (TF32
    where the user allowed it on a GPU); exact=True computes them in float64 on CUDA (the rare
    queries the Triton large-k search redoes, which must rank as its exact float32 kernel)."""
    q = queries.float()
    wide = exact and q.is_cuda
    if wide:
        q = q.double()
    nq, nb = q.shape[0], bank.shape[0]
    qc = max(1, min(nq, 4096))
    bc = max(k, min(nb, CHUNK_ELEMS // qc))
    out_s = torch.empty(nq, k, dtype=torch.float32, device=q.device)
    out_i = torch.empty(nq, k, dtype=torch.int64, device=q.device)
    for q0 in range(0, nq, qc):
        qb = q[q0:q0 + qc]
        best_s = best_i = None
        for b0 in range(0, nb, bc):
            blk = bank[b0:b0 + bc].float()
            s = qb @ (blk.double() if wide else blk).t()
            if wide:
                s = s.float()
            if bank_bias is not None:
                s += bank_bias[b0:b0 + bc]
            ts, ti = _block_topk(s, min(k, s.shape[1]))
            ti = ti + b0
            if best_s is None:
                best_s, best_i = ts, ti
            else:
                best_s, best_i = _merge_topk(best_s, best_i, ts, ti, k)
        out_s[q0:q0 + qc], out_i[q0:q0 + qc] = best_s, best_i
    return out_s, out_i


# k > MAX_K: query rows per pass, so that one pass's merge (P·part_k candidates per query: float32
# scores, int64 ids, their sorted copies and orders, ~48 bytes each) stays near this many bytes
LARGE_K_MERGE_BYTES = 1 << 31


def _num_parts(k: int, part_k: int) -> int:
    """Bank partitions of the large-k search: each holds about a quarter of part_k of the k best."""
    return max(2, -(-4 * k // part_k))


def _search_triton_large(queries, bank, k, bank_bias, part_k: Optional[int] = None):
    """_search_triton_large_rows over query chunks (1M queries at k = 1000 would otherwise merge
    4096 candidates per query at once: ~200 GB)."""
    from pyssl.kernels import knn as K
    part_k = K.MAX_K if part_k is None else part_k
    per = max(1, LARGE_K_MERGE_BYTES // (48 * _num_parts(k, part_k) * part_k))
    if queries.shape[0] <= per:
        return _search_triton_large_rows(queries, bank, k, bank_bias, part_k)
    out_s = torch.empty(queries.shape[0], k, dtype=torch.float32, device=queries.device)
    out_i = torch.empty(queries.shape[0], k, dtype=torch.int64, device=queries.device)
    for q0 in range(0, queries.shape[0], per):
        out_s[q0:q0 + per], out_i[q0:q0 + per] = _search_triton_large_rows(
            queries[q0:q0 + per], bank, k, bank_bias, part_k)
    return out_s, out_i


def _search_triton_large_rows(queries, bank, k, bank_bias, part_k: int):
    """Exact top-k for k beyond the fused kernel's on-chip limit (MAX_K).

    The bank is cut into P interleaved partitions (rows p, p + P, p + 2P, ...: strided views,
    no copies), P = ceil(4k / part_k), so that a partition holds about a quarter of part_k of the
    k best on average; the fused kernel returns each partition's top part_k, the candidates are
    merged (ties to the lower index: a partition's local order is the global one) and give the
    k-th score tau per query. The result is exact unless some partition returned a full list
    whose last score is >= tau — only then can it hide an entry that belongs (equal scores
    included). Those queries are redone by the exact chunked torch search. Interleaved rather
    than contiguous: a bank stored class by class (ImageNet's 1,281 rows per class) put a query's
    own class, often more than part_k of its k best, into one contiguous partition, and nearly
    every query was redone; interleaved, the redo needs k best that fall on one residue mod P."""
    from pyssl.kernels import knn as K
    nb = bank.shape[0]
    parts = min(_num_parts(k, part_k), nb)
    cand_s, cand_i, full_last = [], [], []
    for p in range(parts):
        sub = bank[p::parts]
        n_p = sub.shape[0]
        kp = min(part_k, n_p)
        bias = None if bank_bias is None else bank_bias[p::parts]
        s_p, i_p = K.knn_topk(queries, sub, kp, bank_bias=bias)
        cand_s.append(s_p)
        cand_i.append(i_p * parts + p)
        if kp == part_k and n_p > part_k:   # a full list: entries may hide below its last
            full_last.append(s_p[:, -1])
    s = torch.cat(cand_s, 1)
    i = torch.cat(cand_i, 1)
    del cand_s, cand_i
    order = torch.argsort(i, dim=1, stable=True)
    s, i = s.gather(1, order), i.gather(1, order)
    top = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    out_s, out_i = s.gather(1, top), i.gather(1, top)
    if full_last:
        tau = out_s[:, -1]
        redo = (torch.stack(full_last, 1) >= tau[:, None]).any(1).nonzero().flatten()
        if redo.numel():
            rs, ri = _search_torch(queries[redo], bank, k, bank_bias, exact=True)
            out_s[redo], out_i[redo] = rs, ri
    return out_s, out_i


# The last faiss index built, reused while its bank (and bias) are the same tensors, unmodified:
# topk_assign searches one centroid table batch after batch and KNNScorer one bank call after
# call, and a rebuild per batch re-copied (on the GPU, re-uploaded) the whole table each time.
# Weak references: a freed bank whose memory a new tensor reuses can never match, and the
# cached index is dropped with its bank. One entry, read and replaced as a whole (threads
# searching different banks each use the index they looked up or built); a GPU index is
# searched under its lock (faiss's GPU indexes are not thread-safe; CPU searches are).
_FAISS_CACHE: dict = {"entry": None}


def _weak_key(t: Optional[Tensor]):
    """(weak reference, version) of a tensor, None for None: equal only for the same, unmodified
    tensor (in-place writes, through views too, bump the version)."""
    return None if t is None else (weakref.ref(t), t._version)


def _matches(key, t: Optional[Tensor]) -> bool:
    return key is None if t is None else (key is not None and key[0]() is t and key[1] == t._version)


class _FaissEntry:
    def __init__(self, device, bank, bias, index, res):
        self.device, self.index, self.res = device, index, res
        self.bank, self.bias = _weak_key(bank), _weak_key(bias)
        self.lock = threading.Lock() if device.type == "cuda" else None
        self.finalizer = None

    def serves(self, device, bank, bias) -> bool:
        return self.device == device and _matches(self.bank, bank) and _matches(self.bias, bias)


def _faiss_index(faiss, bank, bank_bias, device) -> "_FaissEntry":
    entry = _FAISS_CACHE["entry"]
    if entry is not None and entry.serves(device, bank, bank_bias):
        return entry
    b = bank.detach().float().cpu().numpy()
    if bank_bias is not None:
        b = np.concatenate([b, bank_bias.detach().float().cpu().numpy()[:, None]], 1)
    index = faiss.IndexFlatIP(b.shape[1])
    res = None
    if device.type == "cuda":
        res = faiss.StandardGpuResources()      # must outlive the GPU index: kept with it
        index = faiss.index_cpu_to_gpu(res, device.index or 0, index)
    index.add(np.ascontiguousarray(b))
    entry = _FaissEntry(device, bank, bank_bias, index, res)
    # the index (a copy of the bank) goes when the bank does, not at the next search (a weak
    # reference: a replaced entry is freed at once, not when its bank goes); the replaced
    # entry's finalizer is detached, so banks used in turn do not pile finalizers up
    entry.finalizer = weakref.finalize(bank, _drop_faiss_cache, weakref.ref(entry))
    old, _FAISS_CACHE["entry"] = _FAISS_CACHE["entry"], entry
    if old is not None:
        old.finalizer.detach()
    return entry


def _drop_faiss_cache(entry_ref) -> None:
    entry = entry_ref()
    if entry is not None and _FAISS_CACHE["entry"] is entry:
        _FAISS_CACHE["entry"] = None


def _search_faiss(queries, bank, k, bank_bias):
    faiss = faiss_module()
    q = queries.detach().float().cpu().numpy()
    if bank_bias is not None:
        q = np.concatenate([q, np.ones((q.shape[0], 1), np.float32)], 1)
    entry = _faiss_index(faiss, bank, bank_bias, queries.device)
    if entry.lock is None:
        s, i = entry.index.search(np.ascontiguousarray(q), k)
    else:
        with entry.lock:
            s, i = entry.index.search(np.ascontiguousarray(q), k)
    return (torch.from_numpy(s).to(queries.device), torch.from_numpy(i).to(torch.int64).to(queries.device))


@_dispatch.autocast_off   # the torch path's products stay float32 under a caller's autocast
def search(queries: Tensor, bank: Tensor, k: int, *, bank_bias: Optional[Tensor] = None,
           backend: str = "auto", fn: str = "knn search") -> Tuple[Tensor, Tensor]:
    queries = as_float_tensor("queries", fn, queries)
    bank = as_float_tensor("bank", fn, bank)
    if queries.shape[1] != bank.shape[1]:
        raise ValueError(f"{fn}: queries have D={queries.shape[1]} but the bank has D={bank.shape[1]}")
    if queries.device != bank.device:
        raise ValueError(f"{fn}: queries are on {queries.device} but the bank is on {bank.device}")
    k = _checks.integer(fn, "k", k)
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(f"{fn}: k must be in [1, {bank.shape[0]}] (the number of bank rows), got {k}")
    chosen = choose_backend(fn, backend, queries, k)
    if chosen == "faiss":
        return _search_faiss(queries, bank, k, bank_bias)
    if chosen == "cpu":
        bias = None if bank_bias is None else bank_bias.float()
        return _dispatch.extension().knn_topk_cpu(queries.float(), bank.float(), k, bias)
    if chosen == "triton":
        from pyssl.kernels import knn as K
        if queries.dtype != bank.dtype or queries.dtype not in _FLOATS:
            queries, bank = queries.float(), bank.float()
        if k > K.MAX_K:
            return _search_triton_large(queries.contiguous(), bank.contiguous(), k, bank_bias)
        return K.knn_topk(queries.contiguous(), bank.contiguous(), k, bank_bias=bank_bias)
    return _search_torch(queries, bank, k, bank_bias)
