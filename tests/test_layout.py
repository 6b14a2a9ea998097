"""The architecture the layout promises: codi_attn never imports cards (cards draw on codi_attn, not the other
way round), the demo model's code stays in codi_attn/demo (the analysis modules do not import it), and the
analyses' plans, joins and reports (heads, contents, validate, patching, probes) stay apart from their runs on the
model (the *_run modules), so that the flow's model-free steps and a notebook reading the reports need no PyTorch."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "codi_attn"
FLOW_FILE = ROOT / "flows" / "attention_flow.py"


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


def step_imports() -> dict[str, list[str]]:
    """The flow's steps without @resources (the model-free ones): step -> the `from M import N` lines in its body
    and in the flow's helpers it calls (self._name(...))."""
    flow = ast.parse(FLOW_FILE.read_text())
    spec = next(n for n in flow.body if isinstance(n, ast.ClassDef) and n.name == "AttentionFlow")
    methods = {f.name: f for f in spec.body if isinstance(f, ast.FunctionDef)}

    def imports(f: ast.FunctionDef, seen: set[str]) -> list[str]:
        out = [f"from {n.module} import {', '.join(a.name for a in n.names)}" for n in ast.walk(f)
               if isinstance(n, ast.ImportFrom)]
        for n in ast.walk(f):
            if (isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self"
                    and n.attr.startswith("_") and n.attr in methods and n.attr not in seen):
                seen.add(n.attr)
                out += imports(methods[n.attr], seen)
        return out

    def is_step(f: ast.FunctionDef) -> bool:
        return any(getattr(d, "id", None) == "step" for d in f.decorator_list)

    def needs_model(f: ast.FunctionDef) -> bool:
        return any(isinstance(d, ast.Call) and getattr(d.func, "id", None) == "resources" for d in f.decorator_list)

    return {name: imports(f, set()) for name, f in methods.items() if is_step(f) and not needs_model(f)}


def test_model_free_steps_and_report_readers_never_load_torch():
    """Every step without @resources but start imports what it imports without loading PyTorch, transformers or
    scikit-learn (on 2 cores PyTorch and transformers are ~2 s of each such task), and a notebook can unpickle the
    reports (CausalReport, ThoughtReport, ValidationResult and the plans and parts the joins read) from
    codi_attn.heads / contents / validate alone."""
    steps = step_imports()
    del steps["start"]  # it checks --device (cuda present?) with PyTorch, before any work
    assert {"metrics", "join_scan", "plan_held_out", "join_heads", "plan_thoughts", "join_thoughts",
            "plan_validation", "validate_heads", "compare", "end"} <= set(steps)
    lines = sorted({line for body in steps.values() for line in body})
    code = "\n".join(["import sys", *lines, "import codi_attn.heads, codi_attn.contents, codi_attn.validate",
                      "import codi_attn.figures.heads, codi_attn.figures.thoughts, codi_attn.figures.validation",
                      "print(sorted(m for m in ('torch', 'transformers', 'sklearn') if m in sys.modules))"])
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", f"{out.stdout.strip()} loaded by the model-free steps' imports:\n{code}"
