"""The README's Python examples against the package: every pyssl function, class and method they
call exists and takes the keywords they pass, and the self-contained MLCD example runs (at a
smaller class count). Keeps the user-facing API text from drifting away from the code."""
import ast
import inspect
import os
import re

import pytest
import torch

import pyssl

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def _blocks():
    """The README's ```python blocks as (first line number, source), `>>>` prompts unwrapped
    and their printed output dropped."""
    text = open(README, encoding="utf-8").read().split("\n")
    out, cur, start = [], None, 0
    for i, line in enumerate(text, 1):
        if cur is None and line.strip() == "```python":
            cur, start = [], i + 1
        elif cur is not None and line.strip() == "```":
            if any(x.startswith(">>> ") for x in cur):
                cur = [x[4:] for x in cur if x.startswith(">>> ")]
            out.append((start, "\n".join(cur)))
            cur = None
        elif cur is not None:
            cur.append(line)
    return out


def _chain(node):
    """The dotted pyssl path of a call's target, with the calls on the way: for
    pyssl.ood.KNNScorer(k=50).fit(x) -> ["pyssl", "ood", "KNNScorer", "()", "fit"]; None when the
    chain does not start at the pyssl module."""
    parts = []
    while True:
        if isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Call):
            parts.append("()")
            node = node.func
        elif isinstance(node, ast.Name):
            parts.append(node.id)
            break
        else:
            return None
    parts.reverse()
    return parts if parts[0] == "pyssl" else None


def _resolve(parts):
    """The object a chain names: attributes looked up, a call of a class standing for its
    instances (methods looked up on the class), a call of a function unresolved (None)."""
    obj = pyssl
    for p in parts[1:]:
        if p == "()":
            if not inspect.isclass(obj):
                return None
            continue
        assert hasattr(obj, p), f"{'.'.join(x for x in parts if x != '()')}: no attribute {p!r}"
        obj = getattr(obj, p)
    return obj


def _calls():
    found = []
    for start, src in _blocks():
        tree = ast.parse(src)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                parts = _chain(node.func)
                if parts:
                    found.append((start + node.lineno - 1, parts, [k.arg for k in node.keywords if k.arg]))
    return found


def test_readme_examples_call_what_exists():
    calls = _calls()
    assert len(calls) > 40, len(calls)           # the examples were found and parsed
    checked = 0
    for line, parts, keywords in calls:
        obj = _resolve(parts)
        if obj is None:
            continue
        target = obj.__init__ if inspect.isclass(obj) else obj
        sig = inspect.signature(target)
        if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            continue
        for k in keywords:
            assert k in sig.parameters, (f"README.md:{line}: {'.'.join(p for p in parts if p != '()')} "
                                         f"takes no keyword {k!r} (has {list(sig.parameters)})")
        checked += 1
    assert checked > 30, checked


def test_readme_mlcd_example_runs():
    """The one self-contained example (the MLCD loss) as written, with 20,000 classes instead
    of 100,000 (the example's positives, 1000 apart, stay distinct above 8,000): the loss is
    finite and the gradients reach the sampled rows only."""
    src = next(s for _, s in _blocks() if s.startswith("import torch, pyssl") and "mlcd_loss" in s)
    src = re.sub(r"\b100_000\b", "20_000", src)
    ns = {}
    exec(compile(src, "README.md (mlcd example)", "exec"), ns)
    assert torch.isfinite(ns["loss"]) and ns["weight"].grad is not None
    outside = torch.ones(20_000, dtype=torch.bool)
    outside[ns["classes"]] = False
    assert (ns["weight"].grad[outside] == 0).all() and ns["x"].grad.abs().sum() > 0


def test_readme_block_parser_sees_prompts_and_blocks():
    blocks = _blocks()
    assert len(blocks) >= 10
    assert any("not_supported_reasons" in s and ">>>" not in s for _, s in blocks)
