"""``python -m fpkern.sample``: the data range, SDE and preset come from the checkpoint;
every option and the output are checked before any sample is drawn; a user mistake exits 2
with one line naming the option or file.

The checkpoints are written here as the training loop and Score SDE write them, without
training (weights at their initialisation, or zero); ``tests/test_evaluate_cli.py`` uses the
same helpers.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path

import pytest
import torch

from fpkern.models import ScoreFn, build_model, from_preset, save_score_sde_checkpoint
from fpkern.sampling import sample
from fpkern.train import checkpoint as ckpt_io
from fpkern.train.config import TrainConfig

PROG = "python -m fpkern.sample"


# ---- checkpoints and output helpers (shared with tests/test_evaluate_cli.py) ----------------
def _zero(net: torch.nn.Module) -> None:
    """Every weight 0: the network outputs 0, so the score is 0 for every x and t."""
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()


def train_checkpoint(folder: Path, *, zero: bool = False, seed: int = 0, **options):
    """An fpkern training checkpoint (step 0) of the run ``options`` would start, holding
    the options the loop saves; (path, net) with the network whose weights it holds."""
    given = TrainConfig(workdir=str(folder), **options)
    cfg = given.resolved()
    torch.manual_seed(seed)
    net = build_model(cfg.arch, preset=cfg.preset, sde=cfg.sde, mlp_width=cfg.mlp_width,
                      mlp_depth=cfg.mlp_depth).net
    if zero:
        _zero(net)
    weights = net.state_dict()
    state = {"format": ckpt_io.FORMAT, "version": 1, "step": 0, "model": weights,
             "ema": weights, "optimizer": {}, "scaler": None, "rng": [], "data": [],
             "options": cfg.checkpoint_options(given)}
    return ckpt_io.save_checkpoint(Path(folder) / "checkpoints", 0, state), net


def score_sde_checkpoint(path: Path, preset: str, *, zero: bool = False, seed: int = 0):
    """A Score SDE checkpoint of ``preset``'s network; (path, net)."""
    torch.manual_seed(seed)
    net = from_preset(preset)
    if zero:
        _zero(net)
    save_score_sde_checkpoint(path, net)
    return path, net


def error_line(capsys) -> str:
    """The command's stderr, which must be exactly one line (no traceback); that line."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, f"expected one line on stderr:\n{err}"
    return lines[0]


def docstring_commands(doc: str, prog: str) -> list[list[str]]:
    """The example command lines of a module docstring, as argument lists after ``prog``."""
    text = doc.replace("\\\n", " ")
    return [shlex.split(line.strip())[len(prog.split()):] for line in text.splitlines()
            if line.strip().startswith(prog)]


# ---- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Small checkpoints: NCSN++ on [0, 1] (small/ncsnpp, VE), the same network under VP
    (centered, [-1, 1]), an MLP on 2-D points, and Score SDE checkpoints of small/ncsnpp
    and small/ddpmpp."""
    root = tmp_path_factory.mktemp("sample_ckpts")
    ve, ve_net = train_checkpoint(root / "ve", arch="ncsnpp", seed=1)
    vp, vp_net = train_checkpoint(root / "vp", arch="ncsnpp", sde="vp", seed=2)
    mlp, _ = train_checkpoint(root / "mlp", arch="mlp", dataset="8gaussians", mlp_width=16,
                              mlp_depth=2)
    sde_ve, sde_ve_net = score_sde_checkpoint(root / "score_sde_ve.pth", "small/ncsnpp", seed=3)
    sde_vp, sde_vp_net = score_sde_checkpoint(root / "score_sde_vp.pth", "small/ddpmpp", seed=4)
    return {"ve": (ve, ve_net), "vp": (vp, vp_net), "mlp": mlp,
            "score_sde_ve": (sde_ve, sde_ve_net), "score_sde_vp": (sde_vp, sde_vp_net)}


def _main(argv):
    from fpkern.sample import main

    return main([str(a) for a in argv])


