"""The fused activation jet rule (fpkern::jet_act) against its torch composite.

Providers: fused (fpkern.jet.fused.jet_act.jet_act as the jet rules call it, on the default
backend: C++ on CPU, Triton on CUDA) and torch (jet_act_ref, the composite rule, under plain
autograd). Modes: "fwd" (the SiLU rows, with the graph recorded) and "fwdbwd" (and the rows'
gradient); see benchmarks/micro.py. Cases: jet rows of the network's widest feature level
(the activation kernel that group_norm_act also runs) and of the time embedding (where
jet_act runs alone), in the laplacian form's and the projected div form's layouts: the small
NCSN++ preset at batch 8 on CPU, the CIFAR-10 NCSN++ at batch 64 on GPU.
Run: `pytest benchmarks/bench_jet_act.py --benchmark-only [--bench-json PATH]`.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.micro import FEATURES, LAYOUTS, cases, leaf, op_runners, randn
from fpkern.jet.fused.jet_act import jet_act, jet_act_ref

#: Time-embedding rows [B, 4 nf] (nf: the network's base channel count).
TEMB = {"cpu": {"ncsnpp_small_b8_temb": (8, 64)},
        "cuda": {"cifar10_ncsnpp_b64_temb": (64, 512)}}
SHAPES = {name: shape[:4] for name, shape in cases(FEATURES).items()} | cases(TEMB)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("lname", list(LAYOUTS))
@pytest.mark.parametrize("case", list(SHAPES))
def test_jet_act(record_group, case, lname, mode):
    layout, shape = LAYOUTS[lname], SHAPES[case]
    spec = layout.kernel_spec
    rows = leaf(randn(torch.Generator().manual_seed(0), layout.rows, *shape))
    fns = op_runners(mode, lambda: jet_act(rows, "silu", spec),
                     lambda: jet_act_ref(rows, "silu", spec), [rows])
    record_group(f"jet_act/{case}/{lname}", mode, fns, rounds=10, rows=list(rows.shape))
