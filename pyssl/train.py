"""Reference trainers: short end-to-end training runs that validate the ops on real images.

Each trainer is the method's recipe at the smallest scale that still tests something, written
plainly on the public API, and returns what it measured. None of them is a model zoo: they show
the ops wired together the way a training script wires them, and they fail loudly (a test
asserts their numbers) when an op trains wrong.

    data = pyssl.train.digits()                     # scikit-learn's 8×8 digits, a seeded split
    pyssl.train.mlcd(data)      # k-means labels → MLCD loss → kNN probe with the true labels
    pyssl.train.mixedae(data)   # patch mixing → homologous attention + contrastive loss → probe
    pyssl.train.smooth(data)    # Gaussian-noise training → Smooth.certify → certified accuracy

or from the shell: `pyssl train mlcd|mixedae|smooth [--data digits|FILE.npz] [--device cuda]`.

MLCD (An et al. 2024): the "pre-trained features" are the images' own pixels (centered,
L2-normalized), clustered by pyssl.cluster.kmeans into more centers than there are classes;
each image's l nearest centers (topk_assign) are its positives; a small CNN is trained with
pyssl.nn.MLCDLoss on them (negative classes sampled), never seeing a label. Evaluation: kNN
accuracy (cosine, k nearest training embeddings vote with the true labels) of the trained
encoder, of the same encoder at initialization and of the raw pixels.

MixedAE (Chen et al. 2023): G = 1/ratio images are mixed patch-wise (pyssl.mix_patches); a
small ViT encodes the mixed sample with pyssl.nn.HomologousAttention (each patch sees only its
source image's patches); a decoder un-mixes (per source image: its encoded patches, a mask
token elsewhere) and reconstructs the patches the encoder did not see, as MAE does; the
homologous contrastive loss (pyssl.homologous_contrastive_loss) pulls each image's tokens
together. Evaluation: reconstruction error of the unseen patches on test images against the
per-position mean patch of the training set, and the kNN probe of mean-pooled encoder tokens of
whole (unmixed) images, trained against initialization.

Randomized smoothing (Cohen et al. 2019): a CNN trained on noisy normalized copies from
pyssl.gaussian_noise (the counter keyed by image id and epoch, so every epoch draws fresh noise
without a generator state), then pyssl.Smooth.certify on the test images and
pyssl.certified_accuracy at a few radii. Training and certification use different seeds.

Data: images float in [0, 1], (N, C, H, W), and int64 labels (the labels are read only for
evaluation, except by the smoothing classifier, which is supervised). digits() needs
scikit-learn (it ships the data); load_npz() reads your own arrays.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyssl import _checks

__all__ = ["Images", "digits", "load_npz", "mlcd", "mixedae", "smooth", "knn_accuracy"]


class Images(NamedTuple):
    """A labelled train/test split: images float32 (N, C, H, W) in [0, 1], labels int64."""
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor

    @property
    def num_classes(self) -> int:
        return int(torch.cat([self.train_y, self.test_y]).max()) + 1


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int, fn: str) -> Images:
    test_fraction = _checks.real(fn, "test_fraction", test_fraction)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"{fn}: test_fraction must be in (0, 1), got {test_fraction!r}")
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    if not 0 < n_test < len(x):
        raise ValueError(f"{fn}: test_fraction {test_fraction!r} of {len(x)} images leaves an empty split")
    te, tr = order[:n_test], order[n_test:]
    t = lambda a, dt: torch.from_numpy(np.ascontiguousarray(a)).to(dt)   # noqa: E731
    return Images(t(x[tr], torch.float32), t(y[tr], torch.int64), t(x[te], torch.float32), t(y[te], torch.int64))


def digits(test_fraction: float = 0.25, seed: int = 0) -> Images:
    """scikit-learn's handwritten digits (1797 images, 1×8×8, 10 classes; real scans of 43
    writers, shipped inside scikit-learn), scaled to [0, 1], split at random by seed."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:   # pragma: no cover - scikit-learn is a dev dependency
        raise ImportError("pyssl.train.digits needs scikit-learn (pip install scikit-learn)") from e
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    return _split(x, d.target.astype(np.int64), test_fraction, seed, "digits")


