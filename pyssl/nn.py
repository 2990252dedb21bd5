"""Modules that own their parameters, built on the functional ops (one module per op, as
torch.nn does for its functionals):

    MLCDLoss            class centers + pyssl.mlcd_loss, negative-class sampling in training
    MarginSoftmaxLoss   class centers + pyssl.margin_softmax_loss (ArcFace/CosFace, negative-class
                        sampling in training)
    HomologousAttention a ViT attention layer (fused qkv, proj) on pyssl.homologous_attention
    HomologousContrastiveLoss  pyssl.homologous_contrastive_loss with its temperature
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from pyssl import _checks
from pyssl._dispatch import BACKENDS
from pyssl.ops.homologous_attention import homologous_attention
from pyssl.ops.homologous_contrastive_loss import homologous_contrastive_loss
from pyssl.ops.mlcd_loss import (_MARGIN_GRADS, _check_ids, margin_softmax_loss, mlcd_loss, sample_classes,
                                 takes_dtypes)
from pyssl.ops.mlcd_loss_parallel import _gather_rows, margin_softmax_loss_parallel, mlcd_loss_parallel, shard_range


def _backend(fn: str, backend: str) -> str:
    """A module's backend is checked when it is built, not at its first forward."""
    if backend not in BACKENDS:
        raise ValueError(f"{fn}: backend must be one of {BACKENDS}, got {backend!r}")
    return backend


