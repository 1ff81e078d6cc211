"""Adapters (fpkern.models.adapters): each one against its formula, the Gaussian-mixture oracle
(a network that is the exact noise, denoiser or energy of q_t gives the exact score, whose
FPE residual vanishes), and the residual methods on diffusers networks with attention."""

import math

import pytest
import torch
import torch.nn as nn

from fpkern.data.mixture import GaussianMixture
from fpkern.models import DenoiserScore, EnergyScore, NoisePredictionScore
from fpkern.models.adapters import check_schedule, derivative_kernels
from fpkern.ops import forward_mode, fpe_residual
from fpkern.ops import naive as naive_method
from fpkern.sde import SubVPSDE, VESDE, VPSDE

F64 = torch.float64


def gm_and_points(D=3, B=4, seed=0, sde=None):
    g = torch.Generator().manual_seed(seed)
    gm = GaussianMixture.random(3, D, generator=g)
    x = gm.sample(B, generator=g)
    t = torch.linspace(0.05, 0.9, B, dtype=F64)
    if sde is not None:
        mean, std = sde.marginal_prob(x, t)
        x = mean + std[:, None] * torch.randn(x.shape, generator=g, dtype=F64)
    return gm, x, t


def vp_sigma(t, bmin=0.1, bmax=20.0):
    """VP marginal std written out (not fpkern.sde):
    sqrt(1 - exp(-t^2 (bmax - bmin) / 2 - t bmin))."""
    return torch.sqrt(1 - torch.exp(-0.5 * t ** 2 * (bmax - bmin) - t * bmin))


# ---- the Gaussian-mixture oracle through each adapter ------------------------------------

class OracleNoise(nn.Module):
    """The exact noise eps = -sigma(t) s(x, t) of the noised mixture, taking diffusers'
    timesteps tau in [0, 999] (t = tau / 999), as a DDPM network does."""

    def __init__(self, gm, sde):
        super().__init__()
        self.gm, self.sde = gm, sde

    def forward(self, x, timesteps):
        t = timesteps / 999
        return -self.sde.sigma(t)[:, None] * self.gm.score(x, t, self.sde)


def mixture_denoiser(gm):
    """E[x_0 | y = x_0 + s n] for the data mixture, closed form (per-sample noise level s)."""
    def D(y, s):
        var0 = gm.stds.to(y) ** 2                                  # [K]
        var = var0[None, :] + s[:, None] ** 2                       # [B, K]
        sq = (y[:, None, :] - gm.means.to(y)).pow(2).sum(-1)        # [B, K]
        logits = torch.log(gm.weights.to(y)) - 0.5 * y.shape[1] * torch.log(var) - 0.5 * sq / var
        r = torch.softmax(logits, 1)
        post = (var0[None, :, None] * y[:, None, :]
                + s[:, None, None] ** 2 * gm.means.to(y)) / var[..., None]
        return (r[..., None] * post).sum(1)
    return D


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE()], ids=["vp", "subvp"])
def test_noise_prediction_of_the_exact_noise_is_the_exact_score(sde):
    gm, x, t = gm_and_points(sde=sde)
    score = NoisePredictionScore(OracleNoise(gm, sde), sde, input_shape=(3,))
    torch.testing.assert_close(score.labels(t), 999 * t)
    torch.testing.assert_close(score(x, t), gm.score(x, t, sde), rtol=1e-12, atol=1e-12)
    for form in ("div", "laplacian"):
        r = fpe_residual(score, x, t, sde, form=form, method="exact")
        assert r.abs().max() < 1e-8 * gm.score(x, t, sde).abs().max(), form


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE()], ids=["vp", "subvp", "ve"])
def test_denoiser_of_the_exact_posterior_mean_is_the_exact_score(sde):
    """(alpha D(x / alpha; sigma / alpha) - x) / sigma^2 with the mixture's own denoiser."""
    gm, x, t = gm_and_points(sde=sde)
    score = DenoiserScore(mixture_denoiser(gm), sde, input_shape=(3,))
    torch.testing.assert_close(score(x, t), gm.score(x, t, sde), rtol=1e-10, atol=1e-10)
    if type(sde) is VPSDE:                     # the EDM noise level sigma / alpha
        torch.testing.assert_close(score.labels(t), vp_sigma(t) / torch.sqrt(1 - vp_sigma(t) ** 2))
    r = fpe_residual(score, x, t, sde, form="div", method="exact")
    assert r.abs().max() < 1e-7 * gm.score(x, t, sde).abs().max()


