"""The command line: every option documented with its default, config files, bad options."""

import json
import subprocess
import sys

import pytest
import torch

from fpkern.train.checkpoint import load_checkpoint, list_checkpoints
from fpkern.train.cli import build_parser, main, parse_args


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
    assert "(default: 0.15)" in text and "(default: ll)" in text


def test_config_file_and_command_line_wins(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('arch = "mlp"\nalpha = 0.5\nfp-points = "x"\nsteps = 7\n')
    args = parse_args(["--config", str(cfg), "--steps", "9"])
    assert args.arch == "mlp" and args.alpha == 0.5 and args.fp_points == "x" and args.steps == 9


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
    assert ck["options"]["alpha"] == 0.15 and ck["options"]["beta"] == 0.01
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
