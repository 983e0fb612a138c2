"""Waiting at start for what a process needs: NATS, and a database server for the store and
the views.

A coordinator, agent or projection runner started before NATS (or PostgreSQL) is up, as
compose and systemd start them, waits with a growing pause between attempts and says so in
one line, up to `Settings.start_timeout` (0: no limit); then it gives up with the sentence it
would have said at once. What waiting cannot fix is reported at once: credentials NATS
refuses, a failed TLS handshake, a SQLite file that cannot be opened, a database server that
answers but refuses.

Imports nothing of the event log: the agent SDK uses it too.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlparse

from nats.aio.client import Client

from cairn.runtime.connection import NatsAuthError, NatsUnavailableError, connect, display_url
from cairn.runtime.roles import NatsEndpoint

T = TypeVar("T")
FIRST_PAUSE = 0.1
LONGEST_PAUSE = 2.0
# While waiting, the line is said again this often, so a log shows the process is not stuck.
REMIND_EVERY = 30.0


class Patience:
    """The pauses between attempts (0.1 s doubling to 2 s) and the limit (`timeout` seconds
    from now; 0: none)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.started = time.monotonic()
        self.pause = FIRST_PAUSE
        self.told_at: float | None = None

    def limit(self) -> str:
        return f"{self.timeout:g} s" if self.timeout > 0 else "no limit"

    def expired(self) -> bool:
        return self.timeout > 0 and time.monotonic() - self.started >= self.timeout

    def line(self, what: str) -> str | None:
        """`waiting for WHAT; giving up after ...` on the first wait, the same with how long
        so far every REMIND_EVERY seconds after, else None."""
        now = time.monotonic()
        if self.told_at is not None and now - self.told_at < REMIND_EVERY:
            return None
        still = "" if self.told_at is None else f"still (for {now - self.started:.0f} s) "
        self.told_at = now
        return f"{still}waiting for {what}; giving up after {self.limit()} (CAIRN_START_TIMEOUT)"

    def next_pause(self) -> float:
        pause = self.pause
        if self.timeout > 0:  # never sleep past the limit
            pause = min(pause, max(0.0, self.started + self.timeout - time.monotonic()))
        self.pause = min(self.pause * 2, LONGEST_PAUSE)
        return pause


def nats_wanted(url: str | None) -> str:
    if not url:
        return (
            "NATS: none is configured yet (set NATS_URL, or start `cairn up`, which records "
            "its server's URL in the data directory)"
        )
    return f"NATS at {display_url(url)}: it does not accept connections yet"


async def connect_when_up(
    endpoint: Callable[[], NatsEndpoint],
    name: str,
    timeout: float,
    say: Callable[[str], object],
    *,
    reconnect: bool = True,
) -> Client:
    """Connect to NATS (`runtime.connection.connect`), waiting while it cannot be reached.

    `endpoint` is asked again before each attempt (the embedded server's URL file may appear
    meanwhile); `say` gets the waiting line. Refused credentials or TLS raise NatsAuthError
    at once; a server still unreachable after `timeout` seconds (0: never give up) raises
    NatsUnavailableError with the sentence `connect` gives.
    """
    patience = Patience(timeout)
    while True:
        target = endpoint()
        try:
            return await connect(target, name, reconnect=reconnect)
        except NatsAuthError:
            raise
        except NatsUnavailableError:
            if patience.expired():
                raise
        if line := patience.line(nats_wanted(target.url)):
            say(line)
        await asyncio.sleep(patience.next_pause())


def server_address(url: str) -> tuple[str, int] | None:
    """The host and port of a PostgreSQL DSN; None for anything else (a SQLite file)."""
    if not url.startswith(("postgresql://", "postgres://")):
        return None
    parsed = urlparse(url)
    return parsed.hostname or "127.0.0.1", parsed.port or 5432


def accepts_connections(address: tuple[str, int], timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection(address, timeout=timeout):
            return True
    except OSError:
        return False


def open_when_up(
    open_it: Callable[[], T], urls: list[str], timeout: float, say: Callable[[str], object]
) -> T:
    """`open_it()` once every database server of `urls` accepts connections (a SQLite file
    needs none), waiting for them up to `timeout` seconds (0: no limit); then `open_it()`
    anyway, so what it raises is the sentence the process would have said at once."""
    patience = Patience(timeout)
    while True:
        down = [
            address
            for url in urls
            if (address := server_address(url)) is not None
            if not accepts_connections(address)
        ]
        if not down or patience.expired():
            return open_it()
        host, port = down[0]
        if line := patience.line(
            f"the database server at {host}:{port}: it does not accept connections yet"
        ):
            say(line)
        time.sleep(patience.next_pause())
