"""The demo job types that ship with the project: ``demo`` and ``batch`` (which spawns ``demo`` jobs)."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, Field

from worker.registry import ChildFailed, job


class DemoParams(BaseModel):
    model_config = {"extra": "forbid"}

    steps: int = Field(10, ge=1, le=10_000, description="number of steps")
    interval: float = Field(0.2, ge=0, le=60, description="seconds per step")
    fail_at_step: int | None = Field(None, ge=1, description="raise at this step")


class DemoFailure(Exception):
    pass


@job("demo", params=DemoParams)
async def demo(ctx, params: DemoParams) -> dict:
    """Counts ``steps`` steps, ``interval`` seconds each, reporting after each; fails at ``fail_at_step``."""
    for i in range(1, params.steps + 1):
        await asyncio.sleep(params.interval)
        if i == params.fail_at_step:
            ctx.log.warning("step %d: failing, as fail_at_step asked", i)  # the job's log: progress logs ID
            raise DemoFailure(f"failed at step {i} of {params.steps}")
        await ctx.progress(100 * i / params.steps, message=f"step {i} of {params.steps}")
    return {"steps": params.steps}


class BatchParams(BaseModel):
    model_config = {"extra": "forbid"}

    parts: int = Field(3, ge=1, le=20, description="demo jobs to spawn, the i-th of 5 x i steps and weight i")
    interval: float = Field(0.2, ge=0, le=60, description="seconds per step of each")
    fail_part: int | None = Field(None, ge=1, description="this part fails at its last step")


@job("batch", params=BatchParams, timeout=600)
async def batch(ctx, params: BatchParams) -> dict:
    """Spawns ``parts`` demo jobs (its own part: weight 1), and sums up their steps."""
    ctx.weight = 1  # its own part against its children's weights (1 unless set)
    kids = []
    for i in range(1, params.parts + 1):
        part = {"steps": 5 * i, "interval": params.interval, "fail_at_step": 5 * i if i == params.fail_part else None}
        kids.append(await ctx.spawn("demo", part, weight=i))
    await ctx.progress(100, message=f"spawned {params.parts} parts")  # its own part: done
    try:
        done = await ctx.wait(kids)  # their results, in order
    except ChildFailed as failed:  # one failed or was cancelled: this job fails, the rest are cancelled
        raise DemoFailure(f"part {kids.index(failed.child['id']) + 1} {failed.child['status']}") from failed
    return {"parts": params.parts, "steps": sum(result["steps"] for result in done)}
