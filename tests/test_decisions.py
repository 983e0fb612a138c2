"""decide/evolve over hand-written histories: pure, deterministic, no I/O."""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from cairn.coordinator.domain.decide import decide
from cairn.coordinator.domain.facts import (
    CancelFact,
    Policy,
    Rejected,
    ResultFact,
    StartRunFact,
    TimerFact,
    task_id,
)
from cairn.coordinator.domain.lifecycle import backoff_delay
from cairn.coordinator.domain.pricing import PriceTable
from cairn.coordinator.domain.state import EvolveError, RunState, evolve, fold
from cairn.coordinator.pricing import load_price_table
from cairn.coordinator.workflow import WorkflowError, parse_workflow
from cairn.events import (
    ContractViolated,
    CostCharged,
    Event,
    Intent,
    ResultIgnored,
    ResultReceived,
    RetryPolicy,
    RetryScheduled,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunStarted,
    StepSkipped,
    TaskCompleted,
    TaskDispatched,
    TaskError,
    TaskFailed,
    TaskResult,
    TaskTimedOut,
    Usage,
    WorkflowSpec,
    event_hash,
)
from cairn.events.contracts import resolve_contract

T0 = datetime(2026, 1, 1, tzinfo=UTC)
RUN = uuid.UUID("00000000-0000-4000-8000-000000000001")
POLICY = Policy(load_price_table(), resolve_contract)

PIPELINE = parse_workflow(
    {
        "name": "pipeline",
        "steps": [
            {"name": "plan", "capability": "planner", "input": {"topic": "$input.topic"},
             "contract": "Plan@1", "retry": {"max_attempts": 2}},
            {"name": "research", "capability": "researcher",
             "input": {"questions": "$steps.plan.output.questions"}},
        ],
        "output": {"plan": "$steps.plan.output", "research": "$steps.research.output"},
    }
)  # fmt: skip

PLAN = {"title": "Tides", "audience": "all", "questions": ["why?", "when?"]}


def start(workflow: WorkflowSpec = PIPELINE, **input: Any) -> list[Event]:
    fact = StartRunFact(
        run_id=RUN,
        workflow=workflow,
        input=input or {"topic": "tides"},
        intent=Intent(goal="explain tides", success_criteria=["clear"]),
        requested_by="client:test",
        at=T0,
    )
    return decide(None, fact, POLICY)


def result(
    step: str,
    attempt: int = 1,
    output: dict[str, Any] | None = None,
    error: TaskError | None = None,
    usage: list[Usage] | None = None,
    at: datetime = T0,
) -> ResultFact:
    return ResultFact(
        result=TaskResult(
            task_id=task_id(RUN, step, attempt),
            run_id=RUN,
            step=step,
            attempt=attempt,
            agent_id=f"{step}-a1",
            output=output,
            error=error,
            usage=usage or [],
            started_at=at,
            finished_at=at + timedelta(milliseconds=5),
        ),
        at=at + timedelta(milliseconds=6),
    )


def step_through(history: list[Event], fact: ResultFact | CancelFact | TimerFact) -> list[Event]:
    state = fold(history)
    assert state is not None
    return decide(state, fact, POLICY)


def types(events: list[Event]) -> list[str]:
    return [e.type_name() for e in events]


def test_start_records_the_run_and_dispatches_the_first_step() -> None:
    events = start()
    assert types(events) == ["RunStarted", "TaskDispatched"]
    dispatched = events[1]
    assert isinstance(dispatched, TaskDispatched)
    assert dispatched.step == "plan"
    assert dispatched.input == {"topic": "tides"}
    assert dispatched.intent.goal == "explain tides"
    assert dispatched.task_id == f"{RUN}:plan:1"
    assert [e.seq for e in events] == [1, 2]
    assert events[0].actor == "client:test"
    assert dispatched.actor == "coordinator"


def test_decisions_are_deterministic() -> None:
    assert start() == start()
    assert [e.event_id for e in start()] == [e.event_id for e in start()]


