"""The event store's PostgreSQL recorder: the library's, with the table of outputs kept apart
by content hash and the table of signed checkpoints. Imported (by topic) only when the store is
PostgreSQL, as it needs psycopg."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
from psycopg import Cursor
from psycopg.rows import DictRow
from psycopg.sql import SQL, Identifier

from cairn.runtime.eventlog.checkpoints import STORE_ROW, Checkpoint, advance
from cairn.runtime.eventlog.store import (
    CHECKPOINT_COLUMNS,
    Signing,
    checkpoint_of,
    checkpoint_params,
)


class PostgresBlobRecorder(PostgresApplicationRecorder):
    """Writes outputs kept apart and signed checkpoints in the events' transaction; an output
    stored before is not stored again."""

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
        checkpoints = SQL("{}.{}").format(
            Identifier(datastore.schema), Identifier("cairn_checkpoints")
        )
        self.sql_create_statements.append(
            SQL(
                "CREATE TABLE IF NOT EXISTS {} (run_id text PRIMARY KEY, last_seq bigint NOT NULL, "
                "last_hash text NOT NULL, chain_from bigint NOT NULL, mac text NOT NULL)"
            ).format(checkpoints)
        )
        columns = SQL(CHECKPOINT_COLUMNS)
        self._select_heads = SQL("SELECT {} FROM {} WHERE run_id = ANY(%s)").format(
            columns, checkpoints
        )
        self._select_all_heads = SQL("SELECT {} FROM {}").format(columns, checkpoints)
        self._upsert_heads = SQL(
            "INSERT INTO {} ({}) VALUES (%s, %s, %s, %s, %s) ON CONFLICT (run_id) DO UPDATE SET "
            "last_seq = EXCLUDED.last_seq, last_hash = EXCLUDED.last_hash, "
            "chain_from = EXCLUDED.chain_from, mac = EXCLUDED.mac"
        ).format(checkpoints, columns)

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

    def _insert_stored_events(
        self, curs: Cursor[DictRow], stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> None:
        super()._insert_stored_events(curs, stored_events, **kwargs)
        signing: Signing | None = kwargs.get("heads")
        if signing is None:
            return
        # The events' table is locked (every writer takes that lock), so this read sees what
        # the last writer committed. Another cursor: this one holds the inserted ids.
        with curs.connection.cursor() as heads:
            wanted = [str(r) for r in (*signing.heads, STORE_ROW)]
            heads.execute(self._select_heads, (wanted,))
            found = {row["run_id"]: checkpoint_of(row) for row in heads.fetchall()}
            store = found.pop(str(STORE_ROW), None)
            before = {c.head.run_id: c for c in found.values()}
            rows = advance(signing.key, signing.heads, before, store)
            heads.executemany(self._upsert_heads, checkpoint_params(rows))

    def select_checkpoints(self) -> dict[uuid.UUID, Checkpoint]:
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(self._select_all_heads)
            return {(cp := checkpoint_of(row)).head.run_id: cp for row in curs.fetchall()}

    def select_blobs(self, hashes: Sequence[str]) -> dict[str, bytes]:
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(self._select_blobs, (list(hashes),))
            return {row["sha256"]: bytes(row["data"]) for row in curs.fetchall()}
