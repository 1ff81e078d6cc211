"""Shared by the kernel tests: the backends that run here, their device, a closeness check
that names the first mismatching element, and the compilation of the Triton kernels for a
GPU on a machine without one."""

import pytest
import torch

from fpkern import backend
from fpkern.kernels.offline import SM90_SHARED, compile_specs, nvidia_compiler


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


# ---- the Triton kernels compiled for a GPU, with no GPU (fpkern.kernels.offline) -----------
needs_nvidia_compiler = pytest.mark.skipif(not nvidia_compiler(),
                                           reason="triton's NVIDIA compiler is not installed")


def assert_compile_for_sm90(launches: list[dict]) -> None:
    """Every recorded specialization compiles to a cubin for sm_90 within its shared memory."""
    assert launches, "no kernel was launched"
    bad = []
    for r in compile_specs(launches):
        what = f"{r['spec']['kernel']} {r['spec']['constexprs']}"
        if "error" in r:
            bad.append(f"{what}: {r['error']}")
        elif r["shared"] > SM90_SHARED:
            bad.append(f"{what}: {r['shared']} bytes of shared memory, over {SM90_SHARED}")
    assert not bad, "\n".join(bad)
