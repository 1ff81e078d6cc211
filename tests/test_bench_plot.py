"""benchmarks/plot.py draws a committed benchmark run and refuses a file without one."""

import json
import math
from pathlib import Path

import pytest

from benchmarks import plot

RUNS = sorted(Path(__file__).resolve().parents[1].glob("benchmarks/results/*.json"))


@pytest.mark.parametrize("path", RUNS, ids=[p.stem for p in RUNS])
def test_plots_every_committed_run(path, tmp_path):
    run = json.loads(path.read_text())
    series = plot._series(run)
    assert series and all("naive" in provs for provs in series.values())
    for provs in series.values():          # naive is its own reference
        assert provs["naive"][2] == 1.0
        fp = provs["naive"][1]              # NaN in runs that predate the FP-term ratio
        assert math.isnan(fp) or fp == pytest.approx(1.0)
    out = tmp_path / "run.png"
    plot.main([str(path), "-o", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_without_train_steps_is_refused(tmp_path):
    path = tmp_path / "kernels_only.json"
    path.write_text(json.dumps({"train_step_over_dsm": [], "ratios": []}))
    with pytest.raises(SystemExit):
        plot.main([str(path)])
