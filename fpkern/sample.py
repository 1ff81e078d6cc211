"""``python -m fpkern.sample``: draw samples from a checkpoint and write a PNG.

Images ([B, C, H, W]) are written as a grid; 2-D vector data as a scatter plot.

    python -m fpkern.sample --checkpoint ckpt.pth --config small/vp_digits \
        --method pc --steps 1000 -n 64 --seed 0 --out samples.png

Checkpoints: a Score SDE checkpoint (``{"model", "ema", "optimizer", "step"}``, as written by
fpkern.models.save_score_sde_checkpoint) with ``--config`` naming a preset of
fpkern.models.PRESETS; without ``--config``, an fpkern training checkpoint
(fpkern.train.checkpoint, ``{"format": "fpkern-train", "options", "model", "ema", ...}``),
whose network is rebuilt from its saved training options. The library entry point is
``write_samples(score_fn, sde, shape, path, ...)``, which works for any score function; the
PNG writers themselves are fpkern.plots.save_image_grid and save_scatter.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch

from fpkern.plots import save_image_grid, save_scatter
from fpkern.sampling import SAMPLERS, sample
from fpkern.sde import LinearSDE

__all__ = ["load_score_model", "write_samples", "save_image_grid", "save_scatter", "main"]

log = logging.getLogger(__name__)


def load_score_model(path: str | os.PathLike, *, config: str | None = None, ema: bool = True):
    """(score_fn, sde, input_shape) from a checkpoint; the score_fn is in eval mode.

    config: a preset name (fpkern.models.PRESETS) for a Score SDE checkpoint; None reads an
    fpkern training checkpoint.
    """
    if config is None:
        return _load_train_checkpoint(path, ema=ema)
    from fpkern.models import ScoreFn, get_config, load_score_sde_checkpoint, sde_from_config

    cfg = get_config(config)
    net = load_score_sde_checkpoint(path, cfg, ema=ema).eval()
    sde = sde_from_config(cfg)
    score_fn = ScoreFn(net, sde, continuous=bool(cfg.get("training", {}).get("continuous", True)))
    return score_fn, sde, tuple(net.input_shape)


def _load_train_checkpoint(path, *, ema: bool = True):
    """An fpkern training checkpoint (fpkern.train.checkpoint): the network is rebuilt from
    its saved training options (arch, preset, sde_name, mlp_width, mlp_depth) with the
    training loop's own builder (fpkern.models.build_model), then the EMA (or raw) weights
    are loaded."""
    from fpkern.models import ScoreFn, build_model
    from fpkern.train import checkpoint as ckpt_io

    ckpt = ckpt_io.load_checkpoint(path)
    o = ckpt.get("options", {})
    net, sde, *_ = build_model(o.get("arch"), preset=o.get("preset"),
                               sde=o.get("sde_name", o.get("sde")),
                               mlp_width=o.get("mlp_width", 128), mlp_depth=o.get("mlp_depth", 3))
    net.load_state_dict(ckpt["ema" if ema else "model"])
    net.eval()
    return ScoreFn(net, sde), sde, tuple(net.input_shape)


def write_samples(score_fn, sde: LinearSDE, shape, path, *, method: str = "pc",
                  steps: int | None = None, seed: int = 0, data_range=(-1.0, 1.0),
                  dtype: torch.dtype = torch.float32, **options):
    """Sample [*shape] and write a PNG (grid for images, scatter for [B, 2]); returns the
    SampleResult."""
    gen = torch.Generator().manual_seed(seed)
    res = sample(score_fn, sde, shape, method=method, steps=steps, generator=gen, dtype=dtype,
                 **options)
    if len(shape) == 4:
        save_image_grid(res.samples, path, data_range=data_range)
    elif len(shape) == 2 and shape[1] == 2:
        save_scatter(res.samples, path, title=f"{method}, {res.nfe} NFE")
    else:
        raise ValueError(f"cannot plot samples of shape {tuple(shape)}: need [B, C, H, W] or [B, 2]")
    log.info("wrote %d samples (%s, %d NFE) to %s", shape[0], method, res.nfe, path)
    return res


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fpkern.sample", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file")
    p.add_argument("--config", default=None, help="preset name for a Score SDE checkpoint")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    p.add_argument("--method", default="pc", choices=sorted(SAMPLERS), help="sampler")
    p.add_argument("--steps", type=int, default=None, help="grid intervals (default sde.N)")
    p.add_argument("-n", "--num", type=int, default=64, help="number of samples")
    p.add_argument("--seed", type=int, default=0, help="generator seed")
    p.add_argument("--eps", type=float, default=1e-3, help="last time of the solve")
    p.add_argument("--no-denoise", action="store_true", help="skip the Tweedie step at eps")
    p.add_argument("--snr", type=float, default=0.16, help="pc: Langevin signal-to-noise ratio")
    p.add_argument("--corrector-steps", type=int, default=1, help="pc: Langevin steps per step")
    p.add_argument("--rtol", type=float, default=1e-5, help="ode: relative tolerance")
    p.add_argument("--atol", type=float, default=1e-5, help="ode: absolute tolerance")
    p.add_argument("--data-range", type=float, nargs=2, default=(-1.0, 1.0),
                   help="value range of image data, for the PNG")
    p.add_argument("--out", default="samples.png", help="output PNG")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    score_fn, sde, input_shape = load_score_model(args.checkpoint, config=args.config,
                                                  ema=not args.no_ema)
    options = {}
    if args.method == "pc":
        options = {"snr": args.snr, "corrector_steps": args.corrector_steps}
    elif args.method == "ode":
        options = {"rtol": args.rtol, "atol": args.atol}
    write_samples(score_fn, sde, (args.num,) + input_shape, args.out, method=args.method,
                  steps=args.steps, seed=args.seed, data_range=tuple(args.data_range),
                  eps=args.eps, denoise=not args.no_denoise, **options)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
