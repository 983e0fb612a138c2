"""The views in PostgreSQL: the same tables, rows and guarantees as `sqlite_views.py`.

Writing goes through `PostgresViewsRecorder`, an eventsourcing tracking recorder, so each batch
of row changes and the tracking position commit in one transaction (exactly-once). Reading goes
through `PostgresViewsReader`, which never creates anything. The views may share the event
store's database and schema (they keep their own tracking table) or live in another; `?schema=`
in the DSN picks the schema, created if missing. Imported only for a PostgreSQL views URL, as it
needs psycopg.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from operator import attrgetter
from typing import TYPE_CHECKING, Any, cast

import psycopg
from eventsourcing.persistence import InfrastructureFactory, PersistenceError, Tracking
from eventsourcing.postgres import PostgresDatastore, PostgresFactory, PostgresTrackingRecorder
from psycopg import Cursor, sql
from psycopg.rows import DictRow, dict_row

from cairn.projections.errors import (
    ProjectionConflictError,
    ViewsMissingError,
    ViewsUnavailableError,
)
from cairn.projections.filters import AuditFilter, after_prefix
from cairn.projections.projection import (
    AuditEntry,
    CostEntry,
    StepKey,
    StoredRun,
    StoredStep,
    ViewChanges,
    fold,
    touched_runs,
)
from cairn.projections.sqlite_views import VIEW_TABLES
from cairn.projections.sqlite_views import _layout as layout
from cairn.runtime.crashpoints import crash_point

if TYPE_CHECKING:
    from cairn.runtime.eventlog.store import LoggedEvent

# Text compares and sorts by code point, as in SQLite, whatever the database's collation: run id
# and actor prefixes are answered as ranges, and ISO times compare as text.
TEXT = 'text COLLATE "C"'
MONEY = "numeric"  # exact decimals, as charged
COUNT = "numeric"  # token counts: exact integers of any size (bigint ends at 2**63 - 1)

RUN_COLUMNS = layout(
    StoredRun,
    {
        "run_id": f"{TEXT} PRIMARY KEY",
        "workflow": f"{TEXT} NOT NULL",
        "workflow_version": "bigint NOT NULL",
        "goal": f"{TEXT} NOT NULL",
        "status": f"{TEXT} NOT NULL",
        "current_step": TEXT,
        "started_at": f"{TEXT} NOT NULL",
        "updated_at": f"{TEXT} NOT NULL",
        "finished_at": TEXT,
        "steps_total": "bigint NOT NULL",
        "steps_done": "bigint NOT NULL",
        "attempts": "bigint NOT NULL",
        "cost_usd": f"{MONEY} NOT NULL",
        "error": TEXT,
        "output": TEXT,  # canonical JSON, kept as written
        "last_seq": "bigint NOT NULL",
        "last_position": "bigint NOT NULL",
        "tenant": f"{TEXT} NOT NULL",
    },
)
STEP_COLUMNS = layout(
    StoredStep,
    {
        "run_id": f"{TEXT} NOT NULL",
        "step": f"{TEXT} NOT NULL",
        "capability": f"{TEXT} NOT NULL",
        "status": f"{TEXT} NOT NULL",
        "attempt": "bigint NOT NULL",
        "agent_id": TEXT,
        "dispatched_at": TEXT,
        "finished_at": TEXT,
        "cost_usd": f"{MONEY} NOT NULL",
        "input_tokens": f"{COUNT} NOT NULL",
        "output_tokens": f"{COUNT} NOT NULL",
    },
)
COST_COLUMNS = layout(
    CostEntry,
    {
        "position": "bigint PRIMARY KEY",
        "run_id": f"{TEXT} NOT NULL",
        "seq": "bigint NOT NULL",
        "at": f"{TEXT} NOT NULL",
        "task_id": f"{TEXT} NOT NULL",
        "step": f"{TEXT} NOT NULL",
        "capability": f"{TEXT} NOT NULL",
        "agent_id": f"{TEXT} NOT NULL",
        "model": f"{TEXT} NOT NULL",
        "input_tokens": f"{COUNT} NOT NULL",
        "output_tokens": f"{COUNT} NOT NULL",
        "price_table": f"{TEXT} NOT NULL",
        "tenant": f"{TEXT} NOT NULL",
        "day": f"{TEXT} NOT NULL",
        "amount_usd": f"{MONEY} NOT NULL",
    },
)
AUDIT_COLUMNS = layout(
    AuditEntry,
    {
        "position": "bigint PRIMARY KEY",
        "run_id": f"{TEXT} NOT NULL",
        "seq": "bigint NOT NULL",
        "at": f"{TEXT} NOT NULL",
        "actor": f"{TEXT} NOT NULL",
        "action": f"{TEXT} NOT NULL",
        "step": TEXT,
        "reason": f"{TEXT} NOT NULL",
        "detail": f"{TEXT} NOT NULL",
        "trace_id": TEXT,
    },
)
_LAYOUT = {
    "runs": RUN_COLUMNS,
    "steps": STEP_COLUMNS,
    "costs": COST_COLUMNS,
    "audit": AUDIT_COLUMNS,
}

# The views' own tracking table: sharing the store's schema, they must not share its positions
# (a reset forgets every position in this table).
TRACKING_TABLE = "cairn_views_tracking"
# The key of the advisory lock the event store takes while it sets up: every setup of cairn's
# tables in one database takes turns, as processes start together and PostgreSQL's
# `CREATE ... IF NOT EXISTS` races.
SETUP_LOCK_KEY = 0x636169726E  # "cairn"


def _names(columns: tuple[tuple[str, str], ...]) -> str:
    return ", ".join(name for name, _ in columns)


class _Statements:
    """Every statement on the view tables, for one schema. Table and column names come from
    the constants above, never from input."""

    def __init__(self, schema: str) -> None:
        self.schema = schema

        def q(template: str) -> sql.Composed:
            return sql.SQL(template).format(s=sql.Identifier(schema))

        self.tables = [
            q(f"CREATE TABLE IF NOT EXISTS {{s}}.{table} ({_body(columns)}{_key(table)})")
            for table, columns in _LAYOUT.items()
        ]
        # For the queries' filters and orders; a rebuild creates them once the tables are full,
        # as in SQLite.
        self.indexes = [
            q("CREATE INDEX IF NOT EXISTS runs_by_start ON {s}.runs (started_at, run_id)"),
            q("CREATE INDEX IF NOT EXISTS costs_by_run ON {s}.costs (run_id)"),
            q("CREATE INDEX IF NOT EXISTS audit_by_run_seq ON {s}.audit (run_id, seq)"),
            q("CREATE INDEX IF NOT EXISTS audit_by_actor ON {s}.audit (actor, position)"),
            q("CREATE INDEX IF NOT EXISTS audit_by_action ON {s}.audit (action, position)"),
            q("CREATE INDEX IF NOT EXISTS audit_by_time ON {s}.audit (at, position)"),
        ]
        self.drop = [q(f"DROP TABLE IF EXISTS {{s}}.{table}") for table in VIEW_TABLES]
        self.upsert_run = q(_upsert("runs", RUN_COLUMNS, "run_id"))
        self.upsert_step = q(_upsert("steps", STEP_COLUMNS, "run_id, step"))
        # New cost and audit rows are copied in: far cheaper than a statement per row, and a
        # rebuild writes one audit row per event.
        self.copy_costs = q(f"COPY {{s}}.costs ({_names(COST_COLUMNS)}) FROM STDIN")
        self.copy_audit = q(f"COPY {{s}}.audit ({_names(AUDIT_COLUMNS)}) FROM STDIN")
        self.select_runs = q(
            f"SELECT {_names(RUN_COLUMNS)} FROM {{s}}.runs WHERE run_id = ANY(%s)"  # noqa: S608
        )
        self.select_steps = q(
            f"SELECT {_names(STEP_COLUMNS)} FROM {{s}}.steps WHERE run_id = ANY(%s)"  # noqa: S608
        )
        self.recent_runs = q(
            "SELECT * FROM {s}.runs ORDER BY started_at DESC, run_id DESC LIMIT %s"
        )
        self.recent_runs_with_status = q(
            "SELECT * FROM {s}.runs WHERE status = %s "
            "ORDER BY started_at DESC, run_id DESC LIMIT %s"
        )
        self.run = q("SELECT * FROM {s}.runs WHERE run_id = %s")
        self.run_ids = q(
            "SELECT run_id FROM {s}.runs WHERE run_id >= %s AND run_id < %s "
            "ORDER BY run_id LIMIT %s"
        )
        self.steps = q(
            "SELECT * FROM {s}.steps WHERE run_id = %s "
            "ORDER BY dispatched_at IS NULL, dispatched_at, step"
        )
        self.time_at = q("SELECT at FROM {s}.audit WHERE position = %s")
        self.audit = q("SELECT * FROM {s}.audit")
        self.charges = {
            column: q(
                f"SELECT {column} AS key, model, input_tokens, output_tokens, amount_usd "  # noqa: S608
                "FROM {s}.costs"
            )
            for column in ("run_id", "capability", "model", "tenant", "day")
        }
        self.columns = sql.SQL(
            "SELECT table_name::text AS name, "
            "array_agg(column_name::text || ' ' || data_type::text ORDER BY ordinal_position) "
            "AS columns "
            "FROM information_schema.columns "
            "WHERE table_schema = %s AND table_name = ANY(%s) GROUP BY table_name"
        )


def _body(columns: tuple[tuple[str, str], ...]) -> str:
    return ", ".join(f"{name} {kind}" for name, kind in columns)


def _key(table: str) -> str:
    return ", PRIMARY KEY (run_id, step)" if table == "steps" else ""


def _upsert(table: str, columns: tuple[tuple[str, str], ...], key: str) -> str:
    """One statement for any number of rows: a parameter per column holds that column's values
    (an array), and whole rows are rewritten (a batch holds each touched row complete)."""
    arrays = ", ".join(f"%s::{kind.split()[0]}[]" for _, kind in columns)
    keys = {k.strip() for k in key.split(",")}
    updates = ", ".join(f"{n} = EXCLUDED.{n}" for n, _ in columns if n not in keys)
    return (
        f"INSERT INTO {{s}}.{table} ({_names(columns)}) SELECT * FROM unnest({arrays}) "  # noqa: S608
        f"ON CONFLICT ({key}) DO UPDATE SET {updates}"
    )


def _lock_key(schema: str) -> int:
    """The advisory lock that makes batches, drops and resets of one views schema take turns."""
    digest = hashlib.sha256(f"cairn-views:{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


_run_values = attrgetter(*(name for name, _ in RUN_COLUMNS))
_step_values = attrgetter(*(name for name, _ in STEP_COLUMNS))


def _type_name(kind: str) -> str:
    """A column's type as information_schema names it."""
    name = kind.split()[0]
    return {"text": "text", "bigint": "bigint", "numeric": "numeric"}.get(name, name)


