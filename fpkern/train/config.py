"""The options of a training run as one typed object, validated in one place.

``TrainConfig`` holds the options as given (None: the per-architecture default of
``ARCH_DEFAULTS``); ``resolved()`` fills those defaults in, converts and checks every value
(choices, ranges, combinations, paths, the device) and returns the config the loop runs,
so that every mistake is found before any work starts. The CLI (fpkern.train.cli) and the
TOML file it reads build it; ``training_loop(**options)`` builds it from keywords.

A config file is typed as strictly as the dataclass: ``file_options`` reads it and rejects
an unknown name or a value of another type (a string for a boolean or a number, a float for
an integer, a list), naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from fpkern._checks import check_choice
from fpkern.errors import UsageError

__all__ = ["TrainConfig", "ARCHS", "ARCH_DEFAULTS", "load_config", "file_options"]

ARCHS = ("ncsnpp", "ddpmpp", "mlp")

#: Per-architecture defaults for the options left as None. The image defaults train the
#: small preset on the embedded digits in minutes on a few CPU cores, the FP terms on 4
#: samples every 10th step (their forward-mode passes cost several DSM steps each). The MLP
#: needs 8000 steps and EMA 0.999 for its samples to show the checkerboard's squares (2000
#: steps at EMA 0.995 gave a blur over [-4, 4], with or without the FP terms).
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "ncsnpp": dict(preset="small/ncsnpp", dataset="digits", steps=1500, batch_size=32, lr=1e-3,
                   warmup=100, ema=0.995, fp_batch=4, fp_every=10, sample_every=0, eval_every=0,
                   ckpt_every=250, sample_steps=200, num_samples=64),
    "ddpmpp": dict(preset="small/ddpmpp", dataset="digits", steps=1500, batch_size=32, lr=1e-3,
                   warmup=100, ema=0.995, fp_batch=4, fp_every=10, sample_every=0, eval_every=0,
                   ckpt_every=250, sample_steps=200, num_samples=64),
    "mlp": dict(preset=None, dataset="checkerboard", sde="vp", steps=8000, batch_size=256,
                lr=2e-3, warmup=100, ema=0.999, fp_batch=64, fp_every=1, sample_every=0,
                eval_every=500, ckpt_every=500, sample_steps=200, num_samples=2000),
}


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a training run; None marks a per-architecture default (ARCH_DEFAULTS)."""

    workdir: str = "runs/fpkern"      # output folder: checkpoints/, samples/, metrics.jsonl
    arch: str = "ncsnpp"              # network: ncsnpp, ddpmpp (small presets) or mlp (2-D toy data)
    preset: str | None = None         # fpkern.models preset name (None: small/<arch>)
    sde: str | None = None            # ve, vp or subvp (None: the preset's; vp for mlp)
    dataset: str | None = None        # image set (fpkern.data.images) or toy set (fpkern.data.toy2d)
    data_dir: str | None = None       # folder of file-based image sets
    fp_preset: str = "fpkern"         # where alpha, beta, fp_normalize, fp_scalar left at None
                                      # come from: fpkern (the study's recipe) or paper
                                      # (FP-Diffusion's objective), fpkern.losses.FP_PRESETS
    alpha: float | None = None        # weight of the FP vector term L_vec (0 disables it)
    beta: float | None = None         # weight of the FP scalar term L_scalar (0 disables it)
    m: float = 2.0                    # power of the residual norm in L_vec
    weighting: str = "ll"             # w(t) of L_vec: constant, convention (g) or ll (g^2)
    fp_points: str = "pert"           # FP points: pert (DSM's x_t), x (clean data), random
    form: str = "div"                 # residual form: div or laplacian
    method: str = "fused"             # residual method: fused, exact or naive
    probes: int = 1                   # Hutchinson probes per sample
    fp_estimator: str = "vector"      # L_vec from r (vector) or forward-only (u . r)^2 (projected)
    fp_normalize: str | None = None   # L_vec / D^m (paper) or / D^(m/2) (dim: per-dimension)
    fp_scalar: str | None = None      # L_scalar: batch norm of h (paper) or consistent (0 at truth)
    fp_batch: int | None = None       # samples per rank the FP terms use (0: all)
    fp_every: int | None = None       # add the FP terms every this many steps
    dsm_weighting: str = "ll"         # DSM lambda(t): ll (g^2) or score_sde (sigma^2)
    eps: float = 1e-5                 # t ~ U[eps, T]
    steps: int | None = None          # total optimizer steps
    batch_size: int | None = None     # global batch size, split over ranks
    lr: float | None = None           # Adam learning rate
    warmup: int | None = None         # linear learning-rate warm-up steps
    grad_clip: float = 1.0            # clip the gradient norm to this (<= 0: no clipping)
    ema: float | None = None          # EMA decay, in [0, 1)
    seed: int = 0                     # seed of the weights, data, noise and every global RNG
    resume: bool = False              # continue from the newest checkpoint in workdir
    init_from: str | None = None      # Score SDE or fpkern checkpoint to fine-tune from (with
                                      # resume: when workdir has no checkpoint yet)
    allow_resume_change: bool = False  # resume despite another sde or dataset (recorded)
    sample_every: int | None = None   # write a sample PNG every this many steps (0: at the end only)
    eval_every: int | None = None     # held-out DSM and FPE residual every this many steps (0: never)
    ckpt_every: int | None = None     # checkpoint every this many steps (and at the end)
    keep_ckpts: int = 3               # checkpoints kept in workdir/checkpoints (<= 0: all)
    log_every: int = 10               # steps between metrics.jsonl rows
    num_samples: int | None = None    # samples per preview
    sample_steps: int | None = None   # reverse-SDE steps per preview
    mlp_width: int = 128              # MLP hidden width
    mlp_depth: int = 3                # MLP depth
    device: str = "cpu"               # torch device (cuda: cuda:LOCAL_RANK under torchrun)
    amp: bool = False                 # autocast the loss to bfloat16 (any device)
    deterministic: bool = True        # torch.use_deterministic_algorithms (warn only)
    progress: bool = True             # tqdm progress bar on rank 0
    tensorboard: bool = True          # TensorBoard scalars when tensorboard is installed

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> TrainConfig:
        """From a mapping of option names ('-' or '_'); unknown names raise ValueError."""
        options = {str(k).replace("-", "_"): v for k, v in options.items()}
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown}; valid names: {sorted(valid)}")
        return cls(**options)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TrainConfig:
        """From a TOML (or YAML) file of options, as ``python -m fpkern.train --config``;
        a file that cannot be read, an unknown name or a wrong type raises UsageError."""
        return cls(**file_options(path))

    def resolved(self, world_size: int = 1) -> TrainConfig:
        """The config the loop runs: per-arch defaults filled in (fp_batch 0 stays 0, all
        samples), every value converted to its field's type and checked; a bad option raises
        ValueError naming it."""
        from fpkern.losses import FP_PRESETS

        check_choice("arch", self.arch, ARCHS)
        check_choice("fp_preset", self.fp_preset, sorted(FP_PRESETS))
        given = dataclasses.replace(self, workdir=os.fspath(self.workdir))
        knobs = FP_PRESETS[self.fp_preset]
        preset = {"alpha": knobs["alpha"], "beta": knobs["beta"],
                  "fp_normalize": knobs["normalize"], "fp_scalar": knobs["scalar"]}
        filled = {k: v for k, v in {**ARCH_DEFAULTS[self.arch], **preset}.items()
                  if getattr(given, k) is None}
        cfg = dataclasses.replace(given, **filled)
        cfg = dataclasses.replace(cfg, **{f.name: _typed(f.name, getattr(cfg, f.name), hint)
                                          for f, hint in _HINTS})
        cfg._check(world_size)
        return cfg

    def checkpoint_options(self, given: TrainConfig) -> dict[str, Any]:
        """The "options" a checkpoint saves, for this resolved config of ``given``: every
        field, with 'sde' and 'ema' as given and their resolved values as 'sde_name' and
        'ema_decay' (the keys fpkern.sample reads), fp_batch None for all samples."""
        options = dataclasses.asdict(self)
        options.update(fp_batch=self.fp_batch or None, sde=given.sde, ema=given.ema)
        options.update(sde_name=self.sde, ema_decay=self.ema)
        return options

    def _check(self, world_size: int) -> None:
        """Choices, ranges, combinations and paths of a resolved config."""
        from fpkern.data.images import IMAGE_SETS
        from fpkern.data.toy2d import TOY_SETS
        from fpkern.losses import (DSM_WEIGHTINGS, ESTIMATORS, FP_POINTS, NORMALIZATIONS,
                                   SCALAR_TERMS, WEIGHTINGS)
        from fpkern.models import PRESETS
        from fpkern.ops import FORMS, METHODS
        from fpkern.sde import SDES

        if self.sde is not None:
            check_choice("sde", self.sde, sorted(SDES))
        if (self.steps < 0 or self.batch_size < 1 or self.fp_every < 1 or self.ckpt_every < 1
                or self.log_every < 1):
            raise ValueError("steps must be >= 0 and batch_size, fp_every, ckpt_every, log_every >= 1")
        if (self.arch == "mlp") != (self.dataset in TOY_SETS):
            valid = sorted(TOY_SETS) if self.arch == "mlp" else sorted(IMAGE_SETS)
            raise ValueError(f"dataset {self.dataset!r} does not fit arch {self.arch!r}; "
                             f"valid names: {valid}")
        if self.batch_size % world_size:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by the "
                             f"{world_size} ranks")
        if self.arch == "mlp" and self.preset is not None:
            raise ValueError("--preset applies to the image architectures, not mlp")
        if self.preset is not None:
            check_choice("preset", self.preset, sorted(PRESETS))
        for name, valid in (("weighting", WEIGHTINGS), ("fp_points", FP_POINTS), ("form", FORMS),
                            ("method", sorted(METHODS)), ("fp_estimator", ESTIMATORS),
                            ("fp_normalize", NORMALIZATIONS), ("fp_scalar", SCALAR_TERMS),
                            ("dsm_weighting", DSM_WEIGHTINGS)):
            check_choice(name, getattr(self, name), valid)
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got {self.alpha}, {self.beta}")
        if self.fp_batch < 0 or self.probes < 1:
            raise ValueError(f"fp_batch must be >= 0 and probes >= 1, got {self.fp_batch}, "
                             f"{self.probes}")
        per_rank = self.batch_size // world_size
        fp_samples = min(self.fp_batch or per_rank, per_rank)
        if self.fp_scalar == "consistent" and self.beta > 0 and fp_samples < 2:
            raise ValueError(f"fp_scalar 'consistent' needs at least 2 FP samples per rank "
                             f"(fp_batch, or batch_size / ranks), got {fp_samples}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"EMA decay must lie in [0, 1), got {self.ema}")
        self._check_counts()
        self._check_paths()
        check_device(self.device)

    def _check_counts(self) -> None:
        """Numbers the loop uses late (the final preview) or that would fail deep inside."""
        for f, hint in _HINTS:
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be finite, got {value}")
        for name in ("num_samples", "sample_steps", "mlp_width", "mlp_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("sample_every", "eval_every", "warmup", "lr"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def _check_paths(self) -> None:
        """The workdir, the data folder and the --init-from file, as far as they can be
        checked without reading them."""
        from fpkern.data.images import IMAGE_SETS

        if Path(self.workdir).exists() and not Path(self.workdir).is_dir():
            raise UsageError(f"workdir {self.workdir}: exists and is not a folder")
        if self.dataset in IMAGE_SETS and self.dataset != "digits":  # read from files
            if self.data_dir is None:
                raise UsageError(f"dataset {self.dataset!r} is read from files: set data_dir "
                                 "(--data-dir) to where they are")
            if not Path(self.data_dir).exists():
                raise UsageError(f"data_dir {self.data_dir}: no such file or folder")
        if self.init_from is not None and not Path(self.init_from).is_file():
            raise UsageError(f"init_from: no such checkpoint file {self.init_from!r}")


def check_device(name: str) -> None:
    """UsageError unless name is a torch device this process can use: cpu, cuda[:N] with
    CUDA present (and N visible), or mps where it is available."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r}: not a torch device; use cpu, cuda, cuda:N or mps") \
            from None
    if device.type == "cpu":
        return
    if device.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise UsageError(f"--device {name}: this torch build has no CUDA; use --device cpu")
        count = torch.cuda.device_count()
        if count == 0:
            raise UsageError(f"--device {name}: no CUDA device is visible; use --device cpu")
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {name}: only {count} CUDA device(s) are visible "
                             f"(cuda:0 to cuda:{count - 1})")
        return
    if device.type == "mps" and torch.backends.mps.is_available():
        return
    raise UsageError(f"--device {name}: not available here; use cpu, cuda, cuda:N or mps")


_KIND_NAMES = {bool: "bool (true or false)", int: "int (a whole number)",
               float: "float (a number)", str: "str (a string)"}


def _typed(name: str, value: Any, hint: Any) -> Any:
    """value as the field type hint says (int -> float allowed; bool is no int; no string
    is parsed), or ValueError naming the field."""
    kinds = typing.get_args(hint) or (hint,)
    if value is None:
        if type(None) in kinds:
            return None
        raise ValueError(f"{name} must be set, got None")
    kind = next(k for k in kinds if k is not type(None))
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return value
    got = f"the {type(value).__name__} {value!r}" if isinstance(value, (str, list, dict)) \
        else repr(value)
    raise ValueError(f"{name} must be {_KIND_NAMES.get(kind, kind.__name__)}, got {got}")


_HINTS = [(f, typing.get_type_hints(TrainConfig)[f.name]) for f in dataclasses.fields(TrainConfig)]


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Options from a TOML (.toml) or YAML (.yaml/.yml) file, keys with '_' for '-', as
    written (``file_options`` checks them). A top-level [train] table, if present, is used.
    A file that cannot be read or parsed raises UsageError naming it."""
    path = Path(path)
    try:
        data = _parse(path)
    except OSError as e:
        raise UsageError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:  # tomllib.TOMLDecodeError, yaml's errors are made ValueErrors
        raise UsageError(f"--config {path}: {e}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a table of options, got "
                         f"{type(data).__name__}")
    if isinstance(data.get("train"), dict):
        data = data["train"]
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _parse(path: Path) -> Any:
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError("YAML configs need PyYAML; use TOML instead") from None
        try:
            return yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(" ".join(str(e).split())) from None
    import tomllib

    with open(path, "rb") as fh:
        return tomllib.load(fh)


def file_options(path: str | os.PathLike,
                 extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The options of a config file, each of its field's type (TrainConfig, or ``extra``:
    {name: type hint} of options outside it), as ``load_config`` reads them; an unknown
    name or a value of another type raises UsageError naming the file and the key."""
    options = load_config(path)
    hints = {f.name: hint for f, hint in _HINTS}
    hints.update(extra or {})
    unknown = sorted(set(options) - set(hints))
    if unknown:
        raise UsageError(f"--config {path}: unknown option(s) {unknown}; valid names: "
                         f"{sorted(hints)}")
    typed = {}
    for name, value in options.items():
        try:
            typed[name] = _typed(name, value, hints[name])
        except ValueError as e:
            raise UsageError(f"--config {path}: {e}") from None
    return typed
