"""``/openapi.json``: this deployment's API, exactly (OpenAPI 3.2).

Built once per app (``document``) from the settings and the registered job types, so it says what
this server does: the job types and each one's params schema, whether webhooks are on, whether an
API key is needed. Every parameter carries the bounds the handlers enforce (``server.requests``:
``int_param``, ``number_param``, ``choice_param``), every operation every status it can answer,
with its headers; problems are RFC 9457 with ``detail``. ``tests/test_openapi.py`` runs
Schemathesis against a live server with this document to keep the two in step.

OpenAPI 3.2, not 3.1, for the streams: 3.2's ``itemSchema`` describes each event of a
``text/event-stream`` (as ``{event, data, id, retry}``, ``data`` a JSON document by
``contentMediaType``/``contentSchema``), which 3.1 has no way to say. Schemathesis validates each
event against it; Swagger UI reads 3.2 since 5.32. The WebSocket, which OpenAPI cannot describe,
is in the ``x-websocket`` extension of ``GET /ws``: its messages as JSON Schemas and its close codes.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from core import contract
from core.contract import dumps
from core.settings import Settings
from server import joblogs, jobs, sse
from server.auth import TICKET_TTL
from server.requests import MAX_INT, JSONAnswer
from server.streams import MAX_JOBS_PER_STREAM
from worker.registry import JobType

MAX_PAGE = jobs.MAX_PAGE
JOB_ID = "^j_[A-Za-z0-9_-]{24}$"  # contract.new_job_id
TOKEN = r"^v1\.j_[A-Za-z0-9_-]{24}\.[A-Za-z0-9_-]{0,64}\.[0-9]+\.[A-Za-z0-9_-]{24}$"  # Auth.token
TICKET = "^[A-Za-z0-9_-]{32}$"  # Auth.ticket
IDEMPOTENCY_KEY = f"^{jobs.IDEMPOTENCY_KEY.pattern}$"
CURSOR = f"^{sse.CURSOR.pattern}$"
SEQ = f"^{sse.SEQ.pattern}$"
EVENTS = ["progress", "succeeded", "failed", "cancelled"]


def ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def schema(name: str) -> dict[str, str]:
    return ref("schemas", name)


def json_body(value: dict[str, Any], media: str = "application/json") -> dict[str, Any]:
    return {media: {"schema": value}}


def answer(description: str, content: dict[str, Any] | None = None, **headers: dict[str, Any]) -> dict[str, Any]:
    """A response: every one carries X-Request-ID (``server.middleware``)."""
    out: dict[str, Any] = {"description": description, "headers": {"X-Request-ID": ref("headers", "X-Request-ID")}}
    out["headers"].update({name.replace("_", "-"): value for name, value in headers.items()})
    if content:
        out["content"] = content
    return out


def problems(*codes: int) -> dict[str, Any]:
    return {str(code): ref("responses", PROBLEM_NAMES[code]) for code in codes}


PROBLEM_NAMES = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    410: "Gone",
    413: "TooLarge",
    415: "UnsupportedMediaType",
    422: "Invalid",
    426: "UpgradeRequired",
    429: "TooManyStreams",
    503: "Unavailable",
}
PROBLEM = {"application/problem+json": {"schema": schema("Problem")}}


def header(description: str, value: dict[str, Any], required: bool = True) -> dict[str, Any]:
    return {"description": description, "required": required, "schema": value}


HEADERS: dict[str, Any] = {
    "X-Request-ID": header(
        "This request's id: the client's X-Request-ID when it is 1 to 64 of `A-Za-z0-9._-`, else a new one; in every log line of the request and of its job",
        {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"},
    ),
    "Location": header("Where the job (or its result) is", {"type": "string", "pattern": "^/jobs/j_[A-Za-z0-9_-]{24}(/result)?$"}),
    "Retry-After": header("Seconds to wait before asking again", {"type": "integer", "minimum": 0}),
    "ETag": header('The job\'s seq, quoted: send it back as If-None-Match', {"type": "string", "pattern": '^"[0-9]+"$'}),
    "Cache-Control": header("Caching", {"type": "string"}, required=False),
    "RateLimit-Limit": header("Requests allowed per window", {"type": "integer", "minimum": 0}, required=False),
    "RateLimit-Remaining": header("Requests left in this window", {"type": "integer", "minimum": 0}, required=False),
    "RateLimit-Reset": header("Seconds until the window ends", {"type": "integer", "minimum": 0}, required=False),
    "RateLimit-Policy": header("`<limit>;w=<window seconds>`", {"type": "string", "pattern": "^[0-9]+;w=[0-9]+$"}, required=False),
    "WWW-Authenticate": header("The scheme to authenticate with", {"const": "Bearer"}),
    "Upgrade": header("The protocol to switch to", {"const": "websocket"}),
}

def optional(name: str) -> dict[str, Any]:
    """A header that only some answers of a status carry (a $ref cannot say so)."""
    return HEADERS[name] | {"required": False}


RESPONSES: dict[str, Any] = {
    "BadRequest": answer("Malformed: a body that is not UTF-8 JSON (NaN, duplicate keys, runaway nesting, numbers that overflow, lone surrogates), or a malformed Last-Event-ID", PROBLEM),
    "Unauthorized": answer("No, malformed, unknown, expired or used credentials", PROBLEM, WWW_Authenticate=ref("headers", "WWW-Authenticate")),
    "Forbidden": answer("These credentials may not do this (e.g. watch every job with a watch token)", PROBLEM),
    "NotFound": answer("No such job, or another tenant's (the same answer)", PROBLEM),
    "Conflict": answer(
        "The job's state does not allow it (the problem's `job_status` says which); `Retry-After` when it is changing",
        PROBLEM,
        Retry_After=optional("Retry-After"),
    ),
    "Gone": answer("The job finished and its document has expired (for TOMBSTONE_TTL, then 404)", PROBLEM),
    "TooLarge": answer("The body is over MAX_BODY_BYTES", PROBLEM),
    "UnsupportedMediaType": answer("The body is not `application/json` (or `+json`)", PROBLEM),
    "Invalid": answer("A parameter or body field is invalid: `errors` names each (`field`, `message`)", PROBLEM),
    "UpgradeRequired": answer("A plain request to the WebSocket", PROBLEM, Upgrade=ref("headers", "Upgrade")),
    "TooManyStreams": answer("Over MAX_STREAMS_PER_CLIENT open streams (SSE + WebSocket) on this server process", PROBLEM, Retry_After=ref("headers", "Retry-After")),
    "Unavailable": answer("Redis is unreachable (or did not answer in time)", PROBLEM, Retry_After=ref("headers", "Retry-After")),
}


def rate_limited(what: str) -> dict[str, Any]:
    return answer(
        what,
        PROBLEM,
        Retry_After=ref("headers", "Retry-After"),
        RateLimit_Limit=ref("headers", "RateLimit-Limit"),
        RateLimit_Remaining=ref("headers", "RateLimit-Remaining"),
        RateLimit_Reset=ref("headers", "RateLimit-Reset"),
        RateLimit_Policy=ref("headers", "RateLimit-Policy"),
    )


NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}
SCHEMAS: dict[str, Any] = {
    "Job": {
        "type": "object",
        "description": "A job's document: the body of status answers, each SSE event's `data` and each WebSocket event's `job`",
        "required": [
            "id", "type", "status", "progress", "message", "stage", "seq", "attempt", "created_at",
            "started_at", "updated_at", "finished_at", "eta_s", "stalled", "error", "links",
        ],  # fmt: skip
        "properties": {
            "id": {"type": "string", "pattern": JOB_ID},
            "type": {"type": "string", "description": "the job type"},
            "queue": {"type": ["string", "null"], "description": "the named queue it waits in (its type's); null for a group"},
            "priority": {"type": "integer", "minimum": 0, "maximum": 9, "description": "higher starts first within its queue"},
            "status": {"enum": list(contract.STATES)},
            "progress": {"type": ["number", "null"], "minimum": 0, "maximum": 100, "description": "percent; null until reported (or when not measurable)"},
            "message": {"type": ["string", "null"]},
            "stage": {"type": ["string", "null"]},
            "seq": {"type": "integer", "minimum": 1, "description": "rises with every change: the SSE id, the ETag, the resume point"},
            "attempt": {"type": "integer", "minimum": 0, "description": "0 until a worker first takes it"},
            "created_at": {"type": "string", "format": "date-time"},
            "started_at": NULLABLE_TIME,
            "updated_at": {"type": "string", "format": "date-time"},
            "finished_at": NULLABLE_TIME,
            "expires_at": NULLABLE_TIME | {"description": "a finished job's: when its document and result are gone (then 410, then 404)"},
            "cancel_when_unwatched": {
                "type": ["number", "null"],
                "minimum": contract.UNWATCHED_MIN,
                "maximum": contract.UNWATCHED_MAX,
                "description": "seconds nobody may watch the job (stream, WebSocket subscription, poll) before it is cancelled (error `Unwatched`); null: never",
            },
            "eta_s": {"type": ["number", "null"], "minimum": 0, "description": "estimated seconds left while running"},
            "stalled": {"type": "boolean", "description": "running without progress for STALL_AFTER seconds"},
            "error": {"oneOf": [schema("JobError"), {"type": "null"}]},
            "attempts": {
                "type": "array",
                "description": f"the attempts that have ended, oldest first (the newest {contract.MAX_ATTEMPTS_KEPT}): why a job was retried",
                "items": {
                    "type": "object",
                    "required": ["attempt", "started_at", "ended_at", "outcome", "error"],
                    "properties": {
                        "attempt": {"type": "integer", "minimum": 1},
                        "started_at": NULLABLE_TIME,
                        "ended_at": {"type": "string", "format": "date-time"},
                        "outcome": {"enum": ["succeeded", "failed", "cancelled", "retrying", "requeued", "lost"]},
                        "error": {"oneOf": [schema("JobError"), {"type": "null"}]},
                    },
                },
            },
            "parent": {"type": "string", "pattern": JOB_ID, "description": "a child's group, or the job that spawned it"},
            "children": {
                "type": "array",
                "description": "a group's or a job's that spawned some: its children, in order, with their weights and statuses (watch a child for its progress)",
                "items": {
                    "type": "object",
                    "required": ["id", "type", "weight", "status"],
                    "properties": {
                        "id": {"type": "string", "pattern": JOB_ID},
                        "type": {"type": "string"},
                        "weight": {"type": "number", "exclusiveMinimum": 0},
                        "status": {"enum": list(contract.STATES)},
                    },
                },
            },
            "links": {
                "type": "object",
                "required": ["self", "events", "result"],
                "properties": {
                    "self": {"type": "string", "pattern": "^/jobs/j_[A-Za-z0-9_-]{24}$"},
                    "events": {"type": "string", "pattern": "^/jobs/j_[A-Za-z0-9_-]{24}/events$"},
                    "result": {"type": "string", "pattern": "^/jobs/j_[A-Za-z0-9_-]{24}/result$"},
                },
            },
        },
    },
    "JobError": {
        "type": "object",
        "required": ["type", "message"],
        "properties": {
            "type": {"type": "string", "description": "the exception's class, or TimeoutError, InvalidParams, UnknownJobType, JobRejected, ResultNotJSON, Unwatched (a cancelled job's)"},
            "message": {"type": "string"},
            "traceback": {"type": "string", "description": "only with DEBUG=true"},
        },
    },
    "SubmittedJob": {
        "allOf": [
            schema("Job"),
            {
                "type": "object",
                "required": ["token"],
                "properties": {"token": {"type": "string", "pattern": TOKEN, "description": "the job's watch token: read it (status, streams) without the API key"}},
            },
        ]
    },
    "JobPage": {
        "type": "object",
        "required": ["items", "next"],
        "properties": {
            "items": {"type": "array", "items": schema("Job"), "maxItems": MAX_PAGE},
            "next": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_INT, "description": "the next page's `cursor`; null at the end"},
        },
    },
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {"const": "about:blank"},
            "title": {"type": "string"},
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "detail": {"type": "string", "minLength": 1},
            "errors": {
                "type": "array",
                "minItems": 1,
                "items": {"type": "object", "required": ["field", "message"], "properties": {"field": {"type": "string"}, "message": {"type": "string"}}},
            },
            "job_status": {"enum": list(contract.STATES), "description": "409: the job's status"},
            "error": {"oneOf": [schema("JobError"), {"type": "null"}], "description": "409 from /result: the job's error"},
        },
    },
    "TicketRequest": {
        "oneOf": [
            {
                "type": "object",
                "title": "Some jobs",
                "required": ["jobs"],
                "additionalProperties": False,
                "properties": {"jobs": {"type": "array", "minItems": 1, "maxItems": MAX_PAGE, "items": {"type": "string", "pattern": JOB_ID}}},
            },
            {
                "type": "object",
                "title": "Every job (needs the API key)",
                "required": ["all"],
                "additionalProperties": False,
                "properties": {"all": {"const": True}},
            },
        ]
    },
    "Ticket": {
        "type": "object",
        "required": ["ticket", "expires_in"],
        "properties": {"ticket": {"type": "string", "pattern": TICKET}, "expires_in": {"const": TICKET_TTL}},
    },
    "JobType": {
        "type": "object",
        "required": [
            "name", "description", "params_schema", "timeout", "max_tries", "backoff", "result_ttl", "queue", "priority", "cancel_when_unwatched",
        ],  # fmt: skip
        "properties": {
            "name": {"type": "string"},
            "description": {"type": ["string", "null"]},
            "params_schema": {"type": "object", "description": "the JSON Schema of the type's params"},
            "timeout": {"type": "number", "minimum": 0},
            "max_tries": {"type": "integer", "minimum": 1},
            "backoff": {"type": "number", "minimum": 0},
            "result_ttl": {"type": "integer", "minimum": 0},
            "queue": {"type": "string", "description": "the named queue its jobs wait in"},
            "priority": {"type": "integer", "minimum": 0, "maximum": 9, "description": "of a submit that asks for none"},
            "cancel_when_unwatched": {
                "type": ["number", "null"],
                "minimum": contract.UNWATCHED_MIN,
                "maximum": contract.UNWATCHED_MAX,
                "description": "seconds its jobs may go unwatched before they are cancelled, and the most a submit may ask; null: never (a submit may ask)",
            },
        },
    },
    "Queue": {
        "type": "object",
        "required": ["name", "waiting", "oldest_waiting_s", "running", "limit", "workers"],
        "properties": {
            "name": {"type": "string"},
            "waiting": {"type": "integer", "minimum": 0, "description": "its queued jobs (retries waiting out their back-off among them)"},
            "oldest_waiting_s": {"type": ["number", "null"], "minimum": 0, "description": "how long the oldest of them has waited"},
            "running": {"type": "integer", "minimum": 0, "description": "its jobs running, as the live workers report"},
            "limit": {"type": "integer", "minimum": 0, "description": "how many of its jobs the live workers would run at once"},
            "workers": {"type": "integer", "minimum": 0, "description": "live workers that serve it"},
        },
    },
    "Worker": {
        "type": "object",
        "required": ["id", "host", "pid", "types", "concurrency", "running", "started_at", "beat_at"],
        "properties": {
            "id": {"type": "string"},
            "host": {"type": "string"},
            "pid": {"type": "integer"},
            "types": {"type": "array", "items": {"type": "string"}},
            "concurrency": {"type": "integer", "minimum": 1},
            "running": {"type": "integer", "minimum": 0},
            "queues": {
                "type": "object",
                "description": "the queues it takes jobs from (WORKER_QUEUES): how many of each it runs at most, and now",
                "additionalProperties": {
                    "type": "object",
                    "required": ["limit", "running"],
                    "properties": {"limit": {"type": "integer", "minimum": 1}, "running": {"type": "integer", "minimum": 0}},
                },
            },
            "started_at": {"type": "string", "format": "date-time"},
            "beat_at": {"type": "string", "format": "date-time"},
        },
    },
    # -- one event of an SSE stream, as OpenAPI 3.2 reads a text/event-stream: {event, data, id, retry}
    "JobEvent": {
        "type": "object",
        "title": "A change of the job",
        "required": ["event", "data", "id"],
        "properties": {
            "event": {"enum": EVENTS, "description": "progress, or the final status (the last event)"},
            "id": {"type": "string", "pattern": "^[0-9]+(:[0-9]+)?$", "description": "the document's seq (with ?logs=1: seq:log seq): resume with Last-Event-ID or ?since="},
            "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": schema("Job")},
        },
    },
    "LogLine": {
        "type": "object",
        "title": "A line of a job's log",
        "required": ["seq", "ts", "level", "msg"],
        "properties": {
            "seq": {"type": "integer", "minimum": 1, "description": "counts the job's lines from 1, across attempts"},
            "ts": {"type": "string", "format": "date-time"},
            "level": {"type": "string", "description": "INFO, WARNING, ERROR, CRITICAL (or a custom level's name)"},
            "msg": {"type": "string", "description": "the message (with an exception's traceback when one was logged)"},
            "extra": {"type": "object", "description": "the record's extra fields (ctx.log.info(..., extra={...}))"},
        },
    },
    "LogBatch": {
        "type": "object",
        "title": "Lines first..last of a job's log",
        "required": ["job", "first", "last", "lines"],
        "properties": {
            "job": {"type": "string"},
            "first": {"type": "integer"},
            "last": {"type": "integer"},
            "lines": {"type": "array", "items": schema("LogLine")},
        },
    },
    "LogGap": {
        "type": "object",
        "title": "Lines first..last skipped for a slow reader (or no longer kept): GET /jobs/{id}/logs?after=first-1",
        "required": ["job", "first", "last"],
        "properties": {"job": {"type": "string"}, "first": {"type": "integer"}, "last": {"type": "integer"}},
    },
    "LogPage": {
        "type": "object",
        "required": ["items", "next", "last", "dropped"],
        "properties": {
            "items": {"type": "array", "items": schema("LogLine")},
            "next": {"type": "integer", "description": "pass as ?after= to read on"},
            "last": {"type": "integer", "description": "the newest line's seq (0: no log)"},
            "dropped": {"type": "integer", "description": "lines after ?after= that are no longer kept (JOB_LOG_LINES)"},
        },
    },
    "JobLogEvent": {
        "type": "object",
        "title": "Lines of the job's log (?logs=1)",
        "required": ["event", "data", "id"],
        "properties": {
            "event": {"enum": ["log", "log-gap"]},
            "id": {"type": "string", "pattern": "^[0-9]+:[0-9]+$", "description": "seq:log seq"},
            "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": [schema("LogBatch"), schema("LogGap")]}},
        },
    },
    "JobHtmlEvent": {
        "type": "object",
        "title": "?format=html: the change as an HTML fragment",
        "required": ["event", "data", "id"],
        "properties": {
            "event": {"enum": EVENTS},
            "id": {"type": "string", "pattern": "^[0-9]+$"},
            "data": {"type": "string", "contentMediaType": "text/html", "pattern": '^<div class="job job-', "description": "a <progress> bar, every value escaped"},
        },
    },
    "JobDoneEvent": {
        "type": "object",
        "title": "?format=html: after the final event, for htmx's sse-close",
        "required": ["event", "data"],
        "properties": {"event": {"const": "done"}, "data": {"enum": EVENTS[1:]}},
    },
    "FeedEvent": {
        "type": "object",
        "title": "A change of one of the watched jobs",
        "required": ["event", "data", "id"],
        "properties": {
            "event": {"enum": EVENTS},
            "id": {"type": "string", "pattern": "^[A-Za-z0-9_-]+$", "description": "an opaque cursor: resume with Last-Event-ID or ?cursor="},
            "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": schema("Job")},
        },
    },
    # -- the WebSocket's messages (x-websocket of GET /ws)
    "WsSubscribe": {
        "type": "object",
        "required": ["op", "jobs"],
        "properties": {
            "op": {"const": "subscribe"},
            "jobs": {"type": "array", "items": {"type": "string", "minLength": 1}},
            "since": {"type": "object", "additionalProperties": {"type": "integer"}, "description": "job id -> the last seq the client has"},
            "tokens": {"type": "object", "additionalProperties": {"type": "string"}, "description": "job id -> its watch token"},
            "logs": {"type": "boolean", "description": "the jobs' log lines too (log and log-gap events)"},
            "log_after": {"type": "object", "additionalProperties": {"type": "integer"}, "description": "job id -> the last log seq the client has"},
        },
    },
    "WsSubscribeAll": {
        "type": "object",
        "required": ["op", "all"],
        "properties": {"op": {"const": "subscribe"}, "all": {"const": True}},
        "description": "every job of the tenant (needs the API key or a ticket for every job)",
    },
    "WsUnsubscribe": {
        "type": "object",
        "required": ["op", "jobs"],
        "properties": {"op": {"const": "unsubscribe"}, "jobs": {"type": "array", "items": {"type": "string", "minLength": 1}}},
    },
    "WsJobEvent": {
        "type": "object",
        "required": ["event", "job"],
        "properties": {"event": {"enum": EVENTS}, "job": schema("Job")},
    },
    "WsLog": {
        "type": "object",
        "required": ["event", "log"],
        "properties": {"event": {"enum": ["log", "log-gap"]}, "log": {"anyOf": [schema("LogBatch"), schema("LogGap")]}},
    },
    "WsError": {
        "type": "object",
        "required": ["event", "message"],
        "properties": {
            "event": {"const": "error"},
            "message": {"type": "string"},
            "job": {"type": "string", "description": "the job it is about"},
            "status": {"enum": [403, 404, 410, 503]},
            "op": {"enum": ["subscribe", "unsubscribe"]},
        },
    },
}

WEBSOCKET = {
    "description": (
        "JSON text frames, at most 64 KiB each (more closes with 1009), parsed with the guards of an HTTP body "
        "(no nesting deeper than 4, no NaN, no duplicate keys, no lone surrogates). A bad message gets an `error` "
        "event and the connection stays usable. The server sends each watched job's current document on subscribe, "
        "then every change; a job's final event ends its subscription (not that of `all`)."
    ),
    "client": {"oneOf": [schema("WsSubscribe"), schema("WsSubscribeAll"), schema("WsUnsubscribe")]},
    "server": {"oneOf": [schema("WsJobEvent"), schema("WsLog"), schema("WsError")]},
    "closeCodes": {
        "1008": "policy: Origin not allowed or credentials refused (the reason says which)",
        "1009": "a message over 64 KiB",
        "1011": "the server failed",
        "1012": "the server is restarting: reconnect (to any server) and resume with since",
        "1013": "the client did not take a write for SEND_TIMEOUT",
    },
}


def params_schemas(registry: dict[str, JobType], max_priority: int = 9) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each job type's params model as a component (``<type>.Params``, its nested models beside
    it), and the submission body: one branch per type, ``params`` required when the model has
    required fields."""
    components: dict[str, Any] = {}
    branches = []
    for name in sorted(registry):
        model = registry[name].params
        prefix = f"{name}."
        params = model.model_json_schema(ref_template="#/components/schemas/" + prefix + "{model}")
        for sub, definition in params.pop("$defs", {}).items():
            components[prefix + sub] = definition
        components[prefix + "Params"] = params
        branch: dict[str, Any] = {
            "type": "object",
            "title": name,
            "required": ["type", "params"] if params.get("required") else ["type"],
            "additionalProperties": False,
            "properties": {
                "type": {"const": name},
                "params": schema(prefix + "Params"),
                "priority": {
                    "type": "integer",
                    "minimum": 0,
                    "maximum": max_priority,
                    "default": min(registry[name].priority, max_priority),
                    "description": "higher starts first within the type's queue (MAX_PRIORITY; TENANT_MAX_PRIORITY may set a tenant's lower)",
                },
                "cancel_when_unwatched": unwatched(registry[name]),
            },
        }
        branches.append(branch)
    if not branches:
        return components, {"not": {}}
    members = []
    for branch in branches:
        properties = {"type": branch["properties"]["type"], "params": branch["properties"]["params"]}
        properties["weight"] = {"type": "number", "exclusiveMinimum": 0, "maximum": contract.MAX_WEIGHT, "default": 1, "description": "its share of the group's progress"}
        members.append({**branch, "properties": properties})
    group = {
        "type": "object",
        "title": "a group",
        "description": "A group of jobs with one document whose progress is its children's mean by weight (README, Groups)",
        "required": ["group"],
        "additionalProperties": False,
        "properties": {
            "group": {"type": "array", "minItems": 1, "maxItems": contract.MAX_GROUP, "items": {"oneOf": members}},
            "priority": {"type": "integer", "minimum": 0, "maximum": max_priority, "description": "of each child (default: each its type's)"},
            "fail_fast": {"type": "boolean", "default": False, "description": "fail as soon as one child has, and cancel the others"},
        },
    }
    return components, {"oneOf": [*branches, group]}


