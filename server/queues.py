"""``GET /queues``: each named queue's waiting jobs, the age of the oldest, and its running jobs.

Answers ``{"items": [...]}``, one item per queue that a registered job type names or a live
worker serves, sorted by name::

    {"name": "heavy", "waiting": 12, "oldest_waiting_s": 4.2, "running": 2, "limit": 4,
     "workers": 2}

``waiting`` counts the queue's ``queued`` jobs (a retry waiting out its back-off among them);
``running`` and ``limit`` add up what the live workers serving it report (``core.workers``:
how many of its jobs each runs now, and at most). The same figures are in ``/metrics``
(``progress_queue_waiting``, ``progress_queue_oldest_waiting_seconds``,
``progress_queue_running``). Access is that of ``GET /workers``: an API key (``server.app``
answers the route).
"""

from __future__ import annotations

import time
from typing import Any

from core import queue, workers


async def report(app: Any) -> list[dict[str, Any]]:
    """The items of ``GET /queues`` (three Redis round trips: the live workers, then the queues)."""
    served: dict[str, dict[str, int]] = {}
    for worker in await workers.live(app.state.store.redis):
        for name, load in worker.get("queues", {}).items():
            total = served.setdefault(name, {"running": 0, "limit": 0, "workers": 0})
            total["running"] += load["running"]
            total["limit"] += load["limit"]
            total["workers"] += 1
    names = sorted({t.queue for t in app.state.registry.values()} | set(served))
    now = time.time()
    items = []
    for name, (count, since) in zip(names, await queue.waiting(app.state.store.redis, names)):
        load = served.get(name, {"running": 0, "limit": 0, "workers": 0})
        oldest = None if since is None else round(max(0.0, now - since), 3)
        items.append({"name": name, "waiting": count, "oldest_waiting_s": oldest, **load})
    return items

