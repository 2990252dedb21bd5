"""Homologous contrastive loss of the Mixed Autoencoder.

    homologous_contrastive_loss(z, groups, *, temperature=0.2, reduction="mean", backend="auto")

z (B, L, E), groups (B, L) integer. Within each sample, over the tokens with group id >= 0 (the
others take no part at all), s_ij = cos(z_i, z_j)/temperature, P(i) = the other tokens of i's
group, A(i) = all other tokens:
    ℓ_i = −(1/|P(i)|) Σ_{p∈P(i)} [ s_ip − log Σ_{a∈A(i)} exp(s_ia) ]
"mean" averages over the tokens with a non-empty P(i), "sum" sums them, "none" returns (B, L)
with 0 for the other tokens.

Backend: torch — samples in chunks (R·L·L scores per chunk, R·L² ≤ 2^24), forward and backward
by autograd through the chunk's ops (the row log-sum-exp over the sample and the masked sum over
the row's group).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from pyssl import _dispatch
from pyssl.reference import NORM_EPS

_REDUCTIONS = ("none", "mean", "sum")
CHUNK_ELEMS = 1 << 24


def _check(fn, z, groups, temperature, reduction):
    if not isinstance(z, Tensor):
        raise TypeError(f"{fn}: z must be a torch.Tensor, got {type(z).__name__}")
    if z.dim() != 3:
        raise ValueError(f"{fn}: z must be (B, L, E), got shape {tuple(z.shape)}")
    if z.numel() == 0:
        raise ValueError(f"{fn}: z is empty (shape {tuple(z.shape)})")
    if not z.is_floating_point():
        raise ValueError(f"{fn}: z must be a float tensor, got {z.dtype}")
    if not isinstance(groups, Tensor):
        raise TypeError(f"{fn}: groups must be a torch.Tensor, got {type(groups).__name__}")
    if groups.dtype.is_floating_point or groups.dtype == torch.bool:
        raise ValueError(f"{fn}: groups must be an integer tensor, got {groups.dtype}")
    if groups.shape != z.shape[:2]:
        raise ValueError(f"{fn}: groups must have shape (B, L) = {tuple(z.shape[:2])}, got {tuple(groups.shape)}")
    if groups.device != z.device:
        raise ValueError(f"{fn}: groups must be on z's device ({z.device}), got {groups.device}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"{fn}: temperature must be a finite number > 0, got {temperature!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _rows(z: Tensor, groups: Tensor, temperature: float):
    """Per-token losses (R, L) float32/float64 and the has-positive mask of a chunk of samples."""
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    l = z.shape[1]
    zn = F.normalize(z.to(acc), dim=-1, eps=NORM_EPS)
    s = (zn @ zn.transpose(1, 2)) * (1.0 / temperature)
    valid = groups >= 0
    eye = torch.eye(l, dtype=torch.bool, device=z.device)[None]
    other = valid[:, :, None] & valid[:, None, :] & ~eye
    pos = other & (groups[:, :, None] == groups[:, None, :])
    lse = torch.logsumexp(s.masked_fill(~other, float("-inf")), dim=-1)
    lse = torch.where(other.any(-1), lse, torch.zeros_like(lse))
    npos = pos.sum(-1)
    has = npos > 0
    mean_pos = s.masked_fill(~pos, 0.0).sum(-1) / npos.clamp_min(1)
    return torch.where(has, lse - mean_pos, torch.zeros_like(lse)), has


def homologous_contrastive_loss(z: Tensor, groups: Tensor, *, temperature: float = 0.2,
                                reduction: str = "mean", backend: str = "auto") -> Tensor:
    fn = "homologous_contrastive_loss"
    _check(fn, z, groups, temperature, reduction)
    _dispatch.choose(fn, backend, z.device, {"cpu": ("torch",), "cuda": ("torch",)},
                     {"torch": lambda: []})
    groups = groups.to(torch.int64)
    b, l, _ = z.shape
    per = max(1, CHUNK_ELEMS // max(1, l * l))
    rows, has = [], []
    for i0 in range(0, b, per):
        r, h = _rows(z[i0:i0 + per], groups[i0:i0 + per], float(temperature))
        rows.append(r)
        has.append(h)
    rows = torch.cat(rows) if len(rows) > 1 else rows[0]
    has = torch.cat(has) if len(has) > 1 else has[0]
    if reduction == "none":
        return rows.to(z.dtype)
    total = rows.sum()
    if reduction == "sum":
        return total.to(z.dtype)
    return (total / has.sum().clamp_min(1)).to(z.dtype)
