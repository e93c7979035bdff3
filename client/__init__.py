"""A Python client for the progress server, sync (``Client``) and async (``AsyncClient``).

::

    from client import Client

    with Client("http://127.0.0.1:8000", api_key="...") as client:   # api_key=None in keyless dev mode
        job = client.submit("demo", {"steps": 5, "interval": 0.2})      # the document + "token"
        for doc in client.watch(job["id"]):                             # until succeeded/failed/cancelled
            print(doc["seq"], doc["status"], doc["progress"], doc["message"])
        print(client.result(job["id"]))                                 # {"steps": 5}

    async with AsyncClient(url, api_key=key) as client:
        job = await client.submit("demo", {"steps": 5})
        async for doc in client.watch(job["id"]):
            ...

Credentials: ``api_key`` (submit, status, watch, result, cancel, retry, list_jobs) or ``token``, the watch
token a submit answers with (status, watch and result of that one job). Both go out as
``Authorization: Bearer``. Documents and results are plain JSON values (dicts, lists, ...).

Errors: an answer other than the expected one raises ``ProblemError`` (or the subclass for its
status: ``BadRequest`` 400, ``Unauthorized`` 401, ``Forbidden`` 403, ``NotFound`` 404, ``Conflict``
409, ``Gone`` 410, ``InvalidRequest`` 422, ``RateLimited`` 429, ``Unavailable`` 503) carrying the
server's ``application/problem+json`` fields. Network errors are httpx's (``httpx.TransportError``).

``watch`` guarantees: the documents it yields have strictly increasing ``seq`` (never a repeat,
never going back), and it stops right after the first final one (``succeeded``, ``failed``,
``cancelled``). It reads the job's SSE stream and resumes a dropped stream with
``Last-Event-ID``; if the SSE request is refused (an answer other than a stream, e.g. a proxy
without SSE, or too many open streams) it long-polls ``GET /jobs/ID?wait=25&after=SEQ`` instead.
Intermediate documents may be skipped (progress is state, the newest wins); the final one never is.

One module on purpose: ``Client`` and ``AsyncClient`` mirror each other method by method, and
side by side they cannot drift apart; it imports nothing of the server, so it can be copied alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import quote

import httpx

__all__ = [
    "AsyncClient",
    "BadRequest",
    "Client",
    "Conflict",
    "Forbidden",
    "Gone",
    "InvalidRequest",
    "NotFound",
    "ProblemError",
    "RateLimited",
    "TERMINAL",
    "Unauthorized",
    "Unavailable",
]

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = frozenset(("succeeded", "failed", "cancelled"))  # core.contract's, repeated: this file stands alone
LONG_POLL_WAIT = 25.0  # seconds a long poll is held (the server caps it with LONG_POLL_MAX)
STREAM_IDLE = 60.0  # an SSE stream silent this long (no event, no ping) is taken for dead
RETRY_FOR = 60.0  # watch: give up after failing this long without a single good answer
BACKOFF_FIRST, BACKOFF_MAX = 0.25, 5.0  # reconnect delays, doubled per failure, jittered


# -- errors ------------------------------------------------------------------------------


class ProblemError(Exception):
    """An error answer; the fields of its RFC 9457 problem document.

    ``status`` (HTTP status), ``title``, ``detail``, ``errors`` (``[{"field", "message"}]`` for
    validation, else ``[]``), ``type``, ``body`` (the whole problem document, with any extra
    members such as ``job_status``), ``headers`` (the answer's headers).
    """

    def __init__(self, status: int, body: dict[str, Any], headers: httpx.Headers | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = headers if headers is not None else httpx.Headers()
        self.title: str = body.get("title") or f"HTTP {status}"
        self.detail: str | None = body.get("detail")
        self.errors: list[dict[str, Any]] = body.get("errors") or []
        self.type: str = body.get("type") or "about:blank"
        super().__init__(f"{status} {self.title}" + (f": {self.detail}" if self.detail else ""))

    @property
    def retry_after(self) -> float | None:
        """The ``Retry-After`` header in seconds, if the answer had one."""
        try:
            return float(self.headers["retry-after"])
        except (KeyError, ValueError):
            return None


class BadRequest(ProblemError):
    """400: malformed JSON or a malformed header."""


class Unauthorized(ProblemError):
    """401: no, unknown or insufficient credentials (a watch token cannot submit or cancel)."""


class Forbidden(ProblemError):
    """403."""


class NotFound(ProblemError):
    """404: unknown job, or another tenant's."""


class Conflict(ProblemError):
    """409: the job's state does not allow the call (``job_status`` says which state it is in)."""

    @property
    def job_status(self) -> str | None:
        return self.body.get("job_status")


class Gone(ProblemError):
    """410: the job finished and its document and result have expired."""


class InvalidRequest(ProblemError):
    """422: unknown type, bad params (``errors`` names the fields), reused Idempotency-Key."""


class RateLimited(ProblemError):
    """429: too many requests or streams; ``retry_after`` says when to come back."""


class Unavailable(ProblemError):
    """503: the server cannot reach Redis, or is full."""


ERRORS: dict[int, type[ProblemError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    410: Gone,
    422: InvalidRequest,
    429: RateLimited,
    503: Unavailable,
}


def problem(response: httpx.Response) -> ProblemError:
    """The error for an unexpected answer (the body must have been read)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        text = response.text.strip()[:500]
        body = {"title": response.reason_phrase or f"HTTP {response.status_code}", "status": response.status_code}
        if text:
            body["detail"] = text
    return ERRORS.get(response.status_code, ProblemError)(response.status_code, body, response.headers)


def _expect(response: httpx.Response, *ok: int) -> Any:
    if response.status_code not in ok:
        raise problem(response)
    return response.json()


def _transient(status: int) -> bool:
    """Answers worth trying again as they are: overload, Redis away, a proxy between deploys."""
    return status in (429, 500, 502, 503, 504)


# -- the watch logic, shared by both clients ---------------------------------------------


class _SSEParser:
    """Server-Sent Events, line by line: ``feed`` returns ``(event, data)`` when a frame ends."""

    def __init__(self) -> None:
        self.data: list[str] = []
        self.event: str | None = None
        self.retry_ms: int | None = None

    def feed(self, line: str) -> tuple[str | None, str] | None:
        if line == "":
            frame = (self.event, "\n".join(self.data)) if self.data else None
            self.data, self.event = [], None
            return frame
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self.data.append(value)
        elif name == "event":
            self.event = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None


class _Watch:
    """State of one ``watch``: the seq gate, the transport in use, failures and deadlines."""

    def __init__(self, job_id: str, since: int, timeout: float | None, retry_for: float) -> None:
        self.path = f"/jobs/{quote(job_id, safe='')}"
        self.last = since
        self.sse = True  # False once SSE was refused: long poll from then on
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.timeout = timeout
        self.retry_for = retry_for
        self.failing_since: float | None = None
        self.failures = 0
        self.stop = False  # the final document was yielded, or the caller had it already

    def accept(self, doc: Any) -> bool:
        """True if ``doc`` is to be yielded: a document newer than the last one yielded."""
        if not isinstance(doc, dict) or not isinstance(doc.get("seq"), int) or doc["seq"] <= self.last:
            return False
        self.last = doc["seq"]
        self.stop = doc.get("status") in TERMINAL
        self.failing_since, self.failures = None, 0
        return True

    def healthy(self) -> None:
        """A good answer (a stream opened, a long poll answered): the failure clock starts over
        (the back-off only once a new document arrives, so a flapping stream still backs off)."""
        self.failing_since = None

    def remaining(self) -> float:
        if self.deadline is None:
            return float("inf")
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"job not finished within {self.timeout} s ({self.path})")
        return left

    def sse_request(self) -> tuple[str, dict[str, str], httpx.Timeout]:
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if self.last > 0:
            headers["Last-Event-ID"] = str(self.last)
        read = min(STREAM_IDLE, self.remaining())
        return self.path + "/events", headers, httpx.Timeout(10.0, read=read)

    def poll_request(self) -> tuple[str, dict[str, Any], httpx.Timeout]:
        wait = max(0.0, min(LONG_POLL_WAIT, self.remaining() - 1))
        params = {"wait": f"{wait:g}", "after": str(self.last)}
        return self.path, params, httpx.Timeout(10.0, read=wait + 10.0)

    def failed(self, error: BaseException) -> float:
        """A failed attempt: the delay before the next one, or raise ``error`` when out of patience."""
        now = time.monotonic()
        if self.failing_since is None:
            self.failing_since = now
        if now - self.failing_since >= self.retry_for:
            raise error
        self.failures += 1
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self.failures - 1)) * random.uniform(0.5, 1.0)
        if isinstance(error, ProblemError) and error.retry_after is not None:
            delay = max(delay, min(error.retry_after, BACKOFF_MAX * 2))
        return min(delay, self.remaining())

    def stream_ended(self, fresh: bool, retry_ms: int | None) -> float:
        """The stream ended before the final event (a server drain or restart): the delay before
        coming back. After new events, the server's ``retry:`` hint; else a failed attempt."""
        if fresh:
            return min((retry_ms or 0) / 1000, BACKOFF_MAX, self.remaining())
        return self.failed(httpx.RemoteProtocolError("event stream ended without a new event"))

    def sse_answer(self, response: httpx.Response) -> str:
        """What to do with the answer to an SSE request: "stream", "done" (204: the client has the
        final event already), "refused" (long poll instead) or "retry" (a transient error)."""
        content_type = response.headers.get("content-type", "")
        if response.status_code == 200 and content_type.startswith("text/event-stream"):
            return "stream"
        if response.status_code == 204:
            return "done"
        if _transient(response.status_code) and response.status_code != 429:
            return "retry"
        return "refused"  # the long poll then gives the real answer (e.g. 404) if there is one

    def not_streaming(self, answer: str, response: httpx.Response) -> None:
        """Act on an SSE answer that is not a stream (its body read): stop (204), fall back to
        the long poll, or raise so the watch retries."""
        if answer == "done":  # 204: the caller has the final event already
            self.stop = True
        elif answer == "refused":
            self.sse = False
        else:
            raise problem(response)

    def parse(self, data: str) -> Any:
        try:
            return json.loads(data)
        except ValueError:
            return None


# -- the clients -------------------------------------------------------------------------


def _auth_headers(api_key: str | None, token: str | None) -> dict[str, str]:
    if api_key and token:
        raise ValueError("give api_key or token, not both")
    credential = api_key or token
    return {"Authorization": f"Bearer {credential}"} if credential else {}


def _submit_body(
    job_type: str, params: dict[str, Any] | None, webhook: str | None, unwatched: float | None, priority: int | None
) -> dict[str, Any]:
    body: dict[str, Any] = {"type": job_type, "params": params if params is not None else {}}
    if webhook is not None:
        body["webhook"] = webhook
    if priority is not None:
        body["priority"] = priority
    if unwatched is not None:
        body["cancel_when_unwatched"] = unwatched
    return body


def _path(job_id: str) -> str:
    return f"/jobs/{quote(job_id, safe='')}"


def _list_params(status: str | None, job_type: str | None, limit: int, cursor: str | None, queue: str | None = None) -> dict[str, Any]:
    params = {"status": status, "type": job_type, "queue": queue, "limit": limit, "cursor": cursor}
    return {k: v for k, v in params.items() if v is not None}


class Client:
    """Blocking client (one ``httpx.Client``); close it, or use it as a context manager."""

    def __init__(
        self, base_url: str = DEFAULT_URL, *, api_key: str | None = None, token: str | None = None, timeout: float = 30.0
    ) -> None:
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=_auth_headers(api_key, token), timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def submit(
        self,
        type: str,
        params: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        webhook: str | None = None,
        cancel_when_unwatched: float | None = None,
        priority: int | None = None,
    ) -> dict[str, Any]:
        """``POST /jobs``: the new (queued) document, with ``token`` for watching it.
        ``cancel_when_unwatched``: seconds nobody may watch it before it is cancelled;
        ``priority``: 0 to 9, higher first within its queue (default: the type's)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else {}
        body = _submit_body(type, params, webhook, cancel_when_unwatched, priority)
        return _expect(self.http.post("/jobs", json=body, headers=headers), 202)

    def submit_group(
        self, members: list[dict[str, Any]], *, priority: int | None = None, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """``POST /jobs`` with ``group``: ``members`` are ``{"type", "params"?, "weight"?}``; answers the
        group's document (its ``children`` with their ids), watched like any job."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else {}
        body = {"group": members, **({"priority": priority} if priority is not None else {})}
        return _expect(self.http.post("/jobs", json=body, headers=headers), 202)

    def status(self, job_id: str) -> dict[str, Any]:
        """The job's current document (also once succeeded: no redirect to the result)."""
        return _expect(self.http.get(_path(job_id), params={"redirect": "0"}), 200)

    def result(self, job_id: str) -> Any:
        """The return value of a succeeded job; ``Conflict`` (with ``job_status``) before that."""
        return _expect(self.http.get(_path(job_id) + "/result"), 200)

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel: a queued job's document is ``cancelled`` at once; a running job's stays
        ``running`` until the worker stops it (``watch`` it to see ``cancelled``)."""
        return _expect(self.http.delete(_path(job_id)), 200, 202)

    def retry(self, job_id: str) -> dict[str, Any]:
        """Run a failed or cancelled job again (its next attempt): the ``queued`` document."""
        return _expect(self.http.post(_path(job_id) + "/retry"), 202)

    def job_types(self) -> list[dict[str, Any]]:
        """``GET /job-types``: each type's name, params JSON Schema and options."""
        return _expect(self.http.get("/job-types"), 200)["items"]

    def list_jobs(
        self, *, status: str | None = None, type: str | None = None, limit: int = 20, cursor: str | None = None,
        queue: str | None = None,
    ) -> dict[str, Any]:
        """``GET /jobs``: one page, newest first, ``{"items": [...], "next": cursor or None}``
        (``limit`` ≤ 100; a filtered page may hold fewer and still have a ``next``). Needs the API key."""
        return _expect(self.http.get("/jobs", params=_list_params(status, type, limit, cursor, queue)), 200)

    def logs(self, job_id: str, *, after: int = 0, limit: int = 1000) -> dict[str, Any]:
        """``GET /jobs/{id}/logs``: the job's log lines after seq ``after``, ``{"items": [{"seq",
        "ts", "level", "msg", "extra"?}], "next", "last", "dropped"}``; pass ``next`` as ``after``
        to read on."""
        return _expect(self.http.get(_path(job_id) + "/logs", params={"after": after, "limit": limit}), 200)

    def watch(
        self, job_id: str, *, since: int = 0, timeout: float | None = None, retry_for: float = RETRY_FOR
    ) -> Iterator[dict[str, Any]]:
        """Yield the job's documents, newest state first, until (and including) the final one.

        ``since``: a seq already seen (only newer documents are yielded; with the final seq,
        nothing is). ``timeout``: overall seconds, then ``TimeoutError``. ``retry_for``: seconds
        of failing connections after which the last error is raised. ``NotFound``/``Gone``/
        ``Unauthorized`` are raised at once.
        """
        w = _Watch(job_id, since, timeout, retry_for)
        while not w.stop:
            try:
                if w.sse:
                    yield from self._sse(w)
                else:
                    yield from self._long_poll(w)
            except (httpx.TransportError, ProblemError) as e:
                if isinstance(e, ProblemError) and not _transient(e.status):
                    raise
                time.sleep(w.failed(e))

    def _sse(self, w: _Watch) -> Iterator[dict[str, Any]]:
        path, headers, timeout = w.sse_request()
        with self.http.stream("GET", path, headers=headers, timeout=timeout) as response:
            answer = w.sse_answer(response)
            if answer == "stream":
                w.healthy()
            else:
                response.read()
                w.not_streaming(answer, response)
                return
            parser, fresh = _SSEParser(), False
            for line in response.iter_lines():
                frame = parser.feed(line)
                if frame is not None and w.accept(doc := w.parse(frame[1])):
                    fresh = True
                    yield doc
                    if w.stop:
                        return
        time.sleep(w.stream_ended(fresh, parser.retry_ms))

    def _long_poll(self, w: _Watch) -> Iterator[dict[str, Any]]:
        path, params, timeout = w.poll_request()
        doc = _expect(self.http.get(path, params=params, timeout=timeout), 200)
        w.healthy()
        if w.accept(doc):
            yield doc
        elif doc.get("status") in TERMINAL:
            w.stop = True  # the caller had it already (since >= its seq)


class AsyncClient:
    """The same calls as ``Client``, awaitable; ``watch`` is an async generator."""

    def __init__(
        self, base_url: str = DEFAULT_URL, *, api_key: str | None = None, token: str | None = None, timeout: float = 30.0
    ) -> None:
        self.http = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=_auth_headers(api_key, token), timeout=timeout)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def submit(
        self,
        type: str,
        params: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        webhook: str | None = None,
        cancel_when_unwatched: float | None = None,
        priority: int | None = None,
    ) -> dict[str, Any]:
        """``POST /jobs``: the new (queued) document, with ``token`` for watching it.
        ``cancel_when_unwatched``: seconds nobody may watch it before it is cancelled;
        ``priority``: 0 to 9, higher first within its queue (default: the type's)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else {}
        body = _submit_body(type, params, webhook, cancel_when_unwatched, priority)
        return _expect(await self.http.post("/jobs", json=body, headers=headers), 202)

    async def submit_group(
        self, members: list[dict[str, Any]], *, priority: int | None = None, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """``POST /jobs`` with ``group`` (see ``Client.submit_group``)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else {}
        body = {"group": members, **({"priority": priority} if priority is not None else {})}
        return _expect(await self.http.post("/jobs", json=body, headers=headers), 202)

    async def status(self, job_id: str) -> dict[str, Any]:
        """The job's current document (also once succeeded: no redirect to the result)."""
        return _expect(await self.http.get(_path(job_id), params={"redirect": "0"}), 200)

    async def result(self, job_id: str) -> Any:
        """The return value of a succeeded job; ``Conflict`` (with ``job_status``) before that."""
        return _expect(await self.http.get(_path(job_id) + "/result"), 200)

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel (see ``Client.cancel``)."""
        return _expect(await self.http.delete(_path(job_id)), 200, 202)

    async def retry(self, job_id: str) -> dict[str, Any]:
        """Run a failed or cancelled job again (its next attempt): the ``queued`` document."""
        return _expect(await self.http.post(_path(job_id) + "/retry"), 202)

    async def job_types(self) -> list[dict[str, Any]]:
        """``GET /job-types``: each type's name, params JSON Schema and options."""
        return _expect(await self.http.get("/job-types"), 200)["items"]

    async def list_jobs(
        self, *, status: str | None = None, type: str | None = None, limit: int = 20, cursor: str | None = None,
        queue: str | None = None,
    ) -> dict[str, Any]:
        """``GET /jobs``: one page (see ``Client.list_jobs``)."""
        return _expect(await self.http.get("/jobs", params=_list_params(status, type, limit, cursor, queue)), 200)

    async def logs(self, job_id: str, *, after: int = 0, limit: int = 1000) -> dict[str, Any]:
        """``GET /jobs/{id}/logs``: a page of the job's log lines (see ``Client.logs``)."""
        return _expect(await self.http.get(_path(job_id) + "/logs", params={"after": after, "limit": limit}), 200)

    async def watch(
        self, job_id: str, *, since: int = 0, timeout: float | None = None, retry_for: float = RETRY_FOR
    ) -> AsyncIterator[dict[str, Any]]:
        """As ``Client.watch``. Leaving the loop early leaves the stream open until the generator
        is closed: use ``contextlib.aclosing(client.watch(id))`` if you ``break``."""
        w = _Watch(job_id, since, timeout, retry_for)
        while not w.stop:
            try:
                async with contextlib.aclosing(self._sse(w) if w.sse else self._long_poll(w)) as source:
                    async for doc in source:
                        yield doc
            except (httpx.TransportError, ProblemError) as e:
                if isinstance(e, ProblemError) and not _transient(e.status):
                    raise
                await asyncio.sleep(w.failed(e))

    async def _sse(self, w: _Watch) -> AsyncIterator[dict[str, Any]]:
        path, headers, timeout = w.sse_request()
        async with self.http.stream("GET", path, headers=headers, timeout=timeout) as response:
            answer = w.sse_answer(response)
            if answer == "stream":
                w.healthy()
            else:
                await response.aread()
                w.not_streaming(answer, response)
                return
            parser, fresh = _SSEParser(), False
            async for line in response.aiter_lines():
                frame = parser.feed(line)
                if frame is not None and w.accept(doc := w.parse(frame[1])):
                    fresh = True
                    yield doc
                    if w.stop:
                        return
        await asyncio.sleep(w.stream_ended(fresh, parser.retry_ms))

    async def _long_poll(self, w: _Watch) -> AsyncIterator[dict[str, Any]]:
        path, params, timeout = w.poll_request()
        doc = _expect(await self.http.get(path, params=params, timeout=timeout), 200)
        w.healthy()
        if w.accept(doc):
            yield doc
        elif doc.get("status") in TERMINAL:
            w.stop = True
