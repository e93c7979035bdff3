"""The request-reply half of the API: submit, status (plain and long poll), result, cancel, list."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from core import contract, queue, tracing, webhooks, workers
from core.logs import request_id
from core.store import IdempotencyConflict, QueueFull, RateLimited, WriteRefused
from server import ratelimit, wire
from server.auth import TICKET_TTL, Caller
from server.events import Event, Mailbox, MailboxClosed
from server.problems import Problem, invalid
from server.requests import (
    JSONAnswer,
    choice_param,
    deadline,
    depth,
    int_param,
    key_holder,
    load,
    number_param,
    read_json,
    readable,
    reader,
    redis_deadline,
)
from worker.registry import JobType

MAX_PAGE = 100
MAX_PARAMS_DEPTH = 32
# An Idempotency-Key: 1 to 255 visible ASCII characters, spaces only inside (``server.openapi``)
IDEMPOTENCY_KEY = re.compile(r"[!-~](?:[ -~]{0,253}[!-~])?")


# -- POST /jobs --------------------------------------------------------------------------


async def submit(request: Request) -> Response:
    if tracing.tracer is None:  # (tracing off: nothing more on the submit path than this check)
        return await _submit(request, None)
    with tracing.submit_span(request.headers) as span:
        return await _submit(request, span)


async def _submit(request: Request, span: Any) -> Response:
    caller = await key_holder(request)
    settings = request.app.state.settings
    payload = await read_json(request)  # not under the Redis deadline: a slow upload is not Redis
    if not isinstance(payload, dict):
        raise invalid("body", "must be a JSON object")
    if "group" in payload:
        return await _submit_group(request, span, caller, payload)
    unknown = set(payload) - {"type", "params", "webhook", "priority", "cancel_when_unwatched"}
    if unknown:
        raise invalid(sorted(unknown)[0], "unknown field")
    registry = request.app.state.registry
    job_type, params, params_json = checked(payload, registry, settings)
    priority = checked_priority(payload, settings.max_priority_of(caller.tenant), registry[job_type].priority)
    webhook = await checked_webhook(payload, settings)
    unwatched = cancel_when_unwatched(payload, registry[job_type])
    key = idempotency_key(request)
    # accepted even when no live worker runs the type (one may be starting); the document says so
    waiting = None if job_type in request.app.state.live_types else workers.waiting_message(job_type)
    with refusals(settings):
        async with redis_deadline():  # one round trip: rate counter, idempotency, cap, job, enqueue
            doc, doc_json, _ = await request.app.state.store.create(
                job_type, params, caller.tenant, webhook, key, request_id.get(), submit_rate(caller, settings), params_json, waiting,
                tracing.traceparent(span), registry[job_type].queue, priority, unwatched,
            )  # fmt: skip
    return accepted(request, span, caller, doc, doc_json)


async def _submit_group(request: Request, span: Any, caller: Caller, payload: dict[str, Any]) -> Response:
    """``{"group": [{"type", "params", "weight"}, ...], "priority"?, "webhook"?, "fail_fast"?}``: a
    group and its children (README, Groups)."""
    settings = request.app.state.settings
    unknown = set(payload) - {"group", "priority", "webhook", "fail_fast"}
    if unknown:
        raise invalid(sorted(unknown)[0], "unknown field")
    members = payload["group"]
    if not isinstance(members, list) or not 1 <= len(members) <= contract.MAX_GROUP:
        raise invalid("group", f"must be a list of 1 to {contract.MAX_GROUP} jobs")
    registry = request.app.state.registry
    cap = settings.max_priority_of(caller.tenant)
    priority = checked_priority(payload, cap, 0)  # (given: every child's; else each its type's)
    children = []
    for i, member in enumerate(members):
        where = f"group[{i}]"
        if not isinstance(member, dict):
            raise invalid(where, "must be a JSON object")
        unknown = set(member) - {"type", "params", "weight"}
        if unknown:
            raise invalid(f"{where}.{sorted(unknown)[0]}", "unknown field")
        job_type, params, params_json = checked(member, registry, settings, where + ".")
        weight = integral(member.get("weight", 1))
        if not contract.is_weight(weight):
            raise invalid(f"{where}.weight", f"must be a number above 0, at most {contract.MAX_WEIGHT}")
        own = priority if "priority" in payload else min(registry[job_type].priority, cap)
        children.append((job_type, params, params_json, weight, registry[job_type].queue, own))
    webhook = await checked_webhook(payload, settings)  # (the group's final state is POSTed to it)
    fail_fast = payload.get("fail_fast", False)
    if not isinstance(fail_fast, bool):
        raise invalid("fail_fast", "must be true or false")
    key = idempotency_key(request)
    with refusals(settings):
        async with redis_deadline():  # one round trip: rate counter, idempotency, cap, the group and its jobs, enqueue
            doc, doc_json, _ = await request.app.state.store.create_group(
                children, caller.tenant, key, request_id.get(), submit_rate(caller, settings), tracing.traceparent(span), priority, webhook,
                fail_fast,
            )  # fmt: skip
    return accepted(request, span, caller, doc, doc_json)


def checked(payload: dict[str, Any], registry: dict[str, JobType], settings: Any, where: str = "") -> tuple[str, Any, bytes]:
    """``(type, params, params JSON)`` of a submitted job, each checked (fields named ``where`` + name)."""
    job_type = payload.get("type")
    if not isinstance(job_type, str) or job_type not in registry:
        raise invalid(where + "type", f"must be one of: {', '.join(sorted(registry))}")
    params = payload.get("params", {})
    if not isinstance(params, dict):
        raise invalid(where + "params", "must be a JSON object")
    params_json = contract.dumps(params)
    if len(params_json) > settings.params_max_bytes:
        raise invalid(where + "params", f"must be at most {settings.params_max_bytes} bytes as JSON")
    if depth(params, MAX_PARAMS_DEPTH) > MAX_PARAMS_DEPTH:
        raise invalid(where + "params", f"must not nest deeper than {MAX_PARAMS_DEPTH} levels")
    try:  # strict, as JSON Schema reads it (/job-types, /openapi.json): "5" and true are not integers, 5.0 is
        registry[job_type].params.model_validate_json(contract.dumps(integral(params)), strict=True)
    except ValidationError as e:
        errors = [{"field": ".".join([where + "params", *map(str, err["loc"])]), "message": err["msg"]} for err in e.errors()]
        raise Problem(422, "Invalid params", errors[0]["field"] + ": " + errors[0]["message"], errors=errors) from None
    return job_type, params, params_json


async def checked_webhook(payload: dict[str, Any], settings: Any) -> str | None:
    """The submit's ``webhook`` URL, checked; None without one (null is not "no webhook": the schema says string)."""
    webhook = payload.get("webhook")
    if "webhook" in payload:
        problem = await webhooks.check_submitted(webhook, settings)
        if problem:
            raise invalid("webhook", problem)
    return webhook


