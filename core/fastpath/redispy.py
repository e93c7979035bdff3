"""redis-py's asyncio client with two per-command costs trimmed (``lean``), for the server's
clients and the worker's arq pool alike. redis-py 8 made both changes itself; arq pins redis < 6.

Fenced (``core.fastpath``): ``lean`` returns the client untouched unless every name in
``NEEDS`` is in the installed redis-py and asyncio.
"""

from __future__ import annotations

import asyncio
from typing import Any

import hiredis
from redis._parsers.hiredis import NOT_ENOUGH_DATA, _AsyncHiredisParser
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError

from core import fastpath


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
    if not fastpath.on("redispy"):
        return redis
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


NEEDS = [  # (library, class, the names of it used above)
    ("redis", _AsyncHiredisParser, ("can_read_destructive", "_connected", "_reader", "_stream")),
    ("redis", AbstractConnection, ("pack_command",)),
    ("redis", ConnectionPool, ("connection_class", "connection_kwargs", "get_connection")),
    ("asyncio", asyncio.StreamReader, ("_buffer", "at_eof", "exception")),
]
