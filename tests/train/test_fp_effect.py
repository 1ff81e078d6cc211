"""The FP regulariser lowers the measured FPE residual relative to DSM alone (equal steps)."""

import torch

from fpkern.data.toy2d import sample_toy
from fpkern.ops import fpe_residual
from fpkern.train import training_loop


def _residual_after(alpha, workdir):
    res = training_loop(workdir=workdir, arch="mlp", dataset="8gaussians", mlp_width=64,
                        mlp_depth=3, batch_size=128, fp_batch=32, steps=150, warmup=10, lr=2e-3,
                        ema=0.0, alpha=alpha, beta=0.0, seed=0, ckpt_every=1000, eval_every=0,
                        sample_steps=5, num_samples=10, progress=False, tensorboard=False)
    g = torch.Generator().manual_seed(5)  # held-out points at small t, same for both models
    x = sample_toy("8gaussians", 512, generator=torch.Generator().manual_seed(99))
    t = 0.05 + 0.45 * torch.rand(512, generator=g)
    mean, std = res.sde.marginal_prob(x, t)
    xt = mean + std[:, None] * torch.randn(512, 2, generator=g)
    r = fpe_residual(res.score_fn, xt, t, res.sde, method="exact").detach()
    return float(r.pow(2).sum(1).mean())


def test_fp_lowers_residual(tmp_path):
    dsm_only = _residual_after(0.0, tmp_path / "dsm")
    with_fp = _residual_after(0.15, tmp_path / "fp")
    assert with_fp < dsm_only / 5, (with_fp, dsm_only)
