"""Approval gates, budgets, loop guards and proposed steps, decided by pure functions over
hand-written histories."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from cairn.coordinator.domain.decide import decide
from cairn.coordinator.domain.facts import (
    ApprovalFact,
    BudgetFact,
    Policy,
    Rejected,
    ResultFact,
    StartRunFact,
    TimerFact,
    task_id,
)
from cairn.coordinator.domain.state import RunState, fold
from cairn.coordinator.pricing import load_price_table
from cairn.coordinator.workflow import parse_workflow
from cairn.events import (
    ApprovalRequested,
    Budget,
    BudgetExhausted,
    BudgetSettled,
    Event,
    Intent,
    RunFailed,
    StepAdmitted,
    StepRefused,
    StepSpec,
    TaskDispatched,
    TaskResult,
    Usage,
    WorkflowSpec,
)
from cairn.events.contracts import resolve_contract

T0 = datetime(2026, 1, 1, tzinfo=UTC)
RUN = uuid.UUID("00000000-0000-4000-8000-0000000000aa")
POLICY = Policy(load_price_table(), resolve_contract, default_estimate_usd=Decimal("0.01"))


def wf(*steps: dict[str, Any], **extra: Any) -> WorkflowSpec:
    return parse_workflow({"name": "w", "steps": list(steps), **extra})


def start(workflow: WorkflowSpec, budget: Budget | None = None) -> list[Event]:
    fact = StartRunFact(
        run_id=RUN, workflow=workflow, input={"topic": "t"},
        intent=Intent(goal="g", constraints=["c"]), requested_by="client:test", at=T0,
        budget=budget,
    )  # fmt: skip
    return decide(None, fact, POLICY)


def state_of(history: list[Event]) -> RunState:
    state = fold(history)
    assert state is not None
    return state


def then(history: list[Event], fact: Any) -> list[Event]:
    events = decide(state_of(history), fact, POLICY)
    history.extend(events)
    return events


def result(
    step: str, attempt: int = 1, output: dict[str, Any] | None = None,
    tokens: int = 0, review: str | None = None, proposals: list[StepSpec] | None = None,
) -> ResultFact:  # fmt: skip
    return ResultFact(
        result=TaskResult(
            task_id=task_id(RUN, step, attempt), run_id=RUN, step=step, attempt=attempt,
            agent_id=f"{step}-1", output=output if output is not None else {"ok": True},
            usage=[Usage(model="cairn-offline-1", input_tokens=tokens, output_tokens=tokens)]
            if tokens else [],
            started_at=T0, finished_at=T0, review=review, proposals=proposals or [],
        ),
        at=T0,
    )  # fmt: skip


def approve(step: str, by: str = "ann", yes: bool = True, at: datetime = T0) -> ApprovalFact:
    return ApprovalFact(run_id=RUN, step=step, by=by, approve=yes, reason="looked", at=at)


def types(events: list[Event]) -> list[str]:
    return [e.type_name() for e in events]


GATED = wf(
    {"name": "a", "capability": "x"},
    {"name": "b", "capability": "y", "approval": {"before": True, "timeout_s": 60}},
)


def test_gate_before_a_step_waits_for_a_person_and_records_who() -> None:
    history = start(GATED)
    events = then(history, result("a"))
    assert types(events)[-1] == "ApprovalRequested"
    request = events[-1]
    assert isinstance(request, ApprovalRequested)
    assert request.kind == "before"
    assert request.context.intent.goal == "g"
    assert request.context.proposed == {}
    assert state_of(history).steps["b"].status == "awaiting_approval"
    granted = then(history, approve("b", by="ann"))
    assert types(granted) == ["ApprovalGranted", "TaskDispatched"]
    assert granted[0].actor == "human:ann"
    assert granted[0].reason == "looked"
    with pytest.raises(Rejected, match="already granted by ann"):
        then(history, approve("b", by="bob"))


def test_denied_gate_fails_the_run_or_skips_by_policy() -> None:
    history = start(GATED)
    then(history, result("a"))
    events = then(history, approve("b", yes=False))
    assert types(events) == ["ApprovalDenied", "RunFailed"]
    skip = wf(
        {"name": "a", "capability": "x"},
        {"name": "b", "capability": "y", "approval": {"before": True}, "on_failure": "skip"},
    )
    history = start(skip)
    then(history, result("a"))
    events = then(history, approve("b", yes=False))
    assert types(events) == ["ApprovalDenied", "StepSkipped", "RunCompleted"]


def test_cost_threshold_gate() -> None:
    workflow = wf(
        {"name": "a", "capability": "x", "cost_estimate_usd": "2.00",
         "approval": {"cost_over_usd": "1.00"}},
    )  # fmt: skip
    events = start(workflow)
    assert types(events) == ["RunStarted", "ApprovalRequested"]
    request = events[-1]
    assert isinstance(request, ApprovalRequested)
    assert request.kind == "cost"
    assert request.context.estimate_usd == Decimal("2.00")
    cheap = wf(
        {"name": "a", "capability": "x", "cost_estimate_usd": "0.50",
         "approval": {"cost_over_usd": "1.00"}},
    )  # fmt: skip
    assert types(start(cheap)) == ["RunStarted", "TaskDispatched"]


def test_expiring_approval_escalates_then_expires_and_is_not_a_denial() -> None:
    workflow = wf(
        {"name": "a", "capability": "x",
         "approval": {"before": True, "timeout_s": 10, "warn_before_s": 3,
                      "approvers": "team", "escalate_to": ["leads"], "on_expiry": "escalate"}},
    )  # fmt: skip
    history = start(workflow)
    request = history[-1]
    assert isinstance(request, ApprovalRequested)
    assert request.group == "team"
    assert request.warn_at == T0 + timedelta(seconds=7)

    def timer(kind: str, at: datetime) -> TimerFact:
        return TimerFact(
            run_id=RUN, step="a", attempt=1, kind=kind,  # type: ignore[arg-type]
            request_id=request.request_id, at=at,
        )  # fmt: skip

    assert types(then(history, timer("approval_warn", T0 + timedelta(seconds=7)))) == [
        "ApprovalWarned"
    ]
    escalated = then(history, timer("approval", T0 + timedelta(seconds=10)))
    assert types(escalated) == ["ApprovalEscalated"]
    assert escalated[0].group == "leads"  # type: ignore[attr-defined]
    # the first deadline's timer firing again changes nothing: the new deadline is later
    assert then(history, timer("approval", T0 + timedelta(seconds=11))) == []
    expired = then(history, timer("approval", T0 + timedelta(seconds=20)))
    assert types(expired) == ["ApprovalExpired", "RunFailed"]
    assert "Denied" not in " ".join(types(history))
    with pytest.raises(Rejected):
        then(history, approve("a"))


def test_deciding_an_expired_request_is_a_clear_error() -> None:
    workflow = wf(
        {"name": "a", "capability": "x", "on_failure": "skip",
         "approval": {"before": True, "timeout_s": 5, "on_expiry": "deny"}},
        {"name": "b", "capability": "y"},
    )  # fmt: skip
    history = start(workflow)
    request = history[-1]
    assert isinstance(request, ApprovalRequested)
    fire = TimerFact(
        run_id=RUN, step="a", attempt=1, kind="approval", request_id=request.request_id,
        at=T0 + timedelta(seconds=5),
    )  # fmt: skip
    assert types(then(history, fire)) == ["ApprovalExpired", "StepSkipped", "TaskDispatched"]
    with pytest.raises(Rejected, match="expired at"):
        then(history, approve("a"))


def test_budget_is_reserved_before_dispatch_and_settled_on_result() -> None:
    workflow = wf({"name": "a", "capability": "x", "cost_estimate_usd": "0.10"})
    history = start(workflow, Budget(usd=Decimal("1.00")))
    assert types(history) == ["RunStarted", "BudgetReserved", "TaskDispatched"]
    assert state_of(history).remaining_usd == Decimal("0.90")
    events = then(history, result("a", tokens=1000))
    settled = next(e for e in events if isinstance(e, BudgetSettled))
    assert settled.reserved_usd == Decimal("0.10")
    assert settled.actual_usd == Decimal("0.002")  # 1000 × 0.5/M + 1000 × 1.5/M
    assert state_of(history).remaining_usd == Decimal("0.998")


def test_exhausted_budget_asks_for_a_raise_then_goes_on() -> None:
    workflow = wf(
        {"name": "a", "capability": "x", "cost_estimate_usd": "0.40"},
        {"name": "b", "capability": "y", "cost_estimate_usd": "0.40"},
    )
    history = start(workflow, Budget(usd=Decimal("0.50")))
    events = then(history, result("a", tokens=100_000))  # actual $0.20
    assert types(events)[-2:] == ["BudgetExhausted", "ApprovalRequested"]
    exhausted = events[-2]
    assert isinstance(exhausted, BudgetExhausted)
    assert exhausted.remaining_usd == Decimal("0.30")
    with pytest.raises(Rejected, match="raise it"):
        then(history, approve("b"))
    with pytest.raises(Rejected, match="below"):
        then(history, BudgetFact(run_id=RUN, usd=Decimal("0.1"), by="ann", at=T0))
    raised = then(history, BudgetFact(run_id=RUN, usd=Decimal("1.00"), by="ann", at=T0))
    assert types(raised) == ["BudgetRaised", "ApprovalGranted", "BudgetReserved", "TaskDispatched"]
    assert raised[0].actor == "human:ann"


def test_exhausted_budget_can_fail_closed() -> None:
    workflow = wf({"name": "a", "capability": "x", "cost_estimate_usd": "2"})
    events = start(workflow, Budget(usd=Decimal("1"), on_exhausted="fail"))
    assert types(events) == ["RunStarted", "BudgetExhausted", "RunFailed"]
    assert isinstance(events[-1], RunFailed)
    assert "fails closed" in events[-1].reason


def test_spend_never_passes_the_budget_by_more_than_the_step_in_flight() -> None:
    """The stated bound: spend ≤ budget + (actual − estimate) of the one attempt in flight."""
    workflow = wf(*({"name": f"s{i}", "capability": "x", "cost_estimate_usd": "0.01"}
                    for i in range(20)))  # fmt: skip
    history = start(workflow, Budget(usd=Decimal("0.05"), on_exhausted="fail"))
    worst_overrun = Decimal(0)
    for i in range(20):
        state = state_of(history)
        if state.terminal:
            break
        events = then(history, result(f"s{i}", tokens=4000))  # actual $0.008 each
        for e in events:
            if isinstance(e, BudgetSettled):
                worst_overrun = max(worst_overrun, e.actual_usd - e.reserved_usd)
    state = state_of(history)
    assert state.status == "failed"
    assert state.cost_usd <= Decimal("0.05") + worst_overrun
    over = wf({"name": "a", "capability": "x", "cost_estimate_usd": "0.001"},
              {"name": "b", "capability": "x", "cost_estimate_usd": "0.001"})  # fmt: skip
    history = start(over, Budget(usd=Decimal("0.002"), on_exhausted="fail"))
    then(history, result("a", tokens=100_000))  # $0.2 against an estimate of $0.001
    state = state_of(history)
    assert state.status == "failed"
    assert state.cost_usd == Decimal("0.2")  # over by exactly that one step's overrun
    assert state.cost_usd <= Decimal("0.002") + (Decimal("0.2") - Decimal("0.001"))


def test_repeated_broken_output_stops_and_asks_instead_of_spinning() -> None:
    workflow = wf(
        {"name": "p", "capability": "planner", "contract": "Plan@1",
         "retry": {"max_attempts": 10, "backoff_s": 0}},
    )  # fmt: skip
    history = start(workflow)
    broken = {"title": "", "questions": []}
    first = then(history, result("p", 1, broken))
    assert types(first)[-1] == "TaskDispatched"
    second = then(history, result("p", 2, broken))
    assert types(second)[-2:] == ["ContractViolated", "ApprovalRequested"]
    request = second[-1]
    assert isinstance(request, ApprovalRequested)
    assert request.kind == "loop"
    granted = then(history, approve("p"))
    assert types(granted) == ["ApprovalGranted", "TaskDispatched"]
    assert isinstance(granted[-1], TaskDispatched)
    assert granted[-1].attempt == 3


def test_attempt_limit_of_the_run_stops_a_loop() -> None:
    workflow = wf(
        {"name": "p", "capability": "x", "retry": {"max_attempts": 50, "backoff_s": 0}},
        limits={"max_attempts": 3},
    )
    history = start(workflow)
    for attempt in (1, 2, 3):
        fact = ResultFact(
            result=TaskResult(
                task_id=task_id(RUN, "p", attempt), run_id=RUN, step="p", attempt=attempt,
                agent_id="p-1", error={"message": f"boom {attempt}"}, started_at=T0,
                finished_at=T0,
            ),
            at=T0,
        )  # fmt: skip
        events = then(history, fact)
    assert types(events)[-1] == "RunFailed"
    assert "limit of 3 attempts" in events[-1].reason


def test_exhausted_retries_can_ask_a_person_for_one_more_try() -> None:
    workflow = wf(
        {"name": "p", "capability": "x", "on_failure": "ask", "retry": {"max_attempts": 1}}
    )
    history = start(workflow)
    fact = ResultFact(
        result=TaskResult(
            task_id=task_id(RUN, "p", 1), run_id=RUN, step="p", attempt=1, agent_id="p-1",
            error={"message": "down"}, started_at=T0, finished_at=T0,
        ),
        at=T0,
    )  # fmt: skip
    events = then(history, fact)
    assert types(events)[-1] == "ApprovalRequested"
    assert events[-1].kind == "exhausted"  # type: ignore[attr-defined]
    again = then(history, approve("p"))
    assert types(again) == ["ApprovalGranted", "TaskDispatched"]
    assert again[-1].attempt == 2  # type: ignore[attr-defined]


def test_flagged_output_waits_for_review() -> None:
    history = start(wf({"name": "a", "capability": "x"}))
    events = then(history, result("a", review="unsure about the numbers"))
    assert types(events) == ["ResultReceived", "ApprovalRequested"]
    assert events[-1].kind == "output"  # type: ignore[attr-defined]
    assert events[-1].context.proposed == {"ok": True}  # type: ignore[attr-defined]
    done = then(history, approve("a"))
    assert types(done) == ["ApprovalGranted", "TaskCompleted", "RunCompleted"]


def test_proposed_steps_are_admitted_within_limits_and_refused_beyond() -> None:
    workflow = wf(
        {"name": "plan", "capability": "planner", "may_propose": True},
        limits={"max_steps": 3},
    )
    history = start(workflow)
    proposals = [
        StepSpec(name="dig", capability="researcher"),
        StepSpec(name="more", capability="researcher", needs=["dig"]),
        StepSpec(name="plan", capability="x"),
        StepSpec(name="ghost", capability="x", needs=["nowhere"]),
    ]
    events = then(history, result("plan", proposals=proposals))
    kinds = types(events)
    assert kinds.count("StepAdmitted") == 2
    assert kinds.count("StepRefused") == 2
    refused = {e.name: e.reason for e in events if isinstance(e, StepRefused)}
    assert "already exists" in refused["plan"]
    assert "limit is 3" in refused["ghost"] or "unknown steps" in refused["ghost"]
    admitted = [e for e in events if isinstance(e, StepAdmitted)]
    assert admitted[0].spec.needs == ["plan"]  # defaults to after the proposer
    assert kinds[-1] == "TaskDispatched"
    assert events[-1].step == "dig"  # type: ignore[attr-defined]
    then(history, result("dig"))
    done = then(history, result("more"))
    assert types(done)[-1] == "RunCompleted"


def test_proposals_from_a_step_that_may_not_propose_are_ignored() -> None:
    history = start(wf({"name": "a", "capability": "x"}))
    events = then(history, result("a", proposals=[StepSpec(name="b", capability="y")]))
    assert "StepAdmitted" not in types(events)
    assert types(events)[-1] == "RunCompleted"
