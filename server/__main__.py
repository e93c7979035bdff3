"""``python -m server``: one server process against ``REDIS_URL`` (run several behind a balancer)."""

from __future__ import annotations

import socket

import uvicorn

from core import fastpath
from core.logs import setup_logging
from core.settings import Settings

WS_MAX_MESSAGE = 64 * 1024  # a bigger client frame closes the socket with 1009
BACKLOG = 4096  # connections waiting to be accepted (the kernel caps it at net.core.somaxconn)


def connections() -> dict:
    """How uvicorn serves each connection (bench.memory measures with the same): its httptools
    and websockets-sansio protocols, ours (``core.fastpath.protocols``, holding less per idle
    connection) where the fence allows."""
    lean = fastpath.on("protocols")
    return {
        "http": "core.fastpath.protocols:HttpProtocol" if lean else "httptools",
        "ws": "core.fastpath.protocols:WebSocketProtocol" if lean else "websockets-sansio",
        "ws_max_size": WS_MAX_MESSAGE,
        "ws_per_message_deflate": False,  # no compression: no decompression bombs, less CPU per frame
        "server_header": False,  # no "server: uvicorn" banner on every response
    }


def shared_socket(host: str, port: int) -> socket.socket:
    """A listening socket with ``SO_REUSEPORT``: one per process, the kernel spreads the
    connections of ``host:port`` over the processes that listen on it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def main() -> None:
    settings = Settings.from_env()
    setup_logging(settings.log_level)
    config = uvicorn.Config(
        "server.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        **connections(),
        limit_concurrency=settings.max_connections,
        backlog=BACKLOG,
        timeout_graceful_shutdown=5,
        log_config=None,
        log_level=settings.log_level,
        access_log=False,
    )
    sockets = [shared_socket(settings.host, settings.port)] if settings.reuse_port else None
    uvicorn.Server(config).run(sockets=sockets)


if __name__ == "__main__":
    main()
