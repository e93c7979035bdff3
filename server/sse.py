"""Server-Sent Events: ``GET /jobs/{id}/events`` (one job, ends after its final event, also as a
text bar or htmx fragments) and ``GET /events`` (many jobs, or every job, with a resume cursor).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from operator import attrgetter

from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from core import contract
from core.fastpath import direct
from core.fastpath.sse import drop_send_lock
from server import wire
from server.events import PING, Event, LogEntry, Mailbox, MailboxClosed
from server.hub import Watch
from server.requests import choice_param, deadline, int_param, load, reader
from server.metrics import STATS
from server.problems import Problem, invalid
from server.streams import MAX_JOBS_PER_STREAM, SlowClientReaper, admit

log = logging.getLogger("server.streams")

delivered = STATS.delivered


class Stream(EventSourceResponse):
    """An SSE response that ends its watch (unwatch, count the stream out) however it ends.

    sse-starlette's response gives the headers and the answer to HEAD. Its ``__call__`` runs an
    anyio task group of four tasks per stream (body, ping, shutdown signal, disconnect), which
    held about half of an idle SSE connection's memory. Here the request's own task writes the
    body, and one small task waits for the client to go away and then closes the mailbox, which
    ends the body. Pings come from the body (``sse_frames``), a server drain from the hub (the
    mailbox closed), a slow client's end from the ``SlowClientReaper``.
    """

    def __init__(self, request: Request, watch: Watch, frames: AsyncIterator[bytes]) -> None:
        super().__init__(frames, ping=0, sep="\n")
        drop_send_lock(self)
        self.watch = watch
        self.reaper: SlowClientReaper = request.app.state.reaper

    async def __call__(self, scope, receive, send) -> None:
        with self.watch:
            if scope["method"] == "HEAD":  # headers only; sse-starlette answers it without a stream
                return await super().__call__(scope, receive, send)
            mailbox = self.watch.mailbox

            async def until_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                mailbox.close(gone=True)

            listener = asyncio.create_task(until_disconnect())
            send = self.reaper.timed(scope, send)
            try:
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                self.raw_headers = []  # sent: an open stream keeps no copy (0.5 KB)
                async for chunk in self.body_iterator:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    del chunk  # an idle stream holds no frame
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except TimeoutError:  # a write waited SEND_TIMEOUT (without the fast path's reaper)
                log.info("SSE client too slow; dropped")
            finally:
                listener.cancel()
                with contextlib.suppress(Exception):
                    await self.body_iterator.aclose()  # ended early: run the body's clean-up


SEQ = re.compile(r"([0-9]{1,18})(?::([0-9]{1,18}))?")  # a per-job stream's Last-Event-ID: seq, or seq:log seq
CURSOR = re.compile(r"[A-Za-z0-9_-]{0,8192}")  # a multi-job stream's cursor: base64url, no padding


def since_param(request: Request) -> tuple[int, int]:
    """Where a per-job stream resumes, ``(seq, log seq)``: ``Last-Event-ID`` (a browser's
    reconnect: ``7``, or ``7:120`` on a stream with the job's log), else ``?since=`` and
    ``?log_after=``. All are checked when sent together."""
    since, log_after = int_param(request, "since", 0), int_param(request, "log_after", 0)
    last_event_id = request.headers.get("last-event-id")
    if last_event_id is not None:
        found = SEQ.fullmatch(last_event_id)
        if found is None:
            raise Problem(400, "Bad Last-Event-ID", "Last-Event-ID must be a seq, or seq:log seq (integers >= 0).")
        return int(found[1]), int(found[2] or 0)
    return since, log_after


def logs_param(request: Request) -> bool:
    return choice_param(request, "logs", ("0", "1")) == "1"


class WithLogs:
    """The frames of a job's stream that carries its log too (``?logs=1``): every ``id:`` is
    ``<seq>:<log seq>``, the newest of each sent, so ``Last-Event-ID`` resumes both."""

    __slots__ = ("seq", "log_seq")

    def __init__(self, seq: int, log_seq: int) -> None:
        self.seq, self.log_seq = seq, log_seq

    def __call__(self, item: Event | LogEntry) -> bytes:
        if isinstance(item, LogEntry):
            self.log_seq = max(self.log_seq, item.last)
            return wire.sse_frame(b"%d:%d" % (self.seq, self.log_seq), item.name, item.body)
        self.seq = item.seq
        return wire.sse_frame(b"%d:%d" % (self.seq, self.log_seq), item.name, item.doc)


def cursor_param(request: Request) -> dict[str, int]:
    """Where a multi-job stream resumes: ``Last-Event-ID`` (a browser's reconnect), else
    ``?cursor=``, both checked. A well-formed cursor that does not decode to one this server gives
    (another version's, or made up) is not refused: the stream starts from the snapshots, as
    without one. A 400 would make EventSource give up for good."""
    cursor = request.query_params.get("cursor")
    if cursor is not None and not CURSOR.fullmatch(cursor):
        raise invalid("cursor", "must be a cursor from this stream's ids (base64url, at most 8192 characters)")
    last_event_id = request.headers.get("last-event-id")
    if last_event_id is not None and not CURSOR.fullmatch(last_event_id):
        raise Problem(400, "Bad Last-Event-ID", "Last-Event-ID must be a cursor from this stream's ids.")
    cursor = last_event_id or cursor
    try:
        seen = contract.decode_cursor(cursor) if cursor else {}
    except ValueError:
        return {}
    return seen if len(seen) <= MAX_JOBS_PER_STREAM else {}


@deadline
async def job_events(request: Request) -> Response:
    """``GET /jobs/{id}/events``: the current document if newer than the client's, then changes
    (and with ``?logs=1`` the job's log lines after the client's, stored then live)."""
    job_id = request.path_params["job_id"]
    since, log_after = since_param(request)
    html = choice_param(request, "format", ("html",)) is not None
    logs = logs_param(request) and not html and not wants_text(request)
    caller = await reader(request)
    mailbox = Mailbox()
    mailbox.expect(job_id, since)
    with request.app.state.hub.watching(mailbox) as watch:
        await watch.add([job_id])
        snapshot = await load(request, job_id, caller)
        if logs:
            await watch.add_logs([job_id], {job_id: log_after})
        if snapshot.terminal and snapshot.seq <= since:
            if not mailbox.logs:
                return Response(status_code=204)  # the client has the end already: EventSource stops
            mailbox.put_final(snapshot)  # only log lines it missed: they, then the end again
        watch.on_exit = admit(request, caller, "text" if wants_text(request) else "sse")
        mailbox.put(snapshot)
        watch = watch.hand_over()  # the response ends it
    if wants_text(request):
        return TextStream(watch)
    if html:
        return Stream(request, watch, sse_frames(request, mailbox, wire.html_frame, until_terminal=True))
    if logs:
        return Stream(request, watch, sse_frames(request, mailbox, WithLogs(since, log_after), until_terminal=True))
    mailbox.direct = direct.sse_writer(request.scope)
    return Stream(request, watch, sse_frames(request, mailbox, attrgetter("sse"), until_terminal=True))


async def sse_frames(
    request: Request, mailbox: Mailbox, frame: Callable[[Event], bytes], until_terminal: bool
) -> AsyncIterator[bytes]:
    """The body of an SSE stream: ``retry:``, then ``frame(event)`` for each event, until the
    final event (per-job streams) or a drain, which ends it with a short ``retry:`` hint.
    A ``: ping`` comment every ``SSE_PING`` seconds (``streams.Heartbeat``) keeps proxies from
    closing an idle stream."""
    yield wire.retry_frame(request.app.state.settings.sse_retry_ms)
    beats = request.app.state.heartbeat.add(mailbox)
    try:
        while True:
            try:
                event = await mailbox.get()
            except MailboxClosed:
                if not mailbox.gone:
                    yield wire.DRAIN_FRAME
                return
            if event is PING:
                yield wire.PING_FRAME
                continue
            delivered["sse"] += 1
            yield frame(event)
            if until_terminal and event.terminal:
                return
            del event  # an idle stream holds no event
    finally:
        beats.discard(mailbox)


def wants_text(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "text/plain" in accept and "json" not in accept and "event-stream" not in accept


class TextStream(StreamingResponse):
    """``curl -N -H 'Accept: text/plain' .../events``: one bar redrawn in place until the end."""

    def __init__(self, watch: Watch) -> None:
        mailbox = watch.mailbox

        async def lines() -> AsyncIterator[bytes]:
            width = 0
            while True:
                try:
                    event = await mailbox.get()
                except MailboxClosed:
                    return
                delivered["text"] += 1
                line = wire.text_bar(json.loads(event.doc))
                yield ("\r" + line.ljust(width) + ("\n" if event.terminal else "")).encode()
                width = len(line)
                if event.terminal:
                    return

        super().__init__(lines(), media_type="text/plain; charset=utf-8", headers={"X-Accel-Buffering": "no"})
        self.watch = watch

    async def __call__(self, scope, receive, send) -> None:
        with self.watch:
            if scope["method"] == "HEAD":  # headers only (StreamingResponse would stream the bar)
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                self.raw_headers = []  # sent: an open stream keeps no copy (0.5 KB)
                return await send({"type": "http.response.body", "body": b""})
            await super().__call__(scope, receive, send)


@deadline
async def events(request: Request) -> Response:
    """``GET /events?job=A&job=B`` (or no ``job``: every job) with a resume cursor as ``id:``."""
    job_ids = request.query_params.getlist("job")
    if len(job_ids) > MAX_JOBS_PER_STREAM:
        raise invalid("job", f"at most {MAX_JOBS_PER_STREAM} jobs per stream")
    job_ids = list(dict.fromkeys(job_ids))
    seen = cursor_param(request)
    caller = await reader(request)
    hub, store = request.app.state.hub, request.app.state.store
    for job_id in job_ids:
        await load(request, job_id, caller)  # 404/410 before the stream starts
    if not job_ids and not (caller.by_key or caller.all_jobs):
        raise Problem(403, "Forbidden", "Watching every job needs an API key or a ticket for the whole feed.")
    mailbox = Mailbox()
    for job_id, seq in seen.items():
        mailbox.expect(job_id, seq)
    with hub.watching(mailbox) as watch:
        watch.on_exit = admit(request, caller, "sse")
        if job_ids:
            await watch.add(job_ids)
            for job_id, raw in zip(job_ids, await store.read_many(job_ids)):
                if raw is not None:
                    mailbox.put(Event(job_id, raw))
        else:
            await watch.add_all(caller.tenant)
            for event in await hub.snapshot_all(caller.tenant):
                mailbox.put(event)
        watch = watch.hand_over()  # the response ends it

    def frame(event: Event) -> bytes:
        """The frame's id is the resume cursor: the last seq of each job, newest last."""
        seen.pop(event.job_id, None)
        seen[event.job_id] = event.seq
        if len(seen) > MAX_JOBS_PER_STREAM:
            del seen[next(iter(seen))]
        return wire.sse_frame(contract.encode_cursor(seen).encode(), event.name, event.doc)

    return Stream(request, watch, sse_frames(request, mailbox, frame, until_terminal=False))
