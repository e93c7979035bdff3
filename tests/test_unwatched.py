"""Abandoned work: a job with ``cancel_when_unwatched=S`` is cancelled about S seconds after its
last watcher left, and not while anyone watches it (a job stream, a WebSocket subscription, a long
poll, on any server), nor when it has a webhook.

Real processes: this module's own Redis, a worker with a short lease (its beat, which looks for
abandoned jobs, comes every half second) and two servers. The tests observe the jobs through Redis
itself or a dashboard's every-job feed, neither of which counts as watching a job.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect

from core import contract
from core.devredis import RedisProcess
from support import SSE, Proc, async_wait_until, sse_frames, start_server, start_worker
from test_webhooks import SECRET, Receiver, answer

pytestmark = pytest.mark.anyio

S = 5.0  # the ``abandonable`` job type's cancel_when_unwatched (tests/testjobs.py)
LEASE = 1.5  # the worker looks for abandoned jobs every LEASE / 3
LATEST = contract.WATCH_BEAT + LEASE / 3 + 2  # after S: the last mark, the worker's beat, and slack
SETTINGS = {"lease": LEASE, "webhook_secret": SECRET, "webhook_allowed_hosts": "127.0.0.1/32", "webhook_backoff": 0.1}
UNWATCHED = {"type": "Unwatched", "message": "no one watched this job for 5 s"}


@dataclass
class Stack:
    redis: RedisProcess
    worker: Proc
    a: Proc
    b: Proc


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("unwatched")
    redis = RedisProcess(tmp / "redis").start()
    procs: list[Proc] = []
    try:
        procs.append(start_worker(redis.url, tmp, **SETTINGS))
        procs.append(start_server(redis.url, tmp, **SETTINGS))
        procs.append(start_server(redis.url, tmp, **SETTINGS))
        yield Stack(redis, *procs)
    finally:
        for proc in reversed(procs):
            proc.stop()
        redis.stop()


@pytest.fixture
async def store(stack):
    client = aioredis.Redis.from_url(stack.redis.url)
    yield client
    await client.aclose()


async def stored(store: aioredis.Redis, job_id: str) -> dict:
    """The job's document as Redis holds it (reading it there watches nothing)."""
    return json.loads(contract.unpack(await store.hget(contract.job_key(job_id), "ev")).doc)


async def submit(client: httpx.AsyncClient, base: str, job_type: str = "abandonable", seconds: float = 30, **extra) -> dict:
    r = await client.post(base + "/jobs", json={"type": job_type, "params": {"seconds": seconds}, **extra})
    assert r.status_code == 202, r.text
    return r.json()


async def until_status(store: aioredis.Redis, job_id: str, status: str, timeout: float) -> dict:
    async def reached() -> dict | None:
        doc = await stored(store, job_id)
        return doc if doc["status"] == status else None

    return await async_wait_until(reached, timeout, what=f"{job_id} {status}")


async def running_for(store: aioredis.Redis, job_id: str, seconds: float) -> None:
    """The job is still running ``seconds`` from now (it is checked all along)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert (await stored(store, job_id))["status"] == "running"
        await asyncio.sleep(0.1)


async def cancelled_after(store: aioredis.Redis, job_id: str, left: float, seconds: float = S) -> dict:
    """The job ends ``cancelled`` for being unwatched, no sooner than ``seconds`` after its last
    watcher ``left`` (a ``time.monotonic()``), and about then."""
    doc = await until_status(store, job_id, "cancelled", seconds + LATEST + 1)
    took = time.monotonic() - left
    assert seconds - 0.5 <= took <= seconds + LATEST, f"cancelled {took:.2f} s after the last watcher left"
    message = f"no one watched this job for {seconds:g} s"
    assert doc["error"] == {"type": "Unwatched", "message": message} and doc["message"] == message
    assert doc["attempts"][-1]["outcome"] == "cancelled" and doc["attempts"][-1]["error"] == doc["error"]
    return doc


async def watch_sse_a_while(client: httpx.AsyncClient, url: str, seconds: float) -> list[dict]:
    """Read a job's stream for ``seconds``, then leave; the documents seen."""
    docs = []
    deadline = time.monotonic() + seconds
    async with client.stream("GET", url) as r:
        assert r.status_code == 200
        async for item in sse_frames(r):
            if isinstance(item, SSE):
                docs.append(item.doc)
                assert item.event == "progress", item.doc
            if time.monotonic() > deadline:
                break
    return docs


# -- the tests -------------------------------------------------------------------------------


