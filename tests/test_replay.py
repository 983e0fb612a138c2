"""Replay: today's decision code over recorded histories (`check_history`), pure and in memory,
plus the store round trip that gives it fresh, decoded events."""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from histories import PIPELINE, POLICY, T0, doubled_prices, many_runs, simulate
from pydantic import BaseModel, ConfigDict

from cairn.coordinator.domain.decide import decide
from cairn.coordinator.domain.facts import (
    ApprovalFact,
    BudgetFact,
    CancelFact,
    Fact,
    Policy,
    ResultFact,
    StartRunFact,
    TimerFact,
    fact_for,
    task_id,
)
from cairn.coordinator.domain.state import RunState, evolve, fold
from cairn.coordinator.history.replay import (
    ReplayPolicyError,
    check_history,
    price_tables_named,
    replay_policy,
)
from cairn.coordinator.pricing import load_price_table
from cairn.coordinator.workflow import parse_workflow
from cairn.events import (
    ApprovalRequested,
    Budget,
    ContractViolated,
    CostCharged,
    Event,
    Intent,
    ResultIgnored,
    RetryScheduled,
    RunCompleted,
    TaskCompleted,
    TaskDispatched,
    TaskError,
    TaskResult,
    Usage,
    event_hash,
)
from cairn.events.contracts import resolve_contract
from cairn.runtime.eventlog.store import EventStore

RUN = uuid.UUID("00000000-0000-4000-8000-00000000abcd")


def relink(events: list[Event]) -> list[Event]:
    """Renumber and re-chain hand-edited histories so only the edit differs."""
    out: list[Event] = []
    for seq, event in enumerate(events, start=1):
        prev = event_hash(out[-1]) if out else ""
        out.append(event.model_copy(update={"seq": seq, "prev_hash": prev}))
    return out


def test_complete_histories_replay_identically() -> None:
    runs = many_runs(60, trouble=0.5)
    kinds = Counter(e.type_name() for events in runs for e in events)
    # The histories go through the paths that matter: retries after errors, timeouts and
    # broken contracts, duplicates, skipped steps, charges.
    for kind in ("RetryScheduled", "TaskTimedOut", "ContractViolated", "ResultIgnored",
                 "StepSkipped", "CostCharged", "RunCompleted", "RunFailed"):  # fmt: skip
        assert kinds[kind] > 0, kind
    for events in runs:
        report = check_history(events, POLICY)
        assert report.ok, report.divergence
        assert report.events == len(events)
        assert report.trailing == []
    assert check_history([], POLICY).ok


def test_replay_of_decoded_events_from_the_store(tmp_path: Path) -> None:
    """Fresh objects from the store (no cached hashes, decoded decimals and times)."""
    store = EventStore(str(tmp_path / "events.db"))
    runs = many_runs(20, seed=7, trouble=0.6)
    for events in runs:
        store.append(events)
    for events in runs:
        loaded = store.load(events[0].run_id)
        assert loaded == events
        report = check_history(loaded, replay_policy(loaded))
        assert report.ok, report.divergence


def test_cancelled_run_replays() -> None:
    events = simulate(RUN, seed=3, trouble=0, cancel_after=2)
    assert events[-1].type_name() == "RunCancelled"
    assert check_history(events, POLICY).ok


def test_a_changed_price_table_diverges_at_the_first_charge() -> None:
    events = simulate(RUN, seed=1, trouble=0)
    first_charge = next(
        i for i, e in enumerate(events) if isinstance(e, CostCharged) and e.amount_usd > 0
    )
    report = check_history(events, Policy(doubled_prices(), resolve_contract))
    d = report.divergence
    assert d is not None
    assert d.kind == "differs"
    assert d.position == first_charge + 1
    assert d.recorded is events[first_charge]
    assert isinstance(d.recorded, CostCharged)
    assert isinstance(d.expected, CostCharged)
    assert d.recorded.amount_usd > 0
    assert d.expected.amount_usd == d.recorded.amount_usd * 2
    assert "amount_usd" in d.message
    assert "result of" in d.fact


def test_a_history_cut_anywhere_replays() -> None:
    """Ending mid-run (even mid-decision) is not a divergence; what today's code would still
    record after the cut is reported as trailing."""
    events = max((simulate(RUN, seed=s, trouble=0.6) for s in range(10)), key=len)
    assert len(events) > 25
    trailing = 0
    for cut in range(1, len(events)):
        report = check_history(events[:cut], POLICY)
        assert report.ok, (cut, report.divergence)
        trailing += bool(report.trailing)
    assert trailing > 0