@pytest.mark.parametrize("kind", ["energy", "log_density"])
def test_energy_of_the_exact_log_density_is_the_exact_score(kind):
    """E = -log q_t (or log q_t itself): the score, its exact residual ~ 0, and the
    torch.func path (what method "fused" falls back to) equal to the oracle's own."""
    sde = VPSDE()
    gm, x, t = gm_and_points(sde=sde)
    sign = -1 if kind == "energy" else 1
    score = EnergyScore(lambda y, s: sign * gm.log_prob(y, s, sde), sde, input_shape=(3,),
                        kind=kind)
    torch.testing.assert_close(score(x, t), gm.score(x, t, sde), rtol=1e-12, atol=1e-12)
    scale = gm.score(x, t, sde).abs().max().item()
    for form in ("div", "laplacian"):
        assert fpe_residual(score, x, t, sde, form=form, method="exact").abs().max() < 1e-8 * scale
    V = torch.randn((2,) + x.shape, dtype=F64, generator=torch.Generator().manual_seed(3))
    for form in ("div", "laplacian"):
        got = fpe_residual(score, x, t, sde, form=form, method="fused", probes=V)
        with torch.enable_grad():
            want = forward_mode.residual(gm.score_fn(sde), x, t, sde, form, V)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * scale)
    assert torch.isfinite(fpe_residual(score, x, t, sde, method="naive", probes=V)).all()


class EnergyMLP(nn.Module):
    def __init__(self, D=3, width=16):
        super().__init__()
        self.inp = nn.Linear(D + 1, width)
        self.out = nn.Linear(width, 1)

    def forward(self, x, t):
        h = torch.tanh(self.inp(torch.cat([x, t[:, None]], 1)))
        return self.out(h)[:, 0] + 0.5 * x.pow(2).sum(1)


def test_energy_score_is_differentiable_in_the_parameters():
    """A loss on s = -grad_x E has the parameter gradient of the double backward written out."""
    torch.manual_seed(0)
    net = EnergyMLP().double()
    score = EnergyScore(net, VPSDE(), input_shape=(3,))
    _, x, t = gm_and_points()
    w = torch.randn_like(x)
    params = [p for n, p in net.named_parameters() if n != "out.bias"]   # grad_x E ignores it
    got = torch.autograd.grad((score(x, t) * w).sum() + score(x, t).pow(2).sum(), params)
    xg = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(net(xg, t).sum(), xg, create_graph=True)
    want = torch.autograd.grad((-gx * w).sum() + gx.pow(2).sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        s = score(x, t)
    assert not s.requires_grad and torch.allclose(s, -gx.detach())


def test_energy_residual_methods_agree_on_a_network():
    """exact (full Jacobians) = the torch.func path with probes sqrt(D) e_j, j = 1..D (for
    which Hutchinson's estimate is exact); naive = that, up to its time stencil."""
    torch.manual_seed(1)
    sde = VPSDE()
    score = EnergyScore(EnergyMLP().double(), sde, input_shape=(3,))
    _, x, t = gm_and_points(sde=sde)
    basis = coordinate_probes(x)
    for form in ("div", "laplacian"):
        ex = fpe_residual(score, x, t, sde, form=form, method="exact")
        with torch.enable_grad():
            fm = forward_mode.residual(score, x, t, sde, form, basis)
        torch.testing.assert_close(ex, fm, rtol=1e-10, atol=1e-10)
        assert_naive_is_generic_plus_stencil(score, x, t, sde, form, basis[:2])


# ---- diffusers networks ------------------------------------------------------------------

def unet(size=16, channels=(32, 64), groups=8):
    diffusers = pytest.importorskip("diffusers")
    return diffusers.UNet2DModel(
        sample_size=size, in_channels=1, out_channels=1, block_out_channels=channels,
        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=groups,
        attention_head_dim=8)


def dit(size=4, out_channels=None):
    diffusers = pytest.importorskip("diffusers")
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=4, in_channels=1, out_channels=out_channels,
        num_layers=1, sample_size=size, patch_size=2, norm_num_groups=4, num_embeds_ada_norm=10)


