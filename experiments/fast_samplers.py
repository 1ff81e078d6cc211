"""Issue 20, part 2: DPM-Solver and EDM's Heun against fpkern's samplers at 10, 20 and 50 NFE.

    python experiments/fast_samplers.py [--seeds 5] [--n 1000] [--nfe 10 20 50] [--out DIR]

On the exact Gaussian-mixture score (docs/MATH.md 6), so that the only error is the
sampler's: ``mix2``, the tests' two components in 2-D (tests/test_sampling.py), and ``mix16``,
eight random components in 16-D (``GaussianMixture.random(8, 16, spread=1.0)``, seed 0), for
VE, VP and sub-VP. Every sampler runs at a budget of --nfe score evaluations (the solver's;
every sampler then takes the same Tweedie denoising step at eps = 1e-3, one more evaluation):

- the new ones (``fpkern.sampling``, docs/MATH.md 10): ``ddim`` (dpm_solver order 1: all its
  variants are the same map), ``dpm{2,3}s-{noise,data}`` (single-step; noise = DPM-Solver-2/3,
  data = DPM-Solver++(2S)/(3S)), ``dpm{2,3}m-{noise,data}`` (multistep; data =
  DPM-Solver++(2M)/(3M)), all on the default log-SNR-uniform schedule, and ``edm_heun``;
- the existing ones at the same budget: ``euler_maruyama`` and ``ode_euler`` (steps = NFE),
  ``pc`` (one Langevin corrector: steps = NFE / 2), ``ode_heun`` (steps = NFE / 2);
- ``rk45``: the adaptive probability-flow solver at rtol = atol = 1e-5, with its own NFE;
- ``true``: a second true sample, the floor of the two distances.

Per seed: --n prior draws x_T shared by all samplers, a fresh true reference sample, fixed
sliced-W2 directions and one MMD bandwidth (the median heuristic on the reference). Measured:
sliced W2 and MMD^2 (``fpkern.diagnostics``) to the true reference, and for the deterministic
samplers the path error, the RMS over draws of |x - x*| with x* the RK45 solve at 1e-9 from
the same x_T. The distances are also reported as the excess over RK45's in the same seed
(a paired difference: the x_T, the reference and the directions are shared), which removes
most of the sampling noise of the draws. Tables: mean +- the 95% t-interval half-width over
seeds.

``--trained``: the same on trained models, under VP: the MLP(2, 128, 3) score networks of
experiments/density_likelihood.py (``train_models``: --train-steps of likelihood-weighted DSM
on the 8-Gaussian ring of experiments/fp_study.py, then --fp-steps more of DSM, "dsm+dsm",
or of DSM + FP at --fp-alpha, "dsm+fp", from the same EMA checkpoint), in float64, and the
ring's exact score beside them (data names ``ring/<model>``). The distances to true ring
samples then hold the model's error as well as the sampler's; the excess over RK45 and the
path error (against the model's own ODE at 1e-9) are the sampler's alone. Writes
fast_samplers.json and fast_samplers.md to --out; the reading is in experiments/README.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import git, machine  # noqa: E402

from fpkern.data.mixture import GaussianMixture  # noqa: E402
from fpkern.diagnostics import mmd, sliced_wasserstein  # noqa: E402
from fpkern.sampling import sample  # noqa: E402
from fpkern.sde import SubVPSDE, VESDE, VPSDE  # noqa: E402

SDES = {"ve": VESDE, "vp": VPSDE, "subvp": SubVPSDE}
EPS = 1e-3
REF_TOL = 1e-9


def datasets() -> dict[str, GaussianMixture]:
    mix2 = GaussianMixture([0.3, 0.7], [[-1.5, 0.5], [1.0, -0.5]], [0.3, 0.5])
    mix2 = mix2.to(dtype=torch.float64)
    mix16 = GaussianMixture.random(8, 16, spread=1.0, generator=torch.Generator().manual_seed(0))
    return {"mix2": mix2, "mix16": mix16}


def _dpm(order, multistep, prediction):
    opts = dict(order=order, multistep=multistep, prediction=prediction)
    return ("dpm_solver", lambda n: n, opts)


# name -> (method, steps for an NFE budget, options); None steps: not run at that budget
SAMPLERS = {
    "ddim": _dpm(1, True, "data"),
    **{f"dpm{k}{'m' if ms else 's'}-{p}": _dpm(k, ms, p)
       for ms in (False, True) for k in (2, 3) for p in ("noise", "data")},
    "edm_heun": ("edm_heun", lambda n: n, {}),
    "euler_maruyama": ("euler_maruyama", lambda n: n, {}),
    "pc": ("pc", lambda n: n // 2 if n % 2 == 0 else None, {"corrector_steps": 1}),
    "ode_euler": ("ode_euler", lambda n: n, {}),
    "ode_heun": ("ode_heun", lambda n: n // 2 if n % 2 == 0 else None, {}),
}
STOCHASTIC = {"euler_maruyama", "pc"}


def _path_error(x, ref) -> float:
    return float((x - ref).flatten(1).pow(2).sum(1).mean().sqrt())


def _median_bandwidth(ref: torch.Tensor) -> float:
    z = ref[:500].flatten(1)
    d2 = torch.cdist(z, z).pow(2)
    return float(d2[torch.triu(torch.ones_like(d2, dtype=torch.bool), 1)].median().sqrt())


def run_case(data_name, gm, sde_name, seed, args, score=None) -> list[dict]:
    """Every sampler at every budget for one (data set, SDE, seed); `score`: a model of gm's
    score (default: gm's exact one)."""
    sde = SDES[sde_name]()
    score = gm.score_fn(sde) if score is None else score
    n, dim = args.n, gm.dim
    x_T = sde.prior_sampling((n, dim), generator=torch.Generator().manual_seed(1000 + seed),
                             dtype=torch.float64)
    ref = gm.sample(n, generator=torch.Generator().manual_seed(2000 + seed))
    bandwidth = _median_bandwidth(ref)

    def metrics(x):
        sw = sliced_wasserstein(x, ref, projections=args.projections,
                                generator=torch.Generator().manual_seed(5000 + seed))
        return {"sw2": sw, "mmd2": mmd(x, ref, bandwidth=bandwidth)}

    def run(method, steps, **opts):
        start = time.perf_counter()
        res = sample(score, sde, (n, dim), method=method, steps=steps, x_T=x_T, eps=EPS,
                     generator=torch.Generator().manual_seed(4000 + seed), dtype=torch.float64,
                     **opts)
        return res, time.perf_counter() - start

    star, _ = run("ode", None, rtol=REF_TOL, atol=REF_TOL)
    rows = []
    base = {"data": data_name, "sde": sde_name, "seed": seed}
    true2 = gm.sample(n, generator=torch.Generator().manual_seed(3000 + seed))
    rows.append({**base, "sampler": "true", "budget": 0, "nfe": 0, **metrics(true2),
                 "path": None, "time_s": 0.0})
    rk, secs = run("ode", None, rtol=1e-5, atol=1e-5)
    rows.append({**base, "sampler": "rk45", "budget": 0, "nfe": rk.nfe, **metrics(rk.samples),
                 "path": _path_error(rk.samples, star.samples), "time_s": secs})
    for name, (method, steps_of, opts) in SAMPLERS.items():
        if args.only and not any(o in name for o in args.only):
            continue
        for budget in args.nfe:
            steps = steps_of(budget)
            if steps is None:
                continue
            res, secs = run(method, steps, **opts)
            path = None if name in STOCHASTIC else _path_error(res.samples, star.samples)
            rows.append({**base, "sampler": name, "budget": budget, "nfe": res.nfe,
                         **metrics(res.samples), "path": path, "time_s": secs})
    return rows


# ---- summary over seeds ----------------------------------------------------------------------
def _t975(dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, dof))


