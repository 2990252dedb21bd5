"""Randomized smoothing (Cohen et al. 2019) on the fused noise generator: prediction and
certification with on-device counting.

    smooth = pyssl.Smooth(model, num_classes, sigma, mean=..., std=..., batch_size=1000, seed=0)
    pred = smooth.predict(x, n=10_000, alpha=0.001)                 # (B,), -1 = abstain
    pred, radius = smooth.certify(x, n0=100, n=100_000, alpha=0.001)
    acc = pyssl.certified_accuracy(pred, radius, labels, radii=[0.0, 0.25, 0.5])

How it runs: the B·n noisy inputs of a call are cut into forward batches of batch_size rows
that span image boundaries (the n0 = 100 selection pass of 16 images is one forward of 1600,
not 16 forwards of 100). Each row's noise comes from the counter scheme of pyssl.gaussian_noise
with sample index j: selection uses j in [0, n0), estimation j in [n0, n0 + n) — disjoint
counter ranges, so the two passes are independent — and predict uses j in [0, n). The class
votes are added into a (B, K) count tensor on the device; the host reads the counts once per
call (one synchronization for all B images), then computes the statistics with scipy.

Certificates: pA_lower = the one-sided Clopper–Pearson lower bound at level alpha on the top
class's count (scipy.stats.beta.ppf(alpha, nA, n − nA + 1); 0 when nA = 0), minus
pyssl.noise_tv_bound for an image of this size (the Gaussian tail mass the generator cannot
reach; not a bound on the literal total-variation distance, which is 1 for any floating-point
sampler: certificates hold for the idealized Gaussian up to that discretization, see
pyssl/ops/noise.py); abstain
(−1, radius 0) when pA_lower < 0.5, else radius = sigma·Φ⁻¹(pA_lower). predict abstains
unless the two-sided binomial test of the top two counts (scipy.stats.binomtest, p = ½)
rejects at level alpha.

On CUDA, `autocast=torch.bfloat16` (or float16) runs the model under torch.autocast and writes
the noise directly in that dtype, and `cuda_graph=True` captures the model forward, the argmax
and the count update as one CUDA graph per (device, batch size, image shape, dtype, layout) and
replays it for every batch of every later call (the last, partial batch is padded with rows
whose votes land in a discarded slot); one graph per device is kept, calls that use it take
turns (a lock), and a different model object, train/eval mode or parameters and buffers
replaced by new tensors (model.to(...), load_state_dict(..., assign=True)) are captured anew.
The graph reads the model's parameters in place, so in-place updates are seen;
clear_cuda_graphs() frees the captured graphs.
"""
from __future__ import annotations

import contextlib

import threading
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from pyssl import _checks
from pyssl.ops import noise as _noise


def _check_alpha(fn, alpha):
    alpha = _checks.real(fn, "alpha", alpha)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"{fn}: alpha must be in (0, 1), got {alpha!r}")
    return alpha


def _progress(total, desc, enabled):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:   # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, desc=desc, unit="sample", leave=False)


