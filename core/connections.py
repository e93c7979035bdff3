"""``REDIS_URL`` to clients: the one place that knows the URL forms.

- ``redis://``, ``rediss://``, ``unix://``: redis-py's own forms, one Redis server, with the
  query options in ``QUERY_OPTIONS`` (the TLS ones, e.g. ``?ssl_ca_certs=ca.pem`` for a private
  CA, ``&ssl_certfile=&ssl_keyfile=`` for mutual TLS). Any other option is refused at start.
- ``redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]`` (or
  ``rediss+sentinel://`` for TLS to the primary): a Sentinel-managed primary. The password is the
  primary's; the sentinels themselves are asked without one, and without TLS. Every new connection
  asks the sentinels where the primary is, so after a failover a reconnect finds the promoted
  replica. No query options yet (they were refused while the worker used arq's Sentinel mode,
  which could not pass them on; both now connect through ``client``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, parse_qsl, unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.connection import RedisSSLContext
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core.fastpath import redispy

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CONNECT_TIMEOUT = 2.0


def _flag(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("not true or false")


def _cert_reqs(value: str) -> str:
    if value.lower() not in ("none", "optional", "required"):
        raise ValueError("not none, optional or required")
    return value.lower()


# The URL query options: redis-py's names and meanings, the ones server and worker both apply
# (``client``); any other is refused rather than silently ignored.
QUERY_OPTIONS: dict[str, Callable[[str], Any]] = {
    "db": int,
    "socket_connect_timeout": float,
    "retry_on_timeout": _flag,
    "max_connections": int,
    "ssl_ca_certs": str,  # a private CA's certificate (PEM file) to verify the server with
    "ssl_ca_data": str,  # the same as PEM text
    "ssl_cert_reqs": _cert_reqs,  # none, optional, required (the default)
    "ssl_check_hostname": _flag,  # off by default (redis-py 5)
    "ssl_certfile": str,  # mutual TLS: this client's certificate ...
    "ssl_keyfile": str,  # ... and its key
}
TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


@dataclass(frozen=True)
class SentinelTarget:
    sentinels: list[tuple[str, int]]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl: bool = False


@dataclass(frozen=True)
class Target:
    """``REDIS_URL`` parsed. ``options`` are redis-py keyword arguments for each connection to the
    (primary) Redis, only those the URL sets: ``host`` and ``port`` or ``unix_socket_path``, ``db``,
    ``username``, ``password``, ``ssl`` and the query's options. For a Sentinel URL, ``sentinel``
    says whom to ask where the primary is (and ``options`` has no address)."""

    options: dict[str, Any]
    sentinel: SentinelTarget | None = None


def parse(url: str) -> Target:
    """The one parser of ``REDIS_URL``. Raises ValueError naming what is wrong, including a query
    option not in ``QUERY_OPTIONS`` and TLS files that do not load."""
    parts = urlsplit(url)
    if parts.scheme in SENTINEL_SCHEMES:
        return _parse_sentinel(parts)
    if parts.scheme not in ("redis", "rediss", "unix"):
        schemes = "redis, rediss, unix, redis+sentinel or rediss+sentinel"
        raise ValueError(f"REDIS_URL: scheme {parts.scheme!r} is not {schemes}")
    options: dict[str, Any] = {}
    if parts.username:
        options["username"] = unquote(parts.username)
    if parts.password:
        options["password"] = unquote(parts.password)
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("REDIS_URL: a unix:// URL needs the socket's path: unix:///path/to/redis.sock")
        options["unix_socket_path"] = unquote(parts.path)
    else:
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"REDIS_URL: the port of {parts.netloc.rpartition('@')[2]!r} is not a number") from None
        if parts.hostname:
            options["host"] = unquote(parts.hostname)
        if port:
            options["port"] = port
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise ValueError(f"REDIS_URL: the path {parts.path!r} is not /<db number>")
        if db:
            options["db"] = int(db)
        if parts.scheme == "rediss":
            options["ssl"] = True
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in QUERY_OPTIONS:
            raise ValueError(
                f"REDIS_URL: option {name!r} is not supported; supported: {', '.join(QUERY_OPTIONS)}"
            )
        try:
            options[name] = QUERY_OPTIONS[name](value)
        except ValueError as e:
            raise ValueError(f"REDIS_URL: {name}={value!r}: {e}") from None
    _check_tls(options)
    return Target(options)


def _parse_sentinel(parts: SplitResult) -> Target:
    if parts.query:  # not tested through redis-py's Sentinel connections yet: refused, not ignored
        raise ValueError(
            f"REDIS_URL: a sentinel URL takes no options ({parts.query.partition('=')[0]!r}) yet; "
            "TLS to the primary (rediss+sentinel://) verifies with the system's CAs"
        )
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
    target = SentinelTarget(
        sentinels=sentinels,
        service=unquote(path[0]),
        db=int(path[1]) if len(path) == 2 else 0,
        username=unquote(user) or None,
        password=unquote(password) or None,
        ssl=parts.scheme == "rediss+sentinel",
    )
    options = {"db": target.db, "username": target.username, "password": target.password, "ssl": target.ssl}
    return Target({k: v for k, v in options.items() if v is not None}, target)


def _check_tls(options: dict[str, Any]) -> None:
    """The TLS options must make sense and their files load now, at start, not at each connect."""
    given = [name for name in options if name.startswith("ssl_")]
    if not given:
        return
    if not options.get("ssl"):
        raise ValueError(f"REDIS_URL: {given[0]} needs TLS: a rediss:// URL")
    if ("ssl_certfile" in options) != ("ssl_keyfile" in options):
        # redis-py presents a client certificate only when given both
        raise ValueError("REDIS_URL: ssl_certfile and ssl_keyfile go together (a client certificate and its key)")
    for name in TLS_FILES:
        if name in options and not os.path.isfile(options[name]):
            raise ValueError(f"REDIS_URL: {name}: no such file {options[name]!r}")
    context = RedisSSLContext(
        keyfile=options.get("ssl_keyfile"),
        certfile=options.get("ssl_certfile"),
        cert_reqs=options.get("ssl_cert_reqs", "required"),
        ca_certs=options.get("ssl_ca_certs"),
        ca_data=options.get("ssl_ca_data"),
        check_hostname=options.get("ssl_check_hostname", False),
    )
    try:
        context.get()  # redis-py's own TLS setup, as each connection does it
    except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
        raise ValueError(f"REDIS_URL: the TLS options ({', '.join(given)}) do not load: {e}") from None


def sentinel_target(url: str) -> SentinelTarget | None:
    """The sentinels of a ``redis+sentinel://`` URL, or None for any other form. Parses and checks
    the whole URL: raises ValueError."""
    return parse(url).sentinel


def client(url: str, retries: int = 0, **kwargs: Any) -> Redis:
    """A client of the (primary) Redis at ``url``; with ``retries``, a command is retried that
    many times after a dropped connection, with a short backoff."""
    target = parse(url)
    kwargs = {"socket_connect_timeout": CONNECT_TIMEOUT, "socket_keepalive": True, **target.options, **kwargs}
    if retries:
        kwargs["retry"] = Retry(ExponentialBackoff(cap=0.5, base=0.05), retries)
        kwargs["retry_on_error"] = [RedisConnectionError, RedisTimeoutError]
    if target.sentinel is None:
        return redispy.lean(Redis(**kwargs))
    # the sentinels are asked without TLS or password
    sentinels = Sentinel(target.sentinel.sentinels, sentinel_kwargs={"socket_connect_timeout": CONNECT_TIMEOUT})
    return redispy.lean(sentinels.master_for(target.sentinel.service, **kwargs))
