"""Replay: run today's decision code over a recorded history and find where it would differ.

A history is a sequence of decisions. Each began with a *fact head*, the first event a fact
produced (a received result, a started or cancelled run, a timer, a person's approval or budget),
from which the fact itself can be rebuilt (`fact_for`, beside the facts in `domain/facts.py`); the
events after it, up to the next head, are what the coordinator decided. `check_history` rebuilds
each fact, asks `decide` with the state folded from the recorded events before it, and compares
what comes back with what was recorded, field by field and by canonical encoding (the hash
chain's bytes). Ids and times come from the facts, so an unchanged decision reproduces its events
exactly, `prev_hash` included.

A history that ends mid-run is fine: what today's code would still record after the last event
is reported as `trailing`, not as a divergence.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from functools import cache
from typing import Literal

from cairn.coordinator.domain.decide import decide
from cairn.coordinator.domain.facts import (
    DEFAULT_ESTIMATE_USD,
    ApprovalFact,
    CancelFact,
    Fact,
    Policy,
    Rejected,
    ResultFact,
    StartRunFact,
    TenantAllowance,
    TimerFact,
    UnservedFact,
    fact_for,
)
from cairn.coordinator.domain.pricing import PriceTable
from cairn.coordinator.domain.state import EvolveError, RunState, evolve
from cairn.coordinator.policy import decision_policy
from cairn.coordinator.pricing import load_price_table
from cairn.coordinator.workflow import load_contract_modules
from cairn.events import (
    BudgetExhausted,
    BudgetReserved,
    CostCharged,
    Event,
    event_hash,
)
from cairn.events.codec import was_upcast

DivergenceKind = Literal["differs", "missing", "extra", "rejected", "error", "invalid"]


@dataclass(frozen=True)
class Divergence:
    """The first place where today's code decides differently.

    - `differs`: today's code records `expected` where the history has `recorded`.
    - `missing`: today's code records nothing where the history has `recorded`.
    - `extra`: today's code records `expected` before the history's next fact (`recorded`).
    - `rejected` / `error`: today's code refuses the fact `recorded` stands for, or fails on it.
    - `invalid`: the recorded history itself does not fold (a corrupt or foreign history).
    """

    kind: DivergenceKind
    position: int  # 1-based index of the recorded event in the history
    recorded: Event
    expected: Event | None
    fact: str  # the fact whose decision differs, in words
    message: str


@dataclass(frozen=True)
class ReplayReport:
    run_id: uuid.UUID | None
    events: int  # recorded events checked
    decisions: int  # facts re-decided
    seconds: float
    divergence: Divergence | None = None
    trailing: list[Event] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.divergence is None

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("inf")


def recorded_allowances(events: Sequence[Event]) -> dict[int, TenantAllowance]:
    """What each decision was told its tenant had left today, keyed by the 1-based position
    of the event that began the decision. The allowance came from outside the run, so it is
    read back from the record: the first reservation or tenant exhaustion of the decision
    holds it (no reservation had yet been set aside from it)."""
    if not any(_allowance_in(e) for e in events):
        return {}
    found: dict[int, TenantAllowance] = {}
    state: RunState | None = None
    head: int | None = None
    for position, event in enumerate(events, start=1):
        if fact_for(state, event) is not None:
            head = position
        allowance = _allowance_in(event)
        if allowance is not None and head is not None:
            found.setdefault(head, allowance)
        try:
            state = evolve(state, event)
        except EvolveError:
            break  # check_history names a history that does not fold
    return found


def _allowance_in(event: Event) -> TenantAllowance | None:
    if isinstance(event, BudgetReserved | BudgetExhausted) and (
        event.tenant_available_usd is not None or event.tenant_available_tokens is not None
    ):
        return TenantAllowance(usd=event.tenant_available_usd, tokens=event.tenant_available_tokens)
    return None


def describe_fact(fact: Fact) -> str:
    if isinstance(fact, StartRunFact):
        return f"start of run {fact.run_id} by {fact.requested_by}"
    if isinstance(fact, ResultFact):
        r = fact.result
        return f"result of {r.step} attempt {r.attempt} from agent {r.agent_id}"
    if isinstance(fact, CancelFact):
        return f"cancel request by {fact.requested_by}"
    if isinstance(fact, TimerFact):
        if fact.kind in ("approval", "approval_warn"):
            return f"{fact.kind} timer of request {fact.request_id}"
        return f"{fact.kind} timer of {fact.step} attempt {fact.attempt}"
    if isinstance(fact, ApprovalFact):
        return f"{'approval' if fact.approve else 'denial'} of {fact.step} by {fact.by}"
    if isinstance(fact, UnservedFact):
        return f"no live {fact.capability} agent for {fact.step} attempt {fact.attempt}"
    return f"budget change by {fact.by}"


def check_history(events: Sequence[Event], policy: Policy) -> ReplayReport:
    """Re-decide a recorded history with today's code; report the first divergence."""
    started = time.perf_counter()
    run_id = events[0].run_id if events else None
    state: RunState | None = None
    decided: list[Event] = []  # today's events for the current fact, matched so far up to `next_`
    next_ = 0
    fact_text = ""
    decisions = 0

    def report(
        divergence: Divergence | None = None, trailing: list[Event] | None = None
    ) -> ReplayReport:
        return ReplayReport(
            run_id,
            len(events),
            decisions,
            time.perf_counter() - started,
            divergence,
            trailing or [],
        )

    allowances = recorded_allowances(events)
    for position, recorded in enumerate(events, start=1):
        if next_ < len(decided):
            expected = decided[next_]
            if type(expected) is not type(recorded) and fact_for(state, recorded) is not None:
                kind: DivergenceKind = "extra"
                message = (
                    f"today's code records {expected.type_name()} here; the history goes on "
                    f"with the next fact ({recorded.type_name()})"
                )
            else:
                kind = "differs"
                message = _difference(expected, recorded)
        else:
            fact = fact_for(state, recorded)
            if fact is None:
                return report(
                    Divergence(
                        "missing",
                        position,
                        recorded,
                        None,
                        fact_text,
                        f"today's code records nothing here: its decision for the {fact_text} "
                        f"ends before this {recorded.type_name()}"
                        if fact_text
                        else f"{recorded.type_name()} cannot begin a history",
                    )
                )
            fact_text = describe_fact(fact)
            decisions += 1
            try:
                allowance = allowances.get(position)
                decided = decide(
                    state, fact, policy if allowance is None else replace(policy, tenant=allowance)
                )
            except Rejected as exc:
                return report(Divergence("rejected", position, recorded, None, fact_text, str(exc)))
            except Exception as exc:  # today's code failing on an old fact is a finding
                return report(
                    Divergence(
                        "error",
                        position,
                        recorded,
                        None,
                        fact_text,
                        f"today's code raised {type(exc).__name__}: {exc}",
                    )
                )
            next_ = 0
            if not decided:
                return report(
                    Divergence(
                        "missing",
                        position,
                        recorded,
                        None,
                        fact_text,
                        f"today's code records nothing for the {fact_text}",
                    )
                )
            expected = decided[0]
            kind = "differs"
            message = _difference(expected, recorded)
        if message:
            return report(Divergence(kind, position, recorded, expected, fact_text, message))
        try:
            state = evolve(state, recorded)
        except EvolveError as exc:
            return report(Divergence("invalid", position, recorded, None, fact_text, str(exc)))
        next_ += 1
        if was_upcast(recorded):
            # Today's code links its next events to its own encoding of this one; the history
            # links to the bytes as they were written. Compare the rest on the history's chain.
            decided = _relinked(decided, next_, state.last_hash)
        else:
            # Equal fields can still encode differently (1 and 1.0, 0.10 and 0.1): compare the
            # hashes too.
            today = decided[next_].prev_hash if next_ < len(decided) else event_hash(expected)
            if today != state.last_hash:
                return report(
                    Divergence(
                        "differs",
                        position,
                        recorded,
                        expected,
                        fact_text,
                        "the fields are equal but encode differently (e.g. 1 and 1.0, or a "
                        f"decimal's trailing zeros): hash {today[:12]}… against "
                        f"{state.last_hash[:12]}…",
                    )
                )
    return report(trailing=decided[next_:])


