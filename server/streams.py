"""Live transports: SSE per job, SSE for many jobs, and one WebSocket for many jobs.

Each is a thin adapter over the hub: make a mailbox, ``watch`` (subscription confirmed),
read the snapshot into the mailbox, then write whatever the mailbox yields. The bytes
written are the ones the worker published, framed once per event (``hub.Event``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from operator import attrgetter

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sse_starlette import EventSourceResponse
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from core import contract
from server import wire
from core.fastpath import direct, sse
from server.hub import Event, Mailbox, MailboxClosed, Notice, SubscribeTimeout
from server.auth import Caller
from server.jobs import deadline, int_param, load, reader, redis_deadline
from server.metrics import STATS
from server.problems import Problem, invalid, unavailable

log = logging.getLogger("server.streams")

delivered = STATS.delivered
MAX_JOBS_PER_STREAM = 100


class Stream(EventSourceResponse):
    """An SSE response that always runs ``on_close`` (unwatching its mailbox), however it ends.

    sse-starlette's response gives the headers and the answer to HEAD. Its ``__call__`` runs an
    anyio task group of four tasks per stream (body, ping, shutdown signal, disconnect), which
    held about half of an idle SSE connection's memory. Here the request's own task writes the
    body, and one small task waits for the client to go away and then cancels it. Pings come
    from the body (``sse_frames``), a server drain from the hub (``MailboxClosed``).

    Writes are timed by the process's ``SlowClientReaper`` (two dict operations per write, no
    timer): a client that does not take a write for ``SEND_TIMEOUT`` seconds is dropped.
    """

    def __init__(self, request: Request, frames: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(frames, ping=0, sep="\n")
        sse.drop_send_lock(self)
        self.on_close = on_close
        self.reaper: SlowClientReaper = request.app.state.reaper
        self.gone = False  # the client disconnected

    async def __call__(self, scope, receive, send) -> None:
        if scope["method"] == "HEAD":  # headers only; sse-starlette answers it without a stream
            try:
                return await super().__call__(scope, receive, send)
            finally:
                self.on_close()
        task = asyncio.current_task()

        async def until_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.gone = True
            task.cancel()

        listener = asyncio.create_task(until_disconnect())
        sending, now = self.reaper.sending, asyncio.get_running_loop().time
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                sending[task] = now()
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                del sending[task], chunk  # an idle stream holds no frame
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not (self.gone or self.reaper.reaped(task)):
                raise
            task.uncancel()
            if not self.gone:
                log.info("SSE client too slow; dropped")
        finally:
            listener.cancel()
            self.reaper.forget(task)
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()  # cancelled in a send: run the body's clean-up
            self.on_close()


class SlowClientReaper:
    """Cancels writes that have waited on a client longer than ``timeout``.

    A writer records ``sending[task] = loop.time()`` before a write and deletes it after; once a
    second this task cancels the writers whose write is older than the timeout. That costs two
    dict operations per write instead of a timer per write.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.sending: dict[asyncio.Task, float] = {}
        self._reaped: set[asyncio.Task] = set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, self.timeout / 2))
            now = loop.time()
            for task, since in list(self.sending.items()):
                if now - since > self.timeout:
                    del self.sending[task]
                    self._reaped.add(task)
                    task.cancel()

    def reaped(self, task: asyncio.Task) -> bool:
        return task in self._reaped

    def forget(self, task: asyncio.Task) -> None:
        self.sending.pop(task, None)
        self._reaped.discard(task)


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
    """A stream's endpoint as a plain ASGI app, which Starlette's ``Route`` calls as it is. A
    function endpoint gets two more layers (Starlette's request/response adapter and its
    exception wrapper) whose frames an open stream keeps. An error raised before the stream
    starts still becomes problem+json: the ``ExceptionMiddleware`` around the router has the
    same handlers."""

    def __init__(self, handler: Callable[[Request], Awaitable[Response]]) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.handler(Request(scope, receive, send))
        await response(scope, receive, send)


def since_param(request: Request) -> int:
    last_event_id = request.headers.get("last-event-id")
    if last_event_id is not None:
        try:
            return max(0, int(last_event_id))
        except ValueError:
            raise Problem(400, "Bad Last-Event-ID", "Last-Event-ID must be a seq (an integer).") from None
    return int_param(request, "since", 0)


