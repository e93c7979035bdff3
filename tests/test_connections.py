"""``core.fastpath.redispy`` (through ``core.connections``): redis-py's asyncio client with hiredis packing and a cheap stale-reply
check must behave exactly as the unpatched client does."""

from __future__ import annotations

import enum

import pytest
from redis.asyncio.connection import Connection
from redis.exceptions import DataError

from core import connections
from core.fastpath import redispy
from support import async_wait_until

pytestmark = pytest.mark.anyio


class Level(enum.IntEnum):
    HIGH = 7


@pytest.mark.parametrize(
    "args",
    [
        ("SET", "key", "välue"),
        ("EVALSHA", "ab" * 20, 2, "k1", "k2", b"\x00\xff", 12345678901234567890, -1, 2.5, memoryview(b"mv")),
        ("SCRIPT EXISTS", "ab" * 20),
        (b"CLIENT SETNAME", b"x"),
        ("SET", "key", Level.HIGH),  # hiredis refuses int subclasses: redis-py's own packing
    ],
)
def test_packing_is_byte_for_byte_redis_pys(args):
    lean = type("Lean", (redispy.HiredisPacking, Connection), {})()
    assert b"".join(lean.pack_command(*args)) == b"".join(Connection().pack_command(*args))


@pytest.mark.parametrize("value", [True, None, object()])
def test_packing_refuses_what_redis_py_refuses(value):
    lean = type("Lean", (redispy.HiredisPacking, Connection), {})()
    with pytest.raises(DataError):
        lean.pack_command("SET", "key", value)


async def test_a_connection_with_a_stale_reply_is_replaced(redis_server):
    """A pooled connection holding an unread reply (e.g. of a cancelled command) is not reused
    as is: the next command gets its own reply."""
    redis = connections.client(redis_server.url)
    try:
        assert not hasattr(redis.connection_pool.get_connection, "__wrapped__")  # no deprecation check
        conn = await redis.connection_pool.get_connection()
        assert isinstance(conn._parser, redispy.ReadyCheckParser)
        await conn.send_command("ECHO", "stale")  # its reply is never read

        async def reply_arrived() -> bool:
            return bool(conn._reader._buffer)

        await async_wait_until(reply_arrived, timeout=5, what="the unread reply in asyncio's buffer")
        await redis.connection_pool.release(conn)
        assert await redis.set("fresh", "yes") is True  # not the stale b"stale"
        assert await redis.get("fresh") == b"yes"
    finally:
        await redis.aclose()
