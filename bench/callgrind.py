"""Instructions per request, counted by callgrind: the figure that does not drift with the VM.

``python -m bench.callgrind [--what submit|poll] [--requests 1000] [--warm 300]`` starts an
embedded Redis and ``python -m server`` under ``valgrind --tool=callgrind``, sends ``--warm``
requests, zeroes the counters, sends ``--requests`` more from 8 keep-alive connections, dumps the
counters and prints the server's instructions per request. Needs valgrind (``apt install
valgrind``); the run takes about a minute. CPU time on a shared 2-core VM drifts by ±15% from one
run to the next; this count is the same every time for the same code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from core.devredis import RedisProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
BODY = json.dumps({"type": "demo", "params": {"steps": 1, "interval": 0}}).encode()


def post_job(port: int) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/jobs", data=BODY, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


async def send(port: int, request: bytes, count: int, conns: int = 8) -> None:
    """``count`` requests over ``conns`` keep-alive connections; every answer must be 2xx."""
    left = count

    async def one() -> None:
        nonlocal left
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while left > 0:
            left -= 1
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 2"):
                raise SystemExit(f"unexpected answer: {head[:200]!r}")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
        writer.close()

    await asyncio.gather(*(one() for _ in range(conns)))


def counted(folder: Path) -> int:
    """The instruction total of callgrind's dump in ``folder`` (0 until it is written)."""
    totals = [
        int(line.split()[1])
        for path in folder.glob("callgrind.out*")
        for line in path.read_text().splitlines()
        if line.startswith(("summary:", "totals:"))
    ]
    return max(totals, default=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", choices=["submit", "poll"], default="submit")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warm", type=int, default=300)
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("valgrind is not installed (apt install valgrind)")
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisProcess(Path(tmp) / "redis").start()
        port, out = free_port(), Path(tmp) / "callgrind.out"
        env = {**os.environ, "REDIS_URL": redis.url, "PORT": str(port), "HOST": "127.0.0.1", "LOG_LEVEL": "info",
               "QUEUE_CAP": "0", "RATE_SUBMIT": "100000000", "RATE_POLL": "100000000", "PYTHONPATH": str(ROOT)}  # fmt: skip
        log = open(Path(tmp) / "server.log", "wb")
        server = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no", sys.executable, "-m", "server"],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while True:  # valgrind starts Python about 50 times slower
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
                    break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise SystemExit("the server did not start under valgrind") from None
                    time.sleep(0.5)
            if args.what == "submit":
                request = (b"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY))  # fmt: skip
            else:
                request = b"GET /jobs/%s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % post_job(port)["id"].encode()
            asyncio.run(send(port, request, args.warm))
            # callgrind_control finds the process by a pipe named after $USER and $HOST, and the
            # server's environment has HOST set (its listen address): give it the same
            control = {**os.environ, "HOST": env["HOST"]}
            subprocess.run(["callgrind_control", "-z", str(server.pid)], check=True, capture_output=True, env=control)
            asyncio.run(send(port, request, args.requests))
            subprocess.run(["callgrind_control", "-d", str(server.pid)], check=True, capture_output=True, env=control)
            deadline, total = time.monotonic() + 60, 0
            while not total and time.monotonic() < deadline:  # the dump is written asynchronously
                time.sleep(0.5)
                total = counted(Path(tmp))
        finally:
            server.terminate()  # not SIGKILL: valgrind removes its pipes in /tmp as it exits
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            redis.stop()
    if not total:
        raise SystemExit("callgrind wrote no counts")
    print(f"{args.what}: {total / args.requests:,.0f} instructions per request (server process, {args.requests:,} requests after {args.warm:,})")


if __name__ == "__main__":
    main()
