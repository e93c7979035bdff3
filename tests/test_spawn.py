"""Children spawned by job code (``ctx.spawn`` / ``ctx.wait``, async and in a thread): the parent's
document lists them and shows its own progress and theirs by weight; a failed child, a cancel, a
killed worker and a retry lose nothing, run nothing twice and leave nothing running. Real servers
and workers, each test with a Redis of its own."""

from __future__ import annotations

import asyncio
import json
import signal

import httpx
import pytest

from support import async_wait_until, ended_states, start_server, start_worker, watch_sse
from test_groups import ws_watch

pytestmark = pytest.mark.anyio

THREE = [  # (demo: `steps` reports of `interval` s each)
    {"params": {"steps": 4, "interval": 0.05}, "weight": 1},
    {"params": {"steps": 10, "interval": 0.05}, "weight": 3},
    {"params": {"steps": 6, "interval": 0.1}, "weight": 2},
]


async def submit(client: httpx.AsyncClient, job_type: str, params: dict, **kwargs) -> dict:
    answer = await client.post("/jobs", json={"type": job_type, "params": params}, **kwargs)
    assert answer.status_code == 202, answer.text
    return answer.json()


async def document(client: httpx.AsyncClient, job_id: str, **kwargs) -> dict:
    return (await client.get(f"/jobs/{job_id}?redirect=0", **kwargs)).json()


def assert_stream_ok(docs: list[dict], final: str) -> None:
    """Seqs rise, progress never goes back, the final state comes once, last."""
    seqs = [d["seq"] for d in docs]
    assert seqs == sorted(set(seqs)), seqs
    shown = [d["progress"] for d in docs if d["progress"] is not None]
    assert shown == sorted(shown), shown
    assert [d["status"] for d in docs].count(final) == 1 and docs[-1]["status"] == final


@pytest.mark.parametrize("kind", ["fanout", "fanout_sync"])
async def test_a_job_spawns_children_waits_for_them_and_shows_their_progress(own_redis, tmp_path, kind):
    """Its own part never moves (no report of its own): every step of its bar is its children's,
    by weight. Its watch token reads them too (API keys on)."""
    key = "acme-key-000001"
    server = start_server(own_redis.url, tmp_path, api_keys=f"acme:{key}")
    worker = start_worker(own_redis.url, tmp_path, progress_interval=0, worker_concurrency=5)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30, headers={"Authorization": f"Bearer {key}"}) as client:
            job = await submit(client, kind, {"children": THREE})
            token = {"Authorization": f"Bearer {job['token']}"}
            sse, ws = await asyncio.gather(
                watch_sse(client, server.url + job["links"]["events"], headers=token), ws_watch(server.url, job["id"], token)
            )
            for docs in ([json.loads(e.data) for e in sse], ws):
                assert_stream_ok(docs, "succeeded")
                assert docs[-1]["progress"] == 100
                moving = [d["progress"] for d in docs if d["status"] == "running" and d["progress"]]
                assert len(moving) > 5 and max(moving) <= 100 * 6 / 7, moving  # theirs (6 of 7 by weight), not its own
            final = await document(client, job["id"])
            assert [(c["type"], c["weight"], c["status"]) for c in final["children"]] == [("demo", w, "succeeded") for w in (1, 3, 2)]
            assert (await client.get(job["links"]["result"])).json() == {"results": [{"steps": 4}, {"steps": 10}, {"steps": 6}]}
            for child in final["children"]:
                seen = await document(client, child["id"], headers=token)
                assert seen["parent"] == job["id"] and seen["status"] == "succeeded" and seen["attempt"] == 1
            listed = (await client.get("/jobs?limit=100")).json()["items"]
            assert sorted(item["id"] for item in listed) == sorted([job["id"], *(c["id"] for c in final["children"])])
    finally:
        worker.stop()
        server.stop()


