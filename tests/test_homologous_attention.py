"""pyssl.homologous_attention, pyssl.mix_patches, pyssl.homologous_contrastive_loss."""
import pytest
import torch

import pyssl
from pyssl import reference
from pyssl.ops import homologous_attention as HA

from conftest import GPU, Launches, device_for, gpu_only

ATTN_BACKENDS = ["cpu", "torch", "triton"]


def _qkv(b=2, h=3, l=21, d=8, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, l, d, generator=g, dtype=torch.float64).to(device, dtype) for _ in range(3)]


def _groups(b, l, n_groups, n_global=1, seed=0, uneven=False):
    g = torch.Generator().manual_seed(seed + 100)
    rows = []
    for _ in range(b):
        if uneven:   # sizes 1, 2, 4, ... : a group of one, and very uneven groups
            ids = torch.cat([torch.full((2 ** i,), i) for i in range(n_groups)])
            ids = torch.cat([ids, torch.full((l - n_global - ids.numel(),), n_groups - 1)])
        else:
            ids = torch.arange(l - n_global) % n_groups
        ids = ids[torch.randperm(ids.numel(), generator=g)]
        rows.append(torch.cat([torch.full((n_global,), -1), ids]))
    return torch.stack(rows)


def _check_against_reference(q, k, v, groups, topk, backend):
    """Output and dq, dk, dv of the backend against the dense reference (float32 tolerances)."""
    out = pyssl.homologous_attention(q, k, v, groups, topk=topk, backend=backend)
    ref = reference.homologous_attention(q, k, v, groups, topk=topk)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4, msg=f"d{name}")


MODES = {
    "dense": dict(n_groups=None, topk=None),
    "group": dict(n_groups=3, topk=None),
    "group+globals2": dict(n_groups=4, n_global=2, topk=None),
    "uneven+group_of_one": dict(n_groups=4, uneven=True, topk=None),
    "topk": dict(n_groups=None, topk=5),
    "group+topk": dict(n_groups=3, topk=4),
    "topk>=allowed": dict(n_groups=3, topk=40),
    "topk beyond int64": dict(n_groups=3, topk=2 ** 63),
    "uneven+group_of_one+topk": dict(n_groups=4, uneven=True, topk=3),
    # K above a group's own size (5) and below L: global keys fill the rest of the kept set
    "group+globals2+topk": dict(n_groups=4, n_global=2, topk=6),
}


def _case(mode, b, l, device):
    m = dict(MODES[mode])
    topk = m.pop("topk")
    ng = m.pop("n_groups")
    groups = None if ng is None else _groups(b, l, ng, **m).to(device)
    return groups, topk


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
def test_attention_matches_reference(backend, mode):
    dev = device_for(backend)
    q, k, v = (t.requires_grad_() for t in _qkv(device=dev))
    groups, topk = _case(mode, 2, 21, dev)
    _check_against_reference(q, k, v, groups, topk, backend)