def _text_safe(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """The row with NUL characters (which PostgreSQL's text cannot hold) shown as U+FFFD,
    so a committed event whose text has one still folds into the views."""
    if not any(isinstance(v, str) and "\x00" in v for v in row):
        return row
    return tuple(v.replace("\x00", "\ufffd") if isinstance(v, str) else v for v in row)


def _by_column(rows: Iterable[tuple[Any, ...]]) -> list[list[Any]]:
    return [list(column) for column in zip(*rows, strict=True)]


class PostgresViewsRecorder(PostgresTrackingRecorder):
    """Keeps the view tables and the projection's tracking position in one PostgreSQL schema."""

    def __init__(self, datastore: PostgresDatastore) -> None:
        super().__init__(datastore, tracking_table_name=TRACKING_TABLE)
        self._sql = _Statements(datastore.schema)
        self._lock = _lock_key(datastore.schema)
        # The indexes come after the layout check (`open_postgres_recorder`): views of an older
        # layout may lack the columns they index.
        self.sql_create_statements += self._sql.tables
        tracking = sql.SQL("{}.{}").format(
            sql.Identifier(datastore.schema), sql.Identifier(TRACKING_TABLE)
        )
        self._forget = sql.SQL("DELETE FROM {} WHERE application_name = %s").format(tracking)
        self._forget_all = sql.SQL("DELETE FROM {} WHERE application_name != %s").format(tracking)

    def position(self, name: str) -> int:
        """The last log position projected under `name` (0 before the first batch)."""
        return self.max_tracking_id(name) or 0

    def project(self, name: str, batch: Sequence[LoggedEvent], after: int) -> None:
        """Fold `batch` (read after log position `after`) and commit it with its position.

        Raises ProjectionConflictError, having written nothing, if the tracked position is
        no longer `after` (another runner or a rebuild got there first).
        """
        if not batch:
            return
        with self.datastore.transaction(commit=True) as c:
            # Taken first, so the position and rows read below are not about to change.
            c.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock,))
            c.execute(self.max_tracking_id_statement, (name,))
            row = c.fetchone()
            current = (row["max"] if row else None) or 0
            if current != after:
                raise ProjectionConflictError(
                    f"views {name!r} are at position {current}, not {after}"
                )
            run_ids = touched_runs(batch)
            changes = fold(batch, self._select_runs(c, run_ids), self._select_steps(c, run_ids))
            self._write(c, changes)
            self._insert_tracking(c, Tracking(name, batch[-1].position))
            crash_point("views-before-commit")

    def drop(self, name: str, *, indexes: bool = True) -> None:
        """Empty the views: drop and re-create the view tables, forget the tracked position.

        With `indexes=False` the secondary indexes are left for `create_indexes`.
        """
        with self.datastore.transaction(commit=True) as c:
            c.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock,))
            for statement in self._sql.drop:
                c.execute(statement)
            c.execute(self._forget, (name,))
            for statement in self._sql.tables + (self._sql.indexes if indexes else []):
                c.execute(statement)

    def reset(self) -> None:
        """Drop every view table and every projection's position: the runner rebuilds them."""
        with self.datastore.transaction(commit=True) as c:
            c.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock,))
            for statement in self._sql.drop:
                c.execute(statement)
            c.execute(self._forget_all, (self.table_migration_identifier,))
            for statement in self._sql.tables + self._sql.indexes:
                c.execute(statement)

    def layout_matches(self) -> bool:
        """Whether the view tables have the columns this code writes (views from an older
        cairn may not: then they are dropped and rebuilt from the log)."""
        with self.datastore.transaction(commit=False) as c:
            c.execute(self._sql.columns, (self._sql.schema, list(_LAYOUT)))
            found = {row["name"]: row["columns"] for row in c.fetchall()}
        return all(
            found.get(t) == [f"{n} {_type_name(kind)}" for n, kind in cols]
            for t, cols in _LAYOUT.items()
        )

    def create_indexes(self) -> None:
        """Create the views' secondary indexes that do not exist yet."""
        with self.datastore.transaction(commit=True) as c:
            for statement in self._sql.indexes:
                c.execute(statement)

    def close(self) -> None:
        self.datastore.close()

    def _select_runs(self, c: Cursor[DictRow], run_ids: list[str]) -> dict[str, StoredRun]:
        c.execute(self._sql.select_runs, (run_ids,))
        return {row["run_id"]: StoredRun(**row) for row in c.fetchall()}

    def _select_steps(self, c: Cursor[DictRow], run_ids: list[str]) -> dict[StepKey, StoredStep]:
        c.execute(self._sql.select_steps, (run_ids,))
        steps = {}
        for row in c.fetchall():
            row["input_tokens"], row["output_tokens"] = (
                int(row["input_tokens"]),
                int(row["output_tokens"]),
            )
            steps[(row["run_id"], row["step"])] = StoredStep(**row)
        return steps

    def _write(self, c: Cursor[DictRow], changes: ViewChanges) -> None:
        if changes.runs:
            runs = (_text_safe(r) for r in map(_run_values, changes.runs.values()))
            c.execute(self._sql.upsert_run, _by_column(runs))
        if changes.steps:
            steps = (_text_safe(s) for s in map(_step_values, changes.steps.values()))
            c.execute(self._sql.upsert_step, _by_column(steps))
        for statement, rows in (
            (self._sql.copy_costs, changes.costs),
            (self._sql.copy_audit, changes.audit),
        ):
            if rows:
                with c.copy(statement) as copy:
                    for row in rows:
                        copy.write_row(_text_safe(row))


