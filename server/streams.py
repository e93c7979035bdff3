"""What the live transports share (``server.sse``: SSE per job and for many jobs, and the text
bar; ``server.ws``: one WebSocket for many jobs). Each transport is a thin adapter over the hub:
make a mailbox, watch (``with hub.watching(mailbox)``, subscription confirmed), read the snapshot
into the mailbox, then write whatever the mailbox yields, framed once per event (``server.wire``). Here: the slow-client
reaper, the per-caller stream count, and the plain-ASGI endpoint the SSE routes use.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from core.fastpath import direct
from server.auth import Caller
from server.events import Mailbox
from server.metrics import STATS
from server.problems import Problem

MAX_JOBS_PER_STREAM = 100

log = logging.getLogger("server.streams")
T = TypeVar("T")


class SlowClientReaper:
    """Drops clients that have not taken a write for ``timeout`` seconds.

    ``timed(scope, send)`` wraps a stream's send. With the fast path (``core.fastpath.direct``)
    a write records ``sending[abort] = loop.time()`` before and deletes it after, and once a
    second this task aborts the transports whose write is older than the timeout: two dict
    operations per write instead of a timer. The aborted connection's send returns (or raises
    a disconnect) and the stream ends as it ends when a client leaves. Without the fast path
    (no transport to abort) each write runs under ``asyncio.timeout`` and a stuck write raises
    ``TimeoutError``, which ends the stream.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.sending: dict[Callable[[], None], float] = {}

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, self.timeout / 2))
            now = loop.time()
            for abort, since in list(self.sending.items()):
                if now - since > self.timeout:
                    del self.sending[abort]
                    log.info("client too slow; dropped")
                    abort()

    def timed(self, scope: Scope, send: Callable[[T], Awaitable[None]]) -> Callable[[T], Awaitable[None]]:
        abort = direct.aborter(scope)
        if abort is None:
            timeout = self.timeout

            async def send_with_timer(message: T) -> None:
                async with asyncio.timeout(timeout):
                    await send(message)

            return send_with_timer
        return TimedSend(send, abort, self.sending, asyncio.get_running_loop().time)


class Heartbeat:
    """Every SSE stream's ``: ping``, from one task: each stream gets ``PING`` every ``every``
    seconds (``SSE_PING``), or sooner after it starts, so a proxy never sees it silent for longer.
    The streams are spread over ``SLOTS`` sets, one pinged per tick, so a process with many
    streams pings a few at a time. A timer per stream instead (``asyncio.timeout`` around each
    wait) cost an idle connection 0.6 KB and every event a timer set and cancelled."""

    SLOTS = 16

    def __init__(self, every: float) -> None:
        self.every = every
        self.slots: list[set[Mailbox]] = [set() for _ in range(self.SLOTS)]
        self.added = 0

    def add(self, mailbox: Mailbox) -> set[Mailbox]:
        """Ping ``mailbox`` from now on; returns the set to ``discard`` it from when it ends."""
        slot = self.slots[self.added % self.SLOTS]
        self.added += 1
        slot.add(mailbox)
        return slot

    async def run(self) -> None:
        if not self.every:
            return
        for tick in itertools.count():
            await asyncio.sleep(self.every / self.SLOTS)
            for mailbox in self.slots[tick % self.SLOTS]:
                mailbox.ping()


class TimedSend:
    """A send whose writes the reaper times (an object with slots: a closure would cost a
    connection about 250 bytes more)."""

    __slots__ = ("send", "abort", "sending", "now")

    def __init__(self, send: Callable[[T], Awaitable[None]], abort: Callable[[], None], sending: dict, now: Callable[[], float]) -> None:
        self.send, self.abort, self.sending, self.now = send, abort, sending, now

    async def __call__(self, message: T) -> None:
        self.sending[self.abort] = self.now()
        try:
            await self.send(message)
        finally:
            self.sending.pop(self.abort, None)


def admit(conn: HTTPConnection, caller: Caller, transport: str) -> Callable[[], None]:
    """Count one more open stream for the caller (429 above MAX_STREAMS_PER_CLIENT); returns
    the function that counts it out again."""
    counts = conn.app.state.open_streams
    if counts[caller.ident] >= conn.app.state.settings.max_streams_per_client:
        raise Problem(429, "Too many streams", "Close some streams first.", headers={"Retry-After": "5"})
    counts[caller.ident] += 1
    STATS.connections[transport] += 1

    def release() -> None:
        STATS.connections[transport] -= 1
        counts[caller.ident] -= 1
        if counts[caller.ident] <= 0:
            del counts[caller.ident]

    return release


class Endpoint:
    """A stream's endpoint as a plain ASGI app. ``App`` calls it straight for GET and HEAD, past
    Starlette's middleware and router (``App.stream_for``), so it turns the errors raised before
    the stream starts into problem+json itself, with the app's exception handlers; other methods
    reach it through Starlette's ``Route`` (which answers them 405)."""

    def __init__(self, handler: Callable[[Request], Awaitable[Response]], errors: dict[type, Callable]) -> None:
        self.handler = handler
        self.errors = errors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        try:
            response = await self.handler(request)
        except Exception as exc:
            handle = next((self.errors[c] for c in type(exc).__mro__ if c in self.errors), None)
            if handle is None:
                raise
            response = handle(request, exc)
        await response(scope, receive, send)