def load_npz(path: str, test_fraction: float = 0.25, seed: int = 0) -> Images:
    """Images from a .npz file: `images` (N, C, H, W) or (N, H, W), float in [0, 1] or uint8,
    and `labels` (N,); optional `test_images`, `test_labels` (else a seeded split)."""
    fn = "load_npz"
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{fn}: cannot read {path!r} as a .npz file ({e})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"{fn}: {path!r} is a single array, not a .npz archive of images and labels")
    with z:
        return _from_npz(fn, path, z, test_fraction, seed)


def _from_npz(fn: str, path: str, z, test_fraction: float, seed: int) -> Images:

    def images(key):
        a = z[key]
        if a.ndim == 3:
            a = a[:, None]
        if a.ndim != 4 or a.shape[0] == 0:
            raise ValueError(f"{fn}: {key} must be (N, C, H, W) or (N, H, W), got shape {a.shape}")
        if a.dtype == np.uint8:
            return a.astype(np.float32) / 255.0
        if a.dtype.kind != "f":
            raise ValueError(f"{fn}: {key} must be float in [0, 1] or uint8, got {a.dtype}")
        a = a.astype(np.float32)
        if not (np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0):
            raise ValueError(f"{fn}: {key} must hold values in [0, 1]")
        return a

    def labels(key, n):
        a = z[key]
        if a.shape != (n,) or a.dtype.kind not in "iu" or a.min() < 0:
            raise ValueError(f"{fn}: {key} must be ({n},) non-negative integers, got shape {a.shape}, "
                             f"dtype {a.dtype}")
        return a.astype(np.int64)

    for key in ("images", "labels"):
        if key not in z:
            raise ValueError(f"{fn}: {path!r} has no array {key!r} (found {sorted(z.files)})")
    x = images("images")
    y = labels("labels", len(x))
    if "test_images" in z:
        if "test_labels" not in z:
            raise ValueError(f"{fn}: {path!r} has test_images but no test_labels")
        tx = images("test_images")
        if tx.shape[1:] != x.shape[1:]:
            raise ValueError(f"{fn}: test_images are {tx.shape[1:]}, images {x.shape[1:]}")
        ty = labels("test_labels", len(tx))
        t = torch.from_numpy
        return Images(t(x), t(y), t(tx), t(ty))
    return _split(x, y, test_fraction, seed, fn)


# ------------------------------------------------------------------------------------------------
# shared pieces
# ------------------------------------------------------------------------------------------------

def _device(device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: CUDA is not available")
    return dev


def _bar(total: int, desc: str, progress: Optional[bool]):
    from tqdm.auto import tqdm

    from pyssl.cluster import _progress     # None: a bar when stderr is a terminal
    return tqdm(total=total, desc=desc, disable=not _progress(progress), leave=False)


def _cnn(channels: int, out_dim: int) -> nn.Module:
    """A small CNN for small images: two 3×3 conv stages, pooled to 4×4, two linear layers."""
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        nn.Linear(64 * 16, 256), nn.ReLU(),
        nn.Linear(256, out_dim))


@torch.no_grad()
def _embed(model, x: Tensor, device, batch: int = 512, **kw) -> Tensor:
    was = model.training
    model.eval()
    out = torch.cat([model(x[i:i + batch].to(device), **kw).float().cpu() for i in range(0, len(x), batch)])
    model.train(was)
    return out


