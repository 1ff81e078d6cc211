"""NCSN++ (Score SDE's ``ncsnpp`` model class), and DDPM++ which is the same class.

In Score SDE, every "ddpmpp" and "ncsnpp" CIFAR-10 configuration uses the ``ncsnpp``
model; DDPM++ is NCSN++ configured with ``fir=False``, ``progressive_input='none'``,
positional embeddings and centred data (``DDPMpp`` below only changes the defaults).

The network is a U-Net whose modules sit in one ``nn.ModuleList`` ``all_modules`` in
Score SDE's order (the parameterless pyramid resamplers of 'output_skip' and 'input_skip'
beside it, as Score SDE keeps them), so ``state_dict`` keys (the ``sigmas`` buffer, then
``all_modules.N.…``) and the order of ``parameters()`` are Score SDE's. ``forward(x,
labels)`` takes Score SDE's labels: the noise level sigma for the Fourier embedding (its
log is embedded), the (possibly fractional) time step for the positional one. Conventions
that turn the output into a score live in ``fpkern.models.ScoreFn``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from fpkern.models import layers as L

__all__ = ["NCSNpp", "DDPMpp", "ScoreSDENetwork", "check_choice", "score_sde_sigmas"]


def check_choice(name: str, value: str, valid: Sequence[str]) -> str:
    """Lower-cased ``value`` if it is one of ``valid``, else ValueError listing them."""
    if not isinstance(value, str) or value.lower() not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid names: {list(valid)}")
    return value.lower()


def discrete_sigmas(labels: torch.Tensor, sigma_min: float, sigma_max: float,
                    num_scales: int, dtype: torch.dtype) -> torch.Tensor:
    """Score SDE's ``get_sigmas(config)[labels]`` (geometric, from sigma_max down to sigma_min),
    in closed form; labels are truncated to integers as Score SDE's ``.int()`` does."""
    idx = labels.to(torch.int64).to(dtype)
    frac = idx / max(num_scales - 1, 1)
    return torch.exp(math.log(sigma_max) + frac * (math.log(sigma_min) - math.log(sigma_max)))


def score_sde_sigmas(sigma_min: float, sigma_max: float, num_scales: int) -> torch.Tensor:
    """Score SDE's ``utils.get_sigmas(config)``: ``num_scales`` noise levels, geometric from
    sigma_max down to sigma_min, in float64, computed as Score SDE computes them:
    ``torch.tensor(np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), num_scales)))``
    (a NumPy float64 array stays float64). NumPy's exp and torch's differ in the last bit on
    some levels, so only NumPy's gives Score SDE's buffer bit for bit."""
    grid = np.linspace(np.log(sigma_max), np.log(sigma_min), int(num_scales))
    return torch.tensor(np.exp(grid), dtype=torch.float64)


def sigmas_mismatch(net: nn.Module, sigmas) -> str | None:
    """Why a state_dict's ``sigmas`` cannot be this network's (None when it can): another
    number of noise levels, or levels more than float32 rounding away from the network's
    configuration (sigma_min, sigma_max, num_scales)."""
    if not isinstance(sigmas, torch.Tensor):
        return None          # absent: load_state_dict reports the missing key itself
    own = net.sigmas
    what = (f"this network's configuration has num_scales={net.num_scales}, "
            f"sigma_max={net.sigma_max}, sigma_min={net.sigma_min}")
    if sigmas.shape != own.shape:
        return (f"sigmas has shape {tuple(sigmas.shape)} in the checkpoint but "
                f"{tuple(own.shape)} in the network: {what}; build the network from the "
                f"checkpoint's config")
    if "meta" in (sigmas.device.type, own.device.type) or sigmas.numel() == 0:
        return None
    got = sigmas.detach().to("cpu", torch.float64)
    if torch.allclose(got, own.detach().to("cpu", torch.float64), rtol=1e-6, atol=0):
        return None
    return (f"sigmas of the checkpoint run from {got[0].item():.6g} down to "
            f"{got[-1].item():.6g}, which does not match: {what}; build the network from the "
            f"checkpoint's config")


