"""`cairn nats-config`: a nats-server configuration with one user per role, and each role's
credentials file, for a deployment of cairn."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cairn.cli.app import JsonOpt, app, console, fail, print_json
from cairn.runtime.roles import (
    AGENT_ROLE_PREFIX,
    ROLE_ADMIN,
    ROLE_COORDINATOR,
    ROLE_OBSERVER,
    NatsCredentialsError,
    ServerOptions,
    write_deployment,
)
from cairn.runtime.settings import CREDS_ENV, TLS_CA_ENV
from cairn.runtime.supervisor import EXAMPLE_AGENTS


def _uses(role: str) -> str:
    if role == ROLE_COORDINATOR:
        return "python -m cairn.coordinator"
    if role == ROLE_ADMIN:
        return "the cairn CLI and the HTTP API (commands, event feed)"
    if role == ROLE_OBSERVER:
        return "read-only: event feed, ping, pending approvals"
    capability = role.removeprefix(AGENT_ROLE_PREFIX)
    return f"agents of capability {capability} (tasks in, results out)"


def _host_port(value: str, option: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        fail(f"{option} takes HOST:PORT, e.g. 0.0.0.0:4222, not {value!r}")
    return value


@app.command("nats-config")
def nats_config(
    out: Annotated[Path, typer.Option("--out", help="Directory to write the files into.")],
    capability: Annotated[
        list[str] | None,
        typer.Option(
            "--capability",
            help="An agent capability to make a user for (repeatable; default: the examples).",
        ),
    ] = None,
    listen: Annotated[
        str, typer.Option(help="Address clients connect to, HOST:PORT.")
    ] = "0.0.0.0:4222",
    monitor: Annotated[
        str, typer.Option(help="Monitoring address (/healthz), HOST:PORT.")
    ] = "127.0.0.1:8222",
    store_dir: Annotated[
        Path | None,
        typer.Option(help="JetStream's store (default: <out>/jetstream).", show_default=False),
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(help="Server certificate (PEM): turns TLS on.")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="The certificate's private key.")] = None,
    tls_ca: Annotated[
        Path | None,
        typer.Option(help="CA for client certificates: clients must present one it signed."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a nats-server config (JetStream, one user per role with its permissions) and a
    credentials file per role (readable by you only); say which process uses which.

    Running it again keeps the passwords of roles whose files exist."""
    if (tls_cert is None) != (tls_key is None):
        fail("--tls-cert and --tls-key go together")
    if tls_ca is not None and tls_cert is None:
        fail("--tls-ca needs --tls-cert and --tls-key (the server's own TLS) as well")
    options = ServerOptions(
        listen=_host_port(listen, "--listen"),
        monitor=_host_port(monitor, "--monitor"),
        store_dir=str((store_dir or out / "jetstream").absolute()),
        tls_cert=tls_cert.absolute() if tls_cert else None,
        tls_key=tls_key.absolute() if tls_key else None,
        tls_ca=tls_ca.absolute() if tls_ca else None,
    )
    try:
        deployment = write_deployment(out.absolute(), capability or EXAMPLE_AGENTS, options)
    except NatsCredentialsError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write into {out}: {exc.strerror}")
    scheme = "tls" if tls_cert else "nats"
    port = listen.rpartition(":")[2]
    url = f"{scheme}://HOST:{port}"
    if as_json:
        print_json(
            {
                "config": deployment.config,
                "credentials": deployment.credentials,
                "created": list(deployment.created),
                "url": url,
            }
        )
        return
    console.print(f"wrote {deployment.config}", highlight=False)
    table = Table("role", "credentials (mode 0600)", "used by")
    for role, path in deployment.credentials.items():
        kept = "" if role in deployment.created else " (kept)"
        table.add_row(role, f"{path}{kept}", _uses(role))
    console.print(table)
    console.print(f"start NATS:    nats-server -c {deployment.config}", highlight=False)
    console.print(
        f"each process:  NATS_URL={url} {CREDS_ENV}={deployment.directory}/<role>.env"
        + (f" {TLS_CA_ENV}=<CA of the server's certificate>" if tls_cert else ""),
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        "  (or load the role's file as environment variables, e.g. a container's env_file: "
        "it sets CAIRN_NATS_USER and CAIRN_NATS_PASSWORD)",
        highlight=False,
        soft_wrap=True,
    )