async def test_cancelled_about_s_after_the_last_sse_watcher_left(stack, store):
    """Watched over SSE for longer than S, then left: cancelled S (and at most a beat or two) later,
    with the reason in the document. A dashboard's every-job feed, open all along, does not count
    as watching the job, and it shows the cancel."""
    async with httpx.AsyncClient(timeout=30) as client:
        job = await submit(client, stack.a.url)
        assert job["cancel_when_unwatched"] == 5
        dashboard = asyncio.create_task(first_cancelled(client, stack.b.url, job["id"]))
        docs = await watch_sse_a_while(client, stack.a.url + job["links"]["events"], S + 2)
        left = time.monotonic()
        assert docs[-1]["status"] == "running" and docs[-1]["progress"] > 0
        doc = await cancelled_after(store, job["id"], left)
        assert (await asyncio.wait_for(dashboard, 5))["seq"] == doc["seq"]
        r = await client.get(stack.a.url + job["links"]["self"])
        assert r.json()["status"] == "cancelled" and r.json()["error"] == UNWATCHED


async def first_cancelled(client: httpx.AsyncClient, base: str, job_id: str) -> dict:
    """The job's cancelled document from the every-job feed (``/events`` without ``job``)."""
    async with client.stream("GET", base + "/events") as r:
        async for item in sse_frames(r):
            if isinstance(item, SSE) and item.doc["id"] == job_id and item.doc["status"] == "cancelled":
                return item.doc
    raise AssertionError("the feed ended")


async def test_a_websocket_subscription_or_a_long_poll_or_poll_loop_keeps_a_job_alive(stack, store):
    """One job watched over a WebSocket, another by a long-poll loop, a third by plain polls paced
    by their Retry-After, each for longer than S: all run on; once each watcher leaves, each is
    cancelled about S later."""
    async with httpx.AsyncClient(timeout=30) as client:
        by_ws, by_poll, by_polls = [await submit(client, stack.a.url) for _ in range(3)]

        async def websocket() -> float:
            async with connect(stack.a.url.replace("http", "ws") + "/ws") as ws:
                await ws.send(json.dumps({"op": "subscribe", "jobs": [by_ws["id"]]}))
                seen = 0
                deadline = time.monotonic() + S + 3
                while time.monotonic() < deadline:
                    event = json.loads(await asyncio.wait_for(ws.recv(), 5))
                    assert event["event"] == "progress", event
                    seen += 1
                assert seen > 10
            return time.monotonic()

        async def long_polls() -> float:
            after, deadline, polls = 0, time.monotonic() + S + 3, 0
            while time.monotonic() < deadline:
                r = await client.get(stack.a.url + by_poll["links"]["self"], params={"wait": 2, "after": after})
                assert r.status_code == 200 and r.json()["status"] == "running", r.text
                after, polls = r.json()["seq"], polls + 1
            assert polls > 10  # (the job changes every 0.25 s: each poll returns soon)
            return time.monotonic()

        async def polls() -> float:
            deadline, hints = time.monotonic() + S + 3, []
            while time.monotonic() < deadline:
                r = await client.get(stack.b.url + by_polls["links"]["self"])
                assert r.status_code == 200 and r.json()["status"] == "running", r.text
                last = time.monotonic()
                hints.append(int(r.headers["Retry-After"]))
                await asyncio.sleep(hints[-1])
            assert max(hints) == 2, hints  # (5 s: polls at most every 2 s keep it alive)
            return last  # the last poll

        watched = asyncio.gather(websocket(), long_polls(), polls())
        await running_for(store, by_ws["id"], S + 2)
        left = await watched
        for job in (by_poll, by_polls):
            assert (await stored(store, job["id"]))["status"] == "running"
        await asyncio.gather(*(cancelled_after(store, job["id"], at) for job, at in zip((by_ws, by_poll, by_polls), left)))


async def test_a_job_with_a_webhook_is_never_cancelled_for_being_unwatched(stack, store):
    """With a webhook, nobody needs to watch: it runs on unwatched (and its final state reaches the
    webhook). Beside it, a submit's own cancel_when_unwatched on a type without one applies."""
    async with Receiver(answer(200)) as receiver, httpx.AsyncClient(timeout=30) as client:
        hooked = await submit(client, stack.a.url, webhook=receiver.url + "/hook")
        asked = await submit(client, stack.a.url, "long", cancel_when_unwatched=3)
        assert (hooked["cancel_when_unwatched"], asked["cancel_when_unwatched"]) == (None, 3)
        left = time.monotonic()
        await until_status(store, hooked["id"], "running", 10)
        await cancelled_after(store, asked["id"], left, seconds=3)
        await running_for(store, hooked["id"], S + LATEST - (time.monotonic() - left))
        r = await client.delete(stack.a.url + hooked["links"]["self"])
        assert r.status_code == 202
        final = await until_status(store, hooked["id"], "cancelled", 10)
        assert final["error"] is None

        async def delivered() -> bool:
            return any(json.loads(req.body)["seq"] == final["seq"] for req in receiver.requests)

        await async_wait_until(delivered, 10, what="the webhook's delivery")


