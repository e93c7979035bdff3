"""The fenced fast path (``core.fastpath``): every private name it needs is in the locked
libraries, a missing one is named, and with the pieces on, deliveries really take the direct path
(with FAST_PATH=off, none does, and everything else still works: CI runs the transport, lifecycle,
fault and browser tests that way too)."""

from __future__ import annotations

import asyncio
import os
import re
from types import SimpleNamespace

import httpx
import pytest
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from websockets.asyncio.client import connect

from core import fastpath
from core.fastpath.protocols import Flag
from support import submit, watch_sse

pytestmark = pytest.mark.anyio
ON = os.environ.get("FAST_PATH", "on").lower() not in ("0", "false", "no", "off")


@pytest.mark.parametrize("piece", fastpath.PIECES)
def test_the_locked_libraries_have_every_name(piece):
    assert fastpath.problems(piece) == []


def test_a_missing_name_or_method_is_named_with_the_library_version():
    class Queue:  # what a library's class might call on its queue
        def run(self):
            self.queue.get_nowait()

    module = SimpleNamespace(
        NEEDS=[("uvicorn", HttpToolsProtocol, ("pipeline", "renamed_attribute"))],
        STAND_INS=[("uvicorn", Queue, asyncio.Queue, Flag)],
    )
    version = fastpath.version("uvicorn")
    assert fastpath.check(module) == [
        f"uvicorn {version}: HttpToolsProtocol.renamed_attribute",
        f"uvicorn {version}: test_a_missing_name_or_method_is_named_with_the_library_version.<locals>.Queue calls Queue.get_nowait, which Flag lacks",
    ]


def metric(text: str, name: str, label: str) -> float:
    found = re.search(rf'^{name}{{[a-z]+="{label}"}} ([0-9.e+]+)$', text, re.M)
    assert found, f"{name}{{{label}}} not in /metrics"
    return float(found.group(1))


async def test_deliveries_take_the_direct_path_when_it_is_on(base):
    async with httpx.AsyncClient(timeout=30) as client:
        before = (await client.get(base + "/metrics")).text
        job = await submit(client, base, steps=30, interval=0.02)
        ws_url = base.replace("http", "ws") + "/ws"
        async with connect(ws_url, origin=base) as ws:
            await ws.send('{"op": "subscribe", "jobs": ["%s"]}' % job["id"])
            sse = asyncio.create_task(watch_sse(client, base + job["links"]["events"]))
            while '"succeeded"' not in await ws.recv():
                pass
            await sse
        after = (await client.get(base + "/metrics")).text
    for piece in fastpath.PIECES:
        assert metric(after, "progress_fast_path", piece) == (1 if ON else 0)
    for transport in ("ws", "sse"):
        direct = metric(after, "progress_events_delivered_direct_total", transport) - metric(before, "progress_events_delivered_direct_total", transport)
        assert (direct > 0) if ON else (direct == 0), (transport, direct)
        assert metric(after, "progress_events_delivered_total", transport) > metric(before, "progress_events_delivered_total", transport)