class Smooth:
    """The smoothed classifier g(x) = argmax_c P(model(normalize(x + σ·z)) = c).

    model: maps a normalized batch (bs, ...) to logits (bs, num_classes). x given to predict and
    certify is in pixel space ([0, 1]); mean/std normalize after the noise, fused into it.
    batch_size: rows per model forward. seed: the noise seed (results are reproducible).
    image_ids (per call): the ids that key each image's noise (default 0..B−1); pass dataset
    indices to give every image of a dataset its own noise across calls (with the default, the
    i-th image of every batch gets the same noise: each certificate holds alone, but those of a
    dataset certified batch by batch are then dependent); CPU ids (as a DataLoader yields them)
    are range-checked on the host and copied without a device sync.
    """

    def __init__(self, model, num_classes: int, sigma: float, *, mean=None, std=None,
                 batch_size: int = 1000, seed: int = 0, autocast: Optional[torch.dtype] = None,
                 cuda_graph: bool = False, channels_last: bool = False, backend: str = "auto",
                 progress: bool = False):
        fn = "Smooth"
        if not callable(model):
            raise TypeError(f"{fn}: model must be callable, got {type(model).__name__}")
        num_classes = _checks.integer(fn, "num_classes", num_classes, lo=2)
        self.sigma = _checks.real(fn, "sigma", sigma, nonnegative=True)
        batch_size = _checks.integer(fn, "batch_size", batch_size, lo=1)
        seed = _checks.integer(fn, "seed", seed, lo=0, hi=_noise.SEED_LIMIT - 1)
        if autocast not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"{fn}: autocast must be None, torch.bfloat16 or torch.float16, got {autocast}")
        self.model = model
        self.num_classes = num_classes
        self._affine = {}      # (device, channels, dtype) -> (a, b) on that device
        self.mean, self.std = mean, std   # checked here (properties), not at the first call
        self.batch_size = batch_size
        self.seed = seed
        self.autocast = autocast
        self.cuda_graph = bool(cuda_graph)
        self.channels_last = bool(channels_last)
        self.backend = backend
        self.progress = progress
        self._graphs = {}      # (device, bs, image shape, dtype, layout, model) -> _GraphStep
        self._graph_lock = threading.Lock()

    # mean/std: checked when set (the getters return what was set). Each change replaces the
    # cache of device copies after the checked values: a call that read the old values can only
    # have filled the old cache, so no stale normalization survives a change
    @property
    def mean(self):
        return self._mean

    @mean.setter
    def mean(self, value):
        self._mean, self._mean_checked = value, _noise.affine_values("Smooth", value, None)[0]
        self._affine = {}

    @property
    def std(self):
        return self._std

    @std.setter
    def std(self, value):
        self._std, self._std_checked = value, _noise.affine_values("Smooth", None, value)[1]
        self._affine = {}

    def clear_cuda_graphs(self) -> None:
        """Drop the captured CUDA graphs (and their static buffers); the next call recaptures."""
        with self._graph_lock:
            for step in self._graphs.values():
                step.release()
            self._graphs.clear()

    # ---------------------------------------------------------------------------------------
    def _prepare(self, fn, x, image_ids):
        _noise._check_x(fn, x)
        # a GPU x beside a model elsewhere (a CPU x may feed a model that moves its input,
        # nn.DataParallel): said here, not as an error from inside the model
        where = {t.device for t in _model_tensors(self.model)}
        if x.device.type != "cpu" and where and x.device not in where:
            raise ValueError(f"{fn}: x is on {x.device} but the model's parameters and buffers are on "
                             f"{', '.join(sorted(str(d) for d in where))}")
        # ids already on a GPU: their range flag rides along with the call's one host copy
        # instead of costing a sync of its own (kernels take ids as 32-bit counter words, so
        # counting with a bad id first is harmless; its results are never returned)
        defer = _defer_range_check(image_ids)
        ids = _noise._check_image_ids(fn, image_ids, x.shape[0], x.device, check_range=not defer)
        bad = _noise.image_ids_out_of_range(ids) if defer else None
        if self.channels_last and x.dim() != 4:
            raise ValueError(f"{fn}: channels_last needs a 4-d x (B, C, H, W), got shape {tuple(x.shape)}")
        # the batch dtype, whatever x's: the autocast dtype on CUDA; else the dtype of the
        # model's parameters (a .half() / .bfloat16() / .double() model gets its own dtype,
        # written directly by the noise kernels); float32 for a model without parameters
        if self.autocast is not None and x.device.type == "cuda":
            out_dtype = self.autocast
        else:
            pd = _param_dtype(self.model)
            out_dtype = pd if pd in (torch.float16, torch.bfloat16, torch.float64) else torch.float32
        # device copies of mean/std made once per (device, channels, dtype), not once per call
        cache = self._affine    # before the values: see the mean/std setters
        key = (x.device, x.shape[1] if x.dim() > 1 else 0, out_dtype)
        ab = cache.get(key)
        if ab is None:
            # a blocking copy (once per Smooth, device, channels and dtype): calls on other
            # streams read the cached tensors without ordering against this one
            ab = cache[key] = _noise._channel_affine(fn, x, self._mean_checked, self._std_checked,
                                                     _noise._engine_dtype(out_dtype), blocking=True)
        a, b = ab
        backend = _noise._dispatch.choose(fn, self.backend, x.device, _noise._PREFERENCE,
                                          _noise._backend_checks(x, out_dtype))
        return ids, a, b, out_dtype, backend, bad

    def _counts(self, x: Tensor, num: int, offset: int, prep, desc: str) -> Tensor:
        """Votes (B, K) int64 on x's device for samples [offset, offset + num) of every image."""
        if self.cuda_graph and _graphs_on(x.device):
            # a captured graph's static buffers serve one call at a time
            with self._graph_lock:
                return self._counts_unlocked(x, num, offset, prep, desc, True)
        return self._counts_unlocked(x, num, offset, prep, desc, False)

    def _counts_unlocked(self, x: Tensor, num: int, offset: int, prep, desc: str, use_graph: bool) -> Tensor:
        B, K = x.shape[0], self.num_classes
        dev = x.device
        out_dtype = prep[3]
        # the engine reads float32 (float64 for float64 output) (B, E) images: convert once per
        # call, not once per batch
        x = x.to(_noise._engine_dtype(out_dtype)).contiguous()
        bs = self.batch_size
        step = None
        if use_graph:
            # the model's identity and mode are part of the key: a swapped model or one put in
            # train() is captured anew instead of replaying a stale graph
            # so are the classes and the autocast in force (the caller's and ours): a graph
            # captured under one replays its casts
            key = (dev, bs, tuple(x.shape[1:]), out_dtype, self.channels_last, id(self.model),
                   getattr(self.model, "training", None), self.num_classes, self.autocast,
                   torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
            step = self._graphs.get(key)
            # (the step holds its model, so the id cannot be reused by a new model while the
            # graph lives; `is` makes sure anyway). The graph reads the parameters and buffers
            # at the addresses they had after its capture: a model moved or reloaded into new
            # tensors since (.to(), load_state_dict(assign=True)) is captured anew instead of
            # read from freed memory
            if (step is None or step.capacity < B or step.model is not self.model
                    or (step.storage is not None and step.storage != _storage_key(self.model))):
                # one graph per device: each holds a private memory pool of a batch's activations
                for k in [k for k in self._graphs if k[0] == dev]:
                    self._graphs.pop(k).release()
                step = self._graphs[key] = _GraphStep(self, x, bs, out_dtype, max(B, 64))
            counts = step.begin()
        else:
            counts = torch.zeros((B + 1) * K, dtype=torch.int64, device=dev)   # last slot: padding
        bar = _progress(B * num, desc, self.progress)
        out = counts[:B * K].view(B, K)
        try:
            self._batches(x, num, offset, prep, step, counts, bar)
            if step is not None:
                out = out.clone()    # the graph's counts buffer is reused by the next call
        finally:
            if bar is not None:
                bar.close()
            if step is not None:
                # mark where this call's work ends on its stream (also after an error): the next
                # begin() (maybe another thread's, on another stream) waits for that mark on the
                # device before zeroing the buffer under a pending replay. No host sync: the
                # call's one sync is the caller's read of the counts
                step.finished()
        return out

    def _batches(self, x: Tensor, num: int, offset: int, prep, step, counts: Tensor, bar) -> None:
        """The forward batches of one call: noise rows, model, argmax, votes added into counts
        (through the captured graph when step is given)."""
        ids, a, b, out_dtype, backend, _ = prep
        K, dev, bs = self.num_classes, x.device, self.batch_size
        total = x.shape[0] * num
        ones = torch.ones(bs, dtype=torch.int64, device=dev)
        with torch.no_grad():
            for r0 in range(0, total, bs):
                rows = min(bs, total - r0)
                r = torch.arange(r0, r0 + rows, device=dev, dtype=torch.int64)
                src = torch.div(r, num, rounding_mode="floor")
                sample = r - src * num + offset
                if step is not None:
                    step.run(x, src, sample, ids, a, b, backend)
                else:
                    noisy = _noise.noise_rows(x, src, sample, self.sigma, seed=self.seed,
                                              image_ids=ids, a=a, b=b, out_dtype=out_dtype,
                                              channels_last=self.channels_last, backend=backend)
                    pred = self._forward(noisy).argmax(1)
                    counts.index_add_(0, src * K + pred, ones[:rows])
                if bar is not None:
                    bar.update(rows)

    def _forward(self, batch: Tensor) -> Tensor:
        if self.autocast is not None and batch.device.type == "cuda":
            with torch.autocast("cuda", dtype=self.autocast):
                logits = self.model(batch)
        else:
            logits = self.model(batch)
        if not isinstance(logits, Tensor):
            raise TypeError(f"Smooth: model must return a logits tensor (batch, {self.num_classes}), "
                            f"got {type(logits).__name__}")
        if logits.dim() != 2 or logits.shape != (batch.shape[0], self.num_classes):
            raise ValueError(f"Smooth: model must return logits (batch, {self.num_classes}) = "
                             f"({batch.shape[0]}, {self.num_classes}), got shape {tuple(logits.shape)}")
        return logits

    def _host(self, fn, columns, prep) -> Tensor:
        """(B, len(columns)) int64 on the host in one copy, with the deferred image_ids check."""
        bad = prep[-1]
        if bad is not None:
            columns = columns + [bad.to(torch.int64).expand(columns[0].shape[0])]
        host = torch.stack(columns, 1).cpu()
        if bad is not None:
            if bool(host[0, -1]):
                _noise.raise_image_ids_range(fn, prep[0].cpu())
            host = host[:, :-1]
        return host

    # ---------------------------------------------------------------------------------------
    def predict(self, x: Tensor, n: int, alpha: float, *, image_ids=None) -> Tensor:
        """Class per image, −1 where the top two counts of n samples are not separated at alpha."""
        fn = "Smooth.predict"
        n = _checks.integer(fn, "n", n, lo=1)
        if n > _noise.SAMPLE_LIMIT:
            raise ValueError(f"{fn}: n must be <= 2^32 (the sample counter), got {n}")
        alpha = _check_alpha(fn, alpha)
        prep = self._prepare(fn, x, image_ids)
        counts = self._counts(x, n, 0, prep, "predict")
        top = counts.topk(2, dim=1)
        # ties go to the lower class index: topk's order among equal counts is not specified
        first = counts.argmax(1)
        host = self._host(fn, [first, top.values[:, 0], top.values[:, 1]], prep)   # one sync
        from scipy.stats import binomtest
        out = torch.full((x.shape[0],), -1, dtype=torch.int64)
        for i, (c, na, nb) in enumerate(host.tolist()):
            if binomtest(int(na), int(na + nb), 0.5).pvalue <= alpha:
                out[i] = c
        return _checks.host_to(out, x.device)

    def certify(self, x: Tensor, n0: int, n: int, alpha: float, *, image_ids=None
                ) -> Tuple[Tensor, Tensor]:
        """(prediction (B,), radius (B,)): selection from n0 samples, certification from n more."""
        fn = "Smooth.certify"
        n0 = _checks.integer(fn, "n0", n0, lo=1)
        n = _checks.integer(fn, "n", n, lo=1)
        alpha = _check_alpha(fn, alpha)
        if n0 + n > _noise.SAMPLE_LIMIT:
            raise ValueError(f"{fn}: n0 + n must be <= 2^32, got {n0 + n}")
        prep = self._prepare(fn, x, image_ids)
        c_hat = self._counts(x, n0, 0, prep, "certify: selection").argmax(1)
        counts = self._counts(x, n, n0, prep, "certify: estimation")
        n_a = counts.gather(1, c_hat[:, None])[:, 0]
        host = self._host(fn, [c_hat, n_a], prep)          # the one host sync of the call
        tv = _noise.noise_tv_bound(x[0].numel())
        pred, radius = certify_from_counts(host[:, 0], host[:, 1], n, alpha, self.sigma, tv)
        # through pinned memory: a plain copy to the GPU would wait for the stream (a second sync)
        return _checks.host_to(pred, x.device), _checks.host_to(radius, x.device)


def certify_from_counts(c_hat: Tensor, n_a: Tensor, n: int, alpha: float, sigma: float,
                        tv_bound: float = 0.0) -> Tuple[Tensor, Tensor]:
    """The certification rule on counts: pA_lower = Clopper–Pearson(alpha) − tv_bound."""
    from scipy.stats import norm
    import numpy as np
    lower = pa_lower(n_a, n, alpha, tv_bound)
    ok = lower >= 0.5
    radius = np.where(ok, sigma * norm.ppf(np.clip(lower, 0.5, 1.0)), 0.0)
    # float32 radii rounded toward zero: a certificate never claims more than the float64 value
    r32 = radius.astype(np.float32)
    r32 = np.where(r32.astype(np.float64) > radius, np.nextafter(r32, np.float32(0)), r32)
    pred = torch.where(torch.from_numpy(ok), c_hat.cpu(), torch.full_like(c_hat.cpu(), -1))
    return pred, torch.from_numpy(r32)


def pa_lower(n_a: Tensor, n: int, alpha: float, tv_bound: float = 0.0):
    """pA_lower (float64 numpy): the one-sided (1 − alpha) Clopper–Pearson lower bound of n_a
    successes in n, minus tv_bound."""
    from scipy.stats import beta
    import numpy as np
    na = n_a.cpu().numpy().astype(np.float64)
    with np.errstate(all="ignore"):
        lower = np.where(na > 0, beta.ppf(alpha, np.maximum(na, 1), n - na + 1), 0.0)
    if tv_bound > 0:
        # one ulp further down: a bound below half an ulp of the Clopper-Pearson value (images
        # of fewer than ~6,000 elements) would otherwise be lost to the subtraction's rounding
        lower = np.nextafter(lower - tv_bound, -np.inf)
    return lower


def _defer_range_check(image_ids) -> bool:
    return isinstance(image_ids, Tensor) and image_ids.device.type != "cpu"


def _graphs_on(device: torch.device) -> bool:
    return device.type == "cuda"


class _GraphStep:
    """One forward batch as a replayed CUDA graph: static noisy input, model, argmax, count update.

    Captured once and kept by the Smooth for its (device, batch size, image shape, dtype,
    layout): later calls replay it with no warm-up or capture cost. The counts buffer is static
    too, with room for `capacity` images and a padding slot after them; begin() zeroes it. The
    noise kernel writes the static input outside the graph (its row tensors change per batch)."""

    def __init__(self, smooth: Smooth, x: Tensor, bs: int, out_dtype, capacity: int):
        self.smooth = smooth
        # the captured graph reads this model's parameters in place: it must outlive the graph
        self.model = smooth.model
        self.bs = bs
        self.K = smooth.num_classes
        self.capacity = capacity
        dev = x.device
        # normal tensors even when the capturing call runs under torch.inference_mode: later
        # calls outside it write these buffers in place, which inference tensors refuse
        with torch.inference_mode(False):
            self.counts = torch.zeros((capacity + 1) * self.K, dtype=torch.int64, device=dev)
            self.static_src = torch.full((bs,), capacity, dtype=torch.int64, device=dev)
            self.ones = torch.ones(bs, dtype=torch.int64, device=dev)
            self.flat = torch.zeros((bs, x[0].numel()), dtype=out_dtype, device=dev)
            self.static_in = _noise._as_output(self.flat, x, bs, smooth.channels_last)
        self.chw = _noise._chw(x)
        self.graph = None
        self.done = None      # CUDA event after the last call's use of the static buffers
        self.storage = None   # _storage_key of the model after the capture

    def begin(self) -> Tensor:
        """The zeroed counts buffer, after the previous call's replays and copy (in device order
        on the current stream, which may differ from that call's)."""
        if self.done is not None:
            torch.cuda.current_stream(self.counts.device).wait_event(self.done)
        self.counts.zero_()
        return self.counts

    def finished(self) -> None:
        if self.counts.is_cuda:
            self.done = torch.cuda.Event()
            self.done.record(torch.cuda.current_stream(self.counts.device))

    def release(self) -> None:
        """Before the step is dropped: its buffers go back to the allocator, which orders their
        reuse only on the stream they were made on; the last call's replays may be queued on
        another (one host wait, on a recapture or clear_cuda_graphs() only)."""
        if self.done is not None:
            self.done.synchronize()

    def _body(self):
        # autocast's weight-cast cache off (the autocast in force kept as it is): with it, an
        # enclosing autocast region would keep the casts made in the warm-up, outside the graph's
        # pool, and the graph would read them after they are freed, and never see updated weights
        ctx = (torch.autocast("cuda", enabled=torch.is_autocast_enabled("cuda"),
                              dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
               if self.counts.is_cuda else contextlib.nullcontext())
        with ctx:
            pred = self.smooth._forward(self.static_in).argmax(1)
        self.counts.index_add_(0, self.static_src * self.K + pred, self.ones)

    def _capture(self):
        with torch.cuda.device(self.counts.device):
            current = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(current)
            with torch.cuda.stream(side):
                self._body()             # one warm-up outside the graph (allocator, cuDNN choice)
            current.wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # captured on this device's own stream (torch's default capture stream belongs to the
            # device of a process's first capture: a graph on cuda:1 after one on cuda:0 recorded
            # nothing), and only this thread's CUDA calls checked (a DataLoader's pin-memory
            # thread allocating meanwhile would otherwise break the capture)
            with torch.cuda.graph(self.graph, stream=side, capture_error_mode="thread_local"):
                self._body()
        # the warm-up voted: zero the counts after it, in stream order
        self.counts.zero_()

    def _replay(self):
        with torch.cuda.device(self.counts.device):
            self.graph.replay()

    def run(self, x, src, sample, ids, a, b, backend):
        rows = src.shape[0]
        pad = self.bs - rows
        full_src = src if pad == 0 else torch.cat([src, src.new_zeros(pad)])
        full_sample = sample if pad == 0 else torch.cat([sample, sample.new_zeros(pad)])
        s = self.smooth
        # x arrives in the engine dtype and contiguous (Smooth._counts): the flat view is free
        _noise._noise_rows(x.view(x.shape[0], -1), full_src, full_sample, ids, a, b, s.sigma, s.seed, 0,
                           self.flat.dtype, s.channels_last, self.chw, backend, out=self.flat)
        if self.graph is None:
            self._capture()
            self.storage = _storage_key(self.smooth.model)
        # votes of padding rows go to the slot after the last image
        slot = full_src if pad == 0 else torch.cat([src, src.new_full((pad,), self.capacity)])
        self.static_src.copy_(slot)
        self._replay()


def _model_tensors(model) -> list:
    """The model's parameters and buffers (none for a plain callable; lazy modules' not yet
    materialized ones left out)."""
    tensors = []
    for attr in ("parameters", "buffers"):
        f = getattr(model, attr, None)
        if callable(f):
            tensors.extend(t for t in f() if not torch.nn.parameter.is_lazy(t))
    return tensors


def _storage_key(model) -> tuple:
    """Where the model's parameters and buffers live (their data pointers)."""
    return tuple(t.data_ptr() for t in _model_tensors(model))


def _param_dtype(model) -> Optional[torch.dtype]:
    """dtype of the model's first floating-point parameter (None for a plain callable)."""
    params = getattr(model, "parameters", None)
    if not callable(params):
        return None
    for p in params():
        if p.is_floating_point():
            return p.dtype
    return None


def certified_accuracy(prediction: Tensor, radius: Tensor, labels: Tensor,
                       radii: Sequence[float]) -> Tensor:
    """Fraction of images with prediction == label and radius >= r, for each r in radii."""
    fn = "certified_accuracy"
    for name, t in (("prediction", prediction), ("radius", radius), ("labels", labels)):
        _checks.tensor(fn, name, t)
        if t.dim() != 1:
            raise ValueError(f"{fn}: {name} must be 1-d, got shape {tuple(t.shape)}")
    if not (prediction.shape == radius.shape == labels.shape):
        raise ValueError(f"{fn}: prediction, radius and labels must have the same length, got "
                         f"{prediction.shape[0]}, {radius.shape[0]}, {labels.shape[0]}")
    if prediction.numel() == 0:
        raise ValueError(f"{fn}: prediction is empty")
    if not (prediction.device == radius.device == labels.device):
        raise ValueError(f"{fn}: prediction, radius and labels must be on one device, got "
                         f"{prediction.device}, {radius.device}, {labels.device}")
    for name, t in (("prediction", prediction), ("labels", labels)):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{fn}: {name} must hold integer class ids, got {t.dtype}")
    if radius.is_complex() or radius.dtype == torch.bool:
        raise ValueError(f"{fn}: radius must be real, got {radius.dtype}")
    # one host read for every value check: a label of -1 would match an abstention (-1) and
    # count it as certified
    bad = torch.stack([(labels < 0).any(), (prediction < -1).any(), torch.isnan(radius).any(),
                       (radius < 0).any()]).tolist()
    for flag, msg in zip(bad, ("labels must be class ids >= 0",
                               "prediction must be class ids >= 0 or -1 (abstain)",
                               "radius has NaN entries", "radius must be >= 0 (0 for an abstention)")):
        if flag:
            raise ValueError(f"{fn}: {msg}")
    try:
        r = torch.as_tensor(radii, dtype=torch.float64).cpu()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{fn}: radii must be a sequence of numbers, got {radii!r}") from None
    if r.dim() > 1:
        raise ValueError(f"{fn}: radii must be a number or a 1-d sequence, got shape {tuple(r.shape)}")
    r = r.reshape(-1)
    if r.numel() == 0:
        raise ValueError(f"{fn}: radii is empty")
    if not bool(torch.isfinite(r).all()):
        raise ValueError(f"{fn}: radii must be finite, got {r.tolist()}")
    # on the inputs' device: no copy of the per-image tensors to the host. A float64 radius is
    # compared in float64; otherwise in float32 against each r rounded up to float32, which is
    # exact: for a float32 radius, radius >= r iff radius >= the smallest float32 >= r (and
    # devices without float64 need no float64 there)
    correct = prediction == labels
    if radius.dtype == torch.float64:
        rad, rr = radius.detach(), r
    else:
        rad = radius.detach().float()
        rr = r.float()
        below = rr.double() < r
        rr = torch.where(below, torch.nextafter(rr, torch.full_like(rr, float("inf"))), rr)
    rr = rr.to(rad.device)
    return (correct[None, :] & (rad[None, :] >= rr[:, None])).float().mean(1)
