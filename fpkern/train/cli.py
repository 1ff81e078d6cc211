"""``python -m fpkern.train``: typed options with choices and shown defaults, an optional
TOML (or YAML) config file with the same option names and types, the command line winning.
The options become a ``TrainConfig`` (fpkern.train.config), validated whole before any work
starts, which ``training_loop`` runs.

Exit codes: 0 done, 2 a user mistake (an option, a config file, a checkpoint, a device, the
data or the workdir; one line on stderr names it, fpkern.errors.cli_boundary), 3 non-finite
loss (the last checkpoint is intact), 128 + the signal number after SIGINT or SIGTERM (a
checkpoint of the last step written).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from fpkern.errors import ArgumentParser, UsageError, cli_boundary
from fpkern.losses import (DSM_WEIGHTINGS, ESTIMATORS, FP_POINTS, NORMALIZATIONS,
                           SCALAR_TERMS, WEIGHTINGS)
from fpkern.train.config import ARCHS, TrainConfig, file_options, load_config

__all__ = ["build_parser", "parse_args", "train_config", "main", "load_config"]

log = logging.getLogger("fpkern.train")

PROG = "python -m fpkern.train"

_DEF = "(default: per --arch, see ARCH_DEFAULTS in fpkern/train/config.py)"


def _bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {s!r}")


def _opt_int(s: str) -> int | None:
    if s.strip().lower() in ("none", ""):
        return None
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer (or none), got {s!r}") from None


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default once: an option whose help states its default (per --arch, from
    --fp-preset) gets no "(default: None)" after it."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "(default:" in text else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every TrainConfig option (plus --config and --log-level)."""
    p = ArgumentParser(
        prog=PROG,
        description="Train a score-based diffusion model with the score Fokker-Planck "
                    "regulariser: L = DSM + alpha L_vec + beta L_scalar (docs/MATH.md section 4). "
                    "Under torchrun the ranks train data-parallel. Options left at None take "
                    "the per-architecture default.",
        formatter_class=_HelpFormatter)
    p.add_argument("--config", type=Path, default=None,
                   help="TOML (or YAML, if PyYAML is installed) file setting any of these "
                        "options by name (dashes or underscores); the command line wins")
    _model_and_data(p.add_argument_group("model and data"))
    _objective(p.add_argument_group("objective (docs/MATH.md section 4)"))
    _optimisation(p.add_argument_group("optimisation"))
    _run_options(p.add_argument_group("run"))
    return p


def _model_and_data(g) -> None:
    from fpkern.data.images import IMAGE_SETS
    from fpkern.data.toy2d import TOY_SETS
    from fpkern.models import PRESETS
    from fpkern.sde import SDES

    g.add_argument("--arch", choices=ARCHS, default="ncsnpp", help="network architecture")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="fpkern.models preset for ncsnpp/ddpmpp (None: small/<arch>)")
    g.add_argument("--sde", choices=sorted(SDES), default=None,
                   help="forward SDE (None: the preset's; vp for mlp)")
    g.add_argument("--dataset", choices=sorted(IMAGE_SETS) + sorted(TOY_SETS), default=None,
                   help="training data (None: digits for images, checkerboard for mlp)")
    g.add_argument("--data-dir", default=None, help="folder of file-based image sets")
    g.add_argument("--mlp-width", type=int, default=128, help="MLP hidden width")
    g.add_argument("--mlp-depth", type=int, default=3, help="MLP depth")


def _objective(g) -> None:
    from fpkern.ops import FORMS, METHODS

    from fpkern.losses import FP_PRESETS

    presets = "; ".join(f"{name}: " + ", ".join(f"{k} {v}" for k, v in knobs.items())
                        for name, knobs in FP_PRESETS.items())
    g.add_argument("--fp-preset", choices=sorted(FP_PRESETS), default="fpkern",
                   help="where --alpha, --beta, --fp-normalize and --fp-scalar come from when "
                        "not given: fpkern = the recipe of README 'Which FP term to train "
                        "with' (experiments/results/fp_study.md), paper = FP-Diffusion's "
                        f"objective, to reproduce the paper ({presets})")
    g.add_argument("--alpha", type=float, default=None,
                   help="weight of L_vec (0 disables) (default: from --fp-preset)")
    g.add_argument("--beta", type=float, default=None,
                   help="weight of L_scalar (0 disables) (default: from --fp-preset)")
    g.add_argument("--m", type=float, default=2.0, help="power of the residual norm in L_vec")
    g.add_argument("--weighting", choices=WEIGHTINGS, default="ll",
                   help="w(t) of L_vec: 1, g(t) or g(t)^2")
    g.add_argument("--fp-points", choices=FP_POINTS, default="pert",
                   help="where the FP terms are evaluated")
    g.add_argument("--form", choices=FORMS, default="div", help="residual form")
    g.add_argument("--method", choices=sorted(METHODS), default="fused", help="residual method")
    g.add_argument("--probes", type=int, default=1, help="Hutchinson probes per sample")
    g.add_argument("--fp-estimator", choices=ESTIMATORS, default="vector",
                   help="L_vec from the residual vector, or the forward-only unbiased (u . r)^2 "
                        "(div form, m 2, fused; faster per step, but its gradient is orders of "
                        "magnitude noisier: experiments/results/estimator_efficiency.md)")
    g.add_argument("--fp-normalize", choices=NORMALIZATIONS, default=None,
                   help="L_vec's normalisation by the dimension D: paper = w |r|^m / D^m "
                        "(FP-Diffusion's code; against the per-dimension-mean DSM it weakens "
                        "as D^(m/2)), dim = w (|r|^2 / D)^(m/2), the same strength against DSM "
                        "at every D. The same objective: alpha_dim = alpha_paper / D^(m/2); "
                        "the paper's CIFAR-10 alpha 0.15 (D 3072, m 2) is alpha_dim 4.9e-5 "
                        "(in its VE configs, whose DSM is half the sum over D, not the mean: "
                        "2 alpha_paper / D^2 = 3.2e-8). "
                        "docs/MATH.md section 4 (default: from --fp-preset)")
    g.add_argument("--fp-scalar", choices=SCALAR_TERMS, default=None,
                   help="L_scalar: paper = the batch L2 norm of the scalar FPE right-hand side h "
                        "(not 0 at the true score), consistent = an unbiased estimate of "
                        "E[(h - D f(t)) / D]^2, 0 at the true score (can be negative; needs 2 "
                        "FP samples). docs/MATH.md section 4 (default: from --fp-preset)")
    g.add_argument("--fp-batch", type=_opt_int, default=None,
                   help="samples per rank the FP terms use, 0 = all (in the div form with "
                        "method fused the DSM term takes these samples' score from the FP pass) "
                        f"{_DEF}")
    g.add_argument("--fp-every", type=_opt_int, default=None,
                   help=f"add the FP terms every this many steps {_DEF}")
    g.add_argument("--dsm-weighting", choices=DSM_WEIGHTINGS, default="ll",
                   help="DSM weighting: ll = g^2 (likelihood), score_sde = sigma^2")
    g.add_argument("--eps", type=float, default=1e-5, help="t ~ U[eps, T]")