class ScoreSDENetwork(nn.Module):
    """What Score SDE's ``NCSNpp`` and ``DDPM`` share: the ``sigmas`` buffer
    (``register_buffer('sigmas', torch.tensor(utils.get_sigmas(config)))``), the first
    entry of their state_dict, and its check against the configuration when a state_dict
    is loaded (``sigmas_mismatch``: a checkpoint trained with other noise levels is refused).
    The forward pass computes the noise level of a label in closed form
    (``discrete_sigmas``), equal to the buffer's entry."""

    def _register_sigmas(self, sigma_min: float, sigma_max: float, num_scales: int) -> None:
        self.sigma_min, self.sigma_max, self.num_scales = sigma_min, sigma_max, num_scales
        self.register_buffer("sigmas", score_sde_sigmas(sigma_min, sigma_max, num_scales))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        msg = sigmas_mismatch(self, state_dict.get(prefix + "sigmas"))
        if msg is not None:
            error_msgs.append(msg)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class NCSNpp(ScoreSDENetwork):
    """NCSN++ score network with every option of Score SDE's configurations.

    Options carry Score SDE's names (``config.model.*`` and ``config.data.*``); the
    defaults are those of ``ve/cifar10_ncsnpp_continuous``. ``conv_size`` must be 3 and
    ``normalization`` 'GroupNorm', ``attention_type`` 'ddpm' (the only values Score SDE's
    PyTorch NCSN++ implements).
    """

    output_type = "score_sde"     # labels and output conventions: see ScoreFn
    RESBLOCK_TYPES = ("biggan", "ddpm")
    PROGRESSIVE = ("none", "output_skip", "residual")
    PROGRESSIVE_INPUT = ("none", "input_skip", "residual")
    COMBINE = ("cat", "sum")
    EMBEDDINGS = ("fourier", "positional")

    def __init__(self, *, nf: int = 128, ch_mult: Sequence[int] = (1, 2, 2, 2),
                 num_res_blocks: int = 4, attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.1, resamp_with_conv: bool = True, conditional: bool = True,
                 fir: bool = True, fir_kernel: Sequence[float] = (1, 3, 3, 1),
                 skip_rescale: bool = True, resblock_type: str = "biggan",
                 progressive: str = "none", progressive_input: str = "residual",
                 progressive_combine: str = "sum", attention_type: str = "ddpm",
                 embedding_type: str = "fourier", fourier_scale: float = 16.0,
                 init_scale: float = 0.0, scale_by_sigma: bool = True, conv_size: int = 3,
                 nonlinearity: str = "swish", normalization: str = "GroupNorm",
                 image_size: int = 32, num_channels: int = 3, centered: bool = False,
                 sigma_min: float = 0.01, sigma_max: float = 50.0, num_scales: int = 1000,
                 continuous: bool = True):
        super().__init__()
        self._register_sigmas(sigma_min, sigma_max, num_scales)
        resblock_type = check_choice("resblock_type", resblock_type, self.RESBLOCK_TYPES)
        progressive = check_choice("progressive", progressive, self.PROGRESSIVE)
        progressive_input = check_choice("progressive_input", progressive_input,
                                         self.PROGRESSIVE_INPUT)
        combine_method = check_choice("progressive_combine", progressive_combine, self.COMBINE)
        embedding_type = check_choice("embedding_type", embedding_type, self.EMBEDDINGS)
        check_choice("attention_type", attention_type, ("ddpm",))
        check_choice("normalization", normalization, ("groupnorm",))
        if conv_size != 3:
            raise ValueError(f"conv_size must be 3 (Score SDE's NCSN++ only has 3x3 convs), got {conv_size}")
        if embedding_type == "fourier" and not continuous:
            raise ValueError("Fourier features are only used for continuous training")
        if image_size % (2 ** (len(ch_mult) - 1)) != 0:
            raise ValueError(f"image_size {image_size} must be divisible by 2^(len(ch_mult)-1)")

        self.act = act = L.get_act(nonlinearity)
        self.nf = nf
        self.num_res_blocks = num_res_blocks
        self.attn_resolutions = tuple(attn_resolutions)
        self.num_resolutions = num_resolutions = len(ch_mult)
        self.all_resolutions = [image_size // (2 ** i) for i in range(num_resolutions)]
        self.conditional = conditional
        self.skip_rescale = skip_rescale
        self.resblock_type = resblock_type
        self.progressive = progressive
        self.progressive_input = progressive_input
        self.embedding_type = embedding_type
        self.scale_by_sigma = scale_by_sigma
        self.centered = centered
        self.input_shape = (num_channels, image_size, image_size)

        def combiner(dim1, dim2):
            return L.Combine(dim1, dim2, method=combine_method)

        def attn(channels):
            return L.AttnBlock(channels, init_scale=init_scale, skip_rescale=skip_rescale)

        def upsample(in_ch, out_ch=None, with_conv=resamp_with_conv):
            return L.Upsample(in_ch, out_ch, with_conv=with_conv, fir=fir, fir_kernel=fir_kernel)

        def downsample(in_ch, out_ch=None, with_conv=resamp_with_conv):
            return L.Downsample(in_ch, out_ch, with_conv=with_conv, fir=fir, fir_kernel=fir_kernel)

        # The parameterless pyramid resamplers are attributes, not entries of all_modules,
        # as in Score SDE (its checkpoints number all_modules without them).
        if progressive == "output_skip":
            self.pyramid_upsample = upsample(num_channels, with_conv=False)
        if progressive_input == "input_skip":
            self.pyramid_downsample = downsample(num_channels, with_conv=False)

        def resblock(in_ch, out_ch=None, up=False, down=False):
            if resblock_type == "ddpm":
                return L.ResnetBlockDDPMpp(act, in_ch, out_ch, temb_dim=4 * nf, dropout=dropout,
                                           init_scale=init_scale, skip_rescale=skip_rescale)
            return L.ResnetBlockBigGAN(act, in_ch, out_ch, temb_dim=4 * nf, up=up, down=down,
                                       dropout=dropout, fir=fir, fir_kernel=fir_kernel,
                                       init_scale=init_scale, skip_rescale=skip_rescale)

        modules: list[nn.Module] = []
        # time / noise-level embedding
        if embedding_type == "fourier":
            modules.append(L.GaussianFourierProjection(embedding_size=nf, scale=fourier_scale))
            embed_dim = 2 * nf
        else:
            embed_dim = nf
        if conditional:
            modules.append(L.dense(embed_dim, 4 * nf))
            modules.append(L.dense(4 * nf, 4 * nf))

        # downsampling path
        channels = num_channels
        input_pyramid_ch = channels
        modules.append(L.conv3x3(channels, nf))
        hs_c = [nf]
        in_ch = nf
        for i_level in range(num_resolutions):
            for _ in range(num_res_blocks):
                out_ch = nf * ch_mult[i_level]
                modules.append(resblock(in_ch, out_ch))
                in_ch = out_ch
                if self.all_resolutions[i_level] in self.attn_resolutions:
                    modules.append(attn(in_ch))
                hs_c.append(in_ch)
            if i_level != num_resolutions - 1:
                modules.append(downsample(in_ch) if resblock_type == "ddpm"
                               else resblock(in_ch, down=True))
                if progressive_input == "input_skip":
                    modules.append(combiner(input_pyramid_ch, in_ch))
                    if combine_method == "cat":
                        in_ch *= 2
                elif progressive_input == "residual":
                    modules.append(downsample(input_pyramid_ch, in_ch, with_conv=True))
                    input_pyramid_ch = in_ch
                hs_c.append(in_ch)

        in_ch = hs_c[-1]
        modules.append(resblock(in_ch))
        modules.append(attn(in_ch))
        modules.append(resblock(in_ch))

        # upsampling path
        pyramid_ch = 0
        for i_level in reversed(range(num_resolutions)):
            for _ in range(num_res_blocks + 1):
                out_ch = nf * ch_mult[i_level]
                modules.append(resblock(in_ch + hs_c.pop(), out_ch))
                in_ch = out_ch
            if self.all_resolutions[i_level] in self.attn_resolutions:
                modules.append(attn(in_ch))
            if progressive != "none":
                if i_level == num_resolutions - 1:
                    modules.append(L.group_norm(in_ch))
                    if progressive == "output_skip":
                        modules.append(L.conv3x3(in_ch, channels, init_scale=init_scale))
                        pyramid_ch = channels
                    else:
                        modules.append(L.conv3x3(in_ch, in_ch))
                        pyramid_ch = in_ch
                elif progressive == "output_skip":
                    modules.append(L.group_norm(in_ch))
                    modules.append(L.conv3x3(in_ch, channels, init_scale=init_scale))
                    pyramid_ch = channels
                else:
                    modules.append(upsample(pyramid_ch, in_ch, with_conv=True))
                    pyramid_ch = in_ch
            if i_level != 0:
                modules.append(upsample(in_ch) if resblock_type == "ddpm"
                               else resblock(in_ch, up=True))
        assert not hs_c

        if progressive != "output_skip":
            modules.append(L.group_norm(in_ch))
            modules.append(L.conv3x3(in_ch, channels, init_scale=init_scale))
        self.all_modules = nn.ModuleList(modules)

    # ------------------------------------------------------------------------------
    def _skip(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a + b) / math.sqrt(2.0) if self.skip_rescale else a + b

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Raw output for images x [B, C, H, W] and Score SDE labels [B]."""
        mods = iter(self.all_modules)
        if self.embedding_type == "fourier":
            used_sigmas = labels
            temb = next(mods)(torch.log(labels))
        else:
            temb = L.timestep_embedding(labels, self.nf, dtype=x.dtype)
        if self.conditional:
            temb = next(mods)(temb)
            temb = next(mods)(self.act(temb))
        else:
            temb = None

        if not self.centered:
            x = 2 * x - 1.0      # data in [0, 1] -> [-1, 1]

        # downsampling path
        input_pyramid = x if self.progressive_input != "none" else None
        hs = [next(mods)(x)]
        for i_level in range(self.num_resolutions):
            for _ in range(self.num_res_blocks):
                h = next(mods)(hs[-1], temb)
                if h.shape[-1] in self.attn_resolutions:
                    h = next(mods)(h)
                hs.append(h)
            if i_level != self.num_resolutions - 1:
                h = next(mods)(hs[-1]) if self.resblock_type == "ddpm" else next(mods)(hs[-1], temb)
                if self.progressive_input == "input_skip":
                    input_pyramid = self.pyramid_downsample(input_pyramid)
                    h = next(mods)(input_pyramid, h)
                elif self.progressive_input == "residual":
                    input_pyramid = self._skip(next(mods)(input_pyramid), h)
                    h = input_pyramid
                hs.append(h)

        h = hs[-1]
        h = next(mods)(h, temb)
        h = next(mods)(h)
        h = next(mods)(h, temb)

        # upsampling path
        pyramid = None
        for i_level in reversed(range(self.num_resolutions)):
            for _ in range(self.num_res_blocks + 1):
                h = next(mods)(torch.cat([h, hs.pop()], dim=1), temb)
            if h.shape[-1] in self.attn_resolutions:
                h = next(mods)(h)
            if self.progressive != "none":
                if i_level == self.num_resolutions - 1:
                    pyramid = self.act(next(mods)(h))
                    pyramid = next(mods)(pyramid)
                elif self.progressive == "output_skip":
                    pyramid = self.pyramid_upsample(pyramid)
                    pyramid_h = self.act(next(mods)(h))
                    pyramid = pyramid + next(mods)(pyramid_h)
                else:
                    pyramid = self._skip(next(mods)(pyramid), h)
                    h = pyramid
            if i_level != 0:
                h = next(mods)(h) if self.resblock_type == "ddpm" else next(mods)(h, temb)
        assert not hs

        if self.progressive == "output_skip":
            h = pyramid
        else:
            h = self.act(next(mods)(h))
            h = next(mods)(h)
        assert next(mods, None) is None, "module list not fully consumed"

        if self.scale_by_sigma:
            if self.embedding_type != "fourier":
                used_sigmas = discrete_sigmas(labels, self.sigma_min, self.sigma_max,
                                              self.num_scales, h.dtype)
            h = h / used_sigmas.reshape((x.shape[0],) + (1,) * (x.dim() - 1))
        return h


class DDPMpp(NCSNpp):
    """DDPM++: the NCSN++ class with the defaults of ``vp/cifar10_ddpmpp_continuous``."""

    def __init__(self, **options):
        defaults = dict(fir=False, progressive_input="none", embedding_type="positional",
                        scale_by_sigma=False, centered=True)
        super().__init__(**{**defaults, **options})
