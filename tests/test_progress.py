"""The worker's progress reporting against real Redis: throttle, atomic store + publish, threads."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from redis.asyncio import Redis

from core import contract
from core.settings import Settings
from core.store import Store, WriteRefused
from worker.progress import JobContext, JobEnded, ThreadJobContext

pytestmark = pytest.mark.anyio


@pytest.fixture
async def store(redis_server):
    redis = Redis.from_url(redis_server.url)
    yield Store(redis, Settings(redis_url=redis_server.url))
    await redis.aclose()


async def published(store: Store, job_id: str, out: list[dict], ready: asyncio.Event) -> None:
    async with store.redis.pubsub() as pubsub:
        await pubsub.subscribe(contract.channel(job_id))
        ready.set()
        async for msg in pubsub.listen():
            if msg["type"] == "message":
                out.append(json.loads(contract.unpack(msg["data"]).doc))


async def running_job(store: Store, interval: float) -> JobContext:
    """A stored document that no worker knows of (not enqueued), driven by this test alone."""
    blank = contract.new_document(contract.new_job_id(), "demo", contract.now_iso()) | {"seq": 0}
    doc = await store.write(blank, "")
    ctx = JobContext(store, doc, interval)
    await ctx.write(status=contract.RUNNING, attempt=1)
    return ctx


async def test_throttle_publishes_first_stage_changes_trailing_and_final(store):
    """200 updates in ~0.5 s at a 50 ms interval: a dozen publishes, none of the rules broken."""
    ctx = await running_job(store, interval=0.05)
    events: list[dict] = []
    ready = asyncio.Event()
    listener = asyncio.create_task(published(store, ctx.id, events, ready))
    await ready.wait()
    started = time.monotonic()
    for i in range(1, 201):
        await ctx.progress(i / 2, message=f"step {i}", stage="second" if i > 100 else "first")
        await asyncio.sleep(0.0025)
    elapsed = time.monotonic() - started
    await asyncio.sleep(0.1)  # let the trailing publish happen before the final one
    await ctx.finish(contract.SUCCEEDED, progress=100.0)
    deadline = time.monotonic() + 5
    while not events or events[-1]["status"] != contract.SUCCEEDED:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    listener.cancel()
    progress = [e for e in events if e["status"] == contract.RUNNING]
    assert progress[0]["message"] == "step 1", "the first update always goes out"
    assert any(e["stage"] == "second" and e["message"] == "step 101" for e in progress), "a stage change goes out at once"
    assert progress[-1]["message"] == "step 200", "the update held back by the throttle goes out when the interval ends"
    timeline = [(e["updated_at"][-9:], e["message"]) for e in progress]
    assert len(progress) <= elapsed / 0.05 + 4, f"{len(progress)} publishes in {elapsed:.2f} s: {timeline}"
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "every publish is one stored change"
    stored = await store.document(ctx.id)
    assert stored == events[-1], "the stored document is the last published one"


async def test_progress_from_a_thread(store):
    """A sync job reports from its thread through the loop; the document follows."""
    ctx = await running_job(store, interval=0)
    loop = asyncio.get_running_loop()

    def work(tctx: ThreadJobContext) -> None:
        for i in range(1, 4):
            tctx.progress(i * 25, message=f"thread step {i}")

    await asyncio.to_thread(work, ThreadJobContext(ctx, loop))
    doc = await store.document(ctx.id)
    assert (doc["progress"], doc["message"]) == (75.0, "thread step 3")


async def test_no_write_after_the_end(store):
    """Once terminal, a document refuses every later write (a late progress cannot undo the end)."""
    ctx = await running_job(store, interval=0)
    stale = dict(ctx.doc)
    await ctx.finish(contract.CANCELLED)
    with pytest.raises(WriteRefused):
        await store.write(stale, "", progress=50.0)
    with pytest.raises(JobEnded):
        await ctx.write(progress=60.0)
    assert (await store.document(ctx.id))["status"] == contract.CANCELLED


async def test_eta_appears_once_a_rate_is_known(store):
    ctx = await running_job(store, interval=0)
    await ctx.progress(10)
    assert ctx.doc["eta_s"] is None
    await asyncio.sleep(0.05)
    await ctx.progress(20)
    assert 0 < ctx.doc["eta_s"] < 10
