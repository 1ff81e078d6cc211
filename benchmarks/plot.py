"""Plot one benchmark run (a `--bench-json` file) against the engine issue's targets.

    python -m benchmarks.plot benchmarks/results/<run>.json [-o <run>.png]

Three panels, one group of bars per case (K = 1): the training step over a DSM step (target:
at most 3x), the FP term's speed-up over naive (targets: 4x for the laplacian form and the
div-form loss, 2x for the div-form vector residual) and the train step's peak memory over
naive's (target: at most 0.5). The providers are naive, fused and projected.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PROVIDERS = ("naive", "fused", "projected")
COLORS = {"naive": "#9e9e9e", "fused": "#1f77b4", "projected": "#ff7f0e"}


def _series(run: dict):
    """{case: {provider: (step / DSM, FP speed-up, memory / naive)}} for the train steps
    (NaN where a run predates a quantity)."""
    steps = {(r["case"], r["provider"]): r for r in run["train_step_over_dsm"]}
    memory = {(r["case"], r["provider"]): r["memory_ratio"] for r in run["ratios"]
              if r["mode"] == "train_step"}
    out: dict[str, dict[str, tuple[float, float, float]]] = {}
    for (case, prov), r in sorted(steps.items()):
        if prov in PROVIDERS:
            mem = 1.0 if prov == "naive" else memory.get((case, prov), float("nan"))
            fp = r.get("fp_term_speedup", float("nan"))
            out.setdefault(case, {})[prov] = (r["ratio"], fp, mem)
    return out


def plot(run: dict, path: Path) -> None:
    series = _series(run)
    cases = list(series)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    width = 0.8 / len(PROVIDERS)
    panels = [("train step / DSM step", 0, [(3.0, "target 3x")]),
              ("FP term speed-up vs naive", 1,
               [(4.0, "target 4x"), (2.0, "target 2x (div vector)")]),
              ("peak memory / naive (train step)", 2, [(0.5, "target 0.5")])]
    for title, k, targets in panels:
        ax = axes[k]
        for j, prov in enumerate(PROVIDERS):
            xs = [i + (j - 1) * width for i, c in enumerate(cases) if prov in series[c]]
            ys = [series[c][prov][k] for c in cases if prov in series[c]]
            ax.bar(xs, ys, width, label=prov, color=COLORS[prov])
        for value, label in targets:
            ax.axhline(value, color="k", lw=0.8, ls="--")
            ax.text(0.01, value, label, transform=ax.get_yaxis_transform(), ha="left",
                    va="bottom", fontsize=8)
        ax.set_xticks(range(len(cases)), [c.replace("/K1", "") for c in cases], rotation=30,
                      ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{run['device']}, commit {run['commit']}, torch {run['torch']}", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a --bench-json file")
    parser.add_argument("-o", "--out", type=Path, help="the PNG (default: beside the JSON)")
    args = parser.parse_args(argv)
    run = json.loads(args.run.read_text())
    if not run.get("train_step_over_dsm"):
        parser.error(f"{args.run} has no train-step results to plot")
    out = args.out or args.run.with_suffix(".png")
    plot(run, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
