"""sse-starlette's response without the lock its own ``__call__`` uses (760 bytes per stream):
``server.streams.Stream`` writes the body itself and never takes it.

Fenced (``core.fastpath``): the lock stays unless the installed sse-starlette makes it as named.
"""

from __future__ import annotations

from sse_starlette import EventSourceResponse

from core import fastpath

NEEDS = [("sse-starlette", EventSourceResponse, ("_send_lock",))]


def drop_send_lock(response: EventSourceResponse) -> None:
    if fastpath.on("sse"):
        del response._send_lock