def knn_accuracy(train_emb: Tensor, train_y: Tensor, test_emb: Tensor, test_y: Tensor, k: int = 10) -> float:
    """Accuracy of a k-nearest-neighbour vote (cosine similarity) of test embeddings among the
    training embeddings with their labels: the usual probe of a self-supervised feature."""
    fn = "knn_accuracy"
    k = _checks.integer(fn, "k", k, lo=1)
    for name, e, y in (("train", train_emb, train_y), ("test", test_emb, test_y)):
        _checks.tensor(fn, f"{name}_emb", e)
        _checks.tensor(fn, f"{name}_y", y)
        if e.dim() != 2 or len(e) == 0:
            raise ValueError(f"{fn}: {name}_emb must be a non-empty (N, D) tensor, got shape {tuple(e.shape)}")
        if y.shape != (len(e),) or y.dtype != torch.int64 or bool((y < 0).any()):
            raise ValueError(f"{fn}: {name}_y must be ({len(e)},) non-negative int64 labels, got shape "
                             f"{tuple(y.shape)}, {y.dtype}")
    if train_emb.shape[1] != test_emb.shape[1]:
        raise ValueError(f"{fn}: test_emb has D={test_emb.shape[1]}, train_emb D={train_emb.shape[1]}")
    a = F.normalize(train_emb.float(), dim=1)
    b = F.normalize(test_emb.float(), dim=1)
    k = min(k, len(a))
    nbr = (b @ a.t()).topk(k, dim=1).indices
    votes = F.one_hot(train_y[nbr], int(max(train_y.max(), test_y.max())) + 1).sum(1)
    return float((votes.argmax(1) == test_y).float().mean())


