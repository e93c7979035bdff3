"""What every handler shares: one Redis deadline per request, who is calling, the job they may
read, and strict parsing of query parameters and JSON bodies (``server.jobs``, ``server.sse``,
``server.ws``, ``server.jobtypes``).
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import re
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.requests import Request
from starlette.responses import Response

from core import contract
from core.store import REDIS_DEADLINE
from server.auth import Caller
from server.events import Event
from server.problems import Problem, gone, invalid, not_found

JSON = "application/json"


class JSONAnswer(Response):
    """A JSON answer: the body's bytes (already JSON) and a newline, so that curl's output ends
    its line instead of running into the prompt."""

    media_type = JSON

    def render(self, content: bytes) -> bytes:
        return content + b"\n"


class redis_deadline:  # lower case: used as ``async with redis_deadline():``, like asyncio.timeout
    """One timer per request for all its Redis calls: the Redis client has no per-command
    timeout (that cost two timers per command). A frozen Redis gives 503, not a hung request.
    (A class, not ``@asynccontextmanager``: this is on every request, and a generator-based
    context manager costs twice as much.)"""

    __slots__ = ("_timeout",)

    async def __aenter__(self) -> None:
        self._timeout = asyncio.timeout(REDIS_DEADLINE)
        await self._timeout.__aenter__()

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            await self._timeout.__aexit__(kind, exc, tb)
        except TimeoutError:
            raise RedisTimeoutError("Redis did not answer in time") from None
        if kind is not None and issubclass(kind, TimeoutError):
            raise RedisTimeoutError("Redis did not answer in time") from None


def deadline(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    @functools.wraps(handler)
    async def bounded(request: Request) -> Response:
        async with redis_deadline():
            return await handler(request)

    return bounded


async def load(request: Request, job_id: str, caller: Caller) -> Event:
    """The job's current event if ``caller`` may read it, or 404 (also for another tenant's job) / 410."""
    return await readable(request, job_id, caller, await request.app.state.store.read(job_id))


async def readable(request: Request, job_id: str, caller: Caller, raw: bytes | None) -> Event:
    """``raw``, the job's stored event (None: none stored), if ``caller`` may read it; else 404 / 410."""
    store = request.app.state.store
    if raw is None:
        if caller.jobs is None or job_id in caller.jobs:
            if await store.is_gone(job_id, caller.tenant):
                raise gone(job_id)
        raise not_found(job_id)
    event = Event(job_id, raw)
    if not may_read(caller, event):
        raise not_found(job_id)
    return event


def may_read(caller: Caller, event: Event) -> bool:
    """Whether ``caller`` may read ``event``'s job: its own tenant's, and for a watch token or
    ticket, one of its jobs or a child of one of its groups."""
    if caller.may_read(event.job_id, event.tenant):
        return True
    return caller.jobs is not None and event.tenant == caller.tenant and contract.parent_of(event.doc) in caller.jobs


async def key_holder(request: Request) -> Caller:
    """The caller of a call that needs the API key (submit, list, cancel, retry, result)."""
    return await request.app.state.auth.caller(request, key_only=True)


async def reader(request: Request) -> Caller:
    """The caller of a read (status, streams): API key, watch token or ticket."""
    return await request.app.state.auth.caller(request)


INTEGER = re.compile(r"-?[0-9]+")  # ASCII digits only: int() also takes "+1", " 1", "1_0", "١"
NUMBER = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")  # a JSON-like number, no NaN or inf
MAX_INT = 2**63 - 1  # the upper bound of every integer parameter (``server.openapi`` says the same)


def int_param(request: Request, name: str, default: int | None, low: int = 0, high: int = MAX_INT) -> int | None:
    """Query parameter ``name`` as an integer between ``low`` and ``high``, or ``default`` when
    absent; anything else is a 422 naming it. Exactly what ``/openapi.json`` declares."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not INTEGER.fullmatch(raw):
        raise invalid(name, "must be an integer")
    value = int(raw) if len(raw.lstrip("-0")) <= 19 else MAX_INT + 1  # not thousands of digits through int()
    if not low <= value <= high:
        raise invalid(name, f"must be between {low} and {high}")
    return value


def number_param(request: Request, name: str, low: float = 0.0) -> float | None:
    """Query parameter ``name`` as a number >= ``low`` (decimal or exponent notation), or None
    when absent; anything else (NaN, inf, words) is a 422 naming it."""
    raw = request.query_params.get(name)
    if raw is None:
        return None
    if not NUMBER.fullmatch(raw):
        raise invalid(name, "must be a number")
    value = float(raw)
    if not value >= low:
        raise invalid(name, f"must be >= {low:g}")
    return value


def choice_param(request: Request, name: str, choices: tuple[str, ...]) -> str | None:
    """Query parameter ``name`` if it is one of ``choices``, None when absent, else a 422 naming it."""
    raw = request.query_params.get(name)
    if raw is not None and raw not in choices:
        raise invalid(name, "must be one of: " + ", ".join(repr(c) for c in choices))
    return raw


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key in object")
    return obj


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:20]} is too large")
    return value


SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # in valid UTF-8, only an escape gives a lone surrogate
BODY_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite, object_pairs_hook=_no_duplicate_keys)


def strict_json(body: bytes) -> Any:
    """Parse a request body: UTF-8 (RFC 8259; a BOM is skipped), then ``strict_json_text``."""
    try:
        text = body.decode("utf-8-sig")  # strict: json.loads(bytes) would let raw surrogates in
    except UnicodeDecodeError as e:
        raise Problem(400, "Malformed JSON", str(e)) from None
    return strict_json_text(text)


def strict_json_text(text: str) -> Any:
    """Parse JSON text (a body, a WebSocket message): no NaN/Infinity (nor numbers that overflow
    to it), no duplicate keys, no runaway nesting, no lone surrogates (which cannot be stored as
    UTF-8). Raises ``Problem`` 400 saying what is wrong."""
    try:
        value = BODY_DECODER.decode(text)  # json.loads with these options would build one per call
        if SURROGATE_ESCAPE.search(text):
            contract.dumps(value)  # a lone surrogate cannot be encoded to UTF-8
        return value
    except UnicodeEncodeError:
        raise Problem(400, "Malformed JSON", "strings must be valid Unicode (no lone surrogates)") from None
    except (ValueError, RecursionError) as e:
        raise Problem(400, "Malformed JSON", str(e) if not isinstance(e, RecursionError) else "nested too deeply") from None


async def read_json(request: Request) -> Any:
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != JSON and not media_type.endswith("+json"):
        raise Problem(415, "Unsupported media type", "Send the body as application/json.")
    limit = request.app.state.settings.max_body_bytes
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large(limit)
    return strict_json(bytes(body))


def too_large(limit: int) -> Problem:
    return Problem(413, "Body too large", f"The body must be at most {limit} bytes.")


def depth(value: Any, limit: int) -> int:
    """Nesting depth of a JSON value, counting no further than ``limit + 1``."""
    if limit < 0 or not isinstance(value, (dict, list)):
        return 0
    items = value.values() if isinstance(value, dict) else value
    return 1 + max((depth(item, limit - 1) for item in items), default=0)
