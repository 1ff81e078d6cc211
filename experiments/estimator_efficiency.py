"""Issue 4: which FP term gives the most gradient per unit of compute?

    python experiments/estimator_efficiency.py [--draws 48 --image-draws 24 --out DIR]

A network is first trained with plain DSM by fpkern's own training loop (the MLP on the
checkerboard, the small NCSN++ on the embedded digits; ``--mlp-steps``, ``--image-steps``),
so that the FP terms are measured on a network that fits its data. Then, at one fixed set
of points (x_t, t), as the training loop draws them, each FP estimator's loss and parameter
gradient are drawn ``--draws`` times. Only the estimator's own random numbers change between
draws: the Hutchinson probes V, and for the projected estimator one direction u per sample.

For each estimator this gives
- the loss's mean and standard error. div/vector and div/projected estimate the same
  quantity, E_V w |r_V|^2 (E_u (u . r)^2 = |r|^2): their means must agree, and the script
  checks that they do within 3 standard errors;
- the relative gradient variance v = E|g - E g|^2 / |E g|^2 (unbiased over the draws);
- the time per draw of the FP term: its loss and gradient at the DSM forward's points, not
  counting that forward, which a training step runs anyway (median);
- v x time, the cost of one unit of relative gradient variance: bringing the gradient's
  noise down to a level e takes v / e draws, so (v x time) / e seconds. Lower is better;
- the estimator's noise against the DSM term's own: tr Cov(alpha g_FP) over the probe
  draws, divided by tr Cov(g_DSM) over fresh (t, z) draws on the same clean batch, alpha
  being the paper's 0.15. Far below 1, the estimator's noise hardly shows in a step.

The laplacian form penalises a different residual (the conservative form, docs/MATH.md 2); its
row is there for its cost and variance, not for an equal comparison.

Outputs in --out: estimator_efficiency.json (every number, the command, git commit,
machine), estimator_efficiency.md (the tables) and estimator_efficiency.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fpkern.data.images import load_image_dataset
from fpkern.data.toy2d import sample_toy
from fpkern.data.transforms import prepare_images
from fpkern.losses import DSMLoss, FPLoss
from fpkern.models import get_config
from fpkern.train import training_loop
from provenance import git, machine   # experiments/provenance.py

log = logging.getLogger("estimator_efficiency")

ALPHA = 0.15                     # the paper's weight of L_vec, for the noise comparison
ESTIMATORS = (                   # (name, form, estimator, probes)
    ("div/vector K=1", "div", "vector", 1),
    ("div/projected K=1", "div", "projected", 1),
    ("div/vector K=4", "div", "vector", 4),
    ("laplacian/vector K=1", "laplacian", "vector", 1),
)
SAME_QUANTITY = ("div/vector K=1", "div/projected K=1")


# ---- the network and the points ------------------------------------------------------------
def pretrained(arch: str, steps: int, seed: int, workdir: Path):
    """(score_fn of the trained network, sde): fpkern's training loop, DSM only."""
    res = training_loop(workdir=workdir, arch=arch, steps=steps, alpha=0.0, beta=0.0,
                        seed=seed, progress=False, ckpt_every=max(steps, 1), sample_every=0,
                        eval_every=0, num_samples=4, sample_steps=10, deterministic=False,
                        log_every=max(steps, 1), tensorboard=False)
    score_fn = res.score_fn.train(False)
    score_fn.requires_grad_(True)            # the EMA copy is frozen; its gradient is measured
    return score_fn, res.sde


def clean_batch(arch: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if arch == "mlp":
        return sample_toy("checkerboard", n, generator=g).float()
    images, _ = load_image_dataset("digits")
    idx = torch.randperm(images.shape[0], generator=g)[:n]
    centered = bool(get_config("small/ncsnpp")["data"]["centered"])   # the trainer's preset
    return prepare_images(images[idx], centered=centered)


# ---- draws ---------------------------------------------------------------------------------
def _flat_grad(loss: torch.Tensor, params) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten()
                      for g, p in zip(grads, params)])


