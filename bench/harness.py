"""The benchmark harness: every impl of a case in one run, side by side.

A bench module (bench/bench_<op>.py) defines CASES, a list of Case. For each case the harness
builds the inputs once, then for every impl: warm-up, then the median of `repeats` timed runs
(synchronizing the device around each); then peak memory of one more step beyond what is
allocated before it:
    CPU: in a fresh subprocess per (case, impl), since the resident set never shrinks back:
         the peak resident set (VmHWM, reset before the step) minus the resident set after
         building the inputs;
    CUDA: in the same process, right after the timing: torch.cuda.max_memory_allocated (reset
         before the step) minus the allocation before it. The allocator's counters are exact
         per step, and a subprocess per impl would rebuild gigabytes of inputs and recompile
         every kernel each time.
Results go to bench/results/<device>.json (the shape of DESIGN.md) and a markdown table
bench/results/<device>.md, with every time also given as a ratio to the "naive" impl.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class Skip(Exception):
    """Raised by an impl's setup when it cannot run the case (not installed, too large)."""


@dataclasses.dataclass
class Case:
    name: str
    device: str                                   # "cpu" or "cuda"
    make_inputs: Callable[[str, str], dict]       # (size "full"|"tiny", device) -> inputs
    impls: Dict[str, Callable[[dict], Callable[[], None]]]   # impl -> setup(inputs) -> step
    flops: Optional[Callable[[dict], float]] = None          # useful FLOPs of one step
    bytes: Optional[Callable[[dict], float]] = None          # bytes moved by one step
    # MB of the inputs that receive gradients (a step's peak beyond the inputs includes its own
    # gradients of the same size): the table then states peak / (inputs + gradients)
    grad_inputs_mb: Optional[Callable[[dict], float]] = None
    repeats: int = 5
    warmup: int = 1
    notes: str = ""
    # impls left out of the default run (slow fallbacks, aliases of another impl): they run with
    # `python -m bench --all`, or when named in --impls
    optional: tuple = ()
    # impls measured before the others (the table keeps the declared order): on a lent GPU the
    # op under test goes first, so a time limit that cuts the case short cuts a peer's
    # minute-long torch.compile or FlexAttention build, not our numbers
    run_first: tuple = ()


@contextlib.contextmanager
def env_set(name: str, value: str):
    """The environment variable name set to value inside the block, restored after (the kernels
    read their switches per call, so a variant runs in the same process as the default)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def with_env(name: str, value: str, step: Callable[[], None], note: str = "") -> Callable[[], None]:
    """step run with name=value (env_set) around each call; note goes into the results."""
    def run():
        with env_set(name, value):
            step()
    if note:
        run.note = note
    return run


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_step(step: Callable[[], None], device: str, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _status_mb(field: str) -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM (Linux ≥ 4.0). ru_maxrss cannot serve: Linux carries it across
    exec from the parent, so a child started by a big parent would start at the parent's size."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_peak(step) -> float:
    if _reset_peak_rss() and _status_mb("VmHWM") is not None:
        base = _status_mb("VmRSS")
        step()
        return _status_mb("VmHWM") - base
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 - base


def _step_peak(step, device: str) -> float:
    """Peak memory of one step of an already warmed-up step function, in MB."""
    import pyssl
    pyssl.empty_cache()  # pyssl's reusable scratch buffers count: the step allocates them again
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return _cpu_peak(step)


def measure_memory_here(case: Case, impl: str, size: str) -> float:
    """Run in the child process: peak memory of one step beyond the inputs, in MB."""
    inputs = case.make_inputs(size, case.device)
    step = case.impls[impl](inputs)
    step()  # warm-up: compilation, autotuning and lazy allocations are not the step's memory
    return _step_peak(step, case.device)


def measure_memory(module: str, case: Case, impl: str, size: str) -> tuple[Optional[float], str]:
    """Peak memory of one step in a fresh subprocess (so each impl starts from a clean slate)."""
    cmd = [sys.executable, "-m", "bench.harness", "--memory", module, case.name, impl, size, case.device]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # A fixed mmap threshold turns off glibc's adaptive one, so every large block is returned to
    # the OS on free: memory freed by the warm-up step cannot hide the next step's allocations.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    try:
        out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=1800, env=env)
    except subprocess.TimeoutExpired:
        return None, "memory subprocess timed out"
    for line in out.stdout.splitlines()[::-1]:
        if line.startswith("PEAK_MB "):
            return float(line.split()[1]), ""
        if line.startswith("SKIP "):
            return None, line[5:]
    tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
    return None, f"memory subprocess failed: {tail[0][:200]}"


def device_name(device: str) -> str:
    if device == "cuda":
        name = torch.cuda.get_device_name().lower()
        for key in ("h200", "h100", "a100", "l40", "a10"):
            if key in name:
                return key
        return name.replace(" ", "_")
    return "cpu"


def machine_description(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} ({platform.node()})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def git_commit() -> str:
    """Short sha of HEAD, with "-dirty" when the tree has uncommitted changes to tracked files;
    PYSSL_BENCH_COMMIT when set (a copy of the tree without its .git, e.g. on a lent GPU).
    Read once per process: the run's own saves to bench/results must not make it "-dirty"."""
    if os.environ.get("PYSSL_BENCH_COMMIT"):
        return os.environ["PYSSL_BENCH_COMMIT"]
    global _COMMIT
    if _COMMIT is None:
        _COMMIT = _git_commit()
    return _COMMIT


