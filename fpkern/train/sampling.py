"""A small reverse-SDE sampler for the training previews, and the PNG writers.

Private to training: the full samplers live in ``fpkern.sampling``. The sampler is the
reverse-diffusion predictor of Score SDE, x <- x - f_rev + G z over a float64 time grid from
T to eps, using ``sde.reverse(score_fn).discretize`` with the SDE's N set to ``steps``; the
last step returns the noise-free mean.
"""

from __future__ import annotations

import copy
import logging
import math

import torch

__all__ = ["reverse_sde_sample", "save_image_grid", "save_scatter"]

log = logging.getLogger(__name__)


@torch.no_grad()
def reverse_sde_sample(score_fn, sde, shape, *, steps: int = 200, eps: float = 1e-3,
                       generator: torch.Generator | None = None, device=None,
                       dtype=torch.float32) -> torch.Tensor:
    """Samples of shape `shape` from the reverse SDE of `sde` with `steps` steps."""
    sde = copy.copy(sde)
    sde.N = int(steps)
    rsde = sde.reverse(score_fn, probability_flow=False)
    x = sde.prior_sampling(shape, generator=generator, dtype=dtype).to(device)
    ts = torch.linspace(sde.T, eps, steps, dtype=torch.float64)
    mean = x
    for t in ts:
        tt = torch.full((shape[0],), float(t), device=device, dtype=dtype)
        f, G = rsde.discretize(x, tt)
        mean = x - f
        z = torch.randn(shape, generator=generator, dtype=dtype).to(device)
        x = mean + G.reshape(-1, *([1] * (x.dim() - 1))) * z
    return mean


def save_image_grid(x: torch.Tensor, path, *, centered: bool = False) -> None:
    """Images [N, C, H, W] in [0, 1] (or [-1, 1] if centered) as one PNG grid."""
    from PIL import Image

    x = x.detach().float().cpu()
    if centered:
        x = (x + 1) / 2
    x = x.clamp(0, 1)
    n, c, h, w = x.shape
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    pad = 1
    grid = torch.ones(c, rows * (h + pad) + pad, cols * (w + pad) + pad) * 0.5
    for i in range(n):
        r, k = divmod(i, cols)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h,
             pad + k * (w + pad): pad + k * (w + pad) + w] = x[i]
    arr = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")
    scale = max(1, 256 // max(grid.shape[1:]))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)


def save_scatter(x: torch.Tensor, path, *, title: str = "", lim: float = 4.5) -> None:
    """2-D points [N, 2] as a matplotlib scatter PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    pts = x.detach().float().cpu().numpy()
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.5)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
