"""Abuse suite: each test states the attack and the expected answer. Real processes, loopback only."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import pytest
import redis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from server.auth import Auth
from core.devredis import RedisProcess
from core.settings import Settings
from support import SSE, assert_stream_ok, sse_frames, start_server, start_worker, watch_sse

pytestmark = pytest.mark.anyio

ACME, GLOBEX = "acme-key-0001", "globex-key-0001"
KEYS = f"acme:{ACME},globex:{GLOBEX}"
SECRET = "test-token-secret"
ORIGIN = "https://app.example"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secured")
    r = RedisProcess(tmp / "redis").start()
    settings = {"api_keys": KEYS, "token_secret": SECRET, "allowed_origins": ORIGIN}
    server = start_server(r.url, tmp, **settings)
    worker = start_worker(r.url, tmp, **settings)
    yield server
    worker.stop()
    server.stop()
    r.stop()


async def submit_as(client: httpx.AsyncClient, base: str, key: str, **params) -> dict:
    r = await client.post(base + "/jobs", json={"type": "demo", "params": {"steps": 2, "interval": 0.05, **params}}, headers=bearer(key))
    assert r.status_code == 202, r.text
    return r.json()


async def test_no_or_bad_key_is_401_and_changes_nothing(secured):
    """Attack: submit, list, cancel without a key or with a made-up one. Answer: 401 problem."""
    async with httpx.AsyncClient(base_url=secured.url) as client:
        job = await submit_as(client, secured.url, ACME)
        for headers in ({}, bearer("not-a-key-at-all"), {"Authorization": "Basic YTpi"}):
            assert (await client.post("/jobs", json={"type": "demo"}, headers=headers)).status_code == 401
            assert (await client.get("/jobs", headers=headers)).status_code == 401
            r = await client.delete(job["links"]["self"], headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert (await client.get(job["links"]["self"] + "?redirect=0", headers=bearer(ACME))).json()["status"] != "cancelled"


async def test_bola_other_tenant_gets_404_everywhere(secured):
    """Attack: globex reads, streams, subscribes to, cancels, retries and lists acme's job.
    Answer: 404 on every route (never 403), and the list does not show it."""
    async with httpx.AsyncClient(base_url=secured.url, timeout=30) as client:
        job = await submit_as(client, secured.url, ACME, steps=30, interval=0.05)
        foreign = bearer(GLOBEX)
        for method, path in [
            ("GET", job["links"]["self"]),
            ("GET", job["links"]["result"]),
            ("GET", job["links"]["events"]),
            ("GET", f"/events?job={job['id']}"),
            ("DELETE", job["links"]["self"]),
            ("POST", job["links"]["self"] + "/retry"),
            ("POST", "/tickets"),
        ]:
            body = {"jobs": [job["id"]]} if path == "/tickets" else None
            r = await client.request(method, path, headers=foreign, json=body)
            assert r.status_code == 404, (method, path, r.status_code)
            unknown = await client.request(method, path.replace(job["id"], "j_" + "A" * 24), headers=foreign, json=body)
            assert unknown.status_code == 404 and r.json()["title"] == unknown.json()["title"]
        listed = (await client.get("/jobs", params={"limit": 100}, headers=foreign)).json()
        assert job["id"] not in [d["id"] for d in listed["items"]]
        async with connect(secured.url.replace("http", "ws") + "/ws", additional_headers=foreign) as ws:
            await ws.send(json.dumps({"op": "subscribe", "jobs": [job["id"]]}))
            msg = json.loads(await ws.recv())
            assert (msg["event"], msg["status"]) == ("error", 404)
        await client.delete(job["links"]["self"], headers=bearer(ACME))


async def test_dashboards_never_see_another_tenant(secured):
    """Attack: globex watches 'all' over SSE and WS while acme's jobs run. Answer: not one byte of
    acme's events; globex's own job arrives."""
    async with httpx.AsyncClient(base_url=secured.url, timeout=30) as client:
        seen_sse: list[dict] = []
        seen_ws: list[dict] = []
        ready = asyncio.Event()

        async def sse_dashboard() -> None:
            async with client.stream("GET", "/events", headers=bearer(GLOBEX)) as r:
                ready.set()
                async for item in sse_frames(r):
                    if isinstance(item, SSE):
                        seen_sse.append(item.doc)
                        if item.doc["status"] == "succeeded" and item.doc["id"] == mine["id"]:
                            return

        async def ws_dashboard() -> None:
            async with connect(secured.url.replace("http", "ws") + "/ws", additional_headers=bearer(GLOBEX)) as ws:
                await ws.send(json.dumps({"op": "subscribe", "all": True}))
                while True:
                    doc = json.loads(await ws.recv())["job"]
                    seen_ws.append(doc)
                    if doc["status"] == "succeeded" and doc["id"] == mine["id"]:
                        return

        mine = {"id": None}
        sse_task = asyncio.create_task(sse_dashboard())
        await asyncio.wait_for(ready.wait(), 10)
        ws_task = asyncio.create_task(ws_dashboard())
        theirs = await submit_as(client, secured.url, ACME)
        await watch_sse(client, secured.url + theirs["links"]["events"], bearer(ACME))
        mine.update(await submit_as(client, secured.url, GLOBEX))
        await asyncio.wait_for(asyncio.gather(sse_task, ws_task), 20)
    for seen in (seen_sse, seen_ws):
        assert theirs["id"] not in {d["id"] for d in seen}
        assert mine["id"] in {d["id"] for d in seen}


async def test_watch_token_reads_its_job_only(secured):
    """Attack: use job A's watch token on job B, to list, to cancel, or forged/expired.
    Answer: A readable (status, SSE, WS); B 404; list/cancel 401; forged or expired 401."""
    async with httpx.AsyncClient(base_url=secured.url, timeout=30) as client:
        a = await submit_as(client, secured.url, ACME)
        b = await submit_as(client, secured.url, ACME)
        token = a["token"]
        events = await watch_sse(client, secured.url + a["links"]["events"] + f"?token={token}")
        assert_stream_ok([e.doc for e in events], "succeeded")
        assert (await client.get(a["links"]["self"], params={"token": token, "redirect": 0})).status_code == 200
        assert (await client.get(b["links"]["self"], params={"token": token})).status_code == 404
        assert (await client.get(b["links"]["events"], params={"token": token})).status_code == 404
        assert (await client.get("/jobs", headers=bearer(token))).status_code == 401
        assert (await client.delete(a["links"]["self"], headers=bearer(token))).status_code == 401
        assert (await client.get("/events", params={"token": token})).status_code == 403
        forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
        assert (await client.get(a["links"]["self"], params={"token": forged})).status_code == 401
        auth = Auth(Settings(token_secret=SECRET, job_ttl=-100, result_ttl=0), SECRET.encode(), None)
        expired = auth.token(a["id"], "acme")
        r = await client.get(a["links"]["self"], params={"token": expired})
        assert r.status_code == 401 and "expired" in r.json()["detail"]
        async with connect(secured.url.replace("http", "ws") + f"/ws?token={token}", additional_headers={"Origin": ORIGIN}) as ws:
            await ws.send(json.dumps({"op": "subscribe", "jobs": [a["id"], b["id"]]}))
            answers = [json.loads(await ws.recv()) for _ in range(2)]
        assert {m["event"] for m in answers} == {"succeeded", "error"}
        assert next(m for m in answers if m["event"] == "error")["job"] == b["id"]


async def test_ticket_is_single_use_and_never_logged(secured):
    """Attack: reuse a stream ticket, and look for it in the access log.
    Answer: first use streams, second use 401; the log shows *** instead."""
    async with httpx.AsyncClient(base_url=secured.url, timeout=30) as client:
        job = await submit_as(client, secured.url, ACME)
        r = await client.post("/tickets", json={"jobs": [job["id"]]}, headers=bearer(job["token"]))
        assert r.status_code == 201 and r.json()["expires_in"] == 60
        ticket = r.json()["ticket"]
        events = await watch_sse(client, secured.url + job["links"]["events"] + f"?ticket={ticket}")
        assert events[-1].event == "succeeded"
        again = await client.get(job["links"]["events"], params={"ticket": ticket})
        assert again.status_code == 401
    log = secured.log()
    assert ticket not in log and job["token"] not in log
    assert "ticket=%2A%2A%2A" in log or "ticket=***" in log


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://127.0.0.1:1"])
async def test_websocket_foreign_origin_refused_before_accept(secured, origin):
    """Attack: cross-site WebSocket hijacking with a valid key from a foreign, null or other origin.
    Answer: the handshake is refused with 403."""
    with pytest.raises(InvalidStatus) as refused:
        async with connect(secured.url.replace("http", "ws") + "/ws", additional_headers={"Origin": origin, **bearer(ACME)}):
            pass
    assert refused.value.response.status_code == 403


async def test_websocket_origin_and_credentials_rules(secured):
    """An allowed origin with a key, and a script with no Origin but a key, connect; no credentials
    at all is accepted only to be closed with 1008 and the reason (a browser can tell why)."""
    ws_url = secured.url.replace("http", "ws") + "/ws"
    async with connect(ws_url, additional_headers={"Origin": ORIGIN, **bearer(ACME)}) as ws:
        await ws.send(json.dumps({"op": "subscribe", "all": True}))
    async with connect(ws_url, additional_headers=bearer(ACME)) as ws:
        await ws.send(json.dumps({"op": "dance"}))
        assert json.loads(await ws.recv())["event"] == "error"
    async with connect(ws_url, additional_headers={"Origin": ORIGIN}) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd.code == 1008 and "API key" in closed.value.rcvd.reason


async def test_several_watch_tokens_open_one_multi_job_stream(secured):
    """A browser holding a token per job watches them all on one /events stream; a token of
    another tenant's job cannot be mixed in."""
    async with httpx.AsyncClient(base_url=secured.url, timeout=30) as client:
        a = await submit_as(client, secured.url, ACME)
        b = await submit_as(client, secured.url, ACME)
        g = await submit_as(client, secured.url, GLOBEX)
        url = f"/events?job={a['id']}&job={b['id']}&token={a['token']}&token={b['token']}"
        finished: set[str] = set()
        async with client.stream("GET", url) as r:
            assert r.status_code == 200
            async for item in sse_frames(r):
                if isinstance(item, SSE) and item.event == "succeeded":
                    finished.add(item.doc["id"])
                    if finished == {a["id"], b["id"]}:
                        break
        mixed = await client.get(f"/events?job={a['id']}&token={a['token']}&token={g['token']}")
        assert mixed.status_code == 401


