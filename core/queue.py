"""The queue: arq's storage format, in one place.

arq stays the queue (its worker runs our jobs), but the server enqueues, re-enqueues and cancels
inside our own Lua scripts, so that a job and its queue entry are written in one atomic step.
Everything those scripts and the rest of the code need to know of arq's format is here:

* the keys: a job's record (``arq:job:<id>``, its function, arguments, try and enqueue time),
  the queues (``queue_key``: a sorted set of job ids per named queue), a running job's lease
  (``arq:in-progress:<id>``) and its try counter (``arq:retry:<id>``);
* a job's place in its queue (below), which gives priorities and fairness between tenants;
* the record's encoding (``payload``) with our JSON serializer (arq's default is pickle);
* ``ENQUEUE_LUA``, the Lua function that enqueues as ``ArqRedis.enqueue_job`` does, and
  ``AFTER_LUA``, what an attempt's last write does to the queue: finish the job, re-queue it, or
  release it (as arq's ``finish_job`` does);
* what the worker's claim (``scripts.CLAIM``) needs: the key prefixes, the try counter's TTL,
  ``parse`` of a record;
* the few calls made outside scripts: ``dequeue`` (cancel a queued job), ``depth``,
  ``enqueued_at``.

The worker (``worker.runtime``) runs this queue with its own loop (claim, run, finish: three
round trips per job, shared by the jobs of one loop turn) instead of arq's ``Worker`` (eleven).

A job's place in line. arq orders a queue by score and runs what is due (score <= now, in ms).
Our scores keep that meaning for a stock arq worker (every job we enqueue is due at once) but
order the line by start-time fair queueing over tenants, with priorities:

* each queue has a virtual clock ``v`` (its ``order_key``): the highest place a worker has
  claimed from it so far. A tenant's next job takes the place ``max(v, its last place) + 1``, so
  one tenant's jobs keep their order, and a tenant with nothing queued goes next (``v + 1``: the
  places of jobs it cancelled or that expired are not held against it), however many jobs another
  tenant has waiting: the line takes one job of each waiting tenant in turn;
* a job of priority ``p`` (0-9) has its place moved ``p * PRIORITY_STEP`` ahead: it goes before
  lower-priority jobs placed less than that many turns before it, and after the rest, so a low
  priority is delayed, never starved forever;
* a job deferred to later (a retry's back-off) has its due time (unix ms, above ``DEFERRED``) as
  its score, as in arq; once due, the worker's claim gives it the place ``v - p * PRIORITY_STEP``:
  next in line among its priority. A job re-queued at once (its worker stopped) keeps its place.

``tests/test_queue.py`` checks that a job enqueued through here is run by a stock arq worker.
"""

from __future__ import annotations

import functools
import json
import re
import time
from dataclasses import dataclass
from typing import Any

from arq.constants import default_queue_name, expires_extra_ms, in_progress_key_prefix, job_key_prefix, retry_key_prefix
from arq.jobs import deserialize_job_raw, serialize_job
from redis.asyncio import Redis

from core import contract

DEFAULT = "default"  # the queue of a job type that names none: arq's own (``arq:queue``)
QUEUE_NAME = re.compile(r"(?!health-check$)[a-z0-9][a-z0-9_-]{0,31}")  # (arq keeps arq:queue:health-check)
PRIORITIES = range(10)  # 0 (the default) to 9 (first)
LINE = 10**11  # places in line are scores from about here (1973 as unix ms: long due for arq, and never 0)
DEFERRED = 10**12  # scores from here up are due times (unix ms); places in line stay below
RECORD_TTL_MS = expires_extra_ms  # arq drops a job's record (so the job) this long after its enqueueing
TRIES_TTL = 88400  # seconds arq keeps a job's try counter
RECORD_PREFIX, LEASE_PREFIX, TRIES_PREFIX = job_key_prefix, in_progress_key_prefix, retry_key_prefix

# what an attempt's last write does to the queue (``after`` of ``scripts.WRITE``)
FINISH = "finish"  # the job is done: off the queue, its record, lease and try counter deleted
REQUEUE = "requeue"  # run it again at ``due_ms``: the lease goes, the record and try counter stay
RELEASE = "release"  # the worker stops: the lease goes, and the job is due again as it was

# Lua: enqueue ``job_id`` (its record ``payload`` at ``record_key``) on ``queue``, due at ``score``
# (ms), as ``ArqRedis.enqueue_job`` does, inside a script that writes our keys in the same step.
ENQUEUE_LUA = f"""
local function enqueue(record_key, payload, ttl_ms, queue, score, job_id)
  redis.call('SET', record_key, payload, 'PX', ttl_ms)
  redis.call('ZADD', queue, score, job_id)
end
-- a queue's virtual clock (``order``: its ``order_key``); below ``DEFERRED``, a score is a place
local DEFERRED = {DEFERRED}
local function clock(order)
  return tonumber(redis.call('HGET', order, 'v') or '{LINE}')
end
-- the next place in line of a job of ``tenant`` at ``priority`` (see the module's docstring);
-- ``queued``: the tenant's queued jobs (``contract.queued_set``), before this one
local function place(order, tenant, priority, step, queued)
  local last = 0
  if redis.call('ZCARD', queued) > 0 then last = tonumber(redis.call('HGET', order, 't:' .. tenant) or '0') end
  local tag = math.max(clock(order), last) + 1
  redis.call('HSET', order, 't:' .. tenant, tag)
  return tag - tonumber(priority) * tonumber(step)
end
"""


