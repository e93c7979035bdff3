"""Groups (``POST /jobs`` with ``group``): one document whose progress is its children's mean by
weight, watched like any job on every transport, through a killed worker and a cancel. Real
servers and workers, each test with a Redis of its own."""

from __future__ import annotations

import asyncio
import json
import signal

import httpx
import pytest
from websockets.asyncio.client import connect

from support import async_wait_until, ended_states, start_server, start_worker, watch_sse

pytestmark = pytest.mark.anyio

# five children of different weights and speeds (demo: `steps` reports of `interval` s each)
FIVE = [
    {"type": "demo", "params": {"steps": 4, "interval": 0.05}, "weight": 1},
    {"type": "demo", "params": {"steps": 10, "interval": 0.05}, "weight": 3},
    {"type": "demo", "params": {"steps": 6, "interval": 0.1}, "weight": 2},
    {"type": "demo", "params": {"steps": 2, "interval": 0.3}, "weight": 0.5},
    {"type": "demo", "params": {"steps": 8, "interval": 0.08}},
]


async def submit_group(client: httpx.AsyncClient, members: list[dict], **body) -> dict:
    answer = await client.post("/jobs", json={"group": members, **body})
    assert answer.status_code == 202, answer.text
    assert answer.headers["location"] == f"/jobs/{answer.json()['id']}"
    return answer.json()


def assert_group_stream_ok(docs: list[dict], final: str) -> None:
    """Seqs rise, progress never goes back and ends at 100, the final state comes once, last."""
    seqs = [d["seq"] for d in docs]
    assert seqs == sorted(set(seqs)), seqs
    shown = [d["progress"] for d in docs if d["progress"] is not None]
    assert shown == sorted(shown) and shown[-1] == 100, shown
    assert [d["status"] for d in docs].count(final) == 1 and docs[-1]["status"] == final


async def long_poll(client: httpx.AsyncClient, job_id: str) -> list[dict]:
    """Every change a long-polling client sees, to the end."""
    seen = [(await client.get(f"/jobs/{job_id}?redirect=0")).json()]
    while seen[-1]["status"] not in ("succeeded", "failed", "cancelled"):
        seen.append((await client.get(f"/jobs/{job_id}?wait=10&after={seen[-1]['seq']}")).json())
    return [d for i, d in enumerate(seen) if i == 0 or d["seq"] != seen[i - 1]["seq"]]


async def ws_watch(url: str, job_id: str, headers: dict[str, str] | None = None) -> list[dict]:
    docs = []
    async with connect(url.replace("http", "ws") + "/ws", additional_headers=headers) as ws:
        await ws.send(json.dumps({"op": "subscribe", "jobs": [job_id]}))
        while not docs or docs[-1]["status"] not in ("succeeded", "failed", "cancelled"):
            message = json.loads(await ws.recv())
            if message.get("job", {}).get("id") == job_id:
                docs.append(message["job"])
    return docs


async def test_a_group_is_watched_like_a_job_on_every_transport(own_redis, tmp_path):
    server = start_server(own_redis.url, tmp_path)
    worker = start_worker(own_redis.url, tmp_path, progress_interval=0, worker_concurrency=5)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            group = await submit_group(client, FIVE)
            assert group["type"] == "group" and group["status"] == "queued" and group["token"]
            assert [c["weight"] for c in group["children"]] == [1, 3, 2, 0.5, 1]
            sse, ws, polled = await asyncio.gather(
                watch_sse(client, server.url + group["links"]["events"]), ws_watch(server.url, group["id"]), long_poll(client, group["id"])
            )
            for docs in ([json.loads(e.data) for e in sse], ws, polled):
                assert_group_stream_ok(docs, "succeeded")
            assert len(sse) > 10  # it followed the children's progress, not only their ends
            final = (await client.get(group["links"]["self"] + "?redirect=0")).json()
            assert {c["status"] for c in final["children"]} == {"succeeded"}
            answer = await client.get(group["links"]["self"])
            assert answer.status_code == 303 and answer.headers["location"].endswith("/result")
            assert [c["id"] for c in (await client.get(group["links"]["result"])).json()] == [c["id"] for c in group["children"]]
            child = (await client.get(f"/jobs/{group['children'][1]['id']}?redirect=0")).json()
            assert child["parent"] == group["id"] and child["status"] == "succeeded"
            text = await client.get(group["links"]["self"], headers={"Accept": "text/plain"})
            assert "100%" in text.text and "succeeded" in text.text
    finally:
        worker.stop()
        server.stop()


