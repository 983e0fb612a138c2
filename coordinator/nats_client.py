"""Connecting to NATS with clear errors, and declaring cairn's streams idempotently."""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urlparse

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StreamConfig
from nats.js.errors import BadRequestError

from cairn.events import stream_configs

log = logging.getLogger("cairn.nats")


class NatsUnavailableError(RuntimeError):
    """NATS cannot be reached; the message names the URL and how to start a server."""


def unreachable_message(url: str | None) -> str:
    if not url:
        return (
            "no NATS server is configured: start the embedded one with `cairn up` "
            "(or run `cairn demo`), or set NATS_URL to your server's URL"
        )
    return (
        f"cannot reach NATS at {url}: start it (`cairn up` runs an embedded server) "
        "or point NATS_URL at a running server with JetStream enabled"
    )


async def _reachable(url: str, timeout: float = 2.0) -> bool:
    """Whether any server of a (comma-separated) NATS URL accepts a TCP connection."""
    for server in url.split(","):
        parsed = urlparse(server.strip() if "://" in server else f"nats://{server.strip()}")
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(parsed.hostname or "127.0.0.1", parsed.port or 4222),
                timeout,
            )
        except (OSError, TimeoutError):
            continue
        writer.close()
        return True
    return False


async def connect(url: str | None, name: str, *, reconnect: bool = True) -> Client:
    """Connect to NATS, reconnecting forever once connected (servers restart).

    nats-py would also retry the *first* connection forever; a server that is not there at
    start is reported at once instead.
    """
    if not url or not await _reachable(url):
        raise NatsUnavailableError(unreachable_message(url))

    async def on_error(exc: Exception) -> None:
        log.warning("NATS error: %s", exc)

    async def on_disconnected() -> None:
        log.debug("disconnected from NATS at %s", url)

    async def on_reconnected() -> None:
        log.info("reconnected to NATS at %s", url)

    try:
        return await nats.connect(
            url,
            name=name,
            connect_timeout=2,
            allow_reconnect=reconnect,
            max_reconnect_attempts=-1 if reconnect else 1,
            reconnect_time_wait=0.25,
            error_cb=on_error,
            disconnected_cb=on_disconnected,
            reconnected_cb=on_reconnected,
        )
    except Exception as exc:  # nats raises several unrelated types for "no server"
        raise NatsUnavailableError(unreachable_message(url)) from exc


async def declare_streams(js: JetStreamContext) -> None:
    """Create cairn's streams, or bring an existing one's settings up to date."""
    for spec in stream_configs():
        params: dict[str, Any] = dict(spec)
        params["retention"] = RetentionPolicy(params["retention"])
        config = StreamConfig(**params)
        try:
            await js.add_stream(config)
        except BadRequestError:
            await js.update_stream(config)
