"""Shared by the per-op micro-benchmarks (benchmarks/bench_<op>.py): inputs on the benchmark
device, the engine's jet layouts and shapes, and `op_runners`, which turns an op and its
torch reference into the providers "fused" and "torch" of one mode for `record_group`.

Both providers differentiate the same leaf tensors (the op's differentiable inputs as the
engine's training step has them). Mode "fwd" runs the forward with those inputs requiring
grad, so that each provider records the graph it would keep for a backward (what the
CPU peak memory counts); "fwdbwd" adds the backward of sum_o <g_o, o> over the outputs o,
with fixed random cotangents g_o, i.e. of a scalar of the outputs that reaches every one of
them. Before timing, one untimed step of each provider checks that the fused output has a
backward node, that every gradient is there, and that fused and torch agree: a benchmark
of an op that did not run its backward, or of the wrong computation, fails instead.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from benchmarks.conftest import device
from fpkern.jet import Layout

__all__ = ["LAYOUTS", "FEATURES", "DATA", "cases", "GN_EPS",
           "group_norm_inputs", "gpu", "sync", "randn", "leaf", "op_runners"]

#: The jet layouts the engine builds (fpkern.ops.jet_pass, fpkern.ops.fused_div), K = 1:
#: "laplacian" is the laplacian form's transport pass (value, probe, transport, collapsed
#: second derivative: 4 rows); "projected" the projected div-form pass (value, probe v,
#: direction u, time, the mixed pair (v, u): 5 rows), the one layout with pair rows.
LAYOUTS = {"laplacian": Layout(n1=2, collapse=(1,)),
           "projected": Layout(n1=3, pairs=((1, 2),))}

#: Per-layer jet rows [R, B, C, H, W] by case and device: the network's widest GroupNorm +
#: activation level, (B, C, H, W, groups): the small NCSN++ preset at batch 8 on CPU (32
#: channels at 16 x 16), the CIFAR-10 NCSN++ at batch 64 on GPU (128 channels at 32 x 32).
FEATURES = {"cpu": {"ncsnpp_small_b8": (8, 32, 16, 16, 8)},
            "cuda": {"cifar10_ncsnpp_b64": (64, 128, 32, 32, 32)}}

#: Per-sample planes [B, ...] of the FPE terms (the score network's input shape) by case
#: and device: the small NCSN++ preset at batch 8 and the D = 64 MLP at batch 128 on CPU;
#: CIFAR-10 at batch 64 and 128 on GPU.
DATA = {"cpu": {"ncsnpp_small_b8": (8, 1, 16, 16), "mlp64_b128": (128, 64)},
        "cuda": {"cifar10_b64": (64, 3, 32, 32), "cifar10_b128": (128, 3, 32, 32)}}


def cases(table: dict) -> dict:
    """The entries of FEATURES or DATA for the benchmark device."""
    return table["cuda" if gpu() else "cpu"]


#: GroupNorm's eps in the presets' layers.
GN_EPS = 1e-6


def group_norm_inputs(case: str, layout):
    """Leaves rows [R, B, C, H, W], weight [C] (about 1) and bias [C] (about 0) of the
    FEATURES case `case` in `layout`, and its groups."""
    B, C, H, W, groups = cases(FEATURES)[case]
    g = torch.Generator().manual_seed(0)
    rows = leaf(randn(g, layout.rows, B, C, H, W))
    weight, bias = leaf(1 + randn(g, C, scale=0.1)), leaf(randn(g, C, scale=0.1))
    return rows, weight, bias, groups


def gpu() -> bool:
    return device().type == "cuda"


def sync() -> None:
    if gpu():
        torch.cuda.synchronize()


def randn(gen: torch.Generator, *shape, scale: float = 1.0) -> torch.Tensor:
    """float32 normal values drawn on the CPU from `gen` (the same on every device), moved
    to the benchmark device."""
    return (scale * torch.randn(*shape, generator=gen)).to(device())


def leaf(t: torch.Tensor) -> torch.Tensor:
    """`t` as a leaf that requires grad (a differentiable input)."""
    return t.detach().clone().requires_grad_(True)


def _outputs(out) -> list[torch.Tensor]:
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    return [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]


def _check(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    scale = want.detach().double().abs().max().item()
    torch.testing.assert_close(got.detach().double(), want.detach().double(), rtol=rtol,
                               atol=rtol * max(scale, 1e-30), msg=lambda m: f"{name}: {m}")


def op_runners(mode: str, fused: Callable, ref: Callable, wrt: Sequence[torch.Tensor],
               rtol: float = 1e-3, seed: int = 0) -> dict[str, Callable[[], None]]:
    """{"fused": ..., "torch": ...}: calls that run one step of `mode` ("fwd" or "fwdbwd")
    and synchronise. `fused()` and `ref()` return the op's output (or a tuple of outputs)
    computed from the leaves `wrt` (and constants); see the module docstring for what a step
    is and what is checked first."""
    if mode not in ("fwd", "fwdbwd"):
        raise ValueError(f"mode must be 'fwd' or 'fwdbwd', got {mode!r}")
    wrt = list(wrt)
    assert wrt and all(t.is_leaf and t.requires_grad for t in wrt), "wrt: leaves requiring grad"
    outs_f, outs_r = _outputs(fused()), _outputs(ref())
    assert outs_f and len(outs_f) == len(outs_r), "fused and torch give different outputs"
    assert all(o.grad_fn is not None for o in outs_f), "the fused output has no backward node"
    gen = torch.Generator().manual_seed(seed)
    cot = [randn(gen, *o.shape).to(o.dtype) for o in outs_f]
    grads_f = torch.autograd.grad(outs_f, wrt, cot)
    grads_r = torch.autograd.grad(outs_r, wrt, cot)
    for i, (a, b) in enumerate(zip(outs_f, outs_r)):
        _check(f"output {i}", a, b, rtol)
    for i, (a, b) in enumerate(zip(grads_f, grads_r)):
        assert a is not None and b is not None, f"no gradient for input {i}"
        assert torch.isfinite(a).all(), f"non-finite fused gradient for input {i}"
        _check(f"gradient {i}", a, b, rtol)
    del outs_f, outs_r, grads_f, grads_r
    sync()

    def runner(fn):
        def run():
            out = fn()
            if mode == "fwdbwd":
                torch.autograd.grad(_outputs(out), wrt, cot)
            del out
            sync()
        return run

    return {"fused": runner(fused), "torch": runner(ref)}