def _step(opt, loss: Tensor) -> Tensor:
    """One optimizer step on loss; the loss detached (summed on the device, read once an epoch)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def _batches(n: int, batch_size: int, g: torch.Generator, drop_last: bool = False):
    order = torch.randperm(n, generator=g)
    stop = n - (n % batch_size) if drop_last else n
    for i in range(0, stop, batch_size):
        yield order[i:i + batch_size]


def _check_data(fn: str, data) -> Images:
    if not isinstance(data, Images):
        raise TypeError(f"{fn}: data must be a pyssl.train.Images (digits(), load_npz()), got "
                        f"{type(data).__name__}")
    x, y, tx, ty = data
    if x.dim() != 4 or len(x) == 0 or len(tx) == 0 or tx.shape[1:] != x.shape[1:]:
        raise ValueError(f"{fn}: data needs non-empty train and test images of one (C, H, W) shape, got "
                         f"{tuple(x.shape)} and {tuple(tx.shape)}")
    if not (x.is_floating_point() and tx.is_floating_point()):
        raise ValueError(f"{fn}: data's images must be float in [0, 1], got {x.dtype} and {tx.dtype}")
    if y.shape != (len(x),) or ty.shape != (len(tx),) or y.dtype != torch.int64 or ty.dtype != torch.int64:
        raise ValueError(f"{fn}: data's labels must be int64, one per image: got {tuple(y.shape)} for "
                         f"{len(x)} train images, {tuple(ty.shape)} for {len(tx)} test images")
    return data


# ------------------------------------------------------------------------------------------------
# MLCD
# ------------------------------------------------------------------------------------------------

def mlcd(data: Images, *, num_clusters: int = 32, l: int = 3, dim: int = 64, epochs: int = 30,
         batch_size: int = 128, lr: float = 2e-3, scale: float = 32.0, margin: float = 0.3,
         sample_ratio: float = 0.5, optimizer: str = "adamw", process_group=None, seed: int = 0, device="cpu",
         backend: str = "auto", progress: Optional[bool] = None) -> Dict[str, object]:
    """MLCD on data: pixel features → kmeans(num_clusters) → top-l positives → CNN + MLCDLoss →
    kNN probe. Returns the per-epoch mean loss; how well the pseudo-labels were learned: on the
    test images (labelled the same way, never trained on), the fraction whose nearest class
    center in embedding space is one of their l positives (chance: l/num_clusters), trained and
    at initialization; the kNN probe with the true labels of the trained encoder, of the same
    encoder at initialization and of the raw pixels; and the label purity of the clusters (the
    fraction of training images whose nearest center's majority label is their own).

    optimizer: "adamw" (default) or "sgd" (momentum 0.9, as PartialFC trains; give it its own
    lr: on digits 0.002 trains, 0.02 already degrades the probe).

    sample_ratio: the share of the non-positive classes each step scores (sample_classes); with
    the defaults on digits every class is a positive of some image of each batch, so every step
    scores all 32.

    process_group: model parallel, one process per device (torchrun; `pyssl train mlcd` under
    torchrun sets it up): every rank holds a contiguous shard of the class centers
    (MLCDLoss(process_group=...), PartialFC style) and 1/world of each global batch, the encoder
    is wrapped in DistributedDataParallel, and feature_grad_scale=world undoes DDP's averaging,
    so the run follows one process with the global batch (when every step scores all classes,
    up to float rounding; with sampling each rank draws the negatives of its own shard). Every
    rank returns the same results."""
    import pyssl
    fn = "train.mlcd"
    data = _check_data(fn, data)
    dev = _device(device)
    for name, v, lo in (("num_clusters", num_clusters, 2), ("l", l, 1), ("dim", dim, 1), ("epochs", epochs, 1),
                        ("batch_size", batch_size, 1)):
        _checks.integer(fn, name, v, lo=lo)
    lr = _checks.real(fn, "lr", lr, positive=True)
    if l > num_clusters:
        raise ValueError(f"{fn}: l ({l}) must be at most num_clusters ({num_clusters})")
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"{fn}: optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    rank, world = 0, 1
    if process_group is not None:
        import torch.distributed as dist
        if not dist.is_initialized():
            raise ValueError(f"{fn}: process_group given but torch.distributed is not initialized")
        rank, world = dist.get_rank(process_group), dist.get_world_size(process_group)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)

    # the labelling step: cluster the "pre-trained" features, l nearest centers per image (with
    # a process group, rank 0's labels: BLAS rounding may differ between machines)
    pix = data.train_x.flatten(1)
    mean = pix.mean(0)
    feats = F.normalize(pix - mean, dim=1)
    cent = pyssl.cluster.kmeans(feats, num_clusters, niter=25, seed=seed)
    positives, _ = pyssl.cluster.topk_assign(feats, cent, l)
    if process_group is not None:
        cent, positives = (_broadcast(t, dev, process_group).cpu() for t in (cent, positives))
    top1 = positives[:, 0]
    majority = torch.zeros(num_clusters, dtype=torch.int64)
    for c in range(num_clusters):
        ys = data.train_y[top1 == c]
        majority[c] = ys.bincount().argmax() if len(ys) else -1
    purity = float((majority[top1] == data.train_y).float().mean())

    encoder = _cnn(data.train_x.shape[1], dim).to(dev)
    init_state = {k: v.clone() for k, v in encoder.state_dict().items()}
    # all C initial centers from the seed, so a sharded run starts where one process does
    w_init = torch.randn(num_clusters, dim, generator=torch.Generator().manual_seed(seed)) * 0.01
    head = pyssl.nn.MLCDLoss(num_clusters, dim, scale=scale, margin=margin, sample_ratio=sample_ratio,
                             process_group=process_group, feature_grad_scale=float(world), device=dev,
                             backend=backend, generator=torch.Generator(dev).manual_seed(seed + rank))
    head.load_state_dict({"weight": w_init})
    net = encoder
    if process_group is not None:
        net = torch.nn.parallel.DistributedDataParallel(
            encoder, device_ids=[dev.index] if dev.type == "cuda" else None, process_group=process_group)
    params = list(net.parameters()) + list(head.parameters())
    opt = (torch.optim.AdamW(params, lr=lr, weight_decay=1e-4) if optimizer == "adamw"
           else torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4))
    x, pos = data.train_x.to(dev), positives.to(dev)
    losses = []
    with _bar(epochs, "mlcd", progress if rank == 0 else False) as bar, warnings.catch_warnings():
        # DDP notes that the 1-input-channel conv's weight gradient has other (equivalent)
        # strides than its bucket view: noise on every rank's stderr, nothing to act on
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        for _ in range(epochs):
            total, count = 0.0, 0
            for idx in _batches(len(x), batch_size, g):      # the global batch, the same on every rank
                mine = idx[rank::world].to(dev)
                loss = head(net(x[mine]), pos[mine])          # the loss of the global batch
                total += _step(opt, loss) * len(idx)
                count += len(idx)
            losses.append(float(total) / count)
            bar.update(1)

    test_feats = F.normalize(data.test_x.flatten(1) - mean, dim=1)
    test_pos, _ = pyssl.cluster.topk_assign(test_feats, cent, l)

    def hit_rate(centers: Tensor) -> float:
        emb = F.normalize(_embed(encoder, data.test_x, dev), dim=1)
        nearest = (emb @ F.normalize(centers.float().cpu(), dim=1).t()).argmax(1)
        return float((test_pos == nearest[:, None]).any(1).float().mean())

    hits = hit_rate(head.full_weight())          # with a process group: all shards gathered
    trained = knn_accuracy(_embed(encoder, data.train_x, dev), data.train_y,
                           _embed(encoder, data.test_x, dev), data.test_y)
    encoder.load_state_dict(init_state)
    hits_init = hit_rate(w_init)
    at_init = knn_accuracy(_embed(encoder, data.train_x, dev), data.train_y,
                           _embed(encoder, data.test_x, dev), data.test_y)
    pixels = knn_accuracy(data.train_x.flatten(1) - mean, data.train_y, data.test_x.flatten(1) - mean, data.test_y)
    return {"loss": losses, "test_positive_hit_rate": hits, "test_positive_hit_rate_init": hits_init,
            "knn_accuracy": trained, "knn_accuracy_init": at_init, "knn_accuracy_pixels": pixels,
            "cluster_purity": purity, "world_size": world}


def _broadcast(t: Tensor, dev, group) -> Tensor:
    """t as the group's first rank has it (on dev: NCCL moves CUDA tensors only)."""
    import torch.distributed as dist
    t = t.to(dev).contiguous()
    dist.broadcast(t, src=dist.get_global_rank(group, 0), group=group)
    return t


# ------------------------------------------------------------------------------------------------
# MixedAE
# ------------------------------------------------------------------------------------------------

class _Block(nn.Module):
    """A pre-norm ViT block whose attention is homologous attention."""

    def __init__(self, dim: int, heads: int, backend: str):
        super().__init__()
        import pyssl.nn as pnn
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = pnn.HomologousAttention(dim, heads, backend=backend)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, groups: Optional[Tensor]) -> Tensor:
        x = x + self.attn(self.norm1(x), groups)
        return x + self.mlp(self.norm2(x))


