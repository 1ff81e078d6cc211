"""The training loop: DSM + FP regulariser (MATH.md 4), Adam with warm-up and clipping, EMA,
atomic checkpoints with exact resume, JSONL/TensorBoard scalars, preview samples, and data
parallelism over torch.distributed (``torchrun``; gloo on CPU, NCCL on CUDA).

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
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn

from fpkern._checks import check_choice
from fpkern.losses import DSMLoss, FPLoss
from fpkern.sde import SDES, VESDE, get_sde
from fpkern.train import checkpoint as ckpt_io
from fpkern.train.data import ImageBatches, TensorItems, ToyBatches, is_toy
from fpkern.train.ema import EMA
from fpkern.train.metrics import MetricsWriter
from fpkern.train.optim import adam

__all__ = ["training_loop", "TrainResult", "NonFiniteLossError", "ARCHS", "ARCH_DEFAULTS"]

log = logging.getLogger("fpkern.train")

ARCHS = ("ncsnpp", "ddpmpp", "mlp")
_SDE_CONFIG_NAMES = {"ve": "vesde", "vp": "vpsde", "subvp": "subvpsde"}

#: Per-architecture defaults for the options left as None. The image defaults train the
#: small preset on the embedded digits in about ten minutes on 2 CPU cores.
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    # Measured on 2 shared CPU cores: a batch-32 DSM step of small/ncsnpp ~0.3 s, the FP
    # terms on 4 samples ~1.5-3 s (forward-mode passes), so the image defaults add them on
    # 4 samples every 10th step: ~0.38 s per step on average, 1500 steps ~10 minutes.
    "ncsnpp": dict(preset="small/ncsnpp", dataset="digits", steps=1500, batch_size=32, lr=1e-3,
                   warmup=100, ema=0.995, fp_batch=4, fp_every=10, sample_every=0, eval_every=0,
                   ckpt_every=250, sample_steps=200, num_samples=64),
    "ddpmpp": dict(preset="small/ddpmpp", dataset="digits", steps=1500, batch_size=32, lr=1e-3,
                   warmup=100, ema=0.995, fp_batch=4, fp_every=10, sample_every=0, eval_every=0,
                   ckpt_every=250, sample_steps=200, num_samples=64),
    "mlp": dict(preset=None, dataset="checkerboard", sde="vp", steps=2000, batch_size=256,
                lr=2e-3, warmup=100, ema=0.995, fp_batch=64, fp_every=1, sample_every=0,
                eval_every=500, ckpt_every=500, sample_steps=200, num_samples=2000),
}


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient norm became NaN or infinite; the step was not applied."""


class TrainResult(NamedTuple):
    model: nn.Module          # the raw network after the last step
    ema: nn.Module            # its EMA copy
    score_fn: nn.Module       # ScoreFn of the EMA network
    sde: Any
    step: int
    workdir: Path


# ---- set-up helpers ----------------------------------------------------------------------
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


def build_model(arch, preset, sde_name, dataset, mlp_width, mlp_depth):
    """(raw network, SDE, image data config or None, Score SDE config or None) for the
    training options; fpkern.sample and fpkern.evaluate rebuild checkpointed models with it."""
    from fpkern.models import MLP, from_score_sde_config, get_config, sde_from_config

    if arch == "mlp":
        if preset is not None:
            raise ValueError("--preset applies to the image architectures, not mlp")
        return MLP(2, width=mlp_width, depth=mlp_depth), get_sde(sde_name or "vp"), None, None
    cfg = get_config(preset)
    model_name = str(cfg["model"]["name"])
    if sde_name is not None:
        if sde_name not in _SDE_CONFIG_NAMES:
            raise ValueError(f"unknown sde {sde_name!r}; valid names: {sorted(_SDE_CONFIG_NAMES)}")
        cfg["training"]["sde"] = _SDE_CONFIG_NAMES[sde_name]
        if model_name == "ncsnpp":  # Score SDE's conventions for the chosen SDE family
            ve = sde_name == "ve"
            cfg["model"].update(scale_by_sigma=ve, embedding_type="fourier" if ve else "positional")
            cfg["data"]["centered"] = not ve
    return from_score_sde_config(cfg), sde_from_config(cfg), cfg["data"], cfg


