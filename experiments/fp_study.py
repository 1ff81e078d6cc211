"""Issue 6: does the score-FPE regulariser help? Matched DSM vs DSM+FP runs (docs/MATH.md 4).

    python experiments/fp_study.py [--steps N --seeds K --out experiments/results] [--images]

2-D part (always): a Gaussian mixture with an exact density (8 components on a ring, the
docs/MATH.md 6 oracle) and the checkerboard toy set. For each seed, an MLP is pre-trained with plain
DSM (``--protocol finetune``, the paper's set-up of fine-tuning a DSM checkpoint; ``scratch``
skips it), then trained on for ``--steps`` steps once per regulariser weight alpha (beta = 0.01
when alpha > 0, alpha 0 = plain DSM) from the same checkpoint, on the same data and DSM noise
stream (separate generators for data, DSM noise and FP probes, so only the loss differs).
Each EMA model is evaluated on:

- FPE residual profile over t, both forms (div, laplacian), fused method, absolute E|r|^2 and
  relative E|r|^2 / E|d_t s|^2 (fpkern.diagnostics.residual_profile);
- NLL in nats/dim on held-out data by the probability-flow ODE with the exact divergence
  (fpkern.likelihood.log_likelihood, probes=None), against the exact -log q_0 (mixture) or the
  exact entropy of the uniform checkerboard density (log 32 / 2);
- conservativity E|Jv - J^T v|^2 / E|Jv|^2 averaged over t;
- ODE-SDE gap (sliced W2 between probability-flow ODE and reverse-SDE samples from the same x_T);
- sample quality: MMD^2 (RBF, bandwidth fixed per data set) and sliced W2 to true samples;
- wall-clock per training step (median, single thread).

Image part (``--images``, off by default: too slow for the 12-minute budget on 2 CPU cores):
the embedded 16x16 digits, the small/ddpmpp preset (VP), ``--image-pretrain-steps`` of DSM,
then DSM vs DSM+FP (alpha 0.15) for ``--image-steps`` steps each, bits/dim by the probability-flow ODE
(one Hutchinson probe, fixed) and the relative residual. A short run: its numbers are labelled so.

Outputs in --out: fp_study.json (every number, the command, git commit, machine),
fp_study.md (tables and an automatically worded comparison), fp_study.png (figure).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fpkern.data.images import load_image_dataset
from fpkern.data.mixture import GaussianMixture
from fpkern.data.toy2d import EIGHT_GAUSSIANS_CENTRES, EIGHT_GAUSSIANS_STD, TOY_SETS
from fpkern.diagnostics import (conservativity_profile, mmd, ode_sde_gap, residual_profile,
                                sliced_wasserstein)
from fpkern.likelihood import bits_per_dim, log_likelihood
from fpkern.losses import DSMLoss, FPLoss
from fpkern.models import MLP, ScoreFn
from fpkern.models.presets import from_preset, get_config, sde_from_config
from fpkern.sde import get_sde
from provenance import git, machine   # experiments/provenance.py

log = logging.getLogger("fp_study")

DATASETS = ("mixture", "checkerboard")
#: Exact -log q_0 of the checkerboard: uniform on 8 cells of 2x2 (area 32), toy2d docstring.
CHECKERBOARD_NLL = math.log(32.0)
RESIDUAL_TIMES = (1e-3, 0.01, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0)
IMAGE_TIMES = (0.01, 0.1, 0.5, 1.0)
FORMS = ("div", "laplacian")


# ---- data ----------------------------------------------------------------------------------
def ring_mixture() -> GaussianMixture:
    """8 equal isotropic Gaussians on a ring (the 8gaussians geometry), float64."""
    return GaussianMixture(torch.ones(8, dtype=torch.float64),
                           EIGHT_GAUSSIANS_CENTRES.double(), EIGHT_GAUSSIANS_STD)


def make_sampler(name: str):
    """sample(n, generator) -> float32 [n, 2]."""
    if name == "mixture":
        gm = ring_mixture()
        return lambda n, g: gm.sample(n, generator=g).float()
    return lambda n, g: TOY_SETS[name](n, generator=g).float()


def exact_nll(name: str, x: torch.Tensor) -> float:
    """Mean exact -log q_0(x) in nats per dimension."""
    if name == "mixture":
        return float(-ring_mixture().log_prob(x.double()).mean() / x.shape[1])
    return CHECKERBOARD_NLL / x.shape[1]


# ---- training ------------------------------------------------------------------------------
def train(score_fn: ScoreFn, sde, sample_batch, *, alpha: float, beta: float, steps: int,
          lr: float, fp_batch: int | None, ema_decay: float, seed: int, desc: str,
          ema: ScoreFn | None = None, phase: int = 0):
    """Adam on mean(DSM) + alpha L_vec + beta L_scalar; returns (EMA score_fn, ms/step, last loss).

    Separate generators for data, DSM noise and FP probes keep runs with different alpha on
    the same data and noise stream. ema: continue this EMA copy (fine-tuning; full decay from
    the first step) instead of starting one; phase: offsets the generator seeds.
    """
    net = score_fn.net
    warm = ema is None
    ema = copy.deepcopy(score_fn).requires_grad_(False) if warm else ema
    g_data, g_dsm, g_fp = (torch.Generator().manual_seed(seed * 1000 + 10 * phase + k)
                           for k in (1, 2, 3))
    dsm = DSMLoss(sde)
    fp = (FPLoss(sde, alpha=alpha, beta=beta, method="fused", form="div", batch=fp_batch)
          if alpha > 0 or beta > 0 else None)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    times, loss = [], float("nan")
    for step in tqdm(range(steps), desc=desc, leave=False, mininterval=2.0):
        t0 = time.perf_counter()
        x = sample_batch(g_data)
        d = dsm(score_fn, x, generator=g_dsm)
        total = d.loss.mean()
        if fp is not None:
            total = total + fp(score_fn, x, dsm=d, generator=g_fp).loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step)) if warm else ema_decay
            for pe, p in zip(ema.net.parameters(), net.parameters()):
                pe.lerp_(p, 1 - decay)
        times.append(time.perf_counter() - t0)
        loss = float(total.detach())
        if not math.isfinite(loss):
            raise FloatingPointError(f"{desc}: non-finite loss at step {step}")
    steady = sorted(times[min(10, len(times) - 1):])
    return ema.eval(), 1e3 * steady[len(steady) // 2], loss


# ---- evaluation (2-D) ----------------------------------------------------------------------
def evaluate_2d(score_fn, sde, name: str, ev: dict, args) -> dict:
    """Every metric of one trained 2-D model; ev holds the fixed held-out sets."""
    g = lambda k: torch.Generator().manual_seed(args.eval_seed + k)  # noqa: E731
    prof = residual_profile(score_fn, sde, ev["x_prof"], RESIDUAL_TIMES, forms=FORMS,
                            method="fused", probes=args.eval_probes, generator=g(1))
    cons = conservativity_profile(score_fn, sde, ev["x_prof"], RESIDUAL_TIMES, generator=g(2))
    ll = log_likelihood(score_fn, sde, ev["x_nll"], probes=None, rtol=args.ode_tol,
                        atol=args.ode_tol)
    with torch.no_grad():
        gap = ode_sde_gap(score_fn, sde, args.n_samples, steps=args.sde_steps, generator=g(3),
                          dtype=torch.float32, rtol=args.ode_tol, atol=args.ode_tol)
    ref, bw = ev["x_ref"], ev["bandwidth"]
    out = {
        "residual_abs": {f: prof.abs[f].tolist() for f in FORMS},
        "residual_rel": {f: prof.rel[f].tolist() for f in FORMS},
        "residual_rel_mean": {f: float(prof.rel[f].mean()) for f in FORMS},
        "conservativity": cons.tolist(),
        "conservativity_mean": float(cons.mean()),
        "nll": float(-ll.logp.mean() / 2),
        "nll_exact": ev["nll_exact"],
        "nfe_nll": ll.nfe,
        "ode_sde_gap": gap.distance,
        "mmd_sde": mmd(gap.sde_samples, ref, bandwidth=bw),
        "mmd_ode": mmd(gap.ode_samples, ref, bandwidth=bw),
        "sw_sde": sliced_wasserstein(gap.sde_samples, ref, generator=g(4)),
        "sw_ode": sliced_wasserstein(gap.ode_samples, ref, generator=g(4)),
    }
    out["nll_excess"] = out["nll"] - out["nll_exact"]
    return out


def eval_sets(name: str, sampler, args) -> dict:
    g = torch.Generator().manual_seed(args.eval_seed)
    x_nll, x_prof, x_ref = sampler(args.n_nll, g), sampler(args.n_prof, g), sampler(args.n_samples, g)
    z = torch.cat([x_ref[:500], sampler(500, g)])
    d2 = torch.cdist(z.double(), z.double()).pow(2)
    bw = float(d2[torch.triu(torch.ones_like(d2, dtype=torch.bool), 1)].median().sqrt())
    return {"x_nll": x_nll, "x_prof": x_prof, "x_ref": x_ref, "bandwidth": bw,
            "nll_exact": exact_nll(name, x_nll)}


def oracle_2d(sde, ev: dict, args) -> dict:
    """The true mixture score through the same pipeline: the floor of each metric."""
    gm = ring_mixture()
    sf = lambda x, t: gm.score(x.double(), t.double(), sde).to(x.dtype)  # noqa: E731
    prof = residual_profile(sf, sde, ev["x_prof"].double(), RESIDUAL_TIMES, forms=FORMS,
                            method="exact")
    ll = log_likelihood(sf, sde, ev["x_nll"], probes=None, rtol=args.ode_tol, atol=args.ode_tol)
    return {"residual_rel_mean": {f: float(prof.rel[f].mean()) for f in FORMS},
            "nll_true_score_ode": float(-ll.logp.mean() / 2), "nll_exact": ev["nll_exact"]}


def run_2d(args, results: dict) -> None:
    sde = get_sde(args.sde)
    for name in args.datasets:
        sampler = make_sampler(name)
        ev = eval_sets(name, sampler, args)
        block = {"nll_exact": ev["nll_exact"], "mmd_bandwidth": ev["bandwidth"], "runs": []}
        if name == "mixture" and args.sde == "vp":
            block["oracle"] = oracle_2d(sde, ev, args)
        batch = lambda g: sampler(args.batch, g)  # noqa: E731
        kw = dict(lr=args.lr, fp_batch=args.fp_batch, ema_decay=args.ema)
        for seed in range(args.seeds):
            torch.manual_seed(seed)                          # same init for every alpha
            base = ScoreFn(MLP(2, args.width, args.depth), sde)
            base_ema = None
            if args.protocol == "finetune":                  # shared DSM pre-training
                base_ema, _, _ = train(base, sde, batch, alpha=0.0, beta=0.0,
                                       steps=args.pretrain_steps, seed=seed,
                                       desc=f"{name} seed={seed} DSM pre-training", **kw)
            for alpha in args.alphas:
                beta = args.beta if alpha > 0 else 0.0
                sf = copy.deepcopy(base).train()
                t0 = time.perf_counter()
                ema, ms, loss = train(
                    sf, sde, batch, alpha=alpha, beta=beta, steps=args.steps, seed=seed,
                    desc=f"{name} seed={seed} alpha={alpha}", phase=1,
                    ema=None if base_ema is None else copy.deepcopy(base_ema), **kw)
                t_train = time.perf_counter() - t0
                metrics = evaluate_2d(ema, sde, name, ev, args)
                run = {"seed": seed, "alpha": alpha, "beta": beta, "ms_per_step": ms,
                       "final_loss": loss, "train_s": t_train,
                       "eval_s": time.perf_counter() - t0 - t_train, **metrics}
                block["runs"].append(run)
                log.info("%s seed=%d alpha=%.3g: %.1f ms/step, rel res div %.3g lap %.3g, "
                         "NLL %.4f (exact %.4f), MMD %.2e, gap %.3g", name, seed, alpha, ms,
                         run["residual_rel_mean"]["div"], run["residual_rel_mean"]["laplacian"],
                         run["nll"], run["nll_exact"], run["mmd_sde"], run["ode_sde_gap"])
        block["summary"] = summarize(block["runs"], args.alphas)
        results["datasets"][name] = block


# ---- images (optional) ---------------------------------------------------------------------
def run_images(args, results: dict) -> None:
    cfg = get_config(args.image_preset)
    sde = sde_from_config(cfg)
    images = load_image_dataset("digits").images
    train_set, held = images[:-64], images[-64:]

    def batch(g):
        idx = torch.randint(0, train_set.shape[0], (args.image_batch,), generator=g)
        u = torch.rand(train_set[idx].shape, generator=g)
        return (train_set[idx].float() + u) / 256 * 2 - 1        # dequantised, [-1, 1]

    x_prof = held[:4].float() / 255 * 2 - 1
    out = {"preset": args.image_preset, "steps": args.image_steps,
           "pretrain_steps": args.image_pretrain_steps if args.protocol == "finetune" else 0, "batch": args.image_batch,
           "fp_batch": args.image_fp_batch, "n_bpd": args.image_n_bpd, "short_run": True,
           "runs": []}
    torch.manual_seed(0)
    base = ScoreFn(from_preset(args.image_preset), sde)
    kw = dict(lr=args.image_lr, fp_batch=args.image_fp_batch, ema_decay=0.0, seed=0)
    if args.protocol == "finetune":
        train(base, sde, batch, alpha=0.0, beta=0.0, steps=args.image_pretrain_steps,
              desc="digits DSM pre-training", **kw)
    for alpha in args.image_alphas:
        beta = args.beta if alpha > 0 else 0.0
        sf = copy.deepcopy(base).train()
        t0 = time.perf_counter()
        model, ms, loss = train(sf, sde, batch, alpha=alpha, beta=beta, steps=args.image_steps,
                                phase=1, desc=f"digits alpha={alpha}", **kw)
        t_train = time.perf_counter() - t0
        prof = residual_profile(model, sde, x_prof, IMAGE_TIMES, forms=FORMS, method="fused",
                                probes=1, generator=torch.Generator().manual_seed(7))
        bpd = bits_per_dim(model, sde, held[:args.image_n_bpd], probes=1, rtol=1e-3, atol=1e-3,
                           generator=torch.Generator().manual_seed(8))
        run = {"alpha": alpha, "beta": beta, "ms_per_step": ms, "final_loss": loss,
               "train_s": t_train, "bpd": float(bpd.bpd.mean()), "nfe_bpd": bpd.likelihood.nfe,
               "residual_rel": {f: prof.rel[f].tolist() for f in FORMS},
               "residual_rel_mean": {f: float(prof.rel[f].mean()) for f in FORMS}}
        out["runs"].append(run)
        log.info("digits alpha=%.3g: %.0f ms/step, bpd %.3f, rel res div %.3g", alpha, ms,
                 run["bpd"], run["residual_rel_mean"]["div"])
    results["images"] = out


# ---- aggregation and reports ---------------------------------------------------------------
def _geomean(v) -> float:
    return float(torch.tensor(v, dtype=torch.float64).clamp_min(1e-300).log().mean().exp())


METRICS = {  # key: (label, getter)
    "abs_div": ("E|r|^2 div (geo-mean over t)", lambda r: _geomean(r["residual_abs"]["div"])),
    "abs_lap": ("E|r|^2 lap (geo-mean over t)", lambda r: _geomean(r["residual_abs"]["laplacian"])),
    "res_div": ("rel. residual (div)", lambda r: r["residual_rel_mean"]["div"]),
    "res_lap": ("rel. residual (lap)", lambda r: r["residual_rel_mean"]["laplacian"]),
    "nll": ("NLL nats/dim", lambda r: r["nll"]),
    "nll_excess": ("NLL - exact", lambda r: r["nll_excess"]),
    "cons": ("non-conservativity", lambda r: r["conservativity_mean"]),
    "gap": ("ODE-SDE gap (SW2)", lambda r: r["ode_sde_gap"]),
    "mmd_sde": ("MMD^2 SDE", lambda r: r["mmd_sde"]),
    "mmd_ode": ("MMD^2 ODE", lambda r: r["mmd_ode"]),
    "sw_sde": ("SW2 SDE", lambda r: r["sw_sde"]),
    "sw_ode": ("SW2 ODE", lambda r: r["sw_ode"]),
    "ms": ("ms/step", lambda r: r["ms_per_step"]),
}


def _stats(vals: list[float]) -> dict:
    t = torch.tensor(vals, dtype=torch.float64)
    sd = float(t.std()) if len(vals) > 1 else 0.0
    return {"mean": float(t.mean()), "sd": sd, "values": vals}


def summarize(runs: list[dict], alphas) -> dict:
    out = {}
    for a in alphas:
        rs = [r for r in runs if r["alpha"] == a]
        s = {k: _stats([get(r) for r in rs]) for k, (_, get) in METRICS.items()}
        for f in FORMS:   # per-t mean relative residual, for the figure
            per_t = torch.tensor([r["residual_rel"][f] for r in rs], dtype=torch.float64)
            s[f"profile_{f}"] = per_t.mean(0).tolist()
            per_t = torch.tensor([r["residual_abs"][f] for r in rs], dtype=torch.float64)
            s[f"profile_abs_{f}"] = per_t.mean(0).tolist()
        out[str(a)] = s
    return out


def _fmt(s: dict) -> str:
    m, sd = s["mean"], s["sd"]
    return f"{m:.3g} ± {sd:.2g}" if sd > 0 else f"{m:.3g}"


def _verdict(base: dict, new: dict) -> str:
    d = new["mean"] - base["mean"]
    if len(base["values"]) < 2:
        return ("lower" if d < 0 else "higher") + ", one seed: no spread to judge by"
    if abs(d) <= base["sd"] + new["sd"]:
        return "within the seed spread"
    return "lower" if d < 0 else "higher"


def write_markdown(results: dict, path: Path) -> None:
    a = results["config"]
    L = ["# FP regulariser study (issue 6)", "",
         f"Command: `{results['command']}`  ",
         f"Commit: `{results['git_commit']}`{' (dirty tree)' if results['git_dirty'] else ''}; "
         f"machine: {results['machine']['summary']}; total {results['total_s']:.0f} s.", "",
         f"2-D setup: MLP(2, {a['width']}, {a['depth']}), {a['sde'].upper()} SDE, "
         + (f"{a['pretrain_steps']} shared DSM pre-training steps, then {a['steps']} fine-tuning "
            "steps per alpha (alpha 0: the same steps of plain DSM)"
            if a['protocol'] == "finetune" else f"{a['steps']} steps from scratch per alpha")
         + f" (Adam lr {a['lr']}, clip 1, EMA {a['ema']}), batch {a['batch']}, FP on the "
         f"first {a['fp_batch']} samples of each batch (fused, div form, 1 Rademacher probe), "
         f"beta = {a['beta']} when alpha > 0; seeds {a['seeds']} (mean ± sd over seeds). "
         f"Same initial weights, data and DSM noise for every alpha of a seed.", "",
         "Metrics: E|r|^2 = absolute residual, geometric mean over the t grid (it spans ~7 "
         "decades from t = 1e-3 to 1); rel. residual = E|r|^2 / E|d_t s|^2 averaged over t in "
         f"{list(RESIDUAL_TIMES)} (fused, {a['eval_probes']} probes; 0 for the true score); "
         f"NLL by the probability-flow ODE with the exact divergence on {a['n_nll']} held-out "
         f"points (rtol = atol = {a['ode_tol']}); non-conservativity E|Jv-J^Tv|^2/E|Jv|^2 "
         f"averaged over t; ODE-SDE gap and sample metrics with {a['n_samples']} samples "
         f"(reverse SDE: {a['sde_steps']} Euler-Maruyama steps; MMD^2 RBF with a fixed "
         "bandwidth per data set). Lower is better everywhere.", ""]
    for name, block in results["datasets"].items():
        L += [f"## {name}", "",
              f"Exact NLL reference: {block['nll_exact']:.4f} nats/dim "
              + ("(-log q_0 of the held-out points)." if name == "mixture" else
                 "(entropy of the uniform checkerboard, log(32)/2; a model's NLL is a "
                 "cross-entropy and cannot go below it in expectation).")]
        if "oracle" in block:
            o = block["oracle"]
            L += [f"True score through the same ODE: NLL {o['nll_true_score_ode']:.4f}; "
                  f"its rel. residual (exact method) div {o['residual_rel_mean']['div']:.2g}, "
                  f"lap {o['residual_rel_mean']['laplacian']:.2g}."]
        L += ["", "| alpha | " + " | ".join(lbl for lbl, _ in METRICS.values()) + " |",
              "|---" * (len(METRICS) + 1) + "|"]
        for al, s in block["summary"].items():
            L.append(f"| {al} | " + " | ".join(_fmt(s[k]) for k in METRICS) + " |")
        L.append("")
        base = block["summary"].get("0.0") or block["summary"].get("0")
        if base is not None:
            L.append(f"FP vs plain DSM (alpha 0) on {name}:")
            for al, s in block["summary"].items():
                if float(al) == 0:
                    continue
                parts = [f"{lbl} {base[k]['mean']:.3g} -> {s[k]['mean']:.3g} "
                         f"({_verdict(base[k], s[k])})" for k, (lbl, _) in METRICS.items()
                         if k not in ("mmd_ode", "sw_ode")]
                L.append(f"- alpha {al}: " + "; ".join(parts) + ".")
            L.append("")
    if "images" in results:
        im = results["images"]
        L += ["## digits 16x16 (SHORT RUN)", "",
              f"**Short run: {im['pretrain_steps']} DSM pre-training + {im['steps']} steps per "
              f"alpha only** ({im['preset']}, batch {im['batch']}, FP on "
              f"{im['fp_batch']} samples, no EMA, one seed); bits/dim on {im['n_bpd']} held-out "
              "images (one fixed Hutchinson probe, rtol 1e-3). These models are far from trained: "
              "the numbers test the pipeline and the cost, not the method.", "",
              "| alpha | bpd | rel. residual (div) | rel. residual (lap) | ms/step |",
              "|---|---|---|---|---|"]
        for r in im["runs"]:
            L.append(f"| {r['alpha']} | {r['bpd']:.3f} | {r['residual_rel_mean']['div']:.3g} | "
                     f"{r['residual_rel_mean']['laplacian']:.3g} | {r['ms_per_step']:.0f} |")
        L.append("")
    L += ["## Conclusion", "", results.get("conclusion", ""), ""]
    path.write_text("\n".join(L))


def conclusion(results: dict) -> str:
    """A plain-words summary computed from the numbers (so a re-run rewrites it honestly)."""
    out = []
    for name, block in results["datasets"].items():
        summ = block["summary"]
        keys = [k for k in summ if float(k) > 0]
        if "0.0" not in summ or not keys:
            continue
        base = summ["0.0"]
        best = lambda k: min(keys, key=lambda al: summ[al][k]["mean"])  # noqa: E731
        for k, what in (("abs_div", "absolute FPE residual (div, geo-mean over t)"),
                        ("res_div", "relative FPE residual (div)"), ("nll", "NLL"),
                        ("mmd_sde", "MMD^2 (SDE samples)"), ("gap", "ODE-SDE gap"),
                        ("cons", "non-conservativity")):
            al = best(k)
            v = _verdict(base[k], summ[al][k])
            out.append(f"{name}: best {what} with FP at alpha {al}: {summ[al][k]['mean']:.3g} vs "
                       f"DSM {base[k]['mean']:.3g} ({v}).")
        cost = max(summ[al]["ms"]["mean"] for al in keys) / base["ms"]["mean"]
        out.append(f"{name}: an FP step costs up to {cost:.1f}x a DSM step.")
    return " ".join(out)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["datasets"])
    fig, axes = plt.subplots(len(names), 4, figsize=(18, 3.8 * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        block = results["datasets"][name]
        summ = block["summary"]
        alphas = [float(a) for a in summ]
        for i, (al, s) in enumerate(summ.items()):
            c = f"C{i}"
            lbl = "DSM" if float(al) == 0 else f"FP a={al}"
            for ax, key in ((row[0], "profile_abs_"), (row[1], "profile_")):
                ax.plot(RESIDUAL_TIMES, s[key + "div"], "-o", ms=3, color=c, label=f"{lbl} div")
                ax.plot(RESIDUAL_TIMES, s[key + "laplacian"], "--", color=c, label=f"{lbl} lap")
        row[0].set(xscale="log", yscale="log", xlabel="t", ylabel="E|r|^2",
                   title=f"{name}: absolute FPE residual")
        row[1].set(xscale="log", yscale="log", xlabel="t", ylabel="E|r|^2 / E|d_t s|^2",
                   title=f"{name}: relative FPE residual")
        row[0].legend(fontsize=6, ncol=2)
        for ax, keys, ylabel in ((row[2], ("nll",), "NLL (nats/dim)"),
                                 (row[3], ("mmd_sde", "mmd_ode"), "MMD^2 to true samples")):
            for k in keys:
                m = [summ[a][k]["mean"] for a in summ]
                e = [summ[a][k]["sd"] for a in summ]
                ax.errorbar(alphas, m, yerr=e, marker="o", capsize=3, label=k)
            if keys == ("nll",):
                ax.axhline(block["nll_exact"], color="k", ls=":", label="exact")
            ax.set(xscale="symlog", xlabel="alpha (symlog, 0 = DSM)", ylabel=ylabel,
                   title=f"{name}: {ylabel} vs alpha")
            ax.set_xscale("symlog", linthresh=0.05)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- CLI -----------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--protocol", choices=("finetune", "scratch"), default="finetune",
                   help="finetune: shared DSM pre-training, then --steps per alpha (the paper's "
                        "set-up); scratch: --steps per alpha from the initial weights")
    p.add_argument("--pretrain-steps", type=int, default=600, help="DSM steps before fine-tuning")
    p.add_argument("--steps", type=int, default=400, help="training (fine-tuning) steps per 2-D model")
    p.add_argument("--seeds", type=int, default=2, help="seeds per configuration")
    p.add_argument("--out", type=Path, default=Path("experiments/results"), help="output folder")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.01, 0.05, 0.15, 0.5],
                   help="FP vector-term weights (0 = plain DSM)")
    p.add_argument("--beta", type=float, default=0.01, help="FP scalar-term weight when alpha > 0")
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    p.add_argument("--sde", choices=("vp", "subvp", "ve"), default="vp")
    p.add_argument("--width", type=int, default=128, help="MLP width")
    p.add_argument("--depth", type=int, default=3, help="MLP depth")
    p.add_argument("--batch", type=int, default=256, help="training batch")
    p.add_argument("--fp-batch", type=int, default=64, help="samples of each batch the FP term uses")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    p.add_argument("--ema", type=float, default=0.995, help="EMA decay of the evaluated weights")
    p.add_argument("--n-nll", type=int, default=256, help="held-out points for the NLL")
    p.add_argument("--n-prof", type=int, default=256, help="points for residual profiles")
    p.add_argument("--n-samples", type=int, default=1000, help="samples for MMD/SW/ODE-SDE gap")
    p.add_argument("--sde-steps", type=int, default=250, help="reverse-SDE steps for sampling")
    p.add_argument("--eval-probes", type=int, default=8, help="probes of the evaluated residual")
    p.add_argument("--ode-tol", type=float, default=1e-4, help="RK45 rtol = atol (NLL, ODE samples)")
    p.add_argument("--eval-seed", type=int, default=12345, help="seed of the held-out sets")
    p.add_argument("--images", action="store_true", help="also run the (short) digits part")
    p.add_argument("--image-preset", choices=("small/ddpmpp", "small/ncsnpp"), default="small/ddpmpp")
    p.add_argument("--image-pretrain-steps", type=int, default=40, help="DSM steps before fine-tuning")
    p.add_argument("--image-steps", type=int, default=20, help="(fine-tuning) steps per image model")
    p.add_argument("--image-alphas", type=float, nargs="+", default=[0.0, 0.15])
    p.add_argument("--image-batch", type=int, default=32)
    p.add_argument("--image-fp-batch", type=int, default=4)
    p.add_argument("--image-lr", type=float, default=1e-3)
    p.add_argument("--image-n-bpd", type=int, default=8, help="held-out images for bits/dim")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a loaded 2-core machine 2 threads run ~10x slower)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.seeds < 1:
        p.error("--steps and --seeds must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    cmd = "python experiments/fp_study.py" + ("" if argv is None and len(sys.argv) <= 1 else
                                               " " + shlex.join(sys.argv[1:] if argv is None else argv))
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results = {"command": cmd, "config": config, "git_commit": git("rev-parse", "HEAD"),
               "git_dirty": bool(git("status", "--porcelain")), "machine": machine(),
               "datasets": {}}
    t0 = time.perf_counter()
    run_2d(args, results)
    if args.images:
        run_images(args, results)
    results["total_s"] = time.perf_counter() - t0
    results["conclusion"] = conclusion(results)
    (args.out / "fp_study.json").write_text(json.dumps(results, indent=1))
    write_markdown(results, args.out / "fp_study.md")
    plot(results, args.out / "fp_study.png")
    log.info("done in %.0f s; wrote %s", results["total_s"], args.out)
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    main()
