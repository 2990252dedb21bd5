"""float32 inputs on the GPU follow torch's float32 matmul precision (kernels/_tiles.py
fp32_dot_precision): exact "ieee" dots by default, TF32 once the user allows it, as torch.mm and
FlexAttention do. The choice is tested everywhere; the TF32 results against the reference where
a GPU runs the kernels (the interpreter computes every dot in float32)."""
import pytest
import torch

import pyssl
from pyssl import reference as R
from pyssl.kernels import _tiles
from pyssl.kernels import homologous_attention as HA

from conftest import gpu_only


_SETTINGS = [(torch.backends, "fp32_precision")] + [
    (getattr(getattr(torch.backends, b), op), "fp32_precision")
    for b, ops in (("cuda", ("matmul",)), ("cudnn", ("conv", "rnn")), ("mkldnn", ("matmul", "conv", "rnn")))
    for op in ops if hasattr(getattr(getattr(torch.backends, b), op, None), "fp32_precision")]


@pytest.fixture
def restore_precision():
    # every float32 precision setting torch has (the legacy set_float32_matmul_precision writes
    # several), restored after the test so that later tests see torch's defaults
    legacy = torch.get_float32_matmul_precision()
    saved = [getattr(obj, name) for obj, name in _SETTINGS]
    yield
    torch.set_float32_matmul_precision(legacy)
    for (obj, name), value in zip(_SETTINGS, saved):
        setattr(obj, name, value)
    assert torch.get_float32_matmul_precision() == legacy


def test_default_is_exact_float32(restore_precision):
    assert _tiles.fp32_dot_precision() == "ieee"
    assert _tiles.dot_options(torch.float32, interpret=False)["DOT_PRECISION"] == "ieee"


@pytest.mark.parametrize("how", ["cuda_matmul", "global", "legacy_high", "legacy_medium"])
def test_tf32_when_the_user_allows_it(restore_precision, how):
    if how == "cuda_matmul":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    elif how == "global":
        torch.backends.fp32_precision = "tf32"
    else:
        torch.set_float32_matmul_precision(how.split("_")[1])
    assert _tiles.fp32_dot_precision() == "tf32"
    assert _tiles.dot_options(torch.float32, interpret=False)["DOT_PRECISION"] == "tf32"
    # the interpreter computes in float32 whatever the setting; 16-bit inputs are unaffected
    assert _tiles.dot_options(torch.float32, interpret=True) == dict(DOT_FP32=True, DOT_PRECISION="ieee")
    assert _tiles.dot_options(torch.bfloat16, interpret=False)["DOT_PRECISION"] == "tf32"
    # back to exact: the setting is read on every call
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    assert _tiles.dot_options(torch.float32, interpret=False)["DOT_PRECISION"] == "ieee"
    torch.set_float32_matmul_precision("highest")
    assert _tiles.fp32_dot_precision() == "ieee"


def test_attention_takes_the_tf32_tiles(restore_precision, monkeypatch):
    """Under TF32 the float32 attention launches the _TF32_TILES configurations (the float32 ones
    spill there), the dQ kernel with its own stage count; every entry is a compile case."""
    monkeypatch.setattr(HA, "interpreting", lambda: False)
    fp32 = HA._config(4096, torch.float32, "bwd", 64)
    assert fp32["num_stages"] == fp32["num_stages_dq"] == 2
    assert HA._warps(HA._attn_fwd_kernel, torch.float32, d=64) == 8
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    tf32 = HA._config(4096, torch.float32, "bwd", 64)
    assert (tf32["num_stages"], tf32["num_stages_dq"]) == (2, 1)
    assert HA._warps(HA._attn_fwd_kernel, torch.float32, d=64) == 4
    assert HA._warps(HA._attn_bwd_dq_kernel, torch.float32, d=64) == 8
    assert HA._config(4096, torch.bfloat16, "bwd", 64)["num_stages_dq"] == 2   # 16-bit: unchanged
    # an explicit num_stages override sets both kernels'
    monkeypatch.setenv("PYSSL_HOMATTN_TRITON", "bwd.num_stages=3")
    tf32 = HA._config(4096, torch.float32, "bwd", 64)
    assert (tf32["num_stages"], tf32["num_stages_dq"]) == (3, 3)
    ids = {(c[0].__name__, c[2].get("D")) for c in HA.COMPILE_CASES if c[2].get("DOT_PRECISION") == "tf32"}
    for key in HA._TF32_TILES:
        kernels = ("_attn_fwd_kernel",) if key[1] == "fwd" else ("_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")
        for name in kernels:
            assert (name, key[0]) in ids, f"no TF32 compile case of {name} at d={key[0]}"


@gpu_only("TF32 dots need a GPU (the interpreter computes in float32)")
def test_tf32_results_on_gpu(restore_precision):
    """With TF32 allowed the float32 ops run on tensor cores and stay within TF32's error of the
    float64 reference (2^-11 per operand; a cosine ~1e-3)."""
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(256, 128, device="cuda", generator=g, requires_grad=True)
    w = torch.randn(5000, 128, device="cuda", generator=g, requires_grad=True)
    pos = torch.randint(0, 5000, (256, 4), device="cuda", generator=g)
    pos[:, 1:] = torch.where(pos[:, 1:] == pos[:, :1], -1, pos[:, 1:])
    loss = pyssl.mlcd_loss(x, w, pos, scale=16.0, backend="triton")
    loss.backward()
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = R.mlcd_loss(xr, wr, pos, scale=16.0)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-2, atol=1e-2)
    for got, want in ((x.grad, xr.grad), (w.grad, wr.grad)):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-2 * want.abs().max().item())

    q, k, v = (torch.randn(2, 3, 197, 64, device="cuda", generator=g, requires_grad=True) for _ in range(3))
    groups = torch.randint(0, 4, (2, 197), device="cuda", generator=g)
    groups[:, 0] = -1
    out = pyssl.homologous_attention(q, k, v, groups, backend="triton")
    out.backward(torch.ones_like(out))
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = R.homologous_attention(qr, kr, vr, groups)
    ref.backward(torch.ones_like(ref))
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-2 * ref.abs().max().item())
    for got, want in ((q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-2 * want.abs().max().item())

    z = torch.randn(2, 197, 256, device="cuda", generator=g, requires_grad=True)
    lz = pyssl.homologous_contrastive_loss(z, groups, backend="triton")
    lz.backward()
    zr = z.detach().double().requires_grad_()
    ref = R.homologous_contrastive_loss(zr, groups)
    ref.backward()
    torch.testing.assert_close(lz.double(), ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(z.grad.double(), zr.grad, rtol=0, atol=2e-2 * zr.grad.abs().max().item())
