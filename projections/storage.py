"""The views' storage port, and the choice of backend for a views URL.

The runner and the query API depend only on these protocols; `sqlite_views.py` implements
them for a SQLite file. A PostgreSQL backend would be a second module picked here by URL.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from cairn.coordinator.store import store_env

from .errors import ViewsUnavailableError
from .filters import AuditFilter
from .sqlite_views import SQLiteViewsReader, open_sqlite_recorder

if TYPE_CHECKING:
    from cairn.coordinator.store import LoggedEvent


class ViewsRecorder(Protocol):
    """The write side: folds batches into the views with their tracking position."""

    def position(self, name: str) -> int: ...

    def project(self, name: str, batch: Sequence[LoggedEvent], after: int) -> None: ...

    def drop(self, name: str, *, indexes: bool = True) -> None: ...

    def create_indexes(self) -> None: ...

    def close(self) -> None: ...


class ViewsReader(Protocol):
    """The read side: rows as dicts of column values, for `queries.Views` to type."""

    def position(self, name: str) -> int: ...

    def runs(self, status: str | None, limit: int) -> list[dict[str, Any]]: ...

    def run(self, run_id: str) -> dict[str, Any] | None: ...

    def run_ids_with_prefix(self, prefix: str, limit: int) -> list[str]: ...

    def steps(self, run_id: str) -> list[dict[str, Any]]: ...

    def audit(self, where: AuditFilter, limit: int | None) -> list[dict[str, Any]]: ...

    def time_at(self, position: int) -> str | None: ...

    def charges(self, key: str, run_id: str | None) -> list[tuple[str, int, int, str]]: ...

    def charge_details(
        self, key: str, run_id: str | None, day: str | None = None
    ) -> list[tuple[str, str, int, int, str]]: ...

    def close(self) -> None: ...


def _sqlite_env(url: str) -> dict[str, str]:
    env = store_env(url)
    if env["PERSISTENCE_MODULE"] != "eventsourcing.sqlite":
        raise ViewsUnavailableError(
            "views in PostgreSQL are not supported yet: set CAIRN_VIEWS to a SQLite file path "
            "(the event store may stay in PostgreSQL)"
        )
    return env


def open_recorder(url: str) -> ViewsRecorder:
    """The write side of the views at `url` (a SQLite path), creating the tables if needed."""
    return open_sqlite_recorder(_sqlite_env(url))


def open_reader(url: str) -> ViewsReader:
    """The read side of the views at `url`; it opens the database lazily, read-only."""
    env = _sqlite_env(url)
    return SQLiteViewsReader(env["SQLITE_DBNAME"], float(env.get("SQLITE_LOCK_TIMEOUT", "30")))
