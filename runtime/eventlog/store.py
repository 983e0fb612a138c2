"""The event store: one stream per run in the `eventsourcing` library's recorders.

This is the only persistence module of the coordinator. SQLite (a file under the data
directory) by default; PostgreSQL when the store URL is a `postgresql://` DSN
(`postgres.py`). Large outputs are kept apart, once by content hash, in a table beside
the events and written in the same transaction (`blobs.py`); every read puts them back.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import sqlite3
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, cast
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
from eventsourcing.sqlite import SQLiteApplicationRecorder, SQLiteCursor

from cairn.events import Event, decode_event, encode_event, event_class, event_hash, topic_of
from cairn.events.codec import link_hash
from cairn.runtime.eventlog.blobs import MARKER, BrokenBlob, offload, references, resolve
from cairn.runtime.eventlog.checkpoints import (
    STORE_ROW,
    ChainKey,
    ChainKeyError,
    Checkpoint,
    Head,
    advance,
)
from cairn.runtime.settings import Settings, SettingsError


class StoreUnavailableError(RuntimeError):
    """The event store cannot be opened; the message says which and what to do."""


class ConcurrencyError(RuntimeError):
    """Another writer appended to one of the runs first (optimistic concurrency)."""


class BlobError(ValueError):
    """An event's output kept apart from it is missing from the store or was changed."""


@dataclass(frozen=True)
class StoredRow:
    """An event as the store holds it: its place, its topic (`Type@version`) and its bytes
    (whole: with any outputs kept apart put back, and `broken` naming those that could not be
    put back as they were written)."""

    run_id: uuid.UUID
    seq: int
    topic: str
    state: bytes
    broken: tuple[BrokenBlob, ...] = ()


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


class BlobRecorder(Protocol):
    """What the store needs of its recorder besides the library's interface: reading the
    outputs kept apart (they are written by `insert_events(..., blobs={hash: bytes})`) and
    the signed checkpoints (written by `insert_events(..., heads=Signing(...))`)."""

    def select_blobs(self, hashes: Sequence[str]) -> dict[str, bytes]: ...

    def select_checkpoints(self) -> dict[uuid.UUID, Checkpoint]: ...


@dataclass(frozen=True)
class Signing:
    """What an append checkpoints: each touched run's new head, signed with `key`."""

    key: ChainKey
    heads: dict[uuid.UUID, Head]


CHECKPOINT_COLUMNS = "run_id, last_seq, last_hash, chain_from, mac"


def checkpoint_of(row: Mapping[str, Any]) -> Checkpoint:
    head = Head(_as_uuid(row["run_id"]), row["last_seq"], row["last_hash"], row["chain_from"])
    return Checkpoint(head, row["mac"])


def checkpoint_params(rows: Sequence[Checkpoint]) -> list[tuple[str, int, str, int, str]]:
    return [(str(c.head.run_id), c.head.seq, c.head.hash, c.head.chain_from, c.mac) for c in rows]


