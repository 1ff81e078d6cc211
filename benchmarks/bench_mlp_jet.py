"""The MLP score network on jets as one fused op (fpkern::mlp_jet) against its torch composite.

Providers: fused (fpkern.jet.fused.mlp_jet.mlp_jet as the MLP's jet rule calls it, on the
default backend: fpkern.jet.fused.mlp_jet_cpu on CPU, the whole-network Triton kernels on
CUDA) and torch (mlp_jet_ref, the per-row formulas, under plain autograd). Modes: "fwd" (the
output rows, with the graph recorded) and "fwdbwd" (and the parameters' gradients, as a
training step takes them); see benchmarks/micro.py. Cases: the MLP of
benchmarks/bench_residual.py (D = 2 and 64, width 256, depth 3; batch 128 on CPU, 1024 on
GPU) on the rows the engine builds: the laplacian form's transport pass (x, v, -c, 0; t rows
t, 0, 1, 0) and the projected div-form pass (x, v, u, 0, 0; t rows t, 0, 0, 1, 0).
Run: `pytest benchmarks/bench_mlp_jet.py --benchmark-only [--bench-json PATH]`.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import device
from benchmarks.micro import LAYOUTS, gpu, op_runners, randn
from fpkern.jet.fused.mlp_jet import mlp_jet, mlp_jet_ref
from fpkern.models import MLP

DIMS = [2, 64]


def _inputs(D: int, lname: str):
    """The network, x rows [R, B, D] and t rows [R, B] (constants of the pass)."""
    torch.manual_seed(0)
    net = MLP(D, width=256, depth=3).to(device())
    B = 1024 if gpu() else 128
    g = torch.Generator().manual_seed(0)
    x, v, d = (randn(g, B, D) for _ in range(3))          # d: -c (laplacian) or u (projected)
    t = (torch.rand(B, generator=g) * (1 - 1e-3) + 1e-3).to(device())
    zx, zt, one = torch.zeros_like(x), torch.zeros_like(t), torch.ones_like(t)
    if lname == "laplacian":
        x_rows, t_rows = torch.stack([x, v, d, zx]), torch.stack([t, zt, one, zt])
    else:
        x_rows, t_rows = torch.stack([x, v, d, zx, zx]), torch.stack([t, zt, zt, one, zt])
    assert x_rows.shape[0] == LAYOUTS[lname].rows
    return net, x_rows, t_rows


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("lname", list(LAYOUTS))
@pytest.mark.parametrize("D", DIMS)
def test_mlp_jet(record_group, D, lname, mode):
    net, x_rows, t_rows = _inputs(D, lname)
    spec = LAYOUTS[lname].kernel_spec
    params = [p for p in net.parameters() if p.requires_grad]
    fns = op_runners(mode, lambda: mlp_jet(x_rows, t_rows, net.mlp_params(), spec),
                     lambda: mlp_jet_ref(x_rows, t_rows, net.mlp_params(), spec), params)
    record_group(f"mlp_jet/mlp{D}_b{x_rows.shape[1]}/{lname}", mode, fns, rounds=10,
                 rows=list(x_rows.shape), width=256)