def test_completed_step_is_charged_and_the_next_step_gets_its_output() -> None:
    history = start()
    usage = [Usage(model="cairn-offline-1", input_tokens=1000, output_tokens=2000)]
    events = step_through(history, result("plan", output=PLAN, usage=usage))
    assert types(events) == ["ResultReceived", "CostCharged", "TaskCompleted", "TaskDispatched"]
    received, charge, completed, dispatched = events
    assert isinstance(received, ResultReceived)
    assert received.output == PLAN
    # The actor is who NATS authenticated (the step's capability); the agent's own id is a detail.
    assert (received.actor, received.agent_id) == ("agent:planner", "plan-a1")
    assert isinstance(charge, CostCharged)
    # 1000 × 0.50/M + 2000 × 1.50/M
    assert charge.amount_usd == Decimal("0.0035")
    assert charge.price_table == POLICY.prices.version
    assert isinstance(completed, TaskCompleted)
    assert (completed.actor, completed.agent_id) == ("agent:planner", "plan-a1")
    assert isinstance(dispatched, TaskDispatched)
    assert dispatched.input == {"questions": ["why?", "when?"]}
    assert [(entry.step, entry.agent_id) for entry in dispatched.lineage] == [("plan", "plan-a1")]
    assert dispatched.lineage[0].output_hash == completed.output_hash


def test_last_step_completes_the_run_with_the_mapped_output() -> None:
    history = start()
    history += step_through(history, result("plan", output=PLAN))
    events = step_through(history, result("research", output={"facts": [1]}))
    assert types(events) == ["ResultReceived", "TaskCompleted", "RunCompleted"]
    done = events[-1]
    assert isinstance(done, RunCompleted)
    assert done.output == {"plan": PLAN, "research": {"facts": [1]}}
    state = fold(history + events)
    assert state is not None
    assert state.status == "completed"


def test_duplicate_result_is_ignored_and_not_charged_again() -> None:
    history = start()
    usage = [Usage(model="cairn-offline-1", input_tokens=10, output_tokens=10)]
    history += step_through(history, result("plan", output=PLAN, usage=usage))
    again = step_through(history, result("plan", output=PLAN, usage=usage))
    assert types(again) == ["ResultReceived", "ResultIgnored"]
    assert isinstance(again[1], ResultIgnored)
    assert "duplicate" in again[1].reason


def timer(step: str, attempt: int, kind: str, at: datetime) -> TimerFact:
    return TimerFact(run_id=RUN, step=step, attempt=attempt, kind=kind, at=at)  # type: ignore[arg-type]


def test_retryable_error_is_retried_after_backoff_then_fails_the_run() -> None:
    history = start()
    first = step_through(history, result("plan", error=TaskError(message="flaky")))
    assert types(first) == ["ResultReceived", "TaskFailed", "RetryScheduled"]
    scheduled = first[2]
    assert isinstance(scheduled, RetryScheduled)
    assert scheduled.attempt == 2
    assert "retry 2/2" in scheduled.reason
    assert scheduled.due_at == first[1].at + timedelta(seconds=scheduled.delay_s)
    history += first
    retry = step_through(history, timer("plan", 2, "retry", scheduled.due_at))
    assert types(retry) == ["TaskDispatched"]
    assert isinstance(retry[0], TaskDispatched)
    assert retry[0].attempt == 2
    history += retry
    second = step_through(history, result("plan", attempt=2, error=TaskError(message="flaky")))
    assert types(second) == ["ResultReceived", "TaskFailed", "RunFailed"]
    failed = second[-1]
    assert isinstance(failed, RunFailed)
    assert failed.step == "plan"
    assert "after 2 attempt" in failed.reason


def test_non_retryable_error_fails_at_once() -> None:
    history = start()
    events = step_through(
        history, result("plan", error=TaskError(message="bad input", retryable=False))
    )
    assert types(events) == ["ResultReceived", "TaskFailed", "RunFailed"]


def test_contract_violation_retries_with_the_errors_to_repair() -> None:
    history = start()
    events = step_through(history, result("plan", output={"title": "", "questions": []}))
    assert types(events) == ["ResultReceived", "ContractViolated", "RetryScheduled"]
    _, violated, scheduled = events
    assert isinstance(violated, ContractViolated)
    assert isinstance(scheduled, RetryScheduled)
    assert any("questions" in e for e in violated.errors)
    events += step_through(history + events, timer("plan", 2, "retry", scheduled.due_at))
    retry = events[-1]
    assert isinstance(retry, TaskDispatched)
    assert retry.repair == violated.errors
    state = fold(history + events)
    assert state is not None
    assert state.steps["research"].status == "pending"  # never saw the broken output


