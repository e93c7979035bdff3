"""The WebSocket, ``/ws``: many jobs on one connection, subscribed and unsubscribed by messages,
with one task that writes and one that reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from core import contract
from core.fastpath import direct
from server.auth import Caller
from server.events import Event, Mailbox, MailboxClosed, Notice
from server.hub import SubscribeTimeout, Watch
from server.requests import depth, may_read, redis_deadline, strict_json_text
from server.metrics import STATS
from server.problems import Problem, unavailable
from server.streams import MAX_JOBS_PER_STREAM, admit

log = logging.getLogger("server.streams")
MAX_MESSAGE_DEPTH = 4  # {"op", "jobs": [...], "since": {...}}: two levels; a little room

delivered = STATS.delivered


class Connection:
    """One ``/ws`` client: many jobs on one socket, one writer task, one mailbox, one watch."""

    def __init__(self, ws: WebSocket, receive: Receive, caller: Caller, mailbox: Mailbox, watch: Watch) -> None:
        self.ws = ws
        self.receive = receive
        self.app = ws.app
        self.hub = ws.app.state.hub
        self.caller = caller
        self.granted: dict[str, str] = {}  # job -> tenant, opened by tokens sent with a subscribe
        self.mailbox = mailbox
        self.watch = watch

    async def error(self, message: str, **extra) -> None:
        """Answer the client; the writer sends it (one task writes, so sends never interleave)."""
        self.mailbox.notify(Notice(json.dumps({"event": "error", "message": message, **extra})))

    async def write_loop(self) -> None:
        """The only task that writes to this socket, until the client leaves (the mailbox is
        closed as gone) or the server drains. A client that does not take a write for
        SEND_TIMEOUT is dropped by the process's ``SlowClientReaper``."""
        send = self.app.state.reaper.timed(self.ws.scope, self.ws.send_text)
        watch = self.watch
        while True:
            try:
                event = await self.mailbox.get()
            except MailboxClosed:
                if not self.mailbox.gone:
                    await self.ws.close(1012)  # service restart: reconnect (elsewhere) and resume
                return
            await send(event.ws)
            delivered["ws"] += 1
            if event.terminal and not watch.all:
                watch.remove([event.job_id])
            del event  # an idle connection holds no event

    async def handle(self, text: str) -> None:
        try:  # the guards of an HTTP body: no runaway nesting, no lone surrogates, no NaN
            msg = strict_json_text(text)
            if depth(msg, MAX_MESSAGE_DEPTH) > MAX_MESSAGE_DEPTH:
                raise Problem(400, "Malformed JSON", "nested too deeply")
        except Problem as problem:
            return await self.error(f"message is not valid JSON: {problem.detail}")
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
                return self.watch.remove(jobs)
            since = msg.get("since") or {}
            if not isinstance(since, dict) or not all(isinstance(v, int) for v in since.values()):
                return await self.error("since must map job ids to seqs", op=op)
            tokens = msg.get("tokens") or {}
            if not isinstance(tokens, dict) or not all(isinstance(v, str) for v in tokens.values()):
                return await self.error("tokens must map job ids to watch tokens", op=op)
            logs = msg.get("logs", False)
            log_after = msg.get("log_after") or {}
            if not isinstance(logs, bool):
                return await self.error("logs must be true or false", op=op)
            if not isinstance(log_after, dict) or not all(isinstance(v, int) for v in log_after.values()):
                return await self.error("log_after must map job ids to log seqs", op=op)
            self.grant(tokens)
            await self.subscribe(list(dict.fromkeys(jobs)), since, log_after if logs else None)
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
        """The caller's own, or a job (or a group's child) of a token sent with a subscribe."""
        if may_read(self.caller, event) or self.granted.get(event.job_id) == event.tenant:
            return True
        return self.granted.get(contract.parent_of(event.doc) or "") == event.tenant

    async def subscribe(self, jobs: list[str], since: dict[str, int], log_after: dict[str, int] | None = None) -> None:
        """Check every job first (its tenant never changes), so nothing of a job this caller may
        not read is ever routed here; then subscribe, then send the snapshots (and with
        ``log_after``, the jobs' log lines after those seqs, stored then live)."""
        new = [j for j in jobs if j not in self.watch.jobs]
        if len(self.watch.jobs) + len(new) > MAX_JOBS_PER_STREAM:
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
        if log_after is not None:  # first: the lines written before an event reach the client before it
            await self.watch.add_logs(allowed, log_after)
        await self.watch.add(allowed)
        for job_id, raw in zip(allowed, await store.read_many(allowed)):
            if raw is not None and job_id in self.watch.jobs:  # not already ended and dropped meanwhile
                self.mailbox.put(Event(job_id, raw))

    async def subscribe_all(self) -> None:
        if not (self.caller.by_key or self.caller.all_jobs):
            return await self.error("watching every job needs an API key or a ticket for the whole feed", status=403)
        if self.watch.all:
            return
        await self.watch.add_all(self.caller.tenant)
        for event in await self.hub.snapshot_all(self.caller.tenant):
            self.mailbox.put(event)

    async def read_loop(self) -> None:
        while True:
            message = await self.receive()  # ASGI's own: Starlette's ``ws.receive`` is one frame more
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
    # (one function, not two: an open socket keeps a frame per call it is inside)
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
    ws.scope["headers"].clear()  # read: an open socket keeps no copy (0.9 KB)
    mailbox = Mailbox()
    mailbox.direct = direct.ws_writer(ws.scope)
    failure: BaseException | None = None
    with ws.app.state.hub.watching(mailbox) as watch:
        watch.on_exit = release
        conn = Connection(ws, receive, caller, mailbox, watch)
        # This task writes; one more task reads, and when it ends (the client left) it closes the
        # mailbox, which ends the writing. Two tasks per connection, not three: an idle WebSocket
        # is mostly its tasks.
        reader = asyncio.create_task(conn.read_loop())
        reader.add_done_callback(lambda _: mailbox.close(gone=True))
        try:
            await conn.write_loop()  # returns once the client has gone, or after a server drain
        except TimeoutError:  # a write waited SEND_TIMEOUT (without the fast path's reaper)
            log.info("websocket client too slow; closing")
            failure = TimeoutError()
        except Exception as e:
            failure = e
        finally:
            reader.cancel()
    if reader.done() and not reader.cancelled():
        failure = failure or reader.exception()  # read either way: asyncio warns if it is not
    if isinstance(failure, TimeoutError):  # the client stopped taking our writes
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await ws.close(1013)
    elif failure is not None and not isinstance(failure, WebSocketDisconnect):
        log.warning("websocket connection failed: %r", failure)
        with contextlib.suppress(Exception):
            await ws.close(1011)
