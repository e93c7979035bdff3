"""Reading and writing job documents in Redis: the I/O beside ``contract``.

Both the server and the worker change documents only through ``Store.write``, which runs
``scripts.WRITE``: a compare-and-set on ``seq`` that stores the packed event and
publishes the same bytes in one atomic step. A refused write raises ``WriteRefused`` with
the stored state, so the caller decides (re-read and retry, or give up on a finished job).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any, NamedTuple

from redis.asyncio import Redis

from core import connections, contract, queue, scripts
from core.batched import Batched
from core.settings import Settings

log = logging.getLogger("server")
REDIS_DEADLINE = 5.0  # seconds for all the Redis calls of one request (``server.requests.redis_deadline``)


class WriteRefused(Exception):
    def __init__(self, seq: int, state: str) -> None:
        super().__init__(f"write refused: stored seq {seq}, state {state or 'missing'}")
        self.seq, self.state = seq, state


class LogBatch:
    """Lines for a job's log (``contract.log_line`` each), written by ``Store.append_log`` or with a
    document in ``Store.write``: ``base`` is the last seq the writer believes stored (-1: unknown);
    ``last`` is set to the stored last seq once written."""

    __slots__ = ("lines", "base", "last")

    def __init__(self, lines: list[bytes], base: int = -1) -> None:
        self.lines, self.base = lines, base
        self.last = -1

    def fields(self, max_lines: int) -> dict[str, Any]:
        return {"base": self.base, "lines": b"\n".join(self.lines), "max": max_lines}


class RateLimited(Exception):
    """The caller used up its submit budget of this window."""


class QueueFull(Exception):
    """The tenant already has QUEUE_CAP jobs queued."""


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request."""


def request_hash(
    job_type: str, params: dict[str, Any], webhook: str | None, priority: int = 0, unwatched: float | None = None
) -> str:
    """What an ``Idempotency-Key`` remembers of a submit: its type, params, webhook, priority and
    the ``cancel_when_unwatched`` that applies (each option left out at its default, so that such
    a request hashes as before the option existed)."""
    request = [job_type, params, webhook]
    if priority:
        request.append(priority)
    if unwatched is not None:
        request.append({"cancel_when_unwatched": unwatched})
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def now_ms() -> int:
    return int(time.time() * 1000)