def test_stale_attempt_result_is_ignored() -> None:
    history = start()
    history += step_through(history, result("plan", error=TaskError(message="x")))
    late = step_through(history, result("plan", attempt=1, output=PLAN))
    assert types(late) == ["ResultReceived", "ResultIgnored"]
    assert "attempt 2 is scheduled" in late[1].reason
    due = history[-1]
    assert isinstance(due, RetryScheduled)
    history += step_through(history, timer("plan", 2, "retry", due.due_at))
    late = step_through(history, result("plan", attempt=1, output=PLAN))
    assert types(late) == ["ResultReceived", "ResultIgnored"]
    assert "current attempt is 2" in late[1].reason


def test_result_for_a_task_never_dispatched_is_rejected() -> None:
    history = start()
    with pytest.raises(Rejected):
        step_through(history, result("research", output={}))
    with pytest.raises(Rejected):
        step_through(history, result("nope", output={}))


def test_result_after_the_run_ended_is_ignored() -> None:
    history = start()
    history += step_through(history, CancelFact(run_id=RUN, requested_by="human:ann", at=T0))
    events = step_through(history, result("plan", output=PLAN))
    assert types(events) == ["ResultReceived", "ResultIgnored"]


def test_cancel_records_who_and_rejects_a_second_cancel() -> None:
    history = start()
    events = step_through(
        history, CancelFact(run_id=RUN, requested_by="human:ann", reason="wrong topic", at=T0)
    )
    assert types(events) == ["RunCancelled"]
    assert isinstance(events[0], RunCancelled)
    assert events[0].actor == "human:ann"
    assert events[0].reason == "wrong topic"
    with pytest.raises(Rejected, match="already cancelled"):
        step_through(history + events, CancelFact(run_id=RUN, requested_by="x", at=T0))


def test_starting_an_existing_run_is_rejected() -> None:
    state = fold(start())
    fact = StartRunFact(
        run_id=RUN, workflow=PIPELINE, input={}, intent=Intent(goal="g"),
        requested_by="x", at=T0,
    )  # fmt: skip
    with pytest.raises(Rejected, match="already exists"):
        decide(state, fact, POLICY)


def test_missing_reference_fails_the_run_with_the_reason() -> None:
    events = start(other="x")  # no `topic` in the input
    assert types(events) == ["RunStarted", "RunFailed"]
    assert isinstance(events[-1], RunFailed)
    assert "$input.topic" in events[-1].error


def test_reference_default_is_used_when_input_lacks_the_field() -> None:
    wf = parse_workflow(
        {"name": "w", "steps": [{"name": "a", "capability": "c",
                                 "input": {"aud": "$input.audience ?? everyone"}}]}
    )  # fmt: skip
    dispatched = start(wf)[1]
    assert isinstance(dispatched, TaskDispatched)
    assert dispatched.input == {"aud": "everyone"}


def test_parallel_steps_are_dispatched_together_and_join() -> None:
    wf = parse_workflow(
        {
            "name": "fan",
            "steps": [
                {"name": "a", "capability": "x", "needs": []},
                {"name": "b", "capability": "y", "needs": []},
                {"name": "c", "capability": "z", "needs": ["a", "b"]},
            ],
        }
    )
    history = start(wf)
    assert types(history) == ["RunStarted", "TaskDispatched", "TaskDispatched"]
    history += step_through(history, result("a", output={"v": 1}))
    assert types(history)[-1] == "TaskCompleted"
    events = step_through(history, result("b", output={"v": 2}))
    assert types(events) == ["ResultReceived", "TaskCompleted", "TaskDispatched"]
    c = events[-1]
    assert isinstance(c, TaskDispatched)
    assert {entry.step for entry in c.lineage} == {"a", "b"}


def test_lineage_is_transitive() -> None:
    wf = parse_workflow(
        {"name": "chain", "steps": [{"name": f"s{i}", "capability": "x"} for i in range(1, 6)]}
    )
    history = start(wf)
    for i in range(1, 5):
        history += step_through(history, result(f"s{i}", output={"i": i}))
    last = history[-1]
    assert isinstance(last, TaskDispatched)
    assert last.step == "s5"
    assert [entry.step for entry in last.lineage] == ["s1", "s2", "s3", "s4"]
    assert last.intent.goal == "explain tides"


def test_unpriced_model_is_charged_zero_with_a_reason() -> None:
    history = start()
    usage = [Usage(model="mystery-model", input_tokens=5, output_tokens=5)]
    events = step_through(history, result("plan", output=PLAN, usage=usage))
    charge = events[1]
    assert isinstance(charge, CostCharged)
    assert charge.amount_usd == 0
    assert "not in price table" in charge.reason


