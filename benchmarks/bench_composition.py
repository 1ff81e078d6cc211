"""The training step a user composes from the public API against fpkern.losses.FPLoss.with_dsm.

Providers, each a full step (loss, backward, the training loop's fused Adam), DSM + 0.15 FP
(likelihood weighting, K = 1 probe, beta = 0 so that every provider computes the same loss):
  dsm                 a plain DSM step (the baseline of the step ratios);
  with_dsm            FPLoss.with_dsm;
  user                the README's composition: dsm.perturb, fpe_terms at x_t, the DSM term
                      from terms.score (issue target: within 1.2x of with_dsm's step time);
  residual_after_dsm  a DSM forward of its own, then fpe_residual(..., score=s): the same
                      cost in the laplacian form, one more forward and backward in the div
                      form (whose pass computes s itself).
Cases: the MLP for D = 64 and the small NCSN++ (benchmarks/bench_residual.py's).
Run: `pytest benchmarks/bench_composition.py --benchmark-only [--bench-json PATH]`.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_residual import _case, _rounds, _sync
from fpkern.losses import DSMLoss, FPLoss
from fpkern.ops import fpe_residual, fpe_terms
from fpkern.train.optim import adam

ALPHA = 0.15


def _weight(sde, t, x):
    return sde.g2(t) / x[0].numel() ** 2


def _loss(provider, net, sde, x, form):
    dsm = DSMLoss(sde)
    if provider == "dsm":
        return dsm(net, x).loss.mean()
    if provider == "with_dsm":
        d, f = FPLoss(sde, alpha=ALPHA, beta=0.0, form=form).with_dsm(dsm, net, x)
        return d.loss.mean() + f.loss
    t, xt, z, std = dsm.perturb(x)
    w = _weight(sde, t, xt)
    if provider == "user":
        terms = fpe_terms(net, xt, t, sde, form=form, weight=w)
        return dsm.from_score(terms.score, t, xt, z, std).loss.mean() + ALPHA * terms.loss.mean()
    s = net(xt, t)
    r = fpe_residual(net, xt, t, sde, form=form, method="fused", score=s)
    vec = w * r.flatten(1).pow(2).sum(1)
    return dsm.from_score(s, t, xt, z, std).loss.mean() + ALPHA * vec.mean()


PROVIDERS = ["dsm", "with_dsm", "user", "residual_after_dsm"]


@pytest.mark.parametrize("case", ["mlp64", "ncsnpp_small"])
@pytest.mark.parametrize("form", ["div", "laplacian"])
def test_composition_step(record_group, case, form):
    net, sde, x, _, _ = _case(case)

    def runner(provider):
        opt = adam(net.parameters(), lr=1e-5)

        def run():
            opt.zero_grad(set_to_none=True)
            _loss(provider, net, sde, x, form).backward()
            opt.step()
            _sync()
        return run

    record_group(f"compose/{case}/{form}/K1", "train_step", {p: runner(p) for p in PROVIDERS},
                 rounds=_rounds(case))
