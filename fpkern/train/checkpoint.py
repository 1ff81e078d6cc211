"""Training checkpoints: atomic writes, the last few kept, loadable with weights_only=True.

A checkpoint is a dict of tensors and plain Python values:

    {"format": "fpkern-train", "version": 1, "step": int, "model": state_dict,
     "ema": state_dict, "optimizer": state_dict,
     "rng": [per-rank random states (fpkern.train.rng.capture_rng)],
     "data": [per-rank data state], "options": {the run's options (plain values)}}

A write goes to a temporary file in the same folder, then is renamed over the final name,
so a checkpoint is either whole or absent; the temporary file is removed whatever stops
the write (a full disk, an exception, Ctrl-C). A file that cannot be read back (truncated,
corrupted, not a checkpoint) raises ``CheckpointReadError`` naming it, so that ``--resume``
can pass over it to the previous one (``newest_readable``). ``check_fits`` and
``resume_changes`` compare a checkpoint with the run that would continue it.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

from fpkern.errors import UsageError
from fpkern.train.rng import capture_rng, restore_rng

__all__ = ["FORMAT", "CheckpointReadError", "CheckpointWriteError", "save_checkpoint",
           "load_checkpoint", "read_torch_file", "list_checkpoints", "latest_checkpoint",
           "capture_rng", "restore_rng", "is_fpkern_checkpoint", "newest_readable",
           "check_fits", "resume_changes"]

log = logging.getLogger(__name__)

FORMAT = "fpkern-train"
_NAME = re.compile(r"^checkpoint_(\d+)\.pt$")
_TEMP = re.compile(r"^\.checkpoint_\d+\.pt\.tmp\.(\d+)$")
#: the entries every training checkpoint has
REQUIRED = ("step", "model", "ema", "optimizer", "rng", "data", "options")


class CheckpointReadError(UsageError):
    """A file is not a readable fpkern training checkpoint; the message names it and why."""


class CheckpointWriteError(UsageError):
    """A checkpoint could not be written (full disk, no permission); no partial file remains."""


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint files in ckpt_dir, oldest step first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(ckpt_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, state: dict[str, Any], *,
                    keep: int = 3) -> Path:
    """Write state to ckpt_dir/checkpoint_<step>.pt atomically (temp file, fsync, os.replace),
    then delete all but the newest `keep` checkpoints. An OS error (a full disk, say) raises
    CheckpointWriteError naming the file; the temporary file is removed on any failure."""
    d = Path(ckpt_dir)
    path = d / f"checkpoint_{step:08d}.pt"
    tmp = d / f".{path.name}.tmp.{os.getpid()}"
    try:
        d.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(d)
        _write(tmp, state)
        os.replace(tmp, path)
    except BaseException as e:
        _unlink_quietly(tmp)
        cause = _os_error(e) if isinstance(e, Exception) else None  # Ctrl-C stays itself
        if cause is None:
            raise
        raise CheckpointWriteError(f"cannot write checkpoint {path}: {_strerror(cause)}; the "
                                   "earlier checkpoints are intact") from None
    _fsync_dir(d)
    if keep > 0:
        for old in list_checkpoints(d)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def _write(tmp: Path, state: dict[str, Any]) -> None:
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())


def _os_error(e: BaseException) -> OSError | None:
    """The OSError that e is or that caused it (torch.save wraps a failed write in a
    RuntimeError of its stream writer), None if there is none."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _strerror(e: OSError) -> str:
    if e.errno is not None:
        return f"{os.strerror(e.errno)} (errno {errno.errorcode.get(e.errno, e.errno)})"
    return str(e) or type(e).__name__


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _remove_stale_temps(d: Path) -> None:
    """Delete temporary files left by writers that no longer run (a SIGKILL mid-write)."""
    for p in d.iterdir():
        m = _TEMP.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            _unlink_quietly(p)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, another user's
        return True
    return True


def _fsync_dir(d: Path) -> None:
    """Make the rename durable (best effort: not every filesystem can sync a folder)."""
    try:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read an fpkern training checkpoint with torch.load(weights_only=True). A file that
    torch cannot read, or that is not a whole training checkpoint, raises
    CheckpointReadError naming it and what is wrong."""
    ckpt = read_torch_file(path, map_location)
    name = os.fspath(path)
    if not is_fpkern_checkpoint(ckpt):
        raise CheckpointReadError(f"{name} is not an fpkern training checkpoint")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointReadError(f"{name}: incomplete fpkern training checkpoint, no {missing}")
    return ckpt


def read_torch_file(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """torch.load(path, weights_only=True); a missing, truncated, corrupted or non-torch
    file raises CheckpointReadError naming it (the file's fault, not a bug)."""
    name = os.fspath(path)
    try:
        _check_archive(path)
        return torch.load(path, map_location=map_location, weights_only=True)
    except CheckpointReadError:
        raise
    except FileNotFoundError:
        raise CheckpointReadError(f"{name}: no such checkpoint file") from None
    except Exception as e:  # EOFError, UnpicklingError, RuntimeError of the zip reader, ...
        raise CheckpointReadError(f"{name}: not a readable checkpoint ({_why(path, e)})") \
            from None


def _check_archive(path: str | os.PathLike) -> None:
    """CheckpointReadError if path is a zip archive (torch.save's format) that is truncated or
    whose stored CRC-32 checksums do not match its contents: torch.load itself does not
    check them, so flipped bytes in the tensor data would load as silently wrong weights."""
    with open(path, "rb") as fh:
        if fh.read(4) != b"PK\x03\x04":
            return  # not a zip: torch.load decides (legacy pickle format, or not torch's)
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError) as e:
        raise CheckpointReadError(f"{os.fspath(path)}: not a readable checkpoint (truncated or "
                                  f"corrupted: {_one_line(e)})") from None
    except zlib.error as e:
        raise CheckpointReadError(f"{os.fspath(path)}: not a readable checkpoint (corrupted: "
                                  f"{_one_line(e)})") from None
    if bad is not None:
        raise CheckpointReadError(f"{os.fspath(path)}: not a readable checkpoint (corrupted: "
                                  f"the checksum of {bad} does not match)")


