"""Backend choice shared by every op.

Each op declares, per backend, a function that returns the reasons that backend cannot serve
the given inputs (an empty list means it can). backend="auto" takes the first backend in the
op's preference order with no reasons; an explicit backend that cannot serve raises a
ValueError listing its reasons, like xformers' not_supported_reasons.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import os
from typing import Callable, Dict, List, Sequence

import torch

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")


# Probed once at import (cheap: no triton import), so that backend choice inside a
# torch.compile'd region reads plain module state.
_TRITON_MISSING = None if importlib.util.find_spec("triton") is not None else "triton is not installed"


def triton_available() -> str | None:
    """None when Triton can run kernels here, else why not."""
    return _TRITON_MISSING


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _load_extension():
    try:
        from pyssl import _C
    except Exception as e:
        return None, ("the compiled extension pyssl._C is missing "
                      f"({e.__class__.__name__}: {e}); build it with "
                      "`pip install --no-build-isolation -e .` (or `make install`)")
    stale = _stale_sources(_C)
    if stale:
        return None, ("the compiled extension pyssl._C is stale: csrc/ changed since it was built "
                      f"({stale}); rebuild it with `pip install --no-build-isolation -e .` "
                      "(or `make install`)")
    return _C, None


def _stale_sources(ext) -> str | None:
    """In a source checkout (editable install), compare the built hash with csrc/ now."""
    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
    built = getattr(ext, "source_hash", None)
    if not os.path.isdir(csrc) or built is None:
        return None
    from pyssl._srchash import source_hash
    now = source_hash(csrc)
    return None if now == built else f"built from {built}, sources now {now}"


_C, _C_ERROR = _load_extension()


def extension():
    """The compiled module pyssl._C, or None; see extension_error()."""
    return _C


def extension_error() -> str | None:
    return _C_ERROR


def common_reasons(backend: str, device: torch.device) -> List[str]:
    """Reasons that depend only on the backend and the device of the inputs."""
    reasons = []
    if backend == "triton":
        err = triton_available()
        if err:
            reasons.append(err)
        elif device.type != "cuda" and not triton_interpret():
            reasons.append(f"triton needs CUDA tensors (got {device.type}; set TRITON_INTERPRET=1 "
                           "to run its kernels in the interpreter)")
    elif backend == "cuda":
        if device.type != "cuda":
            reasons.append(f"cuda needs CUDA tensors (got {device.type})")
        else:
            err = extension_error()
            if err:
                reasons.append(err)
            elif not getattr(extension(), "with_cuda", False):
                reasons.append("pyssl._C was built without CUDA kernels")
    elif backend == "cpu":
        if device.type != "cpu":
            reasons.append(f"cpu needs CPU tensors (got {device.type})")
        err = extension_error()
        if err:
            reasons.append(err)
    return reasons


def choose(op: str, backend: str, device: torch.device, preference: Dict[str, Sequence[str]],
           checks: Dict[str, Callable[[], List[str]]]) -> str:
    """Pick the backend for one call.

    preference maps a device type to the backends to try in order under "auto"; checks maps a
    backend name to a function returning the op-specific reasons it cannot serve this input.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")

    def reasons(name: str) -> List[str]:
        if name not in checks:
            return [f"{op} has no {name} backend"]
        return common_reasons(name, device) + checks[name]()

    if backend != "auto":
        why = reasons(backend)
        if why:
            raise ValueError(f"{op}: backend={backend!r} cannot serve these inputs: " + "; ".join(why))
        return backend
    tried = {}
    for name in preference.get(device.type, ("torch",)):
        why = reasons(name)
        if not why:
            return name
        tried[name] = why
    raise ValueError(f"{op}: no backend can serve these inputs: "
                     + "; ".join(f"{k}: {', '.join(v)}" for k, v in tried.items()))


def not_supported_reasons(op_checks: Dict[str, Callable[[], List[str]]], device: torch.device) -> Dict[str, List[str]]:
    """Every backend's reasons for one input, for error messages and users' diagnostics."""
    return {name: common_reasons(name, device) + fn() for name, fn in op_checks.items()}


def no_second_order_error(what: str, wrt: str) -> RuntimeError:
    return RuntimeError(f"{what}: second derivatives with respect to {wrt} are not implemented (a double "
                        "backward, create_graph=True, reached them)")


def no_second_order(backward_op, what: str, wrt: str) -> None:
    """Give a backward custom op an autograd formula that raises no_second_order_error: a double
    backward through it then says what is missing instead of torch's "no autograd formula was
    registered". (A first backward under create_graph only records the node; it raises when a
    second backward reaches it.)"""
    def backward(ctx, *grads):
        raise no_second_order_error(what, wrt)

    backward_op.register_autograd(backward, setup_context=lambda ctx, inputs, output: None)


def autocast_off(fn):
    """An op body run with autocast off (CUDA and CPU). A torch.library custom op without an
    autocast rule runs under its caller's autocast, so the torch matmuls inside it (the torch
    and cpu backends' float32 accumulation, recomputed scores, normalization backwards) would
    be cast to 16 bits. The inputs keep the dtypes they arrive in. The signature is fn's with
    its annotations evaluated in fn's module (custom_op infers the schema from it, and string
    annotations would otherwise be looked up in this module)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return fn(*args, **kwargs)
    run.__signature__ = inspect.signature(fn, eval_str=True)
    return run


# Tags of a custom op that syncs with the host inside (data checks read a device flag): such an
# op must not be recorded into a CUDA graph (torch.compile's mode="reduce-overhead" would try,
# and the read fails while the stream is capturing).
HOST_SYNC_TAGS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()
