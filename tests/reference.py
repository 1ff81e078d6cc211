"""Independent float64 references for the residual tests: plain torch.autograd loops.

Nothing here calls fpkern.ops: every derivative is a coordinate-by-coordinate backward pass
on vector data x [B, D], so the tests compare two computations that share no code.
"""

import torch


def derivatives(score_fn, x, t):
    """s [B,D], d_t s [B,D], J [B,D,D] (J[b,i,j] = ds_i/dx_j), H [B,D,D,D] (d^2 s_i/dx_j dx_k)."""
    D = x.shape[1]
    xg = x.detach().clone().requires_grad_(True)
    tg = t.detach().clone().requires_grad_(True)
    s = score_fn(xg, tg)
    dts = torch.stack([torch.autograd.grad(s[:, i].sum(), tg, create_graph=True)[0]
                       for i in range(D)], 1)
    J = torch.stack([torch.autograd.grad(s[:, i].sum(), xg, create_graph=True)[0]
                     for i in range(D)], 1)
    H = torch.stack([torch.stack([torch.autograd.grad(J[:, i, j].sum(), xg, create_graph=True)[0]
                                  for j in range(D)], 1) for i in range(D)], 1)
    return s, dts, J, H


def residual_terms(score_fn, x, t, sde, probes=None):
    """(dts, grad div, J^T c, Lap, J c, s, f, g2) exact, or probe-conditional for given probes."""
    s, dts, J, H = derivatives(score_fn, x, t)
    f, g2 = sde.f(t), sde.g2(t)
    c = g2[:, None] * s - f[:, None] * x
    if probes is None:
        lap = torch.einsum("bijj->bi", H)
        grad_div = torch.einsum("bjjk->bk", H)
    else:
        V = probes.to(x)
        lap = torch.einsum("bijl,kbj,kbl->bi", H, V, V) / V.shape[0]
        grad_div = torch.einsum("bijk,nbi,nbj->bk", H, V, V) / V.shape[0]
    jtc = torch.einsum("bij,bi->bj", J, c)
    jc = torch.einsum("bij,bj->bi", J, c)
    return dict(dts=dts, grad_div=grad_div, jtc=jtc, lap=lap, jc=jc, s=s, f=f, g2=g2, J=J, H=H)


def residual(score_fn, x, t, sde, form, probes=None):
    T = residual_terms(score_fn, x, t, sde, probes)
    f, g2 = T["f"][:, None], T["g2"][:, None]
    if form == "div":
        return T["dts"] - 0.5 * g2 * T["grad_div"] - T["jtc"] + f * T["s"]
    return T["dts"] - 0.5 * g2 * T["lap"] - T["jc"] + f * T["s"]


def perturbed_field(gm, sde, *, scale=0.3, seed=0):
    """The mixture's exact score plus a smooth, time-dependent, non-conservative term."""
    g = torch.Generator().manual_seed(seed)
    D = gm.dim
    W = torch.randn(D, D, generator=g, dtype=torch.float64)
    A = torch.randn(D, D, generator=g, dtype=torch.float64)
    b = torch.randn(D, generator=g, dtype=torch.float64)

    def score_fn(x, t):
        W_, A_, b_ = W.to(x), A.to(x), b.to(x)
        inner = torch.tanh(x @ W_.T + t[:, None] * b_)
        return gm.score(x, t, sde) + scale * (1 + t[:, None]) * (inner @ A_.T) * torch.cos(x)

    return score_fn
