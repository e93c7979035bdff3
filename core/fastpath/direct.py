"""Direct delivery: an event's bytes written straight to an idle client's socket.

Every watcher of a job gets the same bytes: the WebSocket frame (server frames are not masked)
and the SSE chunk are built once per event (``Event.ws_frame``, ``Event.sse_chunk``). Sending
them through ASGI costs, per client, a task wake-up, the ASGI message, Starlette's and uvicorn's
send wrappers and the framing again: most of the CPU of a delivery. So when a client is idle
(its writer waits on an empty mailbox and its socket buffer is empty) ``Mailbox.put`` hands the
event to the writer made here, which writes the bytes in the hub's own loop iteration. Anything
else takes the ordinary path: a client with unsent bytes (back-pressure, conflation and the slow
client reaper apply), a notice, a job's final event (which also ends or unwatches a stream), a
server or protocol other than uvicorn's httptools and websockets-sansio ones.

Uvicorn hands the app a bound ``send`` of its WebSocket protocol or HTTP request cycle;
``remember``, called before any middleware wraps ``send``, keeps that object in the scope. With
the piece off (``core.fastpath``), it keeps nothing and every event takes the ordinary path.
Direct deliveries are counted apart (``progress_events_delivered_direct``), so a test can prove
the path is taken.

The same handle gives the slow-client reaper (``server.streams``) the connection's transport to
abort: a client that does not take a write for ``SEND_TIMEOUT`` is cut off, its pending send
returns, and the stream ends the way it ends when the client leaves.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

from uvicorn.protocols.http.httptools_impl import RequestResponseCycle
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import State

from core import fastpath

log = logging.getLogger("core.fastpath")


class Event(Protocol):
    """What a writer needs of the hub's event (``server.events.Event``): its bytes, framed once."""

    ws_frame: bytes
    sse_chunk: bytes


SCOPE_KEY = "progress.uvicorn"
Writer = Callable[[Event], bool]
delivered: Counter[str] = Counter()  # by transport: ``progress_events_delivered_direct`` (server.metrics)

NEEDS = [  # (library, class, the names of it used below)
    ("uvicorn", RequestResponseCycle, ("send", "transport", "chunked_encoding", "response_complete", "disconnected")),
    ("uvicorn", WebSocketsSansIOProtocol, ("send", "transport", "conn", "close_sent")),
    ("websockets", State, ("OPEN",)),
]


def failed(error: Exception) -> bool:
    """A writer raised: say so once, and take the ordinary path for this event and (the piece
    now off) for connections made from now on. Never an error in the hub's loop."""
    if fastpath.on("direct"):
        log.warning("fast path 'direct' is off after an error: %r", error)
        fastpath.turn_off("direct")
    return False


def remember(scope: dict[str, Any], send: Any) -> None:
    """Called first for each connection (``server.app.App``): keep uvicorn's protocol or request
    cycle whose bound method ``send`` is."""
    owner = getattr(send, "__self__", None)
    if isinstance(owner, (RequestResponseCycle, WebSocketsSansIOProtocol)) and fastpath.on("direct"):
        scope[SCOPE_KEY] = owner


def aborter(scope: dict[str, Any]) -> Callable[[], None] | None:
    """The function that cuts this connection off at once (unsent bytes dropped), if known."""
    owner = scope.get(SCOPE_KEY)
    return None if owner is None else owner.transport.abort


def ws_writer(scope: dict[str, Any]) -> Writer | None:
    """For an accepted WebSocket: write an event's text frame if the socket is open and idle."""
    proto = scope.get(SCOPE_KEY)
    if not isinstance(proto, WebSocketsSansIOProtocol):
        return None
    transport, conn = proto.transport, proto.conn

    def write(event: Event) -> bool:
        try:
            if conn.state is not State.OPEN or proto.close_sent or transport.is_closing() or transport.get_write_buffer_size():
                return False
            transport.write(event.ws_frame)
        except Exception as e:  # noqa: BLE001 - a library change the start-up check missed
            return failed(e)
        delivered["ws"] += 1
        return True

    return write


def sse_writer(scope: dict[str, Any]) -> Writer | None:
    """For an SSE response: write an event's chunk once the response is under way (chunked,
    not finished) and the socket is idle."""
    cycle = scope.get(SCOPE_KEY)
    if not isinstance(cycle, RequestResponseCycle):
        return None
    transport = cycle.transport

    def write(event: Event) -> bool:
        try:
            if (
                cycle.chunked_encoding is not True
                or cycle.response_complete
                or cycle.disconnected
                or transport.is_closing()
                or transport.get_write_buffer_size()
            ):
                return False
            transport.write(event.sse_chunk)
        except Exception as e:  # noqa: BLE001 - a library change the start-up check missed
            return failed(e)
        delivered["sse"] += 1
        return True

    return write
