"""One load-generator process (``python -m bench.agent``), driven by the orchestrator.

Control: one JSON object per line on stdin (``{"id": n, "op": ..., ...}``), one reply per line
on stdout (``{"id": n, "ok": true, ...}``); every op runs as its own task, so a long ``publish``
does not block ``reset``/``stats``. The process exits when stdin closes (its parent is gone).

The clients are raw ``asyncio.Protocol`` implementations on uvloop, written so that the
generator is cheap per delivery (a few µs): WebSocket (RFC 6455, unmasked-payload trick: the
mask key is zero, so no XOR pass; optional permessage-deflate like a browser), SSE over
chunked HTTP/1.1, and a closed-loop keep-alive HTTP/1.1 client for POST /jobs and polling.

Every document the bench publishes carries ``"message": "bench <job index> <seq> <t_ns>"``
where ``t_ns`` is ``time.monotonic_ns()`` (CLOCK_MONOTONIC, shared by every process on the
machine) taken just before the update was sent to Redis. A client finds that marker with one
``bytes.find``, so it needs no JSON parsing per delivery.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import time
import traceback
import zlib
from typing import Any

mono = time.monotonic_ns
MARK = b'"message":"bench '
ATTEMPT_TIMEOUT = 30.0  # seconds one connection may take to open and get its snapshot before it is tried again
MARK_LEN = len(MARK)
WS_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


# -- measurements ---------------------------------------------------------------------------


class Hist:
    """Latency histogram in µs, ~1.5 % resolution, mergeable across processes."""

    __slots__ = ("counts", "max")

    def __init__(self) -> None:
        self.counts = [0] * 2048
        self.max = 0

    def add(self, us: int) -> None:
        if us < 128:
            if us < 0:
                us = 0
            self.counts[us] += 1
        else:
            s = us.bit_length() - 7
            self.counts[64 + s * 64 + (us >> s)] += 1
            if us > self.max:
                self.max = us
            return
        if us > self.max:
            self.max = us

    def dump(self) -> dict[str, Any]:
        return {"buckets": {i: c for i, c in enumerate(self.counts) if c}, "max": self.max}


class Counters:
    __slots__ = (
        "deliveries", "skipped", "disorder", "terminal", "errors", "unmarked", "hist",
        "requests", "statuses", "started", "bytes",
    )  # fmt: skip

    def __init__(self) -> None:
        self.deliveries = self.skipped = self.disorder = self.terminal = 0
        self.errors = self.unmarked = self.requests = self.bytes = 0
        self.statuses: dict[int, int] = {}
        self.hist = Hist()
        self.started = mono()

    def dump(self) -> dict[str, Any]:
        return {
            "deliveries": self.deliveries,
            "skipped": self.skipped,
            "disorder": self.disorder,
            "terminal": self.terminal,
            "errors": self.errors,
            "unmarked": self.unmarked,
            "requests": self.requests,
            "statuses": self.statuses,
            "bytes": self.bytes,
            "seconds": (mono() - self.started) / 1e9,
            "hist": self.hist.dump(),
        }


# -- stream clients -------------------------------------------------------------------------


class StreamConn(asyncio.Protocol):
    """Common part of the WS and SSE clients: per-job seq accounting and readiness."""

    def __init__(self, agent: Agent, jobs: list[tuple[str, int]]) -> None:
        self.agent = agent
        self.jobs = dict(jobs)  # job id -> index
        self.last: dict[int, int] = {}
        self.pending = set(self.jobs.values())  # jobs whose snapshot has not arrived yet
        self.done: set[int] = set()
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.head = True
        self.ready = asyncio.get_running_loop().create_future()
        self.closed = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed before ready: {exc}"))

    def doc(self, data: bytes, now: int, terminal: bool) -> None:
        agent = self.agent
        c = agent.c
        i = data.find(MARK)
        if i < 0:
            self.unmarked(data, terminal)
            return
        j = data.find(b'"', i + MARK_LEN)
        idx, seq, t = data[i + MARK_LEN : j].split(b" ")
        idx = int(idx)
        seq = int(seq)
        last = self.last.get(idx, 0)
        if seq <= last:
            c.disorder += 1
            return
        self.last[idx] = seq
        if last and seq > last + 1:
            c.skipped += seq - last - 1
        if terminal:
            c.terminal += 1
            self.done.add(idx)
            agent.terminal_total += 1
            if agent.terminal_total >= agent.terminal_expected and agent.terminal_waiter is not None:
                if not agent.terminal_waiter.done():
                    agent.terminal_waiter.set_result(None)
        t = int(t)
        if t:
            c.deliveries += 1
            c.hist.add((now - t) // 1000)
            if agent.first_arrival is not None:
                agent.arrivals.append((now - t) // 1000)
        if self.pending:
            self.pending.discard(idx)
            if not self.pending and not self.ready.done():
                self.ready.set_result(None)

    def unmarked(self, data: bytes, terminal: bool) -> None:
        """A document the bench did not write (e.g. a ``queued`` snapshot); only seq matters."""
        self.agent.c.unmarked += 1
        try:
            doc = json.loads(data[data.index(b"{", 1) :] if data.startswith(b'{"event"') else data)
            doc = doc.get("job", doc)
            idx = self.jobs.get(doc["id"])
        except (ValueError, KeyError, AttributeError):
            return
        if idx is None:
            return
        self.last[idx] = max(self.last.get(idx, 0), doc["seq"])
        if self.pending:
            self.pending.discard(idx)
            if not self.pending and not self.ready.done():
                self.ready.set_result(None)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class WSConn(StreamConn):
    """A WebSocket client of ``/ws`` subscribed to its jobs."""

    def __init__(self, agent: Agent, jobs: list[tuple[str, int]], deflate: bool = False) -> None:
        super().__init__(agent, jobs)
        self.offer_deflate = deflate
        self.inflater = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        ext = b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n" if self.offer_deflate else b""
        transport.write(
            b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + WS_KEY + b"\r\nSec-WebSocket-Version: 13\r\n" + ext + b"\r\n"
        )

    def send_text(self, payload: bytes, opcode: int = 0x1) -> None:
        n = len(payload)
        if n < 126:
            header = bytes((0x80 | opcode, 0x80 | n))
        elif n < 65536:
            header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
        else:
            header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
        self.transport.write(header + b"\0\0\0\0" + payload)  # zero mask key: payload as is

    def data_received(self, data: bytes) -> None:
        now = mono()
        agent = self.agent
        agent.c.bytes += len(data)
        buf = self.buf + data if self.buf else data
        if self.head:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            head = buf[:end].lower()
            if not head.startswith(b"http/1.1 101"):
                agent.c.errors += 1
                self.ready.done() or self.ready.set_exception(ConnectionError(head[:200].decode(errors="replace")))
                self.transport.close()
                return
            if b"permessage-deflate" in head:
                self.inflater = zlib.decompressobj(-15)
            self.head = False
            jobs = list(self.jobs)
            self.send_text(json.dumps({"op": "subscribe", "jobs": jobs}).encode())
            buf = buf[end + 4 :]
        pos, n = 0, len(buf)
        while n - pos >= 2:
            b0 = buf[pos]
            ln = buf[pos + 1] & 0x7F
            if ln < 126:
                hdr = 2
            elif ln == 126:
                if n - pos < 4:
                    break
                ln = (buf[pos + 2] << 8) | buf[pos + 3]
                hdr = 4
            else:
                if n - pos < 10:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                hdr = 10
            end = pos + hdr + ln
            if end > n:
                break
            payload = buf[pos + hdr : end]
            pos = end
            op = b0 & 0x0F
            if op == 1:
                if b0 & 0x40:
                    payload = self.inflater.decompress(payload + b"\x00\x00\xff\xff")
                if payload.startswith(b'{"event":"progress"'):
                    self.doc(payload, now, False)
                elif payload.startswith(b'{"event":"error"'):
                    agent.c.errors += 1
                    agent.last_error = payload[:300].decode(errors="replace")
                    if not self.ready.done():  # the subscribe was refused: this attempt failed
                        self.ready.set_exception(ConnectionError(agent.last_error))
                        self.transport.close()
                        self.closed = True
                else:
                    self.doc(payload, now, True)
            elif op == 9:
                self.send_text(payload, 0xA)
            elif op == 8:
                if not self.closed:
                    self.send_text(payload[:2], 0x8)
                self.transport.close()
                self.closed = True
                break
        self.buf = buf[pos:] if pos < n else b""


class SSEConn(StreamConn):
    """An SSE client of ``/jobs/{id}/events`` (HTTP/1.1, chunked)."""

    def __init__(self, agent: Agent, jobs: list[tuple[str, int]]) -> None:
        super().__init__(agent, jobs)
        self.job_id = next(iter(self.jobs))
        self.chunk_left = 0  # bytes of the current chunk still to come (+2 for its CRLF)
        self.text = b""  # de-chunked SSE text not yet split into events
        self.ended = False

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.write(
            b"GET /jobs/%s/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n" % self.job_id.encode()
        )

    def data_received(self, data: bytes) -> None:
        now = mono()
        agent = self.agent
        agent.c.bytes += len(data)
        buf = self.buf + data if self.buf else data
        if self.head:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            head = buf[:end].lower()
            if not head.startswith(b"http/1.1 200") or b"transfer-encoding: chunked" not in head:
                agent.c.errors += 1
                agent.last_error = head[:300].decode(errors="replace")
                self.ready.done() or self.ready.set_exception(ConnectionError(agent.last_error))
                self.transport.close()
                return
            self.head = False
            buf = buf[end + 4 :]
        pos, n = 0, len(buf)
        out = []
        while pos < n:
            if self.chunk_left:
                take = min(self.chunk_left, n - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self.chunk_left -= take
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            if eol == pos:  # the CRLF that ends a chunk
                pos += 2
                continue
            size = int(buf[pos:eol], 16)
            pos = eol + 2
            if size == 0:
                self.ended = True
                pos = n
                break
            self.chunk_left = size
        self.buf = buf[pos:] if pos < n else b""
        if not out:
            return
        text = self.text + b"".join(out) if self.text else (out[0] if len(out) == 1 else b"".join(out))
        start = 0
        while True:
            end = text.find(b"\n\n", start)
            if end < 0:
                break
            frame = text[start:end]
            start = end + 2
            if frame.startswith(b"id: "):
                if b"\nevent: progress\n" in frame:
                    self.doc(frame, now, False)
                else:
                    self.doc(frame, now, True)
        self.text = text[start:]
        # the stream ends after the terminal event; the connection stays open (keep-alive)

    def unmarked(self, data: bytes, terminal: bool) -> None:
        i = data.find(b"\ndata: ")
        super().unmarked(data[i + 7 :] if i >= 0 else data, terminal)


# -- closed-loop HTTP client ------------------------------------------------------------------


class HTTPConn(asyncio.Protocol):
    """Keep-alive HTTP/1.1 client: sends the next request as soon as a response is complete."""

    def __init__(self, agent: Agent, requests: list[bytes]) -> None:
        self.agent = agent
        self.requests = requests
        self.i = 0
        self.buf = b""
        self.need = -1  # bytes of body still to read, -1 = reading headers
        self.status = 0
        self.sent_at = 0
        self.transport: asyncio.Transport | None = None
        self.running = True
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.send()

    def send(self) -> None:
        req = self.requests[self.i % len(self.requests)]
        self.i += 1
        self.sent_at = mono()
        self.transport.write(req)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        while True:
            if self.need < 0:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                head = buf[:end]
                self.status = int(head[9:12])
                if self.status in (204, 304):
                    self.need = 0
                else:
                    low = head.lower()
                    i = low.find(b"content-length: ")
                    self.need = int(low[i + 16 : low.find(b"\r\n", i)]) if i >= 0 else 0
                buf = buf[end + 4 :]
            if len(buf) < self.need:
                break
            body, buf = buf[: self.need], buf[self.need :]
            self.need = -1
            self.done(body)
        self.buf = buf

    def done(self, body: bytes) -> None:
        agent = self.agent
        c = agent.c
        now = mono()
        if agent.counting:
            c.requests += 1
            c.statuses[self.status] = c.statuses.get(self.status, 0) + 1
            c.hist.add((now - self.sent_at) // 1000)
        if self.running and agent.http_running:
            self.send()
        else:
            self.transport.close()


# -- the agent ------------------------------------------------------------------------------


class Agent:
    def __init__(self) -> None:
        self.c = Counters()
        self.counting = False
        self.conns: list[StreamConn] = []
        self.http: list[HTTPConn] = []
        self.http_running = False
        self.terminal_total = 0
        self.terminal_expected = 1 << 62
        self.terminal_waiter: asyncio.Future | None = None
        self.first_arrival: int | None = None
        self.arrivals: list[int] = []
        self.last_error = ""
        self.redis = None
        self.docs: dict[str, dict[str, Any]] = {}  # publisher: job id -> current document
        self.index: dict[str, int] = {}
        self.tasks: set[asyncio.Task] = set()

    # ops: each returns a JSON-able dict

    async def op_ping(self) -> dict[str, Any]:
        return {"pid": os.getpid()}

    async def op_connect(self, host: str, port: int | list[int], kind: str, conns: list[list[list]], concurrency: int = 100,
                         deflate: bool = False, timeout: float = 60.0, source: str | None = None,
                         connect_timeout: float | None = None) -> dict[str, Any]:  # fmt: skip
        """Open one stream per entry of ``conns`` (a list of [job id, index] pairs), and wait for
        each one's snapshot(s). ``port`` may be a list: connections are spread round robin.
        ``source``: the local address to connect from (each loopback address has its own
        ephemeral ports)."""
        loop = asyncio.get_running_loop()
        ports = port if isinstance(port, list) else [port]
        sem = asyncio.Semaphore(concurrency)
        failed: list[str] = []
        started = time.monotonic()
        deadline = started + (connect_timeout or timeout)
        local = (source, 0) if source else None

        async def one(k: int, jobs: list[tuple[str, int]]) -> None:
            async with sem:
                for attempt in range(3):
                    factory = (lambda: WSConn(self, jobs, deflate)) if kind == "ws" else (lambda: SSEConn(self, jobs))
                    proto = None
                    try:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise TimeoutError("connect deadline")
                        async with asyncio.timeout(min(left, ATTEMPT_TIMEOUT)):  # a stuck attempt is tried again
                            _, proto = await loop.create_connection(factory, host, ports[k % len(ports)], local_addr=local)
                            self.conns.append(proto)
                            await proto.ready
                        return
                    except (OSError, ConnectionError, TimeoutError) as e:
                        if proto is not None:  # connected, but no snapshot in time (or refused)
                            proto.transport.close()
                            self.conns.remove(proto)
                        if attempt == 2 or time.monotonic() > deadline:
                            failed.append(repr(e)[:200])
                            return
                        await asyncio.sleep(0.05 * (attempt + 1))

        await asyncio.gather(*(one(k, [tuple(j) for j in jobs]) for k, jobs in enumerate(conns)))
        return {"connected": len(conns) - len(failed), "failed": len(failed), "errors": failed[:5],
                "seconds": time.monotonic() - started, "open": sum(1 for c in self.conns if not c.closed)}  # fmt: skip

    async def op_reset(self) -> dict[str, Any]:
        self.c = Counters()
        self.counting = True
        return {}

    async def op_stats(self, stop: bool = False) -> dict[str, Any]:
        out = self.c.dump()
        out["open"] = sum(1 for c in self.conns if not c.closed)
        out["last_error"] = self.last_error
        if stop:
            self.counting = False
        return out

    async def op_expect_terminal(self, count: int) -> dict[str, Any]:
        self.terminal_expected = count
        self.terminal_waiter = asyncio.get_running_loop().create_future()
        if self.terminal_total >= count:
            self.terminal_waiter.set_result(None)
        return {}

    async def op_wait_terminal(self, wait: float) -> dict[str, Any]:
        if self.terminal_waiter is not None:
            try:
                async with asyncio.timeout(wait):
                    await asyncio.shield(self.terminal_waiter)
            except TimeoutError:
                pass
        missing = sum(len(set(c.jobs.values()) - c.done) for c in self.conns)
        return {"terminal": self.terminal_total, "missing": missing}

    async def op_arrivals(self, start: bool) -> dict[str, Any]:
        """Record every delivery's latency individually (for a one-update-to-all burst)."""
        if start:
            self.first_arrival = 0
            self.arrivals = []
            return {}
        self.first_arrival = None
        return {"arrivals": self.arrivals}

    async def op_close(self) -> dict[str, Any]:
        for c in self.conns:
            c.close()
        n = len(self.conns)
        self.conns = []
        self.terminal_total = 0
        self.terminal_expected = 1 << 62
        self.terminal_waiter = None
        await asyncio.sleep(0.05)
        return {"closed": n}

    # HTTP load

    async def op_http_start(self, host: str, port: int | list[int], requests: list[str], conns: int) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        ports = port if isinstance(port, list) else [port]
        reqs = [r.encode("latin-1") for r in requests]
        self.http_running = True
        for k in range(conns):
            # each connection starts at a different request, so the paths are spread
            rotated = reqs[k % len(reqs) :] + reqs[: k % len(reqs)]
            _, proto = await loop.create_connection(lambda: HTTPConn(self, rotated), host, ports[k % len(ports)])
            self.http.append(proto)
        return {"conns": len(self.http)}

    async def op_http_stop(self) -> dict[str, Any]:
        self.http_running = False
        try:
            async with asyncio.timeout(10):
                await asyncio.gather(*(h.closed for h in self.http))
        except TimeoutError:
            for h in self.http:
                h.transport.close()
        self.http = []
        return {}

    # publisher (Redis)

    async def _redis(self, url: str):
        if self.redis is None:
            from redis.asyncio import Redis

            from core.settings import Settings
            from core.store import Store

            self.redis = Redis.from_url(url)
            self.settings = Settings.from_env({"REDIS_URL": url})
            import inspect

            # Store.write(doc, tenant, ...) in versions with tenants, Store.write(doc, ...) before
            self.tenant_arg = ("",) if "tenant" in inspect.signature(Store.write).parameters else ()
            self.store = Store(self.redis, self.settings)  # the real one: setup and final writes
        return self.redis

    async def op_setup_jobs(self, redis_url: str, n: int, job_type: str = "bench_feed") -> dict[str, Any]:
        """Create ``n`` jobs with ``Store.create`` and move each to ``running`` with ``Store.write``
        (the worker's own path), with the bench marker in ``message``."""
        await self._redis(redis_url)
        ids = []
        base = len(self.index)
        for k in range(n):
            idx = base + k
            created = await self.store.create(job_type, {})
            doc = created[0] if isinstance(created, tuple) else created  # (doc, created) in newer versions
            doc = await self.store.write(doc, *self.tenant_arg, status="running", attempt=1, started_at=_contract().now_iso(),
                                         message=f"bench {idx} {doc['seq'] + 1} 0")  # fmt: skip
            self.docs[doc["id"]] = doc
            self.index[doc["id"]] = idx
            ids.append([doc["id"], idx, doc["seq"]])
        return {"jobs": ids}

    def _changes(self, job_id: str, status: str = "running") -> dict[str, Any]:
        seq = self.docs[job_id]["seq"] + 1
        changes = {"status": status, "progress": 100.0 if status != "running" else float(seq % 100),
                   "message": f"bench {self.index[job_id]} {seq} {mono()}"}  # fmt: skip
        if status != "running":
            changes["eta_s"] = None
        return changes

    async def _write_round(self, store, job_ids: list[str]) -> int:
        """One ``Store.write`` per job (distinct jobs: each is a compare-and-set on its seq);
        with the pipelined store they go to Redis as one pipeline. Returns the refused count."""

        async def one(jid: str) -> None:
            self.docs[jid] = await store.write(self.docs[jid], *self.tenant_arg, **self._changes(jid))

        tasks = [asyncio.ensure_future(one(j)) for j in job_ids]  # one loop turn: one pipeline
        results = await asyncio.gather(*tasks, return_exceptions=True)
        return sum(1 for r in results if isinstance(r, BaseException))

    async def op_publish(self, rate: float, duration: float, jobs: list[str] | None = None,
                         max_batch: int = 400, tick: float = 0.005) -> dict[str, Any]:  # fmt: skip
        """Update ``jobs`` (default: all) round robin at ``rate`` updates/s in total for ``duration`` s.

        Every update is one ``Store.write`` (the code the worker's ``progress()`` runs: same
        document, same Lua store+publish script); the due updates go to Redis as one pipeline."""
        ids = jobs or list(self.docs)
        store = self.store
        loop = asyncio.get_running_loop()
        start = loop.time()
        end = start + duration
        sent = refused = 0
        k = 0
        worst_lag = 0.0
        batches = 0
        last = start
        while True:
            now = loop.time()
            if now >= end:
                break
            due = int((now - start) * rate) + 1 - sent
            if due > 0:
                worst_lag = max(worst_lag, (due - 1) / rate)
                due = min(due, max_batch)
                chosen: dict[str, int] = {}
                for _ in range(due):
                    jid = ids[k % len(ids)]
                    k += 1
                    chosen[jid] = chosen.get(jid, 0) + 1
                while chosen:  # rounds of distinct jobs
                    round_ids = list(chosen)
                    refused += await self._write_round(store, round_ids)
                    for jid in round_ids:
                        chosen[jid] -= 1
                        if not chosen[jid]:
                            del chosen[jid]
                sent += due
                batches += 1
            # batches at least `tick` apart: one pipeline carries every update due by then (a
            # pipeline per update would cost the generator ~0.5 ms of CPU each)
            wait = min(max(start + sent / rate, last + tick), end) - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            last = loop.time()
        took = loop.time() - start
        return {"published": sent, "refused": refused, "seconds": took, "rate": sent / took if took else 0,
                "worst_lag_ms": worst_lag * 1000, "batches": batches}  # fmt: skip

    async def op_finish(self, jobs: list[str] | None = None) -> dict[str, Any]:
        """Write ``succeeded`` for every job with ``Store.write`` (the worker's final write)."""
        ids = jobs or list(self.docs)

        async def one(jid: str) -> None:
            self.docs[jid] = await self.store.write(self.docs[jid], *self.tenant_arg, result={"ok": True}, **self._changes(jid, "succeeded"))

        results = await asyncio.gather(*(one(j) for j in ids), return_exceptions=True)
        errors = [repr(r) for r in results if isinstance(r, BaseException)]
        return {"finished": len(ids) - len(errors), "errors": errors[:3]}

    async def op_forget_jobs(self) -> dict[str, Any]:
        self.docs.clear()
        self.index.clear()
        return {}

    # start latency (a real worker): 202 -> `running` seen on a WebSocket subscribed to all jobs

    async def op_start_latency(self, host: str, port: int, n: int, interval: float, job_type: str,
                               params: dict[str, Any] | None = None, timeout: float = 30.0) -> dict[str, Any]:  # fmt: skip
        loop = asyncio.get_running_loop()
        running: dict[str, int] = {}
        accepted: dict[str, int] = {}

        class AllWS(WSConn):
            def data_received(inner, data):  # noqa: N805
                now = mono()
                buf = inner.buf + data if inner.buf else data
                if inner.head:
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        inner.buf = buf
                        return
                    inner.head = False
                    inner.send_text(b'{"op":"subscribe","all":true}')
                    buf = buf[end + 4 :]
                    if not inner.ready.done():
                        inner.ready.set_result(None)
                pos, size = 0, len(buf)
                while size - pos >= 2:
                    ln = buf[pos + 1] & 0x7F
                    hdr = 2
                    if ln == 126:
                        if size - pos < 4:
                            break
                        ln, hdr = (buf[pos + 2] << 8) | buf[pos + 3], 4
                    elif ln == 127:
                        if size - pos < 10:
                            break
                        ln, hdr = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
                    if pos + hdr + ln > size:
                        break
                    payload = buf[pos + hdr : pos + hdr + ln]
                    pos += hdr + ln
                    if b'"status":"running"' in payload:
                        i = payload.find(b'"id":"')
                        jid = payload[i + 6 : payload.find(b'"', i + 6)].decode()
                        running.setdefault(jid, now)
                inner.buf = buf[pos:]

        _, ws = await loop.create_connection(lambda: AllWS(self, []), host, port)
        await ws.ready
        await asyncio.sleep(0.3)  # the subscription is confirmed and the snapshot sent
        reader, writer = await asyncio.open_connection(host, port)
        # the job must last a little, or its `running` may be conflated into its final state
        body = json.dumps({"type": job_type, "params": params or {}}).encode()
        req = b"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        started = time.monotonic()
        for k in range(n):
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            doc = json.loads(await reader.readexactly(length))
            accepted[doc["id"]] = mono()
            if not head.startswith(b"HTTP/1.1 202"):
                raise RuntimeError(head.decode())
            next_at = started + (k + 1) * interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        deadline = time.monotonic() + timeout
        while len(set(accepted) & set(running)) < len(accepted) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        writer.close()
        ws.close()
        lat = [(running[j] - t) // 1000 for j, t in accepted.items() if j in running]
        return {"latencies_us": lat, "missing": len(accepted) - len(lat)}


_CONTRACT = None


def _contract():
    global _CONTRACT
    if _CONTRACT is None:
        from core import contract

        _CONTRACT = contract
    return _CONTRACT


async def serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    agent = Agent()
    out = sys.stdout.buffer

    def reply(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
        out.flush()

    async def run(msg: dict[str, Any]) -> None:
        rid = msg.pop("id")
        op = msg.pop("op")
        try:
            result = await getattr(agent, "op_" + op)(**msg)
            reply({"id": rid, "ok": True, **result})
        except Exception as e:  # reported to the orchestrator, which fails the scenario
            reply({"id": rid, "ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]})

    while True:
        line = await reader.readline()
        if not line:
            break  # the orchestrator is gone
        task = asyncio.create_task(run(json.loads(line)))
        agent.tasks.add(task)
        task.add_done_callback(agent.tasks.discard)
    for c in agent.conns:
        c.close()


def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop

        uvloop.run(serve())
    except ImportError:
        asyncio.run(serve())


if __name__ == "__main__":
    main()
