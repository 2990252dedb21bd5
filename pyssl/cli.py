"""Command line: `pyssl info` tells what this installation can run and why not."""
from __future__ import annotations

import argparse
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="pyssl", description="pyssl command line")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, compiled extension, and which backends can run here")
    args = p.parse_args(argv)
    if args.cmd == "info":
        return info()
    return 2


if __name__ == "__main__":
    sys.exit(main())
