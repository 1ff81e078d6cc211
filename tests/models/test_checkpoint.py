"""Score SDE checkpoints: round trip, EMA weights, DataParallel prefixes, listed mismatches,
the sigmas buffer, and checkpoints written in Score SDE's own layout."""

import copy

import pytest
import torch

from fpkern.models import (CheckpointMismatchError, from_score_sde_config,
                           load_score_sde_checkpoint, save_score_sde_checkpoint)
from fpkern.models.checkpoint import strip_prefix

from conftest import randomize_, tiny_config

X = torch.rand(2, 2, 8, 8)
LAB = torch.tensor([0.2, 9.0])


def outputs(net):
    return net.eval()(X, LAB)


def test_round_trip_model_weights(tmp_path):
    cfg = tiny_config()
    net = randomize_(from_score_sde_config(cfg), seed=1)
    path = tmp_path / "checkpoint_1.pth"
    save_score_sde_checkpoint(path, net, step=7)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"model", "ema", "optimizer", "step"} and raw["step"] == 7
    assert list(raw["model"]) == ["module." + k for k in net.state_dict()]
    assert next(iter(raw["model"])) == "module.sigmas"
    loaded = load_score_sde_checkpoint(path, cfg, ema=False)
    assert torch.equal(outputs(loaded), outputs(net))


def test_ema_weights_are_applied_in_parameter_order(tmp_path):
    cfg = tiny_config()
    net = randomize_(from_score_sde_config(cfg), seed=1)
    ema_net = randomize_(from_score_sde_config(cfg), seed=2)
    with torch.no_grad():      # the frozen Fourier W has no shadow: keep it equal
        ema_net.all_modules[0].W.copy_(net.all_modules[0].W)
    shadows = [p.detach().clone() for p in ema_net.parameters() if p.requires_grad]
    assert len(shadows) == sum(1 for _ in net.parameters()) - 1
    path = tmp_path / "ckpt.pth"
    save_score_sde_checkpoint(path, net, ema_params=shadows, ema_decay=0.999, num_updates=5)
    with_ema = load_score_sde_checkpoint(path, cfg, ema=True)
    without = load_score_sde_checkpoint(path, cfg, ema=False)
    assert torch.equal(outputs(with_ema), outputs(ema_net))
    assert torch.equal(outputs(without), outputs(net))


def test_name_keyed_ema_entry(tmp_path):
    cfg = tiny_config()
    net = randomize_(from_score_sde_config(cfg), seed=3)
    state = {"module." + k: v for k, v in net.state_dict().items()}
    torch.save({"model": state, "ema": state, "optimizer": {}, "step": 0}, tmp_path / "c.pth")
    assert torch.equal(outputs(load_score_sde_checkpoint(tmp_path / "c.pth", cfg)), outputs(net))


def test_mismatching_checkpoint_lists_differences(tmp_path):
    small = tiny_config(nf=8)
    net = from_score_sde_config(tiny_config(nf=16))
    path = tmp_path / "other.pth"
    save_score_sde_checkpoint(path, net)
    with pytest.raises(CheckpointMismatchError) as err:
        load_score_sde_checkpoint(path, small)
    msg = str(err.value)
    assert "with another shape" in msg and "all_modules.0.W: network (8,), checkpoint (16,)" in msg
    assert isinstance(err.value, ValueError)

    state = {"module." + k: v for k, v in from_score_sde_config(small).state_dict().items()}
    del state["module.all_modules.1.bias"]
    state["module.extra.weight"] = torch.zeros(1)
    torch.save({"model": state, "ema": {}, "optimizer": {}, "step": 0}, path)
    with pytest.raises(CheckpointMismatchError, match=r"missing: all_modules\.1\.bias") as err:
        load_score_sde_checkpoint(path, small, ema=False)
    assert "unexpected: extra.weight" in str(err.value)


def test_bad_ema_and_non_checkpoints(tmp_path):
    cfg = tiny_config()
    net = from_score_sde_config(cfg)
    path = tmp_path / "c.pth"
    shadows = [p.detach() for p in net.parameters() if p.requires_grad][:-1]
    torch.save({"model": {"module." + k: v for k, v in net.state_dict().items()},
                "ema": {"decay": 0.9, "num_updates": 1, "shadow_params": shadows}}, path)
    with pytest.raises(CheckpointMismatchError, match="1 missing"):
        load_score_sde_checkpoint(path, cfg)
    load_score_sde_checkpoint(path, cfg, ema=False)       # model weights alone are fine
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(CheckpointMismatchError, match="not a Score SDE checkpoint"):
        load_score_sde_checkpoint(path, cfg)


# ---- checkpoints written in Score SDE's layout, from the independent enumeration ----------

LAYOUT_CASES = {
    "ncsnpp-ve": dict(),
    "ddpmpp-vp": dict(sde="vpsde", fir=False, progressive_input="none",
                      embedding_type="positional", scale_by_sigma=False),
    "ddpm-vp": dict(name="ddpm", sde="vpsde"),
}


def score_sde_sigmas_numpy(model: dict) -> torch.Tensor:
    """utils.get_sigmas(config) as Score SDE registers it: torch.tensor of a NumPy array."""
    import numpy as np
    return torch.tensor(np.exp(np.linspace(np.log(model["sigma_max"]), np.log(model["sigma_min"]),
                                           model["num_scales"])))


