"""What happens next: `decide(state, fact, policy) -> [events]`. Pure: the time and every input
come from the fact, so running this code over a recorded history reproduces its decisions.
"""

from __future__ import annotations

import hashlib
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from cairn.coordinator.domain.mapping import ReferenceError_, referenced_steps, resolve
from cairn.coordinator.domain.pricing import PriceTable
from cairn.coordinator.domain.state import STEP_DONE, RunState, evolve
from cairn.events import (
    ApprovalContext,
    ApprovalDenied,
    ApprovalEscalated,
    ApprovalExpired,
    ApprovalGranted,
    ApprovalKind,
    ApprovalPolicy,
    ApprovalRequested,
    ApprovalWarned,
    Budget,
    BudgetExhausted,
    BudgetRaised,
    BudgetReserved,
    BudgetSettled,
    CarriedOutput,
    ContractViolated,
    CostCharged,
    Event,
    ForkOrigin,
    Frozen,
    Intent,
    Lineage,
    OutputCarried,
    ReportedError,
    ResultIgnored,
    ResultReceived,
    RetryPolicy,
    RetryScheduled,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunStarted,
    StepAdmitted,
    StepRefused,
    StepSkipped,
    StepSpec,
    TaskCompleted,
    TaskDispatched,
    TaskFailed,
    TaskResult,
    TaskTimedOut,
    WorkflowSpec,
    content_hash,
)
from cairn.events.validation import error_lines

COORDINATOR = "coordinator"


class StartRunFact(Frozen):
    run_id: uuid.UUID
    workflow: WorkflowSpec
    input: dict[str, Any]
    intent: Intent
    requested_by: str
    at: datetime
    budget: Budget | None = None
    tenant: str = "default"
    forked_from: ForkOrigin | None = None
    carried: dict[str, CarriedOutput] = Field(default_factory=dict)
    # The trace the run is recorded under (its root span: the start command's), when traced.
    trace_id: str | None = None
    trace_span_id: str | None = None


class ResultFact(Frozen):
    result: TaskResult
    at: datetime


class CancelFact(Frozen):
    run_id: uuid.UUID
    requested_by: str
    reason: str = ""
    at: datetime


class ApprovalFact(Frozen):
    """A person approved or denied a step's pending request."""

    run_id: uuid.UUID
    step: str
    by: str
    approve: bool
    reason: str = ""
    at: datetime


class BudgetFact(Frozen):
    """A person set the run's budget to new totals."""

    run_id: uuid.UUID
    usd: Decimal | None = None
    tokens: int | None = None
    by: str
    reason: str = ""
    at: datetime


TimerKind = Literal["timeout", "retry", "approval", "approval_warn"]


class TimerFact(Frozen):
    """A timer the coordinator set has come due: a step's timeout, the end of a backoff, or an
    approval request's warning or deadline."""

    run_id: uuid.UUID
    step: str
    attempt: int
    kind: TimerKind
    at: datetime
    request_id: str | None = None


Fact = StartRunFact | ResultFact | CancelFact | TimerFact | ApprovalFact | BudgetFact


class Rejected(ValueError):
    """The fact does not belong to this run (an unknown task, a run that already exists...).

    Nothing is recorded in the run; the caller answers or dead-letters it with this reason.
    """


@dataclass(frozen=True)
class Policy:
    """The coordinator's rules that decisions consult: prices, output contracts, and what a
    step without a cost estimate is expected to cost when the run has a budget."""

    prices: PriceTable
    contract: Callable[[str], type[BaseModel]]
    default_estimate_usd: Decimal = Decimal("0.01")
    # What the run's tenant may still spend today, when it has a daily limit: a fact from
    # outside the run, given by the coordinator's ledger for each decision (and by the record
    # itself on replay).
    tenant: TenantAllowance | None = None


@dataclass(frozen=True)
class TenantAllowance:
    """The rest of a tenant's daily limit at the moment of a decision: its limit less today's
    charges and the reservations still open across all its runs. None: no limit of that kind."""

    usd: Decimal | None
    tokens: int | None


def task_id(run_id: uuid.UUID, step: str, attempt: int) -> str:
    return f"{run_id}:{step}:{attempt}"


class Decided(list[Event]):
    """A decision's events, with the run's state right after them (folded while deciding)."""

    state: RunState | None = None


def decide_with_state(
    state: RunState | None, fact: Fact, policy: Policy
) -> tuple[list[Event], RunState | None]:
    """`decide`, and the state its events lead to, without folding them a second time."""
    events = decide(state, fact, policy)
    if events and isinstance(events, Decided):
        return events, events.state
    return events, state


