"""The fused activation jet rule: reference against nested jvp, every backend against it."""

import pytest
import torch
import torch.nn.functional as F

from fpkern import backend
from fpkern.jet import Layout
from fpkern.kernels import jet_act as kernels
from fpkern.kernels.offline import recorded_launches
from fpkern.jet.fused.jet_act import ACTS, jet_act, jet_act_ref
from tests.jet.nested_jvp import nested_jvp_rows
from tests.kernel_checks import (assert_close, assert_compile_for_sm90, backends, device_for,
                                 needs_nvidia_compiler)


def _close(got, want, tol, what):
    """Against a float64 reference: the dtypes differ by design."""
    assert_close(got, want, tol, what, check_dtype=False)


F64 = torch.float64
LAYOUTS = {
    "first": Layout(n1=3),
    "collapsed": Layout(n1=3, collapse=(1, 2)),
    "pairs": Layout(n1=3, pairs=((1, 3), (2, 3), (2, 2)), collapse=(1, 2)),
    "laplacian": Layout(n1=4, collapse=(1, 2)),
}
FN = {"silu": F.silu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 5e-2}   # rows ~ 2 randn


def _rows(layout, shape, gen, dtype=F64):
    return (2 * torch.randn((layout.rows,) + shape, generator=gen, dtype=F64)).to(dtype)


@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("lname", sorted(LAYOUTS))
def test_reference_is_the_second_order_taylor_rule(act, lname, gen):
    layout = LAYOUTS[lname]
    rows = _rows(layout, (5, 7), gen)
    _close(jet_act_ref(rows, act, layout.kernel_spec), nested_jvp_rows(FN[act], rows, layout),
           1e-12, f"{act}/{lname}")


@pytest.mark.parametrize("name", backends())
@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("lname", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_backends_match_reference_forward_and_backward(name, act, lname, dtype, gen):
    layout = LAYOUTS[lname]
    shape = (3, 2, 7, 9) if dtype != torch.bfloat16 else (5, 123)
    rows = _rows(layout, shape, gen, dtype).to(device_for(name))
    grad = torch.randn(rows.shape, generator=gen, dtype=F64).to(rows)
    a = rows.clone().requires_grad_(True)
    with backend.use_backend(name):
        out = jet_act(a, act, layout.kernel_spec)
        (ga,) = torch.autograd.grad(out, a, grad)
    b = rows.clone().requires_grad_(True)
    ref = jet_act_ref(b.double(), act, layout.kernel_spec)
    (gb,) = torch.autograd.grad(ref, b, grad.double())
    assert out.dtype == dtype and ga.dtype == dtype
    _close(out, ref, TOL[dtype], f"{name} forward")
    _close(ga, gb, 4 * TOL[dtype], f"{name} backward")


@pytest.mark.parametrize("name", ["cpp", "torch"])
def test_gradcheck_and_double_backward(name, gen):
    layout = LAYOUTS["pairs"]
    rows = _rows(layout, (2, 3), gen).requires_grad_(True)
    spec = layout.kernel_spec
    with backend.use_backend(name):
        assert torch.autograd.gradcheck(lambda r: jet_act(r, "silu", spec), (rows,))
        assert torch.autograd.gradgradcheck(lambda r: jet_act(r, "silu", spec), (rows,))


def test_triton_gradcheck_interpreted(gen):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not backend.available("triton", device):
        pytest.skip("triton cannot run here")
    layout = LAYOUTS["pairs"]
    rows = _rows(layout, (2, 3), gen).to(device).requires_grad_(True)
    with backend.use_backend("triton"):
        assert torch.autograd.gradcheck(lambda r: jet_act(r, "tanh", layout.kernel_spec), (rows,))


def test_opcheck(gen):
    layout = LAYOUTS["collapsed"]
    rows = _rows(layout, (4, 5), gen).to(torch.float32).requires_grad_(True)
    torch.library.opcheck(torch.ops.fpkern.jet_act.default,
                          (rows, "silu", 3, [], [], 1, 2))


def test_bad_input_is_named(gen):
    layout = LAYOUTS["collapsed"]
    rows = _rows(layout, (4, 5), gen)
    with pytest.raises(ValueError, match="valid names"):
        jet_act(rows, "relu6", layout.kernel_spec)
    with pytest.raises(ValueError, match="R = 5"):
        jet_act(rows[:3], "silu", layout.kernel_spec)
    with pytest.raises(TypeError, match="floating"):
        jet_act(rows.long(), "silu", layout.kernel_spec)


def test_torch_compile_accepts_the_op(gen):
    layout = LAYOUTS["collapsed"]
    rows = _rows(layout, (4, 5), gen).float()
    fn = torch.compile(lambda r: jet_act(r, "silu", layout.kernel_spec).sum(), backend="eager",
                       fullgraph=True)
    assert torch.allclose(fn(rows), jet_act_ref(rows, "silu", layout.kernel_spec).sum(),
                          rtol=1e-5)


@needs_nvidia_compiler
def test_kernels_compile_for_sm90(gen):
    """Every activation and layout, forward and backward, in every dtype."""
    with recorded_launches(kernels) as launches, backend.use_backend("triton"):
        for act in sorted(ACTS):
            for layout in LAYOUTS.values():
                for dtype in TOL:
                    rows = _rows(layout, (5, 7), gen, dtype).to(device_for("triton"))
                    rows.requires_grad_()
                    torch.autograd.grad(jet_act(rows, act, layout.kernel_spec).sum(), rows)
    assert len(launches) == 2 * len(ACTS) * len(LAYOUTS) * len(TOL)
    assert_compile_for_sm90(launches)
