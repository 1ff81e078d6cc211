"""SIGINT and SIGTERM stop a run after the step under way with a checkpoint of it and the
shell's exit code; after any interruption (SIGKILL included) --resume gives the
uninterrupted run, and metrics.jsonl never holds a step twice."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch.multiprocessing as mp

from fpkern.train import training_loop
from fpkern.train.checkpoint import list_checkpoints, load_checkpoint
from fpkern.train.interrupt import StopRequest, TrainingInterrupted
from fpkern.train.metrics import MetricsWriter, drop_rows_after

from tests.train.test_ddp import free_port
from tests.train.test_resume import first_difference


def _steps(wd):
    """The steps of metrics.jsonl's rows, in file order."""
    return [json.loads(ln)["step"] for ln in (wd / "metrics.jsonl").read_text().splitlines()]


def _last_row_step(wd) -> int:
    try:
        lines = (wd / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return -1
    for ln in reversed(lines):
        try:
            return json.loads(ln)["step"]
        except ValueError:  # a row being written
            continue
    return -1


def _signal_at(proc, wd, step, signum, timeout=240.0) -> None:
    """Send signum to proc once metrics.jsonl has a row at or past step."""
    deadline = time.time() + timeout
    while _last_row_step(wd) < step:
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before step {step}"
        assert time.time() < deadline, f"no metrics row at step {step} in {timeout} s"
        time.sleep(0.01)
    proc.send_signal(signum)


def _newest(wd):
    return load_checkpoint(list_checkpoints(wd / "checkpoints")[-1])


def _newest_step(wd) -> int:
    """The step of the newest checkpoint, 0 if there is none."""
    return _newest(wd)["step"] if list_checkpoints(wd / "checkpoints") else 0


# ---- metrics -------------------------------------------------------------------------------
def test_drop_rows_after_keeps_the_rows_up_to_the_step_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (5, 10, 15, 20)]
    path.write_text("\n".join(rows) + '\n{"step": 25, "lo')
    assert drop_rows_after(path, 10) == 3
    assert path.read_text() == rows[0] + "\n" + rows[1] + "\n"
    assert drop_rows_after(path, 10) == 0
    assert drop_rows_after(tmp_path / "absent.jsonl", 0) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp file left"


def test_a_writer_starting_at_a_step_continues_the_file_without_repeating_a_step(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=False)
    for s in range(1, 8):
        w.write(s, {"loss": float(s)})
    w.close()  # as after a kill at step 7 whose last checkpoint was step 4
    w = MetricsWriter(tmp_path, tensorboard=False, start_step=4)
    for s in range(5, 9):
        w.write(s, {"loss": -float(s)})
    w.close()
    assert _steps(tmp_path) == list(range(1, 9))
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [1.0, 2.0, 3.0, 4.0, -5.0, -6.0, -7.0, -8.0]


# ---- the stop request ----------------------------------------------------------------------
def test_stop_request_records_the_first_signal_and_aborts_on_the_same_one_again():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.signum == signal.SIGINT and stop.agreed() == signal.SIGINT
        signal.raise_signal(signal.SIGTERM)  # torchrun's agent after the terminal's Ctrl-C
        assert stop.signum == signal.SIGINT
        with pytest.raises(TrainingInterrupted) as e:
            signal.raise_signal(signal.SIGINT)
        assert e.value.code == 130 and e.value.aborted
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert TrainingInterrupted(signal.SIGTERM, 3, None).code == 143


