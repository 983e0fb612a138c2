"""The views in a SQLite file: the only module of the projections that knows SQL.

Writing goes through `SQLiteViewsRecorder`, an eventsourcing tracking recorder, so each batch
of row changes and the tracking position commit in one transaction (exactly-once). Reading
goes through `SQLiteViewsReader`, a read-only connection that never creates the file.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import fields
from decimal import Decimal
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eventsourcing.persistence import InfrastructureFactory, PersistenceError, Tracking
from eventsourcing.sqlite import SQLiteCursor, SQLiteTrackingRecorder

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
from cairn.runtime.crashpoints import crash_point

if TYPE_CHECKING:
    from cairn.runtime.eventlog.store import LoggedEvent


def _layout(row: type[Any], types: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """Columns (name, SQL type) of the table that stores `row`s, checked against its fields."""
    names = list(row._fields) if hasattr(row, "_fields") else [f.name for f in fields(row)]
    if names != list(types):
        raise RuntimeError(f"the {row.__name__} fields and their view columns differ")
    return tuple(types.items())


# Each table holds exactly the fields of its row class, in their order: rows are written from
# and read back into those classes by position.
RUN_COLUMNS = _layout(
    StoredRun,
    {
        "run_id": "TEXT PRIMARY KEY",
        "workflow": "TEXT NOT NULL",
        "workflow_version": "INTEGER NOT NULL",
        "goal": "TEXT NOT NULL",
        "status": "TEXT NOT NULL",
        "current_step": "TEXT",
        "started_at": "TEXT NOT NULL",
        "updated_at": "TEXT NOT NULL",
        "finished_at": "TEXT",
        "steps_total": "INTEGER NOT NULL",
        "steps_done": "INTEGER NOT NULL",
        "attempts": "INTEGER NOT NULL",
        "cost_usd": "TEXT NOT NULL",  # exact decimal
        "error": "TEXT",
        "output": "TEXT",  # JSON
        "last_seq": "INTEGER NOT NULL",
        "last_position": "INTEGER NOT NULL",
        "tenant": "TEXT NOT NULL",
    },
)
STEP_COLUMNS = _layout(
    StoredStep,
    {
        "run_id": "TEXT NOT NULL",
        "step": "TEXT NOT NULL",
        "capability": "TEXT NOT NULL",
        "status": "TEXT NOT NULL",
        "attempt": "INTEGER NOT NULL",
        "agent_id": "TEXT",
        "dispatched_at": "TEXT",
        "finished_at": "TEXT",
        "cost_usd": "TEXT NOT NULL",
        "input_tokens": "TEXT NOT NULL",  # exact integer, any size
        "output_tokens": "TEXT NOT NULL",
    },
)
COST_COLUMNS = _layout(
    CostEntry,
    {
        "position": "INTEGER PRIMARY KEY",
        "run_id": "TEXT NOT NULL",
        "seq": "INTEGER NOT NULL",
        "at": "TEXT NOT NULL",
        "task_id": "TEXT NOT NULL",
        "step": "TEXT NOT NULL",
        "capability": "TEXT NOT NULL",
        "agent_id": "TEXT NOT NULL",
        "model": "TEXT NOT NULL",
        "input_tokens": "TEXT NOT NULL",  # exact integer, any size
        "output_tokens": "TEXT NOT NULL",
        "price_table": "TEXT NOT NULL",
        "tenant": "TEXT NOT NULL",
        "day": "TEXT NOT NULL",
        "amount_usd": "TEXT NOT NULL",  # exact decimal
    },
)
AUDIT_COLUMNS = _layout(
    AuditEntry,
    {
        "position": "INTEGER PRIMARY KEY",
        "run_id": "TEXT NOT NULL",
        "seq": "INTEGER NOT NULL",
        "at": "TEXT NOT NULL",
        "actor": "TEXT NOT NULL",
        "action": "TEXT NOT NULL",
        "step": "TEXT",
        "reason": "TEXT NOT NULL",
        "detail": "TEXT NOT NULL",
        "trace_id": "TEXT",
    },
)
_RUN_COST = [n for n, _ in RUN_COLUMNS].index("cost_usd")
_STEP_COST = [n for n, _ in STEP_COLUMNS].index("cost_usd")
# Token counts are kept as decimal text: SQLite's integers end at 2**63 - 1, and the read side
# must hold every count an event can carry.
_STEP_TOKENS = [i for i, (n, _) in enumerate(STEP_COLUMNS) if n.endswith("_tokens")]
_COST_TOKENS = [i for i, (n, _) in enumerate(COST_COLUMNS) if n.endswith("_tokens")]

VIEW_TABLES = ("runs", "steps", "costs", "audit")


def _create(table: str, columns: tuple[tuple[str, str], ...], suffix: str = "") -> str:
    body = ", ".join(f"{name} {kind}" for name, kind in columns)
    return f"CREATE TABLE IF NOT EXISTS {table} ({body}{suffix})"


def _insert(table: str, columns: tuple[tuple[str, str], ...], verb: str = "INSERT") -> str:
    names = ", ".join(name for name, _ in columns)
    marks = ", ".join("?" for _ in columns)
    return f"{verb} INTO {table} ({names}) VALUES ({marks})"


def _names(columns: tuple[tuple[str, str], ...]) -> str:
    return ", ".join(name for name, _ in columns)


VIEW_TABLE_STATEMENTS = [
    _create("runs", RUN_COLUMNS) + " WITHOUT ROWID",
    _create("steps", STEP_COLUMNS, ", PRIMARY KEY (run_id, step)") + " WITHOUT ROWID",
    _create("costs", COST_COLUMNS),
    _create("audit", AUDIT_COLUMNS),
]
# The secondary indexes. A rebuild creates them after loading the tables, which is several
# times cheaper than keeping them up to date row by row; a rebuild that dies half way gets
# them back when the next recorder opens the file (these statements run on every open).
VIEW_INDEX_STATEMENTS = [
    "CREATE INDEX IF NOT EXISTS runs_by_start ON runs (started_at)",
    "CREATE INDEX IF NOT EXISTS costs_by_run ON costs (run_id)",
    # The audit filters (`cairn audit --run/--actor/--type/--since`); each index also carries
    # the rowid (position), the order rows are returned in.
    "DROP INDEX IF EXISTS audit_by_run",  # superseded by audit_by_run_seq
    "CREATE INDEX IF NOT EXISTS audit_by_run_seq ON audit (run_id, seq)",
    "CREATE INDEX IF NOT EXISTS audit_by_actor ON audit (actor)",
    "CREATE INDEX IF NOT EXISTS audit_by_action ON audit (action)",
    "CREATE INDEX IF NOT EXISTS audit_by_time ON audit (at)",
]
VIEW_STATEMENTS = VIEW_TABLE_STATEMENTS + VIEW_INDEX_STATEMENTS

# Whole rows are rewritten: a batch holds each touched row complete in memory anyway.
_UPSERT_RUN = _insert("runs", RUN_COLUMNS, "INSERT OR REPLACE")
_UPSERT_STEP = _insert("steps", STEP_COLUMNS, "INSERT OR REPLACE")
_INSERT_COST = _insert("costs", COST_COLUMNS)
_INSERT_AUDIT = _insert("audit", AUDIT_COLUMNS)
# Table and column names below come from the constants above, never from input.
_SELECT_RUNS = f"SELECT {_names(RUN_COLUMNS)} FROM runs WHERE run_id IN "  # noqa: S608
_SELECT_STEPS = f"SELECT {_names(STEP_COLUMNS)} FROM steps WHERE run_id IN "  # noqa: S608
_RECENT_RUNS = "SELECT * FROM runs ORDER BY started_at DESC, run_id DESC LIMIT ?"
_RECENT_RUNS_WITH_STATUS = (
    "SELECT * FROM runs WHERE status=? ORDER BY started_at DESC, run_id DESC LIMIT ?"
)
_CHARGES_BY = {
    column: f"SELECT {column}, input_tokens, output_tokens, amount_usd FROM costs"  # noqa: S608
    for column in ("run_id", "capability", "model", "tenant", "day")
}
_CHARGE_DETAILS = {
    column: f"SELECT {column}, model, input_tokens, output_tokens, amount_usd FROM costs"  # noqa: S608
    for column in ("run_id", "capability", "model", "tenant", "day")
}
# A write that changes nothing, issued first so the transaction holds SQLite's write lock
# before it reads the tracked position and the rows it will fold into (no stale snapshot).
_TAKE_WRITE_LOCK = "UPDATE tracking SET notification_id = notification_id WHERE application_name=?"
# SQLite's limit on bound parameters is 32766 since 3.32; stay far below it.
_IN_CHUNK = 500


class SQLiteViewsRecorder(SQLiteTrackingRecorder):
    """Keeps the view tables and the projection's tracking position in one SQLite file."""

    def construct_create_table_statements(self) -> list[str]:
        return [*super().construct_create_table_statements(), *VIEW_STATEMENTS]

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
            c.execute(_TAKE_WRITE_LOCK, (name,))
            c.execute(self.select_max_tracking_id_statement, (name,))
            current = c.fetchone()[0] or 0
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

        With `indexes=False` the secondary indexes are left for `create_indexes` (a rebuild
        creates them once the tables are full).
        """
        with self.datastore.transaction(commit=True) as c:
            for table in VIEW_TABLES:
                c.execute(f"DROP TABLE IF EXISTS {table}")
            c.execute("DELETE FROM tracking WHERE application_name=?", (name,))
            # Only the view tables: re-running the tracking table's creation would redo the
            # library's migration bookkeeping.
            for statement in VIEW_STATEMENTS if indexes else VIEW_TABLE_STATEMENTS:
                c.execute(statement)

    def reset(self) -> None:
        """Drop every view table and every projection's position: the runner rebuilds them."""
        with self.datastore.transaction(commit=True) as c:
            for table in VIEW_TABLES:
                c.execute(f"DROP TABLE IF EXISTS {table}")
            c.execute(
                "DELETE FROM tracking WHERE application_name != ?",
                (self.table_migration_identifier,),
            )
            for statement in VIEW_STATEMENTS:
                c.execute(statement)

    def layout_matches(self) -> bool:
        """Whether the view tables in the file have the columns this code writes (a file
        from an older cairn may not: then the views are dropped and rebuilt from the log)."""
        expected = {
            "runs": RUN_COLUMNS, "steps": STEP_COLUMNS, "costs": COST_COLUMNS,
            "audit": AUDIT_COLUMNS,
        }  # fmt: skip
        with self.datastore.transaction(commit=False) as c:
            for table, columns in expected.items():
                c.execute(f"PRAGMA table_info({table})")
                found = [(row[1], row[2]) for row in c.fetchall()]
                if found != [(name, kind.split()[0]) for name, kind in columns]:
                    return False
        return True

    def create_indexes(self) -> None:
        """Create the views' secondary indexes that do not exist yet."""
        with self.datastore.transaction(commit=True) as c:
            for statement in VIEW_INDEX_STATEMENTS:
                c.execute(statement)

    def close(self) -> None:
        self.datastore.close()

    @staticmethod
    def _select_runs(c: SQLiteCursor, run_ids: list[str]) -> dict[str, StoredRun]:
        runs: dict[str, StoredRun] = {}
        for row in _select_in(c, _SELECT_RUNS, run_ids):
            values = list(row)
            values[_RUN_COST] = Decimal(values[_RUN_COST])
            run = StoredRun(*values)
            runs[run.run_id] = run
        return runs

    @staticmethod
    def _select_steps(c: SQLiteCursor, run_ids: list[str]) -> dict[StepKey, StoredStep]:
        steps: dict[StepKey, StoredStep] = {}
        for row in _select_in(c, _SELECT_STEPS, run_ids):
            values = list(row)
            values[_STEP_COST] = Decimal(values[_STEP_COST])
            for i in _STEP_TOKENS:
                values[i] = int(values[i])
            step = StoredStep(*values)
            steps[(step.run_id, step.step)] = step
        return steps

    @staticmethod
    def _write(c: SQLiteCursor, changes: ViewChanges) -> None:
        c.executemany(_UPSERT_RUN, [_run_params(r) for r in changes.runs.values()])
        c.executemany(_UPSERT_STEP, [_step_params(s) for s in changes.steps.values()])
        if changes.costs:
            c.executemany(_INSERT_COST, [_cost_params(e) for e in changes.costs])
        c.executemany(_INSERT_AUDIT, changes.audit)


