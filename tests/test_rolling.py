"""Rolling deploys: a job of a type that a worker does not run waits for one that does.

Real processes: a Redis, a server that accepts the tests' job types, an "old" worker that runs
only the shipped demo type (JOBS_MODULE=worker.demo) and, later, a "new" one that runs both.
"""

from __future__ import annotations

import httpx
import pytest

from core.devredis import RedisProcess
from support import start_server, start_worker, wait_until

OLD = {"jobs_module": "worker.demo", "progress_interval": 0}


def status(client: httpx.Client, server, job: dict) -> dict:
    return client.get(server.url + job["links"]["self"], params={"redirect": 0}).json()


@pytest.fixture
def redis_server(tmp_path):
    server = RedisProcess(tmp_path / "redis").start()
    yield server
    server.stop()


def test_unknown_type_waits_for_a_worker_that_runs_it(redis_server, tmp_path):
    """The old worker puts the job back (no attempt counted, never failed); the new one runs it."""
    procs = [old := start_worker(redis_server.url, tmp_path, "old", **OLD)]
    try:
        procs.append(server := start_server(redis_server.url, tmp_path))
        with httpx.Client(timeout=10) as client:
            listed = client.get(server.url + "/workers").json()["items"]
            assert [w["types"] for w in listed] == [["batch", "demo"]]
            assert listed[0]["concurrency"] == 10 and listed[0]["running"] == 0 and listed[0]["beat_at"]
            r = client.post(server.url + "/jobs", json={"type": "echo", "params": {"message": "hi"}})
            assert r.status_code == 202, r.text
            job = r.json()
            assert job["message"] == "waiting for a worker that runs type 'echo'"
            wait_until(lambda: "type 'echo' is not run here" in old.log(), what="the old worker to put the job back")
            waiting = status(client, server, job)
            assert (waiting["status"], waiting["attempt"]) == ("queued", 0), waiting
            assert waiting["message"] == "waiting for a worker that runs type 'echo'"
            procs.append(start_worker(redis_server.url, tmp_path, "new", progress_interval=0))
            done = wait_until(
                lambda: (d := status(client, server, job))["status"] in ("succeeded", "failed") and d, timeout=20, what="the job to end"
            )
            assert (done["status"], done["attempt"], done["error"]) == ("succeeded", 1, None), done
            types = sorted(tuple(w["types"]) for w in client.get(server.url + "/workers").json()["items"])
            ours = tuple(t["name"] for t in client.get(server.url + "/job-types").json()["items"])  # the tests' own types
            assert types == [ours, ("batch", "demo")]  # the new worker runs them all, the old one only the shipped demos
            procs[-1].stop()  # a worker that stops cleanly leaves the list at once
            assert [w["types"] for w in client.get(server.url + "/workers").json()["items"]] == [["batch", "demo"]]
    finally:
        for proc in procs:
            proc.stop()
    assert "Traceback" not in old.log() and "not JSON serializable" not in old.log()


def test_unknown_type_fails_after_the_grace(redis_server, tmp_path):
    """No worker runs the type within UNKNOWN_TYPE_GRACE: the job ends failed, with a clear error."""
    procs = [old := start_worker(redis_server.url, tmp_path, "old", unknown_type_grace=1, **OLD)]
    try:
        procs.append(server := start_server(redis_server.url, tmp_path))
        with httpx.Client(timeout=10) as client:
            job = client.post(server.url + "/jobs", json={"type": "echo", "params": {"message": "hi"}}).json()
            done = wait_until(lambda: (d := status(client, server, job))["status"] == "failed" and d, timeout=20, what="failed")
    finally:
        for proc in procs:
            proc.stop()
    assert done["attempt"] == 0
    assert done["error"]["type"] == "UnknownJobType"
    assert done["error"]["message"] == "no worker that runs type 'echo' took this job within 1 s"
    assert "Traceback" not in old.log()
