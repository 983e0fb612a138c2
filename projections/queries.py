"""Reading the views: runs, steps, timelines, costs and the audit trail, as typed rows."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime
from decimal import Decimal
from types import TracebackType
from typing import Any, Literal, TypeVar

from cairn.events import RunStatus
from cairn.projections.errors import AmbiguousRunError, RunNotFoundError, ViewsMissingError
from cairn.projections.filters import AuditFilter, actor_match, time_text
from cairn.projections.projection import EXACT
from cairn.projections.rows import AuditRow, CostRow, RunRow, StepRow
from cairn.projections.runner import PROJECTION_NAME
from cairn.projections.storage import ViewsReader, open_reader, redacted
from cairn.runtime.settings import Settings

CostKey = Literal["run", "agent", "model", "tenant", "day"]
# "agent" groups by capability: replicas of one agent kind share it, their ids do not.
_COST_COLUMNS: dict[str, str] = {
    "run": "run_id",
    "agent": "capability",
    "model": "model",
    "tenant": "tenant",
    "day": "day",
}
_PREFIX = re.compile(r"^[0-9a-f-]+$")

T = TypeVar("T")


class Views:
    """The read API over the views (`settings.views`, or a views URL).

    Raises ViewsMissingError, when constructed or queried, while the views have not been
    built. Run ids may be given in full (taken as they are) or as a prefix, which must match
    exactly one run.
    """

    def __init__(self, views: Settings | str) -> None:
        url = _location(views)
        self.location = redacted(url)  # for messages: no password
        self._reader: ViewsReader = open_reader(url)
        # One sqlite3 connection serves every caller; calls take turns.
        self._lock = threading.Lock()
        try:
            self.position()  # fail now, with the friendly error, if there is nothing to read
        except BaseException:
            self._reader.close()
            raise

    def close(self) -> None:
        """Release the database connection."""
        with self._lock:
            self._reader.close()

    def __enter__(self) -> Views:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def position(self) -> int:
        """The last log position the views reflect."""
        return self._read(lambda r: r.position(PROJECTION_NAME))

    def wait_for(self, position: int, timeout: float = 10.0) -> int:
        """Block until the views reflect log position `position`; return their position.

        Raises TimeoutError after `timeout` seconds.
        """
        return _wait(lambda: self._read(_position_or_zero), position, timeout, self.location)

    def runs(self, status: RunStatus | None = None, limit: int = 50) -> list[RunRow]:
        """The most recently started runs first, optionally only those with `status`."""
        rows = self._read(lambda r: r.runs(status, limit))
        return [_run_row(row) for row in rows]

    def run(self, run_id: str | uuid.UUID) -> RunRow | None:
        """One run by id or unique prefix; None if a full id is not (yet) projected."""
        key = self.resolve(run_id, must_exist=False)
        row = self._read(lambda r: r.run(key))
        return _run_row(row) if row is not None else None

    def resolve(self, run_id: str | uuid.UUID, *, must_exist: bool = True) -> str:
        """The full run id for a full id or a prefix of one.

        Raises RunNotFoundError when nothing matches (for a full id only if `must_exist`) and
        AmbiguousRunError when a prefix matches several runs.
        """
        if isinstance(run_id, uuid.UUID):
            full = str(run_id)
        else:
            ref = run_id.strip().lower()
            whole = _full_id(ref)
            if whole is None:
                return self._resolve_prefix(ref)
            full = whole
        if must_exist and self._read(lambda r: r.run(full)) is None:
            raise RunNotFoundError(f"no run {full} in the views at {self.location}")
        return full

    def steps(self, run_id: str | uuid.UUID) -> list[StepRow]:
        """A run's steps, in the order of their latest dispatch."""
        key = self.resolve(run_id, must_exist=False)
        return [StepRow.model_validate(row) for row in self._read(lambda r: r.steps(key))]

    def timeline(self, run_id: str | uuid.UUID) -> list[AuditRow]:
        """Every event of a run, in order."""
        key = self.resolve(run_id, must_exist=False)
        where = AuditFilter(run_id=key)
        return [AuditRow.model_validate(row) for row in self._read(lambda r: r.audit(where, None))]

    def audit(
        self,
        run_id: str | uuid.UUID | None = None,
        limit: int | None = 100,
        *,
        actor: str | None = None,
        types: Iterable[str] = (),
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[AuditRow]:
        """The latest `limit` audit rows that match every filter given, oldest first.

        `limit=None` returns all of them. `actor` is an exact actor ("agent:researcher-1") or,
        ending in ":" or "*", a prefix ("human:", "agent:researcher*"). `types` are event type
        names (any of them). `since` and `until` bound the event time, both inclusive; a time
        without a zone is taken as UTC.
        """
        if limit is not None and limit < 0:
            raise ValueError("limit must be zero or more")
        exact, prefix = actor_match(actor) if actor is not None else (None, None)
        where = AuditFilter(
            run_id=self.resolve(run_id, must_exist=False) if run_id is not None else None,
            actor=exact,
            actor_prefix=prefix,
            actions=tuple(dict.fromkeys(types)),
            since=time_text(since) if since is not None else None,
            until=time_text(until) if until is not None else None,
        )
        return [AuditRow.model_validate(row) for row in self._read(lambda r: r.audit(where, limit))]

    def event_time(self, position: int) -> datetime | None:
        """When the event at log `position` was recorded, if the views hold it."""
        text = self._read(lambda r: r.time_at(position))
        return datetime.fromisoformat(text) if text is not None else None

    def costs(
        self,
        by: CostKey = "run",
        run_id: str | uuid.UUID | None = None,
        reprice: Callable[[str, int, int], Decimal | None] | None = None,
        day: str | None = None,
    ) -> list[CostRow]:
        """Charges grouped by run, agent (capability), model, tenant or day; the largest first.

        Sums are exact: amounts are added as decimals, never as floats. With `reprice`
        (model, input tokens, output tokens → amount, or None for a model it does not price)
        the amounts are recomputed from the recorded tokens, e.g. under another price table:
        a query, not a migration. Unpriced charges count as 0 and are reported in `unpriced`.
        `day` (YYYY-MM-DD, UTC) keeps the charges of that day only.
        """
        column = _COST_COLUMNS.get(by)
        if column is None:
            raise ValueError(f"costs can be grouped by {', '.join(_COST_COLUMNS)}, not {by!r}")
        key = self.resolve(run_id, must_exist=False) if run_id is not None else None
        totals: dict[str, list[Any]] = {}
        for group, model, input_tokens, output_tokens, amount in self._read(
            lambda r: r.charge_details(column, key, day)
        ):
            total = totals.setdefault(group, [0, 0, Decimal(0), 0, 0])
            total[0] += input_tokens
            total[1] += output_tokens
            if reprice is None:
                total[2] = EXACT.add(total[2], Decimal(amount))
            else:
                price = reprice(model, input_tokens, output_tokens)
                if price is None:
                    total[4] += 1
                else:
                    total[2] = EXACT.add(total[2], price)
            total[3] += 1
        rows = [
            CostRow(
                key=k, input_tokens=t[0], output_tokens=t[1], amount_usd=t[2], charges=t[3],
                unpriced=t[4],
            )
            for k, t in totals.items()
        ]  # fmt: skip
        rows.sort(key=lambda row: (-row.amount_usd, row.key))
        return rows

    def cost_total(self, run_id: str | uuid.UUID | None = None) -> Decimal:
        """The exact sum of all charges, or of one run's."""
        key = self.resolve(run_id, must_exist=False) if run_id is not None else None
        total = Decimal(0)
        for _, _, _, amount in self._read(lambda r: r.charges("run_id", key)):
            total = EXACT.add(total, Decimal(amount))
        return total

    def _resolve_prefix(self, prefix: str) -> str:
        if not prefix or not _PREFIX.match(prefix):
            raise RunNotFoundError(f"{prefix!r} is not a run id or a prefix of one")
        matches = self._read(lambda r: r.run_ids_with_prefix(prefix, 6))
        if not matches:
            raise RunNotFoundError(
                f"no run id starts with {prefix!r} in the views at {self.location}"
            )
        if len(matches) > 1:
            shown = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
            raise AmbiguousRunError(
                f"{prefix!r} matches several runs ({shown}): give more of the run id"
            )
        return matches[0]

    def _read(self, query: Callable[[ViewsReader], T]) -> T:
        with self._lock:
            return query(self._reader)


def wait_for_views(views: Settings | str, position: int, timeout: float = 10.0) -> int:
    """Block until the views reflect log position `position`, whichever runner builds them.

    Views that do not exist yet count as position 0, so a caller may wait for a runner that is
    still starting. Returns the views' position; raises TimeoutError after `timeout` seconds.
    """
    url = _location(views)
    reader = open_reader(url)
    try:
        return _wait(lambda: _position_or_zero(reader), position, timeout, redacted(url))
    finally:
        reader.close()


def _wait(read: Callable[[], int], position: int, timeout: float, location: str) -> int:
    deadline = time.monotonic() + timeout
    while True:
        current = read()
        if current >= position:
            return current
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(
                f"the views at {location} reached log position {current}, not {position}, "
                f"within {timeout:g} s: is the projection runner running?"
            )
        # Another process commits the position; re-reading it is a single indexed lookup.
        time.sleep(min(remaining, 0.02))


def _position_or_zero(reader: ViewsReader) -> int:
    try:
        return reader.position(PROJECTION_NAME)
    except ViewsMissingError:
        return 0


def _location(views: Settings | str) -> str:
    return views.views if isinstance(views, Settings) else views


def _full_id(ref: str) -> str | None:
    """The canonical form of `ref` if it is a whole UUID (any spelling), else None."""
    if len(ref.replace("-", "")) != 32:
        return None
    try:
        return str(uuid.UUID(ref))
    except ValueError:
        return None


def _run_row(row: dict[str, Any]) -> RunRow:
    output = row["output"]
    return RunRow.model_validate(
        {**row, "output": json.loads(output) if output is not None else None}
    )
