"""The machine's floor for scenario 3, measured in the same run: no ASGI, no Starlette, no hub.

The issue calibrates its targets against "the leanest Python broadcast we could build": the
``websockets`` library's own server and ``broadcast()``. This is that server, speaking just
enough of ``/ws`` for the bench's clients: a client sends ``{"op":"subscribe","jobs":[...]}``,
gets each job's current document, then every update of those jobs, read from the same Redis
channels and framed as the server frames them (``events.Event.ws``). One pub/sub connection, one
``broadcast()`` per update. It has none of the product's guarantees (no resync, no conflation,
no auth, no slow-client handling); it exists so that ``bench.run`` can report the server's CPU
per delivery as a ratio to this figure, which survives the VM's speed drifting from hour to hour.

``PORT=8001 REDIS_URL=redis://... python -m bench.floor``; ``GET /readyz`` answers 200.
"""

from __future__ import annotations

import asyncio
import json
import os
from http import HTTPStatus

import uvloop
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.http11 import Request, Response

from core import connections, contract
from server.events import Event
from core.settings import Settings
from core.store import Store


async def main(port: int, redis_url: str) -> None:
    redis = connections.client(redis_url)
    store = Store(redis, Settings(redis_url=redis_url))
    pubsub = redis.pubsub()
    watchers: dict[str, set[ServerConnection]] = {}

    def ready(connection: ServerConnection, request: Request) -> Response | None:
        if request.path != "/ws":
            return connection.respond(HTTPStatus.OK, "ok\n")
        return None

    async def handler(ws: ServerConnection) -> None:
        jobs = json.loads(await ws.recv())["jobs"]
        try:
            for job_id in jobs:
                if job_id not in watchers:
                    watchers[job_id] = set()
                    await pubsub.subscribe(contract.channel(job_id))
                watchers[job_id].add(ws)
                raw = await store.read(job_id)
                if raw is not None:
                    await ws.send(Event(job_id, raw).ws)
            await ws.wait_closed()
        finally:
            for job_id in jobs:
                watchers.get(job_id, set()).discard(ws)

    async def fan_out() -> None:
        prefix = contract.CHANNEL_PREFIX_LEN
        while True:
            if not pubsub.subscribed:
                await asyncio.sleep(0.01)
                continue
            msg = await pubsub.get_message(timeout=1.0)
            if msg is not None and msg["type"] == "message":
                job_id = msg["channel"][prefix:].decode()
                broadcast(watchers.get(job_id, ()), Event(job_id, msg["data"]).ws)

    await pubsub.connect()  # now: two first subscribes at once would each take a connection
    async with serve(handler, "127.0.0.1", port, process_request=ready, compression=None, max_size=65536):
        await fan_out()


if __name__ == "__main__":
    uvloop.run(main(int(os.environ["PORT"]), os.environ["REDIS_URL"]))
