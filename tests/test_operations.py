"""Operability: Prometheus metrics of the server and the worker, readiness."""

from __future__ import annotations

import json

import httpx
import pytest
from websockets.asyncio.client import connect

from core.devredis import RedisProcess, free_port
from support import async_wait_until, start_server, start_worker, submit, watch_sse

pytestmark = pytest.mark.anyio


def metric(text: str, name: str) -> float:
    """The value of one sample line ``name value`` (name includes labels) in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no sample {name!r} in:\n{text}")


async def test_server_and_worker_metrics(tmp_path):
    r = RedisProcess(tmp_path / "redis").start()
    server = start_server(r.url, tmp_path)
    port = free_port()
    worker = start_worker(r.url, tmp_path, worker_metrics_port=port)
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            job = await submit(client, server.url, steps=3, interval=0.05)
            async with connect(server.url.replace("http", "ws") + "/ws") as ws:
                await ws.send(json.dumps({"op": "subscribe", "jobs": [job["id"]]}))
                text = (await client.get(server.url + "/metrics")).text
                assert metric(text, 'progress_connections{transport="ws"}') == 1
                events = await watch_sse(client, server.url + job["links"]["events"])
                while json.loads(await ws.recv())["event"] != "succeeded":
                    pass
            text = (await client.get(server.url + "/metrics")).text
            assert metric(text, 'progress_events_delivered_total{transport="sse"}') >= len(events)
            assert metric(text, 'progress_events_delivered_total{transport="ws"}') >= 1
            assert metric(text, "progress_events_received_total") >= len(events) - 1
            assert metric(text, "progress_publish_to_server_seconds_count") >= 1
            assert metric(text, 'progress_queue_waiting{queue="default"}') == 0
            assert metric(text, 'progress_queue_running{queue="default"}') == 0
            worker_text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
            assert metric(worker_text, 'progress_jobs_finished_total{status="succeeded",type="demo"}') == 1
            assert metric(worker_text, 'progress_job_duration_seconds_count{type="demo"}') == 1
    finally:
        worker.stop()
        server.stop()
        r.stop()


async def test_openapi_describes_every_route(base):
    """Every route the app serves (but the pages and static files) is in /openapi.json, and /docs renders it."""
    async with httpx.AsyncClient(base_url=base) as client:
        spec = (await client.get("/openapi.json")).json()
        docs = await client.get("/docs")
    from server.app import create_app

    served = {route.path for route in create_app().routes if hasattr(route, "path")} - {"/", "/dashboard", "/dashboard/jobs/{job_id}", "/docs", "/static", "/openapi.json"}
    served.add("/ws")  # the WebSocket route, served by App.__call__ past the router
    assert served <= set(spec["paths"]), served - set(spec["paths"])
    assert docs.status_code == 200 and "/static/docs.js" in docs.text


async def test_request_id_travels_into_the_worker_logs(base, worker):
    """The id of the request that submitted a job is on every worker log line about it; a job that
    succeeds gets one line at INFO."""
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        r = await client.post("/jobs", json={"type": "demo", "params": {"steps": 1, "interval": 0}}, headers={"X-Request-ID": "rid-into-worker-7"})
        job = r.json()
        await watch_sse(client, base + job["links"]["events"])
    ours = [json.loads(line) for line in worker.log().splitlines() if job["id"] in line and '"logger": "worker"' in line]
    assert [line["msg"].split(": ", 1)[1] for line in ours] == ["succeeded (demo, attempt 1, " + ours[-1]["msg"].rsplit(", ", 1)[1]]
    assert all(line["request_id"] == "rid-into-worker-7" and line["job_id"] == job["id"] for line in ours)


async def test_idle_sse_stream_is_pinged_and_freed_when_the_client_goes(tmp_path):
    """An idle stream gets a ``: ping`` comment every SSE_PING seconds (proxies close silent
    connections), and the server lets go of the stream as soon as its client disconnects."""
    r = RedisProcess(tmp_path / "redis").start()
    server = start_server(r.url, tmp_path, sse_ping=0.2)  # no worker: the job stays queued
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            job = await submit(client, server.url, steps=1, interval=0)
            lines: list[str] = []
            async with client.stream("GET", job["links"]["events"]) as response:
                stream = response.aiter_lines()  # held, not left by ``break``: that would close it
                while lines.count(": ping") < 2:
                    lines.append(await anext(stream))
                text = (await client.get("/metrics")).text
                assert metric(text, 'progress_connections{transport="sse"}') == 1
            assert lines[0] == "retry: 2000" and '"status":"queued"' in "".join(lines)
            assert lines.index(": ping") > lines.index("event: progress")

            async def freed() -> bool:
                text = (await client.get("/metrics")).text
                return metric(text, 'progress_connections{transport="sse"}') == 0

            await async_wait_until(freed, timeout=5, what="the stream freed after the client left")
    finally:
        server.stop()
        r.stop()
