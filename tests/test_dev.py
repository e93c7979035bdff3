"""``make run`` (``python -m server.dev``): one run per data folder, no orphans after a ``kill -9``,
and a quiet Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from core.devredis import free_port
from support import Proc, wait_until


def dev_env(data: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "REDIS_URL"))}
    env.update({"DATA_DIR": str(data), "PORT": str(port), "HOST": "127.0.0.1", "PYTHONUNBUFFERED": "1"})
    return env


def answers(run: Proc) -> bool:
    return answers_url(run.url)


def answers_url(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def start_dev(data: Path, tmp: Path, runs: list[Proc]) -> Proc:
    """Start ``make run`` on ``data`` and a free port; return once its server answers."""
    port = free_port()
    run = Proc("server.dev", dev_env(data, port), tmp / f"dev-{port}.log", port=port).start()
    runs.append(run)

    def up() -> bool:
        assert run.alive(), f"make run exited:\n{run.log()[-3000:]}"
        return answers(run)

    wait_until(up, timeout=30, what="make run to serve")
    return run


def children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie that nobody has reaped (it runs nothing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


def test_one_make_run_per_data_folder_and_no_orphans(tmp_path):
    data = tmp_path / "data"
    runs: list[Proc] = []
    spawned: list[int] = []  # the runs' children, to stop by pid if a run cannot
    try:
        first = start_dev(data, tmp_path, runs)
        spawned += children(first.pid)
        assert len(spawned) == 3, f"Redis, worker and server expected: {spawned}"
        redis_pid = next(pid for pid in spawned if "-server" in Path(f"/proc/{pid}/comm").read_text())

        second = Proc("server.dev", dev_env(data, free_port()), tmp_path / "dev-second.log").start()
        runs.append(second)
        try:
            status = second.proc.wait(10)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"a second make run on the same folder did not exit:\n{second.log()}") from None
        output = second.log()
        assert status != 0, output
        assert f"{data} is in use by another make run (pid {first.pid}, since " in output, output
        assert "embedded Redis" not in output  # it started nothing
        assert answers(first)

        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)

        def stopped() -> bool:
            return all(gone(pid) for pid in spawned) and not answers(first)

        wait_until(stopped, timeout=30, what="the killed run's children (Redis, worker, server) to exit")
        assert gone(redis_pid)

        third = start_dev(data, tmp_path, runs)
        spawned += children(third.pid)
        with httpx.Client(base_url=third.url, timeout=10) as client:
            r = client.post("/jobs", json={"type": "demo", "params": {"steps": 2, "interval": 0.01}})
            assert r.status_code == 202, r.text
            status_url = r.json()["links"]["self"]

            def succeeded() -> bool:
                return client.get(status_url).json()["status"] == "succeeded"

            wait_until(succeeded, timeout=30, what="the job to succeed")
    finally:
        for run in runs:
            run.stop()
        for pid in spawned:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_ctrl_c_stops_everything_without_a_warning(tmp_path):
    """A terminal's Ctrl-C sends SIGINT to its whole foreground process group: Redis must not get
    it with the others, or the server and worker log a lost connection on every normal stop."""
    port = free_port()
    log = (tmp_path / "dev.log").open("wb")
    run = subprocess.Popen([sys.executable, "-m", "server.dev"], env=dev_env(tmp_path / "data", port),
                           stdout=log, stderr=subprocess.STDOUT, process_group=0)  # as a shell job
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: answers_url(url), timeout=30, what="make run to serve")
        spawned = children(run.pid)
        assert len(spawned) == 3, spawned
        os.killpg(run.pid, signal.SIGINT)  # Ctrl-C
        assert run.wait(30) == 0
        wait_until(lambda: all(gone(pid) for pid in spawned), timeout=30, what="Redis, worker and server to exit")
    finally:
        if run.poll() is None:
            run.kill()
        log.close()
    output = (tmp_path / "dev.log").read_text()
    assert "Shutting down" in output and "worker stopping on SIGTERM" in output, output[-3000:]
    warnings = [line for line in output.splitlines() if '"WARNING"' in line and "no API_KEYS set" not in line]
    assert warnings == [], warnings
