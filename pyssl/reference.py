"""Plain dense PyTorch versions of every op: the test oracle.

Short and obvious on purpose: they materialize the full N×C logits. Never use them at scale.
The conventions they pin down (shared with every backend):
- cos = clamp(x̂·ŵ, -1, 1) in value, but gradients pass through the clamp (SPEC §1: dX̂ = G·Ŵ).
- margin_grad="straight_through": the margin changes the logit's value only; ∂logit/∂cos = s.
  margin_grad="exact": ∂/∂cos of s·cos(m1·θ + m2) = s·m1·sin(m1·θ + m2) / sin θ, with sin θ
  clamped below at SIN_EPS so the derivative stays finite at cos = ±1.
"""
from __future__ import annotations

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
