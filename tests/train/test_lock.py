"""One run per workdir: a second run refuses to start, naming the holder; a dead run's lock
file never blocks; every rank of a distributed run refuses alike."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch.multiprocessing as mp

from fpkern.errors import UsageError
from fpkern.train.checkpoint import list_checkpoints, load_checkpoint
from fpkern.train.cli import main as train_main
from fpkern.train.lock import LOCK_NAME, WorkdirBusy, WorkdirLock

from tests.train.test_ddp import free_port

_HOLD = ("import sys; from fpkern.train.lock import WorkdirLock; "
         "WorkdirLock(sys.argv[1]).acquire(); print('held', flush=True); sys.stdin.read()")


def _holder(wd):
    """A process that holds wd's lock until its stdin closes."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(wd)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _rows(wd):
    return [json.loads(ln)["step"] for ln in (wd / "metrics.jsonl").read_text().splitlines()]


def test_a_second_lock_on_a_held_workdir_names_the_holder(tmp_path):
    with WorkdirLock(tmp_path / "wd") as first:
        assert first.held
        with pytest.raises(WorkdirBusy) as e:
            WorkdirLock(tmp_path / "wd").acquire()
        msg = str(e.value)
        assert f"pid {os.getpid()}" in msg and socket.gethostname() in msg
        assert "--workdir" in msg and str(tmp_path / "wd") in msg and "command:" in msg
        assert isinstance(e.value, UsageError)
    # released at the end of the block: the next run gets it
    with WorkdirLock(tmp_path / "wd") as again:
        assert again.held


def test_the_lock_file_of_a_dead_process_does_not_block(tmp_path):
    wd = tmp_path / "wd"
    proc = _holder(wd)
    with pytest.raises(WorkdirBusy, match=f"pid {proc.pid} "):
        WorkdirLock(wd).acquire()
    proc.kill()
    proc.wait()
    # the killed holder's details are still in the file; the OS lock died with it
    assert json.loads((wd / LOCK_NAME).read_text())["pid"] == proc.pid
    assert train_main(["--arch", "mlp", "--dataset", "8gaussians", "--mlp-width", "16",
                       "--mlp-depth", "2", "--batch-size", "16", "--fp-batch", "4", "--steps",
                       "2", "--sample-steps", "2", "--num-samples", "8", "--eval-every", "0",
                       "--progress", "false", "--workdir", str(wd)]) == 0
    assert [p.name for p in list_checkpoints(wd / "checkpoints")] == ["checkpoint_00000002.pt"]


def test_a_workdir_that_is_a_file_is_a_usage_error(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(UsageError, match="--workdir"):
        WorkdirLock(f).acquire()


@pytest.mark.slow
def test_a_second_training_run_exits_2_naming_the_first(tmp_path, tiny):
    """The issue's reproduction: two runs in one workdir. The second refuses with exit 2 and
    one line naming the first run's pid; the first runs on undisturbed."""
    wd = tmp_path / "wd"
    cmd = [sys.executable, "-m", "fpkern.train", *tiny, "--steps", "100000", "--ckpt-every",
           "20", "--workdir", str(wd)]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (wd / "metrics.jsonl").exists() and first.poll() is None:
            assert time.time() < deadline, "the first run did not start"
            time.sleep(0.05)
        second = subprocess.run(cmd[:-2] + ["--steps", "10", "--workdir", str(wd)],
                                capture_output=True, text=True, timeout=120)
        assert first.poll() is None, "the first run ended early"
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert f"pid {first.pid} " in lines[0] and "--workdir" in lines[0]
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(timeout=120)
    assert first.returncode == 130
    steps = _rows(wd)
    assert steps == sorted(set(steps)) and steps[0] == 5, "the second run wrote metrics"
    last = load_checkpoint(list_checkpoints(wd / "checkpoints")[-1])
    assert last["step"] == steps[-1] > 10 and last["options"]["steps"] == 100000


def _ddp_worker(rank, world, port, workdir, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from fpkern.train import training_loop

    try:
        training_loop(workdir=workdir, arch="mlp", dataset="8gaussians", mlp_width=16,
                      mlp_depth=2, batch_size=16, fp_batch=4, steps=2, sample_steps=2,
                      num_samples=8, eval_every=0, progress=False, tensorboard=False)
        result = "trained"
    except WorkdirBusy as e:
        result = f"busy: {e}"
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as fh:
        fh.write(result)


@pytest.mark.slow
def test_every_rank_of_a_distributed_run_refuses_a_held_workdir(tmp_path):
    wd = tmp_path / "wd"
    holder = _holder(wd)
    try:
        ctx = mp.start_processes(_ddp_worker, args=(2, free_port(), str(wd), str(tmp_path)),
                                 nprocs=2, start_method="spawn", join=False)
        deadline = time.time() + 180
        while not ctx.join(timeout=1):
            if time.time() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail("a rank waited instead of refusing")
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    for rank in (0, 1):
        text = (tmp_path / f"rank{rank}.txt").read_text()
        assert text.startswith("busy: ") and f"pid {holder.pid} " in text, text
    assert not (wd / "checkpoints").exists() and not (wd / "metrics.jsonl").exists()
