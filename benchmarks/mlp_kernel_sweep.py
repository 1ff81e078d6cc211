"""Block size and warps of the whole-network MLP kernel (fpkern/kernels/mlp_jet.py), swept on
a GPU: the forward and backward of `fpkern::mlp_jet` timed for each setting on the
benchmark MLPs, with each setting's error against the float64 reference.

A program owns BLOCK_B samples (half as many above 8 rows), so the benchmarks' batch of 1024
gives 64 programs on an H100's 132 SMs at the default 16; fewer samples a program mean more
programs but smaller GEMM tiles. The kernels spill at 8 warps (benchmarks/kernel_resources.py).
Which setting is fastest only a GPU can tell:

    python -m benchmarks.mlp_kernel_sweep [--dims 2 64] [--block-b 4 8 16] [--warps 4 8]
                                          [--json PATH]

Each setting compiles two kernels (~10-20 s each for width 256): the defaults (D = 64, block
8 and 16, 4 and 8 warps, the three passes: 24 compilations) fit one 10-minute device call;
split wider sweeps over calls. Without CUDA it runs a small check of each setting under the
Triton interpreter (no times).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fpkern import backend  # noqa: E402
from fpkern.jet import Layout  # noqa: E402
from fpkern.kernels import mlp_jet as kernels  # noqa: E402
from fpkern.models import MLP  # noqa: E402
from fpkern.jet.fused import mlp_jet as op  # noqa: E402

# the benchmark train steps' passes (benchmarks/kernel_resources.py lists them)
LAYOUTS = {"laplacian": Layout(n1=2, collapse=(1,)),         # x, v, (-c, 1), collapsed
           "projected": Layout(n1=3, pairs=((1, 2),)),       # x, v, u, t, (v, u)
           "div_value": Layout(n1=2)}                          # x, v, t: x-only backward
BLOCK_B = (8, 16)        # what measure() sweeps; main() sets them from its options
WARPS = (4, 8)


def _inputs(layout, B, D, gen, device):
    R = layout.rows
    x = torch.zeros(R, B, D, dtype=torch.float64)
    t = torch.zeros(R, B, dtype=torch.float64)
    x[:1 + layout.n1] = torch.randn(1 + layout.n1, B, D, generator=gen, dtype=torch.float64)
    t[0] = torch.rand(B, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    t[layout.n1] = 1.0
    return x.to(device), t.to(device)


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def measure(D: int, name: str, B: int, width: int, device: str, timed: bool, gen) -> list:
    layout = LAYOUTS[name]
    net = MLP(D, width=width, depth=3).to(device)
    net64 = MLP(D, width=width, depth=3).double().to(device)
    net64.load_state_dict(net.state_dict())
    x64, t64 = _inputs(layout, B, D, gen, device)
    x64.requires_grad_()
    want = op.mlp_jet_ref(x64, t64, net64.mlp_params(), layout.kernel_spec)
    go = torch.randn(want.shape, generator=gen, dtype=torch.float64).to(device)
    weights = name != "div_value"
    params64 = [p for p in net64.parameters() if p.requires_grad] if weights else []
    want_g = torch.autograd.grad(want, [x64] + params64, go)
    x, t = x64.detach().float().requires_grad_(), t64.float()
    params = [p for p in net.parameters() if p.requires_grad] if weights else []
    rows = []
    defaults = (kernels.BLOCK_B, kernels._NUM_WARPS)
    try:
        for bb, warps in itertools.product(BLOCK_B, WARPS):
            kernels.BLOCK_B, kernels._NUM_WARPS = bb, warps
            row = {"D": D, "pass": name, "rows": layout.rows, "B": B, "width": width,
                   "block_b": bb, "num_warps": warps}

            def step():
                out = op.mlp_jet(x, t, net.mlp_params(), layout.kernel_spec)
                return out, torch.autograd.grad(out, [x] + params, go.float())
            try:
                with backend.use_backend("triton"):
                    out, grads = step()
                    row["error_out"] = _rel(out, want)
                    row["error_grad"] = max(_rel(g, w) for g, w in zip(grads, want_g))
                    if timed:
                        import triton.testing
                        row["ms"] = triton.testing.do_bench(step, warmup=25, rep=200,
                                                            return_mode="median")
            except Exception as exc:           # a setting the compiler or the GPU refuses
                row["failed"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    finally:
        kernels.BLOCK_B, kernels._NUM_WARPS = defaults
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[64], help="data dimensions D")
    ap.add_argument("--block-b", type=int, nargs="+", default=[8, 16],
                    help=f"samples a program (the kernel's BLOCK_B; default {kernels.BLOCK_B})")
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8],
                    help=f"warps a program (default {kernels._NUM_WARPS})")
    ap.add_argument("--passes", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    global BLOCK_B, WARPS
    BLOCK_B, WARPS = tuple(args.block_b), tuple(args.warps)
    cuda = torch.cuda.is_available()
    gen = torch.Generator().manual_seed(0)
    B, width = (1024, 256) if cuda else (8, 32)     # the GPU benchmark's MLPs; a quick check
    rows = []
    for D, name in itertools.product(args.dims, args.passes):
        rows += measure(D, name, B, width, "cuda" if cuda else "cpu", cuda, gen)
    print(f"{'D':>3} {'pass':10s} {'BB':>3} {'warps':>5} {'ms':>8} {'err out':>9} {'err grad':>9}")
    for r in rows:
        ms = f"{r['ms']:8.3f}" if "ms" in r else f"{'-':>8}"
        tail = r.get("failed") or f"{r['error_out']:9.1e} {r['error_grad']:9.1e}"
        print(f"{r['D']:>3} {r['pass']:10s} {r['block_b']:>3} {r['num_warps']:>5} {ms} {tail}")
    if args.json:
        device = torch.cuda.get_device_name() if cuda else "cpu (interpreter, no times)"
        with open(args.json, "w") as f:
            json.dump({"device": device, "command": sys.argv, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
