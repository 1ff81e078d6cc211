"""PNG writers: image grids, 2-D scatter plots and curves against t (residual profiles).

A leaf module (torch, PIL, matplotlib only), so that the commands, the training loop and the
diagnostics can all write pictures without importing each other. matplotlib runs on the
file-only Agg backend: plotting never needs a display.
"""

from __future__ import annotations

import math

import torch

__all__ = ["pyplot", "save_image_grid", "save_scatter", "plot_profiles", "plot_residual_profile"]


def pyplot():
    """matplotlib.pyplot on the Agg backend (imported on first use: matplotlib is slow to load)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_image_grid(x: torch.Tensor, path, *, data_range=(-1.0, 1.0), nrow: int | None = None) -> None:
    """Images [B, C, H, W] in data_range -> one PNG grid (uint8, 2-pixel padding)."""
    from PIL import Image

    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be [B, 1 or 3, H, W], got {tuple(x.shape)}")
    lo, hi = data_range
    u = ((x.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    u = torch.floor(u * 256).clamp(0, 255).to(torch.uint8)
    B, C, H, W = u.shape
    nrow = nrow or int(math.ceil(math.sqrt(B)))
    ncol = int(math.ceil(B / nrow))
    pad = 2
    grid = torch.zeros(C, ncol * (H + pad) + pad, nrow * (W + pad) + pad, dtype=torch.uint8)
    for i in range(B):
        r, c = divmod(i, nrow)
        grid[:, pad + r * (H + pad): pad + r * (H + pad) + H,
             pad + c * (W + pad): pad + c * (W + pad) + W] = u[i]
    arr = grid.permute(1, 2, 0).numpy()
    Image.fromarray(arr[..., 0] if C == 1 else arr).save(path)


def save_scatter(x: torch.Tensor, path, *, reference: torch.Tensor | None = None,
                 title: str = "") -> None:
    """2-D samples [B, 2] (and an optional reference set) as a scatter plot PNG."""
    if x.dim() != 2 or x.shape[1] != 2:
        raise ValueError(f"scatter plots need samples [B, 2], got {tuple(x.shape)}")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4, 4))
    if reference is not None:
        ax.scatter(*reference.detach().cpu().double().T.numpy(), s=2, alpha=0.3, c="gray",
                   label="data")
    ax.scatter(*x.detach().cpu().double().T.numpy(), s=2, alpha=0.6, label="samples")
    ax.set_aspect("equal")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_profiles(t, curves: dict, path, *, ylabel: str = "", title: str = "",
                  logy: bool = True) -> None:
    """One PNG with a curve per entry of curves ({label: values [len(t)]}) against t."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    tt = torch.as_tensor(t, dtype=torch.float64).tolist()
    for label, v in curves.items():
        vals = [max(float(a), 1e-300) if logy else float(a) for a in v]
        ax.plot(tt, vals, marker="o", ms=3, label=label)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("t")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_residual_profile(profile, path, *, title: str = "FPE residual") -> None:
    """Absolute and relative residual profiles of every form (a
    fpkern.diagnostics.ResidualProfile: t, abs, rel), one PNG."""
    curves = {f"E|r|^2 ({k})": v for k, v in profile.abs.items()}
    curves.update({f"E|r|^2/E|d_t s|^2 ({k})": v for k, v in profile.rel.items()})
    plot_profiles(profile.t, curves, path, ylabel="residual", title=title)