_COMMIT: Optional[str] = None


def _git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=here).stdout.strip() or "unknown"
        # the results files themselves do not make a run dirty (an earlier run rewrote them)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":!bench/results"], capture_output=True, text=True,
                               cwd=os.path.dirname(here)).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


# Dense bf16 tensor-core peak (TFLOP/s) and memory bandwidth (GB/s) from the vendors' data
# sheets, by device_name(): the targets of the GPU cases are fractions of these.
PEAKS = {"h200": (989.0, 4800.0), "h100": (989.0, 3350.0), "a100": (312.0, 2039.0)}


def _entry(note: str = "") -> dict:
    return {"time_ms": None, "peak_mem_mb": None, "tflops": None, "gbps": None, "note": note}


def _add_note(entry: dict, text: str) -> None:
    if text:
        entry["note"] = (entry["note"] + "; " + text).strip("; ")


def _peak_here(step) -> tuple[Optional[float], str]:
    """measure_memory's answer for CUDA, taken in this process (the allocator's counters are
    exact per step): a failure here leaves the timing standing."""
    try:
        return _step_peak(step, "cuda"), ""
    except Exception as e:
        return None, f"memory pass failed: {e.__class__.__name__}: {str(e)[:120]}"


def run_case(module: str, case: Case, size: str, memory: bool, progress,
             on_impl: Optional[Callable[[Dict[str, dict]], None]] = None) -> Dict[str, dict]:
    """Every impl of the case; on_impl(results so far) after each one (the caller saves them, so
    a run stopped by a time limit keeps every impl it finished)."""
    results: Dict[str, dict] = {}
    try:
        inputs = case.make_inputs(size, case.device)
    except Exception as e:   # reported per impl; the run goes on with the next case
        note = ("out of memory building the inputs" if isinstance(e, torch.OutOfMemoryError)
                else f"failed building the inputs: {e.__class__.__name__}: {str(e)[:200]}")
        for impl in case.impls:
            results[impl] = _entry(note)
            progress.update(1)
        return results
    peak = PEAKS.get(device_name(case.device)) if case.device == "cuda" else None
    declared = list(case.impls)
    order = [i for i in case.run_first if i in case.impls] + [i for i in declared if i not in case.run_first]

    def in_declared_order():
        return {i: results[i] for i in declared if i in results}

    for impl in order:
        setup = case.impls[impl]
        progress.set_postfix_str(f"{case.name}/{impl}")
        entry = _entry()
        step = peak_here = None
        try:
            step = setup(inputs)
            t = time_step(step, case.device, case.warmup, case.repeats)
            entry["time_ms"] = round(t, 3)
            entry["note"] = getattr(step, "note", "")   # what a setup reports about itself
            # a step that does part of the case's work (a forward-only peer) says which part
            if case.flops:
                fl = case.flops(inputs) * getattr(step, "flops_fraction", 1.0)
                entry["tflops"] = round(fl / (t * 1e-3) / 1e12, 3)
                if peak:
                    entry["pct_peak"] = round(100 * entry["tflops"] / peak[0], 1)
            if case.bytes:
                entry["gbps"] = round(case.bytes(inputs) / (t * 1e-3) / 1e9, 2)
                if peak:
                    entry["pct_peak"] = round(100 * entry["gbps"] / peak[1], 1)
            if memory and case.device == "cuda":
                peak_here = _peak_here(step)
        except Skip as e:
            entry["note"] = str(e)
        except torch.OutOfMemoryError:
            entry["note"] = "out of memory"
        except Exception as e:  # a broken impl is reported, not hidden, and the run goes on
            entry["note"] = f"failed: {e.__class__.__name__}: {str(e)[:200]}"
        step = None   # the step's buffers are freed before the cache is emptied and the next setup
        gc.collect()
        if case.device == "cuda":
            torch.cuda.empty_cache()
        if memory and entry["time_ms"] is not None:
            mem, note = ((peak_here or (None, "")) if case.device == "cuda"
                         else measure_memory(module, case, impl, size))
            entry["peak_mem_mb"] = None if mem is None else round(mem, 1)
            if mem is not None and case.grad_inputs_mb:
                io = case.grad_inputs_mb(inputs)
                entry["x_inputs_grads"] = round((io + mem) / (2 * io), 3)
            _add_note(entry, note)
        results[impl] = entry
        progress.update(1)
        if on_impl is not None:
            on_impl(in_declared_order())
    return in_declared_order()


