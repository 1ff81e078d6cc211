"""Triton helpers shared by the kernels of this package."""

import triton
import triton.language as tl


@triton.jit
def load(ptr, offs, mask, UPCAST: tl.constexpr):
    """Masked load (0 outside the mask), upcast to float32 for half-precision storage."""
    v = tl.load(ptr + offs, mask=mask, other=0.0)
    if UPCAST:
        v = v.to(tl.float32)
    return v
