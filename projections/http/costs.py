"""Cost totals per UTC day.

From the views' own grouping by day where they have it; views without it are read from the
audit trail's CostCharged rows instead, each with the event's time and a detail written by
`projections/details.py` as "charged $AMOUNT for IN+OUT tokens of MODEL", the amount exact.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, get_args

from cairn.projections import AuditRow, CostKey, Views

from .models import DayCost

_CHARGED = re.compile(r"^charged \$(?P<amount>[0-9]+(?:\.[0-9]+)?) for ")


def charge_amount(row: AuditRow) -> Decimal | None:
    """The amount of a CostCharged row, or None if its detail is not in the known form."""
    found = _CHARGED.match(row.detail)
    if found is None:
        return None
    try:
        return Decimal(found["amount"])
    except InvalidOperation:
        return None


def by_day(rows: Iterable[AuditRow]) -> list[DayCost]:
    """Charges summed per UTC day, oldest day first."""
    days: dict[str, list[Decimal | int]] = {}
    for row in rows:
        amount = charge_amount(row)
        if amount is None:
            continue
        day = row.at.astimezone(UTC).date().isoformat()
        total = days.setdefault(day, [Decimal(0), 0])
        total[0] = Decimal(total[0]) + amount
        total[1] = int(total[1]) + 1
    return [
        DayCost(day=day, amount_usd=Decimal(t[0]), charges=int(t[1]))
        for day, t in sorted(days.items())
    ]


def daily_costs(
    views: Views, days: int, now: datetime | None = None, run_id: str | None = None
) -> list[DayCost]:
    """The last `days` UTC days' charges (days without any are left out)."""
    today = (now or datetime.now(UTC)).astimezone(UTC).date()
    first = today - timedelta(days=days - 1)
    if "day" in get_args(CostKey):
        # Typed loosely: views from before the grouping by day do not declare the key.
        day: Any = "day"
        rows = views.costs(by=day, run_id=run_id)
        return sorted(
            (
                DayCost(day=r.key, amount_usd=r.amount_usd, charges=r.charges)
                for r in rows
                if r.key >= first.isoformat()
            ),
            key=lambda d: d.day,
        )
    since = datetime.combine(first, datetime.min.time(), UTC)
    found = views.audit(run_id=run_id, limit=None, types=["CostCharged"], since=since)
    return by_day(found)
