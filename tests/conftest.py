"""Test session set-up.

Without a GPU, Triton kernels run in the interpreter: TRITON_INTERPRET must be set before any
kernel module is imported, so it is set here, at collection time.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

GPU = torch.cuda.is_available()
# Every backend is tested on every machine: cpu on CPU tensors, triton on CUDA tensors where a
# GPU is present and in the interpreter on CPU tensors otherwise, torch on the best device.
BACKENDS = ["cpu", "torch", "triton"]


def device_for(backend: str) -> str:
    """Where a backend's test tensors live: cpu (our C++) and faiss (faiss-cpu) on the CPU,
    the rest on the GPU when there is one."""
    if backend in ("cpu", "faiss"):
        return "cpu"
    return "cuda" if GPU else "cpu"


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def at_angles(w, pos, thetas, generator):
    """Features at the given angles (float64) from their rows' first positive center: x_n =
    ŵ cos θ_n + v sin θ_n with v a random unit vector orthogonal to ŵ, times a norm of 3."""
    wh = torch.nn.functional.normalize(w[pos[:, 0]].double(), dim=1)
    v = torch.randn(wh.shape, generator=generator, dtype=torch.float64)
    v = torch.nn.functional.normalize(v - wh * (v * wh).sum(1, keepdim=True), dim=1)
    t = thetas[:, None]
    return 3.0 * (wh * torch.cos(t) + v * torch.sin(t))
