"""Hostile WebSocket messages: each gets an ``error`` event and the connection stays usable.

A bounded fuzz: 3,000 messages from a seeded generator (so a failure repeats) over 20 connections:
random ops and values, deep nesting, lone surrogates, NaN, huge numbers, NUL, random text and
binary frames. Then every connection still subscribes to a real job and gets its document; none
was closed (no 1011).
"""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest
from websockets.asyncio.client import connect

from support import submit, watch_sse

pytestmark = pytest.mark.anyio

CONNECTIONS = 20
MESSAGES = 150  # per connection


def value(rng: random.Random, depth: int = 0) -> object:
    """A random JSON-able value, nested a little."""
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, -1, 2**63, 10**40, 1.5, -0.0])
    if kind == 2:
        return "".join(chr(rng.randrange(1, 0x2FF)) for _ in range(rng.randrange(0, 40)))
    if kind == 3:
        return "j_" + "".join(rng.choice("abcXYZ019_") for _ in range(rng.randrange(0, 30)))
    if kind == 4:
        return "\x00" * rng.randrange(1, 5)
    if kind == 5:
        return "x" * rng.randrange(100, 3000)
    if kind == 6:
        return [value(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    if kind == 7:
        return {str(value(rng, 3)): value(rng, depth + 1) for _ in range(rng.randrange(0, 4))}
    return {"op": rng.choice(["subscribe", "unsubscribe", "", "SUBSCRIBE"]), "jobs": value(rng, depth + 1)}


def message(rng: random.Random) -> str | bytes:
    """One hostile frame: text that is JSON, almost JSON, or not; sometimes binary."""
    kind = rng.randrange(10)
    if kind == 0:
        n = rng.choice([5, 50, 500, 5000])
        return "[" * n + "]" * n  # runaway nesting
    if kind == 1:
        return '{"op":"subscribe","jobs":["\\ud800"]}'  # a lone surrogate, escaped
    if kind == 2:
        return rng.choice(['{"op":"subscribe","jobs":[NaN]}', '{"op":"subscribe","jobs":["a"],"since":{"a":1e999}}',
                           '{"op":"subscribe","op":"unsubscribe","jobs":[]}', '{"op"', "", "null", "[]", '"x"'])  # fmt: skip
    if kind == 3:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))  # a binary frame
    if kind == 4:
        return "".join(chr(rng.randrange(32, 0x7FF)) for _ in range(rng.randrange(1, 200)))
    msg = {"op": rng.choice(["subscribe", "unsubscribe", "subscribe", "nope", None]), "jobs": value(rng)}
    if rng.random() < 0.5:
        msg["since"] = value(rng)
    if rng.random() < 0.3:
        msg["tokens"] = value(rng)
    if rng.random() < 0.1:
        msg["all"] = rng.choice([True, 1, "yes"])
    if rng.random() < 0.1:
        msg["jobs"] = [f"j_{i}" for i in range(rng.choice([99, 101, 150]))]
    return json.dumps(msg, ensure_ascii=rng.random() < 0.5)


async def test_hostile_messages_get_errors_and_every_connection_stays_usable(base):
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        job = await submit(client, base, steps=1, interval=0)
        await watch_sse(client, base + job["links"]["events"])  # ended: a subscribe gets its final document
    ws_url = base.replace("http", "ws") + "/ws"

    async def fuzz(seed: int) -> tuple[int, dict]:
        rng = random.Random(seed)
        errors = 0
        async with connect(ws_url, max_size=None) as ws:
            for _ in range(MESSAGES):
                await ws.send(message(rng))
            await ws.send(json.dumps({"op": "unsubscribe", "jobs": [job["id"]]}))  # whatever the fuzz subscribed
            await ws.send(json.dumps({"op": "subscribe", "jobs": [job["id"]]}))
            while True:  # the answers to the fuzz (at most 16 wait at once), then the job's document
                answer = json.loads(await asyncio.wait_for(ws.recv(), 20))
                if answer.get("event") == "error":
                    errors += 1
                elif answer.get("job", {}).get("id") == job["id"]:
                    return errors, answer["job"]

    results = await asyncio.wait_for(asyncio.gather(*(fuzz(seed) for seed in range(CONNECTIONS))), 120)
    assert all(doc["status"] == "succeeded" for _, doc in results)  # every connection still works
    assert sum(errors for errors, _ in results) > CONNECTIONS  # and the hostile ones were answered
