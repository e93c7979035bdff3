"""Bad input gets a clear problem+json naming the field at fault, and changes nothing."""

from __future__ import annotations

import json

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from core import contract

pytestmark = pytest.mark.anyio

PROBLEM = "application/problem+json"


def state(redis_client) -> tuple[int, int]:
    """What a rejected request must not change: the job index and arq's queue."""
    return redis_client.zcard(contract.jobs_index("")), redis_client.zcard("arq:queue")


@pytest.mark.parametrize(
    ("body", "headers", "status", "field"),
    [
        (b'{"type": "demo", "params": ', {"content-type": "application/json"}, 400, None),
        (b'{"type": "demo", "params": {"steps": NaN}}', {"content-type": "application/json"}, 400, None),
        (b'{"type": "demo", "type": "demo"}', {"content-type": "application/json"}, 400, None),
        (b"[" * 100_000 + b"]" * 100_000, {"content-type": "application/json"}, 400, None),
        (b"\xff\xfe{}", {"content-type": "application/json"}, 400, None),
        (b'{"type": "demo"}', {"content-type": "text/plain"}, 415, None),
        (b'{"type": "demo"}', {}, 415, None),
        (b"[]", {"content-type": "application/json"}, 422, "body"),
        (b'{"type": "nope"}', {"content-type": "application/json"}, 422, "type"),
        (b'{"type": 5}', {"content-type": "application/json"}, 422, "type"),
        (b'{"type": "demo", "params": []}', {"content-type": "application/json"}, 422, "params"),
        (b'{"type": "demo", "extra": 1}', {"content-type": "application/json"}, 422, "extra"),
        (b'{"type": "demo", "params": {"steps": 0}}', {"content-type": "application/json"}, 422, "params.steps"),
        (b'{"type": "demo", "params": {"steps": "many"}}', {"content-type": "application/json"}, 422, "params.steps"),
        (b'{"type": "demo", "params": {"interval": -1}}', {"content-type": "application/json"}, 422, "params.interval"),
        (b'{"type": "demo", "params": {"steps": 2, "colour": "red"}}', {"content-type": "application/json"}, 422, "params.colour"),
    ],
)
async def test_bad_submit_is_refused_and_creates_nothing(base, redis_client, body, headers, status, field):
    before = state(redis_client)
    async with httpx.AsyncClient() as client:
        r = await client.post(base + "/jobs", content=body, headers=headers)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    problem = r.json()
    assert problem["status"] == status and problem["title"] and problem["detail"]
    if field:
        assert problem["errors"][0]["field"] == field
    assert state(redis_client) == before


async def test_body_over_the_limit_is_413(base, redis_client):
    """A body over 1 MiB is refused (by Content-Length, or while streaming without one)."""
    before = state(redis_client)
    big = b'{"type": "demo", "params": {"x": "' + b"a" * (1 << 20) + b'"}}'

    async def chunks():
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    async with httpx.AsyncClient() as client:
        r = await client.post(base + "/jobs", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.headers["content-type"] == PROBLEM
        r = await client.post(base + "/jobs", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
    assert state(redis_client) == before


@pytest.mark.parametrize("path", ["/jobs/j_unknown", "/jobs/j_unknown/result", "/jobs/j_unknown/events"])
async def test_unknown_job_is_404_problem(base, path):
    async with httpx.AsyncClient() as client:
        r = await client.get(base + path)
        assert r.status_code == 404 and r.headers["content-type"] == PROBLEM
        assert "j_unknown" in r.json()["detail"]
        r = await client.delete(base + "/jobs/j_unknown")
        assert r.status_code == 404


@pytest.mark.parametrize("query", ["wait=abc", "wait=-1", "wait=1&after=x", "cursor=x"])
async def test_bad_query_parameters_are_422(base, query):
    async with httpx.AsyncClient() as client:
        job = (await client.post(base + "/jobs", json={"type": "demo", "params": {"steps": 1, "interval": 0}})).json()
        path = "/jobs" if query.startswith("cursor") else job["links"]["self"]
        r = await client.get(f"{base}{path}?{query}")
    assert r.status_code == 422 and r.headers["content-type"] == PROBLEM


async def test_unknown_route_is_a_problem(base):
    async with httpx.AsyncClient() as client:
        r = await client.get(base + "/nope")
    assert r.status_code == 404 and r.headers["content-type"] == PROBLEM


async def test_unknown_websocket_path_is_refused(base):
    """Only /ws takes WebSockets; any other path is refused at the handshake, as Starlette's
    router does (403), and /ws itself answers."""
    with pytest.raises(InvalidStatus) as refused:
        async with connect(base.replace("http", "ws") + "/nope"):
            pass
    assert refused.value.response.status_code == 403
    async with connect(base.replace("http", "ws") + "/ws") as ws:
        await ws.send(json.dumps({"op": "dance"}))
        assert json.loads(await ws.recv())["event"] == "error"
