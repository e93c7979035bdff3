"""The README's "Write your own job" works as written: its job module and its two test files,
put in a ``myapp/`` next to the Makefile of a copy of this repository, pass when run the way the
README says (the virtualenv's pytest, from that folder)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from support import ROOT


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {title}\n")
    return text[start : text.index("\n## ", start + 1)]


def test_write_your_own_job_works_verbatim_with_myapp_next_to_the_makefile(tmp_path):
    section = readme_section("Write your own job")
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    files = {"myapp/jobs.py": blocks[0], "myapp/__init__.py": ""}  # "say `myapp/jobs.py` (with an empty `myapp/__init__.py`)"
    files |= {m.group(1): block for block in blocks if (m := re.match(r"# (myapp/\S+\.py)\n", block))}
    assert {"myapp/tests/conftest.py", "myapp/tests/test_jobs.py"} <= set(files), sorted(files)
    copy = tmp_path / "progress-server"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".*", "data", "test-artifacts", "bench", "node_modules"))
    for name, text in files.items():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_text(text)
    pytest = [str(Path(sys.executable).parent / "pytest"), "myapp/tests", "-q", "-p", "no:cacheprovider"]  # .venv/bin/pytest
    run = subprocess.run(pytest, cwd=copy, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert re.search(r"^2 passed", run.stdout, re.M), run.stdout[-2000:]
