"""DPM-Solver / DPM-Solver++ and EDM's Heun (docs/MATH.md 10) against exact answers: the
closed-form probability-flow map of a Gaussian, exact NFE counts, sample quality on the
tests' mixture relative to RK45, bad options; and a smoke run of experiments/fast_samplers.py."""

import json
import math

import pytest
import torch

from fpkern.data.mixture import GaussianMixture
from fpkern.diagnostics import sliced_wasserstein
from fpkern.sampling import sample, score_prediction
from fpkern.sde import SubVPSDE, VESDE, VPSDE

SDES = {"ve": VESDE, "vp": VPSDE, "subvp": SubVPSDE}
EPS = 1e-3
MU = torch.tensor([[1.0, -0.5, 0.25]], dtype=torch.float64)
S0 = 0.5
GAUSS = GaussianMixture([1.0], MU, [S0])
MIX2 = GaussianMixture([0.3, 0.7], [[-1.5, 0.5], [1.0, -0.5]], [0.3, 0.5]).to(dtype=torch.float64)

# (method, options, order): every dpm_solver variant and edm_heun
VARIANTS = [("dpm_solver", dict(order=k, multistep=ms, prediction=p), k)
            for k in (1, 2, 3) for ms in (False, True) for p in ("noise", "data")]
VARIANTS.append(("edm_heun", {}, 2))


def _id(v):
    method, opts, _ = v
    if method == "edm_heun":
        return method
    return f"{opts['order']}{'m' if opts['multistep'] else 's'}-{opts['prediction']}"


def _coef(fn, t):
    return float(fn(torch.tensor([t], dtype=torch.float64))[0])


def _gaussian_flow(sde, x_T):
    """The probability-flow map of N(mu, S0^2 I) from T to EPS: the standardised point
    (x - alpha mu) / sqrt(alpha^2 S0^2 + sigma^2) is constant along the flow."""
    def mean_std(t):
        a = _coef(sde.alpha, t)
        return a, math.sqrt(a * a * S0 ** 2 + _coef(sde.sigma2, t))

    (aT, sT), (ae, se) = mean_std(sde.T), mean_std(EPS)
    return ae * MU + (se / sT) * (x_T - aT * MU)


def _run(score_fn, sde, x_T, method, steps, opts, **kw):
    return sample(score_fn, sde, tuple(x_T.shape), method=method, steps=steps, x_T=x_T, eps=EPS,
                  dtype=x_T.dtype, **{**opts, **kw})


# ---- (a) exactness and the order of convergence ----------------------------------------------
@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
def test_gaussian_flow_converges_at_the_order(sde_name, variant):
    """Endpoints of the same prior draws against the exact map; the error falls at least like
    NFE^-(order - 1/2) between two step counts, well above rounding. Order 3 needs more steps
    to reach its asymptote (DPM-Solver++(3S): 2.4 at 48 -> 96 NFE, 2.75 at 96 -> 192); the
    multistep 3M converges faster than its order on this Gaussian (about 4 to 4.6)."""
    method, opts, order = variant
    sde = SDES[sde_name]()
    x_T = sde.prior_sampling((64, 3), generator=torch.Generator().manual_seed(0),
                             dtype=torch.float64)
    exact = _gaussian_flow(sde, x_T)
    counts = (96, 192) if order == 3 else (24, 48)
    errs = []
    for n in counts:
        res = _run(GAUSS.score_fn(sde), sde, x_T, method, n, opts, denoise=False)
        assert res.nfe == n
        errs.append(float((res.samples - exact).abs().max()))
    observed = math.log(errs[0] / errs[1]) / math.log(counts[1] / counts[0])
    print(f"{sde_name} {_id(variant)}: errors {errs[0]:.2e} {errs[1]:.2e}, order {observed:.2f}")
    assert errs[1] > 1e-11 and observed > order - 0.5, (errs, observed)