@pytest.mark.parametrize("mode", ["dense", "group+globals2", "uneven+group_of_one"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_backend_without_flash_kernel(monkeypatch, mode, dtype):
    """The torch backend's unmasked blocks go through the CPU flash-attention kernel on the CPU
    and through matmul + log-sum-exp elsewhere (CUDA, or a torch without that kernel): both agree
    with the reference and with each other, statistics included."""
    q, k, v = (t.requires_grad_() for t in _qkv(dtype=dtype))
    groups, topk = _case(mode, 2, 21, "cpu")
    assert HA._flash_cpu(q.device) is not None     # this torch has it: the default path is flash
    with_flash = HA.attention_with_stats(q, k, v, groups, backend="torch")
    monkeypatch.setattr(HA, "_flash_cpu", lambda device: None)
    _check_against_reference(q, k, v, groups, topk, "torch")
    without = HA.attention_with_stats(q, k, v, groups, backend="torch")
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(with_flash[0], without[0], **tol)
    torch.testing.assert_close(with_flash[1], without[1], **tol)


@pytest.mark.parametrize("mode", ["dense", "topk", "group+topk", "uneven+group_of_one+topk"])
def test_torch_backend_in_row_chunks(mode, monkeypatch):
    """The torch backend's chunked rows (top-k and ungrouped): several chunks of a few query
    rows each, the last one short, give the reference's outputs and gradients."""
    monkeypatch.setattr(HA, "ROW_CHUNK_ELEMS", 2 * 3 * 21 * 4)       # 4 rows of 21 per chunk
    assert HA._chunk_rows(torch.empty(2, 3, 21, 8)) == 4
    q, k, v = (t.requires_grad_() for t in _qkv())
    groups, topk = _case(mode, 2, 21, "cpu")
    _check_against_reference(q, k, v, groups, topk, "torch")


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@pytest.mark.parametrize("mode", ["group+globals2", "group+topk"])
def test_wide_heads(backend, mode):
    """d = 80 (ViT-H's head): not a power of two, above 64 (the Triton kernels' BLOCK_D = 128
    configuration, masked columns)."""
    dev = device_for(backend)
    q, k, v = (t.requires_grad_() for t in _qkv(l=19, d=80, device=dev))
    groups, topk = _case(mode, 2, 19, dev)
    _check_against_reference(q, k, v, groups, topk, backend)


def test_triton_topk_kernel_choice(monkeypatch):
    """Top-k rows are held whole on chip where k and v of the row fit in shared memory (the
    longest such row shrinks as d grows; sized for sm_90's 227 KiB, less on a smaller GPU), and
    streamed otherwise: the Triton backend serves every L, its only limit the head dimension."""
    from pyssl.kernels import homologous_attention as K
    bf = torch.bfloat16
    assert K.max_topk_l(bf, 64) == 512 and K.max_topk_l(bf, 80) == 256 and K.max_topk_l(bf, 256) == 128
    assert K.max_topk_l(torch.float32, 64) == 256 and K.max_topk_l(torch.float32, 128) == 128
    assert K.max_topk_l(torch.float32, 256) == 64
    assert K.max_topk_l(bf, 512) == 0
    # the shared memory ptxas reports for the compile cases (tests/test_triton_compile.py)
    assert K.topk_shared_bytes(bf, 512, 64) == 133120 and K.topk_shared_bytes(bf, 256, 128) == 135168
    assert K.topk_shared_bytes(torch.float32, 64, 256) == 147456 and K.topk_shared_bytes(bf, 64, 64) == 18432
    cpu = torch.device("cpu")
    assert K.topk_whole_rows(bf, 512, 64, cpu) and not K.topk_whole_rows(bf, 513, 64, cpu)
    assert K.topk_whole_rows(bf, 256, 128, cpu) and not K.topk_whole_rows(bf, 300, 128, cpu)
    assert K.topk_whole_rows(torch.float32, 197, 64, cpu) and not K.topk_whole_rows(torch.float32, 257, 64, cpu)
    monkeypatch.setattr(K, "shared_memory", lambda device: 99 * 1024)     # e.g. sm_89
    assert not K.topk_whole_rows(bf, 256, 128, cpu) and K.topk_whole_rows(bf, 128, 64, cpu)
    monkeypatch.setenv("PYSSL_HOMATTN_TOPK_STREAM", "1")
    assert not K.topk_whole_rows(bf, 128, 64, cpu)

    def triton_reasons(l, d, topk=None):   # meta tensors: only the shape and dtype rules speak
        rs = HA.not_supported_reasons(torch.empty(1, 1, l, d, dtype=bf, device="meta"), topk=topk)["triton"]
        return " ".join(r for r in rs if "needs CUDA tensors" not in r)

    assert triton_reasons(300, 128, topk=8) == "" and triton_reasons(8192, 64, topk=8) == ""
    assert "head dimensions d <= 256, got d=257" in triton_reasons(16, K.MAX_HEAD_DIM + 1, topk=8)


TOPK_MODES = [m for m in MODES if MODES[m]["topk"]]


@pytest.mark.parametrize("l", [21, 50])
@pytest.mark.parametrize("mode", TOPK_MODES)
def test_triton_streamed_topk_matches_reference(mode, l, monkeypatch):
    """The streamed top-k forward (PYSSL_HOMATTN_TOPK_STREAM=1 forces it at any L): one key tile
    (L = 21) and several (L = 50 in 16-wide tiles under the interpreter), outputs, gradients and
    exactly the reference's kept set."""
    monkeypatch.setenv("PYSSL_HOMATTN_TOPK_STREAM", "1")
    dev = device_for("triton")
    b = 2 if l < 32 else 1
    q, k, v = (t.requires_grad_() for t in _qkv(b=b, h=2, l=l, device=dev))
    groups, topk = _case(mode, b, l, dev)
    _check_against_reference(q, k, v, groups, topk, "triton")
    keep = HA.attention_with_stats(q.detach(), k.detach(), v.detach(), groups, topk=topk, backend="triton")[2]
    assert torch.equal(HA.unpack_bits(keep, l).cpu(),
                       reference.homologous_kept(q.detach().cpu(), k.detach().cpu(),
                                                 None if groups is None else groups.cpu(), topk))


def test_triton_long_float32_rows_stream(monkeypatch):
    """float32 rows above max_topk_l (256 at d <= 64; lowered to 128 here to keep the row
    short) take the streamed kernel without being told: ten key tiles, groups and global
    tokens, against the reference and the torch backend's kept set."""
    from pyssl.kernels import homologous_attention as K
    monkeypatch.setitem(K._TOPK_L, (True, 64), 128)
    dev = device_for("triton")
    assert not K.topk_whole_rows(torch.float32, 150, 16, dev)
    whole, streamed = (Launches(getattr(K, n)) for n in ("_attn_topk_fwd_kernel", "_attn_topk_stream_fwd_kernel"))
    monkeypatch.setattr(K, "_attn_topk_fwd_kernel", whole)
    monkeypatch.setattr(K, "_attn_topk_stream_fwd_kernel", streamed)
    q, k, v = (t.requires_grad_() for t in _qkv(b=1, h=1, l=150, d=16, device=dev, seed=3))
    groups = _groups(1, 150, 3, n_global=2, seed=3).to(dev)
    _check_against_reference(q, k, v, groups, 20, "triton")
    assert streamed.count > 0 and whole.count == 0
    a = HA.attention_with_stats(q.detach(), k.detach(), v.detach(), groups, topk=20, backend="triton")[2]
    b = HA.attention_with_stats(q.detach().cpu(), k.detach().cpu(), v.detach().cpu(), groups.cpu(), topk=20,
                                backend="torch")[2]
    assert torch.equal(a.cpu(), b)


@pytest.mark.parametrize("stream", [False, True])
def test_triton_topk_ties_across_key_tiles(stream, monkeypatch):
    """Every score equal (q = 0): the kept set is the first K allowed keys in key order, with
    the tied keys spread over several key tiles (L = 50, K = 20 and 37) and groups; negative
    and positive equal scores mixed with distinct ones (keys ±k)."""
    if stream:
        monkeypatch.setenv("PYSSL_HOMATTN_TOPK_STREAM", "1")
    dev = device_for("triton")
    _, k, v = _qkv(b=1, h=1, l=50, d=8, device=dev, seed=5)
    q = torch.zeros_like(k)
    for groups in (None, _groups(1, 50, 2, n_global=1, seed=5).to(dev)):
        for topk in (20, 37):
            keep = HA.unpack_bits(HA.attention_with_stats(q, k, v, groups, topk=topk, backend="triton")[2], 50)
            allowed = reference.homologous_kept(q.cpu(), k.cpu(), None if groups is None else groups.cpu(), None)
            first = allowed & (allowed.cumsum(-1) <= topk)
            assert torch.equal(keep.cpu(), first)
    # integer scores with many ties at each value, both signs: kept = reference's (ties to the lower index)
    q = torch.ones(1, 1, 50, 8, device=dev)
    kk = (torch.arange(50, device=dev) % 7 - 3).float().view(1, 1, 50, 1).expand(1, 1, 50, 8).contiguous()
    for topk in (5, 13, 30):
        keep = HA.unpack_bits(HA.attention_with_stats(q, kk, kk, None, topk=topk, backend="triton")[2], 50)
        assert torch.equal(keep.cpu(), reference.homologous_kept(q.cpu(), kk.cpu(), None, topk))


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@pytest.mark.parametrize("mode", ["group", "group+topk", "topk"])
def test_gradcheck_float64(backend, mode):
    if backend == "triton":
        pytest.skip("the Triton kernels take float32/bfloat16/float16 (float64 is for the cpu and torch backends)")
    dev = device_for(backend)
    q, k, v = (t.requires_grad_() for t in _qkv(b=1, h=2, l=9, d=4, dtype=torch.float64, device=dev))
    groups, topk = _case(mode, 1, 9, dev)
    topk = None if topk is None else 3
    assert torch.autograd.gradcheck(
        lambda a, b, c: pyssl.homologous_attention(a, b, c, groups, topk=topk, backend=backend), (q, k, v))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_kept_set_bitmask_and_lse_agree_across_backends(backend):
    dev = device_for(backend)
    q, k, v = _qkv(l=27)
    groups = _groups(2, 27, 3)
    for topk in (None, 6):
        a = HA.attention_with_stats(q.to(dev), k.to(dev), v.to(dev), groups.to(dev), topk=topk, backend=backend)
        a = [t.cpu() for t in a]
        b = HA.attention_with_stats(q, k, v, groups, topk=topk, backend="torch")
        torch.testing.assert_close(a[0], b[0], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=1e-6)
        if topk:
            assert a[2].shape == (2, 3, 27, 4) and torch.equal(a[2], b[2])
            want = reference.homologous_kept(q, k, groups, topk)
            assert torch.equal(HA.unpack_bits(a[2], 27), want)
            # exactly min(topk, allowed) keys per row
            allowed = reference.homologous_kept(q, k, groups, None)
            assert torch.equal(want.sum(-1), allowed.sum(-1).clamp_max(topk))


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_topk_ties_go_to_the_lower_key_index(backend):
    dev = device_for(backend)
    # integer-valued vectors: every score is exact, so equal keys give equal scores
    q = torch.ones(1, 1, 6, 2, device=dev)
    k = torch.tensor([[3.0, 0], [1, 0], [2, 0], [1, 0], [2, 0], [0, 0]], device=dev).view(1, 1, 6, 2)
    v = torch.randn(1, 1, 6, 2, device=dev)
    # scores per query: 3, 1, 2, 1, 2, 0 -> top 2 = {0, 2} (2 and 4 tie at 2: the lower wins)
    out, _, keep = HA.attention_with_stats(q, k, v, None, topk=2, backend=backend)
    kept = HA.unpack_bits(keep, 6)[0, 0]
    assert kept[:, [0, 2]].all() and kept.sum(-1).eq(2).all()
    torch.testing.assert_close(out, reference.homologous_attention(q, k, v, None, topk=2), atol=1e-6, rtol=1e-6)
    # top 4: 0, 2, 4, then the tie at 1 between keys 1 and 3 -> key 1
    _, _, keep = HA.attention_with_stats(q, k, v, None, topk=4, backend=backend)
    assert HA.unpack_bits(keep, 6)[0, 0, 0].tolist() == [True, True, True, False, True, False]


@pytest.mark.parametrize("backend", ["reference", "triton-stream"] + ATTN_BACKENDS)
def test_topk_an_allowed_key_at_minus_inf_keeps_its_place(backend, monkeypatch):
    """An allowed key whose score is −inf ranks among the allowed keys only: a disallowed key
    (another group, masked to −inf) never takes its place in the kept set. The reference and the
    torch backend let the disallowed keys of lower index win the tie at −inf."""
    dev = device_for(backend.split("-")[0] if backend != "reference" else "torch")
    q = torch.zeros(1, 1, 6, 4, device=dev)
    q[..., 0] = 1
    k = torch.zeros(1, 1, 6, 4, device=dev)
    k[0, 0, :, 0] = torch.tensor([1.0, 2.0, float("-inf"), 3.0, float("-inf"), 4.0])
    v = torch.randn(1, 1, 6, 4, device=dev)
    groups = torch.tensor([[0, 1, 0, 1, 0, 1]], device=dev)
    want = [True, False, True, False, True, False]          # query 0: keys 0, 2, 4 of its group
    if backend == "reference":
        kept = reference.homologous_kept(q, k, groups, 3)[0, 0]
    else:
        if backend == "triton-stream":
            monkeypatch.setenv("PYSSL_HOMATTN_TOPK_STREAM", "1")
        _, _, keep = HA.attention_with_stats(q, k, v, groups, topk=3, backend=backend.split("-")[0])
        kept = HA.unpack_bits(keep, 6)[0, 0]
    assert kept[0].tolist() == want and kept[2].tolist() == want


@pytest.mark.parametrize("backend", ["reference"] + ATTN_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_ties_of_different_vectors_at_the_default_scale(backend, dtype):
    """Equal dot products of different key vectors tie at any scale (1/sqrt(8) here, no power
    of two): scale · (q · k), not (scale · q) · k, whose roundings differ by an ulp (the reference
    had kept key 2 first here)."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take float32/bfloat16/float16")
    dev = "cpu" if backend == "reference" else device_for(backend)
    q = torch.tensor([1.0, 1, 1, 2, -2, -1, -1, -2]).expand(1, 1, 3, 8).to(dev, dtype)
    k = torch.tensor([[0.0] * 8, [2, 1, 0, 2, 0, 0, 1, 2], [1, 0, 0, 0, 1, -2, -1, 0]]).view(1, 1, 3, 8).to(dev, dtype)
    v = torch.randn(1, 1, 3, 8, dtype=torch.float64).to(dev, dtype)
    assert (q[0, 0, 0] @ k[0, 0].T).tolist() == [0, 2, 2]
    for topk, want in [(1, [0, 1, 0]), (2, [0, 1, 1])]:
        if backend == "reference":
            kept = reference.homologous_kept(q, k, None, topk)
        else:
            kept = HA.unpack_bits(HA.attention_with_stats(q, k, v, None, topk=topk, backend=backend)[2], 3)
        assert kept[0, 0].int().tolist() == [want] * 3, topk


@pytest.mark.parametrize("backend,stream", [("cpu", False), ("torch", False), ("triton", False), ("triton", True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_selection_hard_scores(backend, stream, dtype, monkeypatch):
    """Scores the kept-set search must order exactly: zeros from -0.0 and +0.0 keys, magnitudes from 1e-30 to
    1e30 of both signs, runs of equal scores cut by K, -inf-free but far-apart values; the kept
    set equals the reference's (ties to the lower key index) for every K."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take float32/bfloat16/float16")
    if stream:
        monkeypatch.setenv("PYSSL_HOMATTN_TOPK_STREAM", "1")
    dev = device_for(backend)
    vals = [0.0, -0.0, 1e30, -1e30, 1e-30, -1e-30, 3.0, 3.0, 3.0, -0.0, 0.0, 2.5, 3.0, -1e-30, 1e30, 7.0,
            -7.0, 3.0, 0.0, -2.5]
    # q = (1, 0): score j = scale · k_j[0] exactly; k_j = (-0.0, 5) gives -0.0 (1·-0.0 + 0·5 = -0.0)
    L = len(vals)
    k = torch.zeros(1, 1, L, 2, dtype=dtype)
    k[0, 0, :, 0] = torch.tensor(vals, dtype=dtype)
    k[0, 0, :, 1] = 5.0
    q = torch.zeros(1, 1, L, 2, dtype=dtype)
    q[..., 0] = 1.0
    q[..., 1] = -0.0
    v = torch.randn(1, 1, L, 2, dtype=dtype)
    for topk in (1, 2, 3, 4, 6, 8, 10, 12, 14, 19):
        keep = HA.attention_with_stats(q.to(dev), k.to(dev), v.to(dev), None, topk=topk, scale=1.0, backend=backend)[2]
        want = reference.homologous_kept(q, k, None, topk, scale=1.0)
        assert torch.equal(HA.unpack_bits(keep, L).cpu(), want), topk


@pytest.mark.parametrize("backend,l", [("cpu", 300), ("torch", 300), ("triton", 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_kept_set_with_many_ties(backend, l, dtype):
    """Integer-valued q and k (every score exact, a few dozen distinct values per row, so K
    lands inside runs of equal scores), groups with global tokens, K from 1 to past the
    allowed count: the kept set is the reference's, bit for bit, and has min(K, allowed) keys."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take float32/bfloat16/float16")
    dev = device_for(backend)
    g = torch.Generator().manual_seed(11)
    q = torch.randint(-2, 3, (2, 2, l, 4), generator=g).to(dtype)
    k = torch.randint(-3, 4, (2, 2, l, 4), generator=g).to(dtype)
    v = torch.randn(2, 2, l, 4, generator=g, dtype=torch.float64).to(dtype)
    groups = _groups(2, l, 3, n_global=2, seed=11)
    allowed = reference.homologous_kept(q, k, groups, None).sum(-1)
    for topk in (1, 7, l // 4, l // 3 + 5, l):
        keep = HA.attention_with_stats(q.to(dev), k.to(dev), v.to(dev), groups.to(dev), topk=topk, scale=1.0,
                                       backend=backend)[2]
        got = HA.unpack_bits(keep, l).cpu()
        assert torch.equal(got, reference.homologous_kept(q, k, groups, topk, scale=1.0)), topk
        assert torch.equal(got.sum(-1), allowed.clamp_max(topk)), topk


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("topk", [None, 6])
def test_half_precision(backend, dtype, tol, topk):
    dev = device_for(backend)
    q, k, v = (t.requires_grad_() for t in _qkv(dtype=dtype, device=dev))
    groups = _groups(2, 21, 3).to(dev)
    out = pyssl.homologous_attention(q, k, v, groups, topk=topk, backend=backend)
    assert out.dtype == dtype
    # the reference in float32 on the same (rounded) inputs; the op accumulates in float32
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = reference.homologous_attention(qf, kf, vf, groups, topk=topk)
    if topk:   # the same kept set as every other backend
        keep = HA.attention_with_stats(q.detach(), k.detach(), v.detach(), groups, topk=topk, backend=backend)[2]
        want = HA.attention_with_stats(q.detach().cpu(), k.detach().cpu(), v.detach().cpu(), groups.cpu(),
                                       topk=topk, backend="torch")[2]
        assert torch.equal(keep.cpu(), want)
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), g.to(dtype))
    want = torch.autograd.grad(ref, (qf, kf, vf), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b, atol=4 * tol, rtol=4 * tol)


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_large_scores_are_stable(backend):
    dev = device_for(backend)
    q, k, v = _qkv(device=dev)
    groups = _groups(2, 21, 3).to(dev)
    out = pyssl.homologous_attention(q * 30, k * 30, v, groups, backend=backend)
    ref = reference.homologous_attention(q.double() * 30, k.double() * 30, v.double(), groups)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


# token 11 is global; -1: a NaN with its sign bit set (a user's -nan, or 0 · inf on x86)
NAN_CASES = [("q", 5, 1), ("q", 11, 1), ("k", 2, 1), ("k", 11, 1), ("v", 6, 1), ("k", 2, -1), ("q", 5, -1)]


@pytest.mark.parametrize("backend,stream,topk", [(b, False, k) for b in ATTN_BACKENDS for k in (None, 2, 5)]
                         + [("triton", True, 2), ("triton", True, 5)])    # (the streamed kernel: top-k only)
@pytest.mark.parametrize("tensor,token,sign", NAN_CASES)
@pytest.mark.parametrize("grouped", [True, False])
def test_nan_inputs_poison_the_rows_that_use_them(backend, stream, tensor, token, sign, grouped, topk, monkeypatch):
    """A NaN in q_i, or in k_j / v_j of a key j that query i keeps, makes output i NaN (as in
    the reference, and as a diverging run must show), never a silently finite or zero row: NaN
    scores rank above every number (torch.sort's order), so a NaN key is kept wherever allowed.
    Rows that touch no NaN are exact; dq of the NaN rows and dk carry the NaN."""
    if stream:
        monkeypatch.setenv("PYSSL_HOMATTN_TOPK_STREAM", "1")
    dev = device_for(backend)
    q, k, v = _qkv(b=1, h=2, l=12, d=4)
    groups = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, -1]]) if grouped else None
    bad = dict(q=q.clone(), k=k.clone(), v=v.clone())
    # the quiet NaN's bits, 0x7FC00000, or with the sign bit, 0xFFC00000
    bad[tensor].view(torch.int32)[0, 1, token, 1] = 0x7FC00000 if sign > 0 else -0x00400000
    assert bad[tensor][0, 1, token, 1].isnan() and (bad[tensor][0, 1, token, 1].view(torch.int32) < 0) == (sign < 0)
    kept = reference.homologous_kept(bad["q"], bad["k"], groups, topk)
    nan_key = (bad["k"].isnan() | bad["v"].isnan()).any(-1)
    want_nan = bad["q"].isnan().any(-1) | (kept & nan_key[:, :, None, :]).any(-1)
    assert want_nan.any() and not want_nan.all()
    ins = [bad[n].to(dev, copy=True).requires_grad_() for n in "qkv"]
    out = pyssl.homologous_attention(*ins, None if groups is None else groups.to(dev), topk=topk, backend=backend)
    out.sum().backward()
    got_nan = out.isnan().any(-1).cpu()
    if tensor == "v":
        # P · V: a zero of P (a key not kept) times the NaN is NaN too, in the reference as in
        # every kernel that multiplies over more keys than it keeps: at least the kept rows
        assert (got_nan | ~want_nan).all()
    else:   # NaN scores: exactly the rows that keep one, the whole row, and its saved lse
        assert torch.equal(got_nan, want_nan)
        assert torch.equal(out.isnan().all(-1).cpu(), want_nan)
        lse = HA.attention_with_stats(*(t.detach() for t in ins), None if groups is None else groups.to(dev),
                                      topk=topk, backend=backend)[1]
        assert torch.equal(lse.isnan().cpu(), want_nan)
    # rows that touch no NaN: the reference on inputs with the NaN zeroed gives their values
    ref = reference.homologous_attention(*(bad[n].nan_to_num(0.0) for n in "qkv"), groups, topk=topk)
    torch.testing.assert_close(out.detach().cpu()[~got_nan], ref[~got_nan], atol=2e-5, rtol=1e-5)
    # the NaN reaches the gradients of the rows that used it (where else NaN shows up is the
    # dense products' business: 0 · NaN is NaN in the reference too)
    assert ins[0].grad.cpu()[want_nan].isnan().any(-1).all()
    assert ins[1].grad.isnan().any()


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_opcheck_and_compile(backend):
    dev = device_for(backend)
    q, k, v = _qkv(b=1, h=2, l=10, d=4, device=dev)
    groups = _groups(1, 10, 2).to(dev)
    for topk in (0, 3):
        torch.library.opcheck(HA._attn_op, (q, k, v, groups, topk, 0.5, backend))
        # (B, L, H, D) tensors viewed as (B, H, L, D): outputs are contiguous on every backend
        qt, kt, vt, dot = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v, q.flip(2)))
        torch.library.opcheck(HA._attn_op, (qt, kt, vt, groups, topk, 0.5, backend))
        out, lse, keep, perm = HA._attn_op(qt, kt, vt, groups, topk, 0.5, backend)
        torch.library.opcheck(HA._attn_bwd_op, (qt, kt, vt, out, dot, lse, groups, keep, perm, topk, 0.5,
                                                backend))
    for topk in (None, 3):
        # aot_eager traces the autograd graph too: forward and backward through the fake kernels
        f = torch.compile(lambda a, b, c: pyssl.homologous_attention(a, b, c, groups, topk=topk, backend=backend),
                          fullgraph=True, backend="aot_eager")
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        want = [t.clone().requires_grad_() for t in (q, k, v)]
        got_out = f(*ins)
        want_out = pyssl.homologous_attention(*want, groups, topk=topk, backend=backend)
        torch.testing.assert_close(got_out, want_out)
        g = torch.randn_like(got_out)
        for a, b in zip(torch.autograd.grad(got_out, ins, g), torch.autograd.grad(want_out, want, g)):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@pytest.mark.parametrize("topk", [None, 7])
def test_long_rows_with_skipped_tiles(backend, topk):
    """L = 70 with 4 groups and no global token: several tiles per row under the interpreter,
    and (group mode, tokens sorted by group) tiles outside the block diagonal skipped."""
    from pyssl.kernels import homologous_attention as K
    dev = device_for(backend)
    q, k, v = (t.requires_grad_() for t in _qkv(b=2, h=2, l=70, d=16, device=dev))
    groups = _groups(2, 70, 4, n_global=0).to(dev)
    if backend == "triton" and topk is None:
        assert K.visited_fraction(groups, 70, K._config(70, q.dtype)["BLOCK_M"]) < 0.7
    _check_against_reference(q, k, v, groups, topk, backend)


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@pytest.mark.parametrize("topk", [None, 5])
def test_multi_tile_rows_with_global_tokens_anywhere(backend, topk):
    """Global tokens with several negative ids in the middle of the sequence, over several tiles:
    the tile-skipping rule must still visit every tile holding a global token."""
    dev = device_for(backend)
    q, k, v = (t.requires_grad_() for t in _qkv(b=2, h=2, l=53, d=8, device=dev, seed=4))
    groups = _groups(2, 53, 3, n_global=0, seed=4)
    groups[0, [7, 30]] = torch.tensor([-3, -1])
    groups[1, [0, 52]] = torch.tensor([-5, -100])
    groups = groups.to(dev)
    _check_against_reference(q, k, v, groups, topk, backend)


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@pytest.mark.parametrize("topk", [None, 4])
def test_strided_qkv_views(backend, topk):
    """q, k, v as views of one fused (B, L, 3, H, D) projection, as a ViT makes them: the Triton
    kernels read them in place (shared strides, no copies), every backend matches the reference
    and the gradients flow back into the fused tensor."""
    dev = device_for(backend)
    qkv = torch.randn(2, 21, 3, 3, 8, generator=torch.Generator().manual_seed(11)).to(dev).requires_grad_()
    groups = _groups(2, 21, 3).to(dev)

    def run(fn):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        assert not q.is_contiguous()
        if backend == "triton":
            from pyssl.kernels import homologous_attention as K
            assert K.strided_inputs(q, k, v)[0].data_ptr() == q.data_ptr()
        return fn(q, k, v)
    out = run(lambda q, k, v: pyssl.homologous_attention(q, k, v, groups, topk=topk, backend=backend))
    ref = run(lambda q, k, v: reference.homologous_attention(q, k, v, groups, topk=topk))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    g = torch.randn_like(out)
    got, = torch.autograd.grad(out, qkv, g)
    want, = torch.autograd.grad(ref, qkv, g)
    torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@pytest.mark.parametrize("mode", ["dense", "group"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_views_with_a_strided_last_dimension(backend, mode, dtype):
    """q as a transpose, k as an expand, v as a step slice (last-dimension strides 21, 0 and 2):
    every backend reads them as the values they show (the CPU flash kernels behind the torch
    backend read rows as contiguous vectors, so it must copy such views)."""
    dev = device_for(backend)
    g = torch.Generator().manual_seed(12)
    qt = torch.randn(2, 3, 8, 21, generator=g).to(dev, dtype).requires_grad_()
    k1 = torch.randn(2, 3, 21, 1, generator=g).to(dev, dtype).requires_grad_()
    v2 = torch.randn(2, 3, 21, 16, generator=g).to(dev, dtype).requires_grad_()
    groups = None if mode == "dense" else _groups(2, 21, 3).to(dev)
    views = lambda: (qt.transpose(-1, -2), k1.expand(2, 3, 21, 8), v2[..., ::2])
    q, k, v = views()
    assert (q.stride(-1), k.stride(-1), v.stride(-1)) == (21, 0, 2)
    out = pyssl.homologous_attention(q, k, v, groups, backend=backend)
    ref = reference.homologous_attention(*(t.double() for t in views()), groups)
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.double(), ref, **tol)
    do = torch.randn_like(ref)
    got = torch.autograd.grad(out, (qt, k1, v2), do.to(dtype))
    want = torch.autograd.grad(ref, (qt, k1, v2), do)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), **(dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32
                                                     else dict(atol=1e-1, rtol=5e-2)))


@pytest.mark.parametrize("spec", ["fwd.BLOCK_M=32,bwd.BLOCK_N=32,num_stages=3", "BLOCK_M=16,BLOCK_N=32"])
def test_triton_tile_overrides(spec, monkeypatch):
    """PYSSL_HOMATTN_TRITON (the GPU sweep's knob): tiles of BLOCK_M rows streamed against
    BLOCK_N-row steps, forward and backward configured apart, top-k's backward on the same
    tiles, all still equal to the reference."""
    monkeypatch.setenv("PYSSL_HOMATTN_TRITON", spec)
    dev = device_for("triton")
    q, k, v = (t.requires_grad_() for t in _qkv(b=2, h=1, l=70, d=8, device=dev, seed=9))
    groups = _groups(2, 70, 3, n_global=2, seed=9).to(dev)
    _check_against_reference(q, k, v, groups, None, "triton")
    _check_against_reference(q, k, v, groups, 6, "triton")


@pytest.mark.parametrize("spec", ["BLOCK_M=48", "bwd.BLOCK_N=8", "num_warps=3", "dq.BLOCK_M=64", "tiles=64"])
def test_triton_tile_override_rejects_bad_values(spec, monkeypatch):
    monkeypatch.setenv("PYSSL_HOMATTN_TRITON", spec)
    q, k, v = _qkv(device=device_for("triton"))
    with pytest.raises(ValueError, match="PYSSL_HOMATTN_TRITON"):
        pyssl.homologous_attention(q, k, v, _groups(2, 21, 3).to(q.device), backend="triton")


def test_visited_fraction_at_vit_and_long_sizes():
    from pyssl.kernels import homologous_attention as K
    dev = device_for("triton")           # the plan kernel runs on the GPU or in the interpreter
    vit = _groups(8, 197, 4, n_global=1).to(dev)
    long = _groups(2, 4096, 4, n_global=0).to(dev)
    # 197 tokens, 4 groups of 49 and a class token, 64-row tiles: each group is one tile that
    # meets its own span (64) and a 16-wide global tile; the global row block (16) meets all
    # 256 + 16 keys: (4 * 64 * 80 + 16 * 272) / 256^2. Fixed 64-row tiles of the sorted order
    # visited 14 of 16 tile pairs (the class token's tile meets every other).
    assert K.visited_fraction(vit, 197, 64) == pytest.approx((4 * 64 * 80 + 16 * 272) / 256 ** 2)
    # 4096 tokens, 4 groups of 1024: only the 16-tile diagonal blocks remain (one in four)
    assert K.visited_fraction(long, 4096, 64) == pytest.approx(0.25)


@pytest.mark.parametrize("skip", [True, False])
def test_group_tiles_partition_the_sorted_rows(skip):
    """The tile table: tiles cover the non-global sorted rows in order, each inside one group,
    at most `block` rows, its key span the group's (all non-global rows without skipping)."""
    from pyssl.kernels import homologous_attention as K
    groups = _groups(3, 90, 7, n_global=5, uneven=False, seed=3)
    groups[1, :5] = torch.tensor([2, 2, 2, 2, 2])      # a row without global tokens
    groups[2] = torch.where(groups[2] == 3, 1, groups[2])   # a group of 2x the others
    groups = groups.to(device_for("triton"))
    perm, gs, tab, ntile, ng = K.plan(groups, 3, 90, 8, groups.device, skip)
    for b in range(3):
        n_g = int((groups[b] < 0).sum())
        assert int(ng[b]) == n_g and (gs[b, :n_g] < 0).all() and (gs[b, n_g:] >= 0).all()
        t = tab[b, : int(ntile[b])].tolist()
        assert t[0][0] == n_g and t[-1][1] == 90
        for (s, e, lo, hi), nxt in zip(t, t[1:] + [[90]]):
            assert nxt[0] == e and 0 < e - s <= 8
            ids = gs[b, s:e]
            assert (ids == ids[0]).all()
            span = (gs[b] == ids[0]).nonzero().view(-1)
            want = (int(span[0]), int(span[-1]) + 1) if skip else (n_g, 90)
            assert (lo, hi) == want
            assert s == lo or not skip or (s - lo) % 8 == 0


@pytest.mark.parametrize("b,l,n,n_global,block", [(3, 90, 7, 5, 8), (2, 197, 4, 1, 64),
                                                    (2, 64, 10, 20, 16), (1, 300, 3, 0, 16)])
def test_plan_kernel_equals_torch_tables(b, l, n, n_global, block):
    """The one-launch plan kernel builds the same tile table as the torch version (which serves
    rows longer than MAX_PLAN_L), with and without skipping and without groups."""
    from pyssl.kernels import homologous_attention as K
    groups = _groups(b, l, n, n_global=n_global, seed=1).to(device_for("triton"))
    perm = torch.sort(groups, dim=1, stable=True).indices
    for g, skip in ((groups, True), (groups, False), (None, True)):
        gs, tab, nt, ng = K.tables(g, perm, b, l, block, skip)
        gs2, tab2, nt2, ng2 = K._tables_torch(g, perm, b, l, block, skip)
        assert torch.equal(gs, gs2) and torch.equal(nt, nt2) and torch.equal(ng, ng2)
        assert torch.equal(tab[:, :l], tab2[:, :l])    # row l: the torch version's discard slot


def test_plan_tables_of_cpu_tensors_without_the_interpreter(monkeypatch):
    """CPU tensors outside the interpreter (a GPU machine's CPU-side callers) get the torch
    tables instead of a Triton launch that cannot read them."""
    from pyssl.kernels import homologous_attention as K
    groups = _groups(2, 40, 3, n_global=2, seed=4)
    perm = torch.sort(groups, dim=1, stable=True).indices
    monkeypatch.setattr(K, "interpreting", lambda: False)
    monkeypatch.setattr(K, "_plan_kernel", None)          # a launch would fail loudly
    got = K.tables(groups, perm, 2, 40, 8, True)
    want = K._tables_torch(groups, perm, 2, 40, 8, True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@pytest.mark.parametrize("skip", [True, False])
def test_many_small_groups_and_global_blocks(backend, skip, monkeypatch):
    """More group tiles than tile slots (10 groups of 4-5 tokens in L = 64: the Triton slots
    loop over tiles), more global tokens than one 16-wide global block (20, anywhere in the
    row), no groups at all, and the same with tile skipping off (PYSSL_HOMATTN_NO_SKIP=1: the
    group ids masked per tile)."""
    if not skip:
        monkeypatch.setenv("PYSSL_HOMATTN_NO_SKIP", "1")
    dev = device_for(backend)
    q, k, v = (t.requires_grad_() for t in _qkv(b=2, h=1, l=64, d=8, device=dev, seed=7))
    groups = _groups(2, 64, 10, n_global=20, seed=7)
    groups[1] = groups[1][torch.randperm(64, generator=torch.Generator().manual_seed(1))]
    _check_against_reference(q, k, v, groups.to(dev), None, backend)
    _check_against_reference(q, k, v, None, None, backend)


def test_backends_say_why_they_cannot_serve():
    q, k, v = _qkv(dtype=torch.float64)
    with pytest.raises(ValueError, match="backend='triton' cannot serve"):
        pyssl.homologous_attention(q, k, v, backend="triton")
    assert HA.not_supported_reasons(q)["cpu"] == []
    wide = torch.zeros(1, 1, 20, 300)
    assert any("head dimensions d <= 256, got d=300" in r for r in HA.not_supported_reasons(wide, topk=5)["triton"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(groups=torch.zeros(2, 20, dtype=torch.int64)), "groups must have shape"),
    (dict(groups=torch.zeros(2, 21)), "groups must be an integer"),
    (dict(topk=0), "topk"),
    (dict(topk=2.5), "topk"),
    (dict(scale=float("nan")), "scale"),
    (dict(scale=float("inf")), "scale"),
    (dict(backend="fast"), "backend"),
])
def test_attention_bad_input(kwargs, match):
    q, k, v = _qkv()
    before = q.clone()
    with pytest.raises((ValueError, TypeError), match=match):
        pyssl.homologous_attention(q, k, v, **kwargs)
    assert torch.equal(q, before)


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@pytest.mark.parametrize("topk", [None, 4])
def test_attention_leaves_its_inputs_alone(backend, topk):
    """A successful forward and backward modifies none of q, k, v, groups or the output's
    gradient (the kernels sort, permute and scale copies only)."""
    dev = device_for(backend)
    q, k, v = (t.requires_grad_() for t in _qkv(device=dev))
    groups = _groups(2, 21, 3, n_global=2).to(dev)
    saved = [t.detach().clone() for t in (q, k, v, groups)]
    out = pyssl.homologous_attention(q, k, v, groups, topk=topk, backend=backend)
    g = torch.randn_like(out)
    g0 = g.clone()
    out.backward(g)
    for t, t0 in zip((q, k, v, groups, g), saved + [g0]):
        assert torch.equal(t.detach(), t0)


@pytest.mark.parametrize("mode", ["no groups", "one group + globals", "topk"])
def test_cpu_long_rows_are_cut_into_query_chunks(mode):
    """L = 1200 without groups is one set of 1200 × 1200 scores: the C++ kernel cuts it into
    query chunks sharing their keys (2^16 scores or 64 rows per thread); results unchanged."""
    q, k, v = (t.requires_grad_() for t in _qkv(b=1, h=2, l=1200, d=8, seed=5))
    groups = None
    if mode == "one group + globals":
        groups = torch.zeros(1, 1200, dtype=torch.int64)
        groups[0, ::300] = -1
    topk = 16 if mode == "topk" else None
    _check_against_reference(q, k, v, groups, topk, "cpu")


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize("b,h", [(1, 1), (1, 3), (2, 4)])
@pytest.mark.parametrize("mode", ["no groups", "groups", "one group + globals", "topk"])
def test_cpu_threads_share_out_any_batch(threads, b, h, mode):
    """The C++ kernel gives each thread one contiguous range of (batch·head, set) pairs of equal
    work, the sets first cut into query chunks of at most a quarter of a thread's share: with
    B·H below the thread count (one image: 1 or 3 heads) a (batch, head) is shared by several
    threads; with B·H above it (2·4 on 3 or 5 threads) ranges still end inside a (batch, head). Such a row's dK, dV are
    summed from the threads' buffers afterwards. Float64 against the dense reference."""
    l = 1200 if mode in ("no groups", "topk") else 300
    q, k, v = (t.double().requires_grad_() for t in _qkv(b=b, h=h, l=l, d=8, seed=7))
    groups = None
    if mode == "groups":
        groups = _groups(b, l, 4, n_global=2)
    elif mode == "one group + globals":
        groups = torch.zeros(b, l, dtype=torch.int64)
        groups[:, ::100] = -1
    topk = 16 if mode == "topk" else None
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = pyssl.homologous_attention(q, k, v, groups, topk=topk, backend="cpu")
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), g)
    finally:
        torch.set_num_threads(old)
    ref = reference.homologous_attention(q, k, v, groups, topk=topk)
    torch.testing.assert_close(out, ref)
    for name, a, b in zip("qkv", got, torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, msg=f"d{name}")


def test_attention_mismatched_devices():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="same device"):
        pyssl.homologous_attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="groups must be on q's device"):
        pyssl.homologous_attention(q, k, v, _groups(2, 21, 3).to("meta"))


def test_attention_bad_shapes():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="same shape"):
        pyssl.homologous_attention(q, k[:, :, :5], v)
    with pytest.raises(ValueError, match="same dtype"):
        pyssl.homologous_attention(q, k.double(), v)
    with pytest.raises(ValueError, match=r"\(B, H, L, d\)"):
        pyssl.homologous_attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="empty"):
        pyssl.homologous_attention(q[:0], k[:0], v[:0])


# ---------------------------------------------------------------- mix_patches

def test_mix_patches_is_an_exact_partition():
    p = torch.randn(12, 50, 7)
    mixed, groups, sources = pyssl.mix_patches(p, 0.25, generator=torch.Generator().manual_seed(3))
    assert mixed.shape == (3, 50, 7) and groups.shape == (3, 50) and sources.shape == (3, 4)
    assert torch.equal(sources, torch.arange(12).view(3, 4))
    assert reference.mix_groups_valid(groups, 4)
    counts = torch.stack([(groups == i).sum(1) for i in range(4)], 1)
    assert sorted(counts[0].tolist()) == [12, 12, 13, 13]
    # every mixed token is the source image's patch at the same position
    for m in range(3):
        for pos in range(50):
            assert torch.equal(mixed[m, pos], p[sources[m, groups[m, pos]], pos])


def test_mix_patches_reproducible_and_random():
    p = torch.randn(8, 30, 3)
    a = pyssl.mix_patches(p, 0.5, generator=torch.Generator().manual_seed(1))
    b = pyssl.mix_patches(p, 0.5, generator=torch.Generator().manual_seed(1))
    c = pyssl.mix_patches(p, 0.5, generator=torch.Generator().manual_seed(2))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[1], c[1])
    # which sources get the extra position is random too (Np = 30 is not divisible by 4)
    firsts = set()
    for s in range(20):
        _, g, _ = pyssl.mix_patches(torch.randn(4, 30, 1), 0.25, generator=torch.Generator().manual_seed(s))
        firsts.add(tuple((g[0] == i).sum().item() for i in range(4)))
    assert len(firsts) > 1


@gpu_only()
def test_mix_patches_on_the_gpu_without_a_host_sync():
    """GPU patches: a seeded CPU generator gives the CPU's mix (reproducible across devices)
    with no host sync (the labels reach the device from pinned memory), and a generator on the
    GPU draws there."""
    p = torch.randn(8, 50, 3)
    want = pyssl.mix_patches(p, 0.25, generator=torch.Generator().manual_seed(4))
    pc = p.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = pyssl.mix_patches(pc, 0.25, generator=torch.Generator().manual_seed(4))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(got, want):
        assert a.is_cuda and torch.equal(a.cpu(), b)
    mixed, groups, sources = pyssl.mix_patches(pc, 0.25, generator=torch.Generator("cuda").manual_seed(4))
    assert groups.is_cuda and reference.mix_groups_valid(groups.cpu(), 4)
    assert torch.equal(mixed, pc[sources.gather(1, groups), torch.arange(50, device="cuda")])
    with pytest.raises(ValueError, match="generator must be a CPU generator or one on patches' device"):
        pyssl.mix_patches(p, 0.25, generator=torch.Generator("cuda"))


def test_mix_patches_gradient_and_bad_input():
    p = torch.randn(4, 6, 2, requires_grad=True)
    mixed, _, _ = pyssl.mix_patches(p, 0.5)
    mixed.sum().backward()
    # each position of a mixed sample comes from exactly one of its 2 sources
    assert torch.equal(p.grad.view(2, 2, 6, 2).sum(1), torch.ones(2, 6, 2))
    assert set(p.grad.unique().tolist()) == {0.0, 1.0}
    with pytest.raises(ValueError, match="divisible"):
        pyssl.mix_patches(torch.randn(6, 4, 2), 0.25)
    with pytest.raises(ValueError, match="ratio"):
        pyssl.mix_patches(torch.randn(4, 4, 2), 0.0)
    with pytest.raises(ValueError, match="ratio"):
        pyssl.mix_patches(torch.randn(4, 4, 2), 1e-320)
    with pytest.raises(ValueError, match=r"\(B, Np, P\)"):
        pyssl.mix_patches(torch.randn(4, 4), 0.5)
    with pytest.raises(ValueError, match="empty"):
        pyssl.mix_patches(torch.randn(4, 0, 2), 0.5)
    with pytest.raises((ValueError, TypeError), match="patches"):
        pyssl.mix_patches([[[1.0]]], 0.5)


def test_mix_patches_positions_are_uniform():
    """Each position takes each of its sample's G sources with probability 1/G, and each source
    gets the extra position (Np = 30, G = 4: two sources get 8, two get 7) equally often: counts
    over 2000 mixes against their binomial spread (a fixed arrangement, or one source always
    getting more, lands tens of standard deviations away)."""
    n, g, np_ = 2000, 4, 30
    gen = torch.Generator().manual_seed(11)
    groups = torch.cat([pyssl.mix_patches(torch.zeros(4, np_, 1), 0.25, generator=gen)[1] for _ in range(n)])
    onehot = torch.nn.functional.one_hot(groups, g).double()         # (n, Np, G)
    per_pos = onehot.mean(0)                                          # P(position p takes source i)
    sd = (0.25 * 0.75 / n) ** 0.5
    assert (per_pos - 0.25).abs().max() < 5 * sd, per_pos
    extra = (onehot.sum(1) == 8).double().mean(0)                     # P(source i gets 8 positions)
    assert (extra - 0.5).abs().max() < 5 * (0.25 / n) ** 0.5, extra


# ---------------------------------------------------------------- contrastive loss

CL_BACKENDS = ["cpu", "torch", "triton"]


@pytest.mark.parametrize("backend", CL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_contrastive_loss_matches_reference(backend, reduction):
    dt = torch.float32 if backend == "triton" else torch.float64   # Triton: no float64
    z = torch.randn(3, 13, 6, dtype=dt, device=device_for(backend), requires_grad=True)
    groups = _groups(3, 13, 3, n_global=2)       # negative ids: ignored entirely
    groups[0, 5:] = 7                             # a large group
    groups[1, 3] = 11                             # a group of one: no positives, still a negative
    groups = groups.to(z.device)
    out = pyssl.homologous_contrastive_loss(z, groups, temperature=0.1, reduction=reduction, backend=backend)
    ref = reference.homologous_contrastive_loss(z, groups, temperature=0.1, reduction=reduction)
    tol = dict(atol=2e-5, rtol=2e-5) if dt == torch.float32 else {}
    torch.testing.assert_close(out, ref, **tol)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, z, g)[0], torch.autograd.grad(ref, z, g)[0], **tol)
    if dt == torch.float64:
        assert torch.autograd.gradcheck(
            lambda t: pyssl.homologous_contrastive_loss(t, groups, temperature=0.1, reduction=reduction,
                                                        backend=backend), (z,))