async def test_a_killed_worker_loses_nothing_of_a_group(own_redis, tmp_path):
    """SIGKILL the worker mid-group: its children run again on another worker within a lease, and
    the group ends succeeded, its progress never going back."""
    server = start_server(own_redis.url, tmp_path)
    first = start_worker(own_redis.url, tmp_path, "first", lease=1.5, worker_concurrency=5)
    second = None
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            slow = [{"type": "demo", "params": {"steps": 10, "interval": 0.2}, "weight": w} for w in (1, 2, 3)]
            group = await submit_group(client, slow)
            watching = asyncio.create_task(watch_sse(client, server.url + group["links"]["events"]))

            async def running() -> bool:
                doc = (await client.get(group["links"]["self"])).json()
                return doc["status"] == "running" and (doc["progress"] or 0) > 5

            await async_wait_until(running, 10, "the group to be under way")
            first.stop(signal.SIGKILL)
            second = start_worker(own_redis.url, tmp_path, "second", lease=1.5, worker_concurrency=5)
            docs = [json.loads(e.data) for e in await asyncio.wait_for(watching, 60)]
            assert_group_stream_ok(docs, "succeeded")
            for child in docs[-1]["children"]:
                attempts = (await client.get(f"/jobs/{child['id']}?redirect=0")).json()["attempts"]
                assert [a["outcome"] for a in attempts] == ["lost", "succeeded"], attempts
    finally:
        for proc in (second, first, server):
            if proc is not None:
                proc.stop()


async def test_cancelling_a_group_cancels_its_children(own_redis, tmp_path):
    server = start_server(own_redis.url, tmp_path)
    worker = start_worker(own_redis.url, tmp_path, worker_concurrency=1)  # one runs, the others wait
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            group = await submit_group(client, [{"type": "demo", "params": {"steps": 50, "interval": 0.2}}] * 3)
            watching = asyncio.create_task(watch_sse(client, server.url + group["links"]["events"]))

            async def running() -> bool:
                return (await client.get(group["links"]["self"])).json()["status"] == "running"

            await async_wait_until(running, 10, "a child to run")
            answer = await client.delete(group["links"]["self"])
            assert answer.status_code == 202
            docs = [json.loads(e.data) for e in await asyncio.wait_for(watching, 30)]
            assert docs[-1]["status"] == "cancelled" and [d["status"] for d in docs].count("cancelled") == 1
            assert {c["status"] for c in docs[-1]["children"]} == {"cancelled"}
            assert (await client.delete(group["links"]["self"])).status_code == 409
            assert (await client.post(group["links"]["self"] + "/retry")).status_code == 409
    finally:
        worker.stop()
        server.stop()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"group": []}, "group"),
        ({"group": "x"}, "group"),
        ({"group": [{"type": "demo"}] * 101}, "group"),
        ({"group": [{"type": "demo"}, {"type": "nope"}]}, "group[1].type"),
        ({"group": [{"type": "demo", "params": {"steps": 0}}]}, "group[0].params.steps"),
        ({"group": [{"type": "demo", "weight": 0}]}, "group[0].weight"),
        ({"group": [{"type": "demo", "weight": True}]}, "group[0].weight"),
        ({"group": [{"type": "demo", "colour": "red"}]}, "group[0].colour"),
        ({"group": [{"type": "demo"}], "webhook": "https://example.com/hook"}, "webhook"),
        ({"group": [{"type": "demo"}], "priority": 10}, "priority"),
    ],
)
async def test_a_bad_group_is_refused_naming_the_field_and_creates_nothing(base, redis_client, body, field):
    async with httpx.AsyncClient(base_url=base) as client:
        before = redis_client.zcard("progress:jobs:")
        answer = await client.post("/jobs", json=body)
        assert answer.status_code == 422, answer.text
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.json()["errors"][0]["field"] == field
        assert redis_client.zcard("progress:jobs:") == before