_run_values = attrgetter(*(name for name, _ in RUN_COLUMNS))
_step_values = attrgetter(*(name for name, _ in STEP_COLUMNS))


def _run_params(run: StoredRun) -> list[Any]:
    params = list(_run_values(run))
    params[_RUN_COST] = f"{run.cost_usd:f}"  # plain notation, never 1E-7
    return params


def _step_params(step: StoredStep) -> list[Any]:
    params = list(_step_values(step))
    params[_STEP_COST] = f"{step.cost_usd:f}"
    for i in _STEP_TOKENS:
        params[i] = str(params[i])
    return params


def _cost_params(entry: CostEntry) -> list[Any]:
    params: list[Any] = list(entry)
    params[-1] = f"{entry.amount_usd:f}"
    for i in _COST_TOKENS:
        params[i] = str(params[i])
    return params


def _select_in(c: SQLiteCursor, statement: str, keys: list[str]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(keys), _IN_CHUNK):
        chunk = keys[start : start + _IN_CHUNK]
        c.execute(statement + f"({', '.join('?' * len(chunk))})", chunk)
        yield from c.fetchall()


def _audit_where(where: AuditFilter) -> tuple[list[str], list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if where.run_id is not None:
        clauses.append("run_id=?")
        params.append(where.run_id)
    if where.actor is not None:
        clauses.append("actor=?")
        params.append(where.actor)
    if where.actor_prefix:
        clauses.append("actor >= ? AND actor < ?")
        params += [where.actor_prefix, after_prefix(where.actor_prefix)]
    if where.actions:
        clauses.append(f"action IN ({', '.join('?' * len(where.actions))})")
        params += where.actions
    if where.since is not None:
        clauses.append("at >= ?")
        params.append(where.since)
    if where.until is not None:
        clauses.append("at <= ?")
        params.append(where.until)
    return clauses, params


def open_sqlite_recorder(env: dict[str, str]) -> SQLiteViewsRecorder:
    """Open (creating if needed) the views file named by eventsourcing settings `env`."""
    path = env["SQLITE_DBNAME"]
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        factory: InfrastructureFactory[Any] = InfrastructureFactory.construct(env)
        recorder = factory.tracking_recorder(SQLiteViewsRecorder)
    except (PersistenceError, OSError, sqlite3.Error) as exc:
        raise ViewsUnavailableError(
            f"cannot open the views (SQLite file {path}): {exc}. "
            "Check the path in CAIRN_VIEWS and that its folder is writable."
        ) from exc
    assert isinstance(recorder, SQLiteViewsRecorder)
    if not recorder.layout_matches():
        recorder.reset()
    return recorder


class SQLiteViewsReader:
    """Read-only access to the view tables; raises ViewsMissingError until they exist."""

    def __init__(self, path: str, lock_timeout: float = 30.0) -> None:
        self.path = path
        self.lock_timeout = lock_timeout
        self._conn: sqlite3.Connection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def position(self, name: str) -> int:
        rows = self._query("SELECT notification_id FROM tracking WHERE application_name=?", name)
        return int(rows[0][0]) if rows else 0

    def runs(self, status: str | None, limit: int) -> list[dict[str, Any]]:
        if status is None:
            return self._dicts(_RECENT_RUNS, limit)
        return self._dicts(_RECENT_RUNS_WITH_STATUS, status, limit)

    def run(self, run_id: str) -> dict[str, Any] | None:
        rows = self._dicts("SELECT * FROM runs WHERE run_id=?", run_id)
        return rows[0] if rows else None

    def run_ids_with_prefix(self, prefix: str, limit: int) -> list[str]:
        # Run ids are lowercase hex and dashes, all of which sort below "g": a range scan on
        # the primary key finds every id starting with the prefix.
        rows = self._query(
            "SELECT run_id FROM runs WHERE run_id >= ? AND run_id < ? ORDER BY run_id LIMIT ?",
            prefix,
            prefix + "g",
            limit,
        )
        return [str(r[0]) for r in rows]

    def steps(self, run_id: str) -> list[dict[str, Any]]:
        return self._dicts(
            "SELECT * FROM steps WHERE run_id=? "
            "ORDER BY dispatched_at IS NULL, dispatched_at, step",
            run_id,
        )

    def audit(self, where: AuditFilter, limit: int | None) -> list[dict[str, Any]]:
        """The audit rows that match `where`, oldest first: all of them, or the last `limit`."""
        clauses, params = _audit_where(where)
        statement = "SELECT * FROM audit"
        if clauses:
            statement += " WHERE " + " AND ".join(clauses)
        if limit is None:
            return self._dicts(statement + " ORDER BY position", *params)
        rows = self._dicts(statement + " ORDER BY position DESC LIMIT ?", *params, limit)
        rows.reverse()
        return rows

    def time_at(self, position: int) -> str | None:
        """When the event at log `position` was recorded (None if the views do not hold it)."""
        rows = self._query("SELECT at FROM audit WHERE position=?", position)
        return str(rows[0][0]) if rows else None

    def charges(self, key: str, run_id: str | None) -> list[tuple[str, int, int, str]]:
        """(key, input tokens, output tokens, amount text) of every charge.

        `key` is the column to group by: run_id, capability or model.
        """
        try:
            statement = _CHARGES_BY[key]
        except KeyError:
            raise ValueError(f"cannot group costs by {key!r}") from None
        if run_id is None:
            rows = self._query(statement)
        else:
            rows = self._query(statement + " WHERE run_id=?", run_id)
        return [(str(r[0]), int(r[1]), int(r[2]), str(r[3])) for r in rows]

    def charge_details(
        self, key: str, run_id: str | None, day: str | None = None
    ) -> list[tuple[str, str, int, int, str]]:
        """(key, model, input tokens, output tokens, amount text) of every charge (of one run,
        of one UTC day): what a recomputation under another price table needs."""
        statement = _CHARGE_DETAILS[key]
        where = {"run_id": run_id, "day": day}
        params = [v for v in where.values() if v is not None]
        conditions = [f"{column}=?" for column, v in where.items() if v is not None]
        if conditions:
            statement += " WHERE " + " AND ".join(conditions)
        rows = self._query(statement, *params)
        return [(str(r[0]), str(r[1]), int(r[2]), int(r[3]), str(r[4])) for r in rows]

    def _dicts(self, statement: str, *params: Any) -> list[dict[str, Any]]:
        return [dict(row) for row in self._query(statement, *params)]

    def _query(self, statement: str, *params: Any) -> list[sqlite3.Row]:
        conn = self._connect()
        try:
            return conn.execute(statement, params).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                raise ViewsMissingError(self.path) from None
            raise ViewsUnavailableError(f"cannot read the views at {self.path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            raise ViewsUnavailableError(f"cannot read the views at {self.path}: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        path = Path(self.path)
        if not path.is_file():
            raise ViewsMissingError(self.path)
        try:
            # mode=ro: a reader must never create an empty views file the runner did not build.
            conn = sqlite3.connect(
                f"{path.absolute().as_uri()}?mode=ro",
                uri=True,
                timeout=self.lock_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise ViewsUnavailableError(f"cannot open the views at {self.path}: {exc}") from exc
        conn.row_factory = sqlite3.Row
        self._conn = conn
        return conn
