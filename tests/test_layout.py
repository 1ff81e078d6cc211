"""The naming rule: one stem per fused op, equal to its torch.library name.

For an op `fpkern::X` (with its `fpkern::X_backward`): the autograd op module `X.py` (in
fpkern/jet/fused or fpkern/ops) defines it, `tests/**/test_X.py` tests it and
`benchmarks/bench_X.py` times it against its torch reference. Its backends, where it has
them, carry the same stem: `fpkern/kernels/X.py` (Triton), `csrc/X.{h,cpp}` and
`python/bind_X.cpp` (C++, bound as `_C.X_forward` / `_C.X_backward`). In reverse, no file in
those places is named after anything but an op.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
OP_PACKAGES = ("fpkern.jet.fused", "fpkern.ops")
# act(GroupNorm(.)) as one autograd node over the group_norm_jet and jet_act ops: not a
# torch.library op of its own, but a fused op all the same (module, test, benchmark)
COMPOSITES = {"group_norm_act": "fpkern/jet/fused/group_norm_act.py"}
# files beside the kernels that are not kernels of one op
SHARED = {"kernels": {"__init__", "_common", "offline"}, "csrc": {"jet_layout"},
          "python": {"bindings", "common"}}


def _ops() -> set[str]:
    """The stems of torch.ops.fpkern, after importing every module that may define one."""
    for pkg in OP_PACKAGES:
        for info in pkgutil.iter_modules(importlib.import_module(pkg).__path__):
            importlib.import_module(f"{pkg}.{info.name}")
    import fpkern.models  # noqa: F401  (registers the MLP's jet rule: no op of its own)
    ns = torch.ops.fpkern
    names = {n for n in dir(ns) if isinstance(getattr(ns, n, None), torch._ops.OpOverloadPacket)}
    stems = {n for n in names if not n.endswith("_backward")}
    orphans = {n for n in names if n.endswith("_backward")} - {f"{s}_backward" for s in stems}
    assert not orphans, f"backward ops without their forward op: {sorted(orphans)}"
    return stems


OPS = sorted(_ops())


def test_every_fused_op_is_registered():
    """The enumeration sees the ops (guards the tests below against an empty list)."""
    assert {"jet_act", "group_norm_jet", "mlp_jet", "fpe_combine", "hutchinson_reduce",
            "laplacian_terms"} <= set(OPS)


@pytest.mark.parametrize("stem", OPS + sorted(COMPOSITES))
def test_op_has_its_module_test_and_benchmark(stem):
    modules = [p for pkg in ("fpkern/jet/fused", "fpkern/ops") for p in [ROOT / pkg / f"{stem}.py"]
               if p.exists()]
    assert len(modules) == 1, f"{stem}: expected one op module X.py in fpkern/jet/fused or fpkern/ops"
    if stem not in COMPOSITES:
        assert f'"fpkern::{stem}"' in modules[0].read_text(), \
            f"{modules[0].relative_to(ROOT)} does not define fpkern::{stem}"
    assert list((ROOT / "tests").rglob(f"test_{stem}.py")), f"no tests/**/test_{stem}.py"
    assert (ROOT / "benchmarks" / f"bench_{stem}.py").exists(), f"no benchmarks/bench_{stem}.py"


def test_every_custom_op_is_defined_in_the_module_of_its_name():
    found = {}
    for path in (ROOT / "fpkern").rglob("*.py"):
        for name in re.findall(r'custom_op\(\s*"fpkern::(\w+)"', path.read_text()):
            found[name] = path
    assert found, "no torch.library.custom_op found: the scan is broken"
    for name, path in found.items():
        assert path.stem == name.removesuffix("_backward"), \
            f"fpkern::{name} is defined in {path.relative_to(ROOT)}"
    assert {n for n in found if not n.endswith("_backward")} == set(OPS)


@pytest.mark.parametrize("where, pattern", [("kernels", "fpkern/kernels/*.py"),
                                            ("csrc", "csrc/*.[ch]*"),
                                            ("python", "python/*.cpp")])
def test_backend_files_are_named_after_ops(where, pattern):
    for path in ROOT.glob(pattern):
        stem = path.stem.removeprefix("bind_") if where == "python" else path.stem
        if stem in SHARED[where]:
            continue
        assert stem in OPS, f"{path.relative_to(ROOT)} is named after no fpkern op"


def test_cpp_kernels_have_their_binding_and_launchers():
    from fpkern import _native

    cpp = {p.stem for p in (ROOT / "csrc").glob("*.cpp")}
    bound = {p.stem.removeprefix("bind_") for p in (ROOT / "python").glob("bind_*.cpp")}
    assert cpp == bound, f"csrc/X.cpp without python/bind_X.cpp or back: {sorted(cpp ^ bound)}"
    headers = {p.stem for p in (ROOT / "csrc").glob("*.h")} - SHARED["csrc"]
    assert headers == cpp, f"csrc/X.h and csrc/X.cpp differ: {sorted(headers ^ cpp)}"
    lib = _native.lib()
    launchers = {n for n in dir(lib) if not n.startswith("_")}
    assert launchers == {f"{s}_{d}" for s in cpp for d in ("forward", "backward")}


def _import_graph() -> dict[str, set[str]]:
    """fpkern's modules -> the fpkern modules each imports, at module level or inside a
    function (a lazy import closes a circle all the same)."""
    files = {}
    for path in (ROOT / "fpkern").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def module(name):
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fpkern"):
                assert not node.level, f"{path}: relative import"
                deps |= {module(f"{node.module}.{a.name}") for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {module(a.name) for a in node.names if a.name.startswith("fpkern")}
        graph[name] = deps - {name, ""}
    return graph


def _has_cycle(graph) -> list[str] | None:
    state: dict[str, int] = {}              # 1 on the path, 2 done

    def visit(v, path):
        state[v] = 1
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (found := visit(w, path + [w])):
                return found
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v, [v])):
            return found
    return None


def test_no_import_circle_but_jet_rules_and_tensor():
    """A Jet's __torch_function__ dispatches to the rules and the rules build Jets: that one
    circle is the design. Without the edge fpkern.jet.tensor -> fpkern.jet.rules the import
    graph (lazy imports included) is acyclic."""
    graph = _import_graph()
    assert "fpkern.jet.rules" in graph["fpkern.jet.tensor"], "the scan misses the known edge"
    assert _has_cycle(graph), "the scan should see the known circle"
    graph["fpkern.jet.tensor"].discard("fpkern.jet.rules")
    assert _has_cycle(graph) is None
