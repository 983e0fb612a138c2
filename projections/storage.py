"""The views' storage port, and the choice of backend for a views URL.

The runner and the query API depend only on these protocols; `sqlite_views.py` implements
them for a SQLite file, `postgres_views.py` for a PostgreSQL database (a `postgresql://` DSN,
as for the event store).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlparse

from cairn.projections.errors import ViewsUnavailableError
from cairn.projections.filters import AuditFilter
from cairn.projections.sqlite_views import SQLiteViewsReader, open_sqlite_recorder
from cairn.runtime.eventlog.store import describe, store_env

if TYPE_CHECKING:
    from cairn.runtime.eventlog.store import LoggedEvent


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


def is_postgres(url: str) -> bool:
    """Whether a store or views URL names a PostgreSQL database."""
    return url.startswith(("postgresql://", "postgres://"))


def redacted(url: str) -> str:
    """A store or views URL as messages show it: a PostgreSQL DSN without its password."""
    if not is_postgres(url):
        return url
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    userinfo, _, hostport = parsed.netloc.rpartition("@")
    return parsed._replace(netloc=f"{userinfo.partition(':')[0]}@{hostport}").geturl()


def open_recorder(url: str) -> ViewsRecorder:
    """The write side of the views at `url` (a SQLite path or a PostgreSQL DSN), creating
    the tables if needed."""
    if is_postgres(url):
        with _postgres_support():
            from cairn.projections.postgres_views import open_postgres_recorder
        return open_postgres_recorder(store_env(url), describe(url))
    return open_sqlite_recorder(store_env(url))


def open_reader(url: str) -> ViewsReader:
    """The read side of the views at `url`; it connects lazily and never creates anything."""
    env = store_env(url)
    if is_postgres(url):
        with _postgres_support():
            from cairn.projections.postgres_views import PostgresViewsReader
        return PostgresViewsReader(env, redacted(url), describe(url))
    return SQLiteViewsReader(env["SQLITE_DBNAME"], float(env.get("SQLITE_LOCK_TIMEOUT", "30")))


@contextmanager
def _postgres_support() -> Iterator[None]:
    """Imports of the PostgreSQL backend, which needs psycopg (an optional extra)."""
    try:
        yield
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in ("psycopg", "psycopg_pool"):
            raise
        raise ViewsUnavailableError(
            "PostgreSQL support is not installed: pip install 'cairn[postgres]'"
        ) from None