LABELS = {"class_labels": torch.tensor([3])}


def image_points(shape, B=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn((B,) + tuple(shape), generator=g, dtype=dtype),
            torch.tensor([0.3, 0.7][:B], dtype=dtype))


def coordinate_probes(x):
    """sqrt(D) e_j for j = 1..D, every sample alike: [D, *x.shape]."""
    D = x[0].numel()
    eye = math.sqrt(D) * torch.eye(D, dtype=x.dtype)
    return eye[:, None, :].expand(D, x.shape[0], D).reshape((D,) + tuple(x.shape))


def assert_naive_is_generic_plus_stencil(score, x, t, sde, form, V):
    """method "naive" (nested reverse mode, the 3-point time stencil) = the torch.func path
    with the same probes, after swapping its stencil d_t s for the exact one: every spatial
    derivative of the paper's algorithm checked to rounding, the stencil isolated."""
    r_naive = fpe_residual(score, x, t, sde, form=form, method="naive", probes=V)
    with torch.enable_grad():
        r_generic = forward_mode.residual(score, x, t, sde, form, V)
        _, dts = forward_mode.time_derivative(score, x, t)
    stencil = naive_method.time_derivative_stencil(
        score, x, t, sde.T, singular_at_zero=naive_method.sigma_vanishes_at_zero(sde))
    want = r_generic + (stencil - dts).detach()
    scale = r_generic.abs().max().item()
    tol = 1e-9 if x.dtype == F64 else 3e-4
    torch.testing.assert_close(r_naive, want, rtol=tol, atol=tol * scale)


def test_noise_prediction_on_diffusers_networks_is_minus_eps_over_sigma():
    """The issue's UNet (attention included) and a small DiT with class labels, through
    their .sample outputs, at timesteps 999 t, divided by the VP std written out."""
    sde = VPSDE()
    torch.manual_seed(0)
    for net, kwargs in ((unet().eval(), {}), (dit().eval(), LABELS)):
        score = NoisePredictionScore(net, sde, net_kwargs=kwargs)
        assert score.input_shape == (1, net.config.sample_size, net.config.sample_size)
        x, t = image_points(score.input_shape)
        with torch.no_grad():
            eps = net(x, 999 * t, **kwargs).sample
            got = score(x, t)
        torch.testing.assert_close(got, -eps / vp_sigma(t)[:, None, None, None],
                                   rtol=1e-6, atol=1e-6)


def test_naive_and_the_torch_func_path_run_on_the_unet_with_attention():
    """The issue's UNet2DModel on CPU, where flash attention has neither a forward-mode rule
    nor a double backward: with the adapter's math backend the paper's algorithm (naive,
    double backward) and the torch.func path (forward mode) run, both forms (float32)."""
    torch.manual_seed(0)
    sde = VPSDE()
    score = NoisePredictionScore(unet().eval(), sde)
    x, t = image_points(score.input_shape, B=1)
    V = torch.randn((1,) + x.shape, generator=torch.Generator().manual_seed(1))
    for form in ("div", "laplacian"):
        r = fpe_residual(score, x, t, sde, form=form, method="naive", probes=V)
        assert r.shape == x.shape and torch.isfinite(r).all(), form
    with torch.enable_grad():
        r = forward_mode.residual(score, x, t, sde, "laplacian", V)
    assert torch.isfinite(r).all()


