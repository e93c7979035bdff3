"""uvicorn's httptools and websockets-sansio protocols, holding less for an idle connection.

For every connection uvicorn makes asyncio objects that an idle stream never uses, and each of
them costs about 760 bytes before it is used (an empty ``collections.deque`` holds a 64-slot
block): an ``asyncio.Event`` for flow control and one per request, a deque for pipelined
requests, and, for a WebSocket, an ``asyncio.Queue`` (three deques) and an Event. A WebSocket also
keeps its handshake's request and response headers for as long as it is open. These subclasses
put ``Flag`` and ``Inbox`` (the same behaviour, in lists) in their place and drop the handshake
once it is answered.

``server.__main__`` selects them by import string (uvicorn's ``http=`` and ``ws=``), the way uvicorn
lets a deployment choose its protocol implementations, when the fence (``core.fastpath``) finds
every name below in the installed uvicorn; else uvicorn's own classes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from collections import deque

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol


class Flag:
    """``asyncio.Event`` (``set``, ``clear``, ``is_set``, ``wait``) with its waiters in a list."""

    __slots__ = ("_set", "_waiters")

    def __init__(self, value: bool = False) -> None:
        self._set = value
        self._waiters: list[asyncio.Future] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if not self._set:
            self._set = True
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_result(True)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> bool:
        if self._set:
            return True
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
            return True
        finally:
            self._waiters.remove(waiter)


class Inbox:
    """An unbounded ``asyncio.Queue``'s ``put_nowait``, ``get`` and ``empty``, in lists, for the
    one reader uvicorn has per connection. It holds a message or two: uvicorn stops reading the
    socket while one waits."""

    __slots__ = ("_items", "_getters")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._getters: list[asyncio.Future] = []

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        self._wake()

    def _wake(self) -> None:
        for getter in self._getters:
            if not getter.done():
                getter.set_result(None)
                return

    async def get(self) -> Any:
        while not self._items:
            getter = asyncio.get_running_loop().create_future()
            self._getters.append(getter)
            try:
                await getter
            except BaseException:
                self._getters.remove(getter)
                if self._items:  # perhaps woken for an item it will not take now: pass it on
                    self._wake()
                raise
            self._getters.remove(getter)
        return self._items.pop(0)


class Pipeline(list):
    """The deque of pipelined requests (uvicorn uses ``appendleft`` and ``pop``), as a list."""

    __slots__ = ()

    def appendleft(self, item: Any) -> None:
        self.insert(0, item)


class HttpProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pipeline = Pipeline()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow._is_writable_event = Flag(True)

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        cycle.message_event = Flag(cycle.message_event.is_set())  # before its task exists
        super()._start_asgi_task(cycle, app)


class WebSocketProtocol(WebSocketsSansIOProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = Inbox()  # type: ignore[assignment]
        self.writable = Flag(True)  # type: ignore[assignment]

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        # The app sees the headers in its scope; the request (which the websockets parser also
        # keeps) is not read again once ``accept`` has made the response.
        self.request = None
        event.headers.clear()

    def start_keepalive(self) -> None:
        self.response = None  # uvicorn calls this once it has written the accepting response
        super().start_keepalive()


NEEDS = [  # (library, class, the names of it that the classes above replace or call)
    ("uvicorn", HttpToolsProtocol, ("pipeline", "flow", "connection_made", "_start_asgi_task")),
    ("uvicorn", FlowControl, ("_is_writable_event",)),
    ("uvicorn", RequestResponseCycle, ("message_event",)),
    ("uvicorn", WebSocketsSansIOProtocol, ("queue", "writable", "request", "response", "handle_connect", "start_keepalive")),
]
STAND_INS = [  # (library, its class, the type it uses, our stand-in)
    ("uvicorn", HttpToolsProtocol, deque, Pipeline),
    ("uvicorn", FlowControl, asyncio.Event, Flag),
    ("uvicorn", RequestResponseCycle, asyncio.Event, Flag),
    ("uvicorn", WebSocketsSansIOProtocol, asyncio.Queue, Inbox),
    ("uvicorn", WebSocketsSansIOProtocol, asyncio.Event, Flag),
]
