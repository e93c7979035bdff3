"""The worker beside its peers (issue 19): stock arq, SAQ and Dramatiq on the same no-op job,
measured exactly as ``bench.queue`` measures ours (jobs queued ahead in a fresh Valkey without
persistence, then one worker process; jobs/s, worker CPU, Redis CPU and Redis commands per job
between 10% and 90% done), one after the other in one session, order alternated per round.

Each peer gets a virtualenv of its own under ``bench/results/peers/`` with the exact versions in
``PEERS`` (made on first use), and a jobs module written beside it. Default settings, except
where a peer's default would measure its idling rather than its work: stock arq polls every
``poll_delay=0.01`` s (its default 0.5 s would leave the worker asleep between polls).

    .venv/bin/python -m bench.peers                         # c10 and c50, 4,000 jobs, 2 rounds
    .venv/bin/python -m bench.peers --only saq,ours --concurrency 10 --rounds 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import venv
from dataclasses import dataclass
from pathlib import Path

import redis as redis_sync

from bench.procs import machine_facts
from bench.queue import RESULTS, Ours, measure, median_of

HOME = RESULTS / "peers"

PEERS = {  # name: (pip requirements, jobs module, worker command, enqueue snippet)
    "arq": (
        ["arq==0.28.0", "redis[hiredis]==5.3.1"],
        """
import os
from arq.connections import RedisSettings

async def noop(ctx):
    return None

class WorkerSettings:
    functions = [noop]
    redis_settings = RedisSettings.from_dsn(os.environ["REDIS_URL"])
    max_jobs = int(os.environ["CONCURRENCY"])
    poll_delay = 0.01
    keep_result = 0
""",
        ["arq", "peer_jobs.WorkerSettings"],
        """
import asyncio, os
from arq import create_pool
from peer_jobs import WorkerSettings

async def main(n):
    pool = await create_pool(WorkerSettings.redis_settings)
    for start in range(0, n, 500):
        await asyncio.gather(*(pool.enqueue_job("noop") for _ in range(min(500, n - start))))
    await pool.aclose()

asyncio.run(main(int(os.environ["N"])))
""",
    ),
    "saq": (
        ["saq[hiredis]==0.26.4", "typing_extensions"],
        """
import os
from saq import Queue

queue = Queue.from_url(os.environ["REDIS_URL"])

async def noop(ctx):
    return None

settings = {"queue": queue, "functions": [noop], "concurrency": int(os.environ["CONCURRENCY"])}
""",
        ["saq", "peer_jobs.settings"],
        """
import asyncio, os
from peer_jobs import queue

async def main(n):
    await queue.connect()
    for start in range(0, n, 500):
        await asyncio.gather(*(queue.enqueue("noop") for _ in range(min(500, n - start))))
    await queue.disconnect()

asyncio.run(main(int(os.environ["N"])))
""",
    ),
    "dramatiq": (
        ["dramatiq[redis]==2.2.1", "redis[hiredis]==5.3.1"],
        """
import os
import dramatiq
from dramatiq.brokers.redis import RedisBroker

dramatiq.set_broker(RedisBroker(url=os.environ["REDIS_URL"]))

@dramatiq.actor(max_retries=0)
def noop():
    return None
""",
        ["dramatiq", "peer_jobs", "--processes", "1", "--threads", "{concurrency}"],
        """
import os
from peer_jobs import noop

for _ in range(int(os.environ["N"])):
    noop.send()
""",
    ),
}


@dataclass
class Peer:
    """A peer queue's worker, run from its own virtualenv."""

    name: str

    @property
    def home(self) -> Path:
        return HOME / self.name

    def setup(self) -> None:
        requirements, jobs, _, _ = PEERS[self.name]
        marker = self.home / "installed.txt"
        if not marker.exists() or marker.read_text() != "\n".join(requirements):
            print(f"  installing {self.name}: {' '.join(requirements)}", flush=True)
            venv.create(self.home / "venv", with_pip=True, clear=True)
            subprocess.run([str(self.home / "venv" / "bin" / "pip"), "install", "-q", *requirements], check=True)
            marker.write_text("\n".join(requirements))
        (self.home / "peer_jobs.py").write_text(jobs.lstrip())

    def enqueue(self, url: str, n: int) -> None:
        env = {"REDIS_URL": url, "N": str(n), "CONCURRENCY": "1", "PYTHONPATH": str(self.home)}
        subprocess.run([str(self.home / "venv" / "bin" / "python"), "-c", PEERS[self.name][3]], env=env, check=True, cwd=self.home)

    def remaining(self, client: redis_sync.Redis) -> int:
        if self.name == "arq":
            return client.zcard("arq:queue")
        if self.name == "saq":
            return client.zcard("saq:default:incomplete")
        return client.hlen("dramatiq:default.msgs")

    def worker(self, url: str, concurrency: int) -> tuple[list[str], dict[str, str], Path]:
        command = [part.format(concurrency=concurrency) for part in PEERS[self.name][2]]
        argv = [str(self.home / "venv" / "bin" / command[0]), *command[1:]]
        return argv, {"REDIS_URL": url, "CONCURRENCY": str(concurrency), "PYTHONPATH": str(self.home)}, self.home


def version_of(system: object) -> str:
    if isinstance(system, Peer):
        return " ".join(PEERS[system.name][0])
    return f"progress-server {machine_facts()['git']}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="ours,arq,saq,dramatiq", help="comma-separated systems (default ours,arq,saq,dramatiq)")
    p.add_argument("--jobs", type=int, default=4000, help="jobs queued ahead per run (default 4000)")
    p.add_argument("--concurrency", default="10,50", help="comma-separated concurrency values (default 10,50)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each system per concurrency; medians reported (default 2)")
    a = p.parse_args(argv)
    systems = [Ours() if name == "ours" else Peer(name) for name in a.only.split(",")]
    for system in systems:
        if isinstance(system, Peer):
            system.setup()
    run_id = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    logs = RESULTS / "logs" / f"peers-{run_id}"
    logs.mkdir(parents=True, exist_ok=True)
    facts = machine_facts()
    print(f"bench.peers {run_id} at {facts['git']}: {a.jobs} jobs per run, {a.rounds} rounds", flush=True)
    for concurrency in (int(c) for c in a.concurrency.split(",")):
        runs: dict[str, list[dict]] = {s.name: [] for s in systems}
        for round_ in range(a.rounds):
            for system in systems if round_ % 2 == 0 else systems[::-1]:
                runs[system.name].append(measure(system, concurrency, a.jobs, logs))
        for system in systems:
            med = median_of(runs[system.name])
            print(
                f"  c{concurrency} {system.name:16} {med['jobs_per_s']:7,.0f} jobs/s  worker {med['worker_us_per_job']:6.0f} µs/job "
                f"({med['worker_cores']} core)  redis {med['redis_us_per_job']:5.0f} µs/job  {med['redis_commands_per_job']} commands/job",
                flush=True,
            )
            record = {"run": run_id, "ts": datetime.datetime.now().isoformat(timespec="seconds"), "scenario": "queue-peers",
                      "system": system.name, "version": version_of(system), "concurrency": concurrency, "jobs": a.jobs,
                      **med, "each_run": runs[system.name], "machine": facts}  # fmt: skip
            with open(RESULTS / "results.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
