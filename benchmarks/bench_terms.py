"""The one-pass FPE terms kernel (fpkern.ops.terms) against the memory system.

The kernel reads 2K + 4 planes (probes, their JVPs, w, lap, s, x) of B x N values and writes
one (the residual); its effective bandwidth, bytes moved over time, is compared with a plain
device copy of the same number of bytes (provider "copy") and with the torch composite
(provider "torch"). The summary prints the fraction of copy bandwidth the kernel reaches.
Run: `pytest benchmarks/bench_terms.py --benchmark-only`.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import device
from fpkern import backend
from fpkern.ops.terms import combine_terms

K = 1


def _inputs(B, N):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(device())  # noqa: E731
    return [mk(K, B, N), mk(K, B, N)] + [mk(B, N) for _ in range(4)] + \
        [mk(B).abs(), mk(B), mk(B).abs()]


def _sync():
    if device().type == "cuda":
        torch.cuda.synchronize()


SIZES = {"cifar_b128": (128, 3 * 32 * 32), "cifar_b1024": (1024, 3 * 32 * 32)}


@pytest.mark.parametrize("size", SIZES)
def test_fpe_terms_bandwidth(record_group, size):
    B, N = SIZES[size]
    args = _inputs(B, N)
    moved = (2 * K + 5) * B * N * 4                     # 2K + 4 planes read, r written
    src = torch.empty(moved // 8, dtype=torch.float32, device=device())   # read + write
    dst = torch.empty_like(src)

    def runner(provider):
        def run():
            if provider == "copy":
                dst.copy_(src)
            else:
                with backend.use_backend("torch" if provider == "torch" else None):
                    combine_terms(*args, 2.0)
            _sync()
        return run

    record_group(f"fpe_terms/{size}", "kernel", {p: runner(p) for p in ["copy", "fused", "torch"]},
                 rounds=20, bytes=moved)
