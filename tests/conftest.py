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


def gpu_only(reason: str = "needs a GPU"):
    """A test of GPU-only behaviour (host syncs, CUDA graphs, TF32): skipped without a GPU and
    marked `gpu`, which bench/gpu_check.sh runs first on a lent GPU (`pytest -m gpu`)."""
    def mark(f):
        return pytest.mark.gpu(pytest.mark.skipif(not GPU, reason=reason)(f))
    return mark


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


def _gloo_worker(rank, world, init_file, case):
    import datetime
    import traceback

    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    try:
        case(rank)
        dist.barrier()
    except BaseException:
        # the spawn reports one rank's error, often the peer's "connection closed": print each
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def spawn_gloo(case, world: int) -> None:
    """Run case(rank) on `world` CPU processes joined in a gloo group (case: a module-level
    function, pickled by name); a failure on any rank fails the caller with its traceback."""
    import tempfile

    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_gloo_worker, args=(world, os.path.join(d, "init"), case), nprocs=world, join=True)


class Launches:
    """Counts the launches of one Triton kernel (kernel[grid](...)) and passes them through."""

    def __init__(self, kernel):
        self.kernel, self.count = kernel, 0

    def __getitem__(self, grid):
        self.count += 1
        return self.kernel[grid]
