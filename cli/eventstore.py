"""The event store as the history commands read it (not the views): open it, find a run by
id or prefix, load a run's events; each failure is one sentence and exit status 2."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Annotated

import typer

from cairn.cli.app import fail
from cairn.events import Event
from cairn.runtime.eventlog.store import EventStore, RunNotFoundError, StoreUnavailableError
from cairn.runtime.settings import Settings

RunArg = Annotated[str, typer.Argument(help="A run id or a unique prefix of one.")]


def open_store(settings: Settings, *, create: bool = False) -> EventStore:
    """The settings' event store; one sentence and exit 2 if there is none (unless `create`)
    or it cannot be opened."""
    url = settings.store
    is_sqlite = not url.startswith(("postgresql://", "postgres://"))
    if is_sqlite and not create:
        path = Path(url.removeprefix("sqlite:///").removeprefix("sqlite://"))
        if not path.exists():
            fail(
                f"no event store at {path}: nothing has been recorded there "
                "(give --home or set CAIRN_STORE)"
            )
    try:
        return EventStore.from_settings(settings)
    except StoreUnavailableError as exc:
        fail(str(exc))


def run_in_store(store: EventStore, ref: str) -> uuid.UUID:
    """The run a full id or a unique prefix names in the store, or one sentence and exit 2."""
    try:
        return store.resolve_run(ref)
    except RunNotFoundError as exc:
        fail(str(exc))


def events_of(store: EventStore, run_id: uuid.UUID) -> list[Event]:
    """A run's events, or one sentence and exit 2 when one cannot be read."""
    try:
        return store.load(run_id)
    except ValueError as exc:  # an unknown type, a newer version, a damaged event
        fail(f"cannot read run {run_id}: {exc}")
