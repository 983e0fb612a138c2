"""Cost totals by day, from the audit trail's CostCharged rows.

The views sum charges by run, agent and model but not by day; each CostCharged audit row has
the event's time and a detail written by `projections/details.py` as
"charged $AMOUNT for IN+OUT tokens of MODEL", the amount in plain decimal notation, exact.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation

from cairn.projections import AuditRow, Views

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
    since = datetime.combine(today - timedelta(days=days - 1), datetime.min.time(), UTC)
    rows = views.audit(run_id=run_id, limit=None, types=["CostCharged"], since=since)
    return by_day(rows)