class _ClassCenters(torch.nn.Module):
    """What MLCDLoss and MarginSoftmaxLoss share: the checked settings, the (C, D) centers as a
    Parameter, and the candidate set of a call (sampled in training when sample_ratio < 1)."""

    def __init__(self, fn, num_classes, dim, scale, sample_ratio, margin_grad, device, dtype, backend,
                 generator, process_group=None, feature_grad_scale=1.0):
        super().__init__()
        self.num_classes = _checks.integer(fn, "num_classes", num_classes, lo=1)
        self.dim = _checks.integer(fn, "dim", dim, lo=1)
        self.scale = float(_checks.real(fn, "scale", scale, positive=True))
        sample_ratio = _checks.real(fn, "sample_ratio", sample_ratio)
        if not 0.0 <= sample_ratio <= 1.0:
            raise ValueError(f"{fn}: sample_ratio must be in [0, 1], got {sample_ratio!r}")
        self.sample_ratio = float(sample_ratio)
        if margin_grad not in _MARGIN_GRADS:
            raise ValueError(f"{fn}: margin_grad must be one of {_MARGIN_GRADS}, got {margin_grad!r}")
        self.margin_grad, self.backend = margin_grad, _backend(fn, backend)
        self.generator = _checks.generator(fn, "generator", generator)
        # model parallel: this rank holds classes [class_start, class_start + num_local)
        self.process_group = process_group
        self.class_start, self.num_local = 0, self.num_classes
        self.feature_grad_scale = float(_checks.real(fn, "feature_grad_scale", feature_grad_scale, positive=True))
        if process_group is None and self.feature_grad_scale != 1.0:
            raise ValueError(f"{fn}: feature_grad_scale applies to the model-parallel form only "
                             "(give a process_group)")
        if process_group is not None:
            if not dist.is_available() or not dist.is_initialized():
                raise ValueError(f"{fn}: process_group given but torch.distributed is not initialized")
            world = dist.get_world_size(process_group)
            if self.num_classes < world:
                raise ValueError(f"{fn}: num_classes ({self.num_classes}) must be at least the process "
                                 f"group's size ({world}): every rank holds one class or more")
            self.class_start, self.num_local = shard_range(self.num_classes, dist.get_rank(process_group), world)
        self.weight = torch.nn.Parameter(torch.empty(self.num_local, self.dim, device=device, dtype=dtype))
        self.reset_parameters()
        self._register_state_dict_hook(_ClassCenters._record_class_range)

    @staticmethod
    def _record_class_range(module, state_dict, prefix, local_metadata):
        # which rows of the C centers this state dict's weight holds: a shard saved by one rank
        # refuses to load into another rank's shard (see _load_from_state_dict)
        local_metadata["pyssl_class_range"] = (module.class_start, module.num_local, module.num_classes)

    def _sharded(self, loss_fn, x, ids, **kw):
        """The model-parallel call: this rank's shard, sampling inside the op (the positives of
        the whole batch are known only after the gather)."""
        ratio = self.sample_ratio if self.training and self.sample_ratio < 1.0 else None
        return loss_fn(x, self.weight, ids, class_start=self.class_start, process_group=self.process_group,
                       scale=self.scale, sample_ratio=ratio, generator=self.generator,
                       margin_grad=self.margin_grad, feature_grad_scale=self.feature_grad_scale,
                       backend=self.backend, **kw)

    def full_weight(self) -> Tensor:
        """All C class centers (C, dim), detached: with a process group every rank's shard is
        gathered (a collective: every rank calls it), e.g. to save one checkpoint or to score
        with all centers; without one, the weight itself."""
        w = self.weight.detach()
        if self.process_group is None:
            return w
        world = dist.get_world_size(self.process_group)
        counts = [shard_range(self.num_classes, r, world)[1] for r in range(world)]
        return _gather_rows(w, counts, self.process_group)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # a checkpoint of all C centers (one process, or full_weight()) loads into a shard: this
        # rank takes its own rows
        key = prefix + "weight"
        w = state_dict.get(key)
        saved = local_metadata.get("pyssl_class_range")
        mine = (self.class_start, self.num_local, self.num_classes)
        # all C rows is a full checkpoint whatever metadata came with it (a shard's state dict
        # with its weight replaced by full_weight())
        full = isinstance(w, Tensor) and w.dim() == 2 and w.shape[0] == self.num_classes
        if (saved is not None and not full and tuple(saved) != mine
                and tuple(saved) != (0, self.num_classes, self.num_classes)):
            error_msgs.append(f"{type(self).__name__}: the checkpoint's {key} holds classes "
                              f"[{saved[0]}, {saved[0] + saved[1]}) of {saved[2]}, this module classes "
                              f"[{mine[0]}, {mine[0] + mine[1]}) of {mine[2]}: load each rank's own shard, "
                              "or all C centers (full_weight())")
            return
        if (self.process_group is not None and isinstance(w, Tensor) and w.dim() == 2
                and w.shape[0] == self.num_classes and self.num_local != self.num_classes):
            state_dict = dict(state_dict)
            # a copy: load_state_dict(assign=True) would otherwise keep a view of all C rows
            state_dict[key] = w[self.class_start:self.class_start + self.num_local].clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _shard_repr(self) -> str:
        if self.process_group is None:
            return ""
        return f", shard=[{self.class_start}, {self.class_start + self.num_local})"

    def reset_parameters(self) -> None:
        torch.nn.init.normal_(self.weight, std=0.01)

    def _candidates(self, x, positives: Tensor):
        """(weight, positives, classes) for the op. In training with sample_ratio < 1, classes =
        sample_classes(positives). float32 centers with bfloat16/float16 features (autocast or a
        half-precision backbone) go to the op as they are: it rounds the candidate rows to x's
        dtype, as autocast does for a linear layer's weight, and returns their gradient in
        float32. Other mixes (float64 features, 16-bit centers with float32 features) are cast
        to x's dtype here — with sampling only the sampled rows, the positives renumbered to
        them; the gradient returns in the centers' dtype."""
        classes = None
        if self.training and self.sample_ratio < 1.0:
            classes = sample_classes(positives, self.num_classes, self.sample_ratio, generator=self.generator)
        w = self.weight
        if not (isinstance(x, Tensor) and x.is_floating_point()) or takes_dtypes(x.dtype, w.dtype):
            return w, positives, classes
        if classes is None:
            return w.to(x.dtype), positives, None
        # cast only the sampled rows (C'·D, not C·D)
        cols = torch.searchsorted(classes, positives.clamp_min(0))
        return w.index_select(0, classes).to(x.dtype), torch.where(positives >= 0, cols, positives), None


