"""Step time and memory per rank of the model-parallel MLCD loss (pyssl.nn.MLCDLoss with a
process group), for checking how it scales on a cluster:

    torchrun --nproc_per_node 8 -m bench.mlcd_parallel                      # GPUs (NCCL)
    torchrun --nproc_per_node 2 -m bench.mlcd_parallel --classes 100000 --dim 256 --batch 512 \
        --dtype float32                                                     # CPU (gloo)

Each rank holds C/P class centers and its own `--batch` rows; one step is the loss of the global
batch (P·batch rows) and its backward, with the features' gradient scaled for DDP
(feature_grad_scale = P). Inputs are drawn once; the median of `--steps` timed steps follows
`--warmup` steps (the slowest rank's median is reported). Rank 0 prints one line per run and, with --out, writes the numbers as JSON.
Peak memory: CUDA allocator peak during the steps; on the CPU the process's peak RSS, inputs
included. Run it once with --nproc_per_node 1 for the single-process baseline of the same
global problem (--batch then the global batch).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import time

import torch
import torch.distributed as dist

import pyssl

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.mlcd_parallel", description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=4096, help="rows per rank")
    p.add_argument("--positives", type=int, default=8)
    p.add_argument("--ratio", type=float, default=0.1, help="negative-class sampling ratio (1 = all classes)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="features")
    p.add_argument("--weight-dtype", choices=sorted(DTYPES), default=None,
                   help="class centers (default: --dtype; float32 with 16-bit features casts the used rows)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default="", help="JSON file rank 0 writes the result to")
    return p.parse_args(argv)


def run(args) -> dict:
    """One measurement on the initialized default group; the result on every rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = DTYPES[args.dtype]
    crit = pyssl.nn.MLCDLoss(args.classes, args.dim, sample_ratio=args.ratio, process_group=dist.group.WORLD,
                             feature_grad_scale=float(world), backend=args.backend, device=dev,
                             dtype=DTYPES[args.weight_dtype or args.dtype],
                             generator=torch.Generator(device=dev).manual_seed(1000 + rank))
    g = torch.Generator(device=dev).manual_seed(rank)
    x = torch.randn(args.batch, args.dim, generator=g, device=dev).to(dtype).requires_grad_()
    # unique within a row: the i-th positive is ≡ i (mod l), as bench_mlcd_loss draws them
    l = args.positives
    pos = (torch.randint(0, args.classes // l, (args.batch, l), generator=g, device=dev) * l
           + torch.arange(l, device=dev))

    def step():
        crit(x, pos).backward()
        x.grad = None
        crit.weight.grad = None

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()

    for _ in range(args.warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        mem = torch.cuda.max_memory_allocated() / 2**20
    else:
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    mems = [None] * world
    dist.all_gather_object(mems, round(mem, 1))
    t = torch.tensor(statistics.median(times) * 1e3, dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)   # the slowest rank's median
    t = float(t)
    return {"world": world, "classes_per_rank": crit.num_local, "global_batch": args.batch * world,
            "time_ms": round(t, 2), "rows_per_s": round(args.batch * world / (t * 1e-3)),
            "peak_mem_mb_per_rank": mems, "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
            "torch_threads": torch.get_num_threads(), "args": vars(args),
            "date": datetime.date.today().isoformat()}


def main(argv=None) -> int:
    args = parse(argv)
    if torch.cuda.is_available():   # before the group: NCCL then knows each rank's device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        res = run(args)
        if dist.get_rank() == 0:
            print(f"world {res['world']}: {res['classes_per_rank']} classes per rank, global batch "
                  f"{res['global_batch']}: {res['time_ms']} ms per step ({res['rows_per_s']} rows/s), "
                  f"peak MB per rank {res['peak_mem_mb_per_rank']}")
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(res, f, indent=1)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
