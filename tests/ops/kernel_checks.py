"""Shared by the kernel tests: the backends that run here, their device, a closeness check
that names the first mismatching element, and the compilation of the Triton kernels for a
GPU on a machine without one."""

import contextlib
import inspect
import json
import os
import subprocess
import sys

import torch

from fpkern import backend


def backends() -> list[str]:
    """torch and cpp always; triton on CUDA, or on CPU under the interpreter."""
    out = ["torch", "cpp"]
    if backend.available("triton", "cuda" if torch.cuda.is_available() else "cpu"):
        out.append("triton")
    return out


def device_for(name: str) -> str:
    return "cuda" if name == "triton" and torch.cuda.is_available() else "cpu"


def assert_close(got, want, tol, what, *, check_dtype=True):
    """|got - want| <= tol (1 + |want|) elementwise; shapes (and dtypes) equal."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    if check_dtype:
        assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} vs {want.dtype}"
    err = (got.double() - want.double()).abs()
    bound = tol * (1 + want.double().abs())
    if (err > bound).any():
        i = tuple((err > bound).nonzero()[0].tolist())
        raise AssertionError(f"{what}: first mismatch at {i}: {got[i].item()!r} vs "
                             f"{want[i].item()!r} (max error {err.max().item():.3g})")


# ---- compiling the Triton kernels for a GPU, with no GPU ------------------------------------
# The interpreter runs a kernel as numpy code: it accepts things the compiler does not (a
# variable whose type changes in a loop, say). `recorded_launches` notes the specialization
# (argument types and constexpr values) of each launch the ops make; `assert_compile_for_sm90`
# sends every one through Triton's whole NVIDIA pipeline (to a cubin for sm_90, the H100's
# target) in a fresh process where the kernels are compiled, not interpreted.
_TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16",
          torch.bfloat16: "bf16", torch.int64: "i64", torch.int32: "i32", torch.int8: "i8",
          torch.uint8: "u8", torch.bool: "i1"}
_OPTIONS = ("num_warps", "num_stages")


def nvidia_backend() -> bool:
    """Whether triton's NVIDIA compiler is installed (it is in triton's Linux wheels)."""
    try:
        import triton.backends.nvidia  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError:
        return False
    return True


def _arg_type(name, value):
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"argument {name}: no Triton type for {type(value).__name__}")


def _specialization(module, name, kernel, args, kwargs):
    params = inspect.signature(kernel.fn).parameters
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in _OPTIONS if k in kwargs}
    bound = dict(zip(params, args), **kwargs)
    assert set(bound) == set(params), f"{name}: launched with {sorted(bound)}"
    signature, constexprs = {}, {}
    for pname, p in params.items():
        if "constexpr" in str(p.annotation):
            signature[pname] = "constexpr"
            constexprs[pname] = bound[pname]
        else:
            signature[pname] = _arg_type(pname, bound[pname])
    return {"module": module.__name__, "kernel": name, "signature": signature,
            "constexprs": constexprs, "options": options}


class _Recorder:
    def __init__(self, module, name, kernel, log):
        self.module, self.name, self.kernel, self.log = module, name, kernel, log

    def __getitem__(self, grid):
        def note(*args, **kwargs):
            spec = _specialization(self.module, self.name, self.kernel, args, kwargs)
            if spec not in self.log:
                self.log.append(spec)
        return note


@contextlib.contextmanager
def recorded_launches(module):
    """Within the block, every launch of one of `module`'s kernels (its `*_kernel` names)
    is noted, once per specialization, in the list this yields, and not run: outputs keep
    what torch.empty gave them (the interpreter takes a minute for a width-256 MLP)."""
    log: list[dict] = []
    names = [n for n in vars(module) if n.endswith("_kernel")]
    originals = {n: getattr(module, n) for n in names}
    try:
        for n, k in originals.items():
            setattr(module, n, _Recorder(module, n, k, log))
        yield log
    finally:
        for n, k in originals.items():
            setattr(module, n, k)


_COMPILE = """
import concurrent.futures, importlib, json, multiprocessing, os, sys, traceback
import triton
from triton.backends.compiler import GPUTarget

SHARED = 227 * 1024       # an H100 block's most (opt-in) shared memory

def build(spec):
    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    src = triton.compiler.ASTSource(fn=fn, signature=spec["signature"],
                                    constexprs=spec["constexprs"])
    try:
        out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=spec["options"])
        if "cubin" not in out.asm:
            return f"{spec['kernel']} {spec['constexprs']}: no cubin"
        if out.metadata.shared > SHARED:
            return (f"{spec['kernel']} {spec['constexprs']}: {out.metadata.shared} bytes of "
                    f"shared memory, over sm_90's {SHARED} a block")
    except Exception:
        return f"{spec['kernel']} {spec['constexprs']}: {traceback.format_exc()[-1500:]}"

if __name__ == "__main__":
    specs = json.loads(sys.stdin.read())
    workers = min(len(specs), os.cpu_count() or 1)
    fork = multiprocessing.get_context("fork")     # `build` lives in this -c script
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=fork) as pool:
        failed = [f for f in pool.map(build, specs) if f]
    print("\\n".join(failed), file=sys.stderr)
    sys.exit(1 if failed else 0)
"""


def assert_compile_for_sm90(launches: list[dict]) -> None:
    """Every recorded specialization compiles to a cubin for sm_90 (no GPU needed)."""
    assert launches, "no kernel was launched"
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    res = subprocess.run([sys.executable, "-c", _COMPILE], input=json.dumps(launches), env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-6000:]
