"""The training loop: DSM + FP regulariser (docs/MATH.md 4), Adam with warm-up and clipping, EMA,
atomic checkpoints with exact resume, JSONL/TensorBoard scalars, preview samples, and data
parallelism over torch.distributed (``torchrun``; gloo on CPU, NCCL on CUDA).

The run is a few small parts over one ``_Run`` (the live objects of one rank): set-up,
resume, the optimizer step, and the checkpoint, preview and evaluation hooks.

Data parallelism: every rank holds the whole model, takes its own share of each batch
(batch_size / world_size samples; image epochs split as DistributedSampler) and its own
noise, and the gradients are averaged with one all-reduce before the optimizer step. This
is what DistributedDataParallel does; it is written out because the FP term calls the
network many times per step (forward-mode passes included), which DDP's hooks do not
support. Rank 0 alone logs and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn

from fpkern.errors import UsageError
from fpkern.losses import DSMLoss, FPLoss
from fpkern.models import CheckpointMismatchError, ScoreFn, build_model
from fpkern.ops import fpe_residual
from fpkern.plots import save_image_grid, save_scatter
from fpkern.sampling import sample
from fpkern.sde import LinearSDE
from fpkern.train import checkpoint as ckpt_io
from fpkern.train.config import ARCH_DEFAULTS, ARCHS, TrainConfig
from fpkern.train.data import ImageBatches, TensorItems, ToyBatches, is_toy
from fpkern.train.ema import EMA
from fpkern.train.interrupt import StopRequest, TrainingInterrupted
from fpkern.train.lock import lock_workdir
from fpkern.train.metrics import MetricsWriter
from fpkern.train.optim import adam
from fpkern.train.rng import seed_all

__all__ = ["training_loop", "TrainConfig", "TrainResult", "NonFiniteLossError", "ARCHS",
           "ARCH_DEFAULTS"]

log = logging.getLogger("fpkern.train")


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient norm became NaN or infinite; the step was not applied."""


class TrainResult(NamedTuple):
    model: nn.Module          # the raw network after the last step
    ema: nn.Module            # its EMA copy
    score_fn: nn.Module       # ScoreFn of the EMA network
    sde: Any
    step: int
    workdir: Path


@dataclass
class _Run:
    """The live objects of one rank's run, built by _setup."""

    cfg: TrainConfig                  # resolved
    options: dict[str, Any]           # what checkpoints save as "options"
    rank: int
    world: int
    device: torch.device
    net: nn.Module
    forward_sde: LinearSDE
    data_config: dict[str, Any] | None
    score_fn: ScoreFn
    dsm_loss: DSMLoss
    fp_loss: FPLoss | None
    ema_weights: EMA
    params: list[nn.Parameter]
    opt: torch.optim.Optimizer
    batches: ToyBatches | ImageBatches | None = None
    noise_gen: torch.Generator | None = None
    eval_cache: dict[str, Any] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def workdir(self) -> Path:
        return Path(self.cfg.workdir)

    @property
    def ckpt_dir(self) -> Path:
        return self.workdir / "checkpoints"

    @property
    def image(self) -> bool:
        return not is_toy(self.cfg.dataset)

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.net.input_shape) if self.image else (2,)

    @property
    def generators(self) -> dict[str, torch.Generator]:
        """The run's own generators, saved and restored with the global RNG states."""
        return {"noise": self.noise_gen}

    def autocast(self):
        if not self.cfg.amp:
            return contextlib.nullcontext()
        # bfloat16 on every device: float16's range gives the jet passes' second-order
        # rows inf/NaN (docs/MATH.md 8), and bfloat16 needs no loss scaling
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def ema_score_fn(self) -> ScoreFn:
        return ScoreFn(self.ema_weights.module, self.forward_sde)


