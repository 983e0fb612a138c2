"""How far the projection has followed the log: its tracked position against the log's end."""

from __future__ import annotations

from datetime import datetime

from cairn.events import UnknownEventError
from cairn.projections.errors import ViewsMissingError
from cairn.projections.rows import ProjectionStatus
from cairn.projections.runner import PROJECTION_NAME, VIEW_NAMES
from cairn.projections.storage import open_reader, redacted
from cairn.runtime.eventlog.store import EventStore
from cairn.runtime.settings import Settings


def projection_status(settings: Settings) -> list[ProjectionStatus]:
    """The status of each projection (there is one today, keeping every view)."""
    store = EventStore.from_settings(settings)
    try:
        log_position = store.last_position()
        log_at = _time_at(store, log_position)
    finally:
        store.close()
    reader = open_reader(settings.views)
    try:
        try:
            position = reader.position(PROJECTION_NAME)
            text = reader.time_at(position) if position else None
            built = True
        except ViewsMissingError:
            position, text, built = 0, None, False
    finally:
        reader.close()
    return [
        ProjectionStatus(
            name=PROJECTION_NAME,
            views=list(VIEW_NAMES),
            location=redacted(settings.views),
            built=built,
            position=position,
            log_position=log_position,
            lag=max(log_position - position, 0),
            last_event_at=datetime.fromisoformat(text) if text else None,
            log_last_event_at=log_at,
        )
    ]


def _time_at(store: EventStore, position: int) -> datetime | None:
    if position <= 0:
        return None
    try:
        tail = store.read_log(position - 1, 1)
    except UnknownEventError:
        return None  # written by a newer cairn; the position alone still tells the lag
    return tail[0].event.at if tail and tail[0].position == position else None
