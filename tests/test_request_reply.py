"""The request-reply contract beyond the happy path: idempotency, retries, timeouts, expiry, leases."""

from __future__ import annotations

import asyncio
import pickle
import signal

import httpx
import pytest
import redis

from core import connections, contract
from server import ratelimit
from core.devredis import RedisProcess
from core.settings import Settings
from core.store import Store
from support import SSE, assert_stream_ok, sse_frames, start_server, start_worker, watch_sse

pytestmark = pytest.mark.anyio


async def post(client: httpx.AsyncClient, base: str, job_type: str, params: dict, **headers: str) -> httpx.Response:
    return await client.post(base + "/jobs", json={"type": job_type, "params": params}, headers=headers)


async def run_to_end(client: httpx.AsyncClient, base: str, job_type: str, params: dict) -> list[dict]:
    r = await post(client, base, job_type, params)
    assert r.status_code == 202, r.text
    return [e.doc for e in await watch_sse(client, base + r.json()["links"]["events"])]


# -- idempotency -------------------------------------------------------------------------


async def test_idempotency_key_same_body_same_job(base):
    """The same key and body give back the same job; another body with that key is 422."""
    async with httpx.AsyncClient(timeout=30) as client:
        params = {"steps": 1, "interval": 0}
        first = await post(client, base, "demo", params, **{"Idempotency-Key": "order-17"})
        again = await post(client, base, "demo", params, **{"Idempotency-Key": "order-17"})
        assert first.status_code == again.status_code == 202
        assert first.json()["id"] == again.json()["id"]
        other = await post(client, base, "demo", {"steps": 2, "interval": 0}, **{"Idempotency-Key": "order-17"})
        assert other.status_code == 422 and other.json()["errors"][0]["field"] == "Idempotency-Key"
        fresh = await post(client, base, "demo", params, **{"Idempotency-Key": "order-18"})
        assert fresh.json()["id"] != first.json()["id"]


async def test_fifty_concurrent_identical_requests_make_one_job(base, redis_client):
    before = redis_client.zcard(contract.jobs_index(""))
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=50)) as client:
        answers = await asyncio.gather(
            *(post(client, base, "demo", {"steps": 1, "interval": 0}, **{"Idempotency-Key": "burst-1"}) for _ in range(50))
        )
    assert {r.status_code for r in answers} == {202}
    assert len({r.json()["id"] for r in answers}) == 1
    assert redis_client.zcard(contract.jobs_index("")) == before + 1


async def test_concurrent_submits_each_get_their_own_answer(base, redis_client):
    """Submits that arrive together share one Redis pipeline (``core.batched.Batched``): each still gets
    its own outcome, whatever the others' are."""
    params = {"steps": 1, "interval": 0}
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=40)) as client:
        first = await post(client, base, "demo", params, **{"Idempotency-Key": "mixed-1"})
        assert first.status_code == 202
        same, other, keyed, plain = await asyncio.gather(
            asyncio.gather(*(post(client, base, "demo", params, **{"Idempotency-Key": "mixed-1"}) for _ in range(10))),
            asyncio.gather(*(post(client, base, "demo", {"steps": 2}, **{"Idempotency-Key": "mixed-1"}) for _ in range(10))),
            asyncio.gather(*(post(client, base, "demo", params, **{"Idempotency-Key": f"mixed-{i + 2}"}) for i in range(10))),
            asyncio.gather(*(post(client, base, "demo", params) for _ in range(10))),
        )
    assert [r.status_code for r in same] == [202] * 10 and {r.json()["id"] for r in same} == {first.json()["id"]}
    assert [r.status_code for r in other] == [422] * 10
    assert {r.json()["errors"][0]["field"] for r in other} == {"Idempotency-Key"}
    created = [r.json()["id"] for r in keyed + plain]
    assert [r.status_code for r in keyed + plain] == [202] * 20 and len(set(created)) == 20
    assert first.json()["id"] not in created
    for job_id in created:  # each answer is its own job's document
        assert redis_client.hexists(contract.job_key(job_id), "ev")


async def test_submit_after_redis_forgot_its_scripts(base, redis_client):
    """A restarted Redis has no scripts loaded: the first submits load it again and succeed."""
    redis_client.script_flush()
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=10)) as client:
        answers = await asyncio.gather(*(post(client, base, "demo", {"steps": 1, "interval": 0}) for _ in range(10)))
    assert [r.status_code for r in answers] == [202] * 10, answers[0].text
    assert len({r.json()["id"] for r in answers}) == 10


