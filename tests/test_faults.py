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

from server.devredis import RedisProcess
from support import Proc, assert_stream_ok, start_server, start_worker, submit, watch_sse

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


async def ws_watch(base: str, job_id: str) -> list[dict]:
    docs: list[dict] = []
    async with connect(base.replace("http", "ws") + "/ws") as ws:
        await ws.send(json.dumps({"op": "subscribe", "jobs": [job_id]}))
        while not docs or docs[-1]["status"] not in ("succeeded", "failed", "cancelled"):
            docs.append(json.loads(await ws.recv())["job"])
    return docs


def watchers(base: str, job: dict, client: httpx.AsyncClient, n: int = 5) -> asyncio.Future:
    sse = [watch_sse(client, base + job["links"]["events"]) for _ in range(n)]
    ws = [ws_watch(base, job["id"]) for _ in range(n)]
    return asyncio.gather(*sse, *ws)


def check(results: list, final: str = "succeeded") -> None:
    for result in results:
        docs = [e.doc if hasattr(e, "doc") else e for e in result]
        assert_stream_ok(docs, final)


async def test_pubsub_connection_killed(stack):
    """CLIENT KILL TYPE pubsub mid-job: the server re-subscribes, re-sends snapshots, nobody is lost."""
    async with httpx.AsyncClient(timeout=30) as client:
        job = await submit(client, stack.server.url, steps=30, interval=0.05)
        watching = watchers(stack.server.url, job, client)
        r = stack.client()
        deadline = time.monotonic() + 10
        while r.pubsub_numsub(f"progress:ev:{job['id']}")[0][1] == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        killed = r.client_kill_filter(_type="pubsub")
        assert killed >= 1
        check(await asyncio.wait_for(watching, 30))
    assert "pub/sub connection lost" in stack.server.log()


async def test_redis_frozen_then_thawed(stack):
    """Redis stopped with SIGSTOP for 4 s mid-job (a half-open connection): the heartbeat notices,
    and after SIGCONT every watcher converges to the final state."""
    async with httpx.AsyncClient(timeout=60) as client:
        job = await submit(client, stack.server.url, steps=30, interval=0.05)
        watching = watchers(stack.server.url, job, client)
        while (await client.get(stack.server.url + job["links"]["self"])).json()["progress"] is None:
            await asyncio.sleep(0.02)
        stack.redis.proc.send_signal(signal.SIGSTOP)
        await asyncio.sleep(4)  # the fault itself lasts this long; nothing waits on it
        stack.redis.proc.send_signal(signal.SIGCONT)
        check(await asyncio.wait_for(watching, 45))
    assert "no heartbeat" in stack.server.log()


async def test_pubsub_output_buffer_overflow(stack):
    """Redis cuts the server's subscription when its output buffer overflows (server frozen while a
    job floods progress): the server reconnects and resyncs; watchers still end in the final state."""
    r = stack.client()
    r.config_set("client-output-buffer-limit", "pubsub 64kb 32kb 1")
    async with httpx.AsyncClient(timeout=60) as client:
        r_job = await client.post(stack.server.url + "/jobs", json={"type": "flood", "params": {"count": 4000, "size": 4000}})
        job = r_job.json()  # 16 MB of events: more than socket buffers can hide
        watching = watchers(stack.server.url, job, client, n=2)
        deadline = time.monotonic() + 10
        while r.pubsub_numsub(f"progress:ev:{job['id']}")[0][1] == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        stack.server.send(signal.SIGSTOP)
        await asyncio.sleep(2)  # the fault itself: the server reads nothing while the job floods
        stack.server.send(signal.SIGCONT)
        check(await asyncio.wait_for(watching, 45))
    assert "pub/sub connection lost" in stack.server.log()
