"""Fixed-window rate limits shared by every server replica through Redis."""

from __future__ import annotations

import time

from redis.asyncio import Redis

from server import contract
from server.problems import Problem
from server.store import REDIS_DEADLINE, Batched

WINDOW = 60  # seconds

# KEYS: the window's counter, and optionally a job hash; ARGV: window length (s).
# Returns {count after this request, the job's packed event (absent if none)}: a poll's count
# and read in one round trip.
COUNT_SCRIPT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
if KEYS[2] then return {n, redis.call('HGET', KEYS[2], 'ev')} end
return {n}
"""


class RateLimiter:
    def __init__(self, redis: Redis) -> None:
        self._count = Batched(redis, COUNT_SCRIPT, REDIS_DEADLINE)  # a poll's one round trip

    async def check(self, bucket: str, who: str, limit: int, read: str | None = None) -> bytes | None:
        """Count one request of ``who`` in ``bucket``; 429 with Retry-After once over ``limit``.
        With ``read`` (a job hash's key), also returns that job's stored event, or None."""
        keys = [window_key(bucket, who)] if read is None else [window_key(bucket, who), read]
        count, *stored = await self._count(keys=keys, args=[WINDOW])
        if count > limit:
            raise too_many(bucket, limit)
        return stored[0] if stored else None


def window_key(bucket: str, who: str) -> str:
    """The counter of the current window (``COUNT_SCRIPT``; the create script counts submits itself)."""
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
