"""The queue adapter (``core.queue``) speaks arq's format: what it enqueues, a stock
``arq.Worker`` runs (burst mode, stock settings but our JSON serializer)."""

from __future__ import annotations

import time

import pytest
import redis.asyncio as aioredis
from arq import Worker
from arq.connections import RedisSettings
from arq.worker import func

from core import contract, queue
from core.devredis import RedisProcess
from core.settings import Settings
from core.store import Store

pytestmark = pytest.mark.anyio


async def test_what_the_adapter_enqueues_a_stock_arq_worker_runs(tmp_path):
    redis = RedisProcess(tmp_path / "redis").start()
    client = aioredis.Redis.from_url(redis.url)
    calls = []

    async def roundtrip(ctx, params):
        calls.append(("roundtrip", ctx["job_id"], ctx["job_try"], params))

    async def webhook(ctx, job_id, seq):
        calls.append(("webhook", ctx["job_id"], job_id, seq))

    def stock_worker() -> Worker:
        functions = [func(roundtrip, name="roundtrip"), func(webhook, name=contract.WEBHOOK_FUNCTION)]
        settings = RedisSettings.from_dsn(redis.url)
        return Worker(functions, redis_settings=settings, burst=True, job_serializer=queue.dumps, job_deserializer=queue.loads)

    try:
        store = Store(client, Settings())
        before = time.time()
        doc, _, _ = await store.create("roundtrip", {"n": 7}, "t", webhook="https://example.com/hook")
        assert await queue.depth(client) == 1
        assert before - 1 < await queue.enqueued_at(client, doc["id"]) < time.time() + 1
        worker = stock_worker()
        await worker.main()  # burst: until the queue is empty
        await worker.close()
        assert calls == [("roundtrip", doc["id"], 1, {"n": 7})]
        # a final state enqueues its webhook delivery; a re-run enqueues the job as its next attempt
        failed = await store.write(doc, "t", status=contract.FAILED, attempt=1)
        await store.reopen(failed, "t")
        worker = stock_worker()
        await worker.main()
        await worker.close()
        delivery = contract.webhook_delivery_id(doc["id"], failed["seq"])
        assert sorted(calls[1:]) == [("roundtrip", doc["id"], 2, {"n": 7}), ("webhook", delivery, doc["id"], failed["seq"])]
        assert await queue.depth(client) == 0
        # a cancelled queued job leaves the queue
        other, _, _ = await store.create("roundtrip", {"n": 1}, "t")
        await queue.dequeue(client, queue.DEFAULT, other["id"])
        assert await queue.depth(client) == 0 and await queue.enqueued_at(client, other["id"]) is None
    finally:
        await client.aclose()
        redis.stop()
