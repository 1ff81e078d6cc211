"""Issue 20, part 1: the score-based density formula against the probability-flow ODE.

    python experiments/density_likelihood.py [--points 128] [--budgets 64 256 1024 4096 16384]
        [--tols 1e-2 1e-3 1e-4 1e-5 1e-6] [--train-steps 3000] [--out experiments/results]

1. Exact mixture score (docs/MATH.md 6): ``mix2``, the tests' two components in 2-D, and
   ``mix16``, eight random components in 16-D (as experiments/fast_samplers.py), for VE, VP
   and sub-VP. On --points held-out points x, against the exact log q_eps(x):
   - the density formula (fpkern.likelihood.density_log_likelihood, the defaults: stratified
     in t, antithetic, reference variance 1) at each budget of --budgets score evaluations
     per point (nodes = min(16, budget / 8), samples = budget / (2 nodes));
   - the probability-flow ODE (fpkern.likelihood.log_likelihood) at rtol = atol in --tols,
     with the exact divergence (the solver's error alone) and with one Rademacher probe.
   Reported: the RMS per-point error and the error of the mean over the points (nats/dim),
   the formula's mean standard error and the RMS of error / SE (its honesty), cost (score
   evaluations or ODE right-hand sides) and wall time. On mix2 also the formula's variants at
   --variant-budget: Gauss-Legendre in place of the stratified rule, log-SNR in place of t,
   and (with Gauss-Legendre: the stratified rule refuses them) without the Gaussian
   reference, the antithetic pairs or both (VARIANTS).
2. A trained model: an MLP(2, 128, 3) trained with likelihood-weighted DSM for --train-steps
   steps on the 8-Gaussian ring of experiments/fp_study.py (exact log q_0), VP SDE, EMA
   weights; then one copy fine-tuned with the FP regulariser (--fp-alpha, beta 0.01; div
   form, fused, one probe) for --fp-steps from it, and one with --fp-steps more DSM steps.
   On --points held-out points:
   the ODE log-likelihood (exact divergence, rtol = atol = 1e-5) and the density formula at
   --trained-budget evaluations, side by side with their cost, and the per-point difference
   ODE - formula. For a learned score the formula is the DSM lower bound on the reverse-SDE
   model's log-likelihood, the ODE the probability-flow model's (docs/MATH.md 11.5).

Writes density_likelihood.json (every number, the command, commit, machine) and
density_likelihood.md (the tables) to --out; the reading is in experiments/README.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fp_study import ring_mixture, train  # noqa: E402
from provenance import git, machine  # noqa: E402

from fpkern.data.mixture import GaussianMixture  # noqa: E402
from fpkern.likelihood import density_log_likelihood, log_likelihood  # noqa: E402
from fpkern.models import MLP, ScoreFn  # noqa: E402
from fpkern.sde import SubVPSDE, VESDE, VPSDE  # noqa: E402

SDES = {"ve": VESDE, "vp": VPSDE, "subvp": SubVPSDE}
EPS = 1e-5


def datasets() -> dict[str, GaussianMixture]:
    mix2 = GaussianMixture([0.3, 0.7], [[-1.5, 0.5], [1.0, -0.5]], [0.3, 0.5])
    mix16 = GaussianMixture.random(8, 16, spread=1.0, generator=torch.Generator().manual_seed(0))
    return {"mix2": mix2.to(dtype=torch.float64), "mix16": mix16}


def split_budget(budget: int) -> tuple[int, int]:
    """(nodes, samples) with 2 nodes samples = budget (antithetic pairs)."""
    nodes = max(1, min(16, budget // 8))
    if budget % (2 * nodes) or budget // (2 * nodes) < 2:
        raise ValueError(f"budget {budget} is not 2 x nodes x samples with samples >= 2")
    return nodes, budget // (2 * nodes)


def _errors(logp: torch.Tensor, exact: torch.Tensor, D: int) -> dict:
    err = (logp.double() - exact) / D
    return {"rms_err": err.pow(2).mean().sqrt().item(), "mean_err": err.mean().item(),
            "max_abs_err": err.abs().max().item()}


#: variants of the formula compared at one budget on mix2: (label, options)
GL = dict(rule="gauss_legendre")
VARIANTS = (("t, gauss_legendre", GL),
            ("logsnr, stratified", dict(variable="logsnr")),
            ("logsnr, gauss_legendre", dict(variable="logsnr", **GL)),
            ("t, gauss_legendre, no reference", dict(ref_var=None, **GL)),
            ("t, gauss_legendre, not antithetic", dict(antithetic=False, **GL)),
            ("t, gauss_legendre, neither", dict(ref_var=None, antithetic=False, **GL)))


def _density_row(score, sde, x, exact, budget, seed, label="density", **options) -> dict:
    nodes, samples = split_budget(budget)
    if options.get("antithetic", True) is False:
        samples *= 2
    t0 = time.perf_counter()
    r = density_log_likelihood(score, sde, x, nodes=nodes, samples=samples, eps=EPS,
                               generator=torch.Generator().manual_seed(seed), **options)
    wall = time.perf_counter() - t0
    D = x.shape[1]
    z = (r.logp.double() - exact) / r.stderr.double()
    pairs = "" if options.get("antithetic", True) is False else " x 2"
    return {"method": label, "setting": f"{nodes} x {samples}{pairs}", "cost": r.nfe,
            **_errors(r.logp, exact, D), "se": r.stderr.double().mean().item() / D,
            "mean_se": r.stderr.double().pow(2).mean().sqrt().item() / D / math.sqrt(len(x)),
            "z_rms": z.pow(2).mean().sqrt().item(), "wall_s": wall}


def _ode_row(score, sde, x, exact, tol, probes, seed) -> dict:
    t0 = time.perf_counter()
    r = log_likelihood(score, sde, x, probes=probes, rtol=tol, atol=tol, eps=EPS,
                       generator=torch.Generator().manual_seed(seed))
    wall = time.perf_counter() - t0
    name = "ode_exact" if probes is None else f"ode_hutchinson{probes}"
    return {"method": name, "setting": f"tol {tol:g}", "cost": r.nfe,
            **_errors(r.logp, exact, x.shape[1]), "wall_s": wall}


def run_oracle(args) -> list[dict]:
    rows = []
    gm = datasets()["mix2"]   # a first solve, so that no timed row pays the warm-up
    log_likelihood(gm.score_fn(VPSDE()), VPSDE(), gm.sample(2), probes=None, rtol=1e-2, atol=1e-2)
    for data_name, gm in datasets().items():
        n = args.points if gm.dim <= 2 else max(8, args.points // 2)
        x = gm.sample(n, generator=torch.Generator().manual_seed(args.seed))
        for sde_name, cls in SDES.items():
            sde = cls()
            score = gm.score_fn(sde)
            exact = gm.log_prob(x, torch.full((n,), EPS, dtype=torch.float64), sde)
            case = {"data": data_name, "sde": sde_name, "points": n}
            for b in args.budgets:
                rows.append({**case, **_density_row(score, sde, x, exact, b, args.seed)})
            if data_name == "mix2":
                for label, options in VARIANTS:
                    rows.append({**case, **_density_row(score, sde, x, exact, args.variant_budget,
                                                        args.seed, f"density ({label})",
                                                        **options)})
            for tol in args.tols:
                for probes in (None, 1):
                    rows.append({**case, **_ode_row(score, sde, x, exact, tol, probes, args.seed)})
            print(f"oracle {data_name} {sde_name} done", flush=True)
    return rows


# ---- a trained model -----------------------------------------------------------------------
def train_models(args, sde) -> dict:
    """DSM pre-training, then DSM vs DSM+FP fine-tuning from the same EMA checkpoint."""
    torch.manual_seed(args.seed)
    gm = ring_mixture()
    sample = lambda g: gm.sample(256, generator=g).float()
    net = MLP(2, 128, 3)
    opts = dict(lr=2e-3, fp_batch=64, ema_decay=0.995, seed=args.seed)
    t0 = time.perf_counter()
    base, ms, _ = train(ScoreFn(net, sde), sde, sample, alpha=0.0, beta=0.0,
                        steps=args.train_steps, desc="dsm", **opts)
    models = {"dsm": {"score": base, "steps": args.train_steps, "ms_per_step": ms}}
    for name, alpha, beta in (("dsm+dsm", 0.0, 0.0), ("dsm+fp", args.fp_alpha, 0.01)):
        if args.fp_steps < 1:
            break
        live = ScoreFn(copy.deepcopy(net), sde)          # the raw weights, and the EMA
        ema, ms, _ = train(live, sde, sample, alpha=alpha, beta=beta, steps=args.fp_steps,
                           desc=name, ema=copy.deepcopy(base), phase=1, **opts)
        models[name] = {"score": ema, "steps": args.train_steps + args.fp_steps,
                        "ms_per_step": ms}
    models["true score"] = {"score": gm.score_fn(sde), "steps": 0, "ms_per_step": 0.0}
    print(f"trained in {time.perf_counter() - t0:.0f} s", flush=True)
    return models


def run_trained(args) -> list[dict]:
    sde = VPSDE()
    gm = ring_mixture()
    x = gm.sample(args.points, generator=torch.Generator().manual_seed(args.seed + 1))
    exact = gm.log_prob(x).double()
    nodes, samples = split_budget(args.trained_budget)
    rows = []
    for name, m in train_models(args, sde).items():
        f64 = name == "true score"
        xin = x if f64 else x.float()
        score = m["score"]
        with torch.no_grad():
            t0 = time.perf_counter()
            d = density_log_likelihood(score, sde, xin, nodes=nodes, samples=samples, eps=EPS,
                                       generator=torch.Generator().manual_seed(args.seed))
            wall_d = time.perf_counter() - t0
        t0 = time.perf_counter()
        o = log_likelihood(score, sde, xin, probes=None, rtol=1e-5, atol=1e-5, eps=EPS)
        wall_o = time.perf_counter() - t0
        diff = (o.logp.double() - d.logp.double()) / 2
        rows.append({
            "model": name, "train_steps": m["steps"], "ms_per_step": m["ms_per_step"],
            "exact_nll": -exact.mean().item() / 2,
            "ode_nll": -o.logp.double().mean().item() / 2, "ode_rhs": o.nfe, "ode_wall_s": wall_o,
            "density_nll": -d.logp.double().mean().item() / 2,
            "density_se": d.stderr.double().pow(2).mean().sqrt().item() / 2 / math.sqrt(len(x)),
            "density_nfe": d.nfe, "density_wall_s": wall_d,
            "diff_mean": diff.mean().item(),
            "diff_se": diff.std().item() / math.sqrt(len(x)),
            "diff_sd": diff.std().item(),
            "point_se": d.stderr.double().mean().item() / 2,
            "frac_ode_above": (diff > 0).double().mean().item()})
        print(f"trained {name} evaluated", flush=True)
    return rows


# ---- reporting -----------------------------------------------------------------------------
def _oracle_table(rows, data) -> list[str]:
    out = [f"### {data}", "",
           "| SDE | method | setting | cost | RMS error / point | error of the mean | "
           "SE of the mean | RMS z | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["data"] != data:
            continue
        se = f"{r['mean_se']:.4f}" if "mean_se" in r else ""
        z = f"{r['z_rms']:.2f}" if "z_rms" in r else ""
        out.append(f"| {r['sde']} | {r['method']} | {r['setting']} | {r['cost']} | "
                   f"{r['rms_err']:.4f} | {r['mean_err']:+.4f} | {se} | {z} | {r['wall_s']:.2f} |")
    return out + [""]


def _trained_table(rows) -> list[str]:
    out = ["| model | steps | exact NLL | ODE NLL | ODE RHS calls | ODE s | density NLL "
           "(+- SE) | density NFE | density s | ODE - density logp / dim (+- SE) | "
           "sd over points | density SE per point | points with ODE above |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['train_steps']} | {r['exact_nll']:.4f} | "
                   f"{r['ode_nll']:.4f} | {r['ode_rhs']} | {r['ode_wall_s']:.1f} | "
                   f"{r['density_nll']:.4f} +- {r['density_se']:.4f} | {r['density_nfe']} | "
                   f"{r['density_wall_s']:.1f} | {r['diff_mean']:+.4f} +- {r['diff_se']:.4f} | "
                   f"{r['diff_sd']:.3f} | {r['point_se']:.3f} | {r['frac_ode_above']:.2f} |")
    return out + [""]


def write_markdown(res: dict, path: Path) -> None:
    a = res["args"]
    lines = ["# Density formula vs probability-flow ODE (issue 20, part 1)", "",
             f"Command: `{res['command']}`  ",
             f"Commit: {res['commit']} (HEAD; the tree may hold uncommitted changes)  ",
             f"Machine: {res['machine']['summary']}  ", f"Total wall time: {res['wall_s']:.0f} s",
             "", "## 1. Exact mixture score", "",
             f"Errors in nats/dim against the exact log q_eps (eps = {EPS:g}). cost: score "
             "evaluations per point for the density formula (nodes x samples x 2 antithetic), "
             "right-hand-side calls for the ODE (each one score evaluation plus the divergence: "
             "D more backward passes exact, one with a probe). RMS z: RMS over the points of "
             "error / SE, 1 for an honest standard error. The mean is over the points: "
             f"{a['points']} for mix2, {max(8, a['points'] // 2)} for mix16.", ""]
    for data in ("mix2", "mix16"):
        lines += _oracle_table(res["oracle"], data)
    if res["trained"]:
        lines += ["## 2. A trained model: MLP on the 8-Gaussian ring, VP", "",
                  "NLL in nats/dim, mean over the held-out points, against the exact "
                  "-log q_0. ODE: exact divergence, rtol = atol = 1e-5. Density: "
                  f"{a['trained_budget']} score evaluations per point. The last columns are "
                  "per point: log p_ODE - L (the formula) in nats/dim, its mean with the "
                  "standard error over the points, its spread over the points (to compare "
                  "with the formula's own standard error per point: a larger spread is a real "
                  "difference), and the share of points where the ODE's value is higher. "
                  f"dsm+fp: alpha {a['fp_alpha']:g}, beta 0.01.", ""]
        lines += _trained_table(res["trained"])
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--points", type=int, default=128, help="held-out points (mix16: half)")
    p.add_argument("--budgets", type=int, nargs="+", default=[64, 256, 1024, 4096, 16384],
                   help="density formula: score evaluations per point")
    p.add_argument("--variant-budget", type=int, default=4096,
                   help="mix2: the formula's variants (variable, rule, no control variate) "
                        "at this budget")
    p.add_argument("--tols", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4, 1e-5, 1e-6],
                   help="ODE: rtol = atol values")
    p.add_argument("--train-steps", type=int, default=3000, help="DSM steps of the MLP")
    p.add_argument("--fp-steps", type=int, default=300,
                   help="fine-tuning steps, DSM and DSM+FP, from the DSM model (0: none)")
    p.add_argument("--fp-alpha", type=float, default=0.01,
                   help="FP regulariser weight of the fine-tuned model (fp_study's least "
                        "harmful; 0.15, the paper's, costs it 4 nats/dim there)")
    p.add_argument("--trained-budget", type=int, default=4096,
                   help="density formula on the trained models: evaluations per point")
    p.add_argument("--no-trained", action="store_true", help="the oracle part only")
    p.add_argument("--seed", type=int, default=0, help="points, draws and training seed")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                   help="output folder")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    for b in (*args.budgets, args.variant_budget):
        split_budget(b)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    given = sys.argv[1:] if argv is None else argv
    res = {"command": " ".join(["python experiments/density_likelihood.py",
                                *(shlex.quote(a) for a in given)]),
           "commit": git("rev-parse", "--short", "HEAD"), "machine": machine(),
           "args": vars(args)}
    res["oracle"] = run_oracle(args)
    res["trained"] = [] if args.no_trained else run_trained(args)
    res["wall_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "density_likelihood.json").write_text(json.dumps(res, indent=1) + "\n")
    write_markdown(res, out / "density_likelihood.md")
    return res


if __name__ == "__main__":
    main()
