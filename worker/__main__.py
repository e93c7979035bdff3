"""``python -m worker``: one worker process against ``REDIS_URL`` (``worker.runtime``).

A worker that cannot reach Redis as it starts ends; this loop starts it again (with a back-off)
so a Redis restart does not leave a deployment without workers. SIGTERM and SIGINT stop it:
running jobs are marked ``queued`` again and go back to the queue.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import start_http_server
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core import connections, tracing
from core.logs import setup_logging
from core.settings import Settings
from worker.registry import load
from worker.runtime import ProgressWorker

log = logging.getLogger("worker")


def main() -> None:
    settings = Settings.from_env()
    setup_logging(settings.log_level)
    try:
        connections.parse(settings.redis_url)  # a bad REDIS_URL ends the worker with the reason
    except ValueError as e:
        raise SystemExit(str(e)) from None
    registry = load(settings.jobs_module)
    tracing.setup("progress-worker")  # only with OTEL_EXPORTER_OTLP_ENDPOINT set
    if settings.worker_metrics_port:
        start_http_server(settings.worker_metrics_port, addr=settings.host)
    delay = 0.5
    while True:
        worker = ProgressWorker(settings, registry)
        started = time.monotonic()
        try:
            worker.run()
            tracing.shutdown()
            return  # stopped by a signal
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            if worker.stopping:  # a signal stopped it, and Redis was away as it closed: stop all the same
                log.warning("worker stopped; Redis was unreachable as it closed (%s)", e)
                return
            if time.monotonic() - started > 30:
                delay = 0.5
            log.warning("worker lost Redis (%s); restarting in %.1f s", e, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


if __name__ == "__main__":
    main()
