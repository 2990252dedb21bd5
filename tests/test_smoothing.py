"""pyssl.Smooth and pyssl.certified_accuracy: the counts, the statistics, Cohen et al.'s rules."""

import numpy as np
import pytest
import torch
from scipy.stats import norm

import pyssl
from pyssl import reference

from conftest import device_for, gpu_only

SIGMA = 0.5


class LinearTwoClass(torch.nn.Module):
    """Class 1 iff w·v + c > 0: under v = x + σz its probability is Φ((w·x + c) / (σ‖w‖))."""

    def __init__(self, w, c):
        super().__init__()
        self.register_buffer("w", w)
        self.c = c

    def forward(self, v):
        s = v.flatten(1).float() @ self.w + self.c
        return torch.stack([torch.zeros_like(s), s], 1)


def _problem(device="cpu"):
    # 4 images of 16 elements; w = e_0, so the margin is x[0] + c; chosen for p(class 1) =
    # 0.9, 0.999, 0.5 (a tie: abstain) and 0.2 (class 0 at 0.8)
    e = 16
    w = torch.zeros(e)
    w[0] = 1.0
    p1 = torch.tensor([0.9, 0.999, 0.5, 0.2], dtype=torch.float64)
    x = torch.full((4, e), 0.5)
    x[:, 0] = (SIGMA * torch.from_numpy(norm.ppf(p1.numpy()))).float() + 0.5
    model = LinearTwoClass(w, -0.5).to(device)
    p_true = torch.as_tensor(norm.cdf(((x[:, 0].double() - 0.5) / SIGMA).numpy()))
    return x.to(device), model, p_true


def _counts(x, model, num, offset, seed):
    """Votes computed the plain way: the public noise, the model, a bincount per image."""
    y = pyssl.gaussian_noise(x.cpu(), num, SIGMA, seed=seed, sample_offset=offset, backend="cpu")
    pred = model.cpu()(y).argmax(1).view(x.shape[0], num)
    model.to(x.device)
    return np.stack([np.bincount(p.numpy(), minlength=2) for p in pred])


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_certify_equals_cohen_on_the_same_counts(backend):
    x, model, p_true = _problem(device_for(backend))
    n0, n, alpha = 100, 2000, 0.001
    smooth = pyssl.Smooth(model, 2, SIGMA, batch_size=333, seed=5, backend=backend)
    pred, radius = smooth.certify(x, n0, n, alpha)
    c0 = _counts(x, model, n0, 0, 5)
    c1 = _counts(x, model, n, n0, 5)
    tv = pyssl.noise_tv_bound(16)
    for i in range(4):
        want_c, want_r = reference.smooth_certify(c0[i], c1[i], alpha, SIGMA, tv)
        assert int(pred[i]) == want_c
        assert float(radius[i]) == pytest.approx(want_r, rel=1e-5, abs=1e-6)
    # against the closed form: the tie abstains, the others certify the true class with a
    # radius below the true one (each holds with probability >= 1 - alpha)
    assert pred.tolist() == [1, 1, -1, 0] and float(radius[2]) == 0.0
    for i in (0, 1, 3):
        p_top = max(float(p_true[i]), 1 - float(p_true[i]))
        assert 0 < float(radius[i]) <= SIGMA * norm.ppf(p_top)
    # with 2000 samples the bound is tight enough to be within 0.25 of the true radius at p=0.9
    assert SIGMA * norm.ppf(0.9) - float(radius[0]) < 0.25


