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


# ---- config files are typed as strictly as the dataclass (issue 19, item 4) ---------------
@pytest.mark.parametrize("text, words", [
    ('resume = "false"', ["resume", "bool", "'false'"]),
    ('amp = "false"', ["amp", "bool", "'false'"]),
    ('progress = "no"', ["progress", "bool"]),
    ('progress = 1', ["progress", "bool"]),
    ('batch_size = 16.7', ["batch_size", "int", "16.7"]),
    ('steps = "3"', ["steps", "int", "'3'"]),
    ('alpha = [1, 2]', ["alpha", "float", "[1, 2]"]),
    ('alpha = "0.5"', ["alpha", "float"]),
    ('workdir = 3', ["workdir", "str"]),
    ('arch = "resnet"', ["arch", "resnet", "valid names"]),
    ('log_level = "debug"', ["log_level", "valid names"]),
    ('wieghting = "ll"', ["wieghting", "unknown"]),
    ('config = "other.toml"', ["config", "unknown"]),
    ('steps = ', ["line 1"]),
    ('[train\narch = "mlp"', ["line 1"]),
])
def test_config_file_mistakes_name_the_file_and_key(tmp_path, capsys, text, words):
    path = tmp_path / "run.toml"
    path.write_text(text + "\n")
    with pytest.raises(SystemExit) as e:
        parse_args(["--config", str(path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--config {path}" in err[0], err
    assert all(w in err[0] for w in words), err[0]
    # the command itself: exit 2 with the same one line, nothing run
    assert main(["--config", str(path), "--workdir", str(tmp_path / "w")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == err
    assert not (tmp_path / "w").exists()


def test_config_file_values_of_the_right_types(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('arch = "mlp"\nresume = false\namp = true\nalpha = 1\nbatch_size = 16\n'
                    'progress = false\nlog-level = "WARNING"\n')
    args = parse_args(["--config", str(path)])
    assert args.resume is False and args.amp is True and args.progress is False
    assert args.alpha == 1.0 and type(args.alpha) is float and args.batch_size == 16
    assert args.log_level == "WARNING"
    assert parse_args(["--config", str(path), "--progress", "true", "--resume"]).progress is True
    path.write_text('resume = "false"\n')
    with pytest.raises(ValueError, match="resume must be bool"):
        TrainConfig.from_file(path)


def test_a_missing_or_unreadable_config_file_is_one_line(tmp_path, capsys):
    for path in (tmp_path / "missing.toml", tmp_path):
        assert main(["--config", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--config {path}: cannot read it" in err[0], err


@pytest.mark.parametrize("options, match", [
    (dict(num_samples=0), "num_samples"),
    (dict(sample_steps=0), "sample_steps"),
    (dict(sample_every=-1), "sample_every"),
    (dict(eval_every=-2), "eval_every"),
    (dict(warmup=-1), "warmup"),
    (dict(mlp_width=0), "mlp_width"),
    (dict(grad_clip=float("nan")), "grad_clip"),
    (dict(alpha=float("inf")), "alpha"),
    (dict(device="foo"), "--device"),
    (dict(device="cuda:99"), "--device cuda:99"),
])
def test_options_used_late_in_a_run_are_checked_first(options, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(arch="mlp", dataset="moons", **options).resolved()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_amp_autocasts_to_bfloat16_on_every_device(device):
    """float16 gives the jets' second-order rows inf/NaN (issue 19): --amp is bfloat16 on
    CUDA too (no GradScaler: bfloat16 has float32's range)."""
    import warnings
    from types import SimpleNamespace

    from fpkern.train.loop import _Run

    run = SimpleNamespace(cfg=SimpleNamespace(amp=True), device=torch.device(device))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # CUDA autocast on a CPU build warns
        assert _Run.autocast(run).fast_dtype == torch.bfloat16
