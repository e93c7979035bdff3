"""The arq worker that runs registered job types and keeps their documents true.

Each job type becomes an arq function of the same name, wrapped by ``run_job``, which owns
the document's life on this worker: ``running`` with the attempt number on start, progress
while it runs, and exactly one of ``succeeded``/``failed``/``cancelled`` at the end (or back
to ``queued`` when the worker is stopped and arq re-queues the job).

Two differences from a stock arq worker:

* it wakes as soon as a job is enqueued (``contract.WAKE_CHANNEL``) instead of waiting for
  the next poll, so the time from 202 to ``running`` is not a polling interval;
* cancellation is ours, not arq's abort set (which has pruning bugs): the server publishes
  the job id on ``contract.CANCEL_CHANNEL`` and sets ``contract.cancel_key``; the worker
  running that job cancels its task;
* a job of a type this worker does not run (a rolling deploy: a new server accepted a type
  that an old worker does not know yet) is put back for another worker, without counting an
  attempt, instead of failing; it fails only after ``UNKNOWN_TYPE_GRACE`` without a taker.
  Workers announce the types they run with a heartbeat (``core.workers``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
import random
import secrets
import socket
import time
import traceback
from typing import Any

from arq import Retry as ArqRetry
from arq import Worker
from arq.connections import create_pool
from arq.worker import func
from prometheus_client import Counter, Histogram
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

from core import connections, contract, queue, redischeck, workers
from core.fastpath import redispy
from core.settings import Settings
from core.store import Store, WriteRefused
from worker import webhooks
from worker.progress import REDIS_OUTAGE, JobContext, JobEnded, ThreadJobContext
from worker.registry import JobType, Retry

log = logging.getLogger("worker")

JOBS_FINISHED = Counter("progress_jobs_finished", "Job attempts by how they ended.", ["type", "status"])
JOB_SECONDS = Histogram(
    "progress_job_duration_seconds",
    "Run time of job attempts.",
    ["type"],
    buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600),
)
WEBHOOK_ATTEMPTS = Counter("progress_webhook_attempts", "Webhook delivery attempts.", ["result"])

CRASH_ALLOWANCE = 2  # runs beyond max_tries allowed for crashed or stopped workers
# our timeout fires first; arq's is a backstop, far enough out that finishing (which may wait
# out a Redis outage) is never cut by it and mistaken for a worker stop
ARQ_TIMEOUT_MARGIN = 2 * REDIS_OUTAGE + 10
WEBHOOK_TIMEOUT = 60.0  # arq's backstop for one delivery attempt
UNKNOWN_TYPE_RETRY = 5.0  # a job of a type this worker does not run goes back for this long, seconds
# Redis went away (WatchError: redis-py's word for a connection lost inside a WATCH)
REDIS_LOST = (RedisConnectionError, RedisTimeoutError, WatchError, OSError)
# arq's lease of a job it has just claimed, until ``run_job_type`` shortens it to LEASE and renews
# it: long enough for a webhook attempt (not renewed), short enough that a job whose worker died
# right after claiming it runs again within about a minute (arq's own: the longest job timeout)
CLAIM_LEASE = WEBHOOK_TIMEOUT + 10


class KnownTypes(dict):
    """arq's functions by name, where a name this worker does not run maps to ``fallback``
    (arq looks a job's function up with ``functions[name]`` and fails the job on a KeyError)."""

    def __init__(self, functions: dict[str, Any], fallback: Any) -> None:
        super().__init__(functions)
        self.fallback = fallback

    def __missing__(self, name: str) -> Any:
        return self.fallback


class ProgressWorker(Worker):
    def __init__(self, settings: Settings, registry: dict[str, JobType], **kwargs: Any) -> None:
        self.settings = settings
        self.registry = registry
        self.running: dict[str, JobContext] = {}
        self._wake = asyncio.Event()
        self._listener: asyncio.Task | None = None
        self._heartbeat: asyncio.Task | None = None
        self._announcer: asyncio.Task | None = None
        self.bounced: dict[str, float] = {}  # job id -> until when: a type we do not run, left for others
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"
        self.started_at = contract.now_iso()
        functions = [
            func(
                self._job_function(job_type),
                name=job_type.name,
                timeout=self._timeout(job_type) + ARQ_TIMEOUT_MARGIN,
                max_tries=1_000_000,  # tries are counted by run_job, which can write `failed`
            )
            for job_type in registry.values()
        ]
        functions.append(
            func(self._deliver_webhook, name=contract.WEBHOOK_FUNCTION, timeout=WEBHOOK_TIMEOUT, max_tries=1_000_000)
        )
        super().__init__(
            functions,
            redis_settings=connections.arq_settings(settings.redis_url),
            max_jobs=settings.worker_concurrency,
            keep_result=0,  # results live in our own keys, as JSON
            job_serializer=queue.dumps,
            job_deserializer=queue.loads,
            **kwargs,
        )
        unknown = func(self._requeue_on_redis_loss(self._unknown_type), name="(unknown type)", timeout=WEBHOOK_TIMEOUT, max_tries=1_000_000)
        self.functions = KnownTypes(self.functions, unknown)
        self.in_progress_timeout_s = CLAIM_LEASE

    @staticmethod
    def _requeue_on_redis_loss(function):
        """``function``, except that losing Redis in our own bookkeeping around a job (reading
        its document, marking it running or finished) puts the job back in the queue: arq would
        take the error for the job's failure and drop it from the queue, while its document says
        ``queued``. (Errors of the job's own code never get here: they are its result.)"""

        @functools.wraps(function)
        async def guarded(arq_ctx: dict[str, Any], *args: Any) -> Any:
            try:
                return await function(arq_ctx, *args)
            except REDIS_LOST as e:
                log.warning("job %s: lost Redis around the job (%s); back to the queue", arq_ctx["job_id"], e)
                raise ArqRetry(defer=1.0) from e

        return guarded

    stopping = False  # set by SIGTERM/SIGINT: ``python -m worker`` then never starts it again

    def handle_sig(self, signum: int) -> None:
        self.stopping = True
        super().handle_sig(signum)

    async def _unknown_type(self, arq_ctx: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        """A job whose type this worker does not run: back to the queue for another worker
        (arq's try counter given back, so it is not an attempt), or, after
        ``UNKNOWN_TYPE_GRACE`` without a taker, ``failed``. The document says it waits."""
        job_id = arq_ctx["job_id"]
        await self.pool.decr(queue.tries_key(job_id))
        loaded = await self.store.load(job_id)
        if loaded is None or loaded[0]["status"] in contract.TERMINAL:
            return
        doc, tenant = loaded
        waited = time.time() - arq_ctx["enqueue_time"].timestamp()
        with contextlib.suppress(WriteRefused):  # cancelled meanwhile: arq then drops it
            if waited > self.settings.unknown_type_grace:
                log.warning("job %s: no worker ran type %r within %g s; failed", job_id, doc["type"], waited)
                message = f"no worker that runs type {doc['type']!r} took this job within {self.settings.unknown_type_grace:g} s"
                await self.store.write(doc, tenant, status=contract.FAILED, eta_s=None, error=error("UnknownJobType", message))
                return
            log.info("job %s: type %r is not run here; back to the queue for another worker", job_id, doc["type"])
            if doc["message"] != workers.waiting_message(doc["type"]):
                await self.store.write(doc, tenant, message=workers.waiting_message(doc["type"]))
        if any(doc["type"] in w["types"] for w in await workers.live(self.pool)):
            # a worker that runs it is up: due at once for it (woken now), skipped here for a while
            self.bounced[job_id] = time.monotonic() + UNKNOWN_TYPE_RETRY
            await self.pool.publish(contract.WAKE_CHANNEL, job_id)
            raise ArqRetry()
        # none is: look again later (jittered, so that no worker's polling phase wins every time)
        raise ArqRetry(defer=UNKNOWN_TYPE_RETRY * random.uniform(0.5, 1.5))

    async def _deliver_webhook(self, arq_ctx: dict[str, Any], job_id: str, seq: int) -> None:
        try:
            await webhooks.deliver(self.store, self.settings, job_id, seq, arq_ctx["job_try"])
        except ArqRetry:
            WEBHOOK_ATTEMPTS.labels("retry").inc()
            raise
        WEBHOOK_ATTEMPTS.labels("done").inc()

    def _timeout(self, job_type: JobType) -> float:
        return job_type.timeout if job_type.timeout is not None else self.settings.job_timeout

    def _job_function(self, job_type: JobType):
        async def job_function(arq_ctx: dict[str, Any], params: dict[str, Any]) -> None:
            await self.run_job_type(job_type, arq_ctx["job_id"], arq_ctx["job_try"], params)

        job_function.__qualname__ = job_type.name
        return self._requeue_on_redis_loss(job_function)

    async def main(self) -> None:
        """arq's main loop, except that an enqueue or a finished job wakes it at once."""
        self._pool = await self._connect()
        self.ctx["redis"] = self.pool
        self.store = Store(self.pool, self.settings)
        await redischeck.check(self.pool, "worker")
        self._listener = asyncio.create_task(self._listen())
        self._heartbeat = asyncio.create_task(self._beat())
        self._announcer = asyncio.create_task(self._announce())
        log.info("worker ready for job types: %s", ", ".join(self.registry))
        backoff = 0.1
        while True:
            self._wake.clear()
            try:
                await self._poll_iteration()
                backoff = 0.1
            except REDIS_LOST as e:
                # arq would end the worker here, which then waits for its running jobs before
                # the supervisor restarts it: no new job would start for that long. Keep polling
                # (with a back-off) while Redis restarts or fails over; the running jobs go on.
                log.warning("polling the queue failed (%s); again in %.1f s", e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_delay_s)

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq takes a slot (``job_counter`` and ``sem``) for a job before the Redis calls that
        claim it, and does not give the slot back when one of them raises a connection error.
        Give it back, so polling can go on after the error. A job this worker is still running
        is not claimed again, even when its lease lapsed while Redis was away, and neither is a job
        of a type we do not run that we just left for a worker that runs it."""
        mine = {job_id for job_id, task in self.tasks.items() if not task.done()}
        if self.bounced:
            now = time.monotonic()
            self.bounced = {job_id: until for job_id, until in self.bounced.items() if until > now}
            mine.update(self.bounced)
        job_ids = [j for j in job_ids if j.decode() not in mine]  # our lease lapsed in an outage
        try:
            await super().start_jobs(job_ids)
        except REDIS_LOST:
            self.job_counter -= 1
            self.sem.release()
            raise

    async def _connect(self):
        pool = await create_pool(
            self.redis_settings,
            job_serializer=self.job_serializer,
            job_deserializer=self.job_deserializer,
            default_queue_name=self.queue_name,
        )
        # the server's per-command savings (core.fastpath.redispy) for every progress write too;
        # arq's pool has made a connection already (its ping): close and forget it
        redispy.lean(pool)
        await pool.connection_pool.disconnect()
        pool.connection_pool.reset()
        return pool

    async def finish_failed_job(self, job_id: str, result_data: bytes | None) -> None:
        """arq gave up on a job before calling us (unreadable payload, expired): end its document
        too, so no watcher waits forever and nothing in the payload ran."""
        await super().finish_failed_job(job_id, result_data)
        loaded = await self.store.load(job_id)
        if loaded is not None and loaded[0]["status"] not in contract.TERMINAL:
            reason = queue.loads(result_data).get("r") if result_data else None  # {"type", "message"}
            why = reason.get("message") if isinstance(reason, dict) else None
            log.warning("job %s: rejected by arq before it ran: %s", job_id, why)
            failure = error("JobRejected", "the worker could not run this job" + (f": {why}" if why else ""))
            with contextlib.suppress(WriteRefused):
                await self.store.write(*loaded, status=contract.FAILED, eta_s=None, message=None, error=failure)

    def _release_sem_dec_counter_on_complete(self) -> None:
        super()._release_sem_dec_counter_on_complete()
        self._wake.set()  # a slot is free: look at the queue now

    async def close(self) -> None:
        # arq waits here for the running jobs: keep renewing their leases and hearing cancels
        # until they are done, then stop our tasks
        if self._announcer is not None:  # stopping: no longer a live worker for new jobs
            self._announcer.cancel()
            with contextlib.suppress(BaseException):
                await self._announcer
            with contextlib.suppress(Exception):
                await workers.leave(self.pool, self.worker_id)
        await super().close()
        for task in (self._listener, self._heartbeat):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    async def _announce(self) -> None:
        """The heartbeat that lists this worker, its job types and load (``GET /workers``)."""
        record = {
            "id": self.worker_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "types": sorted(self.registry),
            "concurrency": self.max_jobs,
            "started_at": self.started_at,
        }
        while True:
            try:
                await workers.beat(self.pool, {**record, "running": len(self.running)})
            except Exception as e:  # Redis blip: the next beat tries again
                log.warning("worker heartbeat failed: %s", e)
            await asyncio.sleep(workers.BEAT)

    async def _beat(self) -> None:
        """Renew the lease of every running job, and mark the ones without progress as stalled.

        arq re-runs a job whose ``in-progress`` key has expired. arq sets that key to the longest
        timeout of any function plus 10 s; we shorten it to ``LEASE`` and renew it while the job
        runs here, so a job whose worker died runs again within one lease, not minutes later.
        """
        lease_ms = int(self.settings.lease * 1000)
        while True:
            await asyncio.sleep(self.settings.lease / 3)
            running = list(self.running.values())
            try:
                if running:
                    async with self.pool.pipeline(transaction=False) as pipe:
                        for ctx in running:
                            # SET, not PEXPIRE: a lease that lapsed in a Redis outage is taken back
                            pipe.set(queue.lease_key(ctx.id), b"1", px=lease_ms)
                        await pipe.execute()
                now = time.monotonic()
                for ctx in running:
                    if now - ctx.last_report > self.settings.stall_after and not ctx.doc["stalled"]:
                        ctx.log.info("job %s: no progress for %.0f s, stalled", ctx.id, now - ctx.last_report)
                        await ctx.mark_stalled()
            except JobEnded:
                pass
            except Exception as e:  # Redis blip: the next beat tries again
                log.warning("lease renewal failed: %s", e)

    async def _listen(self) -> None:
        """Wake and cancel notices, on one pub/sub connection, re-established after errors."""
        while True:
            pubsub = self.pool.pubsub()
            try:
                await pubsub.subscribe(contract.WAKE_CHANNEL, contract.CANCEL_CHANNEL)
                await self._check_cancel_keys()  # notices sent while we were not listening
                self._wake.set()
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                    if msg is None:
                        continue
                    if msg["channel"] == contract.CANCEL_CHANNEL.encode():
                        self._cancel(msg["data"].decode())
                    else:
                        self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a Redis blip: listen again after a pause
                log.warning("worker notice listener lost Redis (%s); reconnecting", e)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _check_cancel_keys(self) -> None:
        for job_id in list(self.running):
            if await self.pool.exists(contract.cancel_key(job_id)):
                self._cancel(job_id)

    def _cancel(self, job_id: str) -> None:
        ctx = self.running.get(job_id)
        if ctx is not None and not ctx.cancel_requested:
            ctx.log.info("job %s: cancel requested", job_id)
            ctx.cancel_requested = True
            if ctx.task is not None:
                ctx.task.cancel()

    async def run_job_type(self, job_type: JobType, job_id: str, attempt: int, params: dict[str, Any]) -> None:
        loaded = await self.store.load(job_id)
        if loaded is None or loaded[0]["status"] in contract.TERMINAL:
            log.info("job %s: %s before it started; not running it", job_id, loaded[0]["status"] if loaded else "expired")
            return
        doc, tenant = loaded
        await self.pool.pexpire(queue.lease_key(job_id), int(self.settings.lease * 1000))
        ctx = JobContext(self.store, doc, self.settings.progress_interval, tenant)
        # every line about this job carries its id, attempt and the request id that submitted it
        ctx.log = logging.LoggerAdapter(
            log, {"job_id": job_id, "attempt": attempt, "request_id": await self.store.field(job_id, "rid") or None}
        )
        self.running[job_id] = ctx
        started = time.monotonic()
        try:
            await self._run(ctx, job_type, attempt, params)
        except JobEnded as e:
            ctx.log.info("job %s: ended elsewhere (%s) while running here", job_id, e)
        finally:
            self.running.pop(job_id, None)
            JOB_SECONDS.labels(job_type.name).observe(time.monotonic() - started)
            JOBS_FINISHED.labels(job_type.name, ctx.doc["status"]).inc()

    async def _run(self, ctx: JobContext, job_type: JobType, attempt: int, params: dict[str, Any]) -> None:
        job_id = ctx.id
        timeout = self._timeout(job_type)
        if attempt > job_type.max_tries + CRASH_ALLOWANCE:
            message = f"gave up after {attempt - 1} attempts"
            await ctx.finish(contract.FAILED, attempt=attempt, error=error("MaxTriesExceeded", message))
            return
        await ctx.write(status=contract.RUNNING, attempt=attempt, started_at=contract.now_iso(), message=None, error=None)
        ctx.log.info("job %s: running %s, attempt %d", job_id, job_type.name, attempt)
        if await self.pool.exists(contract.cancel_key(job_id)):
            ctx.cancel_requested = True
        try:
            parsed = job_type.params.model_validate(params)
            if ctx.cancel_requested:
                raise asyncio.CancelledError()
            ctx.task = asyncio.create_task(self._call(job_type, ctx, parsed))
            async with asyncio.timeout(timeout):
                result = await ctx.task
            contract.dumps(result)
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # this worker is stopping: arq re-queues the job
                ctx.log.info("job %s: worker stopping, re-queued", job_id)
                await asyncio.shield(ctx.finish(contract.QUEUED, message="worker stopped; job re-queued"))
                raise
            ctx.log.info("job %s: cancelled", job_id)
            await ctx.finish(contract.CANCELLED, result_ttl=job_type.result_ttl)
        except TimeoutError:
            ctx.log.info("job %s: timed out after %g s", job_id, timeout)
            ctx.cancel_requested = True  # a sync job's thread stops at its next progress() call
            failure = error("TimeoutError", f"job exceeded its {timeout:g} s timeout")
            await ctx.finish(contract.FAILED, result_ttl=job_type.result_ttl, error=failure)
        except JobEnded:
            raise
        except Exception as e:
            await self._failed(ctx, job_type, attempt, e)
        else:
            ctx.log.info("job %s: succeeded", job_id)
            await ctx.finish(contract.SUCCEEDED, result=result, result_ttl=job_type.result_ttl, progress=100.0)

    async def _failed(self, ctx: JobContext, job_type: JobType, attempt: int, e: Exception) -> None:
        """Retry with back-off while tries remain (arq re-queues the job), else end ``failed``."""
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
            await ctx.finish(contract.QUEUED, message=f"retrying in {after:.1f} s", error=failure)
            raise ArqRetry(defer=after)
        ctx.log.info("job %s: failed: %s: %s", ctx.id, failure["type"], failure["message"])
        await ctx.finish(contract.FAILED, result_ttl=job_type.result_ttl, error=failure)

    async def _call(self, job_type: JobType, ctx: JobContext, params: Any) -> Any:
        if inspect.iscoroutinefunction(job_type.fn):
            return await job_type.fn(ctx, params)
        return await asyncio.to_thread(job_type.fn, ThreadJobContext(ctx, asyncio.get_running_loop()), params)


def backoff(base: float, attempt: int) -> float:
    """Exponential back-off with jitter: about base * 2^(attempt-1), between 0.5x and 1.5x of it."""
    return min(base * 2 ** (attempt - 1), 3600.0) * random.uniform(0.5, 1.5)


def error(kind: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"type": kind, "message": message, **extra}
