"""The demo job type that ships with the project."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, Field

from worker.registry import job


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
