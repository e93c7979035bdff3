"""TLS everywhere ``REDIS_URL`` says: a real Redis with TLS only, a private CA (trustme), and a
real server and worker that must both use the URL's TLS options. A URL option that is not
supported ends both at start, with a message naming it.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import redis
import trustme

from core import connections
from core.devredis import free_port
from support import Proc, process_env, start_server, start_worker, submit, wait_until, watch_sse

pytestmark = pytest.mark.anyio

PASSWORD = "tls-s3cret"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A private CA, a certificate for the Redis server (127.0.0.1) and one for its clients."""
    folder = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    client_cert = ca.issue_cert("progress-client.example")
    files = {
        "ca": ca.cert_pem,
        "server_cert": server_cert.cert_chain_pems[0],
        "server_key": server_cert.private_key_pem,
        "client_cert": client_cert.cert_chain_pems[0],
        "client_key": client_cert.private_key_pem,
    }
    paths = {}
    for name, blob in files.items():
        paths[name] = folder / f"{name}.pem"
        blob.write_to_path(str(paths[name]))
    return paths


class TlsRedis:
    """Debian's ``redis-server`` (built with TLS) listening on a TLS port only."""

    def __init__(self, folder: Path, pki: dict[str, Path], auth_clients: bool) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("no redis-server on PATH: `make test` installs Debian's (which has TLS)")
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.pki = pki
        args = [
            binary,
            "--bind", "127.0.0.1",
            "--port", "0",
            "--tls-port", str(self.port),
            "--tls-cert-file", str(pki["server_cert"]),
            "--tls-key-file", str(pki["server_key"]),
            "--tls-ca-cert-file", str(pki["ca"]),
            "--tls-auth-clients", "yes" if auth_clients else "no",
            "--requirepass", PASSWORD,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(folder),
            "--logfile", str(folder / "redis.log"),
        ]  # fmt: skip
        self.log = folder / "redis.log"
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def url(self, client_cert: bool = False, **options: str) -> str:
        query = f"ssl_ca_certs={self.pki['ca']}"
        if client_cert:
            query += f"&ssl_certfile={self.pki['client_cert']}&ssl_keyfile={self.pki['client_key']}"
        query += "".join(f"&{name}={value}" for name, value in options.items())
        return f"rediss://:{PASSWORD}@127.0.0.1:{self.port}/0?{query}"

    def wait_ready(self, url: str) -> None:
        client = redis.Redis.from_url(url, socket_timeout=1)

        def answers() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited:\n{self.log.read_text(errors='replace')[-2000:]}")
            try:
                return client.ping()
            except redis.ConnectionError:
                return False

        try:
            wait_until(answers, timeout=10, what=f"redis-server with TLS on port {self.port}")
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def refused(url: str) -> str:
    """The error a plain redis-py client gets from ``url`` ('' if it connects)."""
    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        client.ping()
        return ""
    except redis.ConnectionError as e:
        return str(e)
    finally:
        client.close()


async def run_one_job(url: str, tmp: Path) -> None:
    """A real server and worker on ``url``: a job submitted over HTTP is watched to ``succeeded``."""
    procs: list[Proc] = []
    try:
        procs.append(start_worker(url, tmp, progress_interval=0))
        procs.append(server := start_server(url, tmp))
        async with httpx.AsyncClient(base_url=server.url, timeout=20) as client:
            job = await submit(client, server.url, steps=3, interval=0.05)
            events = await watch_sse(client, server.url + job["links"]["events"])
            assert events[-1].event == "succeeded", [(e.event, e.data) for e in events]
            assert [e.doc["progress"] for e in events if e.doc["status"] == "running"][-1] == 100
            result = await client.get(job["links"]["result"])
            assert result.status_code == 200 and result.json() == {"steps": 3}, result.text
    finally:
        for proc in procs:
            proc.stop()


@pytest.mark.slow
async def test_private_ca(pki, tmp_path):
    """``ssl_ca_certs`` reaches the server's clients and the worker's alike."""
    tls = TlsRedis(tmp_path / "redis", pki, auth_clients=False)
    try:
        tls.wait_ready(tls.url())
        no_ca = tls.url().partition("?")[0]
        assert "CERTIFICATE_VERIFY_FAILED" in refused(no_ca)  # the CA is what makes it work
        await run_one_job(tls.url(), tmp_path)
    finally:
        tls.stop()


