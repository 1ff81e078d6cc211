"""act(GroupNorm(Jet)) as one autograd node that keeps the GroupNorm's input, not its output.

    group_norm_act(x_rows, weight, bias, groups, eps, spec, act, y, mean, var) -> rows of act(y)

NCSN++ and DDPM++ apply an activation right after almost every GroupNorm. On Jets both are
fused ops (fpkern.jet.fused.group_norm_jet, fpkern.jet.fused.jet_act) and each saves its
input for the backward: the GroupNorm's input x and the activation's input y = GN(x), two
copies of those rows. This node takes y, mean and var as the GroupNorm rule computed them
(no second forward), applies the activation kernel, and saves x, the parameters and the
statistics. Its backward recomputes y with the GroupNorm kernel, then runs the activation's
and the GroupNorm's backward kernels. The GroupNorm op's own node then has no consumer and
is freed with y.

Cost: one more GroupNorm forward per backward (checkpointing one tensor per block); gain:
one saved copy of the rows less per GroupNorm-activation pair, and one autograd node less
(measured: benchmarks/results/README.md, "Design notes"). The jet rules (fpkern.jet.rules)
use it in eager mode with kernels on; a tracer (torch.compile) sees the two registered ops
instead. Under create_graph the backward runs the torch references of both rules, so it is
itself differentiable.
"""

from __future__ import annotations

import torch

from fpkern.jet.fused import group_norm_jet as gn
from fpkern.jet.fused import jet_act as ja

__all__ = ["group_norm_act"]


class _GroupNormAct(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, y, mean, var, groups, eps, spec, act):
        ctx.save_for_backward(x, weight, bias, mean, var)
        ctx.conf = (groups, eps, spec, act)
        return ja.run_forward(y, act, spec)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, mean, var = ctx.saved_tensors
        groups, eps, spec, act = ctx.conf
        need = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():          # create_graph: differentiable references
            return tuple(gn.reference_grads(
                lambda r, w, b: ja.jet_act_ref(gn.group_norm_jet_ref(r, groups, w, b, eps, spec),
                                               act, spec),
                grad, x, weight, bias, need)) + (None,) * 7
        y, _, _ = gn.run_forward(x, weight, bias, groups, eps, spec)
        gy = ja.run_backward(grad.contiguous(), y, act, spec)
        dx, dw, db = gn.run_backward(gy, x, weight, mean, var, groups, eps, spec)
        return tuple(gn.kernel_grads(dx, dw, db, weight, bias, need)) + (None,) * 7


def group_norm_act(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   groups: int, eps: float, spec, act: str, y: torch.Tensor, mean: torch.Tensor,
                   var: torch.Tensor) -> torch.Tensor:
    """Rows of act(GN(x)) given y = GN(x) and its statistics (group_norm_jet's
    group_norm_jet_stats); differentiable in x, weight and bias through this node alone.
    weight and bias must be in x's dtype (group_norm_jet_stats casts them)."""
    ja.check_act(act)
    if y.shape != x.shape:
        raise ValueError(f"y must have the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")
    return _GroupNormAct.apply(x, weight, bias, y.detach(), mean, var, groups, eps, spec, act)
