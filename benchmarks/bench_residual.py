"""Speed and memory of the FPE residual loss: the paper's algorithm ("naive") against fpkern.

Providers: naive (docs/MATH.md 5: nested reverse mode, 3-point time stencil), fused (fpkern's
method="fused": collapsed Taylor-mode jets with fused kernels; the laplacian form as
fpkern.ops.fused_laplacian: one jet pass and one kernel; the div form's gradient by a forward-mode
recompute, fpkern.ops.fused_div), projected (the div-form loss as the
forward-only unbiased (u . r)^2, fpkern.ops.projected_residual) and torch.func (the generic
forward-mode path, fpkern.ops.forward_mode, that fused falls back to). Modes: "fwd" (the loss
g^2 |r|^2 / D^2), "fwdbwd" (the loss and its parameter gradient) and "train_step" (DSM +
0.15 FP loss sharing passes as fpkern.losses.FPLoss.with_dsm does, backward and the
training loop's fused Adam; against a plain DSM step with the same Adam).
Cases: MLP score networks for D = 2 and 64 and the small NCSN++ preset (CPU and GPU); the
CIFAR-10 NCSN++ and DDPM++ presets at batch 64 (GPU only).
Run: `pytest benchmarks/ --benchmark-only [--bench-json PATH]`.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import device
from fpkern.models import MLP, ScoreFn, from_preset, get_config, sde_from_config
from fpkern.ops import forward_mode, fpe_residual, fpe_terms, projected_residual
from fpkern.sde import VPSDE
from fpkern.train.optim import adam

GPU_CASES = {"cifar10_ncsnpp": "ve/cifar10_ncsnpp_continuous",
             "cifar10_ddpmpp": "vp/cifar10_ddpmpp_continuous"}


def _case(name: str):
    torch.manual_seed(0)
    dev = device()
    if name.startswith("mlp"):
        D = int(name[3:])
        sde = VPSDE()
        net = ScoreFn(MLP(D, width=256, depth=3), sde)
        batch = 128 if dev.type == "cpu" else 1024
        shape = (D,)
    else:
        preset = GPU_CASES.get(name, "small/ncsnpp")
        sde = sde_from_config(get_config(preset))
        net = ScoreFn(from_preset(preset), sde)
        batch = 8 if dev.type == "cpu" else 64
        shape = tuple(net.input_shape)
    net = net.to(dev)
    g = torch.Generator(device="cpu").manual_seed(0)
    x0 = torch.randn((batch,) + shape, generator=g).to(dev)
    t = (torch.rand(batch, generator=g) * (1 - 1e-3) + 1e-3).to(dev)
    mean, std = sde.marginal_prob(x0, t)
    z = torch.randn(x0.shape, generator=g).to(dev)
    x = mean + std.reshape((-1,) + (1,) * len(shape)) * z
    return net, sde, x, t, z


def _fp_loss(net, sde, x, t, provider, form, K, score=None):
    V = torch.randn((K,) + x.shape, device=x.device, generator=None)
    D = x[0].numel()
    if provider == "projected":
        sq = projected_residual(net, x, t, sde, probes=V).pow(2)
    elif provider == "fused" and form == "laplacian":
        return fpe_terms(net, x, t, sde, form="laplacian", weight=sde.g2(t) / D ** 2, probes=V,
                         score=score).loss.mean()
    elif provider == "torch.func":
        with torch.enable_grad():
            r = forward_mode.residual(net, x, t, sde, form, V)
        sq = r.flatten(1).pow(2).sum(1)
    else:
        r = fpe_residual(net, x, t, sde, form=form, method=provider, probes=V, score=score)
        sq = r.flatten(1).pow(2).sum(1)
    return (sde.g2(t) * sq).mean() / D ** 2


def _dsm_loss(sde, s, t, z):
    std = sde.sigma(t).reshape((-1,) + (1,) * (s.dim() - 1))
    return (sde.g2(t) * (s + z / std).flatten(1).pow(2).mean(1)).mean()


def _train_loss(net, sde, x, t, z, provider, form):
    """DSM + 0.15 FP at the same points. fused and projected share passes as FPLoss.with_dsm
    does: in the div form the DSM term takes s from the FP term's pass (no plain forward),
    in the laplacian form the DSM forward's s gives the pass its transport direction."""
    if provider in ("fused", "projected") and form == "div":
        V = torch.randn((1,) + x.shape, device=x.device)
        D = x[0].numel()
        terms = fpe_terms(net, x, t, sde, form="div", weight=sde.g2(t) / D ** 2, probes=V,
                          directions=1 if provider == "projected" else None)
        return _dsm_loss(sde, terms.score, t, z) + 0.15 * terms.loss.mean()
    s = net(x, t)
    loss = _dsm_loss(sde, s, t, z)
    if provider != "dsm":
        shared = s if provider == "fused" else None
        loss = loss + 0.15 * _fp_loss(net, sde, x, t, provider, form, 1, score=shared)
    return loss


def _sync():
    if device().type == "cuda":
        torch.cuda.synchronize()


CASES = ["mlp2", "mlp64", "ncsnpp_small"] + list(GPU_CASES)
PROVIDERS = ["naive", "fused", "projected", "torch.func"]


def _case_skip(case, K=1) -> str | None:
    cpu = device().type == "cpu"
    if case in GPU_CASES and cpu:
        return "the CIFAR-10 presets are GPU cases"
    if not case.startswith("mlp") and K == 4 and cpu:
        return "K=4 on the conv nets is a GPU case"
    return None


def _provider_runs(case, provider, form) -> bool:
    if provider == "projected" and form != "div":
        return False        # the projected estimator is for the div-form loss
    if provider == "torch.func" and (case in GPU_CASES
                                     or (device().type == "cpu" and case != "mlp2")):
        return False        # the generic path is shown on the small MLP (small NCSN++ on GPU)
    return True


def _rounds(case) -> int:
    return 7 if case.startswith("mlp") else 5


# The train steps come first: they carry the step targets, and a GPU run stopped
# at its time budget (benchmarks/gpu_run.sh) keeps what it measured first.
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("form", ["div", "laplacian"])
def test_train_step(record_group, case, form):
    """DSM + 0.15 FP at the same points against a plain DSM step (_train_loss)."""
    if (why := _case_skip(case)) is not None:
        pytest.skip(why)
    net, sde, x, t, z = _case(case)

    def runner(provider):
        opt = adam(net.parameters(), lr=1e-5)       # the training loop's (fused) Adam

        def run():
            opt.zero_grad(set_to_none=True)
            _train_loss(net, sde, x, t, z, provider, form).backward()
            opt.step()
            _sync()
        return run

    fns = {p: runner(p) for p in ["dsm", "naive", "fused", "projected"]
           if p == "dsm" or _provider_runs(case, p, form)}
    record_group(f"{case}/{form}/K1", "train_step", fns, rounds=_rounds(case))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("form", ["div", "laplacian"])
@pytest.mark.parametrize("K", [1, 4])
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_fp_loss(record_group, case, form, K, mode):
    if (why := _case_skip(case, K)) is not None:
        pytest.skip(why)
    net, sde, x, t, _ = _case(case)
    params = [p for p in net.parameters() if p.requires_grad]

    def runner(provider):
        def run():
            loss = _fp_loss(net, sde, x, t, provider, form, K)
            if mode == "fwdbwd":
                torch.autograd.grad(loss, params)
            _sync()
        return run

    fns = {p: runner(p) for p in PROVIDERS if _provider_runs(case, p, form)}
    record_group(f"{case}/{form}/K{K}", mode, fns, rounds=_rounds(case))