def _triton_version() -> Optional[str]:
    try:
        import importlib.metadata as md
        return md.version("triton")
    except Exception:
        return None


def save(device: str, cases: Dict[str, Dict[str, dict]], notes: Dict[str, str], out_dir: str = RESULTS,
         merge_impls: bool = False) -> str:
    """Merge this run's cases into bench/results/<device>.json and rewrite the markdown table.
    merge_impls keeps a case's other impls (a run of some impls only, or a tagged sweep)."""
    os.makedirs(out_dir, exist_ok=True)
    name = device_name(device)
    path = os.path.join(out_dir, f"{name}.json")
    doc = {"cases": {}}
    if os.path.exists(path):
        with open(path) as f:
            doc = json.load(f)
    doc.update({"machine": machine_description(device), "date": datetime.date.today().isoformat(),
                "commit": git_commit(), "torch": torch.__version__, "triton": _triton_version()})
    for case, impls in cases.items():
        if merge_impls:
            doc.setdefault("cases", {}).setdefault(case, {}).update(impls)
        else:
            doc.setdefault("cases", {})[case] = impls
    doc.setdefault("notes", {}).update(notes)
    # the top-level commit/date describe the latest run; each case keeps the run it came from
    doc.setdefault("case_runs", {}).update({c: f"{doc['commit']} {doc['date']}" for c in cases})
    # written beside and renamed into place: a run killed mid-write leaves the old file whole
    _write_atomic(path, json.dumps(doc, indent=1, sort_keys=False))
    _write_atomic(os.path.join(out_dir, f"{name}.md"), markdown(doc))
    return path


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def markdown(doc: dict) -> str:
    lines = [f"Measured {doc['date']} on {doc['machine']} (commit {doc['commit']}, torch {doc['torch']}, "
             f"triton {doc['triton']}). Ratios are to the naive dense PyTorch version of each case.", ""]
    for case, impls in doc["cases"].items():
        naive = (impls.get("naive") or {}).get("time_ms")
        naive_mem = (impls.get("naive") or {}).get("peak_mem_mb")
        run = doc.get("case_runs", {}).get(case, "")
        lines += [f"### {case}", "", doc.get("notes", {}).get(case, "") + (f" (run: {run})" if run else ""), "",
                  "| impl | time (ms) | × naive time | peak mem (MB) | × naive mem | TFLOP/s | GB/s | % of peak | note |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        floor = (impls.get("floor") or {}).get("time_ms")
        forward = (impls.get("forward") or {}).get("time_ms")
        for impl, e in impls.items():
            t, m = e.get("time_ms"), e.get("peak_mem_mb")
            rt = f"{t / naive:.3f}" if t and naive else ""
            rm = f"{m / naive_mem:.3f}" if m is not None and naive_mem else ""
            derived = []   # what the targets are stated against: the floor, the model forward
            if t and floor and impl != "floor":
                derived.append(f"{t / floor:.2f}× floor")
            if t and forward and impl != "forward" and not impl.startswith("forward["):
                derived.append(f"{100 * (t - forward) / t:.1f}% outside the forward")
            if e.get("x_inputs_grads"):
                derived.append(f"peak {e['x_inputs_grads']:.2f}× inputs+grads")
            note = "; ".join(derived + ([e["note"]] if e.get("note") else []))
            lines.append(f"| {impl} | {'' if t is None else t} | {rt} | {'' if m is None else m} | {rm} | "
                         f"{e.get('tflops') or ''} | {e.get('gbps') or ''} | {e.get('pct_peak') or ''} | {note} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _memory_child(argv: List[str]) -> None:
    # run as __main__: take Skip and the measurement from the module the bench files import
    from bench.harness import Skip, measure_memory_here
    module, case_name, impl, size, device = argv
    import importlib
    mod = importlib.import_module(module)
    case = dataclasses.replace(next(c for c in mod.CASES if c.name == case_name), device=device)
    try:
        print(f"PEAK_MB {measure_memory_here(case, impl, size):.3f}", flush=True)
    except Skip as e:
        print(f"SKIP {e}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--memory":
        _memory_child(sys.argv[2:])
    else:
        sys.exit("usage: python -m bench.harness --memory MODULE CASE IMPL SIZE DEVICE (internal)")