class _Decision:
    """Builds a list of events, evolving a private copy of the state as it goes."""

    def __init__(
        self, state: RunState | None, run_id: uuid.UUID, at: datetime, policy: Policy
    ) -> None:
        self.state = state
        self.run_id = run_id
        self.at = at
        self.policy = policy
        self.events = Decided()
        self.tenant_reserved = Decimal(0)  # set aside from the tenant's allowance so far

    @property
    def next_seq(self) -> int:
        return (self.state.version if self.state else 0) + 1

    def emit(self, cls: type[Event], **fields: Any) -> None:
        state = self.state
        if state is not None and state.trace_id is not None:
            fields["trace_id"] = state.trace_id  # from the record, so replay stamps the same
        event = cls(
            run_id=self.run_id,
            seq=self.next_seq,
            at=self.at,
            prev_hash=state.last_hash if state else "",
            **fields,
        )
        self.state = self.events.state = evolve(self.state, event)
        self.events.append(event)

    @property
    def run(self) -> RunState:
        assert self.state is not None
        return self.state


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
            return _approval_timer(state, fact, policy)
        return _timer(state, fact, policy)
    if isinstance(fact, ApprovalFact):
        return _decision(state, fact, policy)
    if isinstance(fact, BudgetFact):
        return _budget(state, fact, policy)
    return _cancel(state, fact, policy)


def _timer(state: RunState, fact: TimerFact, policy: Policy) -> list[Event]:
    """A timer that no longer matches the step (its result came, the run ended) does nothing."""
    step = state.steps.get(fact.step)
    if state.terminal or step is None:
        return []
    d = _Decision(state, state.run_id, fact.at, policy)
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
        _settle(d, fact.step, fact.attempt, Decimal(0), 0)
        _retry_or_fail(
            d,
            fact.step,
            f"attempt {fact.attempt} timed out after {step.timeout_s:g}s",
            cause="timeout",
            retryable=True,
            repair=[],
        )
    elif fact.kind == "retry" and step.status == "retry_wait" and step.attempt + 1 == fact.attempt:
        limit = state.workflow.step(fact.step).retry.max_attempts + step.extra_attempts
        reason = f"backoff over: attempt {fact.attempt}/{limit}"
        _begin(d, fact.step, fact.attempt, reason, list(step.repair))
    return d.events


def backoff_delay(policy: RetryPolicy, next_attempt: int, task: str) -> float:
    """Seconds to wait before `next_attempt`; the jitter is drawn from the task id, so the same
    history always gives the same delay."""
    retry_number = next_attempt - 1
    base = min(policy.max_backoff_s, policy.backoff_s * policy.multiplier ** (retry_number - 1))
    digest = hashlib.sha256(task.encode()).digest()
    spread = (int.from_bytes(digest[:8], "big") / 2**64) * 2 - 1  # in [-1, 1)
    return max(0.0, base * (1 + policy.jitter * spread))


def _start(state: RunState | None, fact: StartRunFact, policy: Policy) -> list[Event]:
    if state is not None:
        raise Rejected(f"run {fact.run_id} already exists ({state.status})")
    d = _Decision(None, fact.run_id, fact.at, policy)
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
    _advance(d, policy)
    return d.events


