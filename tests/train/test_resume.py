"""SIGKILL a run after its first checkpoint, resume: bit-for-bit the uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import torch

from fpkern.train.checkpoint import list_checkpoints, load_checkpoint


def _cmd(tiny, wd, *extra):
    return [sys.executable, "-m", "fpkern.train", *tiny, "--steps", "200", "--ckpt-every", "20",
            "--workdir", str(wd), *extra]


def _assert_same(a, b):
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k} differs"
    for pid, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][pid][k]), f"optimizer {pid}.{k}"


def test_kill_and_resume_equals_uninterrupted(tmp_path, tiny):
    # the FP terms on the whole batch: the DSM term shares the fused div pass (with_dsm)
    tiny += ["--fp-batch", "0"]
    ref = tmp_path / "ref"
    out = subprocess.run(_cmd(tiny, ref), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr

    wd = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(tiny, wd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not list_checkpoints(wd / "checkpoints") and time.time() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpts = list_checkpoints(wd / "checkpoints")
    assert ckpts, "no checkpoint before the kill"
    step_at_kill = load_checkpoint(ckpts[-1])["step"]
    assert killed and step_at_kill < 200, "the run finished before it could be killed"

    out = subprocess.run(_cmd(tiny, wd, "--resume"), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"at step {step_at_kill}" in out.stderr
    a = load_checkpoint(list_checkpoints(ref / "checkpoints")[-1])
    b = load_checkpoint(list_checkpoints(wd / "checkpoints")[-1])
    assert a["step"] == b["step"] == 200
    _assert_same(a, b)