def checked_priority(payload: dict[str, Any], cap: int, default: int) -> int:
    priority = integral(payload.get("priority", min(default, cap)))  # (8.0 is an integer, as JSON Schema reads it)
    if type(priority) is not int or not 0 <= priority <= cap:  # (not true)
        raise invalid("priority", f"must be an integer from 0 to {cap}")
    return priority


def idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not IDEMPOTENCY_KEY.fullmatch(key):
        raise invalid("Idempotency-Key", "must be 1 to 255 visible ASCII characters (spaces only inside)")
    return key


def submit_rate(caller: Caller, settings: Any) -> tuple[str, int, int]:
    """The caller's submit counter, limit and window (``Store.create``'s ``rate``)."""
    return ratelimit.window_key("submit", caller.ident), settings.rate_submit, ratelimit.WINDOW


@contextlib.contextmanager
def refusals(settings: Any):
    """What ``Store.create`` and ``create_group`` refuse, as problems."""
    try:
        yield
    except RateLimited:
        raise ratelimit.too_many("submit", settings.rate_submit) from None
    except QueueFull:
        detail = f"At most {settings.queue_cap} jobs may wait in the queue; try again when some have started."
        raise Problem(429, "Queue full", detail, headers={"Retry-After": "5"}) from None
    except IdempotencyConflict:
        raise Problem(
            422,
            "Idempotency-Key reused",
            "This Idempotency-Key was used with a different request.",
            errors=[{"field": "Idempotency-Key", "message": "already used with a different request"}],
        ) from None


