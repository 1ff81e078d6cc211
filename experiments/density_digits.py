"""Issue 20, part 1 on images: the density formula beside the probability-flow ODE on a
trained digits model.

    python -m fpkern.train --arch ncsnpp --workdir runs/digits     # `make train`'s model
    python experiments/density_digits.py --checkpoint runs/digits/checkpoints/checkpoint_00001500.pt

The model is a checkpoint of `python -m fpkern.train` (its EMA weights, its SDE and data
range). The first --images of the embedded 16x16 digits are dequantised once (seeded) and
both estimates run on the same inputs, so the per-image difference is paired:
- the ODE (fpkern.likelihood.log_likelihood) at rtol = atol = --tol with --probes Hutchinson
  probes (the divergence estimate of the ODE, fixed per solve);
- the density formula (fpkern.likelihood.density_log_likelihood) with --nodes strata and
  --mc-samples antithetic draws per stratum (2 x nodes x samples forward passes per image).
Reported: the mean bits/dim of each with its standard error over the images, the paired
per-image difference ODE - formula with a 95% interval, network evaluations and wall time.
For a learned score the two measure different things (docs/MATH.md 11.5): the ODE the
probability-flow model's likelihood, the formula the DSM bound on the reverse-SDE model's.
The digits set has one split, so the images are ones the model was trained on unless the
checkpoint says otherwise; the md says so. Writes density_digits.json and density_digits.md.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fast_samplers import mean_ci  # noqa: E402
from provenance import git, machine  # noqa: E402

from fpkern.data.images import load_digits  # noqa: E402
from fpkern.likelihood import (density_log_likelihood, dequantize_to_range,  # noqa: E402
                               log_likelihood, nll_to_bpd)
from fpkern.sample import load_score_model  # noqa: E402


def run(args) -> dict:
    model = load_score_model(args.checkpoint)
    opts = torch.load(args.checkpoint, map_location="cpu", weights_only=False).get("options", {})
    info_model = ", ".join([f"{k} {opts[k]}" for k in ("arch", "preset", "steps", "alpha", "beta")
                            if k in opts] + [repr(model.sde)])
    images = load_digits(model.input_shape[-1]).images[:args.images]
    x = dequantize_to_range(images, data_range=model.data_range,
                            generator=torch.Generator().manual_seed(args.seed))
    D = x[0].numel()
    out = {}
    t0 = time.perf_counter()
    ode = log_likelihood(model.score_fn, model.sde, x, probes=args.probes, rtol=args.tol,
                         atol=args.tol, eps=args.eps,
                         generator=torch.Generator().manual_seed(args.seed + 1))
    out["ode"] = dict(bpd=nll_to_bpd(ode.logp, D, model.data_range).double(),
                      nfe=ode.nfe, evals_per_image=ode.nfe * (1 + args.probes),
                      wall_s=time.perf_counter() - t0)
    print(f"ode: {out['ode']['wall_s']:.0f} s", flush=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        den = density_log_likelihood(model.score_fn, model.sde, x, nodes=args.nodes,
                                     samples=args.mc_samples, eps=args.eps,
                                     generator=torch.Generator().manual_seed(args.seed + 2))
    out["density"] = dict(bpd=nll_to_bpd(den.logp, D, model.data_range).double(), nfe=den.nfe,
                          evals_per_image=den.nfe, wall_s=time.perf_counter() - t0,
                          point_se_bpd=(den.stderr.double() / (D * math.log(2))).mean().item())
    print(f"density: {out['density']['wall_s']:.0f} s", flush=True)
    res = {}
    for k, v in out.items():
        m, ci = mean_ci(v["bpd"].tolist())
        res[k] = {**{a: b for a, b in v.items() if a != "bpd"}, "bpd": m, "bpd_ci": ci}
    diff = (out["ode"]["bpd"] - out["density"]["bpd"]).tolist()
    res["ode_minus_density"], res["ode_minus_density_ci"] = mean_ci(diff)
    res["frac_ode_above"] = sum(d > 0 for d in diff) / len(diff)
    res["per_image"] = {k: v["bpd"].tolist() for k, v in out.items()}
    res["model"] = info_model
    return res


def write_markdown(res: dict, info: dict, args, path: Path) -> None:
    o, d = res["ode"], res["density"]
    lines = [
        f"# Density formula vs probability-flow ODE on a trained digits model", "",
        f"`{info['command']}` at {info['commit']}, {info['machine']['summary']}, "
        f"{info['wall_s']:.0f} s. Checkpoint `{args.checkpoint}` ({info['model']}).", "",
        f"The first {args.images} of the 1797 embedded digits (16x16; the set has one split, "
        "so these are training images of this model), dequantised once; both estimates on "
        "the same inputs. Bits/dim: mean ± 95% t-interval half-width over the images.", "",
        "| estimate | bits/dim | passes per image (forward or VJP) | wall time |",
        "|---|---:|---:|---:|",
        f"| ODE, RK45 rtol = atol = {args.tol:g}, {args.probes} Rademacher probes | "
        f"{o['bpd']:.4f} ± {o['bpd_ci']:.4f} | {o['evals_per_image']} ({o['nfe']} right-hand "
        f"sides) | {o['wall_s']:.0f} s |",
        f"| density formula, {args.nodes} strata x {args.mc_samples} antithetic draws | "
        f"{d['bpd']:.4f} ± {d['bpd_ci']:.4f} | {d['evals_per_image']} | {d['wall_s']:.0f} s |",
        "",
        f"Paired per-image difference ODE - formula: {res['ode_minus_density']:+.4f} ± "
        f"{res['ode_minus_density_ci']:.4f} bits/dim; the ODE gives more bits/dim (a lower "
        f"likelihood) on {100 * res['frac_ode_above']:.0f}% of the images. The formula's mean "
        f"per-image standard error (its own Monte Carlo) is {d['point_se_bpd']:.4f} bits/dim.",
        "",
        "Reading: for the true score both would be log q_0 (docs/MATH.md 11). For a learned "
        "score the formula is the DSM bound on the reverse-SDE model's log-likelihood and the "
        "ODE the probability-flow model's likelihood (an ODE evaluation counts one forward and, "
        "per probe, one vector-Jacobian product here). A difference between them is the "
        "model's inconsistency, not an error of either method.",
    ]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a `python -m fpkern.train` checkpoint")
    p.add_argument("--images", type=int, default=256, help="digits evaluated")
    p.add_argument("--probes", type=int, default=4, help="ODE: Hutchinson probes")
    p.add_argument("--tol", type=float, default=1e-5, help="ODE: rtol = atol")
    p.add_argument("--nodes", type=int, default=32, help="density: strata over [eps, T]")
    p.add_argument("--mc-samples", type=int, default=8, help="density: draws per stratum")
    p.add_argument("--eps", type=float, default=1e-5, help="the data's time")
    p.add_argument("--seed", type=int, default=0, help="dequantisation, probes, noise")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    if args.images < 2 or args.probes < 1 or args.nodes < 1 or args.mc_samples < 2:
        p.error("--images >= 2, --probes >= 1, --nodes >= 1 and --mc-samples >= 2")
    argv = sys.argv[1:] if argv is None else list(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    info = {"command": shlex.join(["python", "experiments/density_digits.py", *argv]),
            "commit": git("rev-parse", "--short", "HEAD"), "machine": machine()}
    start = time.perf_counter()
    try:
        res = run(args)
    finally:
        torch.set_num_threads(threads)
    info["wall_s"] = time.perf_counter() - start
    info["model"] = res.pop("model")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "density_digits.json").write_text(json.dumps({**info, **res}, indent=1))
    write_markdown(res, info, args, args.out / "density_digits.md")
    return res


if __name__ == "__main__":
    main()
