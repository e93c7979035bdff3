"""A CPU-bound sync job: count the primes below a number with a segmented sieve.

``JOBS_MODULE=examples.primes`` registers the ``primes`` type. It is a plain ``def``, so the
worker runs it in a thread and hands it a ``ctx`` whose ``progress()`` is a plain call; the
same ``Stages`` helper reports without ``await``. Each report is also where a cancel lands:
``progress()`` raises ``CancelledError`` in the thread once the job is cancelled or timed out.
"""

from __future__ import annotations

from math import isqrt

from pydantic import BaseModel, Field

from worker.registry import job
from worker.stages import Stages


class PrimesParams(BaseModel):
    """Count the primes below ``below``."""

    model_config = {"extra": "forbid"}

    below: int = Field(1_000_000, ge=2, le=10_000_000_000, description="count primes p < below")
    segments: int = Field(100, ge=1, le=10_000, description="sieve segments (one progress report each)")


@job("primes", params=PrimesParams, timeout=600)
def primes(ctx, params: PrimesParams) -> dict:
    """Count the primes below a number (segmented sieve of Eratosthenes, in a thread)."""
    stages = Stages(ctx, {"base": 1, "sieve": 49})
    stages.enter("base", message="sieving the base primes")
    base = small_primes(isqrt(params.below - 1))
    stages.step(1, 1, message=f"{len(base)} base primes")

    stages.enter("sieve", message="sieving")
    size = -(-params.below // params.segments)  # ceiling division
    count, largest = 0, None
    for k in range(params.segments):
        lo, hi = k * size, min(params.below, (k + 1) * size)
        if lo < hi:
            segment = sieve_segment(lo, hi, base)
            count += segment.count(1)
            top = segment.rfind(1)
            if top >= 0:
                largest = lo + top
        stages.step(k + 1, params.segments, message=f"{count} primes below {hi:,}")
    return {"below": params.below, "count": count, "largest": largest}


def small_primes(limit: int) -> list[int]:
    """The primes <= ``limit`` (a plain sieve)."""
    if limit < 2:
        return []
    flags = bytearray([1]) * (limit + 1)
    flags[0] = flags[1] = 0
    for p in range(2, isqrt(limit) + 1):
        if flags[p]:
            flags[p * p :: p] = bytes(len(range(p * p, limit + 1, p)))
    return [n for n in range(limit + 1) if flags[n]]


def sieve_segment(lo: int, hi: int, base: list[int]) -> bytearray:
    """Flags for ``lo..hi-1``: 1 where the number is prime. ``base`` must hold every prime
    up to the square root of ``hi - 1``."""
    flags = bytearray([1]) * (hi - lo)
    for n in range(lo, min(hi, 2)):  # 0 and 1 are not prime
        flags[n - lo] = 0
    for p in base:
        if p * p >= hi:
            break
        start = max(p * p, -(-lo // p) * p)
        flags[start - lo :: p] = bytes(len(range(start - lo, hi - lo, p)))
    return flags