def _optimisation(g) -> None:
    g.add_argument("--steps", type=_opt_int, default=None, help=f"optimizer steps {_DEF}")
    g.add_argument("--batch-size", type=_opt_int, default=None,
                   help=f"global batch size, split over ranks {_DEF}")
    g.add_argument("--lr", type=float, default=None, help=f"Adam learning rate {_DEF}")
    g.add_argument("--warmup", type=_opt_int, default=None, help=f"linear warm-up steps {_DEF}")
    g.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip (<= 0: off)")
    g.add_argument("--ema", type=float, default=None, help=f"EMA decay {_DEF}")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of weights, data, noise and the global RNGs (torch, numpy, random)")
    g.add_argument("--amp", action="store_true",
                   help="autocast the loss to bfloat16 (float16 is not used: its range breaks the jets)")
    g.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")


def _run_options(g) -> None:
    g.add_argument("--workdir", default="runs/fpkern",
                   help="output folder: checkpoints/, samples/, metrics.jsonl, tensorboard/")
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --workdir")
    g.add_argument("--init-from", default=None,
                   help="Score SDE or fpkern checkpoint to fine-tune from; with --resume, the "
                        "start while --workdir has no checkpoint yet")
    g.add_argument("--allow-resume-change", action="store_true",
                   help="let --resume continue with another --sde or --dataset than the "
                        "checkpoint's (the change is recorded in the checkpoints); otherwise "
                        "a mismatch is refused")
    g.add_argument("--sample-every", type=_opt_int, default=None,
                   help=f"sample PNG every this many steps, 0 = at the end only {_DEF}")
    g.add_argument("--eval-every", type=_opt_int, default=None,
                   help=f"held-out DSM and FPE residual every this many steps, 0 = never {_DEF}")
    g.add_argument("--ckpt-every", type=_opt_int, default=None,
                   help=f"checkpoint every this many steps (and at the end) {_DEF}")
    g.add_argument("--keep-ckpts", type=int, default=3, help="checkpoints kept")
    g.add_argument("--log-every", type=int, default=10, help="steps between metrics.jsonl rows")
    g.add_argument("--num-samples", type=_opt_int, default=None,
                   help=f"samples per preview {_DEF}")
    g.add_argument("--sample-steps", type=_opt_int, default=None,
                   help=f"reverse-SDE steps per preview {_DEF}")
    g.add_argument("--deterministic", type=_bool, default=True,
                   help="torch.use_deterministic_algorithms (warn only)")
    g.add_argument("--progress", type=_bool, default=True, help="tqdm progress bar")
    g.add_argument("--tensorboard", type=_bool, default=True,
                   help="TensorBoard scalars if the tensorboard package is installed")
    g.add_argument("--log-level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="python logging level")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The options of a command line (and of its --config file); a mistake prints one line
    and exits 2, as argparse does."""
    try:
        return _parse(argv)
    except UsageError as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2) from None


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """parse_args raising UsageError. The config file's values are typed and checked as
    strictly as TrainConfig's fields (file_options), then become the parser's defaults, so
    the command line wins and the file's values never pass through a string conversion."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config is None:
        return args
    cfg = file_options(args.config, extra={"log_level": str})
    choices = {a.dest: a.choices for a in parser._actions if a.choices is not None}
    for k, v in cfg.items():
        if k in choices and v not in choices[k]:
            raise UsageError(f"--config {args.config}: {k} = {v!r}; valid names: "
                             f"{list(choices[k])}")
    parser.set_defaults(**cfg)
    return parser.parse_args(argv)  # the command line wins over the file


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed options (all but --config and --log-level), unresolved."""
    return TrainConfig(**{k: v for k, v in vars(args).items() if k not in ("config", "log_level")})


@cli_boundary(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; the exit status (see the module docstring)."""
    from fpkern.train.loop import NonFiniteLossError, training_loop

    args = _parse(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=args.log_level if rank == 0 else "WARNING",
                        format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s")
    try:
        training_loop(train_config(args))
    except NonFiniteLossError as e:
        log.error("training stopped: %s", e)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
