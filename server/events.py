"""What a client is given: a job's change (``Event``, framed once per transport and shared by
every client), a message for one client (``Notice``), and each connection's ``Mailbox``.

The mailbox keeps at most one pending event per job (the newest) and drops any event whose seq
is not above what the client has already been given: seq never repeats or goes back, a slow
client skips intermediate states (conflation), and memory stays bounded. ``server.hub`` fills
mailboxes from Redis pub/sub; the transports (``server.sse``, ``server.ws``) and the long poll
(``server.jobs``) empty them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from core import contract
from server import wire
from server.metrics import STATS

SEEN_CAP = 10_000  # per mailbox: how many jobs' last seq it remembers (oldest forgotten first)
NOTICE_CAP = 16  # undelivered non-event messages (errors) per mailbox


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


PING = Notice("")  # an SSE stream's heartbeat (``server.streams.Heartbeat``): written as ``: ping``


class MailboxClosed(Exception):
    """The mailbox was closed and is empty: the server is draining (the connection should end and
    the client reconnect elsewhere) or the client has gone (``Mailbox.gone``)."""


class Mailbox:
    """The newest undelivered event per job, for one client connection."""

    __slots__ = ("_pending", "_seen", "_waiter", "conflated", "closed", "gone", "direct")

    def __init__(self) -> None:
        self._pending: dict[str, Event] = {}
        self._seen: dict[str, int] = {}
        self._waiter: asyncio.Future | None = None
        self.conflated = 0
        self.closed = False
        self.gone = False  # closed because the client left: nothing more is written
        # set by the stream once its client is connected: writes an event at once if it can
        # (``core.fastpath.direct``); used only while the consumer waits with nothing queued
        self.direct: Callable[[Event], bool] | None = None

    def close(self, gone: bool = False) -> None:
        """End the consumer's ``get`` loop once the mailbox is empty (at once if ``gone``)."""
        self.closed = True
        if gone:
            self.gone = True
            self._pending.clear()
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

    def ping(self) -> None:
        """Wake a waiting consumer with ``PING``; nothing if something is pending (it will wake)."""
        if not self._pending and not self.closed:
            self.notify(PING)

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
