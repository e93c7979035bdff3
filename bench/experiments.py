"""Measured what-ifs for the server hot path, without touching server/: an app factory that
patches the shipped app at start-up (``python -m uvicorn bench.experiments:create_app --factory``,
``BENCH_EXPERIMENT=name,name``; ``python -m bench --experiment name,...`` does it for you).

These are measuring devices, not production code: each removes or replaces one cost on the
delivery path so the saving can be read off the bench. What each would need to be correct in
production is said beside it (and in bench/RESULTS.md).

* ``ws-nolock``: ``Connection.send`` without the per-send ``asyncio.Lock`` and ``asyncio.timeout``
  (production: one writer task already serializes sends; detect a stuck client by the transport's
  write-buffer size or one timer per connection instead of a timeout per send).
* ``ws-direct``: the WebSocket frame is built once per event (server frames are unmasked, so the
  bytes are the same for every client) and written straight to the connection's transport,
  bypassing Starlette's send wrappers, the ASGI message, uvicorn's send and websockets' framing
  (production: a small WebSocket writer of our own that owns the transport, or an ASGI extension).
* ``ws-sync``: ``ws-direct`` plus delivery inside ``Mailbox.put`` when the client is idle (nothing
  pending, empty write buffer): no writer-task wake-up per delivery; the mailbox and its conflation
  are used only when a client falls behind.
* ``sse-lean``: the SSE response without sse-starlette: one task per stream, no task group, no
  ``anyio.move_on_after`` per send (production: keep a ping timer and a stuck-client check).
* ``sse-direct``: ``sse-lean`` plus the chunk (``<hex>\\r\\n<frame>\\r\\n``) built once per event and
  written straight to the transport.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from server import hub as hub_module
from server import streams

WRITE_BUFFER_LIMIT = 256 * 1024  # above this a client is treated as stuck


class FramedEvent(hub_module.Event):
    """An Event that also caches its WebSocket frame and SSE chunk bytes (built once, shared)."""

    __slots__ = ("_wsf", "_ssec")

    def __init__(self, job_id: str, raw: bytes) -> None:
        super().__init__(job_id, raw)
        self._wsf: bytes | None = None
        self._ssec: bytes | None = None


def ws_frame(event: hub_module.Event) -> bytes:
    frame = getattr(event, "_wsf", None)
    if frame is None:
        payload = event.ws.encode()
        n = len(payload)
        if n < 126:
            head = bytes((0x81, n))
        elif n < 65536:
            head = bytes((0x81, 126)) + n.to_bytes(2, "big")
        else:
            head = bytes((0x81, 127)) + n.to_bytes(8, "big")
        frame = head + payload
        if isinstance(event, FramedEvent):
            event._wsf = frame
    return frame


def sse_chunk(event: hub_module.Event, body: bytes | None = None) -> bytes:
    chunk = getattr(event, "_ssec", None) if body is None else None
    if chunk is None:
        data = event.sse if body is None else body
        chunk = b"%x\r\n%s\r\n" % (len(data), data)
        if body is None and isinstance(event, FramedEvent):
            event._ssec = chunk
    return chunk


def transport_of(scope: dict[str, Any]):
    proto = scope.get("bench.proto")
    return getattr(proto, "transport", None)


# -- WebSocket ----------------------------------------------------------------------------


async def send_nolock(self, text: str) -> None:
    await self.ws.send_text(text)


async def write_loop_direct(self) -> None:
    transport = transport_of(self.ws.scope)
    while True:
        try:
            event = await self.mailbox.get()
        except hub_module.MailboxClosed:
            await self.ws.close(1012)
            return
        if transport is None:
            await self.send(event.ws)
        else:
            if transport.is_closing():
                return
            if transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
                raise TimeoutError("client too slow")
            transport.write(ws_frame(event))
        if event.terminal and event.job_id in self.jobs and not self.all:
            self.jobs.discard(event.job_id)
            self.hub.unwatch(self.mailbox, [event.job_id])


class SyncMailbox(hub_module.Mailbox):
    """Writes an event at once when the client is idle; falls back to the mailbox otherwise."""

    __slots__ = ("transport", "conn")

    def put(self, event: hub_module.Event) -> None:
        t = self.transport
        if (t is not None and not self._pending and self._waiter is not None and not self.closed
                and event.seq > self._seen.get(event.job_id, 0) and not t.is_closing()
                and t.get_write_buffer_size() == 0):  # fmt: skip
            self._remember(event.job_id, event.seq)
            t.write(ws_frame(event))
            conn = self.conn
            if event.terminal and event.job_id in conn.jobs and not conn.all:
                conn.jobs.discard(event.job_id)
                asyncio.get_running_loop().call_soon(conn.hub.unwatch, self, [event.job_id])
            return
        super().put(event)


def patch_connection_init(original):
    def __init__(self, *args, **kwargs) -> None:
        original(self, *args, **kwargs)
        mailbox = SyncMailbox()
        mailbox.transport = transport_of(self.ws.scope)
        mailbox.conn = self
        self.mailbox = mailbox

    return __init__


# -- SSE ----------------------------------------------------------------------------------


class LeanStream:
    """An SSE response in plain ASGI: one task per stream (plus a disconnect listener)."""

    direct = False

    def __init__(self, request, frames, on_close) -> None:
        self.frames = frames
        self.on_close = on_close
        self.status_code = 200
        self.headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-store"),
                        (b"x-accel-buffering", b"no"), (b"connection", b"keep-alive")]  # fmt: skip

    async def __call__(self, scope, receive, send) -> None:
        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        listener = asyncio.ensure_future(listen())
        transport = transport_of(scope) if self.direct else None
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            async for chunk in self.frames:
                if listener.done():
                    break
                if transport is not None:
                    if transport.is_closing():
                        break
                    if transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
                        break
                    transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                else:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if not listener.done():
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            listener.cancel()
            self.on_close()


class DirectStream(LeanStream):
    direct = True


# -- the factory ----------------------------------------------------------------------------


def create_app():
    from server.app import create_app as real

    chosen = {e.strip() for e in os.environ.get("BENCH_EXPERIMENT", "").split(",") if e.strip()}
    unknown = chosen - {"ws-nolock", "ws-direct", "ws-sync", "sse-lean", "sse-direct", "none"}
    if unknown:
        raise SystemExit(f"unknown BENCH_EXPERIMENT {sorted(unknown)}")
    if chosen & {"ws-direct", "ws-sync", "sse-direct"}:
        hub_module.Event = FramedEvent  # the hub frames each event once for every client
    if "ws-nolock" in chosen:
        streams.Connection.send = send_nolock
    if chosen & {"ws-direct", "ws-sync"}:
        streams.Connection.send = send_nolock
        streams.Connection.write_loop = write_loop_direct
    if "ws-sync" in chosen:
        streams.Connection.__init__ = patch_connection_init(streams.Connection.__init__)
    if "sse-lean" in chosen:
        streams.Stream = LeanStream
    if "sse-direct" in chosen:
        streams.Stream = DirectStream
    app = real()

    async def capture(scope, receive, send) -> None:
        # uvicorn hands the app its protocol's (or request cycle's) bound send: keep the object
        proto = getattr(send, "__self__", None)
        if proto is not None and scope["type"] in ("http", "websocket"):
            scope["bench.proto"] = proto
        await app(scope, receive, send)

    return capture