def score_sde_checkpoint(cfg: dict, seed: int = 0) -> dict:
    """A checkpoint as Score SDE's run_lib saves it (``module.`` keys, the sigmas buffer,
    the EMA shadow list of the trainable parameters), built from score_sde_spec alone."""
    from score_sde_spec import score_sde_spec
    g = torch.Generator().manual_seed(seed)
    model, shadows = {}, []
    for key, shape, kind in score_sde_spec(cfg):
        if kind == "buffer":
            model["module." + key] = score_sde_sigmas_numpy(cfg["model"])
            continue
        model["module." + key] = 0.2 * torch.randn(shape, generator=g)
        if kind == "trainable":
            shadows.append(0.2 * torch.randn(shape, generator=g))
    return {"optimizer": {}, "model": model, "step": 11,
            "ema": {"decay": 0.9999, "num_updates": 11, "shadow_params": shadows}}


def _config(case):
    opts = dict(LAYOUT_CASES[case])
    return tiny_config(opts.pop("name", "ncsnpp"), opts.pop("sde", "vesde"), **opts)


@pytest.mark.parametrize("case", sorted(LAYOUT_CASES))
def test_score_sde_layout_checkpoint_loads_and_is_written_back(tmp_path, case):
    """A Score SDE checkpoint (module.sigmas first, float64; shadow_params) loads with strict
    checking, model and EMA weights land where they belong, and fpkern writes the same
    layout back: keys in order, shapes, dtypes and values."""
    cfg = _config(case)
    ckpt = score_sde_checkpoint(cfg)
    assert next(iter(ckpt["model"])) == "module.sigmas"
    path = tmp_path / "checkpoint_11.pth"
    torch.save(ckpt, path)

    raw_net = load_score_sde_checkpoint(path, cfg, ema=False)
    sd = raw_net.state_dict()
    assert list(sd) == [k.removeprefix("module.") for k in ckpt["model"]]
    for k, v in ckpt["model"].items():
        got = sd[k.removeprefix("module.")]
        assert got.dtype == v.dtype and torch.equal(got, v), k

    ema_net = load_score_sde_checkpoint(path, cfg, ema=True)
    trainable = [p for p in ema_net.parameters() if p.requires_grad]
    assert len(trainable) == len(ckpt["ema"]["shadow_params"])
    for p, shadow in zip(trainable, ckpt["ema"]["shadow_params"]):
        assert torch.equal(p, shadow)
    assert torch.equal(ema_net.sigmas, ckpt["model"]["module.sigmas"])

    out = tmp_path / "written.pth"
    save_score_sde_checkpoint(out, raw_net, ema_params=ckpt["ema"]["shadow_params"],
                              ema_decay=0.9999, num_updates=11, step=11)
    back = torch.load(out, weights_only=True)
    assert list(back["model"]) == list(ckpt["model"])
    for k, v in ckpt["model"].items():
        assert back["model"][k].dtype == v.dtype and torch.equal(back["model"][k], v), k
    assert back["ema"]["decay"] == 0.9999 and back["ema"]["num_updates"] == 11
    assert all(torch.equal(a, b) for a, b in zip(back["ema"]["shadow_params"],
                                                 ckpt["ema"]["shadow_params"]))
    assert back["step"] == 11
    assert torch.equal(outputs(load_score_sde_checkpoint(out, cfg)), outputs(ema_net))


def test_score_sde_state_dict_loads_into_the_network_strictly():
    cfg = _config("ncsnpp-ve")
    state = strip_prefix(score_sde_checkpoint(cfg)["model"])
    net = from_score_sde_config(cfg)
    net.load_state_dict(state)                       # strict: no missing, no unexpected key
    assert torch.equal(net.sigmas, state["sigmas"])


def test_sigmas_buffer_is_score_sde_get_sigmas():
    """Bit for bit the NumPy grid of utils.get_sigmas; float64 like torch.tensor(ndarray)."""
    for case in sorted(LAYOUT_CASES):
        cfg = _config(case)
        for n in (1000, 7, 1):
            cfg["model"]["num_scales"] = n
            net = from_score_sde_config(cfg)
            want = score_sde_sigmas_numpy(cfg["model"])
            assert net.sigmas.dtype == torch.float64 and torch.equal(net.sigmas, want), (case, n)


def test_sigmas_of_another_configuration_are_refused(tmp_path):
    """A checkpoint trained with other noise levels names sigmas and the configuration, through
    load_score_sde_checkpoint (CheckpointMismatchError) and net.load_state_dict alike."""
    cfg = _config("ncsnpp-ve")
    ckpt = score_sde_checkpoint(cfg)
    path = tmp_path / "c.pth"
    torch.save(ckpt, path)
    other = copy.deepcopy(cfg)
    other["model"]["sigma_max"] = 16.0
    with pytest.raises(CheckpointMismatchError, match=r"sigmas .*sigma_max=16\.0"):
        load_score_sde_checkpoint(path, other)
    with pytest.raises(RuntimeError, match=r"sigmas .*sigma_max=16\.0"):
        from_score_sde_config(other).load_state_dict(strip_prefix(ckpt["model"]))
    fewer = copy.deepcopy(cfg)
    fewer["model"]["num_scales"] = 500
    with pytest.raises(CheckpointMismatchError,
                       match=r"sigmas: network \(500,\), checkpoint \(1000,\)"):
        load_score_sde_checkpoint(path, fewer)
    with pytest.raises(RuntimeError, match="num_scales=500"):
        from_score_sde_config(fewer).load_state_dict(strip_prefix(ckpt["model"]))
    # float32 copies of the same levels (a network moved to float32) are the same levels
    state = strip_prefix(ckpt["model"])
    state["sigmas"] = state["sigmas"].float()
    from_score_sde_config(cfg).load_state_dict(state)