def test_reference_and_smooth_agree_where_the_bound_is_exactly_one_half():
    """Clopper–Pearson lower bounds of exactly 0.5 (n = 1 at alpha = 0.5; n = 2, n_A = 2 at
    alpha = 0.25) minus a TV bound far below half an ulp: the difference is below 0.5, so both
    the op and the test oracle abstain (the oracle's plain subtraction rounded back to 0.5)."""
    from pyssl import smoothing as S
    for n, alpha in ((1, 0.5), (2, 0.25)):
        tv = pyssl.noise_tv_bound(1)
        pred, radius = S.certify_from_counts(torch.tensor([0]), torch.tensor([n]), n, alpha, 1.0, tv)
        assert (int(pred[0]), float(radius[0])) == (-1, 0.0)
        assert reference.smooth_certify(np.array([1, 0]), np.array([n, 0]), alpha, 1.0, tv) == (-1, 0.0)
        # without a TV bound the bound is 0.5 itself: certified with radius Φ⁻¹(0.5) = 0
        assert reference.smooth_certify(np.array([1, 0]), np.array([n, 0]), alpha, 1.0) == (0, 0.0)


def test_certified_radius_never_exceeds_its_float64_value():
    """Radii come back in float32 rounded toward zero (nearest rounding exceeded the float64
    value in about half the cases), and a generator bound below half an ulp of pA_lower (small
    images) still lowers it: by at least one ulp."""
    import numpy as np
    from scipy.stats import beta
    from pyssl import smoothing as S
    na = torch.arange(600, 1001)
    pred, r = S.certify_from_counts(torch.zeros_like(na), na, 1000, 0.001, 0.5, 0.0)
    lower = beta.ppf(0.001, na.numpy().astype(np.float64), 1000 - na.numpy() + 1)
    exact = 0.5 * norm.ppf(lower)
    assert r.dtype == torch.float32 and (pred == 0).all()
    assert (r.double().numpy() <= exact).all()
    assert (np.nextafter(r.numpy(), np.float32(np.inf)).astype(np.float64) > exact).all()   # the nearest below
    tiny = 392 * 2.0 ** -64          # noise_tv_bound of a 784-element image: < half an ulp of 0.9
    assert 0.9 - tiny == 0.9
    assert (S.pa_lower(na, 1000, 0.001, tiny) < S.pa_lower(na, 1000, 0.001, 0.0)).all()
    torch.testing.assert_close(torch.from_numpy(S.pa_lower(na, 1000, 0.001, 0.0)), torch.from_numpy(lower))


def test_certify_subtracts_the_generator_bound(monkeypatch):
    """The bound is far below a probability's ulp at these sizes, so its subtraction is checked
    with a stand-in bound large enough to change outcomes: certify asks for the bound of one
    image's element count and subtracts it from the Clopper–Pearson bound."""
    from scipy.stats import beta
    from pyssl import smoothing as S
    c_hat, n_a = torch.tensor([1, 0]), torch.tensor([990, 990])
    lower = beta.ppf(0.001, 990, 1000 - 990 + 1)
    p0, r0 = S.certify_from_counts(c_hat, n_a, 1000, 0.001, 0.5, 0.0)
    p1, r1 = S.certify_from_counts(c_hat, n_a, 1000, 0.001, 0.5, lower - 0.6)
    p2, r2 = S.certify_from_counts(c_hat, n_a, 1000, 0.001, 0.5, lower - 0.49)
    assert p0.tolist() == [1, 0] and p1.tolist() == [1, 0] and p2.tolist() == [-1, -1]
    torch.testing.assert_close(r1, torch.full((2,), 0.5 * float(norm.ppf(0.6))))
    assert (r1 < r0).all() and (r2 == 0).all()
    asked = []
    monkeypatch.setattr(S._noise, "noise_tv_bound", lambda numel: asked.append(numel) or 0.3)
    x, model, _ = _problem()
    pred, radius = pyssl.Smooth(model, 2, SIGMA, seed=5, backend="cpu").certify(x, 100, 2000, 0.001)
    assert asked == [16]
    # p = 0.9 and 0.999 still certify with pA_lower − 0.3 > 0.5 (smaller radii); p = 0.8 no longer
    plain = pyssl.Smooth(model, 2, SIGMA, seed=5, backend="cpu")
    monkeypatch.setattr(S._noise, "noise_tv_bound", lambda numel: 0.0)
    pred0, radius0 = plain.certify(x, 100, 2000, 0.001)
    assert pred0.tolist() == [1, 1, -1, 0] and pred.tolist() == [1, 1, -1, -1]
    assert (radius[:2] < radius0[:2]).all()


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_predict_equals_cohen_on_the_same_counts(backend):
    x, model, _ = _problem(device_for(backend))
    n, alpha = 500, 0.001
    got = pyssl.Smooth(model, 2, SIGMA, batch_size=128, seed=9, backend=backend).predict(x, n, alpha)
    counts = _counts(x, model, n, 0, 9)
    assert got.tolist() == [reference.smooth_predict(c, alpha) for c in counts]
    assert got.tolist() == [1, 1, -1, 0]