def connect_kwargs(env: dict[str, str]) -> dict[str, Any]:
    """psycopg connection arguments for eventsourcing settings `env` (from `store_env`)."""
    return {
        "dbname": env["POSTGRES_DBNAME"],
        "host": env["POSTGRES_HOST"],
        "port": int(env["POSTGRES_PORT"]),
        "user": env["POSTGRES_USER"],
        "password": env["POSTGRES_PASSWORD"] or None,
        "connect_timeout": int(env.get("POSTGRES_CONNECT_TIMEOUT", "5")),
    }


@contextmanager
def setup_lock(env: dict[str, str]) -> Iterator[None]:
    """Hold cairn's setup lock in the database of `env`; create its schema if missing."""
    with psycopg.connect(**connect_kwargs(env), autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (SETUP_LOCK_KEY,))
        try:
            schema = env.get("POSTGRES_SCHEMA")
            if schema:
                conn.execute(
                    sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema))
                )
            yield
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (SETUP_LOCK_KEY,))


def open_postgres_recorder(env: dict[str, str], where: str) -> PostgresViewsRecorder:
    """Open (creating if needed) the views in the PostgreSQL database of settings `env`;
    `where` names it in errors."""
    # One connection does the batches; a few more serve `position` to waiting threads.
    env = {**env, "POSTGRES_POOL_SIZE": "1", "POSTGRES_MAX_OVERFLOW": "4"}
    datastore: PostgresDatastore | None = None
    try:
        with setup_lock(env):
            factory = cast(PostgresFactory, InfrastructureFactory.construct(env))
            datastore = factory.datastore
            recorder = PostgresViewsRecorder(datastore)
            recorder.create_table()
            if not recorder.layout_matches():
                recorder.reset()
            recorder.create_indexes()
    except (PersistenceError, psycopg.Error, OSError) as exc:
        if datastore is not None:
            datastore.close()
        raise ViewsUnavailableError(
            f"cannot open the views ({where}): {_one_line(exc)}. "
            "Check the DSN in CAIRN_VIEWS and that the database server is running."
        ) from exc
    return recorder


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class PostgresViewsReader:
    """Read access to the view tables; raises ViewsMissingError until they exist.

    Connects on the first query and never creates anything; a dropped connection is opened
    again on the next query.
    """

    def __init__(self, env: dict[str, str], location: str, where: str) -> None:
        self.location = location
        self._where = where
        self._kwargs = connect_kwargs(env)
        self._sql = _Statements(env.get("POSTGRES_SCHEMA") or "public")
        self._conn: psycopg.Connection[DictRow] | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def position(self, name: str) -> int:
        statement = sql.SQL("SELECT notification_id FROM {}.{} WHERE application_name = %s")
        rows = self._query(
            statement.format(sql.Identifier(self._sql.schema), sql.Identifier(TRACKING_TABLE)),
            name,
        )
        return int(rows[0]["notification_id"]) if rows else 0

    def runs(self, status: str | None, limit: int) -> list[dict[str, Any]]:
        if status is None:
            return self._query(self._sql.recent_runs, limit)
        return self._query(self._sql.recent_runs_with_status, status, limit)

    def run(self, run_id: str) -> dict[str, Any] | None:
        rows = self._query(self._sql.run, run_id)
        return rows[0] if rows else None

    def run_ids_with_prefix(self, prefix: str, limit: int) -> list[str]:
        # Run ids are lowercase hex and dashes, all of which sort below "g".
        rows = self._query(self._sql.run_ids, prefix, prefix + "g", limit)
        return [str(r["run_id"]) for r in rows]

    def steps(self, run_id: str) -> list[dict[str, Any]]:
        return self._query(self._sql.steps, run_id)

    def audit(self, where: AuditFilter, limit: int | None) -> list[dict[str, Any]]:
        """The audit rows that match `where`, oldest first: all of them, or the last `limit`."""
        clauses, params = _audit_where(where)
        statement: sql.Composed = self._sql.audit
        if clauses:
            statement = sql.SQL(" WHERE ").join([statement, sql.SQL(" AND ").join(clauses)])
        if limit is None:
            return self._query(sql.Composed([statement, sql.SQL(" ORDER BY position")]), *params)
        rows = self._query(
            sql.Composed([statement, sql.SQL(" ORDER BY position DESC LIMIT %s")]), *params, limit
        )
        rows.reverse()
        return rows

    def time_at(self, position: int) -> str | None:
        """When the event at log `position` was recorded (None if the views do not hold it)."""
        rows = self._query(self._sql.time_at, position)
        return str(rows[0]["at"]) if rows else None

    def charges(self, key: str, run_id: str | None) -> list[tuple[str, int, int, str]]:
        """(key, input tokens, output tokens, amount text) of every charge."""
        if key not in self._sql.charges:
            raise ValueError(f"cannot group costs by {key!r}")
        return [(k, i, o, a) for k, _, i, o, a in self.charge_details(key, run_id)]

    def charge_details(
        self, key: str, run_id: str | None, day: str | None = None
    ) -> list[tuple[str, str, int, int, str]]:
        """(key, model, input tokens, output tokens, amount text) of every charge (of one run,
        of one UTC day)."""
        statement: sql.Composed = self._sql.charges[key]
        where = {"run_id": run_id, "day": day}
        conditions = [
            sql.SQL(f"{column} = %s") for column, value in where.items() if value is not None
        ]
        if conditions:
            statement = sql.SQL(" WHERE ").join([statement, sql.SQL(" AND ").join(conditions)])
        rows = self._query(statement, *(v for v in where.values() if v is not None))
        return [
            (
                str(r["key"]),
                str(r["model"]),
                int(r["input_tokens"]),
                int(r["output_tokens"]),
                f"{r['amount_usd']:f}",  # plain notation, exactly as charged
            )
            for r in rows
        ]

    def _query(self, statement: sql.Composed, *params: Any) -> list[dict[str, Any]]:
        for attempt in (1, 2):
            conn = self._connect()
            try:
                return conn.execute(statement, params).fetchall()
            except psycopg.errors.UndefinedTable:
                raise ViewsMissingError(self.location) from None
            except psycopg.OperationalError as exc:
                # The server closed the connection (a restart, a failover): open a new one once.
                self.close()
                if attempt == 2:
                    raise ViewsUnavailableError(
                        f"cannot read the views ({self._where}): {_one_line(exc)}"
                    ) from exc
            except psycopg.Error as exc:
                raise ViewsUnavailableError(
                    f"cannot read the views ({self._where}): {_one_line(exc)}"
                ) from exc
        raise AssertionError("unreachable")

    def _connect(self) -> psycopg.Connection[DictRow]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        try:
            self._conn = psycopg.connect(
                **self._kwargs,
                autocommit=True,
                row_factory=dict_row,
                application_name="cairn-views",
            )
        except psycopg.Error as exc:
            raise ViewsUnavailableError(
                f"cannot open the views ({self._where}): {_one_line(exc)}. "
                "Check the DSN in CAIRN_VIEWS and that the database server is running."
            ) from exc
        return self._conn


def _audit_where(where: AuditFilter) -> tuple[list[sql.Composable], list[Any]]:
    clauses: list[sql.Composable] = []
    params: list[Any] = []
    if where.run_id is not None:
        clauses.append(sql.SQL("run_id = %s"))
        params.append(where.run_id)
    if where.actor is not None:
        clauses.append(sql.SQL("actor = %s"))
        params.append(where.actor)
    if where.actor_prefix:
        clauses.append(sql.SQL("actor >= %s AND actor < %s"))
        params += [where.actor_prefix, after_prefix(where.actor_prefix)]
    if where.actions:
        clauses.append(sql.SQL("action = ANY(%s)"))
        params.append(list(where.actions))
    if where.since is not None:
        clauses.append(sql.SQL("at >= %s"))
        params.append(where.since)
    if where.until is not None:
        clauses.append(sql.SQL("at <= %s"))
        params.append(where.until)
    return clauses, params