def _image_batches(dataset, data_dir, data_cfg, per_rank, seed, rank, world):
    from fpkern.data.images import load_image_dataset
    from fpkern.data.transforms import ImageDataset, prepare_images

    images, _ = load_image_dataset(dataset, data_dir, image_size=int(data_cfg["image_size"]),
                                   channels=int(data_cfg["num_channels"]))
    flip = bool(data_cfg.get("random_flip", False))
    deq = bool(data_cfg.get("uniform_dequantization", False))
    centered = bool(data_cfg.get("centered", False))
    if flip or deq:
        ds = ImageDataset(images, random_flip=flip, uniform_dequantization=deq,
                          centered=centered, seed=seed)
    else:  # deterministic transform: convert once
        ds = TensorItems(prepare_images(images, centered=centered))
    return ImageBatches(ds, per_rank, seed=seed, rank=rank, world_size=world)


def _load_init(net, path, cfg):
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt_io.is_fpkern_checkpoint(raw):
        net.load_state_dict(raw["ema"])
        log.info("initialised from fpkern checkpoint %s (EMA weights, step %d)", path, raw["step"])
        return
    if cfg is None:
        raise ValueError(f"{path} is not an fpkern checkpoint; Score SDE checkpoints need an "
                         "image architecture (ncsnpp, ddpmpp)")
    from fpkern.models import load_score_sde_checkpoint

    loaded = load_score_sde_checkpoint(path, cfg)
    net.load_state_dict(loaded.state_dict())
    log.info("initialised from Score SDE checkpoint %s (EMA weights)", path)


def _average_gradients(params, world):
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    i = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[i:i + n].view_as(p).clone()
        i += n