async def test_a_creation_sent_again_after_a_lost_reply_changes_nothing(redis_server, monkeypatch):
    """redis-py sends a whole pipeline again after a dropped connection, answered calls included:
    the same creation run twice must not count against the rate limit or make a second job."""
    redis_async = connections.client(redis_server.url)
    try:
        store = Store(redis_async, Settings(redis_url=redis_server.url))
        monkeypatch.setattr(contract, "new_job_id", lambda: "j_sent_twice")
        rate = (ratelimit.window_key("submit", "sent-twice"), 1, ratelimit.WINDOW)
        first, _, created = await store.create("demo", {}, "t-twice", rate=rate)
        again, _, created_again = await store.create("demo", {}, "t-twice", rate=rate)
        assert created and created_again and first["id"] == again["id"] == "j_sent_twice"
        assert int(await redis_async.get(rate[0])) == 1
        assert await redis_async.zcard(contract.jobs_index("t-twice")) == 1
    finally:
        await redis_async.aclose()


# -- retries, timeouts, sync jobs --------------------------------------------------------


async def test_failed_attempts_are_retried_and_visible(own_redis, tmp_path):
    """A job failing twice (max_tries 3) is re-queued twice, visibly, then succeeds on attempt 3.
    The watcher subscribes before any worker exists, so it sees every attempt."""
    server = start_server(own_redis.url, tmp_path)
    worker = None
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            job = (await post(client, server.url, "flaky", {"fail_times": 2})).json()
            docs: list[dict] = []
            async with client.stream("GET", server.url + job["links"]["events"]) as resp:
                async for item in sse_frames(resp):
                    if isinstance(item, SSE):
                        docs.append(item.doc)
                        if worker is None:
                            worker = start_worker(own_redis.url, tmp_path)
            assert_stream_ok(docs, "succeeded")
            retries = [d for d in docs if d["status"] == "queued" and d["error"]]
            assert [d["attempt"] for d in retries] == [1, 2]
            assert retries[0]["error"]["message"] == "attempt 1 failed" and "retrying" in retries[0]["message"]
            assert {d["attempt"] for d in docs if d["status"] == "running"} == {1, 2, 3}
            assert docs[-1]["attempt"] == 3 and docs[-1]["error"] is None
            history = [(a["attempt"], a["outcome"], a["error"] and a["error"]["message"]) for a in docs[-1]["attempts"]]
            assert history == [(1, "retrying", "attempt 1 failed"), (2, "retrying", "attempt 2 failed"), (3, "succeeded", None)]
            assert all(a["started_at"] <= a["ended_at"] for a in docs[-1]["attempts"])
            assert (await client.get(server.url + job["links"]["result"])).json() == {"attempt": 3}
    finally:
        for proc in (worker, server):
            if proc:
                proc.stop()


async def test_retry_raised_by_job_code(base):
    async with httpx.AsyncClient(timeout=30) as client:
        docs = await run_to_end(client, base, "flaky", {"fail_times": 1, "use_retry": True})
    assert docs[-1]["status"] == "succeeded" and docs[-1]["attempt"] == 2


async def test_failing_for_good_is_failed_and_listed(base):
    async with httpx.AsyncClient(timeout=30) as client:
        r = await post(client, base, "flaky", {"fail_times": 9})
        job_id = r.json()["id"]
        while (doc := (await client.get(base + f"/jobs/{job_id}?redirect=0")).json())["status"] not in contract.TERMINAL:
            await client.get(base + f"/jobs/{job_id}", params={"wait": 5, "after": doc["seq"]})
        assert doc["status"] == "failed" and doc["attempt"] == 3
        assert doc["error"] == {"type": "RuntimeError", "message": "attempt 3 failed"}
        listed = (await client.get(base + "/jobs", params={"status": "failed", "type": "flaky", "limit": 100})).json()
        assert job_id in [d["id"] for d in listed["items"]]


