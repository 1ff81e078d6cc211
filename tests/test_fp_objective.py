"""The FP objective's options (docs/MATH.md 4): FPLoss(normalize=...) and FPLoss(scalar=...).

- 'paper' normalisation and scalar term are today's formulas, bit for bit;
- 'dim' is invariant to D on a field whose residual per component is fixed (a separable
  field at replicated points, residual in closed form), and so is its ratio to DSM, on every
  path that computes L_vec (both forms, methods fused / exact / naive, both estimators);
- the 'consistent' scalar term has expectation zero at the exact Gaussian-mixture score
  (closed-form score and divergence), the paper's does not, for VP and VE;
- both options through python -m fpkern.train, bad values refused naming the option;
- with_dsm and __call__ agree for every option.
"""

import json
import math
import statistics

import pytest
import torch

from fpkern.data.mixture import GaussianMixture
from fpkern.losses import DSMLoss, FPLoss, sample_time
from fpkern.ops import fpe_residual, fpe_terms, hutchinson_divergence, scalar_fpe_rhs
from fpkern.sde import VESDE, VPSDE


class Separable(torch.nn.Module):
    """s_i(x, t) = phi(x_i, t) = -x_i / (1 + t) + w tanh(x_i): one 1-D field per component."""

    def __init__(self, w=0.3):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w, dtype=torch.float64))

    def forward(self, x, t):
        return -x / (1 + t.reshape(-1, *([1] * (x.dim() - 1)))) + self.w * torch.tanh(x)


def separable_residual(x, t, sde, w=0.3):
    """The residual of Separable per component, in closed form (docs/MATH.md 2): with
    phi = a x + w tanh x, a = -1/(1+t), the field is a gradient and J is diagonal, so both
    forms are r_i = d_t phi - 1/2 g^2 phi'' - phi' (g^2 phi - f x) + f phi."""
    tt = t.reshape(-1, *([1] * (x.dim() - 1)))
    th = torch.tanh(x)
    phi = -x / (1 + tt) + w * th
    d1 = -1 / (1 + tt) + w * (1 - th ** 2)
    d2 = -2 * w * th * (1 - th ** 2)
    dt = x / (1 + tt) ** 2
    f, g2 = sde.f(tt), sde.g2(tt)
    return dt - 0.5 * g2 * d2 - d1 * (g2 * phi - f * x) + f * phi


def replicated(B, D, seed):
    """x [B, D] with every component equal to one draw per sample, times t [B], noise z [B, D]
    replicated likewise."""
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(B, 1, generator=g, dtype=torch.float64)
    z1 = torch.randn(B, 1, generator=g, dtype=torch.float64)
    t = 0.05 + 0.9 * torch.rand(B, generator=g, dtype=torch.float64)
    return x1.expand(B, D).contiguous(), t, z1.expand(B, D).contiguous()


def dsm_at(sde, f, xt, t, z):
    """A DSMOutput at the given points (x_t, t, z), so that FPLoss evaluates there."""
    return DSMLoss(sde).from_score(f(xt, t), t, xt, z, sde.sigma(t))


# ---- (a) 'paper' is today's formula, bit for bit ------------------------------------------
@pytest.mark.parametrize("form, method", [("div", "fused"), ("laplacian", "fused"),
                                          ("div", "exact"), ("laplacian", "naive")])
