"""For job authors: weighted stages, GET /job-types, the Python client, the test stack."""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading

import httpx
import pytest

from core import contract
from client import (
    AsyncClient,
    Client,
    Conflict,
    Gone,
    InvalidRequest,
    NotFound,
    ProblemError,
    Unauthorized,
)
from client import BACKOFF_FIRST, BACKOFF_MAX, _SSEParser, _Watch
from worker.stages import Stages
from worker.testing import Stack


# -- stages: pure arithmetic, no I/O ------------------------------------------------------


class SyncCtx:
    """Stands in for a sync job's ctx: records each progress() call."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, str | None, str | None]] = []

    def progress(self, pct=None, message=None, stage=None):
        self.calls.append((round(pct, 6), message, stage))


class AsyncCtx(SyncCtx):
    async def progress(self, pct=None, message=None, stage=None):
        super().progress(pct, message, stage)


def test_stages_weighted_percentages():
    ctx = SyncCtx()
    stages = Stages(ctx, {"download": 1, "convert": 3, "upload": 1})
    stages.enter("download", message="go")
    stages.step(1, 2)
    stages.enter("convert")
    stages.step(1, 3, message="one third")
    stages.step(3, 3)
    stages.enter("upload")
    stages.step(1, 1)
    assert ctx.calls == [
        (0.0, "go", "download"),
        (10.0, None, "download"),
        (20.0, None, "convert"),
        (40.0, "one third", "convert"),
        (80.0, None, "convert"),
        (80.0, None, "upload"),
        (100.0, None, "upload"),
    ]


def test_stages_percent_is_pure_and_clamped():
    stages = Stages(None, ["a", "b", "c", "d"])  # equal weights; percent() needs no ctx
    assert stages.percent("a") == 0
    assert stages.percent("b", 1, 2) == pytest.approx(37.5)
    assert stages.percent("d", 10, 10) == pytest.approx(100)
    assert stages.percent("c", 99, 10) == pytest.approx(75)  # done is clamped to total
    assert stages.percent("c", -5, 10) == pytest.approx(50)
    assert Stages(None, {"x": 0.5, "y": 1.5}).percent("y", 1, 4) == pytest.approx(25 + 75 / 4)


def test_stages_never_report_going_back_and_may_skip_forward():
    ctx = SyncCtx()
    stages = Stages(ctx, {"a": 1, "b": 1, "c": 2})
    stages.enter("a")
    stages.step(8, 10)
    stages.step(3, 10)  # a lower step reports the highest percentage again
    stages.enter("c")  # "b" skipped: counts as done
    assert [pct for pct, _, _ in ctx.calls] == [0, 20, 20, 50]
    with pytest.raises(ValueError, match="comes before"):
        stages.enter("b")
    assert stages.current == "c"


def test_stages_refuse_misuse():
    with pytest.raises(RuntimeError, match="enter"):
        Stages(SyncCtx(), ["a"]).step(1, 2)
    with pytest.raises(ValueError, match="unknown stage"):
        Stages(SyncCtx(), ["a"]).enter("b")
    with pytest.raises(ValueError, match="total"):
        Stages(SyncCtx(), ["a"]).percent("a", 1, 0)
    for weights in ({}, [], {"a": 0}, {"a": -1}, {"a": math.nan}, {"a": math.inf}, {"a": True}, {"": 1}, ["a", "a"]):
        with pytest.raises(ValueError):
            Stages(SyncCtx(), weights)


def test_stages_with_an_async_ctx_return_what_to_await():
    ctx = AsyncCtx()
    stages = Stages(ctx, {"only": 1})

    async def job() -> None:
        await stages.enter("only")
        await stages.step(1, 4, message="quarter")

    asyncio.run(job())
    assert ctx.calls == [(0.0, None, "only"), (25.0, "quarter", "only")]
    assert Stages(SyncCtx(), ["x"]).enter("x") is None  # a sync ctx reports during the call


# -- GET /job-types -----------------------------------------------------------------------


def test_job_types_lists_schemas_and_options(base):
    r = httpx.get(base + "/job-types", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.text.endswith("}\n")  # curl's output ends its line
    items = r.json()["items"]
    names = [t["name"] for t in items]
    assert names == sorted(names) and {"demo", "flaky", "wait", "count_sync"} <= set(names)
    by_name = {t["name"]: t for t in items}
    demo = by_name["demo"]
    assert demo["params_schema"]["type"] == "object"
    assert demo["params_schema"]["properties"]["steps"] == {
        "default": 10, "description": "number of steps", "maximum": 10000, "minimum": 1, "title": "Steps", "type": "integer",
    }  # fmt: skip
    assert demo["params_schema"]["additionalProperties"] is False
    assert (demo["timeout"], demo["max_tries"], demo["backoff"], demo["result_ttl"]) == (300.0, 1, 1.0, 3600)
    flaky = by_name["flaky"]
    assert (flaky["max_tries"], flaky["backoff"]) == (3, 0.2)
    assert flaky["description"] == "Fails its first `fail_times` attempts, then succeeds."  # RST literal as Markdown
    assert by_name["wait"]["timeout"] == 1.5
    assert by_name["wait"]["params_schema"]["required"] == ["seconds"]
    with Client(base) as client:
        assert client.job_types() == items


# -- the client ----------------------------------------------------------------------------


def assert_rising(docs: list[dict], final: str) -> None:
    seqs = [d["seq"] for d in docs]
    assert seqs == sorted(set(seqs)), seqs
    assert [d["status"] in contract.TERMINAL for d in docs] == [False] * (len(docs) - 1) + [True]
    assert docs[-1]["status"] == final, docs[-1]


def test_client_submit_status_watch_result(base):
    with Client(base) as client:
        job = client.submit("demo", {"steps": 5, "interval": 0.05})
        assert job["status"] == "queued" and job["token"].startswith("v1.") and job["seq"] == 1
        docs = list(client.watch(job["id"], timeout=30))
        assert_rising(docs, "succeeded")
        assert docs[-1]["progress"] == 100 and docs[-1]["seq"] >= 7  # running + 5 steps + succeeded
        assert client.status(job["id"]) == docs[-1]
        assert client.result(job["id"]) == {"steps": 5}
        assert list(client.watch(job["id"], since=docs[-1]["seq"])) == []  # has the end already: 204
        again = client.submit("demo", {"steps": 5, "interval": 0.05}, idempotency_key=f"k-{job['id']}")
        assert client.submit("demo", {"steps": 5, "interval": 0.05}, idempotency_key=f"k-{job['id']}")["id"] == again["id"]


def test_client_cancel_then_retry(base):
    with Client(base) as client:
        job = client.submit("demo", {"steps": 30, "interval": 0.05})
        docs = []
        for doc in client.watch(job["id"], timeout=30):
            docs.append(doc)
            if doc["status"] == "running" and len(docs) == 2:
                assert client.cancel(job["id"])["status"] == "running"  # 202: the worker is told to stop
        assert_rising(docs, "cancelled")
        with pytest.raises(Conflict) as finished:
            client.cancel(job["id"])
        assert finished.value.status == 409 and finished.value.job_status == "cancelled"

        queued = client.retry(job["id"])
        assert queued["status"] == "queued" and queued["seq"] > docs[-1]["seq"]
        rerun = list(client.watch(job["id"], since=docs[-1]["seq"], timeout=30))
        assert rerun[0]["seq"] > docs[-1]["seq"] and rerun[-1]["attempt"] == 2
        assert_rising(rerun, "succeeded")
        with pytest.raises(Conflict):
            client.retry(job["id"])


def test_client_errors_carry_the_problem(base, redis_client):
    with Client(base) as client:
        with pytest.raises(InvalidRequest) as bad:
            client.submit("demo", {"steps": 0})
        e = bad.value
        assert (e.status, e.title) == (422, "Invalid params")
        assert e.errors[0]["field"] == "params.steps" and "greater than or equal" in e.detail
        with pytest.raises(InvalidRequest) as unknown:
            client.submit("no-such-type")
        assert unknown.value.errors == [{"field": "type", "message": unknown.value.errors[0]["message"]}]

        with pytest.raises(NotFound) as missing:
            client.status("j_missing")
        assert missing.value.status == 404 and missing.value.title == "Job not found"
        with pytest.raises(NotFound):
            list(client.watch("j_missing"))

        slow = client.submit("wait", {"seconds": 0.5})
        with pytest.raises(Conflict) as early:
            client.result(slow["id"])
        assert early.value.job_status in ("queued", "running") and early.value.retry_after == 1
        list(client.watch(slow["id"], timeout=30))

        done = client.submit("demo", {"steps": 1, "interval": 0})
        list(client.watch(done["id"], timeout=30))
        redis_client.delete(contract.job_key(done["id"]), contract.result_key(done["id"]))  # as RESULT_TTL would
        with pytest.raises(Gone):
            client.status(done["id"])
        with pytest.raises(Gone):
            list(client.watch(done["id"]))
        assert isinstance(missing.value, ProblemError) and isinstance(e, ProblemError)


def test_client_with_a_watch_token_reads_one_job_only(base):
    with Client(base) as owner:
        job = owner.submit("demo", {"steps": 2, "interval": 0.05})
    with Client(base, token=job["token"]) as reader:
        assert_rising(list(reader.watch(job["id"], timeout=30)), "succeeded")
        assert reader.status(job["id"])["status"] == "succeeded"
        assert reader.result(job["id"]) == {"steps": 2}
        with pytest.raises(Unauthorized):
            reader.cancel(job["id"])
        with pytest.raises(Unauthorized):
            reader.submit("demo")
        with pytest.raises(NotFound):
            reader.status("j_" + job["id"][2:][::-1])  # another job: as if unknown
    with pytest.raises(ValueError):
        Client(base, api_key="k" * 8, token=job["token"])


@pytest.mark.anyio
async def test_async_client(base):
    async with AsyncClient(base) as client:
        job = await client.submit("count_sync", {"steps": 5, "sleep": 0.01})
        docs = [doc async for doc in client.watch(job["id"], timeout=30)]
        assert_rising(docs, "succeeded")
        assert await client.result(job["id"]) == 5
        assert (await client.status(job["id"]))["seq"] == docs[-1]["seq"]
        with pytest.raises(Conflict):
            await client.cancel(job["id"])
        with pytest.raises(InvalidRequest):
            await client.submit("count_sync", {"steps": -1})
        assert any(t["name"] == "count_sync" for t in await client.job_types())
        long = await client.submit("demo", {"steps": 100, "interval": 0.05})
        async with contextlib.aclosing(client.watch(long["id"])) as stream:
            async for doc in stream:
                break  # leaving early closes the stream
        assert (await client.cancel(long["id"]))["status"] in ("queued", "running", "cancelled")


def test_watch_gate_and_patience_without_io():
    """The seq gate yields only newer documents and stops after a final one; failures are retried
    with back-off until they have lasted ``retry_for`` without one good answer in between."""
    w = _Watch("j_x", 0, None, retry_for=10)
    assert w.accept({"seq": 2, "status": "running"}) and w.last == 2
    assert not w.accept({"seq": 2, "status": "running"}) and not w.accept({"seq": 1, "status": "queued"})
    assert not w.accept("not a document") and not w.stop
    down = httpx.ConnectError("down")
    assert 0 < w.failed(down) <= BACKOFF_FIRST
    w.failing_since -= 11  # eleven seconds of failures later
    with pytest.raises(httpx.ConnectError):
        w.failed(down)
    w.healthy()  # e.g. a long poll answered
    assert w.failed(down) <= BACKOFF_MAX
    assert w.accept({"seq": 3, "status": "succeeded"}) and w.stop
    timed = _Watch("j_x", 0, 0.0, retry_for=10)
    with pytest.raises(TimeoutError):
        timed.remaining()

    ended = _Watch("j_x", 0, None, retry_for=10)  # a stream that ends before the final event
    assert ended.stream_ended(True, 250) == 0.25 and ended.stream_ended(True, None) == 0
    assert ended.stream_ended(True, 3_600_000) == BACKOFF_MAX and ended.failures == 0
    assert 0 < ended.stream_ended(False, 250) <= BACKOFF_FIRST and ended.failures == 1  # no new event: a failure

    parser = _SSEParser()
    lines = ["retry: 2000", "", ": ping", "id: 7", "event: progress", "data: {\"seq\": 7,", "data: \"a\": 1}", ""]
    frames = [frame for frame in map(parser.feed, lines) if frame]
    assert frames == [("progress", '{"seq": 7,\n"a": 1}')] and parser.retry_ms == 2000


# -- watch across a cut connection and without SSE ------------------------------------------


class Proxy:
    """A TCP proxy on loopback, run in its own thread. ``cut()`` drops every open connection;
    with ``refuse_sse`` it answers requests for an event stream with 405, like a proxy without
    SSE. ``heads`` holds the first request head of each connection."""

    def __init__(self, target: str) -> None:
        self.target_port = httpx.URL(target).port
        self.heads: list[str] = []
        self.refuse_sse = False
        self.transports: set[asyncio.Transport] = set()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _start(self) -> asyncio.Server:
        return await asyncio.start_server(self._handle, "127.0.0.1", 0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.transports.add(writer.transport)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.heads.append(head.decode("latin-1"))
            if self.refuse_sse and b"/events" in head.split(b"\r\n")[0]:
                writer.write(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                await writer.drain()
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            self.transports.add(up_writer.transport)
            up_writer.write(head)
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.transport.abort()

    def cut(self) -> None:
        def abort_all() -> None:
            for transport in list(self.transports):
                transport.abort()
            self.transports.clear()

        self.loop.call_soon_threadsafe(abort_all)

    def close(self) -> None:
        self.cut()

        async def stop() -> None:
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def header(head: str, name: str) -> str | None:
    for line in head.split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def test_watch_resumes_after_a_dropped_connection(base):
    with Client(base) as direct:
        job = direct.submit("demo", {"steps": 40, "interval": 0.05})
    proxy = Proxy(base)
    try:
        docs = []
        with Client(proxy.url) as client:
            for doc in client.watch(job["id"], timeout=30):
                docs.append(doc)
                if len(docs) == 3:
                    proxy.cut()
        assert_rising(docs, "succeeded")
        streams = [h for h in proxy.heads if h.startswith(f"GET /jobs/{job['id']}/events")]
        assert len(streams) >= 2, proxy.heads
        assert header(streams[0], "last-event-id") is None
        resumed_from = int(header(streams[1], "last-event-id"))
        assert resumed_from >= docs[2]["seq"] and resumed_from in [d["seq"] for d in docs]
    finally:
        proxy.close()


@pytest.mark.anyio
async def test_watch_falls_back_to_long_poll_when_sse_is_refused(base):
    async with AsyncClient(base) as direct:
        job = await direct.submit("demo", {"steps": 10, "interval": 0.05})
    proxy = Proxy(base)
    proxy.refuse_sse = True
    try:
        async with AsyncClient(proxy.url) as client:
            docs = [doc async for doc in client.watch(job["id"], timeout=30)]
        assert_rising(docs, "succeeded")
        assert any(h.startswith(f"GET /jobs/{job['id']}/events") for h in proxy.heads)
        assert any(h.startswith(f"GET /jobs/{job['id']}?wait=25&after=") for h in proxy.heads), proxy.heads
    finally:
        proxy.close()


# -- worker.testing ------------------------------------------------------------------------


def test_stack_with_api_keys_runs_a_job(tmp_path):
    with Stack("worker.demo", folder=tmp_path, api_keys="acme:acme-key-0001") as stack:
        run = stack.run_job("demo", {"steps": 3, "interval": 0.01})
        assert [d["status"] for d in run][0] == "queued" and run.final["status"] == "succeeded"
        assert run.result == {"steps": 3} and "token" not in run[0]
        assert httpx.get(stack.url + "/job-types").status_code == 401  # the key is needed, as for submit
        assert [t["name"] for t in stack.client.job_types()] == ["batch", "demo"]
        with Client(stack.url, token=stack.client.submit("demo")["token"]) as reader:
            with pytest.raises(Unauthorized):
                reader.job_types()
        assert "worker ready" in stack.logs()
