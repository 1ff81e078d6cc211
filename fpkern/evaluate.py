"""``python -m fpkern.evaluate``: bits/dim of a checkpoint on an image data set split.

    python -m fpkern.evaluate --checkpoint ckpt.pth --config small/vp_digits \
        --dataset digits --split test --batch-size 64 --probes 1

Each image is dequantised once (seeded), scaled to --data-range, and its likelihood computed
with the probability-flow ODE (fpkern.likelihood.bits_per_dim). The mean bpd and its
standard error are logged and printed as one final line. The library entry point is
``evaluate_bpd(score_fn, sde, images_uint8, ...)``.
"""

from __future__ import annotations

import argparse
import logging
import math

import torch
from tqdm import tqdm

from fpkern.likelihood import bits_per_dim
from fpkern.sde import LinearSDE

__all__ = ["evaluate_bpd", "main"]

log = logging.getLogger(__name__)


def evaluate_bpd(score_fn, sde: LinearSDE, images: torch.Tensor, *, batch_size: int = 64,
                 data_range=(-1.0, 1.0), probes=1, probe_dist: str = "rademacher",
                 rtol: float = 1e-5, atol: float = 1e-5, eps: float = 1e-5, seed: int = 0,
                 dtype: torch.dtype = torch.float32, progress: bool = True) -> torch.Tensor:
    """bpd of every image of a uint8 tensor [N, C, H, W], float64 [N] (tqdm progress bar)."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images must be uint8 [N, C, H, W], got "
                         f"{getattr(images, 'dtype', None)} {tuple(getattr(images, 'shape', ()))}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    out = []
    bar = tqdm(range(0, images.shape[0], batch_size), disable=not progress, unit="batch",
               desc="bpd")
    for i in bar:
        res = bits_per_dim(score_fn, sde, images[i:i + batch_size], data_range=data_range,
                           probes=probes, probe_dist=probe_dist, rtol=rtol, atol=atol, eps=eps,
                           generator=gen, dtype=dtype)
        out.append(res.bpd.detach().double().cpu())
        bar.set_postfix(bpd=f"{torch.cat(out).mean().item():.4f}", nfe=res.likelihood.nfe)
    return torch.cat(out)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fpkern.evaluate",
                                description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file")
    p.add_argument("--config", default=None, help="preset name for a Score SDE checkpoint")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    p.add_argument("--dataset", required=True, help="fpkern.data image set name")
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
    p.add_argument("--data-range", type=float, nargs=2, default=(-1.0, 1.0),
                   help="model data range (Score SDE centered: -1 1)")
    p.add_argument("--seed", type=int, default=0, help="dequantisation and probe seed")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from fpkern.data.images import load_image_dataset
    from fpkern.sample import load_score_model

    probes = "exact" if args.probes == "exact" else int(args.probes)
    score_fn, sde, input_shape = load_score_model(args.checkpoint, config=args.config,
                                                  ema=not args.no_ema)
    images = load_image_dataset(args.dataset, args.data_dir, split=args.split,
                                image_size=input_shape[-1], channels=input_shape[0]).images
    if args.limit is not None:
        images = images[:args.limit]
    bpd = evaluate_bpd(score_fn, sde, images, batch_size=args.batch_size,
                       data_range=tuple(args.data_range), probes=probes,
                       probe_dist=args.probe_dist, rtol=args.rtol, atol=args.atol, eps=args.eps,
                       seed=args.seed)
    sem = bpd.std().item() / math.sqrt(len(bpd)) if len(bpd) > 1 else float("nan")
    line = f"{args.dataset}/{args.split}: {bpd.mean().item():.4f} +- {sem:.4f} bits/dim over {len(bpd)} images"
    print(line)   # the command's result, on stdout
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
