"""The fused Hutchinson reduction (fpkern::hutchinson_reduce): every backend against the
reference."""

import pytest
import torch

from fpkern import backend
from fpkern.kernels import hutchinson_reduce as kernels
from fpkern.kernels.offline import recorded_launches
from fpkern.ops import hutchinson_reduce, hutchinson_reduce_ref
from tests.kernel_checks import (assert_close, assert_compile_for_sm90, backends, device_for,
                                 needs_nvidia_compiler)

TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2}


def test_cpp_extension_is_built():
    lib = backend.native()
    assert lib is not None, "fpkern._C was not built: run `make setup`"
    assert hasattr(lib, "hutchinson_reduce_forward")


@pytest.mark.parametrize("name", backends())
@pytest.mark.parametrize("K, shape", [(1, (1, 1)), (3, (5, 123)), (2, (3, 2, 5, 5)), (4, (2, 3000))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_hutchinson_forward_and_backward_match_reference(name, K, shape, dtype, gen):
    dev = device_for(name)
    v = torch.randn((K,) + shape, generator=gen, dtype=torch.float64).to(dev, dtype)
    jv = torch.randn((K,) + shape, generator=gen, dtype=torch.float64).to(dev, dtype)
    v1, jv1 = v.clone().requires_grad_(), jv.clone().requires_grad_()
    v2, jv2 = v.clone().requires_grad_(), jv.clone().requires_grad_()
    with backend.use_backend(name):
        out = hutchinson_reduce(v1, jv1)
    ref = hutchinson_reduce_ref(v2, jv2)
    n = v[0, 0].numel()
    assert_close(out, ref, TOL[dtype] * n ** 0.5, f"{name} forward")
    go = torch.randn(shape[0], generator=gen, dtype=torch.float64).to(out)
    with backend.use_backend(name):
        grads = torch.autograd.grad(out, (v1, jv1), go)
    want = torch.autograd.grad(ref, (v2, jv2), go)
    for g, w in zip(grads, want):
        assert_close(g, w, TOL[dtype], f"{name} backward")


def test_reference_is_the_defining_formula(gen):
    v = torch.randn(2, 3, 4, dtype=torch.float64, generator=gen)
    jv = torch.randn(2, 3, 4, dtype=torch.float64, generator=gen)
    want = torch.stack([(v[:, b] * jv[:, b]).sum() / 2 for b in range(3)])
    assert torch.allclose(hutchinson_reduce_ref(v, jv), want, rtol=1e-14)


@pytest.mark.parametrize("name", backends())
def test_gradcheck(name, gen):
    dev = device_for(name)
    v = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen).to(dev).requires_grad_()
    jv = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen).to(dev).requires_grad_()
    with backend.use_backend(name):
        assert torch.autograd.gradcheck(hutchinson_reduce, (v, jv))


@pytest.mark.parametrize("name", ["torch", "cpp"])
def test_opcheck_registration(name, gen):
    v = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen)
    with backend.use_backend(name):
        torch.library.opcheck(torch.ops.fpkern.hutchinson_reduce.default, (v, v.clone()))


def test_bad_inputs_are_named(gen):
    with pytest.raises(TypeError, match="v must be a floating"):
        hutchinson_reduce(torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3))


@needs_nvidia_compiler
def test_kernels_compile_for_sm90(gen):
    """The op's kernels, forward and backward, in every dtype, as the op launches them."""
    dev = device_for("triton")
    with recorded_launches(kernels) as launches, backend.use_backend("triton"):
        for dtype in TOL:
            v, jv = (torch.randn(2, 5, 123, generator=gen).to(dev, dtype).requires_grad_()
                     for _ in range(2))
            torch.autograd.grad(hutchinson_reduce(v, jv).sum(), (v, jv))
    assert len(launches) == 2 * len(TOL)
    assert_compile_for_sm90(launches)