# ---- the loop ----------------------------------------------------------------------------
def training_loop(config: TrainConfig | None = None, /, **options: Any) -> TrainResult:
    """Train a score model with DSM + alpha L_vec + beta L_scalar; see the module docstring.

    Either a TrainConfig or its fields as keywords (``training_loop(arch="mlp", steps=10)``);
    TrainConfig documents every option.

    The run holds the workdir's lock (fpkern.train.lock) from start to end: a second run in
    the same workdir raises WorkdirBusy, a UsageError naming this one. SIGINT and SIGTERM
    stop it after the step under way, with a checkpoint of that step, by raising
    TrainingInterrupted (fpkern.train.interrupt), a SystemExit with code 128 + the signal."""
    given = config if config is not None else TrainConfig(**options)
    if config is not None and options:
        raise TypeError("pass either a TrainConfig or keyword options, not both")
    cfg = given.resolved(world_size=_world_size())
    rank, world, own_group = _dist_env()
    lock = None
    try:
        lock = lock_workdir(cfg.workdir, rank, world)
        if not cfg.resume:
            _check_unused(cfg.workdir)
        with StopRequest() as stop:
            run = _setup(cfg, cfg.checkpoint_options(given), rank, world)
            start = _resume(run) if cfg.resume else 0
            step = _train(run, start, stop)
        return TrainResult(run.net, run.ema_weights.module, run.ema_score_fn(), run.forward_sde,
                           step, run.workdir)
    finally:
        if lock is not None:
            lock.release()
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def _check_unused(workdir: str) -> None:
    """A run from scratch must not start over a workdir's checkpoints: its own would be
    pruned as older than them, and the earlier run's lost."""
    ckpts = ckpt_io.list_checkpoints(Path(workdir) / "checkpoints")
    if ckpts:
        raise UsageError(f"--workdir {workdir} already holds checkpoints (newest {ckpts[-1].name});"
                         " pass --resume to continue that run, or choose another --workdir")


