"""A server stopped with SIGTERM drains: WebSockets close with 1012, SSE streams end, and clients
resume on another replica by seq without a repeat or a step back."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from support import SSE, assert_stream_ok, sse_frames, start_server, watch_sse

pytestmark = pytest.mark.anyio


async def test_sigterm_drains_and_clients_resume_elsewhere(redis_server, worker, tmp_path):
    leaving = start_server(redis_server.url, tmp_path)
    staying = start_server(redis_server.url, tmp_path)
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            r = await client.post(leaving.url + "/jobs", json={"type": "long", "params": {"seconds": 2}})
            job = r.json()
            sse_docs: list[dict] = []
            ws_docs: list[dict] = []
            close_code = None

            async def ws_until_closed() -> None:
                nonlocal close_code
                async with connect(leaving.url.replace("http", "ws") + "/ws") as ws:
                    await ws.send(json.dumps({"op": "subscribe", "jobs": [job["id"]]}))
                    try:
                        while True:
                            ws_docs.append(json.loads(await ws.recv())["job"])
                    except ConnectionClosed as closed:
                        close_code = closed.rcvd.code if closed.rcvd else None

            ws_task = asyncio.create_task(ws_until_closed())
            async with client.stream("GET", leaving.url + job["links"]["events"]) as resp:
                async for item in sse_frames(resp):
                    if isinstance(item, SSE):
                        sse_docs.append(item.doc)
                        if item.doc["message"] == "tick 3" and leaving.alive():
                            stopped_at = time.monotonic()
                            leaving.send(signal.SIGTERM)
            await asyncio.wait_for(ws_task, 10)
            assert close_code == 1012
            assert sse_docs[-1]["status"] == "running", "the stream ended before the job did"
            leaving.proc.wait(10)
            assert time.monotonic() - stopped_at < 8, "drain took too long"

            # both clients resume on the other replica from the last seq they have
            rest = await watch_sse(client, staying.url + job["links"]["events"], {"Last-Event-ID": str(sse_docs[-1]["seq"])})
            assert_stream_ok(sse_docs + [e.doc for e in rest], "succeeded")
            async with connect(staying.url.replace("http", "ws") + "/ws") as ws:
                since = {job["id"]: ws_docs[-1]["seq"]}
                await ws.send(json.dumps({"op": "subscribe", "jobs": [job["id"]], "since": since}))
                while ws_docs[-1]["status"] != "succeeded":
                    ws_docs.append(json.loads(await asyncio.wait_for(ws.recv(), 10))["job"])
            assert_stream_ok(ws_docs, "succeeded")
    finally:
        leaving.stop()
        staying.stop()
