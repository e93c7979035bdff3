"""One settings object, read from environment variables (every one is in the README table)."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_wait_replicas: int = -1  # replicas that must have a 202'd job or final state (WAIT); -1: 1 with Sentinel, else 0
    redis_wait_ms: int = 500  # how long such a write waits for them before going on anyway
    host: str = "127.0.0.1"
    port: int = 8000
    reuse_port: bool = False  # server: SO_REUSEPORT, so several processes share HOST:PORT (the kernel spreads connections)
    api_keys: str = ""  # tenant:key,tenant:key ; empty: keyless dev mode (every caller is one tenant)
    token_secret: str = ""  # signs watch tokens; empty: a random secret shared through Redis
    allowed_origins: str = ""  # browser origins for WebSocket and CORS; empty: same origin only
    rate_submit: int = 600  # POST /jobs per minute per API key (or client IP when keyless)
    rate_poll: int = 1200  # GET /jobs/{id} per minute per API key, token (or client IP)
    queue_cap: int = 10_000  # jobs one tenant may have queued at once (0: no cap); above it 429
    max_streams_per_client: int = 256  # open SSE + WebSocket connections per key or client IP
    max_connections: int = 20_000  # per server process; above it new connections get 503
    params_max_bytes: int = 64 * 1024  # a job's params as JSON
    jobs_module: str = "worker.demo"  # comma-separated modules that register job types
    job_timeout: float = 300.0  # default per-job timeout, seconds
    result_ttl: int = 3600  # a finished job's document and result live this long, seconds
    tombstone_ttl: int = 7 * 86400  # after that, 410 Gone instead of 404 for this long
    job_ttl: int = 86400  # an unfinished job's document lives this long without a change
    idempotency_ttl: int = 86400  # an Idempotency-Key is remembered this long, seconds
    unknown_type_grace: float = 3600.0  # a job of a type no worker runs fails after waiting this long
    lease: float = 10.0  # worker: a running job is re-run this long after its worker died, seconds
    stall_after: float = 60.0  # a running job without progress for this long is marked stalled
    webhook_secret: str = ""  # whsec_... (Standard Webhooks); empty: webhooks are refused
    webhook_allowed_hosts: str = ""  # hosts or CIDRs a webhook may reach despite the SSRF guard
    webhook_attempt_timeout: float = 15.0  # one delivery attempt (connect + send + answer), at most 50
    webhook_backoff: float = 5.0  # first retry after about this long; x4 each time, with jitter
    webhook_backoff_max: float = 3 * 3600.0  # cap of one delay (before jitter)
    webhook_max_attempts: int = 14
    webhook_deadline: float = 23 * 3600.0  # give up this long after the final state (arq drops queued jobs at 24 h)
    max_body_bytes: int = 1 << 20
    progress_interval: float = 0.05  # worker: at most one progress publish per job per interval
    worker_concurrency: int = 10  # jobs run at once by one worker process
    worker_queues: str = ""  # worker: queues it takes jobs from, in turn ("heavy:2,default": at most 2 heavy at once); empty: its types' queues
    priority_step: int = 10_000  # turns of a queue's line that one priority level jumps (core.queue)
    max_priority: int = 9  # the highest priority a submit may ask for (0-9)
    tenant_max_priority: str = ""  # per-tenant exceptions to MAX_PRIORITY: "acme:9,globex:2"
    worker_metrics_port: int = 0  # worker: serve Prometheus metrics on this port (0: off)
    sse_ping: float = 15.0  # heartbeat comment on idle SSE streams, seconds
    sse_retry_ms: int = 2000  # the SSE `retry:` hint
    send_timeout: float = 10.0  # a client that does not take a write for this long is dropped
    long_poll_max: float = 30.0  # cap of ?wait= on GET /jobs/{id}
    fast_path: bool = True  # FAST_PATH=off: none of core.fastpath's uses of other libraries' internals
    log_level: str = "info"
    debug: bool = False  # tracebacks in failed jobs' errors
    job_log_lines: int = 1000  # the newest lines of each job's log kept (and buffered per reader)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = env.get(f.name.upper())
            if raw is None or raw == "":
                continue
            kind = type(f.default)
            try:
                values[f.name] = raw.lower() in ("1", "true", "yes", "on") if kind is bool else kind(raw)
            except ValueError:
                raise SystemExit(f"Setting {f.name.upper()}={raw!r} is not a valid {kind.__name__}") from None
        if values.get("job_log_lines", 1) < 1:  # (0 would keep every line: LTRIM to -0)
            raise SystemExit("Setting JOB_LOG_LINES must be at least 1")
        settings = cls(**values)
        if not 0 < settings.priority_step <= 10**9:  # (nine steps stay within ``queue.LINE``)
            raise SystemExit("Setting PRIORITY_STEP must be from 1 to 1000000000")
        try:
            settings.max_priority_of("")
        except ValueError as e:
            raise SystemExit(f"Setting {e}") from None
        return settings

    def max_priority_of(self, tenant: str) -> int:
        """The highest priority ``tenant`` may submit at (``MAX_PRIORITY``, ``TENANT_MAX_PRIORITY``)."""
        return _priority_caps(self.max_priority, self.tenant_max_priority).get(tenant, self.max_priority)


@functools.lru_cache(maxsize=8)
def _priority_caps(default: int, per_tenant: str) -> dict[str, int]:
    if default not in range(10):
        raise ValueError(f"MAX_PRIORITY={default} must be 0 to 9")
    caps = {}
    for item in filter(None, (part.strip() for part in per_tenant.split(","))):
        tenant, _, cap = item.rpartition(":")
        if not tenant or not cap.isdigit() or int(cap) > 9:
            raise ValueError(f"TENANT_MAX_PRIORITY entry {item!r} must be tenant:N, N from 0 to 9")
        caps[tenant] = int(cap)
    return caps
