"""Ahead-of-time compilation of every Triton kernel in kernels/ for Hopper (sm_90), no GPU needed.

The interpreter (TRITON_INTERPRET=1, set by conftest.py on machines without CUDA) never lowers a
kernel, so it cannot catch what only the compiler rejects: layouts of tl.dot operands, constexpr
misuse, shared-memory budgets. Here each case of a kernel module's COMPILE_CASES list,
(kernel, signature, constexprs[, options[, aligned]]), goes through triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32)) down to PTX and cubin (Triton ships its own ptxas), and
ptxas -v must report no register spills.

The compilation runs in a child process with TRITON_INTERPRET removed from its environment:
under the interpreter the module-level @triton.jit objects are InterpretedFunctions, and running
interpreted kernels patches triton.language in place (restored per launch, but not by every
Triton version), so compiling inside this process would depend on what other tests ran before.
The child imports the kernel modules fresh, where they are plain JITFunctions.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
KERNEL_DIR = REPO / "kernels"
# Hopper: 227 KiB of shared memory per block (opt-in maximum).
MAX_SHARED = 227 * 1024

triton = pytest.importorskip("triton")


def _load(path: pathlib.Path):
    """Import kernels/<name>.py by path (the package is pyssl.kernels once installed, but the
    test must not depend on the install)."""
    name = f"_pyssl_compile_check_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _kernel_modules():
    return sorted(p for p in KERNEL_DIR.glob("*.py") if p.name != "__init__.py")


def _case_id(stem: str, index: int, case) -> str:
    kernel, signature = case[0], case[1]
    # named after the first pointer argument's element type (the kernel's input dtype)
    first_ptr = next((v[1:] for v in signature.values() if v.startswith("*")), "")
    return f"{stem}.{kernel.__name__}[{index}:{first_ptr}]"


def _collect():
    """(module path, index, id) for every compile case, and the jit kernels lacking one."""
    cases, uncovered = [], []
    for path in _kernel_modules():
        mod = _load(path)
        mod_cases = list(getattr(mod, "COMPILE_CASES", []))
        covered = {c[0].__name__ for c in mod_cases}
        for name, obj in vars(mod).items():
            # Launchable kernels are the module-level jit objects named *_kernel; helpers are
            # compiled through the kernels that call them.
            if name.endswith("_kernel") and hasattr(obj, "fn") and hasattr(obj, "arg_names"):
                if name not in covered:
                    uncovered.append(f"{path.stem}.{name}")
        for i, case in enumerate(mod_cases):
            cases.append((str(path), i, _case_id(path.stem, i, case)))
    return cases, uncovered


CASES, UNCOVERED = _collect()

_CHILD = r"""
import importlib.util, json, os, re, subprocess, sys, tempfile, traceback
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget

target = GPUTarget("cuda", 90, 32)
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def spills(ptx):
    # Triton keeps no ptxas report; rerun its ptxas with -v on the PTX for the spill count
    if not os.path.exists(PTXAS):
        return None
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([PTXAS, "-v", "--gpu-name=sm_90a", src, "-o", src + ".o"],
                           capture_output=True, text=True)
    m = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
    return sum(int(a) + int(b) for a, b in m) if m else None


results = {}
for path, index, cid in json.loads(sys.argv[1]):
    name = "_pyssl_compile_child_" + path.replace("/", "_").replace(".", "_")
    mod = sys.modules.get(name)
    if mod is None:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    case = mod.COMPILE_CASES[index]
    kernel, signature, constexprs = case[0], case[1], case[2]
    options = case[3] if len(case) > 3 else {}
    # Arguments a launch would specialise as multiples of 16 (16-byte aligned pointers, strides):
    # the same attribute the JIT launcher attaches, so loads vectorise and pipeline as on a GPU.
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]]
             for n in (case[4] if len(case) > 4 else [])}
    try:
        assert isinstance(kernel, triton.runtime.jit.JITFunction), type(kernel)
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                                            attrs=attrs),
                                  target=target, options=options)
        results[cid] = dict(ok=True, ptx=len(compiled.asm.get("ptx", "")),
                            cubin=len(compiled.asm.get("cubin", b"")),
                            shared=int(compiled.metadata.shared),
                            spill_bytes=spills(compiled.asm["ptx"]))
    except Exception:
        results[cid] = dict(ok=False, error=traceback.format_exc()[-4000:])
results["@version"] = triton.__version__
print("@@RESULTS@@" + json.dumps(results))
"""


# The Triton versions the kernels must compile under: the one installed here, and the GPU
# machine's (torch 2.11 + Triton 3.6 there, where tile configurations that were spill-free
# under 3.7 spilled), installed by `make test` as a bare package in .venv-triton-gpu/ and put
# first on the child's path. Without that folder (no network at set-up, or a GPU machine that
# runs its own Triton) the second pass is skipped with the reason.
GPU_TRITON_DIR = REPO / ".venv-triton-gpu"
COMPILERS = ["installed", "gpu-machine"]


@pytest.fixture(scope="module", params=COMPILERS)
def compiled(request):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if request.param == "gpu-machine":
        if not (GPU_TRITON_DIR / "triton").is_dir():
            pytest.skip(f"no {GPU_TRITON_DIR.name}/ (the GPU machine's Triton, installed by make test)")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(GPU_TRITON_DIR), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(CASES)], env=env, cwd=str(REPO),
                          capture_output=True, text=True, timeout=900)
    marker = [line for line in proc.stdout.splitlines() if line.startswith("@@RESULTS@@")]
    assert proc.returncode == 0 and marker, (
        f"compile child failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    results = json.loads(marker[-1][len("@@RESULTS@@"):])
    version = results.pop("@version")
    if request.param == "gpu-machine":
        wanted = [d.name[len("triton-"):-len(".dist-info")] for d in GPU_TRITON_DIR.glob("triton-*.dist-info")]
        assert [version] == wanted, f"the child imported Triton {version}, not {wanted}"
    return results


def test_every_kernel_has_a_compile_case():
    assert CASES, "no COMPILE_CASES found in kernels/"
    assert not UNCOVERED, f"@triton.jit kernels without a COMPILE_CASES entry: {UNCOVERED}"


@pytest.mark.parametrize("path,index,cid", CASES, ids=[c[2] for c in CASES])
def test_compiles_for_sm90(compiled, path, index, cid):
    res = compiled[cid]
    assert res["ok"], res.get("error")
    assert res["ptx"] > 0 and res["cubin"] > 0
    assert res["shared"] <= MAX_SHARED, f"{cid} needs {res['shared']} B of shared memory (> {MAX_SHARED})"
    # the tile configurations were chosen spill-free with ptxas -v; a change that makes one
    # spill (registers to local memory) is a performance regression caught here
    if res["spill_bytes"] is not None:
        assert res["spill_bytes"] == 0, f"{cid} spills {res['spill_bytes']} B to local memory on sm_90"