class Family(NamedTuple):
    """A job's spawned children, as ``scripts.ROLLUP_LUA`` sums them up in its ``group_key`` hash."""

    version: int  # rises with each change
    done: float  # the sum of weight x progress, an ended child's 100
    weight: float  # of them all
    ended: int
    count: int
    members: bytes  # their entries' JSON: id, type, weight, status

    @classmethod
    def read(cls, version: bytes, done: bytes, weight: bytes, ended: bytes, count: bytes, members: bytes) -> Family:
        return cls(int(version or 0), float(done), float(weight), int(ended), int(count), members)


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Store:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self._write = Batched(redis, scripts.WRITE, REDIS_DEADLINE)
        self._create = Batched(redis, scripts.CREATE, REDIS_DEADLINE)
        self._create_group = redis.register_script(scripts.CREATE_GROUP.lua)
        self._spawn = redis.register_script(scripts.SPAWN.lua)
        self._log = Batched(redis, scripts.LOG, REDIS_DEADLINE)
        self._log_read = redis.register_script(scripts.LOG_READ.lua)
        self._no_log = {"log_base": -1, "log_lines": b"", "log_max": settings.job_log_lines}  # (most writes)
        self._no_group = {"group": ""}  # (writes of jobs outside a group)
        self._reopen = redis.register_script(scripts.REOPEN.lua)
        self._webhook_done = redis.register_script(scripts.WEBHOOK_DONE.lua)
        self.replicas = settings.redis_wait_replicas
        if self.replicas < 0:  # auto: one with Sentinel (which has replicas to fail over to)
            self.replicas = 1 if connections.sentinel_target(settings.redis_url) else 0
        self._warned = 0.0

    async def _replicated(self) -> None:
        """Hold an acknowledgement (a 202, a final state) until ``replicas`` replicas have the
        write, so a failover cannot lose it. Redis replication is asynchronous; WAIT narrows
        the window to a write whose replica did not answer within ``REDIS_WAIT_MS``, which we
        accept (and log) rather than refuse service while a replica is down."""
        if not self.replicas:
            return
        acked = await self.redis.wait(self.replicas, self.settings.redis_wait_ms)
        if acked < self.replicas and time.monotonic() - self._warned > 60:
            self._warned = time.monotonic()
            log.warning("only %d of %d replicas acknowledged a write within %d ms", acked, self.replicas, self.settings.redis_wait_ms)

    async def read(self, job_id: str) -> bytes | None:
        """The job's packed event (``contract.unpack`` it), or None."""
        return await self.redis.hget(contract.job_key(job_id), "ev")

    async def read_many(self, job_ids: list[str]) -> list[bytes | None]:
        """``read`` of each job, in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(contract.job_key(job_id), "ev")
            return await pipe.execute()

    async def document(self, job_id: str) -> dict[str, Any] | None:
        loaded = await self.load(job_id)
        return None if loaded is None else loaded[0]

    async def load(self, job_id: str) -> tuple[dict[str, Any], str] | None:
        """``(document, tenant)``, or None."""
        raw = await self.read(job_id)
        if raw is None:
            return None
        packed = contract.unpack(raw)
        return json.loads(packed.doc), packed.tenant

    async def field(self, job_id: str, name: str) -> str | None:
        """A stored fact beside the document: ``params`` (JSON), ``webhook``, ``type``."""
        value = await self.redis.hget(contract.job_key(job_id), name)
        return None if value is None else _decode(value)

    async def webhook_payload(self, job_id: str) -> tuple[int, str, bytes] | None:
        """``(seq, url, packed final event)`` that the job's pending webhook delivery sends, or None."""
        seq, url, event = await self.redis.hmget(contract.webhook_key(job_id), "seq", "url", "ev")
        return None if event is None else (int(seq), _decode(url), event)

    async def webhook_done(self, job_id: str, seq: int) -> None:
        """The delivery of final state ``seq`` has ended: its payload is no longer needed."""
        keys, args = scripts.WEBHOOK_DONE.fields(webhook=contract.webhook_key(job_id), seq=seq)
        await self._webhook_done(keys=keys, args=args)

    async def is_gone(self, job_id: str, tenant: str) -> bool:
        """True when ``tenant``'s job existed but its document has expired (410, not 404)."""
        return await self.redis.get(contract.tombstone_key(job_id)) == tenant.encode()

    async def result(self, job_id: str) -> bytes | None:
        return await self.redis.get(contract.result_key(job_id))

    async def results(self, job_ids: list[str]) -> list[bytes | None]:
        """``result`` of each job, in one round trip."""
        return await self.redis.mget([contract.result_key(job_id) for job_id in job_ids])

    async def create(
        self,
        job_type: str,
        params: dict[str, Any],
        tenant: str = "",
        webhook: str | None = None,
        idempotency_key: str | None = None,
        request_id: str = "",
        rate: tuple[str, int, int] = ("", 0, 0),
        params_json: bytes | None = None,
        message: str | None = None,
        traceparent: str = "",
        queue_name: str = queue.DEFAULT,
        priority: int = 0,
        cancel_when_unwatched: float | None = None,
    ) -> tuple[dict[str, Any], bytes, bool]:
        """Store a queued job of ``tenant`` and enqueue it for arq, atomically (``scripts.CREATE``).

        Returns ``(document, its JSON, created)``: with an ``idempotency_key`` the tenant used
        before for the same request, the existing job's document and False. A key used with another
        request raises ``IdempotencyConflict``. ``rate`` is ``(counter key, limit, window s)``
        of the caller's submits (``RateLimited`` over it); ``QueueFull`` past ``QUEUE_CAP``.
        ``params_json`` is ``contract.dumps(params)`` when the caller has it already; ``message``
        is the new document's (e.g. that no live worker runs the type yet); ``traceparent``, the
        submit's trace context (``core.tracing``), which the worker's attempts continue. The job
        waits in ``queue_name`` at the place in line of ``tenant``'s next job of ``priority``.
        ``cancel_when_unwatched``: seconds without a watcher after which a worker cancels the job
        (None: never; ``contract.WATCH_BEAT``).
        """
        job_id = contract.new_job_id()
        doc = contract.new_document(job_id, job_type, contract.now_iso(), message, queue_name, priority, cancel_when_unwatched)
        event = contract.pack(doc, tenant)
        enqueued_ms = now_ms()
        now_us = time.time_ns() // 1000
        fingerprint = request_hash(job_type, params, webhook, priority, cancel_when_unwatched) if idempotency_key else ""
        answer = await self._create(
            job=contract.job_key(job_id),
            record=queue.record_key(job_id),
            queue=queue.queue_key(queue_name),
            order=queue.order_key(queue_name),
            waiting=queue.waiting_key(queue_name),
            job_id=job_id,
            job_type=job_type,
            event=event,
            payload=queue.payload(job_type, (params,), enqueued_ms),
            channel=contract.channel(job_id),
            params_json=params_json if params_json is not None else contract.dumps(params),
            webhook_url=webhook or "",
            priority=priority,
            unwatched="" if cancel_when_unwatched is None else cancel_when_unwatched,
            **self._admission(job_id, tenant, idempotency_key, fingerprint, rate, request_id, traceparent, now_us),
        )
        return await self._created(answer, job_id, fingerprint, doc, event)

    def _admission(
        self, job_id: str, tenant: str, idempotency_key: str | None, fingerprint: str, rate: tuple[str, int, int],
        request_id: str, traceparent: str, now_us: int,
    ) -> dict[str, Any]:  # fmt: skip
        """The fields ``CREATE`` and ``CREATE_GROUP`` share: what ``admit`` checks, and ``_stored``."""
        s = self.settings
        return {
            "idempotency": contract.idempotency_key(tenant, idempotency_key or ""), "rate": rate[0] or contract.rate_key("submit", "-", 0),
            "idempotency_value": f"{job_id} {fingerprint}" if idempotency_key else "", "idempotency_ttl": s.idempotency_ttl,
            "queue_cap": s.queue_cap, "rate_limit": rate[1] if rate[0] else 1 << 62, "rate_window": rate[2] or 1,
            **self._stored(tenant, request_id, traceparent, now_us),
        }  # fmt: skip

    def _stored(self, tenant: str, request_id: str, traceparent: str, now_us: int) -> dict[str, Any]:
        """What every job that ``CREATE``, ``CREATE_GROUP`` and ``SPAWN`` store is given (``store_job``):
        its index, TTLs, request id, trace context, tenant, and the wake-up that follows it."""
        s = self.settings
        return {
            "index": contract.jobs_index(tenant), "queued": contract.queued_set(tenant), "ttl": s.job_ttl, "now_us": now_us,
            "index_trim_below": now_us - s.tombstone_ttl * 1_000_000, "queued_trim_below": now_us - s.job_ttl * 1_000_000,
            "record_ttl_ms": queue.RECORD_TTL_MS, "wake_channel": contract.WAKE_CHANNEL, "request_id": request_id,
            "traceparent": traceparent, "tenant": tenant, "step": s.priority_step,
        }  # fmt: skip

    async def _created(
        self, answer: Any, job_id: str, fingerprint: str, doc: dict[str, Any], event: bytes
    ) -> tuple[dict[str, Any], bytes, bool]:
        """What ``CREATE`` or ``CREATE_GROUP`` answered, as ``create`` returns it."""
        if answer == -2:
            raise RateLimited()
        if answer == -1:
            raise QueueFull()
        if answer in (1, 0):
            await self._replicated()
            return doc, contract.unpack(event).doc, True
        prior_id, _, prior_hash = _decode(answer).partition(" ")
        if prior_id == job_id:  # our own earlier attempt, whose reply was lost
            return doc, contract.unpack(event).doc, True
        if prior_hash != fingerprint:
            raise IdempotencyConflict(prior_id)
        raw = await self.read(prior_id)
        if raw is None:
            raise IdempotencyConflict(prior_id)  # remembered, but the job itself has expired
        prior_json = contract.unpack(raw).doc
        return json.loads(prior_json), prior_json, False

    async def write(
        self,
        doc: dict[str, Any],
        tenant: str,
        result: Any = None,
        result_ttl: int | None = None,
        after: str = "",
        due_ms: int = 0,
        log: LogBatch | None = None,
        **changes: Any,
    ) -> dict[str, Any]:
        """Store ``doc`` (of ``tenant``) with ``changes`` as the next seq and publish it; returns
        the new doc. ``after``, ``due_ms``: what a worker's attempt does to the queue in the same
        step (``queue.FINISH``, ``queue.REQUEUE``, ``queue.RELEASE``); ``log``: lines appended to
        the job's log in the same step, before the event. The writes of one event-loop turn go to
        Redis as one pipeline (``Batched``)."""
        new = {**doc, **changes, "seq": doc["seq"] + 1, "updated_at": contract.now_iso()}
        if "children" in changes and "parent" in new:  # (``parent`` stays last: ``contract.parent_of``)
            new["parent"] = new.pop("parent")
        terminal = new["status"] in contract.TERMINAL
        s = self.settings
        if terminal:
            if new["finished_at"] is None:
                new["finished_at"] = new["updated_at"]
            new["expires_at"] = contract.iso(time.time() + (result_ttl or s.result_ttl))  # with the document's TTL below
        job_id = new["id"]
        queue_name = new.get("queue", queue.DEFAULT)  # (a document from before named queues has none)
        delivery = contract.webhook_delivery_id(job_id, new["seq"])
        enqueued_ms = now_ms()
        lines = self._no_log if log is None else {f"log_{k}": v for k, v in log.fields(self.settings.job_log_lines).items()}
        group = self._no_group if "parent" not in new else self._group_fields(new)
        ok, *stored = await self._write(
            job=contract.job_key(job_id),
            log=contract.log_key(job_id),
            log_channel=contract.log_channel(job_id),
            tombstone=contract.tombstone_key(job_id),
            result=contract.result_key(job_id),
            queue=queue.queue_key(queue_name),
            order=queue.order_key(queue_name),
            waiting=queue.waiting_key(queue_name),
            delivery_record=queue.record_key(delivery),
            queued=contract.queued_set(tenant),
            webhook=contract.webhook_key(job_id),
            record=queue.record_key(job_id),
            lease=queue.lease_key(job_id),
            tries=queue.tries_key(job_id),
            expected=doc["seq"],
            seq=new["seq"],
            state=new["status"],
            event=contract.pack(new, tenant),
            channel=contract.channel(job_id),
            ttl=(result_ttl or s.result_ttl) if terminal else s.job_ttl,
            terminal=1 if terminal else 0,
            tombstone_ttl=(result_ttl or s.result_ttl) + s.tombstone_ttl,  # 410 for TOMBSTONE_TTL past the result
            result_json=contract.dumps(result) if terminal and result is not None else b"",
            delivery_payload=queue.webhook_payload(job_id, new["seq"], enqueued_ms) if terminal else b"",
            delivery_ttl_ms=queue.RECORD_TTL_MS,
            delivery_id=delivery,
            wake_channel=contract.WAKE_CHANNEL,
            job_id=job_id,
            now_us=time.time_ns() // 1000,
            tenant=tenant,
            after=after,
            due_ms=due_ms,
            **lines,
            **group,
        )
        if not ok:
            seq, state = stored
            raise WriteRefused(int(seq), _decode(state))
        if log is not None:
            log.last = int(stored[1])
        if terminal:
            await self._replicated()
        return new

    def _group_fields(self, new: dict[str, Any]) -> dict[str, Any]:
        """``scripts.WRITE``'s ``group`` for ``new``, a child's next document (``scripts.ROLLUP_LUA``)."""
        s, parent = self.settings, new["parent"]
        fields = (
            contract.job_key(parent), contract.group_key(parent), contract.channel(parent), contract.tombstone_key(parent),
            contract.result_key(parent), contract.dumps(new["progress"]).decode(), new["updated_at"],
            contract.iso(time.time() + s.result_ttl), str(s.job_ttl), str(s.result_ttl), str(s.result_ttl + s.tombstone_ttl),
            str(now_ms()),
        )  # fmt: skip
        return {"group": " ".join(fields)}

    async def create_group(
        self,
        children: list[tuple[str, dict[str, Any], bytes, float, str, int]],
        tenant: str = "",
        idempotency_key: str | None = None,
        request_id: str = "",
        rate: tuple[str, int, int] = ("", 0, 0),
        traceparent: str = "",
        priority: int = 0,
        webhook: str | None = None,
        fail_fast: bool = False,
    ) -> tuple[dict[str, Any], bytes, bool]:
        """Store a group of ``tenant`` (its document showing ``priority``) and its ``children`` (each
        ``(type, params, params JSON, weight, queue name, priority)``), atomically
        (``scripts.CREATE_GROUP``); its final state goes to ``webhook``, on its first child's queue;
        ``fail_fast``: it fails as soon as a child has, and the others are cancelled. Answers and
        raises as ``create``."""
        now, enqueued_ms, now_us = contract.now_iso(), now_ms(), time.time_ns() // 1000
        parent_id = contract.new_job_id()
        kids, entries, fields = [], [], []
        for job_type, params, params_json, weight, queue_name, child_priority in children:
            child_id = contract.new_job_id()
            child = {**contract.new_document(child_id, job_type, now, None, queue_name, child_priority), "parent": parent_id}
            kids.append({
                "job": contract.job_key(child_id), "record": queue.record_key(child_id), "queue": queue.queue_key(queue_name),
                "order": queue.order_key(queue_name), "waiting": queue.waiting_key(queue_name), "job_id": child_id,
                "job_type": job_type, "event": contract.pack(child, tenant).decode(), "params_json": params_json.decode(),
                "payload": queue.payload(job_type, (params,), enqueued_ms).decode(), "priority": str(child_priority),
            })  # fmt: skip
            entry = contract.child_entry(child_id, job_type, weight)
            entries.append({**json.loads(entry + b"}"), "status": contract.QUEUED})
            fields += [child_id, "queued ", f"w:{child_id}", str(weight), f"j:{child_id}", entry.decode()]
        doc = {**contract.new_document(parent_id, contract.GROUP, now, None, None, priority), "children": entries}
        fields += ["tpl", contract.group_template(doc).decode(), "ids", " ".join(k["job_id"] for k in kids), "tenant", tenant]
        fields += ["members", contract.dumps(entries).decode(), "done", "0", "weight", str(sum(c[3] for c in children))]
        fields += ["count", str(len(kids)), "queued", str(len(kids)), "ended", "0", "failed", "0", "cancelled", "0", "progress", "0"]
        if webhook:  # what its final state's delivery needs, "@seq@" and "@et@" filled in then (``scripts.ROLLUP_LUA``)
            delivery = contract.webhook_delivery_id(parent_id, "@seq@")  # type: ignore[arg-type]
            hook = {
                "url": webhook, "key": contract.webhook_key(parent_id), "ttl": queue.RECORD_TTL_MS, "wake": contract.WAKE_CHANNEL,
                "id": delivery, "record": queue.record_key(delivery), "queue": kids[0]["queue"], "order": kids[0]["order"],
                "payload": queue.payload(contract.WEBHOOK_FUNCTION, (parent_id, "@seq@"), "@et@").decode(),  # type: ignore[arg-type]
            }  # fmt: skip
            fields += ["hook", contract.dumps(hook).decode()]
        if fail_fast:  # how its other children are told to stop (as ``DELETE`` does)
            fast = {"prefix": contract.cancel_key(""), "channel": contract.CANCEL_CHANNEL, "ttl": self.settings.job_ttl}
            fields += ["fast", contract.dumps(fast).decode()]
        event = contract.pack(doc, tenant)
        request = [[t, p, w, q, pri] for t, p, _, w, q, pri in children]
        fingerprint = request_hash(contract.GROUP, {"children": request, "fail_fast": fail_fast}, webhook, priority) if idempotency_key else ""
        keys, args = scripts.CREATE_GROUP.fields(
            parent=contract.job_key(parent_id), group=contract.group_key(parent_id), parent_id=parent_id, event=event,
            group_fields=contract.dumps(fields), children=contract.dumps(kids), channel=contract.channel(parent_id),
            webhook_url=webhook or "",
            **self._admission(parent_id, tenant, idempotency_key, fingerprint, rate, request_id, traceparent, now_us),
        )  # fmt: skip
        answer = await self._create_group(keys=keys, args=args)
        return await self._created(answer, parent_id, fingerprint, doc, event)

    async def spawn(
        self, parent: dict[str, Any], tenant: str, n: int, job_type: str, params: dict[str, Any], weight: float,
        queue_name: str, priority: int, request_id: str = "", traceparent: str = "",
    ) -> tuple[str, str, Family]:  # fmt: skip
        """Queue running job ``parent``'s ``n``-th child of an attempt (``scripts.SPAWN``), or find it
        there from an earlier attempt: ``(child id, 'new', the state it was in or 'stopped' (the
        parent is not running), the parent's ``Family`` after it)``."""
        parent_id = parent["id"]
        child_id = contract.spawned_id(parent_id, n)
        child = {**contract.new_document(child_id, job_type, contract.now_iso(), None, queue_name, priority), "parent": parent_id}
        keys, args = scripts.SPAWN.fields(
            parent=contract.job_key(parent_id), job=contract.job_key(child_id), group=contract.group_key(parent_id),
            cancel=contract.cancel_key(child_id), record=queue.record_key(child_id), queue=queue.queue_key(queue_name),
            order=queue.order_key(queue_name), waiting=queue.waiting_key(queue_name), job_id=child_id, job_type=job_type,
            event=contract.pack(child, tenant), payload=queue.payload(job_type, (params,), now_ms()), params_json=contract.dumps(params),
            priority=priority, channel=contract.channel(child_id), entry=contract.child_entry(child_id, job_type, weight), weight=weight,
            **self._stored(tenant, request_id, traceparent, time.time_ns() // 1000),
        )  # fmt: skip
        state, *family = await self._spawn(keys=keys, args=args)
        return child_id, _decode(state), Family.read(*family)

    async def family(self, job_id: str) -> Family | None:
        """The job's spawned children (None: it has none)."""
        read = await self.redis.hmget(contract.group_key(job_id), "v", "done", "weight", "ended", "count", "members")
        return None if read[-1] is None else Family.read(*read)

    async def stop(self, job_ids: list[str]) -> None:
        """Tell the jobs' workers to cancel them (a queued one is cancelled when a worker takes it)."""
        async with self.redis.pipeline(transaction=True) as tx:
            for job_id in job_ids:
                tx.set(contract.cancel_key(job_id), b"1", ex=self.settings.job_ttl)
                tx.publish(contract.CANCEL_CHANNEL, job_id)
            await tx.execute()

    async def stop_children(self, job_id: str) -> None:
        """``stop`` the job's spawned children that have not ended (it ended failed or cancelled)."""
        family = await self.family(job_id)
        going = [] if family is None else [c["id"] for c in json.loads(family.members) if c["status"] not in contract.TERMINAL]
        if going:
            await self.stop(going)

    async def append_log(self, job_id: str, log: LogBatch) -> int:
        """Append ``log`` to the job's log and publish it (``scripts.LOG``); returns the last seq
        stored (-1: the job has no document). Calls of one loop turn share one pipeline."""
        last = await self._log(
            job=contract.job_key(job_id), log=contract.log_key(job_id), log_channel=contract.log_channel(job_id),
            job_id=job_id, **log.fields(self.settings.job_log_lines),
        )  # fmt: skip
        log.last = int(last)
        return log.last

    async def read_log(self, job_id: str, after: int, limit: int) -> tuple[int, int, list[bytes]]:
        """``(last seq, first seq kept, lines after `after`)``: at most ``limit`` lines, oldest first."""
        keys, args = scripts.LOG_READ.fields(job=contract.job_key(job_id), log=contract.log_key(job_id), after=after, limit=limit)
        last, first, lines = await self._log_read(keys=keys, args=args)
        return int(last), int(first), lines

    async def reopen(self, doc: dict[str, Any], tenant: str) -> dict[str, Any]:
        """Queue a failed or cancelled job again as its next attempt (POST /jobs/{id}/retry), its
        cancel request (if any) forgotten."""
        job_id = doc["id"]
        await self.redis.delete(contract.cancel_key(job_id))
        new: dict[str, Any] = {
            **doc,
            "status": contract.QUEUED,
            "seq": doc["seq"] + 1,
            "updated_at": contract.now_iso(),
            "finished_at": None,
            "expires_at": None,
            "progress": None,
            "eta_s": None,
            "error": None,
            "stalled": False,
            "message": "retry requested",
        }
        params = json.loads(await self.field(job_id, "params") or "{}")
        enqueued_ms = now_ms()
        queue_name = doc.get("queue", queue.DEFAULT)
        keys, args = scripts.REOPEN.fields(
            job=contract.job_key(job_id),
            log=contract.log_key(job_id),
            tombstone=contract.tombstone_key(job_id),
            result=contract.result_key(job_id),
            record=queue.record_key(job_id),
            queue=queue.queue_key(queue_name),
            order=queue.order_key(queue_name),
            waiting=queue.waiting_key(queue_name),
            queued=contract.queued_set(tenant),
            lease=queue.lease_key(job_id),
            expected=doc["seq"],
            seq=new["seq"],
            event=contract.pack(new, tenant),
            channel=contract.channel(job_id),
            ttl=self.settings.job_ttl,
            payload=queue.payload(doc["type"], (params,), enqueued_ms, job_try=doc["attempt"] + 1),
            record_ttl_ms=queue.RECORD_TTL_MS,
            wake_channel=contract.WAKE_CHANNEL,
            job_id=job_id,
            now_us=time.time_ns() // 1000,
            tenant=tenant,
            priority=doc.get("priority", 0),
            step=self.settings.priority_step,
            **(self._no_group if "parent" not in new else self._group_fields(new)),
        )
        ok, *stored = await self._reopen(keys=keys, args=args)
        if not ok:
            seq, state = stored
            raise WriteRefused(int(seq), _decode(state))
        await self._replicated()
        return new