def test_evolve_rejects_gaps_and_events_before_start() -> None:
    events = start()
    with pytest.raises(EvolveError):
        evolve(None, events[1])
    state = fold(events[:1])
    assert isinstance(state, RunState)
    gap = events[1].model_copy(update={"seq": 5})
    with pytest.raises(EvolveError):
        evolve(state, gap)
    with pytest.raises(EvolveError):
        evolve(state, events[0])


def test_evolve_tracks_step_state_and_cost() -> None:
    history = start()
    usage = [Usage(model="cairn-offline-1", input_tokens=2_000_000, output_tokens=0)]
    history += step_through(history, result("plan", output=PLAN, usage=usage))
    state = fold(history)
    assert state is not None
    assert state.cost_usd == Decimal("1")
    assert state.steps["plan"].status == "completed"
    assert state.steps["research"].status == "dispatched"
    assert state.version == len(history)
    assert isinstance(history[0], RunStarted)
    assert isinstance(history[-1], TaskDispatched)
    assert not any(isinstance(e, TaskFailed) for e in history)


def test_workflow_errors_name_the_problem() -> None:
    with pytest.raises(WorkflowError, match="not declared before"):
        parse_workflow(
            {"name": "w", "steps": [
                {"name": "a", "capability": "x", "input": {"v": "$steps.b.output"}},
                {"name": "b", "capability": "x"},
            ]}
        )  # fmt: skip
    with pytest.raises(WorkflowError, match="unknown output contract"):
        parse_workflow(
            {"name": "w", "steps": [{"name": "a", "capability": "x", "contract": "Nope@3"}]}
        )
    with pytest.raises(WorkflowError, match="used twice"):
        parse_workflow({"name": "w", "steps": [{"name": "a", "capability": "x"}] * 2})
    with pytest.raises(WorkflowError, match="steps"):
        parse_workflow({"name": "w", "steps": []})


def test_price_table_charge_is_exact() -> None:
    table = PriceTable.model_validate(
        {"version": "t", "models": {"m": {"input_per_mtok": "0.1", "output_per_mtok": "0.3"}}}
    )
    assert table.charge(Usage(model="m", input_tokens=3, output_tokens=7)) == Decimal("0.0000024")
    assert table.charge(Usage(model="other")) is None


def test_timeout_is_recorded_and_retried() -> None:
    history = start()
    dispatched = history[-1]
    assert isinstance(dispatched, TaskDispatched)
    late = dispatched.at + timedelta(seconds=dispatched.timeout_s)
    events = step_through(history, timer("plan", 1, "timeout", late))
    assert types(events) == ["TaskTimedOut", "RetryScheduled"]
    timed_out = events[0]
    assert isinstance(timed_out, TaskTimedOut)
    assert timed_out.actor == "coordinator"
    assert "no result within" in timed_out.reason


def test_stale_timers_do_nothing() -> None:
    history = start()
    history += step_through(history, result("plan", output=PLAN))
    assert step_through(history, timer("plan", 1, "timeout", T0)) == []
    assert step_through(history, timer("plan", 2, "retry", T0)) == []
    assert step_through(history, timer("nope", 1, "timeout", T0)) == []


def test_timeouts_not_in_retry_on_fail_at_once() -> None:
    wf = parse_workflow(
        {"name": "w", "steps": [{"name": "a", "capability": "x",
                                 "retry": {"max_attempts": 5, "retry_on": ["error"]}}]}
    )  # fmt: skip
    history = start(wf)
    events = step_through(history, timer("a", 1, "timeout", T0))
    assert types(events) == ["TaskTimedOut", "RunFailed"]
    assert "does not retry" in events[-1].reason


def test_skip_policy_goes_on_without_the_step() -> None:
    wf = parse_workflow(
        {
            "name": "w",
            "steps": [
                {"name": "a", "capability": "x", "retry": {"max_attempts": 1},
                 "on_failure": "skip"},
                {"name": "b", "capability": "y", "input": {"v": "$steps.a.output.v ?? none"}},
            ],
        }
    )  # fmt: skip
    history = start(wf)
    events = step_through(history, result("a", error=TaskError(message="down")))
    assert types(events) == ["ResultReceived", "TaskFailed", "StepSkipped", "TaskDispatched"]
    assert isinstance(events[2], StepSkipped)
    assert isinstance(events[3], TaskDispatched)
    assert events[3].input == {"v": "none"}
    history += events
    done = step_through(history, result("b", output={"ok": True}))
    assert types(done) == ["ResultReceived", "TaskCompleted", "RunCompleted"]


