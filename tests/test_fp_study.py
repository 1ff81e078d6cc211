"""Smoke test of experiments/fp_study.py: tiny settings, outputs written, numbers finite."""

import json
import math

import pytest


@pytest.fixture(scope="module")
def fp_study(experiment):
    return experiment("fp_study")


def _numbers(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield float(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)


def test_fp_study_tiny(fp_study, tmp_path):
    out = tmp_path / "res"
    res = fp_study.main(["--pretrain-steps", "5", "--steps", "4", "--seeds", "1",
                         "--alphas", "0", "0.15", "--datasets", "mixture", "--out", str(out), "--n-nll", "8",
                         "--n-prof", "8", "--n-samples", "64", "--sde-steps", "10",
                         "--eval-probes", "2", "--ode-tol", "1e-2"])
    for name in ("fp_study.json", "fp_study.md", "fp_study.png"):
        assert (out / name).stat().st_size > 0, name
    data = json.loads((out / "fp_study.json").read_text())
    assert data["command"].startswith("python experiments/fp_study.py")
    assert data["git_commit"] and data["machine"]["cpu_count"]
    runs = data["datasets"]["mixture"]["runs"]
    assert [r["alpha"] for r in runs] == [0.0, 0.15]
    assert runs[0]["beta"] == 0.0 and runs[1]["beta"] == 0.01
    nums = list(_numbers(data["datasets"]))
    assert nums and all(math.isfinite(v) for v in nums)
    # the oracle: the true mixture score satisfies the score FPE to rounding
    assert data["datasets"]["mixture"]["oracle"]["residual_rel_mean"]["div"] < 1e-10
    assert res["datasets"]["mixture"]["summary"]["0.15"]["nll"]["mean"] == pytest.approx(
        runs[1]["nll"])
    assert "| 0.15 |" in (out / "fp_study.md").read_text()
