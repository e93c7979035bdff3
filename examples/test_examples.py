"""Tests of the example jobs, the way a job author writes them: ``run_job`` on a real stack."""

from __future__ import annotations

import pytest

from examples.convert import STAGES
from client import InvalidRequest
from worker.testing import JobRun


def assert_rose_in_order(run: JobRun, stages: list[str]) -> None:
    """seq strictly rising, progress never going back, stages in their declared order, 100 at the end."""
    seqs = [d["seq"] for d in run]
    assert seqs == sorted(set(seqs)), seqs
    progress = [d["progress"] or 0 for d in run]
    assert progress == sorted(progress) and progress[-1] == 100, progress
    seen = [d["stage"] for d in run if d["stage"]]
    assert seen == sorted(seen, key=stages.index), seen


def test_convert_goes_through_its_stages_to_the_result(progress_stack):
    run = progress_stack.run_job("convert", {"rows": 3000, "chunk_rows": 300, "delay": 0.02})
    assert run[0]["status"] == "queued"
    assert run.final["status"] == "succeeded"
    assert_rose_in_order(run, list(STAGES))
    assert "convert" in {d["stage"] for d in run}  # the long stage is seen while it runs
    assert run.result["rows"] == 3000 and run.result["skipped"] == 0
    assert run.result["bytes_out"] < run.result["bytes_in"] and len(run.result["sha256"]) == 64


def test_convert_skips_bad_rows_or_fails_on_them_when_strict(progress_stack):
    lenient = progress_stack.run_job("convert", {"rows": 1000, "corrupt_every": 100})
    assert lenient.result["rows"] == 990 and lenient.result["skipped"] == 10

    strict = progress_stack.run_job("convert", {"rows": 1000, "corrupt_every": 100, "strict": True})
    final = strict.final
    assert final["status"] == "failed" and final["attempt"] == 2  # max_tries=2: it was retried once
    assert final["error"]["type"] == "ValueError" and final["error"]["message"].startswith("row 100:")
    assert strict.result is None


def test_convert_refuses_bad_params(progress_stack):
    with pytest.raises(InvalidRequest) as refused:
        progress_stack.run_job("convert", {"rows": 0})
    assert refused.value.errors[0]["field"] == "params.rows"


def test_primes_counts_from_a_thread(progress_stack):
    run = progress_stack.run_job("primes", {"below": 1_000_000, "segments": 20})
    assert run.final["status"] == "succeeded"
    assert_rose_in_order(run, ["base", "sieve"])
    assert run.result == {"below": 1_000_000, "count": 78498, "largest": 999983}


def test_primes_stops_when_cancelled(progress_stack):
    client = progress_stack.client
    job = client.submit("primes", {"below": 10_000_000_000, "segments": 10_000})  # about half a minute
    cancelled = False
    for doc in client.watch(job["id"], timeout=30):
        if not cancelled and doc["status"] == "running" and (doc["progress"] or 0) > 2:
            assert client.cancel(job["id"])["status"] == "running"  # 202: the worker is told to stop
            cancelled = True
    assert doc["status"] == "cancelled" and doc["progress"] < 100
