"""Logging set-up shared by the server and the worker: plain lines on a terminal, JSON otherwise.

``request_id`` (a context variable) is set per request by ``server.middleware`` and lands in
every log line written while that request is handled; ``job_id``, ``attempt``, ``client`` and
``status`` are added when a log call passes them in ``extra``.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
EXTRA_FIELDS = ("request_id", "job_id", "attempt", "client", "status")


_ENCODER = json.JSONEncoder()


class JsonFormatter(logging.Formatter):
    _last: tuple[int, str] = (-1, "")  # (second, its strftime), replaced whole: thread-safe

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """The standard ``2026-11-22 18:40:07,123``, with strftime once per second."""
        second = int(record.created)
        last = self._last
        if last[0] != second:
            last = self._last = (second, time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second)))
        return f"{last[1]},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": self.formatTime(record), "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        for name in EXTRA_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if "request_id" not in line and request_id.get():
            line["request_id"] = request_id.get()
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return _ENCODER.encode(line)


def setup_logging(level: str) -> None:
    # No caller, thread or process lookup for each record: no format here uses them (the
    # "Optimization" table of the logging HOWTO). A third of an access-log line's cost.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler()
    if sys.stderr.isatty():
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-5s %(name)s: %(message)s"))
    else:
        handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
