"""The worker's side (issue 19): jobs/s and the cost of one job and of one ``ctx.progress()``.

For each concurrency: ``--jobs`` no-op jobs (``bench_noop``) are queued ahead through
``Store.create`` (what ``POST /jobs`` calls) in a fresh Valkey without persistence, then one
``python -m worker`` (default logging, as shipped, to a file) runs them. Measured between 10% and
90% of the jobs done (no start-up, no tail), from /proc and Redis's INFO: jobs/s, worker CPU per
job, Redis CPU per job, Redis commands per job. Then the same with ``bench_progress`` jobs that
publish ``--steps`` progress updates each (``PROGRESS_INTERVAL=0``): the worker CPU of one
published ``ctx.progress()`` is the difference per update. Each figure is the median of
``--repeat`` runs. Every record goes to ``bench/results/results.jsonl`` (scenario ``queue``).

    .venv/bin/python -m bench.queue                       # c10 and c50, 5,000 jobs, 3 runs each
    .venv/bin/python -m bench.queue --concurrency 10 --repeat 1 --jobs 2000
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis as redis_sync
from redis.asyncio import Redis

from bench.procs import CLK_TCK, ROOT, _child_setup, cpu_ticks, machine_facts
from core import queue
from core.devredis import RedisProcess
from core.settings import Settings
from core.store import Store

RESULTS = ROOT / "bench" / "results"


def commands(client: redis_sync.Redis) -> int:
    return int(client.info("stats")["total_commands_processed"])


async def enqueue(url: str, job_type: str, params: dict[str, Any], n: int) -> None:
    redis = Redis.from_url(url)
    try:
        store = Store(redis, Settings.from_env())
        for start in range(0, n, 500):  # one pipeline per 500 (Store batches one loop turn)
            await asyncio.gather(*(store.create(job_type, params) for _ in range(min(500, n - start))))
    finally:
        await redis.aclose()


def tree_ticks(pid: int) -> int:
    """CPU ticks of ``pid`` and every process below it (a worker CLI may fork its workers)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    parents[int(entry)] = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, grew = {pid}, True
    while grew:
        below = {child for child, parent in parents.items() if parent in tree} - tree
        tree |= below
        grew = bool(below)
    return sum(cpu_ticks(p) for p in tree)


@dataclass
class Ours:
    """This project's worker (``python -m worker``) running ``job_type`` jobs."""

    job_type: str = "bench_noop"
    params: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    name: str = "progress-server"

    def enqueue(self, url: str, n: int) -> None:
        asyncio.run(enqueue(url, self.job_type, self.params, n))

    def remaining(self, client: redis_sync.Redis) -> int:
        return client.zcard(queue.queue_key(queue.DEFAULT))

    def worker(self, url: str, concurrency: int) -> tuple[list[str], dict[str, str], Path]:
        env = {"REDIS_URL": url, "JOBS_MODULE": "worker.demo,bench.jobs", "PYTHONPATH": str(ROOT),
               "WORKER_CONCURRENCY": str(concurrency), **self.env}  # fmt: skip
        return [sys.executable, "-m", "worker"], env, ROOT


