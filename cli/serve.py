"""`cairn serve`: the HTTP API and dashboard; and the dashboard process that `cairn up` starts."""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from cairn.cli.app import HomeOpt, app, console, fail, settings_for
from cairn.cli.demo import DemoError
from cairn.runtime.supervisor import Supervisor

HTTP_MODULE = "cairn.projections.http"


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free one).")] = 8700,
    tokens: Annotated[
        Path | None,
        typer.Option(
            "--tokens",
            help="API tokens, YAML or JSON: token → {subject, role}. Default: $CAIRN_API_TOKENS, "
            "$CAIRN_API_TOKENS_FILE or <home>/api-tokens.yaml (created on first use).",
            show_default=False,
        ),
    ] = None,
    home: HomeOpt = None,
) -> None:
    """Serve the HTTP API (OpenAPI at /docs) and the web dashboard until Ctrl-C."""
    from cairn.projections.http import (
        ServeError,
        TokenConfigError,
        dev_token_file,
        load_tokens,
        tokens_configured,
    )
    from cairn.projections.http import serve as run_server

    settings = settings_for(home)
    if tokens is None and not tokens_configured(settings):
        path, created = dev_token_file(settings.home)
        _show_tokens(path, created)
    try:
        grants = load_tokens(settings, tokens)
    except TokenConfigError as exc:
        fail(str(exc))

    def listening(url: str) -> None:
        console.print(
            f"dashboard: {url}/  ·  API docs: {url}/docs  ·  Ctrl-C stops", soft_wrap=True
        )

    try:
        run_server(settings, grants, host, port, listening)
    except ServeError as exc:
        fail(str(exc))


def _show_tokens(path: Path, created: str | None) -> None:
    if created:
        console.print(
            f"API tokens: created {path} with an admin token: {created}",
            highlight=False,
            soft_wrap=True,
        )
    else:
        console.print(
            f"API tokens: {path} (log in to the dashboard with one of them)", soft_wrap=True
        )


# -- the dashboard of `cairn up` -----------------------------------------------------------------


@dataclass(frozen=True)
class Dashboard:
    """The http process `cairn up` started, and where its tokens are."""

    tokens: Path | None  # None: configured by CAIRN_API_TOKENS(_FILE) in the environment
    new_token: str | None  # the admin token, when the token file was created just now


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start_dashboard(sup: Supervisor) -> Dashboard:
    """Start `python -m cairn.projections.http` under the supervisor, on loopback.

    The port is CAIRN_HTTP_PORT, else 8700, else (8700 taken) any free one; the tokens are
    the environment's, else `<home>/api-tokens.yaml`, created with one admin token if missing.
    """
    from cairn.projections.http import (
        DEFAULT_PORT,
        TOKENS_FILE_ENV,
        dev_token_file,
        tokens_configured,
        url_file,
    )

    env: dict[str, str] = {}
    tokens: Path | None = None
    created = None
    if not tokens_configured(sup.settings):
        tokens, created = dev_token_file(sup.settings.home)
        env[TOKENS_FILE_ENV] = str(tokens)
    if sup.settings.http_port is None:
        env["CAIRN_HTTP_PORT"] = str(DEFAULT_PORT) if _port_free(DEFAULT_PORT) else "0"
    url_file(sup.settings).unlink(missing_ok=True)  # left by a server that was killed
    sup.start("http", HTTP_MODULE, env)
    return Dashboard(tokens, created)


async def dashboard_lines(sup: Supervisor, dashboard: Dashboard, timeout: float = 20) -> list[str]:
    """Wait until the dashboard listens; what to tell the user about it."""
    from cairn.projections.http import url_file

    path = url_file(sup.settings)
    deadline = time.monotonic() + timeout
    while not path.exists():
        code = sup.processes["http"].poll()
        if code is not None:
            raise DemoError(
                f"the http process exited with code {code} at start:\n{sup.log_tail('http')}"
            )
        if time.monotonic() > deadline:
            raise DemoError(
                f"the dashboard did not start within {timeout:.0f}s; "
                f"see {sup.settings.home / 'logs' / 'http.log'}"
            )
        await asyncio.sleep(0.05)
    url = path.read_text().strip()
    lines = [f"dashboard: {url}/  ·  API docs: {url}/docs"]
    if dashboard.new_token:
        lines.append(f"  admin token (saved in {dashboard.tokens}): {dashboard.new_token}")
    elif dashboard.tokens is not None:
        lines.append(f"  log in with a token from {dashboard.tokens}")
    else:
        lines.append("  log in with a token from CAIRN_API_TOKENS / CAIRN_API_TOKENS_FILE")
    return lines