@pytest.mark.parametrize("backend", CL_BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
def test_contrastive_loss_float_and_bf16(backend, dtype, tol):
    z = torch.randn(4, 30, 16).to(device_for(backend), dtype).requires_grad_()
    groups = _groups(4, 30, 4, n_global=1).to(z.device)
    out = pyssl.homologous_contrastive_loss(z, groups, backend=backend)
    assert out.dtype == torch.float32      # the loss in float32 for every input dtype but float64
    zf = z.detach().float().requires_grad_()
    ref = reference.homologous_contrastive_loss(zf, groups)
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    (ga,) = torch.autograd.grad(out, z)
    (gb,) = torch.autograd.grad(ref, zf)
    torch.testing.assert_close(ga.float(), gb, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", CL_BACKENDS)
def test_contrastive_loss_extreme_temperatures(backend):
    """τ = 1e-3 (scores up to 1000) and τ far above any score (1e30, and 1e46, where 1/τ is zero
    in float32: every logit 0, the loss log(n − 1) − 0 per token): float32 against the reference."""
    z = torch.randn(2, 30, 16).to(device_for(backend))
    groups = _groups(2, 30, 3, n_global=1).to(z.device)
    for t in (1e-3, 1e30, 1e46):
        out = pyssl.homologous_contrastive_loss(z, groups, temperature=t, backend=backend)
        ref = reference.homologous_contrastive_loss(z.cpu(), groups.cpu(), temperature=t)
        assert torch.isfinite(out).all(), t
        torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", CL_BACKENDS)
def test_contrastive_loss_lone_tokens_and_near_parallel(backend):
    # sample 0: a single valid token (no term at all); sample 1: near-parallel features, t = 0.05;
    # group ids far from 0 (they are ranked per sample, not used as indices)
    dt = torch.float32 if backend == "triton" else torch.float64
    z = torch.randn(2, 6, 4, dtype=torch.float64)
    z[1] = torch.tensor([1.0, 0, 0, 0]) + 1e-3 * torch.randn(6, 4, dtype=torch.float64)
    z = z.to(device_for(backend), dt).requires_grad_()
    groups = torch.tensor([[-1, -1, 3, -1, -1, -1], [10 ** 9, 10 ** 9, 10 ** 9, 5, 5, -1]]).to(z.device)
    out = pyssl.homologous_contrastive_loss(z, groups, temperature=0.05, reduction="none", backend=backend)
    ref = reference.homologous_contrastive_loss(z.double(), groups, temperature=0.05, reduction="none").to(dt)
    tol = dict(atol=1e-3, rtol=1e-4) if dt == torch.float32 else {}
    torch.testing.assert_close(out, ref, **tol)
    assert torch.all(out[0] == 0)
    zd = z.detach().double().requires_grad_()
    want = torch.autograd.grad(reference.homologous_contrastive_loss(zd, groups, temperature=0.05,
                                                                     reduction="none").sum(), zd)[0]
    torch.testing.assert_close(torch.autograd.grad(out.sum(), z)[0].double(), want,
                               **(dict(atol=2e-2, rtol=1e-3) if dt == torch.float32 else {}))


@pytest.mark.parametrize("b,l", [(3, 300), (1, 700), (1, 4500)])
def test_contrastive_loss_cpu_row_tiles(b, l):
    # long samples: the C++ kernel cuts each sample's valid rows into tiles (256 rows up to
    # n = 4096, then ~2^20/n rounded to 8: 232 at the 4500 − 47 global tokens here), spread over
    # the threads even for one sample, with the normalized rows shared; at L = 300 one sample
    # has a single tile (< 257 valid tokens) next to multi-tile ones. The backward forms G + Gᵀ
    # per tile from every column's statistics.
    torch.manual_seed(3)
    z = torch.randn(b, l, 4, dtype=torch.float64, requires_grad=True)
    groups = torch.randint(0, 5, (b, l))
    groups[:, ::97] = -1                     # global tokens, ignored
    groups[0, 1] = 99                        # a group of one
    if b == 3:
        groups[1, 200:] = -1                 # this sample fits one tile
    out = pyssl.homologous_contrastive_loss(z, groups, temperature=0.3, reduction="none", backend="cpu")
    ref = reference.homologous_contrastive_loss(z, groups, temperature=0.3, reduction="none")
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, z, g)[0], torch.autograd.grad(ref, z, g)[0])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,e", [(torch.float32, 40), (torch.float32, 300), (torch.bfloat16, 300)])
def test_contrastive_loss_triton_column_tiles_and_e_slices(dtype, e):
    """The Triton kernels walk a sample's columns in tiles (L = 150: several tiles, the last one
    partial) and split the backward's E into slices: at E = 300 two (16-bit) or three (float32)
    slices, each recomputing the scores, and the normalization's backward afterwards in PyTorch;
    at E = 40 one slice with that step in registers. A zero token (norm clamped at eps) is
    among the others."""
    from pyssl.kernels import homologous_contrastive_loss as K
    b, l = 2, 150
    cfg = K._cfg(l, e, dtype, backward=True)
    assert l > 2 * cfg["BLOCK_N"]
    assert (e > cfg["E_SPLIT"]) == (e == 300)
    dev = device_for("triton")
    torch.manual_seed(5)
    z = torch.randn(b, l, e).to(dev, dtype)
    z[1, 9] = 0.0                            # ẑ = 0: s = 0 against everything, dz = dẑ/eps
    z.requires_grad_()
    groups = _groups(b, l, 5, n_global=3)
    groups[0, 40] = 77                       # a group of one
    out = pyssl.homologous_contrastive_loss(z, groups.to(dev), temperature=0.2, reduction="none",
                                            backend="triton").cpu()
    zd = z.detach().cpu().double().requires_grad_()
    ref = reference.homologous_contrastive_loss(zd, groups, temperature=0.2, reduction="none")
    tol = dict(atol=2e-4, rtol=2e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.double(), ref, **tol)
    g = torch.randn(b, l, dtype=torch.float64)
    g[1, 9] = 0.0                            # its own row would scale by 1/eps: keep the test finite
    (got,) = torch.autograd.grad(out, z, g.to(out.dtype))
    (want,) = torch.autograd.grad(ref, zd, g)
    assert got.dtype == dtype
    got = got.cpu().double()
    # the zero token's gradient is dẑ/eps (~1e11): compared as a vector, relative to its norm
    rel = (got[1, 9] - want[1, 9]).norm() / want[1, 9].norm()
    assert want[1, 9].norm() > 1e9 and rel < tol["rtol"], rel
    got[1, 9] = want[1, 9] = 0.0
    torch.testing.assert_close(got, want, **tol)


