"""``python -m server``: one server process against ``REDIS_URL`` (run several behind a balancer)."""

from __future__ import annotations

import uvicorn

from core import fastpath
from core.logs import setup_logging
from core.settings import Settings

WS_MAX_MESSAGE = 64 * 1024  # a bigger client frame closes the socket with 1009


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


def main() -> None:
    settings = Settings.from_env()
    setup_logging(settings.log_level)
    uvicorn.run(
        "server.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        **connections(),
        limit_concurrency=settings.max_connections,
        timeout_graceful_shutdown=5,
        log_config=None,
        log_level=settings.log_level,
        access_log=False,
    )


if __name__ == "__main__":
    main()
