"""A client that stops reading costs bounded memory, slows nobody else, and is dropped after SEND_TIMEOUT."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time

import httpx
import pytest
import redis as sync_redis

from core import contract
from core.devredis import RedisProcess
from support import assert_stream_ok, start_server, start_worker, wait_until, watch_sse

pytestmark = pytest.mark.anyio


def open_streams(base: str) -> float:
    """The sum of ``progress_connections`` over transports, from ``/metrics``."""
    text = httpx.get(base + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("progress_connections{"))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def stalled_client(port: int, request: bytes) -> socket.socket:
    """A raw connection with a tiny receive buffer that sends its request and never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(request)
    return sock


WS_HANDSHAKE = (
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def ws_subscribe_frame(job_id: str) -> bytes:
    """A masked client text frame subscribing to ``job_id`` (RFC 6455 section 5.2)."""
    payload = json.dumps({"op": "subscribe", "jobs": [job_id]}).encode()
    assert len(payload) < 126
    mask = os.urandom(4)
    return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def send_buffer_max() -> int:
    """The largest a TCP socket's kernel send buffer grows to (Linux autotuning: tcp_wmem's max)."""
    with open("/proc/sys/net/ipv4/tcp_wmem") as f:
        return int(f.read().split()[2])


def peek(sock: socket.socket) -> bytes:
    """What has arrived on ``sock`` and not been read, left unread."""
    try:
        return sock.recv(1 << 16, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b""


async def test_stalled_sse_and_ws_readers(tmp_path):
    """Every stalled reader is subscribed before the flood starts (its job is queued until a
    worker starts), so each is offered the whole flood, several times what the kernel and
    uvicorn buffer for it: each falls behind, however slow the machine, and is dropped."""
    redis = RedisProcess(tmp_path / "redis", appendonly=False).start()
    server = start_server(redis.url, tmp_path, send_timeout=1)
    worker = None
    stalled: list[socket.socket] = []
    try:
        async with httpx.AsyncClient(timeout=60) as client:
            # a stalled reader takes the kernel's largest send buffer and uvicorn's 64 KiB before a
            # write waits on it: the flood is three times that (13 MB here, 4000-byte events)
            flood = {"count": 3 * (send_buffer_max() + 65536) // 4000, "size": 4000}
            r = await client.post(server.url + "/jobs", json={"type": "flood", "params": flood})
            assert r.status_code == 202, r.text
            job = r.json()  # queued: no worker runs yet
            path = job["links"]["events"]
            baseline = rss_kib(server.pid)
            for _ in range(10):
                stalled.append(stalled_client(server.port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()))
                ws = stalled_client(server.port, WS_HANDSHAKE)
                assert ws.recv(4096).startswith(b"HTTP/1.1 101")  # then subscribe, and never read again
                ws.sendall(ws_subscribe_frame(job["id"]))
                stalled.append(ws)
            for sock in stalled:  # the queued snapshot arrived: subscribed before the first event
                wait_until(lambda s=sock: job["id"].encode() in peek(s), timeout=15, what="a stalled reader subscribed")
            started = time.monotonic()
            reading = asyncio.create_task(watch_sse(client, server.url + path))
            try:
                worker = await asyncio.to_thread(start_worker, redis.url, tmp_path, progress_interval=0)
            finally:
                if worker is None:
                    reading.cancel()
            docs = [e.doc for e in await reading]
            took = time.monotonic() - started
        assert_stream_ok(docs, "succeeded")
        assert took < 30, f"a reading client took {took:.1f} s beside stalled ones"
        growth = rss_kib(server.pid) - baseline
        assert growth < 30_000, f"server grew by {growth} KiB with stalled readers"
        async with httpx.AsyncClient(timeout=5) as client:
            assert (await client.get(server.url + "/healthz")).status_code == 200
        wait_until(lambda: server.log().count("too slow") >= 20, timeout=15, what="all 20 stalled readers dropped")
        # every dropped stream ended as a departed client's does: counted out and unwatched
        channel = contract.channel(job["id"])
        wait_until(lambda: open_streams(server.url) == 0, timeout=5, what="the dropped streams counted out")
        with sync_redis.Redis.from_url(redis.url) as store:
            wait_until(lambda: store.pubsub_numsub(channel) == [(channel.encode(), 0)], timeout=5, what="the job unwatched")
    finally:
        for sock in stalled:
            sock.close()
        for proc in (worker, server):
            if proc:
                proc.stop()
        redis.stop()
