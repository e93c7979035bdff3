"""``make run``: the whole system on one machine, no configuration.

Starts an embedded Redis-compatible server (unless ``REDIS_URL`` is set) with AOF in
``DATA_DIR`` (default ``./data``), one worker (``python -m worker``) and one server
(``python -m server``), and stops them all on Ctrl-C or SIGTERM.

One run per data folder: before starting anything the run takes an exclusive ``flock`` on
``DATA_DIR/make-run.lock`` and writes its pid and start time in it; a second run on that folder
exits at once, naming that pid (two Redis servers appending to one AOF corrupt it). The kernel
drops the lock when its holders die, so a killed run leaves no stale lock; the Redis server
inherits the lock's descriptor, so the folder stays locked while the process writing it lives.
On Linux each child gets ``PR_SET_PDEATHSIG``, so a ``kill -9`` of this process stops them too
(with SIGTERM, as Ctrl-C would: Redis flushes the AOF, the worker re-queues its running jobs)
instead of leaving orphans.
Each child runs in a process group of its own, so a terminal's Ctrl-C (SIGINT to the foreground
group) reaches only this process, which stops the server and the worker first and Redis last:
nothing logs a lost Redis connection on a normal stop.
With ``REDIS_URL`` set the folder is neither used nor locked.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from core.devredis import RedisProcess
from core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
LOCK_FILE = "make-run.lock"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def data_dir(env: dict[str, str]) -> Path:
    return Path(env.get("DATA_DIR") or ROOT / "data").absolute()


def shown(folder: Path) -> str:
    """``./data`` for a folder under the current directory, else the absolute path."""
    try:
        return f"./{folder.relative_to(Path.cwd())}"
    except ValueError:
        return str(folder)


def lock(folder: Path) -> int:
    """Lock ``folder`` for this run (the lock lives as long as the returned descriptor, in this
    process or a child it is passed to), or exit naming the run that holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "pid unknown"
        advice = "stop it first, or set DATA_DIR to another folder"
        raise SystemExit(f"{shown(folder)} is in use by another make run ({holder}): {advice}") from None
    record = f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode()
    os.pwrite(fd, record, 0)
    os.ftruncate(fd, len(record))
    return fd


def die_with_parent(sig: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send the child ``sig`` when this process dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, sig)
        if os.getppid() != parent:  # this process died before the prctl: nobody will signal
            os._exit(1)

    return preexec


def main() -> None:
    env = dict(os.environ)
    redis = None
    if not env.get("REDIS_URL"):
        data = data_dir(env)
        held = lock(data)
        redis = RedisProcess(data).start(pass_fds=(held,), preexec_fn=die_with_parent(signal.SIGTERM), process_group=0)
        env["REDIS_URL"] = redis.url
        print(f"embedded Redis on {redis.url} (AOF in {data})", flush=True)
    settings = Settings.from_env(env)
    children = [
        subprocess.Popen([sys.executable, "-m", name], env=env, preexec_fn=die_with_parent(signal.SIGTERM), process_group=0)
        for name in ("worker", "server")
    ]
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
