"""``python -m fpkern.evaluate``: bits/dim of a checkpoint on an image data set split.

    python -m fpkern.evaluate --checkpoint runs/fpkern/checkpoints/checkpoint_00001500.pt \
        --dataset digits --split train --limit 256 --batch-size 64 --probes 1
    python -m fpkern.evaluate --checkpoint checkpoint_26.pth --config vp/cifar10_ddpmpp_continuous \
        --dataset cifar10 --data-dir data --split test --device cuda

The checkpoint is read as fpkern.sample.load_score_model does: its network, SDE and the
value range of its training data ([0, 1], or [-1, 1] for centered data) come from an fpkern
training checkpoint's options or from the Score SDE preset ``--config``. The images are
converted to the model's input shape (size and channels), each dequantised once (seeded),
scaled to that range, and its likelihood computed with the probability-flow ODE
(``--likelihood ode``, the default) or the score-based density formula (``--likelihood
density``: forward passes only, --nodes x --mc-samples of them per image, twice that when
antithetic; docs/MATH.md 11); bits/dim use the Jacobian of that scaling
(fpkern.likelihood.nll_to_bpd: offset 8 for [0, 1], 7 for [-1, 1], as Score SDE). The mean
bpd and its standard error over the images are printed as one final line. For a learned
score the two differ: the ODE gives the probability-flow model's likelihood, the formula a
lower bound on the reverse-SDE model's (MATH.md 11.5). The library entry point is
``evaluate_bpd(score_fn, sde, images_uint8, ...)``.

    python -m fpkern.evaluate --checkpoint runs/fpkern/checkpoints/checkpoint_00001500.pt \
        --dataset digits --split train --limit 256 --likelihood density --nodes 32 --mc-samples 4

Every option is checked before the data are loaded or a likelihood computed; a mistake exits
2 with one line naming the option or file (fpkern.errors.cli_boundary).
"""

from __future__ import annotations

import argparse
import logging
import math

import torch
from tqdm import tqdm

from fpkern.errors import ArgumentParser, UsageError, cli_boundary
from fpkern.likelihood import (DENSITY_RULES, DENSITY_VARIABLES, density_log_likelihood,
                               dequantize_to_range, log_likelihood, nll_to_bpd)
from fpkern.sde import LinearSDE

__all__ = ["evaluate_bpd", "main"]

log = logging.getLogger(__name__)

PROG = "python -m fpkern.evaluate"
LIKELIHOODS = ("ode", "density")


def evaluate_bpd(score_fn, sde: LinearSDE, images: torch.Tensor, *, batch_size: int = 64,
                 data_range=(-1.0, 1.0), likelihood: str = "ode", probes=1,
                 probe_dist: str = "rademacher", rtol: float = 1e-5, atol: float = 1e-5,
                 nodes: int = 32, samples: int = 8, rule: str = "stratified",
                 variable: str = "t", antithetic: bool = True, ref_var: float | None = 1.0,
                 eps: float = 1e-5, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device=None, progress: bool = True) -> torch.Tensor:
    """bpd of every image of a uint8 tensor [N, C, H, W], float64 [N] (tqdm progress bar).

    data_range: the value range the model was trained on. likelihood: "ode" (probes,
    probe_dist, rtol, atol: fpkern.likelihood.log_likelihood) or "density" (nodes, samples,
    rule, variable, antithetic, ref_var: fpkern.likelihood.density_log_likelihood). Each
    batch is dequantised on the CPU (one seeded generator for every draw, so the numbers do
    not depend on the device), then evaluated on ``device`` (default: the images' device).
    """
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images must be uint8 [N, C, H, W], got "
                         f"{getattr(images, 'dtype', None)} {tuple(getattr(images, 'shape', ()))}")
    if images.shape[0] < 1:
        raise ValueError("images holds no image")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {likelihood!r}; valid names: {list(LIKELIHOODS)}")
    device = images.device if device is None else torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    out = []
    bar = tqdm(range(0, images.shape[0], batch_size), disable=not progress, unit="batch",
               desc="bpd")
    for i in bar:
        x = dequantize_to_range(images[i:i + batch_size].cpu(), data_range=data_range,
                                generator=gen, dtype=dtype).to(device)
        if likelihood == "ode":
            ll = log_likelihood(score_fn, sde, x, probes=probes, probe_dist=probe_dist,
                                rtol=rtol, atol=atol, eps=eps, generator=gen)
        else:
            ll = density_log_likelihood(score_fn, sde, x, nodes=nodes, samples=samples,
                                        rule=rule, variable=variable, antithetic=antithetic,
                                        ref_var=ref_var, eps=eps, generator=gen)
        out.append(nll_to_bpd(ll.logp, x[0].numel(), data_range).detach().double().cpu())
        bar.set_postfix(bpd=f"{torch.cat(out).mean().item():.4f}", nfe=ll.nfe)
    return torch.cat(out)


