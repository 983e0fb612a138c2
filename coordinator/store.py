"""The event store: one stream per run in the `eventsourcing` library's recorders.

This is the only persistence module of the coordinator. SQLite (a file under the data
directory) by default; PostgreSQL when the store URL is a `postgresql://` DSN.
"""

from __future__ import annotations

import fcntl
import sqlite3
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from eventsourcing.persistence import (
    ApplicationRecorder,
    InfrastructureFactory,
    IntegrityError,
    PersistenceError,
    StoredEvent,
    Tracking,
    TrackingRecorder,
)

from cairn.events import Event, decode_event, encode_event, event_class, topic_of


class StoreUnavailableError(RuntimeError):
    """The event store cannot be opened; the message says which and what to do."""


class ConcurrencyError(RuntimeError):
    """Another writer appended to one of the runs first (optimistic concurrency)."""


@dataclass(frozen=True)
class StoredRow:
    """An event as the store holds it: its place, its topic (`Type@version`) and its bytes."""

    run_id: uuid.UUID
    seq: int
    topic: str
    state: bytes


class RunNotFoundError(LookupError):
    """No run in the store matches the given id or prefix (or several do)."""


@dataclass(frozen=True)
class LoggedEvent:
    """An event with its position in the store's notification log."""

    position: int
    event: Event


def store_env(url: str) -> dict[str, str]:
    """Translate a store URL (a SQLite path or a PostgreSQL DSN) into eventsourcing settings."""
    if url.startswith(("postgresql://", "postgres://")):
        parsed = urlparse(url)
        env = {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": parsed.path.lstrip("/") or "cairn",
            "POSTGRES_HOST": parsed.hostname or "127.0.0.1",
            "POSTGRES_PORT": str(parsed.port or 5432),
            "POSTGRES_USER": unquote(parsed.username or "postgres"),
            "POSTGRES_PASSWORD": unquote(parsed.password or ""),
            "POSTGRES_CONNECT_TIMEOUT": "5",
        }
        # `?schema=NAME` keeps cairn's tables in their own schema (created if missing).
        schema = parse_qs(parsed.query).get("schema", [""])[0]
        if schema:
            env["POSTGRES_SCHEMA"] = schema
        return env
    path = url.removeprefix("sqlite:///").removeprefix("sqlite://")
    return {
        "PERSISTENCE_MODULE": "eventsourcing.sqlite",
        "SQLITE_DBNAME": path,
        "SQLITE_LOCK_TIMEOUT": "30",
    }


def describe(url: str) -> str:
    if url.startswith(("postgresql://", "postgres://")):
        parsed = urlparse(url)
        return f"PostgreSQL at {parsed.hostname}:{parsed.port or 5432}/{parsed.path.lstrip('/')}"
    return f"SQLite file {url.removeprefix('sqlite:///')}"


def _factory(url: str) -> InfrastructureFactory[Any]:
    env = store_env(url)
    if env["PERSISTENCE_MODULE"] == "eventsourcing.postgres":
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise StoreUnavailableError(
                "PostgreSQL support is not installed: pip install 'cairn[postgres]'"
            ) from None
    try:
        if env["PERSISTENCE_MODULE"] == "eventsourcing.sqlite":
            Path(env["SQLITE_DBNAME"]).parent.mkdir(parents=True, exist_ok=True)
        elif env.get("POSTGRES_SCHEMA"):
            _create_schema(env)
        return InfrastructureFactory.construct(env)
    except (PersistenceError, OSError, sqlite3.Error) as exc:
        raise StoreUnavailableError(
            f"cannot open the event store ({describe(url)}): {exc}. "
            "Check the path or DSN in CAIRN_STORE and that the database server is running."
        ) from exc


@contextmanager
def _setup_lock(env: dict[str, str]) -> Iterator[None]:
    """Hold a lock across processes while the store's schema and tables are set up."""
    if env["PERSISTENCE_MODULE"] == "eventsourcing.postgres":
        with _postgres_setup_lock(env):
            yield
        return
    if ":memory:" in env["SQLITE_DBNAME"]:
        yield
        return
    path = Path(env["SQLITE_DBNAME"] + ".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("a")
    except OSError:
        yield  # an unusable folder: opening the store itself will say so
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# PostgreSQL's `CREATE SCHEMA/TABLE IF NOT EXISTS` race when two sessions run them at once
# (a unique violation in the catalogue): processes starting together take turns under an
# advisory lock. An unreachable server is left for opening the store to report.
_SETUP_LOCK_KEY = 0x636169726E  # "cairn"


@contextmanager
def _postgres_setup_lock(env: dict[str, str]) -> Iterator[None]:
    try:
        import psycopg
    except ImportError:
        yield  # opening the store says how to install PostgreSQL support
        return
    try:
        conn = _postgres_connect(env)
    except psycopg.Error:
        yield
        return
    with conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_SETUP_LOCK_KEY,))
        try:
            yield
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_SETUP_LOCK_KEY,))


def _postgres_connect(env: dict[str, str]) -> Any:
    import psycopg

    return psycopg.connect(
        dbname=env["POSTGRES_DBNAME"],
        host=env["POSTGRES_HOST"],
        port=int(env["POSTGRES_PORT"]),
        user=env["POSTGRES_USER"],
        password=env["POSTGRES_PASSWORD"] or None,
        connect_timeout=int(env["POSTGRES_CONNECT_TIMEOUT"]),
        autocommit=True,
    )