async def test_its_own_progress_counts_by_its_weight_and_its_end_waits_for_its_children(own_redis, tmp_path):
    """Own weight 3, one child of weight 1: its own part done is 75%; it returns without waiting,
    and ends succeeded only once its child has."""
    server = start_server(own_redis.url, tmp_path)
    worker = start_worker(own_redis.url, tmp_path, progress_interval=0)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            child = {"params": {"steps": 30, "interval": 0.05}, "weight": 1}
            job = await submit(client, "fanout", {"children": [child], "own_steps": 5, "own_weight": 3, "wait": False})
            docs = [json.loads(e.data) for e in await watch_sse(client, server.url + job["links"]["events"])]
            assert_stream_ok(docs, "succeeded")
            after_own = [d["progress"] for d in docs if d["status"] == "running" and d.get("children", [{}])[0].get("status") == "running"]
            assert after_own and 75 <= after_own[-1] < 100, after_own
            kid = await document(client, docs[-1]["children"][0]["id"])
            assert kid["status"] == "succeeded" and kid["finished_at"] <= docs[-1]["finished_at"]
            assert (await client.get(job["links"]["result"])).json() == {"spawned": [kid["id"]]}
    finally:
        worker.stop()
        server.stop()


async def test_a_failed_child_fails_its_parent_and_the_others_are_cancelled(own_redis, tmp_path):
    server = start_server(own_redis.url, tmp_path)
    worker = start_worker(own_redis.url, tmp_path, worker_concurrency=4)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            failing = {"params": {"steps": 5, "interval": 0.05, "fail_at_step": 2}}
            slow = {"params": {"steps": 100, "interval": 0.1}}
            job = await submit(client, "fanout", {"children": [slow, failing, slow]})
            docs = [json.loads(e.data) for e in await watch_sse(client, server.url + job["links"]["events"])]
            assert docs[-1]["status"] == "failed" and docs[-1]["error"]["type"] == "ChildFailed", docs[-1]
            assert docs[-1]["children"][1]["id"] in docs[-1]["error"]["message"]

            children = [c["id"] for c in docs[-1]["children"]]
            stopped = await async_wait_until(lambda: ended_states(client, children), 10, "the other children to stop")
            assert stopped == ["cancelled", "failed", "cancelled"]
    finally:
        worker.stop()
        server.stop()


async def test_cancelling_a_parent_cancels_its_children(own_redis, tmp_path):
    server = start_server(own_redis.url, tmp_path)
    worker = start_worker(own_redis.url, tmp_path, worker_concurrency=2)  # the parent and one child run, one waits
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            slow = {"params": {"steps": 100, "interval": 0.1}}
            job = await submit(client, "fanout_sync", {"children": [slow, slow]})

            async def under_way() -> dict | None:
                doc = await document(client, job["id"])
                return doc if [c["status"] for c in doc.get("children", [])] == ["running", "queued"] else None

            children = (await async_wait_until(under_way, 10, "a child to run"))["children"]
            assert (await client.delete(f"/jobs/{job['id']}")).status_code == 202

            family = [job["id"], *(c["id"] for c in children)]
            stopped = await async_wait_until(lambda: ended_states(client, family), 10, "the parent and its children to stop")
            assert stopped == ["cancelled"] * 3
    finally:
        worker.stop()
        server.stop()


async def test_cancelling_a_parent_queued_for_its_retry_cancels_its_children(own_redis, tmp_path):
    """It failed once and waits for its retry (queued: the server cancels it at once, 200), its
    child still running: the child is told to stop too."""
    server = start_server(own_redis.url, tmp_path)
    worker = start_worker(own_redis.url, tmp_path, worker_concurrency=2)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            job = await submit(client, "fanout_retried", {"children": [{"params": {"steps": 100, "interval": 0.1}}], "fail": True})

            async def waiting_for_its_retry() -> dict | None:
                doc = await document(client, job["id"])
                return doc if doc["status"] == "queued" and doc["attempt"] == 1 and doc.get("children") else None

            child = (await async_wait_until(waiting_for_its_retry, 10, "its first attempt to fail"))["children"][0]["id"]
            assert (await document(client, child))["status"] == "running"
            assert (await client.delete(f"/jobs/{job['id']}")).status_code == 200

            assert await async_wait_until(lambda: ended_states(client, [child]), 10, "its child to stop") == ["cancelled"]
    finally:
        worker.stop()
        server.stop()


