"""benchmarks/conftest.py's --bench-json: written after every group (marked incomplete) and
at the end (complete), atomically, so that a run cut short keeps what it measured."""

import json
import os
import subprocess
import sys
from pathlib import Path

import benchmarks.conftest as bc

ROOT = Path(__file__).resolve().parents[1]


def test_json_written_during_and_at_the_end_of_a_run(tmp_path):
    """Two groups of the cheapest benchmark (the laplacian_terms kernel's bandwidth): a file
    written after the first group holds one group's records, marked incomplete; the final
    file holds both, complete, with their bandwidths and fused-op-over-torch ratios."""
    path = tmp_path / "run.json"
    plugin = tmp_path / "snap_plugin.py"
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    plugin.write_text(
        "import shutil, pathlib\n"
        "def pytest_runtest_teardown(item):\n"
        f"    src = pathlib.Path({str(path)!r})\n"
        "    if src.exists():\n"
        f"        shutil.copy(src, pathlib.Path({str(snaps)!r}) / (item.name + '.json'))\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/bench_laplacian_terms.py", "-k",
         "bandwidth", "--benchmark-only", "-q", "-p", "no:cacheprovider", "-p", "snap_plugin",
         "--bench-json", str(path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    first = json.loads((snaps / "test_laplacian_terms_bandwidth[cifar_b128].json").read_text())
    assert first["complete"] is False
    assert {r["case"] for r in first["results"]} == {"laplacian_terms/cifar_b128"}
    final = json.loads(path.read_text())
    assert final["complete"] is True
    cases = {"laplacian_terms/cifar_b128", "laplacian_terms/cifar_b1024"}
    assert {r["case"] for r in final["results"]} == cases
    assert {b["case"] for b in final["bandwidth"]} == cases
    assert {(o["case"], o["mode"]) for o in final["op_vs_reference"]} == \
        {(c, "kernel") for c in cases}
    assert "fused op vs torch reference" in res.stdout
    assert not list(tmp_path.glob("*.tmp"))


def test_write_replaces_the_file_whole(tmp_path, monkeypatch):
    """The file is replaced by a rename: a reader never sees a half-written one."""
    path = tmp_path / "run.json"
    path.write_text("old")
    monkeypatch.setattr(bc, "RESULTS", [dict(case="c", provider="naive", mode="fwd",
                                             peak_bytes=2, median_s=2.0, min_s=2.0),
                                        dict(case="c", provider="fused", mode="fwd",
                                             peak_bytes=1, median_s=1.0, min_s=0.5)])
    replaced = []
    real = os.replace
    monkeypatch.setattr(bc.os, "replace", lambda a, b: (replaced.append((a, b)), real(a, b)))
    bc._write_json(str(path), complete=False)
    data = json.loads(path.read_text())
    assert replaced == [(f"{path}.tmp", str(path))]
    assert data["complete"] is False and len(data["results"]) == 2
    assert data["ratios"] == [dict(case="c", mode="fwd", provider="fused", speedup=4.0,
                                   memory_ratio=0.5)]
    assert data["op_vs_reference"] == []            # no "torch" provider here


def test_op_vs_reference_pairs_fused_with_torch(monkeypatch):
    """Every (case, mode) with a "fused" and a "torch" record gives torch's time over fused's
    and fused's peak memory over torch's; a case without both gives nothing."""
    def rec(case, provider, mode, min_s, peak):
        return dict(case=case, provider=provider, mode=mode, peak_bytes=peak, median_s=min_s,
                    min_s=min_s)

    monkeypatch.setattr(bc, "RESULTS", [rec("op/a", "fused", "fwd", 1.0, 2),
                                        rec("op/a", "torch", "fwd", 3.0, 8),
                                        rec("op/a", "fused", "fwdbwd", 2.0, 4),
                                        rec("op/a", "torch", "fwdbwd", 1.0, 0),
                                        rec("op/b", "fused", "fwd", 1.0, 1),
                                        rec("op/b", "naive", "fwd", 2.0, 1)])
    rows = bc._op_vs_reference()
    assert rows[0] == ("op/a", "fwd", 3.0, 0.25)
    assert rows[1][:3] == ("op/a", "fwdbwd", 0.5) and rows[1][3] != rows[1][3]   # NaN
    assert len(rows) == 2
