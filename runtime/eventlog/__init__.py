"""The event log: one stream per run in the `eventsourcing` library's recorders (SQLite by
default, PostgreSQL in production; `store.py`), with large outputs stored once by content hash
(`blobs.py`) and every run's head signed in the same transaction (`checkpoints.py`).

Importing this package loads none of its modules: `checkpoints` and `blobs` are plain Python,
`store` loads the `eventsourcing` library.
"""

__all__: list[str] = []