def mean_ci(values) -> tuple[float, float]:
    """Mean and the half-width of the 95% t-interval (0 for one value)."""
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, 0.0
    return m, _t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def add_excess(rows) -> None:
    """sw2_excess, mmd2_excess: a run's distance minus RK45's in the same (data, SDE, seed),
    which shares x_T, the true reference and the SW2 directions (a paired difference)."""
    rk = {(r["data"], r["sde"], r["seed"]): r for r in rows if r["sampler"] == "rk45"}
    for r in rows:
        base = rk[(r["data"], r["sde"], r["seed"])]
        r["sw2_excess"] = r["sw2"] - base["sw2"]
        r["mmd2_excess"] = r["mmd2"] - base["mmd2"]


def summarise(rows) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["data"], r["sde"], r["sampler"], r["budget"]), []).append(r)
    out = []
    for (data, sde, sampler, budget), rs in groups.items():
        s = {"data": data, "sde": sde, "sampler": sampler, "budget": budget, "seeds": len(rs),
             "nfe": statistics.fmean(r["nfe"] for r in rs)}
        for key in ("sw2", "mmd2", "sw2_excess", "mmd2_excess", "path", "time_s"):
            s[key], s[key + "_ci"] = mean_ci([r[key] for r in rs])
        out.append(s)
    return out


