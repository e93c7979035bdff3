"""The terminal client (``progress`` / ``python -m client``) as a real subprocess against a live
server: outputs, exit codes (0 succeeded, 1 failed, 2 cancelled, 3 problem, 4 not found), JSON
lines, the bar on a terminal, and a watch that outlives a SIGKILLed and restarted server."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import httpx

from core.devredis import RedisProcess, free_port
from support import ROOT, process_env, start_server, wait_until

PROGRESS = Path(sys.executable).parent / "progress"  # the console script (pip install -e .)
ENV = {k: v for k, v in os.environ.items() if not k.startswith("PROGRESS_")}


def command(base: str, args: tuple[str, ...], script: bool = False) -> list[str]:
    program = [str(PROGRESS)] if script else [sys.executable, "-m", "client"]
    return [*program, "--url", base, *args]


def progress(base: str, *args: str, script: bool = False, timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = command(base, args, script)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def assert_rising(docs: list[dict], final: str) -> None:
    seqs = [d["seq"] for d in docs]
    assert seqs == sorted(set(seqs)), f"seq repeated or went back: {seqs}"
    assert [d["status"] for d in docs].count(final) == 1 and docs[-1]["status"] == final, [d["status"] for d in docs]


class Reader:
    """A running ``progress`` whose stdout lines are collected as they come."""

    def __init__(self, cmd: list[str]) -> None:
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
        self.lines: list[str] = []
        self.stderr = ""
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def docs(self) -> list[dict]:
        return [json.loads(line) for line in list(self.lines)]

    def finish(self, timeout: float = 60) -> int:
        """Its exit code, once it ends (killed after ``timeout``); ``stderr`` then holds its notes."""
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
            self.thread.join(5)
            if not self.proc.stderr.closed:
                self.stderr = self.proc.stderr.read()
                self.proc.stderr.close()
                self.proc.stdout.close()


# -- the session server ------------------------------------------------------------------


def test_submit_watch_prints_the_result_and_exits_0(base):
    r = progress(base, "submit", "demo", "--param", "steps=3", "-p", "interval=0.05", "--watch", script=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"steps": 3}  # stdout: the result alone (the updates go to stderr)
    assert r.stderr.splitlines()[-1].startswith("succeeded  100%"), r.stderr


def test_json_lines_have_strictly_rising_seqs(base):
    r = progress(base, "--json", "submit", "demo", "--params", '{"steps": 5, "interval": 0.02}', "--watch")
    assert r.returncode == 0, r.stderr
    docs = json_lines(r.stdout)
    assert docs[0]["status"] == "queued" and "token" in docs[0]
    assert_rising(docs, "succeeded")
    assert r.stderr == ""


def test_failed_job_exits_1_and_retry_runs_it_again(base):
    r = progress(base, "submit", "demo", "-p", "steps=3", "-p", "interval=0.02", "-p", "fail_at_step=2", "--watch")
    assert r.returncode == 1, r.stderr
    assert r.stdout == "" and "DemoFailure: failed at step 2 of 3" in r.stderr
    job_id = r.stderr.splitlines()[0]

    r = progress(base, "result", job_id)
    assert r.returncode == 1 and "409" in r.stderr and "failed" in r.stderr

    r = progress(base, "--json", "retry", job_id, "--watch")
    assert r.returncode == 1, r.stderr
    docs = json_lines(r.stdout)
    assert docs[0]["status"] == "queued" and docs[0]["id"] == job_id
    assert_rising(docs, "failed")
    assert docs[-1]["attempt"] == 2

    r = progress(base, "retry", job_id)  # without --watch: the id, at once
    assert r.returncode == 0 and r.stdout.strip() == job_id
    assert progress(base, "watch", job_id).returncode == 1


def test_cancel_and_a_watch_of_the_cancelled_job_exits_2(base):
    job_id = progress(base, "submit", "demo", "-p", "steps=300", "-p", "interval=0.1").stdout.strip()
    watcher = Reader(command(base, ("watch", job_id, "--json")))
    try:
        wait_until(lambda: any(d["status"] == "running" for d in watcher.docs()), timeout=20, what="the job running")
        r = progress(base, "cancel", job_id)
        assert r.returncode == 0 and r.stdout.startswith(job_id), r.stderr
        assert watcher.finish() == 2, watcher.stderr
    finally:
        watcher.finish()
    assert_rising(watcher.docs(), "cancelled")
    assert progress(base, "watch", job_id).returncode == 2  # a finished job: its final document at once
    assert progress(base, "result", job_id).returncode == 2
    r = progress(base, "cancel", job_id)  # already finished: 409
    assert r.returncode == 3 and "409" in r.stderr


def test_logs_prints_the_lines_and_follow_goes_on_until_the_job_ends(base):
    job_id = progress(base, "submit", "chatty", "-p", "lines=1500", "-p", "every=100", "-p", "pause=0.05").stdout.strip()
    follow = Reader(command(base, ("--json", "logs", job_id, "-f")))
    assert follow.finish(60) == 0, follow.stderr
    lines = follow.docs()
    assert [line["seq"] for line in lines] == list(range(lines[0]["seq"], lines[-1]["seq"] + 1))  # none missing, none twice
    assert lines[-1]["msg"].startswith("succeeded in ") and lines[-2]["msg"] == "line 1500"
    plain = progress(base, "logs", job_id, "--after", str(lines[-1]["seq"] - 2))
    assert plain.returncode == 0 and plain.stdout.splitlines()[0].endswith("INFO    line 1500"), plain.stdout
    assert "earlier lines are no longer kept" in progress(base, "logs", job_id).stderr  # 1,502 lines, 1,000 kept


def test_status_result_and_list(base):
    job_id = progress(base, "submit", "demo", "-p", "steps=2", "-p", "interval=0.01").stdout.strip()
    assert progress(base, "--quiet", "watch", job_id).returncode == 0

    r = progress(base, "status", job_id)
    assert r.returncode == 0 and r.stdout.split()[:4] == [job_id, "demo", "succeeded", "100%"]
    (doc,) = json_lines(progress(base, "status", job_id, "--json").stdout)
    assert doc["id"] == job_id and doc["status"] == "succeeded"
    assert json.loads(progress(base, "result", job_id).stdout) == {"steps": 2}

    r = progress(base, "list", "--type", "demo", "--status", "succeeded", "--limit", "3", "--json")
    listed = json_lines(r.stdout)
    assert r.returncode == 0 and 1 <= len(listed) <= 3 and listed[0]["id"] == job_id  # newest first
    assert all(d["type"] == "demo" and d["status"] == "succeeded" for d in listed)
    r = progress(base, "list", "--limit", "1")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 1

    r = progress(base, "types")
    assert r.returncode == 0 and "demo(steps, interval, fail_at_step)" in r.stdout


def test_bad_input_exits_3_with_the_problem_on_stderr(base):
    r = progress(base, "submit", "no_such_type")
    assert r.returncode == 3 and r.stdout == ""
    assert "422" in r.stderr and "type: must be one of" in r.stderr
    r = progress(base, "submit", "demo", "-p", "steps=0", "--json")
    problem = json.loads(r.stderr)
    assert r.returncode == 3 and problem["status"] == 422 and problem["errors"][0]["field"] == "params.steps"

    assert progress(base, "submit", "demo", "--params", "[1]").returncode == 3
    assert progress(base, "no_such_command").returncode == 3  # not argparse's 2, which means cancelled
    r = progress(base, "status", "j_missing")
    assert r.returncode == 4 and "404" in r.stderr
    r = progress(f"http://127.0.0.1:{free_port()}", "status", "j_x")
    assert r.returncode == 3 and "no answer" in r.stderr


def test_the_bar_on_a_terminal(base):
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    cmd = command(base, ("submit", "demo", "-p", "steps=4", "-p", "interval=0.2", "--watch"))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=terminal, env=ENV, cwd=ROOT)
    os.close(terminal)
    try:
        screen = _screen(controller)
        assert proc.wait(30) == 0
        assert json.loads(proc.stdout.read()) == {"steps": 4}
    finally:
        os.close(controller)
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        proc.stdout.close()
    text = screen.decode()
    assert " 50%|" in text and "running  step 2 of 4" in text and "\r" in text  # the bar, redrawn in place
    assert text.splitlines()[-1].startswith("succeeded  100%")


def _screen(fd: int, timeout: float = 30) -> bytes:
    """What was written to the terminal whose controlling side is ``fd``, until it is closed."""
    out, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 0.2)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the program ended, its end of the terminal is closed
                break
            if not chunk:
                break
            out += chunk
    return out


# -- a server of its own ------------------------------------------------------------------


def test_watch_resumes_across_a_killed_and_restarted_server(redis_server, worker, tmp_path):
    server = start_server(redis_server.url, tmp_path)
    watcher = None
    try:
        job_id = progress(server.url, "submit", "long", "-p", "seconds=5").stdout.strip()
        watcher = Reader(command(server.url, ("--json", "watch", job_id)))
        wait_until(lambda: any(d["message"] == "tick 5" for d in watcher.docs()), timeout=20, what="tick 5")
        server.stop(signal.SIGKILL)
        seen_before = len(watcher.docs())
        server = start_server(redis_server.url, tmp_path, port=server.port)
        assert watcher.finish(timeout=60) == 0, watcher.stderr
    finally:
        if watcher is not None:
            watcher.finish()
        server.stop()
    docs = watcher.docs()
    assert docs[seen_before - 1]["status"] == "running" and len(docs) > seen_before
    assert_rising(docs, "succeeded")


def test_the_console_scripts_run_server_worker_and_client(tmp_path):
    redis_server = RedisProcess(tmp_path / "redis").start()  # its own: the worker joins no other test's
    port = free_port()
    env = process_env(redis_server.url, host="127.0.0.1", port=port)
    procs = []
    try:
        for name in ("progress-worker", "progress-server"):
            log = open(tmp_path / f"{name}.log", "wb")
            procs.append(subprocess.Popen([str(PROGRESS.parent / name)], env=env, cwd=ROOT, stdout=log, stderr=log))
            log.close()
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: procs[0].pid in _worker_pids(url), timeout=30, what="the server listing the worker")
        r = progress(url, "submit", "demo", "-p", "steps=2", "-p", "interval=0", "--watch", script=True)
        assert r.returncode == 0 and json.loads(r.stdout) == {"steps": 2}, r.stderr
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        redis_server.stop()
    logs = [(tmp_path / f"{name}.log").read_text() for name in ("progress-worker", "progress-server")]
    assert all(proc.returncode in (0, -signal.SIGTERM) for proc in procs), logs  # uvicorn re-raises SIGTERM


def _worker_pids(url: str) -> list[int]:
    try:
        return [w["pid"] for w in httpx.get(url + "/workers", timeout=1).json()["items"]]
    except (httpx.HTTPError, ValueError):
        return []
