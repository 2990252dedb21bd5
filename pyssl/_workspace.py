"""Reusable scratch buffers for the chunked backends (like cuBLAS's or oneDNN's workspaces).

A fresh R×C' buffer per call costs a page fault and a kernel zero-fill per 4 KB page on the
CPU (≈ 60 ms for the 205 MB buffer of the mlcd_cpu benchmark, a fifth of one GEMM). CPU buffers
are kept per thread and dtype, grown on demand, and released by pyssl.empty_cache().

Other devices get a fresh tensor per call: CUDA's caching allocator already hands back freed
memory without a fill, and it knows which stream last used a block. A cache of ours would not:
shared across streams (or across the forward thread and the autograd thread that runs a CUDA
backward) one call's kernels could overwrite a buffer another call's queued kernels still read,
and kept per thread it would hold a second copy for the backward thread.
"""
from __future__ import annotations

import threading

import torch

_local = threading.local()


def scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat tensor of at least numel elements; its contents are undefined."""
    device = torch.device(device)
    if device.type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    cache = getattr(_local, "buffers", None)
    if cache is None:
        cache = _local.buffers = {}
    key = dtype
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        cache.pop(key, None)
        # a normal tensor even when the first call runs under torch.inference_mode: an inference
        # tensor cached here would make every later call outside inference mode fail on its
        # in-place writes
        with torch.inference_mode(False):
            buf = cache[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def empty_cache() -> None:
    """Release this thread's scratch buffers."""
    if getattr(_local, "buffers", None):
        _local.buffers.clear()
