"""fpkern.jet stands below fpkern.ops and fpkern.models: importing it, or any of its fused
ops, in a fresh interpreter loads neither of them (nor triton), lazily or not."""

import subprocess
import sys

import pytest

FUSED = ["eager", "jet_act", "group_norm_jet", "group_norm_act", "mlp_rows", "mlp_jet",
         "mlp_jet_cpu"]
ABOVE = ("fpkern.ops", "fpkern.models", "triton")


def _loaded_after(code: str) -> list[str]:
    """The modules of ABOVE in sys.modules after running `code` in a fresh interpreter."""
    probe = (f"import sys\n{code}\n"
             f"print(sorted(m for m in sys.modules if m.split('.')[0] == 'triton' or "
             f"any(m == a or m.startswith(a + '.') for a in {ABOVE!r})))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True)
    return eval(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("code", [
    "import fpkern.jet",
    "import fpkern.jet; from fpkern.jet import register_rule, Jet, Layout",
    "\n".join(f"import fpkern.jet.fused.{name}" for name in FUSED),
], ids=["jet", "jet-api", "jet-fused-ops"])
def test_jet_imports_nothing_above_it(code):
    assert _loaded_after(code) == []


def test_a_jet_pass_through_the_fused_rules_imports_nothing_above_jet():
    """Running the per-op fused rules (activation, GroupNorm) on Jets, which imports the
    fused ops on first use, still loads no higher layer."""
    code = ("import torch, torch.nn.functional as F\n"
            "from fpkern.jet import Jet, Layout\n"
            "L = Layout(n1=2, collapse=(1, 2))\n"
            "x = Jet(torch.randn(L.rows, 3, 4, 5), L)\n"
            "F.silu(F.group_norm(x, 2)).rows.sum()")
    assert _loaded_after(code) == []


def test_the_mlp_rule_is_registered_by_the_model_module():
    """The whole-MLP rule comes with fpkern.models.mlp, through the jet package's registry."""
    code = ("from fpkern.jet.rules import HANDLERS\n"
            "from fpkern.models.mlp import mlp_forward\n"
            "assert mlp_forward in HANDLERS, 'no jet rule for mlp_forward'")
    assert "fpkern.models.mlp" in _loaded_after(code)


def test_register_rule_checks_its_arguments():
    from fpkern.jet import register_rule
    with pytest.raises(TypeError, match="two callables"):
        register_rule("not a function", lambda f, a, k: None)
