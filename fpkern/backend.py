"""Which implementation runs a fused op: Triton, the C++ extension, or plain torch.

Default choice, per call, from the device of the op's inputs:
    CUDA tensors -> "triton" (when triton imports), else "torch"
    CPU tensors  -> "cpp" (when fpkern._C imports), else "torch"
Force a backend for a block of code with ``use_backend("torch")`` (tests do this to compare
implementations) or for a whole process with ``FPKERN_BACKEND=torch``. Forcing "triton" on
CPU tensors is allowed only under the Triton interpreter (TRITON_INTERPRET=1). A forced
backend that is not available raises; nothing is compiled or imported until it is used.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import logging
import os
from types import ModuleType

import torch

__all__ = ["BACKENDS", "available", "select", "use_backend", "native", "triton_interpreted"]

log = logging.getLogger(__name__)

BACKENDS = ("triton", "cpp", "torch")
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("fpkern_backend", default=None)


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def native() -> ModuleType | None:
    """The C++ extension fpkern._C, or None when it was not built."""
    try:
        return importlib.import_module("fpkern._C")
    except ImportError as exc:
        log.info("fpkern._C is not available (%s); CPU ops fall back to torch", exc)
        return None


@functools.cache
def _triton_importable() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def available(name: str, device: torch.device | str = "cpu") -> bool:
    """Whether backend `name` can run on tensors of `device`."""
    device = torch.device(device)
    if name == "torch":
        return True
    if name == "cpp":
        return device.type == "cpu" and native() is not None
    if name == "triton":
        if not _triton_importable():
            return False
        return device.type == "cuda" or (device.type == "cpu" and triton_interpreted())
    raise ValueError(f"unknown backend {name!r}; valid names: {list(BACKENDS)}")


def _requested() -> str | None:
    name = _forced.get() or os.environ.get("FPKERN_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r} (FPKERN_BACKEND or use_backend); "
                         f"valid names: {list(BACKENDS)}")
    return name


def select(tensor: torch.Tensor) -> str:
    """The backend that runs an op whose inputs live where `tensor` lives."""
    device = tensor.device
    name = _requested()
    if name is not None:
        if not available(name, device):
            hint = " (set TRITON_INTERPRET=1 to run Triton on CPU)" if name == "triton" else ""
            raise RuntimeError(f"backend {name!r} was requested but cannot run on {device}{hint}")
        return name
    # the default, per call of every fused op: no torch.device construction on this path
    if device.type == "cuda":
        return "triton" if _triton_importable() else "torch"
    if device.type == "cpu":
        return "cpp" if native() is not None else "torch"
    return "torch"


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force backend `name` ("triton", "cpp", "torch"; None for the default) in this block."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid names: {list(BACKENDS)}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)
