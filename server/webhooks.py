"""Webhooks: URL checks at submit time (placeholder: the full SSRF guard lands with the webhooks change)."""

from __future__ import annotations

from urllib.parse import urlsplit

from server.settings import Settings


def check_submitted(url: object, settings: Settings) -> str | None:
    """Why ``url`` cannot be a webhook, or None if it can."""
    if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
        return "must be an http(s) URL"
    if not settings.webhook_secret:
        return "webhooks are not enabled on this server (set WEBHOOK_SECRET)"
    return None
