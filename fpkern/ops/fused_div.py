"""The div-form residual of method="fused": value by one reverse pass, gradient by forward mode.

    terms(score_fn, x, t, sde, V) -> (r, s, div_V s)   (differentiable)
    residual(score_fn, x, t, sde, V) -> r
    div_pass(score_fn, x, t, sde, V, U) -> (s, div_V s, u . r)   (forward mode only)

r = d_t s - grad_x h with h = 1/2 g^2 (div_V s + |s|^2) - f <x, s> (docs/MATH.md 2-3). Its value
takes one jet pass (rows x, v_1..v_K, time; fused kernels) and one reverse pass over it
(fpkern.ops._common.div_form_residual without create_graph). Nothing of either pass is kept.
The pass's value and probe rows also give the score s and its Hutchinson divergence: a
training step takes its DSM term and the scalar FPE term from them (fpkern.losses), with
no forward of its own.

The gradient does not differentiate that reverse pass again. For an upstream gradient rho
(the cotangent of r), rho . r is the projected residual u . r with u = rho, which forward
mode computes exactly (div_pass: u . J^T c = c . J u, and u . grad div_V s from the mixed
rows D^2 s[v_k, u]; E_u (u . r)^2 = |r|^2 for Rademacher or Gaussian u, which makes
w (u . r)^2 an unbiased estimate of the loss w |r|^2, fpkern.ops.projected_residual). The
backward therefore recomputes u . r with u = rho in one jet pass and runs one ordinary
reverse pass over it, so dL/dtheta = d(rho . r)/dtheta needs no double backward: the fused kernels' hand-written
backward serves, and only one jet graph is alive at a time. The same pass has s and div_V s
in its rows, so the cotangents of s and div join rho . r there (div_pass).

Costs and limits (benchmarks/bench_residual.py times them, div vector residual):
- the backward runs the network again (like activation checkpointing): its parameters
  must not change between the forward and the backward (checked: an in-place change
  raises); random ops (dropout) replay the forward's random numbers and the pass runs
  under the forward's autocast mode, as torch.utils.checkpoint does;
- when the caller records the backward itself (create_graph, e.g. a Hessian-vector
  product), the backward runs the old way instead: r again with its reverse pass in the
  graph (composite rules), then a VJP with create_graph;
- the recomputed pass has 2K + 3 rows (value, probes, u, time, one mixed row per probe)
  against K + 2 in the forward, so large K makes the backward dearer;
- gradients flow to the leaves the score depends on (found by walking the forward's
  graph: the parameters, and any other leaf tensor requiring grad), and to x, t and V;
- a score_fn wrapped in torch's DistributedDataParallel would see its forward run again
  inside the backward, which DDP does not allow; fpkern's training loop averages gradients
  itself (fpkern/train/loop.py) and is not affected.
"""

from __future__ import annotations

import contextlib

import torch

from fpkern.jet import Layout, composite_rules
from fpkern.ops._common import bcast, div_form_residual, sde_coefficients
from fpkern.ops.hutchinson_reduce import hutchinson_reduce
from fpkern.ops.jet_pass import jet_pass

__all__ = ["terms", "residual", "div_pass"]


def div_pass(score_fn, x, t, sde, V: torch.Tensor, U: torch.Tensor | None = None):
    """(s, div_V s [B], u . r [B] or None) of the div form from one forward-mode pass.

    Without U the pass has the rows x, v_1..v_K (s and the divergence only); with U the
    rows x, v_1..v_K, u, time and one mixed row D^2 s[v_k, u] per probe give u . r as well:
    u . r = u . d_t s - 1/2 g^2 u . grad div_V s - c . J u + f u . s."""
    K = V.shape[0]
    if U is None:
        rows = jet_pass(score_fn, x, t, V, time=False, layout=Layout(n1=K))
        return rows[0], hutchinson_reduce(V, rows[1:]), None
    u_row = K + 1
    layout = Layout(n1=K + 2, pairs=tuple((k, u_row) for k in range(1, K + 1)))
    rows = jet_pass(score_fn, x, t, torch.cat([V, U[None]]), time=True, layout=layout)
    s, jv, ju, dts, mixed = rows[0], rows[1:u_row], rows[u_row], rows[K + 2], rows[K + 3:]
    f, g2 = sde_coefficients(sde, t, x)
    c = bcast(g2, x) * s - bcast(f, x) * x

    def dot(a, b):
        return (a * b).flatten(1).sum(1)

    u_grad_div = (V * mixed).flatten(2).sum(2).mean(0)
    u_r = dot(U, dts) - 0.5 * g2 * u_grad_div - dot(c, ju) + f * dot(U, s)
    return s, hutchinson_reduce(V, jv), u_r