def _world_size() -> int:
    if dist.is_initialized():
        return dist.get_world_size()
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def _dist_env() -> tuple[int, int, bool]:
    """(rank, world_size, initialised_here): init from torchrun's env vars when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size(), True


# ---- set-up ------------------------------------------------------------------------------
def _setup(cfg: TrainConfig, options: dict[str, Any], rank: int, world: int) -> _Run:
    """Model, SDE, losses, EMA, optimizer, data and noise of one rank. The order of the
    random draws is part of the reproducibility contract: weights from seed_all(seed) (the
    same on every rank, then broadcast), data and noise from per-rank seeds."""
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    device = _device(cfg, rank, world)
    seed_all(cfg.seed)
    net, forward_sde, data_config, score_sde_config = build_model(
        cfg.arch, preset=cfg.preset, sde=cfg.sde, mlp_width=cfg.mlp_width,
        mlp_depth=cfg.mlp_depth)
    options = {**options, "forward_sde": repr(forward_sde)}  # what --resume compares
    # --init-from starts the run; with --resume, while the workdir has no checkpoint yet
    if cfg.init_from is not None and not (
            cfg.resume and ckpt_io.list_checkpoints(Path(cfg.workdir) / "checkpoints")):
        _load_init(net, cfg.init_from, score_sde_config)
    net.to(device)
    if world > 1:
        for t in list(net.parameters()) + list(net.buffers()):
            dist.broadcast(t.data, 0)
    params = [p for p in net.parameters() if p.requires_grad]
    run = _Run(cfg=cfg, options=options, rank=rank, world=world, device=device, net=net,
               forward_sde=forward_sde, data_config=data_config,
               score_fn=ScoreFn(net, forward_sde),
               dsm_loss=DSMLoss(forward_sde, weighting=cfg.dsm_weighting, eps=cfg.eps),
               fp_loss=_fp_loss(cfg, forward_sde), ema_weights=EMA(net, cfg.ema), params=params,
               opt=adam(params, cfg.lr))
    # data and noise: one generator per rank for the loss noise, one for the data
    seed_all(cfg.seed * 1000003 + rank + 1)  # global RNGs (dropout) differ per rank
    per_rank = cfg.batch_size // world
    if run.image:
        run.batches = _image_batches(cfg, data_config, per_rank, rank, world)
    else:
        run.batches = ToyBatches(cfg.dataset, per_rank, seed=cfg.seed, rank=rank)
    run.noise_gen = torch.Generator().manual_seed(cfg.seed * 1000003 + 7919 * (rank + 1))
    return run


def _device(cfg: TrainConfig, rank: int, world: int) -> torch.device:
    device = torch.device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    return device


def _fp_loss(cfg: TrainConfig, forward_sde: LinearSDE) -> FPLoss | None:
    """The FP regulariser of the options, None when both of its weights are 0."""
    if cfg.alpha <= 0 and cfg.beta <= 0:
        return None
    return FPLoss(forward_sde, alpha=cfg.alpha, beta=cfg.beta, m=cfg.m, weighting=cfg.weighting,
                  fp_points=cfg.fp_points, form=cfg.form, method=cfg.method, probes=cfg.probes,
                  batch=cfg.fp_batch or None, eps=cfg.eps, estimator=cfg.fp_estimator,
                  normalize=cfg.fp_normalize, scalar=cfg.fp_scalar)


def _image_batches(cfg: TrainConfig, data_config, per_rank: int, rank: int,
                   world: int) -> ImageBatches:
    """The rank's batches of the image set; missing or unreadable files raise UsageError
    (a malformed one, fpkern.data.formats.DataFormatError), naming them."""
    from fpkern.data.images import load_image_dataset
    from fpkern.data.transforms import ImageDataset, prepare_images

    try:
        images, _ = load_image_dataset(cfg.dataset, cfg.data_dir,
                                       image_size=int(data_config["image_size"]),
                                       channels=int(data_config["num_channels"]))
    except OSError as e:  # FileNotFoundError naming what is expected, permissions, ...
        raise UsageError(f"--data-dir {cfg.data_dir}: {e}") from None
    flip = bool(data_config.get("random_flip", False))
    deq = bool(data_config.get("uniform_dequantization", False))
    centered = bool(data_config.get("centered", False))
    if flip or deq:
        items = ImageDataset(images, random_flip=flip, uniform_dequantization=deq,
                             centered=centered, seed=cfg.seed)
    else:  # deterministic transform: convert once
        items = TensorItems(prepare_images(images, centered=centered))
    return ImageBatches(items, per_rank, seed=cfg.seed, rank=rank, world_size=world)


def _load_init(net: nn.Module, path: str, score_sde_config) -> None:
    """Initialise net from an fpkern checkpoint's EMA weights or a Score SDE checkpoint's;
    a file that is neither, or whose weights do not fit net, raises UsageError naming it."""
    try:
        raw = ckpt_io.read_torch_file(path, map_location="cpu")
    except ckpt_io.CheckpointReadError as e:
        raise UsageError(f"--init-from {e}") from None
    if ckpt_io.is_fpkern_checkpoint(raw):
        ckpt_io.check_fits(path, raw.get("options") or {}, None, net, raw.get("ema"),
                           what="--init-from")
        net.load_state_dict(raw["ema"])
        log.info("initialised from fpkern checkpoint %s (EMA weights, step %s)", path,
                 raw.get("step"))
        return
    if score_sde_config is None:
        raise UsageError(f"--init-from {path}: not an fpkern training checkpoint; Score SDE "
                         "checkpoints need an image architecture (ncsnpp, ddpmpp)")
    from fpkern.models import load_score_sde_checkpoint

    try:
        loaded = load_score_sde_checkpoint(path, score_sde_config)
    except CheckpointMismatchError as e:
        detail = "; ".join(line.strip() for line in str(e).splitlines()[:2])
        raise UsageError(f"--init-from {path}: {detail}") from None
    net.load_state_dict(loaded.state_dict())
    log.info("initialised from Score SDE checkpoint %s (EMA weights)", path)


# ---- resume and checkpoint ---------------------------------------------------------------
def _resume(run: _Run) -> int:
    """Load the newest checkpoint in the workdir that can be read, passing over the others
    with a warning (weights, EMA, optimizer, every random state and the data
    position); the step to continue from, 0 if there is none yet (the run then starts as
    _setup built it: from --init-from, or from scratch). A checkpoint of another network
    is refused; of another SDE or dataset too, unless allow_resume_change (the change is
    then recorded in the options the next checkpoints save)."""
    found = ckpt_io.list_checkpoints(run.ckpt_dir)
    if not found:
        if run.is_main:
            log.info("--resume: no checkpoint in %s yet, starting from %s", run.ckpt_dir,
                     f"--init-from {run.cfg.init_from}" if run.cfg.init_from else "scratch")
        return 0
    path, state = ckpt_io.newest_readable(found, warn=run.is_main)
    stored = state["options"] if isinstance(state["options"], dict) else {}
    ckpt_io.check_fits(path, stored, run.cfg, run.net, state["model"], what="--resume")
    start = int(state["step"])
    changes = ckpt_io.resume_changes(path, stored, run.cfg, run.forward_sde, start)
    if changes:
        run.options["resume_changes"] = changes
    run.net.load_state_dict(state["model"])
    run.ema_weights.load_state_dict(state["ema"])
    run.opt.load_state_dict(state["optimizer"])
    if len(state["rng"]) == run.world:
        ckpt_io.restore_rng(state["rng"][run.rank], run.generators)
        if stored.get("dataset", run.cfg.dataset) == run.cfg.dataset:
            run.batches.load_state(state["data"][run.rank])
    else:
        log.warning("checkpoint was written by %d rank(s), now %d: random streams "
                    "restart, the run will not match an uninterrupted one",
                    len(state["rng"]), run.world)
    if run.is_main:
        log.info("resumed from %s at step %d", path, start)
    return start


def _save(run: _Run, step: int) -> None:
    """Checkpoint on rank 0, with every rank's random states and data position."""
    rng = [ckpt_io.capture_rng(run.generators)]
    data_state = [run.batches.state()]
    if run.world > 1:
        rng, data_state = [None] * run.world, [None] * run.world
        dist.all_gather_object(rng, ckpt_io.capture_rng(run.generators))
        dist.all_gather_object(data_state, run.batches.state())
    if not run.is_main:
        return
    state = {"format": ckpt_io.FORMAT, "version": 1, "step": step,
             "model": run.net.state_dict(), "ema": run.ema_weights.state_dict(),
             "optimizer": run.opt.state_dict(),
             "rng": rng, "data": data_state, "options": run.options}
    path = ckpt_io.save_checkpoint(run.ckpt_dir, step, state, keep=run.cfg.keep_ckpts)
    log.debug("wrote %s", path)


