"""Job types for the benchmark, registered with ``JOBS_MODULE=worker.demo,bench.jobs``.

``bench_noop`` measures the worker's start path (202 -> ``running``) and its jobs/s
(``bench.queue``): it does nothing. ``bench_progress`` publishes progress as fast as it can.
``bench_feed`` is the type of the documents the bench drives itself (it publishes their updates
with the same Lua store+publish script as ``ctx.progress()``); no worker ever runs one, since
the bench runs no worker while it drives documents.
``bench_soak`` is the job of the soak (``bench.soak``): ``demo`` with the worker's
``time.monotonic_ns()`` in each progress message (``"soak <step> <t_ns>"``), taken just before
``ctx.progress()`` stores and publishes it, so a client on the same machine measures
publish-to-receive.
"""

from __future__ import annotations

import asyncio
import time

from pydantic import BaseModel, Field

from worker.demo import DemoFailure, DemoParams
from worker.registry import job


class NoopParams(BaseModel):
    model_config = {"extra": "forbid"}

    sleep: float = Field(0.0, ge=0, le=10, description="seconds to wait before returning")


@job("bench_noop", params=NoopParams)
async def bench_noop(ctx, params: NoopParams) -> dict:
    if params.sleep:
        await asyncio.sleep(params.sleep)
    return {}


class ProgressParams(BaseModel):
    model_config = {"extra": "forbid"}

    steps: int = Field(20, ge=1, le=10_000, description="progress updates to publish")


@job("bench_progress", params=ProgressParams)
async def bench_progress(ctx, params: ProgressParams) -> dict:
    """``steps`` calls of ``ctx.progress()`` in a row (``bench.queue``: the cost of one)."""
    for i in range(1, params.steps + 1):
        await ctx.progress(100 * i / params.steps)
    return {}


class FeedParams(BaseModel):
    model_config = {"extra": "forbid"}


@job("bench_feed", params=FeedParams)
async def bench_feed(ctx, params: FeedParams) -> dict:
    return {}


@job("bench_soak", params=DemoParams)
async def bench_soak(ctx, params: DemoParams) -> dict:
    """The demo job (``worker.demo``), with the worker's clock in each message (publish-to-receive)."""
    for i in range(1, params.steps + 1):
        await asyncio.sleep(params.interval)
        if i == params.fail_at_step:
            raise DemoFailure(f"failed at step {i} of {params.steps}")
        await ctx.progress(100 * i / params.steps, message=f"soak {i} {time.monotonic_ns()}")
    return {"steps": params.steps}