async def test_post_retry_reruns_a_failed_job_as_next_attempt(base):
    async with httpx.AsyncClient(timeout=30) as client:
        docs = await run_to_end(client, base, "demo", {"steps": 3, "interval": 0, "fail_at_step": 2})
        job = docs[-1]
        assert job["status"] == "failed"
        r = await client.post(base + f"/jobs/{job['id']}/retry")
        assert r.status_code == 202
        assert (r.json()["status"], r.json()["seq"], r.json()["error"], r.json()["expires_at"]) == ("queued", job["seq"] + 1, None, None)
        assert job["expires_at"] is not None
        again = [e.doc for e in await watch_sse(client, base + job["links"]["events"] + f"?since={job['seq']}")]
        assert again[-1]["status"] == "failed" and again[-1]["attempt"] == 2
        assert [(a["attempt"], a["outcome"]) for a in again[-1]["attempts"]] == [(1, "failed"), (2, "failed")]
        assert again[0]["seq"] > job["seq"]
        running = await post(client, base, "demo", {"steps": 50, "interval": 0.1})
        refused = await client.post(base + f"/jobs/{running.json()['id']}/retry")
        assert refused.status_code == 409
        await client.delete(base + f"/jobs/{running.json()['id']}")


async def test_timeout_fails_the_job(base):
    async with httpx.AsyncClient(timeout=30) as client:
        docs = await run_to_end(client, base, "wait", {"seconds": 30})
    assert docs[-1]["status"] == "failed"
    assert docs[-1]["error"]["type"] == "TimeoutError" and "1.5 s" in docs[-1]["error"]["message"]


async def test_sync_job_runs_in_a_thread_and_reports(base):
    async with httpx.AsyncClient(timeout=30) as client:
        docs = await run_to_end(client, base, "count_sync", {"steps": 5})
        assert_stream_ok(docs, "succeeded")
        assert "sync step 3" in {d["message"] for d in docs}
        result = await client.get(base + docs[-1]["links"]["result"])
    assert result.json() == 5


async def test_retry_after_follows_the_eta(base):
    async with httpx.AsyncClient(timeout=30) as client:
        job = (await post(client, base, "demo", {"steps": 20, "interval": 0.5})).json()
        doc = job
        while not doc["eta_s"]:
            r = await client.get(base + job["links"]["self"], params={"wait": 5, "after": doc["seq"]})
            doc = r.json()
        r = await client.get(base + job["links"]["self"])
        eta = r.json()["eta_s"]
        assert int(r.headers["retry-after"]) == min(10, max(1, round(eta / 4)))
        await client.delete(base + job["links"]["self"])


async def test_cancel_of_unknown_id_changes_nothing(base, redis_client):
    """A DELETE of an id that does not exist is 404 and leaves no cancel mark for a later job."""
    async with httpx.AsyncClient() as client:
        r = await client.delete(base + "/jobs/j_never_existed")
    assert r.status_code == 404
    assert redis_client.exists(contract.cancel_key("j_never_existed")) == 0
    assert redis_client.zscore("arq:abort", "j_never_existed") is None


# -- with their own processes ------------------------------------------------------------


@pytest.fixture
def own_redis(tmp_path):
    redis = RedisProcess(tmp_path / "redis").start()
    yield redis
    redis.stop()


async def test_expired_job_answers_410_not_404(own_redis, tmp_path):
    """After RESULT_TTL the document and result are gone: 410 on status, result, stream, cancel."""
    server = start_server(own_redis.url, tmp_path, result_ttl=1)
    worker = start_worker(own_redis.url, tmp_path, result_ttl=1)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            docs = await run_to_end(client, server.url, "demo", {"steps": 1, "interval": 0})
            links = docs[-1]["links"]
            deadline = asyncio.get_running_loop().time() + 10
            while (await client.get(links["self"])).status_code != 410:
                assert asyncio.get_running_loop().time() < deadline, "document did not expire"
                await asyncio.sleep(0.1)
            for r in (await client.get(links["result"]), await client.get(links["events"]), await client.delete(links["self"])):
                assert r.status_code == 410 and r.headers["content-type"] == "application/problem+json"
            assert (await client.get("/jobs/j_never_existed")).status_code == 404
    finally:
        worker.stop()
        server.stop()


async def test_stalled_job_is_flagged_then_recovers(own_redis, tmp_path):
    server = start_server(own_redis.url, tmp_path)
    worker = start_worker(own_redis.url, tmp_path, stall_after=0.4, lease=0.6)
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            docs = await run_to_end(client, server.url, "wait", {"seconds": 1.2, "report_every": 0.6})
        stalled = [d["stalled"] for d in docs if d["status"] == "running"]
        assert True in stalled, stalled
        assert stalled[stalled.index(True) + 1 :].count(False) >= 1, "a report after the stall clears it"
        assert docs[-1]["status"] == "succeeded" and docs[-1]["stalled"] is False
    finally:
        worker.stop()
        server.stop()


