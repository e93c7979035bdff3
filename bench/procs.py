"""Processes the bench starts (Redis, servers, workers, load-generator agents) and /proc readings.

Every child is started in its own session (so a Ctrl-C reaches only the bench, which then stops
them in order) with a parent-death signal (so none outlives a bench that was SIGKILLed), and is
stopped by its PID: SIGTERM, a bounded wait, then SIGKILL.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1


def _child_setup() -> None:
    """In the child before exec: die with the bench (the fd limit is inherited as raised)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def raise_fd_limit() -> int:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- /proc ----------------------------------------------------------------------------------


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads), in clock ticks; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return 0


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return total - idle, total


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def machine_facts() -> dict[str, Any]:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        pass
    mem = 0
    with open("/proc/meminfo") as f:
        mem = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
    try:
        git = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        git = ""
    if not git and (ROOT / ".bench-commit").exists():  # a `git archive` copy of a commit
        git = (ROOT / ".bench-commit").read_text().strip()
    return {"nproc": os.cpu_count(), "cpu": model, "mem_gib": round(mem / 1048576, 1),
            "kernel": os.uname().release, "python": sys.version.split()[0], "git": git}  # fmt: skip


@dataclass
class Snapshot:
    at: float
    ticks: dict[int, int]
    machine: tuple[int, int]

    @classmethod
    def take(cls, pids: list[int]) -> Snapshot:
        return cls(time.monotonic(), {pid: cpu_ticks(pid) for pid in pids}, machine_ticks())


def cores(a: Snapshot, b: Snapshot, pids: list[int]) -> float:
    """CPU used by ``pids`` between two snapshots, in cores (1.0 = one core busy)."""
    dt = b.at - a.at
    used = sum(b.ticks.get(p, 0) - a.ticks.get(p, 0) for p in pids) / CLK_TCK
    return used / dt if dt > 0 else 0.0


def cpu_seconds(a: Snapshot, b: Snapshot, pids: list[int]) -> float:
    return sum(b.ticks.get(p, 0) - a.ticks.get(p, 0) for p in pids) / CLK_TCK


def machine_cores(a: Snapshot, b: Snapshot) -> float:
    busy = b.machine[0] - a.machine[0]
    total = b.machine[1] - a.machine[1]
    return (os.cpu_count() or 1) * busy / total if total else 0.0


# -- children -------------------------------------------------------------------------------


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: Path
    port: int = 0
    role: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@dataclass
class Children:
    """Everything the bench started, stopped in reverse order by PID."""

    logs: Path
    items: list[Child] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str], env: dict[str, str], role: str, port: int = 0,
              stdin: int | None = subprocess.DEVNULL, stdout: int | None = None) -> Child:  # fmt: skip
        log_path = self.logs / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                argv, env=env, cwd=ROOT, stdin=stdin, stdout=stdout if stdout is not None else log,
                stderr=log, start_new_session=True, preexec_fn=_child_setup,
            )  # fmt: skip
        child = Child(name, proc, log_path, port, role)
        self.items.append(child)
        return child

    def pids(self, role: str | None = None) -> list[int]:
        return [c.pid for c in self.items if (role is None or c.role == role) and c.alive()]

    def stop(self, child: Child, timeout: float = 10.0) -> None:
        if child.alive():
            try:
                os.kill(child.pid, signal.SIGTERM)
                child.proc.wait(timeout)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.kill(child.pid, signal.SIGKILL)
                child.proc.wait(5)
        if child in self.items:
            self.items.remove(child)

    def stop_all(self) -> None:
        for child in reversed(list(self.items)):
            try:
                self.stop(child)
            except Exception as e:  # keep stopping the others
                print(f"bench: could not stop {child.name} (pid {child.pid}): {e}", file=sys.stderr)


# -- agents ---------------------------------------------------------------------------------


class AgentError(RuntimeError):
    pass


class Agent:
    """A ``python -m bench.agent`` child: request/reply over its stdin/stdout pipes."""

    def __init__(self, child: Child) -> None:
        self.child = child
        self.name = child.name
        self._next = 0
        self._waiting: dict[int, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None
        self._stdout = None

    @property
    def pid(self) -> int:
        return self.child.pid

    async def start(self) -> Agent:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 26)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), self.child.proc.stdout)
        self._stdout = reader
        self._reader = asyncio.create_task(self._read())
        await self.call("ping", timeout=20)
        return self

    async def _read(self) -> None:
        while True:
            line = await self._stdout.readline()
            if not line:
                break
            msg = json.loads(line)
            fut = self._waiting.pop(msg.pop("id"), None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        err = AgentError(f"agent {self.name} exited:\n{self.child.log_tail()}")
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(err)
        self._waiting.clear()

    async def call(self, op: str, timeout: float = 120.0, **args: Any) -> dict[str, Any]:
        if self._reader is not None and self._reader.done():
            raise AgentError(f"agent {self.name} is gone:\n{self.child.log_tail()}")
        self._next += 1
        rid = self._next
        fut = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        line = json.dumps({"id": rid, "op": op, **args}, separators=(",", ":")).encode() + b"\n"
        self.child.proc.stdin.write(line)
        self.child.proc.stdin.flush()
        try:
            async with asyncio.timeout(timeout):
                reply = await fut
        except TimeoutError:
            raise AgentError(f"agent {self.name}: {op} did not answer within {timeout} s") from None
        finally:
            self._waiting.pop(rid, None)
        if not reply.pop("ok"):
            raise AgentError(f"agent {self.name}: {op} failed: {reply.get('error')}\n{reply.get('trace', '')}")
        return reply

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        try:
            self.child.proc.stdin.close()
        except OSError:
            pass