class MLCDLoss(_ClassCenters):
    """MLCD multi-label margin loss with its class centers as a Parameter.

    In training mode every call draws a candidate set S = the batch's positives plus
    sample_ratio·(C − |P|) other classes; in eval mode all classes are used.

        crit = pyssl.nn.MLCDLoss(1_000_000, 512).cuda()
        loss = crit(features, positives)      # positives (N, l) int64, -1 = padding

    With a process_group the centers are sharded (model parallel, PartialFC style): this rank's
    weight holds classes [class_start, class_start + num_local) (shard_range's split), features
    and positives of every rank are all-gathered, each rank samples within its own shard, and
    every rank returns the loss of the whole batch (pyssl/ops/mlcd_loss_parallel.py). Every rank
    calls forward and backward together. The features get the exact gradient of that loss times
    feature_grad_scale: under DistributedDataParallel, which averages the backbone's gradients
    over the P ranks, feature_grad_scale=P gives the backbone the gradient of the global loss
    (PartialFC does the same).
    """

    def __init__(self, num_classes: int, dim: int, *, scale: float = 64.0, margin: float = 0.3,
                 sample_ratio: float = 0.1, margin_grad: str = "straight_through",
                 process_group=None, feature_grad_scale: float = 1.0, device=None, dtype=None,
                 backend: str = "auto", generator: Optional[torch.Generator] = None):
        super().__init__("MLCDLoss", num_classes, dim, scale, sample_ratio, margin_grad, device, dtype,
                         backend, generator, process_group, feature_grad_scale)
        self.margin = float(_checks.real("MLCDLoss", "margin", margin))

    def forward(self, x: Tensor, positives: Tensor) -> Tensor:
        """Loss of features x (N, dim) with their positives (N, l), in float32 (float64 for
        float64 x). Mixed precision: with float32 centers and bfloat16/float16 features
        (autocast, or a half-precision backbone) the candidate centers are rounded to x's dtype
        for the products, as autocast does for a linear layer's weight (in training only the
        sampled rows); their gradient returns in float32."""
        if self.process_group is not None:
            return self._sharded(mlcd_loss_parallel, x, positives, margin=self.margin)
        w, positives, classes = self._candidates(x, positives)
        return mlcd_loss(x, w, positives, scale=self.scale, margin=self.margin, classes=classes,
                         margin_grad=self.margin_grad, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, dim={self.dim}, scale={self.scale}, margin={self.margin}, "
                f"sample_ratio={self.sample_ratio}, margin_grad={self.margin_grad!r}{self._shard_repr()}")


class MarginSoftmaxLoss(_ClassCenters):
    """Single-label margin softmax (ArcFace m2, CosFace m3, SphereFace m1) with its class centers
    as a Parameter: a face-recognition / classification head in one module.

    In training mode with sample_ratio < 1 every call draws a candidate set: the batch's labels
    plus sample_ratio·(C − |labels|) other classes (pyssl.sample_classes; PartialFC instead keeps
    sample_ratio·C classes in all, labels included, so the same ratio gives a slightly larger set
    here); in eval mode, and with sample_ratio = 1 (the default), all classes.

        head = pyssl.nn.MarginSoftmaxLoss(100_000, 512, m2=0.5).cuda()          # ArcFace
        loss = head(embeddings, labels)                                          # labels (N,) int64

    With a process_group the centers are sharded across its ranks as in MLCDLoss (PartialFC).
    """

    def __init__(self, num_classes: int, dim: int, *, scale: float = 64.0, m1: float = 1.0,
                 m2: float = 0.5, m3: float = 0.0, sample_ratio: float = 1.0,
                 margin_grad: str = "straight_through", reduction: str = "mean", process_group=None,
                 feature_grad_scale: float = 1.0, device=None, dtype=None, backend: str = "auto",
                 generator: Optional[torch.Generator] = None):
        fn = "MarginSoftmaxLoss"
        super().__init__(fn, num_classes, dim, scale, sample_ratio, margin_grad, device, dtype, backend, generator,
                         process_group, feature_grad_scale)
        self.m1, self.m2, self.m3 = (float(_checks.real(fn, n, v)) for n, v in (("m1", m1), ("m2", m2), ("m3", m3)))
        self.reduction = reduction

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        """Loss of features x (N, dim) with their labels (N,); mixed precision as MLCDLoss."""
        fn = "MarginSoftmaxLoss"
        if self.process_group is not None:
            # checked inside the op, together on every rank (a rank raising here alone would
            # leave the others waiting in its first collective)
            return self._sharded(margin_softmax_loss_parallel, x, labels, m1=self.m1, m2=self.m2, m3=self.m3,
                                 reduction=self.reduction)
        _checks.tensor(fn, "x", x)
        if x.dim() != 2:
            raise ValueError(f"{fn}: x must be (N, {self.dim}), got shape {tuple(x.shape)}")
        _check_ids(fn, "labels", labels, x, 1)
        try:
            w, pos, classes = self._candidates(x, labels[:, None])
        except ValueError as e:   # sample_classes' range check: say whose labels
            raise ValueError(f"{fn}: labels: {e}") from e
        return margin_softmax_loss(x, w, pos[:, 0], scale=self.scale, m1=self.m1, m2=self.m2, m3=self.m3,
                                   classes=classes, margin_grad=self.margin_grad, reduction=self.reduction,
                                   backend=self.backend)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, dim={self.dim}, scale={self.scale}, m1={self.m1}, "
                f"m2={self.m2}, m3={self.m3}, sample_ratio={self.sample_ratio}, "
                f"margin_grad={self.margin_grad!r}, reduction={self.reduction!r}{self._shard_repr()}")


