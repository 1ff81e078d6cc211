"""``python -m fpkern.evaluate``: bits/dim of a checkpoint on an image data set split.

    python -m fpkern.evaluate --checkpoint runs/fpkern/checkpoints/checkpoint_00001500.pt \
        --dataset digits --split train --limit 256 --batch-size 64 --probes 1
    python -m fpkern.evaluate --checkpoint checkpoint_26.pth --config vp/cifar10_ddpmpp_continuous \
        --dataset cifar10 --data-dir data --split test --device cuda

The checkpoint is read as fpkern.sample.load_score_model does: its network, SDE and the
value range of its training data ([0, 1], or [-1, 1] for centered data) come from an fpkern
training checkpoint's options or from the Score SDE preset ``--config``. The images are
converted to the model's input shape (size and channels), each dequantised once (seeded),
scaled to that range, and its likelihood computed with the probability-flow ODE; bits/dim
use the Jacobian of that scaling (fpkern.likelihood.nll_to_bpd: offset 8 for [0, 1], 7 for
[-1, 1], as Score SDE). The mean bpd and its standard error are printed as one final line.
The library entry point is ``evaluate_bpd(score_fn, sde, images_uint8, ...)``.

Every option is checked before the data are loaded or an ODE solved; a mistake exits 2 with
one line naming the option or file (fpkern.errors.cli_boundary).
"""

from __future__ import annotations

import argparse
import logging
import math

import torch
from tqdm import tqdm

from fpkern.errors import ArgumentParser, UsageError, cli_boundary
from fpkern.likelihood import dequantize_to_range, log_likelihood, nll_to_bpd
from fpkern.sde import LinearSDE

__all__ = ["evaluate_bpd", "main"]

log = logging.getLogger(__name__)

PROG = "python -m fpkern.evaluate"


def evaluate_bpd(score_fn, sde: LinearSDE, images: torch.Tensor, *, batch_size: int = 64,
                 data_range=(-1.0, 1.0), probes=1, probe_dist: str = "rademacher",
                 rtol: float = 1e-5, atol: float = 1e-5, eps: float = 1e-5, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device=None,
                 progress: bool = True) -> torch.Tensor:
    """bpd of every image of a uint8 tensor [N, C, H, W], float64 [N] (tqdm progress bar).

    data_range: the value range the model was trained on. Each batch is dequantised on the
    CPU (one seeded generator for every draw, so the numbers do not depend on the device),
    then solved on ``device`` (default: the images' device): fpkern.likelihood.bits_per_dim
    batch by batch.
    """
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images must be uint8 [N, C, H, W], got "
                         f"{getattr(images, 'dtype', None)} {tuple(getattr(images, 'shape', ()))}")
    if images.shape[0] < 1:
        raise ValueError("images holds no image")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = images.device if device is None else torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    out = []
    bar = tqdm(range(0, images.shape[0], batch_size), disable=not progress, unit="batch",
               desc="bpd")
    for i in bar:
        x = dequantize_to_range(images[i:i + batch_size].cpu(), data_range=data_range,
                                generator=gen, dtype=dtype).to(device)
        ll = log_likelihood(score_fn, sde, x, probes=probes, probe_dist=probe_dist, rtol=rtol,
                            atol=atol, eps=eps, generator=gen)
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
    p.add_argument("--batch-size", type=int, default=64, help="images per ODE solve")
    p.add_argument("--probes", default="1", help="Hutchinson probes per image, or 'exact'")
    p.add_argument("--probe-dist", default="rademacher", choices=("rademacher", "gaussian"),
                   help="probe distribution")
    p.add_argument("--rtol", type=float, default=1e-5, help="ODE relative tolerance")
    p.add_argument("--atol", type=float, default=1e-5, help="ODE absolute tolerance")
    p.add_argument("--eps", type=float, default=1e-5, help="start time of the ODE")
    p.add_argument("--data-range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="override the data range the checkpoint gives (None: its training range)")
    p.add_argument("--seed", type=int, default=0, help="dequantisation and probe seed")
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


def _check_args(args) -> None:
    """Every option that needs no model, before anything is loaded."""
    from fpkern.sample import (check_at_least, check_checkpoint_file, check_device,
                               check_positive, check_preset, check_range, check_seed)

    check_at_least("--limit", args.limit)
    check_at_least("--batch-size", args.batch_size)
    args.probes = _probes(args.probes)
    for option in ("rtol", "atol"):
        check_positive(f"--{option}", getattr(args, option))
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
    if args.probes == "exact" and math.prod(shape) > MAX_DIM:
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
                       data_range=data_range, probes=args.probes, probe_dist=args.probe_dist,
                       rtol=args.rtol, atol=args.atol, eps=args.eps, seed=args.seed,
                       device=args.device)
    sem = bpd.std().item() / math.sqrt(len(bpd)) if len(bpd) > 1 else float("nan")
    line = (f"{args.dataset}/{args.split}: {bpd.mean().item():.4f} +- {sem:.4f} bits/dim over "
            f"{len(bpd)} images (data in [{data_range[0]:g}, {data_range[1]:g}])")
    print(line)   # the command's result, on stdout
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
