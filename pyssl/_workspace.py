"""Reusable scratch buffers for the chunked backends (like cuBLAS's or oneDNN's workspaces).

A fresh R×C' buffer per call costs a page fault and a kernel zero-fill per 4 KB page on the
CPU (≈ 60 ms for the 205 MB buffer of the mlcd_cpu benchmark, a fifth of one GEMM). Buffers are
kept per thread, per (device, dtype), grown on demand, and released by pyssl.empty_cache().
"""
from __future__ import annotations

import threading

import torch

_local = threading.local()


def scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat tensor of at least numel elements; its contents are undefined."""
    cache = getattr(_local, "buffers", None)
    if cache is None:
        cache = _local.buffers = {}
    key = (torch.device(device), dtype)
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        cache.pop(key, None)
        buf = cache[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def empty_cache() -> None:
    """Release this thread's scratch buffers."""
    if getattr(_local, "buffers", None):
        _local.buffers.clear()
