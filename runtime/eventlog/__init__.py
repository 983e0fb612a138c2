"""The event log: one stream per run in the `eventsourcing` library's recorders (SQLite by
default, PostgreSQL in production), with large outputs stored once by content hash."""

from cairn.runtime.eventlog.store import (
    ConcurrencyError,
    EventStore,
    LoggedEvent,
    RunNotFoundError,
    StoredRow,
    StoreUnavailableError,
)

__all__ = [
    "ConcurrencyError",
    "EventStore",
    "LoggedEvent",
    "RunNotFoundError",
    "StoreUnavailableError",
    "StoredRow",
]
