"""TrainConfig: the CLI and the dataclass agree, defaults resolve, every bad option raises."""

import dataclasses
import random

import numpy as np
import pytest
import torch

from fpkern.train.cli import build_parser, main, parse_args
from fpkern.train.config import ARCH_DEFAULTS, TrainConfig
from fpkern.train.rng import seed_all


def test_cli_options_are_the_config_fields_with_the_same_defaults():
    parser = build_parser()
    dests = {a.dest: a.default for a in parser._actions
             if a.dest not in ("help", "config", "log_level")}
    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert dests == fields


def test_resolved_fills_the_arch_defaults_and_types():
    cfg = TrainConfig(arch="mlp", dataset="moons", m=2, lr=1, workdir=__import__("pathlib").Path("w"))
    r = cfg.resolved()
    assert r.workdir == "w" and r.steps == ARCH_DEFAULTS["mlp"]["steps"] and r.sde == "vp"
    assert type(r.m) is float and type(r.lr) is float and r.ema == ARCH_DEFAULTS["mlp"]["ema"]
    assert cfg.steps is None                                   # the given config is unchanged
    opts = r.checkpoint_options(cfg)
    assert opts["sde"] is None and opts["sde_name"] == "vp"     # the keys checkpoints carry
    assert opts["ema"] is None and opts["ema_decay"] == r.ema
    assert TrainConfig(arch="mlp", dataset="moons", fp_batch=0).resolved().checkpoint_options(
        TrainConfig())["fp_batch"] is None                      # 0: all samples


@pytest.mark.parametrize("options, match", [
    (dict(arch="resnet"), "arch"),
    (dict(arch="mlp", dataset="digits"), "does not fit arch"),
    (dict(arch="mlp", dataset="moons", preset="small/ncsnpp"), "--preset"),
    (dict(preset="nope"), "preset"),
    (dict(weighting="nope"), "weighting"),
    (dict(steps=7.5), "steps must be int"),
    (dict(amp=1), "amp must be bool"),
    (dict(probes=True), "probes must be int"),
    (dict(ema=1.0), "EMA decay"),
    (dict(alpha=-1.0), "alpha"),
    (dict(fp_batch=-1), "fp_batch"),
    (dict(log_every=0), "log_every"),
    (dict(init_from="no/such/file.pt"), "init_from"),
])
def test_bad_options_raise_naming_the_option(options, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**options).resolved()


def test_batch_must_split_over_the_ranks():
    with pytest.raises(ValueError, match="divisible"):
        TrainConfig(batch_size=6).resolved(world_size=4)


def test_from_file_and_unknown_names(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[train]\narch = "mlp"\nfp-points = "x"\nsteps = 7\n')
    cfg = TrainConfig.from_file(path)
    assert (cfg.arch, cfg.fp_points, cfg.steps) == ("mlp", "x", 7)
    with pytest.raises(ValueError, match="wieghting"):
        TrainConfig.from_options({"wieghting": "ll"})


def test_cli_config_file_mistakes_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--config", str(tmp_path / "missing.toml")])
    assert e.value.code == 2
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = \n")
    with pytest.raises(SystemExit) as e:
        parse_args(["--config", str(bad)])
    assert e.value.code == 2 and "bad.toml" in capsys.readouterr().err
    # a TOML value of the wrong type reaches the config's check: exit 2, not a traceback
    typed = tmp_path / "typed.toml"
    typed.write_text('arch = "mlp"\ndataset = "moons"\nsteps = 2.5\n')
    assert main(["--config", str(typed), "--workdir", str(tmp_path / "w")]) == 2
    assert main(["--arch", "mlp", "--dataset", "moons", "--init-from", str(tmp_path / "no.pt"),
                 "--workdir", str(tmp_path / "w")]) == 2


def test_seed_all_seeds_torch_numpy_and_random():
    def draws():
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]

    seed_all(5)
    a = draws()
    seed_all(5)
    assert draws() == a
    seed_all(2**40 + 5)                  # beyond numpy's 32-bit seeds
    assert draws()[1] != a[1]
