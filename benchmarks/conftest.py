"""Benchmark plumbing: case builders, peak-memory measurement and the ratio summary.

Every benchmark records (case, provider, mode) -> median and minimum seconds and peak bytes
in RESULTS; the terminal summary prints the ratios the engine issue tracks, and
`--bench-json PATH` writes everything as data with the command, device and commit (after
every group too, marked incomplete, so that a run cut short keeps what it measured). Ratios
use the minimum over rounds (T): on a shared or virtual machine the noise only ever adds
time. Providers that a ratio compares are timed together (`record_group`): each round runs
every provider once, in an order that rotates, so that a slow phase of the machine lands on
all of them. Timed one after another, the same ratios moved by up to 2x between two runs of
the suite on the 2-core CI machine.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
import weakref

import pytest
import torch

RESULTS: list[dict] = []


def pytest_addoption(parser):
    parser.addoption("--bench-json", default=None, help="write the results as JSON to this path")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _Saved:
    """A tensor autograd saved for backward, held through the hooks so that its release
    (the graph freeing it) can be observed."""

    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t


class PeakMemory:
    """Peak memory of a call: the CUDA allocator's peak on GPU; on CPU the peak of the bytes
    that autograd keeps alive for backward (saved tensors, counted once per storage while
    any graph holds them), which is what the naive method's nested graphs inflate. A graph
    freed inside the call (a pass whose values are kept but not its graph) stops counting
    when it is freed."""

    def __init__(self):
        self.peak = 0

    def __call__(self, fn):
        if device().type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - base
            return
        holders: dict[tuple, int] = {}
        state = {"live": 0, "peak": 0}

        def release(key, nbytes):
            holders[key] -= 1
            if not holders[key]:
                del holders[key]
                state["live"] -= nbytes

        def pack(t):
            try:
                key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
                nbytes = key[1]
            except (RuntimeError, NotImplementedError):
                key, nbytes = (id(t), 0), t.numel() * t.element_size()
            if key not in holders:
                holders[key] = 0
                state["live"] += nbytes
                state["peak"] = max(state["peak"], state["live"])
            holders[key] += 1
            held = _Saved(t)
            weakref.finalize(held, release, key, nbytes)
            return held

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda held: held.t):
            fn()
        self.peak = state["peak"]


@pytest.fixture
def record_group(benchmark, request):
    """Times the providers of one (case, mode) together: `fns` maps provider -> a call that
    runs (and synchronises) one step. Peak memory comes from one untimed call of each (also
    its warm-up); then each round runs every provider once, starting from a provider that
    rotates between rounds. A provider that runs out of GPU memory is recorded as such and
    left out."""
    def _record(case: str, mode: str, fns: dict, rounds: int = 5, **extra):
        peaks = {}
        for name, fn in fns.items():
            mem = PeakMemory()
            try:
                mem(fn)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                RESULTS.append(dict(case=case, provider=name, mode=mode, oom=True))
                continue
            peaks[name] = mem.peak
        names = list(peaks)
        times: dict[str, list[float]] = {n: [] for n in names}
        state = {"round": 0}

        def one_round():
            k = state["round"] % len(names)
            state["round"] += 1
            for n in names[k:] + names[:k]:
                t0 = time.perf_counter()
                fns[n]()
                times[n].append(time.perf_counter() - t0)

        benchmark.extra_info.update(case=case, mode=mode, providers=names, peak_bytes=peaks)
        benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=1)
        for n in names:
            # without the warm-up round; under --benchmark-disable the one call there is
            ts = times[n][1:] or times[n]
            RESULTS.append(dict(case=case, provider=n, mode=mode, peak_bytes=peaks[n],
                                median_s=statistics.median(ts), min_s=min(ts), **extra))
        path = request.config.getoption("--bench-json")
        if path:            # after every group: a run cut short keeps what it measured
            _write_json(path, complete=False)
    return _record


def _commit() -> str:
    """HEAD's short hash; FPKERN_COMMIT where the tree is a copy without .git (the GPU
    machine's, see benchmarks/gpu_run.sh)."""
    if os.environ.get("FPKERN_COMMIT"):
        return os.environ["FPKERN_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def _ratios():
    by = {(r["case"], r["provider"], r["mode"]): r for r in RESULTS if not r.get("oom")}
    T = "min_s"
    rows = []
    for (case, prov, mode), r in sorted(by.items()):
        if prov != "naive":
            continue
        for other in ("fused", "projected", "torch.func"):
            o = by.get((case, other, mode))
            if o:
                rows.append((case, mode, other, r[T] / o[T],
                             o["peak_bytes"] / max(r["peak_bytes"], 1)))
    steps = []
    for (case, prov, mode), r in sorted(by.items()):
        if mode == "train_step" and prov != "dsm":
            d = by.get((case, "dsm", "train_step"))
            n = by.get((case, "naive", "train_step"))
            if d:
                # the FP term's own cost is (step - DSM step): naive's over this provider's
                fp = (n[T] - d[T]) / max(r[T] - d[T], 1e-12) if n else float("nan")
                steps.append((case, prov, r[T] / d[T], fp))
    return rows, steps


def _bandwidth():
    """(case, provider, GB/s, fraction of the copy's GB/s) for kernel records with bytes."""
    by = {(r["case"], r["provider"]): r for r in RESULTS
          if r["mode"] == "kernel" and "bytes" in r and not r.get("oom")}
    out = []
    for (case, prov), r in sorted(by.items()):
        copy = by.get((case, "copy"))
        gbs = r["bytes"] / r["min_s"] / 1e9
        frac = gbs / (copy["bytes"] / copy["min_s"] / 1e9) if copy else float("nan")
        out.append((case, prov, gbs, frac))
    return out


def _op_vs_reference():
    """(case, mode, speed-up, memory ratio) for every (case, mode) timed with providers
    "fused" (a fused op) and "torch" (its torch reference): torch's time over fused's, fused's
    peak memory over torch's (NaN where torch's is 0)."""
    by = {(r["case"], r["provider"], r["mode"]): r for r in RESULTS if not r.get("oom")}
    out = []
    for (case, prov, mode), r in sorted(by.items()):
        ref = by.get((case, "torch", mode)) if prov == "fused" else None
        if ref:
            mem = r["peak_bytes"] / ref["peak_bytes"] if ref["peak_bytes"] else float("nan")
            out.append((case, mode, ref["min_s"] / r["min_s"], mem))
    return out


def _write_json(path: str, complete: bool) -> None:
    """RESULTS and the ratios as JSON, atomically (a temporary file renamed over `path`);
    `complete` is False while the suite still runs."""
    rows, steps = _ratios()
    data = dict(command=" ".join(sys.argv), device=_device_name(), commit=_commit(),
                torch=torch.__version__, time=time.strftime("%Y-%m-%dT%H:%M:%S"),
                complete=complete, results=RESULTS,
                ratios=[dict(case=c, mode=m, provider=p, speedup=x, memory_ratio=mm)
                        for c, m, p, x, mm in rows],
                train_step_over_dsm=[dict(case=c, provider=p, ratio=x, fp_term_speedup=fp)
                                     for c, p, x, fp in steps],
                bandwidth=[dict(case=c, provider=p, gb_per_s=g, of_copy=f)
                           for c, p, g, f in _bandwidth()],
                op_vs_reference=[dict(case=c, mode=m, speedup=x, memory_ratio=mm)
                                 for c, m, x, mm in _op_vs_reference()])
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1)
    os.replace(tmp, path)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not RESULTS:
        return
    rows, steps = _ratios()
    tr = terminalreporter
    tr.section("fpkern ratios")
    tr.write_line(f"device: {_device_name()}   commit: {_commit()}")
    tr.write_line(f"{'case':<34}{'mode':<12}{'provider':<12}{'speed-up vs naive':>18}"
                  f"{'memory / naive':>16}")
    for case, mode, prov, speed, mem in rows:
        tr.write_line(f"{case:<34}{mode:<12}{prov:<12}{speed:>17.2f}x{mem:>16.2f}")
    if steps:
        tr.write_line("")
        tr.write_line(f"{'case':<34}{'provider':<12}{'train step / DSM step':>22}"
                      f"{'FP term speed-up vs naive':>27}")
        for case, prov, ratio, fp in steps:
            tr.write_line(f"{case:<34}{prov:<12}{ratio:>21.2f}x{fp:>26.2f}x")
    kernels = _bandwidth()
    if kernels:
        tr.write_line("")
        tr.write_line(f"{'kernel case':<34}{'provider':<12}{'GB/s':>10}{'of copy bandwidth':>20}")
        for case, prov, gbs, frac in kernels:
            tr.write_line(f"{case:<34}{prov:<12}{gbs:>10.1f}{frac:>19.0%}")
    ops = _op_vs_reference()
    if ops:
        tr.write_line("")
        tr.write_line("fused op vs torch reference")
        tr.write_line(f"{'case':<46}{'mode':<10}{'speed-up vs torch':>18}{'memory / torch':>16}")
        for case, mode, speed, mem in ops:
            tr.write_line(f"{case:<46}{mode:<10}{speed:>17.2f}x{mem:>16.2f}")
    path = config.getoption("--bench-json")
    if path:
        _write_json(path, complete=True)
        tr.write_line(f"results written to {path}")