def test_zero_backoff_dispatches_at_once() -> None:
    wf = parse_workflow(
        {"name": "w", "steps": [{"name": "a", "capability": "x",
                                 "retry": {"max_attempts": 2, "backoff_s": 0}}]}
    )  # fmt: skip
    events = step_through(start(wf), result("a", error=TaskError(message="x")))
    assert types(events) == ["ResultReceived", "TaskFailed", "TaskDispatched"]


def test_backoff_grows_is_capped_and_jitter_is_bounded_and_deterministic() -> None:
    policy = RetryPolicy(backoff_s=1, multiplier=2, max_backoff_s=5, jitter=0.2)
    delays = [backoff_delay(policy, n, f"task-{n}") for n in range(2, 8)]
    bases = [1, 2, 4, 5, 5, 5]
    for delay, base in zip(delays, bases, strict=True):
        assert base * 0.8 <= delay <= base * 1.2
    assert backoff_delay(policy, 3, "t") == backoff_delay(policy, 3, "t")
    spread = {backoff_delay(policy, 2, f"t{i}") for i in range(50)}
    assert len(spread) > 40  # jitter actually spreads retries
    flat = RetryPolicy(backoff_s=1, jitter=0)
    assert backoff_delay(flat, 2, "x") == 1.0


def test_each_event_links_to_the_previous_one_by_hash() -> None:
    history = start()
    history += step_through(history, result("plan", output=PLAN))
    assert history[0].prev_hash == ""
    for before, after in itertools.pairwise(history):
        assert after.prev_hash == event_hash(before)
    state = fold(history)
    assert state is not None
    assert state.last_hash == event_hash(history[-1])


def test_completed_output_comes_from_the_received_result() -> None:
    history = start()
    history += step_through(history, result("plan", output=PLAN))
    state = fold(history)
    assert state is not None
    assert state.steps["plan"].output == PLAN
    assert state.steps["plan"].received is None


def test_a_late_result_is_charged_once_and_a_duplicate_never() -> None:
    history = start()
    usage = [Usage(model="cairn-offline-1", input_tokens=1000, output_tokens=0)]
    history += step_through(history, result("plan", error=TaskError(message="slow")))
    # attempt 1 failed and was never charged; its late output arrives with real usage
    late = step_through(history, result("plan", attempt=1, output=PLAN, usage=usage))
    assert types(late) == ["ResultReceived", "CostCharged", "ResultIgnored"]
    assert "late result" in late[1].reason
    history += late
    again = step_through(history, result("plan", attempt=1, output=PLAN, usage=usage))
    assert types(again) == ["ResultReceived", "ResultIgnored"]


def test_timer_queue_compaction_keeps_only_what_matters() -> None:
    from cairn.coordinator.timers import TimerQueue

    queue = TimerQueue()
    for i in range(10):
        queue.push(T0 + timedelta(seconds=i), RUN, f"s{i}", 1, "timeout")
    queue.compact(lambda t: t.step in ("s3", "s7"))
    assert len(queue) == 2
    assert [t.step for t in queue.due(T0 + timedelta(seconds=60))] == ["s3", "s7"]


def test_a_task_waiting_for_an_absent_capability_is_recorded_once() -> None:
    from cairn.coordinator.domain.facts import UnservedFact, fact_for
    from cairn.coordinator.history.replay import check_history
    from cairn.events import CapabilityUnserved

    def waits(attempt: int = 1) -> UnservedFact:
        return UnservedFact(run_id=RUN, step="plan", attempt=attempt, capability="planner",
                            at=T0 + timedelta(seconds=5))  # fmt: skip

    history = start()
    (noted,) = decide(fold(history), waits(), POLICY)
    assert isinstance(noted, CapabilityUnserved)
    assert (noted.step, noted.attempt, noted.capability, noted.actor) == (
        "plan", 1, "planner", "coordinator",
    )  # fmt: skip
    history.append(noted)
    assert decide(fold(history), waits(), POLICY) == []  # once per attempt
    assert decide(fold(history), waits(attempt=2), POLICY) == []  # not an attempt in flight
    # The task still waits: its result, when an agent comes, completes the step as usual.
    after = step_through(history, result("plan", output=PLAN))
    assert "TaskCompleted" in types(after)
    history += after
    assert decide(fold(history), waits(), POLICY) == []  # the attempt moved on
    # Replay rebuilds the fact from the record and decides it the same way.
    assert isinstance(fact_for(fold(history[: history.index(noted)]), noted), UnservedFact)
    assert check_history(history, POLICY).ok