def test_training_loop_stops_after_the_step_with_a_checkpoint_and_restores_handlers(tmp_path):
    wd = tmp_path / "wd"
    before = signal.getsignal(signal.SIGINT)
    main_pid = os.getpid()

    def interrupt():
        while _last_row_step(wd) < 3:
            time.sleep(0.01)
        os.kill(main_pid, signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(TrainingInterrupted) as e:
        training_loop(workdir=str(wd), arch="mlp", dataset="8gaussians", mlp_width=16,
                      mlp_depth=2, batch_size=16, fp_batch=4, steps=100000, ckpt_every=100000,
                      log_every=1, sample_steps=2, num_samples=8, eval_every=0,
                      progress=False, tensorboard=False)
    assert e.value.code == 130 and not e.value.aborted
    stopped = e.value.step
    assert stopped >= 3 and e.value.checkpoint == list_checkpoints(wd / "checkpoints")[-1]
    assert load_checkpoint(e.value.checkpoint)["step"] == stopped
    assert _steps(wd) == list(range(1, stopped + 1))
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_the_command_exits_with_the_signal_code_after_a_checkpoint(tmp_path, tiny, signum, code):
    """The issue's reproduction: Ctrl-C used to lose the steps since the last checkpoint with
    a KeyboardInterrupt traceback."""
    wd = tmp_path / "wd"
    proc = subprocess.Popen([sys.executable, "-m", "fpkern.train", *tiny, "--steps", "100000",
                             "--ckpt-every", "100000", "--log-every", "1", "--workdir", str(wd)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _signal_at(proc, wd, 3, signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    steps = _steps(wd)
    assert steps == list(range(1, steps[-1] + 1))
    assert _newest(wd)["step"] == steps[-1] >= 3
    assert f"after step {steps[-1]}" in err


# ---- distributed: every rank stops after the same step -------------------------------------
def _ddp_worker(rank, world, port, workdir, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    try:
        training_loop(workdir=workdir, arch="mlp", dataset="8gaussians", mlp_width=16,
                      mlp_depth=2, batch_size=16, fp_batch=4, steps=100000, ckpt_every=100000,
                      log_every=1, sample_steps=2, num_samples=8, eval_every=0,
                      progress=False, tensorboard=False)
        result = {"finished": True}
    except TrainingInterrupted as e:
        result = {"code": e.code, "step": e.step}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    wd = tmp_path / "ddp"
    ctx = mp.start_processes(_ddp_worker, args=(2, free_port(), str(wd), str(tmp_path)),
                             nprocs=2, start_method="spawn", join=False)
    deadline = time.time() + 240
    while _last_row_step(wd) < 3:
        assert time.time() < deadline and all(p.is_alive() for p in ctx.processes)
        time.sleep(0.01)
    os.kill(ctx.processes[1].pid, signal.SIGTERM)  # rank 1 only
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the ranks did not stop together")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1 and r0["code"] == 143, (r0, r1)
    ck = _newest(wd)
    assert ck["step"] == r0["step"] == _steps(wd)[-1] and len(ck["rng"]) == 2


# ---- fault injection -----------------------------------------------------------------------
@pytest.mark.slow
def test_sigint_and_sigkill_at_random_steps_then_resume_equal_the_uninterrupted_run(tmp_path,
                                                                                    tiny):
    """One command (--resume, from scratch on an empty workdir) run uninterrupted, and run
    again with SIGINT and SIGKILL at steps drawn from a seeded generator, resumed after each.
    The final checkpoints agree in every tensor and random state; each metrics file holds
    every step once, in order."""
    steps, draw = 100, random.Random(19)
    plan = list(zip(sorted(draw.sample(range(3, 80), 3)),
                    draw.sample([signal.SIGINT, signal.SIGKILL, draw.choice([signal.SIGINT,
                                                                              signal.SIGKILL])],
                                3)))

    def cmd(wd):
        return [sys.executable, "-m", "fpkern.train", *tiny, "--steps", str(steps),
                "--ckpt-every", "10", "--log-every", "1", "--resume", "--workdir", str(wd)]

    ref, wd = tmp_path / "ref", tmp_path / "run"
    ref_proc = subprocess.Popen(cmd(ref), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
    for at, signum in plan:
        before = _last_row_step(wd)  # the rows past it come from the new process
        proc = subprocess.Popen(cmd(wd), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        _signal_at(proc, wd, max(at, before + 1), signum)
        _, err = proc.communicate(timeout=240)
        if signum == signal.SIGINT:
            assert proc.returncode == 130, err
            assert _newest_step(wd) == _last_row_step(wd) >= at, "no checkpoint of the stop"
        else:
            assert proc.returncode == -signal.SIGKILL
        assert _last_row_step(wd) < steps, f"the run ended before the signal at step {at}"
    resumed_at = _newest_step(wd)
    out = subprocess.run(cmd(wd), capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    assert f"at step {resumed_at}" in out.stderr or resumed_at == 0
    _, err = ref_proc.communicate(timeout=240)
    assert ref_proc.returncode == 0, err

    a, b = _newest(ref), _newest(wd)
    assert a["step"] == b["step"] == steps
    assert a["options"]["workdir"] == str(ref) and b["options"]["workdir"] == str(wd)
    b["options"]["workdir"] = a["options"]["workdir"]
    diff = first_difference(a, b)
    assert diff is None, f"plan {plan}: first difference {diff}"
    assert _steps(ref) == _steps(wd) == list(range(1, steps + 1))
