"""Speed and memory of the log-density FPE term (fpkern.ops.log_density_fpe) on energy MLPs.

Providers (docs/MATH.md 13): fused (one forward jet pass, 3K + 3 rows), naive (reverse mode:
grad u and d_t u in one backward, one double backward per probe, the way a log-density
residual is usually written) and exact (the Hessian's trace, one double backward per
dimension; D = 2 only). Modes: "fwdbwd" (the term w R_1 R_2 / D, mean over the batch, and its
parameter gradient) and "train_step" (DSM + 0.5 of that term, FPLoss(form="log_density",
normalize="dim"), backward and the training loop's fused Adam, against a plain DSM step of
the same EnergyScore: the issue's target is a step at most 3x the DSM step, K = 1).
Cases: EnergyMLP (width 256, depth 3) for D = 2 and D = 64, batch 128 on CPU, 1024 on GPU,
t ~ U[1e-3, 1], VP SDE.
Run: `pytest benchmarks/bench_log_density.py --benchmark-only [--bench-json PATH]`.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import device
from fpkern.losses import DSMLoss, FPLoss
from fpkern.models import EnergyMLP, EnergyScore
from fpkern.ops import log_density_fpe
from fpkern.sde import VPSDE
from fpkern.train.optim import adam

CASES = ["energy2", "energy64"]
ALPHA = 0.5


def _case(name: str):
    torch.manual_seed(0)
    dev = device()
    D = int(name[len("energy"):])
    sde = VPSDE()
    model = EnergyScore(EnergyMLP(D, width=256, depth=3), sde).to(dev)
    batch = 128 if dev.type == "cpu" else 1024
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, D, generator=g).to(dev)
    t = (1e-3 + (1 - 1e-3) * torch.rand(batch, generator=g)).to(dev)
    return model, sde, x, t


def _sync():
    if device().type == "cuda":
        torch.cuda.synchronize()


def _providers(case):
    return ["fused", "naive"] + (["exact"] if case == "energy2" else [])


def _check_agree(model, sde, x, t):
    """fused and naive are the same estimate from the same probes: never time a wrong path."""
    V = torch.randn((2,) + tuple(x.shape), generator=torch.Generator().manual_seed(1)).to(x)
    a = log_density_fpe(model, x[:16], t[:16], sde, method="fused", probes=V[:, :16],
                        strict=True).residual
    b = log_density_fpe(model, x[:16], t[:16], sde, method="naive", probes=V[:, :16]).residual
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-3 * (1 + b.abs().max().item()))


@pytest.mark.parametrize("case", CASES)
def test_train_step(record_group, case):
    model, sde, x, _ = _case(case)
    _check_agree(model, sde, x, _case(case)[3])
    dsm = DSMLoss(sde, eps=1e-3)

    def runner(provider):
        opt = adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        fp = None if provider == "dsm" else FPLoss(sde, alpha=ALPHA, form="log_density",
                                                   normalize="dim", method=provider, eps=1e-3)

        def run():
            opt.zero_grad(set_to_none=True)
            if fp is None:
                loss = dsm(model, x).loss.mean()
            else:
                d, f = fp.with_dsm(dsm, model, x)
                loss = d.loss.mean() + f.loss
            loss.backward()
            opt.step()
            _sync()
        return run

    fns = {p: runner(p) for p in ["dsm"] + _providers(case)}
    record_group(f"{case}/log_density/K1", "train_step", fns, rounds=7)


@pytest.mark.parametrize("case", CASES)
def test_fp_term(record_group, case):
    model, sde, x, t = _case(case)
    params = [p for p in model.parameters() if p.requires_grad]
    D = x.shape[1]

    def runner(provider):
        def run():
            out = log_density_fpe(model, x, t, sde, method=provider, probes=1)
            loss = (sde.g2(t) * out.square).mean() / D
            torch.autograd.grad(loss, params, allow_unused=True)
            _sync()
        return run

    record_group(f"{case}/log_density/K1", "fwdbwd", {p: runner(p) for p in _providers(case)},
                 rounds=7)
