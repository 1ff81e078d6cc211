"""Issue 16: torchdiffeq's dopri5 against fpkern's RK45 on the problems of the tests.

    python experiments/ode_solver.py [--repeats 5] [--threads 1] [--out DIR]

Every problem has an exact answer to measure the error against (docs/MATH.md 6, the mixture oracle):

- ``flow/<sde>/mix2``: the probability-flow ODE dx/dt = f x - 1/2 g^2 s from T to eps = 1e-3
  with the mixture's exact score (tests/test_sampling.py: two components in 2-D, N = 1200
  prior draws, rtol = atol = 1e-5). The flow of a mixture has no closed form, so the answer
  is a float64 dopri8 solve at rtol = atol = 1e-12. Error: max |x - x_ref|.
- ``flow/vp/gauss12``: the same for one Gaussian N(0, 0.5^2 I) in 12-D, whose flow is the
  affine map x_t = sqrt(v_t / v_T) x_T with v_t = alpha_t^2 0.25 + sigma_t^2 (exact).
- ``logp/<sde>/mix2`` and ``logp/vp/gauss12``: the likelihood's augmented state (x, delta)
  from eps = 1e-5 to T with the exact divergence (tests/test_likelihood.py: B = 16,
  rtol = atol = 1e-6). Error: max |delta + log q_T(z) - log q_eps(x)|, which removes the prior
  mismatch and leaves the solver's error (the test's own check).
- ``scalar``: dy/dt = -cos(t) y from 0 to 5 (rtol 1e-8, atol 1e-10), y(5) = exp(-sin 5).

Each in float64 and float32 (the state's dtype; times stay float64). Providers: ``rk45``
fpkern's solver (``fpkern.sampling.odeint_rk45``, Dormand-Prince 5(4) with scipy's step
controller), ``scipy`` scipy.integrate.solve_ivp's RK45 (the controller ``rk45`` follows:
the NFE must agree), ``dopri5`` torchdiffeq.odeint's Dormand-Prince 5(4) with float64 times.
For the likelihood, ``dopri5`` integrates (x, delta) as a tuple (torchdiffeq's mixed norm:
the larger of the two RMS errors) and ``dopri5-flat`` as one concatenated tensor (one RMS
over both, as ``rk45``). Wall time: the median of --repeats runs on --threads torch threads,
and the part of it spent outside the right-hand side (the solver's own cost). Writes
ode_solver.json and ode_solver.md to --out; the reading is in experiments/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import git, machine  # noqa: E402

from fpkern.data.mixture import GaussianMixture  # noqa: E402
from fpkern.sampling import odeint_rk45  # noqa: E402
from fpkern.sde import SubVPSDE, VESDE, VPSDE  # noqa: E402

SDES = {"vp": VPSDE, "ve": VESDE, "subvp": SubVPSDE}
MIX2 = GaussianMixture([0.3, 0.7], [[-1.5, 0.5], [1.0, -0.5]], [0.3, 0.5]).to(dtype=torch.float64)
GAUSS12 = GaussianMixture([1.0], torch.zeros(1, 12, dtype=torch.float64), [0.5])


# ---- solvers: each solve(func, y0, t0, t1, rtol, atol, tuple_state) -> (y1, nfe) -----------
# func(t: float, y) -> dy/dt; for the likelihood y is [B, D + 1] (x and delta side by side).
def _rk45_solve(func, y0, t0, t1, rtol, atol, tuple_state=False):
    res = odeint_rk45(func, y0, t0, t1, rtol=rtol, atol=atol)
    return res.y, res.nfe


def _scipy_solve(func, y0, t0, t1, rtol, atol, tuple_state=False):
    from scipy.integrate import solve_ivp

    def f(t, y):
        yt = torch.from_numpy(y).to(y0.dtype).reshape(y0.shape)
        return func(t, yt).double().numpy().ravel()

    r = solve_ivp(f, (t0, t1), y0.double().numpy().ravel(), method="RK45", rtol=rtol, atol=atol)
    if not r.success:
        raise RuntimeError(r.message)
    return torch.from_numpy(r.y[:, -1]).to(y0.dtype).reshape(y0.shape), r.nfev


class _Counted:
    """func(t: 0-d tensor, y) for torchdiffeq, counting its evaluations."""

    def __init__(self, func, tuple_state):
        self.func, self.tuple_state, self.nfe = func, tuple_state, 0

    def __call__(self, t, y):
        self.nfe += 1
        if not self.tuple_state:
            return self.func(float(t), y)
        out = self.func(float(t), torch.cat([y[0], y[1][:, None]], dim=1))
        return out[:, :-1], out[:, -1]


def _dopri5_solve(func, y0, t0, t1, rtol, atol, tuple_state=False):
    """torchdiffeq.odeint (dopri5, float64 times); the likelihood's (x, delta) as a tuple
    when tuple_state (torchdiffeq's mixed norm), else as one tensor (one RMS norm)."""
    from torchdiffeq import odeint

    counted = _Counted(func, tuple_state)
    t = torch.tensor([t0, t1], dtype=torch.float64)
    state = (y0[:, :-1], y0[:, -1]) if tuple_state else y0
    y = odeint(counted, state, t, rtol=rtol, atol=atol, method="dopri5")
    y1 = torch.cat([y[0][-1], y[1][-1][:, None]], dim=1) if tuple_state else y[-1]
    return y1, counted.nfe


PROVIDERS = {"rk45": _rk45_solve, "scipy": _scipy_solve, "dopri5": _dopri5_solve}


# ---- problems: (func, y0, t0, t1, rtol, atol, error(y1) -> float, likelihood?) -------------
def _flow_problem(gm, sde, dtype, n, exact_affine):
    score = gm.score_fn(sde)
    x_T = sde.prior_std * torch.randn(n, gm.dim, generator=torch.Generator().manual_seed(11),
                                      dtype=torch.float64)

    def func(t, y):
        tv = torch.full((y.shape[0],), t, dtype=y.dtype)
        return sde.f(tv)[:, None] * y - 0.5 * sde.g2(tv)[:, None] * score(y, tv)

    T, eps = sde.T, 1e-3
    if exact_affine:   # one Gaussian N(0, s0^2 I): x_t = sqrt(v_t / v_T) x_T
        def var(t):
            tt = torch.tensor([t], dtype=torch.float64)
            return float(sde.alpha(tt) ** 2 * gm.stds[0] ** 2 + sde.sigma2(tt))
        ref = math.sqrt(var(eps) / var(T)) * x_T
    else:
        ref = _dopri8_reference(func, x_T, T, eps)
    return (func, x_T.to(dtype), T, eps, 1e-5, 1e-5,
            lambda y: float((y.double() - ref).abs().max()), False)


def _dopri8_reference(func, y0, t0, t1):
    from torchdiffeq import odeint
    t = torch.tensor([t0, t1], dtype=torch.float64)
    return odeint(lambda tt, y: func(float(tt), y), y0, t, rtol=1e-12, atol=1e-12,
                  method="dopri8")[-1]


def _divergence(score, x, t):
    """Exact div_x s per sample, one reverse pass per dimension (D is small here)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        s = score(x, t)
        return sum(torch.autograd.grad(s[:, i].sum(), x, retain_graph=True)[0][:, i]
                   for i in range(x.shape[1]))


def _logp_problem(gm, sde, dtype, b):
    score = gm.score_fn(sde)
    x = gm.sample(b, generator=torch.Generator().manual_seed(5)).to(dtype)
    D, eps = gm.dim, 1e-5

    def func(t, y):
        xt = y[:, :D]
        tv = torch.full((y.shape[0],), t, dtype=y.dtype)
        f, g2 = sde.f(tv), sde.g2(tv)
        dx = f[:, None] * xt - 0.5 * g2[:, None] * score(xt, tv)
        ddelta = D * f - 0.5 * g2 * _divergence(score, xt, tv)
        return torch.cat([dx, ddelta[:, None]], dim=1)

    teps = torch.full((b,), eps, dtype=torch.float64)
    target = gm.log_prob(x.double(), teps, sde)

    def error(y):
        tT = torch.full((b,), sde.T, dtype=torch.float64)
        y = y.double()
        return float((y[:, D] + gm.log_prob(y[:, :D], tT, sde) - target).abs().max())

    y0 = torch.cat([x, x.new_zeros(b, 1)], dim=1)
    return func, y0, eps, sde.T, 1e-6, 1e-6, error, True


def _scalar_problem(dtype):
    exact = math.exp(-math.sin(5.0))
    return (lambda t, y: -math.cos(t) * y, torch.ones(3, dtype=dtype), 0.0, 5.0, 1e-8, 1e-10,
            lambda y: float((y.double() - exact).abs().max()), False)


def problems(dtype) -> dict:
    """Problem name -> a function building it (built on use: the dopri8 references cost)."""
    out = {f"flow/{k}/mix2": (lambda S=S: _flow_problem(MIX2, S(), dtype, 1200, False))
           for k, S in SDES.items()}
    out["flow/vp/gauss12"] = lambda: _flow_problem(GAUSS12, VPSDE(), dtype, 1200, True)
    out.update({f"logp/{k}/mix2": (lambda S=S: _logp_problem(MIX2, S(), dtype, 16))
                for k, S in SDES.items()})
    out["logp/vp/gauss12"] = lambda: _logp_problem(GAUSS12, VPSDE(), dtype, 16)
    out["scalar"] = lambda: _scalar_problem(dtype)
    return out


# ---- measurement ---------------------------------------------------------------------------
def measure(solve, problem, repeats, tuple_state=False):
    """NFE, error and the median wall time, split into the right-hand side's share and the
    solver's own (step control, stage sums, interpolation: all that is not func)."""
    func, y0, t0, t1, rtol, atol, error, _ = problem
    totals, in_rhs = [], []
    for _ in range(repeats):
        spent = [0.0]

        def timed(t, y):
            start = time.perf_counter()
            out = func(t, y)
            spent[0] += time.perf_counter() - start
            return out

        start = time.perf_counter()
        with torch.no_grad():
            y1, nfe = solve(timed, y0, t0, t1, rtol, atol, tuple_state=tuple_state)
        totals.append(time.perf_counter() - start)
        in_rhs.append(spent[0])
    total, rhs = statistics.median(totals), statistics.median(in_rhs)
    return {"nfe": int(nfe), "error": error(y1), "time_ms": 1e3 * total,
            "solver_ms": 1e3 * (total - rhs)}


def run(args) -> list[dict]:
    rows = []
    for dtype in (torch.float64, torch.float32):
        for name, build in problems(dtype).items():
            if args.only and args.only not in name:
                continue
            prob = build()
            for pname, solve in PROVIDERS.items():
                variants = [(pname, False)]
                if pname == "dopri5" and prob[-1]:
                    variants = [("dopri5", True), ("dopri5-flat", False)]
                for label, tup in variants:
                    r = measure(solve, prob, args.repeats, tuple_state=tup)
                    rows.append({"problem": name, "dtype": str(dtype).split(".")[-1],
                                 "provider": label, **r})
                    print(f"{name:18s} {rows[-1]['dtype']:8s} {label:12s} nfe {r['nfe']:5d} "
                          f"err {r['error']:.2e} {r['time_ms']:8.1f} ms "
                          f"(solver {r['solver_ms']:.1f})", flush=True)
    return rows


def to_markdown(rows, header) -> str:
    lines = [header, "",
             "| problem | dtype | provider | NFE | max error | time ms | solver's own ms |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['problem']} | {r['dtype']} | {r['provider']} | {r['nfe']} | "
                     f"{r['error']:.2e} | {r['time_ms']:.1f} | {r['solver_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per (problem, provider)")
    p.add_argument("--only", default="", help="run the problems whose name contains this")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    info = {"command": shlex.join(["python", "experiments/ode_solver.py", *argv]),
            "commit": git("rev-parse", "--short", "HEAD"),
            "dirty": bool(git("status", "--porcelain")), "machine": machine()}
    try:
        rows = run(args)
    finally:
        torch.set_num_threads(threads)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ode_solver.json").write_text(json.dumps({**info, "rows": rows}, indent=1))
    header = (f"`{info['command']}` at {info['commit']}{' (dirty)' if info['dirty'] else ''}, "
              f"{info['machine']['summary']}")
    (args.out / "ode_solver.md").write_text(to_markdown(rows, header))
    return rows


if __name__ == "__main__":
    main()