def test_predict_and_certify_at_their_boundaries(monkeypatch):
    """Cohen et al.'s rules at equality: PREDICT returns the class when the p-value equals
    alpha (abstains only above it); CERTIFY returns the class with radius 0 when pA_lower is
    exactly 1/2 (abstains only below it)."""
    from scipy.stats import binomtest
    from pyssl import smoothing as S
    x, model, _ = _problem()
    counts = torch.tensor([[3, 17], [10, 10], [17, 3], [2, 18]])
    p = binomtest(17, 20, 0.5).pvalue
    smooth = pyssl.Smooth(model, 2, SIGMA, seed=1, backend="cpu")
    monkeypatch.setattr(smooth, "_counts", lambda *a: counts)
    assert smooth.predict(x, 20, p).tolist() == [1, -1, 0, 1]
    assert smooth.predict(x, 20, np.nextafter(p, 0)).tolist() == [-1, -1, -1, 1]
    monkeypatch.setattr(S, "pa_lower", lambda n_a, n, alpha, tv=0.0: np.array([0.5, np.nextafter(0.5, 0), 0.75]))
    pred, radius = S.certify_from_counts(torch.tensor([3, 1, 2]), torch.tensor([9, 9, 9]), 10, 0.01, SIGMA)
    assert pred.tolist() == [3, -1, 2] and radius[:2].tolist() == [0.0, 0.0]
    assert float(radius[2]) == pytest.approx(SIGMA * norm.ppf(0.75), rel=1e-6)


