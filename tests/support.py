"""Test harness: real processes (Redis-compatible server, uvicorn server, arq worker) and real clients."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from core import contract
from core.devredis import free_port

ROOT = Path(__file__).resolve().parent.parent
TERMINAL = contract.TERMINAL


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> Any:
    """Poll ``condition`` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(interval)


async def async_wait_until(condition: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        await asyncio.sleep(0.02)


@dataclass
class Proc:
    """A child process (``python -m server`` or ``python -m worker``) with its log in a file."""

    module: str
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None
    port: int = 0
    cwd: Path = ROOT
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


def process_env(redis_url: str, **settings: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "REDIS_URL"))}
    env.update({"REDIS_URL": redis_url, "LOG_LEVEL": "info", "PYTHONUNBUFFERED": "1"})
    # the tests' own job types (tests/testjobs.py) beside the shipped demo
    env.update({"PYTHONPATH": str(ROOT / "tests"), "JOBS_MODULE": "worker.demo,testjobs"})
    env.update({k.upper(): str(v) for k, v in settings.items()})
    return env


def start_server(redis_url: str, tmp: Path, port: int | None = None, **settings: Any) -> Proc:
    """Start a server (on ``port``, e.g. a stopped server's, or a free one) and wait until it answers."""
    port = port or free_port()
    env = process_env(redis_url, port=port, host="127.0.0.1", **settings)
    server = Proc("server", env, tmp / f"server-{port}.log", port=port).start()
    try:
        wait_until(lambda: _healthy(server), timeout=20, what=f"server on port {port}")
    except AssertionError:
        server.stop()
        raise AssertionError(f"server did not start:\n{server.log()[-3000:]}") from None
    return server


def _healthy(server: Proc) -> bool:
    if not server.alive():
        raise AssertionError(f"server exited:\n{server.log()[-3000:]}")
    try:
        return httpx.get(server.url + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def start_worker(redis_url: str, tmp: Path, name: str = "worker", probe_url: str = "", **settings: Any) -> Proc:
    """Start a worker and return once it listens for wake-ups (it then starts jobs at once).
    ``probe_url`` is a plain URL of the same Redis, to look for that (for a Sentinel ``redis_url``)."""
    client = redis.Redis.from_url(probe_url or redis_url)
    before = client.pubsub_numsub(contract.WAKE_CHANNEL)[0][1]
    worker = Proc("worker", process_env(redis_url, **settings), tmp / f"{name}-{time.monotonic_ns()}.log").start()

    def ready() -> bool:
        if not worker.alive():
            raise AssertionError(f"worker exited:\n{worker.log()[-3000:]}")
        return client.pubsub_numsub(contract.WAKE_CHANNEL)[0][1] > before

    try:
        wait_until(ready, timeout=20, what="worker to listen")
    finally:
        client.close()
    return worker


# -- clients ------------------------------------------------------------------------------


@dataclass
class SSE:
    event: str | None
    id: str | None
    data: str

    @property
    def doc(self) -> dict[str, Any]:
        return json.loads(self.data)


async def sse_frames(response: httpx.Response) -> AsyncIterator[SSE | dict[str, Any]]:
    """Parse an SSE body; yields SSE events, and ``{"retry": ms}`` / ``{"comment": text}`` items."""
    fields: dict[str, list[str]] = {}
    async for line in response.aiter_lines():
        if line == "":
            if "data" in fields:
                yield SSE(fields.get("event", [None])[-1], fields.get("id", [None])[-1], "\n".join(fields["data"]))
            fields = {}
        elif line.startswith(":"):
            yield {"comment": line[1:]}
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "retry":
                yield {"retry": int(value)}
            else:
                fields.setdefault(name, []).append(value)


async def watch_sse(client: httpx.AsyncClient, url: str, headers: dict[str, str] | None = None) -> list[SSE]:
    """Read an SSE stream to its end (the server ends a job stream after the terminal event)."""
    out = []
    async with client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        async for item in sse_frames(response):
            if isinstance(item, SSE):
                out.append(item)
    return out


async def watch_with_retries(client: httpx.AsyncClient, servers: list, job: dict, deadline: float) -> list[dict]:
    """Like a browser: on any failure, reconnect to some live server from the last seq seen."""
    docs: list[dict] = []
    loop = asyncio.get_running_loop()
    while loop.time() < deadline:
        base = random.choice([s for s in servers if s.alive()]).url
        headers = {"Last-Event-ID": str(docs[-1]["seq"])} if docs else {}
        try:
            async with asyncio.timeout(max(0.1, deadline - loop.time())), client.stream("GET", base + job["links"]["events"], headers=headers) as r:
                if r.status_code == 204:
                    return docs
                if r.status_code != 200:
                    await asyncio.sleep(0.2)
                    continue
                async for item in sse_frames(r):
                    if isinstance(item, SSE):
                        docs.append(item.doc)
                        if item.event in ("succeeded", "failed", "cancelled"):
                            return docs
        except (httpx.HTTPError, TimeoutError):
            await asyncio.sleep(0.2)
    raise AssertionError(f"watcher of {job['id']} did not reach a final state; saw {[(d['seq'], d['status']) for d in docs]}")


def tally(store: redis.Redis, jobs: list[dict[str, Any]], seen: list[list[dict[str, Any]]]) -> tuple[collections.Counter, int, int]:
    """Jepsen-style count of a fault test: ``(final states, re-runs (attempt > 1), lost)`` from the
    stored documents. Each watcher's ``seen`` must have seq strictly rising, exactly one final
    event, and end at the stored final seq."""
    finals: collections.Counter = collections.Counter()
    reruns = 0
    for job, docs in zip(jobs, seen):
        raw = store.hget(contract.job_key(job["id"]), "ev")
        assert raw is not None, f"job {job['id']} lost"
        final = json.loads(contract.unpack(raw).doc)
        finals[final["status"]] += 1
        reruns += final["attempt"] > 1
        seqs = [d["seq"] for d in docs]
        assert seqs == sorted(set(seqs)), f"{job['id']}: seq repeated or went back: {seqs}"
        assert [d["status"] for d in docs].count(final["status"]) >= 1 and docs[-1]["seq"] == final["seq"]
        assert sum(d["status"] in TERMINAL for d in docs) == 1
    return finals, reruns, len(jobs) - sum(finals.values())


async def submit(client: httpx.AsyncClient, base: str, **params: Any) -> dict[str, Any]:
    r = await client.post(base + "/jobs", json={"type": "demo", "params": params})
    assert r.status_code == 202, r.text
    return r.json()


def assert_stream_ok(docs: list[dict[str, Any]], final: str) -> None:
    """seq strictly increasing, exactly one terminal event and it is the last one."""
    seqs = [d["seq"] for d in docs]
    assert seqs == sorted(set(seqs)), f"seq not strictly increasing: {seqs}"
    terminal = [d for d in docs if d["status"] in TERMINAL]
    assert len(terminal) == 1 and docs[-1] is terminal[0], [d["status"] for d in docs]
    assert docs[-1]["status"] == final, docs[-1]
