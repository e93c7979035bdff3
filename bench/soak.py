"""The soak (issue 18, point 6): ``python -m bench --only soak --minutes N [--kill-every S]``.

Not in the default list. For N minutes, against its own embedded Redis (AOF on, temp folder), one
``python -m server`` and two ``python -m worker`` on 127.0.0.1, with short TTLs (``TTLS``) so that
expiry happens within the run, it submits ``bench_soak`` jobs (bench/jobs.py) at a steady rate
(some fail, some are cancelled, some carry an Idempotency-Key and a third of those are sent again);
keeps watch sessions over WebSocket, SSE and long polling, each on a recent job until its end, or
leaving early and coming back with its cursor, plus one dashboard WebSocket on every job; SIGKILLs a
worker every ``--kill-every`` s and restarts it, and Redis once in the middle (same port and AOF).
Then it drains and counts, Jepsen style: accepted, final states, lost (no final state after the
drain), duplicates (on one stream, a seq that repeats or goes back, or a second final event), split
finals (two final states for one job), re-runs; RSS, Redis keys by prefix and memory at start (10 s
in), middle (before the Redis kill), end and after the drain; latency per minute. A final state is
seen by a watcher, the dashboard, or else the sweeper, which polls jobs that have none after 15 s.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import random
import signal
import sys
import time
import uuid
from typing import Any

import httpx
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import WebSocketException

from bench import stats
from bench.procs import Child, alive, loadavg, rss_kib
from bench.run import Bench, Config, fmt
from core.devredis import RedisProcess

TTLS = {"result_ttl": 60, "tombstone_ttl": 120, "idempotency_ttl": 120, "job_ttl": 300, "lease": 3}
SHOWN = ("progress:job:", "progress:gone:", "progress:result:", "progress:idem:", "progress:jobs:", "arq:")
FINAL = ("succeeded", "failed", "cancelled")
KINDS = ("ws", "sse", "poll")
LATENCY = "publish-to-receive: the worker's monotonic_ns() in the progress message, taken just before ctx.progress() stores and publishes it, to the WS/SSE client's read (in the soak process)"  # fmt: skip
ERRORS = (OSError, httpx.HTTPError, WebSocketException, ValueError, KeyError)
mono = time.monotonic_ns


class Soak(Bench):
    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        cfg.budget = cfg.minutes * 60 + cfg.drain + 300
        self.duration, self.redis_at = cfg.minutes * 60, cfg.minutes * 30
        self.workers: list[Child] = []
        self.started: list[int] = []  # every pid this soak started, checked at the end
        self.accepted: dict[str, float] = {}  # job id -> seconds into the run
        self.recent: collections.deque[str] = collections.deque(maxlen=60)  # what watchers pick from
        self.final: dict[str, tuple[str, int, int]] = {}  # job id -> (status, seq, attempt), first seen
        self.count: collections.Counter[str] = collections.Counter()
        self.problems: list[str] = []
        self.lat: dict[int, list[int]] = collections.defaultdict(list)  # minute -> µs
        self.samples: dict[str, dict[str, Any]] = {}
        self.minutes: list[dict[str, Any]] = []
        self.events: list[str] = []
        self.tasks: set[asyncio.Task] = set()
        self.last_answer: dict[str, str] = {}  # job id -> the sweeper's last answer for it
        self.loading, self.kills, self.t0 = True, 0, time.monotonic()
        self.restarting: set[int] = set()  # worker slots being replaced
        self.crashed: list[int] = []  # pids that exited without being killed
        self.sampling = asyncio.Lock()  # a sample's SCAN and the Redis kill do not overlap

    def env(self, **extra: Any) -> dict[str, str]:
        return super().env(**{**TTLS, **extra})

    def now(self) -> float:
        return time.monotonic() - self.t0

    def spawn(self, coro) -> None:
        self.tasks.add(task := asyncio.create_task(coro))
        task.add_done_callback(self.tasks.discard)

    def problem(self, kind: str, text: str) -> None:
        self.count[kind] += 1
        self.problems.append(f"{self.now():7.1f} s  {kind}: {text}")
        print("  !! " + self.problems[-1], flush=True)

    def event(self, text: str) -> None:
        self.events.append(f"{self.now():.0f} s: {text}")
        print(f"  -- {self.now():6.1f} s  {text}", flush=True)

    # -- processes ----------------------------------------------------------------------

    async def start(self) -> None:
        from redis.asyncio import Redis

        self.redis = RedisProcess(self.tmp / "redis").start()
        self.children.items.append(Child("redis", self.redis.proc, self.tmp / "redis" / "redis.log", self.redis.port, "redis"))
        await self.start_servers()
        self.port, self.r = self.ports[0], Redis.from_url(self.redis.url, socket_timeout=5)
        self.started += [self.redis.proc.pid, self.servers[0].pid]
        self.workers = [await self.start_worker_async(), await self.start_worker_async()]
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}", timeout=10, limits=httpx.Limits(max_connections=200))

    async def start_worker_async(self) -> Child:
        """``python -m worker``, ready once it listens on the wake channel (as ``Bench.start_worker``)."""

        async def listeners() -> int:
            with contextlib.suppress(Exception):  # Redis away: not ready yet
                return (await self.r.pubsub_numsub("progress:wake"))[0][1]
            return -1

        before, deadline = await listeners(), time.monotonic() + 30
        worker = self.children.spawn(f"worker-{len(self.started)}", [sys.executable, "-m", "worker"], self.env(), role="worker")
        self.started.append(worker.pid)
        while await listeners() <= before and time.monotonic() < deadline:
            if not worker.alive():
                raise RuntimeError(f"worker did not start:\n{worker.log_tail()}")
            await asyncio.sleep(0.05)
        return worker

    async def kill_worker(self, i: int | None = None) -> None:
        """SIGKILL worker ``i`` (by default the next in turn) and start another in its place."""
        if i is None:
            i, self.kills = self.kills % 2, self.kills + 1
        if i in self.restarting:  # the watchdog is replacing it already
            return
        old, t = self.workers[i], time.monotonic()
        self.restarting.add(i)
        with contextlib.suppress(ProcessLookupError):
            os.kill(old.pid, signal.SIGKILL)
        await asyncio.to_thread(old.proc.wait, 10)
        self.children.items.remove(old)
        self.workers[i] = await self.start_worker_async()
        self.restarting.discard(i)
        self.event(f"worker {i} (pid {old.pid}) {'SIGKILLed' if old.proc.returncode == -9 else 'gone'}; pid {self.workers[i].pid} ready {time.monotonic() - t:.1f} s later")  # fmt: skip

    async def watchdog(self) -> None:
        """A process that exits by itself is a finding (``crashes``); a worker is started again,
        as a supervisor would, so that the rest of the run still has two."""
        while True:
            await asyncio.sleep(1)
            for i, child in [*enumerate(self.workers), (-1, self.servers[0])]:
                if not child.alive() and i not in self.restarting and child.pid not in self.crashed:
                    self.crashed.append(child.pid)
                    tail = [line for line in child.log_tail(4000).splitlines() if line.strip()][-1:]
                    self.problem("crash", f"{child.name} (pid {child.pid}) exited with {child.proc.returncode}: {tail}; log {child.log_path}")
                    if i >= 0:
                        self.spawn(self.kill_worker(i))

    async def restart_redis(self) -> None:
        self.samples["middle"] = await self.sample()
        old, t = self.redis, time.monotonic()
        async with self.sampling:
            old.kill(signal.SIGKILL)
            self.children.items = [c for c in self.children.items if c.proc is not old.proc]
            await asyncio.sleep(1.0)
            self.redis = await asyncio.to_thread(RedisProcess(old.data_dir, port=old.port).start, 30)
        self.children.items.insert(0, Child("redis", self.redis.proc, old.data_dir / "redis.log", old.port, "redis"))
        self.started.append(self.redis.proc.pid)
        self.event(f"Redis (pid {old.proc.pid}) SIGKILLed; pid {self.redis.proc.pid} on port {old.port} from its AOF, down {time.monotonic() - t:.1f} s")  # fmt: skip

    async def chaos(self) -> None:
        every = self.cfg.kill_every
        plan = [(k * every, self.kill_worker) for k in range(1, int(self.duration // every) + 1) if k * every < self.duration]
        for at, act in sorted([*plan, (self.redis_at, self.restart_redis)], key=lambda p: p[0]):
            await asyncio.sleep(max(0.0, self.t0 + at - time.monotonic()))
            await act()

    # -- load ---------------------------------------------------------------------------

    async def submitter(self) -> None:
        rng, sem, n = random.Random(1), asyncio.Semaphore(64), 0
        while self.loading:
            n += 1
            if sem.locked():
                self.count["submit_skipped"] += 1  # 64 submits outstanding: the server is stuck
            else:
                self.spawn(self.submit_one(rng, sem))
            await asyncio.sleep(max(0.0, self.t0 + n / self.cfg.soak_rate - time.monotonic()))

    async def submit_one(self, rng: random.Random, sem: asyncio.Semaphore) -> None:
        x = rng.random()  # 5% last 4 s (so worker kills hit some), 8% fail, the others 0.2-0.8 s
        params = {"steps": 40} if x < 0.05 else {"steps": 4, "fail_at_step": 3} if x < 0.13 else {"steps": rng.randint(2, 8)}
        body = {"type": "bench_soak", "params": {**params, "interval": 0.1}}
        headers = {"Idempotency-Key": uuid.uuid4().hex} if rng.random() < 0.3 else {}
        repeat, cancel = bool(headers) and rng.random() < 1 / 3, rng.random() < 0.05
        self.count["idem_keyed"] += bool(headers)
        async with sem:
            doc = await self.post(body, headers)
        if doc and cancel:
            await asyncio.sleep(rng.uniform(0.05, 0.5))
            with contextlib.suppress(httpx.HTTPError):
                answer = await self.http.delete(f"/jobs/{doc['id']}")
                self.count[f"cancel_{answer.status_code}"] += 1
        if doc and repeat:
            await asyncio.sleep(rng.uniform(1, 30))
            again = await self.post(body, headers) if self.loading else None
            self.count["idem_repeats"] += again is not None
            if again and again["id"] != doc["id"]:
                self.problem("idem_mismatch", f"key {headers['Idempotency-Key']} gave {doc['id']}, then {again['id']}")

    async def post(self, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any] | None:
        self.count["submitted"] += 1
        try:
            r = await self.http.post("/jobs", json=body, headers=headers)
        except httpx.HTTPError:
            self.count["submit_no_answer"] += 1  # indeterminate: the job may exist
            return None
        self.count[f"submit_{r.status_code}"] += 1
        if r.status_code != 202:
            return None
        doc = r.json()
        if doc["id"] not in self.accepted:
            self.accepted[doc["id"]] = self.now()
            self.recent.append(doc["id"])
        return doc

    def see(self, kind: str, seen: dict[str, int], doc: dict[str, Any], now: int, since: int = 0) -> bool:
        """One document received on one stream (``seen``: its last seq per job); True if final.
        A resumed stream must start above ``since``; a poll may repeat a seq (its wait ran out)."""
        jid, seq, status = doc["id"], doc["seq"], doc["status"]
        last = seen.get(jid)
        floor = since if last is None else last
        if seq < floor or (seq == floor and kind != "poll" and floor):
            what = "second final event" if seq == floor and status in FINAL else "seq repeats or goes back"
            self.problem("duplicate", f"{kind}: job {jid}: {what}, seq {seq} ({status}) after {floor}")
        elif last is not None and status == "running" and kind != "poll" and (doc.get("message") or "").startswith("soak "):
            self.lat[int(self.now() // 60)].append((now - int(doc["message"].split()[2])) // 1000)
        seen[jid] = max(seq, last or 0)
        if status not in FINAL:
            return False
        prior = self.final.setdefault(jid, (status, seq, doc["attempt"]))
        if prior[:2] != (status, seq):
            self.problem("split_final", f"job {jid}: final {prior[:2]}, then {(status, seq)} ({kind})")
        return True

    def gone(self, kind: str, status: int) -> bool:
        """An error answer on a watch: 404/410 end the watch, anything else is retried."""
        self.count[f"watch_{kind}_{status}"] += 1
        return status in (404, 410)

    async def watch_ws(self, jid: str, since: int, seen: dict[str, int]) -> bool:
        async with ws_connect(f"ws://127.0.0.1:{self.port}/ws", open_timeout=5, close_timeout=1) as ws:
            await ws.send(json.dumps({"op": "subscribe", "jobs": [jid], **({"since": {jid: since}} if since else {})}))
            async for text in ws:
                now, msg = mono(), json.loads(text)
                if msg["event"] == "error":
                    return self.gone("ws", msg.get("status", 0))
                if self.see("ws", seen, msg["job"], now, since):
                    return True
        return False

    async def watch_sse(self, jid: str, since: int, seen: dict[str, int]) -> bool:
        headers = {"Accept": "text/event-stream", **({"Last-Event-ID": str(since)} if since else {})}
        async with self.http.stream("GET", f"/jobs/{jid}/events", headers=headers, timeout=httpx.Timeout(10, read=None)) as r:
            if r.status_code != 200:
                return r.status_code == 204 or self.gone("sse", r.status_code)  # 204: the client has the end
            data = None
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    data = line[6:]
                elif not line and data:
                    if self.see("sse", seen, json.loads(data), mono(), since):
                        return True
                    data = None
        return False

    async def watch_poll(self, jid: str, since: int, seen: dict[str, int]) -> bool:
        while True:
            r = await self.http.get(f"/jobs/{jid}", params={"wait": 5, "after": seen.get(jid, since), "redirect": 0})
            if r.status_code != 200:
                return self.gone("poll", r.status_code)
            if self.see("poll", seen, r.json(), mono(), since):
                return True

    async def watcher(self, k: int) -> None:
        """Watch a recent job to its end; 30% of visits leave after 0.2-1.5 s and come back
        0.2-2 s later (by any transport) from the last seq seen."""
        rng = random.Random(100 + k)
        while self.loading:
            live = [j for j in self.recent if j not in self.final]
            if not live:
                await asyncio.sleep(0.2)
                continue
            jid, since = rng.choice(live), 0
            for visit in range(4):
                kind, early, seen, t = rng.choice(KINDS), visit < 3 and rng.random() < 0.3, {}, time.monotonic()
                self.count[f"sessions_{kind}"] += 1
                self.count["resumed"] += visit > 0
                done = False
                try:
                    async with asyncio.timeout(rng.uniform(0.2, 1.5) if early else 30.0):
                        done = await getattr(self, f"watch_{kind}")(jid, since, seen)
                except TimeoutError:
                    self.count["left_early" if early else "watch_30s_timeout"] += 1
                    if not early and len(self.problems) < 100:  # what to look for in the logs
                        self.problems.append(f"{self.now():7.1f} s  watch: {kind} watcher of {jid} from seq {since}: no final state in 30 s")
                except ERRORS as e:
                    self.count[f"watch_{kind}_{type(e).__name__}"] += 1
                self.count[f"session_ms_{kind}"] += int((time.monotonic() - t) * 1000)
                since = seen.get(jid, since)
                # the final state seen just before a timeout (say, in the WebSocket's closing
                # handshake) ends the watch too: coming back from it, the stream has nothing newer
                done = done or (jid in self.final and since >= self.final[jid][1])
                if done or not self.loading:
                    break
                await asyncio.sleep(rng.uniform(0.2, 2.0))

    async def dashboard(self) -> None:
        """One WebSocket subscribed to every job, for the whole run (reconnecting if dropped)."""
        while True:
            seen: dict[str, int] = {}
            with contextlib.suppress(*ERRORS):
                async with ws_connect(f"ws://127.0.0.1:{self.port}/ws", open_timeout=5, close_timeout=1) as ws:
                    await ws.send('{"op":"subscribe","all":true}')
                    self.count["dashboard_connects"] += 1
                    async for text in ws:
                        now, msg = mono(), json.loads(text)
                        if msg["event"] != "error":
                            self.see("dashboard", seen, msg["job"], now)
            await asyncio.sleep(0.5)

    async def sweep(self, older: float) -> None:
        """Poll every accepted job that has no final state seen ``older`` s after its submit."""
        now, sem = self.now(), asyncio.Semaphore(8)

        async def one(jid: str) -> None:
            async with sem:
                with contextlib.suppress(httpx.HTTPError):
                    r = await self.http.get(f"/jobs/{jid}", params={"redirect": 0})
                    doc = r.json() if r.status_code == 200 else {}
                    self.last_answer[jid] = f"{doc['status']} seq {doc['seq']} attempt {doc['attempt']} updated {doc['updated_at']}" if doc else str(r.status_code)
                    if doc and self.see("sweep", {}, doc, mono()):
                        self.count["final_by_sweep"] += 1
                    elif r.status_code == 410:
                        self.final.setdefault(jid, ("gone", 0, 0))  # ended, and expired before anyone saw it

        await asyncio.gather(*(one(j) for j, t in list(self.accepted.items()) if j not in self.final and now - t > older))

    async def diagnose(self, jid: str) -> dict[str, Any]:
        """What Redis holds for a lost job: its document, its arq queue entry, record and lease."""
        from arq.constants import default_queue_name, in_progress_key_prefix, job_key_prefix

        with contextlib.suppress(Exception):
            return {"state": (await self.r.hget(f"progress:job:{jid}", "state") or b"").decode(), "doc_pttl_ms": await self.r.pttl(f"progress:job:{jid}"),
                    "queue_score": await self.r.zscore(default_queue_name, jid), "arq_job_exists": await self.r.exists(job_key_prefix + jid),
                    "lease_pttl_ms": await self.r.pttl(in_progress_key_prefix + jid)}  # fmt: skip
        return {}

    async def sweeper(self) -> None:
        while True:
            await asyncio.sleep(5)
            await self.sweep(15.0)

    # -- figures ------------------------------------------------------------------------

    async def sample(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t_s": round(self.now()), "rss_kib": {"server": rss_kib(self.servers[0].pid), "workers": [rss_kib(w.pid) for w in self.workers]}}  # fmt: skip
        keys: collections.Counter[str] = collections.Counter()
        zcard = {}
        try:
            async with self.sampling:
                async for key in self.r.scan_iter(count=1000):
                    k = key.decode()
                    keys[":".join(k.split(":")[:2]) + ":" if k.count(":") >= 2 else k] += 1
                    keys["arq:"] += k.startswith("arq:")
                    if k.startswith(("progress:jobs:", "progress:queued:", "arq:queue")) and await self.r.type(key) == b"zset":
                        zcard[k] = await self.r.zcard(key)
                out["redis"] = {"dbsize": await self.r.dbsize(), "used_memory": (await self.r.info("memory"))["used_memory"],
                                "keys": dict(sorted(keys.items())), "zcard": zcard}  # fmt: skip
        except Exception as e:  # Redis away (restarting): no Redis figures in this sample
            out["redis"] = {"error": repr(e)[:200]}
        return out

    async def ticker(self) -> None:
        prev: collections.Counter[str] = collections.Counter()
        for m in range(1, int(self.duration // 60) + 1):
            await asyncio.sleep(max(0.0, self.t0 + 60 * m - time.monotonic()))
            s, lat = await self.sample(), self.lat.get(m - 1, [])
            now = self.count + collections.Counter(accepted=len(self.accepted), final=len(self.final))
            d = {k: now[k] - prev[k] for k in {*now, *prev} if not k.startswith(("watch_", "cancel_"))}
            prev, red, rss = now, s["redis"], s["rss_kib"]
            s.update(minute=m, **d, lat_n=len(lat), lat_p50_ms=stats.ms(stats.exact(lat, 0.5)), lat_p99_ms=stats.ms(stats.exact(lat, 0.99)),
                     lat_max_ms=stats.ms(max(lat, default=None)), loadavg=loadavg())  # fmt: skip
            self.minutes.append(s)
            print(f"  min {m:>3}  POSTs {d.get('submitted', 0)} (not 202: {d.get('submitted', 0) - d.get('submit_202', 0)})  new jobs {d.get('accepted', 0)}"
                  f"  final {d.get('final', 0)}  watch sessions {sum(d.get(f'sessions_{k}', 0) for k in KINDS)} (left early {d.get('left_early', 0)})"
                  f"  lat p50 {fmt(s['lat_p50_ms'])} p99 {fmt(s['lat_p99_ms'])} max {fmt(s['lat_max_ms'])} ms (n {len(lat)})"
                  f"  RSS MiB server {rss['server'] // 1024} workers {'/'.join(str(w // 1024) for w in rss['workers'])}"
                  f"  Redis {fmt(red.get('dbsize'))} keys {fmt(red.get('used_memory', 0) / 2**20)} MiB  load {s['loadavg']:.2f}", flush=True)  # fmt: skip

    # -- the run ------------------------------------------------------------------------

    async def run(self) -> None:
        cfg = self.cfg
        print(f"soak {self.run_id}: {cfg.minutes:g} min, {cfg.soak_rate:g} submits/s, {cfg.soak_watchers} watchers + 1 dashboard, a worker "
              f"SIGKILLed every {cfg.kill_every:g} s, Redis at {self.redis_at:.0f} s, drain up to {cfg.drain:g} s; "
              f"{' '.join(f'{k.upper()}={v}' for k, v in TTLS.items())}; load {loadavg():.2f}; logs in {self.logs}", flush=True)  # fmt: skip
        await self.start()
        self.t0 = time.monotonic()
        for coro in (self.submitter(), self.dashboard(), self.sweeper(), self.ticker(), self.chaos(), self.watchdog(), *map(self.watcher, range(cfg.soak_watchers))):
            self.spawn(coro)
        await asyncio.sleep(min(10.0, self.duration / 4))
        self.samples["start"] = await self.sample()
        await asyncio.sleep(max(0.0, self.t0 + self.duration - time.monotonic()))
        self.loading = False
        self.samples["end"] = await self.sample()
        deadline = time.monotonic() + cfg.drain
        while time.monotonic() < deadline and any(j not in self.final for j in self.accepted):
            await asyncio.sleep(2)
            await self.sweep(0.0)
        self.samples["drained"] = await self.sample()
        lost = sorted(j for j in self.accepted if j not in self.final)
        diagnosis = {j: {"last_answer": self.last_answer.get(j, "none"), **await self.diagnose(j)} for j in lost[:20]}
        await self.stop()
        finals = collections.Counter(s for s, _, _ in self.final.values())
        rate, ok = len(self.accepted) / self.duration, finals["succeeded"] / max(1, len(self.final))
        expected = {"progress:job:": rate * TTLS["result_ttl"], "progress:result:": rate * ok * TTLS["result_ttl"],
                    "progress:gone:": rate * (TTLS["result_ttl"] + TTLS["tombstone_ttl"]),
                    "progress:idem:": self.count["idem_keyed"] / self.duration * TTLS["idempotency_ttl"],
                    "progress:jobs: members": rate * TTLS["tombstone_ttl"]}  # fmt: skip
        rec = {"scenario": "soak", "summary": True, "minutes": cfg.minutes, "rate": cfg.soak_rate, "watchers": cfg.soak_watchers,
               "kill_every_s": cfg.kill_every, "redis_restart_at_s": self.redis_at, "drain_s": cfg.drain, "ttls": TTLS, "latency": LATENCY,
               "accepted": len(self.accepted), "final": dict(finals), "lost": len(lost), "duplicates": self.count["duplicate"],
               "split_finals": self.count["split_final"], "idem_mismatch": self.count["idem_mismatch"], "crashes": self.crashed,
               "reruns": sum(1 for _, _, a in self.final.values() if a > 1), "counts": dict(sorted(self.count.items())),
               "lost_jobs": diagnosis, "problems": self.problems[:100],
               "steady_state_expected": {k: round(v) for k, v in expected.items()}, "events": self.events, "samples": self.samples,
               "per_minute": self.minutes, "survivors": [p for p in self.started if alive(p)]}  # fmt: skip
        bad = [k for k in ("lost", "duplicates", "split_finals", "idem_mismatch", "crashes", "survivors") if rec[k]]
        self.summary.append(self.record({**rec, **({"failed": f"{', '.join(bad)} not 0"} if bad else {})}))
        print_summary(rec, self.logs)

    async def stop(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for client in (getattr(self, "http", None), getattr(self, "r", None)):
            with contextlib.suppress(Exception):  # Redis may be gone already
                await client.aclose()
        self.http = self.r = None
        await super().stop()


def print_summary(r: dict[str, Any], logs) -> None:
    c, s = r["counts"], r["samples"]
    sessions = {k: f"{k} {c.get('sessions_' + k, 0)} of {c.get('session_ms_' + k, 0) / 1000 / max(1, c.get('sessions_' + k, 0)):.1f} s" for k in KINDS}
    print(f"\n== soak summary ({r['minutes']:g} min, {r['rate']:g} submits/s, {r['watchers']} watchers)\n"
          f"accepted {r['accepted']:,} jobs ({c.get('submitted', 0):,} POSTs: {', '.join(f'{k[7:]} {v}' for k, v in c.items() if k.startswith('submit_'))});"
          f" idempotent repeats {c.get('idem_repeats', 0)}, another id {r['idem_mismatch']} (must be 0);"
          f" cancels {', '.join(f'{k[7:]} {v}' for k, v in c.items() if k.startswith('cancel_'))}\n"
          f"final states: {', '.join(f'{k} {v:,}' for k, v in sorted(r['final'].items()))} ({c.get('final_by_sweep', 0)} seen by the sweeper only)"
          f"; LOST {r['lost']} (must be 0); DUPLICATES {r['duplicates']} (must be 0); split finals {r['split_finals']} (must be 0);"
          f" processes that exited by themselves {len(r['crashes'])} (must be 0);"
          f" re-runs (attempt > 1) {r['reruns']}\n"
          f"watch sessions: {', '.join(sessions.values())};"
          f" {c.get('left_early', 0)} left early, {c.get('resumed', 0)} came back with their cursor; dashboard connects {c.get('dashboard_connects', 0)};"
          f" errors: {', '.join(f'{k[6:]} {v}' for k, v in c.items() if k.startswith('watch_')) or 'none'}\n"
          f"latency ({r['latency']}), p50/p99/max ms by minute: "
          + "; ".join(f"{m['minute']}: {fmt(m['lat_p50_ms'])}/{fmt(m['lat_p99_ms'])}/{fmt(m['lat_max_ms'])}" for m in r["per_minute"]), flush=True)  # fmt: skip
    for label in (x for x in ("start", "middle", "end", "drained") if x in s):
        red, rss = s[label]["redis"], s[label]["rss_kib"]
        keys = ", ".join(f"{p} {red.get('keys', {}).get(p, 0):,}" for p in SHOWN)
        print(f"  {label:<8} {s[label]['t_s']:>5} s  RSS KiB server {rss['server']:,} workers {rss['workers']}  Redis dbsize {fmt(red.get('dbsize'))}"
              f" used_memory {fmt(red.get('used_memory'))} B; keys {keys};"
              f" zset members {', '.join(f'{k} {v:,}' for k, v in red.get('zcard', {}).items())} {red.get('error', '')}")  # fmt: skip
    print("  once the TTLs have turned over (after ~180 s of load), expect about: "
          + ", ".join(f"{k} {v:,}" for k, v in r["steady_state_expected"].items()) + "; arq: tens (queued and running jobs)")
    for line in [*(f"event {e}" for e in r["events"]), *(f"problem {p}" for p in r["problems"][:20]),
                 *(f"lost {j}: {a}; grep {j} {logs}/*.log" for j, a in r["lost_jobs"].items())]:  # fmt: skip
        print("  " + line)
    print(f"processes: {'all stopped' if not r['survivors'] else 'STILL RUNNING: ' + str(r['survivors'])}", flush=True)
