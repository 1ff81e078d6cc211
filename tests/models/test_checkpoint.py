"""Score SDE checkpoints: round trip, EMA weights, DataParallel prefixes, listed mismatches."""

import pytest
import torch

from fpkern.models import (CheckpointMismatchError, from_score_sde_config,
                           load_score_sde_checkpoint, save_score_sde_checkpoint)

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
    assert all(k.startswith("module.all_modules.") for k in raw["model"])
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