def _grid_tiles(path: Path, n: int, size: int) -> torch.Tensor:
    """The n single-channel size x size tiles of a grid PNG (2-pixel padding, rows of
    ceil(sqrt(n)))."""
    import numpy as np
    from PIL import Image

    arr = torch.from_numpy(np.array(Image.open(path)))
    nrow, pad = int(math.ceil(math.sqrt(n))), 2
    tiles = []
    for i in range(n):
        r, c = divmod(i, nrow)
        y, x = pad + r * (size + pad), pad + c * (size + pad)
        tiles.append(arr[y:y + size, x:x + size])
    return torch.stack(tiles)


def _pixels(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Samples in [lo, hi] -> 8-bit pixels: the value range split into 256 equal bins."""
    u = ((x.double() - lo) / (hi - lo)).clamp(0, 1)
    return torch.floor(u * 256).clamp(max=255).to(torch.uint8)[:, 0]


def _reference_samples(net, sde, n, seed):
    """The CLI's samples recomputed from the network and SDE: ode_euler, 3 steps, eps 1e-3,
    with the Tweedie step, from a generator seeded with ``seed``."""
    net = net.eval()
    return sample(ScoreFn(net, sde), sde, (n, 1, 16, 16), method="ode_euler", steps=3,
                  generator=torch.Generator().manual_seed(seed)).samples


# ---- the data range ------------------------------------------------------------------------
@pytest.mark.parametrize("which,data_range,argv", [
    ("ve", (0.0, 1.0), []),                                   # small/ncsnpp: centered False
    ("vp", (-1.0, 1.0), []),                                  # --sde vp: centered
    ("score_sde_ve", (0.0, 1.0), ["--config", "small/ncsnpp"]),
    ("score_sde_vp", (-1.0, 1.0), ["--config", "small/ddpmpp"]),
])
def test_png_maps_samples_from_the_checkpoints_data_range(ckpts, tmp_path, which, data_range, argv):
    path, net = ckpts[which]
    out = tmp_path / "grid.png"
    assert _main(["--checkpoint", path, *argv, "--method", "ode_euler", "--steps", "3",
                  "-n", "4", "--seed", "5", "--out", out]) == 0
    if which.startswith("score_sde"):
        from fpkern.models import get_config, sde_from_config

        sde = sde_from_config(get_config(argv[1]))
    else:
        sde = build_model("ncsnpp", preset="small/ncsnpp", sde=None if which == "ve" else "vp").sde
    x = _reference_samples(net, sde, 4, 5)
    want = _pixels(x, *data_range)
    other = _pixels(x, *((-1.0, 1.0) if data_range == (0.0, 1.0) else (0.0, 1.0)))
    assert not torch.equal(want, other), "the test cannot tell the two ranges apart"
    got = _grid_tiles(out, 4, 16)
    assert torch.equal(got, want), f"{int((got != want).sum())} pixels differ"


def test_data_range_option_overrides_the_checkpoint(ckpts, tmp_path):
    path, net = ckpts["ve"]
    out = tmp_path / "grid.png"
    assert _main(["--checkpoint", path, "--method", "ode_euler", "--steps", "3", "-n", "4",
                  "--seed", "5", "--data-range", "-1", "1", "--out", out]) == 0
    sde = build_model("ncsnpp", preset="small/ncsnpp").sde
    assert torch.equal(_grid_tiles(out, 4, 16), _pixels(_reference_samples(net, sde, 4, 5), -1, 1))


def test_load_score_model_reports_sde_preset_and_range(ckpts):
    from fpkern.sample import load_score_model
    from fpkern.sde import VESDE, VPSDE

    ve = load_score_model(ckpts["ve"][0])
    vp = load_score_model(ckpts["vp"][0])
    mlp = load_score_model(ckpts["mlp"])
    sde_vp = load_score_model(ckpts["score_sde_vp"][0], config="small/ddpmpp")
    assert isinstance(ve.sde, VESDE) and ve.data_range == (0.0, 1.0)
    assert ve.input_shape == (1, 16, 16)
    assert isinstance(vp.sde, VPSDE) and vp.data_range == (-1.0, 1.0)
    assert mlp.data_range is None and mlp.input_shape == (2,)
    assert isinstance(sde_vp.sde, VPSDE) and sde_vp.data_range == (-1.0, 1.0)
    assert not ve.score_fn.training


# ---- the output and every option, before any sample is drawn -------------------------------
@pytest.fixture
def no_sampling(monkeypatch):
    """Sampling fails the test: the errors must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("sampled before checking the options")

    monkeypatch.setattr("fpkern.sample.sample", refuse)


@pytest.mark.parametrize("out,needle", [
    ("missing/x.png", "does not exist"),
    (".", "is a folder"),
    ("x.npy", "extension"),
    ("x", "extension"),
])
def test_out_is_checked_before_sampling(ckpts, tmp_path, capsys, no_sampling, out, needle):
    target = tmp_path / out if out != "." else tmp_path
    assert _main(["--checkpoint", ckpts["ve"][0], "-n", "2", "--out", target]) == 2
    line = error_line(capsys)
    assert line.startswith(f"{PROG}: error: --out") and needle in line, line
    assert not target.exists() or target.is_dir()


def test_scatter_out_extension_checked_before_sampling(ckpts, tmp_path, capsys, no_sampling):
    assert _main(["--checkpoint", ckpts["mlp"], "--out", tmp_path / "x.bogus"]) == 2
    assert "--out" in error_line(capsys)


@pytest.mark.parametrize("argv,option", [
    (["-n", "0"], "-n/--num"),
    (["-n", "-3"], "-n/--num"),
    (["--steps", "0"], "--steps"),
    (["--steps", "-2"], "--steps"),
    (["--corrector-steps", "-1"], "--corrector-steps"),
    (["--snr", "0"], "--snr"),
    (["--rtol=-1e-5"], "--rtol"),
    (["--atol", "nan"], "--atol"),
    (["--eps", "0"], "--eps"),
    (["--eps", "1"], "--eps"),
    (["--data-range", "1", "0"], "--data-range"),
    (["--data-range", "0", "inf"], "--data-range"),
    (["--device", "nonsense"], "--device"),
    (["--device", f"cuda:{torch.cuda.device_count()}"], "--device"),
    (["--config", "small/vp_digits"], "--config"),
    (["--seed", str(2 ** 64)], "--seed"),
])
def test_bad_options_exit_2_naming_the_option(ckpts, tmp_path, capsys, no_sampling, argv, option):
    assert _main(["--checkpoint", ckpts["ve"][0], "--out", tmp_path / "x.png", *argv]) == 2
    line = error_line(capsys)
    assert line.startswith(f"{PROG}: error: {option}"), line


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only check")
def test_cuda_on_a_cpu_build(ckpts, tmp_path, capsys, no_sampling):
    assert _main(["--checkpoint", ckpts["ve"][0], "--device", "cuda",
                  "--out", tmp_path / "x.png"]) == 2
    assert "--device cuda: CUDA is not available" in error_line(capsys)


def test_data_range_refused_for_2d_points(ckpts, tmp_path, capsys, no_sampling):
    assert _main(["--checkpoint", ckpts["mlp"], "--data-range", "0", "1",
                  "--out", tmp_path / "x.png"]) == 2
    assert "--data-range" in error_line(capsys)


# ---- the checkpoint ------------------------------------------------------------------------
def test_sample_cli_rejects_foreign_checkpoint(tmp_path, capsys):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    assert _main(["--checkpoint", str(path)]) == 2
    line = error_line(capsys)
    assert "not an fpkern training checkpoint" in line and str(path) in line


def _text(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello\n")
    return p


def _empty(tmp_path):
    p = tmp_path / "empty.pt"
    p.write_bytes(b"")
    return p


def _truncated(tmp_path, ckpts):
    p = tmp_path / "truncated.pt"
    p.write_bytes(Path(ckpts["ve"][0]).read_bytes()[:5000])
    return p


@pytest.mark.parametrize("make,needle", [
    (lambda tmp, ck: tmp / "missing.pt", "no such file"),
    (lambda tmp, ck: tmp, "not a file"),
    (lambda tmp, ck: _text(tmp), "not a readable checkpoint"),
    (lambda tmp, ck: _empty(tmp), "not a readable checkpoint"),
    (lambda tmp, ck: _truncated(tmp, ck), "not a readable checkpoint"),
])
def test_unreadable_checkpoint_exits_2_naming_it(ckpts, tmp_path, capsys, make, needle):
    path = make(tmp_path, ckpts)
    assert _main(["--checkpoint", path, "--out", tmp_path / "x.png"]) == 2
    line = error_line(capsys)
    assert line.startswith(f"{PROG}: error: --checkpoint {path}") and needle in line, line


def test_score_sde_checkpoint_needs_config(ckpts, tmp_path, capsys):
    assert _main(["--checkpoint", ckpts["score_sde_ve"][0], "--out", tmp_path / "x.png"]) == 2
    assert "--config" in error_line(capsys)


def test_score_sde_checkpoint_of_another_preset(ckpts, tmp_path, capsys):
    path = ckpts["score_sde_ve"][0]
    assert _main(["--checkpoint", path, "--config", "small/ddpmpp",
                  "--out", tmp_path / "x.png"]) == 2
    line = error_line(capsys)
    assert line.startswith(f"{PROG}: error: --checkpoint {path}") and "small/ddpmpp" in line, line


def test_training_checkpoint_with_another_config(ckpts, tmp_path, capsys):
    assert _main(["--checkpoint", ckpts["ve"][0], "--config", "small/ddpmpp",
                  "--out", tmp_path / "x.png"]) == 2
    line = error_line(capsys)
    assert line.startswith(f"{PROG}: error: --config small/ddpmpp") and "small/ncsnpp" in line


def test_docstring_examples_name_real_presets():
    import fpkern.sample as mod
    from fpkern.models import PRESETS

    commands = docstring_commands(mod.__doc__, PROG)
    assert len(commands) >= 2
    for argv in commands:
        args = mod._parser().parse_args(argv)
        assert args.config is None or args.config in PRESETS, args.config


@pytest.mark.gpu
def test_cuda_samples_match_cpu(ckpts, tmp_path):
    path = ckpts["vp"][0]
    outs = []
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.png"
        assert _main(["--checkpoint", path, "--method", "ode_euler", "--steps", "3", "-n", "4",
                      "--device", device, "--out", out]) == 0
        outs.append(_grid_tiles(out, 4, 16).int())
    assert (outs[0] - outs[1]).abs().max() <= 1


@pytest.mark.parametrize("argv, method, options", [
    (["--method", "dpm_solver", "--order", "2", "--singlestep", "--prediction", "noise",
      "--schedule", "time_uniform"], "dpm_solver",
     dict(order=2, multistep=False, prediction="noise", schedule="time_uniform")),
    (["--method", "dpm_solver"], "dpm_solver",
     dict(order=3, multistep=True, prediction="data", schedule="logsnr")),
    (["--method", "edm_heun", "--rho", "5"], "edm_heun", dict(rho=5.0)),
    (["--method", "pc_lml", "--lml-rank", "2", "--lml-damping", "3", "--lml-directions",
      "power", "--snr", "0.2", "--corrector-steps", "2"], "pc_lml",
     dict(rank=2, damping=3.0, directions="power", snr=0.2, corrector_steps=2)),
])
def test_fast_sampler_options_reach_the_sampler(ckpts, tmp_path, monkeypatch, argv, method,
                                                options):
    """The dpm_solver and edm_heun options of the command line are the sampler's keywords,
    and the samples are those of fpkern.sampling.sample with them."""
    import fpkern.sample as cli
    from fpkern.sampling import sample as real_sample

    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(cli, "sample", spy)
    path = ckpts["mlp"]
    assert _main(["--checkpoint", path, *argv, "--steps", "4", "-n", "8",
                  "--out", tmp_path / "pts.png"]) == 0
    assert seen["method"] == method and seen["steps"] == 4
    assert {k: seen[k] for k in options} == options
    assert (tmp_path / "pts.png").stat().st_size > 0


def test_fast_sampler_bad_options_exit_2(ckpts, tmp_path, capsys):
    path = ckpts["mlp"]
    assert _main(["--checkpoint", path, "--method", "edm_heun", "--rho", "-1",
                  "--out", tmp_path / "x.png"]) == 2
    assert "--rho" in error_line(capsys)
    assert _main(["--checkpoint", path, "--method", "dpm_solver", "--order", "4",
                  "--out", tmp_path / "x.png"]) == 2
    assert "--order" in error_line(capsys)
