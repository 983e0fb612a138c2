"""What happens next: `decide(state, fact, policy) -> [events]`, one handler per fact. Pure: the
time and every input come from the fact, so running this code over a recorded history
reproduces its decisions.

The rules the handlers apply live below, by layer: `facts` (what is decided from), `builder`
(chaining the events), `approval_requests`, `money` and `graph`, `lifecycle` (a step's way
through the run), `approval_answers` (what a person's answer does).
"""

from __future__ import annotations

from pydantic import ValidationError

from cairn.coordinator.domain.approval_answers import answer, approval_timer
from cairn.coordinator.domain.approval_requests import request_approval
from cairn.coordinator.domain.builder import COORDINATOR, Decided, Decision
from cairn.coordinator.domain.facts import (
    BUDGET_REASON,
    CANCEL_REASON,
    BudgetFact,
    CancelFact,
    Fact,
    Policy,
    Rejected,
    ResultFact,
    StartRunFact,
    TimerFact,
    UnservedFact,
    task_id,
)
from cairn.coordinator.domain.lifecycle import advance, begin, complete, retry_or_fail, step_timer
from cairn.coordinator.domain.money import charge, charge_late, settle
from cairn.coordinator.domain.state import RunState
from cairn.events import (
    ApprovalGranted,
    BudgetRaised,
    CapabilityUnserved,
    ContractViolated,
    Event,
    OutputCarried,
    ResultIgnored,
    ResultReceived,
    RunCancelled,
    RunStarted,
    TaskFailed,
    content_hash,
)
from cairn.events.mappings import received_fields
from cairn.events.validation import error_lines


def decide(state: RunState | None, fact: Fact, policy: Policy) -> list[Event]:
    """The events that follow from `fact` given the run's `state`."""
    if isinstance(fact, StartRunFact):
        return _start(state, fact, policy)
    if state is None:
        raise Rejected("unknown run")
    if isinstance(fact, ResultFact):
        return _result(state, fact, policy)
    if isinstance(fact, TimerFact):
        if fact.kind in ("approval", "approval_warn"):
            return approval_timer(state, fact, policy)
        return step_timer(state, fact, policy)
    if isinstance(fact, BudgetFact):
        return _budget(state, fact, policy)
    if isinstance(fact, UnservedFact):
        return _unserved(state, fact, policy)
    if isinstance(fact, CancelFact):
        return _cancel(state, fact, policy)
    return answer(state, fact, policy)


def decide_with_state(
    state: RunState | None, fact: Fact, policy: Policy
) -> tuple[list[Event], RunState | None]:
    """`decide`, and the state its events lead to, without folding them a second time."""
    events = decide(state, fact, policy)
    if events and isinstance(events, Decided):
        return events, events.state
    return events, state


def _start(state: RunState | None, fact: StartRunFact, policy: Policy) -> list[Event]:
    if state is not None:
        raise Rejected(f"run {fact.run_id} already exists ({state.status})")
    d = Decision(None, fact.run_id, fact.at, policy)
    d.emit(
        RunStarted,
        actor=fact.requested_by,
        reason=f"start {fact.workflow.name} v{fact.workflow.version}",
        workflow=fact.workflow,
        input=fact.input,
        intent=fact.intent,
        budget=fact.budget,
        tenant=fact.tenant,
        forked_from=fact.forked_from,
        carried=fact.carried,
        trace_id=fact.trace_id,
        trace_span_id=fact.trace_span_id,
    )
    for spec in fact.workflow.steps:
        carried = fact.carried.get(spec.name)
        if carried is not None:
            d.emit(
                OutputCarried,
                actor=COORDINATOR,
                reason=f"taken over from {carried.source}",
                step=spec.name,
                output_hash=content_hash(carried.output),
                source=carried.source,
            )
    advance(d)
    return d.events


def _cancel(state: RunState, fact: CancelFact, policy: Policy) -> list[Event]:
    if state.terminal:
        raise Rejected(f"run {state.run_id} is already {state.status}")
    d = Decision(state, state.run_id, fact.at, policy)
    d.emit(RunCancelled, actor=fact.requested_by, reason=fact.reason or CANCEL_REASON)
    return d.events