def test_contrastive_loss_torch_backend_keeps_no_score_tensors():
    """The torch backend's row chunks are recomputed in the backward: what autograd saves is of
    the order of z, not the B·L·L scores (plain autograd saved ~2.3 such tensors)."""
    b, l, e = 12, 64, 8
    z = torch.randn(b, l, e, requires_grad=True)
    groups = _groups(b, l, 4, n_global=1)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = pyssl.homologous_contrastive_loss(z, groups, backend="torch")
    assert sum(saved) < b * l * l * 4 / 4, sum(saved)
    (g,) = torch.autograd.grad(loss, z)
    zr = z.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(reference.homologous_contrastive_loss(zr, groups), zr)
    torch.testing.assert_close(g.double(), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_contrastive_loss_torch_backend_chunks_query_rows(monkeypatch, reduction):
    """One sample's L×L scores above the chunk budget: its query rows go in chunks (here 15 of
    the 64 per chunk, the last one short), each recomputed in the backward."""
    from pyssl.ops import homologous_contrastive_loss as HCL
    monkeypatch.setattr(HCL, "CHUNK_ELEMS", 1000)
    spans = []
    real = HCL._rows

    def rows(zc, gc, t, q0=0, q1=None):
        spans.append((zc.shape[0], q0, zc.shape[1] if q1 is None else q1))
        return real(zc, gc, t, q0, q1)

    monkeypatch.setattr(HCL, "_rows", rows)
    b, l, e = 2, 64, 8
    z = torch.randn(b, l, e, dtype=torch.float64, requires_grad=True)
    groups = _groups(b, l, 3, n_global=2)
    groups[1, 7] = 40                         # a group of one
    out = pyssl.homologous_contrastive_loss(z, groups, temperature=0.3, reduction=reduction, backend="torch")
    forward_spans = list(spans)
    assert forward_spans == [(1, q0, min(l, q0 + 15)) for _ in range(b) for q0 in range(0, l, 15)]
    assert max(r * (q1 - q0) * l for r, q0, q1 in forward_spans) <= 1000
    ref = reference.homologous_contrastive_loss(z, groups, temperature=0.3, reduction=reduction)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, z, g)[0], torch.autograd.grad(ref, z, g)[0])
    assert len(spans) == 2 * len(forward_spans)   # every chunk recomputed once in the backward


