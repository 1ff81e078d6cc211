"""The residual's assembly from its terms (fpkern::fpe_combine) against its torch composite.

r = dts - 1/2 g2 second - jc + f s, one pass over four planes [B, ...] (MATH.md 2), as the
naive, exact and forward-mode residuals call it. Providers: fused (fpkern.ops.fpe_combine on
the default backend: C++ on CPU, Triton on CUDA) and torch (fpe_combine_ref under plain
autograd). Modes: "fwd" (r, with the graph recorded) and "fwdbwd" (and the gradients of the
four network-made terms; g2 and f, functions of t, are constants); see benchmarks/micro.py.
Cases: planes of the score network's input shape, the small NCSN++ preset at batch 8 and
the D = 64 MLP at batch 128 on CPU, CIFAR-10 at batch 64 and 128 on GPU.
Run: `pytest benchmarks/bench_fpe_combine.py --benchmark-only [--bench-json PATH]`.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.micro import DATA, cases, leaf, op_runners, randn
from fpkern.ops.fpe_combine import fpe_combine, fpe_combine_ref


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("case", list(cases(DATA)))
def test_fpe_combine(record_group, case, mode):
    shape = cases(DATA)[case]
    g = torch.Generator().manual_seed(0)
    terms = [leaf(randn(g, *shape)) for _ in range(4)]          # dts, second, jc, s
    g2, f = randn(g, shape[0]).abs(), randn(g, shape[0])
    fns = op_runners(mode, lambda: fpe_combine(*terms, g2, f),
                     lambda: fpe_combine_ref(*terms, g2, f), terms)
    record_group(f"fpe_combine/{case}", mode, fns, rounds=20, shape=list(shape))
