"""A step's way through a run: begun when its dependencies are met (past the gates: the run's
attempt limit, approvals, the budget), dispatched, retried after a backoff or given up when it
fails, completed (admitting the steps it proposes), and the run completed when every step is
done. Step timers (a timeout, the end of a backoff) move it on too.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta
from decimal import Decimal
from typing import Literal

from cairn.coordinator.domain.approval_requests import request_approval
from cairn.coordinator.domain.builder import COORDINATOR, Decision
from cairn.coordinator.domain.facts import Policy, TimerFact, task_id
from cairn.coordinator.domain.graph import dependencies, lineage, mapping_context
from cairn.coordinator.domain.mapping import ReferenceError_, referenced_steps, resolve
from cairn.coordinator.domain.money import reserve, settle
from cairn.coordinator.domain.state import STEP_DONE, RunState
from cairn.events import (
    ApprovalKind,
    Event,
    RetryPolicy,
    RetryScheduled,
    RunCompleted,
    RunFailed,
    StepAdmitted,
    StepRefused,
    StepSkipped,
    StepSpec,
    TaskCompleted,
    TaskDispatched,
    TaskTimedOut,
    content_hash,
)


def step_timer(state: RunState, fact: TimerFact, policy: Policy) -> list[Event]:
    """A step's timeout or the end of its backoff. A timer that no longer matters (its result
    came, the run ended) does nothing."""
    if not state.timer_matters(fact.kind, fact.step, fact.attempt, fact.request_id):
        return []
    step = state.step(fact.step)
    d = Decision(state, state.run_id, fact.at, policy)
    if fact.kind == "timeout":
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
        settle(d, fact.step, fact.attempt, Decimal(0), 0)
        retry_or_fail(
            d,
            fact.step,
            f"attempt {fact.attempt} timed out after {step.timeout_s:g}s",
            cause="timeout",
            retryable=True,
            repair=[],
        )
    else:
        limit = state.workflow.step(fact.step).retry.max_attempts + step.extra_attempts
        reason = f"backoff over: attempt {fact.attempt}/{limit}"
        begin(d, fact.step, fact.attempt, reason, list(step.repair))
    return d.events


def backoff_delay(policy: RetryPolicy, next_attempt: int, task: str) -> float:
    """Seconds to wait before `next_attempt`; the jitter is drawn from the task id, so the same
    history always gives the same delay."""
    retry_number = next_attempt - 1
    base = min(policy.max_backoff_s, policy.backoff_s * policy.multiplier ** (retry_number - 1))
    digest = hashlib.sha256(task.encode()).digest()
    spread = (int.from_bytes(digest[:8], "big") / 2**64) * 2 - 1  # in [-1, 1)
    return max(0.0, base * (1 + policy.jitter * spread))


def advance(d: Decision) -> None:
    """Start every step whose dependencies are met; complete the run when all are done."""
    for spec in list(d.run.workflow.steps):
        run = d.run
        if run.terminal:
            return
        if run.steps[spec.name].status != "pending":
            continue
        done = {name for name, s in run.steps.items() if s.status in STEP_DONE}
        deps = dependencies(run.workflow, spec.name)
        if deps <= done:
            reason = f"after {', '.join(sorted(deps))} completed" if deps else "no dependencies"
            begin(d, spec.name, 1, reason, [])
    run = d.run
    if not run.terminal and all(s.status in STEP_DONE for s in run.steps.values()):
        context = mapping_context(run)
        template = run.workflow.output
        if template is None:  # the last step's output, or the last one that was not skipped
            finished = [
                s.name for s in run.workflow.steps if run.steps[s.name].status == "completed"
            ]
            template = f"$steps.{finished[-1]}.output" if finished else None
        try:
            output = resolve(template, context)
        except ReferenceError_ as exc:
            d.emit(RunFailed, actor=COORDINATOR, reason="run output mapping failed", error=str(exc))
            return
        d.emit(RunCompleted, actor=COORDINATOR, reason="all steps completed", output=output)


def begin(d: Decision, step_name: str, attempt: int, reason: str, repair: list[str]) -> None:
    """The gates before a dispatch: the run's attempt limit, approvals, then the budget."""
    run = d.run
    spec = run.workflow.step(step_name)
    step = run.step(step_name)
    limits = run.workflow.limits
    if run.attempts >= limits.max_attempts:
        d.emit(
            RunFailed,
            actor=COORDINATOR,
            reason=f"the run reached its limit of {limits.max_attempts} attempts",
            step=step_name,
            error="attempt limit reached",
        )
        return
    estimate = d.policy.estimate(spec)
    gate = spec.approval
    if gate is not None and attempt == 1:
        kind: ApprovalKind | None = None
        if gate.before and "before" not in step.cleared:
            kind = "before"
        elif (
            gate.cost_over_usd is not None
            and estimate > gate.cost_over_usd
            and "cost" not in step.cleared
        ):
            kind = "cost"
        if kind is not None:
            try:
                proposed = resolve(spec.input, mapping_context(run))
            except ReferenceError_ as exc:
                proposed = {"error": str(exc)}
            note = (
                f"estimated ${estimate}, over the ${gate.cost_over_usd} threshold"
                if kind == "cost"
                else "this step asks for a look before it runs"
            )
            request_approval(d, step_name, attempt, kind, proposed=proposed, note=note)
            return
    if reserve(d, step_name, attempt, estimate):
        _dispatch(d, step_name, attempt, reason, repair)


