"""The one-pass laplacian-form FPE terms kernel (fpkern::laplacian_terms): its bandwidth
against the memory system, and the op against its torch composite.

(r, div, loss, h) = laplacian_terms(v, jv, w, lap, s, x, g2, f, weight, m): the residual, the
Hutchinson divergence, the weighted loss and the scalar FPE term from the jet pass's outputs
(fpkern.ops.laplacian_terms), as the fused laplacian form calls it.

Bandwidth (mode "kernel", no graph): the kernel reads 2K + 4 planes (probes, their JVPs, w,
lap, s, x) of B x N values and writes one (the residual); its effective bandwidth, bytes
moved over time, is compared with a plain device copy of the same number of bytes (provider
"copy") and with the torch composite (provider "torch", the op on the torch backend). The
summary prints the fraction of copy bandwidth the kernel reaches.

Op against reference: providers fused (the op on the default backend: C++ on CPU, Triton on
CUDA) and torch (laplacian_terms_ref under plain autograd); modes "fwd" (the four outputs,
with the graph recorded) and "fwdbwd" (and the gradients of jv, w, lap and s, which the
network made; probes, x and the per-sample coefficients are constants); see
benchmarks/micro.py. Cases: K = 1 and 4 probes of the score network's input shape, the small
NCSN++ preset at batch 8 and the D = 64 MLP at batch 128 on CPU, CIFAR-10 at batch 64 and 128
on GPU.
Run: `pytest benchmarks/bench_laplacian_terms.py --benchmark-only [--bench-json PATH]`.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import device
from benchmarks.micro import DATA, cases, leaf, op_runners, randn
from fpkern import backend
from fpkern.ops.laplacian_terms import laplacian_terms, laplacian_terms_ref

K = 1


def _inputs(K, B, N):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(device())  # noqa: E731
    return [mk(K, B, N), mk(K, B, N)] + [mk(B, N) for _ in range(4)] + \
        [mk(B).abs(), mk(B), mk(B).abs()]


def _sync():
    if device().type == "cuda":
        torch.cuda.synchronize()


SIZES = {"cifar_b128": (128, 3 * 32 * 32), "cifar_b1024": (1024, 3 * 32 * 32)}


@pytest.mark.parametrize("size", SIZES)
def test_laplacian_terms_bandwidth(record_group, size):
    B, N = SIZES[size]
    args = _inputs(K, B, N)
    moved = (2 * K + 5) * B * N * 4                     # 2K + 4 planes read, r written
    src = torch.empty(moved // 8, dtype=torch.float32, device=device())   # read + write
    dst = torch.empty_like(src)

    def runner(provider):
        def run():
            if provider == "copy":
                dst.copy_(src)
            else:
                with backend.use_backend("torch" if provider == "torch" else None):
                    laplacian_terms(*args, 2.0)
            _sync()
        return run

    record_group(f"laplacian_terms/{size}", "kernel",
                 {p: runner(p) for p in ["copy", "fused", "torch"]}, rounds=20, bytes=moved)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("K", [1, 4])
@pytest.mark.parametrize("case", list(cases(DATA)))
def test_laplacian_terms(record_group, case, K, mode):
    shape = cases(DATA)[case]
    B = shape[0]
    g = torch.Generator().manual_seed(0)
    v, jv = randn(g, K, *shape), leaf(randn(g, K, *shape))
    w, lap, s = (leaf(randn(g, *shape)) for _ in range(3))
    x = randn(g, *shape)
    g2, f, weight = randn(g, B).abs(), randn(g, B), randn(g, B).abs()
    args = (v, jv, w, lap, s, x, g2, f, weight, 2.0)
    fns = op_runners(mode, lambda: laplacian_terms(*args), lambda: laplacian_terms_ref(*args),
                     [jv, w, lap, s])
    record_group(f"laplacian_terms/{case}/K{K}", mode, fns, rounds=20, shape=list(shape))
