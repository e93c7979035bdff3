"""``GET /job-types``: what can be submitted, so a UI can build a form for each type.

Answers ``{"items": [...]}``, one item per registered type, sorted by name::

    {"name": "demo",
     "description": "first paragraph of the job function's docstring on one line, or null",
     "params_schema": {...the params model's JSON Schema (pydantic model_json_schema())...},
     "timeout": 300.0, "max_tries": 1, "backoff": 1.0, "result_ttl": 3600, "queue": "default",
     "priority": 0, "cancel_when_unwatched": null}

``timeout`` and ``result_ttl`` are the values that apply (the type's own, else the
``JOB_TIMEOUT`` / ``RESULT_TTL`` settings), in seconds.

Access is that of submitting: the API key (or nothing in keyless dev mode). The answer holds
no job data, but the type names and schemas describe the deployment, and only a key holder
can submit anyway; a watch token or ticket is not enough.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from core import contract
from server.requests import JSONAnswer, key_holder
from worker.registry import JobType


@functools.lru_cache(maxsize=256)
def describe(job_type: JobType, default_timeout: float, default_result_ttl: int) -> dict[str, Any]:
    """One type as listed by ``GET /job-types`` (cached: types do not change while running)."""
    doc = inspect.getdoc(job_type.fn)
    return {
        "name": job_type.name,
        "description": summary(doc),
        "params_schema": job_type.params.model_json_schema(),
        "timeout": float(job_type.timeout if job_type.timeout is not None else default_timeout),
        "max_tries": job_type.max_tries,
        "backoff": float(job_type.backoff),
        "result_ttl": job_type.result_ttl if job_type.result_ttl is not None else default_result_ttl,
        "queue": job_type.queue,
        "priority": job_type.priority,
        "cancel_when_unwatched": job_type.cancel_when_unwatched,
    }


def summary(doc: str | None) -> str | None:
    """A docstring's first paragraph on one line, its reStructuredText literals (````x````) as
    Markdown's (```x```), which reads as plain text and renders in API tools."""
    if not doc:
        return None
    return " ".join(doc.split("\n\n")[0].split()).replace("``", "`")


async def list_types(request: Request) -> Response:
    """Every registered job type with its params' JSON Schema and options."""
    await key_holder(request)
    settings = request.app.state.settings
    registry: dict[str, JobType] = request.app.state.registry
    items = [describe(registry[name], settings.job_timeout, settings.result_ttl) for name in sorted(registry)]
    return JSONAnswer(contract.dumps({"items": items}), 200, {"Cache-Control": "private, max-age=60"})
