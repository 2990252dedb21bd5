"""Patch mixing of the Mixed Autoencoder: G = round(1/ratio) images share one sample.

    mix_patches(patches, ratio=0.25, *, generator=None) -> (mixed, groups, sources)

patches (B, Np, P), B divisible by G. The consecutive images m·G … m·G + G − 1 form mixed sample
m: position p of mixed[m] is patch p of source groups[m, p] (an index into sources[m]). The
assignment is an exact partition: Np mod G sources, chosen uniformly at random, get ceil(Np/G)
positions and the others floor(Np/G); given those counts every arrangement of positions is
equally likely. The randomness comes from `generator`: a CPU torch.Generator (or the default
CPU one) draws the (B/G)·(Np + G) uniforms on the host, so a seeded generator reproduces the
mix on any device, and GPU patches get the labels through pinned memory without a host sync
(a plain copy from pageable memory would wait for the stream every step); a generator on the
patches' GPU draws there. mixed is a gather of patches: differentiable.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from pyssl import _checks


def mix_patches(patches: Tensor, ratio: float = 0.25, *, generator: Optional[torch.Generator] = None
                ) -> Tuple[Tensor, Tensor, Tensor]:
    """Mix G = round(1/ratio) consecutive images into one sample: (mixed (B/G, Np, P), groups
    (B/G, Np) int64 in [0, G), the source of each position; sources (B/G, G) int64 batch
    indices). An exact partition: every source gets floor or ceil of Np/G positions, chosen
    uniformly at random (reproducible with a generator); mixed[m, p] = patches[sources[m,
    groups[m, p]], p]. patches (B, Np, P) with B divisible by G. More in the module docstring."""
    fn = "mix_patches"
    _checks.tensor(fn, "patches", patches)
    if patches.dim() != 3:
        raise ValueError(f"{fn}: patches must be (B, Np, P), got shape {tuple(patches.shape)}")
    if patches.numel() == 0:
        raise ValueError(f"{fn}: patches is empty (shape {tuple(patches.shape)})")
    ratio = _checks.real(fn, "ratio", ratio)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"{fn}: ratio must be in (0, 1], got {ratio!r}")
    b, np_, _ = patches.shape
    if 1.0 / ratio > b + 0.5:
        raise ValueError(f"{fn}: ratio={ratio} mixes G = round(1/ratio) images per sample, more than the "
                         f"batch of {b}")
    g = int(round(1.0 / ratio))
    if b % g != 0:
        raise ValueError(f"{fn}: the batch size B = {b} must be divisible by G = round(1/ratio) = {g}")
    _checks.generator(fn, "generator", generator)
    dev = patches.device
    draw = _checks.draw_device(fn, generator, dev, "patches")
    m = b // g
    # which sources get the extra position: a random relabelling of (position mod G)
    relabel = torch.rand(m, g, generator=generator, device=draw).argsort(dim=1)
    base = relabel.gather(1, (torch.arange(np_, device=draw) % g).expand(m, np_))
    # a uniformly random arrangement of those labels over the positions
    perm = torch.rand(m, np_, generator=generator, device=draw).argsort(dim=1)
    groups = base.gather(1, perm)
    groups = _checks.host_to(groups, dev)
    sources = torch.arange(m, device=dev)[:, None] * g + torch.arange(g, device=dev)[None, :]
    src_rows = sources.gather(1, groups)                              # (m, Np) batch index
    pos = torch.arange(np_, device=patches.device).expand(m, np_)
    mixed = patches[src_rows, pos]
    return mixed, groups, sources
