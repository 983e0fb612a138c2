"""Serving the app with uvicorn on a socket bound here, so the real address is known.

The server writes its address to `<home>/http.url` once it listens (as the embedded NATS
writes `nats.url`), which is how `cairn up` learns the port when it asked for any free one,
and removes the file when it stops.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from pathlib import Path

import uvicorn

from cairn.projections.http.app import create_app
from cairn.projections.http.auth import Tokens
from cairn.runtime.settings import DEFAULT_HTTP_HOST, DEFAULT_HTTP_PORT, Settings

log = logging.getLogger("cairn.http")

DEFAULT_HOST = DEFAULT_HTTP_HOST
DEFAULT_PORT = DEFAULT_HTTP_PORT
URL_FILE = "http.url"
# Open event streams never end by themselves: give them this long at shutdown, then close.
GRACEFUL_SHUTDOWN_S = 2


class ServeError(RuntimeError):
    """The server cannot listen where asked; the message says why and what to do."""


def url_file(settings: Settings) -> Path:
    return settings.home / URL_FILE


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ServeError(
                f"port {port} on {host} is in use: stop what listens there or pass another "
                "--port (0 picks a free one)"
            ) from None
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    if host in ("0.0.0.0", "::"):
        shown = "127.0.0.1"
    return f"http://{shown}:{port}"


def serve(
    settings: Settings,
    tokens: Tokens,
    host: str,
    port: int,
    on_listening: Callable[[str], None] | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM; the address is in `<home>/http.url` meanwhile.

    `on_listening(url)` is called once the socket listens, before requests are served.
    """
    sock = bind(host, port)
    url = address(sock)
    config = uvicorn.Config(
        create_app(settings, tokens),
        log_level="info",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        proxy_headers=False,
    )
    server = uvicorn.Server(config)
    path = url_file(settings)
    settings.home.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    partial.write_text(url)
    partial.replace(path)  # whole or absent, for whoever polls for it
    log.info("cairn dashboard and API at %s (tokens from %s)", url, tokens.source)
    if on_listening is not None:
        on_listening(url)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        try:
            if path.read_text().strip() == url:
                path.unlink()
        except OSError:
            pass
