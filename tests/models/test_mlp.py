"""The MLP score network for vector data."""

import pytest
import torch

from fpkern.models import MLP

from conftest import fd_directional


def test_shapes_and_parameter_count():
    m = MLP(5, width=32, depth=3, embed_dim=16)
    # embedding W (8, frozen) + temb 16->32 + in 5->32 + 2 x (hidden 32->32 + proj 32->32) + out 32->5
    expected = 8 + (16 * 32 + 32) + (5 * 32 + 32) + 2 * 2 * (32 * 32 + 32) + (32 * 5 + 5)
    assert sum(p.numel() for p in m.parameters()) == expected
    out = m(torch.randn(7, 5), torch.rand(7))
    assert out.shape == (7, 5) and m.input_shape == (5,)


def test_depth_one_is_a_single_hidden_layer():
    m = MLP(2, width=8, depth=1)
    assert len(m.hidden) == 0
    assert m(torch.randn(3, 2), torch.rand(3)).shape == (3, 2)


def test_time_conditioning_matters():
    torch.manual_seed(0)
    m = MLP(3, width=16, depth=2)
    x = torch.randn(4, 3)
    assert not torch.allclose(m(x, torch.full((4,), 0.1)), m(x, torch.full((4,), 0.9)))


@pytest.mark.parametrize("bad", [dict(dim=0), dict(width=0), dict(depth=0), dict(embed_dim=7)])
def test_bad_arguments(bad):
    kw = dict(dim=2, width=8, depth=2) | bad
    with pytest.raises(ValueError):
        MLP(**kw)


def test_unknown_activation_lists_valid_names():
    with pytest.raises(ValueError, match="swish"):
        MLP(2, act="gelu")


def test_jvp_float64():
    torch.manual_seed(0)
    m = MLP(4, width=16, depth=3, act="elu").double()
    x, t = torch.randn(3, 4, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    v = torch.randn_like(x)
    _, tangent = torch.func.jvp(lambda z: m(z, t), (x,), (v,))
    torch.testing.assert_close(tangent, fd_directional(lambda z: m(z, t), x, v), rtol=1e-6, atol=1e-8)