def _result(state: RunState, fact: ResultFact, policy: Policy) -> list[Event]:
    result = fact.result
    step = state.steps.get(result.step)
    if step is None or result.attempt < 1 or result.attempt > step.attempt:
        raise Rejected(f"task {result.task_id} was never dispatched in run {state.run_id}")
    if result.task_id != task_id(state.run_id, result.step, result.attempt):
        raise Rejected(f"task id {result.task_id} does not match its step and attempt")
    if state.terminal and result.task_id in state.ignored_tasks:
        # A finished run records one ignored copy of a task's result (its tokens charged once);
        # recording every further copy would let them grow a finished run without end.
        raise Rejected(
            f"another copy of the result for task {result.task_id}, already recorded as "
            f"ignored: the run is {state.status}"
        )
    # Who answered, as NATS authenticated it: the capability the step was sent to (what the
    # agent says of itself stays in `agent_id`).
    agent = f"agent:{state.workflow.step(result.step).capability}"
    d = Decision(state, state.run_id, fact.at, policy)
    d.emit(
        ResultReceived,
        actor=agent,
        reason="error reported" if result.error else "output reported",
        **received_fields(result),
    )
    if state.terminal:
        charge_late(d, result)
        d.emit(
            ResultIgnored,
            actor=COORDINATOR,
            reason=f"run is already {state.status}",
            task_id=result.task_id,
            agent_id=result.agent_id,
        )
        return d.events
    if not state.is_current(result.step, result.task_id):
        if step.status == "completed" and step.task_id == result.task_id:
            why = "duplicate result: the attempt was already completed"
        elif step.task_id != result.task_id:
            why = f"result for attempt {result.attempt}, but the current attempt is {step.attempt}"
        elif step.status == "retry_wait":
            why = f"attempt {result.attempt} already ended; attempt {step.attempt + 1} is scheduled"
        else:
            why = f"step is {step.status}"
        charge_late(d, result)
        d.emit(
            ResultIgnored,
            actor=COORDINATOR,
            reason=why,
            task_id=result.task_id,
            agent_id=result.agent_id,
        )
        return d.events

    # Usage is charged whatever the outcome: the tokens were spent.
    charged, tokens = charge(d, result, "")
    settle(d, result.step, result.attempt, charged, tokens)
    spec = state.workflow.step(result.step)

    duration_ms = (result.finished_at - result.started_at).total_seconds() * 1000
    if result.error is not None or result.output is None:
        error = result.error.message if result.error else "result has neither output nor error"
        retryable = result.error.retryable if result.error else False
        d.emit(
            TaskFailed,
            actor=agent,
            reason=error,
            task_id=result.task_id,
            step=result.step,
            attempt=result.attempt,
            agent_id=result.agent_id,
            error=error,
            retryable=retryable,
        )
        retry_or_fail(d, result.step, error, cause="error", retryable=retryable, repair=[])
        return d.events

    if spec.contract:
        model = policy.contract(spec.contract)
        try:
            model.model_validate(result.output)
        except ValidationError as exc:
            errors = error_lines(exc)
            d.emit(
                ContractViolated,
                actor=COORDINATOR,
                reason=f"output does not meet contract {spec.contract}",
                task_id=result.task_id,
                step=result.step,
                attempt=result.attempt,
                agent_id=result.agent_id,
                contract=spec.contract,
                errors=errors,
            )
            received = d.run.step(result.step)
            if received.received_hash in received.seen_hashes[:-1]:
                # The same broken output again: retrying would spin. A person decides.
                request_approval(
                    d,
                    result.step,
                    result.attempt,
                    "loop",
                    proposed=result.output,
                    note="the agent returned the same output as an earlier attempt",
                )
                return d.events
            retry_or_fail(
                d,
                result.step,
                f"output broke contract {spec.contract}: {'; '.join(errors)}",
                cause="contract",
                retryable=True,
                repair=errors,
            )
            return d.events

    flagged = result.review is not None and (spec.approval is None or spec.approval.on_flag)
    if flagged and "output" not in step.cleared:
        request_approval(
            d,
            result.step,
            result.attempt,
            "output",
            proposed=result.output,
            note=result.review or "",
        )
        return d.events
    complete(d, result.step, duration_ms)
    return d.events


def _budget(state: RunState, fact: BudgetFact, policy: Policy) -> list[Event]:
    if state.terminal:
        raise Rejected(f"run {state.run_id} is already {state.status}")
    committed = state.cost_usd + state.reserved_usd
    if fact.usd is not None and fact.usd < committed:
        raise Rejected(
            f"a budget of ${fact.usd} is below the ${committed} already spent or reserved"
        )
    if fact.usd is None and fact.tokens is None:
        raise Rejected("give a new budget in USD, in tokens, or both")
    d = Decision(state, state.run_id, fact.at, policy)
    d.emit(
        BudgetRaised,
        actor=f"human:{fact.by}",
        reason=fact.reason or BUDGET_REASON,
        usd=fact.usd,
        tokens=fact.tokens,
        by=fact.by,
    )
    # Raising the budget is the answer a budget request waits for.
    for approval in state.pending_approvals():
        if approval.kind == "budget":
            d.emit(
                ApprovalGranted,
                actor=f"human:{fact.by}",
                reason="budget raised",
                request_id=approval.request_id,
                step=approval.step,
                by=fact.by,
            )
            begin(
                d,
                approval.step,
                approval.attempt,
                f"budget raised by {fact.by}",
                list(d.run.step(approval.step).repair),
            )
    return d.events


def _unserved(state: RunState, fact: UnservedFact, policy: Policy) -> list[Event]:
    """Record, once per attempt, that a dispatched task waits for an agent; nothing when the
    attempt has moved on (its result came, the run ended) or was recorded already."""
    step = state.steps.get(fact.step)
    if (
        state.terminal
        or step is None
        or not state.is_current(fact.step, task_id(state.run_id, fact.step, fact.attempt))
        or step.unserved_attempt == fact.attempt
    ):
        return []
    d = Decision(state, state.run_id, fact.at, policy)
    d.emit(
        CapabilityUnserved,
        actor=COORDINATOR,
        reason=(
            f"no live agent serves {fact.capability!r}: the task waits in its queue until one "
            "comes, or the step times out"
        ),
        step=fact.step,
        attempt=fact.attempt,
        capability=fact.capability,
    )
    return d.events
