"""Faults on the pub/sub path: killed, frozen and overflowing subscriptions lose nothing promised.

Each test runs its own Redis, server and worker, and counts like Jepsen: every watcher must end
in the job's true final state, exactly once, with seq strictly increasing.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from dataclasses import dataclass

import httpx
import pytest
import redis
from websockets.asyncio.client import connect

from core.devredis import RedisProcess
from support import SSE, TERMINAL, Proc, assert_stream_ok, sse_frames, start_server, start_worker, submit, wait_until

pytestmark = pytest.mark.anyio


@dataclass
class Stack:
    redis: RedisProcess
    server: Proc
    worker: Proc

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis.url)


@pytest.fixture
def stack(tmp_path):
    r = RedisProcess(tmp_path / "redis").start()
    server = start_server(r.url, tmp_path)
    worker = start_worker(r.url, tmp_path, progress_interval=0)
    yield Stack(r, server, worker)
    for proc in (worker, server):
        proc.send(signal.SIGCONT)
        proc.stop()
    if r.proc and r.proc.poll() is None:
        r.proc.send_signal(signal.SIGCONT)
    r.stop()


async def ws_watch(base: str, job_id: str, started: list) -> list[dict]:
    docs: list[dict] = []
    async with connect(base.replace("http", "ws") + "/ws") as ws:
        await ws.send(json.dumps({"op": "subscribe", "jobs": [job_id]}))
        while not docs or docs[-1]["status"] not in TERMINAL:
            docs.append(json.loads(await ws.recv())["job"])
            if len(docs) == 1:
                started.append(job_id)
    return docs


async def sse_watch(client: httpx.AsyncClient, url: str, started: list) -> list[dict]:
    docs: list[dict] = []
    async with client.stream("GET", url) as r:
        assert r.status_code == 200, await r.aread()
        async for item in sse_frames(r):
            if isinstance(item, SSE):
                docs.append(item.doc)
                if len(docs) == 1:
                    started.append(url)
                if item.event in TERMINAL:
                    break
    return docs


class Watchers:
    """n SSE and n WebSocket watchers of one job; ``ready()`` once each has its first document."""

    def __init__(self, base: str, job: dict, client: httpx.AsyncClient, n: int = 5) -> None:
        self.n, self.started = n, []
        sse = [sse_watch(client, base + job["links"]["events"], self.started) for _ in range(n)]
        ws = [ws_watch(base, job["id"], self.started) for _ in range(n)]
        self.all = asyncio.gather(*sse, *ws)

    async def ready(self) -> None:
        deadline = time.monotonic() + 10
        while len(self.started) < 2 * self.n:
            assert time.monotonic() < deadline, "watchers did not start"
            await asyncio.sleep(0.02)


def check(results: list[list[dict]], final: str = "succeeded") -> None:
    for docs in results:
        assert_stream_ok(docs, final)


async def test_pubsub_connection_killed(stack):
    """CLIENT KILL TYPE pubsub mid-job: the server re-subscribes, re-sends snapshots, nobody is lost."""
    async with httpx.AsyncClient(timeout=30) as client:
        job = await submit(client, stack.server.url, steps=30, interval=0.05)
        watching = Watchers(stack.server.url, job, client)
        await watching.ready()
        killed = stack.client().client_kill_filter(_type="pubsub")
        assert killed >= 1
        check(await asyncio.wait_for(watching.all, 30))
    assert "pub/sub connection lost" in stack.server.log()


async def test_redis_frozen_then_thawed(stack):
    """Redis stopped with SIGSTOP for 4 s mid-job (a half-open connection): the heartbeat notices,
    and after SIGCONT every watcher converges to the final state."""
    async with httpx.AsyncClient(timeout=60) as client:
        job = await submit(client, stack.server.url, steps=30, interval=0.05)
        watching = Watchers(stack.server.url, job, client)
        await watching.ready()
        stack.redis.proc.send_signal(signal.SIGSTOP)
        await asyncio.sleep(4)  # the fault itself lasts this long; nothing waits on it
        stack.redis.proc.send_signal(signal.SIGCONT)
        check(await asyncio.wait_for(watching.all, 45))
    assert "no heartbeat" in stack.server.log()


async def test_pubsub_output_buffer_overflow(stack):
    """Redis cuts the server's subscription when its output buffer overflows (server frozen while a
    job floods progress): the server reconnects and resyncs; watchers still end in the final state."""
    r = stack.client()
    r.config_set("client-output-buffer-limit", "pubsub 64kb 32kb 1")
    stack.worker.send(signal.SIGSTOP)  # the job waits until the server is frozen
    async with httpx.AsyncClient(timeout=60) as client:
        r_job = await client.post(stack.server.url + "/jobs", json={"type": "flood", "params": {"count": 4000, "size": 4000}})
        job = r_job.json()  # 16 MB of events: more than socket buffers can hide
        watching = Watchers(stack.server.url, job, client, n=2)
        await watching.ready()  # every watcher has the queued snapshot before the fault
        stack.server.send(signal.SIGSTOP)
        stack.worker.send(signal.SIGCONT)
        await asyncio.sleep(2)  # the fault itself: the server reads nothing while the job floods
        stack.server.send(signal.SIGCONT)
        check(await asyncio.wait_for(watching.all, 45))
    assert "pub/sub connection lost" in stack.server.log()


def test_sigterm_stops_a_worker_whose_redis_is_gone(tmp_path):
    """A worker told to stop while Redis is down stops, rather than taking the failed close for
    an outage and starting again (``python -m worker``'s restart loop)."""
    redis = RedisProcess(tmp_path / "redis").start()
    worker = start_worker(redis.url, tmp_path)
    try:
        redis.kill()
        wait_until(lambda: "polling the queue failed" in worker.log(), timeout=10, what="the worker to miss Redis")
        worker.send(signal.SIGTERM)
        wait_until(lambda: not worker.alive(), timeout=15, what="the worker to exit")
    finally:
        worker.stop(signal.SIGKILL)
        redis.stop()
    assert "restarting in" not in worker.log()