async def test_a_killed_worker_spawns_nothing_twice(own_redis, tmp_path):
    """SIGKILL the worker mid-run: the parent's next attempt gets back the children its first
    spawned (the same ids, nothing new listed), each run again once, and it ends succeeded."""
    server = start_server(own_redis.url, tmp_path)
    first = start_worker(own_redis.url, tmp_path, "first", lease=1.5, worker_concurrency=5)
    second = None
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            slow = [{"params": {"steps": 10, "interval": 0.2}, "weight": w} for w in (1, 2)]
            job = await submit(client, "fanout", {"children": slow})
            watching = asyncio.create_task(watch_sse(client, server.url + job["links"]["events"]))

            async def under_way() -> dict | None:
                doc = await document(client, job["id"])
                return doc if (doc["progress"] or 0) > 5 else None

            before = [c["id"] for c in (await async_wait_until(under_way, 10, "the children to be under way"))["children"]]
            first.stop(signal.SIGKILL)
            second = start_worker(own_redis.url, tmp_path, "second", lease=1.5, worker_concurrency=5)
            docs = [json.loads(e.data) for e in await asyncio.wait_for(watching, 60)]
            assert_stream_ok(docs, "succeeded")
            assert [a["outcome"] for a in docs[-1]["attempts"]] == ["lost", "succeeded"]
            assert [c["id"] for c in docs[-1]["children"]] == before
            for child in before:
                attempts = (await document(client, child))["attempts"]
                assert [a["outcome"] for a in attempts] == ["lost", "succeeded"], attempts
            assert len((await client.get("/jobs?limit=100")).json()["items"]) == 3
    finally:
        for proc in (second, first, server):
            if proc is not None:
                proc.stop()


async def test_a_retried_parent_runs_again_only_the_child_that_failed(own_redis, tmp_path):
    """A child fails for good (three tries), so the parent fails; POST .../retry: its next attempt
    runs that child (its last spawn, waited for at once) again, its fourth try succeeding, and takes
    the other's result as it was."""
    server = start_server(own_redis.url, tmp_path)
    worker = start_worker(own_redis.url, tmp_path, worker_concurrency=3)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            children = [{"type": "demo", "params": {"steps": 2, "interval": 0.05}}, {"type": "flaky", "params": {"fail_times": 3}}]
            job = await submit(client, "fanout", {"children": children})
            failed = [json.loads(e.data) for e in await watch_sse(client, server.url + job["links"]["events"])][-1]
            assert failed["status"] == "failed" and failed["error"]["type"] == "ChildFailed", failed
            demo, flaky = (c["id"] for c in failed["children"])
            assert (await client.post(f"/jobs/{job['id']}/retry")).status_code == 202
            final = [json.loads(e.data) for e in await watch_sse(client, server.url + job["links"]["events"])][-1]
            assert final["status"] == "succeeded" and final["attempt"] == 2, final
            assert (await client.get(job["links"]["result"])).json() == {"results": [{"steps": 2}, {"attempt": 4}]}
            assert [c["id"] for c in final["children"]] == [demo, flaky]
            assert (await document(client, demo))["attempt"] == 1
    finally:
        worker.stop()
        server.stop()


async def test_the_shipped_batch_type_works_as_the_readme_says(own_redis, tmp_path):
    server = start_server(own_redis.url, tmp_path)
    worker = start_worker(own_redis.url, tmp_path, progress_interval=0)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            job = await submit(client, "batch", {"parts": 3, "interval": 0.01})
            docs = [json.loads(e.data) for e in await watch_sse(client, server.url + job["links"]["events"])]
            assert_stream_ok(docs, "succeeded")
            assert [(c["weight"], c["status"]) for c in docs[-1]["children"]] == [(1, "succeeded"), (2, "succeeded"), (3, "succeeded")]
            assert (await client.get(job["links"]["self"], follow_redirects=True)).json() == {"parts": 3, "steps": 30}
            failing = await submit(client, "batch", {"parts": 2, "interval": 0.01, "fail_part": 2})
            ended = [json.loads(e.data) for e in await watch_sse(client, server.url + failing["links"]["events"])][-1]
            assert ended["error"]["type"] == "DemoFailure" and ended["error"]["message"] == "part 2 failed", ended
    finally:
        worker.stop()
        server.stop()
