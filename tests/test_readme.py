"""The README's Python example runs as written and prints what it says."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(tmp_path):
    """The library example, then the runner example on its model, as one script."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    first = next(i for i, b in enumerate(blocks) if "build_tiny_codi" in b)
    assert "Runner(model" in blocks[first + 1], "the runner example follows the library example"
    code = (blocks[first] + blocks[first + 1]).replace("/tmp/codi-tiny", str(tmp_path / "codi-tiny"))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert re.search(r"\(1, 2, 4, 6, 6\)", run.stdout)
    assert "'sink':" in run.stdout and "'thoughts':" in run.stdout
    assert re.search(r"\(2, 6, \d+\)", run.stdout)  # RecordThoughts: problems, thoughts, d
    assert len(re.findall(r"^[1-6] tensor\(", run.stdout, flags=re.M)) == 6  # one residual norm per thought


def test_quick_start_has_two_shell_blocks():
    quick = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", quick, flags=re.S)
    assert len(blocks) == 2
    assert "flows/attention_flow.py run" in blocks[0] and "pytest" in blocks[1]