def accepted(request: Request, span: Any, caller: Caller, doc: dict[str, Any], doc_json: bytes) -> Response:
    """``202``: the new document with its watch token, ``Location`` and ``Retry-After``."""
    headers = {"Location": doc["links"]["self"], "Retry-After": retry_after(doc)}
    if span is not None:
        span.set_attributes({"job.id": doc["id"], "job.type": doc["type"]})
        headers["X-Trace-Id"] = tracing.trace_id(span)
    token = request.app.state.auth.token(doc["id"], caller.tenant)
    return JSONAnswer(contract.with_field(doc_json, "token", token), 202, headers)


def cancel_when_unwatched(payload: dict[str, Any], job_type: JobType) -> float | None:
    """The job's ``cancel_when_unwatched``: the submit's (a number of seconds, at least
    ``UNWATCHED_MIN``, at most the type's own or else ``UNWATCHED_MAX``), or the type's; none with a
    webhook, which receives the result (asking for both is a 422)."""
    if "cancel_when_unwatched" not in payload:
        return None if "webhook" in payload else job_type.cancel_when_unwatched
    value = payload["cancel_when_unwatched"]
    if "webhook" in payload:
        raise invalid("cancel_when_unwatched", "must not be given with a webhook: the webhook receives the result")
    high = job_type.cancel_when_unwatched or contract.UNWATCHED_MAX
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not contract.UNWATCHED_MIN <= value <= high:
        raise invalid("cancel_when_unwatched", f"must be a number of seconds from {contract.UNWATCHED_MIN:g} to {high:g}")
    return value


