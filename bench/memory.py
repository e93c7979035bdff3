"""Python memory per idle connection, by the line that allocated it (tracemalloc).

``python -m bench.memory [--kind ws|sse] [--connections 1000] [--top 25]`` starts an embedded
Redis and the app in this process (uvicorn with the protocols ``python -m server`` uses), submits
one job (no worker runs it), and has a child process open ``--connections`` idle watchers of it.
It prints the bytes per connection that tracemalloc counts between before and after, and the
lines that allocated the most. The ``idle`` scenario of ``python -m bench`` gives the RSS figure;
this tells where it goes. tracemalloc slows the server, so it is not a CPU measure.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tempfile
import tracemalloc
from pathlib import Path

import httpx
import uvicorn
import uvloop

from bench.procs import raise_fd_limit
from server.__main__ import connections
from core.devredis import RedisProcess, free_port

ROOT = Path(__file__).resolve().parent.parent

# The child process: open N watchers of one job, each until its first event, then hold them.
WATCHERS = r"""
import asyncio, json, sys
from websockets.asyncio.client import connect

kind, n, port, job = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

async def ws():
    conn = await connect(f"ws://127.0.0.1:{port}/ws", max_size=None, compression=None)
    await conn.send(json.dumps({"op": "subscribe", "jobs": [job]}))
    await conn.recv()
    return conn

async def sse():
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /jobs/{job}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    seen = b""
    while b"data:" not in seen:
        seen += await reader.read(65536)
    return writer

async def main():
    held = []
    for start in range(0, n, 100):
        held += await asyncio.gather(*((ws if kind == "ws" else sse)() for _ in range(min(100, n - start))))
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

asyncio.run(main())
"""


async def hold(kind: str, n: int, port: int, job: str) -> asyncio.subprocess.Process:
    """Start the child; returns once its ``n`` watchers each have their first event."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WATCHERS, kind, str(n), str(port), job,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    line = await asyncio.wait_for(child.stdout.readline(), 120)
    if line.strip() != b"ready":
        raise SystemExit(f"the watchers did not connect (exit {await child.wait()})")
    return child


async def release(child: asyncio.subprocess.Process) -> None:
    child.stdin.write(b"\n")
    await child.stdin.drain()
    await child.wait()


async def settled() -> tracemalloc.Snapshot | None:
    await asyncio.sleep(0.5)  # the server finishes what the last connections started
    gc.collect()
    return tracemalloc.take_snapshot() if tracemalloc.is_tracing() else None


async def measure(kind: str, n: int, top: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisProcess(Path(tmp) / "redis", appendonly=False).start()
        port = free_port()
        os.environ.update(REDIS_URL=redis.url, LOG_LEVEL="warning", MAX_STREAMS_PER_CLIENT=str(n + 10), MAX_CONNECTIONS=str(n + 100))
        config = uvicorn.Config(
            "server.app:create_app", factory=True, host="127.0.0.1", port=port, loop="none", **connections(),
            limit_concurrency=n + 100, log_config=None, log_level="warning", access_log=False,
        )  # fmt: skip
        server = uvicorn.Server(config)
        serving = asyncio.create_task(server.serve())
        try:
            while not server.started:
                if serving.done():
                    raise SystemExit("the server did not start")
                await asyncio.sleep(0.05)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                r = await client.post("/jobs", json={"type": "demo", "params": {}})
                r.raise_for_status()
                job = r.json()["id"]
            await release(await hold(kind, 10, port, job))  # warm-up: first-use caches are not per connection
            await settled()
            tracemalloc.start()
            before = await settled()
            child = await hold(kind, n, port, job)
            after = await settled()
            await release(child)
        finally:
            tracemalloc.stop()
            server.should_exit = True
            await serving
            redis.stop()
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
    stats = after.filter_traces(ignore).compare_to(before.filter_traces(ignore), "lineno")
    total = sum(s.size_diff for s in stats)
    print(f"{kind}: {total / n:,.0f} bytes of Python objects per idle connection ({n:,} connections)")
    for s in stats[:top]:
        frame = s.traceback[0]
        where = frame.filename.split("site-packages/")[-1].replace(str(ROOT) + "/", "")
        print(f"  {s.size_diff / n:7,.0f} B  {s.count_diff / n:5.1f} objects  {where}:{frame.lineno}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=["ws", "sse"], default="ws")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    raise_fd_limit()
    uvloop.run(measure(args.kind, args.connections, args.top))  # the server's loop, as shipped


if __name__ == "__main__":
    main()
