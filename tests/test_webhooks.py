"""Webhooks: Standard Webhooks signatures, retries, hostile receivers and the SSRF guard.

Real processes: this module starts its own Redis, one worker and two servers (one that allows
127.0.0.1/32 for webhooks, one with no allow-list) with a fast retry schedule, and receivers
that are tiny asyncio HTTP servers on loopback ports, run by the test itself.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from core import contract, queue, webhooks
from core.devredis import RedisProcess
from core.settings import Settings
from core.store import Store
from support import Proc, assert_stream_ok, async_wait_until, start_server, start_worker, watch_sse
from worker import webhooks as sender

pytestmark = pytest.mark.anyio

SECRET = "whsec_" + base64.b64encode(b"progress-server webhook test key, 32B").decode()
ATTEMPT_TIMEOUT = 2
MAX_ATTEMPTS = 3
FAST = {  # the worker's and the servers' settings (env variables)
    "webhook_secret": SECRET,
    "webhook_allowed_hosts": "127.0.0.1/32",
    "webhook_backoff": 0.1,  # retries after ~0.1 s, ~0.4 s
    "webhook_attempt_timeout": ATTEMPT_TIMEOUT,
    "webhook_max_attempts": MAX_ATTEMPTS,
    "progress_interval": 0,
}


@dataclass
class Stack:
    redis: RedisProcess
    worker: Proc
    open: Proc  # WEBHOOK_ALLOWED_HOSTS=127.0.0.1/32
    strict: Proc  # no allow-list


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("webhooks")
    redis = RedisProcess(tmp / "redis").start()
    procs: list[Proc] = []
    try:
        procs.append(start_worker(redis.url, tmp, **FAST))
        procs.append(start_server(redis.url, tmp, **FAST))
        procs.append(start_server(redis.url, tmp, webhook_secret=SECRET))
        yield Stack(redis, *procs)
    finally:
        for proc in procs:
            proc.stop()
        redis.stop()


# -- a receiver ----------------------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    verified: Any = None  # the parsed document if webhooks.verify accepted it, else the ValueError


@dataclass
class Receiver:
    """HTTP/1.1 on 127.0.0.1: answers request n with ``script(n)``: ``(status, headers, body)``,
    ``"hang"`` (read the request, never answer) or ``"flood"`` (200 and a 1 GiB body)."""

    script: Callable[[int], Any]
    host: str = "127.0.0.1"
    requests: list[Received] = field(default_factory=list)
    connections: int = 0
    flood_sent: int = 0
    port: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task] = field(default_factory=set)
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def __aenter__(self) -> Receiver:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._release.set()
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())
        self.connections += 1
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            request_line, *lines = head.split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            received = Received(request_line.split(" ")[1], headers, body, time.monotonic())
            try:
                received.verified = webhooks.verify(SECRET, headers, body)
            except ValueError as e:
                received.verified = e
            self.requests.append(received)
            action = self.script(len(self.requests) - 1)
            if action == "hang":
                await self._release.wait()
            elif action == "flood":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (1 << 30))
                chunk = b"x" * 65536
                while self.flood_sent < 1 << 30:
                    writer.write(chunk)
                    await writer.drain()
                    self.flood_sent += len(chunk)
            else:
                status, extra, answer = action
                lines = [f"HTTP/1.1 {status} X", f"Content-Length: {len(answer)}", "Connection: close"]
                lines += [f"{k}: {v}" for k, v in extra.items()]
                writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + answer)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._tasks.discard(asyncio.current_task())


def answer(status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> Callable[[int], Any]:
    return lambda n: (status, headers or {}, body)


# -- helpers -------------------------------------------------------------------------------


async def run_job(client: httpx.AsyncClient, base: str, webhook: str, steps: int = 1, interval: float = 0) -> list:
    """Submit a demo job with a webhook and return its documents as streamed over SSE, to the end."""
    params = {"steps": steps, "interval": interval}
    r = await client.post(base + "/jobs", json={"type": "demo", "params": params, "webhook": webhook})
    assert r.status_code == 202, r.text
    docs = [e.doc for e in await watch_sse(client, base + r.json()["links"]["events"])]
    assert_stream_ok(docs, "succeeded")
    return docs


async def delivery_done(redis_url: str, delivery_id: str, timeout: float = 15) -> None:
    """Wait until arq has finished the delivery for good (its job record is deleted: no retry pending)."""
    client = aioredis.Redis.from_url(redis_url)
    try:

        async def gone() -> bool:
            return not await client.exists(queue.record_key(delivery_id))

        await async_wait_until(gone, timeout, what=f"delivery {delivery_id} to end")
    finally:
        await client.aclose()


async def count(receiver: Receiver, n: int, timeout: float = 15) -> None:
    async def enough() -> bool:
        return len(receiver.requests) >= n

    await async_wait_until(enough, timeout, what=f"{n} requests at {receiver.url}")


def delivery_of(docs: list[dict]) -> str:
    return contract.webhook_delivery_id(docs[-1]["id"], docs[-1]["seq"])


# -- deliveries ----------------------------------------------------------------------------


async def test_signed_delivery_retried_after_500(stack):
    """A 500 is retried: two attempts, same webhook-id, both verify, body = the final document."""
    script = lambda n: (500, {}, b"try later") if n == 0 else (200, {}, b"ok")  # noqa: E731
    async with Receiver(script) as receiver, httpx.AsyncClient(timeout=30) as client:
        docs = await run_job(client, stack.open.url, receiver.url + "/hook?x=1")
        await count(receiver, 2)
        await delivery_done(stack.redis.url, delivery_of(docs))
        stored = await client.get(stack.open.url + docs[-1]["links"]["self"] + "?redirect=0")
    assert len(receiver.requests) == 2
    first, second = receiver.requests
    for req in receiver.requests:
        assert req.verified == docs[-1], req.verified
        assert req.body + b"\n" == stored.content  # the stored document, byte for byte (an API answer ends its line)
        assert req.path == "/hook?x=1"
        assert req.headers["host"] == receiver.url.removeprefix("http://")
        assert req.headers["content-type"] == "application/json"
        assert req.headers["webhook-id"] == delivery_of(docs)
        assert abs(int(req.headers["webhook-timestamp"]) - time.time()) < 30
        assert req.headers["webhook-signature"].startswith("v1,")
    assert second.at > first.at
    log = stack.worker.log()
    assert f"{delivery_of(docs)} (job {docs[-1]['id']}) attempt 1: HTTP 500" in log
    assert f"{delivery_of(docs)} (job {docs[-1]['id']}) attempt 2: delivered, HTTP 200" in log


async def test_a_groups_final_state_is_delivered_once_and_retried(stack):
    """A group's webhook: its final state (after its children's), signed, retried after a 500,
    enqueued in the step that ended the group; the children send nothing of their own."""
    script = lambda n: (500, {}, b"try later") if n == 0 else (200, {}, b"ok")  # noqa: E731
    async with Receiver(script) as receiver, httpx.AsyncClient(timeout=30) as client:
        members = [{"type": "demo", "params": {"steps": 2, "interval": 0.05}, "weight": w} for w in (1, 3)]
        r = await client.post(stack.open.url + "/jobs", json={"group": members, "webhook": receiver.url + "/group"})
        assert r.status_code == 202, r.text
        docs = [e.doc for e in await watch_sse(client, stack.open.url + r.json()["links"]["events"])]
        assert docs[-1]["status"] == "succeeded" and docs[-1]["progress"] == 100
        await count(receiver, 2)
        await delivery_done(stack.redis.url, delivery_of(docs))
    assert len(receiver.requests) == 2
    for req in receiver.requests:
        assert req.verified == docs[-1], req.verified
        assert req.path == "/group" and req.headers["webhook-id"] == delivery_of(docs)
    assert [c["status"] for c in req.verified["children"]] == ["succeeded", "succeeded"]


async def test_delivery_outlives_the_result(tmp_path):
    """RESULT_TTL=1 and a receiver that answers 503 until the job's document has expired (410):
    the delivery goes on and then sends the final state that enqueued it, byte for byte."""
    redis = RedisProcess(tmp_path / "redis").start()
    settings = {**FAST, "result_ttl": 1, "tombstone_ttl": 600, "webhook_max_attempts": 30, "webhook_backoff_max": 0.5}
    procs = []
    gone = asyncio.Event()
    script = lambda n: (200, {}, b"ok") if gone.is_set() else (503, {}, b"down")  # noqa: E731
    try:
        procs.append(start_worker(redis.url, tmp_path, **settings))
        procs.append(server := start_server(redis.url, tmp_path, **settings))
        async with Receiver(script) as receiver, httpx.AsyncClient(timeout=30) as client:
            docs = await run_job(client, server.url, receiver.url)
            final = docs[-1]
            await count(receiver, 2)  # down for a retry at least

            async def expired() -> bool:
                return (await client.get(server.url + final["links"]["self"])).status_code == 410

            await async_wait_until(expired, 15, what="the job's document to expire")
            failed = len(receiver.requests)
            gone.set()
            await count(receiver, failed + 1)
            await delivery_done(redis.url, delivery_of(docs))
            left = aioredis.Redis.from_url(redis.url)
            try:
                payload_left = await left.exists(contract.webhook_key(final["id"]))
            finally:
                await left.aclose()
    finally:
        for proc in procs:
            proc.stop()
        redis.stop()
    delivered = receiver.requests[-1]
    assert delivered.verified == final
    assert delivered.body == receiver.requests[0].body  # the same bytes on every attempt
    assert {r.headers["webhook-id"] for r in receiver.requests} == {delivery_of(docs)}
    assert f"attempt {failed + 1}: delivered, HTTP 200" in procs[0].log()
    assert payload_left == 0  # a finished delivery keeps nothing


async def test_hanging_receiver_times_out_without_blocking_others(stack):
    """A receiver that never answers: other jobs and their deliveries go on; the attempt times out and is retried."""
    hanging, good = Receiver(lambda n: "hang"), Receiver(answer(204))
    async with hanging as hang, good, httpx.AsyncClient(timeout=30) as client:
        hung = await run_job(client, stack.open.url, hang.url)
        await count(hang, 1)
        docs = await run_job(client, stack.open.url, good.url, steps=5, interval=0.05)
        await count(good, 1)
        assert good.requests[0].verified == docs[-1]
        assert good.requests[0].at - hang.requests[0].at < ATTEMPT_TIMEOUT  # while the first one still hung
        await count(hang, 2, timeout=ATTEMPT_TIMEOUT + 10)
    first, second = hang.requests[:2]
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == delivery_of(hung)
    assert second.at - first.at >= ATTEMPT_TIMEOUT - 0.1  # the deadline ended attempt 1
    assert isinstance(first.verified, dict) and isinstance(second.verified, dict)


async def test_410_stops_retries(stack):
    """A 410 Gone answer ends the delivery: exactly one attempt."""
    async with Receiver(answer(410)) as receiver, httpx.AsyncClient(timeout=30) as client:
        docs = await run_job(client, stack.open.url, receiver.url)
        await delivery_done(stack.redis.url, delivery_of(docs))
    assert len(receiver.requests) == 1
    assert f"{delivery_of(docs)} (job {docs[-1]['id']}) attempt 1: HTTP 410 (receiver gone)" in stack.worker.log()


async def test_redirect_to_loopback_is_not_followed(stack):
    """A 302 to another (allowed) loopback listener is a failed attempt: the target gets 0 connections."""
    async with Receiver(answer(200)) as target:
        async with Receiver(answer(302, {"Location": target.url + "/admin"})) as redirector:
            async with httpx.AsyncClient(timeout=30) as client:
                docs = await run_job(client, stack.open.url, redirector.url)
                await delivery_done(stack.redis.url, delivery_of(docs))
    assert len(redirector.requests) == MAX_ATTEMPTS
    assert target.connections == 0
    assert f"attempt {MAX_ATTEMPTS}: HTTP 302 (redirects are not followed)" in stack.worker.log()
    assert f"{delivery_of(docs)} (job {docs[-1]['id']}) attempt {MAX_ATTEMPTS}: HTTP 302" in stack.worker.log()


async def test_flooding_receiver_is_read_at_most_64k(stack):
    """A receiver that streams a 1 GiB answer: the sender reads at most 64 KiB and hangs up."""
    async with Receiver(lambda n: "flood") as receiver, httpx.AsyncClient(timeout=30) as client:
        docs = await run_job(client, stack.open.url, receiver.url)
        await delivery_done(stack.redis.url, delivery_of(docs))
        sent = receiver.flood_sent
    assert len(receiver.requests) == 1
    assert sent < 64 << 20, sent  # 64 KiB read; the rest is at most what socket buffers took
    assert f"{delivery_of(docs)} (job {docs[-1]['id']}) attempt 1: delivered, HTTP 200" in stack.worker.log()


async def test_send_time_guard_refuses_what_submit_would_refuse(stack):
    """A stored URL that now points at a refused address (rebinding, changed allow-list) is not called at send time."""
    async with Receiver(answer(200), host="127.0.0.2") as receiver:
        client = aioredis.Redis.from_url(stack.redis.url)
        try:
            store = Store(client, Settings(webhook_secret=SECRET))
            doc, _, _ = await store.create("demo", {"steps": 1, "interval": 0}, "", receiver.url)  # bypasses the API check

            async def finished() -> dict | None:
                now = await store.document(doc["id"])
                return now if now["status"] in contract.TERMINAL else None

            final = await async_wait_until(finished, 15, what="the job to finish")
        finally:
            await client.aclose()
        await delivery_done(stack.redis.url, contract.webhook_delivery_id(doc["id"], final["seq"]))
    assert receiver.connections == 0
    assert f"(job {doc['id']}) attempt 1: refused: must resolve only to public addresses" in stack.worker.log()


# -- the SSRF guard at submit --------------------------------------------------------------

REFUSED = [
    "http://127.0.0.1:6379/",
    "http://[::1]/",
    "http://[fec0::1]/",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1/",
    "http://192.168.1.1/",
    "http://[fc00::1]/",
    "http://[fe80::1]/",
    "http://224.0.0.1/",
    "http://0.0.0.0/",
    "http://[::]/",
    "http://[::ffff:127.0.0.1]/",
    "http://2130706433/",
    "http://127.1/",
    "http://0x7f.1/",
    "http://localhost:8000/admin",
    "file:///etc/passwd",
    "gopher://127.0.0.1:6379/_INFO",
    "http://user:pw@127.0.0.1/",
    "ftp://example.com/",
    "not a url",
    "http://127.0.0.1\\@example.com/",
]


@pytest.mark.parametrize("url", REFUSED)
async def test_ssrf_refused_at_submit(stack, url):
    """Internal, odd-form, non-http(s) and credentialed webhook URLs are a 422 naming `webhook`; no job is made."""
    client = aioredis.Redis.from_url(stack.redis.url)
    try:
        before = await client.zcard(contract.jobs_index(""))
        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.post(stack.strict.url + "/jobs", json={"type": "demo", "params": {}, "webhook": url})
        after = await client.zcard(contract.jobs_index(""))
    finally:
        await client.aclose()
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["field"] == "webhook"
    assert after == before


@pytest.mark.parametrize("url", ["http://127.0.0.2/", "http://[::1]/", "http://169.254.169.254/", "http://10.0.0.1/"])
async def test_allow_list_is_exact(stack, url):
    """WEBHOOK_ALLOWED_HOSTS=127.0.0.1/32 lets 127.0.0.1 through and nothing else internal."""
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(stack.open.url + "/jobs", json={"type": "demo", "params": {}, "webhook": url})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "webhook", r.text


# -- in-process units (no network) ---------------------------------------------------------


def test_signature_matches_the_standard_webhooks_reference_vector():
    """sign() gives the Standard Webhooks reference library's test vector."""
    key = webhooks.secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    signature = webhooks.sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def _signed(body: bytes, timestamp: int, secret: str = SECRET) -> dict[str, str]:
    key = webhooks.secret_key(secret)
    signature = webhooks.sign(key, "wh_1", timestamp, body)
    return {"Webhook-Id": "wh_1", "Webhook-Timestamp": str(timestamp), "Webhook-Signature": signature}


