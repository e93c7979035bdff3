"""Live workers: each worker announces itself with a heartbeat in Redis; servers read them.

A worker's record (``contract.worker_key``) is a JSON object written on every beat with a TTL of
``BEAT_TTL``, and ``contract.WORKERS`` indexes the ids by the time of their last beat::

    {"id": "host:1234:ab12", "host": "host", "pid": 1234, "types": ["demo", ...],
     "concurrency": 10, "running": 2, "started_at": "...", "beat_at": "..."}

A worker that stops cleanly removes its record; one that dies drops out after ``BEAT_TTL``.
``GET /workers`` lists them, and a server knows from them whether any live worker runs the type
of a job it accepts (a job of a type that none runs waits: see ``worker.runtime``).
"""

from __future__ import annotations

import json
import time
from typing import Any

from redis.asyncio import Redis

from core import contract

BEAT = 3.0  # seconds between a worker's beats
BEAT_TTL = 10.0  # a worker whose last beat is older than this is not live


async def beat(redis: Redis, record: dict[str, Any]) -> None:
    """Write ``record`` (with ``beat_at`` now) as live for ``BEAT_TTL``."""
    now = time.time()
    record = {**record, "beat_at": contract.now_iso()}
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(contract.worker_key(record["id"]), contract.dumps(record), px=int(BEAT_TTL * 1000))
        pipe.zadd(contract.WORKERS, {record["id"]: now})
        pipe.zremrangebyscore(contract.WORKERS, "-inf", now - BEAT_TTL)
        await pipe.execute()


async def leave(redis: Redis, worker_id: str) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(contract.worker_key(worker_id))
        pipe.zrem(contract.WORKERS, worker_id)
        await pipe.execute()


async def live(redis: Redis) -> list[dict[str, Any]]:
    """The live workers' records, by id."""
    ids = await redis.zrangebyscore(contract.WORKERS, time.time() - BEAT_TTL, "+inf")
    if not ids:
        return []
    records = await redis.mget([contract.worker_key(i.decode()) for i in ids])
    return sorted((json.loads(r) for r in records if r is not None), key=lambda r: r["id"])


def waiting_message(job_type: str) -> str:
    """A queued job's ``message`` while no live worker runs its type."""
    return f"waiting for a worker that runs type {job_type!r}"