@pytest.mark.parametrize("which,forms", [("unet", ("div",)), ("dit", ("div", "laplacian"))])
def test_exact_equals_the_torch_func_path_with_coordinate_probes(which, forms):
    """float64, D = 16: the full-Jacobian residual (method "exact") against the directional
    one along sqrt(D) e_j (exact for these probes), and naive = the latter up to its time
    stencil. On the DiT this needs the adapter's layer_norm (torch's own rule gives wrong
    nested JVPs) and on both the math attention backend."""
    torch.manual_seed(0)
    sde = VPSDE()
    if which == "unet":
        score = NoisePredictionScore(unet(4, (8, 16), 4).double().eval(), sde)
    else:
        score = NoisePredictionScore(dit().double().eval(), sde, net_kwargs=LABELS)
    x, t = image_points(score.input_shape, B=1, dtype=F64)
    basis = coordinate_probes(x)
    for form in forms:
        ex = fpe_residual(score, x, t, sde, form=form, method="exact")
        with torch.enable_grad():
            fm = forward_mode.residual(score, x, t, sde, form, basis)
        torch.testing.assert_close(ex, fm, rtol=1e-9, atol=1e-9 * fm.abs().max().item())
        assert_naive_is_generic_plus_stencil(score, x, t, sde, form, basis[:1])


def test_learned_sigma_takes_the_first_channels():
    torch.manual_seed(0)
    net = dit(out_channels=2).eval()
    score = NoisePredictionScore(net, VPSDE(), learned_sigma=True, net_kwargs=LABELS)
    x, t = image_points(score.input_shape)
    with torch.no_grad():
        eps = net(x, 999 * t, **LABELS).sample[:, :1]
        torch.testing.assert_close(score(x, t), -eps / vp_sigma(t)[:, None, None, None])
    with pytest.raises(ValueError, match="learned_sigma=True"):
        NoisePredictionScore(net, VPSDE(), net_kwargs=LABELS)(x, t)


def test_derivative_kernels_only_where_a_derivative_is_taken():
    """The math attention backend (flash off) for derivatives in x or t, forward mode, or a
    torch.func transform; the default kernels for a plain forward and on Jets."""
    from fpkern.jet import Jet, Layout
    seen = []

    def net(x, timesteps):
        seen.append(torch.backends.cuda.flash_sdp_enabled())
        return x

    score = NoisePredictionScore(net, VPSDE(), input_shape=(2,))
    x, t = torch.randn(3, 2), torch.full((3,), 0.5)
    score(x, t)
    score(x.clone().requires_grad_(True), t)
    torch.func.jvp(lambda y: score(y, t), (x,), (torch.ones_like(x),))
    torch.func.vmap(lambda y: score(y, t))(x[None])
    lay = Layout(n1=1)
    with derivative_kernels(Jet(torch.stack([x, x]), lay), Jet(torch.stack([t, t]), lay)):
        seen.append(torch.backends.cuda.flash_sdp_enabled())
    assert seen == [True, False, False, False, True]


# ---- bad input ---------------------------------------------------------------------------

def test_noise_network_of_the_wrong_output_shape_dtype_or_type():
    sde = VPSDE()
    x, t = torch.randn(3, 2, 4, 4), torch.full((3,), 0.5)
    cases = [
        (lambda y, s: y[..., :3], ValueError,
         r"shape \(3, 2, 4, 3\) for x of shape \(3, 2, 4, 4\)"),
        (lambda y, s: torch.cat([y, y], 1), ValueError, "learned_sigma=True"),
        (lambda y, s: y.double(), ValueError, "returned torch.float64 for x of torch.float32"),
        (lambda y, s: {"eps": y}, TypeError, "returned dict"),
    ]
    for net, exc, match in cases:
        with pytest.raises(exc, match=match):
            NoisePredictionScore(net, sde, input_shape=(2, 4, 4))(x, t)
    with pytest.raises(ValueError, match=r"learned_sigma=True\): the network returned shape"):
        NoisePredictionScore(lambda y, s: y, sde, input_shape=(2, 4, 4), learned_sigma=True)(x, t)
    with pytest.raises(ValueError, match=r"DenoiserScore: the network returned shape"):
        DenoiserScore(lambda y, s: y[:, :1], sde, input_shape=(2, 4, 4))(x, t)
    with pytest.raises(ValueError, match=r"x must have shape \[B, 2, 4, 4\]"):
        NoisePredictionScore(lambda y, s: y, sde, input_shape=(2, 4, 4))(x[:, :1], t)


