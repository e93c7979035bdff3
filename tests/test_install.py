"""An installed copy (the wheel, not this checkout) serves the pages from any working folder:
``static/`` ships as package data beside ``server``, ``core``, ``worker`` and ``client``."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import httpx

from support import ROOT, Proc, process_env, wait_until
from core.devredis import free_port

MARK = b"<!-- served from the installed copy -->"


def test_a_wheel_installed_elsewhere_serves_the_pages(redis_server, tmp_path):
    source, wheels = tmp_path / "source", tmp_path / "wheels"  # a copy: setuptools builds in the tree
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "data", "test-artifacts", "bench", "node_modules"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", wheels, source], check=True, timeout=300)
    (wheel,) = wheels.glob("progress_server-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(site)
    for expected in ("core/fastpath/direct.py", "client/__init__.py", "static/index.html", "static/vendor/htmx.LICENSE"):
        assert expected in names, expected
    assert not [n for n in names if n.startswith(("tests/", "bench/", "examples/"))]
    (site / "static" / "index.html").write_bytes((site / "static" / "index.html").read_bytes() + MARK)
    port = free_port()
    env = process_env(redis_server.url, port=port, host="127.0.0.1") | {"PYTHONPATH": str(site), "JOBS_MODULE": "worker.demo"}
    server = Proc("server", env, tmp_path / "server.log", port=port, cwd=tmp_path).start()
    try:
        wait_until(lambda: _get(server.url + "/healthz") == 200, timeout=20, what="the installed server")
        page = httpx.get(server.url + "/", timeout=5)
        script = httpx.get(server.url + "/static/progress.js", timeout=5)
    finally:
        server.stop()
    assert page.status_code == 200 and page.content.endswith(MARK)
    assert script.status_code == 200 and b"ProgressClient" in script.content


def _get(url: str) -> int:
    try:
        return httpx.get(url, timeout=1).status_code
    except httpx.HTTPError:
        return 0
