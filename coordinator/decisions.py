"""What happens next: `decide(state, fact, policy) -> [events]`. Pure: the time and every input
come from the fact, so running this code over a recorded history reproduces its decisions.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from cairn.events import (
    ContractViolated,
    CostCharged,
    Event,
    Frozen,
    Intent,
    Lineage,
    ReportedError,
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
    TaskFailed,
    TaskResult,
    TaskTimedOut,
    WorkflowSpec,
    content_hash,
)

from .pricing import PriceTable
from .state import STEP_DONE, RunState, evolve
from .workflow import ReferenceError_, referenced_steps, resolve

COORDINATOR = "coordinator"


class StartRunFact(Frozen):
    run_id: uuid.UUID
    workflow: WorkflowSpec
    input: dict[str, Any]
    intent: Intent
    requested_by: str
    at: datetime


class ResultFact(Frozen):
    result: TaskResult
    at: datetime


class CancelFact(Frozen):
    run_id: uuid.UUID
    requested_by: str
    reason: str = ""
    at: datetime


class TimerFact(Frozen):
    """A timer the coordinator set has come due: a step's timeout, or the end of a backoff."""

    run_id: uuid.UUID
    step: str
    attempt: int
    kind: Literal["timeout", "retry"]
    at: datetime


Fact = StartRunFact | ResultFact | CancelFact | TimerFact


class Rejected(ValueError):
    """The fact does not belong to this run (an unknown task, a run that already exists...).

    Nothing is recorded in the run; the caller answers or dead-letters it with this reason.
    """


@dataclass(frozen=True)
class Policy:
    """The coordinator's rules that decisions consult: prices and output contracts."""

    prices: PriceTable
    contract: Callable[[str], type[BaseModel]]


def task_id(run_id: uuid.UUID, step: str, attempt: int) -> str:
    return f"{run_id}:{step}:{attempt}"


class _Decision:
    """Builds a list of events, evolving a private copy of the state as it goes."""

    def __init__(self, state: RunState | None, run_id: uuid.UUID, at: datetime) -> None:
        self.state = state
        self.run_id = run_id
        self.at = at
        self.events: list[Event] = []

    @property
    def next_seq(self) -> int:
        return (self.state.version if self.state else 0) + 1

    def emit(self, cls: type[Event], **fields: Any) -> None:
        event = cls(
            run_id=self.run_id,
            seq=self.next_seq,
            at=self.at,
            prev_hash=self.state.last_hash if self.state else "",
            **fields,
        )
        self.state = evolve(self.state, event)
        self.events.append(event)

    @property
    def run(self) -> RunState:
        assert self.state is not None
        return self.state


def decide(state: RunState | None, fact: Fact, policy: Policy) -> list[Event]:
    """The events that follow from `fact` given the run's `state`."""
    if isinstance(fact, StartRunFact):
        return _start(state, fact)
    if state is None:
        raise Rejected("unknown run")
    if isinstance(fact, ResultFact):
        return _result(state, fact, policy)
    if isinstance(fact, TimerFact):
        return _timer(state, fact)
    return _cancel(state, fact)


def _timer(state: RunState, fact: TimerFact) -> list[Event]:
    """A timer that no longer matches the step (its result came, the run ended) does nothing."""
    step = state.steps.get(fact.step)
    if state.terminal or step is None:
        return []
    d = _Decision(state, state.run_id, fact.at)
    if fact.kind == "timeout" and step.status == "dispatched" and step.attempt == fact.attempt:
        assert step.task_id is not None
        d.emit(
            TaskTimedOut,
            actor=COORDINATOR,
            reason=f"no result within {step.timeout_s:g}s",
            task_id=step.task_id,
            step=fact.step,
            attempt=fact.attempt,
            timeout_s=step.timeout_s,
        )
        _retry_or_fail(
            d,
            fact.step,
            f"attempt {fact.attempt} timed out after {step.timeout_s:g}s",
            cause="timeout",
            retryable=True,
            repair=[],
        )
    elif fact.kind == "retry" and step.status == "retry_wait" and step.attempt + 1 == fact.attempt:
        limit = state.workflow.step(fact.step).retry.max_attempts
        reason = f"backoff over: attempt {fact.attempt}/{limit}"
        _dispatch(d, fact.step, fact.attempt, reason, list(step.repair))
    return d.events


def backoff_delay(policy: RetryPolicy, next_attempt: int, task: str) -> float:
    """Seconds to wait before `next_attempt`; the jitter is drawn from the task id, so the same
    history always gives the same delay."""
    retry_number = next_attempt - 1
    base = min(policy.max_backoff_s, policy.backoff_s * policy.multiplier ** (retry_number - 1))
    digest = hashlib.sha256(task.encode()).digest()
    spread = (int.from_bytes(digest[:8], "big") / 2**64) * 2 - 1  # in [-1, 1)
    return max(0.0, base * (1 + policy.jitter * spread))


