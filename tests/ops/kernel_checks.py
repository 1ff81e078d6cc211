"""Shared by the kernel tests: the backends that run here, their device, and a closeness
check that names the first mismatching element."""

import torch

from fpkern import backend


def backends() -> list[str]:
    """torch and cpp always; triton on CUDA, or on CPU under the interpreter."""
    out = ["torch", "cpp"]
    if backend.available("triton", "cuda" if torch.cuda.is_available() else "cpu"):
        out.append("triton")
    return out


def device_for(name: str) -> str:
    return "cuda" if name == "triton" and torch.cuda.is_available() else "cpu"


def assert_close(got, want, tol, what, *, check_dtype=True):
    """|got - want| <= tol (1 + |want|) elementwise; shapes (and dtypes) equal."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    if check_dtype:
        assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} vs {want.dtype}"
    err = (got.double() - want.double()).abs()
    bound = tol * (1 + want.double().abs())
    if (err > bound).any():
        i = tuple((err > bound).nonzero()[0].tolist())
        raise AssertionError(f"{what}: first mismatch at {i}: {got[i].item()!r} vs "
                             f"{want[i].item()!r} (max error {err.max().item():.3g})")