class SQLiteBlobRecorder(SQLiteApplicationRecorder):
    """The library's SQLite recorder, with the table of outputs kept apart by content hash
    and the table of signed checkpoints."""

    def construct_create_table_statements(self) -> list[str]:
        return [
            *super().construct_create_table_statements(),
            "CREATE TABLE IF NOT EXISTS cairn_blobs "
            "(sha256 TEXT PRIMARY KEY, data BLOB NOT NULL) WITHOUT ROWID",
            "CREATE TABLE IF NOT EXISTS cairn_checkpoints (run_id TEXT PRIMARY KEY, "
            "last_seq INTEGER NOT NULL, last_hash TEXT NOT NULL, chain_from INTEGER NOT NULL, "
            "mac TEXT NOT NULL) WITHOUT ROWID",
        ]

    def _insert_events(
        self, c: SQLiteCursor, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        blobs: Mapping[str, bytes] | None = kwargs.get("blobs")
        if blobs:  # an output stored before is not stored again
            c.executemany("INSERT OR IGNORE INTO cairn_blobs VALUES (?, ?)", sorted(blobs.items()))
        ids = super()._insert_events(c, stored_events, **kwargs)
        signing: Signing | None = kwargs.get("heads")
        if signing is not None:
            # After the events: the insert holds the write lock, so what is read here is
            # what the last writer committed.
            wanted = [str(r) for r in (*signing.heads, STORE_ROW)]
            marks = ",".join("?" * len(wanted))
            c.execute(
                f"SELECT {CHECKPOINT_COLUMNS} FROM cairn_checkpoints WHERE run_id IN ({marks})",  # noqa: S608
                wanted,
            )
            found = {row["run_id"]: checkpoint_of(row) for row in c.fetchall()}
            store = found.pop(str(STORE_ROW), None)
            rows = advance(
                signing.key, signing.heads, {c.head.run_id: c for c in found.values()}, store
            )
            c.executemany(
                f"INSERT OR REPLACE INTO cairn_checkpoints ({CHECKPOINT_COLUMNS}) "  # noqa: S608
                "VALUES (?, ?, ?, ?, ?)",
                checkpoint_params(rows),
            )
        return ids

    def select_checkpoints(self) -> dict[uuid.UUID, Checkpoint]:
        with self.datastore.transaction(commit=False) as c:
            c.execute(f"SELECT {CHECKPOINT_COLUMNS} FROM cairn_checkpoints")  # noqa: S608
            return {(cp := checkpoint_of(row)).head.run_id: cp for row in c.fetchall()}

    def select_blobs(self, hashes: Sequence[str]) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        with self.datastore.transaction(commit=False) as c:
            for start in range(0, len(hashes), 500):  # within SQLite's limit on parameters
                chunk = list(hashes[start : start + 500])
                marks = ",".join("?" * len(chunk))  # placeholders only: the values are parameters
                c.execute(f"SELECT sha256, data FROM cairn_blobs WHERE sha256 IN ({marks})", chunk)  # noqa: S608
                found.update((row["sha256"], bytes(row["data"])) for row in c.fetchall())
        return found


def _factory(url: str) -> InfrastructureFactory[Any]:
    env = store_env(url)
    env["APPLICATION_RECORDER_TOPIC"] = (
        "cairn.runtime.eventlog.postgres:PostgresBlobRecorder"
        if env["PERSISTENCE_MODULE"] == "eventsourcing.postgres"
        else f"{__name__}:SQLiteBlobRecorder"
    )
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
    """Append and read run streams; read the notification log; keep named positions.

    Outputs whose canonical JSON is over `blob_threshold` bytes (None or `off`: never) are
    stored once by content hash, apart from the events that carry them; every read gives them
    back. Processes open their store with `EventStore.from_settings`; given only a URL, the
    threshold is `CAIRN_BLOB_THRESHOLD` as `Settings.from_env` reads it."""

    def __init__(
        self,
        url: str,
        *,
        blob_threshold: int | Literal["env", "off"] | None = "env",
        chain_key: ChainKey | None = None,
        settings: Settings | None = None,
    ) -> None:
        self.url = url
        self._key = chain_key  # found (or made) at the first append when not given
        self._settings = settings
        self.blob_threshold: int | None
        if blob_threshold == "env":
            try:
                self.blob_threshold = Settings.from_env().blob_threshold
            except SettingsError as exc:
                raise StoreUnavailableError(str(exc)) from None
        else:
            self.blob_threshold = None if blob_threshold == "off" else blob_threshold
        # eventsourcing sets up a fresh SQLite file (WAL mode, tables, a migration row) in
        # steps that race when several processes open it at once (`cairn up` does): one at a
        # time, under a lock file beside the database.
        with _setup_lock(store_env(url)):
            self._factory = _factory(url)
            try:
                self._recorder: ApplicationRecorder = self._factory.application_recorder()
                self._tracking: TrackingRecorder = self._factory.tracking_recorder()
                self._blobs = cast(BlobRecorder, self._recorder)
            except (PersistenceError, OSError, sqlite3.Error) as exc:
                raise StoreUnavailableError(
                    f"cannot open the event store ({describe(url)}): {exc}. Check the path or "
                    "DSN in CAIRN_STORE and that the database server is running."
                ) from exc

    @classmethod
    def from_settings(cls, settings: Settings) -> EventStore:
        """The store of `settings`, with their blob threshold and chain key."""
        return cls(settings.store, blob_threshold=settings.blob_threshold, settings=settings)

    def close(self) -> None:
        self._factory.close()

    def chain_key(self, *, create: bool = False) -> ChainKey:
        """The key this store's checkpoints are signed with (see `checkpoints.py`); made on
        first use by a writer (`create`), never by a reader."""
        if self._key is None:
            try:
                known = self._settings or Settings.from_env()
                self._key = known.chain_key_for(self.url, create=create)
            except (ChainKeyError, SettingsError) as exc:
                raise StoreUnavailableError(str(exc)) from None
        return self._key

    def checkpoints(self) -> dict[uuid.UUID, Checkpoint]:
        """Every signed checkpoint, by run (`STORE_ROW` is the store's own)."""
        return self._blobs.select_checkpoints()

    def append(self, events: Sequence[Event]) -> list[int]:
        """Store events of any number of runs in one transaction; return their log positions."""
        if not events:
            return []
        limit = self.blob_threshold
        blobs: dict[str, bytes] = {}
        stored: list[StoredEvent] = []
        firsts: dict[uuid.UUID, int] = {}
        heads: dict[uuid.UUID, Head] = {}
        for e in events:
            state = encode_event(e)
            # Only an event larger than the threshold can hold an output that is.
            if limit is not None and len(state) > limit:
                state, found = offload(e.type_name(), state, limit)
                blobs.update(found)
            stored.append(StoredEvent(e.run_id, e.seq, topic_of(e), state))
            first = firsts.setdefault(e.run_id, e.seq)
            heads[e.run_id] = Head(e.run_id, e.seq, event_hash(e), first)
        return self._insert(stored, blobs, heads)

    def load(self, run_id: uuid.UUID, after: int = 0) -> list[Event]:
        """A run's events in order (those after position `after` in the run's stream)."""
        rows = self._recorder.select_events(run_id, gt=after or None)
        blobs = self._blobs_of(r.state for r in rows)
        return [
            decode_event(
                r.topic,
                self._whole(r.state, blobs, run_id, r.originator_version),
                run_id,
                r.originator_version,
            )
            for r in rows
        ]

    def read_log(self, after: int, limit: int = 1000) -> list[LoggedEvent]:
        """Events of all runs in commit order, starting after log position `after`."""
        rows = self._recorder.select_notifications(
            start=after, limit=limit, inclusive_of_start=False
        )
        blobs = self._blobs_of(n.state for n in rows)
        logged: list[LoggedEvent] = []
        for n in rows:
            run_id, seq = _as_uuid(n.originator_id), n.originator_version
            state = self._whole(n.state, blobs, run_id, seq)
            logged.append(LoggedEvent(n.id, decode_event(n.topic, state, run_id, seq)))
        return logged

    def append_rows(
        self, rows: Sequence[StoredRow], chain_from: Mapping[uuid.UUID, int] | None = None
    ) -> list[int]:
        """Store events as given (topic and JSON unchanged, e.g. an imported history that
        holds older versions) in one transaction, large outputs kept apart as by `append`;
        return their log positions. `chain_from`: per run, the first seq whose link covers the
        topic, when the rows hold links written before links did (default: their first)."""
        limit = self.blob_threshold
        blobs: dict[str, bytes] = {}
        stored: list[StoredEvent] = []
        heads: dict[uuid.UUID, Head] = {}
        for r in rows:
            state = r.state
            if state.startswith(MARKER):
                raise ValueError(f"event {r.seq} of run {r.run_id} is not an event: it has $blobs")
            link = link_hash(r.topic, json.loads(state), r.run_id, r.seq)
            first = (chain_from or {}).get(r.run_id)
            if first is None:
                first = heads[r.run_id].chain_from if r.run_id in heads else r.seq
            heads[r.run_id] = Head(r.run_id, r.seq, link, first)
            if limit is not None and len(state) > limit:
                name = r.topic.partition("@")[0]
                state, found = offload(name, state, limit)
                blobs.update(found)
            stored.append(StoredEvent(r.run_id, r.seq, r.topic, state))
        return self._insert(stored, blobs, heads)

    def rows(self, run_id: uuid.UUID, *, whole: bool = True) -> list[StoredRow]:
        """A run's events as stored, in the order of their positions in the run: whole (with
        the outputs kept apart put back, those that cannot be named in `broken`), or
        (`whole=False`) exactly the bytes of the events table."""
        stored = self._recorder.select_events(run_id)
        if not whole:
            return [StoredRow(run_id, r.originator_version, r.topic, r.state) for r in stored]
        blobs = self._blobs_of(r.state for r in stored)
        rows: list[StoredRow] = []
        for r in stored:
            state, broken = r.state, list[BrokenBlob]()
            if state.startswith(MARKER):
                # Malformed references are left as stored: the chain check says it does not decode.
                with contextlib.suppress(ValueError):
                    state, broken = resolve(state, blobs)
            rows.append(StoredRow(run_id, r.originator_version, r.topic, state, tuple(broken)))
        return rows

    def _insert(
        self, stored: list[StoredEvent], blobs: dict[str, bytes], heads: dict[uuid.UUID, Head]
    ) -> list[int]:
        # Outputs kept apart and the runs' signed heads go in the events' transaction: an
        # event never refers to a missing output, and no append leaves a run's head behind.
        signing = Signing(self.chain_key(create=True), heads)
        try:
            if blobs:
                ids = self._recorder.insert_events(stored, blobs=blobs, heads=signing)
            else:
                ids = self._recorder.insert_events(stored, heads=signing)
        except IntegrityError as exc:
            raise ConcurrencyError(str(exc)) from exc
        return list(ids or [])

    def _blobs_of(self, states: Iterable[bytes]) -> dict[str, bytes]:
        """The outputs kept apart that these stored events refer to, by hash."""
        wanted: set[str] = set()
        for state in states:
            if state.startswith(MARKER):
                with contextlib.suppress(ValueError):  # resolving it says what is wrong
                    wanted.update(references(state))
        return self._blobs.select_blobs(sorted(wanted)) if wanted else {}

    @staticmethod
    def _whole(state: bytes, blobs: Mapping[str, bytes], run_id: uuid.UUID, seq: int) -> bytes:
        if not state.startswith(MARKER):
            return state
        try:
            whole, broken = resolve(state, blobs)
        except ValueError as exc:
            raise BlobError(f"event {seq} of run {run_id} cannot be read: {exc}") from None
        if broken:
            raise BlobError(
                f"event {seq} of run {run_id} cannot be read: {broken[0].message} "
                "(`cairn verify` checks the whole store)"
            )
        return whole

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
