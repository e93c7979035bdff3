"""Each Lua script (``core.scripts``) run directly against the embedded server, by its named
fields, including what a retry after a lost reply does: the same call sent twice."""

from __future__ import annotations

import json
import time

import pytest
import redis.asyncio as aioredis

from core import contract, queue, scripts
from core.devredis import RedisProcess
from core.settings import Settings
from core.store import Store, WriteRefused

pytestmark = pytest.mark.anyio
QUEUE = queue.queue_key(queue.DEFAULT)


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory):
    """A server of this module's own: the suite's session worker must not claim these jobs."""
    server = RedisProcess(tmp_path_factory.mktemp("scripts") / "redis", appendonly=False).start()
    yield server
    server.stop()


@pytest.fixture
async def client(own_redis):
    client = aioredis.Redis.from_url(own_redis.url)
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
        queue=QUEUE, idempotency=contract.idempotency_key("t-scripts", job_id), queued=contract.queued_set("t-scripts"),
        rate=contract.rate_key("submit", job_id, 0), job_id=job_id, job_type="demo", event=contract.pack(doc, "t-scripts"),
        ttl=60, now_us=now_us, index_trim_below=0, payload=queue.payload("demo", ({},), now_us // 1000),
        record_ttl_ms=60_000, channel=contract.channel(job_id), wake_channel="t-scripts-wake",
        params_json=b"{}", webhook_url="", idempotency_value="", idempotency_ttl=60, queue_cap=0, queued_trim_below=0,
        request_id="r", traceparent="", rate_limit=100, rate_window=60, order=queue.order_key(queue.DEFAULT),
        waiting=queue.waiting_key(queue.DEFAULT), tenant="t-scripts", priority=0, step=10_000, unwatched="",
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
    assert await client.zscore(QUEUE, job_id) < queue.DEFERRED  # a place in line, due at once
    assert await client.zscore(queue.waiting_key(queue.DEFAULT), job_id) == fields["now_us"]
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
    with pytest.raises(WriteRefused) as refused:  # another write from the same seq: refused, stored seq given
        await store.write(doc, "t-scripts", status=contract.RUNNING, message="another writer")
    assert (refused.value.seq, refused.value.state) == (2, "running")
    final = await store.write(running, "t-scripts", status=contract.SUCCEEDED, result={"ok": 1})
    delivery = contract.webhook_delivery_id(doc["id"], final["seq"])
    assert await client.zscore(QUEUE, delivery) is not None
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
    await client.zrem(QUEUE, doc["id"])
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


async def test_watching_sets_seen_and_a_worker_finds_what_nobody_watched(client):
    """cancel_when_unwatched: the submit, a server's beat and a retry set ``seen`` (Redis's
    clock); a worker's look finds a job unwatched for longer than its seconds, counting only the
    time while the servers beat (``contract.WATCHING``)."""
    store = Store(client, Settings())
    doc, _, _ = await store.create("demo", {}, "t-scripts", cancel_when_unwatched=5)
    plain, _, _ = await store.create("demo", {}, "t-scripts")
    assert (doc["cancel_when_unwatched"], plain["cancel_when_unwatched"]) == (5, None)
    job = contract.job_key(doc["id"])
    assert await client.hget(job, "unwatched") == b"5" and not await client.hexists(contract.job_key(plain["id"]), "unwatched")
    assert abs(int(await client.hget(job, "seen")) - time.time() * 1000) < 5000  # the submit watches it
    beat = dict(watching="t-scripts-watching-" + doc["id"], job_prefix=contract.job_key(""), gap_ms=3000)
    both = f"{doc['id']} {plain['id']}"

    async def seen() -> int:
        return int(await client.hget(job, "seen"))

    await client.hset(job, "seen", 0)
    assert await run(client, scripts.UNWATCHED, ids=both, **beat) == []  # no server beats yet: nobody could watch
    assert await run(client, scripts.SEEN, ids=both, **beat) == [plain["id"].encode()]  # the one without the option
    now = await seen()
    assert now > 0 and int(await client.hget(beat["watching"], "since")) == now
    assert await run(client, scripts.UNWATCHED, ids=both, **beat) == []
    await client.hset(job, "seen", now - 6000)
    await client.hset(beat["watching"], "since", now - 6000)
    assert await run(client, scripts.UNWATCHED, ids=both, **beat) == [doc["id"].encode()]  # 6 s > 5 s
    await client.hset(beat["watching"], "since", now - 2000)  # the beats resumed 2 s ago (Redis was away)
    assert await run(client, scripts.UNWATCHED, ids=both, **beat) == []
    await client.hset(beat["watching"], mapping={"since": now - 6000, "last": now - 4000})  # no beat for 4 s > gap
    assert await run(client, scripts.UNWATCHED, ids=both, **beat) == []
    assert await run(client, scripts.SEEN, ids="", **beat) == []  # a beat after the gap: the unbroken beats start again
    assert int(await client.hget(beat["watching"], "since")) >= now
    await client.zrem(QUEUE, doc["id"])
    failed = await store.write(doc, "t-scripts", status=contract.CANCELLED)
    await client.hset(job, "seen", 0)
    await store.reopen(failed, "t-scripts")
    assert await seen() >= now  # a retry watches it


def write_fields(store: Store, doc: dict, tenant: str, **over) -> dict:
    """``scripts.WRITE``'s fields for the next seq of ``doc``, as ``Store.write`` builds them."""
    new = {**doc, "seq": doc["seq"] + 1, "status": contract.RUNNING, "updated_at": contract.now_iso()}
    job_id = doc["id"]
    fields = dict(
        job=contract.job_key(job_id), tombstone=contract.tombstone_key(job_id), result=contract.result_key(job_id),
        queue=QUEUE, delivery_record=queue.record_key("d-" + job_id), queued=contract.queued_set(tenant),
        webhook=contract.webhook_key(job_id), record=queue.record_key(job_id), lease=queue.lease_key(job_id),
        tries=queue.tries_key(job_id), expected=doc["seq"], seq=new["seq"], state=new["status"],
        event=contract.pack(new, tenant), channel=contract.channel(job_id), ttl=60, terminal=0, tombstone_ttl=60,
        result_json=b"", delivery_payload=b"", delivery_ttl_ms=60_000, delivery_id="d-" + job_id,
        wake_channel="t-scripts-wake", job_id=job_id, now_us=0, tenant=tenant, after="", due_ms=0,
        log=contract.log_key(job_id), log_channel=contract.log_channel(job_id), log_base=-1, log_lines=b"",
        log_max=1000, order=queue.order_key(queue.DEFAULT), waiting=queue.waiting_key(queue.DEFAULT), **store._no_group,
    )  # fmt: skip
    return fields | over


async def test_write_sent_twice_writes_once(client):
    """A pipeline sent again after a lost reply: the write whose exact event is stored answers as written."""
    store = Store(client, Settings())
    doc, _, _ = await store.create("demo", {}, "t-scripts")
    fields = write_fields(store, doc, "t-scripts")
    assert await run(client, scripts.WRITE, **fields) == [1, 2, -1]
    assert await run(client, scripts.WRITE, **fields) == [1, 2, 0]  # (and the log's last seq)
    assert await run(client, scripts.WRITE, **fields | {"event": fields["event"] + b" "}) == [0, 2, b"running"]


def log_fields(job_id: str, lines: list[str], base: int = -1, max_lines: int = 5) -> dict:
    return dict(
        job=contract.job_key(job_id), log=contract.log_key(job_id), log_channel=contract.log_channel(job_id), job_id=job_id,
        base=base, lines=b"\n".join(contract.log_line("INFO", m) for m in lines), max=max_lines,
    )  # fmt: skip


async def log_read(client, job_id: str, after: int = 0, limit: int = 100) -> tuple[int, int, list[dict]]:
    last, first, lines = await run(client, scripts.LOG_READ, job=contract.job_key(job_id), log=contract.log_key(job_id), after=after, limit=limit)
    return last, first, [json.loads(line) for line in lines]


async def test_log_numbers_keeps_the_newest_and_appends_a_resent_call_once(client):
    store = Store(client, Settings())
    doc, _, _ = await store.create("demo", {}, "t-scripts")
    job_id = doc["id"]
    pubsub = client.pubsub()
    await pubsub.subscribe(contract.log_channel(job_id))
    assert await run(client, scripts.LOG, **log_fields(job_id, ["a", "b\nwith a newline", "c"])) == 3
    assert await run(client, scripts.LOG, **log_fields(job_id, ["d", "e"], base=3)) == 5
    assert await run(client, scripts.LOG, **log_fields(job_id, ["d", "e"], base=3)) == 5  # sent again: nothing more
    assert await run(client, scripts.LOG, **log_fields(job_id, ["f"], base=1)) == 6  # another base than expected: appended
    last, first, lines = await log_read(client, job_id)
    assert (last, first) == (6, 2)  # the newest 5 kept
    assert [(line["seq"], line["msg"]) for line in lines] == [(2, "b\nwith a newline"), (3, "c"), (4, "d"), (5, "e"), (6, "f")]
    assert [line["msg"] for line in (await log_read(client, job_id, after=3, limit=2))[2]] == ["d", "e"]
    assert (await log_read(client, job_id, after=0, limit=1))[2][0]["seq"] == 2  # the oldest kept
    assert (await log_read(client, job_id, after=6))[2] == []
    assert 0 < await client.pttl(contract.log_key(job_id)) <= await client.pttl(contract.job_key(job_id)) + 5
    published, deadline = [], time.monotonic() + 5
    while len(published) < 3 and time.monotonic() < deadline:  # (None also for the subscribe confirmation)
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
        if msg is not None:
            published.append(json.loads(msg["data"]))
    await pubsub.aclose()
    assert [(p["job"], p["first"], p["last"], [line["msg"] for line in p["lines"]]) for p in published] == [
        (job_id, 1, 3, ["a", "b\nwith a newline", "c"]), (job_id, 4, 5, ["d", "e"]), (job_id, 6, 6, ["f"]),
    ]  # fmt: skip
    assert await run(client, scripts.LOG, **log_fields(contract.new_job_id(), ["x"])) == -1  # no job: no log


async def test_write_appends_its_log_lines_before_the_event_and_a_final_state_expires_the_log(client):
    store = Store(client, Settings())
    doc, _, _ = await store.create("demo", {}, "t-scripts")
    job_id = doc["id"]
    fields = write_fields(store, doc, "t-scripts")
    line = contract.log_line("INFO", "attempt 1 started")
    assert await run(client, scripts.WRITE, **fields | {"log_lines": line}) == [1, 2, 1]
    final = write_fields(store, {**doc, "seq": 2}, "t-scripts", terminal=1, ttl=30, state=contract.SUCCEEDED)
    assert (await run(client, scripts.WRITE, **final | {"log_lines": line, "log_base": 1}))[:3] == [1, 3, 2]
    assert 0 < await client.ttl(contract.log_key(job_id)) <= 30


async def claim(
    client, limit: int, owner: str = "w1", skip: str = "", lease_ms: int = 10_000, queues: dict[str, int] | None = None,
    now_ms: int = 0, step: int = 10_000,
) -> list:
    """``CLAIM`` from ``queues`` ({name: most}, in that order; default: the default queue)."""
    wanted = " ".join(f"{queue.queue_key(name)} {queue.order_key(name)} {most}" for name, most in (queues or {queue.DEFAULT: limit}).items())
    return await run(
        client, scripts.CLAIM, now_ms=now_ms or int(time.time() * 1000), limit=limit, queues=wanted,
        step=step, lease_ms=lease_ms, owner=owner, skip=skip, lease_prefix=queue.LEASE_PREFIX, tries_prefix=queue.TRIES_PREFIX,
        tries_ttl=queue.TRIES_TTL, record_prefix=queue.RECORD_PREFIX, job_prefix=contract.job_key(""),
        cancel_prefix=contract.cancel_key(""),
    )  # fmt: skip


async def test_claim_takes_due_jobs_once_with_what_running_them_needs(client):
    await client.delete(QUEUE)  # only this test's jobs
    store = Store(client, Settings())
    docs = [(await store.create("demo", {"n": i}, "t-claim", request_id=f"r{i}"))[0] for i in range(3)]
    await client.set(contract.cancel_key(docs[1]["id"]), 1)
    first = await claim(client, 2, skip=docs[0]["id"])  # skipped: a job still under way here
    assert sorted(row[0].decode() for row in first) == sorted([docs[1]["id"], docs[2]["id"]])
    job_id, tries, record, event, rid, cancelled, traceparent, log_seq, in_queue = next(row for row in first if row[0].decode() == docs[1]["id"])
    assert (traceparent, log_seq, in_queue) == (None, 0, QUEUE.encode())
    assert (tries, rid, cancelled) == (1, b"r1", 1)
    assert queue.parse(record).args == ({"n": 1},)
    assert contract.unpack(event).seq == 1
    assert await client.get(queue.lease_key(docs[1]["id"])) == b"w1"
    assert [row[0].decode() for row in await claim(client, 5, owner="w2")] == [docs[0]["id"]]  # leased ones passed over
    assert await claim(client, 5, owner="w3") == []
    # the attempt ends (the worker's AFTER): finished, re-queued for later, released
    due = int(time.time() * 1000) + 60_000
    for job_id, after, due_ms in ((docs[0]["id"], queue.FINISH, 0), (docs[1]["id"], queue.REQUEUE, due), (docs[2]["id"], queue.RELEASE, 0)):
        await run(client, scripts.AFTER, queue=QUEUE, record=queue.record_key(job_id), lease=queue.lease_key(job_id),
                  tries=queue.tries_key(job_id), after=after, job_id=job_id, due_ms=due_ms)  # fmt: skip
    assert await client.zscore(QUEUE, docs[0]["id"]) is None and not await client.exists(queue.record_key(docs[0]["id"]))
    assert await client.zscore(QUEUE, docs[1]["id"]) == due and await client.get(queue.tries_key(docs[1]["id"])) == b"1"
    released = await claim(client, 5, owner="w3")  # the released one, on its second try; the re-queued one is not due
    assert [(row[0].decode(), row[1]) for row in released] == [(docs[2]["id"], 2)]
    again = await claim(client, 5, owner="w4", now_ms=due)  # the re-queued one once due: given a place in line
    assert [row[0].decode() for row in again] == [docs[1]["id"]] and await client.zscore(QUEUE, docs[1]["id"]) < queue.DEFERRED


async def test_renew_keeps_own_leases_and_takes_back_a_lapsed_one(client):
    store = Store(client, Settings())
    mine, theirs, done = [(await store.create("demo", {}, "t-renew"))[0]["id"] for _ in range(3)]
    now = int(time.time() * 1000)
    await client.set(queue.lease_key(mine), b"w1", px=50)
    await client.set(queue.lease_key(theirs), b"w2", px=50)
    await client.zrem(QUEUE, done)  # finished meanwhile: its lease is not made again
    await run(client, scripts.RENEW, now_ms=now, lease_ms=10_000, owner="w1", lease_prefix=queue.LEASE_PREFIX,
              jobs=f"{QUEUE} {mine} {QUEUE} {theirs} {QUEUE} {done}")  # fmt: skip
    assert await client.pttl(queue.lease_key(mine)) > 5_000
    assert await client.get(queue.lease_key(theirs)) == b"w2" and await client.pttl(queue.lease_key(theirs)) <= 50
    assert not await client.exists(queue.lease_key(done))
    await client.delete(queue.lease_key(mine))  # lapsed in an outage: taken back, the job still due
    await run(client, scripts.RENEW, now_ms=now, lease_ms=10_000, owner="w1", lease_prefix=queue.LEASE_PREFIX, jobs=f"{QUEUE} {mine}")
    assert await client.get(queue.lease_key(mine)) == b"w1"


async def claimed_ids(client, limit: int, **over) -> list[str]:
    return [row[0].decode() for row in await claim(client, limit, **over)]


async def test_the_line_keeps_order_puts_priorities_first_and_takes_tenants_in_turn(client):
    """``core.queue``'s place in line, on a queue of this test's own."""
    name = "t-line"
    store = Store(client, Settings(priority_step=100))
    own = {name: 100}

    async def submit(tenant: str, priority: int = 0) -> str:
        return (await store.create("demo", {}, tenant, queue_name=name, priority=priority))[0]["id"]

    burst = [await submit("a") for _ in range(30)]  # tenant a's burst
    urgent = await submit("a", priority=1)
    b_first, b_second = await submit("b"), await submit("b")
    lower = await submit("c", priority=0)
    taken = await claimed_ids(client, 4, queues={name: 4})
    # the priority-1 job first; then one job of each waiting tenant in turn (in any order among them)
    assert taken[0] == urgent and set(taken[1:]) == {burst[0], b_first, lower}
    rest = await claimed_ids(client, 100, queues=own)
    assert rest.index(b_second) <= 1 and [i for i in rest if i in burst] == burst[1:]  # b's next at once; a's in order
    assert await claimed_ids(client, 100, queues=own) == []


async def test_a_priority_level_is_worth_priority_step_places_so_low_priorities_still_run(client):
    name = "t-aging"
    store = Store(client, Settings(priority_step=10))
    low = [(await store.create("demo", {}, "a", queue_name=name))[0]["id"] for _ in range(25)]
    high = (await store.create("demo", {}, "a", queue_name=name, priority=1))[0]["id"]  # 10 places ahead of its own
    taken = await claimed_ids(client, 100, queues={name: 100}, step=10)
    # it takes the 16th place: level with low[15] (a tie, in either order), behind the 15 before
    assert taken.index(high) in (15, 16) and [i for i in taken if i != high] == low


async def test_a_worker_takes_only_from_its_queues_and_at_most_each_queues_limit(client):
    store = Store(client, Settings())
    heavy = [(await store.create("demo", {}, "t", queue_name="t-heavy"))[0]["id"] for _ in range(3)]
    light = [(await store.create("demo", {}, "t", queue_name="t-light"))[0]["id"] for _ in range(3)]
    assert await claimed_ids(client, 10, queues={"t-heavy": 2}) == heavy[:2]
    assert await claimed_ids(client, 3, queues={"t-heavy": 2, "t-light": 10}) == heavy[2:] + light[:2]
    assert await claimed_ids(client, 10, queues={"t-other": 10}) == []
    doc = json.loads(contract.unpack(await store.read(light[2])).doc)
    assert (doc["queue"], doc["priority"]) == ("t-light", 0)
    assert await client.zscore(queue.waiting_key("t-light"), light[2]) is not None  # until a write says otherwise
    await store.write(doc, "t", status=contract.RUNNING)
    assert await client.zscore(queue.waiting_key("t-light"), light[2]) is None


async def test_a_group_follows_its_children_in_the_step_that_writes_each(client):
    """``CREATE_GROUP`` then ``WRITE``'s roll-up (``scripts.ROLLUP_LUA``): the group's document is
    its children's mean by weight, never lower than before, in the public shape and packed as
    ``contract.pack`` packs; it ends once they all have, failed if any failed."""
    store = Store(client, Settings())
    members = [("demo", {"steps": n}, contract.dumps({"steps": n}), weight, queue.DEFAULT, 0) for n, weight in ((1, 1), (2, 2), (3, 1))]
    group, group_json, created = await store.create_group(members, "t-group", request_id="r-g")
    assert created and group["type"] == contract.GROUP and group["status"] == "queued" and group["queue"] is None
    assert [c["weight"] for c in group["children"]] == [1, 2, 1] and {c["status"] for c in group["children"]} == {"queued"}
    ids = [c["id"] for c in group["children"]]
    children = [json.loads(contract.unpack(await store.read(i)).doc) for i in ids]
    assert [c["parent"] for c in children] == [group["id"]] * 3 and await client.get(queue.record_key(ids[1])) is not None

    async def stored_group() -> dict:
        packed = contract.unpack(await store.read(group["id"]))
        assert packed.tenant == "t-group"
        doc = json.loads(packed.doc)
        assert list(doc) == list(group) and packed.seq == doc["seq"]  # the public order, and its seq in the header
        return doc

    a = await store.write(children[0], "t-group", status=contract.RUNNING, progress=50.0)
    doc = await stored_group()
    assert (doc["status"], doc["progress"], doc["seq"]) == ("running", 12.5, 2)
    assert doc["started_at"] == a["updated_at"] and doc["finished_at"] is None
    assert [c["status"] for c in doc["children"]] == ["running", "queued", "queued"]
    b = await store.write(children[1], "t-group", status=contract.RUNNING, progress=25.0)
    assert (await stored_group())["progress"] == 25.0  # (50*1 + 25*2) / 4
    a = await store.write(a, "t-group", progress=10.0)  # a child going back does not take the group back
    assert (await stored_group())["progress"] == 25.0
    await store.write(a, "t-group", status=contract.SUCCEEDED, progress=100.0)
    await store.write(b, "t-group", status=contract.FAILED)
    doc = await stored_group()
    assert (doc["status"], doc["progress"]) == ("running", 75.0)  # one child still queued
    assert (await store.write(children[2], "t-group", status=contract.CANCELLED))["status"] == "cancelled"
    doc = await stored_group()
    assert (doc["status"], doc["progress"], doc["seq"]) == ("failed", 100.0, 7) and doc["finished_at"] and doc["expires_at"]
    assert contract.unpack(await store.read(group["id"])).event == "failed"
    assert json.loads(await store.result(group["id"])) == doc["children"]
    assert await store.is_gone(group["id"], "t-group")  # its tombstone: 410 once it has expired
    # a child retried after its group has ended leaves the group as it ended
    await store.reopen(json.loads(contract.unpack(await store.read(ids[1])).doc), "t-group")
    assert (await stored_group())["seq"] == 7


async def test_a_child_retried_while_its_group_runs_is_waited_for_again(client):
    store = Store(client, Settings())
    members = [("demo", {}, b"{}", 1, queue.DEFAULT, 0)] * 2
    group, _, _ = await store.create_group(members, "t-group")
    a, b = [json.loads(contract.unpack(await store.read(c["id"])).doc) for c in group["children"]]
    failed = await store.write(a, "t-group", status=contract.FAILED)
    again = await store.reopen(failed, "t-group")  # POST /jobs/{a}/retry
    b = await store.write(b, "t-group", status=contract.SUCCEEDED)
    doc = json.loads(contract.unpack(await store.read(group["id"])).doc)
    assert doc["status"] == "running" and [c["status"] for c in doc["children"]] == ["queued", "succeeded"]
    await store.write(again, "t-group", status=contract.SUCCEEDED)
    doc = json.loads(contract.unpack(await store.read(group["id"])).doc)
    assert (doc["status"], doc["progress"]) == ("succeeded", 100)


async def test_a_spawned_child_is_queued_once_and_rolls_up_without_writing_its_parent(client):
    """``SPAWN`` again (a re-run) finds the child there, and takes back the cancel its parent's end
    asked; its writes sum up in its parent's hash (``Store.family``), each a new version, also once
    the parent has ended, and leave the parent's document, which its worker writes, alone."""
    store = Store(client, Settings())
    parent, _, _ = await store.create("demo", {}, "t-spawn")
    assert (await store.spawn(parent, "t-spawn", 1, "demo", {}, 1, queue.DEFAULT, 0))[1] == "stopped"  # (queued: not running)
    parent = await store.write(parent, "t-spawn", status=contract.RUNNING)
    child_id, was, family = await store.spawn(parent, "t-spawn", 1, "demo", {"steps": 2}, 3, queue.DEFAULT, 0)
    assert child_id == contract.spawned_id(parent["id"], 1) and was == "new"
    assert family[:5] == (1, 0.0, 3.0, 0, 1)
    assert json.loads(family.members) == [{"id": child_id, "type": "demo", "weight": 3, "status": "queued"}]
    await store.stop_children(parent["id"])  # (as its end would)
    assert await client.exists(contract.cancel_key(child_id))
    again = await store.spawn(parent, "t-spawn", 1, "demo", {"steps": 2}, 3, queue.DEFAULT, 0)
    assert again == (child_id, "queued", family)  # (nothing added: not queued twice)
    assert not await client.exists(contract.cancel_key(child_id)) and await client.zscore(QUEUE, child_id) is not None
    other, _, _ = await store.spawn(parent, "t-spawn", 2, "demo", {}, 1, queue.DEFAULT, 0)
    child = json.loads(contract.unpack(await store.read(child_id)).doc)
    assert child["parent"] == parent["id"] and list(child)[-1] == "parent"
    child = await store.write(child, "t-spawn", status=contract.RUNNING, progress=50.0)
    family = await store.family(parent["id"])
    assert family[:5] == (3, 150.0, 4.0, 0, 2)
    assert [c["status"] for c in json.loads(family.members)] == ["running", "queued"]
    await store.write(parent, "t-spawn", status=contract.FAILED)
    await store.write(child, "t-spawn", status=contract.SUCCEEDED)
    assert (await store.family(parent["id"]))[:4] == (4, 300.0, 4.0, 1)  # (its parent ended: still summed up)
    assert json.loads(contract.unpack(await store.read(parent["id"])).doc)["seq"] == parent["seq"] + 1  # its worker's writes alone
    assert other != child_id


async def test_a_fail_fast_group_fails_with_its_first_failed_child_and_stops_the_others(client):
    store = Store(client, Settings())
    group, _, _ = await store.create_group([("demo", {}, b"{}", 1, queue.DEFAULT, 0)] * 3, "t-group", fail_fast=True)
    a, b, c = [json.loads(contract.unpack(await store.read(child["id"])).doc) for child in group["children"]]
    a = await store.write(a, "t-group", status=contract.RUNNING, progress=40.0)
    await store.write(c, "t-group", status=contract.FAILED)
    doc = json.loads(contract.unpack(await store.read(group["id"])).doc)
    assert (doc["status"], [ch["status"] for ch in doc["children"]]) == ("failed", ["running", "queued", "failed"])
    assert doc["progress"] < 100 and doc["finished_at"]
    assert await client.exists(contract.cancel_key(a["id"]), contract.cancel_key(b["id"])) == 2  # told to stop
    assert not await client.exists(contract.cancel_key(c["id"]))
    await store.write(a, "t-group", status=contract.CANCELLED)  # the others end later: the group stays as it ended
    assert json.loads(contract.unpack(await store.read(group["id"])).doc)["seq"] == doc["seq"]


async def test_a_tenant_that_cancelled_its_queued_jobs_is_not_held_behind_them(client):
    """Its cancelled jobs' places are not held against it: with nothing queued, its next job goes
    next in line, ahead of another tenant's backlog."""
    name = "t-refund"
    store = Store(client, Settings())
    cancelled = [(await store.create("demo", {}, "t-gone", queue_name=name))[0] for _ in range(50)]
    for doc in cancelled:
        await store.write(doc, "t-gone", status=contract.CANCELLED)
        await queue.dequeue(client, name, doc["id"])
    for _ in range(20):  # another tenant's backlog
        await store.create("demo", {}, "t-busy", queue_name=name)
    back = (await store.create("demo", {}, "t-gone", queue_name=name))[0]["id"]
    assert (await claimed_ids(client, 3, queues={name: 3})).index(back) <= 1
