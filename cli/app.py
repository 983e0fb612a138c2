"""The `cairn` command's root: the typer app every command group registers on, and what the
groups share (options, one-sentence failures, plain output, settings, the views, a run id from a
prefix)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console

from cairn.cli.demo import (
    DemoError,
)
from cairn.cli.plain import clean
from cairn.coordinator.workflow import WorkflowError
from cairn.events import CommandReply
from cairn.runtime.client import CairnClient, CoordinatorUnavailableError
from cairn.runtime.connection import NatsUnavailableError
from cairn.runtime.deadletters import DeadLettersUnavailableError
from cairn.runtime.embedded import EmbeddedServerError
from cairn.runtime.eventlog.store import StoreUnavailableError
from cairn.runtime.settings import Settings, SettingsError

app = typer.Typer(
    help="cairn: an event-sourced coordinator for AI agents that run as separate services.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
projections_app = typer.Typer(help="Follow, rebuild and inspect the projections' views.")
app.add_typer(projections_app, name="projections")

console = Console()
err_console = Console(stderr=True)
T = TypeVar("T")

HomeOpt = Annotated[
    Path | None,
    typer.Option(
        "--home", help="Data directory (default $CAIRN_HOME or .cairn).", show_default=False
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for tools.")]


def fail(message: str, code: int = 2) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine, turning known infrastructure problems into one clear sentence."""
    try:
        return asyncio.run(coro)
    except (
        NatsUnavailableError,
        CoordinatorUnavailableError,
        StoreUnavailableError,
        DeadLettersUnavailableError,
        EmbeddedServerError,
        DemoError,
        WorkflowError,
    ) as exc:
        fail(str(exc))


def say(text: str, style: str | None = None) -> None:
    """Print plain text (no markup) without wrapping it into several lines."""
    console.print(clean(text), style=style, markup=False, highlight=False, soft_wrap=True)


def short(text: str, width: int) -> str:
    """`text` on one line, cut to `width` characters with an ellipsis."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def print_lines(lines: list[str]) -> None:
    """One line each: cropped to a terminal's width, whole when piped."""
    for line in lines:
        line = clean(line)
        if console.is_terminal:
            console.print(line, markup=False, highlight=False, no_wrap=True, overflow="ellipsis")
        else:
            sys.stdout.write(line + "\n")


def print_json(data: Any) -> None:
    def default(value: Any) -> Any:
        if isinstance(value, BaseModel):
            return value.model_dump(mode="json")
        if isinstance(value, Decimal | uuid.UUID | Path):
            return str(value)
        if hasattr(value, "isoformat"):
            return value.isoformat()
        raise TypeError(f"cannot encode {type(value).__name__}")

    sys.stdout.write(json.dumps(data, default=default, indent=2) + "\n")


def send_command(
    settings: Settings, call: Callable[[CairnClient], Awaitable[CommandReply]]
) -> dict[str, Any]:
    """Send one command to the coordinator over NATS; its reply as JSON-able data."""

    async def go() -> dict[str, Any]:
        async with await CairnClient.connect(settings.nats_endpoint()) as client:
            reply = await call(client)
            return reply.model_dump(mode="json")

    return run_async(go())


def settings_for(home: Path | None) -> Settings:
    """The settings of this command: `--home`, and the environment (see `Settings`)."""
    try:
        return Settings.from_env(home)
    except SettingsError as exc:
        fail(str(exc))


def open_views(settings: Settings) -> Any:
    from cairn.projections import Views, ViewsMissingError

    try:
        return Views(settings.views)
    except ViewsMissingError as exc:
        fail(str(exc))


def resolve_run(views: Any, ref: str) -> str:
    """A full run id from an id or a unique prefix, or one clear error."""
    from cairn.projections import RunNotFoundError

    try:
        run_id: str = views.resolve(ref)
    except RunNotFoundError as exc:
        fail(str(exc))
    return run_id


def exec_module(module: str, home: Path | None) -> None:

    env = {**os.environ, **settings_for(home).env()}
    os.execve(sys.executable, [sys.executable, "-m", module], env)  # noqa: S606


def run_id_from(settings: Settings, ref: str) -> uuid.UUID:
    """A run id from a full id, or from a unique prefix known to the views."""
    try:
        return uuid.UUID(ref)
    except ValueError:
        pass
    return uuid.UUID(resolve_run(open_views(settings), ref))
