"""Job types, registered by name with a params model.

The server imports the job modules only to validate params against these models; it never
runs job code. The worker runs the registered functions::

    from pydantic import BaseModel
    from worker.registry import job

    class ResizeParams(BaseModel):
        url: str

    @job("resize", params=ResizeParams, timeout=60)
    async def resize(ctx, params: ResizeParams):
        await ctx.progress(50, message="half way")
        return {"ok": True}
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from core import contract
from core import queue as queues


@dataclass(frozen=True)
class JobType:
    name: str
    fn: Callable[..., Any]  # async def fn(ctx, params) or a plain def, run in a thread
    params: type[BaseModel]
    timeout: float | None = None  # seconds; None: the JOB_TIMEOUT setting
    max_tries: int = 1  # runs on errors (1: no retry); crashed or stopped workers add up to 2 more
    backoff: float = 1.0  # seconds before the first retry, doubled each time, with jitter
    result_ttl: int | None = None  # seconds; None: the RESULT_TTL setting
    queue: str = queues.DEFAULT  # the named queue its jobs wait in (workers choose queues: WORKER_QUEUES)
    priority: int = 0  # of a submit that asks for none (0-9, higher first; capped by the tenant's MAX_PRIORITY)
    cancel_when_unwatched: float | None = None  # seconds nobody may watch it before it is cancelled; None: never


class Retry(Exception):
    """Raise from job code to run the job again (counts against ``max_tries``)."""

    def __init__(self, after: float | None = None, message: str = "retry requested by the job") -> None:
        super().__init__(message)
        self.after = after


class ChildFailed(Exception):
    """A child that ``ctx.wait`` waited for failed or was cancelled; ``child`` is its document."""

    def __init__(self, child: dict[str, Any]) -> None:
        why = (child.get("error") or {}).get("message")
        super().__init__(f"child {child['id']} ({child['type']}) {child['status']}" + (f": {why}" if why else ""))
        self.child = child


REGISTRY: dict[str, JobType] = {}


def job(
    name: str,
    *,
    params: type[BaseModel],
    timeout: float | None = None,
    max_tries: int = 1,
    backoff: float = 1.0,
    result_ttl: int | None = None,
    queue: str = queues.DEFAULT,
    priority: int = 0,
    cancel_when_unwatched: float | None = None,
) -> Callable:
    """Register the decorated function as job type ``name``. ``cancel_when_unwatched=S``: a job
    nobody watches (no stream, WebSocket subscription or poll) for S seconds is cancelled, unless
    it has a webhook; a submit may ask for less (README, "Abandoned work")."""
    if not name or name.startswith("_") or name == contract.GROUP:
        raise ValueError(f"job type name {name!r} must not be empty, {contract.GROUP!r} or start with '_'")
    if max_tries < 1:
        raise ValueError("max_tries must be >= 1")
    if not queues.QUEUE_NAME.fullmatch(queue):
        raise ValueError(f"queue {queue!r} must be 1 to 32 of a-z, 0-9, '_' and '-', starting with a letter or digit (not health-check)")
    if priority not in queues.PRIORITIES:
        raise ValueError("priority must be 0 to 9")
    low, high = contract.UNWATCHED_MIN, contract.UNWATCHED_MAX
    if cancel_when_unwatched is not None and not low <= cancel_when_unwatched <= high:
        raise ValueError(f"cancel_when_unwatched must be between {low:g} and {high:g} seconds")

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in REGISTRY and REGISTRY[name].fn is not fn:
            raise ValueError(f"job type {name!r} is registered twice")
        REGISTRY[name] = JobType(name, fn, params, timeout, max_tries, backoff, result_ttl, queue, priority, cancel_when_unwatched)
        return fn

    return register


def load(modules: str) -> dict[str, JobType]:
    """Import each comma-separated module (registering its jobs) and return the registry."""
    for module in filter(None, (m.strip() for m in modules.split(","))):
        importlib.import_module(module)
    if not REGISTRY:
        raise SystemExit(f"No job types registered by JOBS_MODULE={modules!r}")
    return REGISTRY
