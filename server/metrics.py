"""Prometheus metrics of a server process (``/metrics``).

The hot path only bumps plain integers on ``STATS`` (no locks, no label lookups per delivery);
a collector turns them into metric families when Prometheus scrapes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.requests import Request
from starlette.responses import Response

from core import fastpath
from core.fastpath import direct
from server import queues

TRANSPORTS = ("sse", "ws", "text")


class Stats:
    def __init__(self) -> None:
        self.connections: Counter[str] = Counter()  # open, by transport
        self.delivered: Counter[str] = Counter()  # events written to clients through ASGI, by transport
        self.direct = direct.delivered  # ... and straight to their sockets (the fast path)
        self.received = 0  # events heard from Redis
        self.conflated = 0  # intermediate updates a slow client skipped
        self.reconnects = 0  # pub/sub reconnections (set by the hub)


STATS = Stats()
REGISTRY = CollectorRegistry()
FANOUT_DELAY = Histogram(
    "progress_publish_to_server_seconds",
    "Time from a document's update (worker clock) to its arrival at this server process.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    registry=REGISTRY,
)


class StatsCollector:
    def __init__(self, queue_report: list[list[dict]]) -> None:
        self.queue_report = queue_report  # [``queues.report()``], read at the last scrape

    def collect(self):
        connections = GaugeMetricFamily("progress_connections", "Open streaming connections.", labels=["transport"])
        delivered = CounterMetricFamily("progress_events_delivered", "Events written to clients.", labels=["transport"])
        direct = CounterMetricFamily(
            "progress_events_delivered_direct", "Of those, written straight to an idle client's socket (fast path).", labels=["transport"]
        )
        for transport in TRANSPORTS:
            connections.add_metric([transport], STATS.connections[transport])
            delivered.add_metric([transport], STATS.delivered[transport] + STATS.direct[transport])
            direct.add_metric([transport], STATS.direct[transport])
        yield connections
        yield delivered
        yield direct
        pieces = GaugeMetricFamily("progress_fast_path", "Fast path pieces in use (1) or off (0).", labels=["piece"])
        for piece, on in fastpath.status().items():
            pieces.add_metric([piece], int(on))
        yield pieces
        yield CounterMetricFamily("progress_events_received", "Events heard from Redis pub/sub.", value=STATS.received)
        yield CounterMetricFamily("progress_events_conflated", "Intermediate updates skipped for slow clients.", value=STATS.conflated)
        yield CounterMetricFamily("progress_redis_reconnects", "Pub/sub reconnections.", value=STATS.reconnects)
        waiting = GaugeMetricFamily("progress_queue_waiting", "Queued jobs, by queue.", labels=["queue"])
        oldest = GaugeMetricFamily("progress_queue_oldest_waiting_seconds", "How long the oldest queued job has waited.", labels=["queue"])
        running = GaugeMetricFamily("progress_queue_running", "Jobs running, as the live workers report.", labels=["queue"])
        yield GaugeMetricFamily("progress_queue_depth", "Queued jobs, all queues.", value=sum(q["waiting"] for q in self.queue_report[0]))
        for item in self.queue_report[0]:
            waiting.add_metric([item["name"]], item["waiting"])
            oldest.add_metric([item["name"]], item["oldest_waiting_s"] or 0.0)
            running.add_metric([item["name"]], item["running"])
        yield waiting
        yield oldest
        yield running


_queue_report: list[list[dict]] = [[]]
REGISTRY.register(StatsCollector(_queue_report))


async def metrics(request: Request) -> Response:
    with contextlib.suppress(Exception):  # metrics still answer while Redis is away
        async with asyncio.timeout(2.0):
            _queue_report[0] = await queues.report(request.app)
    return Response(generate_latest(REGISTRY), media_type="text/plain; version=0.0.4; charset=utf-8")
