"""Summaries of py-spy collapsed stacks (``py-spy record --format raw``): where the CPU goes.

``python -m bench.flame bench/results/profile-*.txt`` prints, per file, the share of samples by
the task or callback at the bottom of the stack (what the event loop was running), by function
(self time), and by a few inclusive groups that matter for the delivery path.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# inclusive groups: label -> (regex on the file, function names or None for any)
GROUPS = {
    "hub reader: redis-py get_message/parse": ("redis/asyncio/client.py", {"get_message", "parse_response", "handle_message"}),
    "hub._read dispatch (Event + Mailbox.put)": ("server/hub.py", {"_read"}),
    "Mailbox.put (+ waking the writer)": ("server/events.py", {"put"}),
    "WS Connection.write_loop": ("server/ws.py", {"write_loop"}),
    "WS Connection.send (lock+timeout+send_text)": ("server/ws.py", {"send"}),
    "asyncio.timeout (enter/exit)": ("asyncio/timeouts.py", None),
    "asyncio.Lock": ("asyncio/locks.py", None),
    "starlette WebSocket.send_text/send": ("starlette/websockets.py", None),
    "uvicorn websockets-sansio send": ("websockets_sansio_impl.py", {"send"}),
    "uvicorn websockets (legacy) send": ("uvicorn/protocols/websockets/websockets_impl.py", {"send"}),
    "uvicorn wsproto send": ("wsproto_impl.py", {"send"}),
    "websockets library framing (send_text/data_to_send)": ("^websockets/", None),
    "SSE frames() generator": ("server/sse.py", {"sse_frames"}),
    "sse-starlette _stream_response": ("sse_starlette/sse.py", {"_stream_response"}),
    "sse-starlette _send_with_timeout": ("sse_starlette/sse.py", {"_send_with_timeout"}),
    "anyio CancelScope / move_on_after": ("anyio/_backends/_asyncio.py", {"__enter__", "__exit__", "move_on_after", "__init__", "_deliver_cancellation"}),
    "uvicorn httptools send": ("httptools_impl.py", {"send"}),
    "json": ("^json/", None),
    "logging": ("^logging/", None),
    "redis-py command round trips (execute_command)": ("redis/asyncio/client.py", {"execute_command", "_send_command_parse_response"}),
    "redis-py pipelines": ("redis/asyncio/client.py", {"execute", "_execute_pipeline", "_execute_transaction"}),
    "Lua script calls (Script.__call__)": ("redis/commands/core.py", {"__call__"}),
    "pydantic validation": ("pydantic/", None),
    "starlette middleware stack": ("starlette/middleware/", None),
    "prometheus metrics": ("prometheus", None),
    "server/auth.py": ("server/auth.py", None),
    "server/ratelimit.py": ("server/ratelimit.py", None),
    "server/middleware.py": ("server/middleware.py", None),
    "server/metrics.py": ("server/metrics.py", None),
}


def parse(path: Path) -> list[tuple[list[tuple[str, str]], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = []
        for raw in stack.split(";"):
            m = FRAME.match(raw)
            if m:
                frames.append((m["func"], m["file"], int(m["line"] or 0)))
            elif not raw.startswith(("process ", "thread ")):
                frames.append((raw, "", 0))
        stacks.append((frames, int(count)))
    return stacks


def source_line(file: str, line: int) -> str:
    """The text of ``file:line`` (py-spy shortens paths: look under sys.path and the repo)."""
    import linecache

    for base in ["", str(Path(__file__).resolve().parent.parent), *sys.path]:
        path = Path(base) / file if base else Path(file)
        if path.is_file():
            return linecache.getline(str(path), line)
    return ""


def short(file: str) -> str:
    for marker in ("site-packages/", "/lib/python3", "/work/main/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return file.split("/", 1)[1] if file.startswith("11/") else file


def summarize(path: Path, top: int = 15) -> str:
    stacks = parse(Path(path))
    total = sum(c for _, c in stacks) or 1
    roots: Counter = Counter()
    selfs: Counter = Counter()
    groups: Counter = Counter()
    writes = 0
    for frames, count in stacks:
        if not frames:
            continue
        # what the event loop was running: the frame just above the loop's own run frame
        at = next((i for i, f in enumerate(frames) if f[0] in ("Runner.run", "run_until_complete", "BaseEventLoop.run_forever",
                                                              "BaseEventLoop._run_once", "Handle._run")), None)  # fmt: skip
        if at is None or at + 1 >= len(frames):
            task = ("event loop itself (uvloop: epoll, socket reads/writes, callbacks)", "")
        else:
            task = frames[at + 1]
        roots[f"{task[0]} ({short(task[1])})" if task[1] else task[0]] += count
        func, file, line = frames[-1]
        selfs[f"{func} ({short(file)})"] += count
        if "transport.write" in source_line(file, line) or "transport.writelines" in source_line(file, line):
            writes += count
        hit = set()
        for f, fl, _ in frames:
            for label, (sub, funcs) in GROUPS.items():
                if label not in hit and re.search(sub, fl) and (funcs is None or f in funcs):
                    hit.add(label)
        for label in hit:
            groups[label] += count
    lines = [f"  profile {Path(path).name}: {total} samples (CPU-active only)"]
    lines.append("    by task/callback at the bottom of the stack:")
    lines += [f"      {100 * c / total:5.1f}%  {name}" for name, c in roots.most_common(8)]
    lines.append(f"    socket writes (a transport.write line on top: the send syscall, incl. the kernel's loopback delivery): {100 * writes / total:.1f}%")
    lines.append("    inclusive groups:")
    lines += [f"      {100 * c / total:5.1f}%  {name}" for name, c in groups.most_common() if c / total >= 0.005]
    lines.append("    self time (a frame's own time; native calls it makes, such as transport.write, count here):")
    lines += [f"      {100 * c / total:5.1f}%  {name}" for name, c in selfs.most_common(top)]
    return "\n".join(lines)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(summarize(Path(arg)))