async def test_a_groups_jobs_are_listed_page_by_page_each_once(own_redis, tmp_path):
    """The group and its children are created in one step; ``GET /jobs`` still pages through each."""
    server = start_server(own_redis.url, tmp_path)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            group = await submit_group(client, [{"type": "demo"}] * 30)
            seen, cursor = [], 0
            while cursor is not None:
                page = (await client.get(f"/jobs?limit=7&cursor={cursor}")).json()
                seen += [item["id"] for item in page["items"]]
                cursor = page["next"]
            assert seen[0] == group["id"] and sorted(seen[1:]) == sorted(c["id"] for c in group["children"])
            assert (await client.get("/jobs?queue=default&limit=100")).json()["items"][0]["parent"] == group["id"]
    finally:
        server.stop()


async def test_a_fail_fast_group_fails_at_once_and_cancels_the_rest(own_redis, tmp_path):
    server = start_server(own_redis.url, tmp_path)
    worker = start_worker(own_redis.url, tmp_path, worker_concurrency=2)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            members = [
                {"type": "demo", "params": {"steps": 50, "interval": 0.2}},
                {"type": "demo", "params": {"steps": 5, "interval": 0.05, "fail_at_step": 2}},
                {"type": "demo", "params": {"steps": 50, "interval": 0.2}},  # queued behind the other two
            ]
            group = await submit_group(client, members, fail_fast=True)
            docs = [json.loads(e.data) for e in await asyncio.wait_for(watch_sse(client, server.url + group["links"]["events"]), 20)]
            assert docs[-1]["status"] == "failed" and docs[-1]["progress"] < 100
            ids = [c["id"] for c in group["children"]]

            stopped = await async_wait_until(lambda: ended_states(client, ids), 20, "the other children to stop")
            assert stopped == ["cancelled", "failed", "cancelled"]
    finally:
        worker.stop()
        server.stop()


async def test_a_groups_watch_token_reads_its_children_and_nothing_else(own_redis, tmp_path):
    """With API keys: the token the group's 202 carries reads the group and each of its children
    (status, SSE, a WebSocket), not another job of the same tenant."""
    key = "acme-key-000001"
    server = start_server(own_redis.url, tmp_path, api_keys=f"acme:{key}")
    worker = start_worker(own_redis.url, tmp_path)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            owner = {"Authorization": f"Bearer {key}"}
            answer = await client.post("/jobs", json={"group": [{"type": "demo", "params": {"steps": 3, "interval": 0.05}}] * 2}, headers=owner)
            group = answer.json()
            other = (await client.post("/jobs", json={"type": "demo"}, headers=owner)).json()
            token = {"Authorization": f"Bearer {group['token']}"}
            child = group["children"][0]["id"]
            assert (await client.get(f"/jobs/{child}?redirect=0", headers=token)).json()["parent"] == group["id"]
            assert (await client.get(f"/jobs/{other['id']}", headers=token)).status_code == 404
            events = await watch_sse(client, f"{server.url}/jobs/{child}/events", headers=token)
            assert json.loads(events[-1].data)["status"] == "succeeded"
            async with connect(server.url.replace("http", "ws") + "/ws", additional_headers=token) as ws:
                await ws.send(json.dumps({"op": "subscribe", "jobs": [group["children"][1]["id"], other["id"]]}))
                seen = [json.loads(await ws.recv()) for _ in range(2)]
            jobs = [m["job"]["id"] for m in seen if isinstance(m.get("job"), dict)]
            errors = [m for m in seen if m.get("job") == other["id"] and m.get("status") == 404]
            assert jobs == [group["children"][1]["id"]] and len(errors) == 1, seen
    finally:
        worker.stop()
        server.stop()
