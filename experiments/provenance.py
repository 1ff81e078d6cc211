"""Where an experiment's numbers came from: the git commit and the machine (for the JSON)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

__all__ = ["git", "machine"]


def git(*cmd: str) -> str:
    """Output of `git CMD` in this checkout, or "unknown" outside one."""
    try:
        return subprocess.run(["git", *cmd], cwd=Path(__file__).resolve().parent, check=True,
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict:
    """Platform, CPUs, torch threads and version, and the load average at the start."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    m = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
         "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
         "python": platform.python_version(), "torch": torch.__version__, "loadavg_start": load}
    m["summary"] = (f"{m['processor']}, {m['cpu_count']} CPUs (torch threads "
                    f"{m['torch_threads']}), torch {m['torch']}"
                    + (f", load avg at start {load[0]:.1f}" if load else ""))
    return m