def _sincos_2d(gh: int, gw: int, dim: int) -> Tensor:
    """Fixed 2-D sine-cosine position embeddings of a gh × gw patch grid (as MAE's): a quarter
    of the channels each for sin/cos of the row and of the column at geometric frequencies."""
    q = dim // 4
    freq = 1.0 / (10000.0 ** (torch.arange(q, dtype=torch.float32) / max(q, 1)))
    r, c = torch.meshgrid(torch.arange(gh, dtype=torch.float32), torch.arange(gw, dtype=torch.float32),
                          indexing="ij")
    ang_r, ang_c = r.reshape(-1, 1) * freq, c.reshape(-1, 1) * freq
    emb = torch.cat([ang_r.sin(), ang_r.cos(), ang_c.sin(), ang_c.cos()], 1)
    return F.pad(emb, (0, dim - emb.shape[1]))


class _MixedAE(nn.Module):
    def __init__(self, grid, patch_dim: int, dim: int, depth: int, heads: int, dec_depth: int, backend: str):
        super().__init__()
        num_patches = grid[0] * grid[1]
        self.embed = nn.Linear(patch_dim, dim)
        self.register_buffer("pos", _sincos_2d(grid[0], grid[1], dim))
        self.blocks = nn.ModuleList(_Block(dim, heads, backend) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.register_buffer("dec_pos", _sincos_2d(grid[0], grid[1], dim))
        self.dec_blocks = nn.ModuleList(_Block(dim, heads, backend) for _ in range(dec_depth))
        self.dec_norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_dim)
        self.proj = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def encode(self, patches: Tensor, groups: Optional[Tensor] = None) -> Tensor:
        z = self.embed(patches) + self.pos
        for blk in self.blocks:
            z = blk(z, groups)
        return self.norm(z)

    def decode(self, z: Tensor, visible: Tensor) -> Tensor:
        """Patches predicted from z (M, Np, dim) where visible (M, Np), a mask token elsewhere."""
        h = torch.where(visible[..., None], z, self.mask_token.to(z.dtype)) + self.dec_pos
        for blk in self.dec_blocks:
            h = blk(h, None)
        return self.pred(self.dec_norm(h))

    def forward(self, patches: Tensor) -> Tensor:   # whole images: mean-pooled tokens (the probe)
        return self.encode(patches).mean(1)