# ---- preview and evaluation (rank 0; their own generators, the training RNGs untouched) --
def _preview(run: _Run, step: int) -> None:
    """Sample the EMA network with the reverse SDE and write samples/samples_<step>.png."""
    if not run.is_main:
        return
    cfg = run.cfg
    (run.workdir / "samples").mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(cfg.seed + 12345)
    with torch.no_grad():
        x = sample(run.ema_score_fn(), run.forward_sde, (cfg.num_samples,) + run.data_shape,
                   method="reverse_diffusion", steps=cfg.sample_steps, generator=g,
                   device=run.device).samples
    path = run.workdir / "samples" / f"samples_{step:08d}.png"
    if run.image:
        centered = bool(run.data_config.get("centered", False))
        save_image_grid(x, path, data_range=(-1.0, 1.0) if centered else (0.0, 1.0))
    else:
        save_scatter(x, path, title=f"{cfg.dataset}, step {step}")
    log.info("wrote %s", path)


def _evaluate(run: _Run, step: int) -> dict[str, float]:
    """Held-out DSM loss and mean squared FPE residual at t = 0.01 of the EMA network, on a
    fixed set (drawn at the first call) with a fixed noise stream."""
    if not run.is_main:
        return {}
    cfg, cache = run.cfg, run.eval_cache
    if not cache:
        g = torch.Generator().manual_seed(cfg.seed + 999)
        n = 16 if run.image else 512
        x = (torch.stack([run.batches.dataset[i] for i in range(n)]) if run.image
             else ToyBatches(cfg.dataset, n, seed=cfg.seed + 999).next())
        cache.update(x=x.to(run.device), g=g.get_state())
    x = cache["x"]
    g = torch.Generator().set_state(cache["g"])
    sf = run.ema_score_fn()
    with torch.no_grad():
        d = run.dsm_loss(sf, x, generator=g)
    t = torch.full((x.shape[0],), 0.01, dtype=x.dtype, device=run.device)
    res = fpe_residual(sf, d.xt, t, run.forward_sde, form="div",
                       method="fused" if run.image else "exact", probes=1, generator=g).detach()
    out = {"eval/dsm": float(d.loss.mean()),
           "eval/fpe_residual": float(res.flatten(1).pow(2).sum(1).mean() / d.xt[0].numel() ** 2)}
    log.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in out.items()))
    return out


