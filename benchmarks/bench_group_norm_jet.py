"""The fused GroupNorm jet rule (fpkern::group_norm_jet) against its torch composite.

Providers: fused (fpkern.jet.fused.group_norm_jet.group_norm_jet, the op the GroupNorm jet
rule calls, on the default backend: C++ on CPU, Triton on CUDA) and torch
(group_norm_jet_ref, the composite rule, under plain autograd). Modes: "fwd" (the normalised
rows, with the graph recorded) and "fwdbwd" (and the gradients of the rows, weight and
bias); see benchmarks/micro.py. Cases: jet rows of the network's widest GroupNorm (its
groups, eps = 1e-6 as the presets' layers) in the laplacian form's and the projected div
form's layouts: the small NCSN++ preset at batch 8 on CPU, the CIFAR-10 NCSN++ at batch 64
on GPU.
Run: `pytest benchmarks/bench_group_norm_jet.py --benchmark-only [--bench-json PATH]`.
"""

from __future__ import annotations

import pytest

from benchmarks.micro import FEATURES, GN_EPS, LAYOUTS, cases, group_norm_inputs, op_runners
from fpkern.jet.fused.group_norm_jet import group_norm_jet, group_norm_jet_ref


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("lname", list(LAYOUTS))
@pytest.mark.parametrize("case", list(cases(FEATURES)))
def test_group_norm_jet(record_group, case, lname, mode):
    layout = LAYOUTS[lname]
    spec = layout.kernel_spec
    rows, w, b, groups = group_norm_inputs(case, layout)
    fns = op_runners(mode, lambda: group_norm_jet(rows, groups, w, b, GN_EPS, spec),
                     lambda: group_norm_jet_ref(rows, groups, w, b, GN_EPS, spec),
                     [rows, w, b])
    record_group(f"group_norm_jet/{case}/{lname}", mode, fns, rounds=10,
                 rows=list(rows.shape), groups=groups)
