"""Triton helpers shared by the kernels of this package."""

import torch
import triton
import triton.language as tl


@triton.jit
def load(ptr, offs, mask, UPCAST: tl.constexpr):
    """Masked load (0 outside the mask), upcast to float32 for half-precision storage."""
    v = tl.load(ptr + offs, mask=mask, other=0.0)
    if UPCAST:
        v = v.to(tl.float32)
    return v


@triton.jit
def acc_zeros(BLOCK: tl.constexpr, FP64: tl.constexpr):
    """A zero accumulator of BLOCK lanes: float64 for float64 inputs, float32 otherwise."""
    if FP64:
        acc = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
    return acc


def upcast(t: torch.Tensor) -> bool:
    """Whether a kernel reading `t` computes in float32 rather than in t's own dtype."""
    return t.dtype in (torch.float16, torch.bfloat16)


def block(cols: int, most: int = 4096) -> int:
    """Block size for a row of `cols` elements: its next power of two, in [16, most]."""
    return max(16, min(most, triton.next_power_of_2(cols)))
