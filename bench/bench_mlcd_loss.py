"""MLCD loss benchmarks: pyssl backends against dense PyTorch, torch.compile and fused-CE peers.

Cases (names are fixed; results are compared across commits):
  mlcd_cpu         N=1024, D=256, C=100,000, all classes, l=8, fp32, forward+backward, CPU.
                   Also "floor": the three bare GEMMs of those shapes (x·Wᵀ, G·W, Gᵀ·x) on
                   materialized inputs — no fused loss can beat it.
  mlcd_1m_sampled  N=8192, D=512, C=1,000,000, sample ratio 0.1, l=8, bf16, CUDA.
  mlcd_1m_full     N=4096, D=512, all 1,000,000 classes, l=8, bf16, CUDA.
GPU peers run cross-entropy on the same N, D and C' (Liger-Kernel's fused linear cross entropy,
Apple's cut-cross-entropy, torch's own linear_cross_entropy). TFLOP/s count 6·N·C'·D useful FLOPs.
pyssl-triton is the default (class-chunked) backward, pyssl-triton[fused] the fused dx / dw kernels.
"""
from __future__ import annotations

import torch

import pyssl
from bench.harness import Case, Skip, with_env

L = 8


def _problem(n, c, d, dtype, device, ratio=None, seed=0):
    # drawn on the case's device (a 1M×512 draw takes seconds on a CPU)
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, d, generator=g, device=device).to(dtype).requires_grad_(True)
    w = torch.randn(c, d, generator=g, device=device).to(dtype).requires_grad_(True)
    # unique within a row: the i-th positive is ≡ i (mod L), otherwise uniform
    pos = (torch.randint(0, c // L, (n, L), generator=g, device=device) * L
           + torch.arange(L, device=device)[None, :])
    classes = None
    if ratio is not None:
        classes = pyssl.sample_classes(pos, c, ratio, generator=torch.Generator(device=device).manual_seed(seed))
    return {"x": x, "w": w, "pos": pos, "classes": classes, "labels": pos[:, 0].contiguous(), "dtype": dtype}


def _grad_inputs_mb(inp):
    return sum(t.numel() * t.element_size() for t in (inp["x"], inp["w"])) / 2**20


def _cprime(inp):
    return inp["w"].shape[0] if inp["classes"] is None else inp["classes"].numel()


def _step(fn, inp):
    x, w = inp["x"], inp["w"]

    def step():
        fn().backward()
        # drop the gradients after the step (not before it), so a memory baseline taken
        # between steps holds no stale gradient and the step's peak includes its own
        x.grad = None
        w.grad = None
    return step


def dense_mlcd(x, w, pos_col, classes, scale=64.0, margin=0.3):
    """MLCD as a user writes it in dense PyTorch: full N×C' logits, positives gathered by column
    and masked by a scatter, straight-through margin (as PartialFC/UNICOM code does)."""
    xn = torch.nn.functional.normalize(x, dim=1)
    wn = torch.nn.functional.normalize(w if classes is None else w[classes], dim=1)
    cos = xn @ wn.t()
    if cos.dtype in (torch.bfloat16, torch.float16):
        cos = cos.float()            # logits in fp32, as mixed-precision losses are written
    cos = cos.clamp(-1, 1)
    valid = pos_col >= 0
    col = torch.where(valid, pos_col, pos_col[:, :1])
    pc = cos.gather(1, col)
    with torch.no_grad():
        delta = torch.cos(torch.acos(pc) + margin) - pc
    a = scale * (pc + delta)
    neg = (scale * cos).scatter(1, col, float("-inf"))
    zero = torch.zeros_like(pc[:, :1])
    pos_term = torch.logsumexp(torch.cat([zero, (-a).masked_fill(~valid, float("-inf"))], 1), 1)
    neg_term = torch.logsumexp(torch.cat([zero, neg], 1), 1)
    return (pos_term + neg_term).mean()


def _pos_col(inp):
    if inp["classes"] is None:
        return inp["pos"]
    return torch.searchsorted(inp["classes"], inp["pos"])   # classes are sorted, pos all present


def naive(inp):
    pc = _pos_col(inp)
    return _step(lambda: dense_mlcd(inp["x"], inp["w"], pc, inp["classes"]), inp)


def compiled(inp):
    # static shapes, compiled afresh per case: the second case's new shapes would otherwise
    # hit Dynamo's cache of the first and recompile with dynamic shapes
    torch._dynamo.reset()
    f = torch.compile(dense_mlcd, dynamic=False)
    pc = _pos_col(inp)
    return _step(lambda: f(inp["x"], inp["w"], pc, inp["classes"]), inp)


def pyssl_backend(backend):
    def setup(inp):
        return _step(lambda: pyssl.mlcd_loss(inp["x"], inp["w"], inp["pos"], classes=inp["classes"],
                                             backend=backend), inp)
    return setup


def pyssl_triton_fused(inp):
    """The Triton backend with the fused dx / dw backward kernels (PYSSL_MLCD_TRITON_BWD=GCHUNK=0)
    instead of the class-chunked default: the two backward forms side by side in one run."""
    return with_env("PYSSL_MLCD_TRITON_BWD", "GCHUNK=0", pyssl_backend("triton")(inp),
                    "fused dx / dw backward kernels (10 units of N·C'·D against the default's 8)")


def floor(inp):
    """Three bare GEMMs of the problem's shapes on materialized inputs (fp32 on the CPU, bf16 on
    the GPU: what cuBLAS reaches at these shapes, the yardstick beside the datasheet peak)."""
    x = inp["x"].detach()
    w = inp["w"].detach() if inp["classes"] is None else inp["w"].detach()[inp["classes"]]
    g = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)

    def step():
        torch.mm(x, w.t(), out=g)
        torch.mm(g, w)
        torch.mm(g.t(), x)
    return step