@pytest.mark.parametrize("m", [2.0, 1.5])
def test_paper_options_are_todays_formulas_exactly(form, method, m):
    """FPLoss(preset='paper') has normalize 'paper' and scalar 'paper', and its values are the
    formulas FPLoss computed before the options existed: w |r|^m / D^m (fpe_terms with weight
    w / D^m for method fused) and the batch norm of h, compared with torch.equal."""
    sde = VPSDE()
    f = Separable()
    x = torch.randn(5, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dsm = DSMLoss(sde)(f, x, generator=torch.Generator().manual_seed(1))
    default = FPLoss(sde, alpha=0.3, beta=0.2, m=m, form=form, method=method, probes=2,
                     preset="paper")
    assert (default.normalize, default.scalar) == ("paper", "paper")
    out = default(f, x, dsm=dsm, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    D, w = 6, sde.g2(dsm.t)
    if method == "fused":
        terms = fpe_terms(f, dsm.xt, dsm.t, sde, form=form, weight=w / D ** m, m=m, probes=2,
                          generator=g, score=dsm.s if form == "laplacian" else None)
        vec, h = terms.loss, terms.scalar
    else:
        r = fpe_residual(f, dsm.xt, dsm.t, sde, form=form, method=method, probes=2, generator=g)
        norm = r.flatten(1).pow(2).sum(1)
        norm = norm if m == 2 else norm.sqrt() ** m
        vec = w * norm / D ** m
        div = hutchinson_divergence(f, dsm.xt, dsm.t, probes=2, generator=g)
        h = scalar_fpe_rhs(dsm.xt, dsm.s, div, sde.f(dsm.t), sde.g2(dsm.t))
    scalar = torch.linalg.vector_norm(h)
    assert torch.equal(out.vec, vec)
    assert torch.equal(out.scalar, scalar)
    assert torch.equal(out.loss, 0.3 * vec.mean() + 0.2 * scalar)


# ---- (b) 'dim' is invariant to D ------------------------------------------------------------
PATHS = [("div", "fused"), ("laplacian", "fused"), ("div", "exact"), ("laplacian", "exact"),
         ("div", "naive")]


@pytest.mark.parametrize("form, method", PATHS)
@pytest.mark.parametrize("m", [2.0, 1.5])
def test_dim_normalisation_is_invariant_to_D(form, method, m):
    """On a separable field at points whose components are all equal, every component of r
    is the same closed-form value rho: 'dim' gives g^2 |rho|^m at D = 2, 8 and 32, and the
    paper's g^2 |rho|^m / D^(m/2). The DSM term is the same at every D too, so 'dim''s
    ratio to DSM does not depend on D and the paper's falls as D^(-m/2)."""
    sde, f = VPSDE(), Separable()
    dims = (2, 8, 32)
    vecs, ratios = {}, {}
    for D in dims:
        x, t, z = replicated(6, D, seed=3)
        rho = separable_residual(x[:, :1], t, sde)[:, 0]
        want = sde.g2(t) * rho.abs() ** m
        dsm = dsm_at(sde, f, x, t, z)
        for norm in ("dim", "paper"):
            fp = FPLoss(sde, alpha=1.0, beta=0.0, m=m, form=form, method=method,
                        normalize=norm)
            vec = fp(f, x, dsm=dsm, generator=torch.Generator().manual_seed(4)).vec
            vecs[norm, D] = vec
            ratios[norm, D] = vec / dsm.loss
        # the naive method's time stencil: a relative error ~1e-6 here, the same at every D
        tol = dict(rtol=1e-5, atol=0) if method == "naive" else dict(rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(vecs["dim", D], want, **tol)
        torch.testing.assert_close(vecs["paper", D], want / D ** (m / 2), **tol)
    for D in dims[1:]:
        torch.testing.assert_close(vecs["dim", D], vecs["dim", 2], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ratios["dim", D], ratios["dim", 2], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ratios["paper", D] * (D / 2) ** (m / 2), ratios["paper", 2],
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("D", [2, 8, 32])
def test_dim_normalisation_of_the_projected_estimator(D):
    """estimator 'projected': vec = g^2 (u . r)^2 / D under 'dim' (D times the paper's for the
    same u), and its mean over directions u is the closed-form g^2 rho^2 at every D (one
    point repeated over the batch)."""
    sde, f = VPSDE(), Separable()
    B = 3000
    x, t, z = replicated(1, D, seed=5)
    x, t, z = x.expand(B, D).contiguous(), t.expand(B).contiguous(), z.expand(B, D).contiguous()
    dsm = dsm_at(sde, f, x, t, z)
    out = {norm: FPLoss(sde, alpha=1.0, beta=0.0, estimator="projected", normalize=norm)(
        f, x, dsm=dsm, generator=torch.Generator().manual_seed(6)).vec.detach()
        for norm in ("dim", "paper")}
    torch.testing.assert_close(out["dim"], D * out["paper"], rtol=1e-12, atol=0)
    want = float(sde.g2(t[:1]) * separable_residual(x[:1, :1], t[:1], sde)[0, 0] ** 2)
    sem = float(out["dim"].std()) / B ** 0.5
    assert abs(float(out["dim"].mean()) - want) < 5 * sem, (out["dim"].mean(), want, sem)


def test_alpha_conversion_gives_the_same_objective():
    """alpha_dim = alpha_paper / D^(m/2) (docs/MATH.md 4): the same loss and gradient."""
    sde, f = VPSDE(), Separable()
    x = torch.randn(6, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    dsm = DSMLoss(sde)(f, x, generator=torch.Generator().manual_seed(8))
    for m in (2.0, 1.5):
        paper = FPLoss(sde, alpha=0.15, beta=0.0, m=m, normalize="paper")(f, x, dsm=dsm).loss
        dim = FPLoss(sde, alpha=0.15 / 12 ** (m / 2), beta=0.0, m=m, normalize="dim")(
            f, x, dsm=dsm).loss
        torch.testing.assert_close(dim, paper, rtol=1e-12, atol=0)
        (gp,), (gd,) = torch.autograd.grad(paper, [f.w]), torch.autograd.grad(dim, [f.w])
        torch.testing.assert_close(gd, gp, rtol=1e-12, atol=0)


# ---- (c) the consistent scalar term at the mixture oracle ----------------------------------
def mixture_score_and_divergence(gm, x, t, sde):
    """The exact score of the noised mixture and its exact divergence, in closed form and
    written here independently of fpkern.data.mixture: with component scores
    u_k = -(x - alpha mu_k) / v_k and responsibilities gamma_k, grad s = sum_k gamma_k
    (-I / v_k + u_k u_k^T) - s s^T, so div s = sum_k gamma_k (|u_k|^2 - D / v_k) - |s|^2."""
    D = x.shape[1]
    alpha, sigma2 = sde.alpha(t)[:, None], sde.sigma2(t)[:, None]
    var = alpha ** 2 * gm.stds[None] ** 2 + sigma2                          # [B, K]
    diff = x[:, None, :] - alpha[..., None] * gm.means[None]                # [B, K, D]
    logp = gm.weights.log() - 0.5 * D * torch.log(2 * math.pi * var) \
        - 0.5 * diff.pow(2).sum(-1) / var
    gamma = torch.softmax(logp, dim=1)
    u = -diff / var[..., None]
    s = (gamma[..., None] * u).sum(1)
    div = (gamma * (u.pow(2).sum(-1) - D / var)).sum(1) - s.pow(2).sum(1)
    return s, div


def oracle_terms(sde, D, n, batches, seed, scale=1.0):
    """Per-batch values of both scalar terms (FPLoss.scalar_term) at x_t ~ q_t, t ~ U[eps, T],
    for the score scale * s (exact: scale 1), with the exact divergence; and e = (h - D f)/D
    per sample."""
    gm = GaussianMixture.random(3, D, generator=torch.Generator().manual_seed(D))
    g = torch.Generator().manual_seed(seed)
    N = n * batches
    x0 = gm.sample(N, generator=g)
    t = sample_time(N, eps=1e-5, T=sde.T, generator=g, dtype=torch.float64)
    mean, std = sde.marginal_prob(x0, t)
    xt = mean + std[:, None] * torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    s, div = mixture_score_and_divergence(gm, xt, t, sde)
    h = scalar_fpe_rhs(xt, scale * s, scale * div, sde.f(t), sde.g2(t))
    values = {}
    for scalar in ("paper", "consistent"):
        fp = FPLoss(sde, alpha=0.0, beta=1.0, scalar=scalar)
        values[scalar] = torch.stack([fp.scalar_term(h[i::batches], t[i::batches], D)
                                      for i in range(batches)])
    return values, (h - D * sde.f(t)) / D, h


def test_closed_form_divergence_of_the_mixture_is_exact():
    """The oracle's closed-form score matches GaussianMixture.score, its divergence autograd's
    trace of the Jacobian."""
    sde = VPSDE()
    gm = GaussianMixture.random(3, 4, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([1e-3, 0.1, 0.5, 1.0], dtype=torch.float64)
    x = gm.sample(4, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    s, div = mixture_score_and_divergence(gm, x, t, sde)
    torch.testing.assert_close(s, gm.score(x, t, sde))
    trace = sum(torch.autograd.grad(s[:, j].sum(), x, retain_graph=True)[0][:, j]
                for j in range(4))
    torch.testing.assert_close(div, trace)


def _z(v):
    return float(v.mean()) / (float(v.std()) / v.numel() ** 0.5)


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=["vp", "ve"])
@pytest.mark.parametrize("D", [2, 8])
def test_consistent_scalar_is_zero_at_the_true_score_and_the_papers_is_not(sde, D):
    """At the exact mixture score, E[h] = D f(t) (the sign convention of scalar_fpe_rhs):
    e = (h - D f)/D has mean 0; the consistent term's batch values (n = 16) have mean 0
    within 4 standard errors over 800 batches; the paper's norm is tens of standard errors
    away from 0. Under VP the mean of h itself, D E[f] < 0, is far from 0 too."""
    values, e, h = oracle_terms(sde, D, n=16, batches=800, seed=0)
    assert abs(_z(e)) < 4
    assert abs(_z(values["consistent"])) < 4, values["consistent"].mean()
    assert _z(values["paper"]) > 50
    if isinstance(sde, VPSDE):
        assert _z(h) < -50


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=["vp", "ve"])
def test_consistent_scalar_sees_a_doubled_score(sde):
    """s = 2 s*: m(t) = D f + g^2 E|s*|^2 (docs/MATH.md 4) is not 0, and the consistent
    term's mean is many standard errors above 0."""
    values, e, _ = oracle_terms(sde, 2, n=16, batches=300, seed=1, scale=2.0)
    assert _z(e) > 10 and _z(values["consistent"]) > 10


# ---- the consistent term on every path -----------------------------------------------------
@pytest.mark.parametrize("config", [dict(method="exact"), dict(method="fused"),
                                    dict(form="laplacian"), dict(alpha=0.0),
                                    dict(estimator="projected")])
def test_consistent_scalar_is_the_mean_over_pairs_on_every_path(config):
    """FPOutput.scalar with scalar 'consistent' is (1/(n(n-1))) sum_{i != j} e_i e_j with
    e = (h - D f(t)) / D, h computed here from s and its exact divergence (the separable
    field's Jacobian is diagonal, so a Rademacher Hutchinson divergence is exact); so is its
    gradient. The loss is alpha mean(vec) + beta times that value, sign and all."""
    sde, f = VPSDE(), Separable()
    x = torch.randn(7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    dsm = DSMLoss(sde)(f, x, generator=torch.Generator().manual_seed(10))
    fp = FPLoss(sde, **{"alpha": 0.3, "beta": 0.2, "probes": 2, "scalar": "consistent", **config})
    out = fp(f, x, dsm=dsm, generator=torch.Generator().manual_seed(11))
    y = dsm.xt.detach().requires_grad_(True)
    s = f(y, dsm.t)
    div = sum(torch.autograd.grad(s[:, j].sum(), y, create_graph=True)[0][:, j] for j in range(3))
    h = 0.5 * sde.g2(dsm.t) * (div + s.pow(2).sum(1)) - sde.f(dsm.t) * (y * s).sum(1)
    e = (h - 3 * sde.f(dsm.t)) / 3
    pairs = sum(e[i] * e[j] for i in range(7) for j in range(7) if i != j) / (7 * 6)
    torch.testing.assert_close(out.scalar, pairs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.loss, fp.alpha * out.vec.mean() + 0.2 * pairs,
                               rtol=1e-10, atol=1e-12)
    (got,) = torch.autograd.grad(out.scalar, [f.w])
    (want,) = torch.autograd.grad(pairs, [f.w])
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_consistent_scalar_can_be_negative_and_needs_two_samples():
    """Unbiased, so below zero when |mean e| is below its standard error (it enters the loss
    as it is); one FP sample has no pair and is refused."""
    sde, f = VESDE(), Separable()
    fp = FPLoss(sde, alpha=0.0, beta=1.0, scalar="consistent")
    seen = []
    for seed in range(20):
        x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        seen.append(float(fp(f, x, generator=torch.Generator().manual_seed(seed)).scalar.detach()))
    assert min(seen) < 0 < max(seen)
    with pytest.raises(ValueError, match="scalar 'consistent' needs at least 2 FP samples"):
        fp(f, torch.randn(1, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="scalar 'consistent' needs batch >= 2"):
        FPLoss(sde, beta=0.01, scalar="consistent", batch=1)
    FPLoss(sde, beta=0.0, scalar="consistent", batch=1)     # no scalar term: allowed


@pytest.mark.parametrize("kwargs, name, valid", [
    (dict(normalize="nope"), "normalize", "dim"), (dict(scalar="nope"), "scalar", "consistent"),
])
def test_bad_values_are_refused_naming_the_option(kwargs, name, valid):
    with pytest.raises(ValueError, match=f"{name}.*valid names.*{valid}"):
        FPLoss(VPSDE(), **kwargs)


# ---- (e) with_dsm = __call__ for every option ----------------------------------------------
@pytest.mark.parametrize("normalize", ["paper", "dim"])
@pytest.mark.parametrize("scalar", ["paper", "consistent"])
@pytest.mark.parametrize("config", [dict(), dict(estimator="projected"), dict(batch=4),
                                    dict(form="laplacian"), dict(method="exact"),
                                    dict(alpha=0.0)])
def test_with_dsm_equals_the_two_terms_apart(normalize, scalar, config):
    """FPLoss.with_dsm = DSMLoss then FPLoss(dsm=...) for each normalisation and scalar
    term: the same values and parameter gradients, the same random numbers drawn."""
    from fpkern.models import MLP, ScoreFn
    torch.manual_seed(0)
    sde = VPSDE()
    net = ScoreFn(MLP(3, width=16, depth=2), sde).double()
    params = [p for p in net.parameters() if p.requires_grad]
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    dsm = DSMLoss(sde)
    fp = FPLoss(sde, **{"alpha": 0.3, "beta": 0.2, "probes": 2, "normalize": normalize,
                        "scalar": scalar, **config})
    g1 = torch.Generator().manual_seed(2)
    d1, f1 = fp.with_dsm(dsm, net, x, generator=g1)
    g2 = torch.Generator().manual_seed(2)
    d2 = dsm(net, x, generator=g2)
    f2 = fp(net, x, dsm=d2, generator=g2)
    assert torch.equal(g1.get_state(), g2.get_state())
    for a, b in [(d1.loss, d2.loss), (f1.vec, f2.vec), (f1.scalar, f2.scalar), (f1.loss, f2.loss)]:
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    got = torch.autograd.grad(d1.loss.mean() + f1.loss, params)
    want = torch.autograd.grad(d2.loss.mean() + f2.loss, params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10 * b.abs().max().item())


# ---- (d) through the training command line -------------------------------------------------
TINY = ["--arch", "mlp", "--dataset", "8gaussians", "--mlp-width", "16", "--mlp-depth", "2",
        "--batch-size", "16", "--fp-batch", "8", "--warmup", "1", "--sample-steps", "2",
        "--num-samples", "16", "--eval-every", "0", "--progress", "false", "--log-every", "1",
        "--tensorboard", "false", "--steps", "3"]


def _first_row(wd):
    return json.loads((wd / "metrics.jsonl").read_text().splitlines()[0])


def test_both_options_through_the_training_cli(tmp_path):
    """`--fp-normalize` and `--fp-scalar` reach FPLoss: from the same seed, the first step's
    fp_vec under 'dim' is D = 2 times the paper's (the weights are the same before the first
    update), the consistent scalar term differs from the paper's norm, and the checkpoint
    records both options."""
    from fpkern.train.checkpoint import list_checkpoints, load_checkpoint
    from fpkern.train.cli import main
    rows = {}
    for norm, scalar in (("paper", "paper"), ("dim", "consistent")):
        wd = tmp_path / f"{norm}-{scalar}"
        assert main(TINY + ["--fp-normalize", norm, "--fp-scalar", scalar, "--beta", "0.01",
                            "--workdir", str(wd)]) == 0
        rows[norm] = _first_row(wd)
        options = load_checkpoint(list_checkpoints(wd / "checkpoints")[-1])["options"]
        assert (options["fp_normalize"], options["fp_scalar"]) == (norm, scalar)
    assert rows["dim"]["fp_vec"] == pytest.approx(2 * rows["paper"]["fp_vec"], rel=1e-6)
    assert rows["dim"]["dsm"] == rows["paper"]["dsm"]
    assert rows["paper"]["fp_scalar"] > 0 and rows["dim"]["fp_scalar"] != rows["paper"]["fp_scalar"]


def test_bad_option_values_are_refused_naming_the_option(tmp_path, capsys):
    from fpkern.train.cli import main
    from fpkern.train.config import TrainConfig
    for flag in ("--fp-normalize", "--fp-scalar"):
        assert main(TINY + [flag, "nope", "--workdir", str(tmp_path / "w")]) == 2
        assert flag in capsys.readouterr().err
    cfg = tmp_path / "bad.toml"
    cfg.write_text('fp-scalar = "nope"\n')
    assert main(TINY + ["--config", str(cfg), "--workdir", str(tmp_path / "w")]) == 2
    assert "fp_scalar" in capsys.readouterr().err
    for name in ("fp_normalize", "fp_scalar"):
        with pytest.raises(ValueError, match=f"{name}.*valid names"):
            TrainConfig(arch="mlp", **{name: "nope"}).resolved()
    with pytest.raises(ValueError, match="fp_scalar 'consistent' needs at least 2 FP samples"):
        TrainConfig(arch="mlp", fp_scalar="consistent", fp_batch=1, beta=0.01).resolved()
    TrainConfig(arch="mlp", fp_scalar="consistent", fp_batch=1, beta=0.0).resolved()
    assert not (tmp_path / "w").exists()


# ---- (e) the defaults (issue 17, item 5) ----------------------------------------------------
def _fp_share(tmp_path, preset):
    """Median over the steps of (alpha fp_vec + beta |fp_scalar|) / DSM, from `--arch mlp`
    (checkerboard, every default but the size of the run) under one --fp-preset."""
    from fpkern.losses import FP_PRESETS
    from fpkern.train.cli import main
    wd = tmp_path / preset
    assert main(["--arch", "mlp", "--fp-preset", preset, "--steps", "150", "--mlp-width", "64",
                 "--eval-every", "0", "--num-samples", "16", "--sample-steps", "2",
                 "--log-every", "1", "--progress", "false", "--tensorboard", "false",
                 "--workdir", str(wd)]) == 0
    knobs = FP_PRESETS[preset]
    rows = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
    share = [(knobs["alpha"] * r["fp_vec"] + knobs["beta"] * abs(r["fp_scalar"])) / r["dsm"]
             for r in rows if "fp_vec" in r]
    assert len(share) == 150
    return statistics.median(share)


def test_default_objective_is_not_regulariser_dominated(tmp_path):
    """The default objective (preset 'fpkern') stays a small correction to DSM on the
    checkerboard MLP: the FP terms' median share of DSM is under 0.1; the paper's objective
    at this D = 2 is above it (the regime issue 17 reports, samples spread to +-400), so the
    check can fail. Over 300 steps the shares measured 0.024 and 1.2."""
    assert _fp_share(tmp_path, "fpkern") < 0.1
    assert _fp_share(tmp_path, "paper") > 0.1
