"""The browser client's TypeScript declarations (static/progress.d.mts) stay true to it: tsc type-checks
tests/typescript/ (every option and method, wrong usage marked ``@ts-expect-error``, and the README's
``useJob`` hook) against them, imported by package name as an npm user does. ``make test`` installs
the pinned TypeScript first (``npm ci``: node_modules/)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

from support import ROOT

EXAMPLES = ROOT / "tests" / "typescript"


def tsc(*args: str) -> subprocess.CompletedProcess[str]:
    missing = " and ".join(tool for tool in ("node", "npx") if shutil.which(tool) is None)
    assert not missing, f"{missing} not found: install Node.js 20 or later, with npm, to type-check the client"
    assert (ROOT / "node_modules" / ".bin" / "tsc").exists(), "no TypeScript here: run `make test` (or `npm ci`)"
    return subprocess.run(
        ["npx", "--no-install", "tsc", *args], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )


def test_the_declarations_accept_the_typed_example_and_reject_wrong_usage():
    out = tsc("-p", str(EXAMPLES.relative_to(ROOT)))
    assert out.returncode == 0, f"tsc -p tests/typescript failed:\n{out.stdout}{out.stderr}"


def test_a_wrong_call_fails_the_check(tmp_path):
    """Not vacuous: in a project that installed the client (node_modules/progress-server-client, as
    `npm install /path/to/progress-server` makes it), wrong calls are errors, and the module resolves."""
    (tmp_path / "node_modules").mkdir()
    (tmp_path / "node_modules" / "progress-server-client").symlink_to(ROOT, target_is_directory=True)
    (tmp_path / "package.json").write_text(json.dumps({"name": "user", "private": True, "type": "module"}))
    config = {"extends": str(EXAMPLES / "tsconfig.json"), "include": ["*.ts"]}
    (tmp_path / "tsconfig.json").write_text(json.dumps(config))
    shutil.copy(EXAMPLES / "example.ts", tmp_path / "example.ts")  # right as it is
    wrong = [
        'import { watchJob } from "progress-server-client";',
        'watchJob("j_a", { onUpdate: (job) => { if (job.status === "done") job.progress.toFixed(); } });',
        'watchJob("j_a", { onProgress() {} });',
        "watchJob(42);",
    ]
    (tmp_path / "wrong.ts").write_text("\n".join(wrong) + "\n")
    out = tsc("-p", str(tmp_path))
    output = out.stdout + out.stderr
    assert out.returncode != 0, f"tsc accepted wrong calls:\n{output}"
    errors = re.findall(r"^(?:.*/)?([^/]+)\((\d+),\d+\): error TS\d+", output, re.M)
    assert set(errors) == {("wrong.ts", "2"), ("wrong.ts", "3"), ("wrong.ts", "4")}, output
    assert "TS2307" not in output, output  # "cannot find module": the package must resolve


def test_the_readme_hook_is_the_one_type_checked():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"^```tsx?\n(.*?)^```$", readme, re.S | re.M)
    hooks = [block for block in blocks if "export function useJob(" in block]
    assert len(hooks) == 1, "README.md should show the useJob hook once, in a ```ts block"
    assert hooks[0] == (EXAMPLES / "useJob.ts").read_text(), "README.md's useJob is not tests/typescript/useJob.ts"
