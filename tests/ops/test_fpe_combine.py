"""The fused residual assembly (fpkern::fpe_combine): every backend against the reference."""

import pytest
import torch

from fpkern import backend
from fpkern.kernels import fpe_combine as kernels
from fpkern.kernels.offline import recorded_launches
from fpkern.ops import fpe_combine, fpe_combine_ref
from tests.kernel_checks import (assert_close, assert_compile_for_sm90, backends, device_for,
                                 needs_nvidia_compiler)

SHAPES = [(1, 1), (5, 123), (3, 2, 7, 9), (4, 4097)]
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2}


def _combine_inputs(shape, dtype, device, gen):
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(device, dtype)  # noqa: E731
    return [mk(*shape) for _ in range(4)] + [mk(shape[0]).abs(), mk(shape[0])]


def test_cpp_extension_is_built():
    lib = backend.native()
    assert lib is not None, "fpkern._C was not built: run `make setup`"
    assert hasattr(lib, "fpe_combine_forward")


def test_triton_runs_here():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert backend.available("triton", device), "triton must run (interpreted on CPU)"


@pytest.mark.parametrize("name", backends())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_combine_forward_and_backward_match_reference(name, shape, dtype, gen):
    args = _combine_inputs(shape, dtype, device_for(name), gen)
    a1 = [a.clone().requires_grad_() for a in args]
    a2 = [a.clone().requires_grad_() for a in args]
    with backend.use_backend(name):
        out = fpe_combine(*a1)
    ref = fpe_combine_ref(*a2)
    assert_close(out, ref, TOL[dtype], f"{name} forward")
    go = torch.randn(shape, generator=gen, dtype=torch.float64).to(out)
    with backend.use_backend(name):
        grads = torch.autograd.grad(out, a1, go)
    want = torch.autograd.grad(ref, a2, go)
    for i, (g, w) in enumerate(zip(grads, want)):
        assert_close(g, w, TOL[dtype] * (shape[-1] ** 0.5 if i >= 4 else 1), f"{name} grad {i}")


def test_reference_is_the_defining_formula(gen):
    dts, second, jc, s, g2, f = _combine_inputs((3, 4), torch.float64, "cpu", gen)
    want = dts - 0.5 * g2[:, None] * second - jc + f[:, None] * s
    assert torch.equal(fpe_combine_ref(dts, second, jc, s, g2, f), want)


@pytest.mark.parametrize("name", backends())
def test_gradcheck(name, gen):
    dev = device_for(name)
    args = [a.requires_grad_() for a in _combine_inputs((3, 5), torch.float64, dev, gen)]
    with backend.use_backend(name):
        assert torch.autograd.gradcheck(fpe_combine, args)


@pytest.mark.parametrize("name", ["torch", "cpp"])
def test_opcheck_registration(name, gen):
    args = _combine_inputs((3, 5), torch.float64, "cpu", gen)
    with backend.use_backend(name):
        torch.library.opcheck(torch.ops.fpkern.fpe_combine.default, args)


def test_torch_compile_accepts_the_ops(gen):
    args = _combine_inputs((3, 5), torch.float32, "cpu", gen)
    fn = torch.compile(lambda *a: fpe_combine(*a).pow(2).sum(), backend="eager", fullgraph=True)
    assert torch.allclose(fn(*args), fpe_combine_ref(*args).pow(2).sum())


def test_bad_inputs_are_named(gen):
    dts, second, jc, s, g2, f = _combine_inputs((3, 4), torch.float64, "cpu", gen)
    with pytest.raises(ValueError, match="second has shape"):
        fpe_combine(dts, second[:, :3], jc, s, g2, f)
    with pytest.raises(ValueError, match="g2 has shape"):
        fpe_combine(dts, second, jc, s, g2[:2], f)
    with pytest.raises(ValueError, match="s is torch.float32"):
        fpe_combine(dts, second, jc, s.float(), g2, f)


@needs_nvidia_compiler
def test_kernels_compile_for_sm90(gen):
    """The op's kernels, forward and backward, in every dtype, as the op launches them."""
    dev = device_for("triton")
    with recorded_launches(kernels) as launches, backend.use_backend("triton"):
        for dtype in TOL:
            args = [a.requires_grad_() for a in _combine_inputs((5, 123), dtype, dev, gen)]
            torch.autograd.grad(fpe_combine(*args).sum(), args)
    assert len(launches) == 2 * len(TOL)
    assert_compile_for_sm90(launches)
