"""Reading and writing job documents in Redis: the I/O beside ``contract``.

Both the server and the worker change documents only through ``Store.write``, which runs
``contract.WRITE_SCRIPT``: a compare-and-set on ``seq`` that stores the packed event and
publishes the same bytes in one atomic step. A refused write raises ``WriteRefused`` with
the stored state, so the caller decides (re-read and retry, or give up on a finished job).
"""

from __future__ import annotations

import json
import time
from typing import Any

from arq.constants import default_queue_name, expires_extra_ms, job_key_prefix
from arq.jobs import serialize_job
from redis.asyncio import Redis

from server import contract
from server.settings import Settings


class WriteRefused(Exception):
    def __init__(self, seq: int, state: str) -> None:
        super().__init__(f"write refused: stored seq {seq}, state {state or 'missing'}")
        self.seq, self.state = seq, state


class Store:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self._write = redis.register_script(contract.WRITE_SCRIPT)
        self._create = redis.register_script(contract.CREATE_SCRIPT)

    async def read(self, job_id: str) -> bytes | None:
        """The job's packed event (``contract.unpack`` it), or None."""
        return await self.redis.hget(contract.job_key(job_id), "ev")

    async def document(self, job_id: str) -> dict[str, Any] | None:
        raw = await self.read(job_id)
        return None if raw is None else json.loads(contract.unpack(raw)[2])

    async def is_gone(self, job_id: str) -> bool:
        """True when the job existed but its document has expired (answer 410, not 404)."""
        return bool(await self.redis.exists(contract.tombstone_key(job_id)))

    async def result(self, job_id: str) -> bytes | None:
        return await self.redis.get(contract.result_key(job_id))

    async def create(self, job_type: str, params: dict[str, Any]) -> dict[str, Any]:
        """Store a queued job and enqueue it for arq, atomically (``contract.CREATE_SCRIPT``)."""
        job_id = contract.new_job_id()
        doc = contract.new_document(job_id, job_type, contract.now_iso())
        event = contract.pack(doc)
        enqueued_ms = now_ms()
        now_us = time.time_ns() // 1000
        await self._create(
            keys=[contract.job_key(job_id), contract.JOBS_INDEX, job_key_prefix + job_id, default_queue_name],
            args=[
                job_id,
                job_type,
                event,
                self.settings.job_ttl,
                now_us,
                now_us - self.settings.tombstone_ttl * 1_000_000,
                serialize_job(job_type, (params,), {}, None, enqueued_ms, serializer=job_dumps),
                expires_extra_ms,
                enqueued_ms,
                contract.channel(job_id),
                contract.WAKE_CHANNEL,
            ],
        )
        return doc

    async def write(self, doc: dict[str, Any], result: Any = None, **changes: Any) -> dict[str, Any]:
        """Store ``doc`` with ``changes`` as the next seq and publish it; returns the new doc."""
        new = {**doc, **changes, "seq": doc["seq"] + 1, "updated_at": contract.now_iso()}
        terminal = new["status"] in contract.TERMINAL
        if terminal and new["finished_at"] is None:
            new["finished_at"] = new["updated_at"]
        job_id = new["id"]
        s = self.settings
        ok, *stored = await self._write(
            keys=[contract.job_key(job_id), contract.tombstone_key(job_id), contract.result_key(job_id)],
            args=[
                doc["seq"],
                new["seq"],
                new["status"],
                contract.pack(new),
                contract.channel(job_id),
                s.result_ttl if terminal else s.job_ttl,
                1 if terminal else 0,
                s.tombstone_ttl,
                contract.dumps(result) if terminal and result is not None else b"",
            ],
        )
        if not ok:
            seq, state = stored
            raise WriteRefused(int(seq), state.decode() if isinstance(state, bytes) else state)
        return new


def job_dumps(obj: Any) -> bytes:
    """arq's job and result serializer: JSON, never pickle."""
    return json.dumps(obj, separators=(",", ":")).encode()


def job_loads(raw: bytes) -> Any:
    return json.loads(raw)


def now_ms() -> int:
    return int(time.time() * 1000)