def _ce_inputs(inp):
    """The equal-size cross-entropy problem: the N×D features against C' classes, scaled so that
    the logits are MLCD's (64·cos, x and w rows of norm 8). Raw Gaussian rows would give logits
    of standard deviation √D ≈ 23 and a softmax so peaked that a peer skipping negligible
    gradient blocks would skip nearly all of them."""
    w = inp["w"] if inp["classes"] is None else inp["w"][inp["classes"]]
    scaled = [(8.0 * torch.nn.functional.normalize(t.detach().float(), dim=1)).to(t.dtype).requires_grad_(True)
              for t in (inp["x"], w)]
    labels = inp["labels"] if inp["classes"] is None else torch.searchsorted(inp["classes"], inp["labels"])
    return scaled[0], scaled[1], labels


def liger(inp):
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception as e:
        raise Skip(f"liger-kernel not installed ({e.__class__.__name__})")
    x, w, y = _ce_inputs(inp)
    f = LigerFusedLinearCrossEntropyLoss()
    return _step(lambda: f(w, x, y), {"x": x, "w": w})


def cce_with(filter_eps):
    """Cut Cross-Entropy; by default ("high") its backward skips the blocks whose softmax
    entries are all below a threshold (approximate gradients, less work than 6·N·C'·D);
    filter_eps=None computes every block, as the other impls do."""
    def setup(inp):
        try:
            from cut_cross_entropy import linear_cross_entropy
        except Exception as e:
            raise Skip(f"cut-cross-entropy not installed ({e.__class__.__name__})")
        if not inp["x"].is_cuda:   # its Triton kernels fail in the interpreter (a CPU dry run)
            raise Skip("cut-cross-entropy's kernels need CUDA tensors")
        x, w, y = _ce_inputs(inp)
        step = _step(lambda: linear_cross_entropy(x, w, y, filter_eps=filter_eps), {"x": x, "w": w})
        if filter_eps is not None:
            step.note = (f"gradient filter filter_eps={filter_eps!r} (its default): skips blocks, so "
                         "TFLOP/s overstate the work done")
        return step
    return setup


