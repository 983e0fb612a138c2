"""The backends the views' contract tests run against, written once for both.

`sqlite`: the event store and the views in SQLite files under the test's home (the default).
`postgres`: both in one fresh schema on the server named by CAIRN_TEST_POSTGRES (the views
beside the store, as a deployment may keep them), dropped with every schema the test made.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

from test_store_contract import POSTGRES, fresh_schema, require_postgres

from cairn.runtime.settings import Settings

BACKENDS = ["sqlite", "postgres"]
VIEW_TABLES = {"runs": "run_id", "steps": "run_id, step", "costs": "position", "audit": "position"}


@contextmanager
def backend_settings(backend: str, home: Path) -> Iterator[Settings]:
    """Settings with the event store and the views on `backend`, cleaned up afterwards."""
    if backend == "sqlite":
        yield Settings(home=home)
        return
    require_postgres()
    schema = fresh_schema()
    url = f"{POSTGRES}?schema={schema}"
    try:
        yield Settings(home=home, store_url=url, views_url=url)
    finally:
        drop_schemas(schema)


def is_postgres(url: str) -> bool:
    return url.startswith("postgresql://")


def schema_of(url: str) -> str:
    return url.partition("?schema=")[2]


def other_views(settings: Settings, name: str) -> str:
    """Another, empty views location on the backend of `settings.views`."""
    if not is_postgres(settings.views):
        return str(settings.home / f"{name}.db")
    return f"{POSTGRES}?schema={schema_of(settings.views)}_{name}"


def drop_schemas(prefix: str) -> None:
    """Drop every schema whose name starts with `prefix`."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(POSTGRES, autocommit=True) as conn:
        names = conn.execute(
            "SELECT nspname FROM pg_namespace WHERE left(nspname, length(%s)) = %s",
            (prefix, prefix),
        ).fetchall()
        for (name,) in names:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def raw_sql(views: str, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """One statement on the views' own database (`?` for parameters), to look or tamper."""
    if is_postgres(views):
        import psycopg
        from psycopg import sql

        with psycopg.connect(views.partition("?")[0], autocommit=True) as conn:
            conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema_of(views))))
            cur = conn.execute(statement.replace("?", "%s"), params)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []
    db = sqlite3.connect(views)
    try:
        with db:
            return db.execute(statement, params).fetchall()
    finally:
        db.close()


def tracking_table(views: str) -> str:
    return "cairn_views_tracking" if is_postgres(views) else "tracking"


def dump(views: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every view table and the tracking positions, in key order, with amounts
    as plain decimal text: the same rows read the same from either backend."""
    order = {**VIEW_TABLES, tracking_table(views): "application_name"}
    return {
        table.removeprefix("cairn_views_"): [
            tuple(f"{v:f}" if isinstance(v, Decimal) else v for v in row)
            for row in raw_sql(views, f"SELECT * FROM {table} ORDER BY {key}")
        ]
        for table, key in order.items()
    }
