"""Out-of-distribution detection scores and metrics (higher score = more in-distribution).

    scorer = pyssl.ood.KNNScorer(k=50).fit(train_features)
    s_id, s_ood = scorer.score(test_features), scorer.score(ood_features)
    pyssl.ood.metrics(s_id, s_ood)   # auroc, aupr_in, aupr_out, fpr95, fpr95_ood_positive

KNNScorer is the nearest-neighbour score of Sun et al. (2022) used by PT-OOD: features
L2-normalized, score = −(squared L2 distance to the k-th nearest bank feature). Logit scores
msp / energy / max_logit, and the feature-space baselines MahalanobisScorer (class-conditional
Gaussians with a shared covariance) and ViMScorer (virtual-logit matching) are here too.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from pyssl import _checks
from pyssl.ops import knn as _knn


def _logits(fn, logits) -> Tensor:
    """float64 logits stay float64; 16-bit ones are scored in float32."""
    x = _knn.as_float_tensor("logits", fn, logits)
    return x if x.dtype == torch.float64 else x.float()


def msp(logits) -> Tensor:
    """Maximum softmax probability (Hendrycks & Gimpel 2017)."""
    return torch.softmax(_logits("msp", logits), dim=1).max(1).values


def energy(logits, temperature: float = 1.0) -> Tensor:
    """Negative free energy T·logsumexp(logits / T) (Liu et al. 2020)."""
    temperature = _checks.real("energy", "temperature", temperature, positive=True)
    x = _logits("energy", logits)
    # as m + T·logsumexp((x − m)/T), m the row's max: logits / T alone overflows for a small T
    # (the answer then tends to the max logit)
    m = x.max(1, keepdim=True).values
    m0 = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return (m0 + temperature * torch.logsumexp((x - m0) / temperature, dim=1, keepdim=True))[:, 0]


def max_logit(logits) -> Tensor:
    """Maximum logit (Hendrycks et al. 2022)."""
    return _logits("max_logit", logits).max(1).values


class KNNScorer:
    """−(squared L2 distance to the k-th nearest bank feature); higher = more in-distribution.

    backend: "auto" (CUDA: Triton kernel, then faiss-gpu, then torch; CPU: the C++ kernel, then
    faiss, then torch), "cpu", "faiss", "triton" or "torch". gpu=True moves a CPU bank to CUDA. A bfloat16/float16 bank on
    CUDA is kept in its dtype (normalized in float32 first) and queries are cast to it: the search
    runs on the tensor cores at half the bank's memory; elsewhere everything is float32.
    normalize=False: raw features, with the bank's mean (float64) subtracted from bank and
    queries alike, which leaves every distance as it is; the search computes ‖q‖² − 2q·b + ‖b‖²
    in float32, where a large common offset would otherwise swamp the distances.
    """

    def __init__(self, k: int = 50, *, normalize: bool = True, gpu: Optional[bool] = None, backend: str = "auto"):
        k = _checks.integer("KNNScorer", "k", k, lo=1)
        if backend not in _knn.BACKENDS:
            raise ValueError(f"KNNScorer: backend must be one of {_knn.BACKENDS}, got {backend!r}")
        if gpu and not torch.cuda.is_available():
            raise ValueError("KNNScorer: gpu=True but CUDA is not available")
        self.k, self.normalize, self.gpu, self.backend = k, normalize, gpu, backend
        self.bank: Optional[Tensor] = None
        self._center: Optional[Tensor] = None

    def _prep(self, name, x, center: Optional[Tensor] = None):
        """(rows as searched, the center subtracted): unit rows, or with normalize=False the rows
        minus center (the bank's own mean when center is None)."""
        x = _knn.as_float_tensor(name, "KNNScorer", x).detach()
        if self.gpu:
            x = x.cuda()
        if self.bank is not None and name == "x" and x.shape[1] != self.bank.shape[1]:
            raise ValueError(f"KNNScorer: x has D={x.shape[1]} but the bank has D={self.bank.shape[1]}")
        keep16 = x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
        if self.normalize:
            y = _knn.unit_rows(x, out_dtype=x.dtype if keep16 else None)
        else:
            center = _knn.row_mean(x) if center is None else center
            y = _knn.centered_rows(x, center, dtype=x.dtype if keep16 else torch.float32, device=x.device)
        # a 16-bit bank on the GPU stays 16-bit (normalized in float32): the search runs on the
        # tensor cores and the bank takes half the memory; on the CPU the kernels take float32
        if keep16:
            y = y.to(x.dtype)
        return y, center

    def fit(self, bank) -> "KNNScorer":
        bank, center = self._prep("bank", bank)
        # checked after the cast and normalization (on the bank's device, one pass): the
        # backends disagree on non-finite rows (faiss drops them, torch's scores go NaN)
        if not bool(torch.isfinite(bank).all()):
            raise ValueError("KNNScorer: bank holds non-finite values (or values that overflow float32)")
        if self.k > bank.shape[0]:
            raise ValueError(f"KNNScorer: k={self.k} is larger than the number of bank rows ({bank.shape[0]})")
        bias = _knn.l2_bias(bank)
        self.bank, self._center, self._bias = bank, center, bias
        return self

    def score(self, x) -> Tensor:
        """(N,) scores; NaN for a row of x with a non-finite value."""
        if self.bank is None:
            raise ValueError("KNNScorer: call fit(bank) before score(x)")
        q = self._prep("x", x, self._center)[0].to(self.bank.device, self.bank.dtype)
        s, _ = _knn.search(q, self.bank, self.k, bank_bias=self._bias, backend=self.backend, fn="KNNScorer")
        score = -_knn.l2_from_scores(q, s[:, -1:])[:, 0]
        # a query with a non-finite value scores NaN on every backend (found on the device: no
        # sync per call); metrics() refuses NaN scores
        return torch.where(torch.isfinite(q).all(1), score, torch.full_like(score, float("nan")))


def _score_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _finite(fn: str, name: str, x: Tensor) -> Tensor:
    """x when every value is finite (a fit would otherwise fail inside an eigensolver)."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{fn}: {name} holds non-finite values")
    return x


def _fitted(fn: str, scorer, attr: str) -> None:
    if getattr(scorer, attr, None) is None:
        raise ValueError(f"{fn}: call fit(...) before score(...)")


class MahalanobisScorer:
    """−min_c (x − μ_c)ᵀ Σ⁻¹ (x − μ_c) with class means μ_c and one shared covariance Σ
    (Lee et al. 2018, without input preprocessing)."""

    means: Optional[Tensor] = None

    def fit(self, features, labels) -> "MahalanobisScorer":
        x = _finite("MahalanobisScorer", "features",
                    _knn.as_float_tensor("features", "MahalanobisScorer", features).detach().double())
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != (x.shape[0],):
            raise ValueError(f"MahalanobisScorer: labels must be an int64 tensor of shape ({x.shape[0]},)")
        classes = torch.unique(labels)
        means = torch.stack([x[labels == c].mean(0) for c in classes])
        centered = x - means[torch.searchsorted(classes, labels)]
        cov = centered.t() @ centered / x.shape[0]
        self.means, self.precision = means, torch.linalg.pinv(cov, hermitian=True)
        return self

    def score(self, features) -> Tensor:
        """float64 features give float64 scores, others float32 (computed in float64)."""
        _fitted("MahalanobisScorer", self, "means")
        x0 = _knn.as_float_tensor("features", "MahalanobisScorer", features).detach()
        x = x0.double()
        if x.shape[1] != self.means.shape[1]:
            raise ValueError(f"MahalanobisScorer: features have D={x.shape[1]}, fitted D={self.means.shape[1]}")
        # (x−μ)ᵀP(x−μ) = xᵀPx − 2 xᵀPμ + μᵀPμ, per class, without an N×C×D tensor
        xp = x @ self.precision
        d = (xp * x).sum(1, keepdim=True) - 2 * xp @ self.means.t() + ((self.means @ self.precision) * self.means).sum(1)
        return -d.min(1).values.to(_score_dtype(x0))


class ViMScorer:
    """Virtual-logit matching (Wang et al. 2022): energy of the logits minus α times the norm of
    the feature's residual outside the principal subspace, measured from the origin
    u = −pinv(W)·b; α matches the mean residual to the mean max-logit on the training set."""

    w: Optional[Tensor] = None

    def __init__(self, dim: Optional[int] = None):
        self.dim = _checks.integer("ViMScorer", "dim", dim, lo=1, optional=True)

    def fit(self, features, weight, bias) -> "ViMScorer":
        fn = "ViMScorer"
        x = _finite(fn, "features", _knn.as_float_tensor("features", fn, features).detach().double())
        w = _finite(fn, "weight", _knn.as_float_tensor("weight", fn, weight).detach().double())
        b = _finite(fn, "bias", _knn.as_float_tensor("bias", fn, bias, ndim=1).detach().double())
        if w.shape[1] != x.shape[1] or b.shape[0] != w.shape[0]:
            raise ValueError(f"{fn}: weight (C, D) and bias (C,) must match features of D={x.shape[1]}")
        d = x.shape[1]
        dim = self.dim if self.dim is not None else (1000 if d >= 2048 else 512 if d >= 768 else d // 2)
        if not 0 < dim < d:
            raise ValueError(f"{fn}: dim must be in (0, {d}), got {dim}")
        self.w, self.b = w, b
        self.u = -torch.linalg.pinv(w) @ b
        xc = x - self.u
        eigval, eigvec = torch.linalg.eigh(xc.t() @ xc / x.shape[0])
        self.ns = eigvec[:, torch.argsort(eigval, descending=True)[dim:]]      # residual space
        vlogit = torch.linalg.vector_norm(xc @ self.ns, dim=1)
        self.alpha = (x @ w.t() + b).max(1).values.mean() / vlogit.mean()
        return self

    def score(self, features) -> Tensor:
        """float64 features give float64 scores, others float32 (computed in float64)."""
        _fitted("ViMScorer", self, "w")
        x0 = _knn.as_float_tensor("features", "ViMScorer", features).detach()
        x = x0.double()
        if x.shape[1] != self.w.shape[1]:
            raise ValueError(f"ViMScorer: features have D={x.shape[1]}, fitted D={self.w.shape[1]}")
        logits = x @ self.w.t() + self.b
        vlogit = torch.linalg.vector_norm((x - self.u) @ self.ns, dim=1) * self.alpha
        return (torch.logsumexp(logits, 1) - vlogit).to(_score_dtype(x0))


def _scores_1d(name, s) -> np.ndarray:
    if isinstance(s, Tensor):
        if s.is_complex():    # the cast would drop the imaginary part
            raise TypeError(f"metrics: {name} must hold real scores, got {s.dtype}")
        # float64 all the way: scores that differ below float32's resolution must not tie
        s = s.detach().to("cpu", torch.float64).numpy()
    try:
        raw = np.asarray(s)
    except ValueError as e:      # a ragged nesting of lists
        raise ValueError(f"metrics: {name} must be a 1-D array of scores ({e})") from None
    # real numbers only: complex values would lose their imaginary part, and strings, dates or
    # objects are not scores (a list of "1", "2" would otherwise parse)
    if raw.dtype.kind not in "biuf":
        got = type(s).__name__ if isinstance(s, (str, bytes)) else f"dtype {raw.dtype}"
        raise TypeError(f"metrics: {name} must be a 1-D tensor or array of real scores, got {got}")
    s = raw.astype(np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"metrics: {name} must be a non-empty 1-D array of scores, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError(f"metrics: {name} holds non-finite scores")
    return s


def _average_precision(pos: np.ndarray, neg: np.ndarray) -> float:
    """Step-wise average precision with the positives ranked by descending score; tied scores
    form one threshold (as scikit-learn's average_precision_score)."""
    s = np.concatenate([pos, neg])
    y = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]      # last index of each tied run
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / pos.size
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def metrics(id_scores, ood_scores) -> dict:
    """Standard OOD metrics, higher score = more in-distribution.

    auroc: P(id > ood) + ½P(tie). aupr_in: average precision with ID as positive; aupr_out:
    with OOD as positive (scores negated). fpr95: the fraction of OOD scored at or above the
    threshold that keeps 95% of ID (ID positive, the knn-ood convention). fpr95_ood_positive:
    the fraction of ID scored at or below the threshold that catches 95% of OOD (OOD positive,
    OpenOOD's convention since 2023).
    """
    a = _scores_1d("id_scores", id_scores)
    b = _scores_1d("ood_scores", ood_scores)
    allv = np.concatenate([a, b])
    ranks = _average_ranks(allv)
    auroc = (ranks[: a.size].sum() - a.size * (a.size + 1) / 2) / (a.size * b.size)
    # the largest threshold t with #{id ≥ t} ≥ 95% of ID
    t_id = np.sort(a)[::-1][int(np.ceil(0.95 * a.size)) - 1]
    # the smallest threshold t with #{ood ≤ t} ≥ 95% of OOD
    t_ood = np.sort(b)[int(np.ceil(0.95 * b.size)) - 1]
    return {"auroc": float(auroc),
            "aupr_in": _average_precision(a, b),
            "aupr_out": _average_precision(-b, -a),
            "fpr95": float(np.mean(b >= t_id)),
            "fpr95_ood_positive": float(np.mean(a <= t_ood))}


def _average_ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="mergesort")
    ranks = np.empty(v.size)
    sv = v[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sv)) + 1]
    ends = np.r_[starts[1:], v.size]
    avg = (starts + ends + 1) / 2.0                                  # 1-based average rank per run
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks
