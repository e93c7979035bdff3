"""A job's whole life over each transport, against a real server, worker and Redis."""

from __future__ import annotations

import asyncio
import json

from datetime import datetime

import httpx
import pytest
from websockets.asyncio.client import connect

from support import SSE, assert_stream_ok, sse_frames, submit, watch_sse

pytestmark = pytest.mark.anyio


async def test_submit_answers_202_with_location_and_document(base):
    """POST /jobs: 202, Location, Retry-After and the queued document."""
    async with httpx.AsyncClient() as client:
        r = await client.post(base + "/jobs", json={"type": "demo", "params": {"steps": 2, "interval": 0}})
    assert r.status_code == 202
    doc = r.json()
    assert r.headers["location"] == f"/jobs/{doc['id']}" == doc["links"]["self"]
    assert int(r.headers["retry-after"]) >= 1
    assert (doc["status"], doc["seq"], doc["type"]) == ("queued", 1, "demo")


async def test_head_of_a_stream_answers_headers_only(base):
    """HEAD of a stream endpoint gives the stream's headers and no stream: it answers while the
    job still runs, and the connection stays usable."""
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        job = await submit(client, base, steps=100, interval=0.2)
        try:
            for url, accept, media_type in [
                (job["links"]["events"], "text/event-stream", "text/event-stream"),
                (f"/events?job={job['id']}", "text/event-stream", "text/event-stream"),
                (job["links"]["events"], "text/plain", "text/plain"),
            ]:
                r = await client.head(url, headers={"Accept": accept})
                assert r.status_code == 200 and r.headers["content-type"].startswith(media_type), (url, accept)
                assert r.content == b""
            assert (await client.post(job["links"]["events"])).status_code == 405
            assert (await client.get(job["links"]["self"])).json()["status"] in ("queued", "running")
        finally:
            await client.delete(job["links"]["self"])


async def test_sse_streams_every_step_then_ends_after_success(base):
    """The SSE stream shows the bar rising step by step, ends with `succeeded`, then closes."""
    async with httpx.AsyncClient(timeout=30) as client:
        job = await submit(client, base, steps=5, interval=0.05)
        events = await watch_sse(client, base + job["links"]["events"])
    docs = [e.doc for e in events]
    assert_stream_ok(docs, "succeeded")
    assert [e.id for e in events] == [str(d["seq"]) for d in docs]
    assert [e.event for e in events] == ["progress"] * (len(events) - 1) + ["succeeded"]
    progress = [d["progress"] for d in docs if d["progress"] is not None]
    assert progress == sorted(progress) and progress[-1] == 100
    assert {"step 1 of 5", "step 4 of 5"} <= {d["message"] for d in docs}
    assert docs[-1]["finished_at"] and docs[-1]["attempt"] == 1


async def test_status_redirects_to_result_once_succeeded(base):
    """Polling: 200 while running, 303 to /result when done; ?redirect=0 gives 200; the result is JSON."""
    async with httpx.AsyncClient(timeout=30) as client:
        job = await submit(client, base, steps=3, interval=0.05)
        url = base + job["links"]["self"]
        first = await client.get(url)
        assert first.status_code == 200 and "retry-after" in first.headers
        events = await watch_sse(client, base + job["links"]["events"])
        assert events[-1].event == "succeeded"
        done = await client.get(url)
        assert done.status_code == 303
        assert done.headers["location"] == f"/jobs/{job['id']}/result"
        assert done.json()["status"] == "succeeded"
        kept = datetime.fromisoformat(done.json()["expires_at"]) - datetime.fromisoformat(done.json()["finished_at"])
        assert abs(kept.total_seconds() - 3600) < 5  # RESULT_TTL after it ended
        assert job["expires_at"] is None  # (until then)
        assert (await client.get(url + "?redirect=0")).status_code == 200
        result = await client.get(url, follow_redirects=True)
        assert result.status_code == 200 and result.json() == {"steps": 3}


async def test_etag_and_if_none_match(base):
    """The ETag is the seq; the same ETag back gives 304 and no body."""
    async with httpx.AsyncClient(timeout=30) as client:
        job = await submit(client, base, steps=1, interval=0)
        await watch_sse(client, base + job["links"]["events"])
        r = await client.get(base + job["links"]["self"] + "?redirect=0")
        doc = r.json()
        assert r.headers["etag"] == f'"{doc["seq"]}"'
        again = await client.get(base + job["links"]["self"], headers={"If-None-Match": r.headers["etag"]})
        assert again.status_code == 304 and again.content == b""


async def test_long_poll_returns_on_the_next_change(base):
    """?wait=S&after=SEQ holds until seq passes SEQ, then answers 200 even for a finished job."""
    async with httpx.AsyncClient(timeout=30) as client:
        job = await submit(client, base, steps=4, interval=0.2)
        seen = [1]
        status = "queued"
        while status not in ("succeeded", "failed", "cancelled"):
            r = await client.get(base + job["links"]["self"], params={"wait": 10, "after": seen[-1]})
            assert r.status_code == 200
            doc = r.json()
            assert doc["seq"] > seen[-1], "long poll answered without a change"
            seen.append(doc["seq"])
            status = doc["status"]
        assert status == "succeeded"