class HomologousAttention(torch.nn.Module):
    """Multi-head self-attention of a ViT block in which each token attends only to the tokens of
    its own source image (Mixed Autoencoder), optionally only to its top-k keys.

    The layout and parameter names are timm's Attention (qkv: Linear(dim, 3·dim), proj:
    Linear(dim, dim), scale d^-0.5), so a ViT's attention weights load as they are (qkv_bias
    defaults to True, as in timm's VisionTransformer; its Attention class defaults to False).
    No dropout and no q/k normalization. q, k and v are views of the fused projection, read in
    place by the Triton kernels.

        attn = pyssl.nn.HomologousAttention(768, 12)
        y = attn(x, groups)          # x (B, L, 768), groups (B, L) int (negative: global token)
        y = attn(x)                  # groups None: plain attention

    In a timm VisionTransformer whose blocks' attn is this module, timm's Block calls
    attn(x, attn_mask=..., is_causal=...) and VisionTransformer.forward(x, attn_mask=m) hands m
    to every block: so attn_mask may carry the groups, an integer (B, L) tensor over the whole
    sequence (class/register tokens included, e.g. −1), and vit(images, attn_mask=groups) runs
    homologous attention in every block. A boolean or float attn_mask and is_causal=True are
    refused (the attention pattern is the groups).
    """

    def __init__(self, dim: int, num_heads: int = 8, *, qkv_bias: bool = True, topk: Optional[int] = None,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        fn = "HomologousAttention"
        dim = _checks.integer(fn, "dim", dim, lo=1)
        num_heads = _checks.integer(fn, "num_heads", num_heads, lo=1)
        if dim % num_heads:
            raise ValueError(f"{fn}: dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.topk = _checks.integer(fn, "topk", topk, lo=1, optional=True)
        self.dim, self.num_heads, self.head_dim, self.backend = dim, num_heads, dim // num_heads, _backend(fn, backend)
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=qkv_bias, device=device, dtype=dtype)
        self.proj = torch.nn.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, x: Tensor, groups: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        fn = "HomologousAttention"
        if is_causal:
            raise ValueError(f"{fn}: is_causal must be False (the attention pattern is given by groups)")
        if attn_mask is not None:
            ids = (isinstance(attn_mask, Tensor) and attn_mask.dim() == 2 and not attn_mask.is_floating_point()
                   and not attn_mask.is_complex() and attn_mask.dtype != torch.bool)
            if not ids:
                raise ValueError(f"{fn}: attn_mask must be None or the (B, L) integer group ids (a boolean or "
                                 "float mask is not supported: the attention pattern is given by groups)")
            if groups is not None:
                raise ValueError(f"{fn}: give the group ids as groups or as attn_mask, not both")
            groups = attn_mask
        _checks.tensor(fn, "x", x)
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"{fn}: x must be (B, L, {self.dim}), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{fn}: x must be a float tensor, got {x.dtype}")
        b, l, _ = x.shape
        q, k, v = self.qkv(x).view(b, l, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        o = homologous_attention(q, k, v, groups, topk=self.topk, backend=self.backend)
        return self.proj(o.transpose(1, 2).reshape(b, l, self.dim))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, topk={self.topk}"


class HomologousContrastiveLoss(torch.nn.Module):
    """pyssl.homologous_contrastive_loss as a module: loss(z (B, L, E), groups (B, L))."""

    def __init__(self, temperature: float = 0.2, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        fn = "HomologousContrastiveLoss"
        self.temperature = float(_checks.real(fn, "temperature", temperature, positive=True))
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"{fn}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.reduction, self.backend = reduction, _backend(fn, backend)

    def forward(self, z: Tensor, groups: Tensor) -> Tensor:
        return homologous_contrastive_loss(z, groups, temperature=self.temperature, reduction=self.reduction,
                                           backend=self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}"
