"""What an audit query asks for, in the form the views' storage answers it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time


@dataclass(frozen=True)
class AuditFilter:
    """Which audit rows to return; every field that is set must match (an empty filter: all).

    Times are ISO text in UTC, the form the views store them in, so they compare as text.
    """

    run_id: str | None = None
    actor: str | None = None  # exact actor
    actor_prefix: str | None = None  # actors starting with this
    actions: tuple[str, ...] = ()  # event type names; any of them
    since: str | None = None  # at >= since
    until: str | None = None  # at <= until


def actor_match(actor: str) -> tuple[str | None, str | None]:
    """(exact, prefix) for an actor pattern: `agent:` and `agent:research*` are prefixes."""
    if actor.endswith("*"):
        return None, actor[:-1] or None
    if actor.endswith(":"):
        return None, actor
    return actor, None


def after_prefix(prefix: str) -> str:
    """The smallest text greater than every text starting with `prefix` (non-empty).

    SQLite compares text by its UTF-8 bytes, which orders like code points, so
    `prefix <= x < after_prefix(prefix)` holds exactly for the x that start with `prefix`, and
    an index answers it as a range.
    """
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def time_text(at: datetime) -> str:
    """A time as the views store it: ISO 8601 in UTC (a time without a zone is taken as UTC)."""
    text = at.isoformat()
    if text.endswith("+00:00"):
        return text  # events are stamped in UTC: the common case, kept cheap for the fold
    if at.tzinfo is None:
        return at.replace(tzinfo=UTC).isoformat()
    return at.astimezone(UTC).isoformat()


class BadInstantError(ValueError):
    """A time filter is neither an ISO date nor an ISO time."""


def parse_instant(text: str, name: str, *, end_of_day: bool) -> datetime:
    """An ISO date or time as an aware datetime (UTC when it names no zone); a date is its
    first or last instant. BadInstantError names `name` and what to give instead."""
    try:
        day = date.fromisoformat(text)
    except ValueError:
        pass
    else:
        return datetime.combine(day, time.max if end_of_day else time.min, UTC)
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise BadInstantError(
            f"{name} {text!r} is not an ISO date or time: give e.g. 2026-11-25 or "
            "2026-11-25T12:00:00Z"
        ) from None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)
