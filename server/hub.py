"""In-process fan-out: one Redis pub/sub connection per server process, routing each job's
events to the mailboxes (``server.events``) of the clients that watch it. It knows no transport.

Guarantees (SPEC "What nothing lost means"):

* ``Watch.add`` returns only once Redis has confirmed the subscription, so a snapshot read
  after it cannot miss a change: any later change is published to a channel we hear.
* A ``Watch`` is a context manager: whatever ends a stream (its end, the client leaving, an
  error, a timeout), leaving the ``with`` unwatches everything the stream watched.
* Routing (``Hub._read``) is synchronous and never waits on a client.
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
from core.store import Store
from server.events import Event, Mailbox
from server.metrics import FANOUT_DELAY, STATS

log = logging.getLogger("server.hub")

HEARTBEAT = 1.0  # seconds between the hub's own pings through Redis pub/sub
HEARTBEAT_MISSES = 3  # silent pub/sub for this many heartbeats: the connection is dead (half-open)
RESYNC_DEADLINE = 10.0  # seconds for one snapshot resync before it is tried again
SNAPSHOT_ALL = 100  # a dashboard starts with this many of its tenant's newest jobs
HUB_CHANNEL = contract.PREFIX + "hub"  # always subscribed, so the connection is never idle-empty


class SubscribeTimeout(Exception):
    """Redis did not confirm a subscription in time (it is down or unreachable)."""


class Watch:
    """What one mailbox watches: some jobs, or every job of a tenant, for as long as the ``with``
    lasts. ``add`` may be called again (a WebSocket subscribes to more jobs over time), and
    ``remove`` drops jobs early; leaving the block unwatches the rest and calls ``on_exit`` (a
    stream's count, ``server.streams.admit``). A stream whose response outlives its handler (SSE)
    takes the watch with ``hand_over``, which leaves the ``with`` nothing to end."""

    __slots__ = ("hub", "mailbox", "jobs", "all", "on_exit", "logs")

    def __init__(self, hub: Hub, mailbox: Mailbox) -> None:
        self.hub, self.mailbox = hub, mailbox
        self.jobs: set[str] = set()
        self.all = False
        self.on_exit: Callable[[], None] | None = None
        self.logs: set[str] | None = None  # jobs whose log lines are routed here too

    def hand_over(self) -> Watch:
        """A watch with this one's jobs and ``on_exit``, ended by whoever holds it (``with``)."""
        other = Watch(self.hub, self.mailbox)
        other.jobs, other.all, other.on_exit, other.logs = self.jobs, self.all, self.on_exit, self.logs
        self.jobs, self.all, self.on_exit, self.logs = set(), False, None, None
        return other

    async def add(self, job_ids: Iterable[str]) -> None:
        """Route ``job_ids``' events to the mailbox; returns once Redis confirmed them. If Redis
        does not, the jobs are not watched (a WebSocket goes on with the others)."""
        new = [j for j in job_ids if j not in self.jobs]
        self.jobs.update(new)
        try:
            await self.hub._watch(self.mailbox, new)
        except BaseException:
            self.remove(new)
            raise

    async def add_all(self, tenant: str) -> None:
        """Route every job of ``tenant`` to the mailbox (and no other tenant's)."""
        self.all = True
        await self.hub._watch_all(self.mailbox, tenant)

    async def add_logs(self, job_ids: Iterable[str], after: dict[str, int]) -> None:
        """Route the log lines of ``job_ids`` to the mailbox too, from the line after ``after[job]``
        (0: every line kept): the stored ones first, then live ones. Where the mailbox is read
        meanwhile (a WebSocket), call it before ``add``: a job's event then never reaches the
        client ahead of the lines written before it (its last attempt's, say, before its end)."""
        new = [j for j in job_ids if self.logs is None or j not in self.logs]
        if self.logs is None:
            self.logs = set()
        self.logs.update(new)
        queue = self.mailbox.watch_logs(self.hub.store.settings.job_log_lines)
        for job_id in new:
            queue.expect(job_id, after.get(job_id, 0))
            queue.start_snapshot(job_id)  # live lines wait for the stored ones
        try:
            await self.hub._watch_logs(self.mailbox, new)
        except BaseException:
            self.logs.difference_update(new)
            self.hub._unwatch_logs(self.mailbox, new)
            raise
        await self.hub.send_stored_logs(self.mailbox, new)

    def remove(self, job_ids: Iterable[str]) -> None:
        job_ids = list(job_ids)
        gone = [j for j in job_ids if j in self.jobs]
        self.jobs.difference_update(gone)
        if self.logs:
            logs = [j for j in job_ids if j in self.logs]
            self.logs.difference_update(logs)
            self.hub._unwatch_logs(self.mailbox, logs)
        self.hub._unwatch(self.mailbox, gone)

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove(self.jobs | (self.logs or set()))
        if self.all:
            self.all = False
            self.hub._unwatch_all(self.mailbox)
        if self.on_exit is not None:
            on_exit, self.on_exit = self.on_exit, None
            on_exit()


class Hub:
    def __init__(self, redis: Redis, store: Store, confirm_timeout: float = 5.0) -> None:
        """``redis`` must not retry on its own: a silent reconnect would skip the resync."""
        self.redis = redis
        self.store = store
        self.confirm_timeout = confirm_timeout
        self._watchers: dict[str, set[Mailbox]] = {}
        self._log_watchers: dict[str, set[Mailbox]] = {}  # job -> mailboxes given its log lines
        self._all: dict[Mailbox, str] = {}  # dashboards: mailbox -> the tenant it may see
        self._ready: dict[str, asyncio.Future] = {}  # channel or pattern -> confirmed
        self._pubsub = None
        self.reconnects = 0
        self.draining = False
        self._unheard = 0  # heartbeats sent since the subscription last heard anything

    # -- what the endpoints call ------------------------------------------------------

    def watching(self, mailbox: Mailbox) -> Watch:
        """``with hub.watching(mailbox) as watch: await watch.add(job_ids) ...``"""
        return Watch(self, mailbox)

    def watched(self) -> Iterable[str]:
        """The jobs some client of this process watches by id (not the dashboards' every-job feed):
        ``server.watched`` marks them for ``cancel_when_unwatched``."""
        return self._watchers.keys()

    async def _watch(self, mailbox: Mailbox, job_ids: Iterable[str]) -> None:
        if self.draining:
            mailbox.close()
        await self._route(self._watchers, contract.channel, mailbox, job_ids)

    async def _watch_logs(self, mailbox: Mailbox, job_ids: Iterable[str]) -> None:
        await self._route(self._log_watchers, contract.log_channel, mailbox, job_ids)

    def _unwatch_logs(self, mailbox: Mailbox, job_ids: Iterable[str]) -> None:
        for job_id in job_ids:
            self._unroute(self._log_watchers, contract.log_channel, mailbox, job_id)

    async def _route(self, routes: dict[str, set[Mailbox]], channel: Callable[[str], str], mailbox: Mailbox, job_ids: Iterable[str]) -> None:
        """``job_ids``' messages on ``channel(job)`` to ``mailbox`` too; returns once Redis confirmed
        the subscriptions (the first watcher of a job in this process subscribes)."""
        waits = []
        for job_id in job_ids:
            routes.setdefault(job_id, set()).add(mailbox)
            waits.append(self._want(channel(job_id), pattern=False))
        await self._confirmed(waits)

    def _unroute(self, routes: dict[str, set[Mailbox]], channel: Callable[[str], str], mailbox: Mailbox, job_id: str) -> None:
        """No more of ``job_id``'s messages to ``mailbox``; its channel dropped after its last watcher."""
        watchers = routes.get(job_id)
        if watchers is None:
            return
        watchers.discard(mailbox)
        if not watchers:
            del routes[job_id]
            self._drop(channel(job_id), pattern=False)

    async def send_stored_logs(self, mailbox: Mailbox, job_ids: Iterable[str]) -> None:
        """The stored lines of each job after what the mailbox has of it (a new watcher, or a
        resync after the pub/sub connection was lost)."""
        for job_id in job_ids:
            if mailbox.logs is None:  # (closed meanwhile: the client has gone)
                return
            after = mailbox.logs.snapshot_after(job_id)
            last, first, lines = await self.store.read_log(job_id, after, self.store.settings.job_log_lines)
            mailbox.log_snapshot(job_id, lines, first)

    def _unwatch(self, mailbox: Mailbox, job_ids: Iterable[str]) -> None:
        for job_id in job_ids:
            self._unroute(self._watchers, contract.channel, mailbox, job_id)
            mailbox.forget(job_id)

    async def _watch_all(self, mailbox: Mailbox, tenant: str) -> None:
        if self.draining:
            mailbox.close()
        self._all[mailbox] = tenant
        await self._confirmed([self._want(contract.EVENTS_PATTERN, pattern=True)])

    def _unwatch_all(self, mailbox: Mailbox) -> None:
        self._all.pop(mailbox, None)
        if not self._all:
            self._drop(contract.EVENTS_PATTERN, pattern=True)

    def drain(self) -> None:
        """Close every mailbox: streams end (SSE) or close with 1012 (WebSocket) so that clients
        reconnect to another replica and resume by seq."""
        self.draining = True
        for mailbox in {mb for watchers in self._watchers.values() for mb in watchers} | set(self._all):
            mailbox.close()

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
        Counting beats, not seconds, keeps a process whose loop stalls (a burst of thousands of
        new connections) from taking its own slowness for a dead connection: a stalled loop
        counts no beats.
        """
        beat = asyncio.create_task(self._heartbeat())
        try:
            await self._run()
        finally:
            beat.cancel()

    async def _heartbeat(self) -> None:
        """Every ``HEARTBEAT`` seconds of a running loop: count one more beat the subscription
        should hear, and publish it (not waited for: a frozen Redis must not slow the count)."""
        sending: set[asyncio.Task] = set()
        while True:
            await asyncio.sleep(HEARTBEAT)
            self._unheard += 1
            task = asyncio.create_task(self._beat())
            sending.add(task)
            task.add_done_callback(sending.discard)

    async def _beat(self) -> None:
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
                for job_id, mailboxes in self._log_watchers.items():  # lines missed while away: read them
                    for mailbox in mailboxes:  # again on resync, and hold the live ones till then
                        if mailbox.logs is not None:
                            mailbox.logs.start_snapshot(job_id)
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
        watchers, all_, log_watchers = self._watchers, self._all, self._log_watchers
        log_prefix = contract.LOG_CHANNEL_PREFIX
        self._unheard = 0
        while True:
            msg = await pubsub.get_message(timeout=HEARTBEAT)
            if msg is None:
                if self._unheard >= HEARTBEAT_MISSES:
                    raise ConnectionError("no heartbeat on the pub/sub connection")
                continue
            self._unheard = 0
            kind = msg["type"]
            if kind == "message" and msg["channel"].startswith(log_prefix):  # (also after its last watcher left)
                job_id = msg["channel"][prefix:].decode()
                for mailbox in log_watchers.get(job_id, ()):
                    mailbox.put_log(job_id, msg["data"])
                continue
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
        for job_id, mailboxes in list(self._log_watchers.items()):
            for mailbox in list(mailboxes):
                await self.send_stored_logs(mailbox, [job_id])
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