@deadline
async def job_events(request: Request) -> Response:
    """``GET /jobs/{id}/events``: the current document if newer than the client's, then changes."""
    job_id = request.path_params["job_id"]
    since = since_param(request)
    caller = await reader(request)
    hub = request.app.state.hub
    mailbox = Mailbox()
    mailbox.expect(job_id, since)
    try:
        await hub.watch(mailbox, [job_id])
        snapshot = await load(request, job_id, caller)
        if snapshot.terminal and snapshot.seq <= since:
            hub.unwatch(mailbox, [job_id])
            return Response(status_code=204)  # the client has the end already: EventSource stops
        release = admit(request, caller, "text" if wants_text(request) else "sse")
    except BaseException:
        hub.unwatch(mailbox, [job_id])
        raise
    mailbox.put(snapshot)

    def close() -> None:
        hub.unwatch(mailbox, [job_id])
        release()

    if wants_text(request):
        return TextStream(mailbox, close)
    if request.query_params.get("format") == "html":
        return Stream(request, sse_frames(request, mailbox, wire.html_frame, until_terminal=True), close)
    mailbox.direct = direct.sse_writer(request.scope)
    return Stream(request, sse_frames(request, mailbox, attrgetter("sse"), until_terminal=True), close)


async def sse_frames(
    request: Request, mailbox: Mailbox, frame: Callable[[Event], bytes], until_terminal: bool
) -> AsyncIterator[bytes]:
    """The body of an SSE stream: ``retry:``, then ``frame(event)`` for each event, until the
    final event (per-job streams) or a drain, which ends it with a short ``retry:`` hint.
    A ``: ping`` comment after ``SSE_PING`` seconds without a wake-up keeps proxies from
    closing an idle stream."""
    yield wire.retry_frame(request.app.state.settings.sse_retry_ms)
    ping = request.app.state.settings.sse_ping or None
    while True:
        try:
            async with asyncio.timeout(ping):
                event = await mailbox.get()
        except TimeoutError:
            yield wire.PING_FRAME
            continue
        except MailboxClosed:
            yield wire.DRAIN_FRAME
            return
        delivered["sse"] += 1
        yield frame(event)
        if until_terminal and event.terminal:
            return
        del event  # an idle stream holds no event


