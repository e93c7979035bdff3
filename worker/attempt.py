"""One attempt of a job type on this worker: the document's life while it runs here.

``running`` with the attempt number on start, progress while it runs, and exactly one of
``succeeded``/``failed``/``cancelled`` at the end, or back to ``queued`` (a retry after an
error, or the worker stopping). The last write also does what the attempt leaves to the queue
(``queue.FINISH``, ``queue.REQUEUE``, ``queue.RELEASE``) in the same atomic step, so the
document and the queue never disagree. A job whose document ended elsewhere meanwhile (cancelled
while it was being claimed) raises ``JobEnded`` and writes nothing.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import random
import time
import traceback
from typing import Any

from prometheus_client import Counter, Histogram
from pydantic import ValidationError

from core import contract, queue, scripts, tracing
from core.settings import Settings
from core.store import Store
from worker.progress import JobContext, JobEnded, JobLog, ThreadJobContext
from worker.registry import JobType, Retry

log = logging.getLogger("worker")

JOBS_FINISHED = Counter("progress_jobs_finished", "Job attempts by how they ended.", ["type", "status"])
JOB_SECONDS = Histogram(
    "progress_job_duration_seconds",
    "Run time of job attempts.",
    ["type"],
    buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600),
)

CRASH_ALLOWANCE = 2  # runs beyond max_tries allowed for crashed or stopped workers


class Attempts:
    """Runs attempts of job types; ``running`` holds the context of each one under way (cancel
    requests, lease renewal and the stall check read it)."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.running: dict[str, JobContext] = {}
        self._unwatched = store.redis.register_script(scripts.UNWATCHED.lua)

    def timeout(self, job_type: JobType) -> float:
        return job_type.timeout if job_type.timeout is not None else self.settings.job_timeout

    async def run(self, job_type: JobType, job_id: str, attempt: int, params: Any, claimed: scripts.Claimed) -> None:
        """Run one attempt, from what the claim read (the stored document, the request id, whether
        a cancel is asked, the submit's trace context)."""
        if claimed.event is None:
            raise JobEnded("missing")
        packed = contract.unpack(claimed.event)
        doc = json.loads(packed.doc)
        if doc["status"] in contract.TERMINAL:
            raise JobEnded(doc["status"])
        ctx = JobContext(self.store, doc, self.settings.progress_interval, packed.tenant, int(claimed.log_seq))
        # every line about this job carries its id, attempt and the request id that submitted it;
        # ``ctx.log``'s lines at INFO and above are also the job's own log
        rid = claimed.request_id
        extra = {"job_id": job_id, "attempt": attempt, "request_id": rid.decode() if rid else None}
        ctx.log = JobLog(log, extra, ctx, asyncio.get_running_loop())
        ctx.request_id, ctx.traceparent = extra["request_id"] or "", (claimed.traceparent or b"").decode()
        ctx.cancel_requested = claimed.cancelled == 1
        self.running[job_id] = ctx
        started = time.monotonic()
        try:
            if tracing.tracer is None:  # (tracing off: not even a context manager per attempt)
                await self._run(ctx, job_type, attempt, params)
            else:
                await self._traced(ctx, job_type, attempt, params, claimed.traceparent)
        finally:
            ctx.close()
            self.running.pop(job_id, None)
            JOB_SECONDS.labels(job_type.name).observe(time.monotonic() - started)
            JOBS_FINISHED.labels(job_type.name, ctx.doc["status"]).inc()

    async def unwatched(self, job_ids: list[str]) -> list[str]:
        """Which of ``job_ids`` (jobs with ``cancel_when_unwatched``) nobody has watched for that
        long (``scripts.UNWATCHED``: one call)."""
        keys, args = scripts.UNWATCHED.fields(
            watching=contract.WATCHING, job_prefix=contract.job_key(""), ids=" ".join(job_ids), gap_ms=int(contract.WATCH_GAP * 1000)
        )
        return [job_id.decode() for job_id in await self._unwatched(keys=keys, args=args)]

    async def abandoned(self) -> list[str]:
        """The running jobs that nobody has watched for their ``cancel_when_unwatched`` (checked in
        one call, made only when such jobs run here), each given the error it is cancelled with.
        The worker's lease beat asks, and cancels them as a ``DELETE`` would."""
        running = self.running.items()
        watchable = [job_id for job_id, ctx in running if ctx.doc.get("cancel_when_unwatched") and not ctx.cancel_requested]
        if not watchable:
            return []
        found = await self.unwatched(watchable)
        for job_id in found:
            ctx = self.running.get(job_id)
            if ctx is not None:
                ctx.cancel_error = unwatched_error(ctx.doc["cancel_when_unwatched"])
        return found

    async def _traced(self, ctx: JobContext, job_type: JobType, attempt: int, params: Any, parent: bytes | None) -> None:
        """``_run`` in the attempt's span (``core.tracing``), which ends with the attempt's outcome."""
        with tracing.attempt_span(parent.decode() if parent else "", job_type.name, ctx.id, attempt) as ctx.span:
            await self._run(ctx, job_type, attempt, params)
            ended = ctx.doc.get("attempts") or [{}]  # as its entry in ``attempts`` says, or the state it left
            ctx.span.set_attribute("job.outcome", ended[-1]["outcome"] if ended[-1].get("attempt") == attempt else ctx.doc["status"])

    async def _run(self, ctx: JobContext, job_type: JobType, attempt: int, params: Any) -> None:
        job_id = ctx.id
        timeout = self.timeout(job_type)
        if attempt > job_type.max_tries + CRASH_ALLOWANCE:
            message = f"gave up after {attempt - 1} attempts"
            ctx.log.info("job %s: failed: %s", job_id, message)
            await ctx.finish(contract.FAILED, attempt=attempt, error=error("MaxTriesExceeded", message), after=queue.FINISH)
            return
        seconds = ctx.doc.get("cancel_when_unwatched")
        if seconds and ctx.doc["status"] == contract.QUEUED and await self.unwatched([job_id]):
            failure = unwatched_error(seconds)  # abandoned while it was queued: it never starts
            ctx.log.info("job %s: cancelled before it started: %s", job_id, failure["message"])
            why = {"error": failure, "message": failure["message"]}
            await ctx.finish(contract.CANCELLED, result_ttl=job_type.result_ttl, after=queue.FINISH, **why)
            return
        started = time.monotonic()
        ctx.note_start(attempt)
        history = {}
        if ctx.doc["status"] == contract.RUNNING:  # the last attempt's worker died mid-run (its lease lapsed)
            history["attempts"] = contract.attempts_after(ctx.doc, "lost", contract.now_iso())
        await ctx.write(status=contract.RUNNING, attempt=attempt, started_at=contract.now_iso(), message=None, error=None, **history)
        ctx.log.debug("job %s: running %s, attempt %d", job_id, job_type.name, attempt)
        try:
            parsed = job_type.params.model_validate(params)
            if ctx.cancel_requested:
                raise asyncio.CancelledError()
            ctx.task = asyncio.create_task(self._call(job_type, ctx, parsed))
            async with asyncio.timeout(timeout):
                result = await ctx.task
            contract.dumps(result)
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # this worker is stopping: the job goes back
                ctx.log.info("job %s: worker stopping, re-queued", job_id)
                ctx.cancel_requested = True  # a sync job's thread stops at its next progress() call
                await asyncio.shield(ctx.finish(contract.QUEUED, message="worker stopped; job re-queued", after=queue.RELEASE))
                raise
            why = {} if ctx.cancel_error is None else {"error": ctx.cancel_error, "message": ctx.cancel_error["message"]}
            ctx.log.info("job %s: cancelled%s", job_id, f": {ctx.cancel_error['message']}" if why else "")
            await ctx.finish(contract.CANCELLED, result_ttl=job_type.result_ttl, after=queue.FINISH, **why)
        except TimeoutError:
            ctx.log.info("job %s: timed out after %g s", job_id, timeout)
            ctx.cancel_requested = True  # a sync job's thread stops at its next progress() call
            failure = error("TimeoutError", f"job exceeded its {timeout:g} s timeout")
            await ctx.finish(contract.FAILED, result_ttl=job_type.result_ttl, error=failure, after=queue.FINISH)
        except JobEnded:
            raise
        except Exception as e:
            await self._failed(ctx, job_type, attempt, e)
        else:
            took = time.monotonic() - started
            if ctx.has_log:  # (a job that logged nothing has no log to end)
                ctx.note("INFO", f"succeeded in {took:.3f} s")
            await ctx.finish(contract.SUCCEEDED, result=result, result_ttl=job_type.result_ttl, progress=100.0, after=queue.FINISH)
            ctx.log.worker_log.info("job %s: succeeded (%s, attempt %d, %.3f s)", job_id, job_type.name, attempt, took)

    async def _failed(self, ctx: JobContext, job_type: JobType, attempt: int, e: Exception) -> None:
        """Retry with back-off while tries remain (re-queued for later), else end ``failed``."""
        if isinstance(e, ValidationError):
            failure = error("InvalidParams", str(e))
        elif isinstance(e, (TypeError, ValueError)) and "JSON" in str(e):
            failure = error("ResultNotJSON", str(e))
        else:
            extra = {"traceback": traceback.format_exc()} if self.settings.debug else {}
            failure = error(type(e).__name__, str(e), **extra)
        if attempt < job_type.max_tries and not isinstance(e, ValidationError):
            after = e.after if isinstance(e, Retry) and e.after is not None else backoff(job_type.backoff, attempt)
            ctx.log.info("job %s: attempt %d failed (%s); retrying in %.2f s", ctx.id, attempt, failure["type"], after)
            await ctx.finish(
                contract.QUEUED, message=f"retrying in {after:.1f} s", error=failure, after=queue.REQUEUE, due_ms=queue.due_in(after)
            )
            return
        ctx.log.info("job %s: failed: %s: %s", ctx.id, failure["type"], failure["message"])
        await ctx.finish(contract.FAILED, result_ttl=job_type.result_ttl, error=failure, after=queue.FINISH)

    async def _call(self, job_type: JobType, ctx: JobContext, params: Any) -> Any:
        """The job's function, then the children it spawned and did not wait for (``ctx.spawn``)."""
        if inspect.iscoroutinefunction(job_type.fn):
            result = await job_type.fn(ctx, params)
        else:
            result = await asyncio.to_thread(job_type.fn, ThreadJobContext(ctx, asyncio.get_running_loop()), params)
        await ctx.wait_rest()
        return result


def backoff(base: float, attempt: int) -> float:
    """Exponential back-off with jitter: about base * 2^(attempt-1), between 0.5x and 1.5x of it."""
    return min(base * 2 ** (attempt - 1), 3600.0) * random.uniform(0.5, 1.5)


def error(kind: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"type": kind, "message": message, **extra}


def unwatched_error(seconds: float) -> dict[str, Any]:
    """The error of a job cancelled because nobody watched it (``cancel_when_unwatched``)."""
    return error("Unwatched", f"no one watched this job for {seconds:g} s")