def unwatched(job_type: JobType) -> dict[str, Any]:
    """A submit's ``cancel_when_unwatched`` for ``job_type`` (``server.jobs.cancel_when_unwatched``)."""
    own = job_type.cancel_when_unwatched
    default = f"default {own:g}, the most this type allows" if own else "default: never"
    return {
        "type": "number",
        "minimum": contract.UNWATCHED_MIN,
        "maximum": own or contract.UNWATCHED_MAX,
        "description": f"cancel the job once nobody has watched it (stream, WebSocket subscription, poll) for this many seconds ({default}); not with a webhook",
    }


def examples(registry: dict[str, JobType]) -> dict[str, Any]:
    """A submission of each type whose params all have defaults (or that gives an example)."""
    out = {}
    for name in sorted(registry):
        params = registry[name].params.model_json_schema()
        if params.get("examples"):
            out[name] = {"summary": name, "value": {"type": name, "params": params["examples"][0]}}
        elif not params.get("required"):
            out[name] = {"summary": name + " (default params)", "value": {"type": name}}
    return out


def document(settings: Settings, registry: dict[str, JobType]) -> bytes:
    return dumps(build(settings, registry))


def build(settings: Settings, registry: dict[str, JobType]) -> dict[str, Any]:
    keyless = not settings.api_keys.strip()
    anonymous = [{}] if keyless else []
    key = [{"bearer": []}, *anonymous]  # submit, cancel, retry, types, workers
    read = [{"bearer": []}, {"token": []}, {"ticket": []}, *anonymous]  # status, result, streams, tickets
    listing = [{"bearer": []}, {"ticket": []}, *anonymous]  # GET /jobs: the key, or a ticket for every job
    params_components, submission = params_schemas(registry, settings.max_priority)
    if settings.webhook_secret:
        webhook = {
            "type": "string",
            "format": "uri",
            "maxLength": 2048,
            "pattern": "^https?://",
            "description": "POSTed the final document, signed (Standard Webhooks); 422 unless its host resolves only to public addresses (or WEBHOOK_ALLOWED_HOSTS)",
        }
        for branch in submission.get("oneOf", []):
            branch["properties"]["webhook"] = webhook
            if "group" not in branch["properties"]:
                branch["not"] = {"required": ["webhook", "cancel_when_unwatched"]}  # a webhook receives the result
    job_id = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string", "pattern": JOB_ID}}
    location = ref("headers", "Location")
    retry_after = ref("headers", "Retry-After")
    sse_headers = {"Cache_Control": ref("headers", "Cache-Control")}

    def job_links(*which: str) -> dict[str, Any]:
        ops = {"GetJob": "getJob", "CancelJob": "cancelJob", "GetResult": "getResult", "RetryJob": "retryJob", "JobEvents": "jobEvents"}
        return {name: {"operationId": ops[name], "parameters": {"job_id": "$response.body#/id"}} for name in which}

    all_links = ("GetJob", "CancelJob", "GetResult", "RetryJob", "JobEvents")
    job_stream = {
        "text/event-stream": {
            "itemSchema": {"anyOf": [schema("JobEvent"), schema("JobLogEvent"), schema("JobHtmlEvent"), schema("JobDoneEvent")]},
            "description": "JSON documents (with ?logs=1, and the job's log lines); with ?format=html, HTML fragments and a last `done` event",
        },
        "text/plain": {"schema": {"type": "string"}, "description": "with Accept: text/plain: a text bar redrawn in place (\\r) until the end"},
    }
    paths: dict[str, Any] = {
        "/jobs": {
            "post": {
                "operationId": "submitJob",
                "summary": "Submit a job",
                "description": (
                    f"Queued at once (`202`), run by a worker. `params` as JSON at most {settings.params_max_bytes} bytes "
                    f"and {jobs.MAX_PARAMS_DEPTH} levels deep; the body at most {settings.max_body_bytes} bytes. At most {settings.rate_submit} "
                    f"submissions a minute per key (per client IP when keyless) and {settings.queue_cap or 'any number of'} "
                    "queued jobs per tenant (`429`)."
                ),
                "security": key,
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "description": f"The same key and body give the same job again (for IDEMPOTENCY_TTL = {settings.idempotency_ttl} s); the same key with another body is `422`",
                        "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": IDEMPOTENCY_KEY},
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": schema("Submission"), "examples": examples(registry)}},
                },
                "responses": {
                    "202": answer(
                        "Accepted: the queued job's document and its watch token",
                        json_body(schema("SubmittedJob")),
                        Location=location,
                        Retry_After=retry_after,
                    ) | {"links": job_links(*all_links)},
                    **problems(400, 401, 413, 415, 422),
                    "429": rate_limited("Over RATE_SUBMIT a minute (RateLimit-* headers), or over QUEUE_CAP queued jobs"),
                    **problems(503),
                },
            },
            "get": {
                "operationId": "listJobs",
                "summary": "The caller's jobs, newest first",
                "security": listing,
                "parameters": [
                    {"name": "status", "in": "query", "schema": {"enum": ["", *contract.STATES]}, "description": "only jobs in this status (empty: any)"},
                    {"name": "type", "in": "query", "schema": {"type": "string"}, "description": "only jobs of this type (empty: any)"},
                    {"name": "queue", "in": "query", "schema": {"type": "string"}, "description": "only jobs of this queue (empty: any)"},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 20}},
                    {"name": "cursor", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": MAX_INT}, "description": "the previous page's `next` (0: the first page)"},
                ],
                "responses": {
                    "200": answer("A page", json_body(schema("JobPage"))),
                    **problems(401, 422, 503),
                },
            },
        },
        "/jobs/{job_id}": {
            "get": {
                "operationId": "getJob",
                "summary": "The job's document (plain, or a long poll with `wait`)",
                "description": (
                    f"At most {settings.rate_poll} a minute per key, token or client IP. `Accept: text/plain` gives a one-line text bar."
                ),
                "security": read,
                "parameters": [
                    job_id,
                    {
                        "name": "wait",
                        "in": "query",
                        "schema": {"type": "number", "minimum": 0},
                        "description": f"long poll: hold the answer up to this many seconds (capped at LONG_POLL_MAX = {settings.long_poll_max:g}) until the job's seq passes `after`; never 303",
                    },
                    {"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": MAX_INT}, "description": "long poll: answer once seq > after (default: the seq now); ignored without `wait`"},
                    {"name": "redirect", "in": "query", "schema": {"type": "integer", "enum": [0, 1], "default": 1}, "description": "0: 200 even once succeeded (1: 303 to the result)"},
                    {"name": "If-None-Match", "in": "header", "schema": {"type": "string"}, "description": "the ETag of a previous answer: 304 if the job has not changed"},
                ],
                "responses": {
                    "200": answer(
                        "The document",
                        {"application/json": {"schema": schema("Job")}, "text/plain": {"schema": {"type": "string"}}},
                        ETag=ref("headers", "ETag"),
                        Retry_After=optional("Retry-After"),
                        Cache_Control=ref("headers", "Cache-Control"),
                    ),
                    "303": answer(
                        "Succeeded: Location is the result (the body is the document)",
                        json_body(schema("Job")),
                        Location=location,
                        ETag=ref("headers", "ETag"),
                        Cache_Control=ref("headers", "Cache-Control"),
                    ),
                    "304": answer("Not changed since If-None-Match", None, ETag=ref("headers", "ETag"), Retry_After=optional("Retry-After")),
                    **problems(401, 404, 410, 422),
                    "429": rate_limited("Over RATE_POLL a minute"),
                    **problems(503),
                },
            },
            "delete": {
                "operationId": "cancelJob",
                "summary": "Cancel: queued jobs at once (200), running ones by telling the worker (202)",
                "security": key,
                "parameters": [job_id],
                "responses": {
                    "200": answer("Cancelled (it was queued)", json_body(schema("Job"))) | {"links": job_links("GetJob", "RetryJob")},
                    "202": answer("Cancel requested (it is running): watch for `cancelled`", json_body(schema("Job"))) | {"links": job_links("GetJob", "JobEvents")},
                    **problems(401, 404, 409, 410, 503),
                },
            },
        },
        "/jobs/{job_id}/result": {
            "get": {
                "operationId": "getResult",
                "summary": "The return value of a succeeded job",
                "security": read,
                "parameters": [job_id],
                "responses": {
                    "200": answer("The job's return value (any JSON)", json_body({})),
                    **problems(401, 404, 409, 410, 503),
                },
            }
        },
        "/jobs/{job_id}/retry": {
            "post": {
                "operationId": "retryJob",
                "summary": "Run a failed or cancelled job again, as its next attempt",
                "security": key,
                "parameters": [job_id],
                "responses": {
                    "202": answer("Queued again", json_body(schema("Job")), Location=location) | {"links": job_links("GetJob", "CancelJob", "JobEvents")},
                    **problems(401, 404, 409, 410, 503),
                },
            }
        },
        "/jobs/{job_id}/events": {
            "get": {
                "operationId": "jobEvents",
                "summary": "Server-Sent Events of one job, until its final event",
                "description": (
                    f"First `retry: {settings.sse_retry_ms}`, then the current document if newer than the client's, then one event per "
                    "change; the stream ends after the final event. A client may skip intermediate updates, never the final one; "
                    f"seq never repeats or goes back. Idle streams get a `: ping` comment every SSE_PING = {settings.sse_ping:g} s. "
                    "Resume with Last-Event-ID (or ?since=): `204` if the client has the final event already, which stops EventSource."
                ),
                "security": read,
                "parameters": [
                    job_id,
                    {"name": "since", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": MAX_INT}, "description": "the last seq the client has"},
                    {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string", "pattern": SEQ}, "description": "as since (a browser's reconnect); wins over since"},
                    {"name": "format", "in": "query", "schema": {"enum": ["html"]}, "description": "html: HTML fragments for htmx's SSE extension"},
                    {"name": "logs", "in": "query", "schema": {"enum": ["0", "1"]}, "description": "1: the job's log lines too (log and log-gap events; ids seq:log seq)"},
                    {"name": "log_after", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": MAX_INT}, "description": "with logs=1: the last log seq the client has"},
                ],
                "responses": {
                    "200": answer("The stream", job_stream, **sse_headers),
                    "204": answer("The client has the final event: nothing more will come"),
                    **problems(400, 401, 404, 410, 422, 429, 503),
                },
            }
        },
        "/jobs/{job_id}/params": {
            "get": {
                "operationId": "getJobParams",
                "summary": "The params the job was submitted with",
                "security": read,
                "parameters": [job_id],
                "responses": {
                    "200": answer("The params (a JSON object)", json_body({"type": "object"})),
                    **problems(401, 404, 410, 503),
                },
            }
        },
        "/jobs/{job_id}/logs": {
            "get": {
                "operationId": "getJobLogs",
                "summary": "The job's log lines after a seq (ctx.log in the job, and the worker's word on each attempt)",
                "description": (
                    f"The newest JOB_LOG_LINES = {settings.job_log_lines} lines are kept, as long as the job's document. "
                    "Pass `next` as `after` to read on; `dropped` counts lines after `after` no longer kept. The same lines "
                    "arrive live on the job's stream with ?logs=1 and on the WebSocket with `\"logs\": true`."
                ),
                "security": read,
                "parameters": [
                    job_id,
                    {"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": MAX_INT}, "description": "lines after this seq (default 0: all kept)"},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": joblogs.MAX_LINES}, "description": f"at most this many lines (default {joblogs.MAX_LINES})"},
                ],
                "responses": {
                    "200": answer(
                        "A page of lines",
                        json_body(schema("LogPage")) | {"text/plain": {"schema": {"type": "string"}, "description": "with Accept: text/plain: `time LEVEL message` per line"}},
                    ),
                    **problems(401, 404, 410, 422, 503),
                },
            }
        },
        "/events": {
            "get": {
                "operationId": "watchJobs",
                "summary": "Server-Sent Events of several jobs, or of every job (a dashboard); it does not end",
                "description": (
                    "A snapshot of each job first, then every change. Each event's `id` is an opaque cursor: send it back as "
                    "Last-Event-ID (or ?cursor=) to resume; a well-formed cursor this server did not give starts from the snapshots. "
                    "Without `job`, every job of the tenant (the API key, or a ticket for every job). Watch tokens may repeat: "
                    "`?job=A&job=B&token=tA&token=tB`."
                ),
                "security": read,
                "parameters": [
                    {
                        "name": "job",
                        "in": "query",
                        "style": "form",
                        "explode": True,
                        "schema": {"type": "array", "maxItems": MAX_JOBS_PER_STREAM, "items": {"type": "string", "pattern": JOB_ID}},
                        "description": "the jobs to watch (repeat it); none: every job",
                    },
                    {"name": "cursor", "in": "query", "schema": {"type": "string", "pattern": CURSOR}, "description": "an event's id: resume after it"},
                    {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string", "pattern": CURSOR}, "description": "as cursor (a browser's reconnect); wins over cursor"},
                ],
                "responses": {
                    "200": answer("The stream", {"text/event-stream": {"itemSchema": schema("FeedEvent")}}, **sse_headers),
                    **problems(400, 401, 403, 404, 410, 422, 429, 503),
                },
            }
        },
        "/tickets": {
            "post": {
                "operationId": "createTicket",
                "summary": f"A single-use stream ticket, valid {TICKET_TTL} s: put it in a stream URL (?ticket=) instead of a token",
                "security": read,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": schema("TicketRequest"), "examples": {"all": {"summary": "every job", "value": {"all": True}}}}},
                },
                "responses": {
                    "201": answer("The ticket", json_body(schema("Ticket"))),
                    **problems(400, 401, 403, 404, 410, 413, 415, 422, 503),
                },
            }
        },
        "/ws": {
            "get": {
                "operationId": "websocket",
                "summary": "WebSocket: many jobs on one connection (see x-websocket)",
                "description": (
                    "A WebSocket handshake (`Upgrade: websocket`); a plain request is `426`. The handshake is refused "
                    "(`403`) for an Origin not in ALLOWED_ORIGINS (or not this server's own when that is empty); refused "
                    "credentials close the accepted socket with 1008 and the reason. Messages: x-websocket."
                ),
                "security": read,
                "responses": {
                    "101": {"description": "Switching protocols: the WebSocket"},
                    "403": {"description": "Origin not allowed (the handshake refused, no body)"},
                    **problems(426, 503),
                },
                "x-websocket": WEBSOCKET,
            }
        },
        "/job-types": {
            "get": {
                "operationId": "listJobTypes",
                "summary": "The registered job types, their options and the JSON Schema of their params",
                "security": key,
                "responses": {
                    "200": answer(
                        "The types, by name",
                        json_body({"type": "object", "required": ["items"], "properties": {"items": {"type": "array", "items": schema("JobType")}}}),
                        Cache_Control=ref("headers", "Cache-Control"),
                    ),
                    **problems(401),
                },
            }
        },
        "/workers": {
            "get": {
                "operationId": "listWorkers",
                "summary": "The live workers: id, host, pid, job types, concurrency, running jobs, last heartbeat",
                "security": key,
                "responses": {
                    "200": answer(
                        "The workers, by id",
                        json_body({"type": "object", "required": ["items"], "properties": {"items": {"type": "array", "items": schema("Worker")}}}),
                        Cache_Control=ref("headers", "Cache-Control"),
                    ),
                    **problems(401, 503),
                },
            }
        },
        "/queues": {
            "get": {
                "operationId": "listQueues",
                "summary": "Each named queue: its waiting jobs, how long the oldest has waited, its running jobs",
                "security": key,
                "responses": {
                    "200": answer(
                        "The queues, by name",
                        json_body({"type": "object", "required": ["items"], "properties": {"items": {"type": "array", "items": schema("Queue")}}}),
                        Cache_Control=ref("headers", "Cache-Control"),
                    ),
                    **problems(401, 503),
                },
            }
        },
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "The process is up",
                "security": [],
                "responses": {"200": answer("Up", json_body({"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}}))},
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readyz",
                "summary": "Redis answers; what it keeps (eviction policy, persistence) and what can be lost",
                "security": [],
                "responses": {
                    "200": answer(
                        "Ready (still 200 with warnings)",
                        json_body(
                            {
                                "type": "object",
                                "required": ["status", "redis"],
                                "properties": {
                                    "status": {"const": "ready"},
                                    "redis": {
                                        "type": "object",
                                        "required": ["maxmemory_policy", "aof", "appendfsync", "rdb_save", "replicas", "warnings"],
                                        "properties": {
                                            "maxmemory_policy": {"type": ["string", "null"]},
                                            "aof": {"type": "boolean"},
                                            "appendfsync": {"type": ["string", "null"]},
                                            "rdb_save": {"type": ["string", "null"]},
                                            "replicas": {"type": "integer", "minimum": 0},
                                            "warnings": {"type": "array", "items": {"type": "string"}},
                                        },
                                    },
                                },
                            }
                        ),
                    ),
                    **problems(503),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics of this server process",
                "security": [],
                "responses": {"200": answer("Prometheus text format 0.0.4", {"text/plain": {"schema": {"type": "string"}}})},
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "security": [],
                "responses": {"200": answer("OpenAPI 3.2", json_body({"type": "object", "required": ["openapi", "paths"]}))},
            }
        },
    }
    auth = (
        "Keyless dev mode (no API_KEYS): no credentials needed, every caller is one tenant."
        if keyless
        else "`Authorization: Bearer <API key>` for everything; reads (status, result, streams) also take a job's watch token or a ticket."
    )
    return {
        "openapi": "3.2.0",
        "info": {
            "title": "progress-server",
            "version": "0.1.0",
            "summary": "Real-time job progress (Asynchronous Request-Reply)",
            "description": (
                "Submit a job (`202` + Location), then poll it (ETag, long poll), stream it (SSE, WebSocket) or get a webhook. "
                f"{auth} Every error is an RFC 9457 problem (`application/problem+json`) with `detail`; a `405` lists the path's "
                "methods in `Allow`. Every answer carries `X-Request-ID`. The WebSocket's messages: `x-websocket` of `GET /ws`."
            ),
        },
        "security": read,
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "An API key (API_KEYS), or for reads a job's watch token"},
                "token": {"type": "apiKey", "in": "query", "name": "token", "description": "A job's watch token (from POST /jobs): reads of that job; repeat it on /events and /ws for several"},
                "ticket": {"type": "apiKey", "in": "query", "name": "ticket", "description": f"A single-use ticket (POST /tickets), valid {TICKET_TTL} s"},
            },
            "schemas": {**SCHEMAS, "Submission": submission, **params_components},
            "headers": HEADERS,
            "responses": RESPONSES,
        },
    }


async def openapi(request: Request) -> JSONAnswer:
    return JSONAnswer(request.app.state.openapi)
