"""In-process fan-out: one Redis pub/sub connection per server process, a mailbox per client.

Guarantees (SPEC "What nothing lost means"):

* ``Hub.watch`` returns only once Redis has confirmed the subscription, so a snapshot read
  after it cannot miss a change: any later change is published to a channel we hear.
* ``Mailbox`` keeps at most one pending event per job (the newest) and drops any event whose
  seq is not above what the client has already been given: seq never repeats or goes back,
  a slow client skips intermediate states (conflation), and memory stays bounded.
* ``Hub.dispatch`` is synchronous and never waits on a client.
* After a lost connection the hub reconnects, re-subscribes and re-reads the snapshot of
  every watched job (pub/sub is at-most-once; the stored document is the truth).

Per-job channels are subscribed on a process's first local watcher and dropped after its
last, so each process hears only the jobs its clients watch. Dashboards ("all jobs") use
one pattern subscription, held while at least one such watcher is connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import datetime
from collections.abc import Callable, Iterable

from redis.asyncio import Redis

from core import contract
from server import wire
from server.metrics import FANOUT_DELAY, STATS
from core.store import Store

log = logging.getLogger("server.hub")

HEARTBEAT = 1.0  # seconds between the hub's own pings through Redis pub/sub
HEARTBEAT_MISSES = 3  # silent pub/sub for this many heartbeats: the connection is dead (half-open)
RESYNC_DEADLINE = 10.0  # seconds for one snapshot resync before it is tried again
SNAPSHOT_ALL = 100  # a dashboard starts with this many of its tenant's newest jobs
SEEN_CAP = 10_000  # per mailbox: how many jobs' last seq it remembers (oldest forgotten first)
NOTICE_CAP = 16  # undelivered non-event messages (errors) per mailbox
HUB_CHANNEL = contract.PREFIX + "hub"  # always subscribed, so the connection is never idle-empty


class Event:
    """One change of one job, framed once per transport (``server.wire``) and shared by every client."""

    __slots__ = ("job_id", "seq", "name", "tenant", "doc", "_sse", "_ws", "_sse_chunk", "_ws_frame")

    def __init__(self, job_id: str, raw: bytes) -> None:
        self.job_id = job_id
        self.seq, self.name, self.tenant, self.doc = contract.unpack(raw)
        self._sse: bytes | None = None
        self._ws: str | None = None
        self._sse_chunk: bytes | None = None
        self._ws_frame: bytes | None = None

    @property
    def terminal(self) -> bool:
        return self.name in contract.TERMINAL

    @property
    def sse(self) -> bytes:
        if self._sse is None:
            self._sse = wire.sse_frame(b"%d" % self.seq, self.name, self.doc)
        return self._sse

    @property
    def ws(self) -> str:
        if self._ws is None:
            self._ws = wire.ws_message(self.name, self.doc)
        return self._ws

    @property
    def sse_chunk(self) -> bytes:
        """The SSE frame as one HTTP/1.1 chunk, for ``core.fastpath.direct``."""
        if self._sse_chunk is None:
            self._sse_chunk = wire.chunk(self.sse)
        return self._sse_chunk

    @property
    def ws_frame(self) -> bytes:
        """``ws`` as a whole WebSocket frame, for ``core.fastpath.direct``."""
        if self._ws_frame is None:
            self._ws_frame = wire.ws_frame(self.ws)
        return self._ws_frame


class Notice:
    """A message for one client that is not a job's event (a WebSocket error answer)."""

    __slots__ = ("ws", "job_id", "terminal")

    def __init__(self, text: str) -> None:
        self.ws, self.job_id, self.terminal = text, None, False


class MailboxClosed(Exception):
    """The server is draining: the connection should end and the client reconnect elsewhere."""


