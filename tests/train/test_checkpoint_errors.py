"""Checkpoints under faults: --resume passes over a corrupt newest checkpoint to the previous
one (saying which and why), --init-from starts a --resume run that has no checkpoint yet, a
full disk or an interrupted write leaves no temporary file and one line, and a checkpoint of
another network, SDE or dataset is refused in one line unless the change is allowed."""

import errno
import io
import logging
import subprocess
import sys
import zipfile

import pytest
import torch

from fpkern.train import checkpoint as ckpt_io
from fpkern.train.cli import main


def _ckpts(wd):
    return ckpt_io.list_checkpoints(wd / "checkpoints")


def _temps(wd):
    return sorted(p.name for p in (wd / "checkpoints").iterdir() if ".tmp." in p.name)


def _err_line(capsys):
    """The one line a user mistake prints on stderr."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("python -m fpkern.train: error: ")
    return lines[0]


def _same_weights(a, b):
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k} differs"


# ---- --init-from with --resume (used while the workdir has no checkpoint yet) -------------
def test_init_from_with_resume_starts_from_it_then_resumes(tmp_path, tiny, caplog):
    src, wd = tmp_path / "src", tmp_path / "ft"
    assert main(tiny + ["--steps", "3", "--workdir", str(src)]) == 0
    init = _ckpts(src)[-1]
    # one step at learning rate 0: the checkpoint then holds the weights the run started at
    ft = tiny + ["--lr", "0", "--seed", "7", "--workdir", str(wd), "--init-from", str(init),
                 "--resume"]
    assert main(ft + ["--steps", "1"]) == 0
    first = ckpt_io.load_checkpoint(_ckpts(wd)[-1])
    for k, v in ckpt_io.load_checkpoint(init)["ema"].items():
        assert torch.equal(first["model"][k], v), k
    # the same command again continues from the workdir's checkpoint, not from --init-from
    caplog.set_level(logging.INFO, logger="fpkern.train")
    assert main(ft + ["--steps", "2"]) == 0
    assert f"resumed from {_ckpts(wd)[0]} at step 1" in caplog.text
    assert "initialised from" not in caplog.text
    assert ckpt_io.load_checkpoint(_ckpts(wd)[-1])["step"] == 2


# ---- a corrupt newest checkpoint ----------------------------------------------------------
def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_tensor_bytes(path):
    """Flip bytes inside the largest tensor's data (not in the zip's headers), which
    torch.load alone would read back as silently wrong weights."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    for i in range(start + info.file_size // 2, start + info.file_size // 2 + 4):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated": (_truncate, "truncated"),
    "flipped": (_flip_tensor_bytes, "checksum"),
    "empty": (lambda p: p.write_bytes(b""), "empty"),
    "text": (lambda p: p.write_text("not a checkpoint\n"), "not a file torch.save wrote"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_resume_skips_a_corrupt_newest_checkpoint(tmp_path, tiny, caplog, kind):
    corrupt, why = CORRUPTIONS[kind]
    run = tiny + ["--ckpt-every", "2"]
    ref, wd = tmp_path / "ref", tmp_path / "wd"
    assert main(run + ["--steps", "6", "--workdir", str(ref)]) == 0
    assert main(run + ["--steps", "4", "--workdir", str(wd)]) == 0
    newest = _ckpts(wd)[-1]
    corrupt(newest)
    with pytest.raises(ckpt_io.CheckpointReadError, match=why):
        ckpt_io.load_checkpoint(newest)
    caplog.set_level(logging.INFO, logger="fpkern")
    assert main(run + ["--steps", "6", "--workdir", str(wd), "--resume"]) == 0
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped) == 1 and str(newest) in skipped[0] and why in skipped[0]
    assert f"resumed from {_ckpts(wd)[0]} at step 2" in caplog.text
    # exact resume from step 2: the same weights as the uninterrupted run
    _same_weights(ckpt_io.load_checkpoint(_ckpts(wd)[-1]), ckpt_io.load_checkpoint(_ckpts(ref)[-1]))


