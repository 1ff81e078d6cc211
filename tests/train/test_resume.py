"""SIGKILL a run after a checkpoint, resume: bit-for-bit the uninterrupted run, every random
state included."""

import json
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
    # the rows the killed run wrote past its checkpoint were dropped, not repeated
    assert _metric_steps(wd) == _metric_steps(ref) == list(range(5, 201, 5))


def _metric_steps(wd):
    return [json.loads(ln)["step"] for ln in (wd / "metrics.jsonl").read_text().splitlines()]


def first_difference(a, b, path="checkpoint"):
    """The path of the first value that differs between a and b (None if none): dicts key by
    key, lists and tuples item by item, tensors by dtype, shape and every element."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b))
        return None if same else path
    if type(a) is not type(b):
        return f"{path} (type {type(a).__name__} vs {type(b).__name__})"
    if isinstance(a, dict):
        if list(a) != list(b):
            return f"{path} (keys {sorted(map(str, a))} vs {sorted(map(str, b))})"
        for k in a:
            if (d := first_difference(a[k], b[k], f"{path}[{k!r}]")) is not None:
                return d
        return None
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return f"{path} (length {len(a)} vs {len(b)})"
        for i, (u, v) in enumerate(zip(a, b)):
            if (d := first_difference(u, v, f"{path}[{i}]")) is not None:
                return d
        return None
    return None if a == b else f"{path} ({a!r} vs {b!r})"


def _kill_after_checkpoint(cmd, wd, after_step):
    """Start cmd, SIGKILL it once it has written a checkpoint past after_step; the step of
    the newest checkpoint then."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        ckpts = list_checkpoints(wd / "checkpoints")
        if ckpts and int(ckpts[-1].stem.split("_")[1]) > after_step:
            break
        time.sleep(0.02)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpts = list_checkpoints(wd / "checkpoints")
    assert ckpts, "no checkpoint before the kill"
    step = load_checkpoint(ckpts[-1])["step"]
    assert killed and after_step < step < 200, "the run finished before it could be killed"
    return step


def test_identical_commands_and_twice_resumed_runs_write_equal_checkpoints(tmp_path, tiny):
    """One command (--resume on an empty workdir starts from scratch), run three ways in the
    same workdir: uninterrupted twice, and killed twice then resumed. The final checkpoints
    agree in every tensor and value: weights, EMA, optimizer, step, data state, options and
    every random state (torch, numpy, random, generators, cuda if present)."""
    wd = tmp_path / "run"
    cmd = _cmd(tiny, wd, "--resume")
    finals = []
    for name in ("ref", "ref2"):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        wd.rename(tmp_path / name)
        finals.append(load_checkpoint(list_checkpoints(tmp_path / name / "checkpoints")[-1]))
    assert set(finals[0]["rng"][0]) >= {"torch", "numpy", "python", "generators"}

    first = _kill_after_checkpoint(cmd, wd, 0)
    second = _kill_after_checkpoint(cmd, wd, first)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"at step {second}" in out.stderr
    finals.append(load_checkpoint(list_checkpoints(wd / "checkpoints")[-1]))

    assert finals[0]["step"] == 200
    for other in finals[1:]:
        diff = first_difference(finals[0], other)
        assert diff is None, f"first difference: {diff}"
