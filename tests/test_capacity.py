"""10,000 idle connections in one server process, and what happens past MAX_CONNECTIONS.

Half of them are SSE streams and half WebSockets, each watching one of 100 queued jobs (no worker
runs, so they stay idle). While they are held the server must keep answering new requests; past
MAX_CONNECTIONS a new HTTP request and a new WebSocket get 503 (not a crash, not a hang); once
room is made it serves again; and cancelling the 100 jobs reaches all 10,000 watchers.

The clients are raw sockets (a few KB each) so that the test process is not what limits.
"""

from __future__ import annotations

import asyncio
import json
import resource
import time

import httpx
import pytest

from core.devredis import RedisProcess
from support import start_server

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

IDLE = 10_000
JOBS = 100
LIMIT = IDLE + 5  # MAX_CONNECTIONS: the held streams and a few requests of the test's own
CANCELLED = b'"status":"cancelled"'
WS_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


def masked_text(payload: bytes) -> bytes:
    """A client text frame (clients must mask; a zero mask key leaves the payload as it is)."""
    assert len(payload) < 126
    return bytes((0x81, 0x80 | len(payload))) + b"\0\0\0\0" + payload


async def open_stream(port: int, job_id: str, kind: str) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    """Open an SSE stream of ``job_id`` or a WebSocket subscribed to it; returns the response
    head and the open connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if kind == "sse":
        writer.write(f"GET /jobs/{job_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n".encode())
    else:
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + WS_KEY + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
    head = await reader.readuntil(b"\r\n\r\n")
    if kind == "ws" and head.startswith(b"HTTP/1.1 101 "):
        writer.write(masked_text(json.dumps({"op": "subscribe", "jobs": [job_id]}).encode()))
    return head, reader, writer


async def test_ten_thousand_idle_connections_and_the_limit(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < IDLE + 2_000:
        pytest.skip(f"open-file limit {hard} is below {IDLE + 2_000}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the server inherits it too
    redis = RedisProcess(tmp_path / "redis").start()  # its own: no worker may run these jobs
    server = start_server(redis.url, tmp_path, max_connections=LIMIT, max_streams_per_client=2 * IDLE, rate_poll=100_000)
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, str]] = []
    extra: list[asyncio.StreamWriter] = []
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            jobs = []
            for _ in range(JOBS):
                resp = await client.post("/jobs", json={"type": "demo", "params": {"steps": 3}})
                assert resp.status_code == 202
                jobs.append(resp.json()["id"])

            gate = asyncio.Semaphore(200)

            async def hold(i: int) -> None:
                kind = "sse" if i % 2 else "ws"
                async with gate:
                    head, reader, writer = await open_stream(server.port, jobs[i % JOBS], kind)
                assert head.startswith((b"HTTP/1.1 200 ", b"HTTP/1.1 101 ")), head
                held.append((reader, writer, kind))

            started = time.monotonic()
            await asyncio.wait_for(asyncio.gather(*(hold(i) for i in range(IDLE))), 120)
            connect_s = time.monotonic() - started

            # held: new requests are still served, at once
            started = time.monotonic()
            assert (await client.get("/healthz")).status_code == 200
            assert (await client.post("/jobs", json={"type": "demo", "params": {"steps": 3}})).status_code == 202
            answer_s = time.monotonic() - started

            # past the limit: 503 for a new stream and a new WebSocket; the server lives
            refused = {}
            for kind in ("sse", "ws"):
                for _ in range(2 * (LIMIT - IDLE)):
                    head, reader, writer = await open_stream(server.port, jobs[0], kind)
                    extra.append(writer)
                    if head.startswith(b"HTTP/1.1 503 "):
                        refused[kind] = head
                        break
            assert set(refused) == {"sse", "ws"}, refused
            assert b"application/problem+json" in refused["ws"] and b"retry-after: 5" in refused["ws"].lower()
            assert server.alive()
            for writer in extra:
                writer.close()
            await asyncio.gather(*(w.wait_closed() for w in extra), return_exceptions=True)
            # room again: served again (uvicorn counts a closed connection out at once)
            ok = False
            deadline = time.monotonic() + 10
            while not ok and time.monotonic() < deadline:
                ok = (await client.get("/healthz")).status_code == 200
            assert ok

            # one update to every idle watcher: cancel the 100 jobs
            started = time.monotonic()
            for job_id in jobs:
                assert (await client.delete(f"/jobs/{job_id}")).status_code == 200

        async def final(reader: asyncio.StreamReader) -> None:
            await reader.readuntil(CANCELLED)

        await asyncio.wait_for(asyncio.gather(*(final(r) for r, _, _ in held)), 60)
        fanout_s = time.monotonic() - started
        print(f"\n{IDLE} idle: connected in {connect_s:.1f} s; /healthz + POST while held {answer_s * 1000:.0f} ms; "
              f"cancel of {JOBS} jobs reached all in {fanout_s:.2f} s")  # fmt: skip
    finally:
        # close every socket while the loop runs (else they are collected after it is gone)
        writers = [w for _, w, _ in held] + extra
        for writer in writers:
            writer.close()
        await asyncio.wait_for(asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True), 30)
        server.stop()
        redis.stop()