async def test_websocket_many_jobs_on_one_connection(base):
    """One WebSocket subscribes to three jobs; each arrives in seq order and ends exactly once."""
    async with httpx.AsyncClient(timeout=30) as client:
        jobs = [await submit(client, base, steps=4, interval=0.05) for _ in range(3)]
    ids = [j["id"] for j in jobs]
    received: dict[str, list[dict]] = {i: [] for i in ids}
    async with connect(base.replace("http", "ws") + "/ws") as ws:
        await ws.send(json.dumps({"op": "subscribe", "jobs": ids}))
        async with asyncio.timeout(20):
            while sum(1 for docs in received.values() if docs and docs[-1]["status"] == "succeeded") < 3:
                msg = json.loads(await ws.recv())
                assert msg["event"] in ("progress", "succeeded"), msg
                assert msg["event"] == ("succeeded" if msg["job"]["status"] == "succeeded" else "progress")
                received[msg["job"]["id"]].append(msg["job"])
    for docs in received.values():
        assert_stream_ok(docs, "succeeded")


async def test_websocket_bad_op_gets_error_and_stays_usable(base):
    async with connect(base.replace("http", "ws") + "/ws") as ws:
        await ws.send("not json")
        assert json.loads(await ws.recv())["event"] == "error"
        await ws.send(json.dumps({"op": "dance"}))
        assert json.loads(await ws.recv())["event"] == "error"
        await ws.send(json.dumps({"op": "subscribe", "jobs": ["j_doesnotexist"]}))
        msg = json.loads(await ws.recv())
        assert msg["event"] == "error" and msg["status"] == 404 and msg["job"] == "j_doesnotexist"


async def test_sse_resume_by_last_event_id(base):
    """Reconnecting with Last-Event-ID gives only newer seqs; after the end, 204 stops EventSource."""
    async with httpx.AsyncClient(timeout=30) as client:
        job = await submit(client, base, steps=6, interval=0.1)
        url = base + job["links"]["events"]
        first: list[dict] = []
        async with client.stream("GET", url) as r:
            async for item in sse_frames(r):
                if isinstance(item, SSE):
                    first.append(item.doc)
                    if item.doc["progress"] and item.doc["progress"] >= 30:
                        break  # drop the connection mid-job
        last = first[-1]["seq"]
        rest = [e.doc for e in await watch_sse(client, url, headers={"Last-Event-ID": str(last)})]
        assert rest[0]["seq"] > last
        assert_stream_ok(first + rest, "succeeded")
        done = await client.get(url, headers={"Last-Event-ID": str(rest[-1]["seq"])})
        assert done.status_code == 204
        since = [e.doc for e in await watch_sse(client, url + f"?since={last}")]
        assert since[0]["seq"] > last and since[-1]["status"] == "succeeded"


async def test_websocket_resume_with_since(base):
    """A WS subscription with since={id: seq} starts after that seq."""
    async with httpx.AsyncClient(timeout=30) as client:
        job = await submit(client, base, steps=3, interval=0)
        docs = [e.doc for e in await watch_sse(client, base + job["links"]["events"])]
    final = docs[-1]["seq"]
    async with connect(base.replace("http", "ws") + "/ws") as ws:
        await ws.send(json.dumps({"op": "subscribe", "jobs": [job["id"]], "since": {job["id"]: final - 1}}))
        msg = json.loads(await ws.recv())
        assert msg["job"]["seq"] == final and msg["event"] == "succeeded"
        await ws.send(json.dumps({"op": "subscribe", "jobs": [job["id"]], "since": {job["id"]: final}}))
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await ws.recv()  # nothing newer than `final` exists: nothing is sent


async def test_fifty_watchers_all_end_exactly_once(base):
    """50 concurrent SSE watchers of one job all end with `succeeded` once, seq strictly increasing."""
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=100)) as client:
        job = await submit(client, base, steps=10, interval=0.05)
        streams = await asyncio.gather(*(watch_sse(client, base + job["links"]["events"]) for _ in range(50)))
    for events in streams:
        assert_stream_ok([e.doc for e in events], "succeeded")


async def test_failing_job_ends_failed_with_error_and_no_traceback(base):
    async with httpx.AsyncClient(timeout=30) as client:
        job = await submit(client, base, steps=5, interval=0, fail_at_step=3)
        docs = [e.doc for e in await watch_sse(client, base + job["links"]["events"])]
        assert_stream_ok(docs, "failed")
        assert docs[-1]["error"] == {"type": "DemoFailure", "message": "failed at step 3 of 5"}
        status = await client.get(base + job["links"]["self"])
        assert status.status_code == 200 and status.json()["status"] == "failed"
        result = await client.get(base + job["links"]["result"])
        assert result.status_code == 409
        assert result.headers["content-type"] == "application/problem+json"
        assert result.json()["job_status"] == "failed"


async def test_list_jobs_newest_first_with_filter_and_cursor(base):
    async with httpx.AsyncClient(timeout=30) as client:
        ids = [(await submit(client, base, steps=1, interval=0))["id"] for _ in range(3)]
        page = (await client.get(base + "/jobs", params={"limit": 2})).json()
        assert [d["id"] for d in page["items"]] == ids[::-1][:2]
        more = (await client.get(base + "/jobs", params={"limit": 2, "cursor": page["next"]})).json()
        assert more["items"][0]["id"] == ids[0]
        failed = (await client.get(base + "/jobs", params={"status": "failed", "limit": 100})).json()
        assert all(d["status"] == "failed" for d in failed["items"])
