"""Issue 20, part 3: does the damped second-order Langevin corrector (pc_lml) help?

    python experiments/lml_corrector.py [--seeds 5] [--n 1000] [--nfe 40 160] [--out DIR]

On exact scores, so that the only error is the sampler's: the Gaussian-mixture oracle
(docs/MATH.md 6) as ``mix2``, the tests' two components in 2-D, and ``mix16``, eight random
components in 16-D (``GaussianMixture.random(8, 16, spread=1.0)``, seed 0), whose
components are isotropic; and ``aniso16``, one Gaussian in 16-D with covariance eigenvalues
from 0.01 to 1 (condition 100), where curvature varies by direction. Under VE and VP. Every
configuration runs at a budget of --nfe forward-equivalents (pc_lml's jet pass with 1 + k
rows counts 1 + k: docs/MATH.md 12.4), then the same Tweedie denoising step (+1):

- ``none``: ``reverse_diffusion``, the predictor alone, steps = NFE;
- ``L1``: ``pc`` with one Langevin corrector step, steps = NFE / 2;
- per rank k (mix2: 1, 2 = D; the 16-D sets: 2, 16 = D), on the grid of steps = NFE / (k + 2):
  ``lml{k}`` (``pc_lml``, random directions, damping 1), ``lml{k}p`` (power directions,
  only for k < D: at k = D every choice of directions gives the same preconditioner),
  ``L{k+1}`` (``pc`` with k + 1 Langevin steps: the same grid and NFE) and ``L1g{k}`` (``pc``
  with one Langevin step on that grid: the same steps, fewer NFE);
- a damping sweep of ``lml2`` at the largest budget (--damping), and on aniso16 ``lml16``,
  ``L17`` and ``L1g16`` at larger snr (--snr): can a preconditioned step afford a larger one?
- ranks whose grid would have fewer than 4 steps at a budget are left out there.

Per seed: --n prior draws x_T shared by all configurations, a fresh true reference sample,
fixed sliced-W2 directions and one MMD bandwidth. pc_lml draws its directions from a
generator of its own (fpkern.sampling._direction_generator), so ``lml{k}`` and ``L1g{k}``
share every other random number: their difference is a paired one. Measured: sliced W2 and
MMD^2 to the true reference, wall-clock per run (the oracle's own cost, not a network's), and
the cost of a (1 + k)-row jet pass against a plain forward for random-init MLP score
networks. Tables: mean +- the 95% t-interval half-width over seeds, and the paired
differences lml - L{k+1} (equal NFE), lml - L1g{k} (equal steps), lml - none and lml - L1
(equal NFE). Writes lml_corrector.json and lml_corrector.md to --out; the reading is in
experiments/README.md.
"""

from __future__ import annotations

import argparse
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
from fast_samplers import _median_bandwidth, mean_ci  # noqa: E402  (the same bandwidth, CIs)

from fpkern.data.mixture import GaussianMixture  # noqa: E402
from fpkern.diagnostics import mmd, sliced_wasserstein  # noqa: E402
from fpkern.sampling import _score_and_jvps, sample  # noqa: E402
from fpkern.sde import VESDE, VPSDE  # noqa: E402

SDES = {"ve": VESDE, "vp": VPSDE}
EPS = 1e-3
RANKS = {"mix2": (1, 2), "mix16": (2, 16), "aniso16": (2, 16)}


class AnisotropicGaussian:
    """N(m, C) in D dimensions with C's eigenvalues log-spaced in [lo, hi] (condition hi/lo)
    in a random basis: the exact marginal under a linear SDE is N(alpha m, alpha^2 C +
    sigma^2 I), whose score is linear. The mixture oracle's components are isotropic; this
    target is where a curvature preconditioner has something to correct."""

    def __init__(self, dim: int, lo: float, hi: float, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.dim = dim
        self.basis = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64)).Q
        self.eig = torch.logspace(math.log10(lo), math.log10(hi), dim, dtype=torch.float64)
        self.mean = 0.5 * torch.randn(dim, generator=g, dtype=torch.float64)

    def sample(self, n: int, generator=None) -> torch.Tensor:
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.mean + (z * self.eig.sqrt()) @ self.basis.T

    def score_fn(self, sde):
        def score(x, t):
            a = sde.alpha(t)[:, None]
            var = a * a * self.eig + sde.sigma2(t)[:, None]
            return -(((x - a * self.mean) @ self.basis) / var) @ self.basis.T
        return score


