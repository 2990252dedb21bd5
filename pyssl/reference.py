"""Plain dense PyTorch versions of every op: the test oracle.

Short and obvious on purpose: they materialize the full N×C logits. Never use them at scale.
The conventions they pin down (shared with every backend):
- cos = clamp(x̂·ŵ, -1, 1) in value, but gradients pass through the clamp (SPEC §1: dX̂ = G·Ŵ).
- margin_grad="straight_through": the margin changes the logit's value only; ∂logit/∂cos = s.
  margin_grad="exact": ∂/∂cos of s·cos(m1·θ + m2) = s·m1·sin(m1·θ + m2) / sin θ, with sin θ
  clamped below at SIN_EPS so the derivative stays finite at cos = ±1.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SIN_EPS = 1e-6
NORM_EPS = 1e-12


def _cos_matrix(x, weight, classes):
    xh = F.normalize(x, dim=1, eps=NORM_EPS)
    wh = F.normalize(weight, dim=1, eps=NORM_EPS)
    if classes is not None:
        wh = wh[classes]
    cos = xh @ wh.t()
    # clamp the value, keep the identity gradient
    return cos + (cos.clamp(-1.0, 1.0) - cos).detach()


def _margin_logit(cos, scale, m1, m2, m3, margin_grad):
    """s·(cos(m1·θ + m2) − m3) with the chosen derivative w.r.t. cos."""
    c = cos.detach().clamp(-1.0, 1.0)
    theta = torch.acos(c)
    value = scale * (torch.cos(m1 * theta + m2) - m3)
    if margin_grad == "straight_through":
        kappa = torch.ones_like(c)
    else:
        kappa = m1 * torch.sin(m1 * theta + m2) / torch.sin(theta).clamp_min(SIN_EPS)
    return value + scale * kappa * (cos - cos.detach())


def _reduce(rows, reduction):
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows


def mlcd_loss(x, weight, positives, *, scale=64.0, margin=0.3, classes=None,
              margin_grad="straight_through", reduction="mean"):
    """SPEC §1, densely: L_n = log(1 + Σ_i exp(−a_ni)) + log(1 + Σ_j exp(b_nj))."""
    cos = _cos_matrix(x, weight, classes)                       # (N, C')
    n, cp = cos.shape
    cols = torch.arange(cp, device=x.device)
    class_of_col = cols if classes is None else classes
    valid = positives >= 0
    is_pos = (class_of_col[None, None, :] == positives[:, :, None]) & valid[:, :, None]
    pos_mask = is_pos.any(1)                                    # (N, C')
    neg_logits = (scale * cos).masked_fill(pos_mask, float("-inf"))
    zeros = torch.zeros(n, 1, dtype=cos.dtype, device=cos.device)
    neg_term = torch.logsumexp(torch.cat([zeros, neg_logits], 1), 1)
    pos_cos = torch.where(is_pos, cos[:, None, :], torch.zeros_like(cos[:, None, :])).sum(2)  # (N, l)
    a = _margin_logit(pos_cos, scale, 1.0, margin, 0.0, margin_grad)
    neg_a = (-a).masked_fill(~valid, float("-inf"))
    pos_term = torch.logsumexp(torch.cat([zeros, neg_a], 1), 1)
    return _reduce(pos_term + neg_term, reduction)


def margin_softmax_loss(x, weight, labels, *, scale=64.0, m1=1.0, m2=0.5, m3=0.0, classes=None,
                        margin_grad="straight_through", reduction="mean"):
    """Cross-entropy over S with target logit s·(cos(m1·θ + m2) − m3), others s·cos θ."""
    cos = _cos_matrix(x, weight, classes)
    class_of_col = torch.arange(cos.shape[1], device=x.device) if classes is None else classes
    target = class_of_col[None, :] == labels[:, None]                     # (N, C')
    t = _margin_logit(cos, scale, m1, m2, m3, margin_grad)
    logits = torch.where(target, t, scale * cos)
    rows = torch.logsumexp(logits, 1) - (logits * target).sum(1)
    return _reduce(rows, reduction)


def gaussian_noise(x, num_samples, sigma, *, seed, sample_offset=0, image_ids=None, mean=None,
                   std=None):
    """SPEC §3 the way users write it — repeat, add the noise, normalize — with the noise of the
    counter scheme (pyssl.ops.noise.philox_normals) in place of randn. float32, contiguous."""
    from pyssl.ops.noise import philox_normals
    b = x.shape[0]
    ids = torch.arange(b) if image_ids is None else torch.as_tensor(image_ids)
    ids = ids.to(x.device, torch.int64).repeat_interleave(num_samples)
    samples = (torch.arange(num_samples, device=x.device) + sample_offset).repeat(b)
    xs = x.float().repeat_interleave(num_samples, 0)
    z = philox_normals(seed, ids, samples, x[0].numel()).view(xs.shape)
    y = xs + sigma * z
    if mean is not None or std is not None:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        m = torch.as_tensor(0.0 if mean is None else mean, dtype=torch.float32, device=y.device).view(shape)
        s = torch.as_tensor(1.0 if std is None else std, dtype=torch.float32, device=y.device).view(shape)
        y = (y - m) / s
    return y


def smooth_certify(counts0, counts, alpha, sigma, tv_bound=0.0):
    """Cohen et al.'s CERTIFY on given counts (numpy arrays (K,)): (class or -1, radius), with
    the generator's total-variation bound taken off the Clopper–Pearson bound."""
    from scipy.stats import beta, norm
    c = int(counts0.argmax())
    n_a, n = int(counts[c]), int(counts.sum())
    p_lower = (0.0 if n_a == 0 else float(beta.ppf(alpha, n_a, n - n_a + 1))) - tv_bound
    if tv_bound > 0:
        # the subtraction may round back up to the Clopper–Pearson value (tv_bound below half its
        # ulp): the true difference is below it, so one ulp down (as pyssl.smoothing.pa_lower)
        p_lower = math.nextafter(p_lower, -math.inf)
    if p_lower < 0.5:
        return -1, 0.0
    return c, sigma * float(norm.ppf(p_lower))