@pytest.mark.slow
async def test_mutual_tls(pki, tmp_path):
    """A Redis that asks clients for a certificate: ``ssl_certfile`` + ``ssl_keyfile`` too."""
    tls = TlsRedis(tmp_path / "redis", pki, auth_clients=True)
    try:
        tls.wait_ready(tls.url(client_cert=True))
        assert refused(tls.url())  # no client certificate: refused, so it really is mutual TLS
        await run_one_job(tls.url(client_cert=True), tmp_path)
    finally:
        tls.stop()


@pytest.mark.slow
def test_an_option_the_worker_cannot_honour_ends_it_at_start(pki, tmp_path):
    """``socket_timeout`` is a redis-py URL option but not one of ``QUERY_OPTIONS``: the worker and
    the server refuse to start rather than ignore it."""
    tls = TlsRedis(tmp_path / "redis", pki, auth_clients=False)
    procs: list[Proc] = []
    try:
        url = tls.url(socket_timeout="5")
        tls.wait_ready(url)  # redis-py itself takes the URL as it is
        for module in ("worker", "server"):
            proc = Proc(module, process_env(url, port=free_port()), tmp_path / f"{module}.log").start()
            procs.append(proc)
            started = time.monotonic()
            assert proc.proc.wait(20) == 1, proc.log()
            assert time.monotonic() - started < 15
            log = proc.log()
            assert "REDIS_URL: option 'socket_timeout' is not supported" in log, log
            assert "Traceback" not in log, log  # a message, not a crash
    finally:
        for proc in procs:
            proc.stop()
        tls.stop()


@pytest.mark.parametrize(
    "url, message",
    [
        ("rediss://127.0.0.1:1/0?socket_timeout=5", "option 'socket_timeout' is not supported"),
        ("rediss://127.0.0.1:1/0?ssl_ca_certs=/no/such/ca.pem", "ssl_ca_certs: no such file '/no/such/ca.pem'"),
        ("rediss://127.0.0.1:1/0?ssl_cert_reqs=maybe", "ssl_cert_reqs='maybe'"),
        ("rediss://127.0.0.1:1/0?ssl_cert_reqs=none&ssl_check_hostname=true", "do not load"),
        ("redis://127.0.0.1:1/0?ssl_cert_reqs=none", "ssl_cert_reqs needs TLS: a rediss:// URL"),
        ("rediss+sentinel://127.0.0.1:1/m?ssl_cert_reqs=none", "a sentinel URL takes no options"),
        ("unix://?db=1", "a unix:// URL needs the socket's path"),
    ],
)
def test_bad_tls_options_fail_at_start(url, message):
    """What ``create_app`` (``sentinel_target``) and the worker (``connections.parse``) check at start."""
    with pytest.raises(ValueError, match="REDIS_URL: .*") as error:
        connections.sentinel_target(url)
    assert message in str(error.value)


def test_key_and_certificate_must_both_load(pki):
    ca, cert, key = pki["ca"], pki["client_cert"], pki["client_key"]
    with pytest.raises(ValueError, match="ssl_certfile and ssl_keyfile go together"):
        connections.parse(f"rediss://127.0.0.1:1/0?ssl_ca_certs={ca}&ssl_certfile={cert}")
    with pytest.raises(ValueError, match="do not load"):  # the CA's certificate is not the key's
        connections.parse(f"rediss://127.0.0.1:1/0?ssl_ca_certs={ca}&ssl_certfile={ca}&ssl_keyfile={key}")
    url = f"rediss://:pw@127.0.0.1:1/2?ssl_ca_certs={ca}&ssl_certfile={cert}&ssl_keyfile={key}"
    options = connections.parse(url).options
    tls = (options["ssl"], options["ssl_ca_certs"], options["ssl_certfile"], options["ssl_keyfile"])
    assert tls == (True, str(ca), str(cert), str(key))
    assert (options["password"], options["db"]) == ("pw", 2)
