"""ScoreFn: the label and output conventions of Score SDE's get_score_fn, input checks,
and forward-mode derivatives through the wrapped networks."""

import pytest
import torch
import torch.nn as nn

from fpkern.models import MLP, ScoreFn, from_score_sde_config
from fpkern.sde import SubVPSDE, VESDE, VPSDE

from conftest import assert_close_report, fd_directional, randomize_, tiny_config


class Recorder(nn.Module):
    """A stand-in network: remembers its labels and returns a fixed tensor."""

    output_type = "score_sde"
    input_shape = (2, 3)

    def __init__(self, out):
        super().__init__()
        self.out, self.labels = out, None

    def forward(self, x, labels):
        self.labels = labels
        return self.out.to(x.dtype)


T = torch.tensor([1e-5, 0.3, 1.0], dtype=torch.float64)
X = torch.randn(3, 2, 3, dtype=torch.float64)
OUT = torch.randn(3, 2, 3, dtype=torch.float64)


def test_ve_labels_are_sigma_and_output_is_the_score():
    sde = VESDE(0.01, 50.0)
    net = Recorder(OUT)
    s = ScoreFn(net, sde)(X, T)
    torch.testing.assert_close(net.labels, 0.01 * (50 / 0.01) ** T)
    torch.testing.assert_close(s, OUT)


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE()], ids=["vp", "subvp"])
def test_vp_labels_are_999t_and_output_is_noise(sde):
    net = Recorder(OUT)
    s = ScoreFn(net, sde)(X, T)
    torch.testing.assert_close(net.labels, 999 * T)
    log_alpha = -0.25 * T ** 2 * 19.9 - 0.05 * T
    var = 1 - torch.exp(2 * log_alpha)
    std = var if isinstance(sde, SubVPSDE) else var.sqrt()
    torch.testing.assert_close(s, -OUT / std[:, None, None])


def test_discrete_conventions():
    net = Recorder(OUT)
    ScoreFn(net, VESDE(N=11), continuous=False)(X, T)
    assert net.labels.tolist() == [10, 7, 0]                 # round((1 - t) * 10)
    sde = VPSDE(N=1000)
    s = ScoreFn(net, sde, continuous=False)(X, T)
    torch.testing.assert_close(net.labels, T * 999)
    betas = torch.linspace(0.1 / 1000, 20 / 1000, 1000, dtype=torch.float64)
    std = torch.sqrt(1 - torch.cumprod(1 - betas, 0))[(T * 999).long()]
    torch.testing.assert_close(s, -OUT / std[:, None, None])


def test_mlp_convention():
    torch.manual_seed(0)
    mlp = MLP(3, width=16, depth=2).double()
    x, t = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0.01, 0.2, 0.5, 1.0], dtype=torch.float64)
    for sde in (VESDE(), VPSDE(), SubVPSDE()):
        s = ScoreFn(mlp, sde)(x, t)
        torch.testing.assert_close(s, -mlp(x, t) / sde.sigma(t)[:, None])


def test_input_validation():
    sf = ScoreFn(Recorder(OUT), VPSDE())
    with pytest.raises(ValueError, match=r"\[B, 2, 3\]"):
        sf(torch.randn(3, 3, 2, dtype=torch.float64), T)
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        sf(X, T[:2])
    with pytest.raises(ValueError, match=r"\[0, T"):
        sf(X, T + 1)
    with pytest.raises(TypeError, match="floating"):
        sf(X.long(), T)
    with pytest.raises(ValueError, match="output_type"):
        ScoreFn(nn.Linear(2, 2), VPSDE())
    with pytest.raises(TypeError, match="VESDE"):
        ScoreFn(Recorder(OUT), object())


def test_exposes_net_and_sde_and_keeps_mode():
    net = from_score_sde_config(tiny_config())
    sde = VESDE()
    sf = ScoreFn(net, sde)
    assert sf.net is net and sf.sde is sde and sf.input_shape == (2, 8, 8)
    net.eval()
    sf(torch.rand(1, 2, 8, 8), torch.tensor([0.5]))
    assert not net.training


@pytest.mark.parametrize("case", ["ncsnpp-ve", "ddpmpp-vp", "ddpmpp-subvp", "mlp-ve"])
def test_jvp_through_score_fn_in_x_and_t(case):
    """d/dx and d/dt of the score by forward mode vs central differences (float64)."""
    torch.manual_seed(0)
    if case == "mlp-ve":
        net, sde = MLP(4, width=32, depth=3), VESDE()
        x = torch.randn(3, 4, dtype=torch.float64)
    else:
        sde_name = {"ncsnpp-ve": "vesde", "ddpmpp-vp": "vpsde", "ddpmpp-subvp": "vpsde"}[case]
        opts = {} if case == "ncsnpp-ve" else dict(fir=False, progressive_input="none",
                                                   embedding_type="positional")
        net = from_score_sde_config(tiny_config(sde=sde_name, **opts))
        sde = {"ncsnpp-ve": VESDE(), "ddpmpp-vp": VPSDE(), "ddpmpp-subvp": SubVPSDE()}[case]
        x = torch.rand(3, 2, 8, 8, dtype=torch.float64)
    sf = ScoreFn(randomize_(net, scale=0.2).double().eval(), sde)
    t = torch.tensor([0.05, 0.4, 0.9], dtype=torch.float64)
    v = torch.randn_like(x)
    _, dx = torch.func.jvp(lambda z: sf(z, t), (x,), (v,))
    assert_close_report(dx, fd_directional(lambda z: sf(z, t), x, v), rtol=1e-5, atol=1e-7, what="d/dx")
    one = torch.ones_like(t)
    _, dt = torch.func.jvp(lambda s: sf(x, s), (t,), (one,))
    assert_close_report(dt, fd_directional(lambda s: sf(x, s), t, one, h=1e-6), rtol=1e-4,
                        atol=1e-6, what="d/dt")