# ---- the steps ---------------------------------------------------------------------------
def _train(run: _Run, start: int, stop: StopRequest | None = None) -> int:
    """Steps start..cfg.steps with their hooks, the final preview and the ranks' agreement
    check; the last step. A stop request (fpkern.train.interrupt) ends the run at the next
    step boundary, the same on every rank: a checkpoint of that step and a metrics row of
    its last steps are written, then TrainingInterrupted is raised. The metrics file keeps
    only its rows up to `start` (fpkern.train.metrics), so no step is ever in it twice."""
    from tqdm import tqdm

    cfg, stop = run.cfg, stop if stop is not None else StopRequest()
    run.workdir.mkdir(parents=True, exist_ok=True)
    writer = (MetricsWriter(run.workdir, tensorboard=cfg.tensorboard, start_step=start)
              if run.is_main else None)
    if run.is_main:
        log.info("arch %s (%d parameters), %r, data %s %s, %d rank(s) x batch %d, steps %d, "
                 "FP %r every %d step(s)", cfg.arch, sum(p.numel() for p in run.params),
                 run.forward_sde, cfg.dataset, run.data_shape, run.world,
                 cfg.batch_size // run.world, cfg.steps, run.fp_loss, cfg.fp_every)
    bar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and run.is_main),
               dynamic_ncols=True, desc="train")
    meter, step, saved = _Meter(), start, None
    try:
        while step < cfg.steps and not stop.agreed(run.device):
            terms, lr_now = _step(run, step)
            step += 1
            meter.add(terms, lr_now)
            bar.update(1)
            if run.is_main and (step % cfg.log_every == 0 or step == cfg.steps):
                writer.write(step, meter.row(cfg.fp_every))
                bar.set_postfix(meter.postfix())
            if _hooks(run, step, writer):
                saved = step
        if stop.agreed(run.device):
            if step > start and saved != step:
                _save(run, step)
                saved = step
            if run.is_main and meter.count:
                writer.write(step, meter.row(cfg.fp_every))
        else:
            if cfg.steps > start or not (run.workdir / "samples").exists():
                _preview(run, step)
            if run.world > 1:
                _check_ranks_agree(run)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    if stop.signum is not None:
        wrote = run.is_main and (saved is not None or start > 0)
        stopped = TrainingInterrupted(stop.signum, step,
                                      ckpt_io.latest_checkpoint(run.ckpt_dir) if wrote else None)
        if run.is_main:
            log.warning("%s", stopped)
        raise stopped
    return step


def _hooks(run: _Run, step: int, writer: MetricsWriter | None) -> bool:
    """Evaluation, preview and checkpoint after a step, each on its own schedule; whether
    a checkpoint of the step was written."""
    cfg = run.cfg
    if cfg.eval_every > 0 and step % cfg.eval_every == 0 and run.is_main:
        writer.write(step, _evaluate(run, step))
    if cfg.sample_every > 0 and step % cfg.sample_every == 0 and step != cfg.steps:
        _preview(run, step)
    if step % cfg.ckpt_every == 0 or step == cfg.steps:
        _save(run, step)
        return True
    return False


