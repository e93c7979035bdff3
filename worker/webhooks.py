"""Webhook delivery: one attempt per call, re-queued with exponential back-off and jitter.

``deliver`` runs as its own queued job (``contract.WEBHOOK_FUNCTION``), enqueued atomically with a
job's final state by ``Store.write``; ``attempt`` is its try count (1, 2, ...). Each attempt:

1. reads what to send, captured when the final state was written (``Store.webhook_payload``:
   the URL and the final document, kept until the delivery ends, whatever ``RESULT_TTL`` says);
2. resolves the URL's host once and checks every address with the SSRF guard
   (``core.webhooks.resolve``), then connects to a checked address itself (the URL's host is
   replaced by the IP; ``Host`` and, for https, SNI and certificate checks keep the name), so
   DNS cannot answer differently between the check and the connection;
3. POSTs the document signed as in Standard Webhooks, with a total deadline, no redirects,
   no proxies from the environment, and at most ``MAX_RESPONSE_BYTES`` of the answer read;
4. 2xx: done. 410: the receiver is gone, stop. Anything else (3xx, 4xx, 5xx, timeouts,
   connection errors): ``queue.Requeue`` after a back-off, until ``WEBHOOK_MAX_ATTEMPTS`` or ``WEBHOOK_DEADLINE``.

Which document is sent: the final state that enqueued the delivery, byte for byte, even after
the job's document has expired. If the job is run again (``POST /jobs/{id}/retry``), the pending
delivery goes on sending the earlier final state until the re-run reaches its own; that one
replaces the payload and gets its own delivery, and the earlier delivery stops (superseded).

The schedule comes from the settings (``WEBHOOK_*``), so tests can make it fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from dataclasses import dataclass

import httpx

from core import contract, queue, tracing
from core import webhooks as guard
from core.settings import Settings
from core.store import Store

log = logging.getLogger("worker.webhooks")


# runtime.WEBHOOK_TIMEOUT (60 s) is the backstop per attempt: resolving and one attempt stay below it.
MAX_ATTEMPT_TIMEOUT = 50.0
# arq drops a queued job 24 h after it was enqueued; give up before that.
MAX_DEADLINE = 23.5 * 3600
MAX_RESPONSE_BYTES = 64 * 1024
USER_AGENT = "progress-server-webhooks/1"


def backoff(settings: Settings, attempt: int) -> float:
    """Delay after failed attempt ``attempt``: WEBHOOK_BACKOFF * 4^(attempt-1), capped, times 0.5 to 1.5."""
    return min(settings.webhook_backoff * 4 ** (attempt - 1), settings.webhook_backoff_max) * random.uniform(0.5, 1.5)


@dataclass
class Outcome:
    delivered: bool = False
    final: bool = False  # do not try again (delivered, 410, or nothing that could ever be sent)
    detail: str = ""


async def deliver(store: Store, settings: Settings, job_id: str, seq: int, attempt: int) -> None:
    """One delivery attempt of job ``job_id``'s final state ``seq``; raises ``queue.Requeue`` to try again."""
    delivery_id = contract.webhook_delivery_id(job_id, seq)
    started = time.monotonic()
    parent = ""
    if tracing.tracer is not None:
        with contextlib.suppress(Exception):  # (a Redis blip costs the span its link, not the delivery)
            parent = await store.field(job_id, "tp") or ""
    with tracing.delivery_span(parent, job_id, delivery_id) as span:
        try:
            outcome = await _attempt(store, settings, job_id, seq, delivery_id)
        except Exception as e:  # Redis blip or a bug: count it as a failed attempt
            outcome = Outcome(detail=f"error {type(e).__name__}: {e}")
        if span is not None:
            span.set_attributes({"webhook.attempt": attempt, "webhook.delivered": outcome.delivered, "webhook.detail": outcome.detail})
    took = time.monotonic() - started
    what = f"webhook {delivery_id} (job {job_id}) attempt {attempt}"
    if outcome.delivered:
        log.info("%s: delivered, %s in %.2f s", what, outcome.detail, took)
    elif outcome.final:
        log.warning("%s: %s in %.2f s; no more attempts", what, outcome.detail, took)
    else:
        delay = backoff(settings, attempt)
        enqueued = await _enqueued_at(store, delivery_id)
        deadline = min(settings.webhook_deadline, MAX_DEADLINE)
        if attempt < settings.webhook_max_attempts and (enqueued is None or time.time() + delay - enqueued <= deadline):
            log.info("%s: %s in %.2f s; retrying in %.2f s", what, outcome.detail, took, delay)
            raise queue.Requeue(delay)
        log.warning("%s: %s in %.2f s; giving up after %d attempts", what, outcome.detail, took, attempt)
    try:
        await store.webhook_done(job_id, seq)
    except Exception as e:  # Redis blip: the payload expires by itself
        log.warning("%s: could not drop the delivered payload: %s", what, e)