def test_energy_network_must_return_one_value_per_sample():
    """[B] is the contract; [B, 1] is refused with the squeeze that fixes it."""
    x, t = torch.randn(4, 3), torch.full((4,), 0.5)
    with pytest.raises(ValueError, match=r"shape \(4, 1\).*\[B\].*squeeze\(-1\)"):
        EnergyScore(lambda y, s: y.pow(2).sum(1, keepdim=True), input_shape=(3,))(x, t)
    with pytest.raises(ValueError, match=r"shape \(4, 3\).*shape \[B\]$"):
        EnergyScore(lambda y, s: y.pow(2), input_shape=(3,))(x, t)
    with pytest.raises(ValueError, match="float64 for x of torch.float32"):
        EnergyScore(lambda y, s: y.pow(2).sum(1).double(), input_shape=(3,))(x, t)
    with pytest.raises(ValueError, match="valid names"):
        EnergyScore(lambda y, s: y.sum(1), input_shape=(3,), kind="logits")


def test_schedule_that_is_not_the_sde_is_refused():
    diffusers = pytest.importorskip("diffusers")
    DDPM = diffusers.DDPMScheduler
    net = lambda y, s: y  # noqa: E731
    assert check_schedule(DDPM(), VPSDE()) == 1000                   # 1000 (1e-4 .. 0.02)
    half = DDPM(num_train_timesteps=500, beta_start=2e-4, beta_end=0.04)
    assert check_schedule(half, VPSDE()) == 500
    score = NoisePredictionScore(net, VPSDE(), input_shape=(2,), schedule=half)
    torch.testing.assert_close(score.labels(torch.tensor([1.0])), torch.tensor([499.0]))
    bad = [
        (DDPM(beta_end=0.012), VPSDE(), r"VPSDE\(beta_min=0\.1, beta_max=12\).*beta_max=20"),
        (DDPM(beta_schedule="scaled_linear"), VPSDE(), "beta_schedule 'scaled_linear'"),
        (DDPM(beta_schedule="squaredcos_cap_v2"), VPSDE(), "only linear betas"),
        (DDPM(prediction_type="v_prediction"), VPSDE(), "prediction_type 'v_prediction'"),
        (DDPM(), SubVPSDE(), "sde is SubVPSDE"),
        ({"beta_start": 1e-4, "beta_end": 0.02, "num_train_timesteps": 1000}, VPSDE(beta_max=10),
         "beta_max=20"),
    ]
    for schedule, sde, match in bad:
        with pytest.raises(ValueError, match=match):
            NoisePredictionScore(net, sde, input_shape=(2,), schedule=schedule)
    with pytest.raises(ValueError, match="num_train_timesteps=1000 but the schedule has 500"):
        NoisePredictionScore(net, VPSDE(), input_shape=(2,), num_train_timesteps=1000,
                             schedule=half)
    with pytest.raises(TypeError, match="schedule must be"):
        NoisePredictionScore(net, VPSDE(), input_shape=(2,), schedule=[0.1, 0.2])


def test_bad_adapter_arguments_are_named():
    net = lambda y, s: y  # noqa: E731
    with pytest.raises(TypeError, match="VPSDE or SubVPSDE.*VESDE"):
        NoisePredictionScore(net, VESDE(), input_shape=(2,))
    with pytest.raises(ValueError, match="input_shape is needed"):
        NoisePredictionScore(net, VPSDE())
    with pytest.raises(ValueError, match="num_train_timesteps must be an int >= 2"):
        NoisePredictionScore(net, VPSDE(), input_shape=(2,), num_train_timesteps=1)
    with pytest.raises(TypeError, match="net_kwargs must be a mapping"):
        NoisePredictionScore(net, VPSDE(), input_shape=(2,), net_kwargs=[1])
    with pytest.raises(TypeError, match="net must be a callable"):
        DenoiserScore(3, VPSDE(), input_shape=(2,))
    with pytest.raises(ValueError, match=r"t must lie in \[0, T=1\.0\]"):
        DenoiserScore(net, VPSDE(), input_shape=(2,))(torch.randn(2, 2), torch.tensor([0.5, 1.5]))