AFTER_LUA = """
local function after_attempt(after, queue, job_id, record, lease, tries, due_ms)
  if after == 'finish' then
    redis.call('DEL', record, lease, tries)
    redis.call('ZREM', queue, job_id)
  elseif after == 'requeue' then
    redis.call('DEL', lease)
    redis.call('ZADD', queue, 'XX', due_ms, job_id)
  elseif after == 'release' then
    redis.call('DEL', lease)
  end
end
"""


@functools.cache
def queue_key(name: str) -> str:
    """The sorted set of a named queue; ``default`` is arq's own queue."""
    return default_queue_name if name == DEFAULT else f"{default_queue_name}:{name}"


@functools.cache
def order_key(name: str) -> str:
    """Hash: a queue's virtual clock (field ``v``) and each tenant's last place (``t:<tenant>``)."""
    return f"{contract.PREFIX}order:{name}"


@functools.cache
def waiting_key(name: str) -> str:
    """Sorted set of a queue's jobs now ``queued`` (id -> time queued, µs): its depth and the
    age of its oldest job (``/metrics``, ``GET /queues``)."""
    return f"{contract.PREFIX}waiting:{name}"


def due_in(seconds: float) -> int:
    """The queue score (unix ms) of a job due ``seconds`` from now."""
    return int((time.time() + seconds) * 1000)


class Requeue(Exception):
    """Raised by an attempt: put the job back on the queue, due in ``defer`` seconds (a retry),
    without finishing it."""

    def __init__(self, defer: float = 0.0) -> None:
        super().__init__(f"re-queued for {defer:.2f} s")
        self.defer = defer


@dataclass(frozen=True)
class Record:
    """A job's record: arq calls ``function(ctx, *args)``; ``job_try``: the attempt to count from."""

    function: str
    args: tuple[Any, ...]
    job_try: int | None
    enqueued_ms: int


def parse(raw: bytes) -> Record:
    """A job record as ``payload`` writes it; raises ``ValueError`` if it is not one."""
    try:
        function, args, _kwargs, job_try, enqueued_ms = deserialize_job_raw(raw, deserializer=loads)
    except Exception as e:  # arq's SerializationError and anything a crafted record raises
        raise ValueError(f"unreadable job record: {e}") from None
    return Record(function, tuple(args), job_try, enqueued_ms)


def record_key(job_id: str) -> str:
    return job_key_prefix + job_id


def lease_key(job_id: str) -> str:
    """Exists while a worker runs the job; a job whose lease expired is run again."""
    return in_progress_key_prefix + job_id


def tries_key(job_id: str) -> str:
    return retry_key_prefix + job_id


def _plain(obj: Any) -> Any:
    """What arq's results may hold besides JSON: the exception of a job it gave up on."""
    if isinstance(obj, BaseException):
        return {"type": type(obj).__name__, "message": str(obj)}
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_plain)


def dumps(obj: Any) -> bytes:
    """arq's job and result serializer: JSON, never pickle."""
    return _ENCODER.encode(obj).encode()


def loads(raw: bytes) -> Any:
    return json.loads(raw)


def payload(function: str, args: tuple[Any, ...], enqueued_ms: int, job_try: int | None = None) -> bytes:
    """A job record: arq calls ``function(ctx, *args)``; ``job_try`` sets the attempt it counts from."""
    return serialize_job(function, args, {}, job_try, enqueued_ms, serializer=dumps)


async def dequeue(redis: Redis, name: str, job_id: str) -> None:
    """Take a queued job off queue ``name`` (cancelled before it started)."""
    async with redis.pipeline(transaction=True) as tx:
        tx.zrem(queue_key(name), job_id)
        tx.delete(record_key(job_id))
        await tx.execute()


async def depth(redis: Redis, name: str = DEFAULT) -> int:
    """Entries of queue ``name``: waiting, deferred, running (arq keeps a job there until it ends)
    and webhook deliveries."""
    return await redis.zcard(queue_key(name))


async def waiting(redis: Redis, names: list[str]) -> list[tuple[int, float | None]]:
    """For each queue: how many of its jobs are ``queued``, and since when (unix s) the oldest."""
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.zcard(waiting_key(name))
            pipe.zrange(waiting_key(name), 0, 0, withscores=True)
        answers = await pipe.execute()
    return [(count, oldest[0][1] / 1e6 if oldest else None) for count, oldest in zip(answers[::2], answers[1::2])]


async def enqueued_at(redis: Redis, job_id: str) -> float | None:
    """When the job was first enqueued (unix seconds), or None if its record is gone."""
    raw = await redis.get(record_key(job_id))
    return None if raw is None else parse(raw).enqueued_ms / 1000


def webhook_payload(job_id: str, seq: int, enqueued_ms: int) -> bytes:
    """The record of the webhook delivery of final state ``seq`` (``worker.webhooks.deliver``)."""
    return payload(contract.WEBHOOK_FUNCTION, (job_id, seq), enqueued_ms)
