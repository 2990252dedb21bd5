"""Command line.

    pyssl info                                        what this installation can run, and why not
    pyssl kmeans FEATURES.npy K --out CENTROIDS.npy   (spherical) k-means of a feature file
    pyssl assign FEATURES.npy CENTROIDS.npy --out P   top-l centroids per row -> P.idx.npy, P.sim.npy
    pyssl ood --bank TRAIN.npy --id ID.npy --ood OOD.npy     kNN OOD scores and the standard metrics
    pyssl train mlcd|mixedae|smooth [--data digits|FILE.npz]  a reference trainer (pyssl.train);
    torchrun --nproc_per_node P -m pyssl.cli train mlcd       MLCD with the centers sharded over P ranks

Feature files are .npy arrays of shape (N, D), opened as memory maps: only the rows in use are
read (a k-means training sample, an assignment batch), so a corpus larger than memory works.
assign writes its results into .npy memory maps batch by batch, which is how an MLCD corpus gets
its l labels per image. Bad input exits with status 2 and a message naming the argument.
"""
from __future__ import annotations

import argparse
import json
import sys


def info() -> int:
    import torch

    import pyssl
    from pyssl import _dispatch
    print(f"pyssl {pyssl.__version__}, torch {torch.__version__}, "
          f"CUDA {'available: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'not available'}")
    try:
        import importlib.metadata as md
        print(f"triton {md.version('triton')}" + (" (interpreter)" if _dispatch.triton_interpret() else ""))
    except Exception:
        print("triton: not installed")
    err = _dispatch.extension_error()
    ext = _dispatch.extension()
    print("extension pyssl._C: " + (err if err else f"ok (sources {ext.source_hash}, cuda kernels: {ext.with_cuda})"))
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        for b in ("triton", "cuda", "cpu"):
            why = _dispatch.common_reasons(b, torch.device(dev))
            print(f"  {dev:4s} {b:6s}: {'ok' if not why else '; '.join(why)}")
    return 0


def _features(arg: str, path: str):
    """A (N, D) .npy array opened as a read-only memory map (ValueError naming the argument)."""
    import numpy as np
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{arg}: cannot read {path!r} as a .npy array ({e})") from None
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{arg}: expected a non-empty (N, D) array in {path!r}, got shape {a.shape}")
    if a.dtype.kind != "f":
        raise ValueError(f"{arg}: expected floating-point features in {path!r}, got dtype {a.dtype}")
    return a


def _kmeans(args) -> int:
    import numpy as np

    import pyssl
    x = _features("FEATURES", args.features)
    cent = pyssl.cluster.kmeans(x, args.k, niter=args.niter, seed=args.seed, spherical=not args.euclidean,
                                gpu=args.gpu or None, max_points_per_centroid=args.max_points_per_centroid,
                                backend=args.backend, progress=not args.quiet)
    np.save(args.out, cent.cpu().numpy())
    print(f"{args.out}: {tuple(cent.shape)} centroids")
    return 0


def _assign(args) -> int:
    import numpy as np

    import pyssl
    x = _features("FEATURES", args.features)
    cent = _features("CENTROIDS", args.centroids)
    if x.shape[1] != cent.shape[1]:
        raise ValueError(f"CENTROIDS: D={cent.shape[1]} differs from the features' D={x.shape[1]}")
    import torch
    cent = torch.from_numpy(np.asarray(cent, dtype=np.float32))
    n = x.shape[0]
    l = args.l
    if not 1 <= l <= cent.shape[0]:
        raise ValueError(f"--l: must be in [1, {cent.shape[0]}] (the number of centroids), got {l}")
    paths = (args.out + ".idx.npy", args.out + ".sim.npy")
    idx = np.lib.format.open_memmap(paths[0], mode="w+", dtype=np.int64, shape=(n, l))
    sim = np.lib.format.open_memmap(paths[1], mode="w+", dtype=np.float32, shape=(n, l))
    pyssl.cluster.topk_assign(x, cent, l, batch_size=args.batch_size, gpu=args.gpu or None, out=(idx, sim),
                              backend=args.backend, progress=not args.quiet)
    print(f"{paths[0]}, {paths[1]}: ({n}, {l})")
    return 0


def _ood(args) -> int:
    import numpy as np
    import torch

    import pyssl
    bank, ind, ood = (torch.from_numpy(np.asarray(_features(a, p), dtype=np.float32))
                      for a, p in (("--bank", args.bank), ("--id", args.id), ("--ood", args.ood)))
    scorer = pyssl.ood.KNNScorer(args.k, normalize=not args.raw, gpu=args.gpu or None,
                                 backend=args.backend).fit(bank)
    m = pyssl.ood.metrics(scorer.score(ind), scorer.score(ood))
    _report(args, {k: float(v) for k, v in m.items()})
    return 0


