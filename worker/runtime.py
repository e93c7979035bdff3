"""The worker: claims jobs from the queue, runs them, and keeps their leases.

The queue is arq's (``core.queue``: its keys and records; a stock ``arq.Worker`` can still run
what the server enqueues), but the loop is ours, because arq's costs eleven round trips per job
and ours three, shared by the jobs of one event-loop turn:

1. ``claim``: one ``scripts.CLAIM`` call takes up to as many due jobs as there are free slots
   from the queues this worker serves (``WORKER_QUEUES``; each queue at most its own limit, and
   the first queue looked at turns with each call, so none waits behind another), with each
   one's lease, try count, record, document, request id and cancel flag;
2. each job's ``running`` write (``Store.write``; the writes of one loop turn go as one pipeline);
3. its last write, which also finishes, re-queues or releases it in the queue (``queue.FINISH``,
   ``REQUEUE``, ``RELEASE``) in the same step.

Also:

* it wakes as soon as a job is enqueued (``contract.WAKE_CHANNEL``) or a slot frees, and polls
  every ``POLL_DELAY`` for jobs that come due later (retries);
* leases: a claimed job's lease (``LEASE``) is renewed for all running jobs in one call every
  third of it (``scripts.RENEW``), so a job whose worker died runs again within one lease;
* cancellation: the server publishes the job id on ``contract.CANCEL_CHANNEL`` and sets
  ``contract.cancel_key``; the worker running that job cancels its task;
* a job of a type this worker does not run (a rolling deploy: a new server accepted a type that
  an old worker does not know yet) is put back for another worker without counting an attempt;
  it fails only after ``UNKNOWN_TYPE_GRACE`` without a taker. Workers announce the types they
  run with a heartbeat (``core.workers``);
* SIGTERM or SIGINT: no more claims; running jobs are cancelled, written back ``queued`` and
  released, due again at once for another worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import signal
import socket
import time

from prometheus_client import Counter
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

from core import connections, contract, queue, redischeck, scripts, workers
from core.settings import Settings
from core.store import Store, WriteRefused
from worker import webhooks
from worker.attempt import Attempts, error
from worker.progress import JobEnded
from worker.registry import JobType

log = logging.getLogger("worker")

WEBHOOK_ATTEMPTS = Counter("progress_webhook_attempts", "Webhook delivery attempts.", ["result"])

POLL_DELAY = 0.5  # seconds between looks at the queue when nothing wakes the worker
WEBHOOK_TIMEOUT = 60.0  # the backstop for one delivery attempt
UNKNOWN_TYPE_RETRY = 5.0  # a job of a type this worker does not run goes back for this long, seconds
# Redis went away (WatchError: redis-py's word for a connection lost inside a WATCH)
REDIS_LOST = (RedisConnectionError, RedisTimeoutError, WatchError, OSError)


def served_queues(setting: str, registry: dict[str, JobType], concurrency: int) -> dict[str, int]:
    """``WORKER_QUEUES`` (``heavy:2,default``) as {queue name: most of its jobs run at once},
    in the order given; empty: every queue the registered types name, up to ``concurrency``."""
    if not setting.strip():
        return {name: concurrency for name in sorted({t.queue for t in registry.values()})}
    served = {}
    for item in filter(None, (part.strip() for part in setting.split(","))):
        name, _, most = item.partition(":")
        if not queue.QUEUE_NAME.fullmatch(name) or (most and not (most.isdigit() and int(most) > 0)) or name in served:
            raise SystemExit(f"WORKER_QUEUES entry {item!r} must be a queue name, once, optionally with :N (N >= 1)")
        served[name] = min(int(most or concurrency), concurrency)
    return served


class ProgressWorker:
    def __init__(self, settings: Settings, registry: dict[str, JobType]) -> None:
        self.settings = settings
        self.registry = registry
        self.concurrency = settings.worker_concurrency
        self.queues = served_queues(settings.worker_queues, registry, self.concurrency)  # name -> most at once
        self.tasks: dict[str, asyncio.Task] = {}  # every claimed job under way here, by id
        self.queue_of: dict[str, bytes] = {}  # the queue key of each of them
        self.running_in = {queue.queue_key(name).encode(): 0 for name in self.queues}  # how many, by queue key
        # what a claim asks of each queue: its key, its order key (and then how many)
        self._claims = [(name, queue.queue_key(name).encode(), f"{queue.queue_key(name)} {queue.order_key(name)}") for name in self.queues]
        self._turn = 0  # which queue a claim looks at first
        self.bounced: dict[str, float] = {}  # job id -> until when: a type we do not run, left for others
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"
        self.started_at = contract.now_iso()
        self.stopping = False  # set by SIGTERM/SIGINT: ``python -m worker`` then never starts it again
        self._wake: asyncio.Event | None = None
        self._main: asyncio.Task | None = None

    def run(self) -> None:
        """Run until SIGTERM or SIGINT; raises a Redis error that stopped it otherwise."""
        try:
            import uvloop
        except ImportError:  # pragma: no cover - Windows
            asyncio.run(self.main())
        else:
            uvloop.run(self.main())

    def handle_sig(self, signum: int) -> None:
        log.info("worker stopping on %s: %d jobs under way go back to the queue", signal.Signals(signum).name, len(self.tasks))
        self.stopping = True
        for task in self.tasks.values():
            task.cancel()
        if self._main is not None:
            self._main.cancel()

    async def main(self) -> None:
        self.redis = connections.client(self.settings.redis_url)
        self.store = Store(self.redis, self.settings)
        self.attempts = Attempts(self.store, self.settings)
        self._claim = self.redis.register_script(scripts.CLAIM.lua)
        self._renew = self.redis.register_script(scripts.RENEW.lua)
        self._after = self.redis.register_script(scripts.AFTER.lua)
        self._wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.handle_sig, signum)
        helpers: list[asyncio.Task] = []
        announcer = None
        try:
            await redischeck.check(self.redis, "worker")
            helpers = [asyncio.create_task(self._listen()), asyncio.create_task(self._beat())]
            announcer = asyncio.create_task(self._announce())
            log.info("worker ready for job types: %s; queues: %s", ", ".join(self.registry), ", ".join(self.queues))
            self._main = asyncio.current_task()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll()
        finally:
            self._main = None
            if announcer is not None:  # stopping: no longer a live worker for new jobs
                announcer.cancel()
                with contextlib.suppress(BaseException):
                    await announcer
                with contextlib.suppress(Exception):
                    await workers.leave(self.redis, self.worker_id)
            # the running jobs (cancelled on a signal) write themselves back; meanwhile their
            # leases are renewed and cancels heard
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
            for task in helpers:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            await self.redis.aclose()

    # -- the loop ---------------------------------------------------------------------------

    async def _poll(self) -> None:
        """Claim while slots are free; then wait for a wake-up, a free slot or ``POLL_DELAY``.
        Losing Redis here does not end the worker: running jobs go on while Redis restarts."""
        backoff = 0.1
        while not self.stopping:
            self._wake.clear()
            free = self.concurrency - len(self.tasks)
            if free > 0:
                try:
                    claimed = await self._take(free)
                    backoff = 0.1
                except REDIS_LOST as e:
                    log.warning("polling the queue failed (%s); again in %.1f s", e, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                if claimed == free:
                    continue  # every slot taken: more may be due (the next free slot wakes us)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_DELAY):
                    await self._wake.wait()

    async def _take(self, free: int) -> int:
        """One ``scripts.CLAIM`` call; each claimed job starts in its own task."""
        now = time.monotonic()
        if self.bounced:
            self.bounced = {job_id: until for job_id, until in self.bounced.items() if until > now}
        # a job still under way here is not claimed again, even when its lease lapsed in an outage
        skip = " ".join([*self.tasks, *self.bounced])
        self._turn = (self._turn + 1) % len(self._claims)
        wanted = []
        for name, key, keys in self._claims[self._turn :] + self._claims[: self._turn]:
            room = self.queues[name] - self.running_in[key]
            if room > 0:
                wanted.append(f"{keys} {room}")
        if not wanted:
            return 0
        keys, args = scripts.CLAIM.fields(
            now_ms=int(time.time() * 1000), limit=free, queues=" ".join(wanted),
            step=self.settings.priority_step, lease_ms=int(self.settings.lease * 1000), owner=self.worker_id, skip=skip,
            lease_prefix=queue.LEASE_PREFIX, tries_prefix=queue.TRIES_PREFIX, tries_ttl=queue.TRIES_TTL,
            record_prefix=queue.RECORD_PREFIX, job_prefix=contract.job_key(""), cancel_prefix=contract.cancel_key(""),
        )  # fmt: skip
        rows = await self._claim(keys=keys, args=args)
        for row in rows:
            claimed = scripts.Claimed(*row)
            job_id = claimed.job_id.decode()
            task = asyncio.create_task(self._attempt(job_id, claimed))
            self.tasks[job_id] = task
            self.queue_of[job_id] = claimed.queue
            self.running_in[claimed.queue] += 1
            task.add_done_callback(lambda _, job_id=job_id: self._done(job_id))
        return len(rows)

    def _done(self, job_id: str) -> None:
        self.tasks.pop(job_id, None)
        self.running_in[self.queue_of.pop(job_id)] -= 1
        self._wake.set()  # a slot is free: look at the queue now

    async def _attempt(self, job_id: str, claimed: scripts.Claimed) -> None:
        """Run one claimed job, whatever it is, and leave the queue right however it ends."""
        raw, tries, in_queue = claimed.record, int(claimed.tries), claimed.queue.decode()
        try:
            if raw is None:
                return await self._reject(job_id, in_queue, "the job expired before it ran")
            try:
                record = queue.parse(raw)
            except ValueError as e:
                return await self._reject(job_id, in_queue, str(e))
            if record.job_try and record.job_try > tries:  # a retry asked for (POST /jobs/{id}/retry)
                tries = record.job_try
                await self.redis.set(queue.tries_key(job_id), tries, ex=queue.TRIES_TTL)
            job_type = self.registry.get(record.function)
            if job_type is not None:
                try:
                    await self.attempts.run(job_type, job_id, tries, record.args[0] if record.args else {}, claimed)
                except JobEnded as e:
                    if not e.superseded:  # ended elsewhere (cancelled): off the queue
                        log.info("job %s: ended elsewhere (%s); not running it", job_id, e)
                        await self._leave(job_id, in_queue, queue.FINISH)
            elif record.function == contract.WEBHOOK_FUNCTION:
                try:
                    await self._deliver_webhook(job_id, in_queue, *record.args, attempt=tries)
                except asyncio.CancelledError:  # the worker stops: due again at once elsewhere
                    await self._leave(job_id, in_queue, queue.RELEASE)
                    raise
            else:
                await self._unknown_type(job_id, in_queue, record)
        except queue.Requeue as again:
            await self._leave(job_id, in_queue, queue.REQUEUE, due_ms=queue.due_in(again.defer))
        except REDIS_LOST as e:
            # losing Redis in our own bookkeeping around a job is not the job's failure: it goes
            # back to the queue (or, if Redis is still away, runs again when its lease lapses)
            log.warning("job %s: lost Redis around the job (%s); back to the queue", job_id, e)
            with contextlib.suppress(*REDIS_LOST):
                await self._leave(job_id, in_queue, queue.REQUEUE, due_ms=queue.due_in(1.0))
        except Exception:  # a bug of ours around the job (the job's own errors are its result)
            log.exception("job %s: the worker failed around the job; back to the queue", job_id)
            with contextlib.suppress(*REDIS_LOST):
                await self._leave(job_id, in_queue, queue.REQUEUE, due_ms=queue.due_in(UNKNOWN_TYPE_RETRY))

    async def _leave(self, job_id: str, in_queue: str, after: str, due_ms: int = 0) -> None:
        """What a claimed job leaves to its queue (key ``in_queue``) when no document write carried it."""
        keys, args = scripts.AFTER.fields(
            queue=in_queue, record=queue.record_key(job_id), lease=queue.lease_key(job_id), tries=queue.tries_key(job_id),
            after=after, job_id=job_id, due_ms=due_ms,
        )  # fmt: skip
        await asyncio.shield(self._after(keys=keys, args=args))

    async def _reject(self, job_id: str, in_queue: str, why: str) -> None:
        """A job that cannot run (its record expired or is unreadable): its document ends
        ``failed`` too, so no watcher waits forever and nothing in the record runs."""
        loaded = await self.store.load(job_id)
        if loaded is not None and loaded[0]["status"] not in contract.TERMINAL:
            log.warning("job %s: rejected before it ran: %s", job_id, why)
            failure = error("JobRejected", f"the worker could not run this job: {why}")
            with contextlib.suppress(WriteRefused):
                await self.store.write(*loaded, status=contract.FAILED, eta_s=None, message=None, error=failure, after=queue.FINISH)
                return
        await self._leave(job_id, in_queue, queue.FINISH)

    async def _deliver_webhook(self, delivery_id: str, in_queue: str, job_id: str, seq: int, attempt: int) -> None:
        try:
            async with asyncio.timeout(WEBHOOK_TIMEOUT):
                await webhooks.deliver(self.store, self.settings, job_id, seq, attempt)
        except queue.Requeue:
            WEBHOOK_ATTEMPTS.labels("retry").inc()
            raise
        except TimeoutError:
            log.warning("webhook %s: attempt %d took over %g s; retrying", delivery_id, attempt, WEBHOOK_TIMEOUT)
            WEBHOOK_ATTEMPTS.labels("retry").inc()
            raise queue.Requeue(webhooks.backoff(self.settings, attempt)) from None
        WEBHOOK_ATTEMPTS.labels("done").inc()
        await self._leave(delivery_id, in_queue, queue.FINISH)

    async def _unknown_type(self, job_id: str, in_queue: str, record: queue.Record) -> None:
        """A job whose type this worker does not run: back to the queue for another worker
        (its try given back, so it is not an attempt), or, after ``UNKNOWN_TYPE_GRACE``
        without a taker, ``failed``. The document says it waits."""
        await self.redis.decr(queue.tries_key(job_id))
        loaded = await self.store.load(job_id)
        if loaded is None or loaded[0]["status"] in contract.TERMINAL:
            return await self._leave(job_id, in_queue, queue.FINISH)
        doc, tenant = loaded
        waited = time.time() - record.enqueued_ms / 1000
        try:
            if waited > self.settings.unknown_type_grace:
                log.warning("job %s: no worker ran type %r within %g s; failed", job_id, doc["type"], waited)
                message = f"no worker that runs type {doc['type']!r} took this job within {self.settings.unknown_type_grace:g} s"
                failure = error("UnknownJobType", message)
                await self.store.write(doc, tenant, status=contract.FAILED, eta_s=None, error=failure, after=queue.FINISH)
                return
            log.info("job %s: type %r is not run here; back to the queue for another worker", job_id, doc["type"])
            if doc["message"] != workers.waiting_message(doc["type"]):
                await self.store.write(doc, tenant, message=workers.waiting_message(doc["type"]))
        except WriteRefused:  # cancelled meanwhile
            return await self._leave(job_id, in_queue, queue.FINISH)
        if any(doc["type"] in w["types"] for w in await workers.live(self.redis)):
            # a worker that runs it is up: due at once for it (woken now), skipped here for a while
            self.bounced[job_id] = time.monotonic() + UNKNOWN_TYPE_RETRY
            await self._leave(job_id, in_queue, queue.RELEASE)
            await self.redis.publish(contract.WAKE_CHANNEL, job_id)
            return
        # none is: look again later (jittered, so that no worker's polling phase wins every time)
        raise queue.Requeue(UNKNOWN_TYPE_RETRY * random.uniform(0.5, 1.5))

    # -- beside the loop ----------------------------------------------------------------------

    async def _announce(self) -> None:
        """The heartbeat that lists this worker, its job types and load (``GET /workers``)."""
        record = {
            "id": self.worker_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "types": sorted(name for name, t in self.registry.items() if t.queue in self.queues),  # what it takes
            "concurrency": self.concurrency,
            "started_at": self.started_at,
        }
        while True:
            serving = {name: {"limit": self.queues[name], "running": self.running_in[key]} for name, key, _ in self._claims}
            try:
                await workers.beat(self.redis, {**record, "running": len(self.attempts.running), "queues": serving})
            except Exception as e:  # Redis blip: the next beat tries again
                log.warning("worker heartbeat failed: %s", e)
            await asyncio.sleep(workers.BEAT)

    async def _beat(self) -> None:
        """Renew the lease of every job under way here (one ``scripts.RENEW`` call), cancel the
        ones nobody watches any more (``cancel_when_unwatched``: one more call, when such jobs run
        here), and mark the running ones without progress as stalled."""
        lease_ms = int(self.settings.lease * 1000)
        while True:
            await asyncio.sleep(self.settings.lease / 3)
            try:
                if self.tasks:
                    jobs = " ".join(f"{in_queue.decode()} {job_id}" for job_id, in_queue in self.queue_of.items())
                    keys, args = scripts.RENEW.fields(
                        now_ms=int(time.time() * 1000), lease_ms=lease_ms, owner=self.worker_id, lease_prefix=queue.LEASE_PREFIX, jobs=jobs,
                    )  # fmt: skip
                    await self._renew(keys=keys, args=args)
                for job_id in await self.attempts.abandoned():  # cancel_when_unwatched: nobody watched it
                    self._cancel(job_id)
                now = time.monotonic()
                for ctx in list(self.attempts.running.values()):
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
            pubsub = self.redis.pubsub()
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
        for job_id in list(self.attempts.running):
            if await self.redis.exists(contract.cancel_key(job_id)):
                self._cancel(job_id)

    def _cancel(self, job_id: str) -> None:
        ctx = self.attempts.running.get(job_id)
        if ctx is not None and not ctx.cancel_requested:
            ctx.log.info("job %s: cancel requested", job_id)
            ctx.cancel_requested = True
            if ctx.task is not None:
                ctx.task.cancel()
