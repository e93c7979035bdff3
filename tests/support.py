"""Test harness: real processes (Redis-compatible server, uvicorn server, arq worker) and real clients.

The processes are started by ``worker.testing``, the same helpers users test their jobs with;
here with the tests' own job types as well (``tests/testjobs.py``).
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis

from core import contract
from worker import testing
from worker.testing import Proc, wait_until  # noqa: F401 (for the tests)

ROOT = Path(__file__).resolve().parent.parent
TERMINAL = contract.TERMINAL


async def async_wait_until(condition: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        await asyncio.sleep(0.02)


async def ended_states(client: httpx.AsyncClient, job_ids: list[str]) -> list[str] | None:
    """Each job's status once all have ended, else None (for ``async_wait_until``)."""
    states = [(await client.get(f"/jobs/{job_id}?redirect=0")).json()["status"] for job_id in job_ids]
    return states if all(state in TERMINAL for state in states) else None


TEST_JOBS = "worker.demo,testjobs"  # the tests' own job types (tests/testjobs.py) beside the shipped demo


def process_env(redis_url: str, jobs_module: str = TEST_JOBS, **settings: Any) -> dict[str, str]:
    return testing.process_env(redis_url, jobs_module, path=[ROOT / "tests"], **settings)


def start_server(redis_url: str, tmp: Path, port: int | None = None, **settings: Any) -> Proc:
    """A server with the tests' job types (on ``port``, e.g. a stopped server's, or a free one)."""
    return testing.start_server(process_env(redis_url, **settings), tmp, port)


def start_worker(redis_url: str, tmp: Path, name: str = "worker", probe_url: str = "", **settings: Any) -> Proc:
    """A worker with the tests' job types, returned once it listens for wake-ups."""
    return testing.start_worker(process_env(redis_url, **settings), tmp, name, probe_url)


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