def _relinked(decided: list[Event], start: int, last_hash: str) -> list[Event]:
    """`decided` with the events from `start` on chained anew after `last_hash`."""
    relinked = decided[:start]
    for event in decided[start:]:
        event = event.model_copy(update={"prev_hash": last_hash})
        relinked.append(event)
        last_hash = event_hash(event)
    return relinked


def _difference(expected: Event, recorded: Event) -> str:
    """'' when equal; otherwise which fields differ."""
    if type(expected) is not type(recorded):
        return f"today's code records {expected.type_name()} instead of {recorded.type_name()}"
    if expected == recorded:
        return ""
    names = [
        name
        for name in type(recorded).model_fields
        if getattr(expected, name) != getattr(recorded, name)
    ]
    return f"{recorded.type_name()} differs in {', '.join(names) or 'its encoding'}"


# -- the policy a history is replayed under ----------------------------------------------------


class ReplayPolicyError(ValueError):
    """No price table matches the one a history was charged under; the message says what to pass."""


def price_tables_named(events: Sequence[Event]) -> list[str]:
    """The price table versions a history's charges name, in order of first use."""
    seen: dict[str, None] = {}
    for event in events:
        if isinstance(event, CostCharged):
            seen.setdefault(event.price_table, None)
    return list(seen)


def replay_policy(
    events: Sequence[Event],
    prices: PriceTable | None = None,
    *,
    known: Sequence[PriceTable] = (),
    default_estimate_usd: Decimal = DEFAULT_ESTIMATE_USD,
    contract_modules: Iterable[str] = (),
) -> Policy:
    """The policy to re-decide a history with: `prices` when given (e.g. `--prices FILE`), else
    the table among the shipped one and `known` (e.g. CAIRN_PRICES) whose version the history's
    charges name. Output contracts come from the registry, with cairn's own and
    `contract_modules` (`Settings.contract_modules`) loaded."""
    load_contract_modules(contract_modules)
    if prices is None:
        tables = {t.version: t for t in (*known, _shipped_prices())}
        named = price_tables_named(events)
        missing = [v for v in named if v not in tables]
        if missing or len(named) > 1:
            raise ReplayPolicyError(
                f"the history was charged under price table {', '.join(named)}; "
                f"the tables at hand are {', '.join(tables)}: pass "
                f"{'that table' if len(named) == 1 else 'one'} with --prices FILE"
            )
        prices = tables[named[0]] if named else _shipped_prices()
    return decision_policy(prices, default_estimate_usd=default_estimate_usd)


@cache
def _shipped_prices() -> PriceTable:
    return load_price_table()


__all__ = [
    "Divergence",
    "ReplayPolicyError",
    "ReplayReport",
    "check_history",
    "price_tables_named",
    "replay_policy",
]
