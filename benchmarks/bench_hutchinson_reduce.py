"""The Hutchinson reduction (fpkern::hutchinson_reduce) against its torch composite.

div = 1/K sum_k <v_k, J v_k> per sample from the probes v and their directional derivatives
jv, [K, B, ...] (MATH.md 3), as the div form's passes call it. Providers: fused
(fpkern.ops.hutchinson_reduce on the default backend: C++ on CPU, Triton on CUDA) and torch
(hutchinson_reduce_ref under plain autograd). Modes: "fwd" (div, with the graph recorded)
and "fwdbwd" (and the gradient of jv, which the network made; the probes are constants);
see benchmarks/micro.py. Cases: K = 1 and 4 probes of the score network's input shape, the
small NCSN++ preset at batch 8 and the D = 64 MLP at batch 128 on CPU, CIFAR-10 at batch 64
and 128 on GPU.
Run: `pytest benchmarks/bench_hutchinson_reduce.py --benchmark-only [--bench-json PATH]`.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.micro import DATA, cases, leaf, op_runners, randn
from fpkern.ops.hutchinson_reduce import hutchinson_reduce, hutchinson_reduce_ref


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("K", [1, 4])
@pytest.mark.parametrize("case", list(cases(DATA)))
def test_hutchinson_reduce(record_group, case, K, mode):
    shape = cases(DATA)[case]
    g = torch.Generator().manual_seed(0)
    v, jv = randn(g, K, *shape), leaf(randn(g, K, *shape))
    fns = op_runners(mode, lambda: hutchinson_reduce(v, jv),
                     lambda: hutchinson_reduce_ref(v, jv), [jv])
    record_group(f"hutchinson_reduce/{case}/K{K}", mode, fns, rounds=20, shape=list(shape))
