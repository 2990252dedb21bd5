"""The modules of pyssl.nn: each equals its functional op on the same parameters."""
import pytest
import torch
import torch.nn.functional as F

import pyssl
from pyssl import reference
from conftest import device_for

F32 = dict(atol=2e-5, rtol=1e-5)


def _groups(b, l, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(l - 1, generator=g) % n for _ in range(b)])
    return torch.cat([torch.full((b, 1), -1), ids], 1)     # a global token first


@pytest.mark.parametrize("topk", [None, 4])
def test_homologous_attention_module_is_qkv_op_proj(backend, topk):
    dev = device_for(backend)
    torch.manual_seed(0)
    m = pyssl.nn.HomologousAttention(32, 4, topk=topk, backend=backend).to(dev)
    x = torch.randn(2, 13, 32, device=dev, requires_grad=True)
    groups = _groups(2, 13, 3).to(dev)
    y = m(x, groups)
    q, k, v = m.qkv(x).view(2, 13, 3, 4, 8).permute(2, 0, 3, 1, 4)
    ref = m.proj(reference.homologous_attention(q, k, v, groups, topk=topk).transpose(1, 2).reshape(2, 13, 32))
    torch.testing.assert_close(y, ref, **F32)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, m.qkv.weight, m.proj.weight), dy)
    want = torch.autograd.grad(ref, (x, m.qkv.weight, m.proj.weight), dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)


def test_homologous_attention_module_without_groups_is_vit_attention():
    """groups=None is the plain attention of a ViT block, and the parameters are timm's
    Attention's (qkv, proj): a state dict with those names loads as it is."""
    torch.manual_seed(1)
    state = {"qkv.weight": torch.randn(48, 16) * 0.2, "qkv.bias": torch.randn(48) * 0.1,
             "proj.weight": torch.randn(16, 16) * 0.2, "proj.bias": torch.randn(16) * 0.1}
    m = pyssl.nn.HomologousAttention(16, 2)
    m.load_state_dict(state)
    x = torch.randn(3, 7, 16)
    q, k, v = F.linear(x, state["qkv.weight"], state["qkv.bias"]).view(3, 7, 3, 2, 8).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(3, 7, 16)
    torch.testing.assert_close(m(x), F.linear(o, state["proj.weight"], state["proj.bias"]), **F32)


class _TimmStyleBlock(torch.nn.Module):
    """What timm's Block (1.0.26 and later) does with its attention: attn(norm1(x), attn_mask=...,
    is_causal=...) with the mask VisionTransformer.forward(x, attn_mask=...) was given."""

    def __init__(self, attn, dim):
        super().__init__()
        self.norm1, self.attn = torch.nn.LayerNorm(dim), attn

    def forward(self, x, attn_mask=None, is_causal=False):
        return x + self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)


def test_homologous_attention_module_in_a_timm_style_block():
    """Swapped into a timm-style block: the block's own call (attn_mask=None, is_causal=False)
    is plain attention, and the group ids passed as the block's attn_mask (an integer (B, L)
    tensor, as vit(images, attn_mask=groups) hands it down) give homologous attention."""
    torch.manual_seed(3)
    attn = pyssl.nn.HomologousAttention(32, 4, backend="torch")
    block = _TimmStyleBlock(attn, 32)
    x = torch.randn(2, 9, 32)
    groups = _groups(2, 9, 3)
    torch.testing.assert_close(block(x), x + attn(block.norm1(x)), **F32)
    torch.testing.assert_close(block(x, attn_mask=groups), x + attn(block.norm1(x), groups), **F32)
    assert not torch.allclose(block(x, attn_mask=groups), block(x))


