"""Score SDE's state_dict layout (key, shape, kind), enumerated without building a network.

Written from a reading of Score SDE's PyTorch sources (models/ncsnpp.py, ddpm.py,
layers.py, layerspp.py, up_or_down_sampling.py, utils.py): each ``_…`` function below lists
the parameters one Score SDE module registers, in its attribute-assignment order (which is
the order of ``state_dict()`` and of ``parameters()``, hence of the EMA
``shadow_params``), and ``ncsnpp_spec`` / ``ddpm_spec`` replay the order in which
``NCSNpp.__init__`` / ``DDPM.__init__`` append modules to ``all_modules`` (the
parameterless pyramid resamplers of 'output_skip' and 'input_skip' are attributes of
NCSNpp, ``self.pyramid_upsample`` / ``self.pyramid_downsample``, not entries). kind is
"trainable", "frozen" (a parameter with requires_grad=False: the Fourier ``W``) or "buffer".
Both classes begin with ``self.register_buffer('sigmas',
torch.tensor(utils.get_sigmas(config)))``: get_sigmas is ``np.exp(np.linspace(log
sigma_max, log sigma_min, num_scales))``, a float64 array, so the buffer is float64 of
shape [num_scales], and as a buffer of the top module it precedes every key of
``all_modules`` in ``state_dict()`` (a module saves its own parameters and buffers before
its children's). It is plain
arithmetic on channel counts and uses nothing from fpkern.models, so it is an independent
reference for fpkern's networks. The fixture ``data/score_sde_keys.json`` is its output
for the two CIFAR-10 presets the issue names (``data/make_score_sde_keys.py``), and its
totals are checked against the published counts (62,758,915 and 61,804,419).
"""

from __future__ import annotations

Spec = list[tuple[str, tuple[int, ...], str]]

#: dtypes of the buffers (everything else is a float32 parameter)
BUFFER_DTYPES = {"sigmas": "float64"}


def _p(name, *shape, trainable=True):
    return [(name, tuple(shape), "trainable" if trainable else "frozen")]


def _sigmas(m):
    return [("sigmas", (m["num_scales"],), "buffer")]


def _linear(i, o):
    return _p("weight", o, i) + _p("bias", o)


def _conv(i, o, k):
    return _p("weight", o, i, k, k) + _p("bias", o)


def _gn(c):
    return _p("weight", c) + _p("bias", c)


def _nin(i, o):
    return _p("W", i, o) + _p("b", o)


def _sub(prefix, spec):
    return [(f"{prefix}.{n}", s, t) for n, s, t in spec]


def _attn(c):          # AttnBlockpp and AttnBlock share the layout
    return (_sub("GroupNorm_0", _gn(c)) + _sub("NIN_0", _nin(c, c)) + _sub("NIN_1", _nin(c, c))
            + _sub("NIN_2", _nin(c, c)) + _sub("NIN_3", _nin(c, c)))


def _biggan(i, o, temb, resample=False):       # ResnetBlockBigGANpp
    s = (_sub("GroupNorm_0", _gn(i)) + _sub("Conv_0", _conv(i, o, 3)) + _sub("Dense_0", _linear(temb, o))
         + _sub("GroupNorm_1", _gn(o)) + _sub("Conv_1", _conv(o, o, 3)))
    if i != o or resample:
        s += _sub("Conv_2", _conv(i, o, 1))
    return s


def _ddpmpp_block(i, o, temb):                 # ResnetBlockDDPMpp
    s = (_sub("GroupNorm_0", _gn(i)) + _sub("Conv_0", _conv(i, o, 3)) + _sub("Dense_0", _linear(temb, o))
         + _sub("GroupNorm_1", _gn(o)) + _sub("Conv_1", _conv(o, o, 3)))
    if i != o:
        s += _sub("NIN_0", _nin(i, o))
    return s


def _ddpm_block(i, o, temb):                   # layers.ResnetBlockDDPM (other order)
    s = (_sub("GroupNorm_0", _gn(i)) + _sub("GroupNorm_1", _gn(o)) + _sub("Conv_0", _conv(i, o, 3))
         + _sub("Conv_1", _conv(o, o, 3)) + _sub("Dense_0", _linear(temb, o)))
    if i != o:
        s += _sub("NIN_0", _nin(i, o))
    return s


def _resample(i, o, with_conv, fir):           # layerspp.Upsample / Downsample
    if not with_conv:
        return []
    return _sub("Conv2d_0" if fir else "Conv_0", _conv(i, o, 3))