def torch_lce(inp):
    f = getattr(torch.nn.functional, "linear_cross_entropy", None)
    opts = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if f is None or opts is None:
        raise Skip(f"torch {torch.__version__} has no chunked linear_cross_entropy")
    x, w, y = _ce_inputs(inp)
    # options selects the chunked implementation (None is the reference: full logits)
    return _step(lambda: f(x, w, y, options=opts()), {"x": x, "w": w})


def _flops(inp):
    n, d = inp["x"].shape
    return 6.0 * n * _cprime(inp) * d


def _sizes(full, tiny):
    return lambda size, device: tiny(device) if size == "tiny" else full(device)


_GPU_IMPLS = {"naive": naive, "compile": compiled, "floor": floor, "pyssl-triton": pyssl_backend("triton"),
              "pyssl-triton[fused]": pyssl_triton_fused, "pyssl-torch": pyssl_backend("torch"), "liger": liger, "cce": cce_with("high"),
              "cce-nofilter": cce_with(None), "torch-lce": torch_lce}
# the op under test first, the peers next, torch.compile (a long cold compile) last
_GPU_FIRST = ("pyssl-triton", "floor", "liger", "cce", "pyssl-triton[fused]", "naive", "cce-nofilter",
              "torch-lce", "pyssl-torch")

CASES = [
    Case("mlcd_cpu", "cpu",
         _sizes(lambda dev: _problem(1024, 100_000, 256, torch.float32, dev),
                lambda dev: _problem(64, 2_000, 32, torch.float32, dev)),
         {"naive": naive, "compile": compiled, "floor": floor,
          "pyssl-torch": pyssl_backend("torch"), "pyssl-cpu": pyssl_backend("cpu"),
          "pyssl-auto": pyssl_backend("auto")},
         flops=_flops, repeats=5, optional=("pyssl-auto",), grad_inputs_mb=_grad_inputs_mb,
         notes="N=1024 D=256 C=100,000 all classes l=8 fp32, forward+backward. floor = the 3 bare GEMMs. "
               "Targets: pyssl-cpu ≤ 0.35× naive time, ≤ 1.3× floor, ≤ 0.25× naive peak memory."),
    Case("mlcd_1m_sampled", "cuda",
         _sizes(lambda dev: _problem(8192, 1_000_000, 512, torch.bfloat16, dev, ratio=0.1),
                lambda dev: _problem(64, 4_000, 32, torch.bfloat16, dev, ratio=0.1)),
         dict(_GPU_IMPLS),
         flops=_flops, grad_inputs_mb=_grad_inputs_mb, repeats=3,   # the peers take seconds per step
         run_first=_GPU_FIRST,
         notes="N=8192 D=512 C=1M ratio 0.1 l=8 bf16; floor = the 3 bare bf16 GEMMs on materialized "
               "inputs; peers run CE on the same N, D, C' (their W[S] "
               "gathered outside the step, so ×(inputs+grads) is pyssl's measure only: theirs counts "
               "the full 1M×512 W they never see). "
               "Targets: ≥60% of dense bf16 peak at 6·N·C'·D, faster than liger and cce, "
               "peak memory ≤ 1.2× inputs + gradients."),
    Case("mlcd_1m_full", "cuda",
         _sizes(lambda dev: _problem(4096, 1_000_000, 512, torch.bfloat16, dev),
                lambda dev: _problem(64, 4_000, 32, torch.bfloat16, dev)),
         dict(_GPU_IMPLS),
         flops=_flops, grad_inputs_mb=_grad_inputs_mb, repeats=3, run_first=_GPU_FIRST,
         notes="N=4096 D=512 all 1M classes l=8 bf16; targets as mlcd_1m_sampled; floor = the 3 bare "
               "bf16 GEMMs on materialized inputs."),
]
