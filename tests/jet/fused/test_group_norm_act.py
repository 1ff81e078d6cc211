"""act(GroupNorm(Jet)) as one autograd node (fpkern.jet.fused.group_norm_act): the same rows
and gradients as the two fused ops apart, less saved memory, differentiable twice."""

import torch
import torch.nn.functional as F

import fpkern.jet.rules as rules
from fpkern.jet import Jet
from fpkern.jet.fused import group_norm_jet as gnj
from fpkern.jet.fused.group_norm_act import group_norm_act
from tests.jet.fused.test_group_norm_jet import LAYOUTS, _inputs
from tests.kernel_checks import assert_close


def test_activation_after_the_rule_saves_the_groupnorm_input_only(gen):
    """silu(GroupNorm(Jet)) fuses into one node (fpkern.jet.fused.group_norm_act): same rows and
    gradients as the two ops apart, and the GroupNorm's output is no longer kept."""
    from benchmarks.conftest import PeakMemory
    layout = LAYOUTS["pairs+collapsed"]
    rows, w, b = _inputs((2, 6, 3, (4, 5)), layout, gen)
    rows.requires_grad_(True)
    w, b = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    go = torch.randn(rows.shape, generator=gen, dtype=rows.dtype)

    def run():
        out = F.silu(F.group_norm(Jet(rows, layout), 3, w, b, 1e-6)).rows
        return out, torch.autograd.grad(out, (rows, w, b), go)

    fused, g_fused = run()
    real = rules._act_after_group_norm
    try:
        rules._act_after_group_norm = lambda x, act: None
        apart, g_apart = run()
        mem_apart = PeakMemory()
        mem_apart(lambda: F.silu(F.group_norm(Jet(rows, layout), 3, w, b, 1e-6)))
    finally:
        rules._act_after_group_norm = real
    mem_fused = PeakMemory()
    mem_fused(lambda: F.silu(F.group_norm(Jet(rows, layout), 3, w, b, 1e-6)))
    assert_close(fused, apart, 1e-12, "rows")
    for name, a, c in zip(("rows", "weight", "bias"), g_fused, g_apart):
        assert_close(a, c, 1e-12, f"grad {name}")
    nbytes = rows.numel() * rows.element_size()
    assert mem_apart.peak - mem_fused.peak >= nbytes      # the GroupNorm output's rows


def test_fused_activation_node_passes_gradcheck_and_gradgradcheck(gen):
    layout = LAYOUTS["pairs+collapsed"]
    spec = layout.kernel_spec
    rows, w, b = _inputs((2, 4, 2, (3,)), layout, gen)

    def fn(r, w_, b_):
        y, w2, b2, mean, var = gnj.group_norm_jet_stats(r, 2, w_, b_, 1e-6, spec)
        return group_norm_act(r, w2, b2, 2, 1e-6, spec, "silu", y, mean, var)

    args = (rows.requires_grad_(True), w.clone().requires_grad_(True),
            b.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)