def smooth_predict(counts, alpha):
    """Cohen et al.'s PREDICT on given counts (numpy array (K,)): class or -1."""
    from scipy.stats import binomtest
    order = sorted(range(len(counts)), key=lambda k: (-int(counts[k]), k))
    n_a, n_b = int(counts[order[0]]), int(counts[order[1]])
    return -1 if binomtest(n_a, n_a + n_b, 0.5).pvalue > alpha else order[0]


def homologous_kept(q, k, groups=None, topk=None, scale=None):
    """SPEC §2's kept set as a bool (B, H, L, L) mask: allowed by groups, then (topk) the K
    highest scores of the allowed keys per query, ties to the lower key index."""
    b, h, l, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if groups is None:
        allowed = torch.ones(b, 1, l, l, dtype=torch.bool, device=q.device)
    else:
        g = groups.to(q.device)
        allowed = ((g[:, :, None] == g[:, None, :]) | (g[:, :, None] < 0) | (g[:, None, :] < 0))[:, None]
    allowed = allowed.expand(b, h, l, l)
    if topk is None:
        return allowed
    # scale · (q · k), the product first, as the kernels: (scale · q) · k rounds two equal dot
    # products apart by an ulp wherever scale is no power of two, and the tie rule would follow
    # the rounding instead of the key index
    s = (scale * (q.double() @ k.double().transpose(-1, -2))).masked_fill(~allowed, float("-inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    # the allowed keys first (a disallowed key, at -inf, must not take the place of an allowed
    # key whose score is -inf), then score, then key index: stable sorts compose
    first = torch.sort(allowed.gather(-1, order).to(torch.int8), dim=-1, descending=True, stable=True).indices
    order = order.gather(-1, first)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(l, device=q.device).expand_as(order))
    return allowed & (rank < min(topk, l))


def homologous_attention(q, k, v, groups=None, *, topk=None, scale=None):
    """SPEC §2, densely: masked softmax over the kept keys of every query, then P·V."""
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    kept = homologous_kept(q.detach(), k.detach(), groups, topk, scale)
    s = (scale * (q @ k.transpose(-1, -2))).masked_fill(~kept, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.where(kept.any(-1, keepdim=True), p, torch.zeros_like(p))
    return p @ v


def mix_groups_valid(groups, g):
    """True when every row of groups (B', Np) is an exact partition into g near-equal parts."""
    counts = torch.stack([(groups == i).sum(1) for i in range(g)], 1)
    np_ = groups.shape[1]
    return bool(((counts == np_ // g) | (counts == -(-np_ // g))).all() and (counts.sum(1) == np_).all())


def homologous_contrastive_loss(z, groups, *, temperature=0.2, reduction="mean"):
    """SPEC §2, densely: per token, −mean over its group's other tokens of the log-softmax of the
    cosine/temperature over all other valid tokens of the sample."""
    b, l, _ = z.shape
    zn = F.normalize(z.double() if z.dtype == torch.float64 else z.float(), dim=-1, eps=NORM_EPS)
    s = zn @ zn.transpose(1, 2) / temperature                       # (B, L, L)
    valid = groups >= 0
    eye = torch.eye(l, dtype=torch.bool, device=z.device)[None]
    other = valid[:, :, None] & valid[:, None, :] & ~eye              # A(i)
    pos = other & (groups[:, :, None] == groups[:, None, :])          # P(i)
    lse = torch.logsumexp(s.masked_fill(~other, float("-inf")), dim=-1)
    lse = torch.where(other.any(-1), lse, torch.zeros_like(lse))    # a lone token: no term
    npos = pos.sum(-1)
    sum_pos = (s * pos).sum(-1)
    has = npos > 0
    rows = torch.where(has, -(sum_pos / npos.clamp_min(1) - lse), torch.zeros_like(lse))
    if reduction == "none":
        return rows.to(z.dtype)
    if reduction == "sum":
        return rows.sum().to(z.dtype)
    return (rows.sum() / has.sum().clamp_min(1)).to(z.dtype)