def test_resume_with_no_readable_checkpoint_refuses_in_one_line(tmp_path, tiny, capsys):
    wd = tmp_path / "wd"
    assert main(tiny + ["--steps", "4", "--ckpt-every", "2", "--workdir", str(wd)]) == 0
    for p in _ckpts(wd):
        p.write_bytes(b"")
    capsys.readouterr()
    assert main(tiny + ["--steps", "6", "--workdir", str(wd), "--resume"]) == 2
    line = _err_line(capsys)
    assert str(wd / "checkpoints") in line and "none of the 2 checkpoint(s)" in line


# ---- full disk and interrupted writes ------------------------------------------------------
class _FullDisk(io.RawIOBase):
    """A file that takes `budget` bytes, then fails as a full disk does."""

    def __init__(self, fh, budget):
        self.fh, self.budget = fh, budget

    def writable(self):
        return True

    def write(self, b):
        if self.budget <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = min(len(b), self.budget)
        self.fh.write(bytes(b[:n]))
        self.budget -= n
        return n


def _failing_save(monkeypatch, *, fail_on_call=1, error=None):
    """torch.save that writes part of the file on the fail_on_call-th call, then fails."""
    real, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) < fail_on_call:
            return real(obj, f, *args, **kwargs)
        if error is not None:
            f.write(b"PK\x03\x04partial")
            raise error
        return real(obj, _FullDisk(f, 600), *args, **kwargs)

    monkeypatch.setattr(ckpt_io.torch, "save", save)


def test_full_disk_removes_the_temporary_file_and_says_so(tmp_path, monkeypatch):
    d = tmp_path / "checkpoints"
    ckpt_io.save_checkpoint(d, 1, {"format": ckpt_io.FORMAT, "w": torch.ones(3)})
    _failing_save(monkeypatch)
    with pytest.raises(ckpt_io.CheckpointWriteError) as e:
        ckpt_io.save_checkpoint(d, 2, {"format": ckpt_io.FORMAT, "w": torch.zeros(10_000)})
    msg = str(e.value)
    assert "\n" not in msg and "checkpoint_00000002.pt" in msg and "No space left" in msg
    assert "inline_container" not in msg and e.value.__cause__ is None
    assert sorted(p.name for p in d.iterdir()) == ["checkpoint_00000001.pt"]


