"""Redis settings that break our promises are named at start and in /readyz (which stays 200).

Real Redis-compatible servers started with the settings a managed service often has.
"""

from __future__ import annotations

import httpx
import pytest
import redis.asyncio as aioredis

from core import redischeck
from core.devredis import RedisProcess
from support import start_server, start_worker

pytestmark = pytest.mark.anyio

EVICTS = "Redis maxmemory-policy is allkeys-lru: under memory pressure it evicts keys"
NOTHING_KEPT = "Redis has neither AOF nor a replica: a Redis crash or restart loses everything (no RDB snapshots either)"


async def facts_of(server: RedisProcess) -> dict:
    client = aioredis.Redis.from_url(server.url)
    try:
        return await redischeck.facts(client)
    finally:
        await client.aclose()


def test_eviction_and_no_persistence_are_warned_by_server_worker_and_readyz(tmp_path):
    redis = RedisProcess(tmp_path / "redis", appendonly=False, args=("--maxmemory-policy", "allkeys-lru")).start()
    procs = []
    try:
        procs.append(worker := start_worker(redis.url, tmp_path))
        procs.append(server := start_server(redis.url, tmp_path))
        r = httpx.get(server.url + "/readyz", timeout=5)
    finally:
        for proc in procs:
            proc.stop()
        redis.stop()
    assert r.status_code == 200
    found = r.json()["redis"]
    assert (found["maxmemory_policy"], found["aof"], found["replicas"], found["rdb_save"]) == ("allkeys-lru", False, 0, "")
    assert len(found["warnings"]) == 2
    assert found["warnings"][0].startswith(EVICTS) and found["warnings"][1].startswith(NOTHING_KEPT)
    for proc, who in ((server, "server"), (worker, "worker")):
        log = proc.log()
        assert log.count(f"{who}: {EVICTS}") == 1 and log.count(f"{who}: {NOTHING_KEPT}") == 1, log[-2000:]


async def test_rdb_only_says_what_a_crash_loses(tmp_path):
    redis = RedisProcess(tmp_path / "redis", appendonly=False, args=("--save", "60 1")).start()
    try:
        found = await facts_of(redis)
    finally:
        redis.stop()
    assert found["warnings"] == [
        "Redis has neither AOF nor a replica: a Redis crash or restart loses what was written since the last RDB "
        "snapshot (save '60 1'), accepted jobs, progress and final states included; set appendonly yes (appendfsync everysec)"
    ]


async def test_config_disabled_still_reads_info(tmp_path):
    """Managed services often disable CONFIG: INFO alone still tells the policy and AOF."""
    redis = RedisProcess(tmp_path / "redis", args=("--rename-command", "CONFIG", "")).start()
    try:
        found = await facts_of(redis)
    finally:
        redis.stop()
    assert (found["maxmemory_policy"], found["aof"], found["appendfsync"], found["warnings"]) == ("noeviction", True, None, [])


def test_the_embedded_server_keeps_everything(base):
    """What `make run` and the tests start: noeviction, AOF with fsync every second: no warning."""
    found = httpx.get(base + "/readyz", timeout=5).json()["redis"]
    assert (found["maxmemory_policy"], found["aof"], found["appendfsync"], found["warnings"]) == ("noeviction", True, "everysec", [])