async def test_cors_allows_only_the_allowlist(secured):
    async with httpx.AsyncClient(base_url=secured.url) as client:
        preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
        ok = await client.options("/jobs", headers={"Origin": ORIGIN, **preflight})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
        bad = await client.options("/jobs", headers={"Origin": "https://evil.example", **preflight})
        assert "access-control-allow-origin" not in bad.headers


async def test_websocket_oversized_frame_closes_1009(secured):
    """Attack: a 1 MiB WebSocket message. Answer: closed with 1009, server still serving."""
    async with connect(secured.url.replace("http", "ws") + "/ws", additional_headers=bearer(ACME), max_size=None) as ws:
        await ws.send("x" * (1 << 20))
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd.code == 1009
    async with httpx.AsyncClient() as client:
        assert (await client.get(secured.url + "/healthz")).status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ('{"type":"demo","params":{"x":' + "[" * 40 + "]" * 40 + "}}", 422, "params"),
        ('{"type":"demo","params":{"x":"' + "a" * 70_000 + '"}}', 422, "params"),
        ('{"type":"demo","params":{"steps":1e400}}', 400, None),
        ('{"type":"demo","params":{"steps":' + "9" * 5000 + "}}", 400, None),
        ('{"type":"demo","params":{"s":"\\ud800"}}', 400, None),
        ('{"type":"demo","params":{"s":"\\uDFFF"}}', 400, None),
        (b'{"type":"demo","params":{"s":"\xed\xa0\x80"}}', 400, None),  # a surrogate as raw bytes: not UTF-8
        ('{"type":"demo","params":{}}'.encode("utf-16"), 400, None),
    ],
)
async def test_hostile_json_is_refused(secured, body, status, field):
    """Attack: deep nesting, oversized params, numbers that overflow, huge integers, lone surrogates.
    Answer: 400/422 problem (never 500), nothing created."""
    async with httpx.AsyncClient(base_url=secured.url) as client:
        content = body if isinstance(body, bytes) else body.encode()
        r = await client.post("/jobs", content=content, headers={"content-type": "application/json", **bearer(ACME)})
    assert r.status_code == status, r.text
    if field:
        assert r.json()["errors"][0]["field"] == field


