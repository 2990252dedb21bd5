"""Argument checks shared by the public functions (SPEC §5).

Every message starts with the public function's name and names the argument, "{fn}: {name} must
be ...": a wrong type raises TypeError, a wrong value ValueError. Shape, dtype and device rules
that belong to one op stay with that op; what every op checks alike lives here, so that the
same mistake reads the same in every function.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

__all__ = ["tensor", "integer", "real", "integer_tensor", "generator"]


def _or_none(optional: bool) -> str:
    return " or None" if optional else ""


def tensor(fn: str, name: str, v, *, optional: bool = False):
    """v itself when it is a Tensor (or None with optional=True)."""
    if v is None and optional:
        return None
    if not isinstance(v, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor{_or_none(optional)}, got {type(v).__name__}")
    return v


def integer(fn: str, name: str, v, *, lo=None, hi=None, optional: bool = False):
    """int(v) for a Python or NumPy integer (bool is refused) in [lo, hi], bounds inclusive."""
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{fn}: {name} must be an int{_or_none(optional)}, got {type(v).__name__}")
    v = int(v)
    if lo is not None and hi is not None:
        if not lo <= v <= hi:
            raise ValueError(f"{fn}: {name} must be in [{lo}, {hi}], got {v}")
    elif lo is not None and v < lo:
        raise ValueError(f"{fn}: {name} must be >= {lo}, got {v}")
    elif hi is not None and v > hi:
        raise ValueError(f"{fn}: {name} must be <= {hi}, got {v}")
    return v


def finite(v) -> bool:
    """math.isfinite by comparisons (NaN fails both): under torch.compile with dynamic shapes a
    Python float may arrive as a SymFloat, which math.isfinite cannot take."""
    return -math.inf < v < math.inf


def real(fn: str, name: str, v, *, positive: bool = False, nonnegative: bool = False,
         optional: bool = False):
    """float(v) for a finite real number (bool is refused); > 0 or >= 0 when asked."""
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a real number{_or_none(optional)}, got {type(v).__name__}")
    v = float(v)
    if not finite(v):
        raise ValueError(f"{fn}: {name} must be finite, got {v!r}")
    if positive and v <= 0:
        raise ValueError(f"{fn}: {name} must be > 0, got {v!r}")
    if nonnegative and v < 0:
        raise ValueError(f"{fn}: {name} must be >= 0, got {v!r}")
    return v


def integer_tensor(fn: str, name: str, t: Tensor) -> Tensor:
    """t when its dtype is an integer type (bool, float and complex are refused)."""
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{fn}: {name} must be an integer tensor, got {t.dtype}")
    return t


def generator(fn: str, name: str, v):
    """v itself when it is a torch.Generator or None."""
    if v is not None and not isinstance(v, torch.Generator):
        raise TypeError(f"{fn}: {name} must be a torch.Generator or None, got {type(v).__name__}")
    return v


def draw_device(fn: str, generator: Optional[torch.Generator], device: torch.device, of: str) -> torch.device:
    """Where to draw random numbers for data on device: the CPU for a CPU generator (or none:
    the default CPU one), device for a generator on it. A generator on another device is refused
    (drawing there and copying would make every rank of a job touch that GPU)."""
    draw = torch.device("cpu") if generator is None else generator.device
    if draw.type == "cpu":
        return draw
    if draw != device and not (draw.index is None and draw.type == device.type):
        raise ValueError(f"{fn}: generator must be a CPU generator or one on {of}' device ({device}), "
                         f"got one on {draw}")
    return device


def host_to(t: Tensor, device: torch.device) -> Tensor:
    """t on device; a CPU tensor bound for a GPU goes through pinned memory without blocking (a
    plain copy from pageable memory waits for the stream). Under torch.compile a plain copy
    (the compiled graph has no pinned-memory op; the tensor is a constant there)."""
    if t.device.type == "cpu" and device.type == "cuda" and not torch.compiler.is_compiling():
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
