"""Speed and memory of the FPE residual on networks users bring: diffusers models wrapped with
fpkern's adapters (fpkern.models.adapters), against the paper's algorithm ("naive").

Cases (float32, random init after torch.manual_seed(0), eval mode, batch 8 on CPU and 64 on
GPU), each an epsilon network wrapped as NoisePredictionScore(net, VPSDE()),
s = -eps(x, 999 t) / sigma(t):
  unet  diffusers UNet2DModel on 1 x 16 x 16 (blocks 32, 64; attention at the lower
        resolution; GroupNorm with 8 groups);
  dit   diffusers DiTTransformer2DModel on 1 x 16 x 16 (patch 2: 64 tokens; 2 layers of
        2 heads x 16 dims; adaptive LayerNorm-zero with 1000 classes), class label 0 for
        every sample through the adapter's net_kwargs. Eval mode because in train mode the
        DiT drops class labels at random (classifier-free guidance's label dropout), which
        makes the score, and so its residual, random.
Providers, per form ("div", "laplacian"), K = 1 probe (Gaussian in fp_term mode, FPLoss's
Rademacher one in the train steps):
  fused       fpe_residual(..., method="fused", strict=True): the jet pass, and an error
              rather than the generic fallback if an op of the network has no jet rule (the
              laplacian loss by fpe_terms(..., strict=True), one pass and one fused kernel,
              as in bench_residual.py);
  naive       method="naive" (docs/MATH.md 5: nested reverse mode, 3-point time stencil);
  torch.func  the generic forward-mode path (fpkern.ops.forward_mode), what fused falls back
              to (fp_term mode only: FPLoss has no method for it);
  dsm         a plain DSM step (train_step mode only, the baseline of the step ratios).
Modes: "fp_term" (the loss g^2 |r|^2 / D^2 averaged over the batch and its gradient with
respect to the parameters, as benchmarks/bench_residual.py's "fwdbwd") and "train_step"
(DSM + 0.15 FP, beta = 0: fused as FPLoss(...).with_dsm, naive as the same FPLoss with
method "naive"; backward and the training loop's fused Adam; against a DSM step with the same
Adam). Case names are "foreign/<case>/<form>/K1".

Before any timing each test checks that the providers compute the same residual (_check):
fused against the generic torch.func path, and naive against fused once naive's stencil
d_t s is swapped for the exact one. The stencil itself is far off on these networks (about
14% in d_t s on the UNet, 6-8% in the residual on both): diffusers feed the timestep 999 t
to a sinusoidal embedding whose highest frequency is 1 per timestep, so a step of 1e-3 in t
is about a radian of phase (float64 gives the same deviation: it is not rounding). Naive's
deviation from fused (relative L2 per sample, the batch's largest) is kept as
`naive_stencil_rel_err` in every result row of the group.

Run: `pytest benchmarks/bench_foreign.py --benchmark-only [--bench-json PATH]`.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import device
from fpkern.losses import DSMLoss, FPLoss
from fpkern.models.adapters import NoisePredictionScore
from fpkern.ops import forward_mode, fpe_residual, fpe_terms, naive
from fpkern.sde import VPSDE
from fpkern.train.optim import adam

diffusers = pytest.importorskip("diffusers")

ALPHA = 0.15
CASES = ["unet", "dit"]
FORMS = ["div", "laplacian"]
SIDE = 16


def _network(case: str):
    torch.manual_seed(0)
    if case == "unet":
        return diffusers.UNet2DModel(
            sample_size=SIDE, in_channels=1, out_channels=1, block_out_channels=(32, 64),
            layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8).eval(), {}
    net = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=1, out_channels=1,
        num_layers=2, sample_size=SIDE, patch_size=2, num_embeds_ada_norm=1000,
        norm_num_groups=8).eval()
    # one label, broadcast over any batch (the adapter's net_kwargs)
    return net, {"class_labels": torch.zeros(1, dtype=torch.long, device=device())}


def _case(case: str):
    """(score, sde, x0, x, t): the wrapped network, clean data x0 (the train step's input)
    and x = x_t at times t in [1e-3, 1] (the FP term's)."""
    dev = device()
    net, kwargs = _network(case)
    sde = VPSDE()
    score = NoisePredictionScore(net.to(dev), sde, net_kwargs=kwargs)
    batch = 8 if dev.type == "cpu" else 64
    g = torch.Generator(device="cpu").manual_seed(0)
    x0 = torch.randn((batch,) + tuple(score.input_shape), generator=g).to(dev)
    t = (torch.rand(batch, generator=g) * (1 - 1e-3) + 1e-3).to(dev)
    mean, std = sde.marginal_prob(x0, t)
    x = mean + std.reshape(-1, 1, 1, 1) * torch.randn(x0.shape, generator=g).to(dev)
    return score, sde, x0, x, t


def _sync():
    if device().type == "cuda":
        torch.cuda.synchronize()


def _residual(score, sde, x, t, provider, form, V):
    if provider == "torch.func":
        with torch.enable_grad():
            return forward_mode.residual(score, x, t, sde, form, V)
    return fpe_residual(score, x, t, sde, form=form, method=provider, strict=provider == "fused",
                        probes=V)


def _fp_loss(score, sde, x, t, provider, form):
    V = torch.randn((1,) + x.shape, device=x.device)
    w = sde.g2(t) / x[0].numel() ** 2
    if provider == "fused" and form == "laplacian":
        # the loss from the fused laplacian_terms kernel, as bench_residual.py and FPLoss
        # compute it; fpe_residual's r and |r|^2 in torch took about 30% longer on the UNet
        return fpe_terms(score, x, t, sde, form="laplacian", weight=w, probes=V,
                         strict=True).loss.mean()
    r = _residual(score, sde, x, t, provider, form, V)
    return (w * r.flatten(1).pow(2).sum(1)).mean()


def _close(got, want, rtol, what):
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert torch.isfinite(got).all() and scale > 0, f"{what}: not finite or trivial"
    assert err <= rtol * scale, f"{what}: max error {err:.3g} of {scale:.3g}"


def _check(score, sde, x, t, form, generic: bool) -> float:
    """Assert that the providers agree on the residual at (x, t), one shared probe (module
    docstring); returns naive's relative deviation from fused (the stencil's error).
    fpe_terms (strict), whose pass the fused laplacian loss and FPLoss run, must give
    fpe_residual's residual: FPLoss has no strict switch and would fall back to the generic
    path (with a warning) where a jet rule is missing."""
    V = torch.randn((1,) + x.shape, generator=torch.Generator().manual_seed(1)).to(x.device)
    fused = _residual(score, sde, x, t, "fused", form, V).detach()
    terms = fpe_terms(score, x, t, sde, form=form, probes=V, strict=True)
    _close(terms.residual.detach(), fused, 1e-5, f"fpe_terms against fpe_residual ({form})")
    if generic:
        _close(_residual(score, sde, x, t, "torch.func", form, V).detach(), fused, 1e-4,
               f"torch.func against fused ({form})")
    slow = _residual(score, sde, x, t, "naive", form, V).detach()
    with torch.no_grad():
        stencil = naive.time_derivative_stencil(
            score, x, t, sde.T, singular_at_zero=naive.sigma_vanishes_at_zero(sde))
        exact = forward_mode.time_derivative(score, x, t)[1]
    # r = d_t s - (the x-derivative terms): swap the stencil's d_t s for the exact one
    _close(slow - stencil + exact, fused, 1e-3, f"naive against fused ({form})")
    dev = (slow - fused).flatten(1).norm(dim=1) / fused.flatten(1).norm(dim=1)
    return dev.max().item()


def _rounds() -> int:
    return 3 if device().type == "cpu" else 5


# The train steps come first, as in bench_residual.py: a run cut short keeps them.
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("form", FORMS)
def test_train_step(record_group, case, form):
    """DSM + 0.15 FP through FPLoss.with_dsm (fused, naive) against a plain DSM step."""
    score, sde, x0, x, t = _case(case)
    err = _check(score, sde, x, t, form, generic=False)
    dsm = DSMLoss(sde)
    fp = {m: FPLoss(sde, alpha=ALPHA, beta=0.0, form=form, method=m) for m in ("fused", "naive")}

    def runner(provider):
        opt = adam(score.parameters(), lr=1e-5)     # the training loop's (fused) Adam

        def run():
            opt.zero_grad(set_to_none=True)
            if provider == "dsm":
                loss = dsm(score, x0).loss.mean()
            else:
                d, f = fp[provider].with_dsm(dsm, score, x0)
                loss = d.loss.mean() + f.loss
            loss.backward()
            opt.step()
            _sync()
        return run

    record_group(f"foreign/{case}/{form}/K1", "train_step",
                 {p: runner(p) for p in ["dsm", "naive", "fused"]}, rounds=_rounds(),
                 naive_stencil_rel_err=err)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("form", FORMS)
def test_fp_term(record_group, case, form):
    """The FP loss g^2 |r|^2 / D^2 and its parameter gradient."""
    score, sde, _, x, t = _case(case)
    err = _check(score, sde, x, t, form, generic=True)
    params = [p for p in score.parameters() if p.requires_grad]

    def runner(provider):
        def run():
            loss = _fp_loss(score, sde, x, t, provider, form)
            torch.autograd.grad(loss, params, allow_unused=True)
            _sync()
        return run

    # torch.func is timed everywhere: on these small networks its nested JVPs under vmap
    # cost 1.4-4x fused's time on CPU (0.2-1.7 s a call), slow but not prohibitive
    fns = {p: runner(p) for p in ["naive", "fused", "torch.func"]}
    record_group(f"foreign/{case}/{form}/K1", "fp_term", fns, rounds=_rounds(),
                 naive_stencil_rel_err=err)