def _dispatch(d: Decision, step_name: str, attempt: int, reason: str, repair: list[str]) -> None:
    run = d.run
    spec = run.workflow.step(step_name)
    try:
        task_input = resolve(spec.input, mapping_context(run))
    except ReferenceError_ as exc:
        d.emit(
            RunFailed,
            actor=COORDINATOR,
            reason=f"cannot build the input of step {step_name}",
            step=step_name,
            error=str(exc),
        )
        return
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
        lineage=lineage(run, step_name),
        contract=spec.contract,
        repair=repair,
        timeout_s=spec.timeout_s,
        model=spec.model,
    )


def retry_or_fail(
    d: Decision,
    step_name: str,
    error: str,
    *,
    cause: Literal["error", "timeout", "contract"],
    retryable: bool,
    repair: list[str],
) -> None:
    """The step's attempt went wrong: try again (at once or after a backoff) if its retry policy
    allows, else ask a person or give the step up, as its policy says."""
    run = d.run
    spec = run.workflow.step(step_name)
    step = run.step(step_name)
    attempt = step.attempt
    policy = spec.retry
    allowed = retryable and cause in policy.retry_on
    limit = policy.max_attempts + step.extra_attempts
    if allowed and attempt < limit:
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
            begin(d, step_name, next_attempt, f"retry {next_attempt}/{limit} {why}", repair)
            return
        d.emit(
            RetryScheduled,
            actor=COORDINATOR,
            reason=f"retry {next_attempt}/{limit} in {delay:.2f}s {why}",
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
    if spec.on_failure == "ask":
        request_approval(d, step_name, attempt, "exhausted", proposed=None, note=f"{why}: {error}")
        return
    give_up(d, step_name, why, error)


def give_up(d: Decision, step_name: str, why: str, error: str) -> None:
    """The step will not be done: skip it if its policy says so, else fail the run."""
    spec = d.run.workflow.step(step_name)
    if spec.on_failure == "skip":
        d.emit(
            StepSkipped,
            actor=COORDINATOR,
            reason=f"{why}; its policy is to skip",
            step=step_name,
            error=error,
        )
        advance(d)
        return
    d.emit(RunFailed, actor=COORDINATOR, reason=why, step=step_name, error=error)


def complete(d: Decision, step_name: str, duration_ms: float) -> None:
    """Accept the step's received output, admit what it proposes, and go on."""
    run = d.run
    step = run.step(step_name)
    spec = run.workflow.step(step_name)
    d.emit(
        TaskCompleted,
        actor=f"agent:{spec.capability}" if step.agent_id else COORDINATOR,
        reason=f"output meets contract {spec.contract}" if spec.contract else "output received",
        task_id=step.task_id or task_id(run.run_id, step_name, step.attempt),
        step=step_name,
        attempt=step.attempt,
        agent_id=step.agent_id or "",
        output_hash=step.received_hash or content_hash(step.received),
        duration_ms=duration_ms,
    )
    if spec.may_propose:
        _admit_proposals(d, step_name)
    advance(d)


def _admit_proposals(d: Decision, proposer: str) -> None:
    for proposal in d.run.step(proposer).proposals:
        run = d.run
        spec = (
            proposal
            if proposal.needs is not None
            else proposal.model_copy(update={"needs": [proposer]})
        )
        why = _refusal(run, spec, d.policy)
        if why:
            d.emit(StepRefused, actor=COORDINATOR, reason=why, name=spec.name, proposed_by=proposer)
        else:
            d.emit(
                StepAdmitted,
                actor=COORDINATOR,
                reason=f"proposed by {proposer}; within the run's limits",
                spec=spec,
                proposed_by=proposer,
            )


def _refusal(run: RunState, spec: StepSpec, policy: Policy) -> str | None:
    """Why a proposed step may not join the run, or None when it may."""
    limits = run.workflow.limits
    if spec.name in run.steps:
        return f"a step named {spec.name!r} already exists"
    if len(run.steps) >= limits.max_steps:
        return f"the run already has {len(run.steps)} steps, its limit is {limits.max_steps}"
    unknown = (set(spec.needs or []) | referenced_steps(spec.input)) - set(run.steps)
    if unknown:
        return f"it depends on unknown steps: {', '.join(sorted(unknown))}"
    if spec.contract:
        try:
            policy.contract(spec.contract)
        except LookupError as exc:
            return str(exc)
    remaining = run.remaining_usd
    estimate = policy.estimate(spec)
    if remaining is not None and estimate > remaining:
        return f"its estimate ${estimate} does not fit the remaining budget ${remaining}"
    return None
