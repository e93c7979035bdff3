"""What a client is given: a job's change (``Event``, framed once per transport and shared by
every client), a message for one client (``Notice``), lines of a job's log (``LogEntry``), and
each connection's ``Mailbox``.

The mailbox keeps at most one pending event per job (the newest) and drops any event whose seq
is not above what the client has already been given: seq never repeats or goes back, a slow
client skips intermediate states (conflation), and memory stays bounded. Log lines are not
state, so they are not conflated: a mailbox that watches logs keeps them in order (``LogQueue``),
up to a bound past which the oldest become a gap the client can page in. ``server.hub`` fills
mailboxes from Redis pub/sub; the transports (``server.sse``, ``server.ws``) and the long poll
(``server.jobs``) empty them.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
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


class LogEntry:
    """Lines ``first``..``last`` of one job's log, ``data`` in their wire form (``contract``:
    ``{"job", "first", "last", "lines"}``); with ``gap``, lines a slow reader skipped
    (``{"job", "first", "last"}``: page them in with ``GET /jobs/{id}/logs?after=first-1``)."""

    __slots__ = ("job_id", "first", "last", "data", "gap")
    terminal = False  # (a writer ends or unwatches on a terminal event; never on log lines)

    def __init__(self, job_id: str, first: int, last: int, data: bytes = b"", gap: bool = False) -> None:
        self.job_id, self.first, self.last, self.data, self.gap = job_id, first, last, data, gap

    @property
    def name(self) -> str:
        return "log-gap" if self.gap else "log"

    @property
    def body(self) -> bytes:
        if self.gap:
            return b'{"job":"%s","first":%d,"last":%d}' % (self.job_id.encode(), self.first, self.last)
        return self.data

    @property
    def ws(self) -> str:
        """The WebSocket message: ``{"event": "log" or "log-gap", "log": body}``."""
        return '{"event":"%s","log":%s}' % (self.name, self.body.decode())


class LogQueue:
    """One connection's undelivered log lines, oldest first, for the jobs whose logs it watches.
    Lines at or below what the client has (``expect``, or already queued) are dropped, so a line
    never repeats. While a job's stored lines are being read (``start_snapshot``, until
    ``put_snapshot``), its live batches are held back, so they go out after the stored ones. Past
    ``limit`` lines waiting, the oldest become one gap per job (the client can page them in)."""

    def __init__(self, limit: int) -> None:
        self.entries: deque[LogEntry] = deque()
        self.seen: dict[str, int] = {}
        self.lines = 0
        self.limit = limit
        self.gaps: dict[str, LogEntry] = {}  # each job's gap entry still queued
        self.holding: dict[str, tuple[int, list[LogEntry]]] = {}  # job -> (after, live batches held)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def expect(self, job_id: str, after: int) -> None:
        self.seen[job_id] = max(after, self.seen.get(job_id, 0))

    def start_snapshot(self, job_id: str) -> None:
        """The stored lines after what the client has will be read: hold live batches till then."""
        self.holding[job_id] = (self.seen.get(job_id, 0), [])

    def snapshot_after(self, job_id: str) -> int:
        return self.holding[job_id][0] if job_id in self.holding else self.seen.get(job_id, 0)

    def put(self, job_id: str, data: bytes) -> bool:
        """A batch as published; False if it held nothing new to send now."""
        first, last = contract.log_range(data)
        seen = self.seen.get(job_id, 0)
        if last <= seen:
            return False
        if first <= seen:  # overlaps what the client has (a snapshot raced it): keep the rest
            lines = [json.dumps(line, separators=(",", ":"), ensure_ascii=False).encode() for line in json.loads(data)["lines"]]
            data = contract.log_batch(job_id, [line for line in lines if contract.log_seq(line) > seen])
            first = seen + 1
        self.seen[job_id] = last
        entry = LogEntry(job_id, first, last, data)
        if job_id in self.holding:
            self.holding[job_id][1].append(entry)
            return False
        self._append(entry)
        return True

    def put_snapshot(self, job_id: str, stored: list[bytes], first_kept: int) -> None:
        """The stored lines after ``snapshot_after`` (``Store.read_log``: ``first_kept`` is the
        oldest line still kept), then the live batches held meanwhile; lines no longer kept
        become a gap."""
        after, held = self.holding.pop(job_id, (self.seen.get(job_id, 0), []))
        until = held[0].first if held else None
        lines = [line for line in stored if after < contract.log_seq(line) and (until is None or contract.log_seq(line) < until)]
        if first_kept > after + 1 and (until is None or until > after + 1):
            self._append(LogEntry(job_id, after + 1, min(first_kept, until or first_kept) - 1, gap=True))
        if lines:
            self._append(LogEntry(job_id, contract.log_seq(lines[0]), contract.log_seq(lines[-1]), contract.log_batch(job_id, lines)))
        for entry in held:
            self._append(entry)
        if lines:
            self.seen[job_id] = max(self.seen.get(job_id, 0), contract.log_seq(lines[-1]))

    def _append(self, entry: LogEntry) -> None:
        if entry.gap:
            self.gaps.setdefault(entry.job_id, entry)
        else:
            self.lines += entry.last - entry.first + 1
        self.entries.append(entry)
        self._bound()

    def _bound(self) -> None:
        """Past ``limit`` lines, the oldest batches (the newest always stays) become gaps: one per
        job, which grows, since all of a job's older lines are in it by then."""
        i = 0
        while self.lines > self.limit and i < len(self.entries) - 1:
            entry = self.entries[i]
            if entry.gap:
                i += 1
                continue
            self.lines -= entry.last - entry.first + 1
            gap = self.gaps.get(entry.job_id)
            if gap is not None:
                gap.last = entry.last
                del self.entries[i]
            else:
                self.entries[i] = self.gaps[entry.job_id] = LogEntry(entry.job_id, entry.first, entry.last, gap=True)
                i += 1

    def pop(self) -> LogEntry:
        entry = self.entries.popleft()
        if entry.gap:
            if self.gaps.get(entry.job_id) is entry:
                del self.gaps[entry.job_id]
        else:
            self.lines -= entry.last - entry.first + 1
        return entry

    def forget(self, job_id: str) -> None:
        self.seen.pop(job_id, None)
        self.gaps.pop(job_id, None)
        self.holding.pop(job_id, None)
        self.entries = deque(e for e in self.entries if e.job_id != job_id)
        self.lines = sum(e.last - e.first + 1 for e in self.entries if not e.gap)