def test_contrastive_loss_mean_without_positives_is_zero():
    z = torch.randn(2, 4, 3, requires_grad=True)
    groups = torch.tensor([[0, 1, 2, -1], [5, -1, 6, 7]])      # every group of one
    for backend in ("cpu", "torch"):
        loss = pyssl.homologous_contrastive_loss(z, groups, backend=backend)
        assert loss.item() == 0.0
        assert torch.autograd.grad(loss, z)[0].abs().max() == 0


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_compile_with_dynamic_shapes(backend):
    """compile(dynamic=True): one graph over two sequence lengths (L a SymInt in the op's checks,
    fakes and autograd), group and top-k mode, the attention and the contrastive loss, forward and
    backward equal to eager."""
    torch._dynamo.reset()
    dev = device_for(backend)
    attn = torch.compile(lambda a, b, c, g, t: pyssl.homologous_attention(a, b, c, g, topk=t, backend=backend),
                         fullgraph=True, dynamic=True, backend="aot_eager")
    hcl = torch.compile(lambda z, g: pyssl.homologous_contrastive_loss(z, g, backend=backend),
                        fullgraph=True, dynamic=True, backend="aot_eager")
    for l in (10, 13):
        q, k, v = _qkv(b=1, h=2, l=l, d=4, device=dev, seed=l)
        groups = _groups(1, l, 2, seed=l).to(dev)
        for topk in (None, 3):
            got_in = [t.clone().requires_grad_() for t in (q, k, v)]
            want_in = [t.clone().requires_grad_() for t in (q, k, v)]
            got = attn(*got_in, groups, topk)
            want = pyssl.homologous_attention(*want_in, groups, topk=topk, backend=backend)
            torch.testing.assert_close(got, want)
            for a, b in zip(torch.autograd.grad(got.sum(), got_in), torch.autograd.grad(want.sum(), want_in)):
                torch.testing.assert_close(a, b)
        z = q[0].transpose(0, 1).reshape(l, 8)[None].contiguous()
        za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
        got, want = hcl(za, groups), pyssl.homologous_contrastive_loss(zb, groups, backend=backend)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got, za)[0], torch.autograd.grad(want, zb)[0])


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_contrastive_loss_opcheck_and_compile(backend):
    from pyssl.ops import homologous_contrastive_loss as HCL
    dev = device_for(backend)
    z = torch.randn(2, 9, 5, device=dev)
    groups = _groups(2, 9, 3).to(dev)
    torch.library.opcheck(HCL._rows_op, (z, groups, 0.2, backend))
    rows, lse = HCL._rows_op(z, groups, 0.2, backend)
    torch.library.opcheck(HCL._rows_bwd_op, (z, groups, lse, torch.randn_like(rows), 0.2, backend))
    # a permuted (sequence-first) z: the kernels return a contiguous gradient and the fake must
    # say so (empty_like kept the permuted strides: compiled code read the wrong elements)
    zp = z.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    torch.library.opcheck(HCL._rows_bwd_op, (zp, groups, lse, torch.randn_like(rows), 0.2, backend))
    f = torch.compile(lambda t: pyssl.homologous_contrastive_loss(t, groups, backend=backend), fullgraph=True,
                      backend="aot_eager")
    a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
    got, want = f(a), pyssl.homologous_contrastive_loss(b, groups, backend=backend)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, a)[0], torch.autograd.grad(want, b)[0])


