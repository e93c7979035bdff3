"""Several processes against one Redis, and Redis going away and coming back."""

from __future__ import annotations

import asyncio
import json
import signal

import httpx
import pytest
import redis as redis_sync
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from core import contract
from core.devredis import RedisProcess
from core.devredis import free_port
from support import Proc, assert_stream_ok, process_env, start_server, start_worker, submit, wait_until, watch_sse

pytestmark = pytest.mark.anyio


async def test_submit_on_one_server_watch_on_another(redis_server, worker, server, tmp_path):
    """Two server processes, one worker: a job submitted on A is streamed by B over SSE and WS."""
    other = start_server(redis_server.url, tmp_path)
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            job = await submit(client, server.url, steps=5, interval=0.1)

            async def over_ws() -> list[dict]:
                docs = []
                async with connect(other.url.replace("http", "ws") + "/ws") as ws:
                    await ws.send(json.dumps({"op": "subscribe", "jobs": [job["id"]]}))
                    while not docs or docs[-1]["status"] != "succeeded":
                        docs.append(json.loads(await ws.recv())["job"])
                return docs

            sse, ws_docs = await asyncio.wait_for(
                asyncio.gather(watch_sse(client, other.url + job["links"]["events"]), over_ws()), 30
            )
        assert_stream_ok([e.doc for e in sse], "succeeded")
        assert_stream_ok(ws_docs, "succeeded")
    finally:
        other.stop()


async def test_stalled_redis_during_a_submit_burst_gives_503_then_no_duplicates(tmp_path):
    """Redis frozen (SIGSTOP) longer than a request's Redis deadline while 20 submits arrive
    together (one pipeline): each gets 503 + Retry-After, not a hang. Retried with the same
    Idempotency-Key once Redis is back, they make exactly one job each, whether or not the
    frozen attempt ran (RELIABILITY.md, plan item 16)."""
    redis = RedisProcess(tmp_path / "redis").start()
    server = start_server(redis.url, tmp_path)
    keys = [f"stalled-{i}" for i in range(20)]
    body = {"type": "demo", "params": {"steps": 1, "interval": 0}}
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=httpx.Limits(max_connections=20)) as client:
            assert (await client.get("/readyz")).status_code == 200
            redis.proc.send_signal(signal.SIGSTOP)
            try:
                frozen = await asyncio.gather(*(client.post("/jobs", json=body, headers={"Idempotency-Key": k}) for k in keys))
            finally:
                redis.proc.send_signal(signal.SIGCONT)
            assert [r.status_code for r in frozen] == [503] * 20, frozen[0].text
            assert all(int(r.headers["retry-after"]) > 0 for r in frozen)
            again = await asyncio.gather(*(client.post("/jobs", json=body, headers={"Idempotency-Key": k}) for k in keys))
            assert [r.status_code for r in again] == [202] * 20, again[0].text
            assert len({r.json()["id"] for r in again}) == 20
        stored = redis_sync.Redis.from_url(redis.url)
        try:
            assert stored.zcard(contract.jobs_index("")) == 20
        finally:
            stored.close()
    finally:
        server.stop()
        redis.stop()


async def test_redis_down_gives_503_and_recovery_is_automatic(tmp_path):
    """Redis killed: POST 503 + Retry-After, /readyz 503. Restarted on the same port with its AOF:
    the server and worker reconnect by themselves and a job accepted before the crash still finishes."""
    redis = RedisProcess(tmp_path / "redis").start()
    server = start_server(redis.url, tmp_path)
    worker = start_worker(redis.url, tmp_path)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            assert (await client.get("/readyz")).status_code == 200
            redis.kill()
            r = await client.post("/jobs", json={"type": "demo", "params": {"steps": 1}})
            assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
            assert r.headers["content-type"] == "application/problem+json"
            assert (await client.get("/readyz")).status_code == 503
            assert (await client.get("/healthz")).status_code == 200
            with pytest.raises(InvalidStatus) as refused:  # a ticket is looked up in Redis
                async with connect(server.url.replace("http", "ws") + "/ws?ticket=t"):
                    pass
            assert refused.value.response.status_code == 503
            # the denial is not an error of the app: no "returned without completing handshake"
            await client.get("/healthz", headers={"X-Request-ID": "after-the-denial"})
            wait_until(lambda: "after-the-denial" in server.log(), timeout=5, what="the access line after the denial")
            assert "without completing handshake" not in server.log()
            redis.start()

            async def ready():
                return (await client.get("/readyz")).status_code == 200

            deadline = asyncio.get_running_loop().time() + 20
            while not await ready():
                assert asyncio.get_running_loop().time() < deadline, "server did not reconnect"
                await asyncio.sleep(0.1)
            job = await submit(client, server.url, steps=2, interval=0)
            events = await watch_sse(client, server.url + job["links"]["events"])
            assert events[-1].event == "succeeded"
        assert worker.alive()
    finally:
        worker.stop()
        server.stop()
        redis.stop()


async def test_job_accepted_before_redis_crash_survives_it(tmp_path):
    """202 means durable: with AOF, a job queued before a SIGKILL of Redis runs after the restart."""
    redis = RedisProcess(tmp_path / "redis").start()
    server = start_server(redis.url, tmp_path)
    worker = None
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            job = await submit(client, server.url, steps=2, interval=0)
            redis.kill()
            redis.start()
            worker = start_worker(redis.url, tmp_path)
            events = await watch_sse(client, server.url + job["links"]["events"])
            assert events[-1].event == "succeeded"
    finally:
        if worker:
            worker.stop()
        server.stop()
        redis.stop()


async def test_server_processes_share_one_port(redis_server, worker, tmp_path):
    """``REUSE_PORT=1``: two server processes listen on one port and the kernel spreads new
    connections over both; when one stops, its streams end and the other serves on."""
    port = free_port()
    env = process_env(redis_server.url, reuse_port=1, host="127.0.0.1", port=port)
    first = Proc("server", env, tmp_path / "first.log", port=port).start()
    second = Proc("server", env, tmp_path / "second.log", port=port).start()
    try:
        for proc in (first, second):
            wait_until(lambda p=proc: "Application startup complete" in p.log(), timeout=20, what="both servers started")
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as client:
            job = await submit(client, first.url, steps=2, interval=20)  # streams stay open for a while
            opened = asyncio.Queue()

            async def stream() -> list[str]:
                """The events one stream got, until it ended."""
                seen = []
                async with client.stream("GET", f"{first.url}/jobs/{job['id']}/events") as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("event:"):
                            seen.append(line.split(":", 1)[1].strip())
                            opened.put_nowait(1)
                return seen

            streams = [asyncio.create_task(stream()) for _ in range(16)]
            for _ in streams:  # each has its snapshot: every stream is open
                await asyncio.wait_for(opened.get(), 10)
            first.stop()  # its streams end without a final event
            r = await client.delete(f"{first.url}/jobs/{job['id']}")  # the port still answers: the second process
            assert r.status_code == 202, r.text  # cancel of a running job: requested
            ended = await asyncio.wait_for(asyncio.gather(*streams), 15)  # the second's streams end on `cancelled`
        on_second = sum(1 for seen in ended if seen[-1] == "cancelled")
        assert 0 < on_second < len(streams), f"{on_second} of {len(streams)} streams were on the second process"
    finally:
        for proc in (first, second):
            proc.stop()