def test_homologous_attention_module_bad_input():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        pyssl.nn.HomologousAttention(30, 4)
    with pytest.raises(ValueError, match="topk"):
        pyssl.nn.HomologousAttention(32, 4, topk=0)
    m = pyssl.nn.HomologousAttention(32, 4)
    with pytest.raises(ValueError, match="attn_mask must be None or the .* integer group ids"):
        m(torch.randn(2, 5, 32), attn_mask=torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask must be None or the .* integer group ids"):
        m(torch.randn(2, 5, 32), attn_mask=torch.zeros(2, 1, 5, 5))
    with pytest.raises(ValueError, match="not both"):
        m(torch.randn(2, 5, 32), torch.zeros(2, 5, dtype=torch.int64), attn_mask=torch.zeros(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="is_causal must be False"):
        m(torch.randn(2, 5, 32), is_causal=True)
    assert m(torch.randn(2, 5, 32), attn_mask=None, is_causal=False).shape == (2, 5, 32)   # timm's Block
    with pytest.raises(ValueError, match="x must be a float tensor"):
        m(torch.zeros(2, 5, 32, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"x must be \(B, L, 32\)"):
        m(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="groups"):
        m(torch.randn(2, 5, 32), torch.zeros(2, 4, dtype=torch.int64))


def test_margin_softmax_module_matches_the_op(backend):
    dev = device_for(backend)
    torch.manual_seed(2)
    head = pyssl.nn.MarginSoftmaxLoss(60, 16, m2=0.4, m3=0.1, sample_ratio=0.25, backend=backend,
                                      generator=torch.Generator(dev).manual_seed(3)).to(dev)
    x = torch.randn(9, 16, device=dev, requires_grad=True)
    labels = torch.randint(0, 60, (9,), device=dev)
    # training: the labels plus a quarter of the other classes, as sample_classes draws them
    loss = head(x, labels)
    classes = pyssl.sample_classes(labels[:, None], 60, 0.25, generator=torch.Generator(dev).manual_seed(3))
    assert classes.numel() < 60 and torch.isin(labels, classes).all()
    want = pyssl.margin_softmax_loss(x, head.weight, labels, m2=0.4, m3=0.1, classes=classes)
    torch.testing.assert_close(loss, want, **F32)
    gw, = torch.autograd.grad(loss, head.weight)
    outside = torch.ones(60, dtype=torch.bool, device=dev)
    outside[classes] = False
    assert (gw[outside] == 0).all() and (gw[classes].abs().sum(1) > 0).all()
    # eval: every class
    head.eval()
    torch.testing.assert_close(head(x, labels), pyssl.margin_softmax_loss(x, head.weight, labels, m2=0.4, m3=0.1),
                               **F32)


def test_margin_softmax_module_mixed_precision():
    """bf16 features with float32 centers: the op rounds the candidate centers (only the sampled
    rows in training) and their gradient comes back in float32, close to the float32 computation."""
    torch.manual_seed(4)
    head = pyssl.nn.MarginSoftmaxLoss(40, 16, sample_ratio=0.5, generator=torch.Generator().manual_seed(5))
    x = torch.randn(8, 16)
    labels = torch.randint(0, 40, (8,))
    loss = head(x.bfloat16(), labels)
    g16, = torch.autograd.grad(loss, head.weight)
    head.generator.manual_seed(5)
    g32, = torch.autograd.grad(head(x, labels), head.weight)
    assert g16.dtype == torch.float32
    # bf16 rounds the cosines to ~2^-9, i.e. the logits at scale 64 to ~0.1: compare in norm
    assert (g16 - g32).norm() / g32.norm() < 2e-2
    assert (g16 != 0).any(1).sum() == (g32 != 0).any(1).sum()       # the same sampled rows


def test_margin_softmax_module_bad_input():
    with pytest.raises(ValueError, match="sample_ratio"):
        pyssl.nn.MarginSoftmaxLoss(10, 4, sample_ratio=1.5)
    with pytest.raises(ValueError, match="m2"):
        pyssl.nn.MarginSoftmaxLoss(10, 4, m2=float("nan"))
    with pytest.raises(ValueError, match="margin_grad"):
        pyssl.nn.MarginSoftmaxLoss(10, 4, margin_grad="none")
    for ratio in (1.0, 0.5):    # with sampling the labels go through sample_classes first
        head = pyssl.nn.MarginSoftmaxLoss(10, 4, sample_ratio=ratio)
        with pytest.raises(ValueError, match=r"MarginSoftmaxLoss: labels must be \(N,\) with N=3"):
            head(torch.randn(3, 4), torch.zeros(3, 1, dtype=torch.int64))
        with pytest.raises(ValueError, match="MarginSoftmaxLoss: labels must be int64"):
            head(torch.randn(3, 4), torch.zeros(3, dtype=torch.int32))
        who = "margin_softmax_loss" if ratio == 1.0 else "MarginSoftmaxLoss"    # (the op checks it then)
        with pytest.raises(ValueError, match=who + r": labels.*class id 10, out of range \[0, 10\)"):
            head(torch.randn(3, 4), torch.tensor([0, 1, 10]))


def test_contrastive_module_is_the_op():
    torch.manual_seed(6)
    z = torch.randn(2, 11, 8)
    groups = _groups(2, 11, 3)
    m = pyssl.nn.HomologousContrastiveLoss(temperature=0.3)
    torch.testing.assert_close(m(z, groups), pyssl.homologous_contrastive_loss(z, groups, temperature=0.3))
    rows = pyssl.nn.HomologousContrastiveLoss(temperature=0.3, reduction="none")(z, groups)
    torch.testing.assert_close(rows, pyssl.homologous_contrastive_loss(z, groups, temperature=0.3, reduction="none"))
    assert rows.shape == (2, 11)
    with pytest.raises(ValueError, match="temperature"):
        pyssl.nn.HomologousContrastiveLoss(temperature=0.0)


def test_modules_check_backend_and_reduction_when_built():
    # at construction, not at the first forward (which may be hours into a job)
    for make, name in ((lambda b: pyssl.nn.MLCDLoss(10, 4, backend=b), "MLCDLoss"),
                       (lambda b: pyssl.nn.MarginSoftmaxLoss(10, 4, backend=b), "MarginSoftmaxLoss"),
                       (lambda b: pyssl.nn.HomologousAttention(8, 2, backend=b), "HomologousAttention"),
                       (lambda b: pyssl.nn.HomologousContrastiveLoss(backend=b), "HomologousContrastiveLoss")):
        with pytest.raises(ValueError, match=name + ": backend must be one of"):
            make("nope")
        make("torch")
    with pytest.raises(ValueError, match="HomologousContrastiveLoss: reduction must be"):
        pyssl.nn.HomologousContrastiveLoss(reduction="avg")


def test_modules_compile_fullgraph():
    """The modules trace into one graph (the ops are torch.library custom ops): outputs and
    gradients equal eager mode."""
    torch.manual_seed(7)
    attn = pyssl.nn.HomologousAttention(16, 2, backend="cpu")
    head = pyssl.nn.MarginSoftmaxLoss(30, 16, backend="cpu").eval()
    x = torch.randn(2, 9, 16, requires_grad=True)
    groups = _groups(2, 9, 2)
    labels = torch.randint(0, 30, (18,))

    def model(x):
        return head(attn(x, groups).reshape(18, 16), labels)
    eager = model(x)
    g_eager, = torch.autograd.grad(eager, x)
    compiled = torch.compile(model, fullgraph=True)(x)
    g_comp, = torch.autograd.grad(compiled, x)
    torch.testing.assert_close(compiled, eager, **F32)
    torch.testing.assert_close(g_comp, g_eager, atol=5e-5, rtol=1e-4)