def _stats(grads: list[torch.Tensor], losses: list[float], times: list[float]) -> dict:
    G = torch.stack(grads).double()
    n = G.shape[0]
    mean = G.mean(0)
    tr_cov = float((G - mean).pow(2).sum(1).sum() / (n - 1))
    losses_t = torch.tensor(losses, dtype=torch.float64)
    ms = sorted(times)[len(times) // 2] * 1e3
    mean_sq = float(mean.pow(2).sum())
    rel = tr_cov / mean_sq
    return {"draws": n, "loss_mean": float(losses_t.mean()),
            "loss_se": float(losses_t.std() / math.sqrt(n)), "grad_tr_cov": tr_cov,
            "grad_mean_sq": mean_sq, "rel_var": rel, "ms": ms, "cost": rel * ms / 1e3}


def _draws(one, draws: int, desc: str) -> dict:
    """_stats of `draws` calls of one() -> (loss, flat gradient, seconds), after one more
    call that warms up (allocations, kernel caches): timed, not counted."""
    grads, losses, times = [], [], []
    for _ in tqdm(range(draws + 1), desc=desc, leave=False, mininterval=2.0):
        loss, grad, seconds = one()
        grads.append(grad)
        losses.append(float(loss.detach()))
        times.append(seconds)
    return _stats(grads[1:], losses[1:], times[1:])


def draw_fp(score_fn, sde, x, *, form, estimator, probes, draws, point_seed, desc) -> dict:
    """The FP estimator's loss and gradient, `draws` times, at the same points."""
    params = [p for p in score_fn.parameters() if p.requires_grad]
    dsm = DSMLoss(sde)
    fp = FPLoss(sde, alpha=1.0, beta=0.0, form=form, estimator=estimator, probes=probes)
    g_probes = torch.Generator().manual_seed(point_seed + 1)

    def one():
        g_points = torch.Generator().manual_seed(point_seed)
        d = dsm(score_fn, x, generator=g_points)      # the points, and s for the laplacian
        t0 = time.perf_counter()                      # (whose gradient runs through d's graph)
        loss = fp(score_fn, x, dsm=d, generator=g_probes).loss
        grad = _flat_grad(loss, params)
        return loss, grad, time.perf_counter() - t0
    return _draws(one, draws, desc)


def draw_dsm(score_fn, sde, x, *, draws, seed, desc) -> dict:
    """The DSM term's gradient over fresh (t, z) on the same clean batch."""
    params = [p for p in score_fn.parameters() if p.requires_grad]
    dsm = DSMLoss(sde)
    g = torch.Generator().manual_seed(seed)

    def one():
        t0 = time.perf_counter()
        loss = dsm(score_fn, x, generator=g).loss.mean()
        grad = _flat_grad(loss, params)
        return loss, grad, time.perf_counter() - t0
    return _draws(one, draws, desc)


def run_case(name: str, arch: str, args) -> dict:
    steps = args.mlp_steps if arch == "mlp" else args.image_steps
    draws = args.draws if arch == "mlp" else args.image_draws
    fp_batch = args.mlp_fp_batch if arch == "mlp" else args.image_fp_batch
    dsm_batch = args.mlp_batch if arch == "mlp" else args.image_batch
    with tempfile.TemporaryDirectory() as tmp:
        score_fn, sde = pretrained(arch, steps, args.seed, Path(tmp))
    x_all = clean_batch(arch, dsm_batch, args.seed + 1)
    x = x_all[:fp_batch]
    case = {"arch": arch, "pretrain_steps": steps, "fp_batch": fp_batch, "dsm_batch": dsm_batch,
            "sde": type(sde).__name__, "estimators": {}}
    for est, form, estimator, probes in ESTIMATORS:
        st = draw_fp(score_fn, sde, x, form=form, estimator=estimator, probes=probes,
                     draws=draws, point_seed=args.seed + 2, desc=f"{name} {est}")
        case["estimators"][est] = st
        log.info("%s %s: loss %.4g +- %.2g, rel var %.3g, %.1f ms, cost %.3g", name, est,
                 st["loss_mean"], st["loss_se"], st["rel_var"], st["ms"], st["cost"])
    case["dsm"] = draw_dsm(score_fn, sde, x_all, draws=draws, seed=args.seed + 3,
                           desc=f"{name} DSM")
    for st in case["estimators"].values():
        st["noise_vs_dsm"] = ALPHA ** 2 * st["grad_tr_cov"] / case["dsm"]["grad_tr_cov"]
    a, b = (case["estimators"][k] for k in SAME_QUANTITY)
    z = abs(a["loss_mean"] - b["loss_mean"]) / math.hypot(a["loss_se"], b["loss_se"])
    case["same_quantity"] = {"pair": list(SAME_QUANTITY), "z": z, "consistent": z <= 3.0}
    return case


# ---- report --------------------------------------------------------------------------------
def write_markdown(results: dict, path: Path) -> None:
    lines = ["# Which FP term gives the most gradient per unit of compute?", "",
             f"Command: `{results['command']}`  ",
             f"Commit: {results['commit']}"
             f"{' (with uncommitted changes)' if results['git_dirty'] else ''}  ",
             f"Machine: {results['machine']['summary']}", "",
             "Per estimator, at fixed points: the relative variance v of the FP loss's parameter "
             "gradient over its own random draws (probes; and u for projected), the time per "
             "draw of the FP term, and v x time (lower is better: the seconds a unit of "
             "relative variance costs). 'noise / DSM' = tr Cov(0.15 g_FP) / tr Cov(g_DSM), "
             "the DSM term's over fresh (t, z) on the same clean batch. The laplacian form "
             "penalises a different residual.", ""]
    for name, case in results["cases"].items():
        same = case["same_quantity"]
        lines += [f"## {name}: {case['arch']}, {case['sde']}, {case['pretrain_steps']} DSM "
                  f"steps of pre-training, FP on {case['fp_batch']} samples, "
                  f"{case['estimators'][SAME_QUANTITY[0]]['draws']} draws", "",
                  "| estimator | loss (mean +- se) | v (rel. grad variance) | ms / draw "
                  "| v x time (s) | noise / DSM |", "|---|---|---|---|---|---|"]
        for est, st in case["estimators"].items():
            lines.append(f"| {est} | {st['loss_mean']:.4g} +- {st['loss_se']:.2g} | "
                         f"{st['rel_var']:.3g} | {st['ms']:.1f} | {st['cost']:.3g} | "
                         f"{st['noise_vs_dsm']:.3g} |")
        d = case["dsm"]
        lines += ["", f"DSM term on {case['dsm_batch']} samples: v = {d['rel_var']:.3g}, "
                  f"{d['ms']:.1f} ms a forward and backward.  ",
                  f"{same['pair'][0]} and {same['pair'][1]} estimate the same loss: their means "
                  f"differ by {same['z']:.2f} standard errors "
                  f"({'consistent' if same['consistent'] else 'NOT consistent'}).", ""]
    path.write_text("\n".join(lines))


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(results["cases"].items())
    fig, axes = plt.subplots(1, len(cases), figsize=(5.5 * len(cases), 3.6), squeeze=False)
    for ax, (name, case) in zip(axes[0], cases):
        ests = list(case["estimators"])
        cost = [case["estimators"][e]["cost"] for e in ests]
        colors = ["C0", "C1", "C2", "0.6"]
        ax.barh(range(len(ests)), cost, color=colors[:len(ests)])
        ax.set_yticks(range(len(ests)), ests)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("v x time per draw (s), lower is better")
        ax.set_title(f"{name} ({case['arch']})")
    fig.suptitle("Cost of a unit of relative gradient variance, per FP estimator")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- CLI -----------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["mlp", "ncsnpp"], choices=["mlp", "ncsnpp"],
                   help="networks: the MLP on the checkerboard, the small NCSN++ on digits")
    p.add_argument("--draws", type=int, default=48, help="draws per estimator (MLP)")
    p.add_argument("--image-draws", type=int, default=24, help="draws per estimator (NCSN++)")
    p.add_argument("--mlp-steps", type=int, default=1000, help="DSM pre-training steps (MLP)")
    p.add_argument("--image-steps", type=int, default=150,
                   help="DSM pre-training steps (NCSN++)")
    p.add_argument("--mlp-batch", type=int, default=256, help="DSM batch (MLP)")
    p.add_argument("--mlp-fp-batch", type=int, default=64,
                   help="samples the FP terms use (MLP; the training loop's default)")
    p.add_argument("--image-batch", type=int, default=32, help="DSM batch (NCSN++)")
    p.add_argument("--image-fp-batch", type=int, default=8,
                   help="samples the FP terms use (NCSN++)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (None: torch's)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    if args.draws < 2 or args.image_draws < 2:
        p.error("--draws and --image-draws must be at least 2 (a variance needs two draws)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"command": shlex.join([Path(sys.executable).name, *sys.argv]),
               "commit": git("rev-parse", "--short", "HEAD"),
               "git_dirty": bool(git("status", "--porcelain")), "machine": machine(),
               "alpha": ALPHA, "cases": {}}
    names = {"mlp": "mlp2", "ncsnpp": "ncsnpp_small"}
    for arch in args.cases:
        results["cases"][names[arch]] = run_case(names[arch], arch, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "estimator_efficiency.json").write_text(json.dumps(results, indent=1))
    write_markdown(results, args.out / "estimator_efficiency.md")
    plot(results, args.out / "estimator_efficiency.png")
    log.info("wrote %s", args.out)
    return results


if __name__ == "__main__":
    main()
