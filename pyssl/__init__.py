"""pyssl: fused kernels for visual representation learning, as drop-in torch autograd ops.

    import pyssl
    loss = pyssl.mlcd_loss(x, weight, positives, classes=pyssl.sample_classes(positives, C))

See README.md for the API of every op; each op's docstring and pyssl.reference give the exact math.
"""
from pyssl.ops.mlcd_loss import margin_softmax_loss, mlcd_loss, sample_classes
from pyssl.ops.homologous_attention import homologous_attention
from pyssl.ops.homologous_contrastive_loss import homologous_contrastive_loss
from pyssl.ops.mix_patches import mix_patches
from pyssl.ops.noise import gaussian_noise, noise_tv_bound
from pyssl.smoothing import Smooth, certified_accuracy
from pyssl import cluster, nn, ood, reference, train
from pyssl._workspace import empty_cache

__version__ = "0.1.0"

__all__ = ["mlcd_loss", "sample_classes", "margin_softmax_loss", "homologous_attention", "mix_patches",
           "homologous_contrastive_loss", "gaussian_noise", "noise_tv_bound",
           "Smooth", "certified_accuracy", "nn", "cluster", "ood", "reference", "train", "empty_cache"]