def test_an_interrupted_write_removes_the_temporary_file(tmp_path, monkeypatch):
    d = tmp_path / "checkpoints"
    _failing_save(monkeypatch, error=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        ckpt_io.save_checkpoint(d, 1, {"format": ckpt_io.FORMAT})
    assert list(d.iterdir()) == []


def test_a_temporary_file_of_a_dead_writer_is_removed(tmp_path):
    d = tmp_path / "checkpoints"
    d.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = d / f".checkpoint_00000003.pt.tmp.{dead.pid}"
    stale.write_bytes(b"PK\x03\x04partial")
    ckpt_io.save_checkpoint(d, 4, {"format": ckpt_io.FORMAT})
    assert sorted(p.name for p in d.iterdir()) == ["checkpoint_00000004.pt"]


def test_full_disk_during_a_run_exits_2_in_one_line(tmp_path, tiny, monkeypatch, capsys):
    wd = tmp_path / "wd"
    _failing_save(monkeypatch, fail_on_call=2)
    rc = main(tiny + ["--steps", "4", "--ckpt-every", "2", "--workdir", str(wd)])
    assert rc == 2
    line = _err_line(capsys)
    assert "checkpoint_00000004.pt" in line and "No space left on device" in line
    assert [p.name for p in _ckpts(wd)] == ["checkpoint_00000002.pt"] and _temps(wd) == []
    ckpt_io.load_checkpoint(_ckpts(wd)[0])  # the earlier checkpoint is intact


# ---- resuming with other options -----------------------------------------------------------
@pytest.fixture
def trained(tmp_path, tiny):
    wd = tmp_path / "wd"
    assert main(tiny + ["--steps", "2", "--workdir", str(wd)]) == 0
    return wd


def _with(tiny, option, value):
    args = list(tiny)
    if option in args:
        args[args.index(option) + 1] = value
    else:
        args += [option, value]
    return args


@pytest.mark.parametrize("option, value, words", [
    ("--mlp-width", "16", ["--mlp-width 32", "--mlp-width 16"]),
    ("--mlp-depth", "3", ["--mlp-depth 2", "--mlp-depth 3"]),
])
def test_resume_with_another_network_is_refused_in_one_line(trained, tiny, capsys, option,
                                                             value, words):
    before = ckpt_io.load_checkpoint(_ckpts(trained)[-1])
    capsys.readouterr()
    assert main(_with(tiny, option, value) + ["--steps", "4", "--resume", "--workdir",
                                              str(trained), "--allow-resume-change"]) == 2
    line = _err_line(capsys)
    assert str(_ckpts(trained)[-1]) in line and all(w in line for w in words), line
    assert len(line) < 400 and "size mismatch" not in line
    assert [p.name for p in _ckpts(trained)] == ["checkpoint_00000002.pt"]
    _same_weights(ckpt_io.load_checkpoint(_ckpts(trained)[-1]), before)


def test_resume_with_another_arch_is_refused_in_one_line(trained, capsys):
    capsys.readouterr()
    assert main(["--arch", "ncsnpp", "--steps", "4", "--batch-size", "2", "--resume",
                 "--workdir", str(trained), "--progress", "false"]) == 2
    line = _err_line(capsys)
    assert "--arch mlp" in line and "--arch ncsnpp" in line and len(line) < 400


@pytest.mark.parametrize("option, value, word", [
    ("--sde", "ve", "--sde"), ("--dataset", "moons", "--dataset")])
def test_resume_with_another_sde_or_dataset_is_refused_unless_allowed(trained, tiny, capsys,
                                                                      option, value, word):
    changed = _with(tiny, option, value) + ["--steps", "4", "--resume", "--workdir", str(trained)]
    capsys.readouterr()
    assert main(changed) == 2
    line = _err_line(capsys)
    assert word in line and "--allow-resume-change" in line and str(_ckpts(trained)[-1]) in line
    stored = ckpt_io.load_checkpoint(_ckpts(trained)[-1])["options"]
    assert stored["dataset"] == "8gaussians" and stored["sde_name"] == "vp"  # not overwritten
    # allowed: the run continues and its checkpoints record the change
    assert main(changed + ["--allow-resume-change"]) == 0
    ck = ckpt_io.load_checkpoint(_ckpts(trained)[-1])
    assert ck["step"] == 4
    (change,) = ck["options"]["resume_changes"]
    assert change["step"] == 2 and list(change) == ["step", option[2:]]
    assert ck["options"][option[2:]] == value
    # resuming again with the new options needs no flag and keeps the record
    assert main(_with(tiny, option, value) + ["--steps", "6", "--resume", "--workdir",
                                              str(trained)]) == 0
    assert ckpt_io.load_checkpoint(_ckpts(trained)[-1])["options"]["resume_changes"] == [change]


def test_init_from_of_another_network_says_so_in_one_line(trained, tiny, tmp_path, capsys):
    capsys.readouterr()
    assert main(_with(tiny, "--mlp-width", "16") + ["--steps", "1", "--workdir",
                str(tmp_path / "b"), "--init-from", str(_ckpts(trained)[-1])]) == 2
    line = _err_line(capsys)
    assert line.count("--init-from") == 1 and str(_ckpts(trained)[-1]) in line
    assert "another shape" in line and len(line) < 600


def test_a_fresh_run_over_a_used_workdir_is_refused(tmp_path, capsys):
    """Without --resume a run would start over the earlier run's checkpoints (and prune its
    own as older than theirs): it is refused in one line, the checkpoints untouched."""
    from fpkern.train.cli import main

    wd = tmp_path / "run"
    args = ["--arch", "mlp", "--steps", "4", "--ckpt-every", "2", "--batch-size", "16",
            "--fp-batch", "4", "--eval-every", "0", "--num-samples", "8", "--sample-steps", "2",
            "--progress", "false", "--tensorboard", "false", "--workdir", str(wd)]
    assert main(args) == 0
    before = {p.name: p.stat().st_mtime_ns for p in (wd / "checkpoints").iterdir()}
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume" in err and str(wd) in err, err
    assert {p.name: p.stat().st_mtime_ns for p in (wd / "checkpoints").iterdir()} == before
    assert main(args + ["--resume"]) == 0