def test_verify_accepts_good_and_rejects_tampered_replayed_and_forged():
    """verify(): a fresh signature passes; a changed body, another key, a 5-min-old or future timestamp fail."""
    body = b'{"id":"j_1","seq":3}'
    now = int(time.time())
    assert webhooks.verify(SECRET, _signed(body, now), body) == {"id": "j_1", "seq": 3}
    rotated = _signed(body, now)
    rotated["Webhook-Signature"] = "v1,bm90IGl0 v2,xyz " + rotated["Webhook-Signature"]
    assert webhooks.verify(SECRET, rotated, body.decode())["seq"] == 3
    other = "whsec_" + base64.b64encode(b"another key entirely, 32 bytes!!").decode()
    bad = [
        (_signed(body, now), body.replace(b"3", b"4")),
        (_signed(body, now, other), body),
        (_signed(body, now - 301), body),
        (_signed(body, now + 301), body),
        ({k: v for k, v in _signed(body, now).items() if k != "Webhook-Id"}, body),
        ({**_signed(body, now), "Webhook-Timestamp": "soon"}, body),
    ]
    for headers, data in bad:
        with pytest.raises(ValueError):
            webhooks.verify(SECRET, headers, data)


async def test_public_addresses_pass_and_secret_is_required():
    """Public IP literals pass the guard (no DNS needed); without WEBHOOK_SECRET every webhook is refused."""
    settings = Settings(webhook_secret=SECRET)
    assert await webhooks.check_submitted("https://93.184.215.14/hook?a=1", settings) is None
    assert await webhooks.check_submitted("http://[2606:4700::1]:8443/", settings) is None
    assert "WEBHOOK_SECRET" in await webhooks.check_submitted("https://93.184.215.14/", Settings())
    malformed = Settings(webhook_secret="whsec_!!")
    assert "misconfigured" in await webhooks.check_submitted("https://93.184.215.14/", malformed)
    for embedded in ("http://[2002:7f00:1::1]/", "http://[64:ff9b::a9fe:a9fe]/", "http://100.64.0.1/"):
        assert await webhooks.check_submitted(embedded, settings) is not None, embedded