def _why(path: str | os.PathLike, e: Exception) -> str:
    """What is wrong with a file torch.load refused, in a few words."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as oe:
        return _strerror(oe)
    if not head:
        return "the file is empty"
    if head != b"PK\x03\x04" and head[:1] != b"\x80":  # neither torch's zip nor a pickle
        return "not a file torch.save wrote"
    if isinstance(e, EOFError):
        return "the file is truncated"
    text = _one_line(e)
    return f"{type(e).__name__}: {text}" if text else f"{type(e).__name__}; truncated or corrupted?"


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 200 else text[:200] + " ..."


def is_fpkern_checkpoint(ckpt: Any) -> bool:
    return isinstance(ckpt, dict) and ckpt.get("format") == FORMAT


# ---- reading a workdir's checkpoints back for --resume / --init-from --------------------
#: the options that fix the network: a checkpoint of others cannot be resumed
_NETWORK = {"arch": "--arch", "preset": "--preset", "mlp_width": "--mlp-width",
            "mlp_depth": "--mlp-depth"}


def newest_readable(paths: list[Path], *, warn: bool = True) -> tuple[Path, dict[str, Any]]:
    """(path, checkpoint) of the newest of paths (oldest first, as list_checkpoints gives
    them) that loads, logging a warning for each newer one passed over and why; when none
    loads, CheckpointReadError naming the folder and the newest's fault."""
    faults = []
    for path in reversed(paths):
        try:
            return path, load_checkpoint(path, map_location="cpu")
        except CheckpointReadError as e:
            faults.append(str(e))
            if warn:
                log.warning("--resume: skipping %s", e)
    raise CheckpointReadError(f"--resume: none of the {len(paths)} checkpoint(s) in "
                              f"{paths[-1].parent} can be read (newest: {faults[0]}); move them "
                              "away to start afresh")


def check_fits(path: str | os.PathLike, stored: dict[str, Any], cfg: Any, net: torch.nn.Module,
               weights: Any, *, what: str) -> None:
    """UsageError (one line, naming path) unless the checkpoint of options ``stored`` was
    trained with cfg's network options (only with what == '--resume'; --init-from may load
    any weights that fit) and its ``weights`` fit net's keys and shapes."""
    from fpkern.models.checkpoint import CheckpointMismatchError, check_state_dict

    if what == "--resume":
        for key, flag in _NETWORK.items():
            if key.startswith("mlp_") and cfg.arch != "mlp":
                continue
            if key in stored and stored[key] != getattr(cfg, key):
                raise UsageError(f"--resume: {os.fspath(path)} holds a network of {flag} "
                                 f"{stored[key]}, this run builds {flag} {getattr(cfg, key)}; "
                                 "pass the checkpoint's options or use another --workdir")
    try:
        check_state_dict(net, weights, what="its weights")
    except CheckpointMismatchError as e:
        detail = "; ".join(line.strip() for line in str(e).splitlines()[:2])
        raise UsageError(f"{what} {os.fspath(path)}: {detail}") from None


def resume_changes(path: str | os.PathLike, stored: dict[str, Any], cfg: Any,
                   forward_sde: Any, step: int) -> list[dict[str, Any]]:
    """The checkpoint's record of deliberate option changes, with this resume's appended:
    [{"step": s, option: [checkpoint's, run's], ...}]. A different SDE or dataset raises
    UsageError naming both unless cfg.allow_resume_change."""
    changed: dict[str, list[Any]] = {}
    if "forward_sde" in stored:   # the SDE that was built, parameters included
        if stored["forward_sde"] != repr(forward_sde):
            changed["sde"] = [stored["forward_sde"], repr(forward_sde)]
    elif stored.get("sde_name", cfg.sde) != cfg.sde:
        changed["sde"] = [stored.get("sde_name"), cfg.sde]
    if stored.get("dataset", cfg.dataset) != cfg.dataset:
        changed["dataset"] = [stored.get("dataset"), cfg.dataset]
    history = list(stored.get("resume_changes") or [])
    if not changed:
        return history
    then = ", ".join(f"--{k} {old}" for k, (old, _) in changed.items())
    now = ", ".join(f"--{k} {new}" for k, (_, new) in changed.items())
    if not cfg.allow_resume_change:
        raise UsageError(f"--resume: {os.fspath(path)} was trained with {then}, this run has "
                         f"{now}; pass the checkpoint's options, or --allow-resume-change to "
                         "continue with the change (recorded in the checkpoints)")
    log.warning("--resume: continuing %s at step %d with %s instead of %s "
                "(--allow-resume-change)", os.fspath(path), step, now, then)
    return history + [{"step": int(step), **changed}]