def test_contrastive_loss_by_hand():
    # one sample, tokens 0, 1 in group 0, token 2 in group 1, token 3 ignored
    z = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [5.0, 5.0]]])
    groups = torch.tensor([[0, 0, 1, -1]])
    t = 0.5
    c = torch.tensor([[1.0, 0.0, 2 ** -0.5], [0.0, 1.0, 2 ** -0.5], [2 ** -0.5, 2 ** -0.5, 1.0]]) / t
    l0 = -(c[0, 1] - torch.logsumexp(c[0, [1, 2]], 0))
    l1 = -(c[1, 0] - torch.logsumexp(c[1, [0, 2]], 0))
    rows = pyssl.homologous_contrastive_loss(z, groups, temperature=t, reduction="none")
    torch.testing.assert_close(rows, torch.stack([l0, l1, torch.tensor(0.0), torch.tensor(0.0)])[None])
    torch.testing.assert_close(pyssl.homologous_contrastive_loss(z, groups, temperature=t), (l0 + l1) / 2)


def test_contrastive_loss_bad_input():
    z = torch.randn(2, 5, 3)
    g = torch.zeros(2, 5, dtype=torch.int64)
    with pytest.raises(ValueError, match="temperature"):
        pyssl.homologous_contrastive_loss(z, g, temperature=0.0)
    with pytest.raises(ValueError, match="reduction"):
        pyssl.homologous_contrastive_loss(z, g, reduction="avg")
    with pytest.raises(ValueError, match="groups must have shape"):
        pyssl.homologous_contrastive_loss(z, g[:, :4])
    with pytest.raises(ValueError, match=r"\(B, L, E\)"):
        pyssl.homologous_contrastive_loss(z[0], g)
    with pytest.raises(ValueError, match="integer"):
        pyssl.homologous_contrastive_loss(z, g.to(torch.complex64))
    with pytest.raises(ValueError, match="z must be"):
        pyssl.homologous_contrastive_loss(z.to(torch.int32), g)
    with pytest.raises(ValueError, match="empty"):
        pyssl.homologous_contrastive_loss(z[:, :0], g[:, :0])
    with pytest.raises(ValueError, match="groups must be on z's device"):
        pyssl.homologous_contrastive_loss(z, g.to("meta"))
    import numpy as np
    pyssl.homologous_contrastive_loss(z, g, temperature=np.float32(0.5))   # numpy scalars are numbers


