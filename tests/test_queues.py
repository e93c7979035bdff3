"""Named queues, priorities and fair turns between tenants (``core.queue``), end to end: real
servers and workers (each test with a Redis of its own, so that the suite's worker takes nothing
here), submits over HTTP, and each job's result saying which worker ran it and when it started."""

from __future__ import annotations

import asyncio
import json
import re
import signal

import httpx
import pytest
import redis

from core import contract, queue
from support import async_wait_until, start_server, start_worker

pytestmark = pytest.mark.anyio


async def submit(client: httpx.AsyncClient, job_type: str, key: str = "", **body) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    answer = await client.post("/jobs", json={"type": job_type, **body}, headers=headers)
    assert answer.status_code == 202, answer.text
    return answer.json()


async def finished(client: httpx.AsyncClient, job: dict, key: str = "") -> dict:
    """The job's document once it has ended (long polls, each up to 5 s)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}

    async def ended():
        doc = (await client.get(f"/jobs/{job['id']}?wait=5", headers=headers)).json()
        return doc if doc["status"] in ("succeeded", "failed", "cancelled") else None

    return await async_wait_until(ended, 30, f"job {job['id']} to end")


async def ran(client: httpx.AsyncClient, job: dict, key: str = "") -> dict:
    """What the job's result says: the pid of the worker that ran it and when it started."""
    assert (await finished(client, job, key))["status"] == "succeeded"
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return (await client.get(f"/jobs/{job['id']}/result", headers=headers)).json()


async def test_each_worker_runs_only_the_queues_it_serves(own_redis, tmp_path):
    """``WORKER_QUEUES``: a worker never takes a job of a queue it does not serve; the document,
    ``GET /jobs?queue=``, ``GET /queues`` and ``/metrics`` say where each job waits."""
    server = start_server(own_redis.url, tmp_path)
    light = start_worker(own_redis.url, tmp_path, "light", worker_queues="default")
    heavy = None
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            heavy_jobs = [await submit(client, "heavy_slot") for _ in range(3)]
            light_jobs = [await submit(client, "slot") for _ in range(3)]
            assert {(j["queue"], j["priority"]) for j in heavy_jobs} == {("heavy", 0)}
            assert {j["queue"] for j in light_jobs} == {"default"}
            for job in light_jobs:
                assert (await ran(client, job))["pid"] == light.pid
            # no worker serves "heavy": its jobs wait, and say so
            for job in heavy_jobs:
                doc = (await client.get(job["links"]["self"])).json()
                assert doc["status"] == "queued" and doc["message"] == "waiting for a worker that runs type 'heavy_slot'"
            listed = (await client.get("/jobs?queue=heavy")).json()["items"]
            assert sorted(j["id"] for j in listed) == sorted(j["id"] for j in heavy_jobs)
            queues = {q["name"]: q for q in (await client.get("/queues")).json()["items"]}
            assert queues["heavy"]["waiting"] == 3 and queues["heavy"]["workers"] == 0 and queues["heavy"]["oldest_waiting_s"] > 0
            assert queues["default"] == {"name": "default", "waiting": 0, "oldest_waiting_s": None, "running": 0, "limit": 10, "workers": 1}
            metrics = (await client.get("/metrics")).text
            assert re.search(r'^progress_queue_waiting\{queue="heavy"\} 3\.0$', metrics, re.M), metrics
            # a queued job cancelled leaves its own queue
            assert (await client.delete(heavy_jobs[0]["links"]["self"])).status_code == 200
            store = redis.Redis.from_url(own_redis.url)
            assert store.zscore(queue.queue_key("heavy"), heavy_jobs[0]["id"]) is None
            assert store.zcard(queue.queue_key("heavy")) == 2
            heavy = start_worker(own_redis.url, tmp_path, "heavy", worker_queues="heavy:1")
            for job in heavy_jobs[1:]:
                assert (await ran(client, job))["pid"] == heavy.pid
            workers = {w["pid"]: w for w in (await client.get("/workers")).json()["items"]}
            assert workers[heavy.pid]["queues"] == {"heavy": {"limit": 1, "running": 0}}
            assert workers[heavy.pid]["types"] == ["heavy_slot"]
            assert "heavy_slot" not in workers[light.pid]["types"]
    finally:
        for proc in (heavy, light, server):
            if proc is not None:
                proc.stop()


async def test_a_high_priority_job_passes_a_burst_of_low_priority_ones(own_redis, tmp_path):
    """One job slot; 30 priority-0 jobs, then one of priority 9: it starts as soon as the job
    running when it came has ended (the other 29 wait), and the rest keep their order."""
    server = start_server(own_redis.url, tmp_path)
    worker = start_worker(own_redis.url, tmp_path, worker_concurrency=1)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            low = [await submit(client, "slot", params={"seconds": 0.2}) for _ in range(30)]

            async def first_running():
                return (await client.get(low[0]["links"]["self"])).json()["status"] == "running"

            await async_wait_until(first_running, 10, "the first low-priority job to run")
            high = await submit(client, "slot", priority=9)
            assert high["priority"] == 9
            high_started = (await ran(client, high))["started"]
            starts = [(await ran(client, job))["started"] for job in low]
            before = [s for s in starts if s < high_started]
            print(f"low-priority jobs started before the priority-9 one: {len(before)} of {len(low)}")
            # the one running when it came, and at most one more that a worker took in the same instant
            assert 1 <= len(before) <= 2, f"{len(before)} low-priority jobs started before the high-priority one"
            assert starts == sorted(starts)  # equal priorities: first in, first out
    finally:
        worker.stop()
        server.stop()


