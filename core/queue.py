"""The queue: arq's storage format, in one place.

arq stays the queue (its worker runs our jobs), but the server enqueues, re-enqueues and cancels
inside our own Lua scripts, so that a job and its queue entry are written in one atomic step.
Everything those scripts and the rest of the code need to know of arq's format is here:

* the keys: a job's record (``arq:job:<id>``, its function, arguments, try and enqueue time),
  the queue (a sorted set of job ids by the time they are due, ms), a running job's lease
  (``arq:in-progress:<id>``) and its try counter (``arq:retry:<id>``);
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

``tests/test_queue.py`` checks that a job enqueued through here is run by a stock arq worker.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from arq.constants import default_queue_name, expires_extra_ms, in_progress_key_prefix, job_key_prefix, retry_key_prefix
from arq.jobs import deserialize_job_raw, serialize_job
from redis.asyncio import Redis

from core import contract

QUEUE = default_queue_name
RECORD_TTL_MS = expires_extra_ms  # arq drops a job's record (so the job) this long after its enqueueing
TRIES_TTL = 88400  # seconds arq keeps a job's try counter
RECORD_PREFIX, LEASE_PREFIX, TRIES_PREFIX = job_key_prefix, in_progress_key_prefix, retry_key_prefix

# what an attempt's last write does to the queue (``after`` of ``scripts.WRITE``)
FINISH = "finish"  # the job is done: off the queue, its record, lease and try counter deleted
REQUEUE = "requeue"  # run it again at ``due_ms``: the lease goes, the record and try counter stay
RELEASE = "release"  # the worker stops: the lease goes, and the job is due again as it was

# Lua: enqueue ``job_id`` (its record ``payload`` at ``record_key``) on ``queue``, due at ``score``
# (ms), as ``ArqRedis.enqueue_job`` does, inside a script that writes our keys in the same step.
ENQUEUE_LUA = """
local function enqueue(record_key, payload, ttl_ms, queue, score, job_id)
  redis.call('SET', record_key, payload, 'PX', ttl_ms)
  redis.call('ZADD', queue, score, job_id)
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


async def dequeue(redis: Redis, job_id: str) -> None:
    """Take a queued job off the queue (cancelled before it started)."""
    async with redis.pipeline(transaction=True) as tx:
        tx.zrem(QUEUE, job_id)
        tx.delete(record_key(job_id))
        await tx.execute()


async def depth(redis: Redis) -> int:
    """Jobs in the queue: waiting, deferred, or running (arq keeps a job there until it ends)."""
    return await redis.zcard(QUEUE)


async def enqueued_at(redis: Redis, job_id: str) -> float | None:
    """When the job was first enqueued (unix seconds), or None if its record is gone."""
    raw = await redis.get(record_key(job_id))
    return None if raw is None else parse(raw).enqueued_ms / 1000


def webhook_payload(job_id: str, seq: int, enqueued_ms: int) -> bytes:
    """The record of the webhook delivery of final state ``seq`` (``worker.webhooks.deliver``)."""
    return payload(contract.WEBHOOK_FUNCTION, (job_id, seq), enqueued_ms)