async def test_a_watcher_on_another_server_keeps_the_job_alive(stack, store):
    """Submitted through server A, watched over SSE through server B only: it runs on; once that
    watcher leaves, it is cancelled about S later."""
    async with httpx.AsyncClient(timeout=30) as client:
        job = await submit(client, stack.a.url)
        docs = await watch_sse_a_while(client, stack.b.url + job["links"]["events"], S + 3)
        left = time.monotonic()
        assert docs[-1]["status"] == "running" and docs[-1]["progress"] > 0
        await cancelled_after(store, job["id"], left)


async def test_bad_cancel_when_unwatched_is_422_naming_it_and_creates_nothing(stack, store):
    """Out of bounds (below UNWATCHED_MIN, above the type's own or UNWATCHED_MAX), not a number,
    or with a webhook: 422 naming the field, and no job; a good one is in the document."""
    index = contract.jobs_index("")
    before = await store.zcard(index)
    bad = [
        ("abandonable", 6), ("abandonable", 5.01), ("abandonable", 0), ("abandonable", -1), ("abandonable", 2.9),
        ("abandonable", "5"), ("abandonable", True), ("abandonable", None), ("abandonable", [5]), ("abandonable", {"s": 5}),
        ("long", contract.UNWATCHED_MAX + 1), ("long", 1e300),
    ]  # fmt: skip
    async with httpx.AsyncClient(timeout=30) as client:
        for job_type, value in bad:
            r = await client.post(stack.a.url + "/jobs", json={"type": job_type, "params": {"seconds": 1}, "cancel_when_unwatched": value})
            assert r.status_code == 422, (job_type, value, r.text)
            assert r.headers["content-type"] == "application/problem+json"
            assert r.json()["errors"] == [{"field": "cancel_when_unwatched", "message": r.json()["errors"][0]["message"]}]
        r = await client.post(
            stack.a.url + "/jobs",
            json={"type": "abandonable", "params": {"seconds": 1}, "cancel_when_unwatched": 4, "webhook": "http://127.0.0.1:9/hook"},
        )
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "cancel_when_unwatched", r.text
        assert await store.zcard(index) == before
        good = await submit(client, stack.a.url, seconds=0.25, cancel_when_unwatched=4)
        assert good["cancel_when_unwatched"] == 4
        assert (await stored(store, good["id"]))["cancel_when_unwatched"] == 4
        types = {t["name"]: t for t in (await client.get(stack.a.url + "/job-types")).json()["items"]}
        assert (types["abandonable"]["cancel_when_unwatched"], types["long"]["cancel_when_unwatched"]) == (5, None)
        schema = (await client.get(stack.a.url + "/openapi.json")).json()["components"]["schemas"]["Submission"]
        branches = {b["title"]: b for b in schema["oneOf"]}
        assert branches["abandonable"]["properties"]["cancel_when_unwatched"]["maximum"] == 5
        assert branches["long"]["properties"]["cancel_when_unwatched"]["maximum"] == contract.UNWATCHED_MAX


async def test_a_queued_job_nobody_watched_is_cancelled_when_a_worker_takes_it(tmp_path):
    """Queued with no worker running and nobody watching for longer than S: the worker that takes it
    later cancels it without running it (no attempt, never started)."""
    redis = RedisProcess(tmp_path / "redis").start()
    server = start_server(redis.url, tmp_path, **SETTINGS)
    worker = None
    store = aioredis.Redis.from_url(redis.url)
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            job = await submit(client, server.url)
            job_key = contract.job_key(job["id"])

            async def abandoned() -> bool:  # as the worker will judge it (scripts.UNWATCHED), by Redis's clock
                seconds, micros = await store.time()
                seen = max(int(await store.hget(job_key, "seen")), int(await store.hget(contract.WATCHING, "since") or 0))
                return seconds * 1000 + micros // 1000 - seen > S * 1000 + 200

            await async_wait_until(abandoned, S + 5, what="the queued job to go unwatched for S")
            worker = start_worker(redis.url, tmp_path, **SETTINGS)
            doc = await until_status(store, job["id"], "cancelled", 10)
        assert doc["error"] == UNWATCHED
        assert (doc["attempt"], doc["started_at"], doc["attempts"]) == (0, None, [])
        assert "cancelled before it started" in worker.log()
    finally:
        await store.aclose()
        for proc in (worker, server):
            if proc:
                proc.stop()
        redis.stop()
