"""The benchmark: starts Redis, server(s), agents (and a worker where needed), runs the scenarios,
prints one line of figures per measured step and a summary line per scenario, and appends every
record as JSON to ``bench/results/results.jsonl``.

Figures, and how they are taken:

* deliveries/s: updates received by the clients in the measured window (counted client side);
* server CPU µs per delivery: utime+stime of the server process(es) from ``/proc/<pid>/stat``
  over the window, divided by the deliveries counted at the clients;
* publish-to-receive latency: ``time.monotonic_ns()`` put in the document just before it is sent
  to Redis, against ``time.monotonic_ns()`` when the client's socket read returns it;
* skipped (conflation): seq gaps seen by a client; disorder: a seq that repeats or goes back;
  lost: a (client, job) pair that never saw the terminal state (must be 0);
* gen/pub/redis/other: CPU of the load generators, the publisher, Redis, and everything else on
  the machine over the same window, in cores (``other`` > ~0.1 means the machine was not quiet).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import stats
from bench.procs import (
    ROOT, Agent, Child, Children, Snapshot, cores, cpu_seconds, loadavg, machine_cores, machine_facts,
    raise_fd_limit, rss_kib,
)  # fmt: skip
from core.devredis import RedisProcess, free_port

RESULTS = ROOT / "bench" / "results"
WS_IMPLS = ("websockets-sansio", "websockets", "wsproto")
SCENARIOS = ("fanout-ws", "fanout-sse", "hot-ws", "floor", "hot-sse", "idle", "submit", "start", "queue", "poll", "ws-impls", "deflate", "curve")
EXTRA = ("soak", "connections")  # run only when named: `--only soak --minutes N` (bench/soak.py), `--only connections`
PER_PROCESS = 18_000  # connections per server (and load-generator) process in `connections`: 20,000 open files each here


@dataclass
class Config:
    quick: bool = False
    warm: float = 1.5
    measure: float = 5.0
    agents: int = 2
    servers: int = 1
    fanout_rates: list[float] = field(default_factory=lambda: [250, 500, 1000, 2000, 3000, 4500, 6000])
    hot_rates: list[float] = field(default_factory=lambda: [10, 20, 30, 45, 60, 80, 100])
    hot_sse_rates: list[float] = field(default_factory=lambda: [10, 30, 45, 60, 75])
    impl_rates: list[float] = field(default_factory=lambda: [20, 40, 60, 80])
    deflate_rates: list[float] = field(default_factory=lambda: [10, 20, 40])
    watchers: int = 1000
    fanout_jobs: int = 100
    idle: int = 10_000
    connections: int = 100_000
    idle_hold: float = 5.0
    submit_conns: list[int] = field(default_factory=lambda: [16, 64])
    start_jobs: int = 200
    poll_conns: int = 32
    only: list[str] = field(default_factory=lambda: list(SCENARIOS))
    ws_impls: list[str] = field(default_factory=lambda: list(WS_IMPLS))
    profile: bool = False
    profile_seconds: float = 10.0
    log_level: str = "info"
    quiet_wait: float = 60.0  # before each scenario, wait up to this long for other load to go
    budget: float = 900.0  # hard cap on the whole run, seconds
    minutes: float = 10.0  # soak: minutes of load
    kill_every: float = 180.0  # soak: a worker SIGKILLed (and restarted) this often, seconds
    soak_rate: float = 20.0  # soak: submits per second
    soak_watchers: int = 30  # soak: watch sessions open at once (plus one dashboard)
    drain: float = 60.0  # soak: after the load, wait up to this long for every final state
    results: Path = RESULTS / "results.jsonl"

    @classmethod
    def quick_mode(cls, **kw: Any) -> Config:
        quick = dict(
            quick=True, warm=0.7, measure=2.0, fanout_rates=[500, 1000, 3000], hot_rates=[10, 30, 60],
            hot_sse_rates=[30], impl_rates=[40], deflate_rates=[20], idle=2000, idle_hold=1.0,
            submit_conns=[32], start_jobs=40, budget=300.0, quiet_wait=5.0,
        )  # fmt: skip
        return cls(**{**quick, **kw})


class Saturated(Exception):
    pass


class Bench:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.run_id = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.tmp = Path(tempfile.mkdtemp(prefix="progress-bench-"))
        self.logs = RESULTS / "logs" / self.run_id
        self.logs.mkdir(parents=True, exist_ok=True)
        self.children = Children(self.logs)
        self.redis: RedisProcess | None = None
        self.servers: list[Child] = []
        self.agents: list[Agent] = []
        self.publisher: Agent | None = None
        self.summary: list[dict[str, Any]] = []
        self.facts = machine_facts()
        self.server_kind = ("module", None)
        self.retry_budget = 30.0 if cfg.quick else 150.0  # seconds a run may spend re-measuring noisy steps

    # -- processes ----------------------------------------------------------------------

    def env(self, **extra: Any) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
        env.update({
            "REDIS_URL": self.redis.url, "JOBS_MODULE": "worker.demo,bench.jobs", "LOG_LEVEL": self.cfg.log_level,
            "PYTHONUNBUFFERED": "1", "HOST": "127.0.0.1", "PYTHONPATH": str(ROOT),
            # every client of the bench is one IP and one (keyless) caller: lift the per-caller
            # limits (the limiter still runs) so they measure the server, not the abuse guard
            "RATE_SUBMIT": "100000000", "RATE_POLL": "100000000", "MAX_STREAMS_PER_CLIENT": "1000000",
            "MAX_CONNECTIONS": "1000000", "QUEUE_CAP": "0",  # submit steps queue tens of thousands
        })  # fmt: skip
        env.update({k.upper(): str(v) for k, v in extra.items()})
        return env

    async def start(self) -> None:
        self.redis = RedisProcess(self.tmp / "redis").start()
        self.children.items.append(Child("redis", self.redis.proc, self.tmp / "redis" / "redis.log", self.redis.port, "redis"))
        await self.start_servers()
        self.publisher = await self.start_agent("publisher")
        self.agents = [await self.start_agent(f"agent{i}") for i in range(self.cfg.agents)]

    async def start_agent(self, name: str) -> Agent:
        import subprocess

        child = self.children.spawn(name, [sys.executable, "-m", "bench.agent"], self.env(), role="agent" if name != "publisher" else "publisher",
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
        return await Agent(child).start()

    async def start_servers(self, kind: str = "module", ws: str | None = None, n: int | None = None, shared: bool = False) -> None:
        """``kind`` module: ``python -m server`` as shipped; uvicorn: ``python -m uvicorn`` with
        ``--ws ws``; floor: ``bench.floor``, the websockets library's own broadcast. ``shared``:
        every server on one port (``REUSE_PORT``), started one after the other."""
        for s in self.servers:
            self.children.stop(s)
        self.servers = []
        self.server_kind = (kind, ws)
        one_port = free_port()
        for i in range(n or self.cfg.servers):
            port = one_port if shared else free_port()
            if kind == "module":
                argv = [sys.executable, "-m", "server"]
            elif kind == "floor":
                argv = [sys.executable, "-m", "bench.floor"]
            else:
                argv = [sys.executable, "-m", "uvicorn", "server.app:create_app", "--factory", "--host", "127.0.0.1",
                        "--port", str(port), "--loop", "uvloop", "--http", "httptools", "--ws", ws or "websockets-sansio",
                        "--ws-max-size", "65536", "--no-access-log", "--log-level", self.cfg.log_level,
                        "--timeout-graceful-shutdown", "5"]  # fmt: skip
            name = f"server{i}-{kind}{'-' + ws if ws else ''}-{port}"
            env = self.env(port=port, **({"reuse_port": 1} if shared else {}))
            self.servers.append(self.children.spawn(name, argv, env, role="server", port=port))
            if shared:  # any of them answers on the port: wait for each one's own word
                await self.wait_started(self.servers[-1])
        for s in self.servers:
            await self.wait_healthy(s)

    async def wait_started(self, server: Child, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while "Application startup complete" not in server.log_path.read_text(errors="replace"):
            if not server.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server {server.name} did not start:\n{server.log_tail()}")
            await asyncio.sleep(0.1)

    async def wait_healthy(self, server: Child, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not server.alive():
                raise RuntimeError(f"server exited:\n{server.log_tail()}")
            with contextlib.suppress(OSError):
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                head = await reader.read(64)
                writer.close()
                if head.startswith(b"HTTP/1.1 200"):
                    return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"server on port {server.port} not ready:\n{server.log_tail()}")

    def start_worker(self, **settings: Any) -> Child:
        import redis as redis_sync

        from core import contract

        client = redis_sync.Redis.from_url(self.redis.url)
        try:
            before = client.pubsub_numsub(contract.WAKE_CHANNEL)[0][1]
            worker = self.children.spawn(f"worker-{time.monotonic_ns()}", [sys.executable, "-m", "worker"], self.env(**settings), role="worker")
            deadline = time.monotonic() + 30
            while client.pubsub_numsub(contract.WAKE_CHANNEL)[0][1] <= before:
                if not worker.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"worker did not start:\n{worker.log_tail()}")
                time.sleep(0.05)
        finally:
            client.close()
        return worker

    def flush_redis(self) -> None:
        import redis as redis_sync

        client = redis_sync.Redis.from_url(self.redis.url)
        try:
            client.flushdb()
        finally:
            client.close()

    async def stop(self) -> None:
        for agent in [*self.agents, *([self.publisher] if self.publisher else [])]:
            agent.close()
        self.children.stop_all()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers ------------------------------------------------------------------------

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.servers]

    def server_pids(self) -> list[int]:
        return [s.pid for s in self.servers]

    def all_pids(self) -> dict[str, list[int]]:
        return {
            "server": self.server_pids(),
            "gen": [a.pid for a in self.agents],
            "pub": [self.publisher.pid],
            "redis": [self.redis.proc.pid],
            "worker": self.children.pids("worker"),
        }

    def check_servers(self) -> None:
        for s in self.servers:
            if not s.alive():
                raise RuntimeError(f"server {s.name} died:\n{s.log_tail()}")

    async def each(self, op: str, timeout: float = 120.0, per_agent: list[dict[str, Any]] | None = None, **args: Any) -> list[dict[str, Any]]:
        calls = [a.call(op, timeout=timeout, **{**args, **(per_agent[i] if per_agent else {})}) for i, a in enumerate(self.agents)]
        return list(await asyncio.gather(*calls))

    def record(self, rec: dict[str, Any]) -> dict[str, Any]:
        kind, ws = self.server_kind
        server = {"module": "python -m server", "floor": "bench.floor"}.get(kind) or f"uvicorn --ws {ws or 'websockets-sansio'}"
        rec = {"run": self.run_id, "ts": datetime.datetime.now().isoformat(timespec="seconds"), "quick": self.cfg.quick,
               "server": server, "servers": len(self.servers),
               "profiled": self.cfg.profile, **rec, "machine": self.facts}  # fmt: skip
        self.cfg.results.parent.mkdir(parents=True, exist_ok=True)
        with open(self.cfg.results, "a") as f:
            f.write(json.dumps(rec) + "\n")
        return rec

    def cpu_fields(self, s0: Snapshot, s1: Snapshot) -> dict[str, Any]:
        pids = self.all_pids()
        out = {f"{k}_cores": round(cores(s0, s1, v), 3) for k, v in pids.items() if v}
        known = sum(cores(s0, s1, v) for v in pids.values())
        out["machine_cores"] = round(machine_cores(s0, s1), 3)
        out["other_cores"] = round(max(0.0, machine_cores(s0, s1) - known), 3)
        out["loadavg"] = loadavg()
        return out

    # -- streaming scenarios -----------------------------------------------------------

    async def connect(self, kind: str, conns: list[list[list]], deflate: bool = False, concurrency: int = 100) -> dict[str, Any]:
        """Spread ``conns`` round robin over the agents; returns connect figures."""
        per = [conns[i :: len(self.agents)] for i in range(len(self.agents))]
        started = time.monotonic()
        replies = await self.each("connect", timeout=180, host="127.0.0.1", port=self.ports, kind=kind, deflate=deflate,
                                  concurrency=concurrency, per_agent=[{"conns": p} for p in per])  # fmt: skip
        took = time.monotonic() - started
        failed = sum(r["failed"] for r in replies)
        if failed:
            errors = [e for r in replies for e in r["errors"]]
            raise RuntimeError(f"{failed} of {len(conns)} {kind} connections failed: {errors[:3]}")
        self.expected_terminal = [sum(len(c) for c in p) for p in per]
        return {"connect_s": round(took, 2), "connect_per_s": round(len(conns) / took)}

    async def stream_step(self, scenario: str, rate: float, watchers_per_job: float, extra: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        duration = cfg.warm + cfg.measure + 0.3
        pub = asyncio.create_task(self.publisher.call("publish", rate=rate, duration=duration, timeout=duration + 60))
        try:
            await asyncio.sleep(cfg.warm)
            s0, s1, replies = await self.measure_window(scenario, rate)
        finally:
            published = await pub
        self.check_servers()
        deliveries = sum(r["deliveries"] for r in replies)
        skipped = sum(r["skipped"] for r in replies)
        window = s1.at - s0.at
        hist = stats.merge([r["hist"] for r in replies])
        server_s = cpu_seconds(s0, s1, self.server_pids())
        expected = rate * watchers_per_job * window
        rec = {
            "scenario": scenario, **extra, "rate": rate, "published_rate": round(published["rate"], 1),
            "deliveries_per_s": round(deliveries / window), "expected_per_s": round(expected / window),
            "server_us_per_delivery": round(server_s * 1e6 / deliveries, 1) if deliveries else None,
            "lat_p50_ms": stats.ms(stats.percentile(hist, 0.5)), "lat_p99_ms": stats.ms(stats.percentile(hist, 0.99)),
            "lat_max_ms": stats.ms(hist["max"]), "skipped": skipped, "disorder": sum(r["disorder"] for r in replies),
            "errors": sum(r["errors"] for r in replies), "open": sum(r["open"] for r in replies),
            "window_s": round(window, 2), **self.cpu_fields(s0, s1),
        }  # fmt: skip
        # bursts (a hot job) make delivered/expected coarse in a short window: conflation and lag decide
        kept_up = deliveries >= 0.9 * expected and skipped <= 0.005 * max(1, deliveries + skipped)
        rec["kept_up"] = bool(kept_up and (rec["lat_p99_ms"] or 0) < 250)
        rec["saturated"] = bool(not rec["kept_up"] or rec["server_cores"] >= 0.95 * len(self.servers))
        self.record(rec)
        print(step_line(rec), flush=True)
        return rec

    async def finish_jobs(self) -> dict[str, Any]:
        """Write the terminal state of every job and count the (client, job) pairs that miss it."""
        await asyncio.gather(*(a.call("expect_terminal", count=n) for a, n in zip(self.agents, self.expected_terminal)))
        await self.publisher.call("finish", timeout=60)
        replies = await self.each("wait_terminal", timeout=30, wait=10.0)
        return {"lost_terminal": sum(r["missing"] for r in replies)}

    async def end_streams(self) -> None:
        await self.each("close")
        await self.publisher.call("forget_jobs")
        self.flush_redis()

    async def stepped(self, scenario: str, kind: str, jobs: int, watchers: int, rates: list[float], deflate: bool = False) -> dict[str, Any]:
        """A fan-out scenario: ``watchers`` connections over ``jobs`` jobs, update rate stepped up."""
        await self.start_servers(*self.server_kind)
        rss0 = sum(rss_kib(p) for p in self.server_pids())
        setup = await self.publisher.call("setup_jobs", redis_url=self.redis.url, n=jobs, timeout=60)
        ids = [j[:2] for j in setup["jobs"]]
        conns = [[ids[i % jobs]] for i in range(watchers)]
        conn = await self.connect(kind, conns, deflate=deflate)
        rss1 = sum(rss_kib(p) for p in self.server_pids())
        extra = {"transport": kind + ("+deflate" if deflate else ""), "jobs": jobs, "watchers": watchers}
        steps = []
        try:
            for rate in rates:
                rec = await self.remeasured(lambda: self.stream_step(scenario, rate, watchers / jobs, extra))
                steps.append(rec)
                # stop at saturation: the server at a full core, or a second step that did not keep up
                if rec["saturated"] and (rec["server_cores"] >= 0.9 * len(self.servers) or sum(not r["kept_up"] for r in steps) >= 2):
                    break
            end = await self.finish_jobs()
        finally:
            await self.end_streams()
        best = max(steps, key=lambda r: r["deliveries_per_s"])
        kept = [r for r in steps if r["kept_up"]]
        summary = {
            "scenario": scenario, "summary": True, **extra, **conn, **end,
            "rss_kib_per_conn": round((rss1 - rss0) / watchers, 1),
            "max_deliveries_per_s": best["deliveries_per_s"],
            "max_kept_up_rate": max((r["rate"] for r in kept), default=None),
            "steps": [{k: r[k] for k in ("rate", "deliveries_per_s", "server_us_per_delivery", "server_cores", "lat_p50_ms",
                                          "lat_p99_ms", "lat_max_ms", "skipped", "kept_up")} for r in steps],
        }  # fmt: skip
        return summary

    async def fanout(self, kind: str) -> dict[str, Any]:
        cfg = self.cfg
        summary = await self.stepped(f"fanout-{kind}", kind, cfg.fanout_jobs, cfg.watchers, cfg.fanout_rates)
        at = next((s for s in summary["steps"] if s["rate"] == 1000), None)
        if at:
            summary.update({"at_1000": at})
        return summary

    async def hot(self, kind: str, rates: list[float] | None = None, deflate: bool = False, scenario: str | None = None) -> dict[str, Any]:
        cfg = self.cfg
        summary = await self.stepped(scenario or f"hot-{kind}", kind, 1, cfg.watchers, rates or cfg.hot_rates, deflate=deflate)
        at = next((s for s in summary["steps"] if s["rate"] == 10), None)
        if at:
            summary.update({"at_10": at})
        return summary

    async def idle(self) -> dict[str, Any]:
        """``idle`` connections (half SSE, half WS) on one job, held, then one update to all."""
        cfg = self.cfg
        await self.start_servers(*self.server_kind)
        await asyncio.sleep(0.5)
        rss0 = sum(rss_kib(p) for p in self.server_pids())
        setup = await self.publisher.call("setup_jobs", redis_url=self.redis.url, n=1, timeout=60)
        job = setup["jobs"][0][:2]
        half = cfg.idle // 2
        conns = [[job] for _ in range(half)]
        per = [conns[i :: len(self.agents)] for i in range(len(self.agents))]
        started = time.monotonic()
        s_connect = Snapshot.take(self.server_pids())
        replies = await asyncio.gather(*[a.call("connect", timeout=300, host="127.0.0.1", port=self.ports, kind=kind, conns=p, concurrency=50)
                                         for kind in ("sse", "ws") for a, p in zip(self.agents, per)])  # fmt: skip
        connect_s = time.monotonic() - started
        s_connected = Snapshot.take(self.server_pids())
        failed = sum(r["failed"] for r in replies)
        if failed:
            raise RuntimeError(f"{failed} idle connections failed: {[e for r in replies for e in r['errors']][:3]}")
        self.expected_terminal = [2 * len(p) for p in per]
        try:
            await asyncio.sleep(0.5)
            s0 = self.snapshot()
            await asyncio.sleep(cfg.idle_hold)
            s1 = self.snapshot()
            rss1 = sum(rss_kib(p) for p in self.server_pids())
            burst, _, _ = await self.one_update(2 * half, wait=30)
            end = await self.finish_jobs()
        finally:
            await self.end_streams()
        n = 2 * half
        rec = {
            "scenario": "idle", "summary": True, "connections": n, "sse": half, "ws": half,
            "connect_s": round(connect_s, 2), "connect_per_s": round(n / connect_s),
            "server_us_per_connect": round(cpu_seconds(s_connect, s_connected, self.server_pids()) * 1e6 / n, 1),
            "rss_kib_before": rss0, "rss_kib_after": rss1, "rss_kib_per_conn": round((rss1 - rss0) / n, 2),
            "idle_server_cores": round(cores(s0, s1, self.server_pids()), 4),
            **burst, **end, **{k: v for k, v in self.cpu_fields(s0, s1).items() if k in ("other_cores", "loadavg")},
        }  # fmt: skip
        self.record(rec)
        print(step_line(rec), flush=True)
        return rec

    async def connections(self) -> dict[str, Any]:
        """``--connections`` (default 100,000) idle connections, half SSE and half WebSocket, on one
        job, held by server processes sharing one port (``REUSE_PORT``; at most ``PER_PROCESS``
        connections each, under the 20,000 open files a process may have here), opened by as many
        load-generator processes, each from its own loopback address (127.0.0.x: past the
        ephemeral-port range of one address); then one update to all, while a probe keeps asking
        ``/healthz`` through the same port."""
        cfg = self.cfg
        n = cfg.connections // 2 * 2
        procs = -(-n // PER_PROCESS)
        await self.start_servers("module", None, procs, shared=True)
        port = self.servers[0].port
        saved = self.agents
        self.agents = [await self.start_agent(f"conn{i}") for i in range(procs)]
        try:
            await asyncio.sleep(0.5)
            pids = self.server_pids()
            rss0 = {p: rss_kib(p) for p in pids}
            setup = await self.publisher.call("setup_jobs", redis_url=self.redis.url, n=1, timeout=60)
            job = setup["jobs"][0][:2]
            share = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
            started = time.monotonic()
            s_connect = Snapshot.take(pids + [a.pid for a in self.agents])
            replies = await asyncio.gather(*[
                a.call("connect", timeout=700, host="127.0.0.1", port=port, kind=kind, conns=[[job]] * (count // 2 + (count % 2 if kind == "sse" else 0)),
                       concurrency=50, source=f"127.0.0.{10 + i}", connect_timeout=600)
                for kind in ("sse", "ws") for i, (a, count) in enumerate(zip(self.agents, share))
            ])  # fmt: skip
            connect_s = time.monotonic() - started
            s_connected = Snapshot.take(pids + [a.pid for a in self.agents])
            failed = sum(r["failed"] for r in replies)
            if failed:
                raise RuntimeError(f"{failed} connections failed: {[e for r in replies for e in r['errors']][:3]}")
            print(f"  {n:,} connected in {connect_s:.0f} s", flush=True)
            self.expected_terminal = share
            await asyncio.sleep(2.0)
            rss1 = {p: rss_kib(p) for p in pids}
            per_server = [open_sockets(p) for p in pids]
            probe = asyncio.create_task(self.probe(port))
            burst, t_pub, t_done = await self.one_update(n, wait=60)
            print(f"  one update: {burst['delivered']:,} of {n:,} delivered", flush=True)
            generator_cores = round(cores(t_pub, t_done, [a.pid for a in self.agents]), 2)
            probe.cancel()
            await asyncio.gather(probe, return_exceptions=True)
            probe_ms = self.probe_ms
            end = await self.finish_jobs()
        finally:
            with contextlib.suppress(Exception):
                await self.end_streams()
            for agent in self.agents:
                agent.close()
                self.children.stop(agent.child)
            self.agents = saved
        growth = sum(rss1[p] - rss0[p] for p in pids)
        rec = {
            "scenario": "connections", "summary": True, "connections": n, "sse": n // 2, "ws": n // 2, "server_processes": procs,
            "generator_processes": procs, "per_server": per_server, "connect_s": round(connect_s, 1),
            "server_us_per_connect": round(cpu_seconds(s_connect, s_connected, pids) * 1e6 / n, 1),
            "generator_cores_while_connecting": round(cores(s_connect, s_connected, [a for a in s_connect.ticks if a not in pids]), 2),
            "rss_kib_per_conn": round(growth / n, 2), "rss_mib_per_server": [round((rss1[p]) / 1024) for p in pids],
            **burst, "generator_cores_during_burst": generator_cores,
            "healthz_during_burst_ms": {"count": len(probe_ms), "p50": stats.ms(stats.exact(probe_ms, 0.5)) if probe_ms else None,
                                        "max": stats.ms(max(probe_ms)) if probe_ms else None},
            **end,
        }  # fmt: skip
        self.record(rec)
        print(f"  connections  {n:,} over {procs} servers on one port: {rec['rss_kib_per_conn']} KiB/conn, "
              f"connect {rec['connect_s']} s ({rec['server_us_per_connect']} µs server CPU each); one update to all: "
              f"{rec['delivered']:,} delivered, p50 {rec['one_update_p50_ms']} p99 {rec['one_update_p99_ms']} ms, "
              f"{rec['server_us_per_delivery']} µs/dlv; /healthz during it: {rec['healthz_during_burst_ms']}; lost {end.get('lost_terminal')}", flush=True)  # fmt: skip
        return rec

    async def one_update(self, n: int, wait: float) -> tuple[dict[str, Any], Snapshot, Snapshot]:
        """One update to every held connection: publish it, wait (up to ``wait`` s) until the
        agents count ``n`` deliveries; the arrival percentiles and the servers' CPU per delivery."""
        await self.each("arrivals", start=True)
        await self.each("reset")
        t_pub = self.snapshot()
        await self.publisher.call("publish", rate=1, duration=0.2)
        deadline = time.monotonic() + wait
        while sum(r["deliveries"] for r in await self.each("stats")) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        t_done = self.snapshot()
        arrivals = [x for r in await self.each("arrivals", start=False) for x in r["arrivals"]]
        fields = {
            "delivered": len(arrivals), "one_update_p50_ms": stats.ms(stats.exact(arrivals, 0.5)),
            "one_update_p99_ms": stats.ms(stats.exact(arrivals, 0.99)), "one_update_max_ms": stats.ms(max(arrivals) if arrivals else None),
            "server_us_per_delivery": round(cpu_seconds(t_pub, t_done, self.server_pids()) * 1e6 / max(1, len(arrivals)), 1),
        }  # fmt: skip
        return fields, t_pub, t_done

    async def probe(self, port: int) -> None:
        """``GET /healthz`` on a new connection every 50 ms; latencies (µs) in ``probe_ms``."""
        self.probe_ms: list[int] = []
        while True:
            t0 = time.perf_counter()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            head = await reader.read(64)
            writer.close()
            if head.startswith(b"HTTP/1.1 200"):
                self.probe_ms.append(int((time.perf_counter() - t0) * 1e6))
            await asyncio.sleep(0.05)

    # -- request scenarios -------------------------------------------------------------

    async def http_run(self, scenario: str, requests: list[str], conns: int, extra: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        per = [conns // len(self.agents) + (1 if i < conns % len(self.agents) else 0) for i in range(len(self.agents))]
        await self.each("http_start", host="127.0.0.1", port=self.ports, requests=requests, per_agent=[{"conns": n} for n in per])
        try:
            await asyncio.sleep(cfg.warm)
            s0, s1, replies = await self.measure_window(f"{scenario}-{extra.get('variant', 'c')}", conns)
        finally:
            await self.each("http_stop", timeout=30)
        self.check_servers()
        window = s1.at - s0.at
        count = sum(r["requests"] for r in replies)
        hist = stats.merge([r["hist"] for r in replies])
        statuses: dict[str, int] = {}
        for r in replies:
            for k, v in r["statuses"].items():
                statuses[k] = statuses.get(k, 0) + v
        rec = {
            "scenario": scenario, **extra, "conns": conns, "requests_per_s": round(count / window),
            "server_us_per_request": round(cpu_seconds(s0, s1, self.server_pids()) * 1e6 / count, 1) if count else None,
            "lat_p50_ms": stats.ms(stats.percentile(hist, 0.5)), "lat_p99_ms": stats.ms(stats.percentile(hist, 0.99)),
            "lat_max_ms": stats.ms(hist["max"]), "statuses": statuses, "window_s": round(window, 2), **self.cpu_fields(s0, s1),
        }  # fmt: skip
        self.record(rec)
        print(step_line(rec), flush=True)
        return rec

    async def submit(self) -> dict[str, Any]:
        await self.start_servers(*self.server_kind)
        body = json.dumps({"type": "demo", "params": {"steps": 1, "interval": 0}})
        req = f"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
        steps = []
        try:
            for conns in self.cfg.submit_conns:
                steps.append(await self.remeasured(lambda: self.http_run("submit", [req], conns, {})))
                self.flush_redis()
        finally:
            self.flush_redis()
        best = max(steps, key=lambda r: r["requests_per_s"])
        return {"scenario": "submit", "summary": True, "best": {k: best[k] for k in ("conns", "requests_per_s", "server_us_per_request", "lat_p50_ms", "lat_p99_ms", "statuses")},
                "steps": [{k: r[k] for k in ("conns", "requests_per_s", "server_us_per_request", "lat_p50_ms", "lat_p99_ms", "server_cores")} for r in steps]}  # fmt: skip

    async def curve(self) -> dict[str, Any]:
        """N server processes and M worker processes end to end (issue 19): no-op jobs submitted
        over 64 connections spread over the servers, run by the workers (concurrency 50 each).
        Jobs done per second = the submits of the window less what the queue grew by."""
        import redis as redis_sync

        from core import queue

        body = json.dumps({"type": "bench_noop", "params": {}})
        req = f"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
        client = redis_sync.Redis.from_url(self.redis.url)
        steps = []
        try:
            for n, m in ((1, 1), (1, 2), (2, 1), (2, 2)):
                await self.start_servers("module", None, n)
                workers = [self.start_worker(worker_concurrency=50) for _ in range(m)]
                try:
                    per = [64 // len(self.agents)] * len(self.agents)
                    await self.each("http_start", host="127.0.0.1", port=self.ports, requests=[req], per_agent=[{"conns": c} for c in per])
                    await asyncio.sleep(self.cfg.warm)
                    await self.each("reset")
                    depth0, s0 = client.zcard(queue.queue_key(queue.DEFAULT)), self.snapshot()
                    await asyncio.sleep(self.cfg.measure)
                    depth1, s1 = client.zcard(queue.queue_key(queue.DEFAULT)), self.snapshot()
                    cpu = self.cpu_fields(s0, s1)  # while the workers are still there to count
                    replies = await self.each("stats", stop=True)
                    await self.each("http_stop", timeout=30)
                finally:
                    for worker in workers:
                        self.children.stop(worker)
                window = s1.at - s0.at
                accepted = sum(r["statuses"].get("202", 0) for r in replies)
                rec = {
                    "scenario": "curve", "servers_n": n, "workers_m": m, "submits_per_s": round(accepted / window),
                    "jobs_done_per_s": round((accepted - (depth1 - depth0)) / window), "queue_growth_per_s": round((depth1 - depth0) / window),
                    **cpu,
                }  # fmt: skip
                self.record(rec)
                print(f"  curve  N={n} M={m}: {rec['submits_per_s']:,} submits/s, {rec['jobs_done_per_s']:,} jobs done/s "
                      f"(queue {rec['queue_growth_per_s']:+,}/s); cores: server {rec.get('server_cores', 0):.2f} "
                      f"worker {rec.get('worker_cores', 0):.2f} redis {rec.get('redis_cores', 0):.2f} gen {rec.get('gen_cores', 0):.2f}", flush=True)  # fmt: skip
                steps.append(rec)
                self.flush_redis()
        finally:
            client.close()
        return {"scenario": "curve", "summary": True,
                "steps": [{k: r.get(k) for k in ("servers_n", "workers_m", "submits_per_s", "jobs_done_per_s", "server_cores", "worker_cores", "redis_cores")} for r in steps]}  # fmt: skip

    async def queue(self) -> dict[str, Any]:
        """The worker alone (``bench.queue``): no-op jobs queued ahead, one worker at concurrency
        10 and 50, its own fresh Valkey per run; jobs/s and CPU and Redis commands per job."""
        from bench.queue import Ours, measure

        steps = []
        for concurrency in (10, 50):
            rec = {"scenario": "queue", "concurrency": concurrency, "jobs": 5000,
                   **await asyncio.to_thread(measure, Ours(env={"LOG_LEVEL": self.cfg.log_level}), concurrency, 5000, self.logs)}  # fmt: skip
            self.record(rec)
            print(f"  queue  c{concurrency}: {rec['jobs_per_s']:,} jobs/s, worker {rec['worker_us_per_job']} µs/job, "
                  f"redis {rec['redis_us_per_job']} µs/job, {rec['redis_commands_per_job']} commands/job", flush=True)  # fmt: skip
            steps.append(rec)
        return {"scenario": "queue", "summary": True, "steps": [{k: r[k] for k in ("concurrency", "jobs_per_s", "worker_us_per_job", "redis_us_per_job")} for r in steps]}  # fmt: skip

    async def poll(self) -> dict[str, Any]:
        await self.start_servers(*self.server_kind)
        setup = await self.publisher.call("setup_jobs", redis_url=self.redis.url, n=100, timeout=60)
        jobs = setup["jobs"]
        out = {}
        try:
            for variant in ("plain", "if-none-match"):
                reqs = [f"GET /jobs/{j} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + (f'If-None-Match: "{seq}"\r\n' if variant == "if-none-match" else "") + "\r\n"
                        for j, _, seq in jobs]  # fmt: skip
                out[variant] = await self.remeasured(lambda: self.http_run("poll", reqs, self.cfg.poll_conns, {"variant": variant}))
        finally:
            await self.publisher.call("forget_jobs")
            self.flush_redis()
        return {"scenario": "poll", "summary": True,
                **{v: {k: r[k] for k in ("requests_per_s", "server_us_per_request", "lat_p50_ms", "lat_p99_ms", "statuses")} for v, r in out.items()}}  # fmt: skip

    async def start_latency(self) -> dict[str, Any]:
        await self.start_servers(*self.server_kind)
        worker = self.start_worker()
        try:
            await asyncio.sleep(0.5)
            n = self.cfg.start_jobs
            s0 = self.snapshot()
            reply = await self.agents[0].call("start_latency", timeout=n * 0.05 + 90, host="127.0.0.1", port=self.ports[0], n=n,
                                              interval=0.05, job_type="bench_noop", params={"sleep": 0.05})  # fmt: skip
            s1 = self.snapshot()
        finally:
            self.children.stop(worker)
            self.flush_redis()
        lat = reply["latencies_us"]
        rec = {
            "scenario": "start", "summary": True, "jobs": n, "interval_s": 0.05, "job": "bench_noop sleep 0.05 s", "missing": reply["missing"],
            "p50_ms": stats.ms(stats.exact(lat, 0.5)), "p99_ms": stats.ms(stats.exact(lat, 0.99)),
            "max_ms": stats.ms(max(lat) if lat else None), "min_ms": stats.ms(min(lat) if lat else None),
            **self.cpu_fields(s0, s1),
        }  # fmt: skip
        self.record(rec)
        print(step_line(rec), flush=True)
        return rec

    async def ws_impls(self) -> dict[str, Any]:
        out = {}
        saved = self.server_kind
        try:
            for impl in self.cfg.ws_impls:
                if impl == "wsproto":
                    try:
                        import wsproto  # noqa: F401
                    except ImportError:
                        print("  ws-impl wsproto: skipped (not installed; .venv/bin/pip install wsproto)", flush=True)
                        continue
                self.server_kind = ("uvicorn", impl)
                s = await self.hot("ws", rates=self.cfg.impl_rates, scenario=f"ws-impl:{impl}")
                out[impl] = {"max_deliveries_per_s": s["max_deliveries_per_s"], "steps": s["steps"], "lost_terminal": s["lost_terminal"]}
        finally:
            self.server_kind = saved
        return {"scenario": "ws-impls", "summary": True, **out}

    async def floor(self) -> dict[str, Any]:
        """Scenario 3 against ``bench.floor``: the machine's floor, and the server's ratio to it."""
        saved = self.server_kind
        self.server_kind = ("floor", None)
        try:
            s = await self.hot("ws", scenario="floor")
        finally:
            self.server_kind = saved
        hot = next((h for h in self.summary if h.get("scenario") == "hot-ws" and "at_10" in h), None)
        if hot and "at_10" in s and s["at_10"]["server_us_per_delivery"]:
            s["server_vs_floor_at_10"] = round(hot["at_10"]["server_us_per_delivery"] / s["at_10"]["server_us_per_delivery"], 2)
            s["server_vs_floor_max"] = round(hot["max_deliveries_per_s"] / s["max_deliveries_per_s"], 2)
        return s

    async def deflate(self) -> dict[str, Any]:
        s = await self.hot("ws", rates=self.cfg.deflate_rates, deflate=True, scenario="hot-ws-deflate")
        return s

    # -- profiling ----------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """CPU and memory of every process the bench started."""
        return Snapshot.take(sum(self.all_pids().values(), []))

    async def measure_window(self, label: str, step: float) -> tuple[Snapshot, Snapshot, list[dict[str, Any]]]:
        """One measured window: counters reset, snapshots around cfg.measure seconds (py-spy on
        the server during it with --profile), then the agents' stats."""
        await self.each("reset")
        s0 = self.snapshot()
        profile = self.start_profile(label, step) if self.cfg.profile else None
        await asyncio.sleep(self.cfg.measure)
        s1 = self.snapshot()
        replies = await self.each("stats", stop=True)
        if profile is not None:
            await self.finish_profile(*profile)
        return s0, s1, replies

    def start_profile(self, scenario: str, rate: float):
        """py-spy on the first server during the measured window (collapsed stacks; speedscope opens them)."""
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(spy).exists():
            print("  profile: py-spy not found (.venv/bin/pip install py-spy)", flush=True)
            return None
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"profile-{scenario.replace(':', '-')}-{int(rate)}-{self.run_id}.txt"
        child = self.children.spawn(f"py-spy-{scenario.replace(':', '-')}-{int(rate)}",
                                    [spy, "record", "--pid", str(self.servers[0].pid), "--duration", str(int(self.cfg.measure)),
                                     "--rate", "250", "--format", "raw", "--output", str(out)], os.environ.copy(), role="profiler")  # fmt: skip
        return child, out

    async def finish_profile(self, child: Child, out: Path) -> None:
        for _ in range(300):
            if not child.alive():
                break
            await asyncio.sleep(0.1)
        self.children.stop(child)
        if out.exists():
            from bench.flame import summarize

            print(summarize(out, top=12), flush=True)

    async def remeasured(self, step) -> dict[str, Any]:
        """Run a measured step; if other processes used > 0.2 core meanwhile, wait for quiet and
        measure once more (bounded by ``retry_budget`` seconds per run). The last one counts."""
        rec = await step()
        if rec.get("other_cores", 0) > 0.2 and self.retry_budget > 0:
            started = time.monotonic()
            print(f"  (other processes used {rec['other_cores']:.2f} cores: measuring this step again)", flush=True)
            await self.wait_quiet(limit=min(20.0, self.retry_budget))
            rec = await step()
            rec["remeasured"] = True
            self.retry_budget -= time.monotonic() - started
        return rec

    async def wait_quiet(self, limit: float | None = None) -> float:
        """Wait (up to ``quiet_wait`` s) until processes other than ours use < 0.15 core; returns that load."""
        deadline = time.monotonic() + (self.cfg.quiet_wait if limit is None else limit)
        while True:
            pids = sum(self.all_pids().values(), [])
            s0 = Snapshot.take(pids)
            await asyncio.sleep(1.0)
            s1 = Snapshot.take(pids)
            other = max(0.0, machine_cores(s0, s1) - cores(s0, s1, pids))
            if other < 0.15 or time.monotonic() > deadline:
                return other
            print(f"  (waiting for a quiet machine: {other:.2f} cores busy elsewhere)", flush=True)

    # -- the run ------------------------------------------------------------------------

    async def run(self) -> None:
        cfg = self.cfg
        print(f"bench run {self.run_id}: {self.facts['nproc']} cores, {self.facts['cpu']}, load {loadavg():.2f}; "
              f"{'quick' if cfg.quick else 'full'}; results -> {cfg.results}", flush=True)  # fmt: skip
        await self.start()
        plan = {
            "fanout-ws": lambda: self.fanout("ws"),
            "fanout-sse": lambda: self.fanout("sse"),
            "hot-ws": lambda: self.hot("ws"),
            "floor": self.floor,
            "hot-sse": lambda: self.hot("sse", rates=cfg.hot_sse_rates),
            "idle": self.idle,
            "submit": self.submit,
            "start": self.start_latency,
            "poll": self.poll,
            "ws-impls": self.ws_impls,
            "deflate": self.deflate,
            "queue": self.queue,
            "curve": self.curve,
            "connections": self.connections,
        }
        for name in cfg.only:
            other = await self.wait_quiet()
            print(f"-- {name}  (other load before it: {other:.2f} cores)", flush=True)
            started = time.monotonic()
            try:
                summary = await plan[name]()
            except Exception as e:  # noqa: BLE001 - reported, and the next scenario runs
                summary = {"scenario": name, "summary": True, "failed": str(e)[:2000]}
                print(f"  {name} FAILED: {e}", flush=True)
                with contextlib.suppress(Exception):
                    await self.each("close")
                    await self.publisher.call("forget_jobs")
                    self.flush_redis()
            summary["took_s"] = round(time.monotonic() - started, 1)
            self.summary.append(self.record(summary) if "failed" in summary or summary.get("scenario") not in ("idle", "start") else summary)
        print("\n== summary", flush=True)
        for s in self.summary:
            try:
                print(summary_line(s), flush=True)
            except (KeyError, TypeError, ValueError):
                print(f"{s.get('scenario')}: {json.dumps(s)[:400]}", flush=True)


def open_sockets(pid: int) -> int:
    """Sockets a process holds (its connections: ``/metrics`` through a shared port reaches any
    of the servers, /proc the one asked)."""
    return sum(1 for fd in os.listdir(f"/proc/{pid}/fd") if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"))


def fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.2f}{unit}" if abs(v) < 100 else f"{v:,.0f}{unit}"
    if isinstance(v, int):
        return f"{v:,}{unit}"
    return f"{v}{unit}"


def step_line(r: dict[str, Any]) -> str:
    sc = r["scenario"]
    cpu = f"gen {fmt(r.get('gen_cores'))}c pub {fmt(r.get('pub_cores'))}c redis {fmt(r.get('redis_cores'))}c other {fmt(r.get('other_cores'))}c"
    if "deliveries_per_s" in r:
        return (f"  {sc:<22} {r['transport']:<11} rate {fmt(r['rate'])}/s  deliveries {fmt(r['deliveries_per_s'])}/s"
                f" (of {fmt(r['expected_per_s'])})  server {fmt(r['server_cores'])} core {fmt(r['server_us_per_delivery'])} µs/dlv"
                f"  lat p50 {fmt(r['lat_p50_ms'])} p99 {fmt(r['lat_p99_ms'])} max {fmt(r['lat_max_ms'])} ms  skipped {fmt(r['skipped'])}"
                f"  {cpu}{'' if r['kept_up'] else '  SATURATED'}{'  NOISY' if r.get('other_cores', 0) > 0.15 else ''}")  # fmt: skip
    if "requests_per_s" in r:
        return (f"  {sc:<22} {r.get('variant', ''):<13} conns {r['conns']}  {fmt(r['requests_per_s'])} req/s  server {fmt(r['server_cores'])} core"
                f" {fmt(r['server_us_per_request'])} µs/req  lat p50 {fmt(r['lat_p50_ms'])} p99 {fmt(r['lat_p99_ms'])} max {fmt(r['lat_max_ms'])} ms"
                f"  {r['statuses']}  {cpu}")  # fmt: skip
    if sc == "idle":
        return (f"  idle  {fmt(r['connections'])} conns ({r['sse']} SSE + {r['ws']} WS) in {r['connect_s']} s"
                f" ({fmt(r['server_us_per_connect'])} µs server CPU each)  RSS {fmt(r['rss_kib_per_conn'])} KiB/conn"
                f"  idle CPU {fmt(r['idle_server_cores'])} core  one update: {fmt(r['delivered'])} delivered, p50 {fmt(r['one_update_p50_ms'])}"
                f" p99 {fmt(r['one_update_p99_ms'])} max {fmt(r['one_update_max_ms'])} ms ({fmt(r['server_us_per_delivery'])} µs/dlv)"
                f"  lost {r['lost_terminal']}")  # fmt: skip
    if sc == "start":
        return (f"  start  {r['jobs']} jobs, one per {r['interval_s']} s, one worker: 202 -> running p50 {fmt(r['p50_ms'])}"
                f" p99 {fmt(r['p99_ms'])} max {fmt(r['max_ms'])} ms  missing {r['missing']}")  # fmt: skip
    return "  " + json.dumps(r)


def summary_line(s: dict[str, Any]) -> str:
    sc = s["scenario"]
    if "failed" in s:
        return f"{sc:<16} FAILED: {s['failed'][:300]}"
    if sc == "ws-impls":
        parts = [f"{k}: max {fmt(v['max_deliveries_per_s'])} dlv/s, "
                 + ", ".join(f"{fmt(st['server_us_per_delivery'])} µs@{fmt(st['rate'])}" for st in v["steps"]) for k, v in s.items()
                 if k in WS_IMPLS]  # fmt: skip
        return f"{sc:<16} " + " | ".join(parts)
    if sc.startswith(("fanout", "hot", "ws-impl:", "floor")):
        ref = s.get("at_1000") or s.get("at_10") or (s["steps"][0] if s["steps"] else {})
        ratio = (f" hot-ws/floor: {s['server_vs_floor_at_10']}x CPU per delivery at 10 upd/s, {s['server_vs_floor_max']}x max dlv/s;"
                 if "server_vs_floor_at_10" in s else "")  # fmt: skip
        return (f"{sc:<16} {s['watchers']} watchers/{s['jobs']} jobs: max {fmt(s['max_deliveries_per_s'])} dlv/s"
                f" (kept up to {fmt(s['max_kept_up_rate'])} upd/s); at {fmt(ref.get('rate'))} upd/s: {fmt(ref.get('server_us_per_delivery'))} µs/dlv,"
                f" p50 {fmt(ref.get('lat_p50_ms'))} p99 {fmt(ref.get('lat_p99_ms'))} max {fmt(ref.get('lat_max_ms'))} ms;"
                f" RSS {fmt(s['rss_kib_per_conn'])} KiB/conn; lost {s['lost_terminal']};{ratio} {s['took_s']} s")  # fmt: skip
    if sc == "submit":
        b = s["best"]
        return f"{sc:<16} {fmt(b['requests_per_s'])} POST/s at {b['conns']} conns, {fmt(b['server_us_per_request'])} µs/req, p50 {fmt(b['lat_p50_ms'])} p99 {fmt(b['lat_p99_ms'])} ms; {s['took_s']} s"
    if sc == "poll":
        return (f"{sc:<16} plain {fmt(s['plain']['requests_per_s'])} GET/s ({fmt(s['plain']['server_us_per_request'])} µs, p99 {fmt(s['plain']['lat_p99_ms'])} ms);"
                f" If-None-Match {fmt(s['if-none-match']['requests_per_s'])} GET/s ({fmt(s['if-none-match']['server_us_per_request'])} µs,"
                f" p99 {fmt(s['if-none-match']['lat_p99_ms'])} ms); {s['took_s']} s")  # fmt: skip
    if sc == "idle":
        return (f"{sc:<16} {fmt(s['connections'])} conns: RSS {fmt(s['rss_kib_per_conn'])} KiB/conn, one update to all p50 {fmt(s['one_update_p50_ms'])}"
                f" p99 {fmt(s['one_update_p99_ms'])} max {fmt(s['one_update_max_ms'])} ms, {fmt(s['delivered'])} delivered, lost {s['lost_terminal']}; {s['took_s']} s")  # fmt: skip
    if sc == "start":
        return f"{sc:<16} 202 -> running p50 {fmt(s['p50_ms'])} p99 {fmt(s['p99_ms'])} max {fmt(s['max_ms'])} ms ({s['jobs']} jobs, missing {s['missing']}); {s['took_s']} s"
    return f"{sc:<16} {json.dumps(s)[:300]}"


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(prog="python -m bench", description="Benchmark of the progress server (issue 7); `--only soak --minutes N`: the soak (issue 18).")
    p.add_argument("--quick", action="store_true", help="each scenario briefly (about 2 minutes in all)")
    p.add_argument("--only", help=f"comma-separated scenarios, in order; of: {', '.join(SCENARIOS)}; or soak (alone, see --minutes)")
    p.add_argument("--skip", help="comma-separated scenarios to leave out")
    p.add_argument("--measure", type=float, help="seconds measured per step")
    p.add_argument("--warm", type=float, help="seconds of warm-up per step")
    p.add_argument("--agents", type=int, help="load-generator processes (default 2)")
    p.add_argument("--servers", type=int, help="server processes (default 1; connections spread round robin)")
    p.add_argument("--ws-impls", help=f"uvicorn WebSocket implementations to compare (default {','.join(WS_IMPLS)})")
    p.add_argument("--fanout-rates", help="comma-separated total update rates for fanout-ws/fanout-sse")
    p.add_argument("--hot-rates", help="comma-separated update rates for hot-ws")
    p.add_argument("--idle", type=int, help="connections held by the idle scenario (default 10000)")
    p.add_argument("--connections", type=int, help="connections held by the connections scenario (default 100000)")
    p.add_argument("--profile", action="store_true", help="py-spy the server during each measured window")
    p.add_argument("--hot-sse-rates", help="comma-separated update rates for hot-sse")
    p.add_argument("--log-level", help="server LOG_LEVEL (default info, as shipped)")
    p.add_argument("--quiet-wait", type=float, help="seconds to wait for a quiet machine before each scenario (default 60)")
    p.add_argument("--results", help="JSON-lines file to append to")
    p.add_argument("--minutes", type=float, help="soak: minutes of load (default 10)")
    p.add_argument("--kill-every", type=float, help="soak: SIGKILL a worker every this many seconds (default 180)")
    p.add_argument("--soak-rate", type=float, help="soak: submits per second (default 20)")
    p.add_argument("--soak-watchers", type=int, help="soak: watch sessions at once (default 30)")
    p.add_argument("--drain", type=float, help="soak: seconds to wait for final states after the load (default 60)")
    a = p.parse_args(argv)
    kw: dict[str, Any] = {}
    for name in ("measure", "warm", "agents", "servers", "idle", "connections", "quiet_wait", "minutes", "kill_every", "soak_rate", "soak_watchers", "drain"):
        if getattr(a, name) is not None:
            kw[name] = getattr(a, name)
    if a.log_level:
        kw["log_level"] = a.log_level
    if a.results:
        kw["results"] = Path(a.results).resolve()
    if a.ws_impls:
        kw["ws_impls"] = a.ws_impls.split(",")
    for name in ("fanout_rates", "hot_rates", "hot_sse_rates"):
        if getattr(a, name):
            kw[name] = [float(x) for x in getattr(a, name).split(",")]
    cfg = Config.quick_mode(**kw) if a.quick else Config(**kw)
    if a.profile:
        cfg.profile = True
        cfg.measure = max(cfg.measure, 10.0) if not a.measure else cfg.measure
    if a.only:
        cfg.only = [s.strip() for s in a.only.split(",") if s.strip()]
    if a.skip:
        cfg.only = [s for s in cfg.only if s not in a.skip.split(",")]
    unknown = [s for s in cfg.only if s not in SCENARIOS + EXTRA]
    if unknown:
        p.error(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS + EXTRA)}")
    if "soak" in cfg.only and cfg.only != ["soak"]:
        p.error("the soak runs alone: --only soak")
    return cfg


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    limit = raise_fd_limit()
    need = cfg.idle + 200
    if "idle" in cfg.only and limit < need:
        cfg.idle = max(100, (limit - 200) // 2 * 2)
        print(f"bench: open-file limit {limit}: the idle scenario holds {cfg.idle} connections instead", file=sys.stderr)
    try:
        import uvloop
    except ImportError:
        uvloop = None
    if cfg.only == ["soak"]:
        from bench.soak import Soak

        bench = Soak(cfg)
    else:
        bench = Bench(cfg)

    async def guarded() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            async with asyncio.timeout(cfg.budget):
                await bench.run()
        except TimeoutError:
            print(f"bench: stopped at the {cfg.budget:.0f} s budget", file=sys.stderr)
            raise
        finally:
            await bench.stop()

    try:
        (uvloop.run if uvloop else asyncio.run)(guarded())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    except TimeoutError:
        return 1
    finally:
        bench.children.stop_all()  # in case the loop died before its own clean-up
    print(f"results appended to {cfg.results}", flush=True)
    failed = [s["scenario"] for s in bench.summary if "failed" in s]
    return 1 if failed else 0
