"""Backend selection, forcing, and the rule that importing fpkern loads nothing native."""

import os
import subprocess
import sys

import pytest
import torch

from fpkern import backend


def test_default_choice_by_device(monkeypatch):
    monkeypatch.delenv("FPKERN_BACKEND", raising=False)
    assert backend.select(torch.zeros(1)) == ("cpp" if backend.native() else "torch")
    if torch.cuda.is_available():
        assert backend.select(torch.zeros(1, device="cuda")) == "triton"


def test_forcing_and_env(monkeypatch):
    with backend.use_backend("torch"):
        assert backend.select(torch.zeros(1)) == "torch"
        with backend.use_backend(None):
            assert backend.select(torch.zeros(1)) != "torch" or backend.native() is None
    monkeypatch.setenv("FPKERN_BACKEND", "torch")
    assert backend.select(torch.zeros(1)) == "torch"
    monkeypatch.setenv("FPKERN_BACKEND", "cuda")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        backend.select(torch.zeros(1))
    with pytest.raises(ValueError, match="valid names"):
        with backend.use_backend("numba"):
            pass


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("FPKERN_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with backend.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend.select(torch.zeros(1))


def test_import_loads_neither_triton_nor_the_extension():
    code = ("import sys, fpkern, fpkern.ops, fpkern.sde; "
            "print(any(m == 'triton' or m.startswith('triton.') for m in sys.modules), "
            "'fpkern._C' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout.split()
    assert out == ["False", "False"]