def _create_schema(env: dict[str, str]) -> None:
    import psycopg
    from psycopg import sql

    try:
        with _postgres_connect(env) as conn:
            conn.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
                    sql.Identifier(env["POSTGRES_SCHEMA"])
                )
            )
    except psycopg.Error as exc:
        raise OSError(str(exc).strip()) from exc


class EventStore:
    """Append and read run streams; read the notification log; keep named positions."""

    def __init__(self, url: str) -> None:
        self.url = url
        # eventsourcing sets up a fresh SQLite file (WAL mode, tables, a migration row) in
        # steps that race when several processes open it at once (`cairn up` does): one at a
        # time, under a lock file beside the database.
        with _setup_lock(store_env(url)):
            self._factory = _factory(url)
            try:
                self._recorder: ApplicationRecorder = self._factory.application_recorder()
                self._tracking: TrackingRecorder = self._factory.tracking_recorder()
            except (PersistenceError, OSError, sqlite3.Error) as exc:
                raise StoreUnavailableError(
                    f"cannot open the event store ({describe(url)}): {exc}. Check the path or "
                    "DSN in CAIRN_STORE and that the database server is running."
                ) from exc

    def close(self) -> None:
        self._factory.close()

    def append(self, events: Sequence[Event]) -> list[int]:
        """Store events of any number of runs in one transaction; return their log positions."""
        if not events:
            return []
        stored = [
            StoredEvent(
                originator_id=e.run_id,
                originator_version=e.seq,
                topic=topic_of(e),
                state=encode_event(e),
            )
            for e in events
        ]
        try:
            ids = self._recorder.insert_events(stored)
        except IntegrityError as exc:
            raise ConcurrencyError(str(exc)) from exc
        return list(ids or [])

    def load(self, run_id: uuid.UUID, after: int = 0) -> list[Event]:
        """A run's events in order (those after position `after` in the run's stream)."""
        rows = self._recorder.select_events(run_id, gt=after or None)
        return [
            decode_event(r.topic, r.state, _as_uuid(r.originator_id), r.originator_version)
            for r in rows
        ]

    def read_log(self, after: int, limit: int = 1000) -> list[LoggedEvent]:
        """Events of all runs in commit order, starting after log position `after`."""
        rows = self._recorder.select_notifications(
            start=after, limit=limit, inclusive_of_start=False
        )
        return [
            LoggedEvent(
                n.id,
                decode_event(n.topic, n.state, _as_uuid(n.originator_id), n.originator_version),
            )
            for n in rows
        ]

    def append_rows(self, rows: Sequence[StoredRow]) -> list[int]:
        """Store events as given (topic and bytes unchanged, e.g. an imported history that
        holds older versions) in one transaction; return their log positions."""
        stored = [StoredEvent(r.run_id, r.seq, r.topic, r.state) for r in rows]
        try:
            ids = self._recorder.insert_events(stored)
        except IntegrityError as exc:
            raise ConcurrencyError(str(exc)) from exc
        return list(ids or [])

    def rows(self, run_id: uuid.UUID) -> list[StoredRow]:
        """A run's events as stored, in the order of their positions in the run."""
        return [
            StoredRow(run_id, r.originator_version, r.topic, bytes(r.state))
            for r in self._recorder.select_events(run_id)
        ]

    def has_run(self, run_id: uuid.UUID) -> bool:
        return bool(self._recorder.select_events(run_id, limit=1))

    def run_ids(self, *, started_only: bool = True) -> list[uuid.UUID]:
        """Runs in the order they were recorded: those with a RunStarted event, or (not
        `started_only`) every stream in the log, read from the log without decoding."""
        topics: list[str] = []
        if started_only:
            cls = event_class("RunStarted")
            topics = [f"RunStarted@{v}" for v in range(1, cls.version + 1)]
        seen: dict[uuid.UUID, None] = {}
        position = 0
        while True:
            rows = self._recorder.select_notifications(
                start=position, limit=5000, topics=topics, inclusive_of_start=False
            )
            if not rows:
                return list(seen)
            for n in rows:
                seen.setdefault(_as_uuid(n.originator_id), None)
            position = rows[-1].id

    def resolve_run(self, ref: str) -> uuid.UUID:
        """The run a full id or a unique prefix of one names; RunNotFoundError otherwise."""
        text = ref.strip().lower()
        try:
            run_id = uuid.UUID(text)
        except ValueError:
            run_id = None
        if run_id is not None:
            if not self.has_run(run_id):
                raise RunNotFoundError(f"no run {run_id} in the event store ({describe(self.url)})")
            return run_id
        if not text or any(c not in "0123456789abcdef-" for c in text):
            raise RunNotFoundError(f"{ref!r} is not a run id or a prefix of one")
        matches = [r for r in self.run_ids() if str(r).startswith(text)]
        if not matches:
            raise RunNotFoundError(
                f"no run id starts with {text!r} in the event store ({describe(self.url)})"
            )
        if len(matches) > 1:
            shown = ", ".join(str(m) for m in matches[:5])
            more = f" and {len(matches) - 5} more" if len(matches) > 5 else ""
            raise RunNotFoundError(
                f"{text!r} matches {len(matches)} runs ({shown}{more}): give more of the id"
            )
        return matches[0]

    def last_position(self) -> int:
        return self._recorder.max_notification_id() or 0

    def position(self, name: str) -> int:
        """A named tracked position (e.g. how far the outbox relay has published)."""
        return self._tracking.max_tracking_id(name) or 0

    def save_position(self, name: str, position: int) -> None:
        if position > self.position(name):
            self._tracking.insert_tracking(Tracking(name, position))


def _as_uuid(value: uuid.UUID | str) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