# ---- the loop ----------------------------------------------------------------------------
def training_loop(
    *,
    workdir: str | os.PathLike = "runs/fpkern",  # output folder: checkpoints/, samples/, metrics.jsonl
    arch: str = "ncsnpp",             # network: ncsnpp, ddpmpp (small presets) or mlp (2-D toy data)
    preset: str | None = None,        # fpkern.models preset name (None: small/<arch>)
    sde: str | None = None,           # ve, vp or subvp (None: the preset's; vp for mlp)
    dataset: str | None = None,       # image set (fpkern.data.images) or toy set (fpkern.data.toy2d)
    data_dir: str | None = None,      # folder of file-based image sets
    alpha: float = 0.15,              # weight of the FP vector term L_vec (0 disables it)
    beta: float = 0.01,               # weight of the FP scalar term L_scalar (0 disables it)
    m: float = 2.0,                   # power of the residual norm in L_vec
    weighting: str = "ll",            # w(t) of L_vec: constant, convention (g) or ll (g^2)
    fp_points: str = "pert",          # FP points: pert (DSM's x_t), x (clean data), random
    form: str = "div",                # residual form: div or laplacian
    method: str = "fused",            # residual method: fused, exact or naive
    probes: int = 1,                  # Hutchinson probes per sample
    fp_estimator: str = "vector",     # L_vec from r (vector) or forward-only (u . r)^2 (projected)
    fp_batch: int | None = None,      # samples per rank the FP terms use (None: arch default; 0: all)
    fp_every: int | None = None,      # add the FP terms every this many steps (None: arch default)
    dsm_weighting: str = "ll",        # DSM lambda(t): ll (g^2) or score_sde (sigma^2)
    eps: float = 1e-5,                # t ~ U[eps, T]
    steps: int | None = None,         # total optimizer steps (None: arch default)
    batch_size: int | None = None,    # global batch size, split over ranks (None: arch default)
    lr: float | None = None,          # Adam learning rate (None: arch default)
    warmup: int | None = None,        # linear learning-rate warm-up steps (None: arch default)
    grad_clip: float = 1.0,           # clip the gradient norm to this (<= 0: no clipping)
    ema: float | None = None,         # EMA decay (None: arch default)
    seed: int = 0,                    # seed of the weights, data and noise
    resume: bool = False,             # continue from the newest checkpoint in workdir
    init_from: str | None = None,     # Score SDE or fpkern checkpoint to fine-tune from
    sample_every: int | None = None,  # write a sample PNG every this many steps (0: at the end only)
    eval_every: int | None = None,    # held-out DSM and FPE residual every this many steps (0: never)
    ckpt_every: int | None = None,    # checkpoint every this many steps (and at the end)
    keep_ckpts: int = 3,              # checkpoints kept in workdir/checkpoints
    log_every: int = 10,              # steps between metrics.jsonl rows
    num_samples: int | None = None,   # samples per preview
    sample_steps: int | None = None,  # reverse-SDE steps per preview
    mlp_width: int = 128,             # MLP hidden width
    mlp_depth: int = 3,               # MLP depth
    device: str = "cpu",              # torch device (cuda: cuda:LOCAL_RANK under torchrun)
    amp: bool = False,                # autocast the loss (bfloat16 on CPU, float16 + GradScaler on CUDA)
    deterministic: bool = True,       # torch.use_deterministic_algorithms (warn only)
    progress: bool = True,            # tqdm progress bar on rank 0
    tensorboard: bool = True,         # TensorBoard scalars when tensorboard is installed
) -> TrainResult:
    """Train a score model with DSM + alpha L_vec + beta L_scalar; see the module docstring."""
    from fpkern.models import ScoreFn

    check_choice("arch", arch, ARCHS)
    d = ARCH_DEFAULTS[arch]
    preset = d["preset"] if preset is None else preset
    sde_name = d.get("sde") if sde is None else sde
    dataset = d["dataset"] if dataset is None else dataset
    steps = d["steps"] if steps is None else int(steps)
    batch_size = d["batch_size"] if batch_size is None else int(batch_size)
    lr = d["lr"] if lr is None else float(lr)
    warmup = d["warmup"] if warmup is None else int(warmup)
    ema_decay = d["ema"] if ema is None else float(ema)
    fp_batch = d["fp_batch"] if fp_batch is None else (int(fp_batch) or None)
    fp_every = d["fp_every"] if fp_every is None else int(fp_every)
    sample_every = d["sample_every"] if sample_every is None else int(sample_every)
    eval_every = d["eval_every"] if eval_every is None else int(eval_every)
    ckpt_every = d["ckpt_every"] if ckpt_every is None else int(ckpt_every)
    num_samples = d["num_samples"] if num_samples is None else int(num_samples)
    sample_steps = d["sample_steps"] if sample_steps is None else int(sample_steps)
    if sde_name is not None:
        check_choice("sde", sde_name, sorted(SDES))
    if steps < 0 or batch_size < 1 or fp_every < 1 or ckpt_every < 1 or log_every < 1:
        raise ValueError("steps must be >= 0 and batch_size, fp_every, ckpt_every, log_every >= 1")
    if (arch == "mlp") != is_toy(dataset):
        from fpkern.data.images import IMAGE_SETS
        from fpkern.data.toy2d import TOY_SETS

        valid = sorted(TOY_SETS) if arch == "mlp" else sorted(IMAGE_SETS)
        raise ValueError(f"dataset {dataset!r} does not fit arch {arch!r}; valid names: {valid}")
    options = {k: v for k, v in locals().items()
               if isinstance(v, (int, float, str, bool, type(None))) and not k.startswith("_")}
    options["workdir"] = os.fspath(workdir)

    rank, world, own_group = _dist_env()
    try:
        return _run(**locals())
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def _run(*, workdir, arch, preset, sde_name, dataset, data_dir, alpha, beta, m, weighting,
         fp_points, form, method, probes, fp_estimator, fp_batch, fp_every, dsm_weighting, eps, steps,
         batch_size, lr, warmup, grad_clip, ema_decay, seed, resume, init_from, sample_every,
         eval_every, ckpt_every, keep_ckpts, log_every, num_samples, sample_steps, mlp_width,
         mlp_depth, device, amp, deterministic, progress, tensorboard, options, rank, world,
         ScoreFn, **_):
    from tqdm import tqdm

    workdir = Path(workdir)
    is_main = rank == 0
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    dev = torch.device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(dev)
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {world} ranks")
    per_rank = batch_size // world

    # model, SDE, losses (the same initial weights on every rank: seeded, then broadcast)
    torch.manual_seed(seed)
    net, sde, data_cfg, cfg = build_model(arch, preset, sde_name, dataset, mlp_width, mlp_depth)
    if init_from is not None and not resume:
        _load_init(net, init_from, cfg)
    net.to(dev)
    if world > 1:
        for t in list(net.parameters()) + list(net.buffers()):
            dist.broadcast(t.data, 0)
    score_fn = ScoreFn(net, sde)
    dsm_loss = DSMLoss(sde, weighting=dsm_weighting, eps=eps)
    fp_loss = None
    if alpha > 0 or beta > 0:
        fp_loss = FPLoss(sde, alpha=alpha, beta=beta, m=m, weighting=weighting, fp_points=fp_points,
                         form=form, method=method, probes=probes, batch=fp_batch, eps=eps,
                         estimator=fp_estimator)
    ema = EMA(net, ema_decay)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = adam(params, lr)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and dev.type == "cuda")
    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16 if dev.type == "cpu"
                                       else torch.float16)) if amp else contextlib.nullcontext

    # data and noise: one generator per rank for the loss noise, one for the data
    torch.manual_seed(seed * 1000003 + rank + 1)  # global RNG (dropout) differs per rank
    if is_toy(dataset):
        batches = ToyBatches(dataset, per_rank, seed=seed, rank=rank)
        data_shape, image = (2,), False
    else:
        batches = _image_batches(dataset, data_dir, data_cfg, per_rank, seed, rank, world)
        data_shape, image = tuple(net.input_shape), True
    noise_gen = torch.Generator().manual_seed(seed * 1000003 + 7919 * (rank + 1))
    generators = {"noise": noise_gen}

    # resume
    ckpt_dir = workdir / "checkpoints"
    start = 0
    if resume:
        path = ckpt_io.latest_checkpoint(ckpt_dir)
        if path is None:
            log.info("--resume: no checkpoint in %s, starting from scratch", ckpt_dir)
        else:
            st = ckpt_io.load_checkpoint(path, map_location="cpu")
            net.load_state_dict(st["model"])
            ema.load_state_dict(st["ema"])
            opt.load_state_dict(st["optimizer"])
            if st.get("scaler"):
                scaler.load_state_dict(st["scaler"])
            start = int(st["step"])
            if len(st["rng"]) == world:
                ckpt_io.restore_rng(st["rng"][rank], generators)
                batches.load_state(st["data"][rank])
            else:
                log.warning("checkpoint was written by %d rank(s), now %d: random streams "
                            "restart, the run will not match an uninterrupted one",
                            len(st["rng"]), world)
            if is_main:
                log.info("resumed from %s at step %d", path, start)

    workdir.mkdir(parents=True, exist_ok=True)
    writer = MetricsWriter(workdir, tensorboard=tensorboard) if is_main else None
    if is_main:
        log.info("arch %s (%d parameters), %r, data %s %s, %d rank(s) x batch %d, steps %d, "
                 "FP %r every %d step(s)", arch, sum(p.numel() for p in params), sde, dataset,
                 data_shape, world, per_rank, steps, fp_loss, fp_every)

    def save(step):
        rng = [ckpt_io.capture_rng(generators)]
        data_state = [batches.state()]
        if world > 1:
            rng, data_state = [None] * world, [None] * world
            dist.all_gather_object(rng, ckpt_io.capture_rng(generators))
            dist.all_gather_object(data_state, batches.state())
        if is_main:
            state = {"format": ckpt_io.FORMAT, "version": 1, "step": step,
                     "model": net.state_dict(), "ema": ema.state_dict(),
                     "optimizer": opt.state_dict(),
                     "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                     "rng": rng, "data": data_state, "options": options}
            p = ckpt_io.save_checkpoint(ckpt_dir, step, state, keep=keep_ckpts)
            log.debug("wrote %s", p)

    def preview(step):
        if not is_main:
            return
        (workdir / "samples").mkdir(exist_ok=True)
        from fpkern.sample import save_image_grid, save_scatter
        from fpkern.sampling import sample

        g = torch.Generator().manual_seed(seed + 12345)    # its own stream: training RNG untouched
        with torch.no_grad():
            x = sample(ScoreFn(ema.module, sde), sde, (num_samples,) + data_shape,
                       method="reverse_diffusion", steps=sample_steps, generator=g,
                       device=dev).samples
        path = workdir / "samples" / f"samples_{step:08d}.png"
        if image:
            centered = bool(data_cfg.get("centered", False))
            save_image_grid(x, path, data_range=(-1.0, 1.0) if centered else (0.0, 1.0))
        else:
            save_scatter(x, path, title=f"{dataset}, step {step}")
        log.info("wrote %s", path)

    eval_cache = {}

    def evaluate(step):
        if not is_main:
            return {}
        from fpkern.ops import fpe_residual

        if not eval_cache:
            g = torch.Generator().manual_seed(seed + 999)
            n = 512 if not image else 16
            x = (ToyBatches(dataset, n, seed=seed + 999).next() if not image
                 else torch.stack([batches.dataset[i] for i in range(n)]))
            eval_cache.update(x=x.to(dev), g=g.get_state())
        x = eval_cache["x"]
        g = torch.Generator().set_state(eval_cache["g"])
        sf = ScoreFn(ema.module, sde)
        with torch.no_grad():
            d = dsm_loss(sf, x, generator=g)
        t = torch.full((x.shape[0],), 0.01, dtype=x.dtype, device=dev)
        xt = d.xt
        res = fpe_residual(sf, xt, t, sde, form="div", method="exact" if not image else "fused",
                           probes=1, generator=g).detach()
        out = {"eval/dsm": float(d.loss.mean()),
               "eval/fpe_residual": float(res.flatten(1).pow(2).sum(1).mean() / xt[0].numel() ** 2)}
        log.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in out.items()))
        return out

    # ---- steps ----
    bar = tqdm(total=steps, initial=start, disable=not (progress and is_main), dynamic_ncols=True,
               desc="train")
    sums, count, t_last, running = {}, 0, time.perf_counter(), {}
    step = start
    try:
        while step < steps:
            x = batches.next().to(dev)
            lr_now = lr * min(1.0, (step + 1) / warmup) if warmup > 0 else lr
            for group in opt.param_groups:
                group["lr"] = lr_now
            use_fp = fp_loss is not None and step % fp_every == 0
            with autocast():
                if use_fp:      # one pass for both terms where the FP form allows it
                    dout, fout = fp_loss.with_dsm(dsm_loss, score_fn, x, generator=noise_gen)
                else:
                    dout = dsm_loss(score_fn, x, generator=noise_gen)
                loss = dout.loss.float().mean()
                terms = {"dsm": loss.detach()}
                if use_fp:
                    loss = loss + fout.loss.float()
                    terms.update(fp_vec=fout.vec.detach().float().mean(),
                                 fp_scalar=fout.scalar.detach().float())
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if world > 1:
                _average_gradients(params, world)
            scaler.unscale_(opt)
            gnorm = (torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip > 0
                     else torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
            stats = torch.stack([loss.detach(), gnorm.detach().to(loss.dtype)])
            if world > 1:
                dist.all_reduce(stats)
                stats /= world
            if not bool(torch.isfinite(stats).all()):
                raise NonFiniteLossError(
                    f"non-finite {'loss' if not math.isfinite(float(stats[0])) else 'gradient norm'} "
                    f"at step {step + 1} (loss {float(stats[0])}, terms "
                    f"{ {k: float(v) for k, v in terms.items()} }); the step was not applied and the "
                    f"last checkpoint in {ckpt_dir} is intact")
            scaler.step(opt)
            scaler.update()
            step += 1
            ema.update(net, step)

            terms["loss"], terms["grad_norm"] = stats[0], stats[1]
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v)
                running[k] = float(v) if k not in running else 0.9 * running[k] + 0.1 * float(v)
            count += 1
            bar.update(1)
            if is_main and (step % log_every == 0 or step == steps):
                now = time.perf_counter()
                row = {k: v / count for k, v in sums.items() if k in ("loss", "dsm", "grad_norm")}
                for k in ("fp_vec", "fp_scalar"):
                    if k in sums:
                        row[k] = sums[k] / max(1, math.ceil(count / fp_every))
                row.update(lr=lr_now, steps_per_sec=count / max(now - t_last, 1e-9))
                writer.write(step, row)
                bar.set_postfix({k: f"{v:.4g}" for k, v in running.items() if k != "grad_norm"})
                sums, count, t_last = {}, 0, now
            if eval_every > 0 and step % eval_every == 0 and is_main:
                writer.write(step, evaluate(step))
            if sample_every > 0 and step % sample_every == 0 and step != steps:
                preview(step)
            if step % ckpt_every == 0 or step == steps:
                save(step)
        if steps > start or not (workdir / "samples").exists():
            preview(step)
        if world > 1:  # the ranks must agree: averaged gradients, same updates
            flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).double()
            ref = flat.clone()
            dist.broadcast(ref, 0)
            if not torch.equal(flat, ref):
                log.warning("rank %d weights differ from rank 0's", rank)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    return TrainResult(net, ema.module, ScoreFn(ema.module, sde), sde, step, workdir)
