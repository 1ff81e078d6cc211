"""Registers, spills and shared memory of every Triton kernel the benchmark cases launch,
compiled for sm_90 (H100) on a machine without a GPU (fpkern.kernels.offline).

The train steps of benchmarks/bench_residual.py (fused laplacian and div, projected div) run
with the Triton backend on CPU tensors while their kernel launches are recorded, not run; each
distinct specialization is then compiled. Block sizes and constexprs do not depend on the
batch, so two samples stand for the GPU cases' 64-1024.

    python -m benchmarks.kernel_resources [--json PATH]

Spills (stack bytes per thread) and 255 registers mark kernels whose speed a GPU run should
look at first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # lets the Triton backend take CPU tensors

from benchmarks.bench_residual import CASES, _case, _train_loss  # noqa: E402
from fpkern import backend  # noqa: E402
from fpkern.kernels import (fpe_combine, group_norm_jet, hutchinson_reduce,  # noqa: E402
                            jet_act, laplacian_terms, mlp_jet, offline)

_KEYS = ("R", "N1", "NP", "NC", "RB", "KB", "BB", "WIDTH", "DP", "WEIGHTS", "HAS_PAIRS",
         "HAS_COLL", "NPAIRS", "FP64", "UPCAST", "BLOCK")


def record(cases) -> list[dict]:
    """The kernel specializations of the cases' fused and projected train steps."""
    modules = (fpe_combine, group_norm_jet, hutchinson_reduce, jet_act, laplacian_terms, mlp_jet)
    with offline.recorded_launches(*modules) as launches, backend.use_backend("triton"):
        for case in cases:
            net, sde, x, t, z = _case(case)
            x, t, z = x[:2], t[:2], z[:2]
            for provider, form in (("fused", "laplacian"), ("fused", "div"),
                                   ("projected", "div")):
                net.zero_grad(set_to_none=True)
                _train_loss(net, sde, x, t, z, provider, form).backward()
            print(f"{case}: {len(launches)} specializations so far", file=sys.stderr)
    return launches


def _row(r: dict) -> str:
    spec = r["spec"]
    c = spec["constexprs"]
    key = " ".join(f"{k}={int(c[k]) if isinstance(c[k], bool) else c[k]}" for k in _KEYS
                   if k in c)
    name = f"{spec['module'].rsplit('.', 1)[-1]}.{spec['kernel']}"
    warps = spec["options"].get("num_warps", 4)
    if "error" in r:
        return f"{name:38s} {key:58s} FAILED: {r['error'].splitlines()[-1]}"
    regs, spill = (("?" if r[k] is None else r[k]) for k in ("registers", "spill"))
    return (f"{name:38s} {key:58s} {warps:5d} {regs:>5} {spill:>6} "
            f"{r['shared']:>7}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=CASES, choices=CASES,
                    help="benchmark cases (default: all)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if not offline.nvidia_compiler():
        print("triton's NVIDIA compiler is not installed", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    results = offline.compile_specs(record(args.cases))
    print(f"{'kernel':38s} {'specialization':58s} warps  regs  spill  shared")
    for r in sorted(results, key=lambda r: (r["spec"]["module"], r["spec"]["kernel"])):
        print(_row(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"target": "sm_90", "cases": args.cases, "results": results}, f, indent=1)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