def test_first_order_variants_are_one_map():
    """DPM-Solver-1 = DPM-Solver++(1) = DDIM: noise or data, single-step or multistep."""
    sde = VPSDE()
    x_T = sde.prior_sampling((32, 2), generator=torch.Generator().manual_seed(1),
                             dtype=torch.float64)
    outs = [_run(MIX2.score_fn(sde), sde, x_T, "dpm_solver", 12, opts).samples
            for method, opts, order in VARIANTS if order == 1]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-10, atol=1e-10)


def test_predictions_of_the_score():
    """score_prediction is the one conversion: eps = -sigma s, x0 = (x + sigma^2 s) / alpha,
    so x = alpha x0 + sigma eps."""
    sde, t = SubVPSDE(), 0.3
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    eps = score_prediction(MIX2.score_fn(sde), sde, x, t, "noise")
    x0 = score_prediction(MIX2.score_fn(sde), sde, x, t, "data")
    torch.testing.assert_close(_coef(sde.alpha, t) * x0 + _coef(sde.sigma, t) * eps, x)
    with pytest.raises(ValueError, match="unknown prediction 'v'"):
        score_prediction(MIX2.score_fn(sde), sde, x, t, "v")


# ---- (b) steps = network evaluations, exactly -------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
def test_nfe_counted_exactly(variant):
    method, opts, order = variant
    sde = VESDE()
    score = MIX2.score_fn(sde)
    calls = []

    def counting(x, t):
        calls.append(1)
        return score(x, t)

    for steps in sorted({max(order, 2) if method == "edm_heun" else order, 7, 10}):
        for denoise in (False, True):
            calls.clear()
            res = sample(counting, sde, (6, 2), method=method, steps=steps, denoise=denoise,
                         generator=torch.Generator().manual_seed(3), **opts)
            assert res.nfe == len(calls) == steps + denoise, (steps, denoise)
            assert res.samples.dtype == torch.float32 and torch.isfinite(res.samples).all()


def test_default_steps():
    """dpm_solver: 20 evaluations (DPM-Solver++(3M)); edm_heun: 34, + the denoising step =
    EDM's 35 NFE (18 sigmas); both reproducible from the generator."""
    sde = VPSDE()
    for method, nfe in (("dpm_solver", 21), ("edm_heun", 35)):
        a = sample(MIX2.score_fn(sde), sde, (8, 2), method=method,
                   generator=torch.Generator().manual_seed(4))
        b = sample(MIX2.score_fn(sde), sde, (8, 2), method=method,
                   generator=torch.Generator().manual_seed(4))
        assert a.nfe == nfe
        torch.testing.assert_close(a.samples, b.samples, rtol=0, atol=0)


# ---- (c) sample quality on the mixture relative to RK45 --------------------------------------
N = 1200
# SW2(sampler) / SW2(RK45 at rtol = atol = 1e-5), same x_T, at 10 / 20 / 50 NFE. Measured over
# 4 seeds (worst case): dpm default 1.37 / 1.08 / 1.02, 2M 3.6 / 1.27 / 1.01, edm_heun
# 15.9 / 2.67 / 1.03 (5 Heun steps from sigma_hat ~ 152 are not enough).
BOUNDS = {"dpm3m": ("dpm_solver", {}, (2.0, 1.3, 1.1)),
          "dpm2m": ("dpm_solver", dict(order=2), (5.0, 1.6, 1.1)),
          "dpm3s-noise": ("dpm_solver", dict(order=3, multistep=False, prediction="noise"),
                          (8.0, 1.8, 1.1)),
          "edm_heun": ("edm_heun", {}, (25.0, 4.0, 1.15))}


