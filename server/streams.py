"""What the live transports share (``server.sse``: SSE per job and for many jobs, and the text
bar; ``server.ws``: one WebSocket for many jobs). Each transport is a thin adapter over the hub:
make a mailbox, ``watch`` (subscription confirmed), read the snapshot into the mailbox, then
write whatever the mailbox yields, framed once per event (``server.wire``). Here: the slow-client
reaper, the per-caller stream count, and the plain-ASGI endpoint the SSE routes use.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from server.auth import Caller
from server.metrics import STATS
from server.problems import Problem

MAX_JOBS_PER_STREAM = 100


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
