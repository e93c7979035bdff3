"""A job's own log: lines from ``ctx.log`` (async and sync jobs) and the worker's word on each
attempt, kept in Redis, read with ``GET /jobs/{id}/logs`` and live on the job's SSE stream
(``?logs=1``) and the WebSocket (``"logs": true``), resumed without gaps or repeats."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from support import SSE, async_wait_until, sse_frames, start_server

pytestmark = pytest.mark.anyio


async def run_job(client: httpx.AsyncClient, job_type: str, **params: Any) -> dict[str, Any]:
    r = await client.post("/jobs", json={"type": job_type, "params": params})
    assert r.status_code == 202, r.text
    return r.json()


async def finished(client: httpx.AsyncClient, job: dict[str, Any]) -> dict[str, Any]:
    async def done() -> bool:
        doc = (await client.get(job["links"]["self"], params={"redirect": "0"})).json()
        return doc["status"] in ("succeeded", "failed", "cancelled")

    await async_wait_until(done, timeout=60, what=f"job {job['id']} to finish")
    return (await client.get(job["links"]["self"], params={"redirect": "0"})).json()


def messages(items: list[dict[str, Any]]) -> list[str]:
    return [line["msg"] for line in items]


async def test_log_lines_of_an_async_job_in_order_with_the_workers_word(base, worker):
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        job = await run_job(client, "chatty", lines=30)
        await finished(client, job)
        r = await client.get(f"/jobs/{job['id']}/logs")
        assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
        body = r.json()
        assert [line["seq"] for line in body["items"]] == list(range(1, 33))
        assert (body["next"], body["last"], body["dropped"]) == (32, 32, 0)
        got = messages(body["items"])
        assert got[0] == "attempt 1 started" and got[1:31] == [f"line {i}" for i in range(1, 31)]
        assert got[31].startswith("succeeded in ")
        assert body["items"][5]["extra"] == {"i": 5} and body["items"][5]["level"] == "INFO"
        page = (await client.get(f"/jobs/{job['id']}/logs", params={"after": 10, "limit": 5})).json()
        assert [line["seq"] for line in page["items"]] == [11, 12, 13, 14, 15] and page["next"] == 15
        assert (await client.get(f"/jobs/{job['id']}/logs", params={"after": 32})).json()["items"] == []
        text = (await client.get(f"/jobs/{job['id']}/logs", params={"after": 30}, headers={"accept": "text/plain"})).text
        assert text.splitlines()[0].endswith("INFO    line 30") and text.endswith("\n")
        bad = await client.get(f"/jobs/{job['id']}/logs", params={"limit": 0})
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "limit"
        assert (await client.get("/jobs/j_nope/logs")).status_code == 404
        silent = await run_job(client, "echo", message="no log lines")  # a job that logs nothing has no log
        await finished(client, silent)
        assert (await client.get(f"/jobs/{silent['id']}/logs")).json() == {"items": [], "next": 0, "last": 0, "dropped": 0}


async def test_a_sync_job_logs_from_its_thread(base, worker):
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        job = await run_job(client, "chatty_sync", lines=50, every=10, pause=0.01)
        await finished(client, job)
        items = (await client.get(f"/jobs/{job['id']}/logs")).json()["items"]
        assert messages(items)[1:51] == [f"line {i}" for i in range(1, 51)]


async def read_logged_stream(client: httpx.AsyncClient, url: str, headers: dict[str, str], stop_after: int | None = None):
    """An SSE stream with ``?logs=1`` read to its end (or until ``stop_after`` log events):
    (log seqs received, gaps, final event or None, last id)."""
    seqs: list[int] = []
    gaps: list[tuple[int, int]] = []
    final, last_id, logs_seen = None, None, 0
    async with client.stream("GET", url, headers=headers) as r:
        assert r.status_code == 200, await r.aread()
        async for item in sse_frames(r):
            if not isinstance(item, SSE):
                continue
            last_id = item.id
            if item.event == "log":
                data = json.loads(item.data)
                batch = [line["seq"] for line in data["lines"]]
                assert batch == list(range(data["first"], data["last"] + 1)), data
                seqs += batch
                logs_seen += 1
                if stop_after is not None and logs_seen >= stop_after:
                    break
            elif item.event == "log-gap":
                data = json.loads(item.data)
                gaps.append((data["first"], data["last"]))
            elif item.event in ("succeeded", "failed", "cancelled"):
                final = item
    return seqs, gaps, final, last_id


async def test_ten_thousand_lines_at_full_speed_reach_a_reader_across_a_reconnect(base, worker):
    """The last 1,000 lines (what is kept) all arrive, in order, none twice, across a cut and a
    resume with ``Last-Event-ID``; anything older that a reader missed is announced as a gap."""
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        job = await run_job(client, "chatty", lines=10_000, every=100, hold=0.5)  # 100 lines per loop turn
        url = f"/jobs/{job['id']}/events?logs=1"
        first, gaps1, final1, last_id = await read_logged_stream(client, url, {}, stop_after=3)
        assert final1 is None and last_id and ":" in last_id
        second, gaps2, final2, _ = await read_logged_stream(client, url, {"Last-Event-ID": last_id})
        assert final2 is not None and json.loads(final2.data)["status"] == "succeeded"
        seqs = first + second
        assert seqs == sorted(set(seqs)), "a log line repeated or went back"
        stored = (await client.get(f"/jobs/{job['id']}/logs")).json()  # the 1,000 kept
        last = stored["last"]
        assert len(stored["items"]) == 1000 and stored["items"][-1]["msg"].startswith("succeeded in ")
        assert stored["items"][-2]["msg"] == "line 10000"
        assert set(range(last - 999, last + 1)) <= set(seqs), "a line of the last 1,000 is missing"
        covered = set(seqs) | {s for a, b in gaps1 + gaps2 for s in range(a, b + 1)}
        assert covered == set(range(1, last + 1)), "a line neither arrived nor was announced as skipped"


async def test_a_finished_jobs_stream_sends_the_lines_a_client_missed_then_ends(base, worker):
    """A client with the final event but not the last lines (a reconnect with ``seq:log seq``) gets
    those lines and the final event again, and the stream ends; with every line, ``204``."""
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        job = await run_job(client, "chatty", lines=5)
        final = await finished(client, job)
        last = (await client.get(f"/jobs/{job['id']}/logs")).json()["last"]
        url = f"/jobs/{job['id']}/events?logs=1"
        async with asyncio.timeout(10):  # ends by itself
            seqs, gaps, end, last_id = await read_logged_stream(client, url, {"Last-Event-ID": f"{final['seq']}:{last - 2}"})
        assert seqs == [last - 1, last] and not gaps and end.event == "succeeded" and last_id == f"{final['seq']}:{last}"
        done = await client.get(url, headers={"Last-Event-ID": f"{final['seq']}:{last}"})
        assert done.status_code == 204


async def test_a_stalled_reader_gets_a_gap_not_unbounded_memory(redis_server, worker, tmp_path):
    """A reader that stops reading while a job logs 30 MB: the server keeps at most
    JOB_LOG_LINES lines for it and tells it which it skipped; it still gets the end."""
    server = start_server(redis_server.url, tmp_path, job_log_lines=200, send_timeout=60)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            job = await run_job(client, "chatty", lines=10_000, every=100, size=3_000, hold=0.3)
            async with client.stream("GET", f"/jobs/{job['id']}/events?logs=1") as r:
                assert r.status_code == 200
                await finished(client, job)  # meanwhile nothing is read from this stream
                seqs, gaps, final = [], [], None
                last = (await client.get(f"/jobs/{job['id']}/logs", params={"after": 1_000_000})).json()["last"]
                async for item in sse_frames(r):
                    if isinstance(item, SSE) and item.event == "log":
                        seqs += [line["seq"] for line in json.loads(item.data)["lines"]]
                    elif isinstance(item, SSE) and item.event == "log-gap":
                        gap = json.loads(item.data)
                        gaps.append((gap["first"], gap["last"]))
                    elif isinstance(item, SSE) and item.event != "progress":
                        final = item.event
        assert final == "succeeded" and gaps, "no gap: the reader was never held back"
        assert seqs == sorted(set(seqs))
        skipped = sum(b - a + 1 for a, b in gaps)
        assert set(seqs).isdisjoint(s for a, b in gaps for s in range(a, b + 1))
        assert len(seqs) + skipped == last and seqs[-1] == last  # each line arrived or was announced skipped
    finally:
        server.stop()


async def test_websocket_subscribe_with_logs(base, worker):
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        job = await run_job(client, "chatty", lines=20, hold=0.3)
    ws_url = base.replace("http", "ws", 1) + "/ws"
    seqs, final = [], None
    async with connect(ws_url) as ws:
        await ws.send(json.dumps({"op": "subscribe", "jobs": [job["id"]], "logs": True, "log_after": {job["id"]: 5}}))
        async with asyncio.timeout(30):
            while final is None:
                msg = json.loads(await ws.recv())
                if msg["event"] == "log":
                    seqs += [line["seq"] for line in msg["log"]["lines"]]
                elif msg["event"] in ("succeeded", "failed", "cancelled"):
                    final = msg["event"]
                else:
                    assert msg["event"] == "progress", msg
        await ws.send(json.dumps({"op": "subscribe", "jobs": ["x"], "logs": "yes"}))
        assert json.loads(await ws.recv()) == {"event": "error", "message": "logs must be true or false", "op": "subscribe"}
    assert final == "succeeded" and seqs == list(range(6, 23))  # after 5: lines 5..20 and "succeeded"


async def test_a_websocket_gets_a_jobs_last_lines_before_its_end_however_soon_it_ends(base, worker):
    """Subscribing (with logs) as jobs end: each job's lines written before its final state reach
    the WebSocket before that final state, even when the job ends while the subscription is being
    set up (the lines' stored read and the event's live arrival race)."""
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        ws_url = base.replace("http", "ws", 1) + "/ws"
        for _ in range(3):
            jobs, ended = [], {}
            async with connect(ws_url) as ws:
                for _ in range(20):  # each subscribed at once after its submit, while a worker may be running it
                    jobs.append((await client.post("/jobs", json={"type": "demo", "params": {"steps": 2, "interval": 0, "fail_at_step": 1}})).json())
                    await ws.send(json.dumps({"op": "subscribe", "jobs": [jobs[-1]["id"]], "logs": True, "log_after": {jobs[-1]["id"]: 0}}))
                warned: set[str] = set()
                async with asyncio.timeout(30):
                    while len(ended) < len(jobs):
                        msg = json.loads(await ws.recv())
                        if msg["event"] == "log":
                            if any(line["level"] == "WARNING" for line in msg["log"]["lines"]):
                                warned.add(msg["log"]["job"])
                        elif msg["event"] == "failed":
                            ended[msg["job"]["id"]] = msg["job"]["id"] in warned
            assert all(ended.values()), f"{list(ended.values()).count(False)} of {len(jobs)} ended before their last lines"


async def test_a_jobs_log_is_read_with_the_jobs_own_rules(redis_server, worker, tmp_path):
    """The API key of the job's tenant or the job's watch token open its log; another tenant's
    key, another job's token or nothing get 404 / 401, on the log and on its stream alike."""
    server = start_server(redis_server.url, tmp_path, api_keys="acme:key-acme-1,globex:key-globex-1")
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            acme, globex = {"authorization": "Bearer key-acme-1"}, {"authorization": "Bearer key-globex-1"}
            r = await client.post("/jobs", json={"type": "chatty", "params": {"lines": 3}}, headers=acme)
            job = r.json()
            other = (await client.post("/jobs", json={"type": "chatty", "params": {"lines": 1}}, headers=acme)).json()
            async with httpx.AsyncClient(base_url=server.url, headers=acme, timeout=30) as keyed:
                await finished(keyed, job)
            logs = f"/jobs/{job['id']}/logs"
            assert (await client.get(logs, headers=acme)).json()["last"] == 5
            assert (await client.get(logs, params={"token": job["token"]})).status_code == 200
            assert (await client.get(logs, headers=globex)).status_code == 404
            assert (await client.get(logs, params={"token": other["token"]})).status_code == 404
            assert (await client.get(logs)).status_code == 401
            stream = await client.get(f"/jobs/{job['id']}/events?logs=1", headers=globex)
            assert stream.status_code == 404
    finally:
        server.stop()
