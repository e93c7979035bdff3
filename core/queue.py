"""The queue: arq's storage format, in one place.

arq stays the queue (its worker runs our jobs), but the server enqueues, re-enqueues and cancels
inside our own Lua scripts, so that a job and its queue entry are written in one atomic step.
Everything those scripts and the rest of the code need to know of arq's format is here:

* the keys: a job's record (``arq:job:<id>``, its function, arguments, try and enqueue time),
  the queue (a sorted set of job ids by the time they are due, ms), a running job's lease
  (``arq:in-progress:<id>``) and its try counter (``arq:retry:<id>``);
* the record's encoding (``payload``) with our JSON serializer (arq's default is pickle);
* ``ENQUEUE_LUA``, the Lua function that enqueues as ``ArqRedis.enqueue_job`` does;
* the few calls made outside scripts: ``dequeue`` (cancel a queued job), ``depth``,
  ``enqueued_at``.

``tests/test_queue.py`` checks that a job enqueued through here is run by a stock arq worker.
"""

from __future__ import annotations

import json
from typing import Any

from arq.constants import default_queue_name, expires_extra_ms, in_progress_key_prefix, job_key_prefix, retry_key_prefix
from arq.jobs import deserialize_job_raw, serialize_job
from redis.asyncio import Redis

from core import contract

QUEUE = default_queue_name
RECORD_TTL_MS = expires_extra_ms  # arq drops a job's record (so the job) this long after its enqueueing

# Lua: enqueue ``job_id`` (its record ``payload`` at ``record_key``) on ``queue``, due at ``score``
# (ms), as ``ArqRedis.enqueue_job`` does, inside a script that writes our keys in the same step.
ENQUEUE_LUA = """
local function enqueue(record_key, payload, ttl_ms, queue, score, job_id)
  redis.call('SET', record_key, payload, 'PX', ttl_ms)
  redis.call('ZADD', queue, score, job_id)
end
"""


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
    return None if raw is None else deserialize_job_raw(raw, deserializer=loads)[4] / 1000


def webhook_payload(job_id: str, seq: int, enqueued_ms: int) -> bytes:
    """The record of the webhook delivery of final state ``seq`` (``worker.webhooks.deliver``)."""
    return payload(contract.WEBHOOK_FUNCTION, (job_id, seq), enqueued_ms)