def test_channels_last_batches_give_the_same_votes_on_the_cpu():
    """channels_last=True writes the noisy batch channels-last (for conv nets): the same
    noise, so the same votes as the contiguous batch."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5)).eval()
    x = torch.rand(3, 3, 8, 8)
    seen = []
    net.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    opts = dict(batch_size=64, seed=9, mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3], backend="cpu")
    a = pyssl.Smooth(net, 5, 0.25, **opts)
    b = pyssl.Smooth(net, 5, 0.25, channels_last=True, **opts)
    ca = a._counts(x, 100, 0, a._prepare("t", x, None), "")
    n_plain = len(seen)
    cb = b._counts(x, 100, 0, b._prepare("t", x, None), "")
    assert not any(seen[:n_plain]) and all(seen[n_plain:]) and len(seen) > n_plain
    assert torch.equal(ca, cb)
    assert a.predict(x, 100, 0.01).tolist() == b.predict(x, 100, 0.01).tolist()


def test_triton_backend_counts_match():
    x, model, _ = _problem(device_for("triton"))
    a = pyssl.Smooth(model, 2, SIGMA, batch_size=50, seed=3, backend="triton").certify(x, 10, 40, 0.01)
    b = pyssl.Smooth(model, 2, SIGMA, batch_size=50, seed=3, backend="torch").certify(x, 10, 40, 0.01)
    assert torch.equal(a[0].cpu(), b[0].cpu())
    torch.testing.assert_close(a[1].cpu(), b[1].cpu())


def test_batching_does_not_change_the_result():
    x, model, _ = _problem()
    outs = [pyssl.Smooth(model, 2, SIGMA, batch_size=bs, seed=1).certify(x, 50, 400, 0.01)
            for bs in (7, 64, 10_000)]
    for p, r in outs[1:]:
        assert torch.equal(p, outs[0][0]) and torch.equal(r, outs[0][1])


def test_image_ids_key_the_noise():
    x, model, _ = _problem()
    s = pyssl.Smooth(model, 2, SIGMA, seed=1)
    whole = s._counts(x, 300, 0, s._prepare("t", x, None), "")
    part = s._counts(x[1:3], 300, 0, s._prepare("t", x[1:3], torch.tensor([1, 2])), "")
    assert torch.equal(whole[1:3], part)


def test_image_ids_range_checked_at_the_calls_one_sync(monkeypatch):
    """GPU-resident image_ids are range-checked with the call's one host copy, not by a sync of
    their own (forced here on the CPU): good ids give the same results as the immediate check,
    a bad id still raises naming image_ids, and nothing is returned for it."""
    from pyssl import smoothing
    x, model, _ = _problem()
    s = pyssl.Smooth(model, 2, SIGMA, seed=3)
    ids = torch.tensor([5, 6, 7, 8])
    want_c = s.certify(x, 20, 200, 0.01, image_ids=ids)
    want_p = s.predict(x, 200, 0.01, image_ids=ids)
    monkeypatch.setattr(smoothing, "_defer_range_check", lambda image_ids: True)
    assert s._prepare("t", x, ids)[-1] is not None              # the deferred flag is carried
    got_c = s.certify(x, 20, 200, 0.01, image_ids=ids)
    assert all(torch.equal(a, b) for a, b in zip(want_c, got_c))
    assert torch.equal(s.predict(x, 200, 0.01, image_ids=ids), want_p)
    for bad in (torch.tensor([0, 1, -1, 3]), torch.tensor([0, 1, 2, 2 ** 32])):
        with pytest.raises(ValueError, match=r"image_ids must be in \[0, 2\^32\)"):
            s.certify(x, 20, 200, 0.01, image_ids=bad)
        with pytest.raises(ValueError, match="image_ids"):
            s.predict(x, 200, 0.01, image_ids=bad)


def test_normalization_is_applied_before_the_model():
    seen = {}

    def model(v):
        seen["v"] = v
        return torch.zeros(v.shape[0], 3)

    x = torch.full((1, 3, 2, 2), 0.5)
    pyssl.Smooth(model, 3, 0.0, mean=[0.5, 0.25, 0.0], std=[0.5, 0.25, 1.0], batch_size=4).predict(x, 4, 0.1)
    torch.testing.assert_close(seen["v"][0, :, 0, 0], torch.tensor([0.0, 1.0, 0.5]))


def test_selection_and_estimation_use_disjoint_noise():
    """Estimation samples start after the selection samples: the same counts as a call of the
    public noise with sample_offset = n0, and different from re-using samples [0, n)."""
    x, model, _ = _problem()
    s = pyssl.Smooth(model, 2, SIGMA, seed=4)
    prep = s._prepare("t", x, None)
    est = s._counts(x, 200, 100, prep, "").numpy()
    assert (est == _counts(x, model, 200, 100, 4)).all()
    assert not (est == _counts(x, model, 200, 0, 4)).all()


def test_certified_accuracy():
    pred = torch.tensor([1, 0, 2, -1, 1])
    radius = torch.tensor([0.6, 0.1, 0.3, 0.0, 1.2])
    labels = torch.tensor([1, 0, 1, 3, 1])
    acc = pyssl.certified_accuracy(pred, radius, labels, [0.0, 0.25, 0.5, 1.0, 2.0])
    torch.testing.assert_close(acc, torch.tensor([3 / 5, 2 / 5, 2 / 5, 1 / 5, 0.0]))


def _eager_graphs(monkeypatch):
    """The CUDA-graph path on the CPU: the capture replaced by eager calls of the captured body
    (the warm-up voting into the padding slot, then zeroed, as on the GPU). Returns the list of
    captured steps."""
    from pyssl import smoothing as S

    class Eager:                       # what replay() would run: the captured body
        def __init__(self, body):
            self.body = body
            self.replays = 0

        def replay(self):
            self.replays += 1
            self.body()

    captures = []

    def capture(step):
        step._body()
        step.graph = Eager(step._body)
        step.counts.zero_()
        captures.append(step)

    monkeypatch.setattr(S, "_graphs_on", lambda dev: True)
    monkeypatch.setattr(S._GraphStep, "_capture", capture)
    monkeypatch.setattr(S._GraphStep, "_replay", lambda step: step.graph.replay())
    return captures


def test_graph_step_bookkeeping_without_a_gpu(monkeypatch):
    """The CUDA-graph path's own logic, run on the CPU with the capture replaced by eager calls:
    one step kept per shape and reused across calls, its counts buffer zeroed per call and
    after the warm-up, padding rows of the last partial batch voting into the discarded slot,
    a larger batch of images growing the buffer, and the votes equal to the plain path's."""
    captures = _eager_graphs(monkeypatch)
    x, model, _ = _problem()
    plain = pyssl.Smooth(model, 2, SIGMA, batch_size=300, seed=2, backend="cpu")
    graph = pyssl.Smooth(model, 2, SIGMA, batch_size=300, seed=2, backend="cpu", cuda_graph=True)
    for num, offset, xs in ((100, 0, x), (1000, 100, x), (250, 7, x[:3]), (1000, 100, x)):
        prep_p, prep_g = plain._prepare("t", xs, None), graph._prepare("t", xs, None)
        want = plain._counts(xs, num, offset, prep_p, "")
        got = graph._counts(xs, num, offset, prep_g, "")
        assert torch.equal(got, want), (num, offset)
        assert int(got.sum()) == xs.shape[0] * num
    assert len(captures) == 1 and len(graph._graphs) == 1          # captured once, reused
    big = torch.cat([x] * 20)                                       # 80 images > capacity 64
    got = graph._counts(big, 10, 0, graph._prepare("t", big, None), "")
    assert torch.equal(got, plain._counts(big, 10, 0, plain._prepare("t", big, None), ""))
    assert len(captures) == 2 and captures[-1].capacity == 80
    mode = model.training
    model.train(not mode)                # another mode: captured anew, one graph kept per device
    graph._counts(x, 10, 0, graph._prepare("t", x, None), "")
    assert len(captures) == 3 and len(graph._graphs) == 1
    model.train(mode)
    graph._counts(x, 10, 0, graph._prepare("t", x, None), "")
    assert len(captures) == 4
    # a buffer replaced by a new tensor (what .to() or load_state_dict(assign=True) do): the
    # graph would read the old address; captured anew, and the votes see the new values
    model.w = -model.w.clone()
    got = graph._counts(x, 100, 0, graph._prepare("t", x, None), "")
    assert len(captures) == 5
    assert torch.equal(got, plain._counts(x, 100, 0, plain._prepare("t", x, None), ""))
    model.w = -model.w


