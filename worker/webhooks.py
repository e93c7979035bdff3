"""Webhook delivery (placeholder: the full sender lands with the webhooks change)."""

from __future__ import annotations

import logging

from server.settings import Settings
from server.store import Store

log = logging.getLogger("worker.webhooks")


async def deliver(store: Store, settings: Settings, job_id: str, seq: int, attempt: int) -> None:
    log.info("webhook for job %s seq %d not sent: delivery is not implemented yet", job_id, seq)
