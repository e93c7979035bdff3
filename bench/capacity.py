"""Redis CPU per operation of the product's scripts (issue 19, the capacity model).

In a fresh Valkey without persistence, from this process, each operation ``--n`` times through
the product's own code (``Store``), the calls of one loop turn pipelined as the server and the
worker send them; Redis CPU from /proc:

* ``submit``: ``Store.create`` (what ``POST /jobs`` runs: rate count, document, index, queue entry,
  two publishes);
* ``progress/S``: ``Store.write`` of a running job (what ``ctx.progress()`` runs: compare-and-set,
  store, publish) with S server connections subscribed to every job's channel and reading (S = 0,
  1, 4, 16): a server process subscribes once per watched job, however many of its clients
  watch it, so S is the number of server processes whose clients watch the job;
* ``poll``: ``scripts.COUNT`` with the job's event (what ``GET /jobs/{id}`` runs);
* ``group/100``: ``Store.create_group`` of 100 children (what ``POST /jobs`` with ``group`` runs: one
  call), and ``child/100``: ``Store.write`` of a running child of such a group, which renders the
  group's document in the same step (``scripts.ROLLUP_LUA``); compare with ``progress/0``. Also the
  wall time of one group submit alone (``group/100 ms``), one round trip.
* ``spawn``: ``Store.spawn`` (what ``ctx.spawn()`` runs), 100 children per parent, and
  ``spawned/100``: ``Store.write`` of a running one of 100 spawned children, which sums it up in its
  parent's hash in the same step (its parent's worker writes the parent: a ``progress/0`` of its own).

    .venv/bin/python -m bench.capacity            # about a minute
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import redis as redis_sync
from redis.asyncio import Redis

from bench.procs import CLK_TCK, cpu_ticks, machine_facts
from bench.queue import RESULTS
from core import contract, scripts
from core.batched import Batched
from core.devredis import RedisProcess
from core.settings import Settings
from core.store import REDIS_DEADLINE, Store

BATCH = 500


class Subscriber(threading.Thread):
    """One connection subscribed to ``channels``, reading everything (as a server's hub does)."""

    def __init__(self, url: str, channels: list[str]) -> None:
        super().__init__(daemon=True)
        self.pubsub = redis_sync.Redis.from_url(url).pubsub()
        self.pubsub.subscribe(*channels)
        self.received = 0
        self.stopping = False

    def run(self) -> None:
        while not self.stopping:
            if self.pubsub.get_message(timeout=0.2):
                self.received += 1


async def measure(pid: int, n: int, step) -> float:
    """Redis CPU µs per call of ``step(i)`` over ``n`` calls, ``BATCH`` per loop turn."""
    before = cpu_ticks(pid)
    for start in range(0, n, BATCH):
        await asyncio.gather(*(step(i) for i in range(start, min(n, start + BATCH))))
    return (cpu_ticks(pid) - before) * 1e6 / CLK_TCK / n


async def run(n: int) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="progress-capacity-"))
    server = RedisProcess(tmp / "redis", appendonly=False).start()
    redis = Redis.from_url(server.url)
    out: dict[str, float] = {}
    try:
        settings = Settings.from_env({"REDIS_URL": server.url, "QUEUE_CAP": "0"})
        store = Store(redis, settings)
        pid = server.proc.pid
        out["submit"] = await measure(pid, n, lambda i: store.create("demo", {"steps": 5}))
        docs = [(await store.create("demo", {}))[0] for _ in range(BATCH)]
        docs = await asyncio.gather(*(store.write(d, "", status=contract.RUNNING, attempt=1) for d in docs))
        channels = [contract.channel(d["id"]) for d in docs]
        for subscribers in (0, 1, 4, 16):
            readers = [Subscriber(server.url, channels) for _ in range(subscribers)]
            for reader in readers:
                reader.start()
            await asyncio.sleep(0.5)

            async def progress(i: int) -> None:
                k = i % BATCH
                docs[k] = await store.write(docs[k], "", progress=float(i % 100), message=f"step {i}")

            out[f"progress/{subscribers}"] = await measure(pid, n, progress)
            for reader in readers:
                reader.stopping = True
            for reader in readers:
                reader.join()
        count = Batched(redis, scripts.COUNT, REDIS_DEADLINE)
        out["poll"] = await measure(
            pid, n, lambda i: count(counter=contract.rate_key("poll", "bench", 0), job=contract.job_key(docs[i % BATCH]["id"]), window=60)
        )
        members = [("demo", {"steps": 5}, b'{"steps":5}', 1, "default", 0)] * 100
        out["group/100"] = await measure(pid, max(20, n // 200), lambda i: store.create_group(members))
        alone = []
        for _ in range(30):
            started = time.perf_counter()
            group = (await store.create_group(members))[0]
            alone.append((time.perf_counter() - started) * 1000)
        out["group/100 ms"] = statistics.median(alone)
        children = [json.loads(contract.unpack(raw).doc) for raw in await store.read_many([c["id"] for c in group["children"]])]
        children = await asyncio.gather(*(store.write(c, "", status=contract.RUNNING, attempt=1) for c in children))

        before, rounds = cpu_ticks(pid), max(1, n // len(children))
        for i in range(rounds):  # each child once per loop turn (one pipeline), as its worker would write it
            children = await asyncio.gather(*(store.write(c, "", progress=float(i % 100), message=f"step {i}") for c in children))
        out["child/100"] = (cpu_ticks(pid) - before) * 1e6 / CLK_TCK / (rounds * len(children))

        parents = [(await store.create("demo", {}))[0] for _ in range(-(-n // 100))]
        parents = await asyncio.gather(*(store.write(p, "", status=contract.RUNNING, attempt=1) for p in parents))
        out["spawn"] = await measure(pid, n, lambda i: store.spawn(parents[i // 100], "", i % 100 + 1, "demo", {"steps": 5}, 1, "default", 0))
        spawned = [json.loads(contract.unpack(raw).doc) for raw in await store.read_many([contract.spawned_id(parents[0]["id"], k) for k in range(1, 101)])]
        spawned = await asyncio.gather(*(store.write(c, "", status=contract.RUNNING, attempt=1) for c in spawned))
        before = cpu_ticks(pid)
        for i in range(rounds):
            spawned = await asyncio.gather(*(store.write(c, "", progress=float(i % 100), message=f"step {i}") for c in spawned))
        out["spawned/100"] = (cpu_ticks(pid) - before) * 1e6 / CLK_TCK / (rounds * len(spawned))
    finally:
        await redis.aclose()
        server.stop()
    return {k: round(v, 1) for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20000, help="calls per operation (default 20000)")
    a = p.parse_args(argv)
    facts = machine_facts()
    figures = asyncio.run(run(a.n))
    print(f"bench.capacity at {facts['git']}: Redis CPU µs per call ({a.n} calls each, {BATCH} per pipeline)")
    for name, us in figures.items():
        if name.endswith(" ms"):
            print(f"  {name:12} {us:6.1f} ms   wall time, alone")
        else:
            print(f"  {name:12} {us:6.1f} µs   {1e6 / us:>9,.0f} per second per Redis core")
    record = {"run": datetime.datetime.now().strftime("%Y%m%d-%H%M%S"), "scenario": "capacity", "n": a.n,
              "redis_us": figures, "machine": facts}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)  # (a fresh checkout has none yet)
    with open(RESULTS / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
