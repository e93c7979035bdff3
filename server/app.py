"""The Starlette app: lifespan (Redis, store, hub), routes, and error handling."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from http import HTTPStatus
import logging
import signal
from pathlib import Path

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Match, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp

from core import connections, contract, redischeck, tracing, workers
from server import joblogs, jobs, jobtypes, openapi, problems, queues, sse, streams, ws
from core.fastpath import direct
from server.auth import Auth, parse_keys, shared_secret
from server.hub import Hub, SubscribeTimeout
from server.metrics import metrics
from server.middleware import RequestContext
from server.requests import JSONAnswer, key_holder, redis_deadline
from server.problems import Problem
from server.ratelimit import RateLimiter
from server.watched import Watched
from core.settings import Settings
from core.store import Store
from worker.registry import load

log = logging.getLogger("server")

STATIC = Path(__file__).resolve().parent.parent / "static"


def unavailable(request: Request, exc: Exception) -> Response:
    log.warning("Redis unavailable: %s", exc)
    return problems.unavailable().response()


def problem(request: Request, exc: Problem) -> Response:
    return exc.response()


METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this request's path. Starlette's router answers 405 from
    the first route whose path matches, which lists only that route's methods (``/jobs`` has one
    route for GET and one for POST)."""
    methods: set[str] = set()
    for route in request.app.routes:
        if isinstance(route, Route) and route.methods and route.matches(request.scope)[0] is not Match.NONE:
            methods |= route.methods
    return sorted(methods, key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m))


def http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own errors (no route: 404; a route, not this method: 405) as problems with a
    ``detail``; a 405's ``Allow`` lists every method of the path."""
    status, headers = exc.status_code, dict(exc.headers or {})
    title = HTTPStatus(status).phrase
    path = request.url.path if len(request.url.path) <= 200 else request.url.path[:200] + "..."
    if status == 404:
        detail = f"Nothing is served at {path}; /openapi.json lists what is."
    elif status == 405:
        headers["Allow"] = ", ".join(allowed_methods(request))
        detail = f"{request.method} is not served at {path}; {headers['Allow']} are."
    else:
        detail = exc.detail if exc.detail and exc.detail != title else title
    return Problem(status, title, detail, headers=headers).response()


def internal_error(request: Request, exc: Exception) -> Response:
    """An unexpected exception: a problem too (Starlette re-raises it after this, and it is logged)."""
    return Problem(500, "Internal server error", "The server failed on this request; the error is logged.").response()


def stream_internal_error(request: Request, exc: Exception) -> Response:
    """``internal_error`` for the SSE routes, which go past Starlette (``App``): logged here."""
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return internal_error(request, exc)


async def upgrade_required(request: Request) -> Response:
    """``GET /ws`` without a WebSocket handshake (handshakes go past the router: ``App``)."""
    detail = "/ws is a WebSocket: connect with a WebSocket client (Upgrade: websocket)."
    return Problem(426, "Upgrade required", detail, headers={"Upgrade": "websocket"}).response()


async def healthz(request: Request) -> Response:
    return JSONAnswer(contract.dumps({"status": "ok"}))


async def readyz(request: Request) -> Response:
    """200 while Redis answers, with what it keeps (``redischeck.facts``: still 200 if it warns)."""
    try:
        async with asyncio.timeout(2.0):
            found = await redischeck.facts(request.app.state.store.redis)
    except Exception as e:
        return unavailable(request, e)
    return JSONAnswer(contract.dumps({"status": "ready", "redis": found}))


async def list_workers(request: Request) -> Response:
    """``GET /workers``: the live workers (``core.workers``) with their types and load."""
    await key_holder(request)
    async with redis_deadline():
        items = await workers.live(request.app.state.store.redis)
    return JSONAnswer(contract.dumps({"items": items}), headers={"Cache-Control": "no-store"})


