"""`cairn protocol`: the wire protocol's subjects, or the whole of it as an AsyncAPI document."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from cairn.cli.app import app, console, print_json
from cairn.events.asyncapi import asyncapi_document, channels


@app.command()
def protocol(
    asyncapi: Annotated[
        bool,
        typer.Option("--asyncapi", help="Print the protocol as an AsyncAPI 3.0 JSON document."),
    ] = False,
) -> None:
    """The NATS subjects cairn speaks on (docs/protocol.md explains them)."""
    if asyncapi:
        print_json(asyncapi_document())
        return
    table = Table("subject", "message", "reply")
    for channel in channels():
        table.add_row(
            channel.address,
            channel.message.__name__ if channel.message is not None else "{}",
            channel.reply.__name__ if channel.reply is not None else "",
        )
    console.print(table)