# ---- command line --------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    from fpkern.data.images import IMAGE_SETS

    p = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file")
    p.add_argument("--config", default=None, help="preset name for a Score SDE checkpoint")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    p.add_argument("--dataset", required=True, choices=sorted(IMAGE_SETS),
                   help="fpkern.data image set name")
    p.add_argument("--data-dir", default=None, help="where file-based sets live")
    p.add_argument("--split", default="test", choices=("train", "test"), help="split")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    p.add_argument("--batch-size", type=int, default=64, help="images per likelihood batch")
    p.add_argument("--likelihood", default="ode", choices=LIKELIHOODS,
                   help="ode: the probability-flow ODE with a divergence estimate; density: "
                        "the score-based density formula, forward passes only (MATH.md 11)")
    p.add_argument("--probes", default="1",
                   help="ode: Hutchinson probes per image, or 'exact'")
    p.add_argument("--probe-dist", default="rademacher", choices=("rademacher", "gaussian"),
                   help="ode: probe distribution")
    p.add_argument("--rtol", type=float, default=1e-5, help="ode: relative tolerance")
    p.add_argument("--atol", type=float, default=1e-5, help="ode: absolute tolerance")
    p.add_argument("--nodes", type=int, default=32,
                   help="density: quadrature nodes (strata) over [eps, T]")
    p.add_argument("--mc-samples", type=int, default=8,
                   help="density: noise draws per node and image (>= 2, for the standard error)")
    p.add_argument("--quadrature", default="stratified", choices=DENSITY_RULES,
                   help="density: stratified (a random point per draw in each stratum: "
                        "unbiased), or a fixed open rule")
    p.add_argument("--quadrature-variable", default="t", choices=DENSITY_VARIABLES,
                   help="density: integrate over t or over lambda = log(alpha / sigma)")
    p.add_argument("--no-antithetic", action="store_true",
                   help="density: draw z only, not z and -z (half the evaluations per draw)")
    p.add_argument("--ref-var", default="1.0",
                   help="density: variance of the Gaussian control variate, or 'none'")
    p.add_argument("--eps", type=float, default=1e-5,
                   help="the time the data are taken at (start of the ODE, end of the integral)")
    p.add_argument("--data-range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="override the data range the checkpoint gives (None: its training range)")
    p.add_argument("--seed", type=int, default=0, help="dequantisation, probe and noise seed")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, mps)")
    return p


def _probes(text: str):
    """--probes: 'exact' or a positive int."""
    if text == "exact":
        return "exact"
    try:
        k = int(text)
    except ValueError:
        raise UsageError(f"--probes must be a positive int or 'exact', got {text!r}") from None
    if k < 1:
        raise UsageError(f"--probes must be a positive int or 'exact', got {k}")
    return k


def _ref_var(text: str) -> float | None:
    """--ref-var: 'none' or a finite number > 0."""
    if text == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--ref-var must be a number > 0 or 'none', got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"--ref-var must be a finite number > 0 or 'none', got {text}")
    return value