async def test_worker_killed_mid_job_is_rerun_within_the_lease(own_redis, tmp_path):
    """SIGKILL the worker mid-job: another worker runs it again (attempt 2) after ~LEASE, not minutes;
    watchers see seq keep rising across attempts and exactly one final state."""
    server = start_server(own_redis.url, tmp_path)
    first = start_worker(own_redis.url, tmp_path, name="first", lease=1)
    second = None
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            job = (await post(client, server.url, "long", {"seconds": 2})).json()
            docs: list[dict] = []
            killed_at = rerun_at = None
            async with client.stream("GET", server.url + job["links"]["events"]) as resp:
                async for item in sse_frames(resp):
                    if not isinstance(item, SSE):
                        continue
                    docs.append(item.doc)
                    if item.doc["message"] == "tick 3" and first.alive():
                        first.stop(signal.SIGKILL)
                        killed_at = asyncio.get_running_loop().time()
                        second = start_worker(own_redis.url, tmp_path, name="second", lease=1)
                    if item.doc["attempt"] == 2 and item.doc["status"] == "running" and rerun_at is None:
                        rerun_at = asyncio.get_running_loop().time()
        assert_stream_ok(docs, "succeeded")
        assert docs[-1]["attempt"] == 2
        assert [(a["attempt"], a["outcome"]) for a in docs[-1]["attempts"]] == [(1, "lost"), (2, "succeeded")]
        assert killed_at is not None and rerun_at is not None
        assert rerun_at - killed_at < 5, f"re-run took {rerun_at - killed_at:.1f} s"
    finally:
        for proc in (first, second, server):
            if proc:
                proc.stop()


async def test_worker_sigterm_requeues_running_job(own_redis, tmp_path):
    """SIGTERM mid-job: the job goes back to queued (not failed) and the next worker finishes it."""
    server = start_server(own_redis.url, tmp_path)
    first = start_worker(own_redis.url, tmp_path, name="first")
    second = None
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            job = (await post(client, server.url, "long", {"seconds": 1.5})).json()
            docs: list[dict] = []
            async with client.stream("GET", server.url + job["links"]["events"]) as resp:
                async for item in sse_frames(resp):
                    if not isinstance(item, SSE):
                        continue
                    docs.append(item.doc)
                    if item.doc["message"] == "tick 2" and first.alive():
                        first.stop(signal.SIGTERM)
                        second = start_worker(own_redis.url, tmp_path, name="second")
        assert_stream_ok(docs, "succeeded")
        requeued = [d for d in docs if d["status"] == "queued" and d["attempt"] == 1]
        assert requeued and requeued[0]["message"] == "worker stopped; job re-queued"
        assert "failed" not in {d["status"] for d in docs}
        assert [a["outcome"] for a in docs[-1]["attempts"]][-1] == "succeeded" and docs[-1]["attempts"][0]["outcome"] == "requeued"
    finally:
        for proc in (first, second, server):
            if proc:
                proc.stop()


async def test_crafted_pickle_payload_fails_the_job_and_runs_nothing(own_redis, tmp_path):
    """A pickle written into arq's job key (by someone who can write to Redis) is never unpickled:
    the JSON deserializer rejects it, the job ends failed, and the payload's code does not run."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    server = start_server(own_redis.url, tmp_path)  # no worker yet: the job stays queued
    worker = None
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            job = (await post(client, server.url, "demo", {"steps": 1, "interval": 0})).json()
            crafted = pickle.dumps({"t": 1, "f": "demo", "a": [Exploit()], "k": {}, "et": 0})
            redis.Redis.from_url(own_redis.url).set(f"arq:job:{job['id']}", crafted)
            worker = start_worker(own_redis.url, tmp_path)
            docs = [e.doc for e in await watch_sse(client, server.url + job["links"]["events"])]
        assert docs[-1]["status"] == "failed" and docs[-1]["error"]["type"] == "JobRejected"
        assert not marker.exists()
    finally:
        for proc in (worker, server):
            if proc:
                proc.stop()