def _step(run: _Run, step: int) -> tuple[dict[str, torch.Tensor], float]:
    """One optimizer step (the step-th, from 0): ({term: value}, learning rate). Raises
    NonFiniteLossError, without applying the step, if the loss or gradient norm is not finite."""
    cfg = run.cfg
    x = run.batches.next().to(run.device)
    lr_now = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup > 0 else cfg.lr
    for group in run.opt.param_groups:
        group["lr"] = lr_now
    loss, terms = _loss(run, x, run.fp_loss is not None and step % cfg.fp_every == 0)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    if run.world > 1:
        _average_gradients(run.params, run.world)
    stats = torch.stack([loss.detach(), _grad_norm(run.params, cfg.grad_clip).to(loss.dtype)])
    if run.world > 1:
        dist.all_reduce(stats)
        stats /= run.world
    if not bool(torch.isfinite(stats).all()):
        what = "loss" if not math.isfinite(float(stats[0])) else "gradient norm"
        raise NonFiniteLossError(
            f"non-finite {what} at step {step + 1} (loss {float(stats[0])}, terms "
            f"{ {k: float(v) for k, v in terms.items()} }); the step was not applied and the "
            f"last checkpoint in {run.ckpt_dir} is intact")
    run.opt.step()
    run.ema_weights.update(run.net, step + 1)
    terms["loss"], terms["grad_norm"] = stats[0], stats[1]
    return terms, lr_now


def _loss(run: _Run, x: torch.Tensor, use_fp: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(the scalar loss, its detached terms) of a batch, under autocast if --amp."""
    with run.autocast():
        if use_fp:      # one pass for both terms where the FP form allows it
            dout, fout = run.fp_loss.with_dsm(run.dsm_loss, run.score_fn, x,
                                              generator=run.noise_gen)
        else:
            dout = run.dsm_loss(run.score_fn, x, generator=run.noise_gen)
        loss = dout.loss.float().mean()
        terms = {"dsm": loss.detach()}
        if use_fp:
            loss = loss + fout.loss.float()
            terms.update(fp_vec=fout.vec.detach().float().mean(),
                         fp_scalar=fout.scalar.detach().float())
    return loss, terms


def _grad_norm(params: list[nn.Parameter], grad_clip: float) -> torch.Tensor:
    """The total gradient norm, clipping the gradients to grad_clip first if it is > 0."""
    if grad_clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, grad_clip).detach()
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]).detach()


def _average_gradients(params: list[nn.Parameter], world: int) -> None:
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    i = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[i:i + n].view_as(p).clone()
        i += n


def _check_ranks_agree(run: _Run) -> None:
    """Warn if this rank's weights differ from rank 0's (they must not: same updates)."""
    flat = torch.cat([p.detach().reshape(-1) for p in run.net.parameters()]).double()
    ref = flat.clone()
    dist.broadcast(ref, 0)
    if not torch.equal(flat, ref):
        log.warning("rank %d weights differ from rank 0's", run.rank)


class _Meter:
    """Sums of the step terms since the last metrics row, and their running averages for
    the progress bar."""

    def __init__(self):
        self.sums, self.count, self.t_last, self.running = {}, 0, time.perf_counter(), {}
        self.lr = math.nan  # the learning rate of the last step added

    def add(self, terms: dict[str, torch.Tensor], lr_now: float) -> None:
        self.lr = lr_now
        for k, v in terms.items():
            v = float(v)
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.running[k] = v if k not in self.running else 0.9 * self.running[k] + 0.1 * v
        self.count += 1

    def row(self, fp_every: int) -> dict[str, float]:
        """The means since the last row (FP terms over the steps that had them); resets."""
        now = time.perf_counter()
        row = {k: v / self.count for k, v in self.sums.items() if k in ("loss", "dsm", "grad_norm")}
        for k in ("fp_vec", "fp_scalar"):
            if k in self.sums:
                row[k] = self.sums[k] / max(1, math.ceil(self.count / fp_every))
        row.update(lr=self.lr, steps_per_sec=self.count / max(now - self.t_last, 1e-9))
        self.sums, self.count, self.t_last = {}, 0, now
        return row

    def postfix(self) -> dict[str, str]:
        return {k: f"{v:.4g}" for k, v in self.running.items() if k != "grad_norm"}