@pytest.mark.parametrize("topk", [None, 3])
def test_double_backward_says_what_is_missing(backend, topk):
    """A backward through the backward (create_graph=True, e.g. a gradient penalty) is not
    implemented, as in FlashAttention and FlexAttention: it raises an error naming the op, not
    torch's "no autograd formula"; the first backward under create_graph is still right."""
    dev = device_for(backend)
    q, k, v = (torch.randn(1, 2, 12, 8, device=dev, requires_grad=True) for _ in range(3))
    groups = _groups(1, 12, 3).to(dev)
    o = pyssl.homologous_attention(q, k, v, groups, topk=topk, backend=backend)
    gq, = torch.autograd.grad(o.square().sum(), q, create_graph=True)
    qr = q.detach().double().requires_grad_()
    ref = reference.homologous_attention(qr, k.detach().double(), v.detach().double(), groups, topk=topk)
    want, = torch.autograd.grad(ref.square().sum(), qr)
    torch.testing.assert_close(gq.detach().double(), want, atol=1e-4, rtol=1e-4)
    with pytest.raises(RuntimeError, match="homologous_attention: second derivatives with respect to q, k and v"):
        gq.sum().backward()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_contrastive_loss_double_backward_says_what_is_missing(backend):
    """The fused backends have no second derivatives (an error naming the op); the torch backend,
    plain autograd under checkpointing, has them."""
    z = torch.randn(2, 10, 8, device=device_for(backend), requires_grad=True)
    groups = _groups(2, 10, 3).to(z.device)
    loss = pyssl.homologous_contrastive_loss(z, groups, backend=backend)
    gz, = torch.autograd.grad(loss, z, create_graph=True)
    with pytest.raises(RuntimeError, match="homologous_contrastive_loss .*second derivatives with respect to z"):
        gz.square().sum().backward()
    zt = z.detach().clone().requires_grad_()
    gt, = torch.autograd.grad(pyssl.homologous_contrastive_loss(zt, groups, backend="torch"), zt, create_graph=True)
    gt.square().sum().backward()
    assert zt.grad is not None and torch.isfinite(zt.grad).all() and zt.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_attention_under_autocast_is_sdpa_policy(backend):
    """Under autocast q, k, v are cast to its dtype first, as F.scaled_dot_product_attention's
    are: the result is the op on the cast inputs, a float32 q/k (a q/k norm runs in float32)
    beside a 16-bit v is accepted, and the gradients come back in the inputs' dtypes. Inside the
    op autocast is off: the torch backend's float32 score products are not cast again (top-k
    outputs moved by 0.43 before)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 37, 16, generator=g) for _ in range(3))
    groups = _groups(2, 37, 3)
    for topk in (None, 5):
        want = pyssl.homologous_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), groups, topk=topk,
                                          backend=backend)
        qa, ka = q.clone().requires_grad_(), k.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = pyssl.homologous_attention(qa, ka, v.bfloat16(), groups, topk=topk, backend=backend)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        dq, dk = torch.autograd.grad(got.float().sum(), (qa, ka))
        assert dq.dtype == dk.dtype == torch.float32
        # float32 inputs with autocast off inside the op body itself: the float32 result
        ref = HA._attn_op(q, k, v, groups, topk or 0, 0.25, backend)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = HA._attn_op(q, k, v, groups, topk or 0, 0.25, backend)[0]
        torch.testing.assert_close(inside, ref, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@pytest.mark.parametrize("scale", [-0.3, 0.0, 0.125])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_mode_any_scale_sign(backend, scale, dtype):
    """scale is any real number: negative (the Triton forward folds a positive scale into its
    exponential's fused multiply-add for 16-bit inputs, and skips the mask on whole tiles of one
    group, and keeps the plain step otherwise), zero (uniform weights over the allowed keys),
    positive; groups long enough for whole tiles and a global token, against the dense float64
    reference, outputs and gradients."""
    dev = device_for(backend)
    g = torch.Generator().manual_seed(5)
    b, h, l, d = 2, 2, 80, 16
    q, k, v = (torch.randn(b, h, l, d, generator=g).to(dev, dtype).requires_grad_() for _ in range(3))
    groups = torch.cat([torch.full((b, 1), -1), torch.arange(l - 1).repeat(b, 1) % 2], 1).to(dev)
    out = pyssl.homologous_attention(q, k, v, groups, scale=scale, backend=backend)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = reference.homologous_attention(qd, kd, vd, groups, scale=scale)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.double(), want, **tol)
    do = torch.randn(out.shape, generator=g).to(dev)
    got = torch.autograd.grad(out, (q, k, v), do.to(dtype))
    exp = torch.autograd.grad(want, (qd, kd, vd), do.double())
    for a, e in zip(got, exp):
        torch.testing.assert_close(a.double(), e, **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("whole_from", [64, 1 << 30])
def test_triton_backward_whole_tiles(monkeypatch, whole_from):
    """The Triton backward's whole-tile path (tiles of one group without a select per score, taken
    from WHOLE_TILES_MIN_L rows on: long sequences) and the one-path form give the reference's
    gradients, here with the threshold lowered to 64 so an 80-token row in two groups of 40 and a
    global token has whole tiles under the interpreter's tile sizes. On a GPU (64-row tiles) the
    row is 1025 tokens in groups of 256, with the forward's unmasked whole-tile step too."""
    from pyssl.kernels import homologous_attention as K
    monkeypatch.setattr(K, "WHOLE_TILES_MIN_L", whole_from)
    taken, rule = [], K._whole_tiles
    monkeypatch.setattr(K, "_whole_tiles", lambda *a, **kw: taken.append(rule(*a, **kw)) or taken[-1])
    dev = device_for("triton")
    g = torch.Generator().manual_seed(6)
    b, h, l, d, size = (2, 2, 80, 16, 40) if dev == "cpu" else (1, 2, 1025, 64, 256)
    q, k, v = (torch.randn(b, h, l, d, generator=g).to(dev, torch.bfloat16).requires_grad_() for _ in range(3))
    groups = torch.cat([torch.full((b, 1), -1), torch.arange(l - 1).repeat(b, 1) // size], 1).to(dev)
    out = pyssl.homologous_attention(q, k, v, groups, backend="triton")
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = reference.homologous_attention(qd, kd, vd, groups)
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2)
    do = torch.randn(out.shape, generator=g).to(dev)
    got = torch.autograd.grad(out, (q, k, v), do.to(torch.bfloat16))
    exp = torch.autograd.grad(want, (qd, kd, vd), do.double())
    for a, e in zip(got, exp):
        torch.testing.assert_close(a.double(), e, atol=2e-2, rtol=2e-2)
    assert taken and all(t == (whole_from == 64) for t in taken)      # the path under test was taken
