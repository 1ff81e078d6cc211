"""The command line: every option documented with its default, config files, bad options."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fpkern.losses import FP_PRESETS
from fpkern.train.checkpoint import load_checkpoint, list_checkpoints
from fpkern.train.cli import build_parser, main, parse_args, train_config


def test_help_documents_every_option():
    parser = build_parser()
    text = parser.format_help()
    for action in parser._actions:
        for opt in action.option_strings:
            assert opt in text
        if action.dest not in ("help",) and action.help:
            assert "default" in action.help or "(default:" in text
    for name in ("--alpha", "--beta", "--m", "--weighting", "--fp-points", "--form", "--method",
                 "--probes", "--resume", "--init-from", "--amp", "--sample-every", "--eval-every",
                 "--ckpt-every", "--device", "--grad-clip", "--ema", "--warmup"):
        assert name in text
    assert "--fp-preset" in text and "(default: fpkern)" in text and "(default: ll)" in text


def test_config_file_and_command_line_wins(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('arch = "mlp"\nalpha = 0.5\nfp-points = "x"\nsteps = 7\n')
    args = parse_args(["--config", str(cfg), "--steps", "9"])
    assert args.arch == "mlp" and args.alpha == 0.5 and args.fp_points == "x" and args.steps == 9


def test_fp_preset_fills_only_the_knobs_not_given():
    """--fp-preset sets alpha, beta, fp_normalize and fp_scalar where they are not given;
    'paper' is FP-Diffusion's objective; an explicit option wins over either preset."""
    def knobs(*argv):
        cfg = train_config(parse_args(["--arch", "mlp", *argv])).resolved()
        return cfg.alpha, cfg.beta, cfg.fp_normalize, cfg.fp_scalar

    for name in ("fpkern", "paper"):
        k = FP_PRESETS[name]
        want = (k["alpha"], k["beta"], k["normalize"], k["scalar"])
        assert knobs("--fp-preset", name) == want
    assert knobs() == knobs("--fp-preset", "fpkern")
    assert knobs("--fp-preset", "paper") == (0.15, 0.01, "paper", "paper")
    assert knobs("--fp-preset", "paper", "--alpha", "0.5", "--fp-scalar", "consistent") == (
        0.5, 0.01, "paper", "consistent")
    with pytest.raises(SystemExit):
        parse_args(["--fp-preset", "nope"])


def test_bad_options(tmp_path):
    with pytest.raises(SystemExit):
        parse_args(["--weighting", "nope"])
    cfg = tmp_path / "bad.toml"
    cfg.write_text('wieghting = "ll"\n')
    with pytest.raises(SystemExit):
        parse_args(["--config", str(cfg)])
    # a toy set for an image network: exit code 2, message lists valid names
    assert main(["--arch", "ncsnpp", "--dataset", "moons", "--workdir", str(tmp_path)]) == 2


def test_default_arch_run_writes_checkpoint_png_metrics(tmp_path):
    """`--arch ncsnpp` with nothing else but a tiny step count (and a short preview)."""
    wd = tmp_path / "nc"
    rc = main(["--arch", "ncsnpp", "--steps", "2", "--workdir", str(wd), "--progress", "false",
               "--fp-every", "2", "--fp-batch", "2", "--sample-steps", "3", "--num-samples", "4",
               "--log-every", "1"])
    assert rc == 0
    ckpts = list_checkpoints(wd / "checkpoints")
    assert [p.name for p in ckpts] == ["checkpoint_00000002.pt"]
    ck = load_checkpoint(ckpts[-1])
    assert ck["step"] == 2 and ck["options"]["preset"] == "small/ncsnpp"
    knobs = FP_PRESETS["fpkern"]
    assert ck["options"]["fp_preset"] == "fpkern"
    assert (ck["options"]["alpha"], ck["options"]["beta"]) == (knobs["alpha"], knobs["beta"])
    assert (ck["options"]["fp_normalize"], ck["options"]["fp_scalar"]) == (knobs["normalize"],
                                                                          knobs["scalar"])
    assert (wd / "samples" / "samples_00000002.png").stat().st_size > 0
    rows = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and {"loss", "dsm", "fp_vec", "fp_scalar", "lr"} <= set(rows[0])


