"""Each Lua script (``core.scripts``) run directly against the embedded server, by its named
fields, including what a retry after a lost reply does: the same call sent twice."""

from __future__ import annotations

import json
import time

import pytest
import redis.asyncio as aioredis

from core import contract, queue, scripts
from core.settings import Settings
from core.store import Store, WriteRefused

pytestmark = pytest.mark.anyio


@pytest.fixture
async def client(redis_server):
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def run(client, script: scripts.Script, **fields):
    keys, args = script.fields(**fields)
    return await client.register_script(script.lua)(keys=keys, args=args)


def create_fields(job_id: str, **over) -> dict:
    now_us = time.time_ns() // 1000
    doc = contract.new_document(job_id, "demo", contract.now_iso())
    fields = dict(
        job=contract.job_key(job_id), index=contract.jobs_index("t-scripts"), record=queue.record_key(job_id),
        queue=queue.QUEUE, idempotency=contract.idempotency_key("t-scripts", job_id), queued=contract.queued_set("t-scripts"),
        rate=contract.rate_key("submit", job_id, 0), job_id=job_id, job_type="demo", event=contract.pack(doc, "t-scripts"),
        ttl=60, now_us=now_us, index_trim_below=0, payload=queue.payload("demo", ({},), now_us // 1000),
        record_ttl_ms=60_000, now_ms=now_us // 1000, channel=contract.channel(job_id), wake_channel="t-scripts-wake",
        params_json=b"{}", webhook_url="", idempotency_value="", idempotency_ttl=60, queue_cap=0, queued_trim_below=0,
        request_id="r", rate_limit=100, rate_window=60,
    )  # fmt: skip
    return fields | over


def test_fields_are_named_and_complete():
    with pytest.raises(TypeError, match=r"missing \['window'\], unknown \['windw'\]"):
        scripts.COUNT.fields(counter="c", job="", windw=60)
    keys, args = scripts.COUNT.fields(window=60, job="j", counter="c")  # any order
    assert (keys, args) == (["c", "j"], [60])
    assert scripts.COUNT.lua.startswith("local counter = KEYS[1]\nlocal job = KEYS[2]\nlocal window = ARGV[1]\n")


async def test_create_twice_creates_once(client):
    job_id = contract.new_job_id()
    fields = create_fields(job_id)
    assert await run(client, scripts.CREATE, **fields) == 1
    assert await run(client, scripts.CREATE, **fields) == 0  # a pipeline sent again: nothing changes
    assert await client.get(fields["rate"]) == b"1"  # counted once
    assert await client.zscore(queue.QUEUE, job_id) == fields["now_ms"]
    assert await client.get(queue.record_key(job_id)) == fields["payload"]
    assert await client.hget(contract.job_key(job_id), "type") == b"demo"


async def test_create_remembers_an_idempotency_key_and_refuses_past_the_cap(client):
    first, second = contract.new_job_id(), contract.new_job_id()
    key = contract.idempotency_key("t-scripts", "k-" + first)
    assert await run(client, scripts.CREATE, **create_fields(first, idempotency=key, idempotency_value=f"{first} h")) == 1
    assert await run(client, scripts.CREATE, **create_fields(second, idempotency=key, idempotency_value=f"{second} h")) == f"{first} h".encode()
    assert not await client.exists(contract.job_key(second))
    queued = contract.queued_set("t-scripts-cap-" + first)
    assert await run(client, scripts.CREATE, **create_fields(second, queued=queued, queue_cap=1)) == 1
    third = contract.new_job_id()
    assert await run(client, scripts.CREATE, **create_fields(third, queued=queued, queue_cap=1)) == -1
    assert await run(client, scripts.CREATE, **create_fields(third, rate=contract.rate_key("x", third, 0), rate_limit=0)) == -2
    assert not await client.exists(contract.job_key(third))


async def test_write_is_a_compare_and_set_and_a_final_state_enqueues_its_webhook(client):
    store = Store(client, Settings())
    doc, _, _ = await store.create("demo", {}, "t-scripts", webhook="https://example.com/hook")
    running = await store.write(doc, "t-scripts", status=contract.RUNNING)
    with pytest.raises(WriteRefused) as refused:  # the same write again: refused, stored seq given
        await store.write(doc, "t-scripts", status=contract.RUNNING)
    assert (refused.value.seq, refused.value.state) == (2, "running")
    final = await store.write(running, "t-scripts", status=contract.SUCCEEDED, result={"ok": 1})
    delivery = contract.webhook_delivery_id(doc["id"], final["seq"])
    assert await client.zscore(queue.QUEUE, delivery) is not None
    assert await store.webhook_payload(doc["id"]) == (3, "https://example.com/hook", await store.read(doc["id"]))
    assert await store.result(doc["id"]) == b'{"ok":1}'
    settings = store.settings  # 410 for TOMBSTONE_TTL once the result has expired
    assert await client.ttl(contract.tombstone_key(doc["id"])) > settings.result_ttl + settings.tombstone_ttl - 5
    with pytest.raises(WriteRefused):  # nothing changes after the end
        await store.write(final, "t-scripts", status=contract.FAILED)
    await store.webhook_done(doc["id"], 2)  # an older delivery: the payload stays
    assert await store.webhook_payload(doc["id"]) is not None
    await store.webhook_done(doc["id"], 3)
    assert await store.webhook_payload(doc["id"]) is None


async def test_reopen_twice_reopens_once(client):
    store = Store(client, Settings())
    doc, _, _ = await store.create("demo", {"steps": 1}, "t-scripts")
    await client.zrem(queue.QUEUE, doc["id"])
    failed = await store.write(doc, "t-scripts", status=contract.FAILED, attempt=1)
    again = await store.reopen(failed, "t-scripts")
    assert (again["status"], again["seq"]) == ("queued", failed["seq"] + 1)
    assert json.loads(await client.get(queue.record_key(doc["id"])))["t"] == 2  # the next attempt
    with pytest.raises(WriteRefused):
        await store.reopen(failed, "t-scripts")
    assert not await client.exists(contract.tombstone_key(doc["id"]))


async def test_count_counts_and_reads(client):
    job_id = contract.new_job_id()
    counter = contract.rate_key("poll", job_id, 0)
    assert await run(client, scripts.COUNT, counter=counter, job="", window=60) == [1]
    assert await run(client, scripts.COUNT, counter=counter, job=contract.job_key(job_id), window=60) == [2, None]
    await client.hset(contract.job_key(job_id), "ev", b"packed")
    assert await run(client, scripts.COUNT, counter=counter, job=contract.job_key(job_id), window=60) == [3, b"packed"]
    assert 0 < await client.ttl(counter) <= 60
