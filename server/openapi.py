"""``/openapi.json``: the API described (OpenAPI 3.1), including the stream formats."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from core.contract import dumps
from server.requests import JSONAnswer

JOB = {"$ref": "#/components/schemas/Job"}
PROBLEM = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
TOKEN = {"name": "token", "in": "query", "schema": {"type": "string"}, "description": "watch token (instead of an API key)"}
TICKET = {"name": "ticket", "in": "query", "schema": {"type": "string"}, "description": "single-use stream ticket"}


def answer(description: str, schema: dict[str, Any] | None = JOB, media: str = "application/json") -> dict[str, Any]:
    return {"description": description, "content": {media: {"schema": schema}}} if schema else {"description": description}


def problems(*codes: int) -> dict[str, Any]:
    return {str(code): {"description": "problem", "content": PROBLEM} for code in codes}


SSE_DOC = (
    "Server-Sent Events. First `retry: <ms>`, then one frame per change: `id: <seq>`, `event: progress` "
    "(or `succeeded`/`failed`/`cancelled`, the last frame), `data: <job document>`. Idle streams get a "
    "`: ping` comment every SSE_PING s. Resume with `Last-Event-ID` or `?since=`. `204` if the client "
    "already has the final event. `Accept: text/plain` gives a redrawn text bar; `?format=html` gives "
    "HTML fragments for htmx."
)

SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "progress-server", "version": "0.1.0", "description": "Real-time job progress (Asynchronous Request-Reply)."},
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "API key or watch token"}},
        "schemas": {
            "Job": {
                "type": "object",
                "required": ["id", "type", "status", "seq", "links"],
                "properties": {
                    "id": {"type": "string"},
                    "type": {"type": "string"},
                    "status": {"enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
                    "progress": {"type": ["number", "null"], "minimum": 0, "maximum": 100},
                    "message": {"type": ["string", "null"]},
                    "stage": {"type": ["string", "null"]},
                    "seq": {"type": "integer", "description": "rises with every change; SSE id, ETag, resume point"},
                    "attempt": {"type": "integer"},
                    "created_at": {"type": "string", "format": "date-time"},
                    "started_at": {"type": ["string", "null"], "format": "date-time"},
                    "updated_at": {"type": "string", "format": "date-time"},
                    "finished_at": {"type": ["string", "null"], "format": "date-time"},
                    "eta_s": {"type": ["number", "null"]},
                    "stalled": {"type": "boolean"},
                    "error": {"type": ["object", "null"], "properties": {"type": {"type": "string"}, "message": {"type": "string"}}},
                    "links": {"type": "object", "additionalProperties": {"type": "string"}},
                    "token": {"type": "string", "description": "watch token (only in the answer to POST /jobs)"},
                },
            },
            "Problem": {
                "type": "object",
                "description": "RFC 9457 problem details",
                "properties": {
                    "type": {"type": "string"},
                    "title": {"type": "string"},
                    "status": {"type": "integer"},
                    "detail": {"type": "string"},
                    "errors": {"type": "array", "items": {"type": "object", "properties": {"field": {"type": "string"}, "message": {"type": "string"}}}},
                },
            },
        },
    },
    "security": [{"bearer": []}, {}],
    "paths": {
        "/jobs": {
            "post": {
                "summary": "Submit a job",
                "parameters": [{"name": "Idempotency-Key", "in": "header", "schema": {"type": "string", "maxLength": 255}}],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["type"],
                                "properties": {"type": {"type": "string"}, "params": {"type": "object"}, "webhook": {"type": "string", "format": "uri"}},
                            }
                        }
                    },
                },
                "responses": {"202": answer("accepted: Location and Retry-After headers"), **problems(400, 401, 413, 415, 422, 429, 503)},
            },
            "get": {
                "summary": "List the caller's jobs, newest first",
                "parameters": [
                    {"name": "status", "in": "query", "schema": {"type": "string"}},
                    {"name": "type", "in": "query", "schema": {"type": "string"}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
                    {"name": "cursor", "in": "query", "schema": {"type": "integer"}},
                ],
                "responses": {"200": answer("a page", {"type": "object", "properties": {"items": {"type": "array", "items": JOB}, "next": {"type": ["integer", "null"]}}}), **problems(401, 422)},
            },
        },
        "/jobs/{job_id}": {
            "get": {
                "summary": "Status (plain or long poll)",
                "parameters": [
                    JOB_ID,
                    TOKEN,
                    {"name": "wait", "in": "query", "schema": {"type": "number"}, "description": "long poll: seconds to hold"},
                    {"name": "after", "in": "query", "schema": {"type": "integer"}, "description": "long poll: return once seq > after"},
                    {"name": "redirect", "in": "query", "schema": {"enum": ["0"]}, "description": "0: 200 even when succeeded"},
                ],
                "responses": {
                    "200": answer("the document (Retry-After while unfinished; ETag)"),
                    "303": answer("succeeded: Location is the result"),
                    "304": {"description": "If-None-Match matched"},
                    **problems(401, 404, 410, 429),
                },
            },
            "delete": {"summary": "Cancel", "parameters": [JOB_ID], "responses": {"200": answer("cancelled (was queued)"), "202": answer("cancel requested (running)"), **problems(401, 404, 409, 410)}},
        },
        "/jobs/{job_id}/result": {"get": {"summary": "The result of a succeeded job", "parameters": [JOB_ID, TOKEN], "responses": {"200": answer("the job's return value", {}), **problems(404, 409, 410)}}},
        "/jobs/{job_id}/retry": {"post": {"summary": "Run a failed or cancelled job again", "parameters": [JOB_ID], "responses": {"202": answer("queued again"), **problems(401, 404, 409)}}},
        "/jobs/{job_id}/events": {
            "get": {
                "summary": "SSE stream of one job",
                "description": SSE_DOC,
                "parameters": [JOB_ID, TOKEN, TICKET, {"name": "since", "in": "query", "schema": {"type": "integer"}}, {"name": "format", "in": "query", "schema": {"enum": ["html"]}}],
                "responses": {"200": answer("event stream", {"type": "string"}, "text/event-stream"), "204": {"description": "nothing newer will come"}, **problems(401, 404, 410, 429)},
            }
        },
        "/events": {
            "get": {
                "summary": "SSE stream of several jobs, or of all the caller's jobs",
                "description": "As the per-job stream, but `id:` is an opaque cursor (send it back as Last-Event-ID or ?cursor=) and it starts with a snapshot of each job.",
                "parameters": [{"name": "job", "in": "query", "schema": {"type": "array", "items": {"type": "string"}}, "style": "form", "explode": True}, TOKEN, TICKET],
                "responses": {"200": answer("event stream", {"type": "string"}, "text/event-stream"), **problems(401, 403, 404, 429)},
            }
        },
        "/tickets": {"post": {"summary": "A single-use, 60 s stream ticket", "responses": {"201": answer("ticket", {"type": "object", "properties": {"ticket": {"type": "string"}, "expires_in": {"type": "integer"}}}), **problems(401, 403, 404, 422)}}},
        "/ws": {
            "get": {
                "summary": "WebSocket: many jobs on one connection",
                "description": (
                    "JSON text frames. Client: {op: subscribe, jobs: [...], since: {id: seq}, tokens: {id: token}}, "
                    "{op: subscribe, all: true}, {op: unsubscribe, jobs: [...]}. Server: {event: progress|succeeded|failed|cancelled, job: {...}} "
                    "and {event: error, message, job?, status?}. Close codes: 1008 policy (origin, credentials), 1009 too big, "
                    "1012 server restarting, 1013 client too slow."
                ),
                "parameters": [TOKEN, TICKET],
                "responses": {"101": {"description": "switching protocols"}, "403": {"description": "origin or credentials refused"}},
            }
        },
        "/job-types": {
            "get": {
                "summary": "Registered job types, their options and the JSON Schema of their params",
                "responses": {"200": answer("job types", {"type": "object"})},
            }
        },
        "/workers": {
            "get": {
                "summary": "Live workers: id, host, pid, job types, concurrency, running jobs, last heartbeat",
                "responses": {"200": answer("workers", {"type": "object"})},
            }
        },
        "/healthz": {"get": {"summary": "Process alive", "security": [], "responses": {"200": answer("ok", {"type": "object"})}}},
        "/readyz": {"get": {"summary": "Redis reachable, and what it keeps (eviction policy, persistence, warnings)", "security": [], "responses": {"200": answer("ready", {"type": "object"}), **problems(503)}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "security": [], "responses": {"200": answer("metrics", {"type": "string"}, "text/plain")}}},
    },
}


async def openapi(request: Request) -> JSONAnswer:
    return JSONAnswer(dumps(SPEC))