def test_graph_buffers_captured_under_inference_mode(monkeypatch):
    """A Smooth whose graph step is first built inside torch.inference_mode (a certification
    script's usual wrapper) still works outside it: the step's static buffers are normal
    tensors, written in place by every later call."""
    captures = _eager_graphs(monkeypatch)
    x, model, _ = _problem()
    plain = pyssl.Smooth(model, 2, SIGMA, batch_size=300, seed=2, backend="cpu")
    graph = pyssl.Smooth(model, 2, SIGMA, batch_size=300, seed=2, backend="cpu", cuda_graph=True)
    with torch.inference_mode():
        first = graph.certify(x, 100, 1000, 0.001)
    again = graph.certify(x, 100, 1000, 0.001)
    want = plain.certify(x, 100, 1000, 0.001)
    assert len(captures) == 1 and not captures[0].counts.is_inference()
    for got in (first, again):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@gpu_only()
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_one_host_sync_per_call(cuda_graph):
    """certify and predict read the device once per call (the counts), whatever the number of
    images, with or without CUDA graphs: the results go back to the GPU from pinned memory and
    a graph's buffer reuse is ordered by an event, not a wait on the host. Counted with torch's
    sync debug mode on a second call (the first captures the graph)."""
    import warnings
    x, model, _ = _problem("cuda")
    s = pyssl.Smooth(model, 2, SIGMA, batch_size=300, seed=2, cuda_graph=cuda_graph)
    s.certify(x, 100, 1000, 0.001)
    for call in (lambda: s.certify(x, 100, 1000, 0.001), lambda: s.predict(x, 1000, 0.001)):
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                call()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in seen if "synchroniz" in str(w.message)]
        assert len(syncs) == 1, [str(w.message) for w in syncs]


