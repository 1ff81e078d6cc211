"""Eager calls of the per-layer fused jet ops without the custom-op dispatcher.

A `torch.library.custom_op` with registered autograd runs Python around every call
(argument flattening, default filling, redispatch); an `autograd.Function` running the same
implementation, setup_context and backward costs about half as much per call. The per-layer
ops (`jet_act`, `group_norm_jet`) run some 80 times per jet pass of a small NCSN++, so they
go through `EagerOp` in eager mode and through their custom op while a tracer runs
(torch.compile needs the registered op). Ops called once per loss keep the custom op in
both. Measurements: benchmarks/results/README.md, "Design notes".
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["EagerOp", "pick", "tracing"]


def tracing(first) -> bool:
    """Whether a tracer runs: torch.compile, AOT/make_fx tracing (whose tensors are
    subclasses such as FakeTensor, or, for make_fx on real tensors, plain tensors under a
    dispatch mode), or torch.jit.trace. The eager paths call C++ kernels on the tensors'
    memory, which a tracer cannot see; the registered ops it records instead. torch.func
    transforms take neither path (the fused ops have no functorch rules; the generic
    torch.func path runs on plain tensors instead)."""
    return (torch.compiler.is_compiling() or type(first) is not torch.Tensor
            or torch._C._len_torch_dispatch_stack() > 0 or torch.jit.is_tracing())


def pick(op: Callable, impl: Callable, *args):
    """op(*args) while a tracer runs, else impl(*args): for the backward kernels, which an
    eager backward calls directly."""
    return op(*args) if tracing(args[0]) else impl(*args)


class EagerOp:
    """Calls `op` while a tracer runs and otherwise an autograd.Function with the op's own
    implementation, setup_context and backward (the functions given to register_autograd)."""

    def __init__(self, op: Callable, impl: Callable, setup: Callable, backward: Callable):
        self.op = op

        class _Function(torch.autograd.Function):
            # old-style forward(ctx, ...): a separate setup_context makes apply() bind the
            # arguments by inspect.signature and walk them with pytree, on every call
            @staticmethod
            def forward(ctx, *args):
                out = impl(*args)
                setup(ctx, args, out)
                return out

            @staticmethod
            def backward(ctx, *grads):
                return backward(ctx, *grads)

        _Function.__name__ = _Function.__qualname__ = f"{getattr(impl, '__name__', 'op')}_eager"
        self._function = _Function

    def __call__(self, *args):
        if tracing(args[0]):
            return self.op(*args)
        return self._function.apply(*args)
