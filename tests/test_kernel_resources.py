"""benchmarks/kernel_resources.py: the kernels the benchmark cases' train steps launch on GPU."""

from benchmarks import kernel_resources


def test_the_mlp_train_steps_run_the_whole_network_kernel():
    """On the Triton backend each MLP pass of the fused and projected steps is one
    mlp_jet launch forward and one backward: no per-op jet kernel (activation, GroupNorm)."""
    launches = kernel_resources.record(["mlp2"])
    mlp = {(s["kernel"], s["constexprs"]["R"], s["constexprs"].get("WEIGHTS"))
           for s in launches if s["module"].endswith("mlp_jet")}
    for R in (4, 5):        # laplacian: x, v, (-c, 1), collapsed; projected: x, v, u, t, (v, u)
        assert ("_mlp_jet_fwd_kernel", R, None) in mlp
        assert ("_mlp_jet_bwd_kernel", R, True) in mlp
    assert any(k == "_mlp_jet_bwd_kernel" and w is False for k, _, w in mlp), \
        "the div form's x-only value pass should skip the weight gradients"
    others = {s["module"] for s in launches} - {"fpkern.kernels.mlp_jet",
                                                 "fpkern.kernels.laplacian_terms",
                                                 "fpkern.kernels.hutchinson_reduce",
                                                 "fpkern.kernels.fpe_combine"}
    assert not others, f"per-op jet kernels launched for an MLP: {others}"


def test_rows_name_the_kernel_and_its_resources():
    spec = {"module": "fpkern.kernels.laplacian_terms", "kernel": "_fwd_kernel", "options": {},
            "constexprs": {"M_IS_2": True, "UPCAST": False, "BLOCK": 64}}
    row = kernel_resources._row({"spec": spec, "shared": 8, "registers": 32, "spill": 0})
    assert row.startswith("laplacian_terms._fwd_kernel") and "UPCAST=0 BLOCK=64" in row
    assert row.split()[-4:] == ["4", "32", "0", "8"]
    failed = kernel_resources._row({"spec": spec, "error": "Traceback ...\nValueError: bad"})
    assert failed.endswith("FAILED: ValueError: bad")
