"""The original DDPM U-Net (Score SDE's ``ddpm`` model class).

Used by Score SDE's ``vp/ddpm/*`` and ``subvp/cifar10_ddpm_continuous`` configurations
(not by the "ddpmpp" ones, which use ``NCSNpp``). Same state_dict layout as Score SDE: the
``sigmas`` buffer, then two dense layers for the positional embedding and the U-Net, all in
``all_modules``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from fpkern.models import layers as L
from fpkern.models.ncsnpp import ScoreSDENetwork, check_choice, discrete_sigmas

__all__ = ["DDPM"]


class DDPM(ScoreSDENetwork):
    """DDPM score network (Ho et al. 2020) as in Score SDE; labels are (fractional) time steps.

    ``conditional`` is accepted for config compatibility; as in Score SDE the network is
    always conditioned on the time embedding.
    """

    output_type = "score_sde"     # labels and output conventions: see ScoreFn

    def __init__(self, *, nf: int = 128, ch_mult: Sequence[int] = (1, 2, 2, 2),
                 num_res_blocks: int = 2, attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.1, resamp_with_conv: bool = True, conditional: bool = True,
                 scale_by_sigma: bool = False, nonlinearity: str = "swish",
                 normalization: str = "GroupNorm", image_size: int = 32, num_channels: int = 3,
                 centered: bool = True, sigma_min: float = 0.01, sigma_max: float = 50.0,
                 num_scales: int = 1000):
        super().__init__()
        self._register_sigmas(sigma_min, sigma_max, num_scales)
        check_choice("normalization", normalization, ("groupnorm",))
        if image_size % (2 ** (len(ch_mult) - 1)) != 0:
            raise ValueError(f"image_size {image_size} must be divisible by 2^(len(ch_mult)-1)")
        self.act = act = L.get_act(nonlinearity)
        self.nf = nf
        self.num_res_blocks = num_res_blocks
        self.attn_resolutions = tuple(attn_resolutions)
        self.num_resolutions = num_resolutions = len(ch_mult)
        all_resolutions = [image_size // (2 ** i) for i in range(num_resolutions)]
        self.conditional = conditional
        self.centered = centered
        self.scale_by_sigma = scale_by_sigma
        self.input_shape = (num_channels, image_size, image_size)

        def resblock(in_ch, out_ch=None):
            return L.ResnetBlockDDPM(act, in_ch, out_ch, temb_dim=4 * nf, dropout=dropout)

        def attn(channels):
            return L.AttnBlock(channels, num_groups=32, init_scale=0.0)

        modules: list[nn.Module] = [L.dense(nf, 4 * nf), L.dense(4 * nf, 4 * nf)]
        modules.append(L.conv3x3(num_channels, nf))
        hs_c = [nf]
        in_ch = nf
        for i_level in range(num_resolutions):
            for _ in range(num_res_blocks):
                out_ch = nf * ch_mult[i_level]
                modules.append(resblock(in_ch, out_ch))
                in_ch = out_ch
                if all_resolutions[i_level] in self.attn_resolutions:
                    modules.append(attn(in_ch))
                hs_c.append(in_ch)
            if i_level != num_resolutions - 1:
                modules.append(L.Downsample(in_ch, with_conv=resamp_with_conv))
                hs_c.append(in_ch)

        in_ch = hs_c[-1]
        modules += [resblock(in_ch), attn(in_ch), resblock(in_ch)]
        for i_level in reversed(range(num_resolutions)):
            for _ in range(num_res_blocks + 1):
                out_ch = nf * ch_mult[i_level]
                modules.append(resblock(in_ch + hs_c.pop(), out_ch))
                in_ch = out_ch
            if all_resolutions[i_level] in self.attn_resolutions:
                modules.append(attn(in_ch))
            if i_level != 0:
                modules.append(L.Upsample(in_ch, with_conv=resamp_with_conv))
        assert not hs_c
        modules.append(L.group_norm(in_ch, 32))
        modules.append(L.conv3x3(in_ch, num_channels, init_scale=0.0))
        self.all_modules = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        mods = iter(self.all_modules)
        temb = L.timestep_embedding(labels, self.nf, dtype=x.dtype)
        temb = next(mods)(temb)
        temb = next(mods)(self.act(temb))
        h = x if self.centered else 2 * x - 1.0

        hs = [next(mods)(h)]
        for i_level in range(self.num_resolutions):
            for _ in range(self.num_res_blocks):
                h = next(mods)(hs[-1], temb)
                if h.shape[-1] in self.attn_resolutions:
                    h = next(mods)(h)
                hs.append(h)
            if i_level != self.num_resolutions - 1:
                hs.append(next(mods)(hs[-1]))

        h = hs[-1]
        h = next(mods)(h, temb)
        h = next(mods)(h)
        h = next(mods)(h, temb)
        for i_level in reversed(range(self.num_resolutions)):
            for _ in range(self.num_res_blocks + 1):
                h = next(mods)(torch.cat([h, hs.pop()], dim=1), temb)
            if h.shape[-1] in self.attn_resolutions:
                h = next(mods)(h)
            if i_level != 0:
                h = next(mods)(h)
        assert not hs
        h = self.act(next(mods)(h))
        h = next(mods)(h)
        assert next(mods, None) is None, "module list not fully consumed"

        if self.scale_by_sigma:
            sig = discrete_sigmas(labels, self.sigma_min, self.sigma_max, self.num_scales, h.dtype)
            h = h / sig[:, None, None, None]
        return h