@pytest.mark.parametrize(
    "path",
    [
        "/static/../../etc/passwd",
        "/static/%2e%2e/%2e%2e/etc/passwd",
        "/static/%252e%252e/%252e%252e/etc/passwd",
        "/static/..%5c..%5cetc%5cpasswd",
        "/static//etc/passwd",
        "/static/index.html%00.js",
        "/static/../core/settings.py",
    ],
)
def test_static_path_traversal(secured, path):
    """Attack: escape the static root. Answer: 404, and no file content from outside."""
    with socket.create_connection(("127.0.0.1", secured.port)) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    assert status in (400, 404), answer[:200]
    assert b"root:" not in answer and b"class Settings" not in answer


async def test_pages_carry_security_headers(secured):
    async with httpx.AsyncClient(base_url=secured.url) as client:
        r = await client.get("/")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["x-request-id"]
    assert "server" not in r.headers  # no software banner


async def test_request_id_is_honoured_and_logged(secured):
    async with httpx.AsyncClient(base_url=secured.url) as client:
        r = await client.get("/healthz", headers={"X-Request-ID": "trace-abc-123"})
        assert r.headers["x-request-id"] == "trace-abc-123"
        weird = await client.get("/healthz", headers={"X-Request-ID": "not ok " + "x" * 100})
        assert weird.headers["x-request-id"] != "not ok " + "x" * 100
    assert '"request_id": "trace-abc-123"' in secured.log()