def test_module_entry_point_mlp(tmp_path, tiny):
    wd = tmp_path / "mlp"
    out = subprocess.run([sys.executable, "-m", "fpkern.train", *tiny, "--steps", "10",
                          "--workdir", str(wd)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert list_checkpoints(wd / "checkpoints")
    assert (wd / "samples" / "samples_00000010.png").exists()
    assert len((wd / "metrics.jsonl").read_text().splitlines()) == 2


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, tiny):
    wd = tmp_path / "nan"
    rc = main([*tiny, "--steps", "50", "--ckpt-every", "1", "--lr", "1e30", "--grad-clip", "0",
               "--warmup", "0", "--workdir", str(wd)])
    assert rc == 3
    ckpts = list_checkpoints(wd / "checkpoints")
    assert ckpts
    ck = load_checkpoint(ckpts[-1])
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


# ---- one error boundary: a user mistake is one line and exit 2, before any work ----------
def _one_line(capsys):
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m fpkern.train: error: "), lines
    return lines[0]


def test_data_mistakes_exit_2_in_one_line(tmp_path, capsys):
    img = ["--arch", "ncsnpp", "--steps", "1", "--batch-size", "2", "--progress", "false"]
    wd = tmp_path / "w"
    assert main(img + ["--dataset", "mnist", "--workdir", str(wd)]) == 2
    assert "mnist" in _one_line(capsys) and not wd.exists()
    assert main(img + ["--dataset", "mnist", "--data-dir", str(tmp_path / "none"),
                       "--workdir", str(wd)]) == 2
    assert f"data_dir {tmp_path / 'none'}" in _one_line(capsys) and not wd.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(img + ["--dataset", "mnist", "--data-dir", str(empty), "--workdir", str(wd)]) == 2
    line = _one_line(capsys)
    assert f"--data-dir {empty}" in line and "train-images-idx3-ubyte" in line
    assert not (wd / "checkpoints").exists()


def test_init_from_mistakes_exit_2_in_one_line(tmp_path, tiny, capsys):
    wd = tmp_path / "w"
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n" * 10)
    assert main(tiny + ["--steps", "1", "--init-from", str(text), "--workdir", str(wd)]) == 2
    line = _one_line(capsys)
    assert f"--init-from {text}" in line and "KeyError" not in line
    assert not (wd / "checkpoints").exists()
    missing = tmp_path / "no.pt"
    for extra in ([], ["--resume"]):  # checked with --resume too, before any work
        assert main(tiny + ["--steps", "1", "--init-from", str(missing), "--workdir", str(wd),
                            *extra]) == 2
        assert str(missing) in _one_line(capsys)
    # a plain torch file that is no fpkern or Score SDE checkpoint, for the MLP
    other = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, other)
    assert main(tiny + ["--steps", "1", "--init-from", str(other), "--workdir", str(wd)]) == 2
    assert f"--init-from {other}" in _one_line(capsys)


def test_workdir_mistakes_exit_2_in_one_line(tmp_path, tiny, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(tiny + ["--steps", "1", "--workdir", str(afile)]) == 2
    assert f"workdir {afile}" in _one_line(capsys) and afile.read_text() == "x"
    assert main(tiny + ["--steps", "1", "--workdir", str(afile / "sub")]) == 2
    assert f"--workdir {afile / 'sub'}" in _one_line(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in read-only folders")
def test_read_only_workdir_exits_2_in_one_line(tmp_path, tiny, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(tiny + ["--steps", "1", "--workdir", str(ro)]) == 2
        assert f"--workdir {ro}" in _one_line(capsys)
    finally:
        ro.chmod(0o700)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_exits_2_in_one_line(tmp_path, tiny, capsys):
    wd = tmp_path / "w"
    assert main(tiny + ["--steps", "1", "--device", "cuda", "--workdir", str(wd)]) == 2
    assert "--device cuda" in _one_line(capsys) and not wd.exists()


def test_options_used_at_the_end_are_checked_before_the_run(tmp_path, tiny, capsys):
    wd = tmp_path / "w"
    for option, value in (("--num-samples", "0"), ("--sample-steps", "0"),
                          ("--eval-every", "-1"), ("--sample-every", "-1")):
        assert main(tiny + ["--steps", "2", option, value, "--workdir", str(wd)]) == 2
        assert option[2:].replace("-", "_") in _one_line(capsys)
        assert not wd.exists()  # nothing trained, nothing written


def test_command_line_mistakes_are_one_line(capsys):
    assert main(["--weighting", "nope"]) == 2
    assert "--weighting" in _one_line(capsys)
    assert main(["--steps", "x"]) == 2
    assert "--steps" in _one_line(capsys)
    with pytest.raises(SystemExit) as e:
        parse_args(["--batch-size", "1.5"])
    assert e.value.code == 2 and "--batch-size" in _one_line(capsys)
