"""Job types for the benchmark, registered with ``JOBS_MODULE=worker.demo,bench.jobs``.

``bench_noop`` measures the worker's start path (202 -> ``running``): it does nothing.
``bench_feed`` is the type of the documents the bench drives itself (it publishes their updates
with the same Lua store+publish script as ``ctx.progress()``); no worker ever runs one, since
the bench runs no worker while it drives documents.
"""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, Field

from worker.registry import job


class NoopParams(BaseModel):
    model_config = {"extra": "forbid"}

    sleep: float = Field(0.0, ge=0, le=10, description="seconds to wait before returning")


@job("bench_noop", params=NoopParams)
async def bench_noop(ctx, params: NoopParams) -> dict:
    if params.sleep:
        await asyncio.sleep(params.sleep)
    return {}


class FeedParams(BaseModel):
    model_config = {"extra": "forbid"}


@job("bench_feed", params=FeedParams)
async def bench_feed(ctx, params: FeedParams) -> dict:
    return {}
