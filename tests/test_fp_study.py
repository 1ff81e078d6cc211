"""experiments/fp_study.py (study v2): the --quick run end to end, and its building blocks.

The quick run (2 data sets x 2 seeds x 8 configs, tiny sizes, one process) takes about 35 s
on one CPU thread; it concludes nothing and says so.
"""

import argparse
import json
import math

import pytest
import torch


@pytest.fixture(scope="module")
def fp_study(experiment):
    return experiment("fp_study")


@pytest.fixture(scope="module")
def quick(fp_study, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp_study_quick")
    res = fp_study.main(["--quick", "--threads", "1", "--out", str(out)])
    return out, res


def _numbers(obj):
    if isinstance(obj, bool) or obj is None:
        return
    if isinstance(obj, (int, float)):
        yield float(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)


def test_quick_outputs(fp_study, quick):
    out, _ = quick
    for name in ("fp_study.json", "fp_study.md", "fp_study.png"):
        assert (out / name).stat().st_size > 0, name
    assert not (out / "fp_study_digits.png").exists()          # no images in --quick
    data = json.loads((out / "fp_study.json").read_text())
    md = (out / "fp_study.md").read_text()
    assert data["quick"] is True and data["label"] == fp_study.QUICK_LABEL
    assert fp_study.QUICK_LABEL in md
    assert data["command"].startswith("python experiments/fp_study.py --quick")
    assert data["git_commit"] and data["machine"]["cpu_count"]
    assert data["total_s"] > 0 and data["phase_worker_s"]["finetune"] > 0
    assert {"pretrain", "eval", "finetune", "equal_time"} <= set(data["phase_worker_s"])
    assert data["estimate"]["wall_s"] > 0
    assert data["verdict"] and "## Verdict" in md
    nums = list(_numbers(data["summary"])) + list(_numbers(data["tasks"]))
    assert nums and all(math.isfinite(v) for v in nums)


def test_quick_paired_cis(fp_study, quick):
    """Every config has, for every metric, a paired difference with a CI over both seeds, at
    equal steps and (FP configs) at equal wall-clock."""
    out, _ = quick
    data = json.loads((out / "fp_study.json").read_text())
    keys = [c["key"] for c in data["configs"]]
    assert keys[0] == "dsm" and len(keys) == 8
    assert {"div:0.001", "laplacian:0.1", "scalar_paper", "scalar_consistent", "paper"} <= set(keys)
    assert set(data["summary"]) == {"mix2", "gmm8"}
    for name, s in data["summary"].items():
        assert s["seeds"] == [0, 1]
        for key in keys:
            for m, (_, kind) in fp_study.METRICS.items():
                e = s["equal_steps"][key][m]
                for field in ("mean", "ci", "lo", "hi", "n"):
                    assert e["diff"][field] is not None, (name, key, m, field)
                assert e["diff"]["n"] == 2 and e["abs"]["n"] == 2
                assert math.isclose(e["diff"]["lo"], e["diff"]["mean"] - e["diff"]["ci"])
                if kind == "log":
                    assert e["log10_ratio"]["n"] == 2
            if key == "dsm":    # the baseline against itself
                assert s["equal_steps"][key]["nll_excess"]["diff"]["mean"] == 0
                continue
            eq = s["equal_time"][key]
            assert eq["nll_excess"]["diff"]["n"] == 2 and eq["dsm_steps"]["mean"] >= 20
        for form in ("div", "laplacian"):
            assert s["alpha_slopes"][form]["log10_gap"]["n"] == 2
        # the true mixture score through the same pipeline: the residual vanishes
        assert s["oracle"]["res_div"] < 1e-10
    for t in data["tasks"]:
        p = t["pretrain"]
        assert p["curve"] and p["converged"] != p["cap_hit"] and p["steps"] <= 80
        assert t["equal_time"]["matched"] and "20" in t["equal_time"]["dsm_runs"]
    md = (out / "fp_study.md").read_text()
    assert "| div:0.001 |" in md and "Equal wall-clock" in md and "Convergence" in md


def test_converged_at(fp_study):
    flat = [(100 * (i + 1), 1.0) for i in range(6)]
    assert fp_study.converged_at(flat, window=2, rtol=1e-3, min_step=0) == 2
    assert fp_study.converged_at(flat, window=2, rtol=1e-3, min_step=450) == 4
    falling = [(i, 1.0 - 0.01 * i) for i in range(10)]       # 1% per evaluation
    assert fp_study.converged_at(falling, window=3, rtol=2.5e-3, min_step=0) is None
    assert fp_study.converged_at(falling, window=3, rtol=0.05, min_step=0) == 3


def test_default_grid(fp_study):
    args = fp_study.parse_args(["--out", "/nonexistent"])
    assert args.seeds >= 5 and not args.quick and args.images
    assert math.log10(max(args.alphas) / min(args.alphas)) >= 5 and len(args.alphas) >= 6
    cfgs = fp_study.make_configs(args)
    keys = [c.key for c in cfgs]
    assert keys[0] == "dsm" and len(keys) == 1 + 2 * len(args.alphas) + 3
    paper = cfgs[-1]
    assert (paper.alpha, paper.beta, paper.normalize, paper.scalar) == (0.15, 0.01, "paper", "paper")
    assert paper.alpha_dim(32) == pytest.approx(0.15 / 32)
    est = fp_study.estimate_seconds(args)
    assert 0 < est["wall_s"] < 90 * 60


def test_streams_do_not_depend_on_the_loss(fp_study):
    """The DSM noise generator is consumed the same way whatever the FP terms: configs see the
    same (t, z) stream."""
    from fpkern.losses import DSMLoss
    from fpkern.models import MLP, ScoreFn
    from fpkern.sde import VPSDE

    sde = VPSDE()
    torch.manual_seed(0)
    score = ScoreFn(MLP(2, 16, 2), sde)
    args = argparse.Namespace(fp_probes=1, fp_batch=4)
    x = torch.randn(8, 2)
    states = []
    for cfg in (fp_study.Config("a", "", 0.0, 0.0, "div", "paper", "dim"),
                fp_study.Config("b", "", 1e-2, 0.0, "div", "paper", "dim"),
                fp_study.Config("c", "", 1e-2, 0.0, "laplacian", "paper", "dim"),
                fp_study.Config("d", "", 0.0, 1.0, "div", "consistent", "dim")):
        g_dsm, g_fp = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
        loss = fp_study.step_loss(score, x, DSMLoss(sde), cfg.fp(sde, args), g_dsm, g_fp)
        assert torch.isfinite(loss)
        states.append(g_dsm.get_state())
    assert all(torch.equal(states[0], s) for s in states[1:])


def test_version1_helpers_kept(fp_study):
    """experiments/density_likelihood.py imports these."""
    assert fp_study.ring_mixture().dim == 2
    assert callable(fp_study.train)
