"""Waking the projection runner when a PostgreSQL event log grows: LISTEN/NOTIFY.

A trigger on the store's events table, installed once by the first runner that follows the
log, notifies a channel named for the store's schema at the commit of every append; the runner
listens on a connection of its own. A notice only says "read now": the runner still reads from
its tracked position, so a notice lost (while the connection was down, say) costs at most the
runner's fallback interval, never an event. Imported only for a PostgreSQL store.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging

import psycopg
from psycopg import sql

from cairn.projections.postgres_views import SETUP_LOCK_KEY, connect_kwargs

log = logging.getLogger(__name__)

# The table eventsourcing keeps the store's events in (an application recorder without a
# name, as `cairn.runtime.eventlog.store` opens it).
EVENTS_TABLE = "stored_events"
TRIGGER = "cairn_log_notify"
_MAX_NAME = 63  # PostgreSQL's limit on identifiers, channel names included
_RECONNECT_DELAYS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


def channel_for(schema: str) -> str:
    """The channel appends to the store in `schema` are announced on."""
    name = f"cairn_log_{schema}"
    if len(name.encode()) <= _MAX_NAME:
        return name
    return "cairn_log_" + hashlib.sha256(schema.encode()).hexdigest()[:32]


class LogNotices:
    """Notices of appends to the PostgreSQL event store of settings `env` (`store_env`).

    Call `start` first, then, around each read of the log: `arm` before it, `wait` after a
    read that found nothing. Reconnects by itself when the connection drops.
    """

    def __init__(self, env: dict[str, str]) -> None:
        self.schema = env.get("POSTGRES_SCHEMA") or "public"
        self.channel = channel_for(self.schema)
        self.subscribed = False  # the trigger is in place: appends will be announced
        self.received = 0  # notices received
        self.sessions = 0  # listening connections opened (more than one: it reconnected)
        self._kwargs = {
            **connect_kwargs(env),
            "autocommit": True,
            "application_name": "cairn-projections",
            # A connection that died without a word (a network partition) is noticed too.
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 3,
        }
        self._woken = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Install the trigger if it is missing and start listening.

        A database that refuses (no right to create the trigger, say) is logged and leaves
        `subscribed` False: the caller then polls.
        """
        try:
            conn = await self._listen()
        except psycopg.Error as exc:
            log.warning(
                "cannot follow the event log by notification (%s); polling it instead",
                " ".join(str(exc).split()),
            )
            return
        self.subscribed = True
        log.info("following the event log by notification on channel %s", self.channel)
        self._task = asyncio.create_task(self._follow(conn))

    def arm(self) -> None:
        """Forget the notices so far: call before reading the log."""
        self._woken.clear()

    async def wait(self, stop: asyncio.Event, timeout: float) -> bool:
        """Wait for a notice since `arm`, `stop`, or `timeout` seconds; True for a notice."""
        if self._woken.is_set():
            return True
        waits = {asyncio.ensure_future(self._woken.wait()), asyncio.ensure_future(stop.wait())}
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
        return self._woken.is_set()

    async def close(self) -> None:
        """Stop listening and close the connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _listen(self) -> psycopg.AsyncConnection[tuple[object, ...]]:
        conn = await psycopg.AsyncConnection.connect(**self._kwargs)
        try:
            await self._install_trigger(conn)
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
        except BaseException:
            await conn.close()
            raise
        self.sessions += 1
        return conn

    async def _follow(self, conn: psycopg.AsyncConnection[tuple[object, ...]] | None) -> None:
        failures = 0
        try:
            while True:
                try:
                    if conn is None:
                        conn = await self._listen()
                        log.info("listening for the event log's notices again")
                        self._woken.set()  # appends made while nobody listened
                        failures = 0
                    async for _ in conn.notifies():
                        self.received += 1
                        self._woken.set()
                except psycopg.Error as exc:
                    delay = _RECONNECT_DELAYS[min(failures, len(_RECONNECT_DELAYS) - 1)]
                    failures += 1
                    log.warning(
                        "lost the event log's notices (%s); reconnecting in %g s",
                        " ".join(str(exc).split()),
                        delay,
                    )
                else:
                    delay = _RECONNECT_DELAYS[0]  # the server closed the connection
                if conn is not None:
                    with contextlib.suppress(psycopg.Error):
                        await conn.close()
                    conn = None
                await asyncio.sleep(delay)
        finally:
            if conn is not None:
                with contextlib.suppress(psycopg.Error):
                    await conn.close()

    async def _install_trigger(self, conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
        """Create the trigger that announces appends, unless it exists (checked again under
        the setup lock, which runners starting together take in turn)."""
        if await self._has_trigger(conn):
            return
        schema = sql.Identifier(self.schema)
        function = sql.SQL("{}.{}").format(schema, sql.Identifier(TRIGGER))
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (SETUP_LOCK_KEY,))
            if await self._has_trigger(conn):
                return
            await conn.execute(
                sql.SQL(
                    "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql "
                    "AS $$ BEGIN PERFORM pg_notify({channel}, ''); RETURN NULL; END $$"
                ).format(function=function, channel=sql.Literal(self.channel))
            )
            # Once per statement, and PostgreSQL folds the notices of one transaction: a batch
            # of appends is one notice, delivered when it commits.
            await conn.execute(
                sql.SQL(
                    "CREATE TRIGGER {trigger} AFTER INSERT ON {schema}.{table} "
                    "FOR EACH STATEMENT EXECUTE FUNCTION {function}()"
                ).format(
                    trigger=sql.Identifier(TRIGGER),
                    schema=schema,
                    table=sql.Identifier(EVENTS_TABLE),
                    function=function,
                )
            )

    async def _has_trigger(self, conn: psycopg.AsyncConnection[tuple[object, ...]]) -> bool:
        cursor = await conn.execute(
            "SELECT 1 FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = %s AND t.tgname = %s",
            (self.schema, EVENTS_TABLE, TRIGGER),
        )
        return await cursor.fetchone() is not None
