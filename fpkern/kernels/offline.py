"""The Triton kernels compiled for an NVIDIA GPU on a machine without one.

The interpreter (TRITON_INTERPRET=1) runs a kernel as numpy code: it accepts things the
compiler rejects (a variable whose type changes in a loop, say), and says nothing of the
registers, spills and shared memory that decide a kernel's speed on the GPU. Here:

- `recorded_launches(*modules)`: while the ops run, each launch of one of the modules'
  kernels is noted as a specialization (argument types and constexpr values) and not run;
- `compile_specs(specs)`: every specialization through Triton's whole NVIDIA pipeline to a
  cubin for sm_90 (the H100's target), in a fresh process where the kernels are compiled,
  with its registers and spill stack per thread (from the cuobjdump that Triton ships) and its
  shared memory.

tests/ops and tests/jet/fused (the kernels' tests) and benchmarks/kernel_resources.py use them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import inspect
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SM90_SHARED = 227 * 1024          # an H100 block's most (opt-in) shared memory, bytes
_TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16",
          torch.bfloat16: "bf16", torch.int64: "i64", torch.int32: "i32", torch.int8: "i8",
          torch.uint8: "u8", torch.bool: "i1"}
_OPTIONS = ("num_warps", "num_stages")


def nvidia_compiler() -> bool:
    """Whether triton's NVIDIA backend is installed (it is in triton's Linux wheels)."""
    try:
        import triton.backends.nvidia  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError:
        return False
    return True


# ---- recording -----------------------------------------------------------------------------
def _arg_type(name, value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"argument {name}: no Triton type for {type(value).__name__}")


def _specialization(module: str, name: str, kernel, args, kwargs) -> dict:
    params = inspect.signature(kernel.fn).parameters
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in _OPTIONS if k in kwargs}
    bound = dict(zip(params, args), **kwargs)
    if set(bound) != set(params):
        raise TypeError(f"{name} launched with {sorted(bound)}, takes {list(params)}")
    signature, constexprs = {}, {}
    for pname, p in params.items():
        if "constexpr" in str(p.annotation):
            signature[pname] = "constexpr"
            constexprs[pname] = bound[pname]
        else:
            signature[pname] = _arg_type(pname, bound[pname])
    return {"module": module, "kernel": name, "signature": signature,
            "constexprs": constexprs, "options": options}


class _Recorder:
    def __init__(self, module: str, name: str, kernel, log: list):
        self.module, self.name, self.kernel, self.log = module, name, kernel, log

    def __getitem__(self, grid):
        def note(*args, **kwargs):
            spec = _specialization(self.module, self.name, self.kernel, args, kwargs)
            if spec not in self.log:
                self.log.append(spec)
        return note


@contextlib.contextmanager
def recorded_launches(*modules):
    """Within the block, every launch of one of the modules' kernels (their `*_kernel`
    names) is noted, once per specialization, in the list this yields, and not run: outputs
    keep what torch.empty gave them, so only shapes and dtypes mean anything downstream."""
    log: list[dict] = []
    originals = [(m, n, k) for m in modules for n, k in vars(m).items() if n.endswith("_kernel")]
    try:
        for m, n, k in originals:
            setattr(m, n, _Recorder(m.__name__, n, k, log))
        yield log
    finally:
        for m, n, k in originals:
            setattr(m, n, k)


# ---- compiling -------------------------------------------------------------------------------
def compile_specs(specs: list[dict], timeout: float = 900) -> list[dict]:
    """Each spec compiled for sm_90: {"spec", "error"} or {"spec", "shared", "registers",
    "spill"} (registers and spill stack bytes per thread; None where cuobjdump is missing)."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-m", "fpkern.kernels.offline"], input=json.dumps(specs),
                         env=env, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"the compile process failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout)


def _cuobjdump() -> str | None:
    import triton.backends.nvidia as nv
    path = Path(nv.__file__).parent / "bin" / "cuobjdump"
    return str(path) if path.exists() else None


def _resources(cubin: bytes) -> tuple[int | None, int | None]:
    tool = _cuobjdump()
    if tool is None:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
    reg, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
    return (int(reg.group(1)) if reg else None), (int(stack.group(1)) if stack else None)


def _build(spec: dict) -> dict:
    import traceback

    import triton
    from triton.backends.compiler import GPUTarget
    try:
        fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
        src = triton.compiler.ASTSource(fn=fn, signature=spec["signature"],
                                        constexprs=spec["constexprs"])
        out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=spec["options"])
        if "cubin" not in out.asm:
            return {"spec": spec, "error": "no cubin"}
        regs, spill = _resources(out.asm["cubin"])
        return {"spec": spec, "shared": out.metadata.shared, "registers": regs, "spill": spill}
    except Exception:
        return {"spec": spec, "error": traceback.format_exc()[-2000:]}


def _main() -> None:
    specs = json.loads(sys.stdin.read())
    workers = max(1, min(len(specs), os.cpu_count() or 1))
    fork = multiprocessing.get_context("fork")        # the workers inherit the imports
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=fork) as pool:
        results = list(pool.map(_build, specs))
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    _main()
