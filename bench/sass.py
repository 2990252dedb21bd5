"""Instruction counts of a Triton kernel's sm_90 build, without a GPU: how the kernels' per-score
work was weighed against their tensor-core work on machines that have no GPU.

    python -m bench.sass kernels/mlcd_loss.py _mlcd_grad_g_kernel [CASE] [--branches]

compiles the CASE-th entry (default 0) of that kernel in the module's COMPILE_CASES (the
configurations tests/test_triton_compile.py checks) for GPUTarget("cuda", 90, 32), disassembles
the cubin with the cuobjdump Triton ships, and prints the constexprs, registers and spills
(ptxas -v), the static instruction count, each loop (a backward branch) with its length and
commonest opcodes, and with --branches every branch, so that the instructions of a path through
a loop body can be added up: a loop's dynamic count is its length times its trip count, and a
branch inside it splits the body into its paths. Issue cycles per tile follow as instructions ×
warps / 4 (an sm_90 SM issues four warp-instructions per cycle), to be set against the tile's
tensor-core time (FLOPs / ~4,096 dense bf16 FLOP per cycle per SM). Counts, not timings: they
move with the Triton version (run it under .venv-triton-gpu's by putting that folder first on
PYTHONPATH).
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, Tuple


def _tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _load(path: str):
    name = "_pyssl_sass_" + os.path.basename(path)[:-3]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def compile_case(path: str, kernel_name: str, index: int = 0):
    """(the compiled kernel, its constexprs, its options) of one compile case."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    cases = [c for c in _load(path).COMPILE_CASES if c[0].__name__ == kernel_name]
    if not cases:
        raise ValueError(f"no compile case of {kernel_name} in {path}")
    if not 0 <= index < len(cases):
        raise ValueError(f"CASE must be in [0, {len(cases)}) for {kernel_name}, got {index}")
    case = cases[index]
    kernel, sig, const = case[0], case[1], case[2]
    opts = case[3] if len(case) > 3 else {}
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in (case[4] if len(case) > 4 else [])}
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=const, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options=opts)
    return compiled, const, opts


def instructions(compiled) -> List[Tuple[int, str]]:
    """(address, instruction text) of the kernel's SASS."""
    with tempfile.TemporaryDirectory() as d:
        cub = os.path.join(d, "k.cubin")
        with open(cub, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cub], capture_output=True, text=True, check=True).stdout
    out = []
    for line in sass.splitlines():
        m = re.match(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            out.append((int(m.group(1), 16), m.group(2)))
    return out


def registers(compiled) -> Dict[str, int]:
    """Registers and spill bytes from ptxas -v on the kernel's PTX."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(compiled.asm["ptx"])
        err = subprocess.run([_tool("ptxas"), "-v", "--gpu-name=sm_90a", src, "-o", src + ".o"],
                             capture_output=True, text=True).stderr
    regs = re.findall(r"Used (\d+) registers", err)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", err)
    return {"registers": int(regs[0]) if regs else -1,
            "spill_bytes": sum(int(a) + int(b) for a, b in spills)}


def _opcode(ins: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0].split(".")[0]


def loops(ins: List[Tuple[int, str]]) -> List[Tuple[int, int, collections.Counter]]:
    """(start, end, opcode counts) of every backward branch's body."""
    out = []
    for addr, text in ins:
        if "BRA" in text:
            t = re.search(r"0x([0-9a-f]+)", text)
            if t and int(t.group(1), 16) < addr:
                lo = int(t.group(1), 16)
                body = [i for a, i in ins if lo <= a <= addr]
                out.append((lo, addr, collections.Counter(_opcode(i) for i in body)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sass", description=__doc__.split("\n\n")[0])
    p.add_argument("module", help="kernel module, e.g. kernels/mlcd_loss.py")
    p.add_argument("kernel", help="kernel name, e.g. _mlcd_grad_g_kernel")
    p.add_argument("case", nargs="?", type=int, default=0, help="index among that kernel's compile cases")
    p.add_argument("--branches", action="store_true", help="also list every branch")
    args = p.parse_args(argv)
    try:
        compiled, const, opts = compile_case(args.module, args.kernel, args.case)
    except ValueError as e:
        print(f"python -m bench.sass: error: {e}", file=sys.stderr)
        return 2
    ins = instructions(compiled)
    print(f"{args.kernel} case {args.case}: {const} {opts}")
    print(f"registers {registers(compiled)}; static instructions {len(ins)}")
    for lo, hi, ops in loops(ins):
        print(f"loop {lo:#x}-{hi:#x}: {sum(ops.values())} instructions; {ops.most_common(8)}")
    if args.branches:
        for addr, text in ins:
            if "BRA" in text:
                print(f"  {addr:#x}: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
