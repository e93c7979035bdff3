"""OpenTelemetry, end to end, against a real OTLP/HTTP receiver on loopback (the protobuf payloads
decoded with the official ``opentelemetry-proto``): one job's spans across the server and worker
processes, and nothing of OpenTelemetry loaded when no ``OTEL_*`` setting asks for it."""

from __future__ import annotations

import base64
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from core.devredis import RedisProcess
from support import ROOT, start_server, start_worker, wait_until


class Receiver:
    """An OTLP/HTTP trace receiver: every span posted to ``/v1/traces``, with its service's name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, Span]] = []
        self.webhooks = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                if self.path == "/hook":  # (the same server takes the test's webhook deliveries)
                    receiver.webhooks += 1
                    self.send_response(204)
                    self.end_headers()
                    return
                request = ExportTraceServiceRequest.FromString(body)
                for resource_spans in request.resource_spans:
                    service = next(a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name")
                    for scope in resource_spans.scope_spans:
                        receiver.spans.extend((service, span) for span in scope.spans)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def named(self, name: str) -> list[tuple[str, Span]]:
        return [(service, span) for service, span in list(self.spans) if span.name == name]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def attributes(span: Span) -> dict:
    return {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}


@pytest.fixture
def traced(tmp_path) -> Iterator[tuple[Receiver, str]]:
    receiver = Receiver()
    redis = RedisProcess(tmp_path / "redis").start()
    otel = {
        "otel_exporter_otlp_endpoint": receiver.url,
        "otel_bsp_schedule_delay": 100,  # export every 0.1 s
        "webhook_secret": "whsec_" + base64.b64encode(b"progress-server tracing test key").decode(),
        "webhook_allowed_hosts": "127.0.0.1/32",
    }
    worker = start_worker(redis.url, tmp_path, progress_interval=0, **otel)
    server = start_server(redis.url, tmp_path, **otel)
    try:
        yield receiver, server.url
    finally:
        server.stop()
        worker.stop()
        redis.stop()
        receiver.close()


TRACE, PARENT = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


def test_one_jobs_spans_from_submit_to_the_last_progress_event(traced):
    receiver, base = traced
    r = httpx.post(base + "/jobs", json={"type": "demo", "params": {"steps": 3, "interval": 0}},
                   headers={"traceparent": f"00-{TRACE}-{PARENT}-01"}, timeout=10)  # fmt: skip
    assert r.status_code == 202 and r.headers["x-trace-id"] == TRACE, r.headers
    job_id = r.json()["id"]
    wait_until(lambda: receiver.named("run demo") and receiver.named("POST /jobs"), timeout=20, what="both processes' spans")
    (server_name, submit), = receiver.named("POST /jobs")
    (worker_name, attempt), = receiver.named("run demo")
    assert (server_name, worker_name) == ("progress-server", "progress-worker")
    assert submit.trace_id.hex() == TRACE and submit.parent_span_id.hex() == PARENT  # continues the caller's trace
    assert submit.kind == Span.SPAN_KIND_SERVER and attributes(submit) == {"job.id": job_id, "job.type": "demo"}
    assert attempt.trace_id.hex() == TRACE and attempt.parent_span_id == submit.span_id  # a child of the submit
    assert attempt.kind == Span.SPAN_KIND_CONSUMER
    assert attributes(attempt) == {"job.id": job_id, "job.type": "demo", "job.attempt": 1, "job.outcome": "succeeded"}
    progress = [e for e in attempt.events if e.name == "progress"]
    assert [attributes(e)["message"] for e in progress] == ["step 1 of 3", "step 2 of 3", "step 3 of 3"]
    assert attempt.start_time_unix_nano >= submit.start_time_unix_nano


def test_a_retry_is_a_new_trace_linked_to_the_submit(traced):
    receiver, base = traced
    r = httpx.post(base + "/jobs", json={"type": "flaky", "params": {"fail_times": 1}}, timeout=10)
    assert r.status_code == 202
    wait_until(lambda: len(receiver.named("run flaky")) == 2 and receiver.named("POST /jobs"), timeout=20, what="two attempts' spans")
    (_, submit), = receiver.named("POST /jobs")
    first, second = sorted((span for _, span in receiver.named("run flaky")), key=lambda s: attributes(s)["job.attempt"])
    assert first.parent_span_id == submit.span_id and attributes(first)["job.outcome"] == "retrying"
    assert second.trace_id != submit.trace_id and not second.parent_span_id
    assert [(link.trace_id, link.span_id) for link in second.links] == [(submit.trace_id, submit.span_id)]
    assert attributes(second)["job.outcome"] == "succeeded"


def test_a_webhook_delivery_is_a_span_linked_to_the_submit(traced):
    receiver, base = traced
    r = httpx.post(base + "/jobs", json={"type": "demo", "params": {"steps": 1, "interval": 0}, "webhook": receiver.url + "/hook"}, timeout=10)
    assert r.status_code == 202, r.text
    wait_until(lambda: receiver.named("webhook") and receiver.named("POST /jobs"), timeout=20, what="the delivery's span")
    (_, submit), = receiver.named("POST /jobs")
    (service, delivery), = receiver.named("webhook")
    assert service == "progress-worker" and delivery.kind == Span.SPAN_KIND_CLIENT and receiver.webhooks == 1
    assert [(link.trace_id, link.span_id) for link in delivery.links] == [(submit.trace_id, submit.span_id)]
    assert attributes(delivery)["webhook.delivered"] is True and attributes(delivery)["job.id"] == r.json()["id"]


def test_without_otel_settings_nothing_of_opentelemetry_is_loaded():
    code = (
        "import sys\n"
        "from core import tracing\n"
        "tracing.setup('x')\n"
        "from server.app import create_app\n"
        "create_app()\n"
        "import worker.runtime, worker.attempt\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "assert tracing.tracer is None and not loaded, loaded\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("OTEL_")}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
