"""Backend-call plumbing shared by every fused op: dtypes, flat views, the call into fpkern._C.

The C++ kernels (csrc/) take contiguous float32 or float64 buffers; other floating dtypes
(float16, bfloat16) are upcast to float32 for the call and cast back after it. The torch
references accumulate in float32, or float64 for float64 inputs (`acc_dtype`). Written once
here so that each op module holds only its mathematics and its kernel calls, with the
argument check the ops share (`check_like`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fpkern import backend

__all__ = ["NATIVE_DTYPES", "acc_dtype", "work_dtype", "rows", "planes", "np_view", "call",
           "lib", "check_like"]

NATIVE_DTYPES = (torch.float32, torch.float64)


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a reference computes in for input `x`: float64 for float64, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a C++ kernel runs in for inputs of `dtype`: itself if native, else float32."""
    return dtype if dtype in NATIVE_DTYPES else torch.float32


def rows(x: torch.Tensor) -> torch.Tensor:
    """`x` as a contiguous [x.shape[0], -1] matrix."""
    return x.contiguous().reshape(x.shape[0], -1)


def planes(x: torch.Tensor) -> torch.Tensor:
    """`x` as a contiguous [x.shape[0], x.shape[1], -1] stack of matrices."""
    return x.contiguous().reshape(x.shape[0], x.shape[1], -1)


def np_view(x: torch.Tensor | None):
    """A NumPy view of the (CPU, contiguous) buffer of `x`, for a _C kernel's argument;
    None stays None (an optional argument, such as a GroupNorm without weight)."""
    return None if x is None else x.detach().numpy()


def lib():
    """The C++ extension fpkern._C (the "cpp" backend was selected, so it is there)."""
    return backend.native()


def call(fn_name: str, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor],
         *scalars) -> list[torch.Tensor]:
    """Run the _C kernel `fn_name(*inputs, *scalars, *outputs)` in the work dtype of
    `inputs[0]`: inputs are cast and made contiguous (no copy when they already are),
    outputs are fresh buffers shaped like `outputs` and returned in those tensors' dtypes."""
    work = work_dtype(inputs[0].dtype)
    ins = [x.detach().to(work).contiguous() for x in inputs]
    outs = [torch.empty(o.shape, dtype=work) for o in outputs]
    getattr(lib(), fn_name)(*map(np_view, ins), *scalars, *map(np_view, outs))
    return [o if o.dtype == t.dtype else o.to(t.dtype) for o, t in zip(outs, outputs)]


def check_like(name: str, x, ref_name: str, ref: torch.Tensor, shape=None) -> None:
    """Raise unless `x` is a floating tensor of `shape` (default: ref's) with ref's dtype and
    device; the message names `x` and, for ref's own shape and for dtype and device, the
    tensor `ref_name` it must match."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating torch.Tensor")
    want = tuple(ref.shape if shape is None else shape)
    if tuple(x.shape) != want:
        like = f" like {ref_name}" if shape is None else ""
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {want}{like}")
    if x.dtype != ref.dtype or x.device != ref.device:
        raise ValueError(f"{name} is {x.dtype} on {x.device}, expected {ref.dtype} on "
                         f"{ref.device} like {ref_name}")
