"""Cost totals per UTC day, for the costs endpoint and page."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cairn.projections import Views
from cairn.projections.http.models import DayCost


def daily_costs(
    views: Views, days: int, now: datetime | None = None, run_id: str | None = None
) -> list[DayCost]:
    """The last `days` UTC days' charges, oldest first (days without any are left out)."""
    today = (now or datetime.now(UTC)).astimezone(UTC).date()
    first = (today - timedelta(days=days - 1)).isoformat()
    rows = views.costs(by="day", run_id=run_id)
    return sorted(
        (
            DayCost(day=r.key, amount_usd=r.amount_usd, charges=r.charges)
            for r in rows
            if r.key >= first
        ),
        key=lambda d: d.day,
    )