def test_today_deciding_something_else_is_reported_with_both_events() -> None:
    # Recorded under a contract that accepted anything: the broken plan passed.
    class Anything(BaseModel):
        model_config = ConfigDict(extra="allow")

    lax = Policy(load_price_table(), lambda _key: Anything)
    history = None
    for seed in range(50):
        candidate = simulate(RUN, seed=seed, policy=lax, trouble=0.9)
        strict = simulate(RUN, seed=seed, trouble=0.9)
        if any(isinstance(e, ContractViolated) for e in strict):
            history = candidate
            break
    assert history is not None
    assert check_history(history, lax).ok
    report = check_history(history, POLICY)
    d = report.divergence
    assert d is not None
    assert d.kind == "differs"
    assert isinstance(d.recorded, TaskCompleted)
    assert isinstance(d.expected, ContractViolated)
    assert "instead of TaskCompleted" in d.message


def test_an_event_today_would_not_record_is_missing() -> None:
    events = simulate(RUN, seed=1, trouble=0)
    done = next(i for i, e in enumerate(events) if isinstance(e, TaskCompleted))
    dispatched = events[done + 1]
    assert isinstance(dispatched, TaskDispatched)
    stray = ResultIgnored(
        run_id=RUN, seq=0, at=dispatched.at, actor="coordinator", reason="?",
        task_id="x", agent_id="y",
    )  # fmt: skip
    # After the whole decision (…TaskDispatched) comes an event no fact explains.
    edited = relink([*events[: done + 2], stray, *events[done + 2 :]])
    d = check_history(edited, POLICY).divergence
    assert d is not None
    assert (d.kind, d.position, d.expected) == ("missing", done + 3, None)
    assert "records nothing here" in d.message


def test_an_event_today_would_add_is_extra() -> None:
    events = simulate(RUN, seed=1, trouble=0)
    done = next(i for i, e in enumerate(events) if isinstance(e, TaskCompleted))
    assert isinstance(events[done + 1], TaskDispatched)
    # The recorded decision stopped after TaskCompleted; the next fact came at once.
    edited = relink([*events[: done + 1], *events[done + 2 :]])
    d = check_history(edited, POLICY).divergence
    assert d is not None
    assert d.kind == "extra"
    assert d.position == done + 2
    assert isinstance(d.expected, TaskDispatched)
    assert d.recorded.type_name() == "ResultReceived"


def test_a_fact_today_rejects() -> None:
    events = simulate(RUN, seed=1, trouble=0)
    assert isinstance(events[-1], RunCompleted)
    state = fold(events[:2])
    assert state is not None
    cancel = decide(state, CancelFact(run_id=RUN, requested_by="human:bo", at=T0), POLICY)
    edited = relink([*events, *cancel])  # a cancel recorded after the run had completed
    d = check_history(edited, POLICY).divergence
    assert d is not None
    assert d.kind == "rejected"
    assert d.position == len(events) + 1
    assert "already completed" in d.message


def test_prev_hash_and_encoding_are_compared() -> None:
    events = simulate(RUN, seed=1, trouble=0)
    charge = next(i for i, e in enumerate(events) if isinstance(e, CostCharged))
    recorded = events[charge]
    assert isinstance(recorded, CostCharged)
    # Equal as numbers, different as recorded bytes: 0.0035 against 0.003500000000.
    padded = recorded.model_copy(
        update={"amount_usd": recorded.amount_usd.quantize(Decimal("1e-12"))}
    )
    assert padded == recorded
    assert event_hash(padded) != event_hash(recorded)
    edited = relink([*events[:charge], padded, *events[charge + 1 :]])
    d = check_history(edited, POLICY).divergence
    assert d is not None
    assert (d.kind, d.position) == ("differs", charge + 1)
    assert "encode differently" in d.message
    # A wrong link is a difference in prev_hash.
    broken = [*events[:charge], recorded.model_copy(update={"prev_hash": "0" * 64})]
    d = check_history(broken, POLICY).divergence
    assert d is not None
    assert "prev_hash" in d.message


def test_facts_are_rebuilt_from_their_heads() -> None:
    """Each head's fact, decided again, begins with the head itself."""
    events = simulate(RUN, seed=4, trouble=0.6)
    state: RunState | None = None
    heads = []
    for event in events:
        fact = fact_for(state, event)
        if fact is not None:
            assert decide(state, fact, POLICY)[0] == event
            heads.append(event.type_name())
        state = evolve(state, event)
    assert {"RunStarted", "ResultReceived"} <= set(heads)