class MailboxClosed(Exception):
    """The mailbox was closed and is empty: the server is draining (the connection should end and
    the client reconnect elsewhere) or the client has gone (``Mailbox.gone``)."""


class Mailbox:
    """The newest undelivered event per job, for one client connection."""

    __slots__ = ("_pending", "_seen", "_waiter", "conflated", "closed", "gone", "direct", "logs")

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
        self.logs: LogQueue | None = None  # once a job's log is watched (``watch_logs``)

    def watch_logs(self, limit: int) -> LogQueue:
        if self.logs is None:
            self.logs = LogQueue(limit)
        return self.logs

    def put_log(self, job_id: str, batch: bytes) -> None:
        """A batch of a job's log lines as published (``server.hub``); given before events."""
        if self.logs is not None and not self.gone and self.logs.put(job_id, batch):
            self._wake()

    def log_snapshot(self, job_id: str, stored: list[bytes], first_kept: int) -> None:
        """The stored lines of a job (``LogQueue.put_snapshot``); nothing once the client has gone."""
        if self.logs is None:
            return
        self.logs.put_snapshot(job_id, stored, first_kept)
        if self.logs:
            self._wake()

    def put_final(self, event: Event) -> None:
        """A job's final event that the client has already: a stream that must end on it (a job's
        stream sending only log lines the client missed) gets it again."""
        self._pending[event.job_id] = event
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def close(self, gone: bool = False) -> None:
        """End the consumer's ``get`` loop once the mailbox is empty (at once if ``gone``)."""
        self.closed = True
        if gone:
            self.gone = True
            self._pending.clear()
            self.logs = None
        self._wake()

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
            and not self.logs  # (an event never overtakes log lines written before it)
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
        if self.logs is not None:
            self.logs.forget(job_id)

    async def get(self) -> Event | Notice | LogEntry:
        """The next log lines if any, else the next event: lines written before an event go out
        before it (a line logged after a pending event may too); raises ``MailboxClosed`` once
        closed and empty."""
        while not self._pending:
            if self.logs:
                return self.logs.pop()
            if self.closed:
                raise MailboxClosed()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self.logs:
            return self.logs.pop()
        job_id = next(iter(self._pending))
        return self._pending.pop(job_id)