def _cell(s, key) -> str:
    if s is None or math.isnan(s[key]):
        return "—"
    return f"{s[key]:.2g} ± {s[key + '_ci']:.1g}"


def _table(by, data, key, title, sdes, budgets) -> list[str]:
    """Rows: rk45 (path error only) or true (excesses only), then every sampler that ran."""
    lines = [f"### {data}: {title}", "",
             "| sampler | " + " | ".join(f"{k} @{b}" for k in sdes for b in budgets) + " |",
             "|---|" + "---:|" * (len(sdes) * len(budgets))]
    fixed = "rk45" if key == "path" else "true"
    cells = [by.get((data, k, fixed, 0)) for k in sdes]
    label = ("rk45 1e-5 (NFE " + "/".join(f"{c['nfe']:.0f}" for c in cells if c) + ")"
             if fixed == "rk45" else "true (floor)")
    lines.append(f"| {label} | " + " | ".join(_cell(c, key) for c in cells for _ in budgets) + " |")
    for name in SAMPLERS:
        row = [by.get((data, k, name, b)) for k in sdes for b in budgets]
        if any(row):
            lines.append(f"| {name} | " + " | ".join(_cell(c, key) for c in row) + " |")
    return lines + [""]


def to_markdown(summary, args, header) -> str:
    by = {(s["data"], s["sde"], s["sampler"], s["budget"]): s for s in summary}
    sdes = [k for k in SDES if any(s["sde"] == k for s in summary)]
    lines = [header, "",
             f"{args.seeds} seeds, {args.n} samples each. NFE budget = the solver's score "
             f"evaluations (+1 for the Tweedie denoising at eps = {EPS:g}, the same for every "
             "sampler). Cells: mean ± 95% CI half-width over seeds. Path error: RMS |x - x*| "
             f"from the same x_T, x* = RK45 at {REF_TOL:g} (— for the stochastic samplers). "
             "Excess: the sampler's distance to the true reference minus RK45's (rtol = atol = "
             "1e-5) in the same seed (same x_T, reference and SW2 directions); `true (floor)`: "
             "a second true sample, so a sampler at the floor of the estimator sits near that "
             "row, and RK45 at 0.", ""]
    for data in dict.fromkeys(s["data"] for s in summary):
        sdes = [k for k in SDES if any(s["sde"] == k and s["data"] == data for s in summary)]
        lines += [f"### {data}: absolute distances to the true reference", "",
                  "| | " + " | ".join(f"{k} SW2 | {k} MMD²" for k in sdes) + " |",
                  "|---|" + "---:|" * (2 * len(sdes))]
        for name, label in (("true", "true (floor)"), ("rk45", "rk45 1e-5")):
            cells = [by.get((data, k, name, 0)) for k in sdes]
            lines.append(f"| {label} | " + " | ".join(f"{_cell(c, 'sw2')} | {_cell(c, 'mmd2')}"
                                                     for c in cells) + " |")
        lines.append("")
        for key, title in (("path", "path error (evaluations vs error)"),
                           ("sw2_excess", "sliced W2 excess over RK45"),
                           ("mmd2_excess", "MMD² excess over RK45")):
            lines += _table(by, data, key, title, sdes, args.nfe)
    return "\n".join(lines)