async def _enqueued_at(store: Store, delivery_id: str) -> float | None:
    """When the delivery was first enqueued (unix seconds), from arq's job record."""
    try:
        return await queue.enqueued_at(store.redis, delivery_id)
    except Exception:
        return None


async def _attempt(store: Store, settings: Settings, job_id: str, seq: int, delivery_id: str) -> Outcome:
    payload = await store.webhook_payload(job_id)
    if payload is None:
        return Outcome(final=True, detail="nothing to send (the payload has expired)")
    captured_seq, url, event = payload
    if captured_seq != seq:
        return Outcome(final=True, detail=f"superseded by the final state seq {captured_seq}, which has its own delivery")
    body = contract.unpack(event).doc
    try:
        key = guard.secret_key(settings.webhook_secret)
    except ValueError as e:
        return Outcome(final=True, detail=f"cannot sign: {e}")
    try:
        target = await guard.resolve(url, settings)
    except guard.Refused as e:
        return Outcome(final=not e.transient, detail=f"refused: {e}")
    return await post(target, key, delivery_id, body, min(settings.webhook_attempt_timeout, MAX_ATTEMPT_TIMEOUT))


_ssl: ssl.SSLContext | None = None


def _ssl_context() -> ssl.SSLContext:
    global _ssl
    if _ssl is None:
        _ssl = ssl.create_default_context()
    return _ssl


def build_request(
    client: httpx.AsyncClient, target: guard.Target, address: str, headers: dict[str, str], body: bytes
) -> httpx.Request:
    """The POST to ``address`` (a checked IP) that says ``target``'s host name in Host and SNI."""
    url = httpx.URL(scheme=target.scheme, host=address, port=target.port, raw_path=target.path.encode())
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    headers = {"Host": target.host_header, **headers}
    return client.build_request("POST", url, content=body, headers=headers, extensions=extensions)


async def post(target: guard.Target, key: bytes, delivery_id: str, body: bytes, timeout: float) -> Outcome:
    """One signed POST, trying each checked address in turn on connection failure."""
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "webhook-id": delivery_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": guard.sign(key, delivery_id, timestamp, body),
        "user-agent": USER_AGENT,
        "accept-encoding": "identity",
    }
    deadline = asyncio.get_running_loop().time() + timeout
    failure = "no address"
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(timeout),
        follow_redirects=False,
        trust_env=False,
        verify=_ssl_context(),
    ) as client:
        for address in target.addresses:
            request = build_request(client, target, address, headers, body)
            try:
                async with asyncio.timeout_at(deadline):
                    response = await client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                failure = f"cannot connect to {address}: {type(e).__name__} {e}".strip()
                continue
            except TimeoutError:
                return Outcome(detail=f"no answer within {timeout:g} s")
            except httpx.HTTPError as e:
                return Outcome(detail=f"{type(e).__name__}: {e}")
            try:
                answer = await _read_some(response, deadline)
            finally:
                await response.aclose()
            status = response.status_code
            detail = f"HTTP {status}"
            if 200 <= status < 300:
                return Outcome(delivered=True, final=True, detail=detail)
            if status == 410:
                return Outcome(final=True, detail=detail + " (receiver gone)")
            if 300 <= status < 400:
                detail += " (redirects are not followed)"
            return Outcome(detail=f"{detail} {answer[:200].decode('utf-8', 'replace')!r}")
    return Outcome(detail=failure)


async def _read_some(response: httpx.Response, deadline: float) -> bytes:
    """At most MAX_RESPONSE_BYTES of the answer, within the attempt's deadline (the status decides)."""
    data = bytearray()
    try:
        async with asyncio.timeout_at(deadline):
            async for chunk in response.aiter_raw(MAX_RESPONSE_BYTES):
                data += chunk
                if len(data) >= MAX_RESPONSE_BYTES:
                    break
    except (TimeoutError, httpx.HTTPError):
        pass
    return bytes(data[:MAX_RESPONSE_BYTES])
