"""The Starlette app: lifespan (Redis, store, hub), routes, and error handling."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
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
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp

from core import connections, redischeck, workers
from server import jobs, jobtypes, problems, sse, streams, ws
from core.fastpath import direct
from server.auth import Auth, parse_keys, shared_secret
from server.hub import Hub, SubscribeTimeout
from server.metrics import metrics
from server.middleware import RequestContext
from server.requests import key_holder, redis_deadline
from server.openapi import openapi
from server.problems import Problem
from server.ratelimit import RateLimiter
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


def http_error(request: Request, exc: HTTPException) -> Response:
    return Problem(exc.status_code, exc.detail or "Error", headers=exc.headers).response()


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """200 while Redis answers, with what it keeps (``redischeck.facts``: still 200 if it warns)."""
    try:
        async with asyncio.timeout(2.0):
            found = await redischeck.facts(request.app.state.store.redis)
    except Exception as e:
        return unavailable(request, e)
    return JSONResponse({"status": "ready", "redis": found})


async def list_workers(request: Request) -> Response:
    """``GET /workers``: the live workers (``core.workers``) with their types and load."""
    await key_holder(request)
    async with redis_deadline():
        items = await workers.live(request.app.state.store.redis)
    return JSONResponse({"items": items}, headers={"Cache-Control": "no-store"})


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
    """Starlette, except that WebSocket handshakes go straight to ``ws.websocket_app``
    (with ``RequestContext``). Starlette's middleware and router do nothing for a WebSocket but
    find its one route, and their frames stay on the stack for as long as it is open: 4.5 KB
    of an idle connection's 21."""

    websocket_app: ASGIApp

    async def __call__(self, scope, receive, send) -> None:
        direct.remember(scope, send)  # before any middleware wraps ``send``
        if scope["type"] == "websocket":
            scope["app"] = self
            return await self.websocket_app(scope, receive, send)
        await super().__call__(scope, receive, send)


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
        app.state.live_types = set()
        await redischeck.check(redis, "server")
        await read_live_types(app)
        reaper = asyncio.create_task(app.state.reaper.run())
        reader = asyncio.create_task(hub.run())
        follower = asyncio.create_task(follow_workers(app))
        drain_on_signals(hub)
        try:
            yield
        finally:
            for task in (reader, reaper, follower):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            await redis.aclose()
            await hub_redis.aclose()

    routes = [  # the busiest first: Starlette tries them in order
        Route("/jobs", jobs.submit, methods=["POST"]),
        Route("/jobs", jobs.list_jobs, methods=["GET"]),
        Route("/jobs/{job_id}", jobs.status, methods=["GET"]),
        Route("/jobs/{job_id}", jobs.cancel, methods=["DELETE"]),
        Route("/jobs/{job_id}/result", jobs.result),
        Route("/jobs/{job_id}/retry", jobs.retry, methods=["POST"]),
        Route("/tickets", jobs.ticket, methods=["POST"]),
        Route("/job-types", jobtypes.list_types),
        Route("/workers", list_workers),
        Route("/jobs/{job_id}/events", streams.Endpoint(sse.job_events), methods=["GET"], name="job_events"),
        Route("/events", streams.Endpoint(sse.events), methods=["GET"], name="events"),
        # WebSocket /ws: ``App.websocket_app``, past the router
        Route("/", page("index.html")),
        Route("/dashboard", page("dashboard.html")),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        Route("/openapi.json", openapi),
        Route("/docs", page("docs.html")),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    handlers = {
        Problem: problem,
        HTTPException: http_error,
        RedisConnectionError: unavailable,
        RedisTimeoutError: unavailable,
        SubscribeTimeout: unavailable,
    }
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
    app = App(routes=routes, lifespan=lifespan, exception_handlers=handlers, middleware=middleware)
    app.websocket_app = RequestContext(ws.websocket_app)
    return app
