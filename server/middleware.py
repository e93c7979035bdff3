"""Per request: a request id, security headers, and one structured access-log line.

The request id is the client's ``X-Request-ID`` when it is sane, else a new one; it is echoed
back, logged with the request, and kept in ``request_id`` (a context variable) for other logs.
Credentials in the query string (``token``, ``ticket``) never reach the log.
"""

from __future__ import annotations

import logging
import os
import re
import time
from urllib.parse import parse_qsl, urlencode

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.logs import request_id

log = logging.getLogger("server.access")

REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
SECRET_PARAMS = {"token", "ticket"}
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}
SECURITY_HEADER_LINES = [(name.encode(), value.encode()) for name, value in SECURITY_HEADERS.items()]


def redacted(query: bytes) -> str:
    if not query:
        return ""
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    return "?" + urlencode([(k, "***" if k in SECRET_PARAMS else v) for k, v in pairs])


class RequestContext:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if REQUEST_ID_RE.fullmatch(given) else os.urandom(12).hex()
        reset = request_id.set(rid)
        started = time.perf_counter()
        status = 101 if scope["type"] == "websocket" else 0
        rid_header = rid.encode("latin-1")

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] in ("http.response.start", "websocket.http.response.start"):
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"x-request-id"]
                present = {k.lower() for k, _ in headers}
                headers.append((b"x-request-id", rid_header))
                headers.extend(h for h in SECURITY_HEADER_LINES if h[0] not in present)
                message["headers"] = headers
            elif message["type"] == "websocket.close" and status == 101:
                status = 403 if message.get("code") == 1008 else status
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            client = scope.get("client") or ("-", 0)
            log.info(
                "%s %s%s %s %.1fms",
                scope.get("method", "WS"),
                scope["path"],
                redacted(scope.get("query_string", b"")),
                status,
                (time.perf_counter() - started) * 1000,
                extra={"request_id": rid, "client": client[0], "status": status},
            )
            request_id.reset(reset)
