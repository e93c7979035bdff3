"""Jepsen-style count under a sequence of faults: nothing accepted is lost.

40 jobs are accepted (202) while, in turn, a worker is SIGKILLed, Redis is SIGKILLed and restarted
from its AOF, the pub/sub connection is killed, and a server is SIGKILLed. Each job is watched by
a client that reconnects like a browser (to any live server, with Last-Event-ID). At the end every
job must be in exactly one terminal state, every watcher must have seen it exactly once, seq
never repeated or went back, and duplicate executions (allowed: at-least-once) are counted.
"""

from __future__ import annotations

import asyncio
import random
import signal

import httpx
import pytest
import redis

from core.devredis import RedisProcess
from support import start_server, start_worker, tally, watch_with_retries

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

JOBS = 40


async def test_faults_lose_nothing(tmp_path, capsys):
    r = RedisProcess(tmp_path / "redis").start()
    servers = [start_server(r.url, tmp_path), start_server(r.url, tmp_path)]
    workers = [start_worker(r.url, tmp_path, name="w1", lease=1.5), start_worker(r.url, tmp_path, name="w2", lease=1.5)]
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=30), limits=httpx.Limits(max_connections=200)) as client:
            jobs = []
            for i in range(JOBS):
                resp = await client.post(servers[i % 2].url + "/jobs", json={"type": "long", "params": {"seconds": random.uniform(1.5, 4)}})
                assert resp.status_code == 202
                jobs.append(resp.json())
            deadline = asyncio.get_running_loop().time() + 60
            watching = asyncio.gather(*(watch_with_retries(client, servers, job, deadline) for job in jobs))

            await asyncio.sleep(1.0)  # faults are spaced in time: each lasts as long as it lasts
            workers[0].stop(signal.SIGKILL)
            workers[0] = start_worker(r.url, tmp_path, name="w3", lease=1.5)
            await asyncio.sleep(1.0)
            r.kill()
            r.start()
            await asyncio.sleep(1.5)
            redis.Redis.from_url(r.url).client_kill_filter(_type="pubsub")
            await asyncio.sleep(0.5)
            servers[1].stop(signal.SIGKILL)
            servers.append(start_server(r.url, tmp_path))

            seen = await asyncio.wait_for(watching, 150)

        finals, duplicates, lost = tally(redis.Redis.from_url(r.url), jobs, seen)
        with capsys.disabled():
            print(f"\nchaos: accepted={JOBS} final={dict(finals)} re-run (attempt>1)={duplicates} lost={lost}")
        assert lost == 0 and finals["succeeded"] == JOBS
    finally:
        for proc in servers + workers:
            proc.stop()
        r.stop()