async def list_queues(request: Request) -> Response:
    """``GET /queues``: each named queue's waiting and running jobs (``server.queues``)."""
    await key_holder(request)
    async with redis_deadline():
        items = await queues.report(request.app)
    return JSONAnswer(contract.dumps({"items": items}), headers={"Cache-Control": "no-store"})


async def read_live_types(app: Starlette) -> None:
    """``app.state.live_types``: the job types that some live worker runs."""
    try:
        app.state.live_types = {t for w in await workers.live(app.state.store.redis) for t in w["types"]}
    except Exception as e:  # noqa: BLE001 - Redis blip: keep the last answer
        log.debug("reading the live workers failed: %s", e)


async def follow_workers(app: Starlette) -> None:
    while True:
        await asyncio.sleep(workers.BEAT)
        await read_live_types(app)


def page(name: str):
    async def endpoint(request: Request) -> Response:
        return FileResponse(STATIC / name)

    return endpoint


def drain_on_signals(hub: Hub) -> None:
    """On SIGTERM/SIGINT, end every stream at once (then run uvicorn's own handler, which waits
    for connections to finish). Without this, uvicorn would wait out its graceful timeout on
    long-lived streams and then cut them mid-response."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)

        def handler(signum, frame, previous=previous):
            loop.call_soon_threadsafe(hub.drain)
            if callable(previous):
                previous(signum, frame)

        signal.signal(sig, handler)


class App(Starlette):
    """Starlette, except that the connections that stay open go past its middleware and router:
    WebSocket handshakes to ``websocket_app`` and GET/HEAD of the two SSE routes to their
    ``streams.Endpoint`` (each with ``RequestContext``, and CORS when configured). Those layers
    do nothing for a stream but find its route, and each keeps a frame for as long as the stream
    is open: about 4.5 KB of an idle WebSocket and 2.7 KB of an idle SSE stream."""

    websocket_app: ASGIApp
    job_events: ASGIApp
    events: ASGIApp

    async def __call__(self, scope, receive, send) -> None:
        direct.remember(scope, send)  # before any middleware wraps ``send``
        if scope["type"] == "websocket":
            scope["app"] = self
            return await self.websocket_app(scope, receive, send)
        if scope["type"] == "http" and (stream := self.stream_for(scope)) is not None:
            scope["app"] = self
            return await stream(scope, receive, send)
        await super().__call__(scope, receive, send)

    def stream_for(self, scope) -> ASGIApp | None:
        """``/events`` or ``/jobs/{job_id}/events`` (``job_id`` as Starlette matches it: no slash)."""
        if scope["method"] not in ("GET", "HEAD"):
            return None
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if path == "/events":
            return self.events
        if path.startswith("/jobs/") and path.endswith("/events") and "/" not in (job_id := path[6:-7]) and job_id:
            scope["path_params"] = {"job_id": job_id}
            return self.job_events
        return None


def create_app(settings: Settings | None = None) -> App:
    settings = settings or Settings.from_env()
    registry = load(settings.jobs_module)
    parse_keys(settings.api_keys)  # refuse a malformed API_KEYS at start-up
    try:
        connections.sentinel_target(settings.redis_url)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    origins = {o.strip().rstrip("/") for o in settings.allowed_origins.split(",") if o.strip()}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        # Commands are retried twice on a dropped connection (e.g. a Redis restart or failover).
        # That is safe for our writes: creation rewrites the same keys and a document write is a
        # compare-and-set, so a second attempt after a lost reply is refused, not applied twice.
        # No per-command timeout: each request bounds all its Redis calls (``redis_deadline``).
        tracing.setup("progress-server")  # only with OTEL_EXPORTER_OTLP_ENDPOINT set
        redis = connections.client(settings.redis_url, retries=2)
        store = Store(redis, settings)
        # the hub's own client, without retries: it must see every lost connection to resync
        hub_redis = connections.client(settings.redis_url)
        hub = Hub(hub_redis, store)
        app.state.settings, app.state.registry, app.state.store, app.state.hub = settings, registry, store, hub
        app.state.auth = Auth(settings, await shared_secret(settings, redis), redis)
        app.state.limiter = RateLimiter(redis)
        app.state.open_streams = Counter()
        app.state.allowed_origins = origins
        if app.state.auth.keyless:
            log.warning("no API_KEYS set: keyless dev mode, every caller may submit, list and cancel any job")
        app.state.reaper = streams.SlowClientReaper(settings.send_timeout)
        app.state.heartbeat = streams.Heartbeat(settings.sse_ping)
        app.state.live_types = set()
        app.state.watched = Watched(redis, hub.watched)  # for cancel_when_unwatched
        await redischeck.check(redis, "server")
        await read_live_types(app)
        reaper = asyncio.create_task(app.state.reaper.run())
        heartbeat = asyncio.create_task(app.state.heartbeat.run())
        reader = asyncio.create_task(hub.run())
        follower = asyncio.create_task(follow_workers(app))
        marker = asyncio.create_task(app.state.watched.run())
        drain_on_signals(hub)
        try:
            yield
        finally:
            for task in (reader, reaper, heartbeat, follower, marker):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            await redis.aclose()
            await hub_redis.aclose()
            tracing.shutdown()

    errors = {
        Problem: problem,
        HTTPException: http_error,
        RedisConnectionError: unavailable,
        RedisTimeoutError: unavailable,
        SubscribeTimeout: unavailable,
        Exception: internal_error,
    }
    stream_errors = {**errors, Exception: stream_internal_error}
    job_events, events = streams.Endpoint(sse.job_events, stream_errors), streams.Endpoint(sse.events, stream_errors)
    routes = [  # the busiest first: Starlette tries them in order
        Route("/jobs", jobs.submit, methods=["POST"]),
        Route("/jobs", jobs.list_jobs, methods=["GET"]),
        Route("/jobs/{job_id}", jobs.status, methods=["GET"]),
        Route("/jobs/{job_id}", jobs.cancel, methods=["DELETE"]),
        Route("/jobs/{job_id}/result", jobs.result),
        Route("/jobs/{job_id}/retry", jobs.retry, methods=["POST"]),
        Route("/jobs/{job_id}/logs", joblogs.job_log),
        Route("/jobs/{job_id}/params", jobs.params),
        Route("/tickets", jobs.ticket, methods=["POST"]),
        Route("/job-types", jobtypes.list_types),
        Route("/workers", list_workers),
        Route("/queues", list_queues),
        Route("/jobs/{job_id}/events", job_events, methods=["GET"], name="job_events"),  # GET: App.stream_for
        Route("/events", events, methods=["GET"], name="events"),
        Route("/ws", upgrade_required),  # a handshake goes to ``App.websocket_app``, past the router
        Route("/", page("index.html")),
        Route("/dashboard", page("dashboard.html")),
        Route("/dashboard/jobs/{job_id}", page("job.html")),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        Route("/openapi.json", openapi.openapi),
        Route("/docs", page("docs.html")),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    middleware = [Middleware(RequestContext)]
    if origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=sorted(origins),
                allow_methods=["GET", "POST", "DELETE"],
                allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID", "X-Request-ID"],
                expose_headers=["Location", "Retry-After", "ETag", "X-Request-ID", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"],
                max_age=600,
            )
        )
    app = App(routes=routes, lifespan=lifespan, exception_handlers=errors, middleware=middleware)
    app.state.openapi = openapi.document(settings, registry)
    app.websocket_app = RequestContext(ws.websocket_app)
    app.job_events, app.events = around(job_events, middleware), around(events, middleware)
    return app


def around(inner: ASGIApp, middleware: list[Middleware]) -> ASGIApp:
    """``inner`` inside the app's middleware, outermost first, as Starlette stacks them."""
    for cls, args, kwargs in reversed(middleware):
        inner = cls(inner, *args, **kwargs)
    return inner
