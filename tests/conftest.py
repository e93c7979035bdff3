"""Fixtures: a real Redis-compatible server, a real server process and a real worker, per session.

Tests that kill or restart processes build their own with the helpers in ``support``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from core.devredis import RedisProcess
from support import Proc, start_server, start_worker

# A worker that publishes every update (no throttle), so the tests see every seq.
WORKER_SETTINGS = {"progress_interval": 0}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def own_redis(tmp_path) -> Iterator[RedisProcess]:
    """A Redis of the test's own (no persistence), for tests whose workers must see only their jobs."""
    server = RedisProcess(tmp_path / "redis", appendonly=False).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tmp_session(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="session")
def redis_server(tmp_session: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_session / "redis").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_client(redis_server: RedisProcess) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def worker(redis_server: RedisProcess, tmp_session: Path) -> Iterator[Proc]:
    proc = start_worker(redis_server.url, tmp_session, **WORKER_SETTINGS)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def server(redis_server: RedisProcess, worker: Proc, tmp_session: Path) -> Iterator[Proc]:
    proc = start_server(redis_server.url, tmp_session)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def base(server: Proc) -> str:
    return server.url

