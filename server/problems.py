"""RFC 9457 problem details: every error the API gives is one of these."""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from core.contract import dumps


class Problem(Exception):
    """Raise anywhere in a request; the app turns it into ``application/problem+json``."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str | None = None,
        *,
        errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail or title)
        self.status, self.title, self.detail = status, title, detail
        self.errors, self.headers, self.extra = errors, headers or {}, extra

    def response(self) -> Response:
        # every problem has a detail (``/openapi.json`` requires it): the title when none was given
        body: dict[str, Any] = {"type": "about:blank", "title": self.title, "status": self.status, "detail": self.detail or self.title}
        if self.errors:
            body["errors"] = self.errors
        body.update(self.extra)
        return Response(dumps(body) + b"\n", self.status, self.headers, media_type="application/problem+json")


def invalid(field: str, message: str) -> Problem:
    """422 naming the one field at fault."""
    return Problem(422, "Invalid request", f"{field}: {message}", errors=[{"field": field, "message": message}])


def unavailable() -> Problem:
    return Problem(503, "Service unavailable", "Redis is unreachable; try again.", headers={"Retry-After": "2"})


def not_found(job_id: str) -> Problem:
    return Problem(404, "Job not found", f"No job {job_id!r}.")


def gone(job_id: str) -> Problem:
    return Problem(410, "Job expired", f"Job {job_id!r} finished and its result has expired.")
