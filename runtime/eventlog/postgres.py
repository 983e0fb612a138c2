"""The event store's PostgreSQL recorder: the library's, with the table of outputs kept apart
by content hash. Imported (by topic) only when the store is PostgreSQL, as it needs psycopg."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
from psycopg import Cursor
from psycopg.rows import DictRow
from psycopg.sql import SQL, Identifier


class PostgresBlobRecorder(PostgresApplicationRecorder):
    """Writes outputs kept apart in the events' transaction; an output stored before is not
    stored again."""

    def __init__(
        self, datastore: PostgresDatastore, *, events_table_name: str = "stored_events"
    ) -> None:
        super().__init__(datastore, events_table_name=events_table_name)
        table = SQL("{}.{}").format(Identifier(datastore.schema), Identifier("cairn_blobs"))
        self.sql_create_statements.append(
            SQL(
                "CREATE TABLE IF NOT EXISTS {} (sha256 text PRIMARY KEY, data bytea NOT NULL)"
            ).format(table)
        )
        self._insert_blob = SQL(
            "INSERT INTO {} (sha256, data) VALUES (%s, %s) ON CONFLICT (sha256) DO NOTHING"
        ).format(table)
        self._select_blobs = SQL("SELECT sha256, data FROM {} WHERE sha256 = ANY(%s)").format(table)

    def _insert_events(
        self, curs: Cursor[DictRow], stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> None:
        # Runs inside the transaction that inserts the events (the library keeps its database
        # functions off unless asked, and cairn does not ask). Sorted, so two writers sharing
        # outputs take their row locks in one order and cannot deadlock on them.
        blobs: Mapping[str, bytes] | None = kwargs.get("blobs")
        if blobs:
            curs.executemany(self._insert_blob, sorted(blobs.items()))
        super()._insert_events(curs, stored_events, **kwargs)

    def select_blobs(self, hashes: Sequence[str]) -> dict[str, bytes]:
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(self._select_blobs, (list(hashes),))
            return {row["sha256"]: bytes(row["data"]) for row in curs.fetchall()}