def datasets() -> dict:
    mix2 = GaussianMixture([0.3, 0.7], [[-1.5, 0.5], [1.0, -0.5]], [0.3, 0.5])
    mix16 = GaussianMixture.random(8, 16, spread=1.0, generator=torch.Generator().manual_seed(0))
    return {"mix2": mix2.to(dtype=torch.float64), "mix16": mix16.to(dtype=torch.float64),
            "aniso16": AnisotropicGaussian(16, 0.01, 1.0)}


MIN_STEPS = 4    # fewer predictor steps than this is not a sampler worth comparing


def configs(data: str, dim: int, budget: int) -> dict[str, tuple[str, int, dict]]:
    """name -> (method, steps, options) for one NFE budget (ranks whose grid would have
    fewer than MIN_STEPS steps are left out at that budget)."""
    out = {"none": ("reverse_diffusion", budget, {}), "L1": ("pc", budget // 2, {})}
    for k in RANKS[data]:
        steps = budget // (k + 2)
        if steps < MIN_STEPS:
            continue
        out[f"lml{k}"] = ("pc_lml", steps, {"rank": k})
        if k < dim:
            out[f"lml{k}p"] = ("pc_lml", steps, {"rank": k, "directions": "power"})
        out[f"L{k + 1}"] = ("pc", steps, {"corrector_steps": k + 1})
        out[f"L1g{k}"] = ("pc", steps, {})
    return out


def sweep_configs(data: str, budget: int, dampings, snrs) -> dict[str, tuple[str, int, dict]]:
    """The damping sweep of lml2; on aniso16 also full rank against plain pc at larger snr
    (a preconditioned step might afford a larger step than the plain one)."""
    out = {f"lml2 damping {d:g}": ("pc_lml", budget // 4, {"rank": 2, "damping": float(d)})
           for d in dampings} if budget // 4 >= MIN_STEPS else {}
    if data == "aniso16" and budget // 18 >= MIN_STEPS:
        steps = budget // 18
        for snr in snrs:
            out[f"lml16 snr {snr:g}"] = ("pc_lml", steps, {"rank": 16, "snr": snr})
            out[f"L17 snr {snr:g}"] = ("pc", steps, {"corrector_steps": 17, "snr": snr})
            out[f"L1g16 snr {snr:g}"] = ("pc", steps, {"snr": snr})
    return out


def run_case(data_name, gm, sde_name, seed, args) -> list[dict]:
    """Every configuration at every budget, and the sweep, for one (data set, SDE, seed)."""
    sde = SDES[sde_name]()
    score = gm.score_fn(sde)
    n, dim = args.n, gm.dim
    x_T = sde.prior_sampling((n, dim), generator=torch.Generator().manual_seed(1000 + seed),
                             dtype=torch.float64)
    ref = gm.sample(n, generator=torch.Generator().manual_seed(2000 + seed))
    bandwidth = _median_bandwidth(ref)

    def metrics(x):
        sw = sliced_wasserstein(x, ref, projections=args.projections,
                                generator=torch.Generator().manual_seed(5000 + seed))
        return {"sw2": sw, "mmd2": mmd(x, ref, bandwidth=bandwidth)}

    base = {"data": data_name, "sde": sde_name, "seed": seed}
    true2 = gm.sample(n, generator=torch.Generator().manual_seed(3000 + seed))
    rows = [{**base, "config": "true", "budget": 0, "nfe": 0, "steps": 0, **metrics(true2),
             "time_s": 0.0}]
    plan = [(b, configs(data_name, dim, b)) for b in args.nfe]
    plan.append((max(args.nfe), sweep_configs(data_name, max(args.nfe), args.damping,
                                              args.snr)))
    for budget, table in plan:
        for name, (method, steps, opts) in table.items():
            start = time.perf_counter()
            res = sample(score, sde, (n, dim), method=method, steps=steps, x_T=x_T, eps=EPS,
                         generator=torch.Generator().manual_seed(4000 + seed),
                         dtype=torch.float64, **opts)
            secs = time.perf_counter() - start
            rows.append({**base, "config": name, "budget": budget, "nfe": res.nfe,
                         "steps": steps, **metrics(res.samples), "time_s": secs})
    return rows


# ---- the cost of a J v pass for a network ----------------------------------------------------
def pass_costs(args) -> list[dict]:
    """Median seconds of a plain forward and of (1 + k)-row jet passes of random-init MLP
    score networks at batch --n (no grad), and their ratio: the forward-equivalents a J v pass
    really costs on this machine."""
    from fpkern.models import MLP, ScoreFn

    out = []
    for dim, ks in ((2, (1, 2)), (16, (2, 16))):
        torch.manual_seed(0)
        net = ScoreFn(MLP(dim, 128, 3), VPSDE()).eval()
        x = torch.randn(args.n, dim)
        t = torch.full((args.n,), 0.5)

        def timed(fn, reps=15):
            fn()
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            return statistics.median(ts)

        with torch.no_grad():
            plain = timed(lambda: net(x, t))
            for k in ks:
                V = torch.randn(k, args.n, dim)
                jet = timed(lambda: _score_and_jvps(net, x, t, V))
                out.append({"net": f"MLP({dim}, 128, 3)", "batch": args.n, "k": k,
                            "forward_ms": 1e3 * plain, "jet_ms": 1e3 * jet,
                            "forward_equivalents": jet / plain, "counted": k + 1})
    return out


# ---- summary over seeds ----------------------------------------------------------------------
def summarise(rows) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["data"], r["sde"], r["config"], r["budget"]), []).append(r)
    out = []
    for (data, sde, config, budget), rs in groups.items():
        s = {"data": data, "sde": sde, "config": config, "budget": budget, "seeds": len(rs),
             "nfe": statistics.fmean(r["nfe"] for r in rs), "steps": rs[0]["steps"]}
        for key in ("sw2", "mmd2", "time_s"):
            s[key], s[key + "_ci"] = mean_ci([r[key] for r in rs])
        out.append(s)
    return out


def paired(rows, a: str, b: str, budget: int, data: str, sde: str) -> dict:
    """Mean +- CI over seeds of config a minus config b (same data, SDE, budget, seed)."""
    by = {(r["config"], r["seed"]): r for r in rows
          if r["data"] == data and r["sde"] == sde and r["budget"] == budget}
    seeds = sorted({s for (c, s) in by if c == a} & {s for (c, s) in by if c == b})
    out = {"a": a, "b": b, "data": data, "sde": sde, "budget": budget}
    for key in ("sw2", "mmd2", "time_s"):
        diffs = [by[(a, s)][key] - by[(b, s)][key] for s in seeds]
        out[key], out[key + "_ci"] = mean_ci(diffs)
    return out


def comparisons(rows, args) -> list[dict]:
    """lml{k}(p) against L{k+1} (equal NFE), L1g{k} (equal steps), none and L1 (equal NFE)."""
    out = []
    for data in args.data:
        ranks = RANKS[data]
        for sde in args.sdes:
            for budget in args.nfe:
                for k in ranks:
                    for lml in (f"lml{k}", f"lml{k}p"):
                        for other in (f"L{k + 1}", f"L1g{k}", "none", "L1"):
                            c = paired(rows, lml, other, budget, data, sde)
                            if not math.isnan(c["sw2"]):
                                out.append(c)
    return out


# ---- the report --------------------------------------------------------------------------
def _cell(s, key, fmt=".2g") -> str:
    if s is None or math.isnan(s[key]):
        return "—"
    return f"{s[key]:{fmt}} ± {s[key + '_ci']:.1g}"


def _verdict(c, key) -> str:
    lo, hi = c[key] - c[key + "_ci"], c[key] + c[key + "_ci"]
    return "better" if hi < 0 else "worse" if lo > 0 else "within noise"


def _main_table(summary, data, sdes, budgets, key) -> list[str]:
    by = {(s["data"], s["sde"], s["config"], s["budget"]): s for s in summary}
    names = list(configs(data, 2 if data == "mix2" else 16, max(budgets)))
    head = " | ".join(f"{k} @{b}" for k in sdes for b in budgets)
    lines = [f"### {data}: {key} to a true sample (mean ± 95% CI over seeds)", "",
             f"| config (steps at the largest budget) | {head} |",
             "|---|" + "---:|" * (len(sdes) * len(budgets))]
    floor = [by.get((data, k, "true", 0)) for k in sdes]
    lines.append("| true (floor) | " + " | ".join(_cell(c, key) for c in floor for _ in budgets)
                 + " |")
    for name in names:
        row = [by.get((data, k, name, b)) for k in sdes for b in budgets]
        steps = next((c["steps"] for c in row[::-1] if c), "?")
        lines.append(f"| {name} ({steps}) | " + " | ".join(_cell(c, key) for c in row) + " |")
    return lines + [""]


def _comparison_table(comps) -> list[str]:
    lines = ["| data | SDE | NFE | lml | vs | Δ SW2 | Δ MMD² | Δ seconds | verdict (SW2 / MMD²) |",
             "|---|---|---:|---|---|---:|---:|---:|---|"]
    for c in comps:
        lines.append(f"| {c['data']} | {c['sde']} | {c['budget']} | {c['a']} | {c['b']} | "
                     f"{_cell(c, 'sw2', '.3f')} | {_cell(c, 'mmd2', '.1e')} | "
                     f"{_cell(c, 'time_s', '.2f')} | {_verdict(c, 'sw2')} / "
                     f"{_verdict(c, 'mmd2')} |")
    return lines + [""]


def _sweep_table(summary, datas, sdes, budget, dampings) -> list[str]:
    by = {(s["data"], s["sde"], s["config"], s["budget"]): s for s in summary}
    cols = [(d, k) for d in datas for k in sdes]
    lines = [f"### Damping sweep: lml2 at {budget} NFE (steps {budget // 4}), SW2 / MMD²",
             "", "| damping | " + " | ".join(f"{d} {k}" for d, k in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    rows = [(f"{d:g}", f"lml2 damping {d:g}") for d in dampings] + [("L3 (plain, same NFE)", "L3")]
    for label, name in rows:
        cells = [by.get((d, k, name, budget)) for d, k in cols]
        lines.append(f"| {label} | " + " | ".join(
            f"{_cell(c, 'sw2', '.3f')} / {_cell(c, 'mmd2', '.1e')}" if c else "—" for c in cells)
            + " |")
    return lines + [""]


def _snr_table(summary, sdes, budget, snrs) -> list[str]:
    by = {(s["data"], s["sde"], s["config"], s["budget"]): s for s in summary}
    lines = [f"### aniso16, full rank at larger snr: {budget} NFE (steps {budget // 18}), "
             "SW2 / MMD²", "", "| snr | config | " + " | ".join(sdes) + " |",
             "|---|---|" + "---:|" * len(sdes)]
    for snr in [0.16, *snrs]:
        for base in ("lml16", "L17", "L1g16"):
            name = base if snr == 0.16 else f"{base} snr {snr:g}"
            cells = [by.get(("aniso16", k, name, budget)) for k in sdes]
            lines.append(f"| {snr:g} | {base} | " + " | ".join(
                f"{_cell(c, 'sw2', '.3f')} / {_cell(c, 'mmd2', '.1e')}" if c else "—"
                for c in cells) + " |")
    return lines + [""]


def _largest_gain(cs, summary, key) -> str:
    """The largest improvement of LML as a fraction of the other config's mean distance."""
    by = {(s["data"], s["sde"], s["config"], s["budget"]): s[key] for s in summary}
    gains = [(-c[key] / by[(c["data"], c["sde"], c["b"], c["budget"])], c) for c in cs
             if _verdict(c, key) == "better"]
    if not gains:
        return "none"
    g, c = max(gains, key=lambda x: x[0])
    return f"{100 * g:.1f}% ({c['a']} vs {c['b']}, {c['data']} {c['sde']} @{c['budget']})"


def _conclusion(comps, summary) -> list[str]:
    eq = [c for c in comps if c["b"].startswith("L") and not c["b"].startswith("L1g")
          and c["b"] != "L1"]
    steps = [c for c in comps if c["b"].startswith("L1g")]
    none = [c for c in comps if c["b"] == "none"]

    def count(cs, word):
        return sum(_verdict(c, "sw2") == word for c in cs), sum(
            _verdict(c, "mmd2") == word for c in cs)

    lines = ["## Conclusion (worded from the paired differences above)", ""]
    for label, cs in (("the plain Langevin corrector at equal NFE (L{k+1})", eq),
                      ("the plain Langevin corrector at equal steps (L1g{k}, fewer NFE)", steps),
                      ("no corrector at equal NFE (none)", none)):
        b, w = count(cs, "better"), count(cs, "worse")
        lines.append(f"- Against {label}: in {len(cs)} comparisons, LML is better in "
                     f"{b[0]} (SW2) / {b[1]} (MMD²), worse in {w[0]} / {w[1]}, and within "
                     f"the seed noise in the rest. Largest SW2 gain: "
                     f"{_largest_gain(cs, summary, 'sw2')}.")
    return lines + [""]


def write_report(out: Path, rows, summary, comps, costs, args, meta) -> None:
    lines = ["# The damped second-order Langevin corrector (pc_lml) on exact scores", "",
             f"Command: `{meta['command']}`  ", f"Commit: {meta['commit']}  ",
             f"Machine: {meta['machine']['summary']}  ",
             f"Wall-clock: {meta['wall_s']:.0f} s. Seeds: {args.seeds}, n = {args.n} samples, "
             f"NFE budgets {args.nfe} (+1 denoise). NFE counts a (1 + k)-row jet pass as "
             f"1 + k.", ""]
    for data in args.data:
        for key in ("sw2", "mmd2"):
            lines += _main_table(summary, data, args.sdes, args.nfe, key)
    lines += ["### Paired differences (lml minus the other config, same seed)", "",
              "Negative = LML better. L{k+1}: the same grid and NFE; L1g{k}: the same grid "
              "and common random numbers, fewer NFE; none, L1: the same NFE.", ""]
    lines += _comparison_table(comps)
    lines += _sweep_table(summary, args.data, args.sdes, max(args.nfe), args.damping)
    if "aniso16" in args.data and args.snr:
        lines += _snr_table(summary, args.sdes, max(args.nfe), args.snr)
    lines += ["### What a J v pass costs a network (batch n, no grad, median of 15)", "",
              "| network | k | forward ms | jet pass ms | forward-equivalents (measured) | "
              "counted |", "|---|---:|---:|---:|---:|---:|"]
    for c in costs:
        lines.append(f"| {c['net']} | {c['k']} | {c['forward_ms']:.2f} | {c['jet_ms']:.2f} | "
                     f"{c['forward_equivalents']:.2f} | {c['counted']} |")
    lines += [""] + _conclusion(comps, summary)
    (out / "lml_corrector.md").write_text("\n".join(lines))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", type=int, default=5, help="seeds per (data, SDE)")
    p.add_argument("--n", type=int, default=1000, help="samples per run")
    p.add_argument("--nfe", type=int, nargs="+", default=[40, 160],
                   help="NFE budgets (before the denoising step)")
    p.add_argument("--sdes", nargs="+", default=["ve", "vp"], choices=sorted(SDES),
                   help="forward SDEs")
    p.add_argument("--data", nargs="+", default=list(RANKS), choices=list(RANKS),
                   help="targets (exact scores)")
    p.add_argument("--damping", type=float, nargs="+", default=[0.1, 1.0, 10.0, 100.0],
                   help="the damping sweep of lml2 at the largest budget")
    p.add_argument("--snr", type=float, nargs="*", default=[0.32, 0.64],
                   help="aniso16: lml16, L17 and L1g16 at these snr (the default is 0.16)")
    p.add_argument("--projections", type=int, default=256, help="sliced-W2 directions")
    p.add_argument("--threads", type=int, default=1, help="torch threads (timings)")
    p.add_argument("--no-costs", action="store_true", help="skip the network pass costs")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    for name in ("seeds", "n", "projections", "threads"):
        if getattr(args, name) < (2 if name == "n" else 1):
            p.error(f"--{name} must be at least {2 if name == 'n' else 1}")
    if min(args.nfe) < 4:
        p.error("--nfe budgets must be at least 4")
    if min(args.damping) <= 0:
        p.error("--damping values must be positive")
    if args.snr and min(args.snr) <= 0:
        p.error("--snr values must be positive")

    return args


def main(argv=None) -> tuple[list[dict], list[dict]]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    meta = {"command": "python " + " ".join(shlex.quote(a) for a in
                                            ["experiments/lml_corrector.py", *argv]),
            "commit": git("rev-parse", "--short", "HEAD")
            + ("+dirty" if git("status", "--porcelain") not in ("", "unknown") else ""),
            "machine": machine()}
    rows = []
    gms = datasets()
    for data in args.data:
        for sde in args.sdes:
            for seed in range(args.seeds):
                rows += run_case(data, gms[data], sde, seed, args)
    summary = summarise(rows)
    comps = comparisons(rows, args)
    costs = [] if args.no_costs else pass_costs(args)
    meta["wall_s"] = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lml_corrector.json").write_text(json.dumps(
        {**meta, "args": vars(args), "summary": summary, "comparisons": comps,
         "pass_costs": costs, "runs": rows}, indent=1))
    write_report(out, rows, summary, comps, costs, args, meta)
    print(f"wrote {out}/lml_corrector.json and .md in {meta['wall_s']:.0f} s")
    return summary, comps


if __name__ == "__main__":
    main()
