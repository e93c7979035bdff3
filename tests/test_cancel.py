"""DELETE /jobs/{id}: a queued job never starts, a running job is interrupted, a finished one is 409."""

from __future__ import annotations

import httpx
import pytest

from core.devredis import RedisProcess
from support import SSE, assert_stream_ok, sse_frames, start_server, start_worker, submit, watch_sse

pytestmark = pytest.mark.anyio


async def test_cancel_running_job_interrupts_it(base):
    async with httpx.AsyncClient(timeout=30) as client:
        job = await submit(client, base, steps=200, interval=0.05)
        docs = []
        async with client.stream("GET", base + job["links"]["events"]) as r:
            async for item in sse_frames(r):
                if not isinstance(item, SSE):
                    continue
                docs.append(item.doc)
                if item.doc["progress"] and len(docs) == 4:
                    cancel = await client.delete(base + job["links"]["self"])
                    assert cancel.status_code == 202
                    assert cancel.json()["status"] == "running"
        assert_stream_ok(docs, "cancelled")
        assert docs[-1]["progress"] < 50
        again = await client.delete(base + job["links"]["self"])
        assert again.status_code == 409 and again.json()["job_status"] == "cancelled"
        result = await client.get(base + job["links"]["result"])
        assert result.status_code == 409 and result.json()["job_status"] == "cancelled"


async def test_cancel_finished_job_is_409(base):
    async with httpx.AsyncClient(timeout=30) as client:
        job = await submit(client, base, steps=1, interval=0)
        await watch_sse(client, base + job["links"]["events"])
        r = await client.delete(base + job["links"]["self"])
    assert r.status_code == 409 and r.headers["content-type"] == "application/problem+json"


async def test_cancelled_queued_job_never_starts(tmp_path):
    """With no worker running, cancel a queued job; a worker started later never runs it."""
    redis = RedisProcess(tmp_path / "redis").start()
    server = start_server(redis.url, tmp_path)
    worker = None
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            job = await submit(client, server.url, steps=1, interval=0)
            r = await client.delete(job["links"]["self"])
            assert r.status_code == 200
            assert (r.json()["status"], r.json()["seq"]) == ("cancelled", 2)
            worker = start_worker(redis.url, tmp_path)
            later = await submit(client, server.url, steps=1, interval=0)
            assert (await watch_sse(client, server.url + later["links"]["events"]))[-1].event == "succeeded"
            doc = (await client.get(job["links"]["self"])).json()
            assert (doc["status"], doc["seq"], doc["started_at"]) == ("cancelled", 2, None)
        assert job["id"] not in worker.log()  # off the queue before the worker started: never claimed
    finally:
        for proc in (worker, server):
            if proc:
                proc.stop()
        redis.stop()