async def test_rate_limit_is_shared_by_replicas(tmp_path):
    """Attack: spread submits over two server processes to dodge the limit.
    Answer: the 6th submit in the window is 429 with Retry-After and RateLimit headers."""
    r = RedisProcess(tmp_path / "redis").start()
    a = start_server(r.url, tmp_path, api_keys=KEYS, rate_submit=5)
    b = start_server(r.url, tmp_path, api_keys=KEYS, rate_submit=5)
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            codes = []
            for i in range(6):
                base = (a if i % 2 else b).url
                resp = await client.post(base + "/jobs", json={"type": "demo"}, headers=bearer(ACME))
                codes.append(resp.status_code)
            assert codes == [202] * 5 + [429]
            assert int(resp.headers["retry-after"]) >= 1 and resp.headers["ratelimit-limit"] == "5"
            assert resp.headers["content-type"] == "application/problem+json"
            other = await client.post(a.url + "/jobs", json={"type": "demo"}, headers=bearer(GLOBEX))
            assert other.status_code == 202, "another key has its own budget"
    finally:
        a.stop()
        b.stop()
        r.stop()


async def test_status_polls_are_rate_limited_per_caller(tmp_path):
    """Attack: poll a status URL in a tight loop. Answer: past RATE_POLL reads in the window,
    429 with Retry-After (and unknown jobs count too); another key keeps its own budget."""
    r = RedisProcess(tmp_path / "redis").start()
    server = start_server(r.url, tmp_path, api_keys=KEYS, rate_poll=3)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            job = (await client.post("/jobs", json={"type": "demo"}, headers=bearer(ACME))).json()
            codes = [(await client.get(job["links"]["self"], headers=bearer(ACME))).status_code for _ in range(2)]
            codes.append((await client.get("/jobs/j_unknown", headers=bearer(ACME))).status_code)
            over = await client.get(job["links"]["self"], headers=bearer(ACME))
            assert codes + [over.status_code] == [200, 200, 404, 429]
            assert int(over.headers["retry-after"]) >= 1 and over.headers["ratelimit-limit"] == "3"
            assert over.headers["content-type"] == "application/problem+json"
            other = await client.get(job["links"]["self"], headers=bearer(GLOBEX))
            assert other.status_code == 404, "another tenant's key has its own budget (and no access)"
    finally:
        server.stop()
        r.stop()


