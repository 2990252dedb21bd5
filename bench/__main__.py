"""Run the microbenchmark suite on the device present: `python -m bench` (= `make bench`).

Every case of the device runs at its stated (full) size — each fits the default run's 10-minute
budget on a 2-core machine; cases of a device that is absent are dry-run at tiny sizes on the CPU
(to keep them working) and not recorded. Options:
  --quick         run every case at tiny size and write nothing (a smoke test of the suite; exits
                  non-zero when an impl fails)
  --cases a,b     only these cases
  --impls a,b     only these impls (the case's other recorded impls are kept)
  --tag TEXT      record the impls as "<impl>[TEXT]", e.g. one kernel configuration of a sweep
                  (PYSSL_MLCD_TRITON_BWD=GCHUNK_COLS=4096 python -m bench --impls pyssl-triton --tag gc4k)
  --no-memory     skip the per-impl memory subprocesses
  --all           also run each case's optional impls (slow fallbacks such as pyssl-torch on the
                  largest CPU cases, aliases such as pyssl-auto where it is pyssl-cpu); the
                  default run leaves them out to stay under 10 minutes on a 2-core machine
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import pkgutil
import sys

import torch
from tqdm import tqdm

from bench import harness


def modules():
    here = os.path.dirname(os.path.abspath(__file__))
    return sorted(f"bench.{m.name}" for m in pkgutil.iter_modules([here]) if m.name.startswith("bench_"))


def select_impls(case, named: set, run_all: bool) -> dict:
    """The impls of a case to run: those named (when any are), else all but the optional ones
    (unless run_all)."""
    if named:
        return {k: v for k, v in case.impls.items() if k in named}
    return {k: v for k, v in case.impls.items() if run_all or k not in case.optional}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--cases", default="")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--impls", default="")
    p.add_argument("--tag", default="")
    p.add_argument("--all", action="store_true")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    if not gpu:  # GPU cases dry-run here: their Triton kernels go through the interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
    wanted = set(filter(None, args.cases.split(",")))
    impls = set(filter(None, args.impls.split(",")))
    plan = []
    for name in modules():
        mod = importlib.import_module(name)
        for case in mod.CASES:
            if wanted and case.name not in wanted:
                continue
            present = case.device == "cpu" or gpu
            size = "tiny" if (args.quick or not present) else "full"
            if not present:  # dry-run a GPU case on the CPU at tiny size (CUDA-only peers note a skip)
                case = dataclasses.replace(case, device="cpu", repeats=1, warmup=0)
            case = dataclasses.replace(case, impls=select_impls(case, impls, args.all))
            if not case.impls:
                continue
            plan.append((name, case, size, present and not args.quick))
    if not plan:
        sys.exit(f"no benchmark case matches {args.cases!r}")
    written, dry_failures = set(), []
    total = sum(len(c.impls) for _, c, _, _ in plan)
    with tqdm(total=total, desc="bench", unit="impl") as bar:
        for module, case, size, record in plan:
            def save(res, case=case):
                if args.tag:
                    res = {f"{k}[{args.tag}]": v for k, v in res.items()}
                written.add(harness.save(case.device, {case.name: res}, {case.name: case.notes},
                                         merge_impls=bool(impls or args.tag)))
            # saved impl by impl: a run stopped by a time limit keeps what it measured
            res = harness.run_case(module, case, size, memory=record and not args.no_memory, progress=bar,
                                   on_impl=save if record else None)
            if not record:
                failed = {k: v["note"] for k, v in res.items() if v["note"].startswith("failed")}
                status = "ok" if not failed else f"FAILED {failed}"
                tqdm.write(f"dry-run {case.name} (tiny, not recorded): {status}")
                dry_failures += [f"{case.name}/{k}" for k in failed]
    for path in sorted(written):
        print(f"wrote {path}")
        with open(path.replace(".json", ".md")) as f:
            print(f.read())
    if dry_failures:   # a broken case must not pass for a smoke test (tests/test_bench.py runs --quick)
        sys.exit(f"dry-run failures: {', '.join(dry_failures)}")


if __name__ == "__main__":
    main()