def _train(args) -> int:
    import os

    from pyssl import train as T
    data = T.digits(seed=args.seed) if args.data == "digits" else T.load_npz(args.data, seed=args.seed)
    kw = dict(seed=args.seed, device=args.device, backend=args.backend, progress=not args.quiet)
    if args.epochs is not None:
        kw["epochs"] = args.epochs
    for name in ("sigma", "n0", "n", "alpha", "max_certify"):
        if getattr(args, name) is not None:
            if args.method != "smooth":
                raise ValueError(f"--{name.replace('_', '-')}: an option of `train smooth`, not of `train {args.method}`")
            kw[name] = getattr(args, name)
    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise ValueError(f"--device: {args.device} asked for, but CUDA is not available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        # under torchrun: one process per device, the class centers sharded over the ranks
        if args.method != "mlcd":
            raise ValueError(f"WORLD_SIZE={world}: only `train mlcd` has a model-parallel form")
        return _train_distributed(T, data, kw, args)
    run = {"mlcd": T.mlcd, "mixedae": T.mixedae, "smooth": T.smooth}[args.method]
    _report(args, run(data, **kw))
    return 0


def _train_distributed(T, data, kw, args) -> int:
    import os

    import torch
    import torch.distributed as dist
    cuda = args.device.startswith("cuda")
    if cuda:
        kw["device"] = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(kw["device"])
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        result = T.mlcd(data, process_group=dist.group.WORLD, **kw)
        if dist.get_rank() == 0:
            _report(args, result)
    finally:
        dist.destroy_process_group()
    return 0


def _report(args, result) -> None:
    """result as JSON (floats to 6 decimals) on stdout and, with --json, in that file."""
    text = json.dumps(_rounded(result), indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(text)


def _rounded(v):
    if isinstance(v, float):
        return round(v, 6)
    if isinstance(v, dict):
        return {str(k): _rounded(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_rounded(x) for x in v]
    return v


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyssl", description="pyssl command line")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, compiled extension, and which backends can run here")

    k = sub.add_parser("kmeans", help="k-means centroids of a (N, D) .npy feature file")
    k.add_argument("features", metavar="FEATURES", help="(N, D) float .npy file (memory-mapped)")
    k.add_argument("k", metavar="K", type=int, help="number of centroids")
    k.add_argument("--out", required=True, help="where the (K, D) float32 centroids go (.npy)")
    k.add_argument("--niter", type=int, default=25)
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--euclidean", action="store_true", help="plain k-means (default: spherical, cosine)")
    k.add_argument("--max-points-per-centroid", type=int, default=256,
                   help="training rows per centroid, a seeded sample (default 256, as faiss)")
    k.add_argument("--backend", default="auto", choices=("auto", "faiss", "torch"))
    k.add_argument("--gpu", action="store_true", help="cluster on CUDA")
    k.add_argument("--quiet", action="store_true", help="no progress bar")

    a = sub.add_parser("assign", help="the l nearest centroids (cosine) of every row: MLCD's positives")
    a.add_argument("features", metavar="FEATURES", help="(N, D) float .npy file (memory-mapped)")
    a.add_argument("centroids", metavar="CENTROIDS", help="(C, D) float .npy file")
    a.add_argument("--out", required=True, help="prefix of the outputs PREFIX.idx.npy (int64) and PREFIX.sim.npy "
                   "(float32), both (N, l), written batch by batch")
    a.add_argument("--l", type=int, default=8, help="centroids per row (default 8)")
    a.add_argument("--batch-size", type=int, default=None)
    a.add_argument("--backend", default="auto", choices=("auto", "cpu", "faiss", "triton", "torch"))
    a.add_argument("--gpu", action="store_true", help="search on CUDA")
    a.add_argument("--quiet", action="store_true", help="no progress bar")

    o = sub.add_parser("ood", help="kNN OOD scores of ID and OOD features against a bank, and the metrics")
    o.add_argument("--bank", required=True, help="(N, D) .npy in-distribution training features")
    o.add_argument("--id", required=True, help="(N, D) .npy in-distribution test features")
    o.add_argument("--ood", required=True, help="(N, D) .npy out-of-distribution features")
    o.add_argument("--k", type=int, default=50)
    o.add_argument("--raw", action="store_true", help="raw features (default: L2-normalized)")
    o.add_argument("--backend", default="auto", choices=("auto", "cpu", "faiss", "triton", "torch"))
    o.add_argument("--gpu", action="store_true", help="search on CUDA")
    o.add_argument("--json", default=None, help="also write the metrics to this file")

    t = sub.add_parser("train", help="a reference trainer: the ops end to end on real images (pyssl.train)")
    t.add_argument("method", choices=("mlcd", "mixedae", "smooth"))
    t.add_argument("--data", default="digits",
                   help="'digits' (scikit-learn's 8x8 digits) or a .npz with images (N, C, H, W) in [0, 1] "
                   "and labels (N,), optionally test_images/test_labels")
    t.add_argument("--epochs", type=int, default=None, help="default: the trainer's")
    t.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    t.add_argument("--backend", default="auto", choices=("auto", "triton", "cuda", "cpu", "torch"))
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--sigma", type=float, default=None, help="smooth: noise level")
    t.add_argument("--n0", type=int, default=None, help="smooth: selection samples")
    t.add_argument("--n", type=int, default=None, help="smooth: estimation samples")
    t.add_argument("--alpha", type=float, default=None, help="smooth: failure probability")
    t.add_argument("--max-certify", type=int, default=None, help="smooth: certify the first test images only")
    t.add_argument("--json", default=None, help="also write the results to this file")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    run = {"info": lambda a: info(), "kmeans": _kmeans, "assign": _assign, "ood": _ood, "train": _train}[args.cmd]
    try:
        return run(args)
    except ValueError as e:
        print(f"pyssl {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
