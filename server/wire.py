"""Every wire encoding of a job's event, in one place: the SSE frame and its HTTP/1.1 chunk, the
WebSocket message and its frame, and the human renderings (a one-line text bar for terminals, an
HTML fragment for htmx). The hub frames each event once (``events.Event``) with these; the
transports (``server.streams``) only write what they are given.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

BAR_WIDTH = 20
PING_FRAME = b": ping\n\n"  # an SSE comment: keeps proxies from closing an idle stream
DRAIN_FRAME = b"retry: 250\n\n"  # sent as a stream ends for a server drain: come back soon


def sse_frame(event_id: bytes, name: str, data: bytes) -> bytes:
    """One SSE frame; ``data`` must be one line (JSON, or HTML from ``html_bar``)."""
    return b"id: %s\nevent: %s\ndata: %s\n\n" % (event_id, name.encode(), data)


def retry_frame(ms: int) -> bytes:
    """The ``retry:`` hint an SSE stream starts with."""
    return b"retry: %d\n\n" % ms


def chunk(data: bytes) -> bytes:
    """``data`` as one HTTP/1.1 chunk (an SSE response is chunked)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def ws_message(name: str, doc: bytes) -> str:
    """A job's event as the WebSocket's JSON message, the document's bytes untouched."""
    return '{"event":"%s","job":%s}' % (name, doc.decode())


def ws_frame(text: str) -> bytes:
    """``text`` as a whole WebSocket text frame, unmasked, as a server sends it (RFC 6455 5.2)."""
    payload = text.encode()
    n = len(payload)
    if n < 126:
        head = bytes((0x81, n))
    elif n < 1 << 16:
        head = bytes((0x81, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x81, 127)) + n.to_bytes(8, "big")
    return head + payload


def text_bar(doc: dict[str, Any]) -> str:
    """``[##########          ]  52%  step 13 of 25  ETA 6s  running``"""
    pct = doc["progress"]
    filled = 0 if pct is None else round(BAR_WIDTH * pct / 100)
    parts = [f"[{'#' * filled}{' ' * (BAR_WIDTH - filled)}]", "  ?%" if pct is None else f"{pct:3.0f}%"]
    if doc["message"]:
        parts.append(doc["message"])
    if doc["eta_s"] is not None and doc["status"] == "running":
        parts.append(f"ETA {doc['eta_s']:.0f}s")
    parts.append(doc["status"])
    if doc["error"]:
        parts.append(f"{doc['error']['type']}: {doc['error']['message']}")
    return "  ".join(parts)


def html_bar(doc: dict[str, Any]) -> str:
    """One line of HTML (safe to put in an SSE ``data:`` field), every value escaped."""
    pct = doc["progress"]
    value = "" if pct is None else f' value="{pct:g}"'
    label = "" if pct is None else f"{pct:.0f}%"
    message = escape(doc["message"] or "")
    error = f' <span class="job-error">{escape(doc["error"]["message"])}</span>' if doc["error"] else ""
    html = (
        f'<div class="job job-{escape(doc["status"])}" id="job-{escape(doc["id"])}">'
        f'<progress max="100"{value} aria-label="progress">{label}</progress> '
        f'<span class="job-pct">{label}</span> <span class="job-message">{message}</span> '
        f'<span class="job-status">{escape(doc["status"])}</span>{error}</div>'
    )
    return html.replace("\r", "&#13;").replace("\n", "&#10;")


def html_frame(event: Any) -> bytes:
    """For htmx's SSE extension, which swaps the fragment in: the bar as HTML instead of JSON
    (``event``: a ``events.Event``). A final event is followed by ``event: done`` (no id), since
    the extension's ``sse-close`` takes one event name: ``sse-close="done"`` closes the stream
    before the server ends it, so the browser never reconnects to a finished job."""
    frame = sse_frame(b"%d" % event.seq, event.name, html_bar(json.loads(event.doc)).encode())
    return frame + b"event: done\ndata: %s\n\n" % event.name.encode() if event.terminal else frame
