"""The architecture the layout promises: codi_attn never imports cards (cards draw on codi_attn, not the other
way round), and the demo model's code stays in codi_attn/demo (the analysis modules do not import it)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "codi_attn"


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_codi_attn_never_imports_cards():
    offenders = {str(p.relative_to(PACKAGE)): sorted(m for m in imported_modules(p) if m.split(".")[0] == "cards")
                 for p in PACKAGE.rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_analysis_modules_leave_the_demo_alone():
    """Only data.py (the records of --dataset synthetic) and patching.py (their exact chains, for counterfactuals
    and pairs) read the demo task, lazily; nothing else outside demo/ imports it."""
    users = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if "demo" not in p.parts
             and any(m.startswith("codi_attn.demo") for m in imported_modules(p))}
    assert users == {"data.py", "patching.py"}