def _patchify(x: Tensor, p: int) -> Tensor:
    """(B, C, H, W) → (B, (H/p)·(W/p), C·p·p), row-major patches."""
    b, c, h, w = x.shape
    return x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(b, (h // p) * (w // p), c * p * p)


def mixedae(data: Images, *, patch: int = 2, ratio: float = 0.25, dim: int = 64, depth: int = 3, heads: int = 4,
            decoder_depth: int = 2, epochs: int = 40, batch_size: int = 32, lr: float = 2e-3,
            temperature: float = 0.2, contrastive_weight: float = 0.01, seed: int = 0, device="cpu",
            backend: str = "auto", progress: Optional[bool] = None) -> Dict[str, object]:
    """MixedAE on data. Returns per-epoch mean reconstruction and contrastive losses; on mixed
    test images the reconstruction error (MSE per pixel) of the unseen patches against that of
    the per-position mean training patch; the kNN probe (true labels) of mean-pooled encoder
    tokens of whole test images, trained and at initialization; and the isolation check of
    homologous attention on the trained encoder (_isolation).

    contrastive_weight: at this scale (16 tokens of 4 pixels) a weight of 0.05-0.1 lets the
    contrastive term pull each image's tokens onto one point within a few epochs (the loss at
    its floor ln 3 for groups of 4) and the reconstruction of unseen patches never leaves the
    mean patch; at 0.01 both losses fall (digits, 40 epochs: unseen-patch MSE 0.051 against the
    mean patch's 0.072, contrastive loss 2.48 -> 1.12)."""
    import pyssl
    fn = "train.mixedae"
    data = _check_data(fn, data)
    dev = _device(device)
    for name, v, lo in (("patch", patch, 1), ("dim", dim, 1), ("depth", depth, 1), ("heads", heads, 1),
                        ("decoder_depth", decoder_depth, 1), ("epochs", epochs, 1), ("batch_size", batch_size, 1)):
        _checks.integer(fn, name, v, lo=lo)
    lr = _checks.real(fn, "lr", lr, positive=True)
    h, w = data.train_x.shape[2:]
    if h % patch or w % patch:
        raise ValueError(f"{fn}: patch ({patch}) must divide the image size {h}×{w}")
    ratio = _checks.real(fn, "ratio", ratio, positive=True)
    temperature = _checks.real(fn, "temperature", temperature, positive=True)
    contrastive_weight = _checks.real(fn, "contrastive_weight", contrastive_weight, nonnegative=True)
    G = int(round(1.0 / ratio))
    if G < 2:
        raise ValueError(f"{fn}: ratio must mix at least 2 images (1/ratio >= 1.5), got {ratio}")
    if batch_size > len(data.train_x) or len(data.test_x) < G:
        raise ValueError(f"{fn}: batch_size ({batch_size}) must be at most the training images "
                         f"({len(data.train_x)}), and the test images at least G = {G}")
    if batch_size % G:
        raise ValueError(f"{fn}: batch_size ({batch_size}) must be divisible by G = round(1/ratio) = {G}")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    gmix = torch.Generator().manual_seed(seed + 1)

    train_p, test_p = _patchify(data.train_x, patch), _patchify(data.test_x, patch)
    npatch, pdim = train_p.shape[1:]
    model = _MixedAE((h // patch, w // patch), pdim, dim, depth, heads, decoder_depth, backend).to(dev)
    init_state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, betas=(0.9, 0.95))
    steps = epochs * (len(train_p) // batch_size)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    ar = torch.arange(G, device=dev)

    def step(patches: Tensor, generator: torch.Generator, baseline: Optional[Tensor] = None):
        """(reconstruction loss of the unseen patches, contrastive loss[, the baseline's loss])."""
        mixed, groups, sources = pyssl.mix_patches(patches, ratio, generator=generator)
        mixed, groups, sources = mixed.to(dev), groups.to(dev), sources.to(dev)
        z = model.encode(mixed, groups)                                  # (M, Np, dim)
        m = z.shape[0]
        visible = groups[:, None, :] == ar[None, :, None]                # (M, G, Np): source g's own patches
        zz = z[:, None].expand(m, G, npatch, dim).reshape(m * G, npatch, dim)
        pred = model.decode(zz, visible.reshape(m * G, npatch))
        target = patches.to(dev)[sources.reshape(-1)]
        hidden = ~visible.reshape(m * G, npatch)
        rec = ((pred - target) ** 2).mean(-1)[hidden].mean()
        con = pyssl.homologous_contrastive_loss(model.proj(z), groups, temperature=temperature)
        if baseline is None:
            return rec, con
        return rec, con, ((baseline - target) ** 2).mean(-1)[hidden].mean()

    rec_hist, con_hist = [], []
    with _bar(epochs, "mixedae", progress) as bar:
        for _ in range(epochs):
            tr, tc, count = 0.0, 0.0, 0
            for idx in _batches(len(train_p), batch_size, g, drop_last=True):
                rec, con = step(train_p[idx], gmix)
                _step(opt, rec + contrastive_weight * con)
                sched.step()
                tr, tc, count = tr + rec.detach(), tc + con.detach(), count + 1
            rec_hist.append(float(tr) / max(count, 1))
            con_hist.append(float(tc) / max(count, 1))
            bar.update(1)

    # test: unseen patches of mixed test images, against the per-position mean training patch
    # on the same patches
    model.eval()
    n_test = len(test_p) - len(test_p) % G
    with torch.no_grad():
        rec_test, _, base = step(test_p[:n_test], torch.Generator().manual_seed(seed + 2),
                                 baseline=train_p.mean(0).to(dev))
        isolation = _isolation(model, test_p[:n_test], ratio, torch.Generator().manual_seed(seed + 3), dev)
    probe = knn_accuracy(_embed(model, train_p, dev), data.train_y, _embed(model, test_p, dev), data.test_y)
    model.load_state_dict(init_state)
    probe_init = knn_accuracy(_embed(model, train_p, dev), data.train_y, _embed(model, test_p, dev), data.test_y)
    return {"reconstruction_loss": rec_hist, "contrastive_loss": con_hist,
            "test_reconstruction_mse": float(rec_test), "test_mean_patch_mse": float(base),
            "knn_accuracy": probe, "knn_accuracy_init": probe_init, "isolation_max_abs_diff": isolation}


@torch.no_grad()
def _isolation(model: _MixedAE, patches: Tensor, ratio: float, g: torch.Generator, dev) -> float:
    """What homologous attention promises, measured on the trained encoder: the tokens of one
    source image do not change when every other source's patches are replaced (by noise here).
    The largest change of an encoded token of source 0 (0 up to float rounding)."""
    import pyssl
    mixed, groups, _ = pyssl.mix_patches(patches, ratio, generator=g)
    mixed, groups = mixed.to(dev), groups.to(dev)
    mine = (groups == 0)[..., None]
    noise = torch.rand(mixed.shape, generator=g).to(dev)
    z = model.encode(mixed, groups)
    z2 = model.encode(torch.where(mine, mixed, noise), groups)
    return float(((z - z2).abs() * mine).max())


# ------------------------------------------------------------------------------------------------
# randomized smoothing
# ------------------------------------------------------------------------------------------------

def smooth(data: Images, *, sigma: float = 0.25, epochs: int = 20, batch_size: int = 128, lr: float = 2e-3,
           n0: int = 100, n: int = 1000, alpha: float = 0.001, radii: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
           max_certify: Optional[int] = None, seed: int = 0, device="cpu", backend: str = "auto",
           progress: Optional[bool] = None) -> Dict[str, object]:
    """A base classifier trained under Gaussian noise, certified by randomized smoothing.
    Returns per-epoch training loss, the base model's clean and noisy test accuracy, and the
    certified accuracy of the smoothed classifier at each radius (first max_certify test
    images; all by default), with the abstention rate."""
    import pyssl
    fn = "train.smooth"
    data = _check_data(fn, data)
    dev = _device(device)
    sigma = _checks.real(fn, "sigma", sigma, positive=True)
    for name, v, lo in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("n0", n0, 1), ("n", n, 1)):
        _checks.integer(fn, name, v, lo=lo)
    lr = _checks.real(fn, "lr", lr, positive=True)
    _checks.integer(fn, "max_certify", max_certify, lo=1, optional=True)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    K = data.num_classes
    mean = data.train_x.mean((0, 2, 3)).tolist()
    std = data.train_x.std((0, 2, 3)).clamp_min(1e-3).tolist()

    model = _cnn(data.train_x.shape[1], K).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    x, y = data.train_x.to(dev), data.train_y.to(dev)
    losses = []
    with _bar(epochs, "smooth", progress) as bar:
        for epoch in range(epochs):
            total, count = 0.0, 0
            for idx in _batches(len(x), batch_size, g):
                idx = idx.to(dev)
                # one noisy normalized copy per image; the counter (seed, image id, sample = epoch)
                # gives every epoch fresh noise, reproducibly, whatever the batch order
                xb = pyssl.gaussian_noise(x[idx], 1, sigma, seed=seed, sample_offset=epoch, image_ids=idx,
                                          mean=mean, std=std, backend=backend)
                total += _step(opt, F.cross_entropy(model(xb), y[idx])) * len(idx)
                count += len(idx)
            losses.append(float(total) / count)
            bar.update(1)

    model.eval()
    tx, ty = data.test_x, data.test_y
    m_t, s_t = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    clean = float((_embed(model, (tx - m_t) / s_t, dev).argmax(1) == ty).float().mean())
    noisy_in = pyssl.gaussian_noise(tx.to(dev), 1, sigma, seed=seed + 1, mean=mean, std=std, backend=backend)
    noisy = float((_embed(model, noisy_in, dev).argmax(1) == ty).float().mean())
    if max_certify is not None:
        tx, ty = tx[:max_certify], ty[:max_certify]
    smoothed = pyssl.Smooth(model, K, sigma, mean=mean, std=std, batch_size=1000, seed=seed + 2, backend=backend,
                            progress=bool(progress))
    with torch.no_grad():
        pred, radius = smoothed.certify(tx.to(dev), n0, n, alpha)
    radii = [float(r) for r in radii]
    cert = pyssl.certified_accuracy(pred.cpu(), radius.cpu(), ty, radii)
    return {"loss": losses, "clean_accuracy": clean, "noisy_accuracy": noisy,
            "certified_accuracy": {r: float(a) for r, a in zip(radii, cert)},
            "abstain_rate": float((pred == -1).float().mean()), "sigma": sigma, "n": n, "alpha": alpha,
            "best_possible_radius": sigma * _best_radius(n, alpha)}


def _best_radius(n: int, alpha: float) -> float:
    """Φ⁻¹ of the Clopper–Pearson lower bound when all n samples agree: the largest radius (in
    units of sigma) that n samples can certify at alpha."""
    from scipy.stats import norm
    return float(norm.ppf(alpha ** (1.0 / n)))
