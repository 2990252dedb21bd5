"""Helpers shared by the Triton kernels of pyssl: device tile functions (inlined into each kernel
at compile time) and the host-side rules their launch configurations use."""
import functools
import os
from typing import Optional

import triton
import triton.language as tl


def on_tensor_device(fn):
    """Run a kernel entry point with its first tensor argument's CUDA device current: Triton
    launches on the current device, so tensors on cuda:1 with cuda:0 current (a process that
    never called torch.cuda.set_device) would otherwise be handed to a kernel on the wrong GPU."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = next((a for a in args if getattr(a, "is_cuda", False)), None)
        if t is None:
            return fn(*args, **kwargs)
        import torch
        with torch.cuda.device(t.device):
            return fn(*args, **kwargs)
    return wrapper


def interpreting() -> bool:
    """True under the Triton interpreter (TRITON_INTERPRET=1: CPU tensors, ~1 ms per program)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fp32_dot_precision() -> str:
    """The tl.dot input_precision of float32 operands on the GPU: torch's own float32 matmul
    setting, read on every call the way torch.mm and FlexAttention read it, so a float32 model
    runs our kernels as it runs its matmuls. "tf32" after
    torch.backends.cuda.matmul.fp32_precision = "tf32" (or torch.backends.fp32_precision, or the
    legacy torch.set_float32_matmul_precision("high" / "medium")); "ieee" otherwise, the default
    (torch's "highest"), and always on ROCm."""
    import torch
    if torch.version.hip:
        return "ieee"
    new = getattr(getattr(torch.backends.cuda, "matmul", None), "fp32_precision", "none")
    if new != "none":
        return "ieee" if new == "ieee" else "tf32"
    try:
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    except RuntimeError:   # torch refuses to answer after a mix of its legacy and new settings
        return "ieee"


def dot_options(dtype, interpret: Optional[bool] = None, fp32_precision: Optional[str] = None) -> dict:
    """DOT_FP32 / DOT_PRECISION constexprs of the dot-using kernels: under the interpreter the
    tl.dot operands go through float32 ("ieee"); on the GPU float32 inputs use torch's float32
    matmul precision (fp32_dot_precision: "ieee" by default, "tf32" where the user allowed it;
    fp32_precision overrides, for compile checks) and 16-bit inputs tensor cores (the precision
    argument is then unused)."""
    import torch
    interpret = interpreting() if interpret is None else interpret
    if interpret:
        prec = "ieee"
    elif dtype == torch.float32:
        prec = fp32_precision or fp32_dot_precision()
    else:
        prec = "tf32"
    return dict(DOT_FP32=bool(interpret), DOT_PRECISION=prec)


def pow2(n: int, lo: int = 16, hi: Optional[int] = None) -> int:
    """Next power of two of n, clamped to [lo, hi] (tl.dot needs every dimension >= 16)."""
    v = max(lo, triton.next_power_of_2(max(int(n), 1)))
    return min(v, hi) if hi is not None else v


@triton.jit
def dot_rows_tile(X, W, rows, ids, rmask, cmask, D, stride_x, stride_w,
                  BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                  DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Raw dot products x[rows] . w[ids]^T as a (BLOCK_N, BLOCK_C) float32 tile, D in BLOCK_D steps.

    Both operands are rows addressed by index (x rows of a block; w rows of class ids, or bank
    rows): the w tile is loaded directly transposed, (BLOCK_D, BLOCK_C), from the row pointers
    w + id * stride_w, so no gathered copy of w[S] exists and no tl.trans is needed. Masked
    rows/columns load zeros and so give 0 in the tile. fp32 accumulation; DOT_FP32 converts the
    operands for the interpreter, DOT_PRECISION is "ieee" for fp32 inputs.
    """
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    x_rows = X + rows.to(tl.int64)[:, None] * stride_x     # (BLOCK_N, 1) row starts
    w_rows = W + ids.to(tl.int64)[None, :] * stride_w      # (1, BLOCK_C) row starts
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < D
        xt = tl.load(x_rows + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        wt = tl.load(w_rows + d[:, None], mask=dmask[:, None] & cmask[None, :], other=0.0)
        if DOT_FP32:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(xt, wt, acc, input_precision=DOT_PRECISION)
    return acc