def integral(value: Any) -> Any:
    """``value`` with every float that is a whole number as an int: JSON Schema's ``integer``
    takes ``5.0``, pydantic's strict mode would not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [integral(v) for v in value]
    return value


def retry_after(doc: dict[str, Any]) -> str:
    """Polling hint: follows the ETA (a quarter of it), between 1 and 10 seconds, and, for a job
    with ``cancel_when_unwatched``, often enough that a client that follows it keeps it alive."""
    eta = doc.get("eta_s")
    if doc["status"] == contract.RUNNING and eta:
        hint = min(10, max(1, round(eta / 4)))
        if unwatched := doc.get("cancel_when_unwatched"):
            hint = min(hint, max(1, int((unwatched - contract.WATCH_BEAT) / 2)))
        return str(hint)
    return "1"


# -- GET /jobs/{id} ----------------------------------------------------------------------


async def status(request: Request) -> Response:
    job_id = request.path_params["job_id"]
    wait = number_param(request, "wait")  # every parameter is checked, even one that does not apply
    after = int_param(request, "after", None)
    redirect = choice_param(request, "redirect", ("0", "1")) != "0"
    async with redis_deadline():
        caller = await reader(request)
        limit = request.app.state.settings.rate_poll
        raw = await request.app.state.limiter.check("poll", caller.ident, limit, read=contract.job_key(job_id))
        event = await readable(request, job_id, caller, raw)
    if wait is not None:
        event = await long_poll(request, event, wait, after, caller)
    etag = f'"{event.seq}"'
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if not event.terminal:
        doc = json.loads(event.doc)
        headers["Retry-After"] = retry_after(doc)
        if doc.get("cancel_when_unwatched"):  # a poll watches it (marked with the server's next beat)
            request.app.state.watched.polled(job_id)
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    accept = request.headers.get("accept", "")
    if "text/plain" in accept and "json" not in accept:
        return Response(wire.text_bar(json.loads(event.doc)) + "\n", 200, headers, media_type="text/plain")
    if event.name == contract.SUCCEEDED and wait is None and redirect:
        headers["Location"] = f"/jobs/{job_id}/result"
        return JSONAnswer(event.doc, 303, headers)
    return JSONAnswer(event.doc, 200, headers)


async def long_poll(request: Request, event: Event, wait: float, after: int | None, caller: Caller) -> Event:
    """Hold the request until the job's seq passes ``after`` (default: its seq now) or ``wait``
    seconds (at most LONG_POLL_MAX) pass."""
    seconds = min(wait, request.app.state.settings.long_poll_max)
    if after is None:
        after = event.seq
    if event.seq > after or event.terminal or seconds == 0:
        return event
    mailbox = Mailbox()
    mailbox.expect(event.job_id, after)
    with request.app.state.hub.watching(mailbox) as watch:
        try:
            async with redis_deadline():
                await watch.add([event.job_id])
                mailbox.put(await load(request, event.job_id, caller))  # the change may have come before the watch
            async with asyncio.timeout(seconds):
                return await mailbox.get()
        except (TimeoutError, MailboxClosed):  # nothing newer in time, or this server is draining
            return event


# -- GET /jobs/{id}/result ---------------------------------------------------------------


@deadline
async def result(request: Request) -> Response:
    job_id = request.path_params["job_id"]
    event = await load(request, job_id, await reader(request))
    if event.name != contract.SUCCEEDED:
        doc = json.loads(event.doc)
        state = doc["status"]
        detail = f"Job {job_id!r} is {state}; a result exists only once it has succeeded."
        headers = {} if event.terminal else {"Retry-After": "1"}
        raise Problem(409, "No result", detail, headers=headers, job_status=state, error=doc["error"])
    value = await request.app.state.store.result(job_id)
    return JSONAnswer(value if value is not None else b"null", 200)


@deadline
async def params(request: Request) -> Response:
    """``GET /jobs/{id}/params``: the params the job was submitted with (a job page shows them)."""
    job_id = request.path_params["job_id"]
    await load(request, job_id, await reader(request))
    value = await request.app.state.store.field(job_id, "params")
    return JSONAnswer(value.encode() if value is not None else b"{}", 200, {"Cache-Control": "private, max-age=3600"})


# -- DELETE /jobs/{id} -------------------------------------------------------------------


@deadline
async def cancel(request: Request) -> Response:
    """Queued: cancelled at once (200), with the children it spawned. Running: the worker is told
    to stop (202), and stops its children. A group: each of its children that has not ended is
    cancelled so (202; the group ends once they have)."""
    job_id = request.path_params["job_id"]
    caller = await key_holder(request)
    event = await load(request, job_id, caller)
    doc = json.loads(event.doc)
    if event.terminal:
        raise Problem(409, "Job already finished", f"Job {job_id!r} is {doc['status']}.", job_status=doc["status"])
    if doc["type"] == contract.GROUP and "children" in doc:
        going = [child["id"] for child in doc["children"] if child["status"] not in contract.TERMINAL]
        for refused in await asyncio.gather(*(cancel_job(request, child, caller) for child in going), return_exceptions=True):
            if isinstance(refused, BaseException) and not (isinstance(refused, Problem) and refused.status == 409):
                raise refused  # (a child that ended meanwhile, or is changing, is left as it is)
        return JSONAnswer((await load(request, job_id, caller)).doc, 202)
    status, body = await cancel_job(request, job_id, caller, event)
    if status == 200 and "children" in doc:  # a job that spawned, queued between attempts: its children stop too
        await request.app.state.store.stop_children(job_id)
    return JSONAnswer(body, status)


async def cancel_job(request: Request, job_id: str, caller: Caller, event: Any = None) -> tuple[int, bytes]:
    """Cancel one job (``event``: its stored event, if read already): ``(200, its cancelled
    document)`` if it was queued, ``(202, its document)`` once its worker is told to stop; ``409``
    if it has ended."""
    store = request.app.state.store
    redis = store.redis
    for _ in range(5):
        event = event or await load(request, job_id, caller)
        doc = json.loads(event.doc)
        if event.terminal:
            raise Problem(409, "Job already finished", f"Job {job_id!r} is {doc['status']}.", job_status=doc["status"])
        if doc["status"] == contract.QUEUED:
            try:
                doc = await store.write(doc, event.tenant, status=contract.CANCELLED, eta_s=None)
            except WriteRefused:
                event = None
                continue  # a worker took it, or it changed: look again
            await queue.dequeue(redis, doc.get("queue", queue.DEFAULT), job_id)
            return 200, contract.dumps(doc)
        await store.stop([job_id])
        return 202, event.doc
    raise Problem(409, "Job is changing", "Try again.", headers={"Retry-After": "1"})


# -- POST /jobs/{id}/retry ---------------------------------------------------------------


@deadline
async def retry(request: Request) -> Response:
    """Run a failed or cancelled job again, as its next attempt: 202 + the queued document."""
    job_id = request.path_params["job_id"]
    event = await load(request, job_id, await key_holder(request))
    doc = json.loads(event.doc)
    if doc["status"] not in (contract.FAILED, contract.CANCELLED):
        detail = f"Job {job_id!r} is {doc['status']}; only failed or cancelled jobs can be retried."
        raise Problem(409, "Job cannot be retried", detail, job_status=doc["status"])
    if doc["type"] == contract.GROUP:
        detail = "A group is not run again as a whole; retry its failed or cancelled children (a group that has ended stays so)."
        raise Problem(409, "Job cannot be retried", detail, job_status=doc["status"])
    try:
        doc = await request.app.state.store.reopen(doc, event.tenant)
    except WriteRefused:  # it changed, or the worker is still finishing its last attempt
        raise Problem(409, "Job is changing", "Try again in a moment.", headers={"Retry-After": "1"}) from None
    return JSONAnswer(contract.dumps(doc), 202, {"Location": doc["links"]["self"]})


# -- POST /tickets ----------------------------------------------------------------------


@deadline
async def ticket(request: Request) -> Response:
    """A single-use, 60-second ticket for ``{"jobs": [...]}`` or ``{"all": true}``: put it in a
    stream URL (``?ticket=``) instead of a longer-lived watch token."""
    caller = await reader(request)
    payload = await read_json(request)
    if not isinstance(payload, dict):
        raise invalid("body", "must be a JSON object")
    unknown = set(payload) - {"jobs", "all"}
    if unknown:
        raise invalid(sorted(unknown)[0], "unknown field")
    if "all" in payload:  # {"all": true}, nothing else
        if payload["all"] is not True or "jobs" in payload:
            raise invalid("all", "must be true, and without jobs")
        if not caller.by_key:
            raise Problem(403, "Forbidden", "A ticket for every job needs an API key.")
        jobs = None
    else:
        jobs = payload.get("jobs")
        if not isinstance(jobs, list) or not jobs or not all(isinstance(j, str) for j in jobs) or len(jobs) > MAX_PAGE:
            raise invalid("jobs", f"must be a list of 1 to {MAX_PAGE} job ids")
        for job_id in jobs:
            await load(request, job_id, caller)
    value = await request.app.state.auth.ticket(caller, jobs)
    return JSONAnswer(contract.dumps({"ticket": value, "expires_in": TICKET_TTL}), 201)


# -- GET /jobs ---------------------------------------------------------------------------


@deadline
async def list_jobs(request: Request) -> Response:
    """Newest first; ``status``, ``type`` and ``queue`` filters; ``cursor`` from the previous page's ``next``.
    Needs the API key, or a ticket for the whole feed (a dashboard in a browser)."""
    caller = await reader(request)
    if not (caller.by_key or caller.all_jobs):
        raise Problem(401, "API key required", "Listing jobs needs an API key or a ticket for every job.", headers={"WWW-Authenticate": "Bearer"})
    index = contract.jobs_index(caller.tenant)
    limit = int_param(request, "limit", 20, 1, MAX_PAGE)
    cursor = int_param(request, "cursor", 0, 0) or "+inf"
    want_status = choice_param(request, "status", ("", *contract.STATES))  # empty, like type=: any
    want_type = request.query_params.get("type")
    want_queue = request.query_params.get("queue")
    store = request.app.state.store
    items: list[bytes] = []
    upper: Any = f"({cursor}" if cursor != "+inf" else cursor
    scanned, last_score, exhausted = 0, None, False
    while len(items) < limit and scanned < limit * 20:
        batch = await store.redis.zrevrangebyscore(index, upper, "-inf", start=0, num=limit, withscores=True)
        if not batch:
            exhausted = True
            break
        raws = await store.read_many([job_id.decode() for job_id, _ in batch])
        for (_, score), raw in zip(batch, raws):
            scanned += 1
            last_score = int(score)
            upper = f"({last_score}"
            doc = raw and contract.unpack(raw).doc
            if doc and _matches(doc, want_status, want_type, want_queue):
                items.append(doc)
                if len(items) == limit:
                    break
    next_cursor = b"null" if exhausted or last_score is None else b"%d" % last_score
    body = b'{"items":[' + b",".join(items) + b'],"next":' + next_cursor + b"}"
    return JSONAnswer(body, 200)


def _matches(doc: bytes, status: str | None, job_type: str | None, queue_name: str | None) -> bool:
    if not (status or job_type or queue_name):
        return True
    parsed = json.loads(doc)
    return (
        (not status or parsed["status"] == status)
        and (not job_type or parsed["type"] == job_type)
        and (not queue_name or parsed.get("queue", queue.DEFAULT) == queue_name)
    )