async def test_request_is_pinned_to_the_checked_address():
    """The connection goes to the checked IP; Host and TLS SNI keep the URL's name, so DNS cannot swap it."""
    target = webhooks.Target("https", "hooks.example.com", 8443, "/p?q=1", "hooks.example.com:8443", ("93.184.215.14",))
    async with httpx.AsyncClient() as client:
        request = sender.build_request(client, target, target.addresses[0], {"webhook-id": "wh_1"}, b"{}")
    assert request.url.host == "93.184.215.14" and request.url.port == 8443
    assert request.url.raw_path == b"/p?q=1"
    assert request.headers["host"] == "hooks.example.com:8443"
    assert request.extensions["sni_hostname"] == "hooks.example.com"


def test_backoff_grows_with_jitter_and_fits_the_deadline():
    """Default schedule: ~5 s, x4 each retry, capped at 3 h, +-50 % jitter; 14 attempts span under 24 h."""
    s = Settings()
    assert 2.5 <= sender.backoff(s, 1) <= 7.5
    assert 10 <= sender.backoff(s, 2) <= 30
    assert sender.backoff(s, 30) <= 1.5 * s.webhook_backoff_max
    nominal = sum(min(s.webhook_backoff * 4 ** (n - 1), s.webhook_backoff_max) for n in range(1, s.webhook_max_attempts))
    assert 20 * 3600 < nominal < 24 * 3600
    assert sender.MAX_RESPONSE_BYTES == 64 * 1024


def test_readme_verify_is_the_shipped_one():
    """The verify() shown in the README runs as printed and accepts/refuses like core.webhooks.verify."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("\n## Webhooks\n", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(code, namespace)  # noqa: S102 (our own README)
    body = b'{"id":"j_1","seq":3}'
    now = int(time.time())
    assert namespace["verify"](SECRET, _signed(body, now), body) == webhooks.verify(SECRET, _signed(body, now), body)
    with pytest.raises(ValueError):
        namespace["verify"](SECRET, _signed(body, now - 301), body)