class Mailbox:
    """The newest undelivered event per job, for one client connection."""

    __slots__ = ("_pending", "_seen", "_waiter", "conflated", "closed", "direct")

    def __init__(self) -> None:
        self._pending: dict[str, Event] = {}
        self._seen: dict[str, int] = {}
        self._waiter: asyncio.Future | None = None
        self.conflated = 0
        self.closed = False
        # set by the stream once its client is connected: writes an event at once if it can
        # (``core.fastpath.direct``); used only while the consumer waits with nothing queued
        self.direct: Callable[[Event], bool] | None = None

    def close(self) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def expect(self, job_id: str, since: int) -> None:
        """The client already has ``job_id`` up to seq ``since``: deliver only newer events."""
        if since > self._seen.get(job_id, 0):
            self._remember(job_id, since)

    def put(self, event: Event) -> None:
        if event.seq <= self._seen.get(event.job_id, 0):
            return
        self._remember(event.job_id, event.seq)
        waiter = self._waiter
        if (
            waiter is not None
            and not waiter.done()
            and not self._pending
            and self.direct is not None
            and not event.terminal  # the consumer ends or unwatches on it: give it the usual way
            and self.direct(event)
        ):
            return
        if event.job_id in self._pending:
            self.conflated += 1
            STATS.conflated += 1
        self._pending[event.job_id] = event
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _remember(self, job_id: str, seq: int) -> None:
        self._seen.pop(job_id, None)
        self._seen[job_id] = seq
        if len(self._seen) > SEEN_CAP:
            del self._seen[next(iter(self._seen))]

    def notify(self, notice: Notice) -> None:
        """Queue a non-event message; never conflated, but at most ``NOTICE_CAP`` wait at once
        (a client flooding bad frames while not reading gets no more answers, not more memory)."""
        if sum(1 for key in self._pending if not isinstance(key, str)) >= NOTICE_CAP:
            return
        self._pending[object()] = notice
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def forget(self, job_id: str) -> None:
        self._pending.pop(job_id, None)
        self._seen.pop(job_id, None)

    async def get(self) -> Event | Notice:
        """The next event; raises ``MailboxClosed`` once closed and empty."""
        while not self._pending:
            if self.closed:
                raise MailboxClosed()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        job_id = next(iter(self._pending))
        return self._pending.pop(job_id)


class SubscribeTimeout(Exception):
    """Redis did not confirm a subscription in time (it is down or unreachable)."""