@pytest.fixture(scope="module")
def mixture_runs():
    """Per SDE: SW2 to a true sample of RK45 and of every BOUNDS sampler at 10/20/50 NFE."""
    ref = MIX2.sample(N, generator=torch.Generator().manual_seed(100))
    out = {}
    for name, S in SDES.items():
        sde = S()
        x_T = sde.prior_sampling((N, 2), generator=torch.Generator().manual_seed(0),
                                 dtype=torch.float64)

        def sw(x):
            return sliced_wasserstein(x, ref, generator=torch.Generator().manual_seed(0))

        rk = _run(MIX2.score_fn(sde), sde, x_T, "ode", None, {})
        row = {"rk45": sw(rk.samples)}
        for key, (method, opts, _) in BOUNDS.items():
            row[key] = [sw(_run(MIX2.score_fn(sde), sde, x_T, method, n, opts).samples)
                        for n in (10, 20, 50)]
        row["ode_euler"] = sw(_run(MIX2.score_fn(sde), sde, x_T, "ode_euler", 20, {}).samples)
        out[name] = row
    return out


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("key", list(BOUNDS))
def test_mixture_quality_relative_to_rk45(mixture_runs, sde_name, key):
    row = mixture_runs[sde_name]
    ratios = [v / row["rk45"] for v in row[key]]
    print(f"{sde_name} {key}: SW2 / SW2(rk45 {row['rk45']:.3f}) at 10/20/50 NFE",
          " ".join(f"{r:.2f}" for r in ratios))
    for n, r, bound in zip((10, 20, 50), ratios, BOUNDS[key][2]):
        assert r < bound, (n, r, bound)


def test_quality_bound_has_power(mixture_runs):
    """VE's fixed Euler ODE steps at 20 NFE (uniform in t) fail the 20-NFE bounds."""
    row = mixture_runs["ve"]
    assert row["ode_euler"] / row["rk45"] > BOUNDS["edm_heun"][2][1]


def test_mixture_path_error_against_rk45():
    """On the mixture the flow has no closed form: at 50 NFE the default dpm_solver lands
    within 0.01 (RMS) of RK45 at 1e-9 from the same draws on the log-SNR and the quadratic
    schedule (measured 2e-3 and 7e-4); uniform in t it is ten times worse on VP (9e-2: its
    steps are too long at small t, where lambda changes fastest)."""
    sde = VPSDE()
    x_T = sde.prior_sampling((200, 2), generator=torch.Generator().manual_seed(5),
                             dtype=torch.float64)
    star = _run(MIX2.score_fn(sde), sde, x_T, "ode", None, dict(rtol=1e-9, atol=1e-9))
    for schedule, bound in (("logsnr", 0.01), ("time_quadratic", 0.01), ("time_uniform", 0.2)):
        res = _run(MIX2.score_fn(sde), sde, x_T, "dpm_solver", 50, dict(schedule=schedule))
        rms = float((res.samples - star.samples).pow(2).sum(1).mean().sqrt())
        assert rms < bound, (schedule, rms)


# ---- (d) bad options -------------------------------------------------------------------------
class _NotLinear:
    T, N = 1.0, 10


@pytest.mark.parametrize("method,steps,opts,match", [
    ("dpm_solver", 10, dict(order=4), "order must be 1, 2 or 3, got 4"),
    ("dpm_solver", 10, dict(order=0), "order must be 1, 2 or 3, got 0"),
    ("dpm_solver", 10, dict(order=True), "order must be 1, 2 or 3, got True"),
    ("dpm_solver", 2, dict(order=3), "steps=2 is fewer than order=3"),
    ("dpm_solver", 2, dict(order=3, multistep=False), "steps=2 is fewer than order=3"),
    ("dpm_solver", 10, dict(schedule="karras"), "unknown schedule 'karras'; valid names: "
                                                 r"\['logsnr', 'time_uniform', 'time_quadratic'\]"),
    ("dpm_solver", 10, dict(prediction="v"),
     r"unknown prediction 'v'; valid names: \['data', 'noise'\]"),
    ("dpm_solver", 10, dict(multistep="yes"), "multistep must be True or False, got 'yes'"),
    ("dpm_solver", 10, dict(rtol=1e-3),
     r"valid names: \['order', 'multistep', 'prediction', 'schedule'\]"),
    ("edm_heun", 1, {}, "steps=1 is fewer than order=2"),
    ("edm_heun", 10, dict(rho=0.0), "rho must be a positive number, got 0.0"),
    ("edm_heun", 10, dict(order=2), r"valid names: \['rho'\]"),
])
def test_bad_options_are_refused(method, steps, opts, match):
    sde = VPSDE()
    with pytest.raises(ValueError, match=match):
        sample(MIX2.score_fn(sde), sde, (4, 2), method=method, steps=steps, **opts)


