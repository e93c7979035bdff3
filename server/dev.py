"""``make run``: the whole system on one machine, no configuration.

Starts an embedded Redis-compatible server (unless ``REDIS_URL`` is set) with AOF in
``./data``, one worker (``python -m worker``) and one server (``python -m server``), and
stops them all on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from server.devredis import RedisProcess
from server.settings import Settings

DATA = Path(__file__).resolve().parent.parent / "data"


def main() -> None:
    env = dict(os.environ)
    redis = None
    if not env.get("REDIS_URL"):
        redis = RedisProcess(DATA).start()
        env["REDIS_URL"] = redis.url
        print(f"embedded Redis on {redis.url} (AOF in {DATA})", flush=True)
    settings = Settings.from_env(env)
    children = [subprocess.Popen([sys.executable, "-m", name], env=env) for name in ("worker", "server")]
    print(f"progress server on http://{settings.host}:{settings.port}/  (Ctrl-C stops everything)", flush=True)
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while not stopping and all(child.poll() is None for child in children):
            time.sleep(0.2)
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
        if redis is not None:
            redis.stop()
    sys.exit(0 if stopping else 1)


if __name__ == "__main__":
    main()
