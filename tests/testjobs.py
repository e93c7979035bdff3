"""Job types used by the tests (loaded with JOBS_MODULE=worker.demo,testjobs)."""

from __future__ import annotations

import asyncio
import os
import time

from pydantic import BaseModel, Field

from worker.registry import ChildFailed, Retry, job


class Flaky(BaseModel):
    fail_times: int = Field(ge=0)
    use_retry: bool = False  # raise Retry (with after=0.05) instead of an error


class Wait(BaseModel):
    seconds: float = Field(ge=0, le=600)
    report_every: float | None = None


class Count(BaseModel):
    steps: int = Field(ge=1, le=1000)
    sleep: float = Field(0.01, ge=0)


@job("flaky", params=Flaky, max_tries=3, backoff=0.2)
async def flaky(ctx, params: Flaky) -> dict:
    """Fails its first ``fail_times`` attempts, then succeeds."""
    await ctx.progress(10, message=f"attempt {ctx.attempt}")
    if ctx.attempt <= params.fail_times:
        if params.use_retry:
            raise Retry(after=0.05)
        raise RuntimeError(f"attempt {ctx.attempt} failed")
    return {"attempt": ctx.attempt}


@job("wait", params=Wait, timeout=1.5)
async def wait(ctx, params: Wait) -> str:
    """Waits; reports every ``report_every`` seconds if set. Times out after 1.5 s."""
    deadline = time.monotonic() + params.seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(min(params.report_every or params.seconds, max(0.0, deadline - time.monotonic())))
        if params.report_every:
            await ctx.progress(None, message="still here")
    return "waited"


@job("count_sync", params=Count, timeout=5)
def count_sync(ctx, params: Count) -> int:
    """A plain (blocking) function: runs in a thread and reports from there."""
    for i in range(1, params.steps + 1):
        time.sleep(params.sleep)
        ctx.progress(100 * i / params.steps, message=f"sync step {i}")
    return params.steps


@job("long", params=Wait, timeout=600)
async def long(ctx, params: Wait) -> str:
    """Reports progress every 0.1 s for ``seconds``; for crash and stall tests."""
    steps = max(1, int(params.seconds / 0.1))
    for i in range(1, steps + 1):
        await asyncio.sleep(0.1)
        if not params.report_every:
            await ctx.progress(100 * i / steps, message=f"tick {i}")
    return "done"


class Echo(BaseModel):
    message: str = Field(max_length=10_000)
    stage: str | None = None


@job("echo", params=Echo)
async def echo(ctx, params: Echo) -> dict:
    """Reports ``message`` (and ``stage``) as given, then returns them."""
    await ctx.progress(50, message=params.message, stage=params.stage)
    return {"message": params.message}


class Flood(BaseModel):
    count: int = Field(ge=1, le=100_000)
    size: int = Field(100, ge=0, le=60_000)


@job("flood", params=Flood)
async def flood(ctx, params: Flood) -> int:
    """``count`` progress updates as fast as they go, each with a ``size``-byte message."""
    filler = "x" * params.size
    for i in range(1, params.count + 1):
        await ctx.progress(100 * i / params.count, message=f"{i} {filler}")
    return params.count


class Chatty(BaseModel):
    lines: int = Field(ge=0, le=100_000)
    every: int = Field(100_000, ge=1)  # pause after every this many lines
    pause: float = Field(0, ge=0, le=10)
    hold: float = Field(0, ge=0, le=60)  # wait this long before the first line
    size: int = Field(0, ge=0, le=10_000)  # filler bytes per line
    report: bool = False  # progress with each line too


@job("chatty", params=Chatty, timeout=120)
async def chatty(ctx, params: Chatty) -> int:
    """Logs ``lines`` lines through ``ctx.log`` ("line i", with ``extra={"i": i}``) as fast as it
    can, pausing ``pause`` seconds every ``every`` lines."""
    filler = " " + "x" * params.size if params.size else ""
    await asyncio.sleep(params.hold)
    for i in range(1, params.lines + 1):
        ctx.log.info("line %d%s", i, filler, extra={"i": i})
        if params.report:
            await ctx.progress(100 * i / params.lines, message=f"line {i} of {params.lines}")
        if i % params.every == 0:
            await asyncio.sleep(params.pause)
    return params.lines


