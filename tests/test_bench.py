"""The benchmark suite itself: its naive baselines compute the op, and the harness measures."""
import dataclasses
import importlib
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from tqdm import tqdm

from pyssl import reference as R
from bench import harness
from bench import bench_mlcd_loss as B
from bench.__main__ import modules


def test_dense_baseline_is_the_mlcd_loss():
    for ratio in (None, 0.3):
        inp = B._problem(16, 300, 12, torch.float64, "cpu", ratio=ratio)
        got = B.dense_mlcd(inp["x"], inp["w"], B._pos_col(inp), inp["classes"])
        want = R.mlcd_loss(inp["x"], inp["w"], inp["pos"], classes=inp["classes"])
        torch.testing.assert_close(got, want)
        gx, = torch.autograd.grad(got, inp["x"])
        wx, = torch.autograd.grad(want, inp["x"])
        torch.testing.assert_close(gx, wx)


def test_problem_positives_are_unique_per_row():
    inp = B._problem(64, 100, 8, torch.float32, "cpu")
    srt = inp["pos"].sort(1).values
    assert (srt[:, 1:] != srt[:, :-1]).all()


def test_harness_times_and_measures_memory(tmp_path):
    case = dataclasses.replace(next(c for c in B.CASES if c.name == "mlcd_cpu"), repeats=1)
    case.impls = {k: case.impls[k] for k in ("naive", "pyssl-cpu")}
    with tqdm(total=2, disable=True) as bar:
        res = harness.run_case("bench.bench_mlcd_loss", case, "tiny", memory=True, progress=bar)
    for impl, e in res.items():
        assert set(e) == {"time_ms", "peak_mem_mb", "tflops", "gbps", "note", "x_inputs_grads"}
        # the ratio restates the measured peak against the inputs and their gradients
        io = sum(t.numel() * t.element_size() for t in (case.make_inputs("tiny", "cpu")["x"],
                                                        case.make_inputs("tiny", "cpu")["w"])) / 2**20
        # (peak_mem_mb is rounded to 0.1 MB, the ratio was taken before rounding)
        assert e["x_inputs_grads"] == pytest.approx((io + e["peak_mem_mb"]) / (2 * io), abs=0.05 / (2 * io) + 2e-3)
        assert e["time_ms"] > 0 and e["note"] == "", (impl, e)
        assert e["peak_mem_mb"] is not None and e["peak_mem_mb"] >= 0
    # the naive step materializes 64×2000 logits several times: its peak is visibly above zero
    assert res["naive"]["peak_mem_mb"] > 0.5
    path = harness.save("cpu", {"mlcd_cpu": res}, {"mlcd_cpu": "test"}, out_dir=str(tmp_path))
    doc = json.load(open(path))
    assert {"machine", "date", "commit", "torch", "triton", "cases"} <= set(doc)
    assert "| naive |" in open(path.replace(".json", ".md")).read()


def test_default_run_leaves_out_optional_impls():
    from bench.__main__ import select_impls
    from bench import bench_knn
    case = next(c for c in bench_knn.CASES if c.name == "knn_cpu")
    assert "pyssl-torch" in case.optional
    default = select_impls(case, set(), False)
    assert "pyssl-torch" not in default and {"naive", "faiss", "pyssl-auto"} <= set(default)
    assert set(select_impls(case, set(), True)) == set(case.impls)
    assert set(select_impls(case, {"pyssl-torch"}, False)) == {"pyssl-torch"}


def test_markdown_states_the_targets_references():
    """The table gives each impl's ratio to the floor and its share of time outside the model
    forward where the case has those rows, and the % of the GPU's peak the run recorded."""
    doc = {"date": "d", "machine": "m", "commit": "c", "torch": "t", "triton": "tr", "notes": {},
           "cases": {"a": {"naive": {"time_ms": 40.0}, "floor": {"time_ms": 10.0},
                           "pyssl-cpu": {"time_ms": 25.0, "gbps": 2.0, "pct_peak": 41.5}},
                     "b": {"forward": {"time_ms": 90.0}, "pyssl-auto": {"time_ms": 100.0, "note": "x",
                                                                       "x_inputs_grads": 1.104}}}}
    md = harness.markdown(doc)
    row = next(line for line in md.splitlines() if line.startswith("| pyssl-cpu"))
    assert "2.50× floor" in row and "| 41.5 |" in row and "0.625" in row
    row = next(line for line in md.splitlines() if line.startswith("| pyssl-auto"))
    assert "10.0% outside the forward; peak 1.10× inputs+grads; x" in row
    assert "outside the forward" not in next(line for line in md.splitlines() if line.startswith("| forward"))