@gpu_only("CUDA graphs and autocast need a GPU")
def test_cuda_graph_and_autocast_give_the_same_votes():
    x, model, _ = _problem("cuda")
    plain = pyssl.Smooth(model, 2, SIGMA, batch_size=300, seed=2).certify(x, 100, 1000, 0.001)
    graph = pyssl.Smooth(model, 2, SIGMA, batch_size=300, seed=2, cuda_graph=True).certify(x, 100, 1000, 0.001)
    assert torch.equal(plain[0], graph[0]) and torch.equal(plain[1], graph[1])
    amp = pyssl.Smooth(model, 2, SIGMA, batch_size=300, seed=2, autocast=torch.bfloat16).certify(x, 100, 1000, 0.001)
    assert amp[0].tolist() == plain[0].tolist()


@gpu_only("CUDA graphs and autocast need a GPU")
def test_cuda_graph_with_a_conv_net_autocast_and_channels_last():
    """The benchmark's configuration: a model with parameters (autocast's weight casts inside
    the capture), channels_last noise, bf16; the graph gives the same votes as eager calls,
    over two calls that reuse one captured graph."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5))
    net = net.cuda().eval().to(memory_format=torch.channels_last)
    x = torch.rand(3, 3, 16, 16, device="cuda")
    opts = dict(batch_size=128, seed=9, autocast=torch.bfloat16, channels_last=True,
                mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])
    eager = pyssl.Smooth(net, 5, 0.25, **opts)
    graph = pyssl.Smooth(net, 5, 0.25, cuda_graph=True, **opts)
    for num, offset in ((50, 0), (500, 50)):
        a = eager._counts(x, num, offset, eager._prepare("t", x, None), "")
        b = graph._counts(x, num, offset, graph._prepare("t", x, None), "")
        assert int(b.sum()) == 3 * num
        # the same noise and model; bf16 kernels chosen under capture may round differently,
        # which can flip a near-tied argmax now and then, never more
        assert int((a - b).abs().sum()) <= 0.02 * 3 * num
    assert len(graph._graphs) == 1


# ---------------------------------------------------------------- bad input

def test_certified_accuracy_refuses_ignore_labels_and_bad_radii():
    # a label of -1 (a common "ignore" id) would match an abstention and count it as certified
    pred, ints = torch.tensor([-1, 1]), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="certified_accuracy: labels must be class ids >= 0"):
        pyssl.certified_accuracy(pred, torch.zeros(2), torch.tensor([-1, 1]), [0.0])
    with pytest.raises(ValueError, match="certified_accuracy: prediction must be class ids >= 0 or -1"):
        pyssl.certified_accuracy(torch.tensor([-2, 1]), torch.zeros(2), ints, [0.0])
    with pytest.raises(ValueError, match="certified_accuracy: radius must be >= 0"):
        pyssl.certified_accuracy(pred, torch.tensor([0.0, -0.5]), ints, [0.0])
    with pytest.raises(ValueError, match="certified_accuracy: prediction must hold integer class ids"):
        pyssl.certified_accuracy(torch.tensor([True, False]), torch.zeros(2), ints, [0.0])
    # a float64 radius is compared in float64: just below r (float32 would round it to r) does
    # not count
    r = torch.tensor([0.0, 0.5 - 1e-12], dtype=torch.float64)
    torch.testing.assert_close(pyssl.certified_accuracy(pred, r, ints, [0.5, 0.4]), torch.tensor([0.0, 0.5]))
    # a float32 radius against an r between two floats: exact (r rounded up, not to nearest)
    r32 = torch.tensor([0.0, 0.5])
    torch.testing.assert_close(pyssl.certified_accuracy(pred, r32, ints, [0.5 + 1e-12, 0.5]), torch.tensor([0.0, 0.5]))


@pytest.mark.parametrize("backend", ["auto", "cpu", "torch"])
def test_batch_dtype_follows_the_model(backend):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64)     # float64 images (numpy / 255, say)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    m = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    sd = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    # a float32 model gets float32 batches (on every backend) ...
    seen = []
    model32 = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))
    model32.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].dtype))
    pred = pyssl.Smooth(model32, 3, 0.0, mean=mean, std=std, batch_size=7, backend=backend).predict(x, 20, 0.01)
    assert set(seen) == {torch.float32}
    assert torch.equal(pred, model32(((x - m) / sd).float()).argmax(1))
    # ... a bfloat16 one bfloat16 batches (no autocast needed) ...
    seen.clear()
    model16 = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3)).bfloat16()
    model16.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].dtype))
    pred = pyssl.Smooth(model16, 3, 0.0, mean=mean, std=std, batch_size=7, backend=backend).predict(x, 20, 0.01)
    assert set(seen) == {torch.bfloat16}
    assert torch.equal(pred, model16(((x - m) / sd).float().bfloat16()).argmax(1))
    # ... a float64 one float64 batches, normalized in float64 (sigma 0: the image itself)
    if backend == "cpu":
        return        # the C++ kernel writes float32/bfloat16/float16
    model64 = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3)).double()
    pred = pyssl.Smooth(model64, 3, 0.0, mean=mean, std=std, batch_size=7, backend=backend).predict(x, 20, 0.01)
    assert torch.equal(pred, model64((x - m) / sd).argmax(1))


def test_model_output_is_checked():
    x, model, _ = _problem()
    with pytest.raises(TypeError, match="Smooth: model must return a logits tensor"):
        pyssl.Smooth(lambda v: (model(v),), 2, SIGMA).predict(x, 10, 0.01)
    with pytest.raises(ValueError, match=r"Smooth: model must return logits \(batch, 2\)"):
        pyssl.Smooth(lambda v: model(v)[:-1], 2, SIGMA, batch_size=8).predict(x, 10, 0.01)


def test_mean_std_checked_when_set_and_changes_take_effect():
    with pytest.raises(ValueError, match="Smooth: std must be > 0"):
        pyssl.Smooth(lambda v: v, 3, 0.5, std=[0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="Smooth: mean must be finite"):
        pyssl.Smooth(lambda v: v, 3, 0.5, mean=float("nan"))
    seen = {}

    def model(v):
        seen["v"] = v
        return torch.zeros(v.shape[0], 3)

    x = torch.full((1, 3, 2, 2), 0.5)
    s = pyssl.Smooth(model, 3, 0.0, mean=0.5, batch_size=4)
    s.predict(x, 4, 0.1)
    assert float(seen["v"].abs().max()) == 0.0
    s.mean = np.float32(0.25)      # numpy scalars are numbers too; the cached normalization is dropped
    assert s.mean == np.float32(0.25)   # the getter gives back what was set
    s.predict(x, 4, 0.1)
    torch.testing.assert_close(seen["v"], torch.full_like(seen["v"], 0.25))
    with pytest.raises(ValueError, match="Smooth: std must be > 0"):
        s.std = -1.0


def test_bad_input():
    x, model, _ = _problem()
    s = pyssl.Smooth(model, 2, SIGMA)
    with pytest.raises(ValueError, match="n0"):
        s.certify(x, 0, 10, 0.01)
    with pytest.raises(ValueError, match="alpha"):
        s.certify(x, 10, 10, 0.0)
    with pytest.raises(ValueError, match="alpha"):
        s.predict(x, 10, 1.0)
    with pytest.raises(ValueError, match="n must"):
        s.predict(x, 0, 0.01)
    with pytest.raises(ValueError, match="num_classes"):
        pyssl.Smooth(model, 1, SIGMA)
    with pytest.raises(ValueError, match="sigma"):
        pyssl.Smooth(model, 2, float("inf"))
    with pytest.raises(ValueError, match="batch_size"):
        pyssl.Smooth(model, 2, SIGMA, batch_size=0)
    with pytest.raises(TypeError, match="model"):
        pyssl.Smooth("resnet", 2, SIGMA)
    with pytest.raises(ValueError, match="logits"):
        pyssl.Smooth(model, 3, SIGMA).predict(x, 10, 0.01)
    with pytest.raises(ValueError, match="image_ids"):
        s.predict(x, 10, 0.01, image_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="x is on meta but the model's parameters and buffers are on cpu"):
        pyssl.Smooth(torch.nn.Linear(16, 2), 2, SIGMA).certify(x.to("meta"), 10, 10, 0.01)
    # an image beyond the element counter's 2^34 (an expanded view: no memory): refused before any
    # noise, as gaussian_noise refuses it (the counter would wrap and reuse noise)
    huge = torch.zeros(1, 1, 1, 1).expand(1, 1, 2 ** 17 + 1, 2 ** 17)
    with pytest.raises(ValueError, match="at most 2\\^34 elements"):
        s.certify(huge, 1, 1, 0.01)
    # one image (C, H, W) where a batch is expected, as Cohen et al.'s certify takes it: the
    # per-channel error names the likely cause
    rgb = pyssl.Smooth(model, 2, SIGMA, mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.2])
    with pytest.raises(ValueError, match=r"mean must have one value per channel.*pass x\[None\]"):
        rgb.certify(torch.rand(3, 4, 4), 10, 10, 0.01)
    with pytest.raises(ValueError, match="same length"):
        pyssl.certified_accuracy(torch.zeros(3, dtype=torch.int64), torch.zeros(2), torch.zeros(3, dtype=torch.int64), [0.0])
    with pytest.raises(ValueError, match="radii"):
        pyssl.certified_accuracy(torch.zeros(3, dtype=torch.int64), torch.zeros(3), torch.zeros(3, dtype=torch.int64), [])
    with pytest.raises(ValueError, match="integer"):
        pyssl.certified_accuracy(torch.zeros(3), torch.zeros(3), torch.zeros(3), [0.0])
    with pytest.raises(ValueError, match="NaN"):
        pyssl.certified_accuracy(torch.zeros(3, dtype=torch.int64), torch.tensor([0.0, float("nan"), 1.0]),
                                 torch.zeros(3, dtype=torch.int64), [0.0])
    ints = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(TypeError, match="radii must be a sequence of numbers, got None"):
        pyssl.certified_accuracy(ints, torch.zeros(3), ints, None)
    with pytest.raises(TypeError, match="radii must be a sequence of numbers"):
        pyssl.certified_accuracy(ints, torch.zeros(3), ints, ["abc"])
    with pytest.raises(ValueError, match="radii must be a number or a 1-d sequence"):
        pyssl.certified_accuracy(ints, torch.zeros(3), ints, [[0.0, 0.5]])
    with pytest.raises(ValueError, match="n must be <= 2"):
        s.predict(x, 2 ** 32 + 1, 0.01)
