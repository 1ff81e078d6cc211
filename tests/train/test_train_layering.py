"""The training package sits below the sample/evaluate commands, and the PNG writers below
everything: no import of theirs points back up, lazily or not."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "fpkern"


def _fpkern_imports(path: Path) -> set[str]:
    """Every fpkern module a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fpkern"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("fpkern"))
    return found


def test_train_imports_no_command_module():
    for path in sorted((PKG / "train").glob("*.py")):
        up = {m for m in _fpkern_imports(path) if m in ("fpkern.sample", "fpkern.evaluate")}
        assert not up, f"{path.name} imports {sorted(up)}"


def test_plots_and_the_model_builder_stay_low():
    assert _fpkern_imports(PKG / "plots.py") == set()
    build = _fpkern_imports(PKG / "models" / "build.py")
    assert not {m for m in build if m.startswith(("fpkern.train", "fpkern.sample"))}, build
