"""``core.fastpath.protocols``: uvicorn's protocols with lighter per-connection objects must behave as
uvicorn's own, and must really replace them (an attribute uvicorn renames would silently bring
the asyncio objects back: these tests fail then)."""

from __future__ import annotations

import asyncio
import collections

import httpx
import pytest
import uvicorn
from websockets.asyncio.client import connect

from core.devredis import free_port
from core.fastpath.protocols import Flag, HttpProtocol, Inbox, WebSocketProtocol
from support import async_wait_until

pytestmark = pytest.mark.anyio

HEAVY = (asyncio.Event, asyncio.Queue, collections.deque)


def heavy_attributes(obj: object) -> set[str]:
    return {name for name, value in vars(obj).items() if isinstance(value, HEAVY)}


async def test_flag_wakes_every_waiter_and_can_be_cleared():
    flag = Flag()
    waiters = [asyncio.create_task(flag.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    flag.set()
    assert await asyncio.gather(*waiters) == [True, True, True]
    flag.clear()
    assert not flag.is_set()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await flag.wait()
    assert flag._waiters == []  # a cancelled wait leaves nothing behind


async def test_inbox_is_first_in_first_out_and_a_cancelled_getter_loses_nothing():
    inbox = Inbox()
    inbox.put_nowait(1)
    inbox.put_nowait(2)
    assert [await inbox.get(), await inbox.get()] == [1, 2]
    assert inbox.empty()
    first, second = asyncio.create_task(inbox.get()), asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    inbox.put_nowait("only")  # wakes ``first``...
    first.cancel()  # ...which is cancelled before it runs: ``second`` must get the item
    assert await second == "only"
    assert first.cancelled()
    assert inbox.empty() and inbox._getters == []


async def test_inbox_serves_waiting_getters_in_order():
    inbox = Inbox()
    first, second = asyncio.create_task(inbox.get()), asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    inbox.put_nowait("a")
    assert await first == "a"
    assert not second.done()
    inbox.put_nowait("b")
    assert await second == "b"


async def app(scope, receive, send):
    """A stream that sends one chunk and then waits, and a WebSocket that echoes."""
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b"data: hello\n\n", "more_body": True})
        while (await receive())["type"] != "http.disconnect":
            pass
    elif scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        while (message := await receive())["type"] == "websocket.receive":
            await send({"type": "websocket.send", "text": message["text"]})


async def test_idle_connections_hold_none_of_uvicorns_asyncio_objects():
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, loop="none", lifespan="off", log_config=None,
        http="core.fastpath.protocols:HttpProtocol", ws="core.fastpath.protocols:WebSocketProtocol",
    )  # fmt: skip
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        async def started() -> bool:
            return server.started

        await async_wait_until(started, timeout=10, what="uvicorn started")
        async with httpx.AsyncClient() as client, client.stream("GET", f"http://127.0.0.1:{port}/events") as stream:
            chunks = stream.aiter_raw()
            assert await anext(chunks) == b"data: hello\n\n"
            async with connect(f"ws://127.0.0.1:{port}/ws") as ws:
                await ws.send("ping")
                assert await ws.recv() == "ping"

                protocols = list(server.server_state.connections)
                (http,) = [p for p in protocols if isinstance(p, HttpProtocol)]
                (websocket,) = [p for p in protocols if isinstance(p, WebSocketProtocol)]
                assert heavy_attributes(http) == set()
                assert heavy_attributes(http.cycle) == set()
                assert heavy_attributes(http.flow) == set()
                assert heavy_attributes(websocket) == set()
                assert websocket.request is None and websocket.response is None
                kept = websocket.conn.parser.gi_frame.f_locals.get("request")  # the websockets parser's
                assert kept is None or not kept.headers

                await ws.send("still works")  # through ``Inbox`` and ``Flag``
                assert await ws.recv() == "still works"
    finally:
        server.should_exit = True
        await serving
