"""Human renderings of a job document: a one-line text bar for terminals, an HTML fragment for htmx."""

from __future__ import annotations

from html import escape
from typing import Any

BAR_WIDTH = 20


def text_bar(doc: dict[str, Any]) -> str:
    """``[##########          ]  52%  step 13 of 25  ETA 6s  running``"""
    pct = doc["progress"]
    filled = 0 if pct is None else round(BAR_WIDTH * pct / 100)
    parts = [f"[{'#' * filled}{' ' * (BAR_WIDTH - filled)}]", "  ?%" if pct is None else f"{pct:3.0f}%"]
    if doc["message"]:
        parts.append(doc["message"])
    if doc["eta_s"] is not None and doc["status"] == "running":
        parts.append(f"ETA {doc['eta_s']:.0f}s")
    parts.append(doc["status"])
    if doc["error"]:
        parts.append(f"{doc['error']['type']}: {doc['error']['message']}")
    return "  ".join(parts)


def html_bar(doc: dict[str, Any]) -> str:
    """One line of HTML (safe to put in an SSE ``data:`` field), every value escaped."""
    pct = doc["progress"]
    value = "" if pct is None else f' value="{pct:g}"'
    label = "" if pct is None else f"{pct:.0f}%"
    message = escape(doc["message"] or "")
    error = f' <span class="job-error">{escape(doc["error"]["message"])}</span>' if doc["error"] else ""
    html = (
        f'<div class="job job-{escape(doc["status"])}" id="job-{escape(doc["id"])}">'
        f'<progress max="100"{value} aria-label="progress">{label}</progress> '
        f'<span class="job-pct">{label}</span> <span class="job-message">{message}</span> '
        f'<span class="job-status">{escape(doc["status"])}</span>{error}</div>'
    )
    return html.replace("\r", "&#13;").replace("\n", "&#10;")