@pytest.mark.parametrize("method", ["dpm_solver", "edm_heun"])
def test_unsupported_sde_is_refused(method):
    sde = VPSDE()   # sigma(0) = 0: the log-SNR is infinite at eps = 0
    with pytest.raises(ValueError, match=r"sigma\(eps\) > 0.*use eps > 0"):
        sample(MIX2.score_fn(sde), sde, (4, 2), method=method, steps=10, eps=0.0)
    with pytest.raises(ValueError, match=f"{method} needs a LinearSDE.*got sde=_NotLinear"):
        sample(MIX2.score_fn(sde), _NotLinear(), (4, 2), method=method, steps=10,
               x_T=torch.zeros(4, 2))
    ve = VESDE()   # sigma(0) = sigma_min > 0: eps = 0 is fine for VE
    res = sample(MIX2.score_fn(ve), ve, (4, 2), method=method, steps=10, eps=0.0,
                 generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(res.samples).all()


# ---- the study script --------------------------------------------------------------------------
def test_fast_samplers_study_smoke(experiment, tmp_path):
    study = experiment("fast_samplers")
    summary = study.main(["--seeds", "2", "--n", "200", "--nfe", "6", "--data", "mix2",
                          "--sdes", "vp", "--only", "dpm3m-data", "edm", "ode_heun",
                          "--out", str(tmp_path)])
    by = {(s["sampler"], s["budget"]): s for s in summary}
    assert set(by) == {("true", 0), ("rk45", 0), ("dpm3m-data", 6), ("edm_heun", 6),
                       ("ode_heun", 6)}
    assert by[("dpm3m-data", 6)]["nfe"] == 7 and by[("ode_heun", 6)]["nfe"] == 7
    assert by[("rk45", 0)]["path"] < by[("dpm3m-data", 6)]["path"]
    assert all(s["seeds"] == 2 and s["sw2_ci"] >= 0 for s in summary)
    saved = json.loads((tmp_path / "fast_samplers.json").read_text())
    assert saved["command"].startswith("python experiments/fast_samplers.py --seeds 2")
    assert len(saved["rows"]) == 2 * 5
    md = (tmp_path / "fast_samplers.md").read_text()
    assert "### mix2: path error" in md and "| dpm3m-data |" in md


def test_fast_samplers_trained_smoke(experiment, tmp_path):
    """--trained: the ring models of experiments/density_likelihood.py (tiny training) and
    the ring's exact score, VP, every sampler's rows and tables."""
    study = experiment("fast_samplers")
    summary = study.main(["--seeds", "2", "--n", "100", "--nfe", "6", "--data", "--trained",
                          "--train-steps", "20", "--fp-steps", "5", "--only", "dpm3m-data",
                          "--out", str(tmp_path)])
    models = {"dsm", "dsm+dsm", "dsm+fp", "true score"}
    assert {s["data"] for s in summary} == {f"ring/{m}" for m in models}
    assert all(s["sde"] == "vp" and s["seeds"] == 2 for s in summary)
    assert all(math.isfinite(s["sw2"]) for s in summary)
    md = (tmp_path / "fast_samplers.md").read_text()
    assert "### ring/dsm+fp: path error" in md
