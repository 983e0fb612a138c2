"""Connecting to NATS with clear errors (cairn's streams are in `streams.py`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import Any
from urllib.parse import unquote, urlparse

from nats.aio.client import Client
from nats.errors import AuthorizationError

from cairn.runtime.roles import NatsCredentialsError, NatsEndpoint, inbox_prefix

log = logging.getLogger("cairn.nats")


class NatsUnavailableError(RuntimeError):
    """NATS cannot be reached; the message names the URL and how to start a server."""


class NatsAuthError(NatsUnavailableError):
    """NATS refused the credentials or the TLS handshake, or they could not be read."""


def display_url(url: str | None) -> str | None:
    """The URL without a password in it, for messages and logs."""
    if not url or "@" not in url:
        return url
    shown = []
    for server in url.split(","):
        parsed = urlparse(server.strip())
        if parsed.password is not None:
            host = parsed.netloc.rpartition("@")[2]
            server = parsed._replace(netloc=f"{parsed.username}:***@{host}").geturl()
        shown.append(server)
    return ",".join(shown)


def unreachable_message(url: str | None) -> str:
    if not url:
        return (
            "no NATS server is configured: start the embedded one with `cairn up` "
            "(or run `cairn demo`), or set NATS_URL to your server's URL"
        )
    return (
        f"cannot reach NATS at {display_url(url)}: start it (`cairn up` runs an embedded "
        "server) or point NATS_URL at a running server with JetStream enabled"
    )


def _whose(endpoint: NatsEndpoint) -> str:
    if endpoint.user:
        return "CAIRN_NATS_USER/CAIRN_NATS_PASSWORD"
    if endpoint.credentials_file is not None:
        return f"the credentials in {endpoint.credentials_file}"
    if endpoint.url and "@" in endpoint.url:
        return "the user in NATS_URL"
    return "no credentials (set CAIRN_NATS_CREDS to a file from `cairn nats-config`)"


def _tls_context(endpoint: NatsEndpoint) -> ssl.SSLContext | None:
    if endpoint.tls_ca is None and endpoint.tls_cert is None:
        return None
    try:
        context = ssl.create_default_context(
            cafile=str(endpoint.tls_ca) if endpoint.tls_ca else None
        )
        if endpoint.tls_cert is not None:
            context.load_cert_chain(
                endpoint.tls_cert, endpoint.tls_key if endpoint.tls_key is not None else None
            )
    except (OSError, ssl.SSLError) as exc:
        files = ", ".join(
            f"{name}={path}"
            for name, path in (
                ("CAIRN_NATS_TLS_CA", endpoint.tls_ca),
                ("CAIRN_NATS_TLS_CERT", endpoint.tls_cert),
                ("CAIRN_NATS_TLS_KEY", endpoint.tls_key),
            )
            if path is not None
        )
        raise NatsAuthError(
            f"cannot load the TLS files for NATS ({files}): {exc}; give PEM files"
        ) from None
    return context


def connect_options(endpoint: NatsEndpoint) -> dict[str, Any]:
    """nats-py (and FastStream `NatsBroker`) keyword arguments for an endpoint: the user and
    password, the user's own inbox prefix, and a TLS context when TLS files are set."""
    try:
        credentials = endpoint.credentials()
    except NatsCredentialsError as exc:
        raise NatsAuthError(str(exc)) from None
    options: dict[str, Any] = {}
    user = None
    if credentials is not None:
        options.update(user=credentials.user, password=credentials.password)
        user = credentials.user
    elif endpoint.url:
        user = unquote(urlparse(endpoint.url.split(",")[0].strip()).username or "") or None
    if user:
        options["inbox_prefix"] = inbox_prefix(user)
    tls = _tls_context(endpoint)
    if tls is not None:
        options["tls"] = tls
    return options


class _Refused(Exception):
    """Raised from the error callback to end nats-py's connect loop, which would otherwise
    retry refused credentials or a failed TLS handshake forever."""


def _refusal(exc: BaseException, endpoint: NatsEndpoint) -> str | None:
    where = display_url(endpoint.url)
    if isinstance(exc, AuthorizationError) or "authorization violation" in str(exc).lower():
        role = f" for the {endpoint.role} role" if endpoint.role else ""
        return (
            f"NATS at {where} refused cairn's credentials (authorization violation): "
            f"it was given {_whose(endpoint)}{role}; use the file `cairn nats-config` wrote "
            "for this role, or the server's config that goes with it"
        )
    if isinstance(exc, ssl.SSLError):
        return (
            f"the TLS handshake with NATS at {where} failed ({exc}): set CAIRN_NATS_TLS_CA to "
            "the CA that signed the server's certificate (and CAIRN_NATS_TLS_CERT/KEY if "
            "the server verifies clients)"
        )
    return None


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


async def connect(
    target: NatsEndpoint | str | None, name: str, *, reconnect: bool = True
) -> Client:
    """Connect to NATS, reconnecting forever once connected (servers restart).

    `target` is an endpoint (URL, credentials, TLS files) or a bare URL. nats-py would also
    retry the *first* connection forever; a server that is not there at start, refused
    credentials and a failed TLS handshake are reported at once instead.
    """
    endpoint = target if isinstance(target, NatsEndpoint) else NatsEndpoint(url=target)
    url = endpoint.url
    if not url or not await _reachable(url):
        raise NatsUnavailableError(unreachable_message(url))
    options = connect_options(endpoint)
    shown = display_url(url)
    connecting = True
    refused: list[str] = []
    # A refusal while reconnecting comes back every attempt: say it once until reconnected.
    last_refusal: list[str] = []

    async def on_error(exc: Exception) -> None:
        if refused:
            return  # the connection is being given up; later errors add nothing
        reason = _refusal(exc, endpoint)
        if connecting and reason is not None:
            refused.append(reason)
            raise _Refused
        if reason is not None:
            if last_refusal == [reason]:
                return
            last_refusal[:] = [reason]
        log.warning("NATS error: %s", reason or exc)

    async def on_disconnected() -> None:
        log.debug("disconnected from NATS at %s", shown)

    async def on_reconnected() -> None:
        last_refusal.clear()
        log.info("reconnected to NATS at %s", shown)

    nc = Client()
    try:
        await nc.connect(
            url,
            name=name,
            connect_timeout=2,
            allow_reconnect=reconnect,
            max_reconnect_attempts=-1 if reconnect else 1,
            # Seconds as a float work; the annotation says int.
            reconnect_time_wait=0.25,  # type: ignore[arg-type]
            error_cb=on_error,
            disconnected_cb=on_disconnected,
            reconnected_cb=on_reconnected,
            **options,
        )
    except Exception as exc:  # nats raises several unrelated types for "no server"
        # After a failed TLS handshake nats-py's close waits forever for a socket that is
        # already closed: bound it.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(nc.close(), 1)
        if refused:
            raise NatsAuthError(refused[0]) from None
        raise NatsUnavailableError(unreachable_message(url)) from exc
    connecting = False
    return nc
