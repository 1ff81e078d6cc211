"""benchmarks/mlp_kernel_sweep.py: every block size it sweeps gives the kernel's values and
gradients (here under the Triton interpreter, on CPU), and the defaults come back."""

import torch

from benchmarks import mlp_kernel_sweep as sweep
from fpkern.kernels import mlp_jet as kernels


def test_every_setting_matches_the_reference_and_defaults_are_restored(monkeypatch):
    monkeypatch.setattr(sweep, "BLOCK_B", (4, 32))
    monkeypatch.setattr(sweep, "WARPS", (4,))
    defaults = (kernels.BLOCK_B, kernels._NUM_WARPS)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name in sweep.LAYOUTS:
        rows += sweep.measure(3, name, 9, 32, dev, False, gen)
    assert (kernels.BLOCK_B, kernels._NUM_WARPS) == defaults
    assert len(rows) == 2 * len(sweep.LAYOUTS)
    for r in rows:
        assert "failed" not in r, r
        assert r["error_out"] < 1e-4 and r["error_grad"] < 1e-4, r