def _start(state: RunState | None, fact: StartRunFact) -> list[Event]:
    if state is not None:
        raise Rejected(f"run {fact.run_id} already exists ({state.status})")
    d = _Decision(None, fact.run_id, fact.at)
    d.emit(
        RunStarted,
        actor=fact.requested_by,
        reason=f"start {fact.workflow.name} v{fact.workflow.version}",
        workflow=fact.workflow,
        input=fact.input,
        intent=fact.intent,
    )
    _advance(d)
    return d.events


def _cancel(state: RunState, fact: CancelFact) -> list[Event]:
    if state.terminal:
        raise Rejected(f"run {state.run_id} is already {state.status}")
    d = _Decision(state, state.run_id, fact.at)
    d.emit(RunCancelled, actor=fact.requested_by, reason=fact.reason or "cancelled on request")
    return d.events


def _result(state: RunState, fact: ResultFact, policy: Policy) -> list[Event]:
    result = fact.result
    step = state.steps.get(result.step)
    if step is None or result.attempt < 1 or result.attempt > step.attempt:
        raise Rejected(f"task {result.task_id} was never dispatched in run {state.run_id}")
    if result.task_id != task_id(state.run_id, result.step, result.attempt):
        raise Rejected(f"task id {result.task_id} does not match its step and attempt")
    agent = f"agent:{result.agent_id}"
    d = _Decision(state, state.run_id, fact.at)
    d.emit(
        ResultReceived,
        actor=agent,
        reason="error reported" if result.error else "output reported",
        task_id=result.task_id,
        step=result.step,
        attempt=result.attempt,
        agent_id=result.agent_id,
        output=result.output,
        error=(
            ReportedError(message=result.error.message, retryable=result.error.retryable)
            if result.error
            else None
        ),
        usage=result.usage,
        started_at=result.started_at,
        finished_at=result.finished_at,
    )
    if state.terminal:
        d.emit(
            ResultIgnored,
            actor=COORDINATOR,
            reason=f"run is already {state.status}",
            task_id=result.task_id,
            agent_id=result.agent_id,
        )
        return d.events
    if step.status != "dispatched" or step.task_id != result.task_id:
        if step.status == "completed" and step.task_id == result.task_id:
            why = "duplicate result: the attempt was already completed"
        elif step.task_id != result.task_id:
            why = f"result for attempt {result.attempt}, but the current attempt is {step.attempt}"
        elif step.status == "retry_wait":
            why = f"attempt {result.attempt} already ended; attempt {step.attempt + 1} is scheduled"
        else:
            why = f"step is {step.status}"
        d.emit(
            ResultIgnored,
            actor=COORDINATOR,
            reason=why,
            task_id=result.task_id,
            agent_id=result.agent_id,
        )
        return d.events

    spec = state.workflow.step(result.step)
    # Usage is charged whatever the outcome: the tokens were spent.
    for usage in result.usage:
        amount = policy.prices.charge(usage)
        d.emit(
            CostCharged,
            actor=COORDINATOR,
            reason=(
                f"priced with table {policy.prices.version}"
                if amount is not None
                else f"model {usage.model} is not in price table {policy.prices.version}"
            ),
            task_id=result.task_id,
            step=result.step,
            capability=spec.capability,
            agent_id=result.agent_id,
            model=usage.model,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            price_table=policy.prices.version,
            amount_usd=amount if amount is not None else 0,
        )

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
        _retry_or_fail(d, result.step, error, cause="error", retryable=retryable, repair=[])
        return d.events

    if spec.contract:
        model = policy.contract(spec.contract)
        try:
            model.model_validate(result.output)
        except ValidationError as exc:
            errors = [
                f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}"
                for e in exc.errors()
            ]
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
            _retry_or_fail(
                d,
                result.step,
                f"output broke contract {spec.contract}: {'; '.join(errors)}",
                cause="contract",
                retryable=True,
                repair=errors,
            )
            return d.events

    d.emit(
        TaskCompleted,
        actor=agent,
        reason=f"output meets contract {spec.contract}" if spec.contract else "output received",
        task_id=result.task_id,
        step=result.step,
        attempt=result.attempt,
        agent_id=result.agent_id,
        output_hash=content_hash(result.output),
        duration_ms=duration_ms,
    )
    _advance(d)
    return d.events