async def test_a_tenants_next_job_does_not_wait_behind_another_tenants_thousands(own_redis, tmp_path):
    """Tenant A has 2,000 jobs queued; tenant B's one job starts within a few job slots."""
    keys = "tenant-a:key-aaaaaaaa,tenant-b:key-bbbbbbbb"
    server = start_server(own_redis.url, tmp_path, api_keys=keys, rate_submit=100_000)
    worker = start_worker(own_redis.url, tmp_path, worker_concurrency=2)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            a_jobs: list[dict] = []
            for _ in range(40):  # 2,000 in batches of 50
                a_jobs += await asyncio.gather(*(submit(client, "slot", "key-aaaaaaaa", params={"seconds": 0.02}) for _ in range(50)))
            queues = (await client.get("/queues", headers={"Authorization": "Bearer key-aaaaaaaa"})).json()["items"]
            waiting = next(q["waiting"] for q in queues if q["name"] == "default")
            assert waiting > 1500, f"only {waiting} of tenant A's jobs still queued: the test would prove nothing"
            b_job = await submit(client, "slot", "key-bbbbbbbb")
            b_doc = await finished(client, b_job, "key-bbbbbbbb")
            assert b_doc["status"] == "succeeded"
            # A's jobs that started after B's submit and before B's job (ISO times in one format sort as text)
            store = redis.Redis.from_url(own_redis.url)
            docs = [json.loads(contract.unpack(store.hget(contract.job_key(j["id"]), "ev")).doc) for j in a_jobs]
            overtook = [d for d in docs if d["started_at"] and b_job["created_at"] < d["started_at"] < b_doc["started_at"]]
            queued = sum(1 for d in docs if d["status"] == "queued")
            print(f"tenant A: {waiting} queued at B's submit, {len(overtook)} started before B's job, {queued} still queued after")
            assert len(overtook) <= 3, f"{len(overtook)} of tenant A's jobs started between tenant B's submit and its start"
            assert queued > 1000  # A's burst was still waiting
    finally:
        worker.stop()
        server.stop()


async def test_a_named_queues_job_whose_worker_is_killed_runs_again_on_another(own_redis, tmp_path):
    """The lease of a job taken from a named queue lapses with its SIGKILLed worker; a worker
    serving that queue runs it again (attempts: lost, then succeeded)."""
    server = start_server(own_redis.url, tmp_path)
    first = start_worker(own_redis.url, tmp_path, "first", worker_queues="heavy", lease=1.5)
    second = None
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            job = await submit(client, "heavy_slot", params={"seconds": 3})

            async def running() -> bool:
                return (await client.get(job["links"]["self"])).json()["status"] == "running"

            await async_wait_until(running, 10, "the job to run")
            first.stop(signal.SIGKILL)
            second = start_worker(own_redis.url, tmp_path, "second", worker_queues="heavy", lease=1.5)
            assert (await ran(client, job))["pid"] == second.pid
            attempts = (await client.get(job["links"]["self"] + "?redirect=0")).json()["attempts"]
            assert [a["outcome"] for a in attempts] == ["lost", "succeeded"]
    finally:
        for proc in (second, first, server):
            if proc is not None:
                proc.stop()


async def test_priority_is_bounded_per_tenant(own_redis, tmp_path):
    """``MAX_PRIORITY`` and ``TENANT_MAX_PRIORITY``: above a tenant's bound is a 422 naming
    ``priority`` that creates nothing; a type's own default priority is capped at it."""
    keys = "acme:key-acme-0001,globex:key-globex-01"
    server = start_server(own_redis.url, tmp_path, api_keys=keys, tenant_max_priority="acme:2", max_priority=7)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            for key, asked, status in (("key-acme-0001", 3, 422), ("key-acme-0001", 2, 202), ("key-globex-01", 8, 422), ("key-globex-01", 7, 202)):
                answer = await client.post("/jobs", json={"type": "slot", "priority": asked}, headers={"Authorization": f"Bearer {key}"})
                assert answer.status_code == status, (key, asked, answer.text)
                if status == 422:
                    assert answer.json()["errors"][0]["field"] == "priority" and "0 to" in answer.json()["detail"]
            listed = (await client.get("/jobs", headers={"Authorization": "Bearer key-acme-0001"})).json()["items"]
            assert [j["priority"] for j in listed] == [2]
    finally:
        server.stop()


def test_bad_queue_and_priority_settings_stop_the_process_at_start():
    from core.settings import Settings
    from worker.registry import REGISTRY
    from worker.runtime import served_queues

    for bad in ({"TENANT_MAX_PRIORITY": "acme:10"}, {"TENANT_MAX_PRIORITY": "acme"}, {"MAX_PRIORITY": "12"}, {"PRIORITY_STEP": "0"}):
        with pytest.raises(SystemExit):
            Settings.from_env(bad)
    for bad in ("heavy:0", "Heavy", "heavy,heavy", "health-check", "a:b"):
        with pytest.raises(SystemExit):
            served_queues(bad, REGISTRY, 10)
    assert served_queues("heavy:2, default", REGISTRY, 10) == {"heavy": 2, "default": 10}
    assert served_queues("heavy:20", REGISTRY, 10) == {"heavy": 10}  # never above WORKER_CONCURRENCY
