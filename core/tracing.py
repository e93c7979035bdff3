"""OpenTelemetry traces, only when they are asked for.

With ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) set and
``OTEL_SDK_DISABLED`` not ``true``, ``setup`` starts the OpenTelemetry SDK with its OTLP/HTTP
exporter (``pip install 'progress-server[otel]'``), which reads the other standard ``OTEL_*``
variables itself (headers, timeouts, ``OTEL_SERVICE_NAME``, the batch processor's delays).
Otherwise nothing of OpenTelemetry is imported, ``tracer`` stays None, and each use below is one
check of it.

What is traced, from submit to the last progress event:

* the server's ``POST /jobs``: a SERVER span continuing an incoming W3C ``traceparent`` (else a new
  trace), with the job's id and type; its context is stored with the job (``traceparent``) and its
  trace id answered in ``X-Trace-Id``, so a user can jump from a job to their tracing UI;
* the worker's attempts: a CONSUMER span each, ``run <type>``, the first attempt a child of the
  submit span and later ones (retries, re-runs) linked to it, with the job's id, type, attempt and
  outcome; each progress publish is an event on it (not a span of its own);
* the worker's webhook deliveries: a CLIENT span each, linked to the submit span.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

log = logging.getLogger("core.tracing")

tracer: Any = None  # an opentelemetry Tracer once ``setup`` enabled tracing
_propagator: Any = None


def wanted(env: Mapping[str, str] = os.environ) -> bool:
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def setup(service: str) -> None:
    """Start exporting spans if the environment asks for it (see the module's doc)."""
    global tracer, _propagator
    if tracer is not None or not wanted():
        return
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:
        log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed: pip install 'progress-server[otel]'")
        return
    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    tracer = trace.get_tracer("progress-server")
    _propagator = TraceContextTextMapPropagator()
    log.info("tracing: spans go to %s", os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"])


def shutdown() -> None:
    """Send what is buffered (at a process's end)."""
    if tracer is not None:
        from opentelemetry import trace

        with contextlib.suppress(Exception):
            trace.get_tracer_provider().shutdown()


@contextlib.contextmanager
def submit_span(headers: Mapping[str, str]) -> Iterator[Any]:
    """``POST /jobs``'s span (None when tracing is off), continuing the request's ``traceparent``."""
    if tracer is None:
        yield None
        return
    from opentelemetry.trace import SpanKind

    parent = _propagator.extract({"traceparent": headers["traceparent"]}) if "traceparent" in headers else None
    with tracer.start_as_current_span("POST /jobs", context=parent, kind=SpanKind.SERVER) as span:
        yield span


def traceparent(span: Any) -> str:
    """The W3C ``traceparent`` of ``span``, stored with its job ('' without a span)."""
    if span is None:
        return ""
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"


def trace_id(span: Any) -> str:
    return f"{span.get_span_context().trace_id:032x}" if span is not None else ""


def _origin(parent: str) -> tuple[Any, Any]:
    """``(context, span context)`` of a stored ``traceparent`` (``(None, None)`` if none or invalid)."""
    from opentelemetry import trace

    if not parent:
        return None, None
    context = _propagator.extract({"traceparent": parent})
    origin = trace.get_current_span(context).get_span_context()
    return (context, origin) if origin.is_valid else (None, None)


@contextlib.contextmanager
def attempt_span(parent: str, job_type: str, job_id: str, attempt: int) -> Iterator[Any]:
    """One attempt's span (None when tracing is off): the first attempt a child of the submit
    span stored as ``parent``, later ones (retries, re-runs) a new trace linked to it."""
    if tracer is None:
        yield None
        return
    from opentelemetry.context import Context
    from opentelemetry.trace import Link, SpanKind

    context, origin = _origin(parent)
    first = attempt <= 1 and origin is not None
    links = [Link(origin)] if origin is not None and not first else []
    attributes = {"job.id": job_id, "job.type": job_type, "job.attempt": attempt}
    with tracer.start_as_current_span(
        f"run {job_type}", context=context if first else Context(), kind=SpanKind.CONSUMER, links=links, attributes=attributes
    ) as span:
        yield span


@contextlib.contextmanager
def delivery_span(parent: str, job_id: str, delivery_id: str) -> Iterator[Any]:
    """A webhook delivery's span (None when tracing is off), linked to the job's submit span."""
    if tracer is None:
        yield None
        return
    from opentelemetry.context import Context
    from opentelemetry.trace import Link, SpanKind

    _, origin = _origin(parent)
    links = [Link(origin)] if origin is not None else []
    attributes = {"job.id": job_id, "webhook.id": delivery_id}
    with tracer.start_as_current_span("webhook", context=Context(), kind=SpanKind.CLIENT, links=links, attributes=attributes) as span:
        yield span
