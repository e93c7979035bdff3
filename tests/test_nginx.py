"""Two server replicas behind Debian's nginx running the shipped ``deploy/nginx.conf``.

The config under test is the shipped file with only what must differ swapped (``shipped_conf``):
Docker's resolver and ``server:8000`` become an ``upstream`` of loopback replicas, the listen
port a free one, logs and temporary files go to the test's folder; every proxy directive
(buffering, timeouts, headers, next upstream, the upgrade map) is the file's own. nginx runs as
a child process (``daemon off``) on a free loopback port and is stopped by its PID.

Clients use other loopback source addresses (127.0.0.2, ...) where the test needs to tell
clients apart: nginx sees them as different client addresses, as it would on a network.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from client import AsyncClient
from core.devredis import free_port
from support import (
    ROOT, SSE, TERMINAL, Proc, assert_stream_ok, async_wait_until, sse_frames, start_server, submit, tally, wait_until,
)

pytestmark = pytest.mark.anyio

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
SHIPPED = ROOT / "deploy" / "nginx.conf"
# Replicas as docker-compose.yml runs them (trusting the balancer's X-Forwarded-*), with SSE
# heartbeats well inside the short read timeout of the idle-stream test.
REPLICA = {"forwarded_allow_ips": "*", "sse_ping": 0.5}


def shipped_conf(folder: Path, port: int, upstreams: list[int], read_timeout: str | None = None) -> str:
    """``deploy/nginx.conf`` with Docker's parts swapped for loopback ones; ``read_timeout``
    replaces its ``proxy_read_timeout`` (the idle-stream test's one deliberate change)."""
    text = SHIPPED.read_text()

    def swap(old: str, new: str) -> None:
        nonlocal text
        assert text.count(old) == 1, f"deploy/nginx.conf no longer has {old!r} exactly once: update tests/test_nginx.py"
        text = text.replace(old, new)

    servers = " ".join(f"server 127.0.0.1:{p};" for p in upstreams)
    temp = "\n".join(f"    {kind}_temp_path {folder / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    swap(
        "resolver 127.0.0.11 valid=10s ipv6=off;",
        f"upstream replicas {{ {servers} }}\n"
        "    log_format upstreams '$remote_addr \"$request\" $status upstream=$upstream_addr';\n"
        f"    access_log {folder / 'access.log'} upstreams;\n{temp}",
    )
    swap("set $servers http://server:8000;", "set $servers http://replicas;")  # the upstream group
    swap("listen 8000;", f"listen 127.0.0.1:{port};")
    if read_timeout is not None:
        swap("proxy_read_timeout 1h;", f"proxy_read_timeout {read_timeout};")
    if os.geteuid() == 0:  # nginx's workers would run as nobody, who cannot enter pytest's folders
        text = "user root;\n" + text
    return text


class Nginx:
    """nginx in the foreground on a free loopback port with ``shipped_conf``; stopped by its PID."""

    def __init__(self, folder: Path, upstreams: list[Proc], read_timeout: str | None = None) -> None:
        self.folder = folder / f"nginx-{time.monotonic_ns()}"
        self.folder.mkdir(parents=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws"
        self.conf = self.folder / "nginx.conf"
        self.conf.write_text(shipped_conf(self.folder, self.port, [s.port for s in upstreams], read_timeout))
        self.proc: subprocess.Popen | None = None

    def start(self) -> Nginx:
        assert Path(NGINX).exists(), "no nginx: `make test` installs Debian's (make nginx)"
        directives = f"daemon off; pid {self.folder / 'nginx.pid'}; error_log {self.folder / 'error.log'};"
        with open(self.folder / "stderr.log", "ab") as out:
            command = [NGINX, "-c", str(self.conf), "-p", str(self.folder), "-g", directives]
            self.proc = subprocess.Popen(command, stdout=out, stderr=out)

        def up() -> bool:  # listening (no request: it would move the round robin and count for failures)
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited:\n{self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                return False

        try:
            wait_until(up, timeout=10, what="nginx")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM (nginx's fast shutdown: the master stops its worker), SIGKILL both if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        workers = [int(pid) for pid in children.read_text().split()] if children.exists() else []
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            for pid in [self.proc.pid, *workers]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.wait(5)

    def log(self) -> str:
        logs = (self.folder / "stderr.log", self.folder / "error.log")
        return "\n".join(path.read_text(errors="replace") for path in logs if path.exists())

    def access_log(self) -> list[str]:
        path = self.folder / "access.log"
        return path.read_text().splitlines() if path.exists() else []


@contextlib.contextmanager
def processes():
    """A list to put started processes (servers, nginx) in; each is stopped at the end, last first."""
    procs: list = []
    try:
        yield procs
    finally:
        for proc in reversed(procs):
            proc.stop()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("nginx")


@pytest.fixture(scope="module")
def replicas(redis_server, worker, folder):
    procs = []
    try:
        for _ in range(2):
            procs.append(start_server(redis_server.url, folder, **REPLICA))
        yield procs
    finally:
        for proc in procs:
            proc.stop()


@pytest.fixture(scope="module")
def proxy(replicas, folder):
    nginx = Nginx(folder, replicas).start()
    yield nginx
    nginx.stop()


# -- clients ------------------------------------------------------------------------------


async def ws_watch(url: str, job_id: str, docs: list[dict], started: asyncio.Event | None = None, **connect_args) -> int:
    """Watch one job over WebSocket to its final state, appending to ``docs``; on a close (1012
    for a drain), a refused connection or a 502/503 handshake, reconnect and resume with
    ``since``. Returns the number of reconnections."""
    reconnects = 0
    while True:
        try:
            async with connect(url, open_timeout=5, **connect_args) as ws:
                since = {job_id: docs[-1]["seq"]} if docs else {}
                await ws.send(json.dumps({"op": "subscribe", "jobs": [job_id], "since": since}))
                async for raw in ws:
                    message = json.loads(raw)
                    assert message["event"] != "error", message
                    docs.append(message["job"])
                    if started is not None:
                        started.set()
                    if message["job"]["status"] in TERMINAL:
                        return reconnects
        except InvalidStatus as refused:
            status = refused.response.status_code
            assert status in (502, 503), f"the WebSocket handshake through nginx was answered {status}"
        except (ConnectionClosed, InvalidHandshake, OSError):
            pass
        reconnects += 1
        await asyncio.sleep(0.1)


async def first_event_after(client: httpx.AsyncClient, url: str) -> float:
    """Seconds from sending a stream request to reading its first SSE event."""
    started = time.perf_counter()
    try:
        async with asyncio.timeout(2), client.stream("GET", url) as response:
            assert response.status_code == 200
            async for item in sse_frames(response):
                if isinstance(item, SSE):
                    return time.perf_counter() - started
    except TimeoutError:
        raise AssertionError(f"no event within 2 s on {url}: something holds the stream's events") from None
    raise AssertionError("the stream ended without an event")


async def arrivals(client: httpx.AsyncClient, url: str) -> dict[int, float]:
    """``seq -> perf_counter()`` at which each event of a job's stream was read, to its end."""
    seen: dict[int, float] = {}
    async with client.stream("GET", url) as response:
        assert response.status_code == 200
        async for item in sse_frames(response):
            if isinstance(item, SSE):
                seen[item.doc["seq"]] = time.perf_counter()
    return seen


# -- the tests ----------------------------------------------------------------------------


def test_shipped_file_is_valid(tmp_path):
    """``nginx -t`` on deploy/nginx.conf itself, as docker-compose.yml mounts it."""
    assert Path(NGINX).exists(), "no nginx: `make test` installs Debian's (make nginx)"
    directives = f"pid {tmp_path / 'nginx.pid'}; error_log {tmp_path / 'error.log'};"
    command = [NGINX, "-t", "-c", str(SHIPPED), "-p", str(tmp_path), "-g", directives]
    check = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr


async def test_websocket_through_nginx(proxy):
    """The upgrade passes (Upgrade/Connection from the map, HTTP/1.1), and the same-origin check
    holds behind the proxy (Host forwarded with its port): a job is seen to its final state."""
    async with httpx.AsyncClient(timeout=10) as client:
        job = await submit(client, proxy.url, steps=5, interval=0.05)
    docs: list[dict] = []
    reconnects = await asyncio.wait_for(ws_watch(proxy.ws_url, job["id"], docs, origin=proxy.url), 20)
    assert reconnects == 0
    assert_stream_ok(docs, "succeeded")
    assert docs[-1]["progress"] == 100.0


async def test_sse_is_not_buffered(replicas, proxy):
    """Events pass through nginx as they come, not when a buffer fills or the response ends: the
    first event of a stream, and each progress event watched side by side, arrive through the
    proxy within a few ms of the same on a direct connection."""
    direct = replicas[0].url
    async with httpx.AsyncClient(timeout=10) as client:
        # the first event: a running job's current document, on a fresh connection each time
        running = await submit(client, proxy.url, steps=100, interval=0.2)
        path = running["links"]["events"]
        times: dict[str, list[float]] = {"direct": [], "proxied": []}
        for _ in range(7):
            for name, base in (("direct", direct), ("proxied", proxy.url)):
                async with httpx.AsyncClient(timeout=10) as fresh:
                    times[name].append(await first_event_after(fresh, base + path))
        await client.delete(proxy.url + running["links"]["self"])
        first = {name: statistics.median(values) for name, values in times.items()}
        print(f"first SSE event, median of 7: direct {first['direct'] * 1000:.1f} ms, through nginx {first['proxied'] * 1000:.1f} ms")
        assert first["proxied"] - first["direct"] < 0.05, times

        # progress events: the same job watched directly and through nginx at once
        job = await submit(client, proxy.url, steps=10, interval=0.15)
        path = job["links"]["events"]
        both = (arrivals(client, base + path) for base in (direct, proxy.url))
        direct_seen, proxied_seen = await asyncio.wait_for(asyncio.gather(*both), 20)
    common = sorted(set(direct_seen) & set(proxied_seen))
    lag = [proxied_seen[seq] - direct_seen[seq] for seq in common if seq > min(common)]  # after both were connected
    median, worst = statistics.median(lag) * 1000, max(lag) * 1000
    print(f"progress events through nginx, later than direct by: median {median:.2f} ms, max {worst:.2f} ms ({len(lag)} events)")
    assert len(lag) >= 8, (direct_seen, proxied_seen)
    assert statistics.median(lag) < 0.05 and max(lag) < 0.1, lag  # none waited for the next one (0.15 s later)


async def test_drained_replica_hands_its_clients_to_the_other(redis_server, redis_client, replicas, folder):
    """SIGTERM one of two replicas while SSE (the Python client) and WebSocket clients watch
    slow jobs through nginx: its streams end (SSE) or close with 1012 (WebSocket), the clients
    come back through nginx, which sends them to the other replica, and every one ends with the
    job's final state, seq strictly rising: no repeat, no loss."""
    staying = replicas[0]
    with processes() as procs:
        procs.append(leaving := start_server(redis_server.url, folder, **REPLICA))
        procs.append(nginx := Nginx(folder, [leaving, staying]).start())
        async with httpx.AsyncClient(timeout=10) as client:
            jobs = [await submit_type(client, nginx.url, "long", seconds=5) for _ in range(4)]
            sse_seen: list[list[dict]] = [[] for _ in jobs]
            ws_seen: list[list[dict]] = [[] for _ in jobs]
            reconnects: list[int] = []

            async def sse(job: dict, docs: list[dict], started: asyncio.Event) -> None:
                async with AsyncClient(nginx.url, timeout=10) as watcher:
                    async for doc in watcher.watch(job["id"], timeout=30):
                        docs.append(doc)
                        started.set()

            async def ws(job: dict, docs: list[dict], started: asyncio.Event) -> None:
                reconnects.append(await ws_watch(nginx.ws_url, job["id"], docs, started))

            async def held_by_leaving() -> dict[str, float] | None:
                text = (await client.get(leaving.url + "/metrics")).text
                held = {t: float(n) for t, n in re.findall(r'^progress_connections\{transport="(\w+)"\} (\S+)$', text, re.M)}
                return held if held.get("sse", 0) >= 1 and held.get("ws", 0) >= 1 else None

            async def all_running() -> bool:
                return all(docs and docs[-1]["status"] == "running" for docs in sse_seen + ws_seen)

            tasks = []
            try:
                # one connection at a time, two of a kind in a row: nginx's round robin alternates
                # between the replicas, so each gets SSE and WebSocket clients
                for i in (0, 2):
                    for watch, seen in ((sse, sse_seen), (ws, ws_seen)):
                        for job, docs in zip(jobs[i : i + 2], seen[i : i + 2]):
                            started = asyncio.Event()
                            tasks.append(asyncio.create_task(watch(job, docs, started)))
                            await asyncio.wait_for(started.wait(), 10)
                on_leaving = await async_wait_until(held_by_leaving, what="SSE and WebSocket clients on the leaving replica")
                await async_wait_until(all_running, what="every job running")
                leaving.send(signal.SIGTERM)
                stopped = time.monotonic()
                await asyncio.to_thread(leaving.proc.wait, 10)  # the watchers go on meanwhile
                drained = time.monotonic() - stopped
                assert drained < 4, "drain took too long"
                await asyncio.wait_for(asyncio.gather(*tasks), 30)
            finally:
                for task in tasks:
                    task.cancel()

    for seen in (sse_seen, ws_seen):
        finals, reruns, lost = tally(redis_client, jobs, seen)  # each: seq strictly rising, one final, the stored one
        assert (finals["succeeded"], reruns, lost) == (len(jobs), 0, 0)
    # the clients that were on the leaving replica came back through nginx, to the other one
    assert sum(reconnects) >= on_leaving["ws"], reconnects
    log = nginx.access_log()
    moved = 0
    for job in jobs:
        upstreams = [line.rpartition("upstream=")[2] for line in log if f"/jobs/{job['id']}/events" in line]
        if upstreams[0] == f"127.0.0.1:{leaving.port}":
            moved += 1
            assert upstreams[-1].endswith(f"127.0.0.1:{staying.port}"), upstreams
    assert moved >= on_leaving["sse"], log
    # nginx itself took them to the other replica (proxy_next_upstream): none was answered an error
    assert not [line for line in log if re.search(r'" 5\d\d ', line)], log
    assert "Traceback" not in leaving.log()
    print(f"drain behind nginx: {on_leaving} streams on the leaving replica, {sum(reconnects)} WebSocket and {moved} SSE"
          f" clients moved, replica gone {drained:.2f} s after SIGTERM, every job watched to its end by all 8 clients")


async def test_forwarded_for_is_honoured_and_cannot_be_forged(redis_server, worker, folder):
    """Behind nginx every request reaches the server from 127.0.0.1; the server takes the client's
    address from X-Forwarded-For (FORWARDED_ALLOW_IPS, as docker-compose.yml sets it). Clients at
    different addresses get separate rate-limit buckets (shared by the replicas), the access log
    names them, and a client cannot pick its own address by sending X-Forwarded-For itself."""
    with processes() as procs:
        for _ in range(2):
            procs.append(start_server(redis_server.url, folder, **REPLICA, rate_submit=3))
        servers = list(procs)
        procs.append(nginx := Nginx(folder, servers).start())
        if time.time() % 60 > 45:  # the rate limit's fixed 60 s window must not turn over midway
            await asyncio.sleep(60.5 - time.time() % 60)

        def client_at(address: str) -> httpx.AsyncClient:
            transport = httpx.AsyncHTTPTransport(local_address=address)  # the client's source address
            return httpx.AsyncClient(base_url=nginx.url, timeout=10, transport=transport)

        async def submit_as(client: httpx.AsyncClient, request_id: str, **headers: str) -> int:
            body = {"type": "demo", "params": {"steps": 1, "interval": 0}}
            return (await client.post("/jobs", json=body, headers={"X-Request-ID": request_id, **headers})).status_code

        async with client_at("127.0.0.2") as a, client_at("127.0.0.3") as b:
            answers = [await submit_as(a, f"xff-a-{i}") for i in range(4)]
            forged = await submit_as(a, "xff-forged", **{"X-Forwarded-For": "198.51.100.7"})
            other = await submit_as(b, "xff-b")
        assert answers == [202, 202, 202, 429], answers  # one bucket for 127.0.0.2, across both replicas
        assert forged == 429, "a client escaped its rate limit by sending its own X-Forwarded-For"
        assert other == 202  # 127.0.0.3: a bucket of its own

        def access_log() -> dict[str, str]:
            lines = [json.loads(line) for server in servers for line in server.log().splitlines() if line.startswith("{")]
            ours = [e for e in lines if e.get("logger") == "server.access" and e.get("request_id", "").startswith("xff-")]
            return {e["request_id"]: e["client"] for e in ours}

        clients = wait_until(lambda: len(log := access_log()) == 6 and log, what="the access log lines")
        assert clients == {**{f"xff-a-{i}": "127.0.0.2" for i in range(4)}, "xff-forged": "127.0.0.2", "xff-b": "127.0.0.3"}


async def test_full_replica_is_skipped(redis_server, replicas, folder):
    """A replica at MAX_CONNECTIONS answers 503 (uvicorn's limit); nginx tries the other one
    (``proxy_next_upstream ... http_503``), so a client never sees it. (nginx repeats only
    idempotent requests: a POST answered 503 would come back to the client, with Retry-After.)"""
    with processes() as procs:
        procs.append(full := start_server(redis_server.url, folder, **REPLICA, max_connections=2))
        procs.append(nginx := Nginx(folder, [full, replicas[0]]).start())
        async with httpx.AsyncClient(timeout=10) as client, client.stream("GET", full.url + "/events") as held:
            assert held.status_code == 200  # one open stream, and the next connection fills it
            assert (await client.get(full.url + "/jobs?limit=1")).status_code == 503
            answers = [(await client.get(nginx.url + "/jobs?limit=1")).status_code for _ in range(4)]
    assert answers == [200] * 4, answers
    first = nginx.access_log()[0]  # the round robin's first pick was the full replica: nginx went on
    assert first.endswith(f" 200 upstream=127.0.0.1:{full.port}, 127.0.0.1:{replicas[0].port}"), first


async def test_idle_sse_stream_survives_the_proxy_read_timeout(replicas, folder):
    """With nginx's read timeout cut to 2 s (the one deliberate change to the shipped file) and
    SSE_PING at 0.5 s, a stream idle for over three timeouts stays open, then still delivers.
    The control: a long poll, silent until its answer, is cut by the same nginx (504)."""
    with processes() as procs, contextlib.ExitStack() as stack:
        procs.append(nginx := Nginx(folder, replicas, read_timeout="2s").start())
        async with httpx.AsyncClient(base_url=nginx.url, timeout=30) as client:
            job = await submit_type(client, nginx.url, "long", seconds=120, report_every=1)  # runs, reports nothing
            async with client.stream("GET", job["links"]["events"]) as response:
                assert response.status_code == 200
                frames: asyncio.Queue = asyncio.Queue()
                reader = asyncio.create_task(read_into(response, frames))
                stack.callback(reader.cancel)
                first = await next_event(frames, 10)
                if first.doc["status"] == "queued":
                    first = await next_event(frames, 10)
                assert first.doc["status"] == "running", first.doc

                long_poll = asyncio.create_task(client.get(job["links"]["self"], params={"wait": 20, "after": first.doc["seq"]}))
                stack.callback(long_poll.cancel)
                idle_until, pings = time.monotonic() + 7, 0  # more than three read timeouts
                while (left := idle_until - time.monotonic()) > 0:
                    with contextlib.suppress(TimeoutError):
                        item = await asyncio.wait_for(frames.get(), left)
                        assert item == {"comment": " ping"}, f"expected only heartbeats on the idle stream, got {item}"
                        pings += 1
                assert pings >= 8, pings
                assert (await long_poll).status_code == 504  # the 2 s read timeout is in force

                # the cancel goes to a replica directly: the long poll's two timeouts have just made
                # nginx skip both replicas for fail_timeout (10 s), as it would any failed upstream
                assert (await client.delete(replicas[0].url + job["links"]["self"])).status_code == 202
                last = await next_event(frames, 10)
                assert (last.doc["status"], last.doc["seq"] > first.doc["seq"]) == ("cancelled", True), last.doc
                await asyncio.wait_for(reader, 5)  # and the stream ends after the final event
    print(f"idle SSE stream through nginx (proxy_read_timeout 2s): {pings} heartbeats in 7 s, then the cancel arrived")


# -- helpers ------------------------------------------------------------------------------


async def submit_type(client: httpx.AsyncClient, base: str, job_type: str, **params) -> dict:
    r = await client.post(base + "/jobs", json={"type": job_type, "params": params})
    assert r.status_code == 202, r.text
    return r.json()


async def read_into(response: httpx.Response, frames: asyncio.Queue) -> None:
    """Put every item of an SSE stream into ``frames`` (waiting on a queue can time out and go
    on; waiting on the stream's iterator cannot), then None at its end."""
    async for item in sse_frames(response):
        frames.put_nowait(item)
    frames.put_nowait(None)


async def next_event(frames: asyncio.Queue, timeout: float) -> SSE:
    """The next SSE event from ``read_into``'s queue (heartbeats skipped), within ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while (item := await frames.get()) is not None:
            if isinstance(item, SSE):
                return item
    raise AssertionError("the stream ended")
