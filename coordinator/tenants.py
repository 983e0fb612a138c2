"""Per-tenant daily limits: the limits file, and the ledger of what each tenant spent today.

The limits come from a YAML file (`Settings.tenants`: `CAIRN_TENANTS`, default
`<home>/tenants.yaml`), read again when it changes, so a limit can be raised without a restart:

    tenants:
      acme: {daily_usd: "20.00", daily_tokens: 2000000}
      default: {daily_usd: "1.00"}     # runs started without a tenant
      "*": {daily_usd: "5.00"}         # every tenant not listed

A day is a UTC calendar day. The ledger counts, per tenant and day, the charges in the log and
the reservations still open (set aside before dispatch, released when the attempt settles or the
run ends). It is the coordinator's own bookkeeping, rebuilt from the log at start; each decision
gets what is left as a `TenantAllowance`, and the decision records it in the log.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path

import yaml
from pydantic import Field, ValidationError

from cairn.coordinator.domain.facts import TenantAllowance
from cairn.events import (
    TERMINAL_EVENTS,
    BudgetReserved,
    BudgetSettled,
    CostCharged,
    Event,
    Frozen,
)

ANY_TENANT = "*"


class TenantLimit(Frozen):
    """What one tenant may spend per UTC day (either or both)."""

    daily_usd: Decimal | None = Field(default=None, ge=0)
    daily_tokens: int | None = Field(default=None, ge=0)


class TenantLimitsFile(Frozen):
    tenants: dict[str, TenantLimit] = Field(default_factory=dict)


class TenantLimitsError(ValueError):
    """The limits file cannot be read or is malformed."""


def load_tenant_limits(path: Path) -> dict[str, TenantLimit]:
    """The limits in `path`; no file means no tenant is limited."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise TenantLimitsError(f"cannot read tenant limits {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
        return TenantLimitsFile.model_validate(data).tenants
    except (yaml.YAMLError, ValidationError) as exc:
        raise TenantLimitsError(
            f"tenant limits {path} are invalid: {exc}. Expected `tenants: {{NAME: "
            '{daily_usd: "5.00", daily_tokens: 100000}}`'
        ) from None


def limit_for(limits: dict[str, TenantLimit], tenant: str) -> TenantLimit | None:
    """The tenant's own limit, else the one for every tenant not listed (`"*"`), if any."""
    return limits.get(tenant) or limits.get(ANY_TENANT)


class TenantLimits:
    """The limits file, looked at again at most once a second and read again when changed.

    A file broken by an edit keeps the limits last read (and says so once), rather than
    lifting every limit."""

    def __init__(self, path: Path, *, check_every_s: float = 1.0) -> None:
        self.path = path
        self.check_every_s = check_every_s
        self.limits = load_tenant_limits(path)
        self.problem: str | None = None
        self._stamp = self._file_stamp()
        self._checked = time.monotonic()

    def _file_stamp(self) -> tuple[float, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime, st.st_size)

    def get(self, tenant: str) -> TenantLimit | None:
        now = time.monotonic()
        if now - self._checked >= self.check_every_s:
            self._checked = now
            stamp = self._file_stamp()
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self.limits = load_tenant_limits(self.path)
                    self.problem = None
                except TenantLimitsError as exc:
                    self.problem = str(exc)
        return limit_for(self.limits, tenant)


@dataclass
class _Day:
    charged_usd: Decimal = Decimal(0)
    tokens: int = 0
    reserved_usd: Decimal = Decimal(0)


@dataclass
class TenantLedger:
    """Each tenant's spending per UTC day: charges plus the reservations still open.

    Changes are staged as decisions are made (a batch of decisions sees its own reservations)
    and kept by `commit` once the events are stored, or undone by `rollback`."""

    days: dict[tuple[str, date], _Day] = field(default_factory=dict)
    # Open reservations: (run, step, attempt) -> (tenant, day, amount).
    open: dict[tuple[uuid.UUID, str, int], tuple[str, date, Decimal]] = field(default_factory=dict)
    _undo: list[Callable[[], None]] = field(default_factory=list)
    _latest: date | None = None

    def allowance(self, tenant: str, day: date, limit: TenantLimit) -> TenantAllowance | None:
        if limit.daily_usd is None and limit.daily_tokens is None:
            return None
        spent = self.days.get((tenant, day)) or _Day()
        return TenantAllowance(
            usd=(
                None
                if limit.daily_usd is None
                else limit.daily_usd - spent.charged_usd - spent.reserved_usd
            ),
            tokens=None if limit.daily_tokens is None else limit.daily_tokens - spent.tokens,
        )

    def spent(self, tenant: str, day: date) -> tuple[Decimal, Decimal, int]:
        """Charged, still reserved, and tokens used by `tenant` on `day`."""
        d = self.days.get((tenant, day)) or _Day()
        return d.charged_usd, d.reserved_usd, d.tokens

    def stage(self, events: list[Event], tenant: str) -> None:
        """Count a run's new events (not yet stored) toward its tenant's days."""
        for event in events:
            kind = type(event)
            if kind is CostCharged:
                assert isinstance(event, CostCharged)
                tokens = event.input_tokens + event.output_tokens
                self._charge(tenant, event.at.date(), event.amount_usd, tokens)
            elif kind is BudgetReserved:
                assert isinstance(event, BudgetReserved)
                key = (event.run_id, event.step, event.attempt)
                self._reserve(key, (tenant, event.at.date(), event.amount_usd))
            elif kind is BudgetSettled:
                assert isinstance(event, BudgetSettled)
                self._release((event.run_id, event.step, event.attempt))
            elif kind in TERMINAL_EVENTS:  # an ended run holds nothing back
                for key in [k for k in self.open if k[0] == event.run_id]:
                    self._release(key)

    def commit(self) -> None:
        self._undo.clear()
        self._forget_old_days()

    def rollback(self) -> None:
        while self._undo:
            self._undo.pop()()

    def _day(self, tenant: str, day: date) -> _Day:
        d = self.days.get((tenant, day))
        if d is None:
            d = self.days[(tenant, day)] = _Day()
            if self._latest is None or day > self._latest:
                self._latest = day
        return d

    def _charge(
        self, tenant: str, day: date, usd: Decimal, tokens: int, *, undo: bool = True
    ) -> None:
        d = self._day(tenant, day)
        d.charged_usd += usd
        d.tokens += tokens
        if undo:
            self._undo.append(lambda: self._charge(tenant, day, -usd, -tokens, undo=False))

    def _reserve(
        self,
        key: tuple[uuid.UUID, str, int],
        entry: tuple[str, date, Decimal],
        *,
        undo: bool = True,
    ) -> None:
        if key in self.open:
            self._release(key, undo=undo)
        tenant, day, amount = entry
        self.open[key] = entry
        self._day(tenant, day).reserved_usd += amount
        if undo:
            self._undo.append(lambda: self._release(key, undo=False))

    def _release(self, key: tuple[uuid.UUID, str, int], *, undo: bool = True) -> None:
        entry = self.open.pop(key, None)
        if entry is None:
            return
        tenant, day, amount = entry
        self._day(tenant, day).reserved_usd -= amount
        if undo:
            self._undo.append(lambda: self._reserve(key, entry, undo=False))

    def _forget_old_days(self) -> None:
        """Keep today and yesterday (a decision near midnight may still count yesterday)."""
        if self._latest is None:
            return
        oldest = self._latest - timedelta(days=1)
        for key in [k for k, d in self.days.items() if k[1] < oldest and not d.reserved_usd]:
            del self.days[key]
