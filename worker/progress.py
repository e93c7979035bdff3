"""What a running job sees: ``ctx.progress(...)``, ``ctx.log``, ``ctx.cancelled``, its id and attempt.

``progress()`` is throttled per job to one publish per ``PROGRESS_INTERVAL``; the first
update, every stage change and the final state always go out, and an update held back by the
throttle is published when the interval ends, so the last word before a pause is never lost.
Each publish is one ``Store.write``: document stored and event published atomically.

``ctx.log`` (``JobLog``) is a logger whose records at INFO and above also become lines of the
job's own log. Lines wait in the context (the newest ``JOB_LOG_LINES``) and go out with the
next document write, or on their own (``Store.append_log``) once per loop turn. One lock keeps
it to one batch at a time (a document write with lines counts as one), so their seqs follow the
order they were logged in, and a pipeline sent again never writes a batch twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import traceback
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core import contract, tracing
from core.store import Family, LogBatch, Store, WriteRefused
from worker.registry import REGISTRY, ChildFailed

ETA_SMOOTHING = 0.3  # weight of the newest rate sample in the moving average
log = logging.getLogger("worker")
REDIS_OUTAGE = 60.0  # seconds a progress or final write waits for Redis to come back
CHILD_POLL = 0.1  # seconds between reads of a job's children's roll-up (PROGRESS_INTERVAL if longer)


class RedisAway:
    """Waits out Redis being away for a write: 0.1 s, doubling up to 2 s, until ``REDIS_OUTAGE``
    seconds have passed, when ``wait()`` answers False and the caller gives up (re-raises)."""

    __slots__ = ("delay", "waited")

    def __init__(self) -> None:
        self.delay, self.waited = 0.1, 0.0

    async def wait(self) -> bool:
        if self.waited >= REDIS_OUTAGE:
            return False
        await asyncio.sleep(self.delay)
        self.waited += self.delay
        self.delay = min(self.delay * 2, 2.0)
        return True


class JobEnded(Exception):
    """The stored job is already terminal (cancelled while queued): stop, write nothing. With
    ``superseded``, a later attempt runs elsewhere (this worker's lease lapsed): leave it be."""

    def __init__(self, why: str, superseded: bool = False) -> None:
        super().__init__(why)
        self.superseded = superseded


class JobLog(logging.LoggerAdapter):
    """``ctx.log``: the worker's logger with the job's id, attempt and request id on each record,
    whose records at INFO and above are also lines of the job's log (message, level, time and the
    record's ``extra``; an exception's traceback with ``exc_info``), from the event loop or from a
    sync job's thread. ``worker_log``: the same without the job's log."""

    def __init__(self, logger: logging.Logger, extra: dict[str, Any], ctx: JobContext, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(logger, extra)
        self.ctx, self.loop = ctx, loop
        self.worker_log = logging.LoggerAdapter(logger, extra)
        self.own_prefix = f"job {ctx.id}: "

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level >= logging.INFO:
            try:
                text = str(msg) % args if args else str(msg)
            except (TypeError, ValueError):
                text = f"{msg} {args}"
            if kwargs.get("exc_info"):
                text += "\n" + traceback.format_exc().rstrip()
            text = text.removeprefix(self.own_prefix)  # the worker's "job <id>: ..." lines, in the job's own log
            line = contract.log_line(logging.getLevelName(level), text, kwargs.get("extra"))
            try:
                here = asyncio.get_running_loop() is self.loop
            except RuntimeError:  # a sync job's thread
                here = False
            if here:
                self.ctx.add_log_line(line)
            else:
                self.loop.call_soon_threadsafe(self.ctx.add_log_line, line)
        super().log(level, msg, *args, **kwargs)


class JobContext:
    def __init__(self, store: Store, doc: dict[str, Any], interval: float, tenant: str = "", log_seq: int = -1) -> None:
        self.store = store
        self.doc = doc
        self.tenant = tenant
        self.interval = interval
        self.cancel_requested = False
        self.cancel_error: dict[str, Any] | None = None  # why, when the worker cancels it (nobody watched it)
        self.task: asyncio.Task | None = None  # the job code, cancelled on request
        self._pending: dict[str, Any] = {}
        self._last_publish = 0.0
        self._published = False
        self._timer: asyncio.TimerHandle | None = None
        self._lock = asyncio.Lock()
        self._rate: float | None = None  # EWMA of progress points per second
        self._sample: tuple[float, float] | None = None  # (time, progress) of the last report
        self.last_report = time.monotonic()  # for the stall check
        self.log: logging.Logger | logging.LoggerAdapter = log
        self._log_lines: list[bytes] = []  # not yet written
        self._log_dropped = 0  # lines dropped unwritten (more than JOB_LOG_LINES waiting)
        self._log_base = log_seq  # the last seq stored, as far as we know (-1: not known)
        self._log_writing: asyncio.Task | None = None
        self._log_lock: asyncio.Lock | None = None  # once the job has a line: one batch at a time
        self.span = None  # the attempt's span (``core.tracing``) when tracing is on
        self._log_start: tuple[int, float] | None = None  # (attempt, time): "attempt N started", with the first line
        self._logged_any = False
        # children (``spawn``): the job's own progress counts ``weight`` against theirs
        self.weight = 1.0
        self.request_id, self.traceparent = "", ""  # the submit's, which its children carry
        self._own = 0.0  # the job's own progress
        self._shown = 0.0  # the highest progress shown once it has children (never lower)
        self._kids: list[str] = []  # the children this attempt spawned, in order
        self._waited: set[str] = set()  # those ``wait`` has answered for
        self._family: Family | None = None  # their roll-up as last read
        self._statuses: dict[str, str] = {}  # each child's status, as last read
        self._following: asyncio.Future | None = None  # reads the roll-up while children run
        self._broken: BaseException | None = None  # why it stopped, if it failed
        self._changed = asyncio.Event()  # set (and replaced) when the roll-up read changes
        self._closed = False

    @property
    def id(self) -> str:
        return self.doc["id"]

    @property
    def attempt(self) -> int:
        return self.doc["attempt"]

    @property
    def cancelled(self) -> bool:
        return self.cancel_requested

    async def progress(self, pct: float | None = None, message: str | None = None, stage: str | None = None) -> None:
        """Report progress (0-100, or None if unknown), a message and/or a stage name."""
        if self.cancel_requested:
            raise asyncio.CancelledError()
        now = time.monotonic()
        if pct is not None:
            self._own = min(100.0, max(0.0, float(pct)))
            pct = self._combined()
            self._pending["progress"] = pct
            self._pending["eta_s"] = self._estimate(pct, now)
        if message is not None:
            self._pending["message"] = str(message)
        stage_changed = stage is not None and stage != self._pending.get("stage", self.doc["stage"])
        if stage is not None:
            self._pending["stage"] = str(stage)
        self.last_report = now
        if self.doc["stalled"]:
            self._pending["stalled"] = False
        await self._publish(force=not self._published or stage_changed)

    def _combined(self) -> float:
        """The progress to show: the job's own; once it has children, its own and theirs by weight,
        never lower than shown before (a child spawned later adds to what is left to do)."""
        if self._family is None:
            return round(self._own, 2)
        total = self.weight + self._family.weight
        pct = (self.weight * self._own + self._family.done) / total if total > 0 else 0.0
        self._shown = max(self._shown, round(pct, 2))
        return self._shown

    async def spawn(self, job_type: str, params: dict[str, Any] | BaseModel | None = None, *, weight: float = 1.0) -> str:
        """Queue a child job of ``job_type`` (a type this worker knows) with ``params``, and return
        its id. This job's document lists it in ``children``, and its progress is this job's own
        and its children's, each by weight (its own: ``ctx.weight``, 1 unless set). The n-th spawn of
        every attempt is the same child: one that an earlier attempt spawned is not queued again
        (it is run again if it failed or was cancelled). ``wait`` gives its result; a job that
        returns first waits for the children it has not waited for; one that fails for good or is
        cancelled cancels those that have not ended. Children take this job's priority if higher
        than their type's, and its submit's request id and trace."""
        if self._closed or self.cancel_requested:  # (a sync job's thread, after its attempt ended)
            raise asyncio.CancelledError()
        if len(self._kids) >= contract.MAX_GROUP:
            raise ValueError(f"spawn: at most {contract.MAX_GROUP} children per attempt (a child may spawn its own)")
        kind = REGISTRY.get(job_type)
        if kind is None:
            raise ValueError(f"spawn: job type {job_type!r} is not registered in this worker")
        if not contract.is_weight(weight):
            raise ValueError(f"spawn: weight must be a number above 0 and at most {contract.MAX_WEIGHT}")
        if isinstance(params, BaseModel):
            params = params.model_dump(mode="json")
        params = {} if params is None else params
        try:
            kind.params.model_validate(params)
        except ValidationError as e:
            raise ValueError(f"spawn {job_type!r}: {e}") from None
        priority = max(kind.priority, self.doc.get("priority", 0))
        trace = tracing.traceparent(self.span) if self.span is not None else self.traceparent
        away = RedisAway()
        while True:
            try:
                child_id, was, family = await self.store.spawn(
                    self.doc, self.tenant, len(self._kids) + 1, job_type, params, weight, kind.queue, priority, self.request_id, trace
                )
                break
            except (RedisConnectionError, RedisTimeoutError, OSError):
                if not await away.wait():
                    raise
        if was == "stopped":  # this attempt has ended meanwhile
            raise asyncio.CancelledError()
        if was in (contract.FAILED, contract.CANCELLED):
            await self._run_again(child_id)
            family = await self.store.family(self.id) or family
        self._kids.append(child_id)
        if self._take(family) is not None:  # (shown with this job's next write, throttled as progress is)
            await self._publish()
        self._follow_children()
        return child_id

    async def _run_again(self, child_id: str) -> None:
        """A child an earlier attempt spawned, which failed or was cancelled: queue it again."""
        for _ in range(150):  # (a lease's time, and more)
            loaded = await self.store.load(child_id)
            if loaded is None or loaded[0]["status"] not in (contract.FAILED, contract.CANCELLED):
                return
            try:
                await self.store.reopen(*loaded)
                return
            except WriteRefused:
                await asyncio.sleep(0.2)  # its last attempt is still being closed, or it just changed
        raise RuntimeError(f"spawn: child {child_id} could not be queued again")

    def _follow_children(self) -> None:
        """Start ``_follow``, unless it runs."""
        if self._following is None:
            self._following = asyncio.ensure_future(self._follow())
            self._following.add_done_callback(_log_failure)

    async def _follow(self) -> None:
        """Read the children's roll-up every ``CHILD_POLL`` s (``PROGRESS_INTERVAL`` if longer) and
        show it, until all that this attempt spawned have ended (the next spawn starts it again)."""
        every = max(self.interval, CHILD_POLL)
        try:
            while not self._closed:
                try:
                    family = await self.store.family(self.id)
                except (RedisConnectionError, RedisTimeoutError, OSError):
                    family = None  # (read again next time)
                if family is not None and (status_changed := self._take(family)) is not None:
                    await self._publish(force=status_changed)  # (a child's status: at once)
                if family is not None and all(self._statuses.get(k) in contract.TERMINAL for k in self._kids):
                    return
                await asyncio.sleep(every)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # (this job's own write failed: a ``wait`` raises it)
            self._broken = e
            raise
        finally:
            if self._following is asyncio.current_task():
                self._following = None
            self._changed.set()

    def _take(self, family: Family) -> bool | None:
        """A roll-up read: if it is newer, this job's progress, and its ``children`` if a status
        changed, go to its next write. Answers whether a status changed (None: nothing did)."""
        if self._family is not None and family.version <= self._family.version:
            return None
        changed = self._family is None or family.members != self._family.members
        self._family = family
        self.last_report = time.monotonic()  # (its children move: it is not stalled)
        if changed:
            children = json.loads(family.members)
            self._statuses = {child["id"]: child["status"] for child in children}
            self._pending["children"] = children
        self._pending["progress"] = pct = self._combined()
        self._pending["eta_s"] = self._estimate(pct, time.monotonic())
        if self.doc["stalled"]:
            self._pending["stalled"] = False
        self._changed.set()
        self._changed = asyncio.Event()
        return changed

    async def wait(self, children: str | Iterable[str] | None = None) -> list[Any]:
        """Wait for children (ids from ``spawn``; all this attempt spawned if None) to succeed, and
        return their results in that order. Raises ``ChildFailed`` as soon as one has failed or was
        cancelled (the others go on: a job that catches it and returns still waits for them; one
        that fails for good cancels them)."""
        ids = list(self._kids) if children is None else [children] if isinstance(children, str) else list(children)
        unknown = [child for child in ids if child not in self._kids]
        if unknown:
            raise ValueError(f"wait: {', '.join(unknown)} not spawned by this attempt")
        while True:
            changed = self._changed
            if self._broken is not None:
                raise RuntimeError(f"wait: this job's children can no longer be followed: {self._broken!r}")
            if self._closed or self.cancel_requested:
                raise asyncio.CancelledError()
            self._follow_children()  # (again, if it ended with this attempt's children: a wait for one run again)
            states = [self._statuses.get(child) for child in ids]
            for child, state in zip(ids, states):
                if state in (contract.FAILED, contract.CANCELLED):
                    self._waited.add(child)
                    raise ChildFailed(await self.store.document(child) or {"id": child, "type": "?", "status": state})
            if all(state == contract.SUCCEEDED for state in states):
                break
            await changed.wait()
        self._waited.update(ids)
        return [None if raw is None else json.loads(raw) for raw in await self.store.results(ids)]

    async def wait_rest(self) -> None:
        """``wait`` for the children not waited for yet (a job that returns)."""
        rest = [child for child in self._kids if child not in self._waited]
        if rest:
            await self.wait(rest)

    def close(self) -> None:
        """The attempt has ended: stop following children; a ``wait`` under way (a sync job's
        thread) raises ``CancelledError``."""
        self._closed = True
        if self._following is not None:
            self._following.cancel()
            self._following = None
        self._changed.set()

    def _estimate(self, pct: float, now: float) -> float | None:
        if self._sample is not None:
            t0, p0 = self._sample
            if now > t0 and pct >= p0:
                rate = (pct - p0) / (now - t0)
                self._rate = rate if self._rate is None else ETA_SMOOTHING * rate + (1 - ETA_SMOOTHING) * self._rate
        self._sample = (now, pct)
        if not self._rate:
            return None
        return round((100.0 - pct) / self._rate, 1)

    def _flush_later(self) -> None:
        self._timer = None
        self._flushing = asyncio.ensure_future(self._publish())
        self._flushing.add_done_callback(_log_failure)

    async def _publish(self, force: bool = False) -> None:
        """Publish what is pending if the interval has passed (or ``force``); else set a timer."""
        async with self._lock:
            wait = self.interval - (time.monotonic() - self._last_publish)
            if not force and wait > 0:
                if self._timer is None and self._pending:
                    self._timer = asyncio.get_running_loop().call_later(wait, self._flush_later)
                return
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._pending and self.doc["status"] == contract.RUNNING:
                changes, self._pending = self._pending, {}
                self._last_publish, self._published = time.monotonic(), True
                await self.write(**changes)
                if self.span is not None:  # a progress publish is an event of the attempt's span
                    self.span.add_event("progress", {k: v for k, v in changes.items() if v is not None and k != "eta_s"})

    def note(self, level: str, message: str) -> None:
        """A line for the job's log only (the worker's own word on the attempt)."""
        self.add_log_line(contract.log_line(level, message))

    def note_start(self, attempt: int) -> None:
        """"attempt N started", with this time, but written only once the job has a line of its
        own: a job that logs nothing costs its log nothing (no list, no write per job)."""
        self._log_start = (attempt, time.time())

    @property
    def has_log(self) -> bool:
        return self._logged_any

    def add_log_line(self, line: bytes) -> None:
        if self._log_start is not None:
            attempt, at = self._log_start
            self._log_start = None
            self._log_lines.append(contract.log_line("INFO", f"attempt {attempt} started", ts=contract.iso(at)))
        self._logged_any = True
        self._log_lines.append(line)
        keep = self.store.settings.job_log_lines
        if len(self._log_lines) > keep:  # Redis is slower than this job's logging: keep the newest
            self._log_dropped += len(self._log_lines) - keep + 1
            del self._log_lines[: len(self._log_lines) - keep + 1]
        if self._log_lock is None:
            self._log_lock = asyncio.Lock()
        if self._log_writing is None:
            self._log_writing = asyncio.ensure_future(self._write_log())
            self._log_writing.add_done_callback(_log_failure)

    def _take_log(self) -> LogBatch | None:
        """The lines waiting (after a line saying how many were dropped, if any), or None."""
        if not self._log_lines:
            return None
        lines, self._log_lines = self._log_lines, []
        if self._log_dropped:
            lines.insert(0, contract.log_line("WARNING", f"{self._log_dropped} log lines dropped: written faster than Redis took them"))
            self._log_dropped = 0
        return LogBatch(lines, self._log_base)

    def _logged(self, batch: LogBatch | None) -> None:
        if batch is not None:
            self._log_base = batch.last if batch.last >= 0 else -1

    async def _write_log(self) -> None:
        """Write the waiting lines (and those logged meanwhile) on their own, one batch at a time;
        Redis being away is waited out as for a document write."""
        try:
            await asyncio.sleep(0)  # the rest of this loop turn's lines, or a document write that takes them
            async with self._log_lock:
                away = RedisAway()
                while (batch := self._take_log()) is not None:
                    while True:
                        try:
                            await self.store.append_log(self.id, batch)
                            break
                        except (RedisConnectionError, RedisTimeoutError, OSError):
                            if not await away.wait():
                                raise
                    self._logged(batch)
        finally:
            self._log_writing = None

    async def mark_stalled(self) -> None:
        async with self._lock:
            if self.doc["status"] == contract.RUNNING and not self.doc["stalled"]:
                await self.write(stalled=True)

    async def finish(
        self, status: str, result: Any = None, result_ttl: int | None = None, after: str = "", due_ms: int = 0, **changes: Any
    ) -> None:
        """Write the final (or re-queued) state, with anything the throttle held back; ``after``:
        what the attempt leaves to the queue, in the same step (``Store.write``)."""
        if status in (contract.FAILED, contract.CANCELLED) and (self._kids or "children" in self.doc):
            try:  # (its children that have not ended are cancelled)
                await self.store.stop_children(self.id)
            except (RedisConnectionError, RedisTimeoutError, OSError) as e:
                self.log.warning("job %s: its children could not be told to stop: %r", self.id, e)
        async with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            changes = {**self._pending, **changes, "status": status}
            self._pending = {}
            if status != contract.RUNNING:
                changes.update(eta_s=None, stalled=False)
            if self.doc["status"] == contract.RUNNING:  # this attempt ends: one entry in ``attempts``
                outcome = status if status in contract.TERMINAL else "retrying" if changes.get("error") else "requeued"
                ended = {**self.doc, "error": changes.get("error")}
                changes["attempts"] = contract.attempts_after(ended, outcome, contract.now_iso())
            await self.write(result=result, result_ttl=result_ttl, after=after, due_ms=due_ms, **changes)

    async def write(self, result: Any = None, result_ttl: int | None = None, after: str = "", due_ms: int = 0, **changes: Any) -> None:
        """One atomic store + publish; re-based on the stored seq if another writer moved it.

        Redis being away is not the job's fault: the write is retried until Redis answers again
        (up to ``REDIS_OUTAGE`` seconds). If a later attempt of this job has started elsewhere
        (our lease lapsed meanwhile), this copy stops with ``JobEnded`` instead of writing over it.
        """
        if self._log_lock is None:  # a job without a log line (most writes)
            return await self._write(None, result, result_ttl, after, due_ms, changes)
        async with self._log_lock:  # after a batch under way; the lines logged so far go with this write
            return await self._write(self._take_log(), result, result_ttl, after, due_ms, changes)

    async def _write(
        self, lines: LogBatch | None, result: Any, result_ttl: int | None, after: str, due_ms: int, changes: dict[str, Any]
    ) -> None:
        attempt = changes.get("attempt", self.doc["attempt"])
        away = RedisAway()
        conflicts = 0
        while True:
            try:
                self.doc = await self.store.write(
                    self.doc, self.tenant, result=result, result_ttl=result_ttl, after=after, due_ms=due_ms, log=lines, **changes
                )
                self._logged(lines)
                return
            except WriteRefused as refused:
                if refused.state in contract.TERMINAL or not refused.state:
                    raise JobEnded(refused.state) from None
                stored = await self.store.document(self.id)
                if stored is None:
                    raise JobEnded("missing") from None
                if stored["attempt"] > attempt:
                    raise JobEnded(f"superseded by attempt {stored['attempt']}", superseded=True) from None
                self.doc = stored
                conflicts += 1
                if conflicts >= 3:
                    raise RuntimeError(f"job {self.id}: document keeps changing under this worker") from None
            except (RedisConnectionError, RedisTimeoutError, OSError):
                if not await away.wait():
                    raise


def _log_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None and not isinstance(task.exception(), JobEnded):
        log.warning("held-back progress or log lines not written: %r", task.exception())


class ThreadJobContext:
    """The context handed to a plain (sync) job function, which runs in a thread."""

    def __init__(self, ctx: JobContext, loop: asyncio.AbstractEventLoop) -> None:
        self._ctx = ctx
        self._loop = loop
        self.id, self.attempt = ctx.id, ctx.attempt
        self.log = ctx.log  # thread-safe: a line logged here is handed to the loop

    @property
    def cancelled(self) -> bool:
        return self._ctx.cancel_requested

    def progress(self, pct: float | None = None, message: str | None = None, stage: str | None = None) -> None:
        """Like ``JobContext.progress``; raises ``CancelledError`` in the thread once cancelled."""
        asyncio.run_coroutine_threadsafe(self._ctx.progress(pct, message, stage), self._loop).result()

    @property
    def weight(self) -> float:
        return self._ctx.weight

    @weight.setter
    def weight(self, value: float) -> None:
        self._ctx.weight = value

    def spawn(self, job_type: str, params: dict[str, Any] | BaseModel | None = None, *, weight: float = 1.0) -> str:
        """Like ``JobContext.spawn``."""
        return asyncio.run_coroutine_threadsafe(self._ctx.spawn(job_type, params, weight=weight), self._loop).result()

    def wait(self, children: str | Iterable[str] | None = None) -> list[Any]:
        """Like ``JobContext.wait``; raises ``CancelledError`` in the thread once cancelled."""
        return asyncio.run_coroutine_threadsafe(self._ctx.wait(children), self._loop).result()
