"""Presets transcribe Score SDE's configs; one builder serves presets and configs."""

import pytest
import torch

from fpkern.models import (DDPM, PRESETS, NCSNpp, ScoreFn, from_preset, from_score_sde_config,
                           get_config, sde_from_config)
from fpkern.sde import SubVPSDE, VESDE, VPSDE


def test_preset_names():
    for name in ("ve/cifar10_ncsnpp_continuous", "vp/cifar10_ddpmpp_continuous",
                 "subvp/cifar10_ddpmpp_continuous", "vp/cifar10_ncsnpp_continuous",
                 "vp/cifar10_ncsnpp_deep_continuous", "ve/cifar10_ncsnpp_deep_continuous",
                 "small/ncsnpp", "small/ddpmpp"):
        assert name in PRESETS
    with pytest.raises(ValueError, match="valid names"):
        get_config("ve/cifar100")


def test_score_sde_config_values():
    """Spot checks against configs/ve/cifar10_ncsnpp_continuous.py and vp/cifar10_ddpmpp_continuous.py."""
    ve = get_config("ve/cifar10_ncsnpp_continuous")
    assert ve["training"]["sde"] == "vesde" and ve["training"]["continuous"]
    m = ve["model"]
    assert (m["name"], m["fir"], m["progressive_input"], m["embedding_type"], m["scale_by_sigma"],
            m["fourier_scale"], m["ema_rate"], m["sigma_max"]) == (
        "ncsnpp", True, "residual", "fourier", True, 16, 0.999, 50.0)
    assert not ve["data"]["centered"]
    vp = get_config("vp/cifar10_ddpmpp_continuous")
    m = vp["model"]
    assert (m["name"], m["fir"], m["progressive_input"], m["embedding_type"], m["scale_by_sigma"],
            m["ema_rate"]) == ("ncsnpp", False, "none", "positional", False, 0.9999)
    assert vp["data"]["centered"] and vp["training"]["reduce_mean"]
    assert get_config("vp/cifar10_ncsnpp_deep_continuous")["model"]["num_res_blocks"] == 8
    assert get_config("vp/ddpm/cifar10_continuous")["model"]["name"] == "ddpm"


def test_get_config_returns_a_copy():
    cfg = get_config("small/ncsnpp")
    cfg["model"]["nf"] = 999
    assert get_config("small/ncsnpp")["model"]["nf"] != 999


def test_from_preset_and_from_config_share_the_builder():
    torch.manual_seed(0)
    a = from_preset("small/ddpmpp")
    torch.manual_seed(0)
    b = from_score_sde_config(get_config("small/ddpmpp"))
    assert type(a) is type(b) is NCSNpp
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    with torch.device("meta"):
        assert isinstance(from_preset("subvp/cifar10_ddpm_continuous"), DDPM)


@pytest.mark.parametrize("name,sde_cls", [("small/ncsnpp", VESDE), ("small/ddpmpp", VPSDE)])
def test_small_presets(name, sde_cls):
    cfg = get_config(name)
    net = from_preset(name)
    assert net.input_shape == (1, 16, 16)
    assert sum(p.numel() for p in net.parameters()) < 500_000
    sde = sde_from_config(cfg)
    assert type(sde) is sde_cls
    sf = ScoreFn(net, sde)
    x = torch.rand(4, 1, 16, 16)
    out = sf(x, torch.tensor([1e-3, 0.2, 0.6, 1.0]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_sde_from_config():
    cfg = get_config("ve/cifar10_ncsnpp_continuous")
    sde = sde_from_config(cfg)
    assert isinstance(sde, VESDE) and (sde.sigma_min, sde.sigma_max, sde.N) == (0.01, 50.0, 1000)
    cfg = get_config("subvp/cifar10_ddpmpp_continuous")
    sde = sde_from_config(cfg)
    assert type(sde) is SubVPSDE and (sde.beta_min, sde.beta_max) == (0.1, 20.0)
    cfg["training"]["sde"] = "cld"
    with pytest.raises(ValueError, match="vesde"):
        sde_from_config(cfg)


def test_config_errors():
    cfg = get_config("small/ncsnpp")
    cfg["model"]["nff"] = 3
    with pytest.raises(ValueError, match="nff"):
        from_score_sde_config(cfg)
    cfg = get_config("small/ncsnpp")
    cfg["model"]["name"] = "ncsnv2"
    with pytest.raises(ValueError, match="ddpm"):
        from_score_sde_config(cfg)
    with pytest.raises(ValueError, match="data"):
        from_score_sde_config({"model": {"name": "ncsnpp"}})