def _cancel(state: RunState, fact: CancelFact, policy: Policy) -> list[Event]:
    if state.terminal:
        raise Rejected(f"run {state.run_id} is already {state.status}")
    d = _Decision(state, state.run_id, fact.at, policy)
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
    d = _Decision(state, state.run_id, fact.at, policy)
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
        review=result.review,
        proposals=result.proposals,
    )
    if state.terminal:
        _charge_late(d, result, policy)
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
        _charge_late(d, result, policy)
        d.emit(
            ResultIgnored,
            actor=COORDINATOR,
            reason=why,
            task_id=result.task_id,
            agent_id=result.agent_id,
        )
        return d.events

    # Usage is charged whatever the outcome: the tokens were spent.
    charged, tokens = _charge(d, result, policy, "")
    _settle(d, result.step, result.attempt, charged, tokens)
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
        _retry_or_fail(d, result.step, error, cause="error", retryable=retryable, repair=[])
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
                _request_approval(
                    d,
                    result.step,
                    result.attempt,
                    "loop",
                    proposed=result.output,
                    note="the agent returned the same output as an earlier attempt",
                    policy=policy,
                )
                return d.events
            _retry_or_fail(
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
        _request_approval(
            d,
            result.step,
            result.attempt,
            "output",
            proposed=result.output,
            note=result.review or "",
            policy=policy,
        )
        return d.events
    _complete(d, result.step, duration_ms, policy)
    return d.events


def _charge(d: _Decision, result: TaskResult, policy: Policy, why: str) -> tuple[Decimal, int]:
    """One CostCharged per model the result reports; returns the amount and the tokens."""
    spec = d.run.workflow.step(result.step)
    charged = Decimal(0)
    tokens = 0
    for usage in result.usage:
        amount = policy.prices.charge(usage)
        charged += amount or 0
        tokens += usage.input_tokens + usage.output_tokens
        priced = (
            f"priced with table {policy.prices.version}"
            if amount is not None
            else f"model {usage.model} is not in price table {policy.prices.version}"
        )
        d.emit(
            CostCharged,
            actor=COORDINATOR,
            reason=f"{why}; {priced}" if why else priced,
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
    return charged, tokens


def _charge_late(d: _Decision, result: TaskResult, policy: Policy) -> None:
    """A result that arrives too late still cost its tokens: charge them, once per task. A
    duplicate of a result already charged is not charged again."""
    if result.task_id not in d.run.charged_tasks:
        _charge(d, result, policy, "a late result's tokens were spent all the same")


def _complete(d: _Decision, step_name: str, duration_ms: float, policy: Policy) -> None:
    """Accept the step's received output, admit what it proposes, and go on."""
    run = d.run
    step = run.step(step_name)
    spec = run.workflow.step(step_name)
    d.emit(
        TaskCompleted,
        actor=f"agent:{step.agent_id}" if step.agent_id else COORDINATOR,
        reason=f"output meets contract {spec.contract}" if spec.contract else "output received",
        task_id=step.task_id or task_id(run.run_id, step_name, step.attempt),
        step=step_name,
        attempt=step.attempt,
        agent_id=step.agent_id or "",
        output_hash=step.received_hash or content_hash(step.received),
        duration_ms=duration_ms,
    )
    if spec.may_propose:
        _admit_proposals(d, step_name, policy)
    _advance(d, policy)


def _admit_proposals(d: _Decision, proposer: str, policy: Policy) -> None:
    for proposal in d.run.step(proposer).proposals:
        run = d.run
        spec = (
            proposal
            if proposal.needs is not None
            else proposal.model_copy(update={"needs": [proposer]})
        )
        why = _refusal(run, spec, policy)
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
    estimate = _estimate(spec, policy)
    if remaining is not None and estimate > remaining:
        return f"its estimate ${estimate} does not fit the remaining budget ${remaining}"
    return None


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
            _begin(d, step_name, next_attempt, f"retry {next_attempt}/{limit} {why}", repair)
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
        _request_approval(
            d, step_name, attempt, "exhausted", proposed=None, note=f"{why}: {error}",
            policy=None,
        )  # fmt: skip
        return
    _give_up(d, step_name, why, error)


def _give_up(d: _Decision, step_name: str, why: str, error: str) -> None:
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
        _advance(d, d.policy)
        return
    d.emit(RunFailed, actor=COORDINATOR, reason=why, step=step_name, error=error)


def _advance(d: _Decision, policy: Policy) -> None:
    """Start every step whose dependencies are met; complete the run when all are done."""
    for spec in list(d.run.workflow.steps):
        run = d.run
        if run.terminal:
            return
        if run.steps[spec.name].status != "pending":
            continue
        done = {name for name, s in run.steps.items() if s.status in STEP_DONE}
        deps = _dependencies(run.workflow, spec.name)
        if deps <= done:
            reason = f"after {', '.join(sorted(deps))} completed" if deps else "no dependencies"
            _begin(d, spec.name, 1, reason, [])
    run = d.run
    if not run.terminal and all(s.status in STEP_DONE for s in run.steps.values()):
        context = _context(run)
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


def _begin(d: _Decision, step_name: str, attempt: int, reason: str, repair: list[str]) -> None:
    """The gates before a dispatch: the run's attempt limit, approvals, then the budget."""
    run = d.run
    spec = run.workflow.step(step_name)
    step = run.step(step_name)
    policy = d.policy
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
    estimate = _estimate(spec, policy)
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
                proposed = resolve(spec.input, _context(run))
            except ReferenceError_ as exc:
                proposed = {"error": str(exc)}
            note = (
                f"estimated ${estimate}, over the ${gate.cost_over_usd} threshold"
                if kind == "cost"
                else "this step asks for a look before it runs"
            )
            _request_approval(d, step_name, attempt, kind, proposed, note, policy)
            return
    remaining = run.remaining_usd
    remaining_tokens = run.remaining_tokens
    if (remaining is not None and estimate > remaining) or (
        remaining_tokens is not None and remaining_tokens <= 0
    ):
        assert run.budget is not None
        _exhausted(
            d, step_name, attempt, estimate, "budget",
            reason=(
                f"step {step_name} needs ${estimate}, ${remaining} remains"
                if remaining is not None and estimate > remaining
                else f"the run's {run.budget.tokens} tokens are spent"
            ),
            note=f"raise the budget to go on: the step needs ${estimate}",
            failed=("budget exhausted; the run fails closed",
                    f"budget exhausted before step {step_name}"),
        )  # fmt: skip
        return
    allowance = policy.tenant
    tenant_usd = tenant_tokens = None
    if allowance is not None:
        tenant_tokens = allowance.tokens
        if allowance.usd is not None:
            tenant_usd = allowance.usd - d.tenant_reserved
        short = (tenant_usd is not None and estimate > tenant_usd) or (
            tenant_tokens is not None and tenant_tokens <= 0
        )
        if short and not _tenant_cleared(run, step_name, attempt):
            _tenant_exhausted(d, step_name, attempt, estimate, tenant_usd, tenant_tokens)
            return
    if run.budget is not None or allowance is not None:
        d.emit(
            BudgetReserved,
            actor=COORDINATOR,
            reason=f"estimate for {step_name} attempt {attempt}",
            step=step_name,
            attempt=attempt,
            amount_usd=estimate,
            tenant_available_usd=tenant_usd,
            tenant_available_tokens=tenant_tokens,
        )
        d.tenant_reserved += estimate
    _dispatch(d, step_name, attempt, reason, repair)


def _tenant_cleared(run: RunState, step_name: str, attempt: int) -> bool:
    """A person let this attempt run over its tenant's daily limit."""
    return any(
        a.kind == "tenant"
        and a.status == "granted"
        and a.step == step_name
        and a.attempt == attempt
        for a in run.approvals.values()
    )


def _tenant_exhausted(
    d: _Decision,
    step_name: str,
    attempt: int,
    estimate: Decimal,
    usd: Decimal | None,
    tokens: int | None,
) -> None:
    tenant = d.run.tenant
    _exhausted(
        d, step_name, attempt, estimate, "tenant",
        reason=(
            f"step {step_name} needs ${estimate}, tenant {tenant} has ${usd} left today"
            if usd is not None and estimate > usd
            else f"tenant {tenant} has used its daily tokens"
        ),
        note=(
            f"tenant {tenant}'s daily limit is reached: approve to let this step run "
            "over it, deny to fail the run"
        ),
        failed=(f"tenant {tenant}'s daily limit is reached; the run fails closed",
                f"tenant daily limit reached before step {step_name}"),
        tenant_available_usd=usd,
        tenant_available_tokens=tokens,
    )  # fmt: skip


def _exhausted(
    d: _Decision,
    step_name: str,
    attempt: int,
    estimate: Decimal,
    kind: Literal["budget", "tenant"],
    *,
    reason: str,
    note: str,
    failed: tuple[str, str],
    **tenant: Any,
) -> None:
    """The next reservation does not fit the run's budget (`budget`) or its tenant's day
    (`tenant`): record it, then ask a person, or fail the run (with `failed`: the reason and
    the error) when it fails closed."""
    run = d.run
    d.emit(
        BudgetExhausted,
        actor=COORDINATOR,
        reason=reason,
        step=step_name,
        needed_usd=estimate,
        remaining_usd=run.remaining_usd,
        remaining_tokens=run.remaining_tokens,
        scope="run" if kind == "budget" else "tenant",
        **tenant,
    )
    if run.budget is None or run.budget.on_exhausted == "ask":
        _request_approval(d, step_name, attempt, kind, proposed=None, note=note, policy=d.policy)
    else:
        d.emit(
            RunFailed,
            actor=COORDINATOR,
            reason=failed[0],
            step=step_name,
            error=failed[1],
        )


def _estimate(spec: StepSpec, policy: Policy) -> Decimal:
    """What one attempt of the step is expected to cost: its own estimate, or the default."""
    return spec.cost_estimate_usd or policy.default_estimate_usd


def _settle(d: _Decision, step_name: str, attempt: int, actual: Decimal, tokens: int) -> None:
    reserved = d.run.reserved.get((step_name, attempt))
    if reserved is None:
        return
    over = actual - reserved
    d.emit(
        BudgetSettled,
        actor=COORDINATOR,
        reason=(f"${over} over the estimate" if over > 0 else "within the estimate"),
        step=step_name,
        attempt=attempt,
        reserved_usd=reserved,
        actual_usd=actual,
        actual_tokens=tokens,
    )


def _request_approval(
    d: _Decision,
    step_name: str,
    attempt: int,
    kind: ApprovalKind,
    proposed: Any,
    note: str,
    policy: Policy | None,
) -> None:
    run = d.run
    spec = run.workflow.step(step_name)
    gate = spec.approval or ApprovalPolicy()
    base = f"{run.run_id}:{step_name}:{attempt}:{kind}"
    request_id = base
    n = 1
    while request_id in run.approvals:
        n += 1
        request_id = f"{base}:{n}"
    due = d.at + timedelta(seconds=gate.timeout_s)
    warn = due - timedelta(seconds=gate.warn_before_s) if gate.warn_before_s else None
    estimate = _estimate(spec, policy or d.policy)
    d.emit(
        ApprovalRequested,
        actor=COORDINATOR,
        reason=note or f"{kind} approval for {step_name}",
        request_id=request_id,
        step=step_name,
        attempt=attempt,
        kind=kind,
        group=gate.approvers,
        due_at=due,
        warn_at=warn if warn is not None and warn > d.at else None,
        context=ApprovalContext(
            intent=run.intent,
            step=step_name,
            capability=spec.capability,
            proposed=proposed,
            cost_so_far_usd=run.cost_usd,
            estimate_usd=estimate,
            note=note,
        ),
    )


def _decision(state: RunState, fact: ApprovalFact, policy: Policy) -> list[Event]:
    step = state.steps.get(fact.step)
    if step is None:
        raise Rejected(f"run {state.run_id} has no step {fact.step!r}")
    if step.approval_id is None:
        latest = [a for a in state.approvals.values() if a.step == fact.step]
        if not latest:
            raise Rejected(f"step {fact.step} has no approval request")
        last = latest[-1]
        if last.status == "expired":
            raise Rejected(
                f"the approval request for {fact.step} expired at {last.due_at.isoformat()}"
            )
        raise Rejected(
            f"the approval request for {fact.step} was already {last.status} by {last.by}"
        )
    if state.terminal:
        raise Rejected(f"run {state.run_id} is already {state.status}")
    approval = state.approvals[step.approval_id]
    if fact.approve and approval.kind == "budget":
        raise Rejected(
            "this request waits for more budget: raise it with `cairn budget raise` "
            "(or deny to fail the run)"
        )
    d = _Decision(state, state.run_id, fact.at, policy)
    actor = f"human:{fact.by}"
    if fact.approve:
        d.emit(
            ApprovalGranted,
            actor=actor,
            reason=fact.reason or "approved",
            request_id=approval.request_id,
            step=fact.step,
            by=fact.by,
        )
        _resume(d, approval.step, approval.kind, approval.attempt, f"approved by {fact.by}")
    else:
        reason = fact.reason or "no reason given"
        d.emit(
            ApprovalDenied,
            actor=actor,
            reason=reason,
            request_id=approval.request_id,
            step=fact.step,
            by=fact.by,
        )
        _refuse(d, approval.step, approval.kind, f"denied by {fact.by}: {reason}")
    return d.events


def _resume(d: _Decision, step_name: str, kind: str, attempt: int, why: str) -> None:
    """Go on after a granted request."""
    step = d.run.step(step_name)
    if kind == "output":
        _complete(d, step_name, 0.0, d.policy)
    elif kind in ("exhausted", "loop"):
        # One more attempt than the policy allowed (the grant added it), with what went wrong.
        _begin(d, step_name, attempt + 1, f"another attempt {why}", list(step.repair))
    else:  # before, cost, budget: the dispatch that was held
        _begin(d, step_name, attempt, why, list(step.repair))


def _refuse(d: _Decision, step_name: str, kind: str, why: str) -> None:
    """What a denial (or an expiry that counts as one) does to the step."""
    if kind == "output":
        _retry_or_fail(
            d, step_name, f"output rejected, {why}", cause="error", retryable=True, repair=[why]
        )
    elif kind in ("before", "cost"):
        _give_up(d, step_name, f"step {step_name} was not approved", why)
    else:
        d.emit(
            RunFailed,
            actor=COORDINATOR,
            reason=f"step {step_name} {why}",
            step=step_name,
            error=why,
        )


def _approval_timer(state: RunState, fact: TimerFact, policy: Policy) -> list[Event]:
    approval = state.approvals.get(fact.request_id or "")
    if state.terminal or approval is None or approval.status != "pending":
        return []
    d = _Decision(state, state.run_id, fact.at, policy)
    gate = state.workflow.step(approval.step).approval or ApprovalPolicy()
    if fact.kind == "approval_warn":
        if approval.warn_at is None or fact.at < approval.warn_at:
            return []
        d.emit(
            ApprovalWarned,
            actor=COORDINATOR,
            reason=f"expires at {approval.due_at.isoformat()}",
            request_id=approval.request_id,
            step=approval.step,
            due_at=approval.due_at,
        )
        return d.events
    if fact.at < approval.due_at:
        return []  # an old timer: the request was escalated since
    if gate.on_expiry == "escalate" and approval.escalations < len(gate.escalate_to):
        group = gate.escalate_to[approval.escalations]
        due = fact.at + timedelta(seconds=gate.timeout_s)
        warn = due - timedelta(seconds=gate.warn_before_s) if gate.warn_before_s else None
        d.emit(
            ApprovalEscalated,
            actor=COORDINATOR,
            reason=f"nobody in {approval.group} decided in time",
            request_id=approval.request_id,
            step=approval.step,
            group=group,
            due_at=due,
            warn_at=warn,
        )
        return d.events
    d.emit(
        ApprovalExpired,
        actor=COORDINATOR,
        reason=f"nobody decided by {approval.due_at.isoformat()}",
        request_id=approval.request_id,
        step=approval.step,
    )
    why = f"approval expired at {approval.due_at.isoformat()}"
    if gate.on_expiry == "deny":
        _refuse(d, approval.step, approval.kind, why)
    else:
        d.emit(RunFailed, actor=COORDINATOR, reason=why, step=approval.step, error=why)
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
    d = _Decision(state, state.run_id, fact.at, policy)
    d.emit(
        BudgetRaised,
        actor=f"human:{fact.by}",
        reason=fact.reason or "budget raised",
        usd=fact.usd,
        tokens=fact.tokens,
        by=fact.by,
    )
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
            _begin(
                d,
                approval.step,
                approval.attempt,
                f"budget raised by {fact.by}",
                list(d.run.step(approval.step).repair),
            )
    return d.events


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
    ancestors = _ancestors(run.workflow, step_name)
    lineage = [
        Lineage(
            step=name,
            attempt=run.steps[name].attempt,
            agent_id=run.steps[name].agent_id or "",
            output_hash=run.steps[name].output_hash or "",
        )
        for name in [s.name for s in run.workflow.steps]
        if run.steps[name].status == "completed" and name in ancestors
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
        model=spec.model,
    )


def _dependencies(workflow: WorkflowSpec, step_name: str) -> frozenset[str]:
    """The steps a step needs: declared (or the one before it) and referenced by its input.
    Worked out once per workflow object: every decision asks, for every pending step."""
    ref = _shapes.get(id(workflow))
    if ref is None or ref() is not workflow:
        ref = _Shape(workflow, _forget_shape)
        ref.key = id(workflow)
        ref.deps = {
            s.name: frozenset(workflow.needs_of(s.name)) | referenced_steps(s.input)
            for s in workflow.steps
        }
        _shapes[ref.key] = ref
    deps = ref.deps.get(step_name)
    if deps is None:
        raise KeyError(step_name)
    return deps


class _Shape(weakref.ref):  # type: ignore[type-arg]
    """A weak reference to a workflow that carries its steps' dependencies; it leaves the
    cache with the workflow (workflows are frozen, so what is worked out stays true)."""

    __slots__ = ("deps", "key")
    deps: dict[str, frozenset[str]]
    key: int


_shapes: dict[int, _Shape] = {}


def _forget_shape(ref: _Shape) -> None:
    if _shapes.get(ref.key) is ref:
        del _shapes[ref.key]


def descendants(workflow: WorkflowSpec, step_name: str) -> set[str]:
    """Every step built from the step's output, directly or through another step."""
    return {s.name for s in workflow.steps if step_name in _ancestors(workflow, s.name)}


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
