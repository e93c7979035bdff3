"""Output for terminals and htmx: a text bar, and HTML fragments that no message can break out of."""

from __future__ import annotations

import httpx
import pytest

from server.wire import html_bar, text_bar
from support import SSE, sse_frames, submit, watch_sse

pytestmark = pytest.mark.anyio

HOSTILE = '<script>alert(1)</script>\n\ndata: {"status":"succeeded"}\r\nevent: failed\r'


def test_text_bar_shape():
    doc = {"progress": 52.0, "message": "step 13 of 25", "eta_s": 6.2, "status": "running", "error": None}
    assert text_bar(doc) == "[##########          ]   52%  step 13 of 25  ETA 6s  running"
    assert text_bar(doc | {"progress": None, "status": "queued", "message": None}).startswith("[                    ]    ?%")


def test_html_bar_escapes_and_stays_on_one_line():
    doc = {"id": "j_x", "progress": 10.0, "message": HOSTILE, "status": "running", "error": None}
    html = html_bar(doc)
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "\n" not in html and "\r" not in html


async def test_status_and_stream_as_text(base):
    async with httpx.AsyncClient(timeout=30) as client:
        job = await submit(client, base, steps=4, interval=0.05)
        async with client.stream("GET", base + job["links"]["events"], headers={"Accept": "text/plain"}) as r:
            assert r.headers["content-type"].startswith("text/plain")
            body = (await r.aread()).decode()
        assert body.endswith("\n") and body.rstrip().endswith("succeeded") and "\r[" in body and "step 2 of 4" in body
        status = await client.get(base + job["links"]["self"], headers={"Accept": "text/plain"})
        assert status.text.startswith("[####################]  100%") and status.text.endswith("succeeded\n")


async def test_hostile_message_cannot_forge_sse_fields(base):
    """A message with newlines and `data:`/`event:` text arrives as one event with the literal text,
    in JSON and in the htmx HTML stream alike."""
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.post(base + "/jobs", json={"type": "echo", "params": {"message": HOSTILE}})
        job = r.json()
        events = await watch_sse(client, base + job["links"]["events"])
        assert [e.event for e in events][-1] == "succeeded"
        assert HOSTILE in [e.doc["message"] for e in events]
        assert all(e.event in ("progress", "succeeded") for e in events)
        html_events = []
        async with client.stream("GET", base + job["links"]["events"] + "?format=html") as r:
            async for item in sse_frames(r):
                if isinstance(item, SSE):
                    html_events.append(item)
        assert [e.event for e in html_events] == ["succeeded", "done"]  # done: htmx's sse-close
        assert html_events[1].data == "succeeded" and html_events[1].id is None
        assert html_events[0].data.startswith('<div class="job job-succeeded"') and "<script>" not in html_events[0].data