def wants_text(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "text/plain" in accept and "json" not in accept and "event-stream" not in accept


class TextStream(StreamingResponse):
    """``curl -N -H 'Accept: text/plain' .../events``: one bar redrawn in place until the end."""

    def __init__(self, mailbox: Mailbox, on_close: Callable[[], None]) -> None:
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
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            if scope["method"] == "HEAD":  # headers only (StreamingResponse would stream the bar)
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                return await send({"type": "http.response.body", "body": b""})
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


@deadline
async def events(request: Request) -> Response:
    """``GET /events?job=A&job=B`` (or no ``job``: every job) with a resume cursor as ``id:``."""
    job_ids = list(dict.fromkeys(request.query_params.getlist("job")))
    if len(job_ids) > MAX_JOBS_PER_STREAM:
        raise invalid("job", f"at most {MAX_JOBS_PER_STREAM} jobs per stream")
    cursor = request.headers.get("last-event-id") or request.query_params.get("cursor")
    try:
        seen = contract.decode_cursor(cursor) if cursor else {}
    except ValueError:
        raise Problem(400, "Bad cursor", "Last-Event-ID or cursor is not one this server gave.") from None
    caller = await reader(request)
    hub, store = request.app.state.hub, request.app.state.store
    for job_id in job_ids:
        await load(request, job_id, caller)  # 404/410 before the stream starts
    if not job_ids and not (caller.by_key or caller.all_jobs):
        raise Problem(403, "Forbidden", "Watching every job needs an API key or a ticket for the whole feed.")
    release = admit(request, caller, "sse")
    mailbox = Mailbox()
    for job_id, seq in seen.items():
        mailbox.expect(job_id, seq)
    if job_ids:
        unwatch = lambda: hub.unwatch(mailbox, job_ids)  # noqa: E731
        watching = hub.watch(mailbox, job_ids)
    else:
        unwatch = lambda: hub.unwatch_all(mailbox)  # noqa: E731
        watching = hub.watch_all(mailbox, caller.tenant)

    def close() -> None:
        unwatch()
        release()

    try:
        await watching
        if job_ids:
            for job_id, raw in zip(job_ids, await store.read_many(job_ids)):
                if raw is not None:
                    mailbox.put(Event(job_id, raw))
        else:
            for event in await hub.snapshot_all(caller.tenant):
                mailbox.put(event)
    except BaseException:
        close()
        raise

    def frame(event: Event) -> bytes:
        """The frame's id is the resume cursor: the last seq of each job, newest last."""
        seen.pop(event.job_id, None)
        seen[event.job_id] = event.seq
        if len(seen) > MAX_JOBS_PER_STREAM:
            del seen[next(iter(seen))]
        return wire.sse_frame(contract.encode_cursor(seen).encode(), event.name, event.doc)

    return Stream(request, sse_frames(request, mailbox, frame, until_terminal=False), close)


class Connection:
    """One ``/ws`` client: many jobs on one socket, one writer task, one mailbox."""

    def __init__(self, ws: WebSocket, caller: Caller) -> None:
        self.ws = ws
        self.app = ws.app
        self.hub = ws.app.state.hub
        self.caller = caller
        self.granted: dict[str, str] = {}  # job -> tenant, opened by tokens sent with a subscribe
        self.mailbox = Mailbox()
        self.mailbox.direct = direct.ws_writer(ws.scope)
        self.jobs: set[str] = set()
        self.all = False

    async def error(self, message: str, **extra) -> None:
        """Answer the client; the writer sends it (one task writes, so sends never interleave)."""
        self.mailbox.notify(Notice(json.dumps({"event": "error", "message": message, **extra})))

    async def write_loop(self) -> None:
        """The only task that writes to this socket. A write stuck longer than SEND_TIMEOUT is
        cancelled by the process's ``SlowClientReaper`` (no timer per write)."""
        sending = self.app.state.reaper.sending
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        while True:
            try:
                event = await self.mailbox.get()
            except MailboxClosed:
                await self.ws.close(1012)  # service restart: reconnect (elsewhere) and resume
                return
            sending[task] = loop.time()
            await self.ws.send_text(event.ws)
            del sending[task]
            delivered["ws"] += 1
            if event.terminal and event.job_id in self.jobs and not self.all:
                self.jobs.discard(event.job_id)
                self.hub.unwatch(self.mailbox, [event.job_id])
            del event  # an idle connection holds no event

    async def handle(self, text: str) -> None:
        try:
            msg = json.loads(text)
        except ValueError:
            return await self.error("message is not JSON")
        if not isinstance(msg, dict):
            return await self.error("message must be a JSON object")
        op = msg.get("op")
        if op == "subscribe" and msg.get("all") is True:
            await self.subscribe_all()
        elif op in ("subscribe", "unsubscribe"):
            jobs = msg.get("jobs")
            if not isinstance(jobs, list) or not all(isinstance(j, str) and j for j in jobs):
                return await self.error("jobs must be a list of job ids", op=op)
            if op == "unsubscribe":
                self.hub.unwatch(self.mailbox, jobs)
                self.jobs.difference_update(jobs)
                return
            since = msg.get("since") or {}
            if not isinstance(since, dict) or not all(isinstance(v, int) for v in since.values()):
                return await self.error("since must map job ids to seqs", op=op)
            tokens = msg.get("tokens") or {}
            if not isinstance(tokens, dict) or not all(isinstance(v, str) for v in tokens.values()):
                return await self.error("tokens must map job ids to watch tokens", op=op)
            self.grant(tokens)
            await self.subscribe(list(dict.fromkeys(jobs)), since)
        else:
            await self.error(f"unknown op {op!r}; use subscribe or unsubscribe")

    def grant(self, tokens: dict[str, str]) -> None:
        """Watch tokens sent with a subscribe open their jobs (a browser watching several)."""
        for job_id, token in tokens.items():
            try:
                scope = self.app.state.auth.from_token(token)
            except Problem:
                continue  # the job then answers 404 like any job the caller may not read
            for job_id in scope.jobs or ():
                self.granted[job_id] = scope.tenant

    def may_read(self, event: Event) -> bool:
        return self.caller.may_read(event.job_id, event.tenant) or self.granted.get(event.job_id) == event.tenant

    async def subscribe(self, jobs: list[str], since: dict[str, int]) -> None:
        """Check every job first (its tenant never changes), so nothing of a job this caller may
        not read is ever routed here; then subscribe, then send the snapshots."""
        new = [j for j in jobs if j not in self.jobs]
        if len(self.jobs) + len(new) > MAX_JOBS_PER_STREAM:
            return await self.error(f"at most {MAX_JOBS_PER_STREAM} jobs per connection", op="subscribe")
        store = self.app.state.store
        allowed = []
        for job_id, raw in zip(new, await store.read_many(new)):
            if raw is not None and self.may_read(Event(job_id, raw)):
                allowed.append(job_id)
            else:
                gone = raw is None and await store.is_gone(job_id, self.caller.tenant)
                await self.error("job expired" if gone else "job not found", job=job_id, status=410 if gone else 404)
        for job_id in allowed:
            self.mailbox.expect(job_id, since.get(job_id, 0))
        self.jobs.update(allowed)
        try:
            await self.hub.watch(self.mailbox, allowed)
        except BaseException:
            self.jobs.difference_update(allowed)
            self.hub.unwatch(self.mailbox, allowed)
            raise
        for job_id, raw in zip(allowed, await store.read_many(allowed)):
            if raw is not None and job_id in self.jobs:  # not already ended and dropped meanwhile
                self.mailbox.put(Event(job_id, raw))

    async def subscribe_all(self) -> None:
        if not (self.caller.by_key or self.caller.all_jobs):
            return await self.error("watching every job needs an API key or a ticket for the whole feed", status=403)
        if self.all:
            return
        self.all = True
        await self.hub.watch_all(self.mailbox, self.caller.tenant)
        for event in await self.hub.snapshot_all(self.caller.tenant):
            self.mailbox.put(event)

    async def read_loop(self) -> None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                await self.error("send JSON text frames")
                continue
            try:
                async with redis_deadline():
                    await self.handle(text)
            except (SubscribeTimeout, RedisTimeoutError, RedisConnectionError):
                await self.error("service unavailable: try again", status=503)

    def close(self) -> None:
        self.hub.unwatch(self.mailbox, list(self.jobs))
        if self.all:
            self.hub.unwatch_all(self.mailbox)


def origin_allowed(ws: WebSocket) -> bool:
    """Browsers always send Origin: it must be listed in ALLOWED_ORIGINS, or (when that is empty)
    be this server's own origin. Clients that send none (curl, scripts) are not browsers, so
    they cannot be hijacked cross-site; they still need credentials like anyone else."""
    origin = ws.headers.get("origin")
    if origin is None:
        return True
    allowed = ws.app.state.allowed_origins
    if allowed:
        return origin in allowed
    host = ws.headers.get("host", "")
    return origin in (f"http://{host}", f"https://{host}")


async def websocket_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Every WebSocket handshake, whatever its path (``server.app.App``): ``/ws`` is the only one.
    Any other path is closed before accept (uvicorn answers 403), as Starlette's router does."""
    ws = WebSocket(scope, receive, send)
    if scope["path"].removeprefix(scope.get("root_path", "")) != "/ws":
        return await ws.close()
    await websocket(ws)


async def websocket(ws: WebSocket) -> None:
    # uvicorn answers HTTP requests past MAX_CONNECTIONS with 503 but lets WebSocket upgrades
    # through: refuse those here, before the handshake, in the same way
    if sum(STATS.connections.values()) >= ws.app.state.settings.max_connections:
        log.warning("websocket refused: MAX_CONNECTIONS streams open")
        full = Problem(503, "Server full", "This server holds MAX_CONNECTIONS connections; try again.", headers={"Retry-After": "5"})
        return await ws.send_denial_response(full.response())
    if not origin_allowed(ws):
        log.info("websocket refused: origin %r not allowed", ws.headers.get("origin"))
        return await ws.close(1008)  # before accept: the handshake is answered 403
    try:
        async with redis_deadline():  # a ticket is checked in Redis
            caller = await ws.app.state.auth.caller(ws)
        release = admit(ws, caller, "ws")
    except Problem as problem:  # accept, then close with the reason, so a browser can see why
        log.info("websocket refused: %s", problem.detail)
        await ws.accept()
        return await ws.close(1008, (problem.detail or problem.title)[:120])
    except (RedisTimeoutError, RedisConnectionError) as e:
        log.warning("websocket refused: Redis unavailable: %s", e)
        return await ws.send_denial_response(unavailable().response())
    await ws.accept()
    conn = Connection(ws, caller)
    reaper = ws.app.state.reaper
    # This task writes; one more task reads, and when it ends (the client left) it stops the
    # writing. Two tasks per connection, not three: an idle WebSocket is mostly its tasks.
    writer = asyncio.current_task()
    writing = True

    def reader_ended(_: asyncio.Task) -> None:
        if writing:  # it runs on a later loop turn: by then this task may be elsewhere
            writer.cancel()

    reader = asyncio.create_task(conn.read_loop())
    reader.add_done_callback(reader_ended)
    failure: BaseException | None = None
    try:
        await conn.write_loop()  # returns after a server drain
    except asyncio.CancelledError:
        if not (reader.done() or reaper.reaped(writer)):
            raise
        writer.uncancel()
    except Exception as e:
        failure = e
    finally:
        writing = False
        reader.cancel()
        conn.close()
        release()
        too_slow = reaper.reaped(writer)
        reaper.forget(writer)
    if reader.done() and not reader.cancelled():
        failure = failure or reader.exception()  # read either way: asyncio warns if it is not
    if too_slow:  # the client stopped taking our writes
        log.info("websocket client too slow; closing")
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await ws.close(1013)
    elif failure is not None and not isinstance(failure, WebSocketDisconnect):
        log.warning("websocket connection failed: %r", failure)
        with contextlib.suppress(Exception):
            await ws.close(1011)
