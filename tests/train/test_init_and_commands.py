"""--init-from (fpkern and Score SDE checkpoints) and the sample / evaluate commands on
checkpoints the training loop wrote."""

import math

import torch

from fpkern.models import from_preset, save_score_sde_checkpoint
from fpkern.train import checkpoint as ckpt_io
from fpkern.train.cli import main as train_main


def _only_checkpoint(workdir):
    ckpts = ckpt_io.list_checkpoints(workdir / "checkpoints")
    assert ckpts, f"no checkpoint in {workdir}"
    return ckpts[-1]


def test_init_from_an_fpkern_checkpoint_starts_at_its_ema_weights(tmp_path, tiny):
    a, b = tmp_path / "a", tmp_path / "b"
    assert train_main(tiny + ["--steps", "3", "--workdir", str(a)]) == 0
    src = ckpt_io.load_checkpoint(_only_checkpoint(a))
    # one step at learning rate 0: the checkpoint then holds the initial weights
    assert train_main(tiny + ["--steps", "1", "--lr", "0", "--seed", "7", "--workdir", str(b),
                              "--init-from", str(_only_checkpoint(a))]) == 0
    dst = ckpt_io.load_checkpoint(_only_checkpoint(b))
    assert dst["step"] == 1
    for k, v in src["ema"].items():
        assert torch.equal(dst["model"][k], v), k


def test_init_from_a_score_sde_checkpoint(tmp_path):
    torch.manual_seed(3)
    net = from_preset("small/ncsnpp")
    ema = [p.detach() + 0.01 for p in net.parameters() if p.requires_grad]
    path = tmp_path / "score_sde.pth"
    save_score_sde_checkpoint(path, net, ema_params=ema, step=42)
    work = tmp_path / "ft"
    args = ["--arch", "ncsnpp", "--steps", "1", "--lr", "0", "--batch-size", "2", "--fp-batch", "1",
            "--workdir", str(work), "--init-from", str(path),
            "--progress", "false", "--sample-steps", "2", "--num-samples", "4", "--eval-every", "0"]
    assert train_main(args) == 0
    model = ckpt_io.load_checkpoint(_only_checkpoint(work))["model"]
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    for name, want in zip(trainable, ema):
        assert torch.equal(model[name], want), name


def test_sample_and_evaluate_commands_read_training_checkpoints(tmp_path, tiny, capsys):
    from fpkern.evaluate import main as evaluate_main
    from fpkern.sample import main as sample_main

    work = tmp_path / "toy"
    assert train_main(tiny + ["--steps", "2", "--workdir", str(work)]) == 0
    out = tmp_path / "scatter.png"
    assert sample_main(["--checkpoint", str(_only_checkpoint(work)), "--method", "ode_euler",
                        "--steps", "20", "-n", "64", "--out", str(out)]) == 0
    assert out.stat().st_size > 1000

    img = tmp_path / "img"
    assert train_main(["--arch", "ncsnpp", "--steps", "1", "--workdir", str(img), "--batch-size",
                       "4", "--fp-batch", "2", "--progress", "false", "--sample-steps", "2",
                       "--num-samples", "4", "--eval-every", "0"]) == 0
    capsys.readouterr()
    assert evaluate_main(["--checkpoint", str(_only_checkpoint(img)), "--dataset", "digits",
                          "--split", "train", "--limit", "2", "--batch-size", "2",
                          "--rtol", "1e-2", "--atol", "1e-2"]) == 0
    text = capsys.readouterr()
    line = [ln for ln in (text.out + text.err).splitlines() if "bits/dim" in ln][-1]
    bpd = float(line.split(":")[1].split()[0])
    assert math.isfinite(bpd) and 0 < bpd < 50


def test_init_from_a_score_sde_checkpoint_of_another_network_is_one_line(tmp_path, capsys):
    net = from_preset("small/ddpmpp")
    path = tmp_path / "ddpmpp.pth"
    save_score_sde_checkpoint(path, net)
    capsys.readouterr()
    assert train_main(["--arch", "ncsnpp", "--steps", "1", "--batch-size", "2", "--progress",
                       "false", "--workdir", str(tmp_path / "w"), "--init-from", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"--init-from {path}" in lines[0], lines
    assert "does not match the network" in lines[0] and len(lines[0]) < 1500
    assert not ckpt_io.list_checkpoints(tmp_path / "w" / "checkpoints")
