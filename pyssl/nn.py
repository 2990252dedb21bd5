"""Modules that own their parameters, built on the functional ops."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pyssl import _checks
from pyssl.ops.mlcd_loss import _MARGIN_GRADS, mlcd_loss, sample_classes


class MLCDLoss(torch.nn.Module):
    """MLCD multi-label margin loss with its class centers as a Parameter.

    In training mode every call draws a candidate set S = the batch's positives plus
    sample_ratio·(C − |P|) other classes; in eval mode all classes are used.

        crit = pyssl.nn.MLCDLoss(1_000_000, 512).cuda()
        loss = crit(features, positives)      # positives (N, l) int64, -1 = padding
    """

    def __init__(self, num_classes: int, dim: int, *, scale: float = 64.0, margin: float = 0.3,
                 sample_ratio: float = 0.1, margin_grad: str = "straight_through",
                 process_group=None, device=None, dtype=None, backend: str = "auto",
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        fn = "MLCDLoss"
        num_classes = _checks.integer(fn, "num_classes", num_classes, lo=1)
        dim = _checks.integer(fn, "dim", dim, lo=1)
        scale = _checks.real(fn, "scale", scale, positive=True)
        margin = _checks.real(fn, "margin", margin)
        sample_ratio = _checks.real(fn, "sample_ratio", sample_ratio)
        if not 0.0 <= sample_ratio <= 1.0:
            raise ValueError(f"MLCDLoss: sample_ratio must be in [0, 1], got {sample_ratio!r}")
        if margin_grad not in _MARGIN_GRADS:
            raise ValueError(f"MLCDLoss: margin_grad must be one of {_MARGIN_GRADS}, got {margin_grad!r}")
        if process_group is not None:
            raise NotImplementedError("MLCDLoss: the model-parallel form (process_group) is not "
                                      "implemented yet; use process_group=None")
        self.num_classes = num_classes
        self.dim = dim
        self.scale = float(scale)
        self.margin = float(margin)
        self.sample_ratio = float(sample_ratio)
        self.margin_grad = margin_grad
        self.backend = backend
        self.generator = generator
        self.weight = torch.nn.Parameter(torch.empty(num_classes, dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        torch.nn.init.normal_(self.weight, std=0.01)

    def forward(self, x: Tensor, positives: Tensor) -> Tensor:
        """Loss of features x (N, dim) with their positives (N, l). Mixed precision: float32
        centers with bfloat16/float16 features (autocast, or a half-precision backbone) are
        cast to x's dtype for the op, as autocast does for a linear layer's weight (in training
        only the sampled rows); their gradient returns in float32."""
        classes = None
        if self.training and self.sample_ratio < 1.0:
            classes = sample_classes(positives, self.num_classes, self.sample_ratio, generator=self.generator)
        w = self.weight
        if isinstance(x, Tensor) and x.is_floating_point() and x.dtype != w.dtype:
            if classes is None:
                w = w.to(x.dtype)
            else:
                # cast only the sampled rows (C'·D, not C·D), the positives renumbered to them
                w = w.index_select(0, classes).to(x.dtype)
                cols = torch.searchsorted(classes, positives.clamp_min(0))
                positives = torch.where(positives >= 0, cols, positives)
                classes = None
        return mlcd_loss(x, w, positives, scale=self.scale, margin=self.margin, classes=classes,
                         margin_grad=self.margin_grad, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, dim={self.dim}, scale={self.scale}, margin={self.margin}, "
                f"sample_ratio={self.sample_ratio}, margin_grad={self.margin_grad!r}")