def _check_args(args) -> None:
    """Every option that needs no model, before anything is loaded."""
    from fpkern.sample import (check_at_least, check_checkpoint_file, check_device,
                               check_positive, check_preset, check_range, check_seed)

    check_at_least("--limit", args.limit)
    check_at_least("--batch-size", args.batch_size)
    args.probes = _probes(args.probes)
    for option in ("rtol", "atol"):
        check_positive(f"--{option}", getattr(args, option))
    check_at_least("--nodes", args.nodes)
    check_at_least("--mc-samples", args.mc_samples, 2)
    args.ref_var = _ref_var(args.ref_var)
    if args.quadrature == "stratified" and (args.ref_var is None or args.no_antithetic):
        raise UsageError("--quadrature stratified needs the antithetic pairs and a --ref-var "
                         "(without them its variance is infinite, docs/MATH.md 11.3): drop "
                         "--no-antithetic / --ref-var none, or use --quadrature gauss_legendre")
    check_seed(args.seed)
    args.data_range = check_range("--data-range", args.data_range)
    check_preset(args.config)
    args.device = check_device(args.device)
    check_checkpoint_file(args.checkpoint)


def _check_model(args, model) -> None:
    """The options that depend on the model, before the data are loaded."""
    from fpkern.ops.exact import MAX_DIM
    from fpkern.sample import check_eps

    shape = model.input_shape
    image = len(shape) == 3 and shape[0] in (1, 3) and shape[1] == shape[2]
    if model.data_range is None or not image:
        raise UsageError(f"--dataset {args.dataset}: the model of {args.checkpoint} takes inputs "
                         f"of shape {list(shape)}, not square images of 1 or 3 channels; "
                         "fpkern.evaluate computes bits/dim of image data")
    check_eps(args.eps, model.sde)
    if args.likelihood == "ode" and args.probes == "exact" and math.prod(shape) > MAX_DIM:
        raise UsageError(f"--probes exact builds the full Jacobian, limited to D <= {MAX_DIM}; "
                         f"the model's images have D = {math.prod(shape)}: give a number of probes")
    if args.data_range is not None and args.data_range != model.data_range:
        log.warning("--data-range %g %g overrides the checkpoint's data range %g %g",
                    *args.data_range, *model.data_range)


def _load_images(args, input_shape) -> torch.Tensor:
    """The split as uint8 [N, *input_shape] (resized and converted), --limit applied."""
    from fpkern.data.formats import DataFormatError
    from fpkern.data.images import load_image_dataset

    try:
        images = load_image_dataset(args.dataset, args.data_dir, split=args.split,
                                    image_size=input_shape[-1], channels=input_shape[0]).images
    except FileNotFoundError as e:
        raise UsageError(f"--data-dir {args.data_dir}: {e}") from None
    except DataFormatError:
        raise  # names the file
    except ValueError as e:
        raise UsageError(f"--dataset {args.dataset} --split {args.split}: {e}") from None
    if tuple(images.shape[1:]) != tuple(input_shape):
        raise UsageError(f"--dataset {args.dataset}: images of shape {list(images.shape[1:])}, "
                         f"the model takes {list(input_shape)}")
    if args.limit is not None:
        images = images[:args.limit]
    return images


@cli_boundary(PROG)
def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from fpkern.sample import load_for_cli

    _check_args(args)
    model = load_for_cli(args)
    _check_model(args, model)
    images = _load_images(args, model.input_shape)
    data_range = args.data_range or model.data_range
    bpd = evaluate_bpd(model.score_fn, model.sde, images, batch_size=args.batch_size,
                       data_range=data_range, likelihood=args.likelihood, probes=args.probes,
                       probe_dist=args.probe_dist, rtol=args.rtol, atol=args.atol,
                       nodes=args.nodes, samples=args.mc_samples, rule=args.quadrature,
                       variable=args.quadrature_variable, antithetic=not args.no_antithetic,
                       ref_var=args.ref_var, eps=args.eps, seed=args.seed, device=args.device)
    sem = bpd.std().item() / math.sqrt(len(bpd)) if len(bpd) > 1 else float("nan")
    line = (f"{args.dataset}/{args.split}: {bpd.mean().item():.4f} +- {sem:.4f} bits/dim over "
            f"{len(bpd)} images (data in [{data_range[0]:g}, {data_range[1]:g}])")
    if args.likelihood == "density":
        nfe = args.nodes * args.mc_samples * (1 if args.no_antithetic else 2)
        line += f" by the density formula, {nfe} network evaluations per image"
    print(line)   # the command's result, on stdout
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