async def test_streams_per_client_are_capped(tmp_path):
    r = RedisProcess(tmp_path / "redis").start()
    server = start_server(r.url, tmp_path, max_streams_per_client=2)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            job = (await client.post("/jobs", json={"type": "demo", "params": {"steps": 100}})).json()
            async with client.stream("GET", job["links"]["events"]) as one, client.stream("GET", job["links"]["events"]) as two:
                assert one.status_code == two.status_code == 200
                third = await client.get(job["links"]["events"])
                assert third.status_code == 429 and "retry-after" in third.headers
            deadline = asyncio.get_running_loop().time() + 5
            while True:  # the server counts a stream out once it notices the disconnect
                async with client.stream("GET", job["links"]["events"]) as again:
                    if again.status_code == 200:
                        break
                assert asyncio.get_running_loop().time() < deadline, "closed streams were not counted out"
                await asyncio.sleep(0.05)
    finally:
        server.stop()
        r.stop()


async def test_redis_with_a_password(tmp_path):
    """Redis requires a password: with it in REDIS_URL server and worker work; a client without it is refused."""
    r = RedisProcess(tmp_path / "redis", password="s3cret-pass").start()
    good = start_server(r.url, tmp_path)
    worker = start_worker(r.url, tmp_path)
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            job = (await client.post(good.url + "/jobs", json={"type": "demo", "params": {"steps": 1, "interval": 0}})).json()
            assert (await watch_sse(client, good.url + job["links"]["events"]))[-1].event == "succeeded"
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=r.port).get("x")
    finally:
        worker.stop()
        good.stop()
        r.stop()


async def test_list_with_a_ticket_for_every_job(secured):
    """A dashboard in a browser lists jobs with an 'all' ticket (single use); a job ticket cannot list."""
    async with httpx.AsyncClient(base_url=secured.url, timeout=30) as client:
        job = await submit_as(client, secured.url, ACME)
        all_ticket = (await client.post("/tickets", json={"all": True}, headers=bearer(ACME))).json()["ticket"]
        page = await client.get("/jobs", params={"ticket": all_ticket})
        assert page.status_code == 200 and job["id"] in [d["id"] for d in page.json()["items"]]
        assert (await client.get("/jobs", params={"ticket": all_ticket})).status_code == 401
        job_ticket = (await client.post("/tickets", json={"jobs": [job["id"]]}, headers=bearer(ACME))).json()["ticket"]
        assert (await client.get("/jobs", params={"ticket": job_ticket})).status_code == 401


async def test_queue_cap_per_tenant(tmp_path):
    """Attack: flood the queue. Answer: past QUEUE_CAP queued jobs of one tenant, 429 with
    Retry-After and nothing created; another tenant is not affected; a cancelled job frees a slot."""
    r = RedisProcess(tmp_path / "redis").start()
    server = start_server(r.url, tmp_path, api_keys=KEYS, queue_cap=2)  # no worker: jobs stay queued
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            first = await submit_as(client, server.url, ACME)
            await submit_as(client, server.url, ACME)
            full = await client.post("/jobs", json={"type": "demo"}, headers=bearer(ACME))
            assert full.status_code == 429 and int(full.headers["retry-after"]) > 0
            listed = (await client.get("/jobs", headers=bearer(ACME))).json()["items"]
            assert len(listed) == 2
            await submit_as(client, server.url, GLOBEX)
            assert (await client.delete(first["links"]["self"], headers=bearer(ACME))).status_code == 200
            await submit_as(client, server.url, ACME)
    finally:
        server.stop()
        r.stop()
