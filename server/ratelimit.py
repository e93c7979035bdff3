"""Fixed-window rate limits shared by every server replica through Redis."""

from __future__ import annotations

import time

from redis.asyncio import Redis

from core import contract, scripts
from server.problems import Problem
from core.batched import Batched
from core.store import REDIS_DEADLINE

WINDOW = 60  # seconds

class RateLimiter:
    def __init__(self, redis: Redis) -> None:
        self._count = Batched(redis, scripts.COUNT, REDIS_DEADLINE)  # a poll's one round trip

    async def check(self, bucket: str, who: str, limit: int, read: str | None = None) -> bytes | None:
        """Count one request of ``who`` in ``bucket``; 429 with Retry-After once over ``limit``.
        With ``read`` (a job hash's key), also returns that job's stored event, or None."""
        count, *stored = await self._count(counter=window_key(bucket, who), job=read or "", window=WINDOW)
        if count > limit:
            raise too_many(bucket, limit)
        return stored[0] if stored else None


def window_key(bucket: str, who: str) -> str:
    """The counter of the current window (``scripts.COUNT``; ``scripts.CREATE`` counts submits itself)."""
    return contract.rate_key(bucket, who, int(time.time() // WINDOW))


def too_many(bucket: str, limit: int) -> Problem:
    now = time.time()
    reset = max(1, int((now // WINDOW + 1) * WINDOW - now) + 1)
    headers = {
        "Retry-After": str(reset),
        "RateLimit-Limit": str(limit),
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": str(reset),
        "RateLimit-Policy": f"{limit};w={WINDOW}",
    }
    return Problem(429, "Too many requests", f"At most {limit} {bucket} requests per {WINDOW} s.", headers=headers)