def ncsnpp_spec(m: dict, data: dict) -> Spec:
    nf, ch_mult, nrb = m["nf"], m["ch_mult"], m["num_res_blocks"]
    res = [data["image_size"] // 2 ** i for i in range(len(ch_mult))]
    attn_res, fir, conv = m["attn_resolutions"], m["fir"], m["resamp_with_conv"]
    ddpm_type = m["resblock_type"] == "ddpm"
    prog, prog_in, comb = m["progressive"], m["progressive_input"], m["progressive_combine"]
    temb = 4 * nf
    C = data["num_channels"]
    mods: list[Spec] = []
    if m.get("embedding_type", "fourier") == "fourier":
        mods.append(_p("W", nf, trainable=False))
        embed = 2 * nf
    else:
        embed = nf
    if m["conditional"]:
        mods += [_linear(embed, temb), _linear(temb, temb)]

    def block(i, o, resample=False):
        return _ddpmpp_block(i, o, temb) if ddpm_type else _biggan(i, o, temb, resample)

    pyr = C
    mods.append(_conv(C, nf, 3))
    hs = [nf]
    ch = nf
    for lvl, mult in enumerate(ch_mult):
        for _ in range(nrb):
            mods.append(block(ch, nf * mult))
            ch = nf * mult
            if res[lvl] in attn_res:
                mods.append(_attn(ch))
            hs.append(ch)
        if lvl != len(ch_mult) - 1:
            mods.append(_resample(ch, ch, conv, fir) if ddpm_type else block(ch, ch, True))
            if prog_in == "input_skip":                         # self.pyramid_downsample
                mods.append(_sub("Conv_0", _conv(pyr, ch, 1)))    # Combine
                if comb == "cat":
                    ch *= 2
            elif prog_in == "residual":
                mods.append(_resample(pyr, ch, True, fir))
                pyr = ch
            hs.append(ch)
    ch = hs[-1]
    mods += [block(ch, ch), _attn(ch), block(ch, ch)]
    pch = 0
    for lvl in reversed(range(len(ch_mult))):
        for _ in range(nrb + 1):
            mods.append(block(ch + hs.pop(), nf * ch_mult[lvl]))
            ch = nf * ch_mult[lvl]
        if res[lvl] in attn_res:
            mods.append(_attn(ch))
        if prog != "none":
            if lvl == len(ch_mult) - 1:
                mods.append(_gn(ch))
                mods.append(_conv(ch, C if prog == "output_skip" else ch, 3))
                pch = C if prog == "output_skip" else ch
            elif prog == "output_skip":                         # self.pyramid_upsample
                mods += [_gn(ch), _conv(ch, C, 3)]
                pch = C
            else:
                mods.append(_resample(pch, ch, True, fir))
                pch = ch
        if lvl != 0:
            mods.append(_resample(ch, ch, conv, fir) if ddpm_type else block(ch, ch, True))
    if prog != "output_skip":
        mods += [_gn(ch), _conv(ch, C, 3)]
    return _sigmas(m) + [(f"all_modules.{i}.{n}", s, t) for i, spec in enumerate(mods)
                         for n, s, t in spec]


def ddpm_spec(m: dict, data: dict) -> Spec:
    nf, ch_mult, nrb = m["nf"], m["ch_mult"], m["num_res_blocks"]
    res = [data["image_size"] // 2 ** i for i in range(len(ch_mult))]
    temb, C, conv = 4 * nf, data["num_channels"], m["resamp_with_conv"]
    mods: list[Spec] = [_linear(nf, temb), _linear(temb, temb), _conv(C, nf, 3)]
    hs, ch = [nf], nf
    for lvl, mult in enumerate(ch_mult):
        for _ in range(nrb):
            mods.append(_ddpm_block(ch, nf * mult, temb))
            ch = nf * mult
            if res[lvl] in m["attn_resolutions"]:
                mods.append(_attn(ch))
            hs.append(ch)
        if lvl != len(ch_mult) - 1:
            mods.append(_resample(ch, ch, conv, False))
            hs.append(ch)
    mods += [_ddpm_block(ch, ch, temb), _attn(ch), _ddpm_block(ch, ch, temb)]
    for lvl in reversed(range(len(ch_mult))):
        for _ in range(nrb + 1):
            mods.append(_ddpm_block(ch + hs.pop(), nf * ch_mult[lvl], temb))
            ch = nf * ch_mult[lvl]
        if res[lvl] in m["attn_resolutions"]:
            mods.append(_attn(ch))
        if lvl != 0:
            mods.append(_resample(ch, ch, conv, False))
    mods += [_gn(ch), _conv(ch, C, 3)]
    return _sigmas(m) + [(f"all_modules.{i}.{n}", s, t) for i, spec in enumerate(mods)
                         for n, s, t in spec]


def score_sde_spec(cfg: dict) -> Spec:
    m = cfg["model"]
    return (ddpm_spec if m["name"] == "ddpm" else ncsnpp_spec)(m, cfg["data"])