class Hub:
    def __init__(self, redis: Redis, store: Store, confirm_timeout: float = 5.0) -> None:
        """``redis`` must not retry on its own: a silent reconnect would skip the resync."""
        self.redis = redis
        self.store = store
        self.confirm_timeout = confirm_timeout
        self._watchers: dict[str, set[Mailbox]] = {}
        self._all: dict[Mailbox, str] = {}  # dashboards: mailbox -> the tenant it may see
        self._ready: dict[str, asyncio.Future] = {}  # channel or pattern -> confirmed
        self._pubsub = None
        self.reconnects = 0
        self.draining = False

    # -- what the endpoints call ------------------------------------------------------

    async def watch(self, mailbox: Mailbox, job_ids: Iterable[str]) -> None:
        """Route ``job_ids``' events to ``mailbox``; returns once Redis confirmed them."""
        if self.draining:
            mailbox.close()
        waits = []
        for job_id in job_ids:
            watchers = self._watchers.setdefault(job_id, set())
            watchers.add(mailbox)
            waits.append(self._want(contract.channel(job_id), pattern=False))
        await self._confirmed(waits)

    def unwatch(self, mailbox: Mailbox, job_ids: Iterable[str]) -> None:
        for job_id in job_ids:
            watchers = self._watchers.get(job_id)
            if watchers is None:
                continue
            watchers.discard(mailbox)
            mailbox.forget(job_id)
            if not watchers:
                del self._watchers[job_id]
                self._drop(contract.channel(job_id), pattern=False)

    async def watch_all(self, mailbox: Mailbox, tenant: str) -> None:
        """Route every job of ``tenant`` to ``mailbox`` (and no other tenant's)."""
        if self.draining:
            mailbox.close()
        self._all[mailbox] = tenant
        await self._confirmed([self._want(contract.EVENTS_PATTERN, pattern=True)])

    def unwatch_all(self, mailbox: Mailbox) -> None:
        self._all.pop(mailbox, None)
        if not self._all:
            self._drop(contract.EVENTS_PATTERN, pattern=True)

    def drain(self) -> None:
        """Close every mailbox: streams end (SSE) or close with 1012 (WebSocket) so that clients
        reconnect to another replica and resume by seq."""
        self.draining = True
        for mailbox in {mb for watchers in self._watchers.values() for mb in watchers} | set(self._all):
            mailbox.close()

    def watched(self, mailbox: Mailbox) -> list[str]:
        return [job_id for job_id, watchers in self._watchers.items() if mailbox in watchers]

    @property
    def connections(self) -> int:
        return len({mb for watchers in self._watchers.values() for mb in watchers} | set(self._all))

    # -- subscription bookkeeping -----------------------------------------------------

    def _want(self, name: str, pattern: bool) -> asyncio.Future:
        fut = self._ready.get(name)
        if fut is None:
            fut = self._ready[name] = asyncio.get_running_loop().create_future()
            self._send(pattern, True, name)
        return fut

    def _drop(self, name: str, pattern: bool) -> None:
        fut = self._ready.pop(name, None)
        if fut is not None and not fut.done():
            fut.cancel()
        self._send(pattern, False, name)

    def _send(self, pattern: bool, subscribe: bool, name: str) -> None:
        pubsub = self._pubsub
        if pubsub is None:
            return  # not connected: the reconnect subscribes everything in self._ready
        if pattern:
            call = pubsub.psubscribe if subscribe else pubsub.punsubscribe
        else:
            call = pubsub.subscribe if subscribe else pubsub.unsubscribe
        task = asyncio.ensure_future(call(name))
        task.add_done_callback(_ignore_errors)

    async def _confirmed(self, waits: list[asyncio.Future]) -> None:
        pending = [fut for fut in waits if not fut.done()]
        if not pending:
            return
        done, not_done = await asyncio.wait([asyncio.shield(f) for f in pending], timeout=self.confirm_timeout)
        if not_done:
            raise SubscribeTimeout("Redis did not confirm the subscription")

    # -- the reader ----------------------------------------------------------------------

    async def run(self) -> None:
        """Read the pub/sub connection forever, reconnecting with back-off.

        A heartbeat is published to ``HUB_CHANNEL`` every ``HEARTBEAT`` seconds; if the
        subscription hears nothing at all for ``HEARTBEAT_MISSES`` of them, the connection is
        taken as dead and rebuilt (redis-py's own health check cannot see a half-open socket).
        """
        beat = asyncio.create_task(self._heartbeat())
        try:
            await self._run()
        finally:
            beat.cancel()

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(HEARTBEAT):
                    await self.redis.publish(HUB_CHANNEL, b"")

    async def _run(self) -> None:
        delay = 0.2
        while True:
            pubsub = self.redis.pubsub()
            resync = None
            try:
                channels = {HUB_CHANNEL} | {n for n in self._ready if n != contract.EVENTS_PATTERN}
                await pubsub.subscribe(*channels)
                pattern = contract.EVENTS_PATTERN in self._ready
                if pattern:
                    await pubsub.psubscribe(contract.EVENTS_PATTERN)
                self._pubsub = pubsub
                # wanted while we were connecting (``_send`` had no connection to use): ask now
                missed = [n for n in self._ready if n not in channels and n != contract.EVENTS_PATTERN]
                if missed:
                    await pubsub.subscribe(*missed)
                if not pattern and contract.EVENTS_PATTERN in self._ready:
                    await pubsub.psubscribe(contract.EVENTS_PATTERN)
                resync = asyncio.create_task(self._resync()) if self.reconnects else None
                delay = 0.2
                await self._read(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.reconnects += 1
                STATS.reconnects = self.reconnects
                log.warning("pub/sub connection lost (%s); reconnecting in %.1f s", e, delay)
            finally:
                self._pubsub = None
                for name, fut in list(self._ready.items()):
                    if fut.done():  # must be confirmed again on the next connection
                        self._ready[name] = asyncio.get_running_loop().create_future()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            if resync is not None:
                resync.cancel()

    async def _read(self, pubsub) -> None:
        prefix = contract.CHANNEL_PREFIX_LEN
        watchers, all_ = self._watchers, self._all
        loop = asyncio.get_running_loop()
        heard = loop.time()
        while True:
            msg = await pubsub.get_message(timeout=HEARTBEAT)
            if msg is None:
                if loop.time() - heard > HEARTBEAT * HEARTBEAT_MISSES:
                    raise ConnectionError("no heartbeat on the pub/sub connection")
                continue
            heard = loop.time()
            kind = msg["type"]
            if kind == "message" or kind == "pmessage":
                STATS.received += 1
                observe_delay(msg["data"])
            if kind == "message":
                job_id = msg["channel"][prefix:].decode()
                targets = watchers.get(job_id)
                if targets:
                    event = Event(job_id, msg["data"])
                    for mailbox in targets:
                        mailbox.put(event)
            elif kind == "pmessage":
                if all_:
                    event = Event(msg["channel"][prefix:].decode(), msg["data"])
                    for mailbox, tenant in all_.items():
                        if tenant == event.tenant:
                            mailbox.put(event)
            elif kind == "subscribe" or kind == "psubscribe":
                name = msg["channel"].decode()
                fut = self._ready.get(name)
                if fut is not None and not fut.done():
                    fut.set_result(None)

    async def _resync(self) -> None:
        """After a reconnect: wait for the subscriptions, then re-send every watched snapshot.
        Retried until it succeeds (Redis may still be coming back); a newer reconnect cancels it."""
        delay = 0.2
        while True:
            try:
                async with asyncio.timeout(RESYNC_DEADLINE):
                    await self._resync_once()
                log.info("pub/sub re-established; snapshots re-sent")
                return
            except Exception as e:
                log.warning("snapshot resync failed (%r); retrying in %.1f s", e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _resync_once(self) -> None:
        await self._confirmed(list(self._ready.values()))  # a timeout makes _resync try again
        for job_id in list(self._watchers):
            raw = await self.store.read(job_id)
            if raw is not None:
                event = Event(job_id, raw)
                for mailbox in list(self._watchers.get(job_id, ())):
                    mailbox.put(event)
        for tenant in set(self._all.values()):
            for event in await self.snapshot_all(tenant):
                for mailbox, mailbox_tenant in list(self._all.items()):
                    if mailbox_tenant == tenant:
                        mailbox.put(event)

    async def snapshot_all(self, tenant: str) -> list[Event]:
        """The ``SNAPSHOT_ALL`` newest jobs of ``tenant``: what a dashboard starts (or resyncs) from."""
        job_ids = [j.decode() for j in await self.store.redis.zrevrange(contract.jobs_index(tenant), 0, SNAPSHOT_ALL - 1)]
        raws = await self.store.read_many(job_ids)
        return [Event(job_id, raw) for job_id, raw in zip(job_ids, raws) if raw is not None]


UPDATED_AT = b'"updated_at":"'


def observe_delay(raw: bytes) -> None:
    """Record how long the event took from the worker's write to this process (clocks permitting)."""
    start = raw.find(UPDATED_AT)
    if start < 0:
        return
    start += len(UPDATED_AT)
    with contextlib.suppress(ValueError):
        stamp = datetime.fromisoformat(raw[start : start + 24].decode().replace("Z", "+00:00"))
        FANOUT_DELAY.observe(max(0.0, time.time() - stamp.timestamp()))


def _ignore_errors(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()  # the reader notices a dead connection and reconnects