def run_trained(args) -> list[dict]:
    """Every sampler on the trained ring models and the ring's exact score (VP)."""
    from density_likelihood import train_models
    from fp_study import ring_mixture

    opts = argparse.Namespace(seed=0, train_steps=args.train_steps, fp_steps=args.fp_steps,
                              fp_alpha=args.fp_alpha)
    gm = ring_mixture()
    rows = []
    for name, m in train_models(opts, VPSDE()).items():
        score = m["score"]
        if isinstance(score, torch.nn.Module):
            score = copy.deepcopy(score).double().eval()
        for seed in range(args.seeds):
            rows += run_case(f"ring/{name}", gm, "vp", seed, args, score=score)
        print(f"trained ring/{name}: sampled", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", type=int, default=5, help="independent repetitions")
    p.add_argument("--n", type=int, default=1000, help="samples per run (and per true sample)")
    p.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 50], help="NFE budgets")
    p.add_argument("--data", nargs="*", default=["mix2", "mix16"], choices=["mix2", "mix16"],
                   help="exact-score data sets (none: `--data` alone, with --trained)")
    p.add_argument("--sdes", nargs="+", default=list(SDES), choices=list(SDES), help="SDEs")
    p.add_argument("--only", nargs="+", default=None,
                   help="run the samplers whose name contains one of these")
    p.add_argument("--projections", type=int, default=128, help="sliced-W2 directions")
    p.add_argument("--trained", action="store_true",
                   help="also the trained ring models (VP; experiments/density_likelihood.py)")
    p.add_argument("--train-steps", type=int, default=3000, help="--trained: DSM steps")
    p.add_argument("--fp-steps", type=int, default=300,
                   help="--trained: fine-tuning steps (DSM, and DSM + FP)")
    p.add_argument("--fp-alpha", type=float, default=0.01, help="--trained: the FP weight")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.n < 2 or min(args.nfe) < 3:
        p.error("--seeds >= 1, --n >= 2 and every --nfe >= 3 (dpm order 3 needs 3)")
    argv = sys.argv[1:] if argv is None else list(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    info = {"command": shlex.join(["python", "experiments/fast_samplers.py", *argv]),
            "commit": git("rev-parse", "--short", "HEAD"), "machine": machine()}
    start = time.perf_counter()
    rows = []
    try:
        for data_name, gm in datasets().items():
            if data_name not in args.data:
                continue
            for sde_name in args.sdes:
                for seed in range(args.seeds):
                    rows += run_case(data_name, gm, sde_name, seed, args)
                    elapsed = time.perf_counter() - start
                    print(f"{data_name} {sde_name} seed {seed}: {elapsed:.0f} s", flush=True)
        if args.trained:
            rows += run_trained(args)
    finally:
        torch.set_num_threads(threads)
    info["wall_s"] = time.perf_counter() - start
    add_excess(rows)
    summary = summarise(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fast_samplers.json").write_text(
        json.dumps({**info, "summary": summary, "rows": rows}, indent=1))
    header = (f"`{info['command']}` at {info['commit']} "
              "(plus the uncommitted work it shipped with), "
              f"{info['machine']['summary']}, {info['wall_s']:.0f} s")
    (args.out / "fast_samplers.md").write_text(to_markdown(summary, args, header))
    return summary


if __name__ == "__main__":
    main()
