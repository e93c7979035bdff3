"""``REDIS_URL`` to clients: the one place that knows the URL forms.

- ``redis://``, ``rediss://``, ``unix://``: redis-py's own forms, one Redis server.
- ``redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]`` (or
  ``rediss+sentinel://`` for TLS to the primary): a Sentinel-managed primary. The password is the
  primary's; the sentinels themselves are asked without one. Every new connection asks the
  sentinels where the primary is, so after a failover a reconnect finds the promoted replica.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis
from arq.connections import RedisSettings
from redis._parsers.hiredis import NOT_ENOUGH_DATA, _AsyncHiredisParser
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CONNECT_TIMEOUT = 2.0


class ReadyCheckParser(_AsyncHiredisParser):
    """redis-py's hiredis parser with a cheaper check that a pooled connection holds no stale
    reply. redis-py 5 runs that check before every command as a read under ``timeout(0)``, which
    costs an event-loop turn and a cancelled read each time (70-100 µs per command on our 2-core
    VM). Looking at the bytes asyncio already holds answers the same question. redis-py 8 made
    the same change (redis/redis-py#4063); arq pins redis < 6."""

    async def can_read_destructive(self) -> bool:
        if not self._connected:
            raise RedisConnectionError("Connection closed by server.")
        if self._reader.gets() is not NOT_ENOUGH_DATA:
            return True
        stream = self._stream
        return bool(stream._buffer) or stream.at_eof() or stream.exception() is not None


class HiredisPacking:
    """Mixed into redis-py's asyncio connection classes: commands packed by hiredis (C), as
    redis-py's sync client already does. The asyncio client packs in Python, argument by
    argument: 200,000 instructions of a submit's 30-argument EVALSHA (13% of the request)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        command = args
        if isinstance(command[0], str):
            command = (*command[0].encode().split(), *command[1:])
        elif b" " in command[0]:
            command = (*command[0].split(), *command[1:])
        try:
            return [hiredis.pack_command(command)]
        except TypeError:  # a type hiredis refuses (an int subclass, say): redis-py's own packing
            return super().pack_command(*args)  # type: ignore[misc]


def lean(redis: Redis) -> Redis:
    """``redis`` with both of the above for every connection its pool makes from now on."""
    pool = redis.connection_pool
    base = pool.connection_class
    pool.connection_class = type(base.__name__, (HiredisPacking, base), {})
    pool.connection_kwargs["parser_class"] = ReadyCheckParser
    # redis-py 5.3 wraps get_connection in a warning about deprecated arguments, which inspects
    # the call on every command; it is never given any
    plain = getattr(type(pool).get_connection, "__wrapped__", None)
    if plain is not None:
        pool.get_connection = plain.__get__(pool)
    return redis


@dataclass(frozen=True)
class SentinelTarget:
    sentinels: list[tuple[str, int]]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl: bool = False


def sentinel_target(url: str) -> SentinelTarget | None:
    """The parsed ``redis+sentinel://`` URL, or None for any other form. Raises ValueError."""
    parts = urlsplit(url)
    if parts.scheme not in SENTINEL_SCHEMES:
        return None
    credentials, _, hosts = parts.netloc.rpartition("@")
    user, _, password = credentials.partition(":")
    sentinels = []
    for hostport in hosts.split(","):
        host, _, port = hostport.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"REDIS_URL: sentinel address {hostport!r} is not host:port")
        sentinels.append((host.strip("[]"), int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError("REDIS_URL: a sentinel URL ends in /<service name> or /<service name>/<db>")
    return SentinelTarget(
        sentinels=sentinels,
        service=unquote(path[0]),
        db=int(path[1]) if len(path) == 2 else 0,
        username=unquote(user) or None,
        password=unquote(password) or None,
        ssl=parts.scheme == "rediss+sentinel",
    )


def client(url: str, retries: int = 0, **kwargs: Any) -> Redis:
    """A client of the (primary) Redis at ``url``; with ``retries``, a command is retried that
    many times after a dropped connection, with a short backoff."""
    kwargs.setdefault("socket_connect_timeout", CONNECT_TIMEOUT)
    kwargs.setdefault("socket_keepalive", True)
    if retries:
        kwargs["retry"] = Retry(ExponentialBackoff(cap=0.5, base=0.05), retries)
        kwargs["retry_on_error"] = [RedisConnectionError, RedisTimeoutError]
    target = sentinel_target(url)
    if target is None:
        return lean(Redis.from_url(url, **kwargs))
    sentinels = Sentinel(target.sentinels, sentinel_kwargs={"socket_connect_timeout": CONNECT_TIMEOUT})
    if target.ssl:
        kwargs["ssl"] = True
    return lean(
        sentinels.master_for(target.service, db=target.db, username=target.username, password=target.password, **kwargs)
    )


def arq_settings(url: str) -> RedisSettings:
    """arq's settings for the same Redis (arq asks the sentinels itself in Sentinel mode)."""
    target = sentinel_target(url)
    if target is None:
        return RedisSettings.from_dsn(url)
    return RedisSettings(
        host=target.sentinels,
        sentinel=True,
        sentinel_master=target.service,
        database=target.db,
        username=target.username,
        password=target.password,
        ssl=target.ssl,
        conn_timeout=int(CONNECT_TIMEOUT),
    )