def measure(system: Any, concurrency: int, n: int, logs: Path) -> dict[str, Any]:
    """``n`` jobs queued ahead in a fresh Valkey, then one worker of ``system``; the figures
    between 10% and 90% of the jobs done."""
    tmp = Path(tempfile.mkdtemp(prefix="progress-queue-bench-"))
    redis = RedisProcess(tmp / "redis", appendonly=False).start()
    worker = None
    try:
        system.enqueue(redis.url, n)
        client = redis_sync.Redis.from_url(redis.url)
        assert system.remaining(client) == n, f"{system.name}: {system.remaining(client)} of {n} jobs queued"
        argv, extra, cwd = system.worker(redis.url, concurrency)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")} | {"PYTHONUNBUFFERED": "1"} | extra
        log = open(logs / f"worker-{system.name}-c{concurrency}-{time.monotonic_ns()}.log", "wb")
        worker = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_child_setup)
        log.close()
        marks: dict[str, tuple[float, int, int, int, int]] = {}
        polls = 0
        deadline = time.monotonic() + 300
        while len(marks) < 2:
            left = system.remaining(client)
            polls += 1
            done = n - left
            for name, at in (("start", n // 10), ("end", n - n // 10)):
                if name not in marks and done >= at:
                    marks[name] = (time.monotonic(), done, tree_ticks(worker.pid), cpu_ticks(redis.proc.pid), commands(client) - polls)
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{system.name}: worker exited or stalled with {left} jobs left (log in {logs})")
            time.sleep(0.005)
        (t0, d0, w0, r0, c0), (t1, d1, w1, r1, c1) = marks["start"], marks["end"]
        jobs = d1 - d0
        to_us = 1e6 / CLK_TCK / jobs
        return {
            "jobs_per_s": round(jobs / (t1 - t0)),
            "worker_us_per_job": round((w1 - w0) * to_us),
            "redis_us_per_job": round((r1 - r0) * to_us),
            "redis_commands_per_job": round((c1 - c0) / jobs, 1),
            "worker_cores": round((w1 - w0) / CLK_TCK / (t1 - t0), 2),
        }
    finally:
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(10)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        redis.stop()


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {key: round(statistics.median(r[key] for r in runs), 2) for key in runs[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=5000, help="jobs queued ahead per run (default 5000)")
    p.add_argument("--concurrency", default="10,50", help="comma-separated WORKER_CONCURRENCY values (default 10,50)")
    p.add_argument("--repeat", type=int, default=3, help="runs per figure; the median is reported (default 3)")
    p.add_argument("--steps", type=int, default=20, help="progress updates per job in the progress runs (default 20; 0: skip)")
    p.add_argument("--log-level", default="info", help="the worker's LOG_LEVEL (default info, as shipped)")
    a = p.parse_args(argv)
    run_id = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    logs = RESULTS / "logs" / f"queue-{run_id}"
    logs.mkdir(parents=True, exist_ok=True)
    facts = machine_facts()
    env = {"LOG_LEVEL": a.log_level}
    print(f"bench.queue {run_id} at {facts['git']}: {a.jobs} jobs per run, median of {a.repeat}", flush=True)
    for concurrency in (int(c) for c in a.concurrency.split(",")):
        noop, progress = [], []
        for _ in range(a.repeat):  # alternated, so a drift of the machine's speed hits both alike
            noop.append(measure(Ours(env=env), concurrency, a.jobs, logs))
            if a.steps:
                progressing = Ours("bench_progress", {"steps": a.steps}, {**env, "PROGRESS_INTERVAL": "0"})
                progress.append(measure(progressing, concurrency, a.jobs // 4, logs))
        rec = {"scenario": "queue", "concurrency": concurrency, "jobs": a.jobs, "runs": a.repeat, "log_level": a.log_level, **median_of(noop)}
        if progress:
            with_progress = median_of(progress)
            rec["worker_us_per_progress"] = round((with_progress["worker_us_per_job"] - rec["worker_us_per_job"]) / a.steps, 1)
            rec["redis_us_per_progress"] = round((with_progress["redis_us_per_job"] - rec["redis_us_per_job"]) / a.steps, 1)
            rec["progress_jobs_per_s"] = with_progress["jobs_per_s"]
        print(
            f"  c{concurrency}: {rec['jobs_per_s']:,.0f} jobs/s  worker {rec['worker_us_per_job']} µs/job ({rec['worker_cores']} core)  "
            f"redis {rec['redis_us_per_job']} µs/job, {rec['redis_commands_per_job']} commands/job"
            + (f"  progress: worker {rec['worker_us_per_progress']} µs, redis {rec['redis_us_per_progress']} µs each" if progress else ""),
            flush=True,
        )
        record = {"run": run_id, "ts": datetime.datetime.now().isoformat(timespec="seconds"), **rec,
                  "each_run": {"noop": noop, "progress": progress}, "machine": facts}  # fmt: skip
        with open(RESULTS / "results.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
