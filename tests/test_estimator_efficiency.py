"""experiments/estimator_efficiency.py at tiny settings: outputs, finiteness, and the check
that the vector and projected estimators estimate the same loss."""

import json
import math

import pytest


@pytest.fixture(scope="module")
def ee(experiment):
    return experiment("estimator_efficiency")


def test_tiny_run_writes_consistent_numbers(ee, tmp_path):
    res = ee.main(["--cases", "mlp", "--draws", "40", "--mlp-steps", "30", "--mlp-batch", "64",
                   "--mlp-fp-batch", "16", "--out", str(tmp_path)])
    for suffix in ("json", "md", "png"):
        assert (tmp_path / f"estimator_efficiency.{suffix}").stat().st_size > 0
    case = json.loads((tmp_path / "estimator_efficiency.json").read_text())["cases"]["mlp2"]
    assert case == json.loads(json.dumps(res["cases"]["mlp2"]))
    assert set(case["estimators"]) == {e[0] for e in ee.ESTIMATORS}
    for st in list(case["estimators"].values()) + [case["dsm"]]:
        assert st["draws"] == 40
        for key in ("loss_mean", "loss_se", "grad_tr_cov", "rel_var", "ms", "cost"):
            assert math.isfinite(st[key]) and st[key] >= 0, key
        assert st["rel_var"] > 0                      # the draws differ: fresh probes each
    # (u . r)^2 and |r|^2 with the same probes' distribution: the same expected loss
    assert case["same_quantity"]["consistent"], case["same_quantity"]
    vec, proj = (case["estimators"][k] for k in ee.SAME_QUANTITY)
    assert abs(vec["loss_mean"] - proj["loss_mean"]) <= 3 * math.hypot(vec["loss_se"],
                                                                        proj["loss_se"])


def test_draw_counts_below_two_are_refused(ee):
    with pytest.raises(SystemExit):
        ee.parse_args(["--draws", "1"])