def test_a_case_whose_inputs_fail_is_reported_per_impl(monkeypatch):
    """A failure while building a case's inputs (out of memory on a small GPU, say) is written
    into every impl's note and the run goes on; the commit can come from the environment (a copy
    of the tree without .git)."""
    def boom(size, device):
        raise RuntimeError("no inputs today")
    case = harness.Case("x", "cpu", boom, {"a": lambda inp: (lambda: None), "b": lambda inp: (lambda: None)})
    with tqdm(total=2, disable=True) as bar:
        res = harness.run_case("bench.bench_mlcd_loss", case, "tiny", memory=True, progress=bar)
    assert set(res) == {"a", "b"}
    assert all(e["time_ms"] is None and "failed building the inputs: RuntimeError: no inputs today" in e["note"]
               for e in res.values())
    monkeypatch.setenv("PYSSL_BENCH_COMMIT", "abc1234")
    assert harness.git_commit() == "abc1234"


def test_results_are_handed_out_impl_by_impl_and_saved_whole(tmp_path):
    """on_impl sees the results after every impl (what the suite saves, so a run cut short keeps
    them), and save() replaces the files in one rename (no half-written JSON)."""
    seen = []
    case = harness.Case("c", "cpu", lambda size, device: {},
                        {"a": lambda inp: (lambda: None), "b": lambda inp: (lambda: None)}, repeats=1)
    with tqdm(total=2, disable=True) as bar:
        harness.run_case("bench.bench_mlcd_loss", case, "tiny", memory=False, progress=bar,
                         on_impl=lambda res: seen.append(sorted(res)))
    assert seen == [["a"], ["a", "b"]]
    for impls in seen:
        path = harness.save("cpu", {"c": {k: {"time_ms": 1.0} for k in impls}}, {"c": ""}, out_dir=str(tmp_path))
    assert set(json.load(open(path))["cases"]["c"]) == {"a", "b"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu.json", "cpu.md"]


def test_gpu_smoke_runs_at_tiny_size():
    """bench/gpu_smoke.py (gpu_check.sh's first step: every op's GPU path against the reference
    before any timing) runs here through the Triton interpreter and passes every check."""
    repo = pathlib.Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_smoke", "--tiny"], cwd=str(repo), capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, TRITON_INTERPRET="1"))
    assert proc.returncode == 0 and "smoke: 0 failed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count(": ok (") >= 10


def test_run_first_measures_those_impls_first_and_keeps_the_declared_order():
    """run_first (the op under test before a peer's long compile on a lent GPU): measured in that
    order, saved and reported in the declared one, the callback included."""
    calls = []

    def impl(name):
        def setup(inputs):
            calls.append(name)
            return lambda: None
        return setup

    case = harness.Case("c", "cpu", lambda size, dev: {}, {k: impl(k) for k in ("naive", "peer", "ours")},
                        repeats=1, warmup=0, run_first=("ours", "absent"))
    seen = []
    with tqdm(total=3, disable=True) as bar:
        res = harness.run_case("bench.bench_mlcd_loss", case, "tiny", memory=False, progress=bar,
                               on_impl=lambda r: seen.append(list(r)))
    assert calls == ["ours", "naive", "peer"]
    assert list(res) == ["naive", "peer", "ours"]
    assert seen == [["ours"], ["naive", "ours"], ["naive", "peer", "ours"]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the cases run for real (bench/gpu_check.sh); "
                    "the interpreter on CUDA tensors would take far longer than the test's limit")
def test_every_case_dry_runs():
    """`python -m bench --quick` runs every impl of every case at tiny size (GPU cases through the
    Triton interpreter) and fails when one does: a broken case shows here, not on a lent GPU."""
    repo = pathlib.Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick"], cwd=str(repo), capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, TRITON_INTERPRET="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = [c.name for m in modules() for c in importlib.import_module(m).CASES]
    assert len(names) >= 15
    for name in names:
        assert f"dry-run {name} (tiny, not recorded): ok" in proc.stdout + proc.stderr, name


def test_sass_counts_a_kernels_instructions():
    """python -m bench.sass: a compile case built for sm_90 and disassembled without a GPU, with
    its loops (here the MLCD forward's column-tile loop and the dot's D loop inside it) and a
    bad case index named."""
    pytest.importorskip("triton")
    repo = pathlib.Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench.sass", "kernels/mlcd_loss.py", "_mlcd_lse_fwd_kernel",
                           "1", "--branches"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    static = int(out.split("static instructions ")[1].split()[0])
    loop_lines = [line for line in out.splitlines() if line.startswith("loop ")]
    assert static > 500 and len(loop_lines) >= 2 and "HGMMA" in out and "BRA" in out
    assert "'spill_bytes': 0" in out
    proc = subprocess.run([sys.executable, "-m", "bench.sass", "kernels/mlcd_loss.py", "_mlcd_lse_fwd_kernel", "99"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "CASE must be in [0," in proc.stderr
