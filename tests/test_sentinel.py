"""Sentinel failover, counted like the chaos test: nothing accepted is lost.

A primary, a replica and a sentinel (the same Valkey binary in sentinel mode) run on loopback; a
server and a worker use ``REDIS_URL=redis+sentinel://…``. Jobs are accepted and watched, then the
primary is SIGKILLed. The sentinel promotes the replica; the server, its hub and the worker must
follow it by themselves, every job accepted before or after the kill must end ``succeeded``, and
every watcher must see that exactly once with seq never repeating or going back.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis

from core import connections
from core.devredis import RedisProcess, find_binary, free_port
from support import start_server, start_worker, tally, wait_until, watch_with_retries

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SERVICE = "primary"
BEFORE, AFTER = 20, 10  # jobs accepted before and after the primary dies


class SentinelProcess:
    """One sentinel watching ``primary_port``; it declares the primary down after 1 s."""

    def __init__(self, folder: Path, primary_port: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = folder / "sentinel.conf"  # sentinel rewrites its config file, so it is its own
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {folder}\nlogfile {folder / 'sentinel.log'}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 1\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
            f"sentinel failover-timeout {SERVICE} 5000\n"
        )
        self.proc = subprocess.Popen([find_binary(), str(config), "--sentinel"], stdout=subprocess.DEVNULL)
        self.client = redis.Redis(port=self.port, socket_timeout=1)
        wait_until(self._knows_primary, timeout=10, what="sentinel to start")

    def _knows_primary(self) -> bool:
        try:
            return self.client.sentinel_get_master_addr_by_name(SERVICE) is not None
        except redis.ConnectionError:
            return False

    def primary_port(self) -> int:
        return int(self.client.sentinel_get_master_addr_by_name(SERVICE)[1])

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(10)


def test_sentinel_url_forms():
    target = connections.sentinel_target("redis+sentinel://:s3cret@10.0.0.1:26379,[::1]:26380/mymaster/2")
    assert target == connections.SentinelTarget(
        sentinels=[("10.0.0.1", 26379), ("::1", 26380)], service="mymaster", db=2, password="s3cret"
    )
    assert connections.sentinel_target("redis://127.0.0.1:6379/0") is None
    target = connections.parse("rediss+sentinel://a:1/m")
    assert (target.sentinel.sentinels, target.sentinel.service, target.options) == ([("a", 1)], "m", {"db": 0, "ssl": True})
    for bad in ("redis+sentinel://a:1", "redis+sentinel://a/m", "redis+sentinel://a:1/m/x"):
        with pytest.raises(ValueError):
            connections.sentinel_target(bad)


async def submit(client: httpx.AsyncClient, base: str, deadline: float) -> dict:
    """POST a job like a careful script: on 503 (Redis failing over) retry with the same
    Idempotency-Key, so a retry cannot create a second job."""
    key = uuid.uuid4().hex
    body = {"type": "long", "params": {"seconds": random.uniform(1.0, 2.5)}}
    while time.monotonic() < deadline:
        try:
            resp = await client.post(base + "/jobs", json=body, headers={"Idempotency-Key": key})
        except httpx.HTTPError:
            resp = None
        if resp is not None and resp.status_code == 202:
            return resp.json()
        assert resp is None or resp.status_code == 503, resp.text
        await asyncio.sleep(0.2)
    raise AssertionError("POST /jobs kept failing after the failover")


async def test_failover_loses_nothing(tmp_path, capsys):
    primary = RedisProcess(tmp_path / "primary").start()
    replica = RedisProcess(tmp_path / "replica", args=("--replicaof", f"127.0.0.1 {primary.port}")).start()
    started = [primary, replica]
    try:
        wait_until(lambda: redis.Redis(port=replica.port).info("replication")["master_link_status"] == "up", what="replica in sync")
        sentinel = SentinelProcess(tmp_path / "sentinel", primary.port)
        started.append(sentinel)
        url = f"redis+sentinel://127.0.0.1:{sentinel.port}/{SERVICE}/0"
        server = start_server(url, tmp_path)
        started.append(server)
        started.append(start_worker(url, tmp_path, probe_url=primary.url, lease=1.5, worker_concurrency=40))

        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=30), limits=httpx.Limits(max_connections=100)) as client:
            deadline = time.monotonic() + 60
            jobs = [await submit(client, server.url, deadline) for _ in range(BEFORE)]
            loop_deadline = asyncio.get_running_loop().time() + 60
            watchers = [asyncio.create_task(watch_with_retries(client, [server], job, loop_deadline)) for job in jobs]
            await asyncio.sleep(0.5)  # the jobs are running and being watched

            primary.kill()
            killed = time.monotonic()
            await asyncio.to_thread(wait_until, lambda: sentinel.primary_port() == replica.port, 20, 0.1, "failover")
            promoted = time.monotonic() - killed

            later = [await submit(client, server.url, deadline) for _ in range(AFTER)]
            watchers += [asyncio.create_task(watch_with_retries(client, [server], job, loop_deadline)) for job in later]
            jobs += later
            seen = await asyncio.wait_for(asyncio.gather(*watchers), 90)

        finals, reruns, lost = tally(redis.Redis(port=replica.port), jobs, seen)
        with capsys.disabled():
            print(
                f"\nsentinel failover: promoted after {promoted:.1f} s; accepted={len(jobs)} "
                f"final={dict(finals)} re-run (attempt>1)={reruns} lost={lost}"
            )
        assert lost == 0 and finals["succeeded"] == len(jobs)
    finally:
        for proc in reversed(started):
            proc.stop()