def _leaves(root: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors requiring grad that `root` depends on, in graph order."""
    out, seen = [], set()
    stack = [root.grad_fn] if root.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)      # AccumulateGrad holds its leaf
        if leaf is not None:
            out.append(leaf)
        else:
            stack.extend(nxt for nxt, _ in node.next_functions)
    return out


def _forward_state(device: torch.device):
    """What the recomputed pass must see as the forward did: the random state (dropout
    masks) and the autocast mode (mixed precision)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    amp = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
    return torch.get_rng_state(), cuda, amp


@contextlib.contextmanager
def _replay(state, device: torch.device):
    """Run the block on the forward's random state and autocast mode (_forward_state),
    then restore the caller's random state."""
    cpu, cuda, (amp, amp_dtype) = state
    with (torch.random.fork_rng(devices=[device] if cuda is not None else []),
          torch.autocast(device.type, dtype=amp_dtype, enabled=amp)):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


def _value(score_fn, x, t, sde, V, *, create_graph: bool = False):
    """(r, s, div_V s, the leaves they depend on, x as a leaf) by one jet pass and one
    reverse pass; t and V are used as given."""
    K = V.shape[0]
    f, g2 = sde_coefficients(sde, t, x)
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        rows = jet_pass(score_fn, xg, t, V, time=True, layout=Layout(n1=K + 1))
        leaves = [leaf for leaf in _leaves(rows) if leaf is not xg]
        s, jv, dts = rows[0], rows[1:K + 1], rows[K + 1]
        div = (V * jv).flatten(2).sum(2).mean(0)     # plain torch: the reverse pass below
        r = div_form_residual(xg, s, div, dts, f, g2, create_graph=create_graph)
    return r, s, div, leaves, xg


class _DivResidual(torch.autograd.Function):
    """(r, s, div_V s) as one autograd node; backward: the gradient of
    rho . r + sigma . s + delta div_V s by one recomputed forward-mode pass (module doc).

    apply(r, s, div, replay, x, t, V, *leaves); replay = (score_fn, sde, _forward_state)."""

    @staticmethod
    def forward(ctx, r, s, div, replay, x, t, V, *leaves):
        ctx.set_materialize_grads(False)
        ctx.replay = replay
        ctx.leaves = leaves
        ctx.versions = [leaf._version for leaf in leaves]
        ctx.save_for_backward(x, t, V)
        return r.clone(), s.clone(), div.clone()

    @staticmethod
    def backward(ctx, grad_r, grad_s, grad_div):
        score_fn, sde, state = ctx.replay
        x, t, V = ctx.saved_tensors
        if any(leaf._version != v for leaf, v in zip(ctx.leaves, ctx.versions)):
            raise RuntimeError(
                "a tensor the score depends on (a network parameter) was modified in place "
                "between the fused div-form residual and its backward (for example "
                "optimizer.step() before loss.backward()); its backward recomputes the "
                "network, so run backward first")
        create = torch.is_grad_enabled()        # the caller's create_graph
        need = ctx.needs_input_grad
        xg = x.detach().requires_grad_(need[4])
        tg = t.detach().requires_grad_(need[5])
        Vg = V.detach().requires_grad_(need[6])
        wanted = [(i, a) for i, a in zip(range(4, 7), (xg, tg, Vg)) if need[i]]
        wanted += [(i, leaf) for i, leaf in enumerate(ctx.leaves, start=7) if need[i]]
        grads = [None] * len(need)
        upstream = (grad_r, grad_s, grad_div)
        if not wanted or all(g is None for g in upstream):
            return tuple(grads)
        with torch.enable_grad(), _replay(state, x.device):
            if create:
                got = _double_differentiable_vjp(score_fn, sde, xg, tg, Vg, upstream, wanted)
            else:
                s, div, u_r = div_pass(score_fn, xg, tg, sde, Vg,
                                       None if grad_r is None else grad_r.detach())
                total = sum(part for part in (
                    None if u_r is None else u_r.sum(),
                    None if grad_s is None else (s * grad_s.detach()).sum(),
                    None if grad_div is None else (div * grad_div.detach()).sum())
                    if part is not None)
                got = torch.autograd.grad(total, [a for _, a in wanted], allow_unused=True)
        for (i, _), g in zip(wanted, got):
            grads[i] = g
        return tuple(grads)


def _double_differentiable_vjp(score_fn, sde, xg, tg, Vg, upstream, wanted):
    """The VJP when the caller records the backward (create_graph): r, s and div again,
    r's reverse pass kept in the graph (composite rules: plain autograd all the way), then
    a VJP with create_graph, so the result depends on the upstream gradients and the
    parameters. (The projected pass cannot serve here: u = grad_r itself depends on r,
    whose backward this is.) x's own gradient then comes from the leaf xg of this pass:
    differentiable in the parameters, not further back in x's history."""
    with composite_rules():
        r, s, div, _, xr = _value(score_fn, xg, tg, sde, Vg, create_graph=True)
    outs, grads = zip(*[(o, g) for o, g in zip((r, s, div), upstream) if g is not None])
    inputs = [xr if a is xg else a for _, a in wanted]
    return torch.autograd.grad(outs, inputs, grads, allow_unused=True, create_graph=True)


def terms(score_fn, x: torch.Tensor, t: torch.Tensor, sde, V: torch.Tensor, *,
          differentiable: bool = True):
    """(r, s, div_V s): the div-form residual for probes V [K, *x.shape], the score and its
    Hutchinson divergence, all from the residual's one jet pass. With `differentiable`
    (the caller's grad mode) they carry gradients to the parameters, x, t and V; one
    recomputed pass in the backward serves all three."""
    state = _forward_state(x.device)
    r, s, div, leaves, _ = _value(score_fn, x, t.detach(), sde, V.detach())
    r, s, div = r.detach(), s.detach(), div.detach()
    if not differentiable or not (leaves or x.requires_grad or t.requires_grad
                                  or V.requires_grad):
        return r, s, div
    return _DivResidual.apply(r, s, div, (score_fn, sde, state), x, t, V, *leaves)


def residual(score_fn, x: torch.Tensor, t: torch.Tensor, sde, V: torch.Tensor, *,
             differentiable: bool = True) -> torch.Tensor:
    """The div-form residual r (terms(...)[0])."""
    return terms(score_fn, x, t, sde, V, differentiable=differentiable)[0]