@job("chatty_sync", params=Chatty, timeout=120)
def chatty_sync(ctx, params: Chatty) -> int:
    """``chatty`` as a plain function, logging from its thread."""
    time.sleep(params.hold)
    for i in range(1, params.lines + 1):
        ctx.log.info("line %d", i, extra={"i": i})
        if i % params.every == 0:
            time.sleep(params.pause)
    return params.lines


@job("abandonable", params=Wait, timeout=120, cancel_when_unwatched=5)
async def abandonable(ctx, params: Wait) -> str:
    """Reports progress every 0.25 s for ``seconds``; cancelled once nobody has watched it for 5 s."""
    steps = max(1, int(params.seconds / 0.25))
    for i in range(1, steps + 1):
        await asyncio.sleep(0.25)
        await ctx.progress(100 * i / steps, message=f"tick {i}")
    return "done"


class Slot(BaseModel):
    seconds: float = Field(0.0, ge=0, le=60)


def took_slot(ctx) -> dict:
    return {"pid": os.getpid(), "started": time.time(), "attempt": ctx.attempt}


@job("slot", params=Slot, timeout=60)
async def slot(ctx, params: Slot) -> dict:
    """Takes one job slot for ``seconds``; says which worker process ran it, and when it started."""
    ran = took_slot(ctx)
    await asyncio.sleep(params.seconds)
    return ran


@job("heavy_slot", params=Slot, timeout=60, queue="heavy")
async def heavy_slot(ctx, params: Slot) -> dict:
    """``slot`` in the queue ``heavy``."""
    ran = took_slot(ctx)
    await asyncio.sleep(params.seconds)
    return ran


class Spawned(BaseModel):
    type: str = "demo"
    params: dict = {}
    weight: float = 1.0


class Fanout(BaseModel):
    children: list[Spawned] = Field(default_factory=list, max_length=20)
    own_steps: int = Field(0, ge=0, le=1000)  # own progress reports, 0.05 s apart, after spawning
    own_weight: float = Field(1.0, ge=0)
    wait: bool = True  # ctx.wait for them (else it returns at once, and its end waits for them)
    catch: bool = False  # a ChildFailed is caught and its child named in the result
    fail: bool = False  # raise once they are spawned


@job("fanout", params=Fanout, timeout=60)
async def fanout(ctx, params: Fanout) -> dict:
    """Spawns ``children``, reports ``own_steps`` of its own, then waits for them (``ctx.wait``)."""
    ctx.weight = params.own_weight
    kids = [await ctx.spawn(c.type, c.params, weight=c.weight) for c in params.children]
    for i in range(1, params.own_steps + 1):
        await asyncio.sleep(0.05)
        await ctx.progress(100 * i / params.own_steps)
    if params.fail:
        raise RuntimeError("failing, as asked")
    if not params.wait:
        return {"spawned": kids}
    try:
        return {"results": await ctx.wait(kids)}
    except ChildFailed as failed:
        if not params.catch:
            raise
        return {"failed": failed.child["id"], "status": failed.child["status"]}


job("fanout_retried", params=Fanout, timeout=60, max_tries=2, backoff=30)(fanout)  # (waits 15-45 s queued before its retry)


@job("fanout_sync", params=Fanout, timeout=60)
def fanout_sync(ctx, params: Fanout) -> dict:
    """``fanout`` as a plain function, in a thread."""
    ctx.weight = params.own_weight
    kids = [ctx.spawn(c.type, c.params, weight=c.weight) for c in params.children]
    for i in range(1, params.own_steps + 1):
        time.sleep(0.05)
        ctx.progress(100 * i / params.own_steps)
    return {"results": ctx.wait(kids)} if params.wait else {"spawned": kids}