def test_replay_policy_uses_the_price_table_the_history_names(tmp_path: Path) -> None:
    events = simulate(RUN, seed=1, trouble=0)
    shipped = load_price_table()
    assert price_tables_named(events) == [shipped.version]
    assert replay_policy(events).prices == shipped
    renamed = [
        e.model_copy(update={"price_table": "2020-01-01"}) if isinstance(e, CostCharged) else e
        for e in events
    ]
    with pytest.raises(ReplayPolicyError, match=r"2020-01-01.*--prices"):
        replay_policy(renamed)
    other = shipped.model_copy(update={"version": "2020-01-01"})
    assert replay_policy(renamed, other).prices == other
    assert replay_policy(renamed, known=[other]).prices == other  # e.g. CAIRN_PRICES
    assert replay_policy(events, known=[other]).prices == shipped
    assert PIPELINE.steps[0].contract == "Plan@1"


def test_people_budgets_and_approval_timers_are_facts_too() -> None:
    """Approvals, budget raises, approval deadlines and retries that first reserve budget all
    begin decisions that replay re-decides."""
    workflow = parse_workflow(
        {
            "name": "gov",
            "steps": [
                {"name": "a", "capability": "x", "cost_estimate_usd": "0.40",
                 "retry": {"max_attempts": 2, "backoff_s": 1}},
                {"name": "b", "capability": "y", "cost_estimate_usd": "0.60",
                 "approval": {"before": True, "timeout_s": 10, "warn_before_s": 3,
                              "escalate_to": ["leads"], "on_expiry": "escalate"}},
                {"name": "c", "capability": "z", "approval": {"before": True}},
            ],
        }
    )  # fmt: skip
    run = RUN
    history: list[Event] = []

    def then(fact: Fact) -> list[Event]:
        events = decide(fold(history), fact, POLICY)
        history.extend(events)
        return events

    def result(step: str, attempt: int, error: str | None = None, tokens: int = 0) -> ResultFact:
        return ResultFact(
            result=TaskResult(
                task_id=task_id(run, step, attempt), run_id=run, step=step, attempt=attempt,
                agent_id=f"{step}-1", output=None if error else {"ok": True},
                error=TaskError(message=error) if error else None,
                usage=[Usage(model="cairn-offline-1", input_tokens=tokens, output_tokens=tokens)],
                started_at=T0, finished_at=T0,
            ),
            at=T0,
        )  # fmt: skip

    then(
        StartRunFact(
            run_id=run, workflow=workflow, input={}, intent=Intent(goal="g"),
            requested_by="client:test", at=T0, budget=Budget(usd=Decimal("0.50")),
        )
    )  # fmt: skip
    scheduled = then(result("a", 1, error="flaky"))[-1]
    assert isinstance(scheduled, RetryScheduled)
    retry = then(TimerFact(run_id=run, step="a", attempt=2, kind="retry", at=scheduled.due_at))
    assert [e.type_name() for e in retry] == ["BudgetReserved", "TaskDispatched"]
    request = then(result("a", 2, tokens=1000))[-1]
    assert isinstance(request, ApprovalRequested)
    assert request.kind == "before"
    for kind, seconds in (("approval_warn", 7), ("approval", 10)):
        at = T0 + timedelta(seconds=seconds)
        timer = TimerFact(run_id=run, step="b", attempt=1, kind=kind, at=at,  # type: ignore[arg-type]
                          request_id=request.request_id)  # fmt: skip
        assert then(timer)
    granted = then(ApprovalFact(run_id=run, step="b", by="lee", approve=True, at=T0))
    assert granted[-1].type_name() == "ApprovalRequested"  # now the budget: 0.60 does not fit
    then(BudgetFact(run_id=run, usd=Decimal("2"), by="ann", reason="worth it", at=T0))
    assert history[-1].type_name() == "TaskDispatched"
    then(result("b", 1))
    then(ApprovalFact(run_id=run, step="c", by="lee", approve=False, at=T0))
    kinds = {e.type_name() for e in history}
    assert {"BudgetRaised", "ApprovalWarned", "ApprovalEscalated", "ApprovalGranted",
            "ApprovalDenied", "RunFailed"} <= kinds  # fmt: skip

    report = check_history(history, POLICY)
    assert report.ok, report.divergence
    assert report.decisions == 10