def _retry_or_fail(
    d: _Decision,
    step_name: str,
    error: str,
    *,
    cause: Literal["error", "timeout", "contract"],
    retryable: bool,
    repair: list[str],
) -> None:
    run = d.run
    spec = run.workflow.step(step_name)
    attempt = run.step(step_name).attempt
    policy = spec.retry
    allowed = retryable and cause in policy.retry_on
    if allowed and attempt < policy.max_attempts:
        next_attempt = attempt + 1
        delay = backoff_delay(policy, next_attempt, task_id(run.run_id, step_name, next_attempt))
        why = (
            "with the contract errors to repair"
            if repair
            else "after a timeout"
            if cause == "timeout"
            else f"after: {error}"
        )
        if delay <= 0:
            _dispatch(
                d,
                step_name,
                next_attempt,
                f"retry {next_attempt}/{policy.max_attempts} {why}",
                repair,
            )
            return
        d.emit(
            RetryScheduled,
            actor=COORDINATOR,
            reason=f"retry {next_attempt}/{policy.max_attempts} in {delay:.2f}s {why}",
            step=step_name,
            attempt=next_attempt,
            due_at=d.at + timedelta(seconds=delay),
            delay_s=delay,
            repair=repair,
        )
        return
    why = (
        f"step {step_name} failed after {attempt} attempt(s)"
        if allowed
        else f"step {step_name} failed with an error its retry policy does not retry"
    )
    if spec.on_failure == "skip":
        d.emit(
            StepSkipped,
            actor=COORDINATOR,
            reason=f"{why}; its policy is to skip",
            step=step_name,
            error=error,
        )
        _advance(d)
        return
    d.emit(RunFailed, actor=COORDINATOR, reason=why, step=step_name, error=error)


def _advance(d: _Decision) -> None:
    """Dispatch every step whose dependencies are met; complete the run when all are done."""
    run = d.run
    completed = {name for name, s in run.steps.items() if s.status in STEP_DONE}
    for spec in run.workflow.steps:
        if run.steps[spec.name].status != "pending":
            continue
        deps = _dependencies(run.workflow, spec.name)
        if deps <= completed:
            reason = f"after {', '.join(sorted(deps))} completed" if deps else "no dependencies"
            _dispatch(d, spec.name, 1, reason, [])
            if d.run.terminal:
                return
    run = d.run
    if all(s.status in STEP_DONE for s in run.steps.values()):
        context = _context(run)
        template = run.workflow.output
        if template is None:
            template = f"$steps.{run.workflow.steps[-1].name}.output"
        try:
            output = resolve(template, context)
        except ReferenceError_ as exc:
            d.emit(RunFailed, actor=COORDINATOR, reason="run output mapping failed", error=str(exc))
            return
        d.emit(RunCompleted, actor=COORDINATOR, reason="all steps completed", output=output)


def _dispatch(d: _Decision, step_name: str, attempt: int, reason: str, repair: list[str]) -> None:
    run = d.run
    spec = run.workflow.step(step_name)
    context = _context(run)
    try:
        task_input = resolve(spec.input, context)
    except ReferenceError_ as exc:
        d.emit(
            RunFailed,
            actor=COORDINATOR,
            reason=f"cannot build the input of step {step_name}",
            step=step_name,
            error=str(exc),
        )
        return
    lineage = [
        Lineage(
            step=name,
            attempt=run.steps[name].attempt,
            agent_id=run.steps[name].agent_id or "",
            output_hash=run.steps[name].output_hash or "",
        )
        for name in [s.name for s in run.workflow.steps]
        if run.steps[name].status == "completed" and name in _ancestors(run.workflow, step_name)
    ]
    d.emit(
        TaskDispatched,
        actor=COORDINATOR,
        reason=reason,
        task_id=task_id(run.run_id, step_name, attempt),
        step=step_name,
        attempt=attempt,
        capability=spec.capability,
        input=task_input,
        intent=run.intent,
        lineage=lineage,
        contract=spec.contract,
        repair=repair,
        timeout_s=spec.timeout_s,
    )


def _dependencies(workflow: WorkflowSpec, step_name: str) -> set[str]:
    return set(workflow.needs_of(step_name)) | referenced_steps(workflow.step(step_name).input)


def _ancestors(workflow: WorkflowSpec, step_name: str) -> set[str]:
    """Every step whose output the step was built from, directly or through another step."""
    found: set[str] = set()
    todo = list(_dependencies(workflow, step_name))
    while todo:
        name = todo.pop()
        if name not in found:
            found.add(name)
            todo.extend(_dependencies(workflow, name))
    return found


def _context(run: RunState) -> dict[str, Any]:
    return {
        "input": run.input,
        "intent": run.intent.model_dump(mode="json"),
        "steps": {
            name: {"output": s.output, "agent_id": s.agent_id}
            for name, s in run.steps.items()
            if s.status == "completed"
        },
    }
