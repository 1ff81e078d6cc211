"""act(GroupNorm(Jet)) as the jet rules run it (fpkern.jet.fused.group_norm_act) against the
two torch composites in a row.

group_norm_act is no torch.library op of its own but one autograd node over the fused
GroupNorm and activation kernels that saves the GroupNorm's input only (and recomputes its
output in the backward); this measures what that costs and saves. Providers: fused (the
GroupNorm rule's group_norm_jet_stats, then group_norm_act on its output and statistics,
as fpkern.jet.rules chains them; default backend: C++ on CPU, Triton on CUDA) and torch
(group_norm_jet_ref then jet_act_ref under plain autograd). Modes: "fwd" (the SiLU rows, with
the graph recorded) and "fwdbwd" (and the gradients of the rows, weight and bias); see
benchmarks/micro.py. Cases: those of benchmarks/bench_group_norm_jet.py.
Run: `pytest benchmarks/bench_group_norm_act.py --benchmark-only [--bench-json PATH]`.
"""

from __future__ import annotations

import pytest

from benchmarks.micro import FEATURES, GN_EPS, LAYOUTS, cases, group_norm_inputs, op_runners
from fpkern.jet.fused.group_norm_act import group_norm_act
from fpkern.jet.fused.group_norm_jet import group_norm_jet_ref, group_norm_jet_stats
from fpkern.jet.fused.jet_act import jet_act_ref

ACT = "silu"


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("lname", list(LAYOUTS))
@pytest.mark.parametrize("case", list(cases(FEATURES)))
def test_group_norm_act(record_group, case, lname, mode):
    layout = LAYOUTS[lname]
    spec = layout.kernel_spec
    rows, w, b, groups = group_norm_inputs(case, layout)

    def fused():
        y, w2, b2, mean, var = group_norm_jet_stats(rows, groups, w, b, GN_EPS, spec)
        return group_norm_act(rows, w2, b2, groups, GN_EPS, spec, ACT, y, mean, var)

    def ref():
        return jet_act_ref(group_norm_jet_ref(rows, groups, w, b, GN_EPS, spec), ACT, spec)

    fns = op_runners(mode, fused, ref, [rows, w, b])
    record_group(f"group_norm_act/{case}/{lname}", mode, fns, rounds=10,
                 rows=list(rows.shape), groups=groups)
