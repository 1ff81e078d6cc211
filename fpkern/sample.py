"""``python -m fpkern.sample``: draw samples from a checkpoint and write a PNG.

Images ([B, C, H, W]) are written as a grid; 2-D vector data as a scatter plot.

    python -m fpkern.sample --checkpoint runs/fpkern/checkpoints/checkpoint_00001500.pt \
        --method pc --steps 1000 -n 64 --seed 0 --out samples.png
    python -m fpkern.sample --checkpoint checkpoint_26.pth --config ve/cifar10_ncsnpp_continuous \
        --method ode -n 16 --device cuda --out cifar10.png

Checkpoints: an fpkern training checkpoint (fpkern.train.checkpoint,
``{"format": "fpkern-train", "options", "model", "ema", ...}``), whose network, SDE and data
range are rebuilt from its saved training options; or a Score SDE checkpoint
(``{"model", "ema", "optimizer", "step"}``, as written by
fpkern.models.save_score_sde_checkpoint) with ``--config`` naming the preset of
fpkern.models.PRESETS it was trained with, which gives the network, SDE and data range.
Samples are mapped back from the model's data range ([0, 1], or [-1, 1] for centered data)
to pixels. The library entry points are ``load_score_model(path, config=...)`` and
``write_samples(score_fn, sde, shape, path, ...)``, which works for any score function; the
PNG writers themselves are fpkern.plots.save_image_grid and save_scatter.

Every option is checked before the model is loaded or a sample drawn; a mistake exits 2 with
one line naming the option or file (fpkern.errors.cli_boundary).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import torch

from fpkern.errors import ArgumentParser, UsageError, cli_boundary
from fpkern.plots import save_image_grid, save_scatter
from fpkern.sampling import SAMPLERS, sample
from fpkern.sde import LinearSDE

__all__ = ["LoadedModel", "load_score_model", "data_range_of", "write_samples",
           "save_image_grid", "save_scatter", "main"]

log = logging.getLogger(__name__)

PROG = "python -m fpkern.sample"


class LoadedModel(NamedTuple):
    """A checkpointed score model, ready to sample or evaluate."""

    score_fn: Any                               # fpkern.models.ScoreFn, in eval mode
    sde: LinearSDE                              # the forward SDE it was trained for
    input_shape: tuple[int, ...]                # per-sample shape of x
    data_range: tuple[float, float] | None      # range of its training data; None: 2-D points
    description: str                            # what was loaded, for the log


def data_range_of(data_config) -> tuple[float, float]:
    """The value range of image data under a Score SDE data config: [-1, 1] if
    ``centered``, else [0, 1] (fpkern.data.transforms.prepare_images; Score SDE's scaler)."""
    return (-1.0, 1.0) if bool(data_config.get("centered", False)) else (0.0, 1.0)


def load_score_model(path: str | os.PathLike, *, config: str | None = None, ema: bool = True,
                     device: torch.device | str = "cpu") -> LoadedModel:
    """The score model of a checkpoint, on ``device``, in eval mode.

    An fpkern training checkpoint is recognised by its format and rebuilt from its saved
    options (``config`` may only repeat its preset); any other file is read as a Score SDE
    checkpoint of the preset ``config`` (fpkern.models.PRESETS). A file that is neither
    raises ValueError naming it.
    """
    raw = _read(path)
    from fpkern.train.checkpoint import is_fpkern_checkpoint

    if is_fpkern_checkpoint(raw):
        model = _from_train_checkpoint(path, raw, config=config, ema=ema)
    elif config is None:
        raise ValueError(f"{os.fspath(path)} is not an fpkern training checkpoint; for a Score "
                         "SDE checkpoint name its preset with --config")
    else:
        del raw
        model = _from_score_sde_checkpoint(path, config, ema=ema)
    model.score_fn.to(device).eval()
    return model


def _read(path) -> Any:
    """torch.load(weights_only=True) of a checkpoint, memory-mapped when the file allows it
    (a Score SDE checkpoint is read again by its own loader); any failure names the file."""
    name = os.fspath(path)
    if not Path(name).is_file():
        raise FileNotFoundError(f"{name}: no such checkpoint file")
    try:
        try:
            return torch.load(name, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # not a zip archive (the legacy format) cannot be mapped
            return torch.load(name, map_location="cpu", weights_only=True)
    except Exception as e:  # a torch.load failure on a user's file is the file's fault
        raise ValueError(f"{name}: not a readable checkpoint ({type(e).__name__}: {e})") from None


def _from_train_checkpoint(path, ckpt: dict, *, config: str | None, ema: bool) -> LoadedModel:
    """An fpkern training checkpoint: the network is rebuilt from its saved training options
    (arch, preset, sde_name, mlp_width, mlp_depth) with the training loop's own builder
    (fpkern.models.build_model), then the EMA (or raw) weights are loaded."""
    from fpkern.models import ScoreFn, build_model
    from fpkern.models.checkpoint import check_state_dict

    name = os.fspath(path)
    o = ckpt.get("options")
    if not isinstance(o, dict) or not isinstance(o.get("arch"), str):
        raise ValueError(f"{name}: fpkern checkpoint without its training options (arch)")
    if config is not None and config != o.get("preset"):
        raise ValueError(f"--config {config}: {name} is an fpkern training checkpoint of "
                         f"preset {o.get('preset')!r}, which it names itself; omit --config")
    built = build_model(o["arch"], preset=o.get("preset"), sde=o.get("sde_name", o.get("sde")),
                        mlp_width=o.get("mlp_width", 128), mlp_depth=o.get("mlp_depth", 3))
    key = "ema" if ema else "model"
    check_state_dict(built.net, ckpt.get(key), what=f"{name} '{key}' weights")
    built.net.load_state_dict(ckpt[key])
    built.net.eval()
    rng = None if built.data_config is None else data_range_of(built.data_config)
    what = (f"fpkern checkpoint {name} (step {ckpt.get('step')}, arch {o['arch']}"
            + (f", preset {o['preset']}" if o.get("preset") else "") + f", {key} weights)")
    return LoadedModel(ScoreFn(built.net, built.sde), built.sde, tuple(built.net.input_shape),
                       rng, what)


def _from_score_sde_checkpoint(path, config: str, *, ema: bool) -> LoadedModel:
    from fpkern.models import (CheckpointMismatchError, ScoreFn, get_config,
                               load_score_sde_checkpoint, sde_from_config)

    cfg = get_config(config)
    try:
        net = load_score_sde_checkpoint(path, cfg, ema=ema).eval()
    except CheckpointMismatchError as e:
        text = str(e)
        if not text.startswith(os.fspath(path)):
            text = f"{os.fspath(path)} does not fit preset {config}: {text}"
        raise CheckpointMismatchError(text) from None
    sde = sde_from_config(cfg)
    score_fn = ScoreFn(net, sde, continuous=bool(cfg.get("training", {}).get("continuous", True)))
    what = (f"Score SDE checkpoint {os.fspath(path)} (preset {config}, "
            f"{'ema' if ema else 'model'} weights)")
    return LoadedModel(score_fn, sde, tuple(net.input_shape), data_range_of(cfg["data"]), what)


def _plot_kind(shape) -> str:
    """'grid' for images [B, 1 or 3, H, W], 'scatter' for points [B, 2]; else ValueError."""
    shape = tuple(shape)
    if len(shape) == 4 and shape[1] in (1, 3):
        return "grid"
    if len(shape) == 2 and shape[1] == 2:
        return "scatter"
    raise ValueError(f"cannot plot samples of shape {shape}: need [B, 1 or 3, H, W] or [B, 2]")


def write_samples(score_fn, sde: LinearSDE, shape, path, *, method: str = "pc",
                  steps: int | None = None, seed: int = 0, data_range=(-1.0, 1.0),
                  dtype: torch.dtype = torch.float32, device=None, **options):
    """Sample [*shape] and write a PNG (grid for images in data_range, scatter for [B, 2]);
    returns the SampleResult."""
    kind = _plot_kind(shape)
    gen = torch.Generator().manual_seed(seed)
    res = sample(score_fn, sde, shape, method=method, steps=steps, generator=gen, dtype=dtype,
                 device=device, **options)
    if kind == "grid":
        save_image_grid(res.samples, path, data_range=data_range)
    else:
        save_scatter(res.samples, path, title=f"{method}, {res.nfe} NFE")
    log.info("wrote %d samples (%s, %d NFE) to %s", shape[0], method, res.nfe, path)
    return res


# ---- command line --------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
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
    p.add_argument("--order", type=int, default=3, choices=[1, 2, 3], help="dpm_solver: order")
    p.add_argument("--singlestep", action="store_true",
                   help="dpm_solver: single-step (order evaluations a step) instead of multistep")
    p.add_argument("--prediction", default="data", choices=["data", "noise"],
                   help="dpm_solver: data prediction (DPM-Solver++) or noise prediction")
    p.add_argument("--schedule", default="logsnr",
                   choices=["logsnr", "time_uniform", "time_quadratic"],
                   help="dpm_solver: the time grid")
    p.add_argument("--rho", type=float, default=7.0, help="edm_heun: the sigma schedule's rho")
    p.add_argument("--lml-rank", type=int, default=1,
                   help="pc_lml: directions of the low-rank Hessian preconditioner")
    p.add_argument("--lml-damping", type=float, default=1.0,
                   help="pc_lml: damping lambda, in units of the batch mean |s|^2 / D")
    p.add_argument("--lml-directions", default="random", choices=["random", "power"],
                   help="pc_lml: fresh random directions, or one power iteration a step")
    p.add_argument("--data-range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="value range of the images, for the PNG (None: the checkpoint's "
                        "training range)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, mps)")
    p.add_argument("--out", default="samples.png", help="output PNG")
    return p


def check_device(name: str) -> torch.device:
    """The torch device --device names, or UsageError when it is not one or not available."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r}: not a torch device (cpu, cuda, cuda:N, "
                         "mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is built without CUDA" if torch.version.cuda is None
                   else "no GPU is visible")
            raise UsageError(f"--device {name}: CUDA is not available ({why})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {name}: MPS is not available")
    elif dev.type != "cpu":
        raise UsageError(f"--device {name}: only cpu, cuda and mps are supported")
    return dev


def check_at_least(option: str, value: int | None, minimum: int = 1) -> None:
    """UsageError unless the integer option is None (its default) or >= minimum."""
    if value is not None and value < minimum:
        raise UsageError(f"{option} must be >= {minimum}, got {value}")


def check_positive(option: str, value: float) -> None:
    """UsageError unless the float option is finite and > 0."""
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"{option} must be a finite number > 0, got {value}")


def check_range(option: str, value) -> tuple[float, float] | None:
    """A (lo, hi) option with finite lo < hi, as a tuple (None stays None)."""
    if value is None:
        return None
    lo, hi = value
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise UsageError(f"{option} must be two finite numbers LO < HI, got {lo} {hi}")
    return float(lo), float(hi)


def check_seed(seed: int) -> None:
    """--seed must fit a torch.Generator seed (a 64-bit integer)."""
    if not -2 ** 63 <= seed < 2 ** 64:
        raise UsageError(f"--seed must be a 64-bit integer, got {seed}")


def check_checkpoint_file(path: str) -> None:
    if not Path(path).exists():
        raise UsageError(f"--checkpoint {path}: no such file")
    if not Path(path).is_file():
        raise UsageError(f"--checkpoint {path}: not a file")


def check_preset(config: str | None) -> None:
    from fpkern.models import PRESETS

    if config is not None and config not in PRESETS:
        raise UsageError(f"--config {config!r}: unknown preset; valid names: {sorted(PRESETS)}")


def check_eps(eps: float, sde: LinearSDE) -> None:
    """The last (or first) time of a solve must lie in (0, T): the networks are not defined
    at t = 0."""
    if not (math.isfinite(eps) and 0 < eps < sde.T):
        raise UsageError(f"--eps must lie in (0, T={sde.T}), got {eps}")


def load_for_cli(args) -> LoadedModel:
    """load_score_model for --checkpoint / --config / --no-ema / --device; a bad file or
    preset raises UsageError naming the option."""
    try:
        model = load_score_model(args.checkpoint, config=args.config, ema=not args.no_ema,
                                 device=args.device)
    except FileNotFoundError as e:
        raise UsageError(f"--checkpoint {e}") from None
    except ValueError as e:  # the messages start with the file name or the option
        text = str(e)
        raise UsageError(text if text.startswith("--") else f"--checkpoint {text}") from None
    log.info("loaded %s: %s, data %s", model.description, model.sde,
             "points in R^2" if model.data_range is None else
             f"in [{model.data_range[0]:g}, {model.data_range[1]:g}]")
    return model


def _check_out(path: str) -> None:
    """--out must name a file in an existing folder this process can write to."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"--out {path}: is a folder, not a file")
    parent = p.parent
    if not parent.is_dir():
        raise UsageError(f"--out {path}: folder {parent} does not exist")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".fpkern-sample-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"--out {path}: cannot write in {parent} ({e.strerror})") from None
    if p.exists() and not os.access(p, os.W_OK):
        raise UsageError(f"--out {path}: file is not writable")


def _check_out_format(path: str, kind: str) -> None:
    """--out's extension must be one the writer of this kind of plot can save."""
    suffix = Path(path).suffix.lower()
    if kind == "grid":
        from PIL import Image

        Image.init()
        ok = Image.registered_extensions().get(suffix) in Image.SAVE
    else:
        from matplotlib.backend_bases import FigureCanvasBase

        ok = suffix[1:] in FigureCanvasBase.get_supported_filetypes()
    if not ok:
        raise UsageError(f"--out {path}: cannot write a {'image' if kind == 'grid' else 'plot'} "
                         f"file with extension {suffix or '(none)'!r}; use .png")


def _check_args(args) -> None:
    """Every option that needs no model, before anything is loaded."""
    check_at_least("-n/--num", args.num)
    check_at_least("--steps", args.steps)
    check_at_least("--corrector-steps", args.corrector_steps, 0)
    check_at_least("--lml-rank", args.lml_rank)
    for option in ("snr", "rtol", "atol", "rho", "lml_damping"):
        check_positive("--" + option.replace("_", "-"), getattr(args, option))
    check_seed(args.seed)
    args.data_range = check_range("--data-range", args.data_range)
    check_preset(args.config)
    args.device = check_device(args.device)
    check_checkpoint_file(args.checkpoint)
    _check_out(args.out)


def _check_model(args, model: LoadedModel) -> str:
    """The options that depend on the model, before sampling; the kind of plot."""
    check_eps(args.eps, model.sde)
    kind = _plot_kind((args.num,) + model.input_shape)
    if kind == "scatter" and args.data_range is not None:
        raise UsageError("--data-range applies to image samples; this model draws 2-D points")
    _check_out_format(args.out, kind)
    if args.data_range is not None and args.data_range != model.data_range:
        log.warning("--data-range %g %g overrides the checkpoint's data range %g %g",
                    *args.data_range, *model.data_range)
    return kind


@cli_boundary(PROG)
def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _check_args(args)
    model = load_for_cli(args)
    _check_model(args, model)
    options = {}
    if args.method == "pc":
        options = {"snr": args.snr, "corrector_steps": args.corrector_steps}
    elif args.method == "pc_lml":
        options = {"snr": args.snr, "corrector_steps": args.corrector_steps,
                   "rank": args.lml_rank, "damping": args.lml_damping,
                   "directions": args.lml_directions}
    elif args.method == "ode":
        options = {"rtol": args.rtol, "atol": args.atol}
    elif args.method == "dpm_solver":
        options = {"order": args.order, "multistep": not args.singlestep,
                   "prediction": args.prediction, "schedule": args.schedule}
    elif args.method == "edm_heun":
        options = {"rho": args.rho}
    write_samples(model.score_fn, model.sde, (args.num,) + model.input_shape, args.out,
                  method=args.method, steps=args.steps, seed=args.seed,
                  data_range=args.data_range or model.data_range, device=args.device,
                  eps=args.eps, denoise=not args.no_denoise, **options)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
